//! Command-line entry points (feature `cli`): [`Command`] holds `umbra serve` and `umbra proxy`
//! (flattened into the binary's top-level commands) and [`run`] runs one;
//! [`BenchServeArgs`] and [`run_bench`] are `umbra bench serve`.
use crate::error::ServeError;
use crate::guard::AccessPolicy;
use crate::proxy::ProxyConfig;
use crate::server::{default_name, serve, ModelSource, ServeConfig};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use umbra_model::load::WeightDtype;
use umbra_model::resolve::{resolve_model, Fetch};

/// The serving commands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Serve any checkpoint (plain or obfuscated) over the OpenAI HTTP API; knows nothing of keys.
    Serve(ServeArgs),
    /// Client-side privacy proxy: OpenAI API for local apps, tau-mapped token ids upstream.
    Proxy(ProxyArgs),
}

/// Who may call a server or proxy (API key, browser origins).
#[derive(Debug, Clone, clap::Args)]
pub struct AccessArgs {
    /// Require `Authorization: Bearer <KEY>` on every request but `GET /health`. The key is
    /// visible to local users in the process list; prefer --api-key-file.
    #[arg(long, conflicts_with = "api_key_file")]
    pub api_key: Option<String>,
    /// Like --api-key, reading the key from a file (first line).
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Allow browser pages of this origin (e.g. `http://localhost:3000`) to call; repeat for
    /// more. Without it, every request that a web page sends is refused.
    #[arg(long = "allow-origin")]
    pub allow_origin: Vec<String>,
}

/// `umbra serve`: the provider's OpenAI-compatible server (plain or obfuscated checkpoint).
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// HF checkpoint folder or `.gguf` file, or a model name (`smollm2`, `qwen2.5-coder-0.5b`,
    /// `qwen2.5-coder-1.5b`; fetched on first use).
    #[arg(long)]
    pub model: PathBuf,
    /// Weight precision: `auto` (a GGUF's own blocks, F32 for an HF folder), `f32`, or a type
    /// every matrix is quantized to at load (`q8_0`, `q4_k`, `q4_0`, `q4_1`, `q5_0`, `q5_k`,
    /// `q6_k`). Split-mode server parts are served in F32.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Most sequences generated at once (continuous batching).
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Most queued requests; more are answered 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Name served by /v1/models (default: the model folder's name).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Largest `max_tokens` accepted.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens_limit: usize,
    /// Longest prompt in tokens (default: the model's context).
    #[arg(long)]
    pub max_prompt_tokens: Option<usize>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Seconds allowed to receive a request's headers and body.
    #[arg(long, default_value_t = 10.0)]
    pub request_timeout_s: f64,
    /// Milliseconds the scheduler waits for more arrivals to batch them together.
    #[arg(long, default_value_t = 5.0)]
    pub batch_window_ms: f64,
    /// Most prompt tokens one forward pass carries (prompts are read in chunks; attention
    /// memory is at most heads x this x context floats).
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// With nobody decoding, the most milliseconds a pass of prompt chunks aims at (16
    /// decode steps' time if shorter): a request that arrives during a long prompt waits about
    /// this long for its turn.
    #[arg(long, default_value_t = 250.0)]
    pub prefill_step_ms: f64,
    /// CPU threads of the engine's forward passes (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// HaluProbe probe file: every completion carries `hallucination_score`,
    /// `hallucination_stage` and `hallucinated` (hidden-state and logit probes; lookback and
    /// FFN-statistics probes are refused at startup; for an obfuscated checkpoint, the probe
    /// `umbra obfuscate --halluc-probe` transformed).
    #[arg(long)]
    pub halluc_probe: Option<PathBuf>,
    /// Split mode (`--model` is the server part of `umbra obfuscate --split`): seconds an open
    /// session may idle before its KV cache is dropped. `--max-batch` bounds open sessions.
    #[arg(long, default_value_t = 300.0)]
    pub split_idle_s: f64,
    #[command(flatten)]
    pub access: AccessArgs,
}

