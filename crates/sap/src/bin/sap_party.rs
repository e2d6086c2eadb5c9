//! Stand-alone runner of `umbra-sap` (the `umbra` CLI exposes the same commands):
//! `sap_party party --role vendor --broker nats://127.0.0.1:4222 --job job.toml`,
//! `sap_party finetune ...`, `sap_party attack ...`, `sap_party bench ...` (= `umbra bench sap`).
use clap::{Parser, Subcommand};
use umbra_sap::cli;

#[derive(Parser)]
#[command(
    name = "sap_party",
    about = "Split-and-privatize fine-tuning (umbra-sap)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    #[command(flatten)]
    Sap(cli::Command),
    /// The eta sweep at one split (same as `umbra bench sap`).
    Bench(Box<cli::BenchArgs>),
}

fn main() {
    umbra_vfl::cli::party_main(|| match Cli::parse().cmd {
        Cmd::Sap(c) => cli::run(&c),
        Cmd::Bench(a) => cli::run_bench(&a).map(|_| ()),
    });
}
