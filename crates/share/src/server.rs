//! A share server (`umbra serve --share`): public weights only, no state about any client.
//!
//! Connections (tokio + rustls) read PRODUCT frames and hand them to one compute thread. That
//! thread takes every job waiting when it wakes up, groups them by map and runs **one GEMM per
//! map over all their rows** (several clients' rows together, or one prefill's), then splits
//! the products back. Requests are validated before any work: frame length against
//! `max_frame` (refused unread), map id, row count, width; each violation is an ERROR frame
//! naming it, and the connection is closed.
//!
//! Server B's requests are MASKED: the shares are the mask drawn from the connection's SEED,
//! which the compute thread expands itself; products a PREPARE announced are computed ahead by
//! a second thread at idle priority and answered from [`Prepared`] (see [`crate::prepare`]).
use crate::error::{Result, ShareError};
use crate::frame::{self, code};
use crate::prepare::{mask, prepare_thread, PrepJob, Prepared};
use crate::public::collect;
use crate::ring::{gemm, Digits, Kernel, RingMatrix};
use crate::tls::ServerIdentity;
use crate::transcript::Recorder;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, watch};
use umbra_model::checkpoint::Checkpoint;

/// The public weights a server multiplies with.
#[derive(Debug)]
pub struct PublicWeights {
    pub name: String,
    pub fingerprint: [u8; 32],
    /// `(in, out)` per map.
    pub table: Vec<(u32, u32)>,
    pub matrices: Vec<RingMatrix>,
}

impl PublicWeights {
    /// Quantizes every linear map of the checkpoint at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let ck = Checkpoint::open(path)?;
        let name = path
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        Self::from_weights(&ck.config, &ck.weights, name)
    }

    pub fn from_weights(
        cfg: &umbra_model::LlamaConfig,
        weights: &umbra_model::Weights,
        name: String,
    ) -> Result<Self> {
        let (maps, fingerprint) = collect(cfg, weights)?;
        let table = maps
            .iter()
            .map(|l| (l.quant.k as u32, l.quant.n as u32))
            .collect();
        let matrices = maps
            .into_iter()
            .map(|l| RingMatrix::new(l.quant.n, l.quant.k, &l.quant.q))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            name,
            fingerprint,
            table,
            matrices,
        })
    }

    /// Bytes of weights held.
    pub fn bytes(&self) -> usize {
        self.matrices.iter().map(RingMatrix::bytes).sum()
    }
}

/// Misbehaviours for tests (a server that lies, dies or is slow).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Adds 1 to element `.1` of the products of job number `.0` (0-based, in compute order).
    pub corrupt: Option<(u64, usize)>,
    /// Stops (closes every connection, stops accepting) after answering this many jobs.
    pub stop_after: Option<u64>,
    /// Sleeps this long before each GEMM batch (lets concurrent requests pile up).
    pub delay: Duration,
    /// Adds 1 to the first element of every product computed ahead (PREPARE).
    pub corrupt_prepared: bool,
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    pub identity: ServerIdentity,
    /// Threads of the GEMM (a local pool; 1 = the compute thread alone).
    pub threads: usize,
    /// Largest frame body accepted, in bytes (larger ones are refused unread).
    pub max_frame: usize,
    /// Most rows in one PRODUCT.
    pub max_rows: usize,
    /// Time allowed for a frame's body once its header arrived, and for the HELLO.
    pub io_timeout: Duration,
    /// Records every PRODUCT received (the server's view) to this file.
    pub record: Option<PathBuf>,
    pub kernel: Kernel,
    /// Bytes of products computed ahead for MASKED requests (0: PREPARE frames are ignored).
    pub prepare_bytes: usize,
    /// Runs the work ahead at idle priority (Linux `SCHED_IDLE`); tests turn it off so that
    /// it runs on a busy machine too.
    pub prepare_idle: bool,
    pub faults: Faults,
}

impl ServerConfig {
    pub fn new(addr: SocketAddr, identity: ServerIdentity) -> Self {
        Self {
            addr,
            identity,
            threads: 1,
            max_frame: 64 << 20,
            max_rows: 8192,
            io_timeout: Duration::from_secs(30),
            record: None,
            kernel: Kernel::best(),
            prepare_bytes: 256 << 20,
            prepare_idle: true,
            faults: Faults::default(),
        }
    }
}

