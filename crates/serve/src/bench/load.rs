//! The load generator of the benchmarks: closed-loop clients of streamed completions, timing
//! each answer's first token, tokens and end.
use crate::error::ServeError;
use futures::StreamExt;
use serde_json::Value;
use std::time::Instant;

/// Means over one wave of requests.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wave {
    pub tok_s: f64,
    pub ttft_ms: f64,
    pub tpot_ms: f64,
    pub latency_ms: f64,
}

/// One answer: tokens, seconds to the first, seconds per token after it, seconds in all.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub tokens: usize,
    pub ttft: f64,
    pub tpot: Option<f64>,
    pub latency: f64,
}

/// Sends one streamed request and times its answer (an error chunk is an error).
pub async fn one(client: &reqwest::Client, url: &str, body: &Value) -> Result<Sample, ServeError> {
    let t0 = Instant::now();
    let r = client
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(|e| ServeError::Other(format!("{url}: {e}")))?;
    if !r.status().is_success() {
        let st = r.status();
        let t = r.text().await.unwrap_or_default();
        return Err(ServeError::Other(format!("{url}: {st}: {t}")));
    }
    let mut s = r.bytes_stream();
    let (mut buf, mut tokens, mut first, mut last) = (String::new(), 0usize, None, t0);
    while let Some(c) = s.next().await {
        let c = c.map_err(|e| ServeError::Other(format!("{url}: {e}")))?;
        buf.push_str(&String::from_utf8_lossy(&c));
        while let Some(p) = buf.find("\n\n") {
            let ev: String = buf.drain(..p + 2).collect();
            for line in ev.lines() {
                let Some(d) = line.strip_prefix("data:") else {
                    continue;
                };
                let d = d.trim();
                if d == "[DONE]" {
                    continue;
                }
                let v: Value = serde_json::from_str(d)
                    .map_err(|e| ServeError::Other(format!("{url}: bad chunk {e}")))?;
                if let Some(e) = v.get("error") {
                    return Err(ServeError::Other(format!("{url}: error chunk: {e}")));
                }
                let n = v["choices"][0]["token_ids"]
                    .as_array()
                    .map_or(0, |a| a.len());
                if n > 0 {
                    let now = Instant::now();
                    first.get_or_insert(now);
                    last = now;
                    tokens += n;
                }
            }
        }
    }
    let first = first.unwrap_or(last);
    Ok(Sample {
        tokens,
        ttft: first.duration_since(t0).as_secs_f64(),
        tpot: (tokens > 1).then(|| last.duration_since(first).as_secs_f64() / (tokens - 1) as f64),
        latency: t0.elapsed().as_secs_f64(),
    })
}

/// `clients` closed-loop clients each sending `reqs` requests; means over all answers.
pub async fn wave(
    url: &str,
    body: &Value,
    clients: usize,
    reqs: usize,
) -> Result<Wave, ServeError> {
    let client = reqwest::Client::new();
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, url, body) = (client.clone(), url.to_string(), body.clone());
            tokio::spawn(async move {
                let mut out = vec![];
                for _ in 0..reqs {
                    out.push(one(&client, &url, &body).await?);
                }
                Ok::<_, ServeError>(out)
            })
        })
        .collect();
    let mut all = vec![];
    for t in tasks {
        all.extend(t.await.map_err(|e| ServeError::Other(e.to_string()))??);
    }
    let wall = t0.elapsed().as_secs_f64();
    let n = all.len() as f64;
    let tpots: Vec<f64> = all.iter().filter_map(|s| s.tpot).collect();
    Ok(Wave {
        tok_s: all.iter().map(|s| s.tokens).sum::<usize>() as f64 / wall,
        ttft_ms: all.iter().map(|s| s.ttft).sum::<f64>() / n * 1e3,
        tpot_ms: tpots.iter().sum::<f64>() / tpots.len().max(1) as f64 * 1e3,
        latency_ms: all.iter().map(|s| s.latency).sum::<f64>() / n * 1e3,
    })
}
