//! The provider's server: OpenAI-compatible endpoints over any checkpoint, plain or obfuscated.
//! It knows nothing of keys; with an obfuscated checkpoint its ids and text are meaningless to it.
use crate::api::{self, parse_body, ApiError, ChatRequest, CompletionRequest, GenOptions, Prompt};
use crate::engine::{self, EngineHandle, Job, ModelInfo};
use crate::error::ServeError;
use crate::metrics::Metrics;
use crate::respond::{respond, RespondCtx};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use candle_core::Device;
use serde_json::json;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use umbra_model::checkpoint::Checkpoint;
use umbra_model::llama::Llama;
use umbra_model::sampling::SamplingParams;
use umbra_model::tokenizer::TextTokenizer;
use umbra_model::ModelPart;

/// Called with `(path, body)` for every request body the server reads (tests record them).
pub type BodyHook = Arc<dyn Fn(&str, &[u8]) + Send + Sync>;

/// Where the model comes from.
pub enum ModelSource {
    /// An HF folder or a `.gguf` file.
    Path(PathBuf),
    /// An already built model (tests).
    Loaded {
        model: Box<Llama>,
        tokenizer: Option<Box<TextTokenizer>>,
        eos_ids: Vec<u32>,
    },
}

/// Server settings.
pub struct ServeConfig {
    pub model: ModelSource,
    /// Name reported by `/v1/models` and accepted in `model` (default: the folder name).
    pub model_name: Option<String>,
    pub addr: SocketAddr,
    /// Most sequences generated at once.
    pub max_batch: usize,
    /// Most requests waiting for a slot; more get 429.
    pub max_queue: usize,
    /// Longest prompt in tokens (default: the model's context).
    pub max_prompt_tokens: Option<usize>,
    /// Largest `max_tokens` accepted.
    pub max_tokens_limit: usize,
    pub max_body_bytes: usize,
    /// Time allowed to receive a request body.
    pub body_timeout: Duration,
    /// Time allowed to receive request headers.
    pub header_timeout: Duration,
    pub body_hook: Option<BodyHook>,
    /// Extra pause after every scheduler iteration (simulates a slower device in tests).
    pub step_delay: Duration,
    /// How long the scheduler waits for more requests after one arrives, so that requests sent
    /// together are prefilled and decoded as one batch.
    pub batch_window: Duration,
    /// A HaluProbe probe file (`umbra halluc train`; for an obfuscated checkpoint the one
    /// `umbra obfuscate --halluc-probe` wrote): every completion then carries a
    /// `hallucination_score` computed from the taps of its own forward passes.
    pub halluc_probe: Option<PathBuf>,
    /// Split mode (a server part): an open session idle this long is dropped. `max_batch` is the
    /// most open sessions (each holds a KV cache of up to the model's context).
    pub split_idle: Duration,
}

impl ServeConfig {
    pub fn new(model: ModelSource, addr: SocketAddr) -> Self {
        Self {
            model,
            model_name: None,
            addr,
            max_batch: 16,
            max_queue: 256,
            max_prompt_tokens: None,
            max_tokens_limit: 4096,
            max_body_bytes: 4 << 20,
            body_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            body_hook: None,
            step_delay: Duration::ZERO,
            batch_window: Duration::from_millis(5),
            halluc_probe: None,
            split_idle: Duration::from_secs(300),
        }
    }
}

struct AppState {
    engine: EngineHandle,
    tokenizer: Option<Arc<TextTokenizer>>,
    name: String,
    max_prompt: usize,
    max_tokens_limit: usize,
    max_body: usize,
    body_timeout: Duration,
    hook: Option<BodyHook>,
    metrics: Arc<Metrics>,
}

/// A running server.
pub type ServerHandle = crate::http::Handle;

