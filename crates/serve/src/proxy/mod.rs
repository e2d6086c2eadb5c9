//! The customer's proxy: speaks the OpenAI API in plaintext to local apps, holds the AloePri key
//! and the public tokenizer, and sends the server only tau-permuted token ids.
//!
//! Every request (chat or completion) goes upstream as `POST /v1/completions` with a token-id
//! prompt, `stream: true` and `return_text: false`; the streamed ids are mapped back through
//! tau^-1 and detokenized here (incrementally, never splitting a UTF-8 character), with stop
//! sequences applied on the plaintext and usage counted here. Dropping the upstream stream
//! (stop sequence hit, client gone) makes the server free the slot.
//!
//! With [`ProxyConfig::split_client`] the proxy is the client of split mode instead: it holds
//! the client part (embedding, final norm, head) and runs generation itself through
//! [`SplitClient`], the upstream (a split-mode `umbra serve`) running only the blocks. Apps see
//! the same OpenAI API either way.
use crate::api::{self, parse_body, ApiError, ChatRequest, CompletionRequest, GenOptions, Prompt};
use crate::engine::{Event, Finish, TokenLogprob};
use crate::error::ServeError;
use crate::respond::{respond, RespondCtx};
use crate::server::{not_found, read_body};
use crate::split::SplitClient;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::StreamExt;
use serde_json::{json, Value};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;
use tokio::sync::mpsc;
use umbra_aloepri::{ClientKey, TokenPermutation};
use umbra_model::checkpoint::Checkpoint;
use umbra_model::generate::{FinishReason, GenerateParams};
use umbra_model::sampling::SamplingParams;
use umbra_model::tokenizer::TextTokenizer;

/// Proxy settings.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// `client.key` written by the obfuscation compiler.
    pub key: PathBuf,
    /// The plaintext model folder (or `.gguf`) whose public tokenizer and config are used
    /// (ignored with `split_client`, whose folder has both).
    pub tokenizer: PathBuf,
    /// Split mode: the client part written by `umbra obfuscate --split` (`<out>/client`); the
    /// upstream is then a split-mode server.
    pub split_client: Option<PathBuf>,
    /// Base URL of `umbra serve`, e.g. `http://127.0.0.1:8000`.
    pub upstream: String,
    pub addr: SocketAddr,
    /// Longest wait for the upstream's headers or its next chunk.
    pub upstream_timeout: Duration,
    pub max_body_bytes: usize,
    pub body_timeout: Duration,
    pub header_timeout: Duration,
    /// Largest `max_tokens` the proxy asks for when a chat request sets none.
    pub default_max_tokens_limit: usize,
}

impl ProxyConfig {
    pub fn new(
        key: PathBuf,
        tokenizer: PathBuf,
        upstream: impl Into<String>,
        addr: SocketAddr,
    ) -> Self {
        Self {
            key,
            tokenizer,
            split_client: None,
            upstream: upstream.into(),
            addr,
            upstream_timeout: Duration::from_secs(60),
            max_body_bytes: 4 << 20,
            body_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            default_max_tokens_limit: 4096,
        }
    }
}

/// How the proxy gets its tokens.
enum Backend {
    /// An OpenAI-compatible `umbra serve` of the obfuscated checkpoint: tau-permuted ids in
    /// and out.
    Tokens(TokenPermutation),
    /// A split-mode server: the proxy runs the client part and generation itself.
    Split(Arc<SplitClient>),
}

struct ProxyState {
    backend: Backend,
    /// The model name answers carry when a request names none.
    model_name: String,
    tok: Arc<TextTokenizer>,
    max_positions: usize,
    upstream: String,
    client: reqwest::Client,
    cfg: ProxyConfig,
    stats: Arc<ProxyStats>,
}

/// The proxy's own processing time per request: parsing, id mapping both ways, upstream
/// request building and chunk parsing; tokenization, detokenization and waiting excluded.
#[derive(Debug, Default)]
struct ProxyStats {
    requests: AtomicU64,
    overhead_ns: AtomicU64,
}

/// Adds the time it accumulates to [`ProxyStats`] when dropped (however the request ends).
struct OverheadGuard {
    stats: Arc<ProxyStats>,
    ns: u64,
}

impl Drop for OverheadGuard {
    fn drop(&mut self) {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.stats.overhead_ns.fetch_add(self.ns, Ordering::Relaxed);
    }
}

