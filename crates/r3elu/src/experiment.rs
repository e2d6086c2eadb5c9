//! One point of the privacy-utility frontier: train with a defense, then attack as the host.
use crate::attacks::{self, AttackConfig};
use crate::config::{Defense, SplitConfig};
use crate::data::Dataset;
use crate::error::{R3Error, Result};
use crate::ledger::{self, Accounting};
use crate::training;
use crate::{accountant, mechanism::Budget};
use serde::{Deserialize, Serialize};

/// Which attacks to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attacks {
    pub reconstruction: bool,
    pub property: bool,
    pub fsha: bool,
}

impl Attacks {
    pub const ALL: Attacks = Attacks {
        reconstruction: true,
        property: true,
        fsha: true,
    };
}

/// Flat JSON of `umbra split attack` and one point of `umbra bench split` (fields absent when
/// not measured).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AttackReport {
    pub data: String,
    pub defense: String,
    /// The per-release epsilon asked for (null = inf or no defense).
    pub epsilon: Option<f64>,
    pub test_acc: Option<f64>,
    /// Releases of one record (epochs + inference) and their composed epsilon / delta.
    pub releases: Option<usize>,
    pub epsilon_release: Option<f64>,
    pub epsilon_total: Option<f64>,
    pub delta_total: Option<f64>,
    pub composition: Option<String>,
    pub recon_mse: Option<f64>,
    pub recon_ssim: Option<f64>,
    pub classmean_mse: Option<f64>,
    pub classmean_ssim: Option<f64>,
    pub recon_feature_acc: Option<f64>,
    pub majority_feature_acc: Option<f64>,
    pub property_auc: Option<f64>,
    pub fsha_ssim: Option<f64>,
    pub fsha_mse: Option<f64>,
    /// FSHA's malicious run: releases of its most-released row (victim release included) and
    /// their composed epsilon.
    pub fsha_releases: Option<usize>,
    pub fsha_epsilon_total: Option<f64>,
}

/// (original, reconstruction) image pairs.
pub type Examples = Vec<(Vec<f32>, Vec<f32>)>;

/// What a point produced: the report and example reconstructions (attack traffic, FSHA).
pub struct Point {
    pub report: AttackReport,
    pub recon_examples: Examples,
    pub fsha_examples: Examples,
}

/// The epsilon of `k` releases under `cfg`'s defense (FSHA's run releases its rows a different
/// number of times than training does).
fn epsilon_of_releases(cfg: &SplitConfig, k: usize) -> Option<f64> {
    let a: Accounting = ledger::account(cfg);
    let eps = match cfg.defense {
        Defense::None => return None,
        Defense::R3elu if cfg.r3.budget == Budget::Fine => return None,
        Defense::R3elu => accountant::pure(a.epsilon_release?, k, cfg.delta).epsilon,
        Defense::GaussianDp => {
            let sigma = cfg.gaussian_sigma();
            if sigma <= 0.0 {
                return None;
            }
            accountant::gaussian(2.0 / sigma, k, cfg.delta).epsilon
        }
    };
    eps.is_finite().then_some(eps)
}

/// Trains (when reconstruction or property inference is on; FSHA replaces training with its own
/// run) and runs the chosen attacks on `ds`.
pub fn run(cfg: &SplitConfig, ds: &Dataset, which: Attacks, acfg: &AttackConfig) -> Result<Point> {
    cfg.validate()?;
    if (which.reconstruction || which.property || which.fsha) && ds.aux.n == 0 {
        return Err(R3Error::Config(
            "the auxiliary split is empty (--aux 0): the attacks train on the host's auxiliary rows"
                .into(),
        ));
    }
    let a = ledger::account(cfg);
    let mut rep = AttackReport {
        data: cfg.data.to_string(),
        defense: cfg.defense.to_string(),
        epsilon: (cfg.defense != Defense::None && cfg.r3.eps.is_finite()).then_some(cfg.r3.eps),
        releases: Some(a.releases),
        epsilon_release: a.epsilon_release,
        epsilon_total: a.epsilon_total,
        delta_total: Some(a.delta_total),
        composition: Some(a.composition.clone()),
        ..Default::default()
    };
    let mut point = Point {
        report: AttackReport::default(),
        recon_examples: Vec::new(),
        fsha_examples: Vec::new(),
    };
    if which.reconstruction || which.property {
        let tr = training::train_inproc(cfg, ds)?;
        rep.test_acc = Some(tr.report.test_acc);
        let victims = attacks::victim_traffic(&tr, ds, acfg)?;
        if which.reconstruction {
            let r = attacks::reconstruction(&tr, ds, &victims, acfg)?;
            rep.recon_mse = r.recon_mse;
            rep.recon_ssim = r.recon_ssim;
            rep.classmean_mse = r.classmean_mse;
            rep.classmean_ssim = r.classmean_ssim;
            rep.recon_feature_acc = r.recon_feature_acc;
            rep.majority_feature_acc = r.majority_feature_acc;
            point.recon_examples = r.examples;
        }
        if which.property {
            rep.property_auc = Some(attacks::property(&tr, ds, &victims, acfg)?);
        }
    }
    if which.fsha && ds.image.is_some() {
        let r = attacks::fsha(cfg, ds, acfg)?;
        rep.fsha_ssim = r.recon_ssim;
        rep.fsha_mse = r.recon_mse;
        rep.fsha_releases = Some(r.max_releases);
        rep.fsha_epsilon_total = epsilon_of_releases(cfg, r.max_releases);
        if rep.classmean_ssim.is_none() {
            rep.classmean_ssim = r.classmean_ssim;
            rep.classmean_mse = r.classmean_mse;
        }
        point.fsha_examples = r.examples;
    }
    point.report = rep;
    Ok(point)
}

/// FSHA steps that release each private row as often as training does (`epochs` passes over
/// the rows in batches of `batch`).
pub fn fsha_steps_like_training(cfg: &SplitConfig) -> usize {
    cfg.steps()
}
