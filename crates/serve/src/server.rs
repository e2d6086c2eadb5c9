//! The provider's server: OpenAI-compatible endpoints over any checkpoint, plain or obfuscated
//! (or any [`Llama`] built in memory, [`ModelSource::Loaded`]). It knows nothing of keys; with
//! an obfuscated checkpoint its ids and text are meaningless to it. It publishes the key
//! fingerprint its checkpoint records, so that a client holding the wrong key finds out.
//!
//! Cheap checks come first: the guard ([`crate::guard`]), the body's size, the prompt's byte
//! length ([`PromptBound`]); tokenization and large JSON bodies run off the async runtime, so
//! `/health` answers while a hostile request is being refused.
use crate::api::{self, ApiError, ChatRequest, CompletionRequest, GenOptions, Prompt};
use crate::engine::{self, EngineHandle, Job, ModelInfo};
use crate::error::ServeError;
use crate::guard::AccessPolicy;
use crate::http::{not_found, parse_json, read_body};
use crate::metrics::Metrics;
use crate::respond::{respond, RespondCtx};
use crate::text::{PromptBound, PromptText};
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use candle_core::Device;
use serde_json::json;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use umbra_model::checkpoint::{is_gguf, Checkpoint};
use umbra_model::llama::Llama;
use umbra_model::load::{load_model, WeightDtype};
use umbra_model::sampling::SamplingParams;
use umbra_model::tokenizer::TextTokenizer;
use umbra_model::ModelPart;

/// Called with `(path, body)` for every request body the server reads (tests record them).
pub type BodyHook = Arc<dyn Fn(&str, &[u8]) + Send + Sync>;

/// Where the model comes from.
pub enum ModelSource {
    /// An HF folder or a `.gguf` file.
    Path(PathBuf),
    /// An already built model: any [`Llama`] (any linear backend) with its tokenizer (without
    /// one, prompts must be token ids) and stop ids.
    Loaded {
        model: Box<Llama>,
        tokenizer: Option<Box<TextTokenizer>>,
        eos_ids: Vec<u32>,
    },
}

impl ModelSource {
    /// The model at `path` held as `dtype`: the path itself where the weights are F32 (an HF
    /// folder under `auto`, anything under `f32`; the server loads it, split-mode parts
    /// included), else the quantized engine's load ([`load_model`]) of a whole model.
    pub fn with_dtype(path: &Path, dtype: WeightDtype) -> Result<Self, ServeError> {
        if dtype.is_dense_f32(path.is_file() && is_gguf(path)) {
            return Ok(Self::Path(path.to_path_buf()));
        }
        let m = load_model(path, dtype, &Device::Cpu)?;
        tracing::info!(
            "{} loaded as {} ({:.0} MiB of weights)",
            path.display(),
            m.dtype,
            m.weight_bytes as f64 / (1u64 << 20) as f64
        );
        Ok(Self::Loaded {
            model: Box::new(m.model),
            tokenizer: m.tokenizer.map(Box::new),
            eos_ids: m.eos_token_ids,
        })
    }
}

/// The name `/v1/models` reports for a model loaded from `path`: its folder's or file's stem.
pub fn default_name(path: &Path) -> Option<String> {
    path.file_stem().map(|s| s.to_string_lossy().into_owned())
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
    /// Most prompt tokens one forward pass carries (the memory bound of prefill).
    pub prefill_chunk: usize,
    /// With nobody decoding, the longest a pass of prompt chunks aims at
    /// ([`engine::EngineOptions::prefill_step`]).
    pub prefill_step: Duration,
    /// A HaluProbe probe file (`umbra halluc train`; for an obfuscated checkpoint the one
    /// `umbra obfuscate --halluc-probe` wrote): every completion then carries a
    /// `hallucination_score` computed from the taps of its own forward passes.
    pub halluc_probe: Option<PathBuf>,
    /// Split mode (a server part): an open session idle this long is dropped. `max_batch` is the
    /// most open sessions (each holds a KV cache of up to the model's context).
    pub split_idle: Duration,
    /// API key and browser origins ([`crate::guard`]).
    pub access: AccessPolicy,
    /// CPU threads of the engine's forward passes (`None`: all of the global pool's).
    pub threads: Option<usize>,
}

