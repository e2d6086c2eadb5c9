//! OpenAI wire types: request parsing with clear 4xx errors, and the error body.
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use umbra_model::tokenizer::ChatMessage;

/// An error answered as `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    /// Seconds sent as `Retry-After` (429 and 503 answers).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            code: None,
            retry_after: None,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    /// An upstream failure (502; 504 for a timeout), naming the upstream.
    pub fn upstream(status: StatusCode, upstream: &str, message: impl std::fmt::Display) -> Self {
        Self::new(
            status,
            "upstream_error",
            format!("upstream {upstream}: {message}"),
        )
    }
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    pub fn with_retry_after(mut self, secs: u32) -> Self {
        self.retry_after = Some(secs);
        self
    }
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}})
    }
}

/// Engine errors whose message contains this came from a remote party the engine depends on
/// (a share server of `umbra proxy --share-servers`): they are answered 502, not 500.
pub const UPSTREAM_FAILURE: &str = "upstream failure: ";

/// The answer to an engine error message: 502 for an [`UPSTREAM_FAILURE`], else 500.
pub fn engine_error(message: String) -> ApiError {
    let status = if message.contains(UPSTREAM_FAILURE) {
        StatusCode::BAD_GATEWAY
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    ApiError::new(status, "server_error", message)
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, s.into());
        }
        r
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// `POST /v1/completions` body (unknown fields are ignored, as OpenAI clients send extras).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Option<Value>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<Value>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<i64>,
    pub n: Option<i64>,
    pub echo: Option<bool>,
    /// Extension: `false` skips detokenization (clients that only read `token_ids`).
    pub return_text: Option<bool>,
}

/// `POST /v1/chat/completions` body.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Option<Value>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<Value>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub n: Option<i64>,
    /// Tool calling is not supported: a request that offers tools is refused (400) rather
    /// than answered as if they were not there.
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
}

/// A prompt: text or token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// Parses a JSON body, answering type errors with a 400 that names the problem.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "request body is empty; expected a JSON object",
        ));
    }
    if std::str::from_utf8(body).is_err() {
        return Err(ApiError::bad_request("request body is not valid UTF-8"));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// The single prompt of a completion request.
pub fn parse_prompt(v: Option<&Value>) -> Result<Prompt, ApiError> {
    let v = v.ok_or_else(|| ApiError::bad_request("`prompt` is required"))?;
    let ids = |a: &[Value]| -> Result<Vec<u32>, ApiError> {
        a.iter()
            .map(|x| {
                x.as_u64()
                    .filter(|&i| i <= u32::MAX as u64)
                    .map(|i| i as u32)
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "`prompt` token ids must be non-negative integers, got {x}"
                        ))
                    })
            })
            .collect()
    };
    match v {
        Value::String(s) => Ok(Prompt::Text(s.clone())),
        Value::Array(a) if a.is_empty() => Err(ApiError::bad_request("`prompt` is empty")),
        Value::Array(a) if a.iter().all(|x| x.is_number()) => Ok(Prompt::Ids(ids(a)?)),
        Value::Array(a) if a.len() == 1 => match &a[0] {
            Value::String(s) => Ok(Prompt::Text(s.clone())),
            Value::Array(inner) => Ok(Prompt::Ids(ids(inner)?)),
            other => Err(ApiError::bad_request(format!("`prompt` must be a string or token ids, got {other}"))),
        },
        Value::Array(_) => Err(ApiError::bad_request(
            "`prompt` must be one string or one token id array (batched prompts are not supported; send one request each)",
        )),
        other => Err(ApiError::bad_request(format!(
            "`prompt` must be a string or an array of token ids, got {}",
            type_name(other)
        ))),
    }
}

pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `stop`: a string or up to 4 strings.
pub fn parse_stop(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let out = match v {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ApiError::bad_request("`stop` entries must be strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "`stop` must be a string or an array of strings, got {}",
                type_name(other)
            )))
        }
    };
    if out.len() > 4 {
        return Err(ApiError::bad_request("`stop` takes at most 4 sequences"));
    }
    if out.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err(ApiError::bad_request(
            "`stop` sequences must be 1 to 256 bytes long",
        ));
    }
    Ok(out)
}

