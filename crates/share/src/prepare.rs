//! Server B's share is the mask, and the mask does not depend on the input: its products can
//! be computed before they are asked for.
//!
//! The client sends B a secret seed once per connection (SEED) and draws the mask of request
//! number `s` as the first words of ChaCha20 stream `s` under that seed ([`mask`]); a MASKED
//! request names the stream instead of carrying the mask (half the upload). During decoding the
//! same map is called once per token, so the client knows which streams map `l` will use next
//! (`s + M`, `s + 2M`, ... for `M` maps) and names them in a PREPARE frame. B computes them in a
//! background thread at idle priority ([`prepare_thread`], several future tokens in one GEMM,
//! so each weight row is read once for all of them) and keeps the products in a bounded store
//! ([`Prepared`]); the MASKED request that comes later is answered from it without a GEMM on
//! the critical path. Anything not prepared in time (or evicted, or prepared for another shape)
//! is computed on demand as before: preparing only ever saves time, it never changes a result.
//!
//! Secrecy is unchanged: B learns the seed, i.e. the masks it already received before, and
//! nothing about the input; A never sees the seed. A stream is used for one request only: the
//! client advances its counter before every request and draws a new seed for every connection.
use crate::ring::{gemm, Digits, Kernel};
use crate::server::{PublicWeights, ServerStats};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

/// Fills `out` with the first words of ChaCha20 stream `stream` under `seed`: the mask of one
/// request, as the client draws it and server B expands it.
pub fn mask(seed: &[u8; 32], stream: u64, out: &mut [u64]) {
    let mut rng = ChaCha20Rng::from_seed(*seed);
    rng.set_stream(stream);
    rng.fill(out);
}

/// Products computed ahead for one stream.
struct Ready {
    linear: u32,
    rows: u32,
    y: Vec<u64>,
}

#[derive(Default)]
struct Inner {
    ready: HashMap<(u64, u64), Ready>,
    bytes: usize,
    /// Connections with a seed (others get nothing prepared).
    open: HashSet<u64>,
    /// Per connection, the stream after the newest one asked for online: streams below it
    /// are used or skipped and will never be asked for again.
    next: HashMap<u64, u64>,
}

impl Inner {
    fn stale(&self, conn: u64, stream: u64) -> bool {
        !self.open.contains(&conn) || stream < self.next.get(&conn).copied().unwrap_or(0)
    }

    /// Drops the entries `(connection, stream)` for which `drop` holds, keeping `bytes` exact.
    fn drop_where(&mut self, drop: impl Fn(u64, u64, &HashMap<u64, u64>) -> bool) {
        let Inner {
            ready, bytes, next, ..
        } = self;
        ready.retain(|&(c, s), r| {
            let gone = drop(c, s, next);
            if gone {
                *bytes -= r.y.len() * 8;
            }
            !gone
        });
    }

    /// Drops every entry no request can use any more.
    fn purge(&mut self) {
        self.drop_where(|c, s, next| s < next.get(&c).copied().unwrap_or(0));
    }
}

/// Server B's store of products computed ahead, shared by its connections and its prepare
/// thread, bounded in bytes.
pub struct Prepared {
    cap: usize,
    inner: Mutex<Inner>,
}

impl Prepared {
    /// A store of at most `cap` bytes of products (0: nothing is ever prepared).
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn enabled(&self) -> bool {
        self.cap > 0
    }

    /// Connection `conn` sent its seed.
    pub fn open(&self, conn: u64) {
        self.lock().open.insert(conn);
    }

    /// Connection `conn` ended: its products are dropped.
    pub fn close(&self, conn: u64) {
        let mut g = self.lock();
        g.open.remove(&conn);
        g.next.remove(&conn);
        g.drop_where(|c, _, _| c == conn);
    }

    /// The products prepared for `stream` of `conn`, if they are those of `rows` rows of map
    /// `linear`. Marks every stream up to `stream` as used.
    pub fn take(&self, conn: u64, stream: u64, linear: u32, rows: u32) -> Option<Vec<u64>> {
        let mut g = self.lock();
        let next = g.next.entry(conn).or_insert(0);
        *next = (*next).max(stream.saturating_add(1));
        let r = g.ready.remove(&(conn, stream));
        if let Some(r) = &r {
            g.bytes -= r.y.len() * 8;
        }
        r.filter(|r| r.linear == linear && r.rows == rows)
            .map(|r| r.y)
    }

    /// Whether `stream` of `conn` is still worth computing.
    fn wanted(&self, conn: u64, stream: u64) -> bool {
        let g = self.lock();
        !g.stale(conn, stream) && !g.ready.contains_key(&(conn, stream))
    }

