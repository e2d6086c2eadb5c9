//! Putting it together: data preparation, in-process runs of both parties, one party over NATS,
//! the centralised baseline, and the report.
use crate::config::JobConfig;
use crate::cut::{CutLayer, GaussianDp, Identity};
use crate::data::{self, PartyData, Table};
use crate::dp;
use crate::error::{Result, VflError};
use crate::metrics::{self, CpuMeter, EpochReport, TrainReport};
use crate::model::{self, Adam, Mlp};
use crate::party::{self, ActiveSummary, Batches, PassiveSummary};
use crate::threads;
use crate::transport::{Faulty, InProc, InProcHandle, Nats, Transport};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use std::time::Duration;
use umbra_common::progress::Progress;

/// Which side of the split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Role {
    Active,
    Passive,
}

/// Both parties' data: (active, passive).
pub fn prepare(cfg: &JobConfig) -> Result<(PartyData, PartyData)> {
    let table = load_table(cfg)?;
    let (ca, cp) = cfg.split.columns(&table)?;
    let (train, test) = data::train_test_split(table.n, cfg.test_frac, cfg.seed);
    Ok((
        PartyData::build(&table, &ca, &train, &test),
        PartyData::build(&table, &cp, &train, &test),
    ))
}

/// One party's data (in a real deployment each party loads only its own file).
pub fn prepare_role(cfg: &JobConfig, role: Role) -> Result<PartyData> {
    let (a, p) = prepare(cfg)?;
    Ok(match role {
        Role::Active => a,
        Role::Passive => {
            // the passive party never sees labels
            PartyData {
                train_y: vec![0.0; p.n_train],
                test_y: vec![0.0; p.n_test],
                ..p
            }
        }
    })
}

fn load_table(cfg: &JobConfig) -> Result<Table> {
    let spec = cfg.data_spec()?;
    let mut t = data::load(&spec, cfg.seed)?;
    if let Some(m) = cfg.max_rows {
        if m < t.n {
            let mut idx: Vec<usize> = (0..t.n).collect();
            idx.shuffle(&mut ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5AB5));
            idx.truncate(m);
            idx.sort_unstable();
            let all: Vec<usize> = (0..t.d).collect();
            let x = t.gather(&idx, &all);
            t.y = idx.iter().map(|&i| t.y[i]).collect();
            t.x = x;
            t.n = m;
        }
    }
    Ok(t)
}

/// The cut layer the job asks for; Gaussian DP is calibrated to the target mu with the CLT
/// accountant over the run's steps.
pub fn cut_layer(cfg: &JobConfig, n_train: usize) -> Arc<dyn CutLayer> {
    match &cfg.dp {
        None => Arc::new(Identity),
        Some(d) => {
            let steps = cfg.epochs * n_train.div_ceil(cfg.batch);
            let q = cfg.batch as f64 / n_train as f64;
            Arc::new(GaussianDp {
                clip: d.clip,
                sigma: dp::sigma_for_mu(d.mu, q.min(1.0), steps),
            })
        }
    }
}

fn transport_for(cfg: &JobConfig) -> Arc<dyn Transport> {
    let base: Arc<dyn Transport> = Arc::new(InProcHandle(InProc::new(cfg.buffers)));
    let f = &cfg.faults;
    let mut t = base;
    if f.drop_embeddings > 0.0 {
        t = Arc::new(Faulty::new(
            t,
            "emb",
            f.drop_embeddings,
            Duration::ZERO,
            cfg.seed,
        ));
    }
    if f.delay_gradients_ms > 0 {
        t = Arc::new(Faulty::new(
            t,
            "grad",
            0.0,
            Duration::from_millis(f.delay_gradients_ms),
            cfg.seed,
        ));
    }
    t
}

/// The progress of a run's batches (drawn only where `cfg.progress` and the binary's
/// `progress` feature say so).
pub fn progress(cfg: &JobConfig, steps: u64) -> Progress {
    Progress::maybe(!cfg.progress, steps, cfg.mode.name())
}

