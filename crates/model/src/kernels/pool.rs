//! Splitting a kernel over threads without per-call wake-up costs.
//!
//! A decode step is a few hundred small products (tens of microseconds each); waking sleeping
//! threads for each (rayon's default) costs about as much as the product. The kernels use
//! candle's persistent barrier pool instead ([`candle_core::utils::barrier_pool`]): its workers
//! spin briefly between jobs and park only when idle, so consecutive products of one step reach
//! them in about a microsecond. The pool has `CANDLE_NUM_THREADS` (else `RAYON_NUM_THREADS`,
//! else the physical core count) threads including the caller; concurrent callers take turns.
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Threads a split product runs on (the caller included).
pub fn threads() -> usize {
    candle_core::utils::barrier_pool().n_workers() + 1
}

/// Runs `f` over `0..n` in ranges of whole `grain`s on all threads of the pool (a shared
/// cursor hands out about four ranges per thread, so a thread the OS delays does not hold up
/// the others); runs `f(0..n)` on the caller when `parallel` is false, there is one thread or
/// `n <= grain`.
pub fn parallel_for(n: usize, grain: usize, parallel: bool, f: impl Fn(Range<usize>) + Sync) {
    let grain = grain.max(1);
    let t = if parallel { threads() } else { 1 };
    if t <= 1 || n <= grain {
        if n > 0 {
            f(0..n);
        }
        return;
    }
    let chunk = n.div_ceil(t * 4).div_ceil(grain).max(1) * grain;
    let cursor = AtomicUsize::new(0);
    candle_core::utils::barrier_pool().execute(|_| loop {
        let s = cursor.fetch_add(chunk, Ordering::Relaxed);
        if s >= n {
            break;
        }
        f(s..n.min(s + chunk));
    });
}

/// A raw pointer that may cross threads: each thread writes a disjoint part of its target.
#[derive(Clone, Copy)]
pub struct SharedMut<T>(*mut T);

// SAFETY: users write disjoint elements only (documented at each use), and the pointer does
// not outlive the buffer (the pool call returns before the buffer is used again).
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    pub fn new(s: &mut [T]) -> Self {
        Self(s.as_mut_ptr())
    }

    /// # Safety
    /// `i` in bounds of the slice this was made from, and no other thread writes element `i`.
    #[inline(always)]
    pub unsafe fn write(&self, i: usize, v: T) {
        self.0.add(i).write(v)
    }

    /// # Safety
    /// `start + len` in bounds, and no other thread touches those elements meanwhile.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_every_index_once() {
        for (n, grain, par) in [(0, 4, true), (5, 8, true), (1000, 4, true), (999, 3, false)] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            parallel_for(n, grain, par, |r| {
                assert!(r.start % grain == 0 || r.start == 0);
                for i in r {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n {n}");
        }
    }
}
