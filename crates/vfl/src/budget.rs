//! Simulated heterogeneous parties: a per-party compute budget.
//!
//! PubSub-VFL's planner matters most when the two parties' machines differ. On one test machine
//! a [`ComputeBudget`] stands in for a party's own machine: at most `cores` of the party's
//! workers compute at a time (a counting semaphore), and a party that is `slowdown` times slower
//! holds its core for `slowdown` times as long as the work took (the extra time is slept while
//! holding the permit, so no other worker of that party can use the core meanwhile). Waiting for
//! a permit counts as waiting, not computing. In the two-process (NATS) setting each process can
//! be given real unequal cores with `taskset` instead.
use serde::{Deserialize, Serialize};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// One party's simulated machine.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PartyMachine {
    /// Workers of this party that may compute at once.
    pub cores: usize,
    /// How many times slower than this machine's cores (>= 1).
    #[serde(default = "one")]
    pub slowdown: f64,
}

fn one() -> f64 {
    1.0
}

impl std::str::FromStr for PartyMachine {
    type Err = String;

    /// `CORES` or `CORES:SLOWDOWN` (e.g. `1` or `1:3` = one core, three times slower).
    fn from_str(s: &str) -> Result<Self, String> {
        let (c, sl) = s.split_once(':').unwrap_or((s, "1"));
        let cores: usize = c
            .trim()
            .parse()
            .map_err(|_| format!("`{s}`: expected CORES or CORES:SLOWDOWN, e.g. 1:3"))?;
        let slowdown: f64 = sl
            .trim()
            .parse()
            .map_err(|_| format!("`{s}`: slowdown must be a number >= 1"))?;
        if cores == 0 || !(1.0..=1000.0).contains(&slowdown) {
            return Err(format!(
                "`{s}`: cores must be >= 1 and slowdown in [1, 1000]"
            ));
        }
        Ok(PartyMachine { cores, slowdown })
    }
}

/// Counting semaphore plus slowdown; see the module docs.
#[derive(Debug)]
pub struct ComputeBudget {
    free: Mutex<usize>,
    cv: Condvar,
    slowdown: f64,
    limited: bool,
}

impl ComputeBudget {
    /// No limit: work runs as is.
    pub fn unlimited() -> Self {
        Self {
            free: Mutex::new(usize::MAX),
            cv: Condvar::new(),
            slowdown: 1.0,
            limited: false,
        }
    }

    pub fn new(m: Option<PartyMachine>) -> Self {
        match m {
            None => Self::unlimited(),
            Some(m) => Self {
                free: Mutex::new(m.cores.max(1)),
                cv: Condvar::new(),
                slowdown: m.slowdown.max(1.0),
                limited: true,
            },
        }
    }

    /// Runs `f` on one of the party's cores; returns its result and the seconds spent waiting
    /// for a core.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> (R, f64) {
        if !self.limited {
            return (f(), 0.0);
        }
        let t_wait = Instant::now();
        {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            while *free == 0 {
                free = self.cv.wait(free).unwrap_or_else(|e| e.into_inner());
            }
            *free -= 1;
        }
        let waited = t_wait.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let r = f();
        let extra = t0.elapsed().mul_f64(self.slowdown - 1.0);
        if extra > Duration::ZERO {
            std::thread::sleep(extra);
        }
        *self.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.cv.notify_one();
        (r, waited)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn at_most_cores_run_at_once_and_slowdown_stretches_the_work() {
        let b = ComputeBudget::new(Some(PartyMachine {
            cores: 2,
            slowdown: 3.0,
        }));
        let running = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..6 {
                s.spawn(|| {
                    b.run(|| {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(20));
                        running.fetch_sub(1, Ordering::SeqCst);
                    })
                });
            }
        });
        assert!(peak.load(Ordering::SeqCst) <= 2);
        // 6 jobs of 20 ms held 3x as long on 2 cores: >= 3 rounds of 60 ms.
        assert!(
            t.elapsed() >= Duration::from_millis(175),
            "{:?}",
            t.elapsed()
        );
        let (v, w) = ComputeBudget::unlimited().run(|| 7);
        assert_eq!((v, w), (7, 0.0));
    }

    #[test]
    fn machines_parse_from_the_command_line_form() {
        let m: PartyMachine = "1:3".parse().unwrap();
        assert_eq!((m.cores, m.slowdown), (1, 3.0));
        let m: PartyMachine = "4".parse().unwrap();
        assert_eq!((m.cores, m.slowdown), (4, 1.0));
        for bad in ["0", "1:0.5", "x", "2:y", "1:2000"] {
            assert!(bad.parse::<PartyMachine>().is_err(), "{bad}");
        }
    }
}
