//! Command-line entry points: `umbra serve`, `umbra proxy` and `umbra bench serve` are one
//! line each in the `umbra` binary: `umbra_serve::cli::run_serve(&args)`,
//! `umbra_serve::cli::run_proxy(&args)` and `umbra_serve::cli::run_bench_serve(&args)`.
use crate::error::ServeError;
use crate::proxy::ProxyConfig;
use crate::server::{serve, ModelSource, ServeConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `umbra serve`: the provider's OpenAI-compatible server (plain or obfuscated checkpoint).
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// HF checkpoint folder or `.gguf` file.
    #[arg(long)]
    pub model: PathBuf,
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
    /// Seconds to wait for the upstream's answer or its next streamed token.
    #[arg(long, default_value_t = 60.0)]
    pub upstream_timeout_s: f64,
}

/// `umbra bench serve`: throughput and latency of plain vs obfuscated serving.
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

async fn ctrl_c() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Runs `umbra serve` until Ctrl-C.
pub fn run_serve(args: &ServeArgs) -> Result<(), ServeError> {
    let mut cfg = ServeConfig::new(
        ModelSource::Path(args.model.clone()),
        addr(&args.host, args.port)?,
    );
    cfg.model_name = args.model_name.clone();
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
    cfg.halluc_probe = args.halluc_probe.clone();
    cfg.split_idle = secs(args.split_idle_s, "--split-idle-s")?;
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
    cfg.upstream_timeout = secs(args.upstream_timeout_s, "--upstream-timeout-s")?;
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
pub fn run_bench_serve(args: &BenchServeArgs) -> Result<(), ServeError> {
    runtime()?.block_on(crate::bench::run(args))
}
