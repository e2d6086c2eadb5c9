//! Stand-alone runner of `umbra-sap` (the `umbra` CLI exposes the same commands):
//! `sap_party party --role vendor --broker nats://127.0.0.1:4222 --job job.toml`,
//! `sap_party finetune ...`, `sap_party attack ...`, `sap_party bench ...`.
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
    Party(cli::PartyArgs),
    Finetune(cli::FinetuneArgs),
    Attack(cli::AttackArgs),
    Bench(cli::BenchArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let r = match Cli::parse().cmd {
        Cmd::Party(a) => cli::run_party(&a).map(|_| ()),
        Cmd::Finetune(a) => cli::run_finetune(&a).map(|_| ()),
        Cmd::Attack(a) => cli::run_attack(&a).map(|_| ()),
        Cmd::Bench(a) => cli::run_bench(&a).map(|_| ()),
    };
    if let Err(e) = r {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
