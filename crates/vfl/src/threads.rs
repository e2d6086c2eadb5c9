//! Compute threads of the parties' workers.
//!
//! candle's CPU matrix products split their work over the rayon pool of the calling thread (the
//! process-wide pool, as wide as the machine, for a plain thread). A party already runs one
//! worker per thread, so kernels that spread again oversubscribe the cores the run was given and
//! distort both the timings and the planner's profile. Each worker therefore runs inside a
//! local one-thread pool ([`one_thread`]); the library touches nothing process-wide (no
//! `RAYON_NUM_THREADS`, no global pool), so other code in the same process keeps its own
//! threading.
//!
//! candle 0.11 also reads `RAYON_NUM_THREADS` on every matrix product to decide whether to split
//! it (and sizes its element-wise pool from it); inside a one-thread pool a split product runs
//! its parts one after the other, correct but about twice as slow on this job's small products.
//! The binaries therefore set `RAYON_NUM_THREADS=1` at start for the split-learning commands
//! (`cli::one_compute_thread_per_worker`, feature `cli`); a library user who wants the same speed
//! sets it in their `main`.

/// Runs `f` on a fresh one-thread rayon pool, so that candle's kernels called from `f` run on
/// that one thread. If the pool cannot be built (no thread could be spawned), `f` runs here.
pub fn one_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .thread_name(|i| format!("umbra-vfl-worker-{i}"))
        .build()
    {
        Ok(pool) => pool.install(f),
        Err(e) => {
            tracing::warn!("no one-thread pool ({e}); running on the caller's pool");
            f()
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn work_runs_on_a_pool_of_one_thread() {
        let (threads, same) = super::one_thread(|| {
            let here = std::thread::current().id();
            // a parallel iterator inside stays on the pool's only thread
            let ids: Vec<_> = {
                use rayon::prelude::*;
                (0..64)
                    .into_par_iter()
                    .map(|_| std::thread::current().id())
                    .collect()
            };
            (rayon::current_num_threads(), ids.iter().all(|&i| i == here))
        });
        assert_eq!(threads, 1);
        assert!(same);
    }
}