/// What a running server counts.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub connections: AtomicU64,
    /// PRODUCT requests answered.
    pub jobs: AtomicU64,
    /// GEMMs run (one per map per batch).
    pub gemms: AtomicU64,
    pub rows: AtomicU64,
    /// Most jobs (and most distinct connections) one GEMM has covered.
    pub max_jobs_per_gemm: AtomicU64,
    pub max_connections_per_gemm: AtomicU64,
    /// MASKED requests answered from products computed ahead, and those computed on demand.
    pub prepared_hits: AtomicU64,
    pub prepared_misses: AtomicU64,
    /// Rows computed ahead (PREPARE).
    pub prepared_rows: AtomicU64,
}

struct Job {
    connection: u64,
    linear: u32,
    rows: usize,
    /// The shares (PRODUCT), or empty with `mask` set (MASKED: expanded by the compute thread).
    shares: Vec<u64>,
    mask: Option<([u8; 32], u64)>,
    reply: oneshot::Sender<Vec<u64>>,
}

struct Shared {
    weights: Arc<PublicWeights>,
    cfg: ServerConfig,
    jobs: std::sync::mpsc::Sender<Job>,
    /// Work ahead (bounded: a full queue drops PREPAREs, which only cost time).
    prepare: std::sync::mpsc::SyncSender<PrepJob>,
    prepared: Arc<Prepared>,
    stats: Arc<ServerStats>,
    recorder: Option<Recorder>,
    stop: watch::Sender<bool>,
}

/// The compute thread: drains waiting jobs, one GEMM per map over all their rows.
fn compute(
    rx: std::sync::mpsc::Receiver<Job>,
    weights: Arc<PublicWeights>,
    kernel: Kernel,
    pool: Option<rayon::ThreadPool>,
    faults: Faults,
    stats: Arc<ServerStats>,
) {
    let mut done = 0u64;
    while let Ok(first) = rx.recv() {
        if !faults.delay.is_zero() {
            std::thread::sleep(faults.delay);
        }
        let mut jobs = vec![first];
        while let Ok(j) = rx.try_recv() {
            jobs.push(j);
        }
        for j in &mut jobs {
            if let (Some((seed, stream)), Some(w)) =
                (j.mask, weights.matrices.get(j.linear as usize))
            {
                j.shares = vec![0u64; j.rows * w.cols()];
                mask(&seed, stream, &mut j.shares);
            }
        }
        let mut groups: BTreeMap<u32, Vec<Job>> = BTreeMap::new();
        for j in jobs {
            groups.entry(j.linear).or_default().push(j);
        }
        for (linear, group) in groups {
            let w = &weights.matrices[linear as usize];
            let k = w.cols();
            let rows: usize = group.iter().map(|j| j.rows).sum();
            let mut group = group;
            let shares: Vec<u64> = if group.len() == 1 {
                std::mem::take(&mut group[0].shares)
            } else {
                group
                    .iter()
                    .flat_map(|j| j.shares.iter().copied())
                    .collect()
            };
            let mut y = vec![0u64; rows * w.rows()];
            let ok = Digits::new(&shares, rows, k)
                .and_then(|d| gemm(kernel, &d, w, &mut y, pool.as_ref()));
            if let Err(e) = ok {
                tracing::error!("share server: GEMM failed: {e}");
                continue; // replies dropped: the connections answer INTERNAL
            }
            stats.gemms.fetch_add(1, Ordering::Relaxed);
            stats.rows.fetch_add(rows as u64, Ordering::Relaxed);
            stats
                .max_jobs_per_gemm
                .fetch_max(group.len() as u64, Ordering::Relaxed);
            let mut conns: Vec<u64> = group.iter().map(|j| j.connection).collect();
            conns.sort_unstable();
            conns.dedup();
            stats
                .max_connections_per_gemm
                .fetch_max(conns.len() as u64, Ordering::Relaxed);
            let n = w.rows();
            let mut at = 0;
            for j in group {
                let mut part = y[at * n..(at + j.rows) * n].to_vec();
                at += j.rows;
                if let Some((which, idx)) = faults.corrupt {
                    if which == done && idx < part.len() {
                        part[idx] = part[idx].wrapping_add(1);
                    }
                }
                done += 1;
                let _ = j.reply.send(part);
            }
        }
    }
}

