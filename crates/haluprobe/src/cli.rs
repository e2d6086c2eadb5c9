//! Arguments and entry points for `umbra halluc extract|train|report|score|bench`.
use crate::data::load_halueval_qa;
use crate::error::{HaluError, Result};
use crate::eval::{run_grid, train_selected, EvalConfig};
use crate::extract::{run_extraction, ExtractJob};
use crate::features::ExtractConfig;
use crate::probe::{FeatureRef, ProbeFile, ProbeKind};
use crate::report::{flat_json, summary_markdown, write_report};
use crate::score::{Score, Scorer};
use crate::store::{write_json, FeatureStore};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use umbra_assets::{Asset, Cache};
use umbra_model::checkpoint::Checkpoint;
use umbra_model::llama::Llama;
use umbra_model::tokenizer::TextTokenizer;

/// `smollm2` -> the cached HF folder (must have been fetched); anything else is a path.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    if spec == "smollm2" {
        return Ok(Cache::from_env()?.require_smollm2_hf()?);
    }
    let p = PathBuf::from(spec);
    if !p.exists() {
        return Err(HaluError::Input(format!(
            "{spec}: no such model folder or GGUF file"
        )));
    }
    Ok(p)
}

/// `halueval-qa` -> the cached asset (fails with the fetch command); anything else is a path.
pub fn resolve_data(spec: &str) -> Result<PathBuf> {
    if spec == "halueval-qa" {
        return Ok(Cache::from_env()?.require(Asset::HaluEvalQa)?);
    }
    let p = PathBuf::from(spec);
    if !p.is_file() {
        return Err(HaluError::Input(format!("{spec}: no such data file")));
    }
    Ok(p)
}

/// A loaded plaintext model with its tokenizer.
pub fn load_model(path: &Path) -> Result<(Llama, TextTokenizer)> {
    let ck = Checkpoint::open(path)?;
    let tok = ck
        .tokenizer
        .clone()
        .ok_or_else(|| HaluError::Input(format!("{} has no tokenizer", path.display())))?;
    let model = Llama::new(&ck.config, &ck.weights, &candle_core::Device::Cpu)?;
    Ok((model, tok))
}

