//! Turns a stream of generated ids ([`Event`]s, from the engine or from an upstream server)
//! into an OpenAI response: JSON, or SSE chunks. Shared by the server and the proxy, so both
//! detokenize, apply stop sequences and count usage the same way.
use crate::api::{new_id, now_unix, ApiError, GenOptions};
use crate::engine::{Event, HalluScore, TokenLogprob};
use crate::text::StopMatcher;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::mpsc;
use umbra_model::tokenizer::{IncrementalDecoder, TextTokenizer};

/// How to shape the response.
#[derive(Clone)]
pub struct RespondCtx {
    pub chat: bool,
    pub model: String,
    /// Detokenizer; `None` (or `return_text == false`) gives empty text and ids only.
    pub tokenizer: Option<Arc<TextTokenizer>>,
    pub return_text: bool,
    pub opts: GenOptions,
    pub prompt_tokens: usize,
}

/// Incremental text with stop sequences.
struct TextOut {
    tok: Option<Arc<TextTokenizer>>,
    dec: Option<IncrementalDecoder>,
    stop: StopMatcher,
}

impl TextOut {
    fn new(ctx: &RespondCtx) -> Self {
        let tok = if ctx.return_text {
            ctx.tokenizer.clone()
        } else {
            None
        };
        let dec = tok.as_ref().map(|t| t.incremental_decoder(true));
        Self {
            tok,
            dec,
            stop: StopMatcher::new(ctx.opts.stop.clone()),
        }
    }

    /// Text released by `id`, and whether a stop sequence ended the output.
    fn push(&mut self, id: u32) -> (String, bool) {
        match (&self.tok, &mut self.dec) {
            (Some(t), Some(d)) => {
                let piece = d.push(t, id).unwrap_or_default();
                self.stop.push(&piece)
            }
            _ => (String::new(), false),
        }
    }

    fn finish(&mut self) -> String {
        let rest = match (&self.tok, &mut self.dec) {
            (Some(t), Some(d)) => d.flush(t).unwrap_or_default(),
            _ => String::new(),
        };
        let (mut out, _) = self.stop.push(&rest);
        if !self.stop.stopped() {
            out.push_str(&self.stop.finish());
        }
        out
    }

    fn token_str(&self, id: u32) -> String {
        match &self.tok {
            Some(t) => t.decode(&[id], false).unwrap_or_default(),
            None => String::new(),
        }
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// Logprobs in the endpoint's format, plus `token_ids` / `top_logprob_ids` extensions.
fn logprobs_json(
    chat: bool,
    out: &TextOut,
    entries: &[(u32, TokenLogprob)],
    offset0: usize,
) -> Value {
    if chat {
        let content: Vec<Value> = entries
            .iter()
            .map(|(id, lp)| {
                let s = out.token_str(*id);
                json!({
                    "token": s, "logprob": lp.logprob, "bytes": s.as_bytes(), "token_id": id,
                    "top_logprobs": lp.top.iter().map(|(i, l)| {
                        let s = out.token_str(*i);
                        json!({"token": s, "logprob": l, "bytes": s.as_bytes(), "token_id": i})
                    }).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({ "content": content })
    } else {
        let mut offset = offset0;
        let mut tokens = vec![];
        let mut offsets = vec![];
        for (id, _) in entries {
            let s = out.token_str(*id);
            offsets.push(offset);
            offset += s.len();
            tokens.push(s);
        }
        json!({
            "tokens": tokens,
            "token_logprobs": entries.iter().map(|e| e.1.logprob).collect::<Vec<_>>(),
            "top_logprobs": entries.iter().map(|(_, lp)| {
                lp.top.iter().map(|(i, l)| (out.token_str(*i), json!(l))).collect::<serde_json::Map<_, _>>()
            }).collect::<Vec<_>>(),
            "text_offset": offsets,
            "token_ids": entries.iter().map(|e| e.0).collect::<Vec<_>>(),
            "top_logprob_ids": entries.iter().map(|(_, lp)| lp.top.iter().map(|(i, l)| json!([i, l])).collect::<Vec<_>>()).collect::<Vec<_>>(),
        })
    }
}

/// Adds `hallucination_score`, `hallucination_stage` and `hallucinated` to a response object
/// or final chunk (`umbra serve --halluc-probe`).
fn put_score(v: &mut Value, s: Option<&HalluScore>) {
    if let (Some(s), Some(o)) = (s, v.as_object_mut()) {
        o.insert("hallucination_score".into(), json!(s.score));
        o.insert("hallucination_stage".into(), json!(s.stage));
        o.insert("hallucinated".into(), json!(s.hallucinated));
    }
}

/// The score [`put_score`] wrote into `v`, if any (the proxy relays it).
pub fn parse_score(v: &Value) -> Option<HalluScore> {
    Some(HalluScore {
        score: v.get("hallucination_score")?.as_f64()? as f32,
        stage: v
            .get("hallucination_stage")
            .and_then(Value::as_str)
            .unwrap_or("generation")
            .to_string(),
        hallucinated: v
            .get("hallucinated")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

/// Collects or streams the generation in `rx`. Dropping `rx` (stop sequence, client gone)
/// tells the producer to stop.
pub async fn respond(ctx: RespondCtx, rx: mpsc::UnboundedReceiver<Event>) -> Response {
    if ctx.opts.stream {
        stream(ctx, rx).into_response()
    } else {
        match collect(&ctx, rx).await {
            Ok(v) => axum::Json(v).into_response(),
            Err(e) => e.into_response(),
        }
    }
}

async fn collect(
    ctx: &RespondCtx,
    mut rx: mpsc::UnboundedReceiver<Event>,
) -> Result<Value, ApiError> {
    let mut out = TextOut::new(ctx);
    let (mut text, mut ids, mut lps) = (String::new(), vec![], vec![]);
    let mut finish = None;
    let mut halluc = None;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Score(s) => halluc = Some(s),
            Event::Token { id, logprob } => {
                ids.push(id);
                if let Some(lp) = logprob {
                    lps.push((id, lp));
                }
                let (piece, stopped) = out.push(id);
                text.push_str(&piece);
                if stopped {
                    finish = Some("stop");
                    break;
                }
            }
            Event::Done(f) => {
                finish = Some(f.as_str());
                break;
            }
            Event::Error(e) => return Err(e),
        }
    }
    drop(rx);
    let finish = finish.ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "generation ended unexpectedly",
        )
    })?;
    text.push_str(&out.finish());
    let logprobs = if ctx.opts.logprobs.is_some() {
        logprobs_json(ctx.chat, &out, &lps, 0)
    } else {
        Value::Null
    };
    let u = usage(ctx.prompt_tokens, ids.len());
    let mut v = if ctx.chat {
        json!({
            "id": new_id("chatcmpl"), "object": "chat.completion", "created": now_unix(), "model": ctx.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                         "finish_reason": finish, "token_ids": ids}],
            "usage": u,
        })
    } else {
        json!({
            "id": new_id("cmpl"), "object": "text_completion", "created": now_unix(), "model": ctx.model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish, "token_ids": ids}],
            "usage": u,
        })
    };
    put_score(&mut v, halluc.as_ref());
    Ok(v)
}

