//! The HTTP/1.1 accept loop shared by the server, the proxy and the split-mode server: hyper
//! with a header read timeout (slow-loris on headers), graceful stop on a shutdown future; and
//! the request-body reader they share (size and time limits).
use crate::api::ApiError;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;

/// The shutdown signal handed to a server started with [`spawn`].
pub type Shutdown = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// A server or proxy running on a spawned task.
pub struct Handle {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Handle {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, closes connections and waits for the accept loop to end.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// Starts `start(shutdown)` — a bind returning the bound address and the serving future — on a
/// spawned task, stopped by [`Handle::stop`].
pub async fn spawn<Fut, S, E>(start: impl FnOnce(Shutdown) -> Fut) -> Result<Handle, E>
where
    Fut: Future<Output = Result<(SocketAddr, S), E>>,
    S: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (addr, fut) = start(Box::pin(async move {
        let _ = rx.await;
    }))
    .await?;
    Ok(Handle {
        addr,
        stop: Some(tx),
        task: tokio::spawn(fut),
    })
}

/// Binds `addr` (port 0 picks one) and returns the bound address and the serving future.
pub async fn bind(
    addr: SocketAddr,
    app: Router,
    header_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, impl Future<Output = ()> + Send + 'static)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let fut = async move {
        tokio::pin!(shutdown);
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                acc = listener.accept() => {
                    let (stream, _) = match acc {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!("accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let svc = TowerToHyperService::new(app.clone());
                    conns.spawn(async move {
                        let conn = hyper::server::conn::http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(header_timeout)
                            .serve_connection(TokioIo::new(stream), svc);
                        if let Err(e) = conn.await {
                            tracing::debug!("connection ended: {e}");
                        }
                    });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        conns.abort_all();
    };
    Ok((bound, fut))
}

/// The OpenAI-shaped 404 for a route nobody serves.
pub async fn not_found(req: Request) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
    .into_response()
}

/// Reads a request body within the size and time limits: a `Content-Length` over `max` is
/// refused (413) before anything is read, a body that grows past it while streaming too.
pub async fn read_body(
    body: Body,
    headers: &axum::http::HeaderMap,
    max: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let too_big = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("request body exceeds the limit of {max} bytes"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > max as u64 {
            return Err(too_big());
        }
    }
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, max)).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "timed out after {} s reading the request body",
                timeout.as_secs_f64()
            ),
        )),
        Ok(Err(e)) => {
            let msg = format!("{e}");
            let mut src: Option<&dyn std::error::Error> = Some(&e);
            let mut limit = false;
            while let Some(s) = src {
                limit |= s.to_string().contains("length limit");
                src = s.source();
            }
            if limit {
                Err(too_big())
            } else {
                Err(ApiError::bad_request(format!(
                    "cannot read the request body: {msg}"
                )))
            }
        }
        Ok(Ok(b)) => Ok(b),
    }
}

/// Bodies at least this large are parsed on a blocking thread (CPU work off the runtime).
const PARSE_OFF_RUNTIME: usize = 64 << 10;

/// Parses a JSON body ([`crate::api::parse_body`]); large bodies on a blocking thread.
pub async fn parse_json<T>(body: Bytes) -> Result<T, ApiError>
where
    T: serde::de::DeserializeOwned + Send + 'static,
{
    if body.len() < PARSE_OFF_RUNTIME {
        return crate::api::parse_body(&body);
    }
    tokio::task::spawn_blocking(move || crate::api::parse_body(&body))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!("parsing failed: {e}"),
            )
        })?
}