fn bar(len: usize, what: &str, quiet: bool) -> indicatif::ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {pos}/{len} {elapsed_precise} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Extraction settings shared by `extract`, `score` and `bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExtractOpts {
    /// Knowledge tokens kept per prompt (the rest is cut to keep sequences short).
    #[arg(long, default_value_t = 96)]
    pub max_knowledge_tokens: usize,
    #[arg(long, default_value_t = 64)]
    pub max_question_tokens: usize,
    #[arg(long, default_value_t = 32)]
    pub max_answer_tokens: usize,
    /// Sliding-window length for the `window` token selection.
    #[arg(long, default_value_t = 4)]
    pub window: usize,
}

impl ExtractOpts {
    pub fn config(&self) -> ExtractConfig {
        ExtractConfig {
            max_knowledge_tokens: self.max_knowledge_tokens,
            max_question_tokens: self.max_question_tokens,
            max_answer_tokens: self.max_answer_tokens,
            window: self.window,
        }
    }
}

/// `umbra halluc extract`
#[derive(Debug, Clone, clap::Args)]
pub struct ExtractArgs {
    /// HF folder or GGUF file, or `smollm2`.
    #[arg(long)]
    pub model: String,
    /// `halueval-qa` (the cached asset) or a HaluEval QA JSONL file.
    #[arg(long, default_value = "halueval-qa")]
    pub data: String,
    /// Rows to use after a seeded shuffle (each row gives two triples).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Output folder (resumes when it already holds chunks of the same setup).
    #[arg(long)]
    pub out: PathBuf,
    /// Rows per chunk file.
    #[arg(long, default_value_t = 100)]
    pub chunk_rows: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub opts: ExtractOpts,
    /// Client key of an obfuscated `--model`: token ids are mapped through its tau before the
    /// forward pass, as the client sends them (features are then the provider's view).
    #[arg(long)]
    pub key: Option<PathBuf>,
    #[arg(long)]
    pub quiet: bool,
}

/// The token map (`tau`) of `key` after checking it belongs to the obfuscated `model`.
pub fn token_map_for(model: &Path, key: Option<&Path>) -> Result<Option<Vec<u32>>> {
    let Some(key) = key else { return Ok(None) };
    let key = umbra_aloepri::ClientKey::load(key)?;
    umbra_aloepri::compiler::check_key_for(model, &key)?;
    Ok(Some(key.tau))
}

pub fn run_extract(a: &ExtractArgs) -> Result<crate::extract::ExtractSummary> {
    let data = resolve_data(&a.data)?;
    let rows = load_halueval_qa(&data)?;
    let mpath = resolve_model(&a.model)?;
    let (model, tok) = load_model(&mpath)?;
    let job = ExtractJob {
        data: a.data.clone(),
        model_path: mpath.display().to_string(),
        limit: a.limit,
        seed: a.seed,
        chunk_rows: a.chunk_rows,
        cfg: a.opts.config(),
        token_map: token_map_for(&mpath, a.key.as_deref())?,
    };
    let pb = bar(0, "extract", a.quiet);
    let s = run_extraction(&model, &tok, &rows, &job, &a.out, Some(&pb))?;
    pb.finish_and_clear();
    println!(
        "extracted {} rows -> {} triples in {} ({} chunks written, {} resumed) in {:.1}s",
        s.rows,
        s.triples,
        a.out.display(),
        s.chunks_written,
        s.chunks_skipped,
        s.seconds
    );
    Ok(s)
}

/// Evaluation settings shared by `train` and `report`.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalOpts {
    /// Fraction of HaluEval rows held out for validation (selection, thresholds).
    #[arg(long, default_value_t = 0.2)]
    pub val: f64,
    /// Fraction of HaluEval rows held out for the final test.
    #[arg(long, default_value_t = 0.2)]
    pub test: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Bootstrap resamples (over test rows) for the 95% intervals.
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
}

impl EvalOpts {
    fn config(&self, kind: ProbeKind) -> EvalConfig {
        EvalConfig {
            val: self.val,
            test: self.test,
            seed: self.seed,
            bootstrap: self.bootstrap,
            kind,
            ..EvalConfig::default()
        }
    }
}

/// `umbra halluc train`
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Feature folder written by `umbra halluc extract`.
    #[arg(long)]
    pub features: PathBuf,
    #[arg(long, value_enum, default_value = "logreg")]
    pub probe: ProbeKind,
    /// `auto` (best on validation over the whole grid) or a comma list of selectors such as
    /// `hidden:L12:query,hidden:L20:generation.last,lookback:generation,logit`.
    #[arg(long, default_value = "auto")]
    pub select: String,
    /// Probe file to write (safetensors with metadata).
    #[arg(long)]
    pub out: PathBuf,
    /// Write the flat JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub eval: EvalOpts,
    #[arg(long)]
    pub quiet: bool,
}

/// `umbra halluc report`
#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    #[arg(long)]
    pub features: PathBuf,
    /// Folder for report.md, cells.csv, auroc_by_layer.svg, report.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the flat JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Probe kind of the selected best probe.
    #[arg(long, value_enum, default_value = "logreg")]
    pub probe: ProbeKind,
    #[command(flatten)]
    pub eval: EvalOpts,
    #[arg(long)]
    pub quiet: bool,
}

/// `umbra halluc score`
#[derive(Debug, Clone, clap::Args)]
pub struct ScoreArgs {
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub probe: PathBuf,
    #[arg(long)]
    pub question: String,
    #[arg(long)]
    pub answer: String,
    #[arg(long)]
    pub knowledge: Option<String>,
    /// Client key when `--model` is obfuscated (with a probe from `umbra obfuscate
    /// --halluc-probe`): ids are mapped through its tau, as the client sends them.
    #[arg(long)]
    pub key: Option<PathBuf>,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `umbra halluc obfuscate-probe`
