//! clap arguments and entry points of `umbra split train|attack|party` and `umbra bench split`.
use crate::attacks::{self, AttackConfig};
use crate::data::{self, DataKind, Sizes};
use crate::error::{write_atomic, R3Error, Result};
use crate::mechanism::{Budget, R3eluConfig};
use crate::split::{self, Defense, SplitConfig};
use std::path::PathBuf;

/// Job flags shared by every split command; both parties of a two-process run pass the same.
#[derive(Debug, Clone, clap::Args)]
pub struct JobArgs {
    #[arg(long, value_enum, default_value = "fashion-mnist")]
    pub data: DataKind,
    #[arg(long, value_enum, default_value = "r3elu")]
    pub defense: Defense,
    /// Per-release epsilon of the cut layer (R3eLU eps_p + eps_l; Gaussian baseline the same);
    /// `inf` for no noise.
    #[arg(long, default_value = "2")]
    pub epsilon: f64,
    /// R3eLU's K as a fraction of the cut width.
    #[arg(long, default_value_t = 0.5)]
    pub k: f64,
    /// Clip bound C (R3eLU per unit; Gaussian baseline: L2 norm of a row).
    #[arg(long, default_value_t = 10.0)]
    pub clip: f64,
    /// Clip bound of per-example gradients in R3eLU's backward pass.
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    #[arg(long, default_value = "fine")]
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
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Cut width N.
    #[arg(long, default_value_t = 64)]
    pub cut: usize,
    #[arg(long, default_value_t = 256)]
    pub hidden: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
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
            batch: self.batch,
            lr: self.lr,
            cut: self.cut,
            hidden: self.hidden,
            seed: self.seed,
            progress: !self.quiet,
            ..Default::default()
        };
        cfg.validate()?;
        Ok(cfg)
    }
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

fn fmt_opt(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "inf".into())
}

fn write_json<T: serde::Serialize>(path: &Option<PathBuf>, v: &T) -> Result<()> {
    if let Some(p) = path {
        write_atomic(p, serde_json::to_string_pretty(v)?.as_bytes())?;
    }
    Ok(())
}

pub fn run_train(a: &SplitTrainArgs) -> Result<split::TrainReport> {
    let cfg = a.job.config()?;
    let ds = data::load(cfg.data, cfg.sizes, cfg.seed)?;
    let tr = split::train_inproc(&cfg, &ds)?;
    let r = &tr.report;
    println!(
        "| data | defense | eps/release | test_acc | epsilon_total | delta_total | wall_s |\n|---|---|---|---|---|---|---|\n| {} | {} | {} | {:.4} | {} | {:.1e} | {:.1} |",
        r.data,
        r.defense,
        fmt_opt(r.epsilon),
        r.test_acc,
        fmt_opt(r.epsilon_total),
        r.delta_total,
        r.wall_s
    );
    write_json(&a.json, r)?;
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
    #[arg(long, default_value_t = 1500)]
    pub fsha_steps: usize,
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

/// Flat JSON of `umbra split attack` (fields absent when not measured).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct AttackReport {
    pub data: String,
    pub defense: String,
    pub epsilon: Option<f64>,
    pub test_acc: Option<f64>,
    pub epsilon_total: Option<f64>,
    pub recon_mse: Option<f64>,
    pub recon_ssim: Option<f64>,
    pub classmean_mse: Option<f64>,
    pub classmean_ssim: Option<f64>,
    pub recon_feature_acc: Option<f64>,
    pub majority_feature_acc: Option<f64>,
    pub property_auc: Option<f64>,
    pub fsha_ssim: Option<f64>,
    pub fsha_mse: Option<f64>,
}

/// (original, reconstruction) image pairs.
pub type Examples = Vec<(Vec<f32>, Vec<f32>)>;

/// Train (unless only FSHA, which replaces training) and run the chosen attacks; the
/// reconstruction examples come back for PNGs.
pub fn attack(
    cfg: &SplitConfig,
    ds: &data::Dataset,
    kind: AttackKind,
    acfg: &AttackConfig,
) -> Result<(AttackReport, Examples, Examples)> {
    let (recon, prop, fsha) = match kind {
        AttackKind::Reconstruction => (true, false, false),
        AttackKind::Property => (false, true, false),
        AttackKind::Fsha => (false, false, true),
        AttackKind::All => (true, true, true),
    };
    attack_with(cfg, ds, recon, prop, fsha, acfg)
}

