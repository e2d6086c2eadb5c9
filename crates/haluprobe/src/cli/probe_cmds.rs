//! `umbra halluc train|report|transfer|eval|score|obfuscate-probe`.
use super::opts::EvalOpts;
use crate::error::{HaluError, Result};
use crate::eval::{run_grid, train_selected};
use crate::probe::{FeatureRef, ProbeFile, ProbeKind};
use crate::report::{flat_json, summary_markdown, write_report};
use crate::score::{Score, Scorer};
use crate::source::{load_model, resolve_model, token_map_for};
use crate::store::FeatureStore;
use crate::transfer::transfer_matrix;
use std::path::PathBuf;
use umbra_common::fs::{write_atomic, write_json};
use umbra_common::progress::Progress;
use umbra_model::checkpoint::Checkpoint;

/// `umbra halluc train`
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Feature folder written by `umbra halluc extract`.
    #[arg(long)]
    pub features: PathBuf,
    #[arg(long, value_enum, default_value = "logreg")]
    pub probe: ProbeKind,
    /// `auto` (best on validation over the whole grid; `--serving`: among the inputs `umbra
    /// serve` computes) or a comma list of selectors such as
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

/// `umbra halluc transfer`
#[derive(Debug, Clone, clap::Args)]
pub struct TransferArgs {
    /// A task as NAME=FEATURE_FOLDER (given or own answers of the same model); two or more.
    #[arg(long = "task", required = true, num_args = 1)]
    pub tasks: Vec<String>,
    /// Folder for transfer.md, transfer.json and (with plots) transfer.svg.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub eval: EvalOpts,
}

/// Prints a warning when an own-answer folder's labels are too unbalanced for probes.
fn warn_unbalanced(store: &FeatureStore) {
    let pos = store.labels.iter().filter(|&&l| l > 0.5).count() as f64;
    let share = (pos / store.len().max(1) as f64).min(1.0 - pos / store.len().max(1) as f64);
    if share < crate::own::MIN_MINORITY_SHARE {
        eprintln!(
            "warning: {} has {:.1}% of its minority label (< 15%): its AUROCs rest on few \
             answers",
            store.dir.display(),
            100.0 * share
        );
    }
}

pub fn run_transfer(a: &TransferArgs) -> Result<crate::transfer::TransferMatrix> {
    let tasks = a
        .tasks
        .iter()
        .map(|t| {
            let (name, dir) = t.split_once('=').ok_or_else(|| {
                HaluError::Input(format!("--task {t}: expected NAME=FEATURE_FOLDER"))
            })?;
            let store = FeatureStore::open(std::path::Path::new(dir))?;
            warn_unbalanced(&store);
            Ok((name.to_string(), store))
        })
        .collect::<Result<Vec<_>>>()?;
    let m = transfer_matrix(&tasks, &a.eval.config(ProbeKind::Logreg))?;
    let md = m.markdown();
    println!("{md}");
    write_atomic(&a.out.join("transfer.md"), md.as_bytes())?;
    write_json(&a.out.join("transfer.json"), &m)?;
    write_atomic(&a.out.join("transfer.svg"), m.figure_svg()?.as_bytes())?;
    if let Some(j) = &a.json {
        write_json(j, &m)?;
    }
    println!("transfer matrix written to {}", a.out.display());
    Ok(m)
}

pub fn run_train(a: &TrainArgs) -> Result<serde_json::Value> {
    let store = FeatureStore::open(&a.features)?;
    let cfg = a.eval.config(a.probe);
    let json = if a.select.trim() == "auto" {
        let pb = Progress::maybe(a.quiet, 0, "grid");
        let (rep, probe) = run_grid(&store, cfg, &pb)?;
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
    warn_unbalanced(&store);
    let pb = Progress::maybe(a.quiet, 0, "grid");
    let (rep, probe) = run_grid(&store, a.eval.config(a.probe), &pb)?;
    write_report(&rep, &a.out)?;
    probe.save(&a.out.join("best-probe.safetensors"))?;
    println!("{}", summary_markdown(&rep));
    println!("report written to {}", a.out.display());
    let mut json = flat_json(&rep);
    if store.manifest.own.is_some() {
        // Own answers: the label balance over every question, empty answers included.
        let b = crate::own::folder_balance(&store.dir, &store.manifest)?;
        println!("own answers: {}", b.balance_line());
        for (k, v) in [
            ("own_questions", serde_json::json!(b.questions)),
            ("own_answered", b.answered.into()),
            ("own_correct", b.correct.into()),
            ("own_empty", b.empty.into()),
            ("own_minority_share", b.minority_share.into()),
            ("own_usable", b.usable.into()),
            ("own_mean_f1", b.mean_f1.into()),
            ("own_mean_answer_tokens", b.mean_answer_tokens.into()),
        ] {
            json[k] = v;
        }
    }
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
