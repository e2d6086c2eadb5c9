//! One party of an R3eLU split-learning job in its own process, over NATS (what
//! `umbra split party` runs; the crate's two-process test drives this binary).
use clap::Parser;

#[derive(Parser)]
#[command(name = "r3elu_party")]
struct Cli {
    #[command(flatten)]
    args: umbra_r3elu::cli::SplitPartyArgs,
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = umbra_r3elu::cli::run_party(&cli.args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
