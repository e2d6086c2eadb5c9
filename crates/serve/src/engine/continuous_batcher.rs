//! [`ContinuousBatcher`]: the engine thread's loop. Each iteration admits queued requests
//! (as cohorts), drops the sequences whose clients left, plans one pass (which cohorts decode,
//! which prompt chunks ride along, within the [`PrefillBudget`]), runs it as one
//! [`Llama::forward_groups`] and hands every sequence its token.
use super::job::{EngineOptions, Event, Finish, HalluScore, Job, TokenLogprob};
use super::prefill_budget::PrefillBudget;
use super::probe::{keep_planned, layer_rows, HalluProbe, SeqProbe};
use crate::api::ApiError;
use crate::metrics::Metrics;
use candle_core::{Device, Tensor};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use umbra_model::llama::{Llama, TapPoint};
use umbra_model::sampling::Sampler;
use umbra_model::{Forward, Input, KvCache, ModelError};

/// KV positions reserved when a cohort is admitted: the prompt plus the answer expected (all of
/// `max_tokens` when that is at most the prompt's length or 256, else the larger of the two),
/// at most the context. A longer answer grows the cache by doubling, so a short chat with a
/// large default `max_tokens` does not pin a whole context of memory up front, while a long
/// prompt is never copied on growth.
pub fn kv_reserve(prompt_len: usize, max_tokens: usize, max_positions: usize) -> usize {
    let answer = max_tokens.min(prompt_len.max(256));
    (prompt_len + answer).min(max_positions).max(1)
}

/// Beside decoding sequences, prompt work may make passes on average at most this fraction
/// longer than decode-only passes (so decoding keeps at least 2/3 of its speed; a margin under
/// the 2x that measurement noise on a busy machine eats into). See [`PrefillBudget`].
pub const PREFILL_SHARE: f64 = 0.5;

/// Prompts of at most this many positions are read in one pass whatever the budget: their
/// cost is small and their result then does not depend on timing.
pub const SHORT_PROMPT: usize = 64;

/// One sequence.
struct Member {
    job: Job,
    sampler: Sampler,
    generated: usize,
    last: u32,
    done: bool,
    submitted: Instant,
    first_at: Option<Instant>,
    /// `--halluc-probe`: this sequence's features.
    probe: Option<SeqProbe>,
    /// Ended on `max_tokens` but its last token still has to be fed once for the probe.
    tail: Option<Finish>,
}

/// Sequences admitted together with equal prompt lengths: one KV cache of batch `b`.
struct Cohort {
    members: Vec<Member>,
    cache: KvCache,
    prompt_len: usize,
    /// Prompt positions already in the cache; the cohort decodes once this is `prompt_len`.
    prefilled: usize,
    admitted: Instant,
}

impl Cohort {
    fn prefilling(&self) -> bool {
        self.prefilled < self.prompt_len
    }
}

/// One cohort's part of a pass: its decode step (`positions` = 1) or a prompt chunk.
#[derive(Debug, Clone, Copy)]
struct Slot {
    cohort: usize,
    positions: usize,
    prefill: bool,
}

/// What a pass gives back: last-position logits per slot, and the probe's layer rows.
type PassOut = (Vec<Tensor>, Option<Vec<Vec<Vec<f32>>>>);

/// The engine loop; see the module docs of [`crate::engine`].
pub struct ContinuousBatcher {
    model: Llama,
    rx: mpsc::Receiver<(Job, Instant)>,
    max_batch: usize,
    metrics: Arc<Metrics>,
    cohorts: Vec<Cohort>,
    step_delay: Duration,
    batch_window: Duration,
    probe: Option<HalluProbe>,
    budget: PrefillBudget,
}

/// 500, or 502 when the failure came from a party the engine depends on (a share server).
fn server_error(msg: String) -> ApiError {
    crate::api::engine_error(msg)
}