/// PREPARE jobs waiting at most (more are dropped: preparing only saves time).
const PREPARE_QUEUE: usize = 4096;

/// Validates a PREPARE and queues it for the prepare thread.
fn prepare_request(
    sh: &Shared,
    conn: u64,
    seed: [u8; 32],
    linear: u32,
    rows: u32,
    streams: Vec<u64>,
) -> Result<()> {
    let Some(&(k, _)) = sh.weights.table.get(linear as usize) else {
        return Err(ShareError::Protocol(format!(
            "PREPARE for unknown layer id {linear} (this model has {} linear maps)",
            sh.weights.table.len()
        )));
    };
    let total = (rows as usize).saturating_mul(streams.len());
    // The masks a PREPARE expands are bounded like the shares a PRODUCT may carry.
    if rows == 0
        || total > sh.cfg.max_rows
        || total.saturating_mul(k as usize * 8) > sh.cfg.max_frame
    {
        return Err(ShareError::Shape(format!(
            "PREPARE of {} streams x {rows} rows (this server takes 1..={} rows and {} bytes of \
             shares per frame)",
            streams.len(),
            sh.cfg.max_rows,
            sh.cfg.max_frame
        )));
    }
    if sh.prepared.enabled() && !streams.is_empty() {
        let job = PrepJob {
            connection: conn,
            seed,
            linear,
            rows,
            streams,
        };
        if sh.prepare.try_send(job).is_err() {
            tracing::debug!("share server: prepare queue full, PREPARE dropped");
        }
    }
    Ok(())
}

async fn send_error<S: AsyncWriteExt + Unpin>(s: &mut S, c: u16, m: &str) {
    let _ = s.write_all(&frame::error(c, m)).await;
    let _ = s.flush().await;
}

/// Reads one frame body of `len` bytes within the timeout.
async fn read_body<S: AsyncReadExt + Unpin>(
    s: &mut S,
    len: usize,
    t: Duration,
    body: &mut Vec<u8>,
) -> Result<()> {
    body.resize(len, 0);
    match tokio::time::timeout(t, s.read_exact(body)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(ShareError::Protocol(format!("truncated frame ({e})"))),
        Err(_) => Err(ShareError::Protocol(format!(
            "frame body not received within {} s",
            t.as_secs_f64()
        ))),
    }
}

