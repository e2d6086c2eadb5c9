//! Split mode behind the proxy: generation runs here ([`SplitClient`]: embedding, head and
//! sampling local, the blocks on the upstream, one round trip per token) and the answer is
//! built from the generated ids.
use crate::api::{self, ApiError};
use crate::engine::{Event, Finish};
use crate::error::ServeError;
use crate::respond::{respond, RespondCtx};
use crate::split_mode::SplitClient;
use axum::http::StatusCode;
use axum::response::Response;
use std::sync::Arc;
use tokio::sync::mpsc;
use umbra_model::generate::{FinishReason, GenerateParams};
use umbra_model::sampling::SamplingParams;

/// Generates `ids`' answer through the split server and responds.
pub(super) async fn forward(
    split: &Arc<SplitClient>,
    ctx: RespondCtx,
    ids: Vec<u32>,
    max_tokens_limit: usize,
) -> Result<Response, ApiError> {
    let opts = &ctx.opts;
    if opts.logprobs.is_some() {
        return Err(ApiError::bad_request(
            "`logprobs` is not available in split mode",
        ));
    }
    let max_tokens = api::resolve_max_tokens(
        opts.max_tokens,
        ids.len(),
        split.max_positions(),
        max_tokens_limit,
    )?;
    let params = GenerateParams {
        max_tokens,
        sampling: SamplingParams {
            temperature: opts.temperature,
            top_k: opts.top_k,
            top_p: opts.top_p,
            seed: opts.seed.unwrap_or_else(umbra_common::seed::os_seed),
        },
        stop_ids: split.stop_ids.clone(),
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (split, rt, prompt) = (split.clone(), tokio::runtime::Handle::current(), ids);
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
            Err(e) => Event::Error(split_error(split.url(), &e)),
        };
        let _ = tx.send(last);
    });
    // Wait for the prompt's step: a split server that is full (429), unreachable (502) or
    // refuses the request gets its own status, as in token mode, before any answer starts.
    let first = match rx.recv().await {
        Some(Event::Error(e)) => return Err(e),
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
    Ok(respond(ctx, out_rx).await)
}

/// The answer for a split-mode generation that failed: the server's refusal of the request
/// keeps its status (4xx; a 429 its `Retry-After`), its failures are 502 naming it (504 when
/// it timed out), the client's own failures 500.
fn split_error(url: &str, e: &ServeError) -> ApiError {
    match e {
        ServeError::Upstream { status, message } => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY);
            match status.as_u16() {
                429 => ApiError::new(
                    status,
                    "rate_limit_error",
                    format!("split server {message}"),
                )
                .with_retry_after(crate::engine::RETRY_AFTER_S),
                400..=499 | 504 => {
                    ApiError::new(status, "upstream_error", format!("split server {message}"))
                }
                _ => ApiError::upstream(StatusCode::BAD_GATEWAY, url, message),
            }
        }
        ServeError::Config(m) => {
            ApiError::new(StatusCode::BAD_GATEWAY, "upstream_error", m.clone())
        }
        e => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("split mode: {e}"),
        ),
    }
}