/// Loads the model, starts the engine and binds; returns the bound address and the future that
/// serves until `shutdown` resolves.
pub async fn serve(
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, impl Future<Output = ()> + Send + 'static), ServeError> {
    let ServeConfig {
        model,
        model_name,
        addr,
        max_batch,
        max_queue,
        max_prompt_tokens,
        max_tokens_limit,
        max_body_bytes,
        body_timeout,
        header_timeout,
        body_hook,
        step_delay,
        batch_window,
        halluc_probe,
        split_idle,
    } = config;
    let (llama, tokenizer, eos_ids, default_name, probe) =
        tokio::task::spawn_blocking(move || -> Result<_, ServeError> {
            let (llama, tok, eos, name) = match model {
                ModelSource::Path(p) => {
                    let ck = Checkpoint::open(&p)?;
                    let eos = ck.eos_token_ids();
                    let llama = Llama::new_part(&ck.config, &ck.weights, &Device::Cpu)?;
                    let name = p
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_else(|| "model".into());
                    (llama, ck.tokenizer, eos, name)
                }
                ModelSource::Loaded {
                    model,
                    tokenizer,
                    eos_ids,
                } => (*model, tokenizer.map(|t| *t), eos_ids, "model".to_string()),
            };
            // Split-mode parts are checked before any probe is read.
            match llama.part() {
                ModelPart::Full => {}
                ModelPart::Client => {
                    return Err(ServeError::Config(
                        "this is the client part of a split model (embedding and head stay \
                         with the client): serve <out>/server and generate with `umbra \
                         generate --model <out>/client --server URL`"
                            .into(),
                    ))
                }
                ModelPart::Server if halluc_probe.is_some() => {
                    return Err(ServeError::Config(
                        "--halluc-probe is not available in split mode (the server has no \
                         head and no logits)"
                            .into(),
                    ))
                }
                ModelPart::Server => {}
            }
            let probe = halluc_probe
                .map(|p| {
                    engine::HalluProbe::load(&p, &llama).map_err(|e| {
                        ServeError::Config(format!("--halluc-probe {}: {e}", p.display()))
                    })
                })
                .transpose()?;
            Ok((llama, tok, eos, name, probe))
        })
        .await
        .map_err(|e| ServeError::Other(format!("model loading panicked: {e}")))??;
    if llama.part() == ModelPart::Server {
        let app = crate::split::router(
            llama,
            model_name.unwrap_or(default_name),
            crate::split::SplitLimits {
                max_sessions: max_batch,
                idle: split_idle,
                max_body: max_body_bytes,
                body_timeout,
            },
        )?;
        return Ok(crate::http::bind(addr, app, header_timeout, shutdown).await?);
    }
    let info = ModelInfo {
        vocab_size: llama.vocab_size(),
        max_positions: llama.config().max_position_embeddings,
        eos_ids,
    };
    let metrics = Arc::new(Metrics::default());
    let (handle, _join) = engine::spawn(
        llama,
        info.clone(),
        metrics.clone(),
        engine::EngineOptions {
            max_batch,
            max_queue,
            step_delay,
            batch_window,
            probe,
        },
    );
    let state = Arc::new(AppState {
        engine: handle,
        tokenizer: tokenizer.map(Arc::new),
        name: model_name.unwrap_or(default_name),
        max_prompt: max_prompt_tokens
            .unwrap_or(info.max_positions)
            .min(info.max_positions),
        max_tokens_limit,
        max_body: max_body_bytes,
        body_timeout,
        hook: body_hook,
        metrics,
    });
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .fallback(not_found)
        .with_state(state);
    Ok(crate::http::bind(addr, app, header_timeout, shutdown).await?)
}

/// [`serve`] on a spawned task; stop it with [`ServerHandle::stop`].
pub async fn start(config: ServeConfig) -> Result<ServerHandle, ServeError> {
    crate::http::spawn(|shutdown| serve(config, shutdown)).await
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    axum::Json(json!({"status": "ok", "model": s.name})).into_response()
}

async fn metrics_text(State(s): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    axum::Json(json!({"object": "list", "data": [{
        "id": s.name, "object": "model", "created": 0, "owned_by": "umbra",
        "max_model_len": s.engine.info.max_positions,
    }]}))
    .into_response()
}

pub(crate) async fn not_found(req: Request) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
    .into_response()
}

/// Reads a request body within the size and time limits.
pub(crate) async fn read_body(
    body: Body,
    headers: &axum::http::HeaderMap,
    max: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let too_big = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("request body exceeds the limit of {max} bytes"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > max as u64 {
            return Err(too_big());
        }
    }
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, max)).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "timed out after {} s reading the request body",
                timeout.as_secs_f64()
            ),
        )),
        Ok(Err(e)) => {
            let msg = format!("{e}");
            let mut src: Option<&dyn std::error::Error> = Some(&e);
            let mut limit = false;
            while let Some(s) = src {
                limit |= s.to_string().contains("length limit");
                src = s.source();
            }
            if limit {
                Err(too_big())
            } else {
                Err(ApiError::bad_request(format!(
                    "cannot read the request body: {msg}"
                )))
            }
        }
        Ok(Ok(b)) => Ok(b),
    }
}

