//! The command-line edge (feature `cli`): clap arguments and entry points of `umbra split
//! train|attack|party|bench` (and `umbra bench split`); the `r3elu_party` binary parses the same
//! [`Command`]. Each entry point builds the job, calls the library, prints and writes files;
//! the frontier figure is drawn here with `umbra_common::plot`.
use crate::attacks::AttackConfig;
use crate::bench::{self, BenchReport};
use crate::config::{Defense, SplitConfig};
use crate::data::{self, DataKind, Sizes};
use crate::error::{R3Error, Result};
use crate::experiment::{self, AttackReport, Attacks};
use crate::mechanism::{Budget, R3eluConfig};
use crate::training::{self, TrainReport};
use crate::{guest, host};
use std::path::PathBuf;
use umbra_common::fs::{write_atomic, write_json};
use umbra_common::plot::{Figure, Panel, Series, Style};

/// `umbra split <command>` (and the `r3elu_party` binary).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Train guest and host in one process with a cut-layer defense; --json for the report.
    Train(SplitTrainArgs),
    /// Train, then attack the traffic as the host: reconstruction, property inference, FSHA.
    Attack(SplitAttackArgs),
    /// Run one party (guest or host) in its own process, talking through NATS.
    Party(SplitPartyArgs),
    /// Accuracy vs attack success for none / R3eLU / Gaussian DP over a grid of total epsilons
    /// (also `umbra bench split`).
    Bench(BenchSplitArgs),
}

/// Runs one command.
pub fn run(cmd: &Command) -> Result<()> {
    match cmd {
        Command::Train(a) => run_train(a).map(|_| ()),
        Command::Attack(a) => run_attack(a).map(|_| ()),
        Command::Party(a) => run_party(a).map(|_| ()),
        Command::Bench(a) => run_bench(a).map(|_| ()),
    }
}

/// Job flags shared by every split command; both parties of a two-process run pass the same.
#[derive(Debug, Clone, clap::Args)]
pub struct JobArgs {
    #[arg(long, value_enum, default_value = "fashion-mnist")]
    pub data: DataKind,
    #[arg(long, value_enum, default_value = "r3elu")]
    pub defense: Defense,
    /// Per-release epsilon of the cut layer (R3eLU eps_p + eps_l; the Gaussian baseline at
    /// (epsilon, 1e-6) per release); `inf` for no noise.
    #[arg(long, default_value = "2", conflicts_with = "epsilon_total")]
    pub epsilon: f64,
    /// Total epsilon per record instead (over epochs + inference releases; each defense's
    /// per-release noise is derived from it).
    #[arg(long)]
    pub epsilon_total: Option<f64>,
    /// R3eLU's K as a fraction of the cut width.
    #[arg(long, default_value_t = 0.5)]
    pub k: f64,
    /// Clip bound C (R3eLU per unit; Gaussian baseline: L2 norm of a row).
    #[arg(long, default_value_t = 10.0)]
    pub clip: f64,
    /// Clip bound of per-example gradients in R3eLU's backward pass.
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    /// uniform (accounted) or fine (the paper's Taylor-importance budget; not accounted).
    #[arg(long, default_value = "uniform")]
    pub budget: String,
    /// Private training rows of the guest.
    #[arg(long, default_value_t = 10_000)]
    pub train: usize,
    #[arg(long, default_value_t = 2_000)]
    pub test: usize,
    /// Auxiliary rows the host holds (disjoint from train).
    #[arg(long, default_value_t = 5_000)]
    pub aux: usize,
    #[arg(long, default_value_t = 5)]
    pub epochs: usize,
    /// Releases of each record's row after training (inference), counted in epsilon_total.
    #[arg(long, default_value_t = 1)]
    pub inference_releases: usize,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Cut width N.
    #[arg(long, default_value_t = 64)]
    pub cut: usize,
    #[arg(long, default_value_t = 256)]
    pub hidden: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Delta of the composed guarantee (Gaussian baseline; R3eLU composes with delta 0).
    #[arg(long, default_value_t = 1e-5)]
    pub delta: f64,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Hide progress bars.
    #[arg(long)]
    pub quiet: bool,
}

