//! The command-line edge (feature `cli`): clap arguments and entry points of `umbra vfl
//! train|plan|party|bench` (and `umbra bench vfl`); the `vfl_party` binary parses the same
//! [`Command`]. Each entry point turns its arguments into a job, calls the library, prints and
//! writes JSON; the work itself lives in [`crate::engine`], [`crate::plan`] and [`crate::bench`].
use crate::bench::{self, BenchConfig};
use crate::budget::PartyMachine;
use crate::config::{DpConfig, JobConfig, Mode};
use crate::engine::{self, Role};
use crate::error::{Result, VflError};
use crate::metrics::TrainReport;
use crate::plan::{self, PlanReport};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use umbra_common::fs::write_json;

/// `umbra vfl <command>` (and the `vfl_party` binary).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Train in one process: vfl, vfl-ps, avfl, avfl-ps or pubsub mode.
    Train(VflTrainArgs),
    /// Profile both parties and propose worker counts and batch size.
    Plan(VflPlanArgs),
    /// Run one party in its own process, talking to the other through NATS.
    Party(VflPartyArgs),
    /// The five modes on one dataset, one table (also `umbra bench vfl`).
    Bench(BenchVflArgs),
}

/// Runs one command.
pub fn run(cmd: &Command) -> Result<()> {
    match cmd {
        Command::Train(a) => run_train(a).map(|_| ()),
        Command::Plan(a) => run_plan(a).map(|_| ()),
        Command::Party(a) => run_party(a).map(|_| ()),
        Command::Bench(a) => run_bench(a).map(|_| ()),
    }
}

/// The `main` of a stand-alone party binary (`vfl_party`, `sap_party`, `r3elu_party`): logs at
/// `warn` unless `RUST_LOG` says otherwise, runs `run`, and on failure prints `error: ...` and
/// exits with status 1. Only binaries call it (it installs the process's log subscriber).
pub fn party_main<E: std::fmt::Display>(run: impl FnOnce() -> std::result::Result<(), E>) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// For binaries only, first thing in `main` (before any thread starts): candle 0.11 chooses its
/// matrix products' parallelism from `RAYON_NUM_THREADS` on every call, whatever rayon pool
/// runs them, so the workers' one-thread pools ([`crate::threads`]) alone do not stop a product
/// from being split for two threads and run on one. Measured (`umbra vfl train --data adult
/// --mode vfl-ps --epochs 2`, 2 shared cores): 5.4-7.8 s wall and 1.4 s CPU with
/// `RAYON_NUM_THREADS=1`, 11.9-15.7 s and 3.3-3.4 s CPU without. Sets it to 1 unless the user
/// chose a value; the `umbra` binary calls this for the `vfl` commands only.
pub fn one_compute_thread_per_worker() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
}

/// `umbra vfl train`
#[derive(Debug, Clone, clap::Args)]
pub struct VflTrainArgs {
    /// adult | breast-cancer | german-credit | caravan | synthetic:NxD | csv:PATH:LABEL[:POSITIVE]
    #[arg(long)]
    pub data: Option<String>,
    #[arg(long, value_enum, default_value = "pubsub")]
    pub mode: Mode,
    /// Start from a job file (command-line flags override it).
    #[arg(long)]
    pub job: Option<PathBuf>,
    #[arg(long)]
    pub workers_active: Option<usize>,
    #[arg(long)]
    pub workers_passive: Option<usize>,
    #[arg(long)]
    pub batch: Option<usize>,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Gaussian DP on the published embeddings, target mu (mu-GDP).
    #[arg(long)]
    pub dp_mu: Option<f64>,
    /// L2 clipping bound of embedding rows for DP.
    #[arg(long, default_value_t = 1.0)]
    pub dp_clip: f64,
    /// Bottom-model depth (paper: 10).
    #[arg(long)]
    pub depth: Option<usize>,
    /// Use a seeded subset of this many rows.
    #[arg(long)]
    pub max_rows: Option<usize>,
    /// Cores given to the run (for CPU utilisation).
    #[arg(long)]
    pub cores: Option<usize>,
    /// Also train the centralised baseline on the joined features and report it.
    #[arg(long)]
    pub centralised: bool,
    /// Write the report as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl VflTrainArgs {
    pub fn job_config(&self) -> Result<JobConfig> {
        let mut cfg = match &self.job {
            Some(p) => JobConfig::from_toml_file(p)?,
            None => JobConfig::new(
                self.data
                    .as_deref()
                    .ok_or_else(|| VflError::Config("give --data or --job".into()))?,
                self.mode,
            ),
        };
        if let Some(d) = &self.data {
            cfg.data = d.clone();
        }
        if self.job.is_none() || self.mode != Mode::PubSub {
            cfg.mode = self.mode;
        }
        macro_rules! set {
            ($f:ident) => {
                if let Some(v) = self.$f {
                    cfg.$f = v;
                }
            };
        }
        set!(workers_active);
        set!(workers_passive);
        set!(batch);
        set!(epochs);
        set!(seed);
        if let Some(d) = self.depth {
            cfg.model.bottom_depth = d;
        }
        if self.max_rows.is_some() {
            cfg.max_rows = self.max_rows;
        }
        if self.cores.is_some() {
            cfg.cores = self.cores;
        }
        if let Some(mu) = self.dp_mu {
            cfg.dp = Some(DpConfig {
                mu,
                clip: self.dp_clip,
            });
        }
        cfg.progress = !self.quiet && std::io::stderr().is_terminal();
        cfg.validate()?;
        Ok(cfg)
    }
}

