//! Transports between the parties behind one interface: in-process bounded channels (the
//! default) and NATS (`async-nats`). Both give the same semantics:
//! - topics are strings (`emb`, `emb.<worker>`, `grad.<batch>`, `ctrl.active`, `ctrl.passive`);
//! - all subscribers of one topic share its messages (a NATS queue group: any free worker picks
//!   up the next batch);
//! - every subscription is a bounded buffer that drops the **oldest** message when full
//!   (capacity `p` for embedding topics, `q` for gradient topics);
//! - publishing to a topic nobody listens on loses the message (as on NATS).
use crate::error::{Result, VflError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Buffer sizes of the paper (`p` embeddings, `q` gradients per channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Buffers {
    pub p: usize,
    pub q: usize,
}

impl Default for Buffers {
    fn default() -> Self {
        Buffers { p: 5, q: 5 }
    }
}

impl Buffers {
    /// Capacity of a topic's buffer.
    pub fn capacity(&self, topic: &str) -> usize {
        if topic.starts_with("emb") {
            self.p.max(1)
        } else if topic.starts_with("grad") {
            self.q.max(1)
        } else {
            1 << 20
        }
    }
}

/// A receiving end.
pub trait Subscription: Send {
    /// Next message, or `None` after `timeout`.
    fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>>;
}

/// The one interface both parties talk through.
pub trait Transport: Send + Sync {
    fn publish(&self, topic: &str, msg: Vec<u8>) -> Result<()>;
    fn subscribe(&self, topic: &str) -> Result<Box<dyn Subscription>>;
    /// Messages dropped so far by full buffers (oldest first).
    fn dropped(&self) -> u64;
    /// Wait until published messages have left this process.
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// A bounded FIFO that drops the oldest element when full.
#[derive(Debug)]
pub struct BoundedQueue {
    q: Mutex<VecDeque<Vec<u8>>>,
    cv: Condvar,
    cap: usize,
    dropped: Arc<AtomicU64>,
}

impl BoundedQueue {
    pub fn new(cap: usize, dropped: Arc<AtomicU64>) -> Self {
        BoundedQueue {
            q: Mutex::new(VecDeque::new()),
            cv: Condvar::new(),
            cap: cap.max(1),
            dropped,
        }
    }
    /// Push; returns true when the oldest message was dropped to make room.
    pub fn push(&self, m: Vec<u8>) -> bool {
        let mut q = self.q.lock().unwrap_or_else(|e| e.into_inner());
        let mut dropped = false;
        while q.len() >= self.cap {
            q.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
            dropped = true;
        }
        q.push_back(m);
        drop(q);
        self.cv.notify_one();
        dropped
    }
    pub fn pop_timeout(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut q = self.q.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(m) = q.pop_front() {
                return Some(m);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            q = self
                .cv
                .wait_timeout(q, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
    pub fn len(&self) -> usize {
        self.q.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// In-process transport: one shared bounded queue per subscribed topic.
#[derive(Debug, Default)]
pub struct InProc {
    buffers: Buffers,
    topics: Mutex<HashMap<String, (Arc<BoundedQueue>, usize)>>,
    dropped: Arc<AtomicU64>,
}

impl InProc {
    pub fn new(buffers: Buffers) -> Arc<Self> {
        Arc::new(InProc {
            buffers,
            topics: Mutex::new(HashMap::new()),
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }
}

struct InProcSub {
    owner: Arc<InProc>,
    topic: String,
    q: Arc<BoundedQueue>,
}

impl Subscription for InProcSub {
    fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        Ok(self.q.pop_timeout(timeout))
    }
}

impl Drop for InProcSub {
    fn drop(&mut self) {
        let mut t = self.owner.topics.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = t.get_mut(&self.topic) {
            e.1 -= 1;
            if e.1 == 0 {
                t.remove(&self.topic);
            }
        }
    }
}

/// Subscribing needs the `Arc` to hand it to the subscription; this wrapper is what parties hold.
#[derive(Debug, Clone)]
pub struct InProcHandle(pub Arc<InProc>);

impl Transport for InProcHandle {
    fn publish(&self, topic: &str, msg: Vec<u8>) -> Result<()> {
        let q = {
            let t = self.0.topics.lock().unwrap_or_else(|e| e.into_inner());
            t.get(topic).map(|e| e.0.clone())
        };
        if let Some(q) = q {
            q.push(msg);
        }
        Ok(())
    }
    fn subscribe(&self, topic: &str) -> Result<Box<dyn Subscription>> {
        let mut t = self.0.topics.lock().unwrap_or_else(|e| e.into_inner());
        let cap = self.0.buffers.capacity(topic);
        let e = t
            .entry(topic.to_string())
            .or_insert_with(|| (Arc::new(BoundedQueue::new(cap, self.0.dropped.clone())), 0));
        e.1 += 1;
        Ok(Box::new(InProcSub {
            owner: self.0.clone(),
            topic: topic.to_string(),
            q: e.0.clone(),
        }))
    }
    fn dropped(&self) -> u64 {
        self.0.dropped.load(Ordering::Relaxed)
    }
}

/// Fault injection for tests: drops a fraction of the messages on topics with a given prefix
/// and delays others.
pub struct Faulty {
    pub inner: Arc<dyn Transport>,
    pub prefix: String,
    pub drop_prob: f64,
    pub delay: Duration,
    rng: Mutex<ChaCha8Rng>,
    pub injected_drops: AtomicU64,
}

impl Faulty {
    pub fn new(
        inner: Arc<dyn Transport>,
        prefix: &str,
        drop_prob: f64,
        delay: Duration,
        seed: u64,
    ) -> Self {
        Faulty {
            inner,
            prefix: prefix.to_string(),
            drop_prob,
            delay,
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
            injected_drops: AtomicU64::new(0),
        }
    }
}

impl Transport for Faulty {
    fn publish(&self, topic: &str, msg: Vec<u8>) -> Result<()> {
        if topic.starts_with(&self.prefix) {
            let r: f64 = self.rng.lock().unwrap_or_else(|e| e.into_inner()).random();
            if r < self.drop_prob {
                self.injected_drops.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            if !self.delay.is_zero() {
                let inner = self.inner.clone();
                let topic = topic.to_string();
                let delay = self.delay;
                std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    let _ = inner.publish(&topic, msg);
                });
                return Ok(());
            }
        }
        self.inner.publish(topic, msg)
    }
    fn subscribe(&self, topic: &str) -> Result<Box<dyn Subscription>> {
        self.inner.subscribe(topic)
    }
    fn dropped(&self) -> u64 {
        self.inner.dropped() + self.injected_drops.load(Ordering::Relaxed)
    }
}

/// NATS transport: subject `umbra.<job>.<topic>`, queue group `workers`, each subscription
/// drained by a task into a drop-oldest [`BoundedQueue`]. Reconnects on its own when the server
/// restarts; lost messages are recovered by the deadline and reassignment of the scheduler.
pub struct Nats {
    rt: tokio::runtime::Runtime,
    client: async_nats::Client,
    prefix: String,
    buffers: Buffers,
    dropped: Arc<AtomicU64>,
}

impl Nats {
    pub fn connect(url: &str, job: &str, buffers: Buffers) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| VflError::Transport(format!("tokio runtime: {e}")))?;
        let client = rt.block_on(async {
            let opts = async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .max_reconnects(Option::<usize>::None)
                .subscription_capacity(1 << 16);
            tokio::time::timeout(Duration::from_secs(10), opts.connect(url)).await
        });
        let client = match client {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(VflError::Transport(format!("connect {url}: {e}"))),
            Err(_) => {
                return Err(VflError::Transport(format!(
                    "connect {url}: timed out after 10 s"
                )))
            }
        };
        // retry_on_initial_connect returns before the connection is up: wait for it
        let t0 = Instant::now();
        while client.connection_state() != async_nats::connection::State::Connected {
            if t0.elapsed() > Duration::from_secs(10) {
                return Err(VflError::Transport(format!("cannot reach NATS at {url}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let job: String = job
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Ok(Nats {
            rt,
            client,
            prefix: format!("umbra.{job}."),
            buffers,
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }
}

struct NatsSub {
    q: Arc<BoundedQueue>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscription for NatsSub {
    fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        Ok(self.q.pop_timeout(timeout))
    }
}

impl Drop for NatsSub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Transport for Nats {
    fn publish(&self, topic: &str, msg: Vec<u8>) -> Result<()> {
        let subject = format!("{}{topic}", self.prefix);
        let client = self.client.clone();
        self.rt
            .block_on(async move { client.publish(subject, msg.into()).await })
            .map_err(|e| VflError::Transport(format!("publish {topic}: {e}")))
    }
    fn subscribe(&self, topic: &str) -> Result<Box<dyn Subscription>> {
        use futures::StreamExt;
        let subject = format!("{}{topic}", self.prefix);
        let client = self.client.clone();
        let mut sub = self
            .rt
            .block_on(async move { client.queue_subscribe(subject, "workers".into()).await })
            .map_err(|e| VflError::Transport(format!("subscribe {topic}: {e}")))?;
        let q = Arc::new(BoundedQueue::new(
            self.buffers.capacity(topic),
            self.dropped.clone(),
        ));
        let q2 = q.clone();
        let task = self.rt.spawn(async move {
            while let Some(m) = sub.next().await {
                q2.push(m.payload.to_vec());
            }
        });
        // make sure the server has the subscription before anyone publishes to it
        let client = self.client.clone();
        let _ = self.rt.block_on(async move { client.flush().await });
        Ok(Box::new(NatsSub { q, task }))
    }
    fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
    fn flush(&self) -> Result<()> {
        let client = self.client.clone();
        self.rt
            .block_on(async move { client.flush().await })
            .map_err(|e| VflError::Transport(format!("flush: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_queue_drops_oldest() {
        let d = Arc::new(AtomicU64::new(0));
        let q = BoundedQueue::new(2, d.clone());
        assert!(!q.push(vec![1]));
        assert!(!q.push(vec![2]));
        assert!(q.push(vec![3]));
        assert_eq!(d.load(Ordering::Relaxed), 1);
        assert_eq!(q.pop_timeout(Duration::ZERO), Some(vec![2]));
        assert_eq!(q.pop_timeout(Duration::ZERO), Some(vec![3]));
        assert_eq!(q.pop_timeout(Duration::from_millis(10)), None);
    }

    #[test]
    fn inproc_semantics() {
        let t = InProcHandle(InProc::new(Buffers { p: 2, q: 1 }));
        // nobody listening: lost
        t.publish("emb", vec![0]).unwrap();
        let mut a = t.subscribe("emb").unwrap();
        let mut b = t.subscribe("emb").unwrap();
        for i in 1..=3u8 {
            t.publish("emb", vec![i]).unwrap();
        }
        assert_eq!(t.dropped(), 1);
        // queue group: each message goes to exactly one subscriber
        let x = a.recv_timeout(Duration::ZERO).unwrap();
        let y = b.recv_timeout(Duration::ZERO).unwrap();
        assert_eq!((x, y), (Some(vec![2]), Some(vec![3])));
        drop(a);
        drop(b);
        t.publish("emb", vec![9]).unwrap();
        let mut c = t.subscribe("emb").unwrap();
        assert_eq!(c.recv_timeout(Duration::ZERO).unwrap(), None);
    }
}
