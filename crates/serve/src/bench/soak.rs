//! `umbra bench serve --soak`: a prompt of (nearly) the model's whole context sent beside
//! short chats, against the same chats alone. Reports the chats' latencies (p50, p99, max) in
//! both phases and their ratio, the long prompt's time, and the process's memory (the server
//! runs in this process). The suite's soak test runs the same on a tiny long-context model.
use super::load::{one, Sample};
use crate::error::ServeError;
use crate::server::{start, ModelSource, ServeConfig, ServerHandle};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};
use umbra_common::mem::{peak_rss_mib, rss_mib};

/// Tokens the long prompt asks for (its answer is not the point).
pub const LONG_ANSWER: usize = 4;

const LONG_TEXT: &str = "The harbour town woke slowly. Fishing boats came back with the tide, \
    gulls argued over the nets, and the baker opened his shutters to the smell of bread. ";

const CHATS: [&str; 8] = [
    "Name three fruits.",
    "What is the capital of France?",
    "Say hello in Spanish.",
    "What colour is the sky?",
    "Give me a word that rhymes with cat.",
    "How many legs does a spider have?",
    "What is two plus two?",
    "Name a large ocean.",
];

/// What a soak runs.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// Tokens of the long prompt (0: the model's context minus [`LONG_ANSWER`]).
    pub prompt_tokens: usize,
    /// Short chats sent at once.
    pub chats: usize,
    /// Tokens each chat generates.
    pub max_tokens: usize,
    /// Rounds of `chats` concurrent chats in each phase.
    pub rounds: usize,
    /// The server engine's CPU threads (`None`: all cores).
    pub threads: Option<usize>,
}

/// `q`-quantile (nearest rank) of `v`, in milliseconds.
fn quantile_ms(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let k = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len().max(1));
    s.get(k - 1).copied().unwrap_or(f64::NAN) * 1e3
}

fn summary(samples: &[Sample]) -> Value {
    let lat: Vec<f64> = samples.iter().map(|s| s.latency).collect();
    let ttft: Vec<f64> = samples.iter().map(|s| s.ttft).collect();
    json!({
        "n": samples.len(),
        "latency_ms_p50": quantile_ms(&lat, 0.5), "latency_ms_p99": quantile_ms(&lat, 0.99),
        "latency_ms_max": quantile_ms(&lat, 1.0),
        "ttft_ms_p50": quantile_ms(&ttft, 0.5), "ttft_ms_p99": quantile_ms(&ttft, 0.99),
    })
}

/// `rounds` rounds of `n` concurrent streamed chats.
async fn chat_rounds(
    url: &str,
    n: usize,
    max_tokens: usize,
    rounds: usize,
) -> Result<Vec<Sample>, ServeError> {
    let client = reqwest::Client::new();
    let mut out = vec![];
    for _ in 0..rounds {
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let body = json!({"model": "soak", "max_tokens": max_tokens, "temperature": 0,
                                  "stream": true,
                                  "messages": [{"role": "user", "content": CHATS[i % CHATS.len()]}]});
                let (client, url) = (client.clone(), url.to_string());
                tokio::spawn(async move { one(&client, &url, &body).await })
            })
            .collect();
        for t in tasks {
            out.push(t.await.map_err(|e| ServeError::Other(e.to_string()))??);
        }
    }
    Ok(out)
}

async fn metric(base: &str, name: &str) -> Result<f64, ServeError> {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| ServeError::Other(format!("metrics: {e}")))?
        .text()
        .await
        .map_err(|e| ServeError::Other(format!("metrics: {e}")))?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0))
}

/// The long prompt's ids: the tokenized paragraph repeated to `n` tokens.
fn long_prompt(model: &Path, n: usize) -> Result<Vec<u32>, ServeError> {
    let (_, tok) = umbra_model::checkpoint::Checkpoint::open_config_and_tokenizer(model)?;
    let tok = tok.ok_or_else(|| ServeError::Config("the model has no tokenizer".into()))?;
    let unit = tok.encode(LONG_TEXT, false)?;
    if unit.is_empty() {
        return Err(ServeError::Config(
            "the soak text tokenizes to nothing".into(),
        ));
    }
    Ok(unit.iter().copied().cycle().take(n).collect())
}

