//! Split-mode serving (beyond the paper): the server holds only the transformer blocks of an
//! exact obfuscation ([`umbra_aloepri::split`]); the client holds the embedding, final norm, head
//! and key, and generates by sending input embeddings and reading back final hidden states.
//!
//! Wire format (`POST /v1/split/forward`, JSON; tensors are little-endian F32, base64):
//!
//! ```text
//! request  {"session": null | "split-..", "rows": n, "width": d', "embeddings": b64([n, d']),
//!           "return": "last" | "all", "close": false}
//! response {"session": "split-..", "position": L, "rows": m, "width": d', "hidden": b64([m, d'])}
//! ```
//!
//! `session: null` opens a session (its KV cache stays on the server); later requests append
//! to it. `close: true` drops it after the step (with no `embeddings`: only drops it). Sessions
//! idle longer than the server's limit are dropped; at most `max_sessions` are open (429 beyond),
//! each with a KV cache of at most the model's context, which bounds the server's memory.
//! `hidden` holds the residual stream after the last block (before the final norm) of the last
//! row (`return: "last"`, the default) or of every row sent.
//!
//! Decode steps (one row on an open session) of concurrent sessions are batched: a batcher
//! thread takes every step waiting and runs them as one
//! [`Llama::forward_groups`] (one GEMM per weight over all rows), so many clients
//! share the server's compute as they do in token mode. Prompts run on their own.
//!
//! [`SplitClient`] is the other side: ids -> tau -> embedding rows -> server -> head -> sample.
use crate::api::{parse_body, ApiError};
use crate::error::ServeError;
use crate::server::read_body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use umbra_model::checkpoint::Checkpoint;
use umbra_model::generate::{generate_with, GenerateOutput, GenerateParams};
use umbra_model::llama::{KvCache, Llama};
use umbra_model::tokenizer::TextTokenizer;
use umbra_model::ModelPart;
use umbra_model::{Forward, Input};

/// The route split-mode clients call.
pub const FORWARD_PATH: &str = "/v1/split/forward";

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// F32 little-endian, base64.
pub fn encode_f32(v: &[f32]) -> String {
    let mut bytes = Vec::with_capacity(v.len() * 4);
    for x in v {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    B64.encode(bytes)
}

/// Inverse of [`encode_f32`]; `expect` floats, every one finite.
pub fn decode_f32(s: &str, expect: usize, what: &str) -> Result<Vec<f32>, String> {
    let bytes = B64
        .decode(s)
        .map_err(|e| format!("`{what}` is not valid base64: {e}"))?;
    if bytes.len() != expect * 4 {
        return Err(format!(
            "`{what}` holds {} bytes, rows x width needs {} (F32)",
            bytes.len(),
            expect * 4
        ));
    }
    let v: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if v.iter().any(|x| !x.is_finite()) {
        return Err(format!("`{what}` has non-finite values"));
    }
    Ok(v)
}

/// `POST /v1/split/forward` body.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ForwardRequest {
    #[serde(default)]
    pub session: Option<String>,
    #[serde(default)]
    pub rows: usize,
    #[serde(default)]
    pub width: usize,
    #[serde(default)]
    pub embeddings: Option<String>,
    /// `"last"` (default) or `"all"`.
    #[serde(default, rename = "return")]
    pub return_rows: Option<String>,
    #[serde(default)]
    pub close: bool,
}

/// `POST /v1/split/forward` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardResponse {
    pub session: String,
    /// Positions in the session's cache after this step.
    pub position: usize,
    pub rows: usize,
    pub width: usize,
    pub hidden: String,
    #[serde(default)]
    pub closed: bool,
}

