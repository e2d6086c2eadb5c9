//! What both roles share on the wire: topic names, the evaluation chunk size, traffic counters,
//! and publishing / decoding with those counters.
use crate::error::Result;
use crate::message::Envelope;
use crate::transport::Transport;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;
use tracing::error;

/// Rows per evaluation message.
pub const EVAL_CHUNK: usize = 2048;

pub const TOPIC_CTRL_ACTIVE: &str = "ctrl.active";
pub const TOPIC_CTRL_PASSIVE: &str = "ctrl.passive";

/// The embedding topic of passive worker `wid`: one per worker pair in the fixed-pair modes,
/// one shared topic (any free active worker picks it up) in PubSub-VFL.
pub(crate) fn embedding_topic(fixed_pairs: bool, wid: usize) -> String {
    if fixed_pairs {
        format!("emb.{wid}")
    } else {
        "emb".to_string()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Traffic and waiting counters of a party.
#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub wait_ns: AtomicU64,
    pub rejected: AtomicU64,
    pub batches: AtomicU64,
    pub dropped: AtomicU64,
}

impl Counters {
    pub(crate) fn wait(&self, since: Instant) {
        self.wait_ns
            .fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
    pub(crate) fn add_wait(&self, s: f64) {
        self.wait_ns.fetch_add((s * 1e9) as u64, Ordering::Relaxed);
    }
    pub(crate) fn wait_s(&self) -> f64 {
        self.wait_ns.load(Ordering::Relaxed) as f64 * 1e-9
    }
    pub(crate) fn reject(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }
}

/// Encode, count and publish.
pub(crate) fn publish(t: &dyn Transport, c: &Counters, topic: &str, m: &Envelope) -> Result<()> {
    let b = m.encode();
    c.sent.fetch_add(b.len() as u64, Ordering::Relaxed);
    t.publish(topic, b)
}

/// Decode bytes from the wire; a malformed message or one of another job is logged, counted
/// and skipped.
pub(crate) fn decode(c: &Counters, bytes: &[u8], job: &str) -> Option<Envelope> {
    c.received.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    match Envelope::decode(bytes) {
        Ok(m) if m.job == job => Some(m),
        Ok(m) => {
            error!(job = %m.job, "rejected message of a foreign job");
            c.reject();
            None
        }
        Err(e) => {
            error!("rejected message: {e}");
            c.reject();
            None
        }
    }
}