impl ServeConfig {
    pub fn new(model: ModelSource, addr: SocketAddr) -> Self {
        let defaults = engine::EngineOptions::default();
        Self {
            model,
            model_name: None,
            addr,
            max_batch: defaults.max_batch,
            max_queue: defaults.max_queue,
            max_prompt_tokens: None,
            max_tokens_limit: 4096,
            max_body_bytes: 4 << 20,
            body_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            body_hook: None,
            step_delay: Duration::ZERO,
            batch_window: defaults.batch_window,
            prefill_chunk: defaults.prefill_chunk,
            prefill_step: defaults.prefill_step,
            halluc_probe: None,
            split_idle: Duration::from_secs(300),
            access: AccessPolicy::default(),
            threads: None,
        }
    }
}

struct AppState {
    engine: EngineHandle,
    tokenizer: Option<Arc<TextTokenizer>>,
    bound: Option<PromptBound>,
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

/// What loading gives: the model, its tokenizer, stop ids, default name and probe.
type Loaded = (
    Llama,
    Option<TextTokenizer>,
    Vec<u32>,
    String,
    Option<engine::HalluProbe>,
);

/// Loads the model (and checks that this part of a split model may be served here).
fn load(model: ModelSource, halluc_probe: Option<PathBuf>) -> Result<Loaded, ServeError> {
    let (llama, tok, eos, name) = match model {
        ModelSource::Path(p) => {
            let ck = Checkpoint::open(&p)?;
            let eos = ck.eos_token_ids();
            let llama = Llama::new_part(&ck.config, &ck.weights, &Device::Cpu)?;
            let name = default_name(&p).unwrap_or_else(|| "model".into());
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
                "this is the client part of a split model (embedding and head stay with the \
                 client): serve <out>/server and generate with `umbra generate --model \
                 <out>/client --server URL`"
                    .into(),
            ))
        }
        ModelPart::Server if halluc_probe.is_some() => {
            return Err(ServeError::Config(
                "--halluc-probe is not available in split mode (the server has no head and no \
                 logits)"
                    .into(),
            ))
        }
        ModelPart::Server => {}
    }
    let probe = halluc_probe
        .map(|p| {
            engine::HalluProbe::load(&p, &llama)
                .map_err(|e| ServeError::Config(format!("--halluc-probe {}: {e}", p.display())))
        })
        .transpose()?;
    Ok((llama, tok, eos, name, probe))
}

