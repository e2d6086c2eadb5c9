//! Hyperparameter choice from system profiles (PubSub-VFL, "hyperparameter optimisation").
//!
//! Each party's per-batch compute time (forward + backward of its part) is profiled on this
//! machine at a few batch sizes and fitted as a power law `T(B) = lambda * B^gamma` (least squares
//! in log space). With `w` workers sharing `c` cores a worker runs at `min(1, c/w)` of a core, so a
//! party processes a batch every `T(B) * max(1, w/c) / w` seconds. The cores are shared in
//! proportion to the worker counts. Communication per batch is `bytes(B) / bandwidth` with the
//! bandwidth of the transport measured too. The epoch time
//! `ceil(n/B) * (max(T_active, T_passive) + T_comm)` is minimised by exhaustive search over
//! `w_a, w_p in 1..=2C` and the profiled `B <= B_max`. The chosen setting is then run for one
//! epoch and the measured time printed next to the prediction, together with the default
//! setting (`w_a = w_p = 2`, `B = 256`) measured the same way.
//!
//! Heterogeneous parties (simulated with [`crate::budget`]): a party with its own machine of
//! `c_x` cores that is `s_x` times slower has per-batch time `s_x T_x(B) max(1, w_x/c_x) / w_x`
//! instead of a proportional share of the common cores.
use crate::budget::PartyMachine;
use crate::config::{JobConfig, Mode};
use crate::engine;
use crate::error::Result;
use crate::message::{Envelope, Kind};
use crate::model::{self, ActiveModel, Mlp};
use serde::{Deserialize, Serialize};
use std::time::Instant;

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct PowerLaw {
    pub lambda: f64,
    pub gamma: f64,
}

