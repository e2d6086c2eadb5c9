//! The engine thread: one `Llama` (candle is synchronous) fed through a bounded queue, with a
//! scheduler that admits queued requests between decode steps (continuous batching).
//!
//! Batching: requests admitted in the same scheduler iteration with equal prompt lengths form a
//! *cohort* that shares one `KvCache` and is prefilled as one `[b, t]` forward. Every decode
//! step then advances *all* cohorts in one [`Llama::forward_groups`] call: the
//! projections and FFN run as one GEMM over every live row, attention reads each cohort's own
//! cache, so sequences of different lengths share the weight reads. A new request never waits
//! for running ones to finish (it is prefilled and joins at the next iteration). A finished or
//! cancelled member frees its admission slot at once and its cache row is dropped before the
//! next step.
use crate::api::ApiError;
use crate::metrics::Metrics;
use candle_core::{Device, Tensor};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use umbra_model::llama::{Llama, TapPoint};
use umbra_model::sampling::{Sampler, SamplingParams};
use umbra_model::{Forward, Input};

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop id was produced.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// Log-probabilities of one generated token (natural log, of the unmodified distribution).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    /// The most likely ids with their logprobs, best first.
    pub top: Vec<(u32, f32)>,
}

/// A completion's hallucination score (`umbra serve --halluc-probe`), from the taps of the
/// same forward passes that generated it.
#[derive(Debug, Clone, PartialEq)]
pub struct HalluScore {
    /// Probability that the completion is hallucinated.
    pub score: f32,
    /// Stage of the probe's features (`query` or `generation`).
    pub stage: String,
    /// `score >= threshold` (the probe's validation threshold).
    pub hallucinated: bool,
}

/// What the engine sends back for a job.
#[derive(Debug, Clone)]
pub enum Event {
    Token {
        id: u32,
        logprob: Option<TokenLogprob>,
    },
    /// Sent just before `Done` when the server has a hallucination probe and the answer is
    /// not empty.
    Score(HalluScore),
    Done(Finish),
    Error(String),
}

/// A hallucination probe checked against the served model, with the taps it needs.
pub struct HalluProbe {
    pub scorer: umbra_haluprobe::score::Scorer,
    pub plan: Arc<umbra_haluprobe::online::TapPlan>,
}

impl HalluProbe {
    /// Loads `path` and checks it against `model` (layers, hidden size, heads) and against what
    /// serving can tap.
    pub fn load(path: &std::path::Path, model: &Llama) -> Result<Self, umbra_haluprobe::HaluError> {
        let scorer = umbra_haluprobe::score::Scorer::load(path, model.config())?;
        let plan = umbra_haluprobe::online::TapPlan::for_probe(&scorer.probe.meta)?;
        Ok(Self {
            scorer,
            plan: Arc::new(plan),
        })
    }
}

/// One generation request.
#[derive(Debug)]
pub struct Job {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_ids: Vec<u32>,
    pub logprobs: Option<usize>,
    pub events: mpsc::UnboundedSender<Event>,
}

/// What the server needs to know about the loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub vocab_size: usize,
    pub max_positions: usize,
    pub eos_ids: Vec<u32>,
}

/// A cheap handle to submit jobs.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<(Job, Instant)>,
    pub info: ModelInfo,
    pub metrics: Arc<Metrics>,
}

impl EngineHandle {
    /// Queues a job; 429 when the queue is full, 503 when the engine is gone.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        use axum::http::StatusCode;
        self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send((job, Instant::now())) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    mpsc::error::TrySendError::Full(_) => ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate_limit_error",
                        "the server's request queue is full; retry later",
                    )
                    .with_code("queue_full"),
                    mpsc::error::TrySendError::Closed(_) => ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "server_error",
                        "the engine has stopped",
                    ),
                })
            }
        }
    }
}

/// Scheduler settings of [`spawn`].
pub struct EngineOptions {
    /// Most sequences generated at once.
    pub max_batch: usize,
    /// Most queued requests (more get 429).
    pub max_queue: usize,
    /// Extra pause after every scheduler iteration (simulates a slower device in tests).
    pub step_delay: std::time::Duration,
    /// How long to wait for peers of a new request so they share one cohort.
    pub batch_window: std::time::Duration,
    /// Scores every completion (`--halluc-probe`).
    pub probe: Option<HalluProbe>,
}