/// Adds the key fingerprint header to every answer of `app` (none for a plaintext model).
pub(crate) fn with_fingerprint(app: Router, fingerprint: Option<&str>) -> Router {
    let Some(v) = fingerprint.and_then(|f| HeaderValue::from_str(f).ok()) else {
        return app;
    };
    app.layer(axum::middleware::map_response(move |mut r: Response| {
        let v = v.clone();
        async move {
            r.headers_mut().insert(api::KEY_FINGERPRINT_HEADER, v);
            r
        }
    }))
}

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
        prefill_chunk,
        prefill_step,
        halluc_probe,
        split_idle,
        mut access,
        threads,
    } = config;
    access.local_hosts_only = addr.ip().is_loopback();
    let (llama, tokenizer, eos_ids, default_name, probe) =
        tokio::task::spawn_blocking(move || load(model, halluc_probe))
            .await
            .map_err(|e| ServeError::Other(format!("model loading panicked: {e}")))??;
    let fingerprint = umbra_aloepri::compiler::recorded_fingerprint(llama.config());
    let name = model_name.unwrap_or(default_name);
    if llama.part() == ModelPart::Server {
        let limits = crate::split_mode::SplitLimits {
            max_sessions: max_batch,
            idle: split_idle,
            max_body: max_body_bytes,
            body_timeout,
            prefill_chunk,
        };
        let app = crate::split_mode::router(llama, name, limits)?;
        let app = crate::guard::guarded(with_fingerprint(app, fingerprint.as_deref()), access);
        return Ok(crate::http::bind(addr, app, header_timeout, shutdown).await?);
    }
    let info = ModelInfo {
        vocab_size: llama.vocab_size(),
        max_positions: llama.config().max_position_embeddings,
        eos_ids,
        key_fingerprint: fingerprint.clone(),
    };
    let max_prompt = max_prompt_tokens
        .unwrap_or(info.max_positions)
        .min(info.max_positions);
    let bound = match tokenizer {
        Some(t) => Some(
            tokio::task::spawn_blocking(move || {
                let b = PromptBound::new(&t, max_prompt);
                (t, b)
            })
            .await
            .map_err(|e| ServeError::Other(format!("reading the vocabulary: {e}")))?,
        ),
        None => None,
    };
    let (tokenizer, bound) = match bound {
        Some((t, b)) => (Some(Arc::new(t)), Some(b)),
        None => (None, None),
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
            prefill_chunk,
            prefill_step,
            probe,
            threads,
        },
    )?;
    let state = Arc::new(AppState {
        engine: handle,
        tokenizer,
        bound,
        name,
        max_prompt,
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
    let app = crate::guard::guarded(with_fingerprint(app, fingerprint.as_deref()), access);
    Ok(crate::http::bind(addr, app, header_timeout, shutdown).await?)
}

/// [`serve`] on a spawned task; stop it with [`ServerHandle::stop`].
pub async fn start(config: ServeConfig) -> Result<ServerHandle, ServeError> {
    crate::http::spawn(|shutdown| serve(config, shutdown)).await
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    axum::Json(json!({
        "status": "ok", "model": s.name,
        "key_fingerprint": s.engine.info.key_fingerprint,
        "max_model_len": s.engine.info.max_positions,
    }))
    .into_response()
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
        "key_fingerprint": s.engine.info.key_fingerprint,
    }]}))
    .into_response()
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

/// The tokenizer and the prompt bound, or a 400 saying what to send instead.
fn need_tokenizer(s: &AppState, what: &str) -> Result<(Arc<TextTokenizer>, PromptBound), ApiError> {
    match (&s.tokenizer, &s.bound) {
        (Some(t), Some(b)) => Ok((t.clone(), b.clone())),
        _ => Err(ApiError::bad_request(format!(
            "this model has no tokenizer; {what}"
        ))),
    }
}

async fn completions_inner(s: &AppState, req: Request) -> Result<Response, ApiError> {
    let body = body_of(s, req).await?;
    let r: CompletionRequest = parse_json(body).await?;
    check_model(s, r.model.as_deref())?;
    let opts = r.options()?;
    let ids = match api::parse_prompt(r.prompt.as_ref())? {
        Prompt::Ids(ids) => ids,
        Prompt::Text(t) => {
            let (tok, bound) = need_tokenizer(s, "send the prompt as token ids")?;
            bound.ids(&tok, PromptText::Text(t)).await?
        }
    };
    let return_text = r.return_text.unwrap_or(true);
    generate(s, false, ids, opts, return_text).await
}

async fn chat_inner(s: &AppState, req: Request) -> Result<Response, ApiError> {
    let body = body_of(s, req).await?;
    let r: ChatRequest = parse_json(body).await?;
    check_model(s, r.model.as_deref())?;
    let opts = r.options()?;
    let messages = api::parse_messages(r.messages.as_ref())?;
    let (tok, bound) = need_tokenizer(s, "chat needs one (use /v1/completions with token ids)")?;
    let ids = bound.ids(&tok, PromptText::Chat(messages)).await?;
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
        seed: opts.seed.unwrap_or_else(umbra_common::seed::os_seed),
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