impl PowerLaw {
    /// Least-squares fit of `ln t = ln lambda + gamma ln B`.
    pub fn fit(points: &[(f64, f64)]) -> PowerLaw {
        let n = points.len() as f64;
        let (mut sx, mut sy, mut sxx, mut sxy) = (0.0, 0.0, 0.0, 0.0);
        for &(b, t) in points {
            let (x, y) = (b.ln(), t.max(1e-12).ln());
            sx += x;
            sy += y;
            sxx += x * x;
            sxy += x * y;
        }
        let den = n * sxx - sx * sx;
        let gamma = if den.abs() > 1e-12 {
            (n * sxy - sx * sy) / den
        } else {
            1.0
        };
        let lambda = ((sy - gamma * sx) / n).exp();
        PowerLaw { lambda, gamma }
    }
    pub fn eval(&self, b: f64) -> f64 {
        self.lambda * b.powf(self.gamma)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanReport {
    pub data: String,
    /// Per-batch parameter-server time (push + pull), serialised per party, seconds.
    pub ps_active_s: f64,
    pub ps_passive_s: f64,
    pub cores: usize,
    pub n_train: usize,
    pub active: PowerLaw,
    pub passive: PowerLaw,
    pub bandwidth_bytes_per_s: f64,
    pub workers_active: usize,
    pub workers_passive: usize,
    pub batch: usize,
    pub predicted_epoch_s: f64,
    pub measured_epoch_s: f64,
    /// Predicted epoch time of synchronous vfl (one worker each, no overlap) at the same B.
    pub predicted_vfl_epoch_s: f64,
    /// The default setting (w_a = w_p = 2, B = 256), predicted and measured in the same run.
    pub default_predicted_epoch_s: f64,
    pub default_measured_epoch_s: f64,
    /// Plan's measured speed-up over the default (default / plan epoch time).
    pub speedup_over_default: f64,
    pub machine_active: Option<PartyMachine>,
    pub machine_passive: Option<PartyMachine>,
}

impl PlanReport {
    pub fn human(&self) -> String {
        format!(
            "profile on {} cores: active T(B) = {:.3e} * B^{:.3}, passive T(B) = {:.3e} * B^{:.3}, PS step {:.2}/{:.2} ms, transport {:.0} MB/s\n\
             plan: w_a = {}, w_p = {}, B = {}\n\
             epoch time on {} training rows: predicted {:.2} s, measured {:.2} s (vfl at this B: predicted {:.2} s)\n\
             default (w_a = 2, w_p = 2, B = 256): predicted {:.2} s, measured {:.2} s; plan is {:.2}x faster{}",
            self.cores,
            self.active.lambda,
            self.active.gamma,
            self.passive.lambda,
            self.passive.gamma,
            1e3 * self.ps_active_s,
            1e3 * self.ps_passive_s,
            self.bandwidth_bytes_per_s / 1e6,
            self.workers_active,
            self.workers_passive,
            self.batch,
            self.n_train,
            self.predicted_epoch_s,
            self.measured_epoch_s,
            self.predicted_vfl_epoch_s,
            self.default_predicted_epoch_s,
            self.default_measured_epoch_s,
            self.speedup_over_default,
            machines_note(self.machine_active, self.machine_passive),
        )
    }
}

fn machines_note(a: Option<PartyMachine>, p: Option<PartyMachine>) -> String {
    let one = |m: Option<PartyMachine>| match m {
        Some(m) => format!("{} core(s) x{:.1} slower", m.cores, m.slowdown),
        None => "shared host".into(),
    };
    if a.is_none() && p.is_none() {
        String::new()
    } else {
        format!(
            "\nsimulated machines: active {}, passive {}",
            one(a),
            one(p)
        )
    }
}

/// Predicted epoch time of a setting; `ps` = per-batch parameter-server seconds (active, passive).
#[allow(clippy::too_many_arguments)]
pub fn epoch_time(
    a: &PowerLaw,
    p: &PowerLaw,
    ps: (f64, f64),
    bw: f64,
    emb: usize,
    n: usize,
    cores: usize,
    wa: usize,
    wp: usize,
    b: usize,
) -> f64 {
    epoch_time_on(a, p, ps, bw, emb, n, cores, (None, None), wa, wp, b)
}

/// [`epoch_time`] with optional per-party machines (cores, slowdown) instead of shared cores.
#[allow(clippy::too_many_arguments)]
pub fn epoch_time_on(
    a: &PowerLaw,
    p: &PowerLaw,
    ps: (f64, f64),
    bw: f64,
    emb: usize,
    n: usize,
    cores: usize,
    machines: (Option<PartyMachine>, Option<PartyMachine>),
    wa: usize,
    wp: usize,
    b: usize,
) -> f64 {
    let c = cores as f64;
    let (wa_f, wp_f) = (wa as f64, wp as f64);
    let (ca, sa) = match machines.0 {
        Some(m) => (m.cores as f64, m.slowdown),
        None => (c * wa_f / (wa_f + wp_f), 1.0),
    };
    let (cp, sp) = match machines.1 {
        Some(m) => (m.cores as f64, m.slowdown),
        None => (c * wp_f / (wa_f + wp_f), 1.0),
    };
    // compute spreads over the workers; the parameter-server step is serialised per party
    let ta = sa * a.eval(b as f64) * (wa_f / ca).max(1.0) / wa_f + ps.0;
    let tp = sp * p.eval(b as f64) * (wp_f / cp).max(1.0) / wp_f + ps.1;
    let comm = (2 * b * emb * 4) as f64 / bw;
    (n.div_ceil(b)) as f64 * (ta.max(tp) + comm)
}

fn time_it<F: FnMut() -> Result<()>>(reps: usize, mut f: F) -> Result<f64> {
    f()?; // warm-up
    let t = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    Ok(t.elapsed().as_secs_f64() / reps as f64)
}

/// Profile, fit, search, measure.
pub fn plan(
    data: &str,
    cores: Option<usize>,
    max_batch: usize,
    max_rows: usize,
) -> Result<PlanReport> {
    plan_on(data, cores, max_batch, max_rows, (None, None))
}

/// [`plan`] for parties on (simulated) machines of their own.
pub fn plan_on(
    data: &str,
    cores: Option<usize>,
    max_batch: usize,
    max_rows: usize,
    machines: (Option<PartyMachine>, Option<PartyMachine>),
) -> Result<PlanReport> {
    let mut cfg = JobConfig::new(data, Mode::PubSub);
    cfg.max_rows = Some(max_rows);
    cfg.epochs = 1;
    cfg.cores = cores;
    cfg.machine_active = machines.0;
    cfg.machine_passive = machines.1;
    cfg.validate()?;
    let cores = cfg.cores();
    let (da, dp) = engine::prepare(&cfg)?;
    let m = &cfg.model;
    let fa = ActiveModel::new(da.d, m, 1)?;
    let fp = Mlp::new(dp.d, m.hidden, m.emb, m.bottom_depth, 2)?;
    let sizes: Vec<usize> = [64usize, 128, 256, 512, 1024, 2048]
        .into_iter()
        .filter(|&b| b <= max_batch.max(32) && b <= da.n_train)
        .collect();
    let mut pa = Vec::new();
    let mut pp = Vec::new();
    for &b in &sizes {
        let rows: Vec<usize> = (0..b).collect();
        let reps = (4096 / b).clamp(3, 40);
        let xp = model::tensor2(dp.rows(&rows), b, dp.d)?;
        let tp = time_it(reps, || {
            let z = fp.forward(&xp)?;
            let _ = z.sum_all()?.backward()?;
            Ok(())
        })?;
        let xa = model::tensor2(da.rows(&rows), b, da.d)?;
        let y = model::tensor1(da.labels(&rows))?;
        let zp = candle_core::Var::from_tensor(&model::tensor2(vec![0.1; b * m.emb], b, m.emb)?)?;
        let ta = time_it(reps, || {
            let out = fa.forward(&xa, zp.as_tensor())?;
            let _ = model::loss(&out, &y, da.task)?.backward()?;
            Ok(())
        })?;
        pa.push((b as f64, ta));
        pp.push((b as f64, tp));
    }
    let a = PowerLaw::fit(&pa);
    let p = PowerLaw::fit(&pp);
    // parameter-server step + pull, per party
    let ps_time = |vars: Vec<candle_core::Var>| -> Result<f64> {
        let ps = crate::ps::ParamServer::new(&vars, 1e-3, crate::ps::Sync::Async)?;
        let grads: Vec<candle_core::Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        time_it(20, || {
            ps.push(grads.clone(), 1)?;
            ps.pull(&vars)
        })
    };
    let ps_a = ps_time(fa.vars())?;
    let ps_p = ps_time(fp.vars())?;
    // transport: encode + decode of an embedding message
    let probe = vec![0.5f32; 256 * m.emb];
    let t_msg = time_it(50, || {
        let e = Envelope::tensor(Kind::Embedding, "plan", 0, 0, 0, 256, m.emb, &probe).encode();
        let _ = Envelope::decode(&e)?;
        Ok(())
    })?;
    let bw = (256 * m.emb * 4) as f64 / t_msg.max(1e-9);
    let n = da.n_train;
    let mut best = (f64::INFINITY, 1, 1, sizes[0]);
    for wa in 1..=2 * cores {
        for wp in 1..=2 * cores {
            for &b in &sizes {
                let t = epoch_time_on(
                    &a,
                    &p,
                    (ps_a, ps_p),
                    bw,
                    m.emb,
                    n,
                    cores,
                    machines,
                    wa,
                    wp,
                    b,
                );
                if t < best.0 {
                    best = (t, wa, wp, b);
                }
            }
        }
    }
    let (pred, wa, wp, b) = best;
    let slow = |m: Option<PartyMachine>| m.map_or(1.0, |m| m.slowdown);
    let vfl = n.div_ceil(b) as f64
        * (slow(machines.0) * a.eval(b as f64)
            + slow(machines.1) * p.eval(b as f64)
            + (2 * b * m.emb * 4) as f64 / bw);
    // measure one epoch with the plan, and one with the default setting
    let default = JobConfig::new(data, Mode::PubSub);
    let (dwa, dwp, db) = (
        default.workers_active,
        default.workers_passive,
        default.batch.min(n),
    );
    let default_pred = epoch_time_on(
        &a,
        &p,
        (ps_a, ps_p),
        bw,
        m.emb,
        n,
        cores,
        machines,
        dwa,
        dwp,
        db,
    );
    let epoch_of = |wa: usize, wp: usize, b: usize| -> Result<f64> {
        let mut c = cfg.clone();
        c.workers_active = wa;
        c.workers_passive = wp;
        c.batch = b;
        let r = engine::train_inproc(&c)?;
        Ok(r.per_epoch.first().map(|e| e.wall_s).unwrap_or(r.wall_s))
    };
    let measured = epoch_of(wa, wp, b)?;
    let default_measured = epoch_of(dwa, dwp, db)?;
    Ok(PlanReport {
        data: data.to_string(),
        ps_active_s: ps_a,
        ps_passive_s: ps_p,
        cores,
        n_train: n,
        active: a,
        passive: p,
        bandwidth_bytes_per_s: bw,
        workers_active: wa,
        workers_passive: wp,
        batch: b,
        predicted_epoch_s: pred,
        measured_epoch_s: measured,
        predicted_vfl_epoch_s: vfl,
        default_predicted_epoch_s: default_pred,
        default_measured_epoch_s: default_measured,
        speedup_over_default: default_measured / measured.max(1e-9),
        machine_active: machines.0,
        machine_passive: machines.1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_law_fit_recovers_parameters() {
        let pts: Vec<(f64, f64)> = [32.0, 64.0, 128.0, 256.0]
            .iter()
            .map(|&b: &f64| (b, 2e-5 * b.powf(0.8)))
            .collect();
        let f = PowerLaw::fit(&pts);
        assert!((f.gamma - 0.8).abs() < 1e-9 && (f.lambda - 2e-5).abs() < 1e-12);
        // more workers than cores does not help; balanced workers beat one worker
        let one = epoch_time(&f, &f, (0.0, 0.0), 1e9, 32, 10000, 2, 1, 1, 256);
        let two = epoch_time(&f, &f, (0.0, 0.0), 1e9, 32, 10000, 2, 2, 2, 256);
        assert!(two <= one + 1e-12);
        // a fixed per-batch cost favours larger batches
        let small = epoch_time(&f, &f, (1e-3, 1e-3), 1e9, 32, 10000, 2, 2, 2, 32);
        let large = epoch_time(&f, &f, (1e-3, 1e-3), 1e9, 32, 10000, 2, 2, 2, 256);
        assert!(large < small);
    }
}