/// Chat `messages`: `[{role, content}]`, content a string or text parts.
pub fn parse_messages(v: Option<&Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let a = match v {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => return Err(ApiError::bad_request("`messages` is empty")),
        None | Some(Value::Null) => return Err(ApiError::bad_request("`messages` is required")),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "`messages` must be an array, got {}",
                type_name(other)
            )))
        }
    };
    a.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
                ApiError::bad_request(format!("messages[{i}].role must be a string"))
            })?;
            if !matches!(role, "system" | "user" | "assistant" | "developer" | "tool") {
                return Err(ApiError::bad_request(format!(
                    "messages[{i}].role `{role}` is not supported"
                )));
            }
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| {
                        match (
                            p.get("type").and_then(Value::as_str),
                            p.get("text").and_then(Value::as_str),
                        ) {
                            (Some("text"), Some(t)) => Ok(t.to_string()),
                            _ => Err(ApiError::bad_request(format!(
                                "messages[{i}].content: only text parts are supported"
                            ))),
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(""),
                Some(Value::Null) | None => String::new(),
                Some(other) => {
                    return Err(ApiError::bad_request(format!(
                        "messages[{i}].content must be a string or text parts, got {}",
                        type_name(other)
                    )))
                }
            };
            let role = if role == "developer" { "system" } else { role };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

/// Validated sampling and length options common to both endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct GenOptions {
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Top alternatives per token to report (`Some(0)`: the chosen token's logprob only).
    pub logprobs: Option<usize>,
}

/// The number of tokens to generate for a prompt of `prompt_len` tokens: the request's
/// `max_tokens`, which must be at most `limit` and fit the context of `max_positions`, or (when
/// unset) what room the context leaves, at most `limit`.
pub fn resolve_max_tokens(
    requested: Option<usize>,
    prompt_len: usize,
    max_positions: usize,
    limit: usize,
) -> Result<usize, ApiError> {
    let room = max_positions.saturating_sub(prompt_len);
    match requested {
        Some(m) if m > limit => Err(ApiError::bad_request(format!(
            "`max_tokens` is {m}; the limit is {limit}"
        ))),
        Some(m) if m > room => Err(ApiError::bad_request(format!(
            "the prompt ({prompt_len} tokens) plus `max_tokens` ({m}) exceeds the context of \
             {max_positions} tokens"
        ))
        .with_code("context_length_exceeded")),
        Some(m) => Ok(m),
        None if room == 0 => Err(ApiError::bad_request("the prompt fills the whole context")
            .with_code("context_length_exceeded")),
        None => Ok(room.min(limit)),
    }
}

#[allow(clippy::too_many_arguments)]
pub fn gen_options(
    max_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    seed: Option<i64>,
    stop: Option<&Value>,
    stream: Option<bool>,
    stream_options: Option<&StreamOptions>,
    logprobs: Option<i64>,
    n: Option<i64>,
) -> Result<GenOptions, ApiError> {
    if let Some(n) = n {
        if n != 1 {
            return Err(ApiError::bad_request(format!("`n` must be 1 (got {n})")));
        }
    }
    let max_tokens = match max_tokens {
        None => None,
        Some(m) if m < 1 => {
            return Err(ApiError::bad_request(format!(
                "`max_tokens` must be >= 1, got {m}"
            )))
        }
        Some(m) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
    };
    let temperature = temperature.unwrap_or(1.0);
    if !temperature.is_finite() || !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request(format!(
            "`temperature` must be in [0, 2], got {temperature}"
        )));
    }
    let top_p = match top_p {
        None => None,
        Some(p) if p > 0.0 && p <= 1.0 => Some(p as f32),
        Some(p) => {
            return Err(ApiError::bad_request(format!(
                "`top_p` must be in (0, 1], got {p}"
            )))
        }
    };
    let top_k = match top_k {
        None | Some(-1) | Some(0) => None,
        Some(k) if k > 0 => Some(k as usize),
        Some(k) => {
            return Err(ApiError::bad_request(format!(
                "`top_k` must be >= 1, got {k}"
            )))
        }
    };
    let logprobs = match logprobs {
        None => None,
        Some(k) if (0..=20).contains(&k) => Some(k as usize),
        Some(k) => {
            return Err(ApiError::bad_request(format!(
                "`logprobs` must be in [0, 20], got {k}"
            )))
        }
    };
    Ok(GenOptions {
        max_tokens,
        temperature: temperature as f32,
        top_p,
        top_k,
        seed: seed.map(|s| s as u64),
        stop: parse_stop(stop)?,
        stream: stream.unwrap_or(false),
        include_usage: stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        logprobs,
    })
}