/// [`attack`] with each attack switched on or off; trains once when any of reconstruction or
/// property is on.
pub fn attack_with(
    cfg: &SplitConfig,
    ds: &data::Dataset,
    recon: bool,
    prop: bool,
    fsha: bool,
    acfg: &AttackConfig,
) -> Result<(AttackReport, Examples, Examples)> {
    let mut rep = AttackReport {
        data: cfg.data.to_string(),
        defense: cfg.defense.to_string(),
        epsilon: (cfg.defense != Defense::None && cfg.r3.eps.is_finite()).then_some(cfg.r3.eps),
        ..Default::default()
    };
    let (mut rec_ex, mut fsha_ex) = (Vec::new(), Vec::new());
    if recon || prop {
        let tr = split::train_inproc(cfg, ds)?;
        rep.test_acc = Some(tr.report.test_acc);
        rep.epsilon_total = tr.report.epsilon_total;
        if recon {
            let r = attacks::reconstruction(&tr, ds, acfg)?;
            rep.recon_mse = r.recon_mse;
            rep.recon_ssim = r.recon_ssim;
            rep.classmean_mse = r.classmean_mse;
            rep.classmean_ssim = r.classmean_ssim;
            rep.recon_feature_acc = r.recon_feature_acc;
            rep.majority_feature_acc = r.majority_feature_acc;
            rec_ex = r.examples;
        }
        if prop {
            rep.property_auc = Some(attacks::property(&tr, ds, acfg)?);
        }
    } else {
        rep.epsilon_total = split::TrainReport::new(
            cfg,
            &split::HostReport {
                test_acc: 0.0,
                train_loss: 0.0,
                steps: 0,
            },
            0.0,
        )
        .epsilon_total;
    }
    if fsha && ds.image.is_some() {
        let r = attacks::fsha(cfg, ds, acfg)?;
        rep.fsha_ssim = r.recon_ssim;
        rep.fsha_mse = r.recon_mse;
        if rep.classmean_ssim.is_none() {
            rep.classmean_ssim = r.classmean_ssim;
            rep.classmean_mse = r.classmean_mse;
        }
        fsha_ex = r.examples;
    }
    Ok((rep, rec_ex, fsha_ex))
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
        fsha_steps: a.fsha_steps,
        fsha_lr: a.fsha_lr,
        fsha_mmd: !a.fsha_gan,
        fsha_by_class: !a.fsha_no_labels,
        ..Default::default()
    };
    let (rep, rec, fs) = attack(&cfg, &ds, a.attack, &acfg)?;
    let v = serde_json::to_value(&rep)?;
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
    if let (Some(p), Some((h, w))) = (&a.png, ds.image) {
        let ex = if rec.is_empty() { &fs } else { &rec };
        let mut imgs: Vec<Vec<f32>> = ex.iter().map(|e| e.0.clone()).collect();
        imgs.extend(ex.iter().map(|e| e.1.clone()));
        crate::image::write_grid(p, &imgs, ex.len().max(1), h, w)?;
    }
    write_json(&a.json, &rep)?;
    Ok(rep)
}

/// `umbra split party`: one party in its own process, over NATS.
#[derive(Debug, Clone, clap::Args)]
pub struct SplitPartyArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// guest (features, bottom) or host (labels, top).
    #[arg(long)]
    pub role: String,
    /// NATS URL, e.g. nats://127.0.0.1:4222.
    #[arg(long)]
    pub broker: String,
    /// Write the party's report (flat JSON) here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run_party(a: &SplitPartyArgs) -> Result<split::TrainReport> {
    let mut cfg = a.job.config()?;
    cfg.progress = false;
    let ds = data::load(cfg.data, cfg.sizes, cfg.seed)?;
    let t0 = std::time::Instant::now();
    let nats = umbra_vfl::transport::Nats::connect(
        &a.broker,
        &cfg.job,
        umbra_vfl::transport::Buffers::default(),
    )?;
    let host = match a.role.as_str() {
        "guest" => split::run_guest(&nats, &cfg, &ds.train.x, &ds.test.x, ds.train.d)?.2,
        "host" => split::run_host(&nats, &cfg, &ds.train.y, &ds.test.y, ds.classes)?.1,
        r => {
            return Err(R3Error::Config(format!(
                "--role `{r}`: expected guest or host"
            )))
        }
    };
    let rep = split::TrainReport::new(&cfg, &host, t0.elapsed().as_secs_f64());
    println!("{} test_acc {:.4}", a.role, rep.test_acc);
    write_json(&a.json, &rep)?;
    Ok(rep)
}

/// `umbra bench split`
#[derive(Debug, Clone, clap::Args)]
pub struct BenchSplitArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// Per-release epsilons to sweep (comma-separated, `inf` allowed).
    #[arg(long, default_value = "0.5,1,2,4,8,inf")]
    pub eps: String,
    #[arg(long, default_value_t = 1000)]
    pub victims: usize,
    #[arg(long, default_value_t = 15)]
    pub attack_epochs: usize,
    #[arg(long, default_value_t = 1500)]
    pub fsha_steps: usize,
    /// Skip FSHA (it trains its own malicious run per point).
    #[arg(long)]
    pub no_fsha: bool,
    /// Output folder: report.json, table.md, frontier.svg, reconstructions PNGs.
    #[arg(long, default_value = "report")]
    pub out: PathBuf,
}

pub fn run_bench(a: &BenchSplitArgs) -> Result<crate::bench::BenchReport> {
    let cfg = a.job.config()?;
    let eps: Vec<f64> = a
        .eps
        .split(',')
        .map(|s| {
            let s = s.trim();
            if s == "inf" {
                Ok(f64::INFINITY)
            } else {
                s.parse::<f64>()
                    .ok()
                    .filter(|v| *v > 0.0)
                    .ok_or_else(|| R3Error::Config(format!("--eps: bad value `{s}`")))
            }
        })
        .collect::<Result<_>>()?;
    let acfg = AttackConfig {
        victims: a.victims,
        epochs: a.attack_epochs,
        fsha_steps: a.fsha_steps,
        ..Default::default()
    };
    crate::bench::run(&cfg, &eps, &acfg, !a.no_fsha, &a.out)
}
