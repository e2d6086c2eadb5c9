//! `umbra bench serve`: plain vs obfuscated serving at several client counts.
//!
//! For each client count `c`, `c` closed-loop clients each send `requests_per_client` streamed
//! greedy completions of the same prompt:
//! * plain: to `umbra serve` on the plaintext model (text prompt);
//! * obf: to `umbra proxy` in front of `umbra serve` on the exact-mode obfuscated model;
//! * direct: to the obfuscated server with pre-mapped ids (no proxy), to isolate the proxy;
//! * split: to `umbra proxy --split-client` in front of `umbra serve` on the server part of the
//!   same exact key's split (`umbra obfuscate --split`): one round trip per token; the server
//!   batches concurrent sessions' decode steps and the proxy their heads.
//!
//! `tok_s_*` = generated tokens / wall time of the wave, `ttft_ms_*` = mean time to the first
//! token, `tpot_ms_*` = mean time per output token after the first, `proxy_overhead_ms` = the
//! proxy's own mean processing time per request (its `/metrics`: parsing, tau mapping both
//! ways, upstream request and chunk handling; tokenization and waiting excluded).
//! `mean_decode_batch_plain` = sequences per batched decode forward during the plain wave.
mod load;
pub mod soak;

use crate::error::ServeError;
use crate::proxy::{start_proxy, ProxyConfig};
use crate::server::{start, ModelSource, ServeConfig};
use load::wave;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

const PROMPT: &str =
    "Once upon a time, in a small village by the sea, there lived an old fisherman who";

/// `(sum seconds, count)` of the proxy's `umbra_proxy_overhead_seconds`.
async fn proxy_overhead(base: &str) -> Result<(f64, f64), ServeError> {
    metric_pair(
        base,
        "umbra_proxy_overhead_seconds_sum ",
        "umbra_proxy_overhead_seconds_count ",
    )
    .await
}

/// `(decode rows, decode steps)` of a server.
async fn decode_counts(base: &str) -> Result<(f64, f64), ServeError> {
    metric_pair(
        base,
        "umbra_decode_rows_total ",
        "umbra_decode_steps_total ",
    )
    .await
}

async fn metric_pair(base: &str, a: &str, b: &str) -> Result<(f64, f64), ServeError> {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| ServeError::Other(format!("proxy metrics: {e}")))?
        .text()
        .await
        .map_err(|e| ServeError::Other(format!("proxy metrics: {e}")))?;
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((get(a), get(b)))
}