/// Loads the key and tokenizer and binds; returns the bound address and the serving future.
pub async fn run_proxy(
    cfg: ProxyConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, impl Future<Output = ()> + Send + 'static), ServeError> {
    let (backend, tok, max_positions) = match &cfg.split_client {
        Some(dir) => {
            let (dir, key, up, timeout) = (
                dir.clone(),
                cfg.key.clone(),
                cfg.upstream.clone(),
                cfg.upstream_timeout,
            );
            // loading the client part reads ~230 MB of weights: off the runtime's workers
            let split =
                tokio::task::spawn_blocking(move || SplitClient::open(&dir, &key, &up, timeout))
                    .await
                    .map_err(|e| ServeError::Other(format!("loading the client part: {e}")))??;
            split.check_server().await?;
            let tok = split.tokenizer.clone();
            let max_positions = split.max_positions();
            (Backend::Split(Arc::new(split)), tok, max_positions)
        }
        None => {
            let key = ClientKey::load(&cfg.key)?;
            let tau = key.permutation()?;
            let (mcfg, tok) = Checkpoint::open_config_and_tokenizer(&cfg.tokenizer)?;
            let tok = tok.ok_or_else(|| {
                ServeError::Config(format!("{}: no tokenizer found", cfg.tokenizer.display()))
            })?;
            if tau.vocab_size() != mcfg.vocab_size {
                return Err(ServeError::Config(format!(
                    "the key's permutation covers {} tokens but {} has a vocabulary of {}; wrong key or tokenizer",
                    tau.vocab_size(),
                    cfg.tokenizer.display(),
                    mcfg.vocab_size
                )));
            }
            (Backend::Tokens(tau), tok, mcfg.max_position_embeddings)
        }
    };
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .build()
        .map_err(|e| ServeError::Other(format!("http client: {e}")))?;
    let model_name = match &cfg.split_client {
        Some(dir) => split_model_name(dir),
        None => "umbra".to_string(),
    };
    let state = Arc::new(ProxyState {
        backend,
        model_name,
        tok: Arc::new(tok),
        max_positions,
        upstream: cfg.upstream.trim_end_matches('/').to_string(),
        client,
        cfg: cfg.clone(),
        stats: Arc::default(),
    });
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .fallback(not_found)
        .with_state(state);
    Ok(crate::http::bind(cfg.addr, app, cfg.header_timeout, shutdown).await?)
}

/// A running proxy.
pub type ProxyHandle = crate::http::Handle;

/// [`run_proxy`] on a spawned task.
pub async fn start_proxy(cfg: ProxyConfig) -> Result<ProxyHandle, ServeError> {
    crate::http::spawn(|shutdown| run_proxy(cfg, shutdown)).await
}

fn upstream_error(s: &ProxyState, e: reqwest::Error) -> ApiError {
    if e.is_timeout() {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_error",
            format!("upstream {} timed out: {e}", s.upstream),
        )
    } else {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            format!("upstream {} is unreachable: {e}", s.upstream),
        )
    }
}

fn timeout_error(s: &ProxyState) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "upstream_error",
        format!(
            "upstream {} did not answer within {} s",
            s.upstream,
            s.cfg.upstream_timeout.as_secs_f64()
        ),
    )
}

/// An upstream 4xx/5xx passed on with its status and message.
async fn relay_error(resp: reqwest::Response) -> ApiError {
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let body = resp.bytes().await.unwrap_or_default();
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let msg = v["error"]["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    let kind = match v["error"]["type"].as_str() {
        Some("invalid_request_error") => "invalid_request_error",
        Some("rate_limit_error") => "rate_limit_error",
        _ => "upstream_error",
    };
    let mut e = ApiError::new(status, kind, format!("upstream: {msg}"));
    if let Some(c) = v["error"]["code"].as_str() {
        e.code = match c {
            "model_not_found" => Some("model_not_found"),
            "context_length_exceeded" => Some("context_length_exceeded"),
            "queue_full" => Some("queue_full"),
            _ => None,
        };
    }
    e
}

async fn health(State(s): State<Arc<ProxyState>>) -> Response {
    let mode = match s.backend {
        Backend::Tokens(_) => "tokens",
        Backend::Split(_) => "split-client",
    };
    axum::Json(json!({"status": "ok", "upstream": s.upstream, "mode": mode})).into_response()
}