impl JobArgs {
    pub fn config(&self) -> Result<SplitConfig> {
        let cfg = SplitConfig {
            job: format!("r3elu-{}-{}", self.data, self.seed),
            data: self.data,
            sizes: Sizes {
                train: self.train,
                test: self.test,
                aux: self.aux,
            },
            defense: self.defense,
            r3: R3eluConfig {
                eps: self.epsilon,
                p_share: 0.5,
                k_frac: self.k,
                clip: self.clip,
                grad_clip: self.grad_clip,
                budget: self.budget.parse::<Budget>()?,
            },
            delta: self.delta,
            epochs: self.epochs,
            inference_releases: self.inference_releases,
            batch: self.batch,
            lr: self.lr,
            cut: self.cut,
            hidden: self.hidden,
            seed: self.seed,
            progress: !self.quiet,
            ..Default::default()
        };
        let cfg = match self.epsilon_total {
            Some(t) => cfg.with_total(t),
            None => cfg,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

fn fmt_opt(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "inf".into())
}

fn write_opt<T: serde::Serialize>(path: &Option<PathBuf>, v: &T) -> Result<()> {
    if let Some(p) = path {
        write_json(p, v)?;
    }
    Ok(())
}

/// `umbra split train`
#[derive(Debug, Clone, clap::Args)]
pub struct SplitTrainArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// Write the report (flat JSON) here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run_train(a: &SplitTrainArgs) -> Result<TrainReport> {
    let cfg = a.job.config()?;
    let ds = data::load(cfg.data, cfg.sizes, cfg.seed)?;
    let tr = training::train_inproc(&cfg, &ds)?;
    let r = &tr.report;
    let p = &r.privacy;
    println!(
        "| data | defense | eps/release | releases | epsilon_total | delta_total | composition | test_acc | wall_s |\n|---|---|---|---|---|---|---|---|---|\n| {} | {} | {} | {} | {} | {:.1e} | {} | {:.4} | {:.1} |",
        r.data,
        r.defense,
        fmt_opt(p.epsilon_release),
        p.releases,
        fmt_opt(p.epsilon_total),
        p.delta_total,
        p.composition,
        r.test_acc,
        r.wall_s
    );
    if let Some(n) = &p.note {
        eprintln!("note: {n}");
    }
    write_opt(&a.json, r)?;
    Ok(tr.report)
}

/// Which attack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttackKind {
    Reconstruction,
    Property,
    Fsha,
    All,
}

impl AttackKind {
    pub fn attacks(self) -> Attacks {
        match self {
            AttackKind::Reconstruction => Attacks {
                reconstruction: true,
                property: false,
                fsha: false,
            },
            AttackKind::Property => Attacks {
                reconstruction: false,
                property: true,
                fsha: false,
            },
            AttackKind::Fsha => Attacks {
                reconstruction: false,
                property: false,
                fsha: true,
            },
            AttackKind::All => Attacks::ALL,
        }
    }
}

