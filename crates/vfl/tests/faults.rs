//! Faults in-process: dead workers, lost and delayed messages, malformed and foreign messages.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use umbra_common::progress::Progress;
use umbra_vfl::engine::{self, train_inproc};
use umbra_vfl::message::{Envelope, Kind};
use umbra_vfl::party;
use umbra_vfl::transport::{Buffers, InProc, InProcHandle, Subscription, Transport};
use umbra_vfl::{JobConfig, Mode};

fn small(mode: Mode) -> JobConfig {
    let mut cfg = JobConfig::new("synthetic:8000x20", mode);
    cfg.epochs = 2;
    cfg.model.bottom_depth = 3;
    cfg.deadline_s = 0.4;
    cfg
}

#[test]
fn pubsub_survives_dead_worker_lost_and_delayed_messages() {
    let clean = train_inproc(&small(Mode::PubSub)).unwrap();
    let mut cfg = small(Mode::PubSub);
    cfg.faults.kill_passive_worker_after = Some(3);
    cfg.faults.drop_embeddings = 0.05;
    cfg.faults.delay_gradients_ms = 3;
    let r = train_inproc(&cfg).unwrap();
    let nb = 5600u64.div_ceil(256);
    // every batch of every epoch was trained exactly once in the end
    assert_eq!(r.per_epoch.iter().map(|e| e.batches).sum::<u64>(), 2 * nb);
    let dropped: u64 = r.per_epoch.iter().map(|e| e.dropped).sum();
    let reassigned: u64 = r.per_epoch.iter().map(|e| e.reassigned).sum();
    assert!(dropped >= 1, "lost embeddings must hit the deadline");
    assert!(reassigned >= dropped, "dropped batches are reassigned");
    let (a, c) = (r.auc.unwrap(), clean.auc.unwrap());
    assert!(a > c - 0.02, "faulty {a} vs clean {c}");
}

/// Wraps a transport and, next to every 7th embedding, publishes malformed and foreign
/// messages: wrong shape, unknown batch id, other job id, garbage bytes.
struct Hostile {
    inner: InProcHandle,
    n: AtomicU64,
}

impl Transport for Hostile {
    fn publish(&self, topic: &str, msg: Vec<u8>) -> umbra_vfl::Result<()> {
        if topic.starts_with("emb") && self.n.fetch_add(1, Ordering::Relaxed).is_multiple_of(7) {
            if let Ok(m) = Envelope::decode(&msg) {
                let mut wrong_shape = m.clone();
                wrong_shape.cols += 1;
                let mut unknown = m.clone();
                unknown.batch = 1_000_000;
                let mut foreign = m.clone();
                foreign.job = "someone-else".into();
                for bad in [
                    wrong_shape.encode(),
                    unknown.encode(),
                    foreign.encode(),
                    b"garbage".to_vec(),
                ] {
                    self.inner.publish(topic, bad)?;
                }
                // a bogus gradient answer too
                let g = Envelope::tensor(
                    Kind::Gradient,
                    &m.job,
                    m.epoch,
                    m.batch,
                    m.seq ^ 1,
                    m.rows as usize,
                    m.cols as usize,
                    &vec![0.0; (m.rows * m.cols) as usize],
                );
                self.inner
                    .publish(&format!("grad.{}", m.batch), g.encode())?;
            }
        }
        if topic == "ctrl.active" {
            if let Ok(m) = Envelope::decode(&msg) {
                if m.kind == Kind::Eval {
                    let mut huge = m.clone();
                    huge.batch = u64::MAX;
                    let mut foreign = m.clone();
                    foreign.job = "someone-else".into();
                    self.inner.publish(topic, huge.encode())?;
                    self.inner.publish(topic, foreign.encode())?;
                }
            }
        }
        self.inner.publish(topic, msg)
    }
    fn subscribe(&self, topic: &str) -> umbra_vfl::Result<Box<dyn Subscription>> {
        self.inner.subscribe(topic)
    }
    fn dropped(&self) -> u64 {
        self.inner.dropped()
    }
}

#[test]
fn malformed_and_foreign_messages_are_rejected_not_fatal() {
    let mut cfg = small(Mode::PubSub);
    // room for the junk next to the real messages
    cfg.buffers = Buffers { p: 64, q: 8 };
    let (da, dp) = engine::prepare(&cfg).unwrap();
    let t: Arc<dyn Transport> = Arc::new(Hostile {
        inner: InProcHandle(InProc::new(cfg.buffers)),
        n: AtomicU64::new(0),
    });
    let cut = engine::cut_layer(&cfg, dp.n_train);
    let (a, p) = std::thread::scope(|s| {
        let ta = t.clone();
        let h = s.spawn(|| party::run_active(&cfg, &da, ta));
        let p = party::run_passive(&cfg, &dp, t.clone(), cut.clone(), &Progress::hidden());
        (h.join().unwrap(), p)
    });
    let (a, p) = (a.unwrap(), p.unwrap());
    assert!(a.rejected >= 10, "active rejected {}", a.rejected);
    assert!(p.rejected >= 1, "passive rejected {}", p.rejected);
    let auc = a.per_epoch.last().unwrap().auc.unwrap();
    assert!(auc > 0.8, "auc {auc}");
    assert_eq!(a.per_epoch.len(), 2);
}

#[test]
fn sync_modes_finish_with_delays() {
    let mut cfg = small(Mode::VflPs);
    cfg.faults.delay_gradients_ms = 2;
    let r = train_inproc(&cfg).unwrap();
    assert!(r.auc.unwrap() > 0.8);
    assert!(r.wait_s > 0.0);
    let _ = Duration::ZERO;
}