/// Train with both parties in this process over the in-process transport.
pub fn train_inproc(cfg: &JobConfig) -> Result<TrainReport> {
    cfg.validate()?;
    let (da, dpas) = prepare(cfg)?;
    let dpas = PartyData {
        train_y: vec![0.0; dpas.n_train],
        test_y: vec![0.0; dpas.n_test],
        ..dpas
    };
    let t = transport_for(cfg);
    let cut = cut_layer(cfg, dpas.n_train);
    let meter = CpuMeter::start(cfg.cores());
    let nb = Batches::new(dpas.n_train, cfg.batch, cfg.seed).count();
    let pb = progress(cfg, (cfg.epochs * nb) as u64);
    let (active, passive, (wall, _, util)) = std::thread::scope(|s| {
        let ta = t.clone();
        let (cfg_a, da) = (cfg, &da);
        let h = s.spawn(move || party::run_active(cfg_a, da, ta));
        let p = party::run_passive(cfg, &dpas, t.clone(), cut.clone(), &pb);
        // The run ends when the passive party holds the active party's report; the active
        // thread's remaining work is resending that report (for lossy transports).
        let m = meter.read();
        let a = h
            .join()
            .unwrap_or_else(|_| Err(VflError::Training("active party panicked".into())));
        (a, p, m)
    });
    pb.finish();
    let active = active?;
    let passive = passive?;
    let mut r = report(cfg, &passive, Some(&active), &*cut, dpas.n_train);
    r.wall_s = wall;
    r.cpu_util = util;
    r.wait_s = passive.wait_s + active.wait_s;
    r.rejected_messages = passive.rejected + active.rejected;
    Ok(r)
}

/// Merge the parties' numbers into one report (from the passive party's point of view for
/// timing and traffic; metrics from the active party).
pub fn report(
    cfg: &JobConfig,
    p: &PassiveSummary,
    a: Option<&ActiveSummary>,
    cut: &dyn CutLayer,
    n_train: usize,
) -> TrainReport {
    let (wa, wp) = cfg.workers();
    let mut per_epoch: Vec<EpochReport> = p
        .per_epoch
        .iter()
        .map(|e| EpochReport {
            epoch: e.epoch,
            wall_s: e.wall_s,
            cpu_util: e.cpu_util,
            wait_s: e.wait_s,
            bytes_to_active: e.bytes_sent,
            bytes_to_passive: e.bytes_received,
            batches: e.batches,
            dropped: e.dropped,
            reassigned: e.reassigned,
            ..Default::default()
        })
        .collect();
    let mut last = None;
    if let Some(a) = a {
        for ev in &a.per_epoch {
            if let Some(e) = per_epoch.iter_mut().find(|e| e.epoch == ev.epoch) {
                e.auc = ev.auc;
                e.accuracy = ev.accuracy;
                e.rmse = ev.rmse;
                e.train_loss = ev.train_loss;
            }
            if ev.epoch + 1 == cfg.epochs {
                last = Some(ev.clone());
            }
        }
    }
    let spent = cut.privacy(
        cfg.batch,
        n_train,
        cfg.epochs * n_train.div_ceil(cfg.batch),
        cfg.epochs,
    );
    TrainReport {
        mode: cfg.mode.to_string(),
        data: cfg.data.clone(),
        auc: last.as_ref().and_then(|e| e.auc),
        accuracy: last.as_ref().and_then(|e| e.accuracy),
        rmse: last.as_ref().and_then(|e| e.rmse),
        wall_s: p.wall_s,
        cpu_util: p.cpu_util,
        cores: cfg.cores(),
        wait_s: p.wait_s + a.map(|a| a.wait_s).unwrap_or(0.0),
        bytes: p.bytes_sent + p.bytes_received,
        bytes_to_active: p.bytes_sent,
        bytes_to_passive: p.bytes_received,
        workers_active: wa,
        workers_passive: wp,
        batch: cfg.batch,
        epochs: cfg.epochs,
        rejected_messages: p.rejected + a.map(|a| a.rejected).unwrap_or(0),
        dp_mu: spent.map(|s| s.mu_clt),
        dp_sigma: spent.map(|s| s.sigma),
        time_to_target_s: None,
        wall_s_runs: Vec::new(),
        per_epoch,
    }
}

