//! `umbra`: privacy-preserving ML on models people already use.
//!
//! Every subcommand reports failures as one `error: ...` line and a non-zero exit.
use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod model_cmds;
mod obfuscation_cmds;
mod util;

#[derive(Parser)]
#[command(name = "umbra", version, about = "Privacy-preserving ML on models people already use", long_about = None)]
struct Cli {
    /// Log level filter (e.g. info, debug, umbra_aloepri=debug); also read from RUST_LOG.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Quick start: fetch SmolLM2, obfuscate it, and compare a private generation with the plaintext one.
    Demo(obfuscation_cmds::DemoArgs),
    /// Fetch a model or dataset into the cache (~/.cache/umbra or $UMBRA_CACHE) and print its path.
    Fetch(model_cmds::FetchArgs),
    /// Convert a GGUF file into an HF folder (config.json, model.safetensors, tokenizer.json).
    Convert(model_cmds::ConvertArgs),
    /// Generate text from a checkpoint (plain, or obfuscated with the client key).
    Generate(model_cmds::GenerateArgs),
    /// Compile a plaintext checkpoint into an obfuscated one plus a client key (AloePri).
    Obfuscate(obfuscation_cmds::ObfuscateArgs),
    /// Measure things: fidelity of an obfuscated checkpoint.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Benchmarks that print a table and write JSON.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Obfuscated vs plaintext on real text: top-1 agreement, perplexity ratio, greedy match.
    Fidelity(obfuscation_cmds::FidelityArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Obfuscation time and memory, and generation speed plain vs obfuscated (and llama.cpp).
    Obfuscation(bench::BenchObfuscationArgs),
}

fn main() {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| cli.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(cli.command) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Demo(a) => obfuscation_cmds::demo(&a),
        Command::Fetch(a) => model_cmds::fetch(&a),
        Command::Convert(a) => model_cmds::convert(&a),
        Command::Generate(a) => model_cmds::generate(&a),
        Command::Obfuscate(a) => obfuscation_cmds::obfuscate(&a),
        Command::Eval(EvalCommand::Fidelity(a)) => obfuscation_cmds::fidelity(&a),
        Command::Bench(BenchCommand::Obfuscation(a)) => bench::obfuscation(&a),
    }
}
