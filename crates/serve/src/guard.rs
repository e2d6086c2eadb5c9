//! Request guards of the server, the proxy and the split-mode server, checked before a body
//! is read: who may call (an optional API key, `Authorization: Bearer`), which browser pages
//! may call (`Origin`, CORS), which host names may be used (DNS rebinding), and what a body
//! must be (`Content-Type: application/json`).
//!
//! A browser attaches `Origin` to every cross-origin request and to every POST, so a page of
//! another site (or a form it submits, or a DNS-rebinding page) is refused unless
//! `--allow-origin` names its origin exactly; allowed origins get CORS headers. A non-JSON
//! POST (what a plain HTML form can send without a preflight) is refused with 415 whatever
//! its origin. `GET /health` is open to everyone (it carries no prompt and no answer).
use crate::api::ApiError;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use std::sync::Arc;

/// Who may call; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    /// The bearer token every request but `GET /health` must carry (`None`: no authentication).
    pub api_key: Option<String>,
    /// Browser origins allowed to call, exactly as browsers send them (`https://app.example`,
    /// `http://localhost:3000`); requests from any other page are refused (403).
    pub allow_origins: Vec<String>,
    /// Accept only IP-literal, `localhost` or allowed-origin host names in `Host` (set for a
    /// loopback listener, where any other name can only come from DNS rebinding).
    pub local_hosts_only: bool,
}

impl AccessPolicy {
    fn allows_origin(&self, origin: &str) -> bool {
        self.allow_origins
            .iter()
            .any(|o| o.trim_end_matches('/') == origin)
    }

    fn allows_host(&self, host: &str) -> bool {
        if !self.local_hosts_only {
            return true;
        }
        let name = host_name(host);
        name.eq_ignore_ascii_case("localhost")
            || name.parse::<std::net::IpAddr>().is_ok()
            || self.allow_origins.iter().any(|o| {
                let host_port = o.split("://").nth(1).unwrap_or("").trim_end_matches('/');
                host_name(host_port).eq_ignore_ascii_case(name)
            })
    }
}

/// The name or address of a `Host` value (`name`, `name:port`, `[v6]:port`).
fn host_name(host: &str) -> &str {
    match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(n, _)| n),
    }
}

/// Wraps `router` in the guard of `policy`.
pub fn guarded(router: Router, policy: AccessPolicy) -> Router {
    router.layer(axum::middleware::from_fn_with_state(
        Arc::new(policy),
        guard,
    ))
}

/// Compares without an early exit, so the time taken does not tell how much of a guess matched.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= (x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0)) as usize;
    }
    diff == 0
}

fn refuse(status: StatusCode, kind: &'static str, msg: String) -> Response {
    ApiError::new(status, kind, msg).into_response()
}

fn cors(headers: &mut HeaderMap, origin: &HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    headers.insert(header::VARY, HeaderValue::from_static("Origin"));
}

async fn guard(State(p): State<Arc<AccessPolicy>>, req: Request, next: Next) -> Response {
    let origin = req.headers().get(header::ORIGIN).cloned();
    let origin_str = origin.as_ref().map(|o| o.to_str().unwrap_or("<not ASCII>"));
    if let Some(o) = origin_str {
        if !p.allows_origin(o) {
            return refuse(
                StatusCode::FORBIDDEN,
                "permission_error",
                format!(
                    "requests from the web page at `{o}` are refused (cross-origin); start the \
                     server with `--allow-origin {o}` to allow that page"
                ),
            );
        }
    } else if let Some(site) = req.headers().get("sec-fetch-site") {
        // A browser request without Origin (a GET from another site's page).
        if !matches!(site.to_str(), Ok("same-origin" | "none")) {
            return refuse(
                StatusCode::FORBIDDEN,
                "permission_error",
                "requests from other sites' web pages are refused".into(),
            );
        }
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !host.is_empty() && !p.allows_host(host) {
        return refuse(
            StatusCode::FORBIDDEN,
            "permission_error",
            format!(
                "host name `{host}` refused: this server listens on loopback and answers only \
                 to IP addresses, `localhost` and the hosts of --allow-origin"
            ),
        );
    }
    if req.method() == Method::OPTIONS {
        // A CORS preflight of an allowed origin (others were refused above).
        let mut r = StatusCode::NO_CONTENT.into_response();
        if let Some(o) = &origin {
            cors(r.headers_mut(), o);
            let h = r.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, OPTIONS"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("authorization, content-type"),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
        }
        return r;
    }
    let open = req.method() == Method::GET && req.uri().path() == "/health";
    if let (Some(key), false) = (&p.api_key, open) {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| same_secret(g.as_bytes(), key.as_bytes())) {
            let mut r = refuse(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "missing or wrong API key: send `Authorization: Bearer <key>`".into(),
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    if req.method() == Method::POST {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let essence = ct.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            let got = if ct.is_empty() { "none" } else { ct };
            return refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                format!("request bodies must be `Content-Type: application/json` (got {got})"),
            );
        }
    }
    let mut r = next.run(req).await;
    if let Some(o) = &origin {
        cors(r.headers_mut(), o);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_hosts() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"ab", b"abc"));
        assert!(!same_secret(b"", b"abc"));
        let p = AccessPolicy {
            allow_origins: vec!["https://app.example".into()],
            local_hosts_only: true,
            ..Default::default()
        };
        for ok in [
            "127.0.0.1:8080",
            "localhost:1",
            "[::1]:80",
            "app.example",
            "10.0.0.2",
        ] {
            assert!(p.allows_host(ok), "{ok}");
        }
        for bad in ["evil.example:8080", "evil.example", "[zz]:1"] {
            assert!(!p.allows_host(bad), "{bad}");
        }
        assert!(p.allows_origin("https://app.example"));
        assert!(!p.allows_origin("https://app.example.evil"));
        assert!(!p.allows_origin("null"));
    }
}
