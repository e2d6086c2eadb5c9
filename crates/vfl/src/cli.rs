//! Arguments and entry points for `umbra vfl train|plan|party` and `umbra bench vfl`.
use crate::budget::PartyMachine;
use crate::config::{DpConfig, JobConfig, Mode};
use crate::engine::{self, Role};
use crate::error::{Result, VflError};
use crate::metrics::TrainReport;
use crate::party;
use crate::plan::{self, PlanReport};
use crate::transport::{Nats, Transport};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// Write JSON atomically (temp file + rename).
pub fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(|e| VflError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| VflError::io(path, e))
}

fn metric(r: &TrainReport) -> String {
    match (r.auc, r.rmse) {
        (Some(a), _) => format!("auc {:.4}", a),
        (_, Some(e)) => format!("rmse {:.4}", e),
        _ => "no metric".into(),
    }
}

/// One human line per report.
pub fn summary_line(r: &TrainReport) -> String {
    let mut s = format!(
        "{:<12} {}  wall {:.2} s  cpu_util {:.1}%  wait {:.2} s  bytes {:.2} MB",
        r.mode,
        metric(r),
        r.wall_s,
        100.0 * r.cpu_util,
        r.wait_s,
        r.bytes as f64 / 1e6
    );
    if let (Some(mu), Some(sigma)) = (r.dp_mu, r.dp_sigma) {
        s.push_str(&format!("  dp mu {mu:.3} (sigma {sigma:.3})"));
    }
    s
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
    println!("{}", summary_line(&r));
    if args.centralised {
        let c = engine::train_centralised(&cfg)?;
        println!("{}", summary_line(&c));
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

/// The `main` of a stand-alone party binary (`vfl_party`, `sap_party`, `r3elu_party`): logs at
/// `warn` unless `RUST_LOG` says otherwise, runs `run`, and on failure prints `error: ...` and
/// exits with status 1.
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

/// `umbra vfl party`: run one party as its own process over NATS.
pub fn run_party(args: &VflPartyArgs) -> Result<TrainReport> {
    let mut cfg = JobConfig::from_toml_file(&args.job)?;
    cfg.progress = cfg.progress && std::io::stderr().is_terminal();
    engine::one_thread_per_worker();
    let data = engine::prepare_role(&cfg, args.role)?;
    let t: Arc<dyn Transport> = Arc::new(Nats::connect(&args.broker, &cfg.job, cfg.buffers)?);
    let r = match args.role {
        Role::Passive => {
            let cut = engine::cut_layer(&cfg, data.n_train);
            let nb = data.n_train.div_ceil(cfg.batch);
            let pb = engine::progress_bar(&cfg, (cfg.epochs * nb) as u64);
            let p = party::run_passive(&cfg, &data, t, cut.clone(), pb.clone())?;
            pb.finish_and_clear();
            engine::report(&cfg, &p, p.active.as_ref(), &*cut, data.n_train)
        }
        Role::Active => {
            let a = party::run_active(&cfg, &data, t)?;
            let last = a.per_epoch.last().cloned().unwrap_or_default();
            let (wa, wp) = cfg.workers();
            TrainReport {
                mode: cfg.mode.to_string(),
                data: cfg.data.clone(),
                auc: last.auc,
                accuracy: last.accuracy,
                rmse: last.rmse,
                wall_s: a.wall_s,
                cpu_util: a.cpu_util,
                cores: cfg.cores(),
                wait_s: a.wait_s,
                bytes: a.bytes_sent + a.bytes_received,
                bytes_to_active: a.bytes_received,
                bytes_to_passive: a.bytes_sent,
                workers_active: wa,
                workers_passive: wp,
                batch: cfg.batch,
                epochs: cfg.epochs,
                rejected_messages: a.rejected,
                per_epoch: a
                    .per_epoch
                    .iter()
                    .map(|e| crate::metrics::EpochReport {
                        epoch: e.epoch,
                        auc: e.auc,
                        accuracy: e.accuracy,
                        rmse: e.rmse,
                        train_loss: e.train_loss,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }
        }
    };
    println!("{}", summary_line(&r));
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
    #[arg(long, value_parser = parse_machine)]
    pub active_machine: Option<PartyMachine>,
    /// Simulate the passive party on a machine of its own (as `--active-machine`).
    #[arg(long, value_parser = parse_machine)]
    pub passive_machine: Option<PartyMachine>,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn parse_machine(s: &str) -> std::result::Result<PartyMachine, String> {
    let (c, sl) = s.split_once(':').unwrap_or((s, "1"));
    let cores: usize = c
        .trim()
        .parse()
        .map_err(|_| format!("`{s}`: expected CORES or CORES:SLOWDOWN, e.g. 1:3"))?;
    let slowdown: f64 = sl
        .trim()
        .parse()
        .map_err(|_| format!("`{s}`: slowdown must be a number >= 1"))?;
    if cores == 0 || !(1.0..=1000.0).contains(&slowdown) {
        return Err(format!(
            "`{s}`: cores must be >= 1 and slowdown in [1, 1000]"
        ));
    }
    Ok(PartyMachine { cores, slowdown })
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
    #[arg(long, value_parser = parse_machine)]
    pub active_machine: Option<PartyMachine>,
    /// Simulate the passive party on a machine of its own.
    #[arg(long, value_parser = parse_machine)]
    pub passive_machine: Option<PartyMachine>,
    /// Runs of every mode; the modes take turns, each round starting one mode later (vfl first,
    /// then vfl-ps first, ...), so that changes in machine load and the position in a round hit
    /// them alike, and each mode reports its median run.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub repeats: u32,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// The run with the median wall time (the lower middle one for an even count), carrying the
/// wall times of all runs in `wall_s_runs`.
fn median_run(mut runs: Vec<TrainReport>) -> Option<TrainReport> {
    runs.sort_by(|a, b| a.wall_s.total_cmp(&b.wall_s));
    let walls: Vec<f64> = runs.iter().map(|r| r.wall_s).collect();
    let mid = runs.len().checked_sub(1)? / 2;
    let mut r = runs.swap_remove(mid);
    r.wall_s_runs = walls;
    Some(r)
}

/// `umbra bench vfl`: all five modes on the same data in one run, `repeats` times each, one
/// table of median runs; JSON maps mode name to its median run's report.
pub fn run_bench(args: &BenchVflArgs) -> Result<BTreeMap<String, TrainReport>> {
    let mut out = BTreeMap::new();
    let mut runs: Vec<Vec<TrainReport>> = vec![Vec::new(); Mode::ALL.len()];
    let n = Mode::ALL.len();
    for rep in 0..args.repeats as usize {
        for i in (0..n).map(|k| (k + rep) % n) {
            let mode = Mode::ALL[i];
            let mut cfg = JobConfig::new(&args.data, mode);
            cfg.epochs = args.epochs;
            cfg.batch = args.batch;
            cfg.workers_active = args.workers_active;
            cfg.workers_passive = args.workers_passive;
            cfg.max_rows = args.max_rows;
            cfg.machine_active = args.active_machine;
            cfg.machine_passive = args.passive_machine;
            if let Some(d) = args.depth {
                cfg.model.bottom_depth = d;
            }
            cfg.progress = std::io::stderr().is_terminal();
            let r = engine::train_inproc(&cfg)?;
            eprintln!("[run {}/{}] {}", rep + 1, args.repeats, summary_line(&r));
            runs[i].push(r);
        }
    }
    let mut rows = Vec::new();
    for (mode, rs) in Mode::ALL.into_iter().zip(runs) {
        if let Some(r) = median_run(rs) {
            rows.push(r.clone());
            out.insert(mode.to_string(), r);
        }
    }
    let target = args.target_auc.or_else(|| {
        rows.iter()
            .filter_map(|r| r.auc)
            .min_by(|a, b| a.total_cmp(b))
    });
    if let Some(t) = target {
        for r in rows.iter_mut() {
            r.time_to_target_s = r.time_to_auc(t);
            if let Some(o) = out.get_mut(&r.mode) {
                o.time_to_target_s = r.time_to_target_s;
            }
        }
    }
    let base = rows.first().map(|r| r.wall_s).unwrap_or(1.0);
    let base_tt = rows.first().and_then(|r| r.time_to_target_s);
    println!(
        "target auc {}",
        target
            .map(|t| format!("{t:.4}"))
            .unwrap_or_else(|| "-".into())
    );
    println!(
        "median of {} run(s) per mode; wall_range = fastest..slowest run",
        args.repeats
    );
    println!(
        "{:<10} {:>8} {:>9} {:>13} {:>9} {:>11} {:>9} {:>9} {:>10} {:>10}",
        "mode",
        "auc",
        "wall_s",
        "wall_range",
        "speedup",
        "to_target_s",
        "speedup",
        "cpu_util",
        "wait_s",
        "MB"
    );
    for r in &rows {
        let tt = r.time_to_target_s;
        let range = match (r.wall_s_runs.first(), r.wall_s_runs.last()) {
            (Some(lo), Some(hi)) => format!("{lo:.2}..{hi:.2}"),
            _ => "-".into(),
        };
        println!(
            "{:<10} {:>8} {:>9.2} {:>13} {:>8.2}x {:>11} {:>9} {:>8.1}% {:>10.2} {:>10.2}",
            r.mode,
            r.auc
                .map(|a| format!("{a:.4}"))
                .or(r.rmse.map(|e| format!("{e:.4}")))
                .unwrap_or_default(),
            r.wall_s,
            range,
            base / r.wall_s.max(1e-9),
            tt.map(|t| format!("{t:.2}")).unwrap_or_else(|| "-".into()),
            match (base_tt, tt) {
                (Some(b), Some(t)) => format!("{:.2}x", b / t.max(1e-9)),
                _ => "-".into(),
            },
            100.0 * r.cpu_util,
            r.wait_s,
            r.bytes as f64 / 1e6
        );
    }
    if let Some(p) = &args.json {
        write_json(p, &out)?;
    }
    Ok(out)
}
