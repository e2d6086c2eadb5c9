//! The passive party (features only: its bottom model and the cut layer).
//!
//! Per epoch, its workers take batch ids from a scheduler (a shared one in `pubsub`, one per
//! worker in the fixed-pair modes), compute `z_p = f_p(x_p)`, pass it through the cut layer,
//! subscribe to `grad.<b>` and publish the embedding; the gradient that comes back is validated
//! and back-propagated, the update goes to the party's parameter server. A batch whose gradient
//! misses the deadline is dropped, the peer is told, and the batch goes back to the scheduler
//! (any free worker picks it up); a batch leased by a worker that died comes back when its lease
//! expires. After each epoch the passive party publishes the test embeddings for evaluation.
//! The fixed-pair modes end every epoch with a barrier (all workers done, then the evaluation,
//! then the next epoch); `pubsub` has none: workers take the next epoch's batches once the
//! current epoch's queue is empty (at most one epoch ahead), and the main thread evaluates an
//! epoch when its last batch completes while the workers go on.
use super::active::ActiveSummary;
use super::batches::Batches;
use super::scheduler::{take_any, Lease, Scheduler, Take};
use super::wire::{
    decode, embedding_topic, publish, Counters, EVAL_CHUNK, TOPIC_CTRL_ACTIVE, TOPIC_CTRL_PASSIVE,
};
use crate::budget::ComputeBudget;
use crate::config::JobConfig;
use crate::cut::CutLayer;
use crate::data::PartyData;
use crate::error::{Result, VflError};
use crate::message::{Envelope, Kind};
use crate::metrics::CpuMeter;
use crate::model::{self, Mlp};
use crate::ps::{ParamServer, WorkerSync};
use crate::threads;
use crate::transport::{Subscription, Transport};
use candle_core::{Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};
use umbra_common::progress::Progress;

/// Per-epoch numbers of the passive party.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PassiveEpoch {
    pub epoch: usize,
    pub wall_s: f64,
    pub cpu_util: f64,
    pub wait_s: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub batches: u64,
    pub dropped: u64,
    pub reassigned: u64,
}

#[derive(Debug, Clone, Default)]
pub struct PassiveSummary {
    pub per_epoch: Vec<PassiveEpoch>,
    pub wall_s: f64,
    pub cpu_util: f64,
    pub wait_s: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub rejected: u64,
    pub steps: usize,
    /// The active party's report, when it arrived.
    pub active: Option<ActiveSummary>,
}

/// A batch published and waiting for its gradient.
struct Pending {
    epoch: usize,
    lease: Lease,
    seq: u64,
    sub: Box<dyn Subscription>,
    /// The published tensor, with the autograd graph back to the replica's parameters.
    out: Tensor,
    rows: usize,
    deadline: Instant,
    /// The cut layer's randomness for this batch (its backward may draw too).
    rng: ChaCha8Rng,
}

/// State the passive party's main thread and its workers share.
struct PassiveShared<'a> {
    cfg: &'a JobConfig,
    data: &'a PartyData,
    t: &'a dyn Transport,
    cut: &'a dyn CutLayer,
    /// The parameter server's parameters are pulled into this model for evaluation.
    master: Mlp,
    ps: ParamServer,
    batches: Batches,
    c: Counters,
    /// Attempt ids: unique per published batch (the gradient must echo it).
    seq: AtomicU64,
    progress: &'a Progress,
    /// This party's simulated machine.
    budget: ComputeBudget,
}

/// The counters at the start of an epoch's window.
#[derive(Debug, Clone, Copy)]
struct Snapshot {
    wait_ns: u64,
    sent: u64,
    received: u64,
    batches: u64,
    dropped: u64,
}

impl Snapshot {
    fn of(c: &Counters) -> Self {
        Snapshot {
            wait_ns: c.wait_ns.load(Ordering::Relaxed),
            sent: c.sent.load(Ordering::Relaxed),
            received: c.received.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
        }
    }
}

/// An epoch's measuring window: from its start to the moment it is closed.
struct EpochWindow {
    meter: CpuMeter,
    start: Snapshot,
}

impl EpochWindow {
    fn open(c: &Counters, cores: usize) -> Self {
        EpochWindow {
            meter: CpuMeter::start(cores),
            start: Snapshot::of(c),
        }
    }

