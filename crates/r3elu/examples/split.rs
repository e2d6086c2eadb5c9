//! The `umbra split` commands without the umbra binary:
//! `cargo run --release -p umbra-r3elu --example split -- train|attack|bench ...`.
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Train(umbra_r3elu::cli::SplitTrainArgs),
    Attack(umbra_r3elu::cli::SplitAttackArgs),
    Bench(umbra_r3elu::cli::BenchSplitArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let r = match Cli::parse().cmd {
        Cmd::Train(a) => umbra_r3elu::cli::run_train(&a).map(|_| ()),
        Cmd::Attack(a) => umbra_r3elu::cli::run_attack(&a).map(|_| ()),
        Cmd::Bench(a) => umbra_r3elu::cli::run_bench(&a).map(|_| ()),
    };
    if let Err(e) = r {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