async fn metrics(State(s): State<Arc<ProxyState>>) -> Response {
    let n = s.stats.requests.load(Ordering::Relaxed);
    let ns = s.stats.overhead_ns.load(Ordering::Relaxed);
    let text = format!(
        "# HELP umbra_proxy_overhead_seconds Proxy processing per request (tokenization and waiting excluded).\n\
         # TYPE umbra_proxy_overhead_seconds summary\n\
         umbra_proxy_overhead_seconds_sum {:.9}\numbra_proxy_overhead_seconds_count {n}\n",
        ns as f64 * 1e-9
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
        .into_response()
}

async fn models(State(s): State<Arc<ProxyState>>) -> Response {
    if let Backend::Split(_) = s.backend {
        // a split server has no model list; the model is the client part's
        let id = &s.model_name;
        return axum::Json(json!({"object": "list", "data": [
            {"id": id, "object": "model", "created": 0, "owned_by": "umbra"}
        ]}))
        .into_response();
    }
    let fut = s.client.get(format!("{}/v1/models", s.upstream)).send();
    let r = match tokio::time::timeout(s.cfg.upstream_timeout, fut).await {
        Err(_) => return timeout_error(&s).into_response(),
        Ok(Err(e)) => return upstream_error(&s, e).into_response(),
        Ok(Ok(r)) => r,
    };
    if !r.status().is_success() {
        return relay_error(r).await.into_response();
    }
    match r.json::<Value>().await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => upstream_error(&s, e).into_response(),
    }
}

async fn completions(State(s): State<Arc<ProxyState>>, req: Request) -> Response {
    completions_inner(&s, req)
        .await
        .unwrap_or_else(|e| e.into_response())
}

async fn chat(State(s): State<Arc<ProxyState>>, req: Request) -> Response {
    chat_inner(&s, req)
        .await
        .unwrap_or_else(|e| e.into_response())
}

async fn completions_inner(s: &ProxyState, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let body = read_body(
        body,
        &parts.headers,
        s.cfg.max_body_bytes,
        s.cfg.body_timeout,
    )
    .await?;
    let r: CompletionRequest = parse_body(&body)?;
    let opts = r.options()?;
    let t0 = Instant::now();
    let mut tok_time = std::time::Duration::ZERO;
    let ids = match api::parse_prompt(r.prompt.as_ref())? {
        Prompt::Ids(ids) => ids,
        Prompt::Text(t) => {
            let tt = Instant::now();
            let ids = crate::text::text_prompt_ids(&s.tok, &t)?;
            tok_time = tt.elapsed();
            ids
        }
    };
    forward(s, false, r.model, ids, opts, (t0, tok_time)).await
}

async fn chat_inner(s: &ProxyState, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let body = read_body(
        body,
        &parts.headers,
        s.cfg.max_body_bytes,
        s.cfg.body_timeout,
    )
    .await?;
    let r: ChatRequest = parse_body(&body)?;
    let mut opts = r.options()?;
    let messages = api::parse_messages(r.messages.as_ref())?;
    let t0 = Instant::now();
    let ids = crate::text::chat_prompt_ids(&s.tok, &messages)?;
    let tok_time = t0.elapsed();
    if opts.max_tokens.is_none() {
        let room = s
            .max_positions
            .saturating_sub(ids.len())
            .min(s.cfg.default_max_tokens_limit);
        opts.max_tokens = Some(room.max(1));
    }
    forward(s, true, r.model, ids, opts, (t0, tok_time)).await
}