/// Ends every live member of `c` with an error.
fn fail_all(c: &mut Cohort, what: &str, e: &dyn std::fmt::Display) {
    for m in c.members.iter_mut().filter(|m| !m.done) {
        m.done = true;
        let _ = m
            .job
            .events
            .send(Event::Error(server_error(format!("{what} failed: {e}"))));
    }
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

impl ContinuousBatcher {
    pub(super) fn new(
        model: Llama,
        rx: mpsc::Receiver<(Job, Instant)>,
        metrics: Arc<Metrics>,
        opts: EngineOptions,
    ) -> Self {
        Self {
            model,
            rx,
            max_batch: opts.max_batch.max(1),
            metrics,
            cohorts: vec![],
            step_delay: opts.step_delay,
            batch_window: opts.batch_window,
            probe: opts.probe,
            budget: PrefillBudget::new(opts.prefill_chunk, opts.prefill_step, PREFILL_SHARE),
        }
    }

    fn live(&self) -> usize {
        self.cohorts
            .iter()
            .flat_map(|c| &c.members)
            .filter(|m| !m.done)
            .count()
    }

    /// Runs until every handle is dropped and the work is done.
    pub fn run(mut self) {
        while let Some(new) = self.admit() {
            self.form_cohorts(new);
            self.drop_cancelled();
            self.step();
            if !self.step_delay.is_zero() {
                std::thread::sleep(self.step_delay);
            }
            self.compact();
            self.metrics
                .active_sequences
                .store(self.live() as i64, Ordering::Relaxed);
        }
    }

    /// Takes queued requests up to `max_batch` live sequences; blocks while idle. Once
    /// something arrives, waits up to `batch_window` for its peers so that requests sent
    /// together share one cohort instead of fragmenting. `None`: every handle is gone.
    fn admit(&mut self) -> Option<Vec<(Job, Instant)>> {
        let mut new = vec![];
        if self.cohorts.is_empty() {
            new.push(self.rx.blocking_recv()?);
        }
        let live = self.live();
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
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(_) => break,
            }
        }
        self.metrics
            .queue_depth
            .fetch_sub(new.len() as i64, Ordering::Relaxed);
        // Requests whose client left while queued are dropped here.
        new.retain(|(j, _)| !j.events.is_closed());
        Some(new)
    }

    /// Cohorts of equal prompt lengths, in arrival order; their prompts are read by later passes.
    fn form_cohorts(&mut self, mut new: Vec<(Job, Instant)>) {
        let max_pos = self.model.config().max_position_embeddings;
        while !new.is_empty() {
            let len = new[0].0.prompt.len();
            let (group, rest): (Vec<_>, Vec<_>) =
                new.into_iter().partition(|(j, _)| j.prompt.len() == len);
            new = rest;
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
                        probe: self.probe.as_ref().map(|p| SeqProbe::new(p.plan.clone())),
                        tail: None,
                    }),
                    Err(e) => {
                        let _ = job
                            .events
                            .send(Event::Error(ApiError::bad_request(e.to_string())));
                    }
                }
            }
            if members.is_empty() || len == 0 {
                continue;
            }
            let most = members.iter().map(|m| m.job.max_tokens).max().unwrap_or(0);
            self.metrics
                .prompt_tokens
                .fetch_add((len * members.len()) as u64, Ordering::Relaxed);
            self.cohorts.push(Cohort {
                members,
                cache: self
                    .model
                    .new_cache_with_capacity(kv_reserve(len, most, max_pos)),
                prompt_len: len,
                prefilled: 0,
                admitted: Instant::now(),
            });
        }
    }

    /// Marks the sequences whose client went away (while prefilling too) as done.
    fn drop_cancelled(&mut self) {
        for c in &mut self.cohorts {
            for m in c.members.iter_mut().filter(|m| !m.done) {
                if m.job.events.is_closed() {
                    m.done = true;
                    self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.compact();
    }

    /// This pass: every decoding cohort's step, then prompt chunks within the budget, the
    /// cohorts with the least prompt left first (short prompts whole).
    fn plan(&self) -> Vec<Slot> {
        let mut slots = vec![];
        let mut decode_rows = 0;
        let mut waiting = vec![];
        for (i, c) in self.cohorts.iter().enumerate() {
            if c.prefilling() {
                waiting.push(i);
            } else {
                slots.push(Slot {
                    cohort: i,
                    positions: 1,
                    prefill: false,
                });
                decode_rows += c.members.len();
            }
        }
        let left = |i: usize| self.cohorts[i].prompt_len - self.cohorts[i].prefilled;
        waiting.sort_by_key(|&i| (left(i), self.cohorts[i].admitted));
        let mut budget = self.budget.tokens(decode_rows);
        let mut any = false;
        for i in waiting {
            let b = self.cohorts[i].members.len().max(1);
            let rest = left(i);
            let mut n = if rest <= SHORT_PROMPT {
                rest
            } else {
                rest.min(budget / b)
            };
            if n == 0 && budget > 0 && !any {
                n = 1; // progress: the least-left prompt gets a position at least
            }
            if n == 0 {
                continue;
            }
            any = true;
            budget = budget.saturating_sub(b * n);
            slots.push(Slot {
                cohort: i,
                positions: n,
                prefill: true,
            });
        }
        slots
    }

    /// Plans and runs one pass; a failed pass is retried cohort by cohort, so one cohort's
    /// failure does not end the others (a failed pass never advanced any cache's length, so
    /// the retry rewrites the same positions).
    fn step(&mut self) {
        let slots = self.plan();
        if slots.is_empty() {
            return;
        }
        let rows = |prefill: bool| -> usize {
            slots
                .iter()
                .filter(|s| s.prefill == prefill)
                .map(|s| s.positions * self.cohorts[s.cohort].members.len())
                .sum()
        };
        let (decode_rows, prompt) = (rows(false), rows(true));
        let t0 = Instant::now();
        match self.pass(&slots) {
            Ok(out) => {
                self.deliver(&slots, out);
                self.budget
                    .record(decode_rows, prompt, t0.elapsed().as_secs_f64());
                tracing::trace!(
                    decode_rows,
                    prompt_tokens = prompt,
                    ms = t0.elapsed().as_secs_f64() * 1e3,
                    "engine pass"
                );
            }
            Err(_) if slots.len() > 1 => {
                for s in slots {
                    match self.pass(&[s]) {
                        Ok(out) => self.deliver(&[s], out),
                        Err(e) => fail_all(
                            &mut self.cohorts[s.cohort],
                            if s.prefill { "prefill" } else { "decode" },
                            &e,
                        ),
                    }
                }
            }
            Err(e) => {
                let s = slots[0];
                let what = if s.prefill { "prefill" } else { "decode" };
                fail_all(&mut self.cohorts[s.cohort], what, &e);
            }
        }
    }

    /// The ids each slot feeds: `[b, positions]`.
    fn slot_ids(&self, s: &Slot) -> candle_core::Result<Tensor> {
        let c = &self.cohorts[s.cohort];
        let ids: Vec<u32> = if s.prefill {
            let r = c.prefilled..c.prefilled + s.positions;
            c.members
                .iter()
                .flat_map(|m| m.job.prompt[r.clone()].iter().copied())
                .collect()
        } else {
            c.members.iter().map(|m| m.last).collect()
        };
        Tensor::from_vec(ids, (c.members.len(), s.positions), &Device::Cpu)
    }

    /// One forward over every slot: last-position logits per slot and the probe's taps.
    fn pass(&mut self, slots: &[Slot]) -> Result<PassOut, ModelError> {
        let ids = slots
            .iter()
            .map(|s| self.slot_ids(s))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut caches: Vec<Option<&mut KvCache>> = self
            .cohorts
            .iter_mut()
            .map(|c| Some(&mut c.cache))
            .collect();
        let mut groups: Vec<(Input, &mut KvCache)> = Vec::with_capacity(slots.len());
        for (s, ids) in slots.iter().zip(&ids) {
            let cache = caches[s.cohort]
                .take()
                .ok_or_else(|| ModelError::Input("a cohort planned twice in one pass".into()))?;
            groups.push((Input::Ids(ids), cache));
        }
        if slots.iter().any(|s| !s.prefill) {
            self.metrics.decode_steps.fetch_add(1, Ordering::Relaxed);
        }
        let plan = self.probe.as_ref().map(|p| p.plan.clone());
        let mut taps: Vec<Tensor> = vec![];
        let logits = match &plan {
            None => self
                .model
                .forward_groups(&mut groups, Forward::last_logits())?,
            Some(plan) => self.model.forward_groups(
                &mut groups,
                Forward::last_logits()
                    .tap(&mut |pt: TapPoint, t: &Tensor| keep_planned(plan, &mut taps, pt, t)),
            )?,
        };
        let taps = match plan {
            Some(_) => Some(layer_rows(&taps)?),
            None => None,
        };
        Ok((logits, taps))
    }

    /// Hands each slot's cohort its result: prompt progress (and the first token once the
    /// prompt is read), or a decoded token per member.
    fn deliver(&mut self, slots: &[Slot], (logits, taps): PassOut) {
        let mut cohorts = std::mem::take(&mut self.cohorts);
        let mut r0 = 0;
        for (s, l) in slots.iter().zip(logits) {
            let c = &mut cohorts[s.cohort];
            let b = c.members.len();
            if let Some(rows) = &taps {
                record_taps(c, s, rows, r0);
            }
            r0 += b * s.positions;
            if s.prefill {
                c.prefilled += s.positions;
                self.metrics
                    .prefill_tokens
                    .fetch_add((b * s.positions) as u64, Ordering::Relaxed);
                self.metrics.prefill_chunks.fetch_add(1, Ordering::Relaxed);
                if c.prefilling() {
                    continue;
                }
                finish_prompt_taps(c);
            } else {
                self.metrics
                    .decode_rows
                    .fetch_add(b as u64, Ordering::Relaxed);
            }
            match l.to_vec2::<f32>() {
                Ok(rows) => self.consume(c, &rows),
                Err(e) => fail_all(c, "reading logits", &e),
            }
        }
        self.cohorts = cohorts;
    }

    /// Drops finished members (and their cache rows) and empty cohorts, so a finished or
    /// cancelled sequence costs nothing in later passes.
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
                    fail_all(c, "cache compaction", &e);
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
                if let Some(p) = m.probe.as_mut() {
                    p.feats.push_token(row, tok);
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
                if m.probe.as_ref().is_some_and(|p| p.feats.needs_tail()) {
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
        let (Some(probe), Some(seq)) = (&self.probe, m.probe.take()) else {
            return;
        };
        let scored = seq
            .feats
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

/// Gives each member of `c` its rows of the pass's layer taps: `rows[layer][P][d]`, the slot's
/// rows starting at `r0` (batch-major: member `r`, position `p` at `r0 + r * positions + p`).
fn record_taps(c: &mut Cohort, s: &Slot, rows: &[Vec<Vec<f32>>], r0: usize) {
    for (r, m) in c.members.iter_mut().enumerate() {
        let Some(p) = m.probe.as_mut() else { continue };
        let from = r0 + r * s.positions;
        if s.prefill {
            p.push_prompt(rows, from, s.positions);
        } else if let Err(e) = p.push_decode(rows, from) {
            tracing::warn!("hallucination probe: {e}; no score");
            m.probe = None;
        }
    }
}

/// Once a cohort's prompt is read, hands each member's prompt rows to its features.
fn finish_prompt_taps(c: &mut Cohort) {
    for m in &mut c.members {
        if let Some(p) = m.probe.as_mut() {
            if let Err(e) = p.finish_prompt() {
                tracing::warn!("hallucination probe: prompt taps unusable ({e}); no score");
                m.probe = None;
            }
        }
    }
}