/// `umbra split attack`
#[derive(Debug, Clone, clap::Args)]
pub struct SplitAttackArgs {
    #[command(flatten)]
    pub job: JobArgs,
    #[arg(long, value_enum, default_value = "all")]
    pub attack: AttackKind,
    /// Private rows whose traffic is attacked.
    #[arg(long, default_value_t = 1000)]
    pub victims: usize,
    /// Epochs of the attacker's inverse network / property classifier over aux.
    #[arg(long, default_value_t = 15)]
    pub attack_epochs: usize,
    /// FSHA steps (default: as many batches as training, so each row is released as often).
    #[arg(long)]
    pub fsha_steps: Option<usize>,
    /// FSHA learning rate (hijacked bottom and discriminator).
    #[arg(long, default_value_t = 1e-3)]
    pub fsha_lr: f64,
    /// FSHA with a discriminator (GAN) instead of the MMD critic.
    #[arg(long)]
    pub fsha_gan: bool,
    /// FSHA without class-by-class matching (the original, label-free attack).
    #[arg(long)]
    pub fsha_no_labels: bool,
    /// Write example reconstructions (originals on top) as a PNG.
    #[arg(long)]
    pub png: Option<PathBuf>,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run_attack(a: &SplitAttackArgs) -> Result<AttackReport> {
    let cfg = a.job.config()?;
    if a.attack == AttackKind::Fsha && a.job.data == DataKind::Adult {
        return Err(R3Error::Config("FSHA is implemented for image data".into()));
    }
    let ds = data::load(cfg.data, cfg.sizes, cfg.seed)?;
    let acfg = AttackConfig {
        victims: a.victims,
        epochs: a.attack_epochs,
        fsha_steps: a
            .fsha_steps
            .unwrap_or_else(|| experiment::fsha_steps_like_training(&cfg)),
        fsha_lr: a.fsha_lr,
        fsha_mmd: !a.fsha_gan,
        fsha_by_class: !a.fsha_no_labels,
        ..Default::default()
    };
    let p = experiment::run(&cfg, &ds, a.attack.attacks(), &acfg)?;
    let v = serde_json::to_value(&p.report)?;
    println!("| measure | value |\n|---|---|");
    if let Some(o) = v.as_object() {
        for (k, x) in o {
            if !x.is_null() {
                println!(
                    "| {k} | {} |",
                    x.as_f64()
                        .map(|f| format!("{f:.4}"))
                        .unwrap_or(x.to_string())
                );
            }
        }
    }
    if let (Some(png), Some((h, w))) = (&a.png, ds.image) {
        let ex = if p.recon_examples.is_empty() {
            &p.fsha_examples
        } else {
            &p.recon_examples
        };
        let mut imgs: Vec<Vec<f32>> = ex.iter().map(|e| e.0.clone()).collect();
        imgs.extend(ex.iter().map(|e| e.1.clone()));
        crate::image::write_grid(png, &imgs, ex.len().max(1), h, w)?;
    }
    write_opt(&a.json, &p.report)?;
    Ok(p.report)
}

/// A party of the split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Features and the bottom model.
    Guest,
    /// Labels and the top model.
    Host,
}

/// `umbra split party`: one party in its own process, over NATS.
#[derive(Debug, Clone, clap::Args)]
pub struct SplitPartyArgs {
    #[command(flatten)]
    pub job: JobArgs,
    #[arg(long, value_enum)]
    pub role: Role,
    /// NATS URL, e.g. nats://127.0.0.1:4222.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub broker: String,
    /// Write the party's report (flat JSON) here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run_party(a: &SplitPartyArgs) -> Result<TrainReport> {
    let mut cfg = a.job.config()?;
    cfg.progress = false;
    let ds = data::load(cfg.data, cfg.sizes, cfg.seed)?;
    let t0 = std::time::Instant::now();
    let nats = umbra_vfl::transport::Nats::connect(
        &a.broker,
        &cfg.job,
        umbra_vfl::transport::Buffers::default(),
    )?;
    let host = match a.role {
        Role::Guest => guest::run_guest(&nats, &cfg, &ds.train.x, &ds.test.x, ds.train.d)?.2,
        Role::Host => host::run_host(&nats, &cfg, &ds.train.y, &ds.test.y, ds.classes)?.1,
    };
    let rep = TrainReport::new(&cfg, &host, t0.elapsed().as_secs_f64());
    println!("{:?} test_acc {:.4}", a.role, rep.test_acc);
    write_opt(&a.json, &rep)?;
    Ok(rep)
}

/// `umbra bench split`
#[derive(Debug, Clone, clap::Args)]
pub struct BenchSplitArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// Total epsilons per record to sweep (comma-separated, `inf` allowed); both defenses
    /// spend exactly each total.
    #[arg(long, default_value = "2,8,32,128,512,2048,8192,inf")]
    pub eps_total: String,
    #[arg(long, default_value_t = 1000)]
    pub victims: usize,
    #[arg(long, default_value_t = 15)]
    pub attack_epochs: usize,
    /// FSHA steps (default: as many batches as training, the same releases per row).
    #[arg(long)]
    pub fsha_steps: Option<usize>,
    /// Skip FSHA (it trains its own malicious run per point).
    #[arg(long)]
    pub no_fsha: bool,
    /// Output folder: report.json, table.md, frontier.svg, reconstructions PNGs.
    #[arg(long, default_value = "report")]
    pub out: PathBuf,
}

