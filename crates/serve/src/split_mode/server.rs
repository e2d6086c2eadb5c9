//! The split-mode server: a server part (the transformer blocks only) behind
//! `POST /v1/split/forward`, with per-session KV caches.
//!
//! `session: null` opens a session (its KV cache stays on the server); later requests append
//! to it. `close: true` drops it after the step (with no `embeddings`: only drops it). Sessions
//! idle longer than the limit are dropped; at most `max_sessions` are open (429 beyond, with
//! `Retry-After`), each with a KV cache of at most the model's context, which bounds the
//! server's memory. A request's rows run in chunks of at most `prefill_chunk`, so attention
//! scores stay `[chunk, L]`. Decode steps (one row on an open session) of concurrent sessions
//! are batched ([`super::batcher`]).
use super::batcher::{run_decode_batch, spawn_batcher, DecodeJob, StepResult};
use super::wire::{decode_f32, encode_f32, ForwardRequest, ForwardResponse, FORWARD_PATH};
use crate::api::ApiError;
use crate::error::ServeError;
use crate::http::{parse_json, read_body};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use candle_core::{Device, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use umbra_model::llama::{KvCache, Llama};
use umbra_model::ModelPart;
use umbra_model::{Forward, Input};

/// Limits of the split-mode server.
#[derive(Debug, Clone)]
pub struct SplitLimits {
    pub max_sessions: usize,
    pub idle: Duration,
    pub max_body: usize,
    pub body_timeout: Duration,
    /// Most rows one forward runs (a request with more runs in several).
    pub prefill_chunk: usize,
}

/// A session's KV cache; `None` while a step runs on it.
struct Slot {
    cache: Option<KvCache>,
    last: Instant,
}

struct SplitState {
    model: Arc<Llama>,
    name: String,
    limits: SplitLimits,
    sessions: Mutex<HashMap<String, Slot>>,
    steps: AtomicU64,
    batcher: std::sync::mpsc::Sender<DecodeJob>,
    /// Batched decode forwards run, and the rows they carried.
    decode: Arc<(AtomicU64, AtomicU64)>,
}

/// A parsed forward request.
enum Step {
    /// Only drops the session.
    Close(String),
    Forward {
        session: Option<String>,
        rows: usize,
        data: Vec<f32>,
        /// Return every row's hidden state, not only the last one's.
        all: bool,
        close: bool,
    },
}

/// The router of a split-mode server over a server part (`model.part() == Server`).
pub fn router(model: Llama, name: String, limits: SplitLimits) -> Result<Router, ServeError> {
    if model.part() != ModelPart::Server {
        return Err(ServeError::Config(format!(
            "split-mode serving needs the server part of a split model, got a {} model",
            model.part().as_str()
        )));
    }
    let model = Arc::new(model);
    let decode: Arc<(AtomicU64, AtomicU64)> = Arc::default();
    let batcher = {
        let (model, counts) = (model.clone(), decode.clone());
        spawn_batcher("split-decode", limits.max_sessions.max(1), move |jobs| {
            counts.0.fetch_add(1, Ordering::Relaxed);
            counts.1.fetch_add(jobs.len() as u64, Ordering::Relaxed);
            run_decode_batch(&model, jobs);
        })?
    };
    let state = Arc::new(SplitState {
        model,
        name,
        limits,
        sessions: Mutex::new(HashMap::new()),
        steps: Default::default(),
        batcher,
        decode,
    });
    spawn_sweeper(&state);
    Ok(Router::new()
        .route("/health", get(health))
        .route(FORWARD_PATH, post(forward))
        .fallback(wrong_route)
        .with_state(state))
}

async fn health(State(s): State<Arc<SplitState>>) -> Response {
    let open = s.sessions.lock().map(|m| m.len()).unwrap_or(0);
    let cfg = s.model.config();
    axum::Json(json!({
        "status": "ok", "model": s.name, "mode": "split-server",
        "width": cfg.hidden_size, "layers": s.model.num_layers(),
        "max_positions": cfg.max_position_embeddings,
        "key_fingerprint": umbra_aloepri::compiler::recorded_fingerprint(cfg),
        "sessions": open,
        "steps": s.steps.load(Ordering::Relaxed),
        "decode_batches": s.decode.0.load(Ordering::Relaxed),
        "decode_rows": s.decode.1.load(Ordering::Relaxed),
    }))
    .into_response()
}

async fn wrong_route(req: Request) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!(
            "no route for {} {}: this server holds only the transformer blocks of a split-mode \
             model and answers POST {FORWARD_PATH} (the client runs `umbra generate --server`)",
            req.method(),
            req.uri().path()
        ),
    )
    .into_response()
}