/// Maps the prompt through tau, calls the server with ids and answers from the mapped-back stream.
async fn forward(
    s: &ProxyState,
    chat: bool,
    model: Option<String>,
    ids: Vec<u32>,
    opts: GenOptions,
    (t0, tok_time): (Instant, std::time::Duration),
) -> Result<Response, ApiError> {
    if ids.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty"));
    }
    let tau = match &s.backend {
        Backend::Tokens(tau) => tau,
        Backend::Split(split) => return forward_split(s, split, chat, model, ids, opts).await,
    };
    let obf = tau
        .apply(&ids)
        .map_err(|e| ApiError::bad_request(format!("prompt: {e}")))?;
    let mut body = json!({
        "prompt": obf, "stream": true, "return_text": false,
        "temperature": opts.temperature, "max_tokens": opts.max_tokens,
    });
    let o = body.as_object_mut().expect("object");
    if let Some(m) = &model {
        o.insert("model".into(), json!(m));
    }
    if let Some(p) = opts.top_p {
        o.insert("top_p".into(), json!(p));
    }
    if let Some(k) = opts.top_k {
        o.insert("top_k".into(), json!(k));
    }
    if let Some(seed) = opts.seed {
        o.insert("seed".into(), json!(seed as i64));
    }
    if let Some(k) = opts.logprobs {
        o.insert("logprobs".into(), json!(k));
    }
    let req = s
        .client
        .post(format!("{}/v1/completions", s.upstream))
        .json(&body);
    let guard = OverheadGuard {
        stats: s.stats.clone(),
        ns: t0.elapsed().saturating_sub(tok_time).as_nanos() as u64,
    };
    let fut = req.send();
    let resp = match tokio::time::timeout(s.cfg.upstream_timeout, fut).await {
        Err(_) => return Err(timeout_error(s)),
        Ok(Err(e)) => return Err(upstream_error(s, e)),
        Ok(Ok(r)) => r,
    };
    if !resp.status().is_success() {
        return Err(relay_error(resp).await);
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let tau = tau.clone();
    let idle = s.cfg.upstream_timeout;
    let up = s.upstream.clone();
    tokio::spawn(async move {
        let mut guard = guard;
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = vec![];
        loop {
            let next = tokio::select! {
                n = tokio::time::timeout(idle, stream.next()) => n,
                _ = tx.closed() => return,
            };
            let chunk = match next {
                Err(_) => {
                    let _ = tx.send(Event::Error(format!(
                        "upstream {up} stalled for {} s",
                        idle.as_secs_f64()
                    )));
                    return;
                }
                Ok(None) => {
                    let _ = tx.send(Event::Error(format!(
                        "upstream {up} closed the stream early"
                    )));
                    return;
                }
                Ok(Some(Err(e))) => {
                    let _ = tx.send(Event::Error(format!("upstream {up}: {e}")));
                    return;
                }
                Ok(Some(Ok(c))) => c,
            };
            let tp = Instant::now();
            buf.extend_from_slice(&chunk);
            while let Some(pos) = find_event_end(&buf) {
                let ev: Vec<u8> = buf.drain(..pos.0 + pos.1).collect();
                let ev = String::from_utf8_lossy(&ev[..pos.0]).into_owned();
                for line in ev.lines() {
                    let Some(data) = line.strip_prefix("data:") else {
                        continue;
                    };
                    let data = data.trim();
                    if data == "[DONE]" {
                        return;
                    }
                    for e in upstream_events(&tau, data) {
                        let end = matches!(e, Event::Done(_) | Event::Error(_));
                        if tx.send(e).is_err() || end {
                            guard.ns += tp.elapsed().as_nanos() as u64;
                            return;
                        }
                    }
                }
            }
            guard.ns += tp.elapsed().as_nanos() as u64;
        }
    });
    let ctx = RespondCtx {
        chat,
        model: model.unwrap_or_else(|| s.model_name.clone()),
        tokenizer: Some(s.tok.clone()),
        return_text: true,
        prompt_tokens: ids.len(),
        opts,
    };
    Ok(respond(ctx, rx).await)
}

