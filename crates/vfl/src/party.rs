//! The two party roles. The same code runs both in one process (in-process transport) and as two
//! processes talking over NATS.
//!
//! Passive party: per epoch, its workers take batch ids from a scheduler (a shared one in
//! `pubsub`, one per worker in the fixed-pair modes), compute `z_p = f_p(x_p)`, pass it through the
//! cut layer, subscribe to `grad.<b>` and publish the embedding; the gradient that comes back is
//! validated and back-propagated, the update goes to the party's parameter server. A batch whose
//! gradient misses the deadline is dropped, the peer is told, and the batch goes back to the
//! scheduler (any free worker picks it up); a batch leased by a worker that died comes back when
//! its lease expires. After each epoch the passive party publishes the test embeddings for
//! evaluation. The fixed-pair modes end every epoch with a barrier (all workers done, then the
//! evaluation, then the next epoch); `pubsub` has none: workers take the next epoch's batches once
//! the current epoch's queue is empty (at most one epoch ahead), and the main thread evaluates
//! an epoch when its last batch completes while the workers go on.
//!
//! Active party: its workers take embeddings from their topic, validate them, compute
//! `y^ = g(f_a(x_a), z_p)`, the loss, publish `dL/dz_p` on `grad.<b>` and push their update.
use crate::budget::ComputeBudget;
use crate::config::JobConfig;
use crate::cut::CutLayer;
use crate::data::{PartyData, Task};
use crate::error::{Result, VflError};
use crate::message::{Envelope, Kind};
use crate::metrics::{self, CpuMeter};
use crate::model::{self, ActiveModel, Mlp};
use crate::ps::ParamServer;
use crate::transport::{Subscription, Transport};
use candle_core::{Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};

/// Rows per evaluation message.
pub const EVAL_CHUNK: usize = 2048;

pub const TOPIC_CTRL_ACTIVE: &str = "ctrl.active";
pub const TOPIC_CTRL_PASSIVE: &str = "ctrl.passive";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The shared batch layout: epoch `e` visits the training rows in a seeded permutation, batch `b`
/// is its `b`-th slice of `B` rows. Both parties derive it from the job seed, so only batch ids
/// cross the wire.
#[derive(Debug)]
pub struct Batches {
    pub n: usize,
    pub batch: usize,
    seed: u64,
    cache: Mutex<HashMap<u32, Arc<Vec<usize>>>>,
}

impl Batches {
    pub fn new(n: usize, batch: usize, seed: u64) -> Self {
        Batches {
            n,
            batch: batch.max(1),
            seed,
            cache: Mutex::new(HashMap::new()),
        }
    }
    pub fn count(&self) -> usize {
        self.n.div_ceil(self.batch)
    }
    fn perm(&self, epoch: u32) -> Arc<Vec<usize>> {
        let mut c = lock(&self.cache);
        if let Some(p) = c.get(&epoch) {
            return p.clone();
        }
        let mut p: Vec<usize> = (0..self.n).collect();
        p.shuffle(&mut ChaCha8Rng::seed_from_u64(
            self.seed ^ (0xBA7C_0000u64 + epoch as u64),
        ));
        let p = Arc::new(p);
        if c.len() > 4 {
            c.clear();
        }
        c.insert(epoch, p.clone());
        p
    }
    /// Training rows of batch `b` of epoch `epoch`; `None` for an unknown batch id.
    pub fn rows(&self, epoch: u32, b: u64) -> Option<Vec<usize>> {
        if b >= self.count() as u64 {
            return None;
        }
        let p = self.perm(epoch);
        let s = b as usize * self.batch;
        Some(p[s..(s + self.batch).min(self.n)].to_vec())
    }
    /// Size of the synchronous round that batch `b` belongs to, with `w` workers.
    pub fn round_size(&self, b: u64, w: usize) -> usize {
        let r = b as usize / w;
        w.min(self.count() - r * w)
    }
}

/// One hand-out of a batch: `id` tells this attempt from a later one of the same batch after
/// its lease expired, so that a late release cannot cancel someone else's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lease {
    b: u64,
    id: u64,
}

enum Take {
    Batch(Lease),
    Wait,
    Finished,
}

/// Batch ids of one epoch with leases: a taken batch that is neither completed nor released
/// before its lease expires is handed out again.
struct Scheduler {
    st: Mutex<SchedState>,
    lease: Duration,
}

struct SchedState {
    queue: VecDeque<u64>,
    /// batch -> (expiry, lease id)
    leased: HashMap<u64, (Instant, u64)>,
    done: HashSet<u64>,
    reassigned: u64,
    next_lease: u64,
}

