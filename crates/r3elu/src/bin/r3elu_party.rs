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
    umbra_vfl::cli::party_main(|| umbra_r3elu::cli::run_party(&cli.args).map(|_| ()));
}