/// `umbra vfl train`: both parties in this process (in-process transport).
pub fn run_train(args: &VflTrainArgs) -> Result<TrainReport> {
    let cfg = args.job_config()?;
    let r = engine::train_inproc(&cfg)?;
    for e in &r.per_epoch {
        println!(
            "epoch {:>3}  auc {}  loss {:.4}  wall {:.2} s  cpu {:.0}%  wait {:.2} s  dropped {}  reassigned {}",
            e.epoch,
            e.auc.map(|a| format!("{a:.4}")).unwrap_or_else(|| "-".into()),
            e.train_loss,
            e.wall_s,
            100.0 * e.cpu_util,
            e.wait_s,
            e.dropped,
            e.reassigned
        );
    }
    println!("{}", r.summary_line());
    if args.centralised {
        let c = engine::train_centralised(&cfg)?;
        println!("{}", c.summary_line());
        if let Some(p) = &args.json {
            let mut m = BTreeMap::new();
            m.insert(r.mode.clone(), r.clone());
            m.insert("centralised".to_string(), c);
            write_json(p, &m)?;
        }
        return Ok(r);
    }
    if let Some(p) = &args.json {
        write_json(p, &r)?;
    }
    Ok(r)
}

/// `umbra vfl party`
#[derive(Debug, Clone, clap::Args)]
pub struct VflPartyArgs {
    #[arg(long, value_enum)]
    pub role: Role,
    /// NATS URL, e.g. nats://127.0.0.1:4222
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub broker: String,
    /// The job file both parties share.
    #[arg(long)]
    pub job: PathBuf,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `umbra vfl party`: run one party as its own process over NATS.
pub fn run_party(args: &VflPartyArgs) -> Result<TrainReport> {
    let mut cfg = JobConfig::from_toml_file(&args.job)?;
    cfg.progress = cfg.progress && std::io::stderr().is_terminal();
    let r = engine::run_party(&cfg, args.role, &args.broker)?;
    println!("{}", r.summary_line());
    if let Some(p) = &args.json {
        write_json(p, &r)?;
    }
    Ok(r)
}

/// `umbra vfl plan`
#[derive(Debug, Clone, clap::Args)]
pub struct VflPlanArgs {
    #[arg(long)]
    pub data: String,
    /// Cores the two parties share (default: all available).
    #[arg(long)]
    pub cores: Option<usize>,
    /// Largest batch size allowed (memory bound B_max).
    #[arg(long, default_value_t = 1024)]
    pub max_batch: usize,
    /// Rows used for the measured epoch (seeded subset).
    #[arg(long, default_value_t = 20000)]
    pub max_rows: usize,
    /// Simulate the active party on a machine of its own: `CORES` or `CORES:SLOWDOWN`
    /// (e.g. `1` or `1:3` = one core, three times slower). Default: both share the host.
    #[arg(long)]
    pub active_machine: Option<PartyMachine>,
    /// Simulate the passive party on a machine of its own (as `--active-machine`).
    #[arg(long)]
    pub passive_machine: Option<PartyMachine>,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `umbra vfl plan`: profile, fit the power-law time model, search (w_a, w_p, B), measure.
pub fn run_plan(args: &VflPlanArgs) -> Result<PlanReport> {
    let r = plan::plan_on(
        &args.data,
        args.cores,
        args.max_batch,
        args.max_rows,
        (args.active_machine, args.passive_machine),
    )?;
    println!("{}", r.human());
    if let Some(p) = &args.json {
        write_json(p, &r)?;
    }
    Ok(r)
}

/// `umbra bench vfl`
#[derive(Debug, Clone, clap::Args)]
pub struct BenchVflArgs {
    #[arg(long, default_value = "synthetic:200000x500")]
    pub data: String,
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    #[arg(long, default_value_t = 2)]
    pub workers_active: usize,
    #[arg(long, default_value_t = 2)]
    pub workers_passive: usize,
    #[arg(long)]
    pub max_rows: Option<usize>,
    #[arg(long)]
    pub depth: Option<usize>,
    /// Target AUC for the time-to-target column (default: the lowest final AUC of the five
    /// modes, so every mode reaches it).
    #[arg(long)]
    pub target_auc: Option<f64>,
    /// Simulate the active party on a machine of its own, as in `umbra vfl plan`
    /// (`CORES` or `CORES:SLOWDOWN`).
    #[arg(long)]
    pub active_machine: Option<PartyMachine>,
    /// Simulate the passive party on a machine of its own.
    #[arg(long)]
    pub passive_machine: Option<PartyMachine>,
    /// Runs of every mode; the modes take turns, each round starting one mode later (vfl first,
    /// then vfl-ps first, ...), so that changes in machine load and the position in a round hit
    /// them alike, and each mode reports its median run.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub repeats: u32,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `umbra bench vfl`: all five modes on the same data in one run, `repeats` times each, one
/// table of median runs; JSON maps mode name to its median run's report.
pub fn run_bench(args: &BenchVflArgs) -> Result<BTreeMap<String, TrainReport>> {
    let cfg = BenchConfig {
        data: args.data.clone(),
        epochs: args.epochs,
        batch: args.batch,
        workers_active: args.workers_active,
        workers_passive: args.workers_passive,
        max_rows: args.max_rows,
        depth: args.depth,
        target_auc: args.target_auc,
        machine_active: args.active_machine,
        machine_passive: args.passive_machine,
        repeats: args.repeats,
        progress: std::io::stderr().is_terminal(),
    };
    let r = bench::run(&cfg, |rep, r| {
        eprintln!("[run {}/{}] {}", rep + 1, cfg.repeats, r.summary_line())
    })?;
    print!("{}", bench::table(&r));
    if let Some(p) = &args.json {
        write_json(p, &r.runs)?;
    }
    Ok(r.runs)
}
