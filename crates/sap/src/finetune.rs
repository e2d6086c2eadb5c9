//! `umbra sap finetune` and `umbra sap attack`: one setting through the split in one process,
//! its flat report, and the run folder that lets the vendor's attacks be replayed.
use crate::error::{Result, SapError};
use crate::experiment::{
    self, AttackConfig, AttackReport, PrepareConfig, Prepared, RunReport, RunSpec,
};
use crate::privacy::Privacy;
use std::path::Path;

/// The flat `--json` of `finetune`: the run and the attacks on what the vendor saw (attack
/// fields are `null` for the centralized baseline: nothing leaves the customer).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FinetuneReport {
    pub privacy: Privacy,
    pub eta: f64,
    pub split_at: usize,
    pub test_acc: f64,
    pub empirical_privacy: Option<f64>,
    pub recovery_nn: Option<f64>,
    pub recovery_ridge: Option<f64>,
    pub recovery_mlp: Option<f64>,
    pub attribute_auc: Option<f64>,
    pub samples_per_s: f64,
    pub bytes: u64,
    pub train_s: f64,
    pub n_train: usize,
    pub n_test: usize,
    pub epochs: usize,
    pub final_loss: f64,
    /// Per test example, in the data's test order: `1` = correct, `0` = wrong (two runs on the
    /// same data and `--data-seed` can be compared pairwise).
    #[serde(default)]
    pub correct: String,
}

impl FinetuneReport {
    fn new(r: &RunReport, a: Option<&AttackReport>) -> Self {
        FinetuneReport {
            privacy: r.privacy,
            eta: r.eta,
            split_at: r.split_at,
            test_acc: r.test_acc,
            empirical_privacy: a.map(|a| a.empirical_privacy),
            recovery_nn: a.map(|a| a.recovery_nn),
            recovery_ridge: a.map(|a| a.recovery_ridge),
            recovery_mlp: a.and_then(|a| a.recovery_mlp),
            attribute_auc: a.and_then(|a| a.attribute_auc),
            samples_per_s: r.samples_per_s,
            bytes: r.bytes,
            train_s: r.train_s,
            n_train: r.n_train,
            n_test: r.n_test,
            epochs: r.epochs,
            final_loss: r.final_loss,
            correct: r.correct.clone(),
        }
    }

    /// One line for the terminal.
    pub fn summary(&self) -> String {
        let f = |o: Option<f64>| o.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
        format!(
            "privacy={} split_at={} eta={} test_acc={:.4} empirical_privacy={} attribute_auc={} samples_per_s={:.1} bytes={}",
            self.privacy.name(),
            self.split_at,
            self.eta,
            self.test_acc,
            f(self.empirical_privacy),
            f(self.attribute_auc),
            self.samples_per_s,
            self.bytes
        )
    }
}

/// What `finetune --run` keeps so that `attack --run` can replay the vendor's attacks.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunDir {
    pub prepare: PrepareConfig,
    pub spec: RunSpec,
    pub attack: AttackConfig,
}

/// The vendor's log of evaluation traffic: token counts and privatized rows, in test order.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Observed {
    lengths: Vec<u32>,
    rows: Vec<f32>,
}

/// Fine-tunes one setting, attacks what the vendor saw, and keeps the run in `run_dir`.
pub fn finetune(
    prepare: &PrepareConfig,
    spec: &RunSpec,
    attack: &AttackConfig,
    run_dir: Option<&Path>,
) -> Result<FinetuneReport> {
    let mut pc = prepare.clone();
    pc.splits = vec![spec.train.split_at];
    pc.centralized = spec.privacy == Privacy::Centralized;
    let prep = Prepared::new(&pc)?;
    let (run, vendor) = experiment::train_one(&prep, spec)?;
    let observed = vendor.map(|v| Observed {
        lengths: v.observed_eval.iter().flat_map(|o| o.0.clone()).collect(),
        rows: v.observed_eval.into_iter().flat_map(|o| o.1).collect(),
    });
    let a = match &observed {
        Some(o) => Some(experiment::run_attacks(
            &prep,
            run.split_at,
            spec.privacy,
            spec.eta,
            &o.lengths,
            &o.rows,
            attack,
        )?),
        None => None,
    };
    let rep = FinetuneReport::new(&run, a.as_ref());
    if let Some(dir) = run_dir {
        let cfg = RunDir {
            prepare: PrepareConfig {
                model: Some(prep.model_dir.clone()),
                ..pc
            },
            spec: spec.clone(),
            attack: attack.clone(),
        };
        umbra_common::fs::write_json(&dir.join("config.json"), &cfg)?;
        if let Some(o) = &observed {
            umbra_common::fs::write_json(&dir.join("vendor_observed.json"), o)?;
        }
        umbra_common::fs::write_json(&dir.join("report.json"), &rep)?;
    }
    Ok(rep)
}

/// Which attacks `umbra sap attack` replays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Which {
    Inversion,
    Attribute,
    All,
}

/// Replays the vendor's attacks on a run folder written by [`finetune`].
pub fn replay_attacks(run_dir: &Path, which: Which) -> Result<AttackReport> {
    let cfg: RunDir = umbra_common::fs::read_json(&run_dir.join("config.json"))?;
    let obs_path = run_dir.join("vendor_observed.json");
    if !obs_path.exists() {
        return Err(SapError::Config(format!(
            "{}: no vendor traffic (a centralized run sends nothing)",
            run_dir.display()
        )));
    }
    let obs: Observed = umbra_common::fs::read_json(&obs_path)?;
    let mut attack = cfg.attack.clone();
    attack.mlp &= which != Which::Attribute;
    let prep = Prepared::new(&PrepareConfig {
        splits: vec![cfg.spec.train.split_at],
        centralized: false,
        ..cfg.prepare.clone()
    })?;
    let mut a = experiment::run_attacks(
        &prep,
        cfg.spec.train.split_at,
        cfg.spec.privacy,
        cfg.spec.eta,
        &obs.lengths,
        &obs.rows,
        &attack,
    )?;
    if which == Which::Inversion {
        a.attribute_auc = None;
    }
    Ok(a)
}
