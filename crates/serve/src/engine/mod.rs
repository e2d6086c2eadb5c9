//! The engine: one `Llama` on its own thread (candle is synchronous), fed through a bounded
//! queue ([`EngineHandle::submit`]) and driven by a [`ContinuousBatcher`] that decides, pass by
//! pass, which sequences' tokens share the next forward.
//!
//! Every pass is one [`umbra_model::Llama::forward_groups`] call: each *cohort* (requests
//! admitted together with equal prompt lengths; they share one `KvCache` of batch `b`) is one
//! group, so the projections and the FFN run as one GEMM over every row of the pass while
//! RoPE, the cache append and attention run per cohort. A cohort still reading its prompt
//! contributes a *chunk* of it (`[b, c]`; attention `[c, L]`, never the whole `n x n`); a
//! decoding cohort contributes its last tokens (`[b, 1]`). How many prompt tokens a pass may
//! carry is the [`PrefillBudget`]'s decision: with sequences decoding, prefill may make a pass
//! at most about 1.5 times as slow as a decode-only one, so a long prompt cannot starve short
//! chats; with nobody decoding, a pass is kept near 16 decode passes' time (at most
//! `prefill_step`), so that a new arrival waits at most about that long. A new request never waits for running ones to finish. A finished
//! or cancelled sequence (the client hung up, during prefill too) frees its slot at once and
//! its cache rows are dropped before the next pass.
//!
//! Memory per sequence (documented budget, F32): the KV cache,
//! `2 x layers x kv_heads x head_dim x 4 B` per position (SmolLM2-135M: 45 KiB, so 360 MiB at
//! its 8,192 context), reserved for the prompt plus the expected answer (see
//! [`kv_reserve`]) and grown by doubling past that; plus, while prefilling, transient attention
//! scores of at most `3 x heads x prefill_chunk x L x 4 B` for the pass (SmolLM2 at
//! `prefill_chunk` 256 and L = 8,192: 216 MiB), independent of the prompt's length.
mod continuous_batcher;
mod job;
mod prefill_budget;
mod probe;

pub use continuous_batcher::{kv_reserve, ContinuousBatcher};
pub use job::{EngineOptions, Event, Finish, HalluScore, Job, ModelInfo, TokenLogprob};
pub use prefill_budget::PrefillBudget;
pub use probe::HalluProbe;

use crate::api::ApiError;
use crate::metrics::Metrics;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use umbra_model::llama::Llama;

/// Seconds a client told "queue full" (429) should wait before retrying (`Retry-After`).
pub const RETRY_AFTER_S: u32 = 1;

/// A cheap handle to submit jobs.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<(Job, Instant)>,
    pub info: ModelInfo,
    pub metrics: Arc<Metrics>,
}

impl EngineHandle {
    /// Queues a job; 429 (with `Retry-After`) when the queue is full, 503 when the engine is
    /// gone.
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
                    .with_code("queue_full")
                    .with_retry_after(RETRY_AFTER_S),
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

/// Starts the engine thread. It runs until every [`EngineHandle`] is dropped and the work is done.
pub fn spawn(
    model: Llama,
    info: ModelInfo,
    metrics: Arc<Metrics>,
    opts: EngineOptions,
) -> std::io::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(opts.max_queue.max(1));
    let pool = match opts.threads {
        Some(n) => Some(
            rayon::ThreadPoolBuilder::new()
                .num_threads(n.max(1))
                .thread_name(|i| format!("umbra-engine-{i}"))
                .build()
                .map_err(std::io::Error::other)?,
        ),
        None => None,
    };
    let batcher = ContinuousBatcher::new(model, rx, metrics.clone(), opts);
    let join = std::thread::Builder::new()
        .name("umbra-engine".into())
        .spawn(move || match pool {
            Some(pool) => pool.install(|| batcher.run()),
            None => batcher.run(),
        })?;
    Ok((EngineHandle { tx, info, metrics }, join))
}