async fn completions(State(s): State<Arc<AppState>>, req: Request) -> Response {
    let r = completions_inner(&s, req).await;
    finish(&s, "/v1/completions", r)
}

async fn chat(State(s): State<Arc<AppState>>, req: Request) -> Response {
    let r = chat_inner(&s, req).await;
    finish(&s, "/v1/chat/completions", r)
}

fn finish(s: &AppState, endpoint: &str, r: Result<Response, ApiError>) -> Response {
    let resp = r.unwrap_or_else(|e| e.into_response());
    s.metrics.record_request(endpoint, resp.status().as_u16());
    resp
}

async fn body_of(s: &AppState, req: Request) -> Result<Bytes, ApiError> {
    let path = req.uri().path().to_string();
    let (parts, body) = req.into_parts();
    let bytes = read_body(body, &parts.headers, s.max_body, s.body_timeout).await?;
    if let Some(h) = &s.hook {
        h(&path, &bytes);
    }
    Ok(bytes)
}

fn check_model(s: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != s.name => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "the model `{m}` does not exist; this server serves `{}`",
                s.name
            ),
        )
        .with_code("model_not_found")),
        _ => Ok(()),
    }
}

fn need_tokenizer(s: &AppState, what: &str) -> Result<Arc<TextTokenizer>, ApiError> {
    s.tokenizer
        .clone()
        .ok_or_else(|| ApiError::bad_request(format!("this model has no tokenizer; {what}")))
}

async fn completions_inner(s: &AppState, req: Request) -> Result<Response, ApiError> {
    let body = body_of(s, req).await?;
    let r: CompletionRequest = parse_body(&body)?;
    check_model(s, r.model.as_deref())?;
    let opts = r.options()?;
    let ids = match api::parse_prompt(r.prompt.as_ref())? {
        Prompt::Ids(ids) => ids,
        Prompt::Text(t) => {
            let tok = need_tokenizer(s, "send the prompt as token ids")?;
            crate::text::text_prompt_ids(&tok, &t)?
        }
    };
    let return_text = r.return_text.unwrap_or(true);
    generate(s, false, ids, opts, return_text).await
}

async fn chat_inner(s: &AppState, req: Request) -> Result<Response, ApiError> {
    let body = body_of(s, req).await?;
    let r: ChatRequest = parse_body(&body)?;
    check_model(s, r.model.as_deref())?;
    let opts = r.options()?;
    let messages = api::parse_messages(r.messages.as_ref())?;
    let tok = need_tokenizer(s, "chat needs one (use /v1/completions with token ids)")?;
    let ids = crate::text::chat_prompt_ids(&tok, &messages)?;
    generate(s, true, ids, opts, true).await
}

/// Checks the prompt and limits, queues the job and answers.
async fn generate(
    s: &AppState,
    chat: bool,
    ids: Vec<u32>,
    opts: GenOptions,
    return_text: bool,
) -> Result<Response, ApiError> {
    let info = &s.engine.info;
    if ids.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty"));
    }
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= info.vocab_size) {
        return Err(ApiError::bad_request(format!(
            "token id {bad} is outside the vocabulary (size {})",
            info.vocab_size
        )));
    }
    if ids.len() > s.max_prompt {
        return Err(ApiError::bad_request(format!(
            "the prompt has {} tokens; the limit is {}",
            ids.len(),
            s.max_prompt
        ))
        .with_code("context_length_exceeded"));
    }
    let max_tokens = crate::api::resolve_max_tokens(
        opts.max_tokens,
        ids.len(),
        info.max_positions,
        s.max_tokens_limit,
    )?;
    let tokenizer = if return_text {
        s.tokenizer.clone()
    } else {
        None
    };
    if !opts.stop.is_empty() && tokenizer.is_none() {
        return Err(ApiError::bad_request(
            "`stop` sequences need text output (a tokenizer and return_text)",
        ));
    }
    let sampling = SamplingParams {
        temperature: opts.temperature,
        top_k: opts.top_k,
        top_p: opts.top_p,
        seed: opts.seed.unwrap_or_else(rand_seed),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let prompt_tokens = ids.len();
    s.engine.submit(Job {
        prompt: ids,
        max_tokens,
        sampling,
        stop_ids: info.eos_ids.clone(),
        logprobs: opts.logprobs,
        events: tx,
    })?;
    let ctx = RespondCtx {
        chat,
        model: s.name.clone(),
        tokenizer,
        return_text,
        opts,
        prompt_tokens,
    };
    Ok(respond(ctx, rx).await)
}

pub(crate) fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}