/// Limits of the split-mode server.
#[derive(Debug, Clone)]
pub struct SplitLimits {
    pub max_sessions: usize,
    pub idle: Duration,
    pub max_body: usize,
    pub body_timeout: Duration,
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

/// What a step's forward gives back: the session's cache, and the hidden rows or why not.
type StepResult = (KvCache, Result<Vec<f32>, String>);

/// One decode step waiting for the batcher: one row `[1, 1, d']` on a session's prefilled cache.
struct DecodeJob {
    x: Vec<f32>,
    cache: KvCache,
    reply: tokio::sync::oneshot::Sender<StepResult>,
}

/// Starts a thread that takes every job waiting (at most `max`) and hands them to `run`
/// together, so concurrent callers share one forward. It ends when the last sender is gone.
fn spawn_batcher<J: Send + 'static>(
    name: &str,
    max: usize,
    mut run: impl FnMut(Vec<J>) + Send + 'static,
) -> Result<std::sync::mpsc::Sender<J>, ServeError> {
    let (tx, rx) = std::sync::mpsc::channel::<J>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut jobs = vec![first];
                while jobs.len() < max {
                    match rx.try_recv() {
                        Ok(j) => jobs.push(j),
                        Err(_) => break,
                    }
                }
                run(jobs);
            }
        })?;
    Ok(tx)
}

/// One batched decode forward; every job gets its cache back with its row or the error.
fn run_batch(model: &Llama, jobs: Vec<DecodeJob>) {
    let d = model.config().hidden_size;
    let mut caches = Vec::with_capacity(jobs.len());
    let mut replies = Vec::with_capacity(jobs.len());
    let mut xs = Vec::with_capacity(jobs.len());
    for j in jobs {
        xs.push(Tensor::from_vec(j.x, (1, 1, d), &Device::Cpu));
        caches.push(j.cache);
        replies.push(j.reply);
    }
    let out = (|| -> Result<Vec<Vec<f32>>, umbra_model::ModelError> {
        let xs = xs.into_iter().collect::<Result<Vec<_>, _>>()?;
        let mut groups: Vec<(Input, &mut KvCache)> = xs
            .iter()
            .map(Input::Embeds)
            .zip(caches.iter_mut())
            .collect();
        let hs = model.forward_groups(&mut groups, Forward::hidden())?;
        Ok(hs
            .iter()
            .map(|h| h.flatten_all()?.to_vec1::<f32>())
            .collect::<Result<_, _>>()?)
    })();
    match out {
        Ok(hs) => {
            for ((c, r), h) in caches.into_iter().zip(replies).zip(hs) {
                let _ = r.send((c, Ok(h)));
            }
        }
        Err(e) => {
            for (c, r) in caches.into_iter().zip(replies) {
                let _ = r.send((c, Err(e.to_string())));
            }
        }
    }
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
            run_batch(&model, jobs);
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
    axum::Json(json!({
        "status": "ok", "model": s.name, "mode": "split-server",
        "width": s.model.config().hidden_size, "layers": s.model.num_layers(),
        "max_positions": s.model.config().max_position_embeddings,
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
    match forward_inner(&s, req).await {
        Ok(r) => axum::Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn forward_inner(s: &Arc<SplitState>, req: Request) -> Result<ForwardResponse, ApiError> {
    let (parts, body) = req.into_parts();
    let bytes = read_body(
        body,
        &parts.headers,
        s.limits.max_body,
        s.limits.body_timeout,
    )
    .await?;
    let r: ForwardRequest = parse_body(&bytes)?;
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
        // Close only.
        let id = r.session.clone().ok_or_else(|| {
            ApiError::bad_request("`embeddings` is required (or `session` with `close: true`)")
        })?;
        if !r.close {
            return Err(ApiError::bad_request(
                "`embeddings` is required unless the request only closes its session",
            ));
        }
        let removed = lock(s).remove(&id).is_some();
        if !removed {
            return Err(unknown_session(&id));
        }
        return Ok(ForwardResponse {
            session: id,
            position: 0,
            rows: 0,
            width,
            hidden: String::new(),
            closed: true,
        });
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
    // Take the session's cache (or open one) under the lock; the step runs without it.
    let (id, cache) = {
        let mut m = lock(s);
        let now = Instant::now();
        drop_idle(&mut m, s.limits.idle, now);
        match &r.session {
            Some(id) => {
                let slot = m.get_mut(id).ok_or_else(|| unknown_session(id))?;
                let cache = slot.cache.take().ok_or_else(|| {
                    ApiError::new(
                        StatusCode::CONFLICT,
                        "invalid_request_error",
                        format!("session {id} is busy with another request"),
                    )
                })?;
                (id.clone(), cache)
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
                    ));
                }
                let id = session_id();
                m.insert(
                    id.clone(),
                    Slot {
                        cache: None,
                        last: now,
                    },
                );
                (id, s.model.new_cache())
            }
        }
    };
    if cache.len() + r.rows > max_pos {
        let pos = cache.len();
        put_back(s, &id, cache);
        return Err(ApiError::bad_request(format!(
            "session at {pos} positions + {} rows exceeds the model's {max_pos} positions",
            r.rows
        )));
    }
    let rows = r.rows;
    let joined: Result<StepResult, String> = if rows == 1 && !all && !cache.is_empty() {
        // a decode step: batched with the other sessions' steps
        let (reply, answer) = tokio::sync::oneshot::channel();
        match s.batcher.send(DecodeJob {
            x: data,
            cache,
            reply,
        }) {
            Ok(()) => answer
                .await
                .map_err(|_| "the decode batcher stopped".to_string()),
            Err(_) => Err("the decode batcher stopped".to_string()),
        }
    } else {
        let model = s.model.clone();
        tokio::task::spawn_blocking(move || {
            let mut cache = cache;
            let out = (|| -> Result<Vec<f32>, umbra_model::ModelError> {
                let x = Tensor::from_vec(data, (1, rows, width), &Device::Cpu)?;
                let h = model.forward(Input::Embeds(&x), &mut cache, Forward::hidden())?;
                let h = if all { h } else { h.narrow(1, rows - 1, 1)? };
                Ok(h.flatten_all()?.to_vec1::<f32>()?)
            })();
            (cache, out.map_err(|e| e.to_string()))
        })
        .await
        .map_err(|e| e.to_string())
    };
    let (cache, out) = match joined {
        Ok(x) => x,
        Err(e) => {
            lock(s).remove(&id);
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!("the forward step failed: {e}"),
            ));
        }
    };
    let position = cache.len();
    match out {
        Ok(hidden) => {
            s.steps.fetch_add(1, Ordering::Relaxed);
            if r.close {
                lock(s).remove(&id);
            } else {
                put_back(s, &id, cache);
            }
            Ok(ForwardResponse {
                session: id,
                position,
                rows: if all { rows } else { 1 },
                width,
                hidden: encode_f32(&hidden),
                closed: r.close,
            })
        }
        Err(e) => {
            // A failed step may have left the cache half-appended: drop the session.
            lock(s).remove(&id);
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!("the forward step failed (session dropped): {e}"),
            ))
        }
    }
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