async fn connection<S>(mut s: S, sh: Arc<Shared>, id: u64) -> Result<()>
where
    S: AsyncReadExt + AsyncWriteExt + Unpin,
{
    let t = sh.cfg.io_timeout;
    let w = &sh.weights;
    let mut h = [0u8; frame::HEADER];
    match tokio::time::timeout(t, s.read_exact(&mut h)).await {
        Ok(Ok(_)) => {}
        _ => return Err(ShareError::Protocol("no HELLO".into())),
    }
    let (len, kind) = frame::parse_header(h)?;
    if kind != frame::HELLO || len > 1024 {
        send_error(&mut s, code::BAD_HELLO, "expected HELLO").await;
        return Err(ShareError::Protocol("expected HELLO".into()));
    }
    let mut body = vec![];
    read_body(&mut s, len, t, &mut body).await?;
    match frame::parse_hello(&body) {
        Err(e) => {
            send_error(&mut s, code::BAD_HELLO, &e.to_string()).await;
            return Err(e);
        }
        Ok(fp) if fp != w.fingerprint => {
            let m = format!(
                "this server runs another model: {} (weight fingerprint {}), the client expects {}",
                w.name,
                &hex::encode(w.fingerprint)[..16],
                &hex::encode(fp)[..16]
            );
            send_error(&mut s, code::FINGERPRINT, &m).await;
            return Err(ShareError::Protocol(m));
        }
        Ok(_) => {}
    }
    s.write_all(&frame::welcome(&w.fingerprint, &w.table, &w.name))
        .await
        .map_err(|e| ShareError::Protocol(e.to_string()))?;
    s.flush().await.ok();
    let mut stop = sh.stop.subscribe();
    let mut shares = vec![];
    let mut seed: Option<[u8; 32]> = None;
    loop {
        let header = tokio::select! {
            r = s.read_exact(&mut h) => r,
            _ = stop.wait_for(|v| *v) => return Ok(()),
        };
        if header.is_err() {
            return Ok(()); // the client closed
        }
        let (len, kind) = match frame::parse_header(h) {
            Ok(v) => v,
            Err(e) => {
                send_error(&mut s, code::UNEXPECTED, &e.to_string()).await;
                return Err(e);
            }
        };
        if len > sh.cfg.max_frame {
            let m = format!(
                "frame of {len} bytes exceeds this server's limit of {} bytes",
                sh.cfg.max_frame
            );
            send_error(&mut s, code::TOO_LARGE, &m).await;
            return Err(ShareError::Protocol(m));
        }
        read_body(&mut s, len, t, &mut body).await?;
        let (req, linear, rows, stream) = match (kind, seed) {
            (frame::PRODUCT, _) => {
                let (req, linear, rows) = frame::parse_product_head(&body)?;
                (req, linear, rows, None)
            }
            (frame::SEED, None) => {
                let sd = match frame::parse_seed(&body) {
                    Ok(v) => v,
                    Err(e) => {
                        send_error(&mut s, code::UNEXPECTED, &e.to_string()).await;
                        return Err(e);
                    }
                };
                seed = Some(sd);
                sh.prepared.open(id);
                continue;
            }
            (frame::MASKED | frame::PREPARE, Some(sd)) => {
                let parsed = if kind == frame::MASKED {
                    frame::parse_masked(&body).map(|(q, l, r, st)| (q, l, r, Some(st)))
                } else {
                    frame::parse_prepare(&body).and_then(|(l, r, streams)| {
                        prepare_request(&sh, id, sd, l, r, streams).map(|_| (0, 0, 0, None))
                    })
                };
                match parsed {
                    Ok((_, _, _, None)) => continue,
                    Ok(v) => v,
                    Err(e) => {
                        let c = match e {
                            ShareError::Shape(_) => code::ROWS,
                            _ => code::UNEXPECTED,
                        };
                        send_error(&mut s, c, &e.to_string()).await;
                        return Err(e);
                    }
                }
            }
            _ => {
                let m = match kind {
                    frame::SEED => "a second SEED on one connection".to_string(),
                    frame::MASKED | frame::PREPARE => {
                        format!("frame kind {kind:#x} before the connection's SEED")
                    }
                    _ => format!("unexpected frame kind {kind:#x} (expected PRODUCT)"),
                };
                send_error(&mut s, code::UNEXPECTED, &m).await;
                return Err(ShareError::Protocol(m));
            }
        };
        let Some(&(k, n)) = w.table.get(linear as usize) else {
            let m = format!(
                "unknown layer id {linear} (this model has {} linear maps, ids 0..{})",
                w.table.len(),
                w.table.len()
            );
            send_error(&mut s, code::UNKNOWN_LINEAR, &m).await;
            return Err(ShareError::Protocol(m));
        };
        let rows = rows as usize;
        // A MASKED request expands `rows x k` mask words: bounded like a PRODUCT's shares.
        if rows == 0
            || rows > sh.cfg.max_rows
            || (stream.is_some() && rows * k as usize * 8 > sh.cfg.max_frame)
        {
            let m = format!(
                "{rows} rows (this server takes 1..={} rows and {} bytes of shares per request)",
                sh.cfg.max_rows, sh.cfg.max_frame
            );
            send_error(&mut s, code::ROWS, &m).await;
            return Err(ShareError::Protocol(m));
        }
        let got = if stream.is_some() {
            rows * k as usize * 8
        } else {
            body.len() - frame::PRODUCT_HEAD
        };
        if got != rows * k as usize * 8 {
            let m = format!(
                "wrong width: layer id {linear} takes rows of {k} shares ({} bytes for {rows} \
                 rows), the frame carries {got} bytes",
                rows * k as usize * 8
            );
            send_error(&mut s, code::WIDTH, &m).await;
            return Err(ShareError::Protocol(m));
        }
        // Set when the mask is already expanded into `shares` (for the recorder): a job computed
        // on demand then uses it instead of expanding it again.
        let mut expanded = false;
        let ready = match (stream, seed) {
            (Some(st), Some(sd)) => {
                if let Some(r) = &sh.recorder {
                    // B's view of a MASKED request is the mask it expands.
                    shares.clear();
                    shares.resize(rows * k as usize, 0);
                    mask(&sd, st, &mut shares);
                    expanded = true;
                    r.record(id, linear, rows as u32, &frame::le_bytes(&shares))?;
                }
                let hit = sh.prepared.take(id, st, linear, rows as u32);
                let c = match hit {
                    Some(_) => &sh.stats.prepared_hits,
                    None => &sh.stats.prepared_misses,
                };
                c.fetch_add(1, Ordering::Relaxed);
                hit
            }
            _ => {
                let raw = &body[frame::PRODUCT_HEAD..];
                if let Some(r) = &sh.recorder {
                    r.record(id, linear, rows as u32, raw)?;
                }
                frame::get_u64s(raw, &mut shares);
                None
            }
        };
        let y = match ready {
            Some(y) => y,
            None => {
                let (tx, rx) = oneshot::channel();
                let job = Job {
                    connection: id,
                    linear,
                    rows,
                    shares: std::mem::take(&mut shares),
                    mask: stream
                        .zip(seed)
                        .filter(|_| !expanded)
                        .map(|(st, sd)| (sd, st)),
                    reply: tx,
                };
                if sh.jobs.send(job).is_err() {
                    send_error(&mut s, code::INTERNAL, "the compute thread has stopped").await;
                    return Err(ShareError::Protocol("compute thread gone".into()));
                }
                let Ok(y) = rx.await else {
                    send_error(&mut s, code::INTERNAL, "the product failed").await;
                    return Err(ShareError::Protocol("product failed".into()));
                };
                y
            }
        };
        debug_assert_eq!(y.len(), rows * n as usize);
        let head = frame::result_head(req, rows as u32, y.len());
        let w = async {
            s.write_all(&head).await?;
            s.write_all(&frame::le_bytes(&y)).await
        };
        w.await.map_err(|e| ShareError::Protocol(e.to_string()))?;
        s.flush().await.ok();
        let answered = sh.stats.jobs.fetch_add(1, Ordering::Relaxed) + 1;
        if sh.cfg.faults.stop_after.is_some_and(|m| answered >= m) {
            tracing::warn!("share server: stopping after {answered} jobs (test fault)");
            let _ = sh.stop.send(true);
            return Ok(());
        }
    }
}