    /// The epoch's numbers from the window's start to now, and the counters now: the next
    /// window starts exactly there, so that no batch completed between two snapshots falls
    /// between two windows.
    fn close(&self, epoch: usize, c: &Counters, reassigned: u64) -> (PassiveEpoch, Snapshot) {
        let (s0, s1) = (self.start, Snapshot::of(c));
        let (wall, _, util) = self.meter.read();
        let e = PassiveEpoch {
            epoch,
            wall_s: wall,
            cpu_util: util,
            wait_s: (s1.wait_ns - s0.wait_ns) as f64 * 1e-9,
            bytes_sent: s1.sent - s0.sent,
            bytes_received: s1.received - s0.received,
            batches: s1.batches - s0.batches,
            dropped: s1.dropped - s0.dropped,
            reassigned,
        };
        info!(
            epoch,
            wall_s = e.wall_s,
            cpu_util = e.cpu_util,
            wait_s = e.wait_s,
            "passive epoch done"
        );
        (e, s1)
    }
}

/// Each worker's model replica and its optimizer state at the parameter server (kept across
/// epochs).
struct Replicas {
    models: Vec<Mlp>,
    syncs: Vec<WorkerSync>,
}

/// Run the passive party: waits for the active party, trains `cfg.epochs` epochs, evaluates,
/// and returns its numbers (with the active party's report if it came back). `progress` counts
/// completed batches.
pub fn run_passive(
    cfg: &JobConfig,
    data: &PartyData,
    t: Arc<dyn Transport>,
    cut: Arc<dyn CutLayer>,
    progress: &Progress,
) -> Result<PassiveSummary> {
    let meter = CpuMeter::start(cfg.cores());
    let (_, wp) = cfg.workers();
    let bottom = || {
        let m = &cfg.model;
        Mlp::new(data.d, m.hidden, m.emb, m.bottom_depth, cfg.seed ^ 0xB)
    };
    let master = bottom()?;
    let ps = ParamServer::new(&master.vars(), cfg.model.lr, cfg.ps_sync())?;
    let sh = PassiveShared {
        cfg,
        data,
        t: &*t,
        cut: &*cut,
        master,
        ps,
        batches: Batches::new(data.n_train, cfg.batch, cfg.seed),
        c: Counters::default(),
        seq: AtomicU64::new(seq_base()),
        progress,
        budget: ComputeBudget::new(cfg.machine_passive),
    };
    let mut ctrl = t.subscribe(TOPIC_CTRL_PASSIVE)?;
    sh.wait_for_active(&mut *ctrl)?;
    info!(mode = %cfg.mode, workers = wp, batches = sh.batches.count(), "passive party starts");
    let mut replicas = Replicas {
        models: (0..wp).map(|_| bottom()).collect::<Result<_>>()?,
        syncs: (0..wp).map(|_| sh.ps.worker()).collect(),
    };
    let per_epoch = if cfg.fixed_pairs() {
        sh.train_fixed_pairs(&mut replicas)?
    } else {
        sh.train_pubsub(&mut replicas)?
    };
    let active = sh.await_report(&mut *ctrl)?;
    let (wall, _, util) = meter.read();
    Ok(PassiveSummary {
        per_epoch,
        wall_s: wall,
        cpu_util: util,
        wait_s: sh.c.wait_s(),
        bytes_sent: sh.c.sent.load(Ordering::Relaxed),
        bytes_received: sh.c.received.load(Ordering::Relaxed),
        rejected: sh.c.rejected.load(Ordering::Relaxed),
        steps: cfg.epochs * sh.batches.count(),
        active,
    })
}

/// First attempt id of this run: the clock in the high bits, so that two runs of the same job
/// (a restarted party) never reuse an id.
fn seq_base() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        << 8
}

fn join_workers(hs: Vec<std::thread::ScopedJoinHandle<'_, Result<()>>>) -> Result<()> {
    for h in hs {
        match h.join() {
            Ok(r) => r?,
            Err(_) => return Err(VflError::Training("a passive worker panicked".into())),
        }
    }
    Ok(())
}