/// Parses `2,8,inf` into totals (each > 0).
pub fn parse_totals(s: &str) -> Result<Vec<f64>> {
    s.split(',')
        .map(|s| {
            let s = s.trim();
            if s == "inf" {
                Ok(f64::INFINITY)
            } else {
                s.parse::<f64>().ok().filter(|v| *v > 0.0).ok_or_else(|| {
                    R3Error::Config(format!("--eps-total: `{s}` is not a number > 0"))
                })
            }
        })
        .collect()
}

pub fn run_bench(a: &BenchSplitArgs) -> Result<BenchReport> {
    let cfg = a.job.config()?;
    let totals = parse_totals(&a.eps_total)?;
    let acfg = AttackConfig {
        victims: a.victims,
        epochs: a.attack_epochs,
        fsha_steps: a
            .fsha_steps
            .unwrap_or_else(|| experiment::fsha_steps_like_training(&cfg)),
        ..Default::default()
    };
    let r = bench::run(&cfg, &totals, &acfg, !a.no_fsha, &a.out)?;
    write_atomic(&a.out.join("frontier.svg"), frontier(&r).svg()?.as_bytes())?;
    Ok(r)
}

/// Three panels (reconstruction / property AUC / FSHA SSIM against test accuracy), one line per
/// defense across the epsilon grid.
pub fn frontier(r: &BenchReport) -> Figure {
    type Get = fn(&AttackReport) -> Option<f64>;
    let metrics: [(&str, Get); 3] = [
        ("reconstruction SSIM", |p| {
            p.recon_ssim.or(p.recon_feature_acc)
        }),
        ("property AUC", |p| p.property_auc),
        ("FSHA SSIM", |p| p.fsha_ssim),
    ];
    let panels = metrics
        .iter()
        .map(|&(name, get)| Panel {
            title: format!("{name} vs test accuracy"),
            x_label: "test accuracy".into(),
            y_label: name.into(),
            x_range: (0.0, 1.0),
            y_range: (0.0, 1.0),
            series: ["none", "r3elu", "gaussian-dp"]
                .iter()
                .map(|def| Series {
                    name: def.to_string(),
                    points: r
                        .points
                        .iter()
                        .filter(|p| p.defense == *def)
                        .filter_map(|p| Some((p.test_acc?, get(p)?)))
                        .collect(),
                    style: Style::Line,
                })
                .collect(),
        })
        .collect();
    Figure {
        panels,
        panel_width: 450,
        height: 460,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse_totals("2, 8,inf").unwrap(),
            vec![2.0, 8.0, f64::INFINITY]
        );
        for bad in ["0", "-1", "x", "2,,3"] {
            let e = parse_totals(bad).unwrap_err().to_string();
            assert!(e.contains("--eps-total"), "{e}");
        }
    }

    #[test]
    fn the_frontier_has_a_panel_per_attack_and_a_line_per_defense() {
        let pt = |d: &str, acc: f64| AttackReport {
            defense: d.into(),
            test_acc: Some(acc),
            recon_ssim: Some(0.3),
            property_auc: Some(0.6),
            ..Default::default()
        };
        let r = BenchReport {
            data: "x".into(),
            n_train: 1,
            n_test: 1,
            n_aux: 1,
            epochs: 1,
            releases: 2,
            cut: 2,
            victims: 1,
            fsha_steps: 0,
            wall_s: 0.0,
            points: vec![pt("none", 0.8), pt("r3elu", 0.5), pt("r3elu", 0.6)],
        };
        let f = frontier(&r);
        assert_eq!(f.panels.len(), 3);
        assert_eq!(f.panels[0].series[1].points.len(), 2);
        assert!(f.panels[2].series.iter().all(|s| s.points.is_empty()));
        assert!(f.svg().unwrap().contains("r3elu"));
    }
}