fn loopback() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Runs the benchmark on `model` (plaintext HF folder) and returns the JSON report.
pub async fn bench(
    model: &Path,
    clients: &[usize],
    max_tokens: usize,
    reqs: usize,
    h: usize,
) -> Result<Value, ServeError> {
    let tmp = tempfile_dir()?;
    let (obf_dir, key) = (tmp.join("obf"), tmp.join("client.key"));
    let (split_dir, split_key) = (tmp.join("split"), tmp.join("split.key"));
    let (m, o, k, so, sk) = (
        model.to_path_buf(),
        obf_dir.clone(),
        key.clone(),
        split_dir.clone(),
        split_key.clone(),
    );
    let progress = umbra_common::progress::Progress::new(clients.len() as u64, "bench serve");
    progress
        .println("bench serve: compiling the exact-mode obfuscated checkpoint and its split parts");
    tokio::task::spawn_blocking(move || -> Result<(), umbra_aloepri::AloeError> {
        let params = umbra_aloepri::ObfuscationParams::exact(h);
        umbra_aloepri::compiler::compile_checkpoint(&m, &o, &k, &params, 1, &mut |_, _, _| {})?;
        umbra_aloepri::split_parts::compile_split(&m, &so, &sk, &params, 1, &mut |_, _, _| {})?;
        Ok(())
    })
    .await
    .map_err(|e| ServeError::Other(e.to_string()))??;
    let max_batch = clients.iter().copied().max().unwrap_or(1).max(1);
    let mk = |dir: &Path| {
        let mut c = ServeConfig::new(ModelSource::Path(dir.into()), loopback());
        c.model_name = Some("bench".into());
        c.max_batch = max_batch;
        c
    };
    let plain = start(mk(model)).await?;
    let obf = start(mk(&obf_dir)).await?;
    let mut proxy_cfg = ProxyConfig::new(key.clone(), model.into(), obf.url(), loopback());
    proxy_cfg.model_name = Some("bench".into());
    let proxy = start_proxy(proxy_cfg).await?;
    let split_server = start(mk(&split_dir.join(umbra_aloepri::split_parts::SERVER_DIR))).await?;
    let mut split_cfg = ProxyConfig::new(
        split_key,
        Default::default(),
        split_server.url(),
        loopback(),
    );
    split_cfg.split_client = Some(split_dir.join(umbra_aloepri::split_parts::CLIENT_DIR));
    split_cfg.model_name = Some("bench".into());
    let split_proxy = start_proxy(split_cfg).await?;
    let (_, tok) = umbra_model::checkpoint::Checkpoint::open_config_and_tokenizer(model)?;
    let tok = tok.ok_or_else(|| ServeError::Config("the model has no tokenizer".into()))?;
    let tau = umbra_aloepri::ClientKey::load(&key)?.permutation()?;
    let t = Instant::now();
    let n_tok = 20;
    for _ in 0..n_tok {
        std::hint::black_box(
            crate::text::text_prompt_ids(&tok, PROMPT).map_err(|e| ServeError::Other(e.message))?,
        );
    }
    let tokenize_ms = t.elapsed().as_secs_f64() * 1e3 / n_tok as f64;
    let ids =
        crate::text::text_prompt_ids(&tok, PROMPT).map_err(|e| ServeError::Other(e.message))?;
    let text_body = json!({"model": "bench", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": true});
    let direct_body = json!({"model": "bench", "prompt": tau.apply(&ids)?, "max_tokens": max_tokens, "temperature": 0,
                             "stream": true, "return_text": false});
    // Warm-up.
    wave(&format!("{}/v1/completions", plain.url()), &text_body, 1, 1).await?;
    wave(&format!("{}/v1/completions", proxy.url()), &text_body, 1, 1).await?;
    let split_url = format!("{}/v1/completions", split_proxy.url());
    wave(&split_url, &text_body, 1, 1).await?;
    let mut rows = vec![];
    for &c in clients {
        progress.set_note(format!("{c} client(s)"));
        let pb = decode_counts(&plain.url()).await?;
        let p = wave(
            &format!("{}/v1/completions", plain.url()),
            &text_body,
            c,
            reqs,
        )
        .await?;
        let pa = decode_counts(&plain.url()).await?;
        let mean_batch = (pa.0 - pb.0) / (pa.1 - pb.1).max(1.0);
        let before = proxy_overhead(&proxy.url()).await?;
        let o = wave(
            &format!("{}/v1/completions", proxy.url()),
            &text_body,
            c,
            reqs,
        )
        .await?;
        let after = proxy_overhead(&proxy.url()).await?;
        let overhead_ms = (after.0 - before.0) / (after.1 - before.1).max(1.0) * 1e3;
        let d = wave(
            &format!("{}/v1/completions", obf.url()),
            &direct_body,
            c,
            reqs,
        )
        .await?;
        let sp = wave(&split_url, &text_body, c, reqs).await?;
        rows.push(json!({
            "clients": c,
            "mean_decode_batch_plain": mean_batch,
            "tok_s_plain": p.tok_s, "tok_s_obf": o.tok_s, "tok_s_obf_direct": d.tok_s,
            "ttft_ms_plain": p.ttft_ms, "ttft_ms_obf": o.ttft_ms,
            "tpot_ms_plain": p.tpot_ms, "tpot_ms_obf": o.tpot_ms,
            "latency_ms_obf": o.latency_ms, "latency_ms_obf_direct": d.latency_ms,
            "proxy_overhead_ms": overhead_ms,
            "latency_diff_ms_obf_proxy_vs_direct": o.latency_ms - d.latency_ms,
            "obf_over_plain": o.tok_s / p.tok_s,
            "tok_s_split": sp.tok_s, "ttft_ms_split": sp.ttft_ms, "tpot_ms_split": sp.tpot_ms,
            "split_over_plain": sp.tok_s / p.tok_s,
        }));
        progress.inc(1);
    }
    progress.finish();
    split_proxy.stop().await;
    split_server.stop().await;
    proxy.stop().await;
    obf.stop().await;
    plain.stop().await;
    let _ = std::fs::remove_dir_all(&tmp);
    let tok_s = |c: usize, k: &str| {
        rows.iter()
            .find(|r| r["clients"] == c)
            .and_then(|r| r[k].as_f64())
    };
    let speedup = match (tok_s(max_batch, "tok_s_plain"), tok_s(1, "tok_s_plain")) {
        (Some(a), Some(b)) if b > 0.0 => json!(a / b),
        _ => Value::Null,
    };
    Ok(json!({
        "model": model.display().to_string(),
        "prompt_tokens": ids.len(),
        "max_tokens": max_tokens,
        "requests_per_client": reqs,
        "obfuscation": format!("exact(h={h})"),
        "tokenize_ms": tokenize_ms,
        "batch_speedup_plain": speedup,
        "results": rows,
    }))
}

fn tempfile_dir() -> Result<std::path::PathBuf, ServeError> {
    let d = std::env::temp_dir().join(format!("umbra-bench-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Prints the report as a Markdown table (one row per client count).
fn print_table(report: &serde_json::Value) {
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    println!("| clients | tok/s plain | tok/s obf | obf/plain | tok/s split | split/plain | TTFT ms plain / obf / split | TPOT ms plain / obf / split | proxy overhead ms |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in report["results"].as_array().into_iter().flatten() {
        println!(
            "| {} | {:.1} | {:.1} | {:.2} | {:.1} | {:.2} | {:.0} / {:.0} / {:.0} | {:.1} / {:.1} / {:.1} | {:.2} |",
            r["clients"],
            f(r, "tok_s_plain"),
            f(r, "tok_s_obf"),
            f(r, "obf_over_plain"),
            f(r, "tok_s_split"),
            f(r, "split_over_plain"),
            f(r, "ttft_ms_plain"),
            f(r, "ttft_ms_obf"),
            f(r, "ttft_ms_split"),
            f(r, "tpot_ms_plain"),
            f(r, "tpot_ms_obf"),
            f(r, "tpot_ms_split"),
            f(r, "proxy_overhead_ms"),
        );
    }
    println!(
        "batched throughput, most clients vs one (plaintext): {:.2}x",
        f(report, "batch_speedup_plain")
    );
}

/// What `umbra bench serve` runs.
#[derive(Debug, Clone)]
pub struct BenchServeOptions {
    /// Plaintext model folder.
    pub model: PathBuf,
    /// Where the JSON report goes.
    pub json: PathBuf,
    pub clients: Vec<usize>,
    pub max_tokens: usize,
    pub requests_per_client: usize,
    /// Residual expansion of the obfuscated checkpoint.
    pub h: usize,
    /// A soak instead of the throughput waves.
    pub soak: Option<soak::SoakOptions>,
}

/// The cached SmolLM2-135M-Instruct folder (the benchmarks' default model).
pub fn default_model() -> Result<PathBuf, ServeError> {
    umbra_assets::Cache::from_env()
        .and_then(|c| c.require_smollm2_hf())
        .map_err(|e| ServeError::Config(format!("{e} (or pass --model)")))
}

/// `umbra bench serve`: runs, writes the JSON report, prints the table.
pub async fn run(o: &BenchServeOptions) -> Result<(), ServeError> {
    if o.clients.is_empty()
        || o.clients.contains(&0)
        || o.max_tokens == 0
        || o.requests_per_client == 0
    {
        return Err(ServeError::Config(
            "--clients, --max-tokens and --requests-per-client must be >= 1".into(),
        ));
    }
    let report = match &o.soak {
        Some(s) => soak::soak(&o.model, s).await?,
        None => {
            bench(
                &o.model,
                &o.clients,
                o.max_tokens,
                o.requests_per_client,
                o.h,
            )
            .await?
        }
    };
    umbra_common::fs::write_json(&o.json, &report)
        .map_err(|e| ServeError::Other(format!("{}: {e}", o.json.display())))?;
    match &o.soak {
        Some(_) => soak::print_table(&report),
        None => print_table(&report),
    }
    eprintln!("wrote {}", o.json.display());
    Ok(())
}