impl CompletionRequest {
    pub fn options(&self) -> Result<GenOptions, ApiError> {
        if self.echo == Some(true) {
            return Err(ApiError::bad_request("`echo` is not supported"));
        }
        gen_options(
            self.max_tokens.or(Some(16)),
            self.temperature,
            self.top_p,
            self.top_k,
            self.seed,
            self.stop.as_ref(),
            self.stream,
            self.stream_options.as_ref(),
            self.logprobs,
            self.n,
        )
    }
}

/// A field that offers tools: absent, `null`, an empty list and `"none"` offer none.
fn offers_tools(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::String(s)) => s != "none",
        Some(_) => true,
    }
}

impl ChatRequest {
    pub fn options(&self) -> Result<GenOptions, ApiError> {
        for (name, v) in [
            ("tools", &self.tools),
            ("tool_choice", &self.tool_choice),
            ("functions", &self.functions),
            ("function_call", &self.function_call),
        ] {
            if offers_tools(v.as_ref()) {
                return Err(ApiError::bad_request(format!(
                    "`{name}` is not supported: this server does not call tools (send the \
                     request without tools, or describe them in the messages)"
                ))
                .with_code("tools_not_supported"));
            }
        }
        let logprobs = match (self.logprobs, self.top_logprobs) {
            (Some(true), k) => Some(k.unwrap_or(0)),
            (_, Some(_)) => {
                return Err(ApiError::bad_request(
                    "`top_logprobs` requires `logprobs: true`",
                ))
            }
            _ => None,
        };
        gen_options(
            self.max_completion_tokens.or(self.max_tokens),
            self.temperature,
            self.top_p,
            self.top_k,
            self.seed,
            self.stop.as_ref(),
            self.stream,
            self.stream_options.as_ref(),
            logprobs,
            self.n,
        )
    }
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A short unique id (`prefix-<hex>`).
pub fn new_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{:x}{:04x}",
        t as u64 & 0xffff_ffff_ffff,
        n & 0xffff
    )
}

/// Response header on every answer of a server (`umbra serve`, split mode too) carrying the
/// key fingerprint its checkpoint records; absent for a plaintext checkpoint. `/health` and
/// `/v1/models` carry it as `key_fingerprint`.
pub const KEY_FINGERPRINT_HEADER: &str = "x-umbra-key-fingerprint";

/// Checks that `served` (what `upstream` publishes) is the fingerprint of the client's key
/// `key`; the error says which side is wrong.
pub fn check_fingerprint(upstream: &str, key: &str, served: Option<&str>) -> Result<(), String> {
    match served {
        Some(s) if s == key => Ok(()),
        Some(s) => Err(format!(
            "upstream {upstream} serves a checkpoint obfuscated with another key (its key \
             fingerprint is {s}, the client key's is {key}): wrong key or wrong upstream"
        )),
        None => Err(format!(
            "upstream {upstream} serves a plaintext checkpoint (it publishes no key \
             fingerprint; the client key's is {key}): it would read permuted ids as other \
             tokens; point the client at the server of the checkpoint this key obfuscated"
        )),
    }
}