/// The name split mode answers with: the client part's folder's parent (the `--split` output).
fn split_model_name(client_dir: &Path) -> String {
    client_dir
        .canonicalize()
        .ok()
        .and_then(|p| Some(p.parent()?.file_name()?.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "umbra-split".into())
}

/// Split mode: generates here (embedding, head and sampling local, the blocks on the upstream,
/// one round trip per token) and answers from the generated ids.
async fn forward_split(
    s: &ProxyState,
    split: &Arc<SplitClient>,
    chat: bool,
    model: Option<String>,
    ids: Vec<u32>,
    opts: GenOptions,
) -> Result<Response, ApiError> {
    if opts.logprobs.is_some() {
        return Err(ApiError::bad_request(
            "`logprobs` is not available in split mode",
        ));
    }
    let max_tokens = api::resolve_max_tokens(
        opts.max_tokens,
        ids.len(),
        s.max_positions,
        s.cfg.default_max_tokens_limit,
    )?;
    let params = GenerateParams {
        max_tokens,
        sampling: SamplingParams {
            temperature: opts.temperature,
            top_k: opts.top_k,
            top_p: opts.top_p,
            seed: opts.seed.unwrap_or_else(crate::server::rand_seed),
        },
        stop_ids: split.stop_ids.clone(),
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    // The error that ended generation, as the answer to give when it came before any token.
    let failed: Arc<std::sync::Mutex<Option<ApiError>>> = Arc::default();
    let prompt_tokens = ids.len();
    let (split, rt, prompt) = (split.clone(), tokio::runtime::Handle::current(), ids);
    let failed_w = failed.clone();
    tokio::task::spawn_blocking(move || {
        // a closed channel (stop sequence hit, client gone) ends generation and its session
        let r = split.generate(&rt, &prompt, &params, |id| {
            tx.send(Event::Token { id, logprob: None }).is_ok()
        });
        let last = match r {
            Ok((out, _)) => Event::Done(match out.finish_reason {
                FinishReason::Length => Finish::Length,
                FinishReason::Stop => Finish::Stop,
            }),
            Err(e) => {
                let api = split_error(&e);
                let msg = api.message.clone();
                *failed_w.lock().unwrap_or_else(|p| p.into_inner()) = Some(api);
                Event::Error(msg)
            }
        };
        let _ = tx.send(last);
    });
    // Wait for the prompt's step: a split server that is full (429), unreachable (502) or
    // refuses the request gets its own status, as in token mode, before any answer starts.
    let first = match rx.recv().await {
        Some(Event::Error(msg)) => {
            let e = failed.lock().unwrap_or_else(|p| p.into_inner()).take();
            return Err(e.unwrap_or_else(|| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", msg)
            }));
        }
        Some(e) => e,
        None => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "split mode: generation ended without an answer",
            ))
        }
    };
    // The rest is relayed behind the first event; a client that leaves closes `out`, which
    // drops `rx`, which stops the generation.
    let (out, out_rx) = mpsc::unbounded_channel();
    let _ = out.send(first);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                e = rx.recv() => match e {
                    Some(e) => if out.send(e).is_err() { return },
                    None => return,
                },
                _ = out.closed() => return,
            }
        }
    });
    let rx = out_rx;
    let ctx = RespondCtx {
        chat,
        model: model.unwrap_or_else(|| s.model_name.clone()),
        tokenizer: Some(s.tok.clone()),
        return_text: true,
        prompt_tokens,
        opts,
    };
    Ok(respond(ctx, rx).await)
}

/// The answer for a split-mode generation that failed: an upstream status is passed on.
fn split_error(e: &ServeError) -> ApiError {
    match e {
        ServeError::Upstream { status, message } => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY);
            let kind = match status.as_u16() {
                429 => "rate_limit_error",
                _ => "upstream_error",
            };
            ApiError::new(status, kind, format!("split server: {message}"))
        }
        e => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("split mode: {e}"),
        ),
    }
}

/// `(end of event, separator length)` of the first complete SSE event in `buf`.
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let a = buf.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
    let b = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4));
    match (a, b) {
        (Some(x), Some(y)) => Some(if x.0 <= y.0 { x } else { y }),
        (x, y) => x.or(y),
    }
}

/// Plaintext events from one upstream chunk (ids mapped through tau^-1).
fn upstream_events(tau: &TokenPermutation, data: &str) -> Vec<Event> {
    let v: Value = match serde_json::from_str(data) {
        Ok(v) => v,
        Err(e) => {
            return vec![Event::Error(format!(
                "upstream sent a malformed chunk: {e}"
            ))]
        }
    };
    if let Some(m) = v.get("error") {
        return vec![Event::Error(format!(
            "upstream: {}",
            m["message"].as_str().unwrap_or("unknown error")
        ))];
    }
    let c = &v["choices"][0];
    let mut out = vec![];
    let ids: Vec<u32> = c["token_ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect()
        })
        .unwrap_or_default();
    let lps = &c["logprobs"];
    for (i, obf) in ids.iter().enumerate() {
        let Some(&id) = tau.inverse_table().get(*obf as usize) else {
            return vec![Event::Error(format!(
                "upstream returned token id {obf} outside the vocabulary"
            ))];
        };
        let logprob = lps["token_logprobs"][i].as_f64().map(|lp| TokenLogprob {
            logprob: lp as f32,
            top: lps["top_logprob_ids"][i]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| {
                            let t = p[0].as_u64()? as usize;
                            Some((*tau.inverse_table().get(t)?, p[1].as_f64()? as f32))
                        })
                        .collect()
                })
                .unwrap_or_default(),
        });
        out.push(Event::Token { id, logprob });
    }
    if c["finish_reason"].is_string() {
        if let Some(h) = crate::respond::parse_score(&v) {
            out.push(Event::Score(h));
        }
    }
    match c["finish_reason"].as_str() {
        Some("length") => out.push(Event::Done(Finish::Length)),
        Some(_) => out.push(Event::Done(Finish::Stop)),
        None => {}
    }
    out
}