/// Starts the engine thread. It runs until every [`EngineHandle`] is dropped and the work is done.
pub fn spawn(
    model: Llama,
    info: ModelInfo,
    metrics: Arc<Metrics>,
    opts: EngineOptions,
) -> (EngineHandle, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(opts.max_queue.max(1));
    let m = metrics.clone();
    let join = std::thread::Builder::new()
        .name("umbra-engine".into())
        .spawn(move || {
            Scheduler {
                model,
                rx,
                max_batch: opts.max_batch.max(1),
                metrics: m,
                cohorts: vec![],
                step_delay: opts.step_delay,
                batch_window: opts.batch_window,
                probe: opts.probe,
            }
            .run()
        })
        .expect("spawn engine thread");
    (EngineHandle { tx, info, metrics }, join)
}

struct Member {
    job: Job,
    sampler: Sampler,
    generated: usize,
    last: u32,
    done: bool,
    submitted: Instant,
    first_at: Option<Instant>,
    /// Probe features collected from this sequence's taps (`--halluc-probe`).
    feats: Option<umbra_haluprobe::online::OnlineFeatures>,
    /// Ended on `max_tokens` but its last token still has to be fed once for the probe.
    tail: Option<Finish>,
}

struct Cohort {
    members: Vec<Member>,
    cache: umbra_model::llama::KvCache,
}

struct Scheduler {
    model: Llama,
    rx: mpsc::Receiver<(Job, Instant)>,
    max_batch: usize,
    metrics: Arc<Metrics>,
    cohorts: Vec<Cohort>,
    step_delay: std::time::Duration,
    batch_window: std::time::Duration,
    probe: Option<HalluProbe>,
}

/// Keeps the residual-stream taps of the layers `plan` reads, in layer order.
fn keep_planned(
    plan: &umbra_haluprobe::online::TapPlan,
    taps: &mut Vec<Tensor>,
    pt: TapPoint,
    t: &Tensor,
) {
    if let TapPoint::Layer(l) = pt {
        if plan.layers.binary_search(&l).is_ok() {
            taps.push(t.clone());
        }
    }
}

/// Rows `[n][d]` of each tapped layer for row `r` of a `[b, t, d]` tap.
fn tap_rows(layers: &[Tensor], r: usize) -> umbra_model::error::Result<Vec<Vec<Vec<f32>>>> {
    layers
        .iter()
        .map(|t| Ok(t.get(r)?.to_vec2::<f32>()?))
        .collect()
}

fn log_softmax_top(row: &[f32], chosen: u32, k: usize) -> TokenLogprob {
    let max = row
        .iter()
        .copied()
        .filter(|x| !x.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    let lse = max
        + row
            .iter()
            .map(|&x| ((x - max) as f64).exp())
            .sum::<f64>()
            .ln() as f32;
    let lp = |i: u32| row[i as usize] - lse;
    let mut top = vec![];
    if k > 0 {
        let mut idx: Vec<u32> = (0..row.len() as u32).collect();
        let order = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, order);
            idx.truncate(k);
        }
        idx.sort_by(order);
        top = idx.into_iter().map(|i| (i, lp(i))).collect();
    }
    TokenLogprob {
        logprob: lp(chosen),
        top,
    }
}

/// Ends every live member of `c` with a decode error.
fn fail_all(c: &mut Cohort, e: &umbra_model::error::ModelError) {
    for m in c.members.iter_mut().filter(|m| !m.done) {
        m.done = true;
        let _ = m
            .job
            .events
            .send(Event::Error(format!("decode failed: {e}")));
    }
}

impl Scheduler {
    fn live(&self) -> usize {
        self.cohorts
            .iter()
            .flat_map(|c| &c.members)
            .filter(|m| !m.done)
            .count()
    }

