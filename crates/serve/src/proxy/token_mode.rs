//! Token mode: the prompt goes upstream as tau-permuted ids (`POST /v1/completions`,
//! `stream: true`, `return_text: false`); the streamed ids come back through tau^-1.
use super::upstream::Upstream;
use crate::api::{ApiError, GenOptions};
use crate::engine::{Event, Finish, TokenLogprob};
use crate::respond::{respond, RespondCtx};
use axum::http::StatusCode;
use axum::response::Response;
use futures::StreamExt;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use umbra_aloepri::TokenPermutation;

/// The proxy's own processing time per request: parsing, id mapping both ways, upstream
/// request building and chunk parsing; tokenization, detokenization and waiting excluded.
#[derive(Debug, Default)]
pub(super) struct ProxyStats {
    pub requests: AtomicU64,
    pub overhead_ns: AtomicU64,
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

/// The upstream request for `obf` (already permuted ids) with the options the server needs.
/// The model is not named: the upstream serves one, under a name the apps never see.
fn upstream_body(obf: &[u32], opts: &GenOptions) -> Value {
    let mut body = json!({
        "prompt": obf, "stream": true, "return_text": false,
        "temperature": opts.temperature, "max_tokens": opts.max_tokens,
    });
    if let Some(o) = body.as_object_mut() {
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
    }
    body
}

/// Maps the prompt through tau, calls the server with ids and answers from the mapped-back
/// stream.
pub(super) async fn forward(
    up: &Upstream,
    stats: &Arc<ProxyStats>,
    tau: &TokenPermutation,
    ctx: RespondCtx,
    ids: Vec<u32>,
    (t0, tok_time): (Instant, Duration),
) -> Result<Response, ApiError> {
    let obf = tau
        .apply(&ids)
        .map_err(|e| ApiError::bad_request(format!("prompt: {e}")))?;
    let body = upstream_body(&obf, &ctx.opts);
    let guard = OverheadGuard {
        stats: stats.clone(),
        ns: t0.elapsed().saturating_sub(tok_time).as_nanos() as u64,
    };
    let resp = up.post_json("/v1/completions", &body).await?;
    if !resp.status().is_success() {
        return Err(up.relay_error(resp).await);
    }
    up.check_answer(&resp)?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(relay(resp, tau.clone(), Arc::new(up_view(up)), tx, guard));
    Ok(respond(ctx, rx).await)
}

/// What the relay task needs of the upstream (owned, for the spawned task).
struct UpView {
    url: String,
    idle: Duration,
}

fn up_view(up: &Upstream) -> UpView {
    UpView {
        url: up.url.clone(),
        idle: up.timeout,
    }
}

impl UpView {
    fn failed(&self, msg: impl std::fmt::Display) -> Event {
        Event::Error(ApiError::upstream(StatusCode::BAD_GATEWAY, &self.url, msg))
    }
}

/// Reads the upstream's SSE stream and sends plaintext events to `tx` until the answer ends,
/// the upstream fails (an error event naming it) or the app leaves (`tx` closed).
async fn relay(
    resp: reqwest::Response,
    tau: TokenPermutation,
    up: Arc<UpView>,
    tx: mpsc::UnboundedSender<Event>,
    mut guard: OverheadGuard,
) {
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = vec![];
    loop {
        let next = tokio::select! {
            n = tokio::time::timeout(up.idle, stream.next()) => n,
            _ = tx.closed() => return,
        };
        let chunk = match next {
            Err(_) => {
                let _ = tx.send(Event::Error(ApiError::upstream(
                    StatusCode::GATEWAY_TIMEOUT,
                    &up.url,
                    format!("stalled for {} s", up.idle.as_secs_f64()),
                )));
                return;
            }
            Ok(None) => {
                let _ = tx.send(up.failed("closed the stream before the answer ended"));
                return;
            }
            Ok(Some(Err(e))) => {
                let _ = tx.send(up.failed(format!("the stream broke: {e}")));
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
                    let _ = tx.send(up.failed("ended the stream without a finish reason"));
                    return;
                }
                for e in upstream_events(&tau, &up, data) {
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
fn upstream_events(tau: &TokenPermutation, up: &UpView, data: &str) -> Vec<Event> {
    let v: Value = match serde_json::from_str(data) {
        Ok(v) => v,
        Err(e) => return vec![up.failed(format!("sent a malformed chunk: {e}"))],
    };
    if let Some(m) = v.get("error") {
        return vec![up.failed(format!(
            "failed mid-answer: {}",
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
            return vec![up.failed(format!("returned token id {obf} outside the vocabulary"))];
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