/// One party of the job in this process, talking to the other through the NATS broker at
/// `broker`: the passive party returns the merged report (with the active party's numbers when
/// they arrived), the active party its own.
pub fn run_party(cfg: &JobConfig, role: Role, broker: &str) -> Result<TrainReport> {
    cfg.validate()?;
    let data = prepare_role(cfg, role)?;
    let t: Arc<dyn Transport> = Arc::new(Nats::connect(broker, &cfg.job, cfg.buffers)?);
    Ok(match role {
        Role::Passive => {
            let cut = cut_layer(cfg, data.n_train);
            let nb = data.n_train.div_ceil(cfg.batch);
            let pb = progress(cfg, (cfg.epochs * nb) as u64);
            let p = party::run_passive(cfg, &data, t, cut.clone(), &pb)?;
            pb.finish();
            report(cfg, &p, p.active.as_ref(), &*cut, data.n_train)
        }
        Role::Active => active_report(cfg, &party::run_active(cfg, &data, t)?),
    })
}

/// The active party's own report (metrics of the last epoch, its timing and traffic).
pub fn active_report(cfg: &JobConfig, a: &ActiveSummary) -> TrainReport {
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
            .map(|e| EpochReport {
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

/// The centralised baseline: one model on the joined features (a bottom MLP of the same depth on
/// all columns, then the 2-layer top), same optimiser, batches and epochs, on one compute thread
/// like each worker of the split runs. Returns the report.
pub fn train_centralised(cfg: &JobConfig) -> Result<TrainReport> {
    threads::one_thread(|| centralised(cfg))
}

fn centralised(cfg: &JobConfig) -> Result<TrainReport> {
    let (a, p) = prepare(cfg)?;
    let d = a.d + p.d;
    let join = |xa: &[f32], xp: &[f32], n: usize| {
        let mut out = Vec::with_capacity(n * d);
        for i in 0..n {
            out.extend_from_slice(&xa[i * a.d..(i + 1) * a.d]);
            out.extend_from_slice(&xp[i * p.d..(i + 1) * p.d]);
        }
        out
    };
    let train_x = join(&a.train_x, &p.train_x, a.n_train);
    let test_x = join(&a.test_x, &p.test_x, a.n_test);
    let m = &cfg.model;
    let bottom = Mlp::new(d, m.hidden, 2 * m.emb, m.bottom_depth, cfg.seed ^ 0xC)?;
    let top = Mlp::new(2 * m.emb, m.top_hidden, 1, 2, cfg.seed ^ 0x7)?;
    let mut vars = bottom.vars();
    vars.extend(top.vars());
    let mut opt = Adam::new(&vars, m.lr)?;
    let batches = Batches::new(a.n_train, cfg.batch, cfg.seed);
    let meter = CpuMeter::start(cfg.cores());
    let mut per_epoch = Vec::new();
    let mut last = (None, None, None);
    for epoch in 0..cfg.epochs {
        let em = CpuMeter::start(cfg.cores());
        let mut loss_sum = 0.0;
        for b in 0..batches.count() as u64 {
            let rows = batches.rows(epoch as u32, b).unwrap_or_default();
            let n = rows.len();
            let mut x = Vec::with_capacity(n * d);
            for &i in &rows {
                x.extend_from_slice(&train_x[i * d..(i + 1) * d]);
            }
            let x = model::tensor2(x, n, d)?;
            let y = model::tensor1(a.labels(&rows))?;
            let out = top.forward(&bottom.forward(&x)?)?;
            let l = model::loss(&out, &y, a.task)?;
            loss_sum += l.to_scalar::<f32>()? as f64;
            let g = model::grads_of(&l.backward()?, &vars)?;
            opt.step(&vars, &g)?;
        }
        let x = model::tensor2(test_x.clone(), a.n_test, d)?;
        let out: Vec<f32> = top
            .forward(&bottom.forward(&x)?)?
            .flatten_all()?
            .to_vec1()?;
        last = metrics::evaluate(&out, &a.test_y, a.task);
        let (wall, _, util) = em.read();
        per_epoch.push(EpochReport {
            epoch,
            auc: last.0,
            accuracy: last.1,
            rmse: last.2,
            train_loss: loss_sum / batches.count() as f64,
            wall_s: wall,
            cpu_util: util,
            batches: batches.count() as u64,
            ..Default::default()
        });
    }
    let (wall, _, util) = meter.read();
    Ok(TrainReport {
        mode: "centralised".into(),
        data: cfg.data.clone(),
        auc: last.0,
        accuracy: last.1,
        rmse: last.2,
        wall_s: wall,
        cpu_util: util,
        cores: cfg.cores(),
        workers_active: 1,
        workers_passive: 0,
        batch: cfg.batch,
        epochs: cfg.epochs,
        per_epoch,
        ..Default::default()
    })
}