fn lock(s: &SplitState) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
    s.sessions.lock().unwrap_or_else(|p| p.into_inner())
}

async fn forward(State(s): State<Arc<SplitState>>, req: Request) -> Response {
    let r = async {
        let (parts, body) = req.into_parts();
        let bytes = read_body(
            body,
            &parts.headers,
            s.limits.max_body,
            s.limits.body_timeout,
        )
        .await?;
        match parse_step(&s, parse_json(bytes).await?)? {
            Step::Close(id) => close_only(&s, id),
            Step::Forward {
                session,
                rows,
                data,
                all,
                close,
            } => {
                let (id, cache) = take_session(&s, session.as_deref(), rows)?;
                let joined = run_step(&s, cache, data, rows, all).await;
                finish_step(&s, id, joined, if all { rows } else { 1 }, close)
            }
        }
    }
    .await;
    match r {
        Ok(r) => axum::Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Checks a request against the model and decodes its rows.
fn parse_step(s: &SplitState, r: ForwardRequest) -> Result<Step, ApiError> {
    let width = s.model.config().hidden_size;
    let all = match r.return_rows.as_deref() {
        None | Some("last") => false,
        Some("all") => true,
        Some(o) => {
            return Err(ApiError::bad_request(format!(
                "`return` must be \"last\" or \"all\", got \"{o}\""
            )))
        }
    };
    let Some(emb) = r.embeddings.as_deref() else {
        let id = r.session.clone().ok_or_else(|| {
            ApiError::bad_request("`embeddings` is required (or `session` with `close: true`)")
        })?;
        if !r.close {
            return Err(ApiError::bad_request(
                "`embeddings` is required unless the request only closes its session",
            ));
        }
        return Ok(Step::Close(id));
    };
    if r.width != width {
        return Err(ApiError::bad_request(format!(
            "`width` is {}, this model's hidden size is {width}",
            r.width
        )));
    }
    if r.rows == 0 {
        return Err(ApiError::bad_request("`rows` must be at least 1"));
    }
    let max_pos = s.model.config().max_position_embeddings;
    if r.rows > max_pos {
        return Err(ApiError::bad_request(format!(
            "{} rows exceed the model's {max_pos} positions",
            r.rows
        )));
    }
    let data = decode_f32(emb, r.rows * width, "embeddings").map_err(ApiError::bad_request)?;
    Ok(Step::Forward {
        session: r.session,
        rows: r.rows,
        data,
        all,
        close: r.close,
    })
}

fn close_only(s: &SplitState, id: String) -> Result<ForwardResponse, ApiError> {
    if lock(s).remove(&id).is_none() {
        return Err(unknown_session(&id));
    }
    Ok(ForwardResponse {
        session: id,
        position: 0,
        rows: 0,
        width: s.model.config().hidden_size,
        hidden: String::new(),
        closed: true,
    })
}

/// Takes the session's cache (or opens a session) under the lock; the step runs without it.
/// `rows` more positions must fit the model's context.
fn take_session(
    s: &SplitState,
    session: Option<&str>,
    rows: usize,
) -> Result<(String, KvCache), ApiError> {
    let (id, cache) = {
        let mut m = lock(s);
        let now = Instant::now();
        drop_idle(&mut m, s.limits.idle, now);
        match session {
            Some(id) => {
                let slot = m.get_mut(id).ok_or_else(|| unknown_session(id))?;
                let cache = slot.cache.take().ok_or_else(|| {
                    ApiError::new(
                        StatusCode::CONFLICT,
                        "invalid_request_error",
                        format!("session {id} is busy with another request"),
                    )
                })?;
                (id.to_string(), cache)
            }
            None => {
                if m.len() >= s.limits.max_sessions {
                    return Err(ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate_limit_error",
                        format!(
                            "{} split sessions are open (the limit); close one or retry later",
                            m.len()
                        ),
                    )
                    .with_retry_after(crate::engine::RETRY_AFTER_S));
                }
                let id = session_id();
                let slot = Slot {
                    cache: None,
                    last: now,
                };
                m.insert(id.clone(), slot);
                (id, s.model.new_cache())
            }
        }
    };
    let max_pos = s.model.config().max_position_embeddings;
    if cache.len() + rows > max_pos {
        let pos = cache.len();
        put_back(s, &id, cache);
        return Err(ApiError::bad_request(format!(
            "session at {pos} positions + {rows} rows exceeds the model's {max_pos} positions"
        )));
    }
    Ok((id, cache))
}

/// Runs the step: a decode step (one row, last hidden state, on a prefilled cache) on the
/// batcher with other sessions' steps; anything else on a blocking thread, in chunks of at
/// most `prefill_chunk` rows.
async fn run_step(
    s: &SplitState,
    cache: KvCache,
    data: Vec<f32>,
    rows: usize,
    all: bool,
) -> Result<StepResult, String> {
    let stopped = || "the decode batcher stopped".to_string();
    if rows == 1 && !all && !cache.is_empty() {
        let (reply, answer) = tokio::sync::oneshot::channel();
        s.batcher
            .send(DecodeJob {
                x: data,
                cache,
                reply,
            })
            .map_err(|_| stopped())?;
        return answer.await.map_err(|_| stopped());
    }
    let (model, chunk) = (s.model.clone(), s.limits.prefill_chunk.max(1));
    tokio::task::spawn_blocking(move || {
        let mut cache = cache;
        let out = prefill_rows(&model, &mut cache, &data, rows, all, chunk);
        (cache, out.map_err(|e| e.to_string()))
    })
    .await
    .map_err(|e| e.to_string())
}

/// `rows` input rows through the blocks, `chunk` rows per forward; the hidden states of every
/// row (`all`) or of the last.
fn prefill_rows(
    model: &Llama,
    cache: &mut KvCache,
    data: &[f32],
    rows: usize,
    all: bool,
    chunk: usize,
) -> Result<Vec<f32>, umbra_model::ModelError> {
    let width = model.config().hidden_size;
    let mut out = vec![];
    let mut r = 0;
    while r < rows {
        let n = chunk.min(rows - r);
        let x = Tensor::from_vec(
            data[r * width..(r + n) * width].to_vec(),
            (1, n, width),
            &Device::Cpu,
        )?;
        let h = model.forward(Input::Embeds(&x), cache, Forward::hidden())?;
        r += n;
        if all {
            out.extend(h.flatten_all()?.to_vec1::<f32>()?);
        } else if r == rows {
            out = h.narrow(1, n - 1, 1)?.flatten_all()?.to_vec1::<f32>()?;
        }
    }
    Ok(out)
}

/// Puts the cache back (or drops the session on failure or `close`) and answers.
fn finish_step(
    s: &SplitState,
    id: String,
    joined: Result<StepResult, String>,
    rows: usize,
    close: bool,
) -> Result<ForwardResponse, ApiError> {
    let failed = |msg: String| {
        // A failed step may have left the cache half-appended: drop the session.
        lock(s).remove(&id);
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", msg)
    };
    let (cache, out) = joined.map_err(|e| failed(format!("the forward step failed: {e}")))?;
    let hidden =
        out.map_err(|e| failed(format!("the forward step failed (session dropped): {e}")))?;
    let position = cache.len();
    s.steps.fetch_add(1, Ordering::Relaxed);
    if close {
        lock(s).remove(&id);
    } else {
        put_back(s, &id, cache);
    }
    Ok(ForwardResponse {
        session: id,
        position,
        rows,
        width: s.model.config().hidden_size,
        hidden: encode_f32(&hidden),
        closed: close,
    })
}

/// Drops the sessions idle for `idle` or longer (a session whose step is running is not idle).
fn drop_idle(m: &mut HashMap<String, Slot>, idle: Duration, now: Instant) {
    m.retain(|_, slot| slot.cache.is_none() || now.duration_since(slot.last) < idle);
}

/// Frees idle sessions' caches on a timer too, not only when the next request comes: a server
/// nobody calls any more would otherwise hold them. The task ends with the router's state.
/// Outside a tokio runtime (no server to run) there is nothing to sweep for.
fn spawn_sweeper(state: &Arc<SplitState>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let weak = Arc::downgrade(state);
    let idle = state.limits.idle;
    let period = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
    rt.spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(s) = weak.upgrade() else { break };
            drop_idle(&mut lock(&s), idle, Instant::now());
        }
    });
}

/// An unguessable session id (128 random bits), so that no other client can step or read a
/// session it did not open.
fn session_id() -> String {
    use rand::Rng;
    let v: u128 = rand::rng().random();
    format!("split-{v:032x}")
}

fn put_back(s: &SplitState, id: &str, cache: KvCache) {
    if let Some(slot) = lock(s).get_mut(id) {
        slot.cache = Some(cache);
        slot.last = Instant::now();
    }
}

fn unknown_session(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("no open split session {id} (closed, expired after idling, or never opened)"),
    )
}