/// Runs the soak on the plaintext model at `model` and returns the report.
pub async fn soak(model: &Path, o: &SoakOptions) -> Result<Value, ServeError> {
    let mut cfg = ServeConfig::new(
        ModelSource::Path(model.into()),
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
    );
    cfg.model_name = Some("soak".into());
    cfg.max_batch = o.chats + 1;
    cfg.threads = o.threads;
    let srv: ServerHandle = start(cfg).await?;
    let (base, chat_url) = (srv.url(), format!("{}/v1/chat/completions", srv.url()));
    let context = reqwest::get(format!("{base}/v1/models"))
        .await
        .map_err(|e| ServeError::Other(e.to_string()))?
        .json::<Value>()
        .await
        .map_err(|e| ServeError::Other(e.to_string()))?["data"][0]["max_model_len"]
        .as_u64()
        .unwrap_or(0) as usize;
    let n = match o.prompt_tokens {
        0 => context.saturating_sub(LONG_ANSWER),
        n => n,
    };
    let ids = long_prompt(model, n)?;
    chat_rounds(&chat_url, 1, o.max_tokens, 1).await?; // warm-up
    let rss_idle = rss_mib().unwrap_or(f64::NAN);
    let alone = chat_rounds(&chat_url, o.chats, o.max_tokens, o.rounds).await?;
    let peak_alone = peak_rss_mib().unwrap_or(f64::NAN);
    // The long prompt first; the chats once its prefill has started.
    let before = metric(&base, "umbra_prefill_tokens_total ").await?;
    let long_url = format!("{base}/v1/completions");
    let body = json!({"model": "soak", "prompt": ids, "max_tokens": LONG_ANSWER, "temperature": 0});
    let t_long = Instant::now();
    let long = tokio::spawn(async move {
        let r = reqwest::Client::new()
            .post(&long_url)
            .json(&body)
            .send()
            .await
            .map_err(|e| ServeError::Other(e.to_string()))?;
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        Ok::<_, ServeError>((status, text, Instant::now()))
    });
    let started = Instant::now();
    while metric(&base, "umbra_prefill_tokens_total ").await? <= before {
        if started.elapsed() > Duration::from_secs(60) || long.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let beside = chat_rounds(&chat_url, o.chats, o.max_tokens, o.rounds).await?;
    let chats_end = Instant::now();
    let (status, text, long_end) = long.await.map_err(|e| ServeError::Other(e.to_string()))??;
    if status != 200 {
        return Err(ServeError::Other(format!(
            "the long prompt got {status}: {text}"
        )));
    }
    let peak = peak_rss_mib().unwrap_or(f64::NAN);
    srv.stop().await;
    let (a, b) = (summary(&alone), summary(&beside));
    let ratio = b["latency_ms_p99"].as_f64().unwrap_or(f64::NAN)
        / a["latency_ms_p99"].as_f64().unwrap_or(f64::NAN);
    Ok(json!({
        "model": model.display().to_string(),
        "context": context,
        "long_prompt_tokens": ids.len(),
        "long_prompt_s": long_end.duration_since(t_long).as_secs_f64(),
        "long_overlapped_chats": long_end > chats_end,
        "chats": o.chats, "rounds": o.rounds, "chat_max_tokens": o.max_tokens,
        "engine_threads": o.threads,
        "alone": a, "beside_long_prompt": b,
        "p99_ratio": ratio,
        "rss_mib_idle": rss_idle,
        "peak_rss_mib_chats_alone": peak_alone,
        "peak_rss_mib": peak,
    }))
}

/// Prints a soak report.
pub fn print_table(r: &Value) {
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!("| phase | chats | latency p50 / p99 / max ms | TTFT p50 / p99 ms |");
    println!("|---|---|---|---|");
    for (name, k) in [
        ("alone", "alone"),
        ("beside long prompt", "beside_long_prompt"),
    ] {
        let v = &r[k];
        println!(
            "| {name} | {} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} |",
            v["n"],
            f(v, "latency_ms_p50"),
            f(v, "latency_ms_p99"),
            f(v, "latency_ms_max"),
            f(v, "ttft_ms_p50"),
            f(v, "ttft_ms_p99"),
        );
    }
    println!(
        "p99 ratio {:.2}; long prompt {} tokens in {:.1} s (overlapped the chats: {}); peak RSS {:.0} MiB (idle {:.0} MiB)",
        f(r, "p99_ratio"),
        r["long_prompt_tokens"],
        f(r, "long_prompt_s"),
        r["long_overlapped_chats"],
        f(r, "peak_rss_mib"),
        f(r, "rss_mib_idle"),
    );
}
