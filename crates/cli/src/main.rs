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
    /// `umbra serve` and `umbra proxy`.
    #[command(flatten)]
    Serving(umbra_serve::cli::Command),
    /// Two-party split learning on vertically split data (PubSub-VFL).
    #[command(subcommand)]
    Vfl(umbra_vfl::cli::Command),
    /// Benchmarks that print a table and write JSON.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Private SplitNN with R3eLU (guest features, host labels) and the attacks it stops.
    #[command(subcommand)]
    Split(umbra_r3elu::cli::Command),
    /// Attacks on an obfuscated checkpoint (VMA, IA, NN, hat, TFMA, SDA, IMA, ISA, block key), scored against the key; sweeps.
    #[command(subcommand)]
    Attack(umbra_attacks::cli::AttackCommand),
    /// Hallucination detection from internal states (HaluProbe): generate, extract, train, report, transfer, score.
    #[command(subcommand)]
    Halluc(umbra_haluprobe::cli::Command),
    /// SAP: private fine-tuning of a vendor's encoder with split-and-privatize (d_chi, CTI).
    #[command(subcommand)]
    Sap(umbra_sap::cli::Command),
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Obfuscated vs plaintext on real text: top-1 agreement, perplexity ratio, greedy match.
    Fidelity(obfuscation_cmds::FidelityArgs),
    /// Quantized paths (Q8_0, Q4) vs the F32 path of one model: top-1 agreement, ppl ratio.
    Quant(umbra_model::cli::eval_quant::EvalQuantArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Obfuscation time and memory, and generation speed plain vs obfuscated (and llama.cpp).
    Obfuscation(bench::BenchObfuscationArgs),
    /// Serving throughput, TTFT and TPOT, plain vs obfuscated, at 1, 4 and 16 clients (--soak: a max-context prompt beside short chats).
    Serve(umbra_serve::cli::BenchServeArgs),
    /// The five split-learning modes on one dataset, one table.
    Vfl(umbra_vfl::cli::BenchVflArgs),
    /// Accuracy vs attack success for none / R3eLU / Gaussian DP over a total-epsilon grid.
    Split(umbra_r3elu::cli::BenchSplitArgs),
    /// SAP accuracy vs empirical privacy: none / d_chi / d_chi+CTI / Gaussian / centralized.
    Sap(umbra_sap::cli::BenchArgs),
    /// Our engine vs llama.cpp: F32/Q8_0/Q4 decode, first-token latency, 1.5B Q4_K_M, peak RSS.
    Engine(umbra_model::cli::bench_engine::BenchEngineArgs),
}

fn main() {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Vfl(_) | Command::Bench(BenchCommand::Vfl(_))
    ) {
        umbra_vfl::cli::one_compute_thread_per_worker();
    }
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
        Command::Attack(c) => umbra_attacks::cli::run(&c).map_err(Into::into),
        Command::Fetch(a) => model_cmds::fetch(&a),
        Command::Convert(a) => model_cmds::convert(&a),
        Command::Generate(a) => model_cmds::generate(&a),
        Command::Obfuscate(a) => obfuscation_cmds::obfuscate(&a),
        Command::Eval(EvalCommand::Fidelity(a)) => obfuscation_cmds::fidelity(&a),
        Command::Eval(EvalCommand::Quant(a)) => umbra_model::cli::eval_quant::run(&a)
            .map(|_| ())
            .map_err(Into::into),
        Command::Bench(BenchCommand::Obfuscation(a)) => bench::obfuscation(&a),
        Command::Bench(BenchCommand::Engine(a)) => umbra_model::cli::bench_engine::run(&a)
            .map(|_| ())
            .map_err(Into::into),
        Command::Serving(c) => umbra_serve::cli::run(&c).map_err(Into::into),
        Command::Bench(BenchCommand::Serve(a)) => {
            umbra_serve::cli::run_bench(&a).map_err(Into::into)
        }
        Command::Bench(BenchCommand::Vfl(a)) => umbra_vfl::cli::run_bench(&a)
            .map(|_| ())
            .map_err(Into::into),
        Command::Bench(BenchCommand::Split(a)) => umbra_r3elu::cli::run_bench(&a)
            .map(|_| ())
            .map_err(Into::into),
        Command::Split(c) => umbra_r3elu::cli::run(&c).map_err(Into::into),
        Command::Halluc(c) => umbra_haluprobe::cli::run(&c).map_err(Into::into),
        Command::Sap(c) => umbra_sap::cli::run(&c).map_err(Into::into),
        Command::Bench(BenchCommand::Sap(a)) => umbra_sap::cli::run_bench(&a)
            .map(|_| ())
            .map_err(Into::into),
        Command::Vfl(c) => umbra_vfl::cli::run(&c).map_err(Into::into),
    }
}