/// What one split-mode generation cost, measured on the client.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SplitStats {
    pub round_trips: usize,
    pub bytes_sent: usize,
    pub bytes_received: usize,
    /// Seconds in the client's embedding and head.
    pub client_s: f64,
    /// Seconds waiting for the server (network and blocks).
    pub server_s: f64,
}

/// One hidden row waiting for the client's batched head.
struct HeadJob {
    h: Vec<f32>,
    reply: std::sync::mpsc::SyncSender<Result<Vec<f32>, String>>,
}

/// Final norm and head over every waiting row at once (`[B, d']` -> `[B, V]`, one GEMM): the
/// head is the client's largest weight, so concurrent generations share one pass over it.
fn run_head_batch(model: &Llama, jobs: Vec<HeadJob>) {
    let d = model.config().hidden_size;
    let n = jobs.len();
    let mut flat = Vec::with_capacity(n * d);
    for j in &jobs {
        flat.extend_from_slice(&j.h);
    }
    let out = (|| -> Result<Vec<Vec<f32>>, umbra_model::ModelError> {
        let t = Tensor::from_vec(flat, (n, d), &Device::Cpu)?;
        Ok(model.head(&t)?.to_vec2::<f32>()?)
    })();
    match out {
        Ok(rows) => {
            for (j, r) in jobs.into_iter().zip(rows) {
                let _ = j.reply.send(Ok(r));
            }
        }
        Err(e) => {
            for j in jobs {
                let _ = j.reply.send(Err(e.to_string()));
            }
        }
    }
}

