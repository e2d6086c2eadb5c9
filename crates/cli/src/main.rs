//! `umbra`: privacy-preserving ML on models people already use.
//!
//! Every subcommand reports failures as one `error: ...` line and a non-zero exit.
use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod model_cmds;
mod obfuscation_cmds;

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
    /// Serve any checkpoint (plain or obfuscated) over the OpenAI HTTP API; knows nothing of keys.
    /// With --share: a share server (public weights only; clients send secret shares).
    Serve(ServeCmd),
    /// Client-side privacy proxy: OpenAI API for local apps, tau-mapped token ids upstream.
    /// With --share-servers: the model runs here, every linear layer on two share servers.
    Proxy(ProxyCmd),
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
    Attack(AttackCmd),
    /// Hallucination detection from internal states (HaluProbe): generate, extract, train, report, transfer, score.
    #[command(subcommand)]
    Halluc(umbra_haluprobe::cli::Command),
    /// SAP: private fine-tuning of a vendor's encoder with split-and-privatize (d_chi, CTI).
    #[command(subcommand)]
    Sap(umbra_sap::cli::Command),
}

#[derive(clap::Args)]
struct ServeCmd {
    #[command(flatten)]
    share: umbra_share::cli::ServeShareArgs,
    #[command(flatten)]
    serve: umbra_serve::cli::ServeArgs,
}

#[derive(clap::Args)]
struct ProxyCmd {
    #[command(flatten)]
    share: umbra_share::cli::ProxyShareArgs,
    #[command(flatten)]
    proxy: umbra_serve::cli::ProxyArgs,
}

#[derive(Subcommand)]
enum AttackCmd {
    /// NN, IMA and ISA on one share server's recorded view (two-server secret sharing).
    Shares(umbra_share::cli::AttackSharesArgs),
    #[command(flatten)]
    Obfuscation(umbra_attacks::cli::AttackCommand),
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
    /// Obfuscated GGUF checkpoints (F32, Q8_0, Q4_K) in an unmodified llama.cpp vs the plaintext model.
    Llamacpp(obfuscation_cmds::LlamacppArgs),
    /// Serving throughput, TTFT and TPOT, plain vs obfuscated, at 1, 4 and 16 clients (--soak: a max-context prompt beside short chats).
    Serve(umbra_serve::cli::BenchServeArgs),
    /// The five split-learning modes on one dataset, one table.
    Vfl(umbra_vfl::cli::BenchVflArgs),
    /// Accuracy vs attack success for none / R3eLU / Gaussian DP over a total-epsilon grid.
    Split(umbra_r3elu::cli::BenchSplitArgs),
    /// SAP accuracy vs empirical privacy: none / d_chi / d_chi+CTI / Gaussian / centralized.
    Sap(umbra_sap::cli::BenchArgs),
    /// Two-server secret sharing vs local plaintext generation: speed, traffic, client CPU.
    Share(umbra_share::cli::BenchShareArgs),
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
    let share_client = match &cli.command {
        Command::Generate(a) => a.share.active(),
        Command::Proxy(a) => a.share.client.active(),
        Command::Bench(BenchCommand::Share(_)) => true,
        _ => false,
    };
    if share_client {
        umbra_share::cli::short_barrier_spin();
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
        Command::Demo(a) => umbra_aloepri::cli::run_demo(&a).map_err(Into::into),
        Command::Attack(AttackCmd::Obfuscation(c)) => {
            umbra_attacks::cli::run(&c).map_err(Into::into)
        }
        Command::Attack(AttackCmd::Shares(a)) => umbra_share::cli::run_attack(&a)
            .map(|_| ())
            .map_err(Into::into),
        Command::Fetch(a) => model_cmds::fetch(&a),
        Command::Convert(a) => model_cmds::convert(&a),
        Command::Generate(a) => model_cmds::generate(&a),
        Command::Obfuscate(a) => obfuscation_cmds::obfuscate(&a),
        Command::Eval(EvalCommand::Fidelity(a)) => umbra_aloepri::cli::run_fidelity(&a)
            .map(|_| ())
            .map_err(Into::into),
        Command::Eval(EvalCommand::Quant(a)) => umbra_model::cli::eval_quant::run(&a)
            .map(|_| ())
            .map_err(Into::into),
        Command::Bench(BenchCommand::Llamacpp(a)) => umbra_aloepri::cli::run_llamacpp(&a)
            .map(|_| ())
            .map_err(Into::into),
        Command::Bench(BenchCommand::Obfuscation(a)) => bench::obfuscation(&a),
        Command::Serve(a) if a.share.share => umbra_share::cli::run_serve(
            &a.share,
            &a.serve.model.to_string_lossy(),
            &a.serve.host,
            a.serve.port,
        )
        .map_err(Into::into),
        Command::Serve(a) => umbra_serve::cli::run_serve(&a.serve).map_err(Into::into),
        Command::Proxy(a) if a.share.client.active() => {
            let p = &a.proxy;
            let ignored: Vec<&str> = [
                (p.key.is_some(), "--key"),
                (p.tokenizer.is_some(), "--tokenizer"),
                (p.split_client.is_some(), "--split-client"),
            ]
            .into_iter()
            .filter_map(|(given, name)| given.then_some(name))
            .collect();
            umbra_share::cli::run_proxy(&a.share, &p.host, p.port, &ignored).map_err(Into::into)
        }
        Command::Proxy(a) => umbra_serve::cli::run_proxy(&a.proxy).map_err(Into::into),
        Command::Bench(BenchCommand::Share(a)) => umbra_share::cli::run_bench(&a)
            .map(|_| ())
            .map_err(Into::into),
        Command::Bench(BenchCommand::Engine(a)) => umbra_model::cli::bench_engine::run(&a)
            .map(|_| ())
            .map_err(Into::into),
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
