//! Training both parties in one process (two threads over vfl's in-process transport), and the
//! report of a run.
use crate::config::{Defense, SharedCut, SplitConfig};
use crate::data::Dataset;
use crate::error::{R3Error, Result};
use crate::guest::{run_guest, Bottom};
use crate::host::{run_host, HostReport};
use crate::ledger::{self, Accounting};
use serde::{Deserialize, Serialize};
use std::time::Instant;
use umbra_vfl::model::Mlp;
use umbra_vfl::transport::{Buffers, InProc, InProcHandle};

/// Flat JSON of `umbra split train` (and of each party of `umbra split party`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    pub data: String,
    pub defense: String,
    /// The per-release epsilon asked for (null = inf or no defense).
    pub epsilon: Option<f64>,
    pub k: f64,
    pub clip: f64,
    pub budget: String,
    pub n_train: usize,
    pub n_test: usize,
    pub epochs: usize,
    pub batch: usize,
    pub cut: usize,
    pub test_acc: f64,
    pub train_loss: f64,
    /// Per-record accounting: releases, `epsilon_release`, `epsilon_total`, `delta_total`,
    /// `composition`, ... (see [`crate::ledger`]).
    #[serde(flatten)]
    pub privacy: Accounting,
    pub wall_s: f64,
}

impl TrainReport {
    pub fn new(cfg: &SplitConfig, host: &HostReport, wall_s: f64) -> Self {
        TrainReport {
            data: cfg.data.to_string(),
            defense: cfg.defense.to_string(),
            epsilon: (cfg.defense != Defense::None && cfg.r3.eps.is_finite()).then_some(cfg.r3.eps),
            k: cfg.r3.k_frac,
            clip: cfg.r3.clip,
            budget: cfg.r3.budget.to_string(),
            n_train: cfg.sizes.train,
            n_test: cfg.sizes.test,
            epochs: cfg.epochs,
            batch: cfg.batch,
            cut: cfg.cut,
            test_acc: host.test_acc,
            train_loss: host.train_loss,
            privacy: ledger::account(cfg),
            wall_s,
        }
    }
}

/// A trained split model with everything an attacker simulation needs.
pub struct Trained {
    pub cfg: SplitConfig,
    pub bottom: Bottom,
    pub top: Mlp,
    pub cut: SharedCut,
    pub report: TrainReport,
}

/// Train both parties in one process (two threads over in-process channels).
pub fn train_inproc(cfg: &SplitConfig, ds: &Dataset) -> Result<Trained> {
    cfg.validate()?;
    let t0 = Instant::now();
    let bus = InProcHandle(InProc::new(Buffers::default()));
    let d = ds.train.d;
    let (host_bus, guest_bus) = (bus.clone(), bus);
    let (bottom, cut, top, host) = std::thread::scope(|s| {
        let h = s.spawn(|| run_host(&host_bus, cfg, &ds.train.y, &ds.test.y, ds.classes));
        let g = run_guest(&guest_bus, cfg, &ds.train.x, &ds.test.x, d);
        let h = h
            .join()
            .map_err(|_| R3Error::Protocol("host thread panicked".into()))?;
        let (top, host) = h?;
        let (bottom, cut, _) = g?;
        Ok::<_, R3Error>((bottom, cut, top, host))
    })?;
    let report = TrainReport::new(cfg, &host, t0.elapsed().as_secs_f64());
    Ok(Trained {
        cfg: cfg.clone(),
        bottom,
        top,
        cut,
        report,
    })
}