/// Binds and serves until `shutdown` resolves (or a stop fault fires); returns the bound
/// address and the serving future.
pub async fn serve(
    weights: Arc<PublicWeights>,
    cfg: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(
    SocketAddr,
    Arc<ServerStats>,
    impl Future<Output = ()> + Send + 'static,
)> {
    let tls = tokio_rustls::TlsAcceptor::from(cfg.identity.server_config()?);
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .map_err(|e| ShareError::Config(format!("cannot bind {}: {e}", cfg.addr)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| ShareError::Config(e.to_string()))?;
    let recorder = cfg
        .record
        .as_deref()
        .map(|p| Recorder::create(p, &weights.fingerprint, &weights.table))
        .transpose()?;
    let pool = (cfg.threads > 1)
        .then(|| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(cfg.threads)
                .thread_name(|i| format!("umbra-share-gemm-{i}"))
                .build()
                .map_err(|e| ShareError::Config(e.to_string()))
        })
        .transpose()?;
    let stats = Arc::new(ServerStats::default());
    let (jobs, rx) = std::sync::mpsc::channel();
    let prepared = Arc::new(Prepared::new(cfg.prepare_bytes));
    let (prepare, prx) = std::sync::mpsc::sync_channel(PREPARE_QUEUE);
    if prepared.enabled() {
        let ahead = crate::prepare::Ahead {
            weights: weights.clone(),
            kernel: cfg.kernel,
            store: prepared.clone(),
            stats: stats.clone(),
            idle: cfg.prepare_idle,
            corrupt: cfg.faults.corrupt_prepared,
        };
        std::thread::Builder::new()
            .name("umbra-share-prepare".into())
            .spawn(move || prepare_thread(prx, ahead))
            .map_err(|e| ShareError::Config(e.to_string()))?;
    }
    {
        let (w, k, f, st) = (
            weights.clone(),
            cfg.kernel,
            cfg.faults.clone(),
            stats.clone(),
        );
        std::thread::Builder::new()
            .name("umbra-share-compute".into())
            .spawn(move || compute(rx, w, k, pool, f, st))
            .map_err(|e| ShareError::Config(e.to_string()))?;
    }
    let (stop, _) = watch::channel(false);
    let sh = Arc::new(Shared {
        weights,
        cfg,
        jobs,
        prepare,
        prepared,
        stats: stats.clone(),
        recorder,
        stop,
    });
    let fut = async move {
        let mut stopped = sh.stop.subscribe();
        let mut shutdown = std::pin::pin!(shutdown);
        let next = AtomicU64::new(0);
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(v) => v,
                    Err(e) => { tracing::warn!("share server: accept: {e}"); continue; }
                },
                _ = &mut shutdown => break,
                _ = stopped.wait_for(|v| *v) => break,
            };
            tcp.set_nodelay(true).ok();
            // rustls reads 4 KiB at a time: a large buffer turns a frame into few `recv`s.
            let tcp = tokio::io::BufReader::with_capacity(1 << 20, tcp);
            let (tls, sh) = (tls.clone(), sh.clone());
            let id = next.fetch_add(1, Ordering::Relaxed);
            sh.stats.connections.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let t = sh.cfg.io_timeout;
                let s = match tokio::time::timeout(t, tls.accept(tcp)).await {
                    Ok(Ok(mut s)) => {
                        s.get_mut().1.set_buffer_limit(None);
                        s
                    }
                    Ok(Err(e)) => {
                        tracing::debug!("share server: TLS handshake with {peer}: {e}");
                        return;
                    }
                    Err(_) => return,
                };
                let (prepared, sh_stats) = (sh.prepared.clone(), sh.stats.clone());
                if let Err(e) = connection(s, sh, id).await {
                    tracing::debug!("share server: connection {id} from {peer}: {e}");
                }
                prepared.close(id);
                tracing::info!(
                    "share server: connection {id} from {peer} closed; masked requests so far: {} \
                     answered from products computed ahead, {} computed on demand ({} rows ahead)",
                    sh_stats.prepared_hits.load(Ordering::Relaxed),
                    sh_stats.prepared_misses.load(Ordering::Relaxed),
                    sh_stats.prepared_rows.load(Ordering::Relaxed)
                );
            });
        }
        let _ = sh.stop.send(true);
    };
    Ok((addr, stats, fut))
}

/// A server running on its own runtime thread (tests, `umbra bench share`).
pub struct RunningServer {
    pub addr: SocketAddr,
    pub pin: String,
    pub stats: Arc<ServerStats>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningServer {
    /// `https://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Stops accepting and closes every connection.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts a server on a runtime thread of its own; returns once it listens.
pub fn spawn(weights: Arc<PublicWeights>, cfg: ServerConfig) -> Result<RunningServer> {
    let pin = cfg.identity.pin();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("umbra-share-server".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(ShareError::Config(e.to_string())));
                    return;
                }
            };
            rt.block_on(async move {
                let shutdown = async move {
                    let _ = stop_rx.await;
                };
                match serve(weights, cfg, shutdown).await {
                    Ok((addr, stats, fut)) => {
                        let _ = ready_tx.send(Ok((addr, stats)));
                        fut.await;
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
            rt.shutdown_timeout(Duration::from_millis(100));
        })
        .map_err(|e| ShareError::Config(e.to_string()))?;
    let (addr, stats) = ready_rx
        .recv()
        .map_err(|_| ShareError::Config("server thread ended".into()))??;
    Ok(RunningServer {
        addr,
        pin,
        stats,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}