    /// Stores the products of `stream` unless they are stale or the store is full.
    fn put(&self, conn: u64, stream: u64, linear: u32, rows: u32, y: Vec<u64>) -> bool {
        let mut g = self.lock();
        if g.stale(conn, stream) {
            return false;
        }
        let add = y.len() * 8;
        if g.bytes + add > self.cap {
            g.purge();
            if g.bytes + add > self.cap {
                return false;
            }
        }
        g.bytes += add;
        g.ready.insert((conn, stream), Ready { linear, rows, y });
        true
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

/// Streams of one map to compute ahead for one connection.
pub struct PrepJob {
    pub connection: u64,
    pub seed: [u8; 32],
    pub linear: u32,
    /// Rows per stream.
    pub rows: u32,
    pub streams: Vec<u64>,
}

/// What the prepare thread works with.
pub struct Ahead {
    pub weights: Arc<PublicWeights>,
    pub kernel: Kernel,
    pub store: Arc<Prepared>,
    pub stats: Arc<ServerStats>,
    /// Lower the thread to idle priority.
    pub idle: bool,
    /// Test fault: add 1 to the first element of every product.
    pub corrupt: bool,
}

/// The prepare thread: runs at idle priority (on Linux, `SCHED_IDLE`: only when a core has
/// nothing else to do), one GEMM per job over all its streams' rows.
pub fn prepare_thread(rx: std::sync::mpsc::Receiver<PrepJob>, a: Ahead) {
    let Ahead {
        weights,
        kernel,
        store,
        stats,
        idle,
        corrupt,
    } = a;
    if idle {
        idle_priority();
    }
    while let Ok(j) = rx.recv() {
        let streams: Vec<u64> = j
            .streams
            .into_iter()
            .filter(|&s| store.wanted(j.connection, s))
            .collect();
        let Some(w) = weights.matrices.get(j.linear as usize) else {
            continue;
        };
        if streams.is_empty() || j.rows == 0 {
            continue;
        }
        let (k, n, rows) = (w.cols(), w.rows(), j.rows as usize);
        let mut x = vec![0u64; streams.len() * rows * k];
        for (&s, part) in streams.iter().zip(x.chunks_exact_mut(rows * k)) {
            mask(&j.seed, s, part);
        }
        let mut y = vec![0u64; streams.len() * rows * n];
        let done = Digits::new(&x, streams.len() * rows, k)
            .and_then(|d| gemm(kernel, &d, w, &mut y, None));
        if let Err(e) = done {
            tracing::warn!("share server: prepare failed: {e}");
            continue;
        }
        for (&s, part) in streams.iter().zip(y.chunks_exact(rows * n)) {
            let mut part = part.to_vec();
            if corrupt {
                part[0] = part[0].wrapping_add(1);
            }
            if store.put(j.connection, s, j.linear, j.rows, part) {
                stats
                    .prepared_rows
                    .fetch_add(rows as u64, Ordering::Relaxed);
            }
        }
    }
}

/// Lowers the calling thread to idle priority (Linux; elsewhere a no-op): work ahead must not
/// slow the requests being answered now.
fn idle_priority() {
    #[cfg(target_os = "linux")]
    {
        let p = libc::sched_param { sched_priority: 0 };
        // SAFETY: plain syscall on the calling thread (pid 0) with a valid parameter struct.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &p) };
        if rc != 0 {
            tracing::debug!("share server: SCHED_IDLE refused for the prepare thread");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_are_per_stream_and_reproducible() {
        let seed = [9u8; 32];
        let (mut a, mut b, mut c) = (vec![0u64; 100], vec![0u64; 100], vec![0u64; 100]);
        mask(&seed, 7, &mut a);
        mask(&seed, 7, &mut b);
        mask(&seed, 8, &mut c);
        assert_eq!(a, b);
        assert!(a.iter().zip(&c).all(|(x, y)| x != y));
        let mut other = vec![0u64; 100];
        mask(&[8u8; 32], 7, &mut other);
        assert!(a.iter().zip(&other).all(|(x, y)| x != y));
        // A prefix of a longer draw is the shorter draw (rows are cut from one stream).
        let mut long = vec![0u64; 300];
        mask(&seed, 7, &mut long);
        assert_eq!(&long[..100], &a[..]);
    }

    #[test]
    fn the_store_serves_each_stream_once_and_drops_stale_and_closed() {
        let p = Prepared::new(1 << 20);
        assert!(!p.put(1, 5, 0, 1, vec![1; 4]), "no seed yet");
        p.open(1);
        assert!(p.put(1, 5, 0, 1, vec![1; 4]));
        assert!(p.put(1, 6, 0, 1, vec![2; 4]));
        assert!(p.put(1, 9, 2, 1, vec![3; 4]));
        assert_eq!(p.take(1, 5, 1, 1), None, "another map: recomputed");
        assert_eq!(p.take(1, 6, 0, 1), Some(vec![2; 4]));
        assert_eq!(p.take(1, 6, 0, 1), None, "used once");
        assert!(!p.wanted(1, 4) && !p.put(1, 4, 0, 1, vec![0; 4]), "stale");
        assert!(!p.wanted(1, 9), "already held");
        assert!(p.wanted(1, 10));
        p.close(1);
        assert_eq!(p.bytes(), 0);
        assert!(!p.wanted(1, 10));
        let small = Prepared::new(64);
        small.open(2);
        assert!(small.put(2, 1, 0, 1, vec![0; 8]));
        assert!(!small.put(2, 2, 0, 1, vec![0; 1]), "full");
        assert_eq!(small.take(2, 1, 0, 1), Some(vec![0; 8]));
        assert!(small.put(2, 2, 0, 1, vec![0; 8]), "room again");
    }
}
