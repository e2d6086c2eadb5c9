//! The proxy's upstream: one `umbra serve` (token mode), reached over HTTP. Every failure of
//! the upstream becomes a 502 naming it (504 when it timed out); its own refusals of a request
//! (4xx) are passed on with their status, and a 429 keeps its `Retry-After`.
//!
//! Key check: the upstream publishes the key fingerprint of the checkpoint it serves. The proxy
//! checks it at start-up (and refuses to start on a mismatch), on every answer (the
//! fingerprint header: a server restarted on other weights is noticed at the next request)
//! and in its own `/health`.
use crate::api::{check_fingerprint, ApiError, KEY_FINGERPRINT_HEADER};
use crate::error::ServeError;
use axum::http::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

/// How to reach the upstream and what it must serve.
pub struct Upstream {
    /// Base URL without a trailing slash.
    pub url: String,
    pub client: reqwest::Client,
    /// Longest wait for the upstream's headers or its next chunk.
    pub timeout: Duration,
    /// Sent as `Authorization: Bearer` to a server started with `--api-key`.
    pub api_key: Option<String>,
    /// The client key's fingerprint, which the upstream's checkpoint must record.
    pub fingerprint: String,
}

impl Upstream {
    pub fn new(
        url: &str,
        timeout: Duration,
        api_key: Option<String>,
        fingerprint: String,
    ) -> Result<Self, ServeError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| ServeError::Other(format!("http client: {e}")))?;
        Ok(Self {
            url: url.trim_end_matches('/').to_string(),
            client,
            timeout,
            api_key,
            fingerprint,
        })
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.authorized(self.client.get(format!("{}{path}", self.url)))
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.authorized(self.client.post(format!("{}{path}", self.url)))
    }

    fn authorized(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    /// POSTs `body` to `path` within the timeout. A send that fails before any answer (a
    /// pooled connection the upstream closed meanwhile) is retried once on a new connection.
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<reqwest::Response, ApiError> {
        let mut tries = 0;
        loop {
            tries += 1;
            match tokio::time::timeout(self.timeout, self.post(path).json(body).send()).await {
                Err(_) => return Err(self.timed_out()),
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(e)) if tries < 2 && !e.is_timeout() => {
                    tracing::debug!("upstream {}: {e}; retrying once", self.url);
                }
                Ok(Err(e)) => return Err(self.failed(&e)),
            }
        }
    }

    /// 502 (unreachable, broken) or 504 (timed out) for a transport error.
    pub fn failed(&self, e: &reqwest::Error) -> ApiError {
        if e.is_timeout() {
            ApiError::upstream(
                StatusCode::GATEWAY_TIMEOUT,
                &self.url,
                format!("timed out: {e}"),
            )
        } else {
            ApiError::upstream(
                StatusCode::BAD_GATEWAY,
                &self.url,
                format!("unreachable: {e}"),
            )
        }
    }

    /// 504 when the upstream did not answer in time.
    pub fn timed_out(&self) -> ApiError {
        ApiError::upstream(
            StatusCode::GATEWAY_TIMEOUT,
            &self.url,
            format!("did not answer within {} s", self.timeout.as_secs_f64()),
        )
    }

    /// 502 when the answer's fingerprint header is not the key's.
    pub fn check_answer(&self, r: &reqwest::Response) -> Result<(), ApiError> {
        let served = r
            .headers()
            .get(KEY_FINGERPRINT_HEADER)
            .and_then(|v| v.to_str().ok());
        check_fingerprint(&self.url, &self.fingerprint, served)
            .map_err(|m| ApiError::new(StatusCode::BAD_GATEWAY, "upstream_error", m))
    }

    /// An upstream error answer: its own refusal of the request (4xx) keeps its status and
    /// `Retry-After`; its failure (5xx, or anything unexpected) is a 502 naming it.
    pub async fn relay_error(&self, resp: reqwest::Response) -> ApiError {
        let status = resp.status().as_u16();
        let retry = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok());
        let body = resp.bytes().await.unwrap_or_default();
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let msg = v["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        if status == 401 || status == 403 {
            return ApiError::upstream(
                StatusCode::BAD_GATEWAY,
                &self.url,
                format!(
                    "refused the proxy's credentials ({status}: {msg}); start the proxy with \
                     the upstream's key (--upstream-api-key)"
                ),
            );
        }
        if !(400..500).contains(&status) {
            return ApiError::upstream(
                StatusCode::BAD_GATEWAY,
                &self.url,
                format!("failed with {status}: {msg}"),
            );
        }
        let kind = match v["error"]["type"].as_str() {
            Some("invalid_request_error") => "invalid_request_error",
            Some("rate_limit_error") => "rate_limit_error",
            _ => "upstream_error",
        };
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
        let mut e = ApiError::new(status, kind, format!("upstream {}: {msg}", self.url));
        e.code = match v["error"]["code"].as_str() {
            Some("model_not_found") => Some("model_not_found"),
            Some("context_length_exceeded") => Some("context_length_exceeded"),
            Some("queue_full") => Some("queue_full"),
            _ => None,
        };
        if status == StatusCode::TOO_MANY_REQUESTS {
            e.retry_after = Some(retry.unwrap_or(crate::engine::RETRY_AFTER_S));
        }
        e
    }

    /// The upstream's `/health`, with its key fingerprint checked.
    pub async fn probe(&self) -> Probe {
        let wait = self.timeout.min(Duration::from_secs(5));
        let r = match tokio::time::timeout(wait, self.get("/health").send()).await {
            Err(_) => return Probe::Down(self.timed_out()),
            Ok(Err(e)) => return Probe::Down(self.failed(&e)),
            Ok(Ok(r)) => r,
        };
        if !r.status().is_success() {
            return Probe::Down(self.relay_error(r).await);
        }
        let v: Value = match r.json().await {
            Ok(v) => v,
            Err(e) => {
                return Probe::Down(ApiError::upstream(
                    StatusCode::BAD_GATEWAY,
                    &self.url,
                    format!("bad health answer: {e}"),
                ))
            }
        };
        match check_fingerprint(&self.url, &self.fingerprint, v["key_fingerprint"].as_str()) {
            Ok(()) => Probe::Ok(v),
            Err(m) => Probe::Mismatch(m),
        }
    }

    /// The start-up check: a reachable upstream with another key's checkpoint (or a plaintext
    /// one) is refused; an unreachable one is only reported (answers are checked anyway).
    pub async fn check_at_start(&self) -> Result<(), ServeError> {
        match self.probe().await {
            Probe::Ok(_) => Ok(()),
            Probe::Mismatch(m) => Err(ServeError::Config(m)),
            Probe::Down(e) => {
                tracing::warn!(
                    "upstream not checked at start-up ({}); answers are",
                    e.message
                );
                Ok(())
            }
        }
    }
}

/// What the upstream's health check found.
pub enum Probe {
    /// Up, with the right key (its `/health` body).
    Ok(Value),
    /// Up, but not the server this proxy's key belongs to.
    Mismatch(String),
    /// Unreachable, timed out or failing.
    Down(ApiError),
}

/// The proxy's `/health` answer for an upstream state: 200 when the upstream answers with the
/// right key, 503 otherwise (`upstream.status`: `ok`, `mismatch` or `unreachable`).
pub fn health_body(mode: &str, url: &str, probe: Probe) -> (StatusCode, Value) {
    let (status, up) = match probe {
        Probe::Ok(v) => (
            "ok",
            json!({"url": url, "status": "ok", "key_fingerprint": v["key_fingerprint"]}),
        ),
        Probe::Mismatch(m) => (
            "unavailable",
            json!({"url": url, "status": "mismatch", "error": m}),
        ),
        Probe::Down(e) => (
            "unavailable",
            json!({"url": url, "status": "unreachable", "error": e.message}),
        ),
    };
    let code = if status == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        json!({"status": status, "mode": mode, "upstream": up}),
    )
}
