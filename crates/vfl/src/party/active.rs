//! The active party (labels, its own bottom model and the top model).
//!
//! Its workers take embeddings from their topic, validate them, compute
//! `y^ = g(f_a(x_a), z_p)` and the loss, publish `dL/dz_p` on `grad.<b>` and push their update
//! to the party's parameter server. The control loop answers the passive party's handshake,
//! evaluates the test split's embeddings at the end of each epoch, and stops at `Done`.
use super::batches::Batches;
use super::wire::{
    decode, embedding_topic, lock, publish, Counters, EVAL_CHUNK, TOPIC_CTRL_ACTIVE,
    TOPIC_CTRL_PASSIVE,
};
use crate::budget::ComputeBudget;
use crate::config::JobConfig;
use crate::data::PartyData;
use crate::error::{Result, VflError};
use crate::message::{Envelope, Kind};
use crate::metrics::{self, CpuMeter};
use crate::model::{self, ActiveModel};
use crate::ps::ParamServer;
use crate::threads;
use crate::transport::{Subscription, Transport};
use candle_core::Var;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, error, info};

/// What the active party reports at the end (also sent to the passive party as JSON).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ActiveSummary {
    pub per_epoch: Vec<EvalResult>,
    pub wait_s: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub rejected: u64,
    pub batches: u64,
    pub wall_s: f64,
    pub cpu_util: f64,
}

/// One epoch's evaluation on the test split.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EvalResult {
    pub epoch: usize,
    pub rows: usize,
    pub train_loss: f64,
    pub auc: Option<f64>,
    pub accuracy: Option<f64>,
    pub rmse: Option<f64>,
}

/// State the active party's control loop and its workers share.
struct ActiveShared<'a> {
    cfg: &'a JobConfig,
    data: &'a PartyData,
    t: &'a dyn Transport,
    ps: ParamServer,
    batches: Batches,
    counters: Counters,
    /// Set when the passive party says `Done`; workers see it within 10 ms.
    stop: AtomicBool,
    /// epoch -> (sum of batch losses, batches)
    losses: Mutex<HashMap<usize, (f64, usize)>>,
    /// Last message from the passive party (the control loop gives up after a long silence).
    last_activity: Mutex<Instant>,
    /// This party's simulated machine.
    budget: ComputeBudget,
}

/// Run the active party until the passive party says it is done.
pub fn run_active(
    cfg: &JobConfig,
    data: &PartyData,
    t: Arc<dyn Transport>,
) -> Result<ActiveSummary> {
    let meter = CpuMeter::start(cfg.cores());
    let (wa, _) = cfg.workers();
    let model = ActiveModel::new(data.d, &cfg.model, cfg.seed)?;
    let sh = ActiveShared {
        cfg,
        data,
        t: &*t,
        ps: ParamServer::new(&model.vars(), cfg.model.lr, cfg.ps_sync())?,
        batches: Batches::new(data.n_train, cfg.batch, cfg.seed),
        counters: Counters::default(),
        stop: AtomicBool::new(false),
        losses: Mutex::new(HashMap::new()),
        last_activity: Mutex::new(Instant::now()),
        budget: ComputeBudget::new(cfg.machine_active),
    };
    let mut ctrl = t.subscribe(TOPIC_CTRL_ACTIVE)?;
    let subs = (0..wa)
        .map(|i| t.subscribe(&embedding_topic(cfg.fixed_pairs(), i)))
        .collect::<Result<Vec<_>>>()?;
    let per_epoch = std::thread::scope(|s| -> Result<Vec<EvalResult>> {
        let mut handles = Vec::new();
        for (i, sub) in subs.into_iter().enumerate() {
            let replica = ActiveModel::new(data.d, &cfg.model, cfg.seed)?;
            let sh = &sh;
            handles.push(s.spawn(move || threads::one_thread(|| sh.worker(i, sub, &replica))));
        }
        // the control loop's evaluation runs on one thread too, like the workers
        let result = threads::one_thread(|| sh.control_loop(&mut *ctrl, &model));
        sh.stop.store(true, Ordering::Relaxed);
        for h in handles {
            match h.join() {
                Ok(r) => r?,
                Err(_) => return Err(VflError::Training("an active worker panicked".into())),
            }
        }
        result
    })?;
    let (wall, _, util) = meter.read();
    let c = &sh.counters;
    let summary = ActiveSummary {
        per_epoch,
        wait_s: c.wait_s(),
        bytes_sent: c.sent.load(Ordering::Relaxed),
        bytes_received: c.received.load(Ordering::Relaxed),
        rejected: c.rejected.load(Ordering::Relaxed),
        batches: c.batches.load(Ordering::Relaxed),
        wall_s: wall,
        cpu_util: util,
    };
    sh.send_report(&summary)?;
    Ok(summary)
}

