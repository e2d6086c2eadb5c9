//! Batch ids of an epoch handed out to the passive party's workers under leases.
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::warn;

/// One hand-out of a batch: `id` tells this attempt from a later one of the same batch after
/// its lease expired, so that a late release cannot cancel someone else's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lease {
    pub b: u64,
    pub id: u64,
}

pub(crate) enum Take {
    Batch(Lease),
    Wait,
    Finished,
}

/// Batch ids of one epoch with leases: a taken batch that is neither completed nor released
/// before its lease expires is handed out again.
pub(crate) struct Scheduler {
    st: Mutex<SchedState>,
    lease: Duration,
}

struct SchedState {
    queue: VecDeque<u64>,
    /// batch -> (expiry, lease id)
    leased: HashMap<u64, (Instant, u64)>,
    done: HashSet<u64>,
    reassigned: u64,
    next_lease: u64,
}

impl Scheduler {
    pub fn new(ids: impl IntoIterator<Item = u64>, lease: Duration) -> Self {
        Scheduler {
            st: Mutex::new(SchedState {
                queue: ids.into_iter().collect(),
                leased: HashMap::new(),
                done: HashSet::new(),
                reassigned: 0,
                next_lease: 0,
            }),
            lease,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SchedState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn take(&self) -> Take {
        let mut st = self.state();
        let now = Instant::now();
        let expired: Vec<u64> = st
            .leased
            .iter()
            .filter(|(_, &(t, _))| t <= now)
            .map(|(&b, _)| b)
            .collect();
        for b in expired {
            st.leased.remove(&b);
            warn!(batch = b, "lease expired (worker lost?); reassigning");
            st.reassigned += 1;
            st.queue.push_back(b);
        }
        while let Some(b) = st.queue.pop_front() {
            if st.done.contains(&b) {
                continue;
            }
            let id = st.next_lease;
            st.next_lease += 1;
            st.leased.insert(b, (now + self.lease, id));
            return Take::Batch(Lease { b, id });
        }
        if st.leased.is_empty() {
            Take::Finished
        } else {
            Take::Wait
        }
    }

    pub fn complete(&self, b: u64) {
        let mut st = self.state();
        st.leased.remove(&b);
        st.done.insert(b);
    }

    /// Gives a batch back for another attempt, unless its lease already expired (the batch
    /// then is queued again or held by a later lease, which this must not cancel).
    pub fn release(&self, l: Lease) {
        let mut st = self.state();
        if st.leased.get(&l.b).is_some_and(|&(_, id)| id == l.id) {
            st.leased.remove(&l.b);
            if !st.done.contains(&l.b) {
                st.reassigned += 1;
                st.queue.push_back(l.b);
            }
        }
    }

    pub fn reassigned(&self) -> u64 {
        self.state().reassigned
    }

    /// Every batch of the epoch completed.
    pub fn finished(&self) -> bool {
        let st = self.state();
        st.leased.is_empty() && st.queue.iter().all(|b| st.done.contains(b))
    }
}

/// The next batch for a worker from `scheds` (consecutive epochs, `scheds[k]` is epoch
/// `first + k`): the oldest epoch with a batch to hand out, looking at most one epoch past
/// the oldest unfinished one. `Finished` once every epoch is.
pub(crate) fn take_any(scheds: &[Scheduler], first: usize) -> (usize, Take) {
    let mut oldest_open: Option<usize> = None;
    for (k, s) in scheds.iter().enumerate() {
        if oldest_open.is_some_and(|o| k > o + 1) {
            break;
        }
        match s.take() {
            Take::Batch(l) => return (first + k, Take::Batch(l)),
            Take::Wait => {
                oldest_open.get_or_insert(k);
            }
            Take::Finished => {}
        }
    }
    match oldest_open {
        Some(k) => (first + k, Take::Wait),
        None => (first, Take::Finished),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduler_reassigns_expired_leases() {
        let s = Scheduler::new(0..2, Duration::from_millis(30));
        let Take::Batch(a) = s.take() else { panic!() };
        let Take::Batch(b) = s.take() else { panic!() };
        s.complete(b.b);
        assert!(matches!(s.take(), Take::Wait));
        std::thread::sleep(Duration::from_millis(40));
        let Take::Batch(a2) = s.take() else { panic!() };
        assert_eq!(a.b, a2.b);
        assert_ne!(a.id, a2.id, "a new attempt gets a new lease");
        // the first attempt gives up late: that must not cancel the second attempt's lease
        s.release(a);
        assert!(matches!(s.take(), Take::Wait), "batch handed out twice");
        s.complete(a2.b);
        assert!(matches!(s.take(), Take::Finished));
        assert_eq!(s.reassigned(), 1);
    }

    #[test]
    fn take_any_looks_one_epoch_ahead_at_most() {
        let lease = Duration::from_secs(60);
        let scheds: Vec<Scheduler> = (0..3).map(|_| Scheduler::new(0..1, lease)).collect();
        let (e0, Take::Batch(l0)) = take_any(&scheds, 0) else {
            panic!()
        };
        assert_eq!(e0, 0);
        // epoch 0 is in flight: the next batch comes from epoch 1, never from epoch 2
        let (e1, Take::Batch(l1)) = take_any(&scheds, 0) else {
            panic!()
        };
        assert_eq!(e1, 1);
        assert!(matches!(take_any(&scheds, 0), (0, Take::Wait)));
        scheds[0].complete(l0.b);
        scheds[1].complete(l1.b);
        let (e2, Take::Batch(l2)) = take_any(&scheds, 0) else {
            panic!()
        };
        assert_eq!(e2, 2);
        scheds[2].complete(l2.b);
        assert!(matches!(take_any(&scheds, 0), (_, Take::Finished)));
    }
}
