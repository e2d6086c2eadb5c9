//! What flows through the engine: a [`Job`] in, [`Event`]s out, and the scheduler's settings.
use super::probe::HalluProbe;
use crate::api::ApiError;
use std::time::Duration;
use tokio::sync::mpsc;
use umbra_model::sampling::SamplingParams;

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

/// What the engine (or, in the proxy, the upstream) sends back for a job.
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
    /// Generation failed; the status says whose fault (500: the engine, 502/504: an upstream).
    Error(ApiError),
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
    /// The key fingerprint an obfuscated checkpoint records (`None`: a plaintext model).
    pub key_fingerprint: Option<String>,
}

/// Scheduler settings of [`super::spawn`].
pub struct EngineOptions {
    /// Most sequences generated at once (prefilling ones included).
    pub max_batch: usize,
    /// Most queued requests (more get 429).
    pub max_queue: usize,
    /// Extra pause after every pass (simulates a slower device in tests).
    pub step_delay: Duration,
    /// How long to wait for peers of a new request so they share one cohort.
    pub batch_window: Duration,
    /// Most prompt tokens one pass carries, over all prefilling cohorts: bounds the transient
    /// attention scores to `heads x prefill_chunk x L` floats.
    pub prefill_chunk: usize,
    /// With no sequence decoding, the longest a pass of prompt chunks aims at (16 decode
    /// passes' time once one was measured, if shorter); a request that arrives meanwhile waits
    /// about this long.
    pub prefill_step: Duration,
    /// Scores every completion (`--halluc-probe`).
    pub probe: Option<HalluProbe>,
    /// CPU threads of the forward passes (a pool of the engine's own); `None`: the process's
    /// global pool.
    pub threads: Option<usize>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_batch: 16,
            max_queue: 256,
            step_delay: Duration::ZERO,
            batch_window: Duration::from_millis(5),
            prefill_chunk: 256,
            prefill_step: Duration::from_millis(250),
            probe: None,
            threads: None,
        }
    }
}
