//! `cargo run --release -p umbra-serve --features cli --example bench_serve -- --json out.json`
//! (what `umbra bench serve` runs).
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: umbra_serve::cli::BenchServeArgs,
}

fn main() {
    if let Err(e) = umbra_serve::cli::run_bench(&Cli::parse().args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
