//! `umbra halluc ...`: arguments ([`Command`]) and entry points ([`run`]); feature `cli`.
//!
//! - data: `generate` (own answers), `extract` (given answers), `bench` ([`data_cmds`]);
//! - probes: `train`, `report`, `transfer`, `eval`, `score`, `obfuscate-probe` ([`probe_cmds`]).
//! - options shared by several commands: [`opts`].
pub mod data_cmds;
pub mod opts;
pub mod probe_cmds;

use crate::error::Result;
pub use data_cmds::{BenchArgs, ExtractArgs, GenerateArgs};
pub use opts::{EvalOpts, ExtractOpts};
pub use probe_cmds::{
    EvalProbeArgs, ObfuscateProbeArgs, ReportArgs, ScoreArgs, TrainArgs, TransferArgs,
};

/// `umbra halluc <command>`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// The model answers questions itself (greedy, batched): labels against the gold aliases,
    /// features from the generation pass's taps, optional samples (resumable).
    Generate(GenerateArgs),
    /// Tapped forward passes over HaluEval's given answers (QA, dialogue, summarization) ->
    /// chunked feature files (resumable).
    Extract(ExtractArgs),
    /// Train a probe (best on validation, or selected features) and write a probe file.
    Train(TrainArgs),
    /// AUROC table feature family x stage x layer with baselines, and a figure.
    Report(ReportArgs),
    /// Train on each task, test on every other, per feature family: table, JSON and figure.
    Transfer(TransferArgs),
    /// Score one answer with a probe file (one tapped forward pass).
    Score(ScoreArgs),
    /// Extraction cost: tapped forward passes vs plain ones on the same tokens.
    Bench(BenchArgs),
    /// Move a plaintext probe under an obfuscated checkpoint's key (scoring under obfuscation).
    ObfuscateProbe(ObfuscateProbeArgs),
    /// AUROC of a probe file on every triple of a feature folder, optionally against another.
    Eval(EvalProbeArgs),
}

/// Runs one `umbra halluc` command.
pub fn run(cmd: &Command) -> Result<()> {
    match cmd {
        Command::Generate(a) => data_cmds::run_generate(a).map(|_| ()),
        Command::Extract(a) => data_cmds::run_extract(a).map(|_| ()),
        Command::Bench(a) => data_cmds::run_bench(a).map(|_| ()),
        Command::Train(a) => probe_cmds::run_train(a).map(|_| ()),
        Command::Report(a) => probe_cmds::run_report(a).map(|_| ()),
        Command::Transfer(a) => probe_cmds::run_transfer(a).map(|_| ()),
        Command::Score(a) => probe_cmds::run_score(a).map(|_| ()),
        Command::ObfuscateProbe(a) => probe_cmds::run_obfuscate_probe(a).map(|_| ()),
        Command::Eval(a) => probe_cmds::run_eval_probe(a).map(|_| ()),
    }
}