impl ActiveShared<'_> {
    /// Handshake, evaluation and end: runs until the passive party's `Done` (or a long silence).
    fn control_loop(
        &self,
        ctrl: &mut dyn Subscription,
        model: &ActiveModel,
    ) -> Result<Vec<EvalResult>> {
        let job = &self.cfg.job;
        let idle_limit = Duration::from_secs_f64((self.cfg.deadline_s * 6.0).max(60.0));
        let mut per_epoch = Vec::new();
        let mut got_any = false;
        let mut last_ready = Instant::now() - Duration::from_secs(1);
        // chunk id -> model outputs of the chunk's test rows
        let mut eval: HashMap<u64, Vec<f32>> = HashMap::new();
        loop {
            if !got_any && last_ready.elapsed() > Duration::from_millis(20) {
                let ready = Envelope::control(Kind::Ready, job, 0, 0, "");
                publish(self.t, &self.counters, TOPIC_CTRL_PASSIVE, &ready)?;
                last_ready = Instant::now();
            }
            if lock(&self.last_activity).elapsed() > idle_limit {
                return Err(VflError::Training(format!(
                    "no message from the passive party for {} s",
                    idle_limit.as_secs()
                )));
            }
            let Some(bytes) = ctrl.recv_timeout(Duration::from_millis(50))? else {
                continue;
            };
            let Some(m) = decode(&self.counters, &bytes, job) else {
                continue;
            };
            got_any = true;
            *lock(&self.last_activity) = Instant::now();
            match m.kind {
                Kind::Eval => self.evaluate_chunk(&m, model, &mut eval)?,
                Kind::EpochEnd => per_epoch.push(self.close_epoch(m.epoch as usize, &mut eval)),
                Kind::Dropped => {
                    debug!(
                        batch = m.batch,
                        "peer dropped a batch attempt at its deadline"
                    );
                }
                Kind::Done => return Ok(per_epoch),
                other => {
                    error!(kind = ?other, "rejected control message of an unexpected kind");
                    self.counters.reject();
                }
            }
        }
    }

    /// One chunk of the test split's embeddings: the model's outputs under the master
    /// parameters, kept until the epoch closes. An unknown chunk id or a malformed tensor is
    /// rejected (counted), not fatal.
    fn evaluate_chunk(
        &self,
        m: &Envelope,
        model: &ActiveModel,
        eval: &mut HashMap<u64, Vec<f32>>,
    ) -> Result<()> {
        let (data, emb) = (self.data, self.cfg.model.emb);
        let start = usize::try_from(m.batch)
            .ok()
            .and_then(|b| b.checked_mul(EVAL_CHUNK))
            .unwrap_or(usize::MAX);
        let rows = EVAL_CHUNK.min(data.n_test.saturating_sub(start));
        if rows == 0 {
            error!(chunk = m.batch, "rejected eval chunk: unknown chunk id");
            self.counters.reject();
            return Ok(());
        }
        match m.validated_tensor(&self.cfg.job, Kind::Eval, rows, emb) {
            Ok(zp) => {
                let xa = data.test_x[start * data.d..(start + rows) * data.d].to_vec();
                self.ps.pull(&model.vars())?;
                let out = model.forward(
                    &model::tensor2(xa, rows, data.d)?,
                    &model::tensor2(zp, rows, emb)?,
                )?;
                eval.insert(m.batch, out.flatten_all()?.to_vec1()?);
            }
            Err(e) => {
                error!("{e}");
                self.counters.reject();
            }
        }
        Ok(())
    }

    /// The epoch's metrics over the chunks received (in chunk order) and its mean training loss.
    fn close_epoch(&self, epoch: usize, eval: &mut HashMap<u64, Vec<f32>>) -> EvalResult {
        let mut out = Vec::new();
        let mut ys = Vec::new();
        let mut keys: Vec<u64> = eval.keys().copied().collect();
        keys.sort_unstable();
        for k in keys {
            let start = k as usize * EVAL_CHUNK;
            let o = &eval[&k];
            out.extend_from_slice(o);
            ys.extend_from_slice(&self.data.test_y[start..start + o.len()]);
        }
        eval.clear();
        let (auc, accuracy, rmse) = metrics::evaluate(&out, &ys, self.data.task);
        let (ls, ln) = lock(&self.losses).get(&epoch).copied().unwrap_or((0.0, 0));
        let r = EvalResult {
            epoch,
            rows: out.len(),
            train_loss: if ln > 0 { ls / ln as f64 } else { f64::NAN },
            auc,
            accuracy,
            rmse,
        };
        info!(epoch, rows = r.rows, auc = ?r.auc, rmse = ?r.rmse, loss = r.train_loss, "epoch evaluated");
        r
    }

    /// Tells the passive party the summary (a few times: the report is small and may race a
    /// reconnect).
    fn send_report(&self, summary: &ActiveSummary) -> Result<()> {
        let json = serde_json::to_string(summary)?;
        let m = Envelope::control(Kind::Report, &self.cfg.job, 0, 0, &json);
        for _ in 0..3 {
            publish(self.t, &self.counters, TOPIC_CTRL_PASSIVE, &m)?;
            let _ = self.t.flush();
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// An active worker: embedding in, loss and `dL/dz_p` out, update to the parameter server.
    fn worker(
        &self,
        wid: usize,
        mut sub: Box<dyn Subscription>,
        model: &ActiveModel,
    ) -> Result<()> {
        let (cfg, c) = (self.cfg, &self.counters);
        let vars = model.vars();
        let mut sync = self.ps.worker();
        self.ps.refresh(&mut sync, &vars)?;
        let (wa, _) = cfg.workers();
        let mut step = 0usize;
        while !self.stop.load(Ordering::Relaxed) {
            let t0 = Instant::now();
            // short timeout: the stop flag is seen within 10 ms of the passive party's `Done`
            let got = sub.recv_timeout(Duration::from_millis(10))?;
            c.wait(t0);
            let Some(bytes) = got else { continue };
            let Some(m) = decode(c, &bytes, &cfg.job) else {
                continue;
            };
            let Some((rows, zp)) = self.validated_embedding(&m) else {
                continue;
            };
            *lock(&self.last_activity) = Instant::now();
            step += 1;
            let epoch = m.epoch as usize;
            let (lv, dz, grads) = self.train_step(model, &vars, &rows, zp)?;
            let n = rows.len();
            let reply = Envelope::tensor(
                Kind::Gradient,
                &cfg.job,
                m.epoch,
                m.batch,
                m.seq,
                n,
                cfg.model.emb,
                &dz,
            );
            publish(self.t, c, &format!("grad.{}", m.batch), &reply)?;
            let round = self.batches.round_size(m.batch, wa);
            self.ps.step(&mut sync, &vars, grads, round, epoch)?;
            c.batches.fetch_add(1, Ordering::Relaxed);
            let mut ls = lock(&self.losses);
            let e = ls.entry(epoch).or_insert((0.0, 0));
            e.0 += lv;
            e.1 += 1;
        }
        debug!(worker = wid, steps = step, "active worker stops");
        Ok(())
    }

    /// The batch rows and the embedding of a message, or `None` (logged and counted) when it is
    /// not an embedding of this job's epochs, names an unknown batch, or has the wrong shape.
    fn validated_embedding(&self, m: &Envelope) -> Option<(Vec<usize>, Vec<f32>)> {
        let c = &self.counters;
        if m.kind != Kind::Embedding || m.epoch as usize >= self.cfg.epochs {
            error!(kind = ?m.kind, epoch = m.epoch, "rejected: not an embedding of this job's epochs");
            c.reject();
            return None;
        }
        let Some(rows) = self.batches.rows(m.epoch, m.batch) else {
            error!(batch = m.batch, "rejected embedding: unknown batch id");
            c.reject();
            return None;
        };
        match m.validated_tensor(
            &self.cfg.job,
            Kind::Embedding,
            rows.len(),
            self.cfg.model.emb,
        ) {
            Ok(z) => Some((rows, z)),
            Err(e) => {
                error!("{e}");
                c.reject();
                None
            }
        }
    }

    /// Forward, loss and backward of one batch on the party's machine: (loss, `dL/dz_p` as
    /// `[n, emb]` row-major, gradients of `vars`).
    fn train_step(
        &self,
        model: &ActiveModel,
        vars: &[Var],
        rows: &[usize],
        zp: Vec<f32>,
    ) -> Result<(f64, Vec<f32>, Vec<candle_core::Tensor>)> {
        let (data, emb, n) = (self.data, self.cfg.model.emb, rows.len());
        let xa = model::tensor2(data.rows(rows), n, data.d)?;
        let y = model::tensor1(data.labels(rows))?;
        let zpv = Var::from_tensor(&model::tensor2(zp, n, emb)?)?;
        let (computed, waited) = self.budget.run(|| -> Result<_> {
            let out = model.forward(&xa, zpv.as_tensor())?;
            let l = model::loss(&out, &y, data.task)?;
            Ok((l.to_scalar::<f32>()? as f64, l.backward()?))
        });
        self.counters.add_wait(waited);
        let (lv, store) = computed?;
        let dz: Vec<f32> = match store.get(zpv.as_tensor()) {
            Some(g) => g.flatten_all()?.to_vec1()?,
            None => vec![0.0; n * emb],
        };
        Ok((lv, dz, model::grads_of(&store, vars)?))
    }
}