impl Scheduler {
    fn new(ids: impl IntoIterator<Item = u64>, lease: Duration) -> Self {
        Scheduler {
            st: Mutex::new(SchedState {
                queue: ids.into_iter().collect(),
                leased: HashMap::new(),
                done: HashSet::new(),
                reassigned: 0,
                next_lease: 0,
            }),
            lease,
        }
    }
    fn take(&self) -> Take {
        let mut st = lock(&self.st);
        let now = Instant::now();
        let expired: Vec<u64> = st
            .leased
            .iter()
            .filter(|(_, &(t, _))| t <= now)
            .map(|(&b, _)| b)
            .collect();
        for b in expired {
            st.leased.remove(&b);
            warn!(batch = b, "lease expired (worker lost?); reassigning");
            st.reassigned += 1;
            st.queue.push_back(b);
        }
        while let Some(b) = st.queue.pop_front() {
            if st.done.contains(&b) {
                continue;
            }
            let id = st.next_lease;
            st.next_lease += 1;
            st.leased.insert(b, (now + self.lease, id));
            return Take::Batch(Lease { b, id });
        }
        if st.leased.is_empty() {
            Take::Finished
        } else {
            Take::Wait
        }
    }
    fn complete(&self, b: u64) {
        let mut st = lock(&self.st);
        st.leased.remove(&b);
        st.done.insert(b);
    }
    /// Gives a batch back for another attempt, unless its lease already expired (the batch
    /// then is queued again or held by a later lease, which this must not cancel).
    fn release(&self, l: Lease) {
        let mut st = lock(&self.st);
        if st.leased.get(&l.b).is_some_and(|&(_, id)| id == l.id) {
            st.leased.remove(&l.b);
            if !st.done.contains(&l.b) {
                st.reassigned += 1;
                st.queue.push_back(l.b);
            }
        }
    }
    fn reassigned(&self) -> u64 {
        lock(&self.st).reassigned
    }
    /// Every batch of the epoch completed.
    fn finished(&self) -> bool {
        let st = lock(&self.st);
        st.leased.is_empty() && st.queue.iter().all(|b| st.done.contains(b))
    }
}

/// Traffic and waiting counters of a party.
#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub wait_ns: AtomicU64,
    pub rejected: AtomicU64,
    pub batches: AtomicU64,
    pub dropped: AtomicU64,
}