/// `umbra proxy`: the customer's side, holding the key and the public tokenizer.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// `client.key` from `umbra obfuscate` (required in token and split mode).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// The plaintext model folder (its tokenizer and config are used; weights are not read).
    /// Required unless `--split-client`.
    #[arg(long, conflicts_with = "split_client")]
    pub tokenizer: Option<PathBuf>,
    /// Split mode: the client part of `umbra obfuscate --split` (`<out>/client`). The proxy
    /// then runs the embedding, head and sampling itself and `--upstream` is the `umbra serve`
    /// of the server part.
    #[arg(long)]
    pub split_client: Option<PathBuf>,
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub upstream: String,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Model name apps see in /v1/models and send as `model` (default: the plaintext model's
    /// folder name; `umbra` in split mode).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Seconds to wait for the upstream's answer or its next streamed token.
    #[arg(long, default_value_t = 60.0)]
    pub upstream_timeout_s: f64,
    /// The upstream's API key (its `--api-key`).
    #[arg(long, conflicts_with = "upstream_api_key_file")]
    pub upstream_api_key: Option<String>,
    /// Like --upstream-api-key, reading the key from a file (first line).
    #[arg(long)]
    pub upstream_api_key_file: Option<PathBuf>,
    #[command(flatten)]
    pub access: AccessArgs,
}

/// `umbra bench serve`: throughput and latency of plain vs obfuscated serving; with
/// `--soak`, a max-context prompt beside short chats instead.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchServeArgs {
    /// Plaintext model folder (default: the cached SmolLM2-135M-Instruct).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where to write the results.
    #[arg(long)]
    pub json: PathBuf,
    /// Concurrent client counts.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub clients: Vec<usize>,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Requests each client sends per measurement.
    #[arg(long, default_value_t = 2)]
    pub requests_per_client: usize,
    /// Residual expansion h of the obfuscated checkpoint (width d + 2h; `umbra obfuscate`'s
    /// default is 0, the paper's 128). The exact mode is used so both sides generate the same tokens.
    #[arg(long, default_value_t = 0)]
    pub h: usize,
    /// Soak instead: one prompt of this many tokens (0: the model's context minus
    /// --max-tokens) plus --soak-chats short chats at once, against the chats alone; reports
    /// the chats' latencies and the server's peak memory.
    #[arg(long)]
    pub soak: Option<usize>,
    /// Short chats of the soak.
    #[arg(long, default_value_t = 8)]
    pub soak_chats: usize,
}

fn addr(host: &str, port: u16) -> Result<SocketAddr, ServeError> {
    let ip: std::net::IpAddr = host
        .parse()
        .map_err(|_| ServeError::Config(format!("--host `{host}` is not an IP address")))?;
    Ok(SocketAddr::new(ip, port))
}

fn runtime() -> Result<tokio::runtime::Runtime, ServeError> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn secs(s: f64, what: &str) -> Result<Duration, ServeError> {
    if s.is_finite() && s > 0.0 {
        Ok(Duration::from_secs_f64(s))
    } else {
        Err(ServeError::Config(format!(
            "{what} must be a positive number of seconds"
        )))
    }
}

/// A key given inline or in a file (its first line).
fn secret(inline: &Option<String>, file: &Option<PathBuf>) -> Result<Option<String>, ServeError> {
    let key = match (inline, file) {
        (Some(k), _) => k.trim().to_string(),
        (None, Some(f)) => read_first_line(f)?,
        (None, None) => return Ok(None),
    };
    if key.is_empty() {
        return Err(ServeError::Config("an API key must not be empty".into()));
    }
    Ok(Some(key))
}

fn read_first_line(f: &Path) -> Result<String, ServeError> {
    let text = std::fs::read_to_string(f)
        .map_err(|e| ServeError::Config(format!("{}: {e}", f.display())))?;
    Ok(text.lines().next().unwrap_or("").trim().to_string())
}

impl AccessArgs {
    fn policy(&self) -> Result<AccessPolicy, ServeError> {
        for o in &self.allow_origin {
            if !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
                return Err(ServeError::Config(format!(
                    "--allow-origin `{o}` is not an origin (scheme://host[:port], no path)"
                )));
            }
        }
        Ok(AccessPolicy {
            api_key: secret(&self.api_key, &self.api_key_file)?,
            allow_origins: self.allow_origin.clone(),
            local_hosts_only: false,
        })
    }
}

async fn ctrl_c() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Runs a serving command until Ctrl-C.
pub fn run(cmd: &Command) -> Result<(), ServeError> {
    match cmd {
        Command::Serve(a) => run_serve(a),
        Command::Proxy(a) => run_proxy(a),
    }
}

