//! The customer's proxy: speaks the OpenAI API in plaintext to local apps, holds the AloePri key
//! and the public tokenizer, and sends the server only tau-permuted token ids.
//!
//! * [`token_mode`]: every request (chat or completion) goes upstream as `POST /v1/completions`
//!   with a token-id prompt, `stream: true` and `return_text: false`; the streamed ids are
//!   mapped back through tau^-1 and detokenized here (incrementally, never splitting a UTF-8
//!   character), with stop sequences applied on the plaintext and usage counted here. Dropping
//!   the upstream stream (stop sequence hit, client gone) makes the server free the slot.
//! * [`split_mode`] ([`ProxyConfig::split_client`]): the proxy is the client of split mode
//!   instead: it holds the client part (embedding, final norm, head) and generates itself
//!   through [`SplitClient`], the upstream (a split-mode `umbra serve`) running only the blocks.
//! * [`upstream`]: reaching the upstream, its errors (502 naming it) and the key check.
//!
//! Apps see the same OpenAI API either way, under one model name ([`ProxyConfig::model_name`]:
//! by default the plaintext model's folder name, never the obfuscated checkpoint's). Requests
//! pass the [`crate::guard`] first (API key, browser origins, JSON only), then the cheap
//! checks (body size, the prompt's byte length) before any tokenization, which runs off the
//! async runtime.
mod split_mode;
mod token_mode;
pub mod upstream;

use crate::api::{self, ApiError, ChatRequest, CompletionRequest, GenOptions, Prompt};
use crate::error::ServeError;
use crate::guard::AccessPolicy;
use crate::http::{not_found, parse_json, read_body};
use crate::respond::RespondCtx;
use crate::split_mode::SplitClient;
use crate::text::{PromptBound, PromptText};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::json;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use token_mode::ProxyStats;
use umbra_aloepri::{ClientKey, TokenPermutation};
use umbra_model::checkpoint::Checkpoint;
use umbra_model::tokenizer::TextTokenizer;
use upstream::{health_body, Probe, Upstream};

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
    /// Sent as `Authorization: Bearer` to an upstream started with `--api-key`.
    pub upstream_api_key: Option<String>,
    pub addr: SocketAddr,
    /// The model name served by `/v1/models` and accepted in `model` (default: the plaintext
    /// model's folder name; `umbra` in split mode).
    pub model_name: Option<String>,
    /// Longest wait for the upstream's headers or its next chunk.
    pub upstream_timeout: Duration,
    pub max_body_bytes: usize,
    pub body_timeout: Duration,
    pub header_timeout: Duration,
    /// Largest `max_tokens` the proxy asks for when a chat request sets none.
    pub default_max_tokens_limit: usize,
    /// API key and browser origins of the proxy's own clients ([`crate::guard`]).
    pub access: AccessPolicy,
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
            upstream_api_key: None,
            addr,
            model_name: None,
            upstream_timeout: Duration::from_secs(60),
            max_body_bytes: 4 << 20,
            body_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            default_max_tokens_limit: 4096,
            access: AccessPolicy::default(),
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
    /// The model name apps use (`/v1/models`, `model`).
    model_name: String,
    tok: Arc<TextTokenizer>,
    bound: PromptBound,
    max_positions: usize,
    upstream: Upstream,
    cfg: ProxyConfig,
    stats: Arc<ProxyStats>,
}

/// The plaintext model's name: its folder's (or `.gguf` file's) name.
fn plain_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "umbra".into())
}

/// Loads what the backend needs (off the runtime: the split client part reads weights, and the
/// prompt bound reads the whole vocabulary).
async fn load_backend(
    cfg: &ProxyConfig,
) -> Result<(Backend, TextTokenizer, usize, String, PromptBound), ServeError> {
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || -> Result<_, ServeError> {
        let (backend, tok, max_positions, fingerprint) = match &cfg.split_client {
            Some(dir) => {
                let split = SplitClient::open(dir, &cfg.key, &cfg.upstream, cfg.upstream_timeout)?
                    .with_api_key(cfg.upstream_api_key.clone());
                let fp = split.key_fingerprint().to_string();
                let (tok, max) = (split.tokenizer.clone(), split.max_positions());
                (Backend::Split(Arc::new(split)), tok, max, fp)
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
                        "the key's permutation covers {} tokens but {} has a vocabulary of {}; \
                         wrong key or tokenizer",
                        tau.vocab_size(),
                        cfg.tokenizer.display(),
                        mcfg.vocab_size
                    )));
                }
                let fp = key.fingerprint.clone();
                (Backend::Tokens(tau), tok, mcfg.max_position_embeddings, fp)
            }
        };
        let bound = PromptBound::new(&tok, max_positions);
        Ok((backend, tok, max_positions, fingerprint, bound))
    })
    .await
    .map_err(|e| ServeError::Other(format!("loading the proxy's key and model: {e}")))?
}

