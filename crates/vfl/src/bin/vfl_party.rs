//! Stand-alone runner of `umbra-vfl` (the `umbra` CLI exposes the same commands):
//! `vfl_party party --role passive --broker nats://127.0.0.1:4222 --job job.toml`,
//! `vfl_party train ...`, `vfl_party plan ...`, `vfl_party bench ...`.
use clap::Parser;
use umbra_vfl::cli;

#[derive(Parser)]
#[command(name = "vfl_party", about = "Two-party split learning (umbra-vfl)")]
struct Cli {
    #[command(subcommand)]
    cmd: cli::Command,
}

fn main() {
    cli::one_compute_thread_per_worker();
    cli::party_main(|| cli::run(&Cli::parse().cmd));
}