/// Runs `umbra serve` until Ctrl-C.
pub fn run_serve(args: &ServeArgs) -> Result<(), ServeError> {
    let dtype = WeightDtype::parse(&args.dtype)?;
    let model = resolve_model(&args.model.to_string_lossy(), Fetch::Yes)?;
    let mut cfg = ServeConfig::new(
        ModelSource::with_dtype(&model, dtype)?,
        addr(&args.host, args.port)?,
    );
    cfg.model_name = args.model_name.clone().or_else(|| default_name(&model));
    cfg.max_batch = args.max_batch.max(1);
    cfg.max_queue = args.max_queue.max(1);
    cfg.max_tokens_limit = args.max_tokens_limit;
    cfg.max_prompt_tokens = args.max_prompt_tokens;
    cfg.max_body_bytes = args.max_body_bytes;
    cfg.body_timeout = secs(args.request_timeout_s, "--request-timeout-s")?;
    cfg.header_timeout = cfg.body_timeout;
    if !(args.batch_window_ms.is_finite() && (0.0..=1000.0).contains(&args.batch_window_ms)) {
        return Err(ServeError::Config(
            "--batch-window-ms must be in [0, 1000]".into(),
        ));
    }
    cfg.batch_window = Duration::from_secs_f64(args.batch_window_ms / 1e3);
    if args.prefill_chunk == 0 {
        return Err(ServeError::Config("--prefill-chunk must be >= 1".into()));
    }
    cfg.prefill_chunk = args.prefill_chunk;
    cfg.prefill_step = secs(args.prefill_step_ms / 1e3, "--prefill-step-ms")?;
    cfg.threads = args.threads.filter(|&n| n > 0);
    cfg.halluc_probe = args.halluc_probe.clone();
    cfg.split_idle = secs(args.split_idle_s, "--split-idle-s")?;
    cfg.access = args.access.policy()?;
    runtime()?.block_on(async move {
        let (bound, fut) = serve(cfg, ctrl_c()).await?;
        eprintln!("umbra serve: listening on http://{bound}");
        fut.await;
        Ok(())
    })
}

/// Runs `umbra proxy` until Ctrl-C.
pub fn run_proxy(args: &ProxyArgs) -> Result<(), ServeError> {
    let key = args.key.clone().ok_or_else(|| {
        ServeError::Config("--key is required (the client key of the obfuscated model)".into())
    })?;
    if args.tokenizer.is_none() && args.split_client.is_none() {
        return Err(ServeError::Config(
            "--tokenizer (the plaintext model folder) or --split-client is required".into(),
        ));
    }
    let mut cfg = ProxyConfig::new(
        key,
        args.tokenizer.clone().unwrap_or_default(),
        args.upstream.clone(),
        addr(&args.host, args.port)?,
    );
    cfg.split_client = args.split_client.clone();
    cfg.model_name = args.model_name.clone();
    cfg.upstream_timeout = secs(args.upstream_timeout_s, "--upstream-timeout-s")?;
    cfg.upstream_api_key = secret(&args.upstream_api_key, &args.upstream_api_key_file)?;
    cfg.access = args.access.policy()?;
    runtime()?.block_on(async move {
        let (bound, fut) = crate::proxy::run_proxy(cfg, ctrl_c()).await?;
        eprintln!(
            "umbra proxy: listening on http://{bound}, upstream {}",
            args.upstream
        );
        fut.await;
        Ok(())
    })
}

/// Runs `umbra bench serve`.
pub fn run_bench(a: &BenchServeArgs) -> Result<(), ServeError> {
    let opts = crate::bench::BenchServeOptions {
        model: match &a.model {
            Some(m) => m.clone(),
            None => crate::bench::default_model()?,
        },
        json: a.json.clone(),
        clients: a.clients.clone(),
        max_tokens: a.max_tokens,
        requests_per_client: a.requests_per_client,
        h: a.h,
        soak: a.soak.map(|n| crate::bench::soak::SoakOptions {
            prompt_tokens: n,
            chats: a.soak_chats.max(1),
            max_tokens: a.max_tokens,
            rounds: a.requests_per_client,
            threads: None,
        }),
    };
    runtime()?.block_on(crate::bench::run(&opts))
}
