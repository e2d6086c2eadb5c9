//! Stand-alone runner of `umbra-sap` (the `umbra` CLI exposes the same commands):
//! `sap_party party --role vendor --broker nats://127.0.0.1:4222 --job job.toml`,
//! `sap_party finetune ...`, `sap_party attack ...`.
use clap::Parser;
use umbra_sap::cli;

#[derive(Parser)]
#[command(
    name = "sap_party",
    about = "Split-and-privatize fine-tuning (umbra-sap)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: cli::Command,
}

fn main() {
    umbra_vfl::cli::party_main(|| cli::run(&Cli::parse().cmd).map(|_| ()));
}