#[derive(Debug, Clone, clap::Args)]
pub struct ObfuscateProbeArgs {
    /// Probe trained on the plaintext model.
    #[arg(long)]
    pub probe: PathBuf,
    /// The plaintext model (HF folder or GGUF, or `smollm2`) the checkpoint was compiled from.
    #[arg(long)]
    pub model: String,
    /// The obfuscated checkpoint folder (`umbra obfuscate --out`).
    #[arg(long)]
    pub obfuscated: PathBuf,
    /// Its client key (`umbra obfuscate --key`).
    #[arg(long)]
    pub key: PathBuf,
    /// Transformed probe to write.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `umbra halluc eval`
#[derive(Debug, Clone, clap::Args)]
pub struct EvalProbeArgs {
    /// Feature folder (every triple is scored).
    #[arg(long)]
    pub features: PathBuf,
    /// Probe file whose inputs the folder holds.
    #[arg(long)]
    pub probe: PathBuf,
    /// Compare against another probe on another folder of the SAME triples (e.g. the
    /// plaintext probe on plaintext features): adds its AUROC and the score differences.
    #[arg(long, requires = "against_probe")]
    pub against_features: Option<PathBuf>,
    #[arg(long, requires = "against_features")]
    pub against_probe: Option<PathBuf>,
    /// Bootstrap resamples (over rows) for the 95% interval.
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `umbra halluc bench`
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    #[arg(long, default_value = "halueval-qa")]
    pub data: String,
    /// HaluEval rows timed (each: one prompt pass and two answer passes).
    #[arg(long, default_value_t = 20)]
    pub rows: usize,
    #[command(flatten)]
    pub opts: ExtractOpts,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `umbra halluc <command>`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum HallucCommand {
    /// Tapped forward passes over HaluEval QA -> chunked feature files (resumable).
    Extract(ExtractArgs),
    /// Train a probe (best on validation, or selected features) and write a probe file.
    Train(TrainArgs),
    /// AUROC table feature family x stage x layer with baselines, and a figure.
    Report(ReportArgs),
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
pub fn run(cmd: &HallucCommand) -> Result<()> {
    match cmd {
        HallucCommand::Extract(a) => run_extract(a).map(|_| ()),
        HallucCommand::Train(a) => run_train(a).map(|_| ()),
        HallucCommand::Report(a) => run_report(a).map(|_| ()),
        HallucCommand::Score(a) => run_score(a).map(|_| ()),
        HallucCommand::Bench(a) => run_bench(a).map(|_| ()),
        HallucCommand::ObfuscateProbe(a) => run_obfuscate_probe(a).map(|_| ()),
        HallucCommand::Eval(a) => run_eval_probe(a).map(|_| ()),
    }
}

fn grid_progress(quiet: bool) -> (indicatif::ProgressBar, impl Fn(usize, usize, &str)) {
    let pb = bar(0, "grid", quiet);
    let p2 = pb.clone();
    (pb, move |done: usize, total: usize, what: &str| {
        p2.set_length(total as u64);
        p2.set_position(done as u64);
        tracing::info!(done, total, what, "grid");
    })
}

pub fn run_train(a: &TrainArgs) -> Result<serde_json::Value> {
    let store = FeatureStore::open(&a.features)?;
    let cfg = a.eval.config(a.probe);
    let json = if a.select.trim() == "auto" {
        let (pb, prog) = grid_progress(a.quiet);
        let (rep, probe) = run_grid(&store, cfg, &prog)?;
        pb.finish_and_clear();
        probe.save(&a.out)?;
        println!("{}", summary_markdown(&rep));
        flat_json(&rep)
    } else {
        let refs = a
            .select
            .split(',')
            .map(|s| FeatureRef::parse(s.trim()))
            .collect::<Result<Vec<_>>>()?;
        let (cell, probe) = train_selected(&store, cfg, refs)?;
        probe.save(&a.out)?;
        println!(
            "{}: test AUROC {:.3} [{:.3}, {:.3}], acc {:.3}, F1 {:.3} (val AUROC {:.3})",
            cell.name,
            cell.test_auroc,
            cell.ci_low,
            cell.ci_high,
            cell.accuracy,
            cell.f1,
            cell.val_auroc
        );
        serde_json::json!({
            "best_auroc": cell.test_auroc,
            "best_ci_low": cell.ci_low,
            "best_ci_high": cell.ci_high,
            "best_accuracy": cell.accuracy,
            "best_f1": cell.f1,
            "best_feature": cell.name,
            "best_stage": cell.stage,
        })
    };
    println!("probe written to {}", a.out.display());
    if let Some(j) = &a.json {
        write_json(j, &json)?;
    }
    Ok(json)
}

pub fn run_report(a: &ReportArgs) -> Result<serde_json::Value> {
    let store = FeatureStore::open(&a.features)?;
    let (pb, prog) = grid_progress(a.quiet);
    let (rep, probe) = run_grid(&store, a.eval.config(a.probe), &prog)?;
    pb.finish_and_clear();
    write_report(&rep, &a.out)?;
    probe.save(&a.out.join("best-probe.safetensors"))?;
    println!("{}", summary_markdown(&rep));
    println!("report written to {}", a.out.display());
    let json = flat_json(&rep);
    if let Some(j) = &a.json {
        write_json(j, &json)?;
    }
    Ok(json)
}

pub fn run_score(a: &ScoreArgs) -> Result<Score> {
    let probe = ProbeFile::load(&a.probe)?;
    let mpath = resolve_model(&a.model)?;
    let (cfg, _) = Checkpoint::open_config_and_tokenizer(&mpath)?;
    let scorer = Scorer::new(probe, &cfg)?;
    let map = token_map_for(&mpath, a.key.as_deref())?;
    let (model, tok) = load_model(&mpath)?;
    let s = scorer.score_mapped(
        &model,
        &tok,
        map.as_deref(),
        a.knowledge.as_deref(),
        &a.question,
        &a.answer,
    )?;
    println!(
        "hallucination score {:.4} (threshold {:.4}: {}) at the {} stage",
        s.score,
        s.threshold,
        if s.hallucinated {
            "hallucinated"
        } else {
            "faithful"
        },
        s.stage.name()
    );
    if let Some(j) = &a.json {
        write_json(j, &s)?;
    }
    Ok(s)
}

pub fn run_bench(a: &BenchArgs) -> Result<crate::bench::BenchReport> {
    let data = resolve_data(&a.data)?;
    let rows = load_halueval_qa(&data)?;
    let mpath = resolve_model(&a.model)?;
    let (model, tok) = load_model(&mpath)?;
    let r = crate::bench::bench_taps(&model, &tok, &rows, a.rows, a.opts.config())?;
    println!("{}", r.table());
    if let Some(j) = &a.json {
        write_json(j, &r)?;
    }
    Ok(r)
}

pub fn run_obfuscate_probe(a: &ObfuscateProbeArgs) -> Result<crate::obfuscated::TransformReport> {
    let plain = resolve_model(&a.model)?;
    let (_, r) =
        crate::obfuscated::transform_probe_files(&a.probe, &plain, &a.obfuscated, &a.key, &a.out)?;
    println!(
        "transformed probe written to {} ({} -> {} inputs, key {}, {}) in {:.1}s",
        a.out.display(),
        r.inputs_plain,
        r.inputs_obfuscated,
        r.key_fingerprint,
        if r.exact { "exact" } else { "approximate" },
        r.seconds
    );
    if let Some(j) = &a.json {
        write_json(j, &r)?;
    }
    Ok(r)
}

/// Scores, labels and rows of `probe` on every triple of `store`.
fn score_store(store: &FeatureStore, probe: &ProbeFile) -> Result<Vec<f32>> {
    let d = &probe.meta.model;
    let m = &store.manifest.model;
    if (d.num_layers, d.hidden_size, d.num_heads) != (m.num_layers, m.hidden_size, m.num_heads) {
        return Err(HaluError::ProbeMismatch(format!(
            "probe is for {} layers / hidden {} / {} heads, the features in {} are of {} / {} / {}",
            d.num_layers,
            d.hidden_size,
            d.num_heads,
            store.dir.display(),
            m.num_layers,
            m.hidden_size,
            m.num_heads
        )));
    }
    let x = crate::eval::load_refs(store, &probe.meta.features)?;
    probe.net.predict(&x)
}

pub fn run_eval_probe(a: &EvalProbeArgs) -> Result<serde_json::Value> {
    use crate::metrics::{accuracy_f1, auroc, bootstrap_auroc_ci};
    let store = FeatureStore::open(&a.features)?;
    let probe = ProbeFile::load(&a.probe)?;
    let s = score_store(&store, &probe)?;
    let au = auroc(&s, &store.labels)
        .ok_or_else(|| HaluError::Empty("the folder holds one class only".into()))?;
    let (lo, hi) = bootstrap_auroc_ci(&s, &store.labels, &store.rows, a.bootstrap, 0)
        .unwrap_or((f64::NAN, f64::NAN));
    let (acc, f1) = accuracy_f1(&s, &store.labels, probe.meta.threshold);
    println!(
        "{}: AUROC {au:.4} [{lo:.4}, {hi:.4}], acc {acc:.4}, F1 {f1:.4} on {} triples",
        a.probe.display(),
        store.len()
    );
    let mut json = serde_json::json!({
        "triples": store.len(),
        "auroc": au,
        "ci_low": lo,
        "ci_high": hi,
        "accuracy": acc,
        "f1": f1,
    });
    if let (Some(fd), Some(pp)) = (&a.against_features, &a.against_probe) {
        let other = FeatureStore::open(fd)?;
        if other.rows != store.rows || other.labels != store.labels {
            return Err(HaluError::FeatureMismatch(format!(
                "{} and {} do not hold the same triples in the same order",
                a.features.display(),
                fd.display()
            )));
        }
        let op = ProbeFile::load(pp)?;
        let o = score_store(&other, &op)?;
        let ao = auroc(&o, &other.labels).unwrap_or(f64::NAN);
        let diffs: Vec<f64> = s
            .iter()
            .zip(&o)
            .map(|(x, y)| (x - y).abs() as f64)
            .collect();
        let max = diffs.iter().cloned().fold(0f64, f64::max);
        let mean = diffs.iter().sum::<f64>() / diffs.len().max(1) as f64;
        let agree = s
            .iter()
            .zip(&o)
            .filter(|(x, y)| (**x >= probe.meta.threshold) == (**y >= op.meta.threshold))
            .count() as f64
            / s.len().max(1) as f64;
        println!(
            "against {} on {}: AUROC {ao:.4}; |score difference| max {max:.2e}, mean {mean:.2e}; same decision on {:.2}% of triples",
            pp.display(),
            fd.display(),
            100.0 * agree
        );
        json["against_auroc"] = ao.into();
        json["max_abs_score_diff"] = max.into();
        json["mean_abs_score_diff"] = mean.into();
        json["decision_agreement"] = agree.into();
    }
    if let Some(j) = &a.json {
        write_json(j, &json)?;
    }
    Ok(json)
}