/// Loads the key and tokenizer, checks the upstream's key fingerprint and binds; returns the
/// bound address and the serving future.
pub async fn run_proxy(
    cfg: ProxyConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, impl Future<Output = ()> + Send + 'static), ServeError> {
    let (backend, tok, max_positions, fingerprint, bound) = load_backend(&cfg).await?;
    let upstream = Upstream::new(
        &cfg.upstream,
        cfg.upstream_timeout,
        cfg.upstream_api_key.clone(),
        fingerprint,
    )?;
    match &backend {
        Backend::Split(split) => split.check_server().await?,
        Backend::Tokens(_) => upstream.check_at_start().await?,
    }
    let model_name = cfg
        .model_name
        .clone()
        .unwrap_or_else(|| match &cfg.split_client {
            Some(_) => "umbra".to_string(),
            None => plain_name(&cfg.tokenizer),
        });
    let mut access = cfg.access.clone();
    access.local_hosts_only = cfg.addr.ip().is_loopback();
    let state = Arc::new(ProxyState {
        backend,
        model_name,
        tok: Arc::new(tok),
        bound,
        max_positions,
        upstream,
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
    let app = crate::guard::guarded(app, access);
    Ok(crate::http::bind(cfg.addr, app, cfg.header_timeout, shutdown).await?)
}

/// A running proxy.
pub type ProxyHandle = crate::http::Handle;

/// [`run_proxy`] on a spawned task.
pub async fn start_proxy(cfg: ProxyConfig) -> Result<ProxyHandle, ServeError> {
    crate::http::spawn(|shutdown| run_proxy(cfg, shutdown)).await
}

/// The proxy's health is its upstream's: 200 when the upstream answers with the right key,
/// 503 (with the reason) when it is down or is not the key's server.
async fn health(State(s): State<Arc<ProxyState>>) -> Response {
    let (mode, probe) = match &s.backend {
        Backend::Tokens(_) => ("tokens", s.upstream.probe().await),
        Backend::Split(split) => {
            let p = match split.check_server().await {
                Ok(()) => Probe::Ok(json!({"key_fingerprint": s.upstream.fingerprint})),
                Err(ServeError::Config(m)) => Probe::Mismatch(m),
                Err(e) => Probe::Down(ApiError::upstream(
                    StatusCode::BAD_GATEWAY,
                    &s.upstream.url,
                    e,
                )),
            };
            ("split-client", p)
        }
    };
    let (code, body) = health_body(mode, &s.upstream.url, probe);
    (code, axum::Json(body)).into_response()
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

/// The one model apps see, under the proxy's name (the upstream's list would name the
/// obfuscated checkpoint).
async fn models(State(s): State<Arc<ProxyState>>) -> Response {
    axum::Json(json!({"object": "list", "data": [{
        "id": s.model_name, "object": "model", "created": 0, "owned_by": "umbra",
        "max_model_len": s.max_positions,
    }]}))
    .into_response()
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

/// 404 for a model name other than the proxy's own.
fn check_model(s: &ProxyState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != s.model_name => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "the model `{m}` does not exist; this proxy serves `{}`",
                s.model_name
            ),
        )
        .with_code("model_not_found")),
        _ => Ok(()),
    }
}

async fn body_of(s: &ProxyState, req: Request) -> Result<axum::body::Bytes, ApiError> {
    let (parts, body) = req.into_parts();
    read_body(
        body,
        &parts.headers,
        s.cfg.max_body_bytes,
        s.cfg.body_timeout,
    )
    .await
}

async fn completions_inner(s: &ProxyState, req: Request) -> Result<Response, ApiError> {
    let r: CompletionRequest = parse_json(body_of(s, req).await?).await?;
    check_model(s, r.model.as_deref())?;
    let opts = r.options()?;
    let t0 = Instant::now();
    let mut tok_time = Duration::ZERO;
    let ids = match api::parse_prompt(r.prompt.as_ref())? {
        Prompt::Ids(ids) => ids,
        Prompt::Text(t) => {
            let tt = Instant::now();
            let ids = s.bound.ids(&s.tok, PromptText::Text(t)).await?;
            tok_time = tt.elapsed();
            ids
        }
    };
    forward(s, false, ids, opts, (t0, tok_time)).await
}

async fn chat_inner(s: &ProxyState, req: Request) -> Result<Response, ApiError> {
    let r: ChatRequest = parse_json(body_of(s, req).await?).await?;
    check_model(s, r.model.as_deref())?;
    let mut opts = r.options()?;
    let messages = api::parse_messages(r.messages.as_ref())?;
    let t0 = Instant::now();
    let ids = s.bound.ids(&s.tok, PromptText::Chat(messages)).await?;
    let tok_time = t0.elapsed();
    if opts.max_tokens.is_none() {
        let room = s
            .max_positions
            .saturating_sub(ids.len())
            .min(s.cfg.default_max_tokens_limit);
        opts.max_tokens = Some(room.max(1));
    }
    forward(s, true, ids, opts, (t0, tok_time)).await
}

/// Answers `ids` through the backend.
async fn forward(
    s: &ProxyState,
    chat: bool,
    ids: Vec<u32>,
    opts: GenOptions,
    timing: (Instant, Duration),
) -> Result<Response, ApiError> {
    if ids.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty"));
    }
    let ctx = RespondCtx {
        chat,
        model: s.model_name.clone(),
        tokenizer: Some(s.tok.clone()),
        return_text: true,
        prompt_tokens: ids.len(),
        opts,
    };
    match &s.backend {
        Backend::Tokens(tau) => {
            token_mode::forward(&s.upstream, &s.stats, tau, ctx, ids, timing).await
        }
        Backend::Split(split) => {
            split_mode::forward(split, ctx, ids, s.cfg.default_max_tokens_limit).await
        }
    }
}