    fn run(mut self) {
        loop {
            let mut new = vec![];
            if self.cohorts.is_empty() {
                match self.rx.blocking_recv() {
                    Some(j) => new.push(j),
                    None => break,
                }
            }
            let live = self.live();
            // Once something arrives, wait up to `batch_window` for its peers so that requests
            // sent together share one cohort (one batched forward) instead of fragmenting.
            let mut deadline = None;
            while live + new.len() < self.max_batch {
                match self.rx.try_recv() {
                    Ok(j) => new.push(j),
                    Err(mpsc::error::TryRecvError::Empty)
                        if !new.is_empty() && !self.batch_window.is_zero() =>
                    {
                        let d = *deadline.get_or_insert_with(|| Instant::now() + self.batch_window);
                        if Instant::now() >= d {
                            break;
                        }
                        std::thread::sleep(std::time::Duration::from_micros(200));
                    }
                    Err(_) => break,
                }
            }
            self.metrics
                .queue_depth
                .fetch_sub(new.len() as i64, Ordering::Relaxed);
            // Requests whose client left while queued are dropped here.
            new.retain(|(j, _)| !j.events.is_closed());
            // Cohorts: equal prompt lengths, in arrival order.
            while !new.is_empty() {
                let len = new[0].0.prompt.len();
                let (group, rest): (Vec<_>, Vec<_>) =
                    new.into_iter().partition(|(j, _)| j.prompt.len() == len);
                new = rest;
                self.prefill(group);
            }
            self.step_all();
            if !self.step_delay.is_zero() {
                std::thread::sleep(self.step_delay);
            }
            self.compact();
            self.metrics
                .active_sequences
                .store(self.live() as i64, Ordering::Relaxed);
        }
    }

    fn prefill(&mut self, group: Vec<(Job, Instant)>) {
        let mut members = vec![];
        for (job, submitted) in group {
            match Sampler::new(job.sampling.clone()) {
                Ok(sampler) => members.push(Member {
                    job,
                    sampler,
                    generated: 0,
                    last: 0,
                    done: false,
                    submitted,
                    first_at: None,
                    feats: self
                        .probe
                        .as_ref()
                        .map(|p| umbra_haluprobe::online::OnlineFeatures::new(p.plan.clone())),
                    tail: None,
                }),
                Err(e) => {
                    let _ = job.events.send(Event::Error(e.to_string()));
                }
            }
        }
        if members.is_empty() {
            return;
        }
        let b = members.len();
        let plen = members[0].job.prompt.len();
        // Reserve for a typical answer only; the cache grows by doubling if one runs longer
        // (a large default max_tokens would otherwise pin hundreds of MB per sequence).
        let most = members.iter().map(|m| m.job.max_tokens).max().unwrap_or(0);
        let cap = plen + most.min(256);
        let mut cache = self.model.new_cache_with_capacity(cap);
        let flat: Vec<u32> = members
            .iter()
            .flat_map(|m| m.job.prompt.iter().copied())
            .collect();
        self.metrics
            .prompt_tokens
            .fetch_add(flat.len() as u64, Ordering::Relaxed);
        let plan = self.probe.as_ref().map(|p| p.plan.clone());
        let mut taps: Vec<Tensor> = vec![];
        let logits = Tensor::from_vec(flat, (b, plen), &Device::Cpu)
            .map_err(umbra_model::error::ModelError::from)
            .and_then(|ids| match &plan {
                None => self
                    .model
                    .forward(Input::Ids(&ids), &mut cache, Forward::last_logits()),
                Some(plan) => self.model.forward(
                    Input::Ids(&ids),
                    &mut cache,
                    Forward::last_logits().tap(&mut |pt, t| keep_planned(plan, &mut taps, pt, t)),
                ),
            })
            .and_then(|l| Ok(l.to_vec2::<f32>()?));
        let mut cohort = Cohort { members, cache };
        if logits.is_ok() && plan.is_some() {
            for (r, m) in cohort.members.iter_mut().enumerate() {
                let set = tap_rows(&taps, r)
                    .map_err(|e| e.to_string())
                    .and_then(|rows| {
                        m.feats
                            .as_mut()
                            .map_or(Ok(()), |f| f.set_prompt(&rows).map_err(|e| e.to_string()))
                    });
                if let Err(e) = set {
                    tracing::warn!("hallucination probe: prompt taps unusable ({e}); no score");
                    m.feats = None;
                }
            }
        }
        match logits {
            Ok(rows) => {
                self.consume(&mut cohort, &rows);
                self.cohorts.push(cohort);
            }
            Err(e) => {
                for m in &cohort.members {
                    let _ = m
                        .job
                        .events
                        .send(Event::Error(format!("prefill failed: {e}")));
                }
            }
        }
    }