impl Counters {
    fn wait(&self, since: Instant) {
        self.wait_ns
            .fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
    fn add_wait(&self, s: f64) {
        self.wait_ns.fetch_add((s * 1e9) as u64, Ordering::Relaxed);
    }
    fn wait_s(&self) -> f64 {
        self.wait_ns.load(Ordering::Relaxed) as f64 * 1e-9
    }
}

fn publish(t: &dyn Transport, c: &Counters, topic: &str, m: &Envelope) -> Result<()> {
    let b = m.encode();
    c.sent.fetch_add(b.len() as u64, Ordering::Relaxed);
    t.publish(topic, b)
}

/// Decode bytes from the wire; a malformed message is logged, counted and skipped.
fn decode(c: &Counters, bytes: &[u8], job: &str) -> Option<Envelope> {
    c.received.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    match Envelope::decode(bytes) {
        Ok(m) if m.job == job => Some(m),
        Ok(m) => {
            error!(job = %m.job, "rejected message of a foreign job");
            c.rejected.fetch_add(1, Ordering::Relaxed);
            None
        }
        Err(e) => {
            error!("rejected message: {e}");
            c.rejected.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

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

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EvalResult {
    pub epoch: usize,
    pub rows: usize,
    pub train_loss: f64,
    pub auc: Option<f64>,
    pub accuracy: Option<f64>,
    pub rmse: Option<f64>,
}

/// Metrics of predictions on the test split.
pub fn evaluate(out: &[f32], y: &[f32], task: Task) -> (Option<f64>, Option<f64>, Option<f64>) {
    match task {
        Task::Binary => (metrics::auc(out, y), Some(metrics::accuracy(out, y)), None),
        Task::Regression => (None, None, Some(metrics::rmse(out, y))),
    }
}

/// Run the active party until the passive party says it is done.
pub fn run_active(
    cfg: &JobConfig,
    data: &PartyData,
    t: Arc<dyn Transport>,
) -> Result<ActiveSummary> {
    let meter = CpuMeter::start(cfg.cores());
    let (wa, _) = cfg.workers();
    let emb = cfg.model.emb;
    let job = cfg.job.clone();
    let model = ActiveModel::new(data.d, &cfg.model, cfg.seed)?;
    let ps = ParamServer::new(&model.vars(), cfg.model.lr, cfg.ps_sync())?;
    let batches = Batches::new(data.n_train, cfg.batch, cfg.seed);
    let counters = Counters::default();
    let stop = AtomicBool::new(false);
    let losses: Mutex<HashMap<usize, (f64, usize)>> = Mutex::new(HashMap::new());
    let last_activity = Mutex::new(Instant::now());
    let budget = ComputeBudget::new(cfg.machine_active);
    let mut ctrl = t.subscribe(TOPIC_CTRL_ACTIVE)?;
    let mut subs: Vec<Box<dyn Subscription>> = Vec::new();
    for i in 0..wa {
        let topic = if cfg.fixed_pairs() {
            format!("emb.{i}")
        } else {
            "emb".to_string()
        };
        subs.push(t.subscribe(&topic)?);
    }
    let idle_limit = Duration::from_secs_f64((cfg.deadline_s * 6.0).max(60.0));
    let mut per_epoch: Vec<EvalResult> = Vec::new();
    std::thread::scope(|s| -> Result<()> {
        let mut handles = Vec::new();
        for (i, sub) in subs.into_iter().enumerate() {
            let replica = ActiveModel::new(data.d, &cfg.model, cfg.seed)?;
            let (ps, batches, counters, stop, losses, t, job, la, budget) = (
                &ps,
                &batches,
                &counters,
                &stop,
                &losses,
                t.clone(),
                &job,
                &last_activity,
                &budget,
            );
            handles.push(s.spawn(move || {
                active_worker(
                    cfg, data, i, sub, &replica, ps, batches, counters, stop, losses, &*t, job,
                    emb, la, budget,
                )
            }));
        }
        // control loop: handshake, evaluation, end
        let mut got_any = false;
        let mut last_ready = Instant::now() - Duration::from_secs(1);
        let mut eval: HashMap<u64, Vec<f32>> = HashMap::new();
        let result = loop {
            if !got_any && last_ready.elapsed() > Duration::from_millis(20) {
                publish(
                    &*t,
                    &counters,
                    TOPIC_CTRL_PASSIVE,
                    &Envelope::control(Kind::Ready, &job, 0, 0, ""),
                )?;
                last_ready = Instant::now();
            }
            if lock(&last_activity).elapsed() > idle_limit {
                break Err(VflError::Training(format!(
                    "no message from the passive party for {} s",
                    idle_limit.as_secs()
                )));
            }
            let Some(bytes) = ctrl.recv_timeout(Duration::from_millis(50))? else {
                continue;
            };
            let Some(m) = decode(&counters, &bytes, &job) else {
                continue;
            };
            got_any = true;
            *lock(&last_activity) = Instant::now();
            match m.kind {
                Kind::Eval => {
                    let start = usize::try_from(m.batch)
                        .ok()
                        .and_then(|b| b.checked_mul(EVAL_CHUNK))
                        .unwrap_or(usize::MAX);
                    let rows = EVAL_CHUNK.min(data.n_test.saturating_sub(start));
                    if rows == 0 {
                        error!(chunk = m.batch, "rejected eval chunk: unknown chunk id");
                        counters.rejected.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    match m.validated_tensor(&job, Kind::Eval, rows, emb) {
                        Ok(zp) => {
                            let xa = data.test_x[start * data.d..(start + rows) * data.d].to_vec();
                            let out = ps_forward(&ps, &model, xa, zp, rows, data.d, emb)?;
                            eval.insert(m.batch, out);
                        }
                        Err(e) => {
                            error!("{e}");
                            counters.rejected.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Kind::EpochEnd => {
                    let mut out = Vec::new();
                    let mut ys = Vec::new();
                    let mut keys: Vec<u64> = eval.keys().copied().collect();
                    keys.sort_unstable();
                    for k in keys {
                        let start = k as usize * EVAL_CHUNK;
                        let o = &eval[&k];
                        out.extend_from_slice(o);
                        ys.extend_from_slice(&data.test_y[start..start + o.len()]);
                    }
                    eval.clear();
                    let (auc, accuracy, rmse) = evaluate(&out, &ys, data.task);
                    let epoch = m.epoch as usize;
                    let (ls, ln) = lock(&losses).get(&epoch).copied().unwrap_or((0.0, 0));
                    let r = EvalResult {
                        epoch,
                        rows: out.len(),
                        train_loss: if ln > 0 { ls / ln as f64 } else { f64::NAN },
                        auc,
                        accuracy,
                        rmse,
                    };
                    info!(epoch, rows = r.rows, auc = ?r.auc, rmse = ?r.rmse, loss = r.train_loss, "epoch evaluated");
                    per_epoch.push(r);
                }
                Kind::Dropped => {
                    debug!(
                        batch = m.batch,
                        "peer dropped a batch attempt at its deadline"
                    );
                }
                Kind::Done => break Ok(()),
                other => {
                    error!(kind = ?other, "rejected control message of an unexpected kind");
                    counters.rejected.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            match h.join() {
                Ok(r) => r?,
                Err(_) => return Err(VflError::Training("an active worker panicked".into())),
            }
        }
        result
    })?;
    let (wall, _, util) = meter.read();
    let summary = ActiveSummary {
        per_epoch,
        wait_s: counters.wait_s(),
        bytes_sent: counters.sent.load(Ordering::Relaxed),
        bytes_received: counters.received.load(Ordering::Relaxed),
        rejected: counters.rejected.load(Ordering::Relaxed),
        batches: counters.batches.load(Ordering::Relaxed),
        wall_s: wall,
        cpu_util: util,
    };
    let json = serde_json::to_string(&summary)?;
    // tell the passive party (a few times: the report is small and may race a reconnect)
    for _ in 0..3 {
        publish(
            &*t,
            &counters,
            TOPIC_CTRL_PASSIVE,
            &Envelope::control(Kind::Report, &job, 0, 0, &json),
        )?;
        let _ = t.flush();
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(summary)
}

/// Forward pass of the active model with the current master parameters.
fn ps_forward(
    ps: &ParamServer,
    model: &ActiveModel,
    xa: Vec<f32>,
    zp: Vec<f32>,
    rows: usize,
    d: usize,
    emb: usize,
) -> Result<Vec<f32>> {
    ps.pull(&model.vars())?;
    let out = model.forward(
        &model::tensor2(xa, rows, d)?,
        &model::tensor2(zp, rows, emb)?,
    )?;
    Ok(out.flatten_all()?.to_vec1()?)
}

#[allow(clippy::too_many_arguments)]
fn active_worker(
    cfg: &JobConfig,
    data: &PartyData,
    wid: usize,
    mut sub: Box<dyn Subscription>,
    model: &ActiveModel,
    ps: &ParamServer,
    batches: &Batches,
    c: &Counters,
    stop: &AtomicBool,
    losses: &Mutex<HashMap<usize, (f64, usize)>>,
    t: &dyn Transport,
    job: &str,
    emb: usize,
    last_activity: &Mutex<Instant>,
    budget: &ComputeBudget,
) -> Result<()> {
    let vars = model.vars();
    let mut sync = ps.worker();
    ps.refresh(&mut sync, &vars)?;
    let (wa, _) = cfg.workers();
    let mut step = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        // short timeout: the stop flag is seen within 10 ms of the passive party's `Done`
        let got = sub.recv_timeout(Duration::from_millis(10))?;
        c.wait(t0);
        let Some(bytes) = got else { continue };
        let Some(m) = decode(c, &bytes, job) else {
            continue;
        };
        if m.kind != Kind::Embedding || m.epoch as usize >= cfg.epochs {
            error!(kind = ?m.kind, epoch = m.epoch, "rejected: not an embedding of this job's epochs");
            c.rejected.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let Some(rows) = batches.rows(m.epoch, m.batch) else {
            error!(batch = m.batch, "rejected embedding: unknown batch id");
            c.rejected.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let zp = match m.validated_tensor(job, Kind::Embedding, rows.len(), emb) {
            Ok(z) => z,
            Err(e) => {
                error!("{e}");
                c.rejected.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        *lock(last_activity) = Instant::now();
        step += 1;
        let epoch = m.epoch as usize;
        let n = rows.len();
        let xa = model::tensor2(data.rows(&rows), n, data.d)?;
        let y = model::tensor1(data.labels(&rows))?;
        let zpv = Var::from_tensor(&model::tensor2(zp, n, emb)?)?;
        let (computed, waited) = budget.run(|| -> Result<_> {
            let out = model.forward(&xa, zpv.as_tensor())?;
            let l = model::loss(&out, &y, data.task)?;
            Ok((l.to_scalar::<f32>()? as f64, l.backward()?))
        });
        c.add_wait(waited);
        let (lv, store) = computed?;
        let dz: Vec<f32> = match store.get(zpv.as_tensor()) {
            Some(g) => g.flatten_all()?.to_vec1()?,
            None => vec![0.0; n * emb],
        };
        let grads = model::grads_of(&store, &vars)?;
        let reply = Envelope::tensor(Kind::Gradient, job, m.epoch, m.batch, m.seq, n, emb, &dz);
        publish(t, c, &format!("grad.{}", m.batch), &reply)?;
        ps.step(
            &mut sync,
            &vars,
            grads,
            batches.round_size(m.batch, wa),
            epoch,
        )?;
        c.batches.fetch_add(1, Ordering::Relaxed);
        let mut ls = lock(losses);
        let e = ls.entry(epoch).or_insert((0.0, 0));
        e.0 += lv;
        e.1 += 1;
    }
    debug!(worker = wid, steps = step, "active worker stops");
    Ok(())
}

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

struct Pending {
    epoch: usize,
    lease: Lease,
    seq: u64,
    sub: Box<dyn Subscription>,
    out: Tensor,
    rows: usize,
    deadline: Instant,
    rng: ChaCha8Rng,
}

struct PassiveShared<'a> {
    cfg: &'a JobConfig,
    data: &'a PartyData,
    t: &'a dyn Transport,
    cut: &'a dyn CutLayer,
    ps: &'a ParamServer,
    batches: &'a Batches,
    c: &'a Counters,
    seq: AtomicU64,
    progress: &'a indicatif::ProgressBar,
    /// This party's simulated machine.
    budget: ComputeBudget,
}

/// Run the passive party: waits for the active party, trains `cfg.epochs` epochs, evaluates,
/// and returns its numbers (with the active party's report if it came back).
pub fn run_passive(
    cfg: &JobConfig,
    data: &PartyData,
    t: Arc<dyn Transport>,
    cut: Arc<dyn CutLayer>,
    progress: indicatif::ProgressBar,
) -> Result<PassiveSummary> {
    let meter = CpuMeter::start(cfg.cores());
    let (_, wp) = cfg.workers();
    let emb = cfg.model.emb;
    let master = Mlp::new(
        data.d,
        cfg.model.hidden,
        emb,
        cfg.model.bottom_depth,
        cfg.seed ^ 0xB,
    )?;
    let ps = ParamServer::new(&master.vars(), cfg.model.lr, cfg.ps_sync())?;
    let batches = Batches::new(data.n_train, cfg.batch, cfg.seed);
    let counters = Counters::default();
    let mut ctrl = t.subscribe(TOPIC_CTRL_PASSIVE)?;
    // handshake: the active party announces it is subscribed
    let t0 = Instant::now();
    loop {
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(VflError::Training(
                "the active party did not show up within 60 s".into(),
            ));
        }
        if let Some(b) = ctrl.recv_timeout(Duration::from_millis(100))? {
            if let Some(m) = decode(&counters, &b, &cfg.job) {
                if m.kind == Kind::Ready {
                    break;
                }
            }
        }
    }
    counters.wait(t0);
    info!(mode = %cfg.mode, workers = wp, batches = batches.count(), "passive party starts");
    let seq0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        << 8;
    let sh = PassiveShared {
        cfg,
        data,
        t: &*t,
        cut: &*cut,
        ps: &ps,
        batches: &batches,
        c: &counters,
        seq: AtomicU64::new(seq0),
        progress: &progress,
        budget: ComputeBudget::new(cfg.machine_passive),
    };
    let replicas: Vec<Mlp> = (0..wp)
        .map(|_| {
            Mlp::new(
                data.d,
                cfg.model.hidden,
                emb,
                cfg.model.bottom_depth,
                cfg.seed ^ 0xB,
            )
        })
        .collect::<Result<_>>()?;
    // each worker's local optimizer state lives across epochs
    let mut syncs: Vec<crate::ps::WorkerSync> = (0..wp).map(|_| ps.worker()).collect();
    let lease = Duration::from_secs_f64(cfg.deadline_s * 1.5 + 0.5);
    let nb = batches.count() as u64;
    let mut per_epoch = Vec::new();
    // Counters at the start of an epoch's window, for its per-epoch numbers.
    let snapshot = |c: &Counters| {
        (
            c.wait_ns.load(Ordering::Relaxed),
            c.sent.load(Ordering::Relaxed),
            c.received.load(Ordering::Relaxed),
            c.batches.load(Ordering::Relaxed),
            c.dropped.load(Ordering::Relaxed),
        )
    };
    // An epoch's numbers over the window from `start` (counters) and `meter` to now, and the
    // counters now: the next window starts exactly there, so that no batch completed between
    // two snapshots falls between two windows.
    let measure_epoch = |epoch: usize,
                         meter: &CpuMeter,
                         start: (u64, u64, u64, u64, u64),
                         reassigned: u64|
     -> (PassiveEpoch, (u64, u64, u64, u64, u64)) {
        let (w0, s0, r0, b0, d0) = start;
        let end = snapshot(&counters);
        let (w1, s1, r1, b1, d1) = end;
        let (wall, _, util) = meter.read();
        let e = PassiveEpoch {
            epoch,
            wall_s: wall,
            cpu_util: util,
            wait_s: (w1 - w0) as f64 * 1e-9,
            bytes_sent: s1 - s0,
            bytes_received: r1 - r0,
            batches: b1 - b0,
            dropped: d1 - d0,
            reassigned,
        };
        info!(
            epoch,
            wall_s = e.wall_s,
            cpu_util = e.cpu_util,
            wait_s = e.wait_s,
            "passive epoch done"
        );
        (e, end)
    };
    if cfg.fixed_pairs() {
        // The baselines: worker i owns batches i, i + w, ... of an epoch; every epoch ends with
        // all workers done before the next one starts.
        for epoch in 0..cfg.epochs {
            let em = CpuMeter::start(cfg.cores());
            let start = snapshot(&counters);
            let scheds: Vec<Scheduler> = (0..wp)
                .map(|i| Scheduler::new((i as u64..nb).step_by(wp), lease))
                .collect();
            std::thread::scope(|s| -> Result<()> {
                let mut hs = Vec::new();
                for (i, (replica, sync)) in replicas.iter().zip(syncs.iter_mut()).enumerate() {
                    let (sh, sched) = (&sh, std::slice::from_ref(&scheds[i]));
                    hs.push(s.spawn(move || passive_worker(sh, i, epoch, sched, replica, sync)));
                }
                join_workers(hs)
            })?;
            // a worker that died leaves its batches leased: finish them with the survivors
            let reassigned: u64 = scheds.iter().map(|s| s.reassigned()).sum();
            evaluate_epoch(&sh, &master, epoch)?;
            per_epoch.push(measure_epoch(epoch, &em, start, reassigned).0);
        }
    } else {
        // PubSub-VFL: one shared batch-id queue per epoch and no barrier between epochs. A
        // worker takes the next epoch's batches as soon as the current epoch's queue is empty
        // (its last batches still in flight), and the epoch is evaluated when its last batch
        // completes, while the workers go on (the master then may hold a few of the next
        // epoch's updates).
        let scheds: Vec<Scheduler> = (0..cfg.epochs)
            .map(|_| Scheduler::new(0..nb, lease))
            .collect();
        std::thread::scope(|s| -> Result<()> {
            let mut hs = Vec::new();
            for (i, (replica, sync)) in replicas.iter().zip(syncs.iter_mut()).enumerate() {
                let (sh, scheds) = (&sh, &scheds[..]);
                hs.push(s.spawn(move || passive_worker(sh, i, 0, scheds, replica, sync)));
            }
            // Epoch windows are back to back: each ends the moment its last batch completes
            // (its evaluation then overlaps the next epoch, and counts there).
            let mut closed = Ok(());
            let mut em = CpuMeter::start(cfg.cores());
            let mut start = snapshot(&counters);
            for (epoch, sched) in scheds.iter().enumerate() {
                while !sched.finished() && !hs.iter().all(|h| h.is_finished()) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                if !sched.finished() {
                    break; // every worker stopped: join_workers reports why
                }
                let (e, end) = measure_epoch(epoch, &em, start, sched.reassigned());
                per_epoch.push(e);
                em = CpuMeter::start(cfg.cores());
                start = end;
                if let Err(e) = evaluate_epoch(&sh, &master, epoch) {
                    closed = Err(e);
                    break;
                }
            }
            join_workers(hs)?;
            if per_epoch.len() < cfg.epochs && closed.is_ok() {
                closed = Err(VflError::Training(
                    "the passive workers stopped before the last epoch finished".into(),
                ));
            }
            closed
        })?;
    }
    // done; wait for the active party's report
    let mut active = None;
    let t_end = Instant::now();
    let mut last_done = Instant::now() - Duration::from_secs(10);
    while t_end.elapsed() < Duration::from_secs_f64(cfg.deadline_s.max(5.0) * 3.0) {
        if last_done.elapsed() > Duration::from_secs(2) {
            publish(
                &*t,
                &counters,
                TOPIC_CTRL_ACTIVE,
                &Envelope::control(Kind::Done, &cfg.job, 0, 0, ""),
            )?;
            let _ = t.flush();
            last_done = Instant::now();
        }
        if let Some(b) = ctrl.recv_timeout(Duration::from_millis(100))? {
            if let Some(m) = decode(&counters, &b, &cfg.job) {
                match m.kind {
                    Kind::Report => match serde_json::from_slice::<ActiveSummary>(&m.payload) {
                        Ok(s) => {
                            active = Some(s);
                            break;
                        }
                        Err(e) => {
                            error!("rejected report: {e}");
                            counters.rejected.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                    Kind::Ready => {}
                    other => debug!(kind = ?other, "ignored control message"),
                }
            }
        }
    }
    if active.is_none() {
        warn!("the active party's report did not arrive");
    }
    let (wall, _, util) = meter.read();
    Ok(PassiveSummary {
        per_epoch,
        wall_s: wall,
        cpu_util: util,
        wait_s: counters.wait_s(),
        bytes_sent: counters.sent.load(Ordering::Relaxed),
        bytes_received: counters.received.load(Ordering::Relaxed),
        rejected: counters.rejected.load(Ordering::Relaxed),
        steps: cfg.epochs * batches.count(),
        active,
    })
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

/// End of an epoch: the test split's embeddings under the current master, then `EpochEnd`.
fn evaluate_epoch(sh: &PassiveShared<'_>, master: &Mlp, epoch: usize) -> Result<()> {
    let (cfg, data) = (sh.cfg, sh.data);
    sh.ps.pull(&master.vars())?;
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
        let z = sh.cut.forward(&master.forward(&x)?, &mut rng)?;
        let z: Vec<f32> = z.flatten_all()?.to_vec1()?;
        let m = Envelope::tensor(
            Kind::Eval,
            &cfg.job,
            epoch as u32,
            c as u64,
            0,
            rows,
            cfg.model.emb,
            &z,
        );
        publish(sh.t, sh.c, TOPIC_CTRL_ACTIVE, &m)?;
    }
    publish(
        sh.t,
        sh.c,
        TOPIC_CTRL_ACTIVE,
        &Envelope::control(Kind::EpochEnd, &cfg.job, epoch as u32, chunks as u64, ""),
    )
}

/// The next batch for a worker from `scheds` (consecutive epochs, `scheds[k]` is epoch
/// `first + k`): the oldest epoch with a batch to hand out, looking at most one epoch past
/// the oldest unfinished one. `Finished` once every epoch is.
fn take_any(scheds: &[Scheduler], first: usize) -> (usize, Take) {
    let mut oldest_open: Option<usize> = None;
    for (k, s) in scheds.iter().enumerate() {
        if oldest_open.is_some_and(|o| k > o + 1) {
            break;
        }
        match s.take() {
            Take::Batch(l) => return (first + k, Take::Batch(l)),
            Take::Wait => {
                oldest_open.get_or_insert(k);
            }
            Take::Finished => {}
        }
    }
    match oldest_open {
        Some(k) => (first + k, Take::Wait),
        None => (first, Take::Finished),
    }
}

/// A passive worker: takes batches from `scheds` (epoch `first + k` from `scheds[k]`, see
/// [`take_any`]), keeps up to `inflight` of them waiting for their gradient, and trains each
/// when its gradient arrives.
fn passive_worker(
    sh: &PassiveShared<'_>,
    wid: usize,
    first: usize,
    scheds: &[Scheduler],
    replica: &Mlp,
    sync: &mut crate::ps::WorkerSync,
) -> Result<()> {
    let cfg = sh.cfg;
    let emb = cfg.model.emb;
    let vars = replica.vars();
    sh.ps.refresh(sync, &vars)?;
    let (_, wp) = cfg.workers();
    let inflight = cfg.inflight();
    let deadline = Duration::from_secs_f64(cfg.deadline_s);
    let emb_topic = if cfg.fixed_pairs() {
        format!("emb.{wid}")
    } else {
        "emb".to_string()
    };
    let sched_of = |epoch: usize| &scheds[epoch - first];
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut completed = 0usize;
    loop {
        // fill the pipeline
        let mut finished = false;
        while pending.len() < inflight {
            match take_any(scheds, first) {
                (epoch, Take::Batch(l)) => {
                    pending.push_back(start_batch(sh, epoch, l, replica, &emb_topic, deadline)?)
                }
                (_, Take::Wait) => break,
                (_, Take::Finished) => {
                    finished = true;
                    break;
                }
            }
        }
        let Some(p) = pending.front_mut() else {
            if finished {
                return Ok(());
            }
            let t0 = Instant::now();
            std::thread::sleep(Duration::from_millis(2));
            sh.c.wait(t0);
            continue;
        };
        let now = Instant::now();
        if now >= p.deadline {
            warn!(
                batch = p.lease.b,
                epoch = p.epoch,
                "no gradient before the deadline; dropping and reassigning"
            );
            let _ = publish(
                sh.t,
                sh.c,
                TOPIC_CTRL_ACTIVE,
                &Envelope::control(Kind::Dropped, &cfg.job, p.epoch as u32, p.lease.b, ""),
            );
            sh.c.dropped.fetch_add(1, Ordering::Relaxed);
            sched_of(p.epoch).release(p.lease);
            pending.pop_front();
            continue;
        }
        let t0 = Instant::now();
        let got = p
            .sub
            .recv_timeout((p.deadline - now).min(Duration::from_millis(100)))?;
        sh.c.wait(t0);
        let Some(bytes) = got else { continue };
        let Some(m) = decode(sh.c, &bytes, &cfg.job) else {
            continue;
        };
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
            sh.c.rejected.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let g = match m.validated_tensor(&cfg.job, Kind::Gradient, p.rows, emb) {
            Ok(g) => g,
            Err(e) => {
                error!("{e}");
                sh.c.rejected.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let Some(mut p) = pending.pop_front() else {
            continue;
        };
        let (store, waited) = sh.budget.run(|| -> Result<_> {
            let gt = sh
                .cut
                .backward(&model::tensor2(g, p.rows, emb)?, &mut p.rng)?;
            Ok((&p.out * gt)?.sum_all()?.backward()?)
        });
        sh.c.add_wait(waited);
        let store = store?;
        let grads = model::grads_of(&store, &vars)?;
        sh.ps.step(
            sync,
            &vars,
            grads,
            sh.batches.round_size(p.lease.b, wp),
            p.epoch,
        )?;
        // count before completing: an epoch's numbers are read as soon as it completes
        sh.c.batches.fetch_add(1, Ordering::Relaxed);
        sched_of(p.epoch).complete(p.lease.b);
        sh.progress.inc(1);
        completed += 1;
        if p.epoch == 0 && wid == 0 && cfg.faults.kill_passive_worker_after == Some(completed) {
            warn!(
                worker = wid,
                "fault injection: passive worker dies with batches in flight"
            );
            std::mem::forget(pending);
            return Ok(());
        }
    }
}

fn start_batch(
    sh: &PassiveShared<'_>,
    epoch: usize,
    lease: Lease,
    replica: &Mlp,
    topic: &str,
    deadline: Duration,
) -> Result<Pending> {
    let cfg = sh.cfg;
    let b = lease.b;
    let rows = sh
        .batches
        .rows(epoch as u32, b)
        .ok_or_else(|| VflError::Training(format!("batch {b} out of range")))?;
    let n = rows.len();
    let x = model::tensor2(sh.data.rows(&rows), n, sh.data.d)?;
    let seq = sh.seq.fetch_add(1, Ordering::Relaxed);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ seq.rotate_left(17) ^ b);
    let (out, waited) = sh
        .budget
        .run(|| sh.cut.forward(&replica.forward(&x)?, &mut rng));
    sh.c.add_wait(waited);
    let out = out?;
    let z: Vec<f32> = out.flatten_all()?.to_vec1()?;
    // subscribe before publishing so the answer cannot be missed
    let sub = sh.t.subscribe(&format!("grad.{b}"))?;
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
    publish(sh.t, sh.c, topic, &m)?;
    Ok(Pending {
        epoch,
        lease,
        seq,
        sub,
        out,
        rows: n,
        deadline: Instant::now() + deadline,
        rng,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_every_row_once() {
        let b = Batches::new(1000, 256, 3);
        assert_eq!(b.count(), 4);
        let mut all: Vec<usize> = (0..4).flat_map(|i| b.rows(1, i).unwrap()).collect();
        assert_eq!(b.rows(1, 3).unwrap().len(), 1000 - 768);
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        assert!(b.rows(1, 4).is_none());
        assert_ne!(b.rows(0, 0), b.rows(1, 0));
        assert_eq!(b.round_size(3, 3), 1);
        assert_eq!(b.round_size(1, 3), 3);
    }

    #[test]
    fn scheduler_reassigns_expired_leases() {
        let s = Scheduler::new(0..2, Duration::from_millis(30));
        let Take::Batch(a) = s.take() else { panic!() };
        let Take::Batch(b) = s.take() else { panic!() };
        s.complete(b.b);
        assert!(matches!(s.take(), Take::Wait));
        std::thread::sleep(Duration::from_millis(40));
        let Take::Batch(a2) = s.take() else { panic!() };
        assert_eq!(a.b, a2.b);
        assert_ne!(a.id, a2.id, "a new attempt gets a new lease");
        // the first attempt gives up late: that must not cancel the second attempt's lease
        s.release(a);
        assert!(matches!(s.take(), Take::Wait), "batch handed out twice");
        s.complete(a2.b);
        assert!(matches!(s.take(), Take::Finished));
        assert_eq!(s.reassigned(), 1);
    }
}
