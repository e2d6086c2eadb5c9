//! The HTTP/1.1 accept loop shared by the server and the proxy: hyper with a header read
//! timeout (slow-loris on headers), graceful stop on a shutdown future.
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