    /// One decode step for every live sequence: all cohorts go through one batched forward
    /// (projections and FFN as one GEMM over every row, attention per cohort cache).
    fn step_all(&mut self) {
        for c in &mut self.cohorts {
            for m in c.members.iter_mut().filter(|m| !m.done) {
                if m.job.events.is_closed() {
                    m.done = true;
                    self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.compact();
        if self.cohorts.is_empty() {
            return;
        }
        let ids: Vec<Vec<u32>> = self
            .cohorts
            .iter()
            .map(|c| c.members.iter().map(|m| m.last).collect())
            .collect();
        let rows: usize = ids.iter().map(Vec::len).sum();
        self.metrics.decode_steps.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .decode_rows
            .fetch_add(rows as u64, Ordering::Relaxed);
        let id_t = match ids
            .iter()
            .map(|v| Tensor::from_vec(v.clone(), (v.len(), 1), &Device::Cpu))
            .collect::<candle_core::Result<Vec<_>>>()
        {
            Ok(t) => t,
            Err(e) => {
                let e = umbra_model::ModelError::from(e);
                self.cohorts.iter_mut().for_each(|c| fail_all(c, &e));
                return;
            }
        };
        let mut groups: Vec<(Input, &mut umbra_model::KvCache)> = id_t
            .iter()
            .map(Input::Ids)
            .zip(self.cohorts.iter_mut().map(|c| &mut c.cache))
            .collect();
        let plan = self.probe.as_ref().map(|p| p.plan.clone());
        let mut taps: Vec<Tensor> = vec![];
        let logits = match &plan {
            None => self
                .model
                .forward_groups(&mut groups, Forward::last_logits()),
            Some(plan) => self.model.forward_groups(
                &mut groups,
                Forward::last_logits().tap(&mut |pt, t| keep_planned(plan, &mut taps, pt, t)),
            ),
        }
        .and_then(|ls| {
            ls.iter()
                .map(|l| Ok(l.to_vec2::<f32>()?))
                .collect::<umbra_model::error::Result<Vec<_>>>()
        });
        let mut cohorts = std::mem::take(&mut self.cohorts);
        match logits {
            Ok(per_cohort) => {
                if plan.is_some() {
                    record_decode_taps(&mut cohorts, &taps);
                }
                for (c, rows) in cohorts.iter_mut().zip(&per_cohort) {
                    self.consume(c, rows);
                }
            }
            // One cohort's failure must not end the others: retry each on its own (a failed
            // step never advanced any cache's length, so the retry rewrites the same position).
            Err(_) if cohorts.len() > 1 => {
                for (c, ids) in cohorts.iter_mut().zip(&id_t) {
                    let mut taps: Vec<Tensor> = vec![];
                    let mut tap = |pt: TapPoint, t: &Tensor| {
                        if let Some(plan) = &plan {
                            keep_planned(plan, &mut taps, pt, t)
                        }
                    };
                    let one = self
                        .model
                        .forward_groups(
                            &mut [(Input::Ids(ids), &mut c.cache)],
                            Forward::last_logits().tap(&mut tap),
                        )
                        .and_then(|mut ls| Ok(ls.remove(0).to_vec2::<f32>()?));
                    match one {
                        Ok(rows) => {
                            if plan.is_some() {
                                record_decode_taps(std::slice::from_mut(c), &taps);
                            }
                            self.consume(c, &rows)
                        }
                        Err(e) => fail_all(c, &e),
                    }
                }
            }
            Err(e) => cohorts.iter_mut().for_each(|c| fail_all(c, &e)),
        }
        self.cohorts = cohorts;
    }

    /// Drops finished members (and their cache rows) and empty cohorts, so a finished or
    /// cancelled sequence costs nothing in later steps.
    fn compact(&mut self) {
        self.cohorts.retain_mut(|c| {
            let keep: Vec<bool> = c.members.iter().map(|m| !m.done).collect();
            if keep.iter().all(|&k| k) {
                return true;
            }
            if !keep.iter().any(|&k| k) {
                return false;
            }
            match c.cache.retain(&keep) {
                Ok(()) => {
                    c.members.retain(|m| !m.done);
                    true
                }
                Err(e) => {
                    for m in c.members.iter_mut().filter(|m| !m.done) {
                        m.done = true;
                        let _ = m
                            .job
                            .events
                            .send(Event::Error(format!("cache compaction failed: {e}")));
                    }
                    false
                }
            }
        });
    }

    /// Samples one token per live member from its logits row and reports it.
    fn consume(&self, c: &mut Cohort, rows: &[Vec<f32>]) {
        for (m, row) in c.members.iter_mut().zip(rows) {
            if m.done {
                continue;
            }
            if let Some(f) = m.tail {
                // The extra step only fed the last token to the probe's taps.
                m.done = true;
                self.send_score(m);
                let _ = m.job.events.send(Event::Done(f));
                continue;
            }
            let tok = m.sampler.sample(row);
            m.last = tok;
            let now = Instant::now();
            if m.first_at.is_none() {
                m.first_at = Some(now);
                self.metrics
                    .record_ttft(now.duration_since(m.submitted).as_secs_f64());
            }
            let finish = if m.job.stop_ids.contains(&tok) {
                Some(Finish::Stop)
            } else {
                let logprob = m.job.logprobs.map(|k| log_softmax_top(row, tok, k));
                if let Some(f) = m.feats.as_mut() {
                    f.push_token(row, tok);
                }
                m.generated += 1;
                // Counted before the client can see the token, so /metrics never lags a response.
                self.metrics.record_tokens(1);
                if m.job
                    .events
                    .send(Event::Token { id: tok, logprob })
                    .is_err()
                {
                    m.done = true;
                    self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                (m.generated >= m.job.max_tokens).then_some(Finish::Length)
            };
            if let Some(f) = finish {
                if m.generated > 1 {
                    let first = m.first_at.unwrap_or(now);
                    self.metrics.record_tpot(
                        now.duration_since(first).as_secs_f64() / (m.generated - 1) as f64,
                    );
                }
                if m.feats.as_ref().is_some_and(|x| x.needs_tail()) {
                    // Ended on max_tokens: its last token was never fed; one more step taps it.
                    m.tail = Some(f);
                    continue;
                }
                m.done = true;
                self.send_score(m);
                let _ = m.job.events.send(Event::Done(f));
            }
        }
    }

    /// Scores a finished member's answer with the probe (no event for an empty answer).
    fn send_score(&self, m: &mut Member) {
        let (Some(probe), Some(feats)) = (&self.probe, m.feats.take()) else {
            return;
        };
        let scored = feats
            .finish()
            .and_then(|f| f.map(|f| probe.scorer.score_features(&f)).transpose());
        match scored {
            Ok(Some(s)) => {
                let _ = m.job.events.send(Event::Score(HalluScore {
                    score: s.score,
                    stage: s.stage.name().to_string(),
                    hallucinated: s.hallucinated,
                }));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("hallucination probe: {e}"),
        }
    }
}

/// Gives each live member its rows of the decode step's layer taps (`[B, d]` each, rows in
/// cohort order).
fn record_decode_taps(cohorts: &mut [Cohort], taps: &[Tensor]) {
    let rows: Vec<Vec<Vec<f32>>> = match taps
        .iter()
        .map(|t| t.to_vec2::<f32>())
        .collect::<candle_core::Result<_>>()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("hallucination probe: decode taps unusable ({e})");
            return;
        }
    };
    let mut r = 0;
    for c in cohorts {
        for m in &mut c.members {
            if let Some(f) = m.feats.as_mut() {
                let per: Vec<&[f32]> = rows.iter().map(|l| l[r].as_slice()).collect();
                if let Err(e) = f.push_hidden(&per) {
                    tracing::warn!("hallucination probe: {e}; no score");
                    m.feats = None;
                }
            }
            r += 1;
        }
    }
}