/// The client of split mode: the client part (embedding, final norm, head), the tokenizer and
/// tau; the server runs the blocks. Shareable across threads: concurrent generations' heads
/// run batched.
pub struct SplitClient {
    model: Arc<Llama>,
    head: std::sync::mpsc::Sender<HeadJob>,
    pub tokenizer: TextTokenizer,
    tau: umbra_aloepri::TokenPermutation,
    pub stop_ids: Vec<u32>,
    http: reqwest::Client,
    url: String,
    timeout: Duration,
}

impl SplitClient {
    /// Opens the client part at `dir` with its key and checks the server at `server` (its
    /// `/health` must report a split server of the same width).
    pub fn open(
        dir: &Path,
        key: &Path,
        server: &str,
        timeout: Duration,
    ) -> Result<Self, ServeError> {
        let key = umbra_aloepri::ClientKey::load(key)?;
        umbra_aloepri::compiler::check_key_for(dir, &key)?;
        let ck = Checkpoint::open(dir)?;
        if ck.config.part() != ModelPart::Client {
            return Err(ServeError::Config(format!(
                "{} is not the client part of a split model (`umbra obfuscate --split` writes \
                 <out>/client)",
                dir.display()
            )));
        }
        let tokenizer = ck
            .tokenizer
            .clone()
            .ok_or_else(|| ServeError::Config(format!("{} has no tokenizer", dir.display())))?;
        let model = Llama::new_part(&ck.config, &ck.weights, &Device::Cpu)?;
        let model = Arc::new(model);
        let head = {
            let model = model.clone();
            spawn_batcher("split-head", 64, move |jobs| run_head_batch(&model, jobs))?
        };
        Ok(Self {
            model,
            head,
            tokenizer,
            tau: key.permutation()?,
            stop_ids: ck.eos_token_ids(),
            http: reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .map_err(|e| ServeError::Other(format!("http client: {e}")))?,
            url: server.trim_end_matches('/').to_string(),
            timeout,
        })
    }

    pub fn width(&self) -> usize {
        self.model.config().hidden_size
    }

    /// The model's context in tokens.
    pub fn max_positions(&self) -> usize {
        self.model.config().max_position_embeddings
    }