fn stream(
    ctx: RespondCtx,
    mut rx: mpsc::UnboundedReceiver<Event>,
) -> Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>> {
    let (tx, srx) = mpsc::channel::<SseEvent>(64);
    tokio::spawn(async move {
        let id = new_id(if ctx.chat { "chatcmpl" } else { "cmpl" });
        let created = now_unix();
        let mut out = TextOut::new(&ctx);
        let mut offset = 0usize;
        let mut count = 0usize;
        let chunk_value = |text: &str,
                           ids: &[u32],
                           logprobs: Value,
                           finish: Option<&str>,
                           first: bool|
         -> Value {
            if ctx.chat {
                let delta = match (first, finish) {
                    (true, _) => json!({"role": "assistant", "content": text}),
                    (false, Some(_)) if text.is_empty() => json!({}),
                    _ => json!({"content": text}),
                };
                json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": ctx.model,
                       "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish, "token_ids": ids}]})
            } else {
                json!({"id": id, "object": "text_completion", "created": created, "model": ctx.model,
                       "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish, "token_ids": ids}]})
            }
        };
        let chunk =
            |text: &str, ids: &[u32], logprobs: Value, finish: Option<&str>, first: bool| {
                SseEvent::default()
                    .data(chunk_value(text, ids, logprobs, finish, first).to_string())
            };
        if ctx.chat
            && tx
                .send(chunk("", &[], Value::Null, None, true))
                .await
                .is_err()
        {
            return;
        }
        let mut finish = None;
        let mut halluc = None;
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Score(s) => halluc = Some(s),
                Event::Token { id: tid, logprob } => {
                    count += 1;
                    let (piece, stopped) = out.push(tid);
                    let lp = match logprob {
                        Some(lp) if ctx.opts.logprobs.is_some() => {
                            logprobs_json(ctx.chat, &out, &[(tid, lp)], offset)
                        }
                        _ => Value::Null,
                    };
                    offset += piece.len();
                    if tx
                        .send(chunk(&piece, &[tid], lp, None, false))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    if stopped {
                        finish = Some("stop");
                        break;
                    }
                }
                Event::Done(f) => {
                    finish = Some(f.as_str());
                    break;
                }
                Event::Error(e) => {
                    // The status line went out with the first chunk: the error is an event,
                    // and the stream still ends with [DONE].
                    let _ = tx
                        .send(SseEvent::default().data(e.body().to_string()))
                        .await;
                    let _ = tx.send(SseEvent::default().data("[DONE]")).await;
                    return;
                }
            }
        }
        drop(rx);
        let Some(finish) = finish else {
            let err = ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "generation ended unexpectedly",
            );
            let _ = tx
                .send(SseEvent::default().data(err.body().to_string()))
                .await;
            let _ = tx.send(SseEvent::default().data("[DONE]")).await;
            return;
        };
        let rest = out.finish();
        let mut last = chunk_value(&rest, &[], Value::Null, Some(finish), false);
        put_score(&mut last, halluc.as_ref());
        if tx
            .send(SseEvent::default().data(last.to_string()))
            .await
            .is_err()
        {
            return;
        }
        if ctx.opts.include_usage {
            let v = json!({"id": id, "object": if ctx.chat { "chat.completion.chunk" } else { "text_completion" },
                           "created": created, "model": ctx.model, "choices": [], "usage": usage(ctx.prompt_tokens, count)});
            if tx
                .send(SseEvent::default().data(v.to_string()))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = tx.send(SseEvent::default().data("[DONE]")).await;
    });
    let s = futures::stream::unfold(srx, |mut srx| async move {
        srx.recv().await.map(|e| (Ok(e), srx))
    });
    Sse::new(s)
}
