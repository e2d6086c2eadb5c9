//! Standalone `umbra attack` (same arguments), for running the suite without the whole CLI:
//! `cargo run --release -p umbra-attacks --example attack -- hat --plain ... --obfuscated ... --key ...`.
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: umbra_attacks::cli::AttackCommand,
}

fn main() {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = umbra_attacks::cli::run(&Cli::parse().cmd) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