impl PassiveShared<'_> {
    /// Handshake: the active party announces it is subscribed (at most 60 s).
    fn wait_for_active(&self, ctrl: &mut dyn Subscription) -> Result<()> {
        let t0 = Instant::now();
        loop {
            if t0.elapsed() > Duration::from_secs(60) {
                return Err(VflError::Training(
                    "the active party did not show up within 60 s".into(),
                ));
            }
            if let Some(b) = ctrl.recv_timeout(Duration::from_millis(100))? {
                if decode(&self.c, &b, &self.cfg.job).is_some_and(|m| m.kind == Kind::Ready) {
                    break;
                }
            }
        }
        self.c.wait(t0);
        Ok(())
    }

    /// The baselines: worker `i` owns batches `i, i + w, ...` of an epoch; every epoch ends with
    /// all workers done, then the evaluation, before the next one starts.
    fn train_fixed_pairs(&self, reps: &mut Replicas) -> Result<Vec<PassiveEpoch>> {
        let cfg = self.cfg;
        let (_, wp) = cfg.workers();
        let nb = self.batches.count() as u64;
        let mut per_epoch = Vec::new();
        for epoch in 0..cfg.epochs {
            let window = EpochWindow::open(&self.c, cfg.cores());
            let scheds: Vec<Scheduler> = (0..wp)
                .map(|i| Scheduler::new((i as u64..nb).step_by(wp), self.lease()))
                .collect();
            std::thread::scope(|s| -> Result<()> {
                let mut hs = Vec::new();
                for (i, (replica, sync)) in
                    reps.models.iter().zip(reps.syncs.iter_mut()).enumerate()
                {
                    let sched = std::slice::from_ref(&scheds[i]);
                    hs.push(s.spawn(move || {
                        threads::one_thread(|| self.worker(i, epoch, sched, replica, sync))
                    }));
                }
                join_workers(hs)
            })?;
            // a worker that died leaves its batches leased: finish them with the survivors
            let reassigned: u64 = scheds.iter().map(|s| s.reassigned()).sum();
            self.evaluate_epoch(epoch)?;
            per_epoch.push(window.close(epoch, &self.c, reassigned).0);
        }
        Ok(per_epoch)
    }

    /// PubSub-VFL: one shared batch-id queue per epoch and no barrier between epochs. A worker
    /// takes the next epoch's batches as soon as the current epoch's queue is empty (its last
    /// batches still in flight), and the epoch is evaluated when its last batch completes,
    /// while the workers go on (the master then may hold a few of the next epoch's updates).
    fn train_pubsub(&self, reps: &mut Replicas) -> Result<Vec<PassiveEpoch>> {
        let cfg = self.cfg;
        let nb = self.batches.count() as u64;
        let scheds: Vec<Scheduler> = (0..cfg.epochs)
            .map(|_| Scheduler::new(0..nb, self.lease()))
            .collect();
        let mut per_epoch = Vec::new();
        std::thread::scope(|s| -> Result<()> {
            let mut hs = Vec::new();
            for (i, (replica, sync)) in reps.models.iter().zip(reps.syncs.iter_mut()).enumerate() {
                let scheds = &scheds[..];
                hs.push(s.spawn(move || {
                    threads::one_thread(|| self.worker(i, 0, scheds, replica, sync))
                }));
            }
            let closed = self.close_epochs_as_they_finish(&scheds, &hs, &mut per_epoch);
            join_workers(hs)?;
            closed?;
            if per_epoch.len() < cfg.epochs {
                return Err(VflError::Training(
                    "the passive workers stopped before the last epoch finished".into(),
                ));
            }
            Ok(())
        })?;
        Ok(per_epoch)
    }

    /// PubSub-VFL's main thread: epoch windows are back to back, each ends the moment its last
    /// batch completes (its evaluation then overlaps the next epoch, and counts there). Returns
    /// early when every worker has stopped (the caller's join reports why).
    fn close_epochs_as_they_finish(
        &self,
        scheds: &[Scheduler],
        workers: &[std::thread::ScopedJoinHandle<'_, Result<()>>],
        per_epoch: &mut Vec<PassiveEpoch>,
    ) -> Result<()> {
        let mut window = EpochWindow::open(&self.c, self.cfg.cores());
        for (epoch, sched) in scheds.iter().enumerate() {
            while !sched.finished() && !workers.iter().all(|h| h.is_finished()) {
                std::thread::sleep(Duration::from_millis(1));
            }
            if !sched.finished() {
                return Ok(());
            }
            let (e, end) = window.close(epoch, &self.c, sched.reassigned());
            per_epoch.push(e);
            window = EpochWindow {
                meter: CpuMeter::start(self.cfg.cores()),
                start: end,
            };
            threads::one_thread(|| self.evaluate_epoch(epoch))?;
        }
        Ok(())
    }

    /// How long a worker may hold a batch before it is handed out again.
    fn lease(&self) -> Duration {
        Duration::from_secs_f64(self.cfg.deadline_s * 1.5 + 0.5)
    }

    /// Done: tells the active party (every 2 s) until its report arrives or `3 x deadline`
    /// (at least 15 s) passes.
    fn await_report(&self, ctrl: &mut dyn Subscription) -> Result<Option<ActiveSummary>> {
        let cfg = self.cfg;
        let t_end = Instant::now();
        let mut last_done = Instant::now() - Duration::from_secs(10);
        while t_end.elapsed() < Duration::from_secs_f64(cfg.deadline_s.max(5.0) * 3.0) {
            if last_done.elapsed() > Duration::from_secs(2) {
                let done = Envelope::control(Kind::Done, &cfg.job, 0, 0, "");
                publish(self.t, &self.c, TOPIC_CTRL_ACTIVE, &done)?;
                let _ = self.t.flush();
                last_done = Instant::now();
            }
            let Some(b) = ctrl.recv_timeout(Duration::from_millis(100))? else {
                continue;
            };
            let Some(m) = decode(&self.c, &b, &cfg.job) else {
                continue;
            };
            match m.kind {
                Kind::Report => match serde_json::from_slice::<ActiveSummary>(&m.payload) {
                    Ok(s) => return Ok(Some(s)),
                    Err(e) => {
                        error!("rejected report: {e}");
                        self.c.reject();
                    }
                },
                Kind::Ready => {}
                other => debug!(kind = ?other, "ignored control message"),
            }
        }
        warn!("the active party's report did not arrive");
        Ok(None)
    }

    /// End of an epoch: the test split's embeddings under the current master, then `EpochEnd`.
    fn evaluate_epoch(&self, epoch: usize) -> Result<()> {
        let (cfg, data) = (self.cfg, self.data);
        self.ps.pull(&self.master.vars())?;
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0xE7A1 ^ ((epoch as u64) << 20));
        let chunks = data.n_test.div_ceil(EVAL_CHUNK);
        for c in 0..chunks {
            let start = c * EVAL_CHUNK;
            let rows = EVAL_CHUNK.min(data.n_test - start);
            let x = model::tensor2(
                data.test_x[start * data.d..(start + rows) * data.d].to_vec(),
                rows,
                data.d,
            )?;
            let z = self.cut.forward(&self.master.forward(&x)?, &mut rng)?;
            let z: Vec<f32> = z.flatten_all()?.to_vec1()?;
            let (e, b) = (epoch as u32, c as u64);
            let m = Envelope::tensor(Kind::Eval, &cfg.job, e, b, 0, rows, cfg.model.emb, &z);
            publish(self.t, &self.c, TOPIC_CTRL_ACTIVE, &m)?;
        }
        let end = Envelope::control(Kind::EpochEnd, &cfg.job, epoch as u32, chunks as u64, "");
        publish(self.t, &self.c, TOPIC_CTRL_ACTIVE, &end)
    }

    /// A passive worker: takes batches from `scheds` (epoch `first + k` from `scheds[k]`, see
    /// [`take_any`]), keeps up to `inflight` of them waiting for their gradient, and trains each
    /// when its gradient arrives.
    fn worker(
        &self,
        wid: usize,
        first: usize,
        scheds: &[Scheduler],
        replica: &Mlp,
        sync: &mut WorkerSync,
    ) -> Result<()> {
        let cfg = self.cfg;
        let vars = replica.vars();
        self.ps.refresh(sync, &vars)?;
        let topic = embedding_topic(cfg.fixed_pairs(), wid);
        let sched_of = |epoch: usize| &scheds[epoch - first];
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut completed = 0usize;
        loop {
            let finished = self.fill_pipeline(&mut pending, scheds, first, replica, &topic)?;
            let Some(p) = pending.front_mut() else {
                if finished {
                    return Ok(());
                }
                let t0 = Instant::now();
                std::thread::sleep(Duration::from_millis(2));
                self.c.wait(t0);
                continue;
            };
            let now = Instant::now();
            if now >= p.deadline {
                self.drop_batch(p, sched_of(p.epoch));
                pending.pop_front();
                continue;
            }
            let t0 = Instant::now();
            let got = p
                .sub
                .recv_timeout((p.deadline - now).min(Duration::from_millis(100)))?;
            self.c.wait(t0);
            let Some(g) = got.and_then(|bytes| self.accept_gradient(&bytes, p)) else {
                continue;
            };
            let Some(p) = pending.pop_front() else {
                continue;
            };
            let epoch = p.epoch;
            self.backpropagate(p, g, &vars, sync, sched_of)?;
            completed += 1;
            if epoch == 0 && wid == 0 && cfg.faults.kill_passive_worker_after == Some(completed) {
                warn!(
                    worker = wid,
                    "fault injection: passive worker dies with batches in flight"
                );
                std::mem::forget(pending);
                return Ok(());
            }
        }
    }

    /// Takes batches until `inflight` are pending; `true` once every epoch's batches are
    /// handed out or done.
    fn fill_pipeline(
        &self,
        pending: &mut VecDeque<Pending>,
        scheds: &[Scheduler],
        first: usize,
        replica: &Mlp,
        topic: &str,
    ) -> Result<bool> {
        while pending.len() < self.cfg.inflight() {
            match take_any(scheds, first) {
                (epoch, Take::Batch(l)) => {
                    pending.push_back(self.start_batch(epoch, l, replica, topic)?)
                }
                (_, Take::Wait) => return Ok(false),
                (_, Take::Finished) => return Ok(true),
            }
        }
        Ok(false)
    }

    /// No gradient before the deadline: tell the peer, give the batch back to the scheduler.
    fn drop_batch(&self, p: &Pending, sched: &Scheduler) {
        warn!(
            batch = p.lease.b,
            epoch = p.epoch,
            "no gradient before the deadline; dropping and reassigning"
        );
        let m = Envelope::control(Kind::Dropped, &self.cfg.job, p.epoch as u32, p.lease.b, "");
        let _ = publish(self.t, &self.c, TOPIC_CTRL_ACTIVE, &m);
        self.c.dropped.fetch_add(1, Ordering::Relaxed);
        sched.release(p.lease);
    }

    /// The gradient in `bytes` if it answers the attempt `p` and has its shape; anything else
    /// is logged, counted and skipped.
    fn accept_gradient(&self, bytes: &[u8], p: &Pending) -> Option<Vec<f32>> {
        let cfg = self.cfg;
        let m = decode(&self.c, bytes, &cfg.job)?;
        if m.kind != Kind::Gradient
            || m.batch != p.lease.b
            || m.seq != p.seq
            || m.epoch as usize != p.epoch
        {
            error!(
                batch = m.batch,
                seq = m.seq,
                "rejected gradient: not the answer to this batch attempt"
            );
            self.c.reject();
            return None;
        }
        match m.validated_tensor(&cfg.job, Kind::Gradient, p.rows, cfg.model.emb) {
            Ok(g) => Some(g),
            Err(e) => {
                error!("{e}");
                self.c.reject();
                None
            }
        }
    }

    /// The peer's gradient through the cut layer's backward and the replica, the update to the
    /// parameter server, the batch completed.
    fn backpropagate<'s>(
        &self,
        mut p: Pending,
        g: Vec<f32>,
        vars: &[Var],
        sync: &mut WorkerSync,
        sched_of: impl Fn(usize) -> &'s Scheduler,
    ) -> Result<()> {
        let (_, wp) = self.cfg.workers();
        let emb = self.cfg.model.emb;
        let (store, waited) = self.budget.run(|| -> Result<_> {
            let gt = self
                .cut
                .backward(&model::tensor2(g, p.rows, emb)?, &mut p.rng)?;
            Ok((&p.out * gt)?.sum_all()?.backward()?)
        });
        self.c.add_wait(waited);
        let grads = model::grads_of(&store?, vars)?;
        let round = self.batches.round_size(p.lease.b, wp);
        self.ps.step(sync, vars, grads, round, p.epoch)?;
        // count before completing: an epoch's numbers are read as soon as it completes
        self.c.batches.fetch_add(1, Ordering::Relaxed);
        sched_of(p.epoch).complete(p.lease.b);
        self.progress.inc(1);
        Ok(())
    }

    /// Forward one batch through the replica and the cut layer, subscribe to its gradient
    /// topic, publish the embedding.
    fn start_batch(
        &self,
        epoch: usize,
        lease: Lease,
        replica: &Mlp,
        topic: &str,
    ) -> Result<Pending> {
        let cfg = self.cfg;
        let b = lease.b;
        let rows = self
            .batches
            .rows(epoch as u32, b)
            .ok_or_else(|| VflError::Training(format!("batch {b} out of range")))?;
        let n = rows.len();
        let x = model::tensor2(self.data.rows(&rows), n, self.data.d)?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ seq.rotate_left(17) ^ b);
        let (out, waited) = self
            .budget
            .run(|| self.cut.forward(&replica.forward(&x)?, &mut rng));
        self.c.add_wait(waited);
        let out = out?;
        let z: Vec<f32> = out.flatten_all()?.to_vec1()?;
        // subscribe before publishing so the answer cannot be missed
        let sub = self.t.subscribe(&format!("grad.{b}"))?;
        let m = Envelope::tensor(
            Kind::Embedding,
            &cfg.job,
            epoch as u32,
            b,
            seq,
            n,
            cfg.model.emb,
            &z,
        );
        publish(self.t, &self.c, topic, &m)?;
        Ok(Pending {
            epoch,
            lease,
            seq,
            sub,
            out,
            rows: n,
            deadline: Instant::now() + Duration::from_secs_f64(cfg.deadline_s),
            rng,
        })
    }
}
