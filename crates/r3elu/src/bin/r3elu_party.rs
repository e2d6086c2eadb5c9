//! Stand-alone runner of `umbra-r3elu` (the `umbra` CLI exposes the same commands):
//! `r3elu_party party --role host --broker nats://127.0.0.1:4222 --data fashion-mnist ...`,
//! `r3elu_party train|attack|bench ...`.
use clap::Parser;
use umbra_r3elu::cli;

#[derive(Parser)]
#[command(name = "r3elu_party", about = "R3eLU private SplitNN (umbra-r3elu)")]
struct Cli {
    #[command(subcommand)]
    cmd: cli::Command,
}

fn main() {
    umbra_vfl::cli::party_main(|| cli::run(&Cli::parse().cmd));
}