    /// Checks that the server is a split server of this width.
    pub async fn check_server(&self) -> Result<(), ServeError> {
        let url = format!("{}/health", self.url);
        let v: serde_json::Value = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| ServeError::Other(format!("{url}: {e}")))?
            .json()
            .await
            .map_err(|e| ServeError::Other(format!("{url}: not a JSON health answer: {e}")))?;
        if v["mode"] != "split-server" {
            return Err(ServeError::Config(format!(
                "{} is not a split-mode server (serve the server part of `umbra obfuscate \
                 --split` with `umbra serve`)",
                self.url
            )));
        }
        if v["width"].as_u64() != Some(self.width() as u64) {
            return Err(ServeError::Config(format!(
                "the server's width is {}, this client part's is {}: they are not parts of \
                 the same model",
                v["width"],
                self.width()
            )));
        }
        Ok(())
    }

    /// Rows per request when a prompt is sent (longer prompts go in several requests, so a
    /// request stays far below the server's body limit).
    pub const ROWS_PER_REQUEST: usize = 256;

    /// One step: sends `x` (`[n, d']` rows) and returns the server's hidden state of the last.
    pub async fn step(
        &self,
        session: Option<&str>,
        x: Vec<f32>,
        rows: usize,
        stats: &mut SplitStats,
    ) -> Result<ForwardResponse, ServeError> {
        let body = serde_json::to_vec(&ForwardRequest {
            session: session.map(str::to_string),
            rows,
            width: self.width(),
            embeddings: Some(encode_f32(&x)),
            return_rows: None,
            close: false,
        })
        .expect("json");
        stats.bytes_sent += body.len();
        stats.round_trips += 1;
        let url = format!("{}{FORWARD_PATH}", self.url);
        let t = Instant::now();
        let resp = self
            .http
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| ServeError::unreachable(&url, &e))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ServeError::unreachable(&url, &e))?;
        stats.server_s += t.elapsed().as_secs_f64();
        stats.bytes_received += bytes.len();
        if !status.is_success() {
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            let msg = v["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ServeError::Upstream {
                status: status.as_u16(),
                message: format!("{url}: {status}: {msg}"),
            });
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| ServeError::Other(format!("{url}: malformed answer: {e}")))
    }

    /// Best effort: drops the session on the server.
    pub async fn close(&self, session: &str) {
        let body = json!({"session": session, "close": true});
        let _ = self
            .http
            .post(format!("{}{FORWARD_PATH}", self.url))
            .timeout(self.timeout.min(Duration::from_secs(5)))
            .json(&body)
            .send()
            .await;
    }

    /// Embedding rows of plaintext ids, as the server receives them (`[n, d']`, flat).
    pub fn embed_plain(&self, plain: &[u32]) -> Result<Vec<f32>, ServeError> {
        let ids = self.tau.apply(plain)?;
        let t = Tensor::from_vec(ids, (1, plain.len()), &Device::Cpu)
            .map_err(umbra_model::ModelError::from)?;
        let x = self.model.embed(&t)?;
        Ok(x.flatten_all()
            .and_then(|x| x.to_vec1::<f32>())
            .map_err(umbra_model::ModelError::from)?)
    }

    /// Final norm and head on one hidden row -> logits over *plaintext* ids. The head runs on
    /// the client's head batcher, batched with other generations' rows waiting at that moment.
    /// Blocks until it is done.
    fn logits(&self, h: Vec<f32>) -> Result<Vec<f32>, ServeError> {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        let stopped = || ServeError::Other("the client's head batcher stopped".into());
        self.head
            .send(HeadJob { h, reply })
            .map_err(|_| stopped())?;
        let obf = answer
            .recv()
            .map_err(|_| stopped())?
            .map_err(ServeError::Other)?;
        // logits over obfuscated ids: plain id i sits at tau(i).
        let tau = self.tau.forward_table();
        Ok((0..obf.len()).map(|i| obf[tau[i] as usize]).collect())
    }

    /// Generates from plaintext prompt ids; `on_token` sees each plaintext id. Runs the
    /// embedding and head here and the blocks on the server, one round trip per token. Call
    /// from a thread that may block (not a runtime worker): HTTP runs on `rt`.
    pub fn generate(
        &self,
        rt: &tokio::runtime::Handle,
        prompt: &[u32],
        params: &GenerateParams,
        on_token: impl FnMut(u32) -> bool,
    ) -> Result<(GenerateOutput, SplitStats), ServeError> {
        let mut stats = SplitStats::default();
        let mut session: Option<String> = None;
        let max_pos = self.max_positions();
        let out = generate_with(
            prompt,
            params,
            max_pos,
            |ids| -> Result<Vec<f32>, ServeError> {
                let mut last = None;
                for chunk in ids.chunks(Self::ROWS_PER_REQUEST) {
                    let t = Instant::now();
                    let x = self.embed_plain(chunk)?;
                    stats.client_s += t.elapsed().as_secs_f64();
                    let r =
                        rt.block_on(self.step(session.as_deref(), x, chunk.len(), &mut stats))?;
                    session = Some(r.session.clone());
                    last = Some(r);
                }
                let r = last.ok_or_else(|| ServeError::Other("empty step".into()))?;
                let h = decode_f32(&r.hidden, self.width(), "hidden").map_err(ServeError::Other)?;
                let t = Instant::now();
                let l = self.logits(h)?;
                stats.client_s += t.elapsed().as_secs_f64();
                Ok(l)
            },
            on_token,
        );
        if let Some(s) = &session {
            rt.block_on(self.close(s));
        }
        Ok((out?, stats))
    }
}
