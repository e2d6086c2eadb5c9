//! Stand-alone runner of `umbra-vfl` (the `umbra` CLI exposes the same commands):
//! `vfl_party party --role passive --broker nats://127.0.0.1:4222 --job job.toml`,
//! `vfl_party train ...`, `vfl_party plan ...`, `vfl_party bench ...`.
use clap::{Parser, Subcommand};
use umbra_vfl::cli;

#[derive(Parser)]
#[command(name = "vfl_party", about = "Two-party split learning (umbra-vfl)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Party(cli::VflPartyArgs),
    Train(cli::VflTrainArgs),
    Plan(cli::VflPlanArgs),
    Bench(cli::BenchVflArgs),
}

fn main() {
    cli::party_main(|| match Cli::parse().cmd {
        Cmd::Party(a) => cli::run_party(&a).map(|_| ()),
        Cmd::Train(a) => cli::run_train(&a).map(|_| ()),
        Cmd::Plan(a) => cli::run_plan(&a).map(|_| ()),
        Cmd::Bench(a) => cli::run_bench(&a).map(|_| ()),
    });
}
