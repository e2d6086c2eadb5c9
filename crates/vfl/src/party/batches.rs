//! The batch layout both parties derive from the job seed, so that only batch ids cross the wire.
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The shared batch layout: epoch `e` visits the training rows in a seeded permutation, batch `b`
/// is its `b`-th slice of `B` rows. Both parties derive it from the job seed, so only batch ids
/// cross the wire (and the peer knows which rows every batch holds).
#[derive(Debug)]
pub struct Batches {
    pub n: usize,
    pub batch: usize,
    seed: u64,
    cache: Mutex<HashMap<u32, Arc<Vec<usize>>>>,
}

impl Batches {
    pub fn new(n: usize, batch: usize, seed: u64) -> Self {
        Batches {
            n,
            batch: batch.max(1),
            seed,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Batches per epoch, `ceil(n / B)`.
    pub fn count(&self) -> usize {
        self.n.div_ceil(self.batch)
    }

    fn perm(&self, epoch: u32) -> Arc<Vec<usize>> {
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = c.get(&epoch) {
            return p.clone();
        }
        let mut p: Vec<usize> = (0..self.n).collect();
        p.shuffle(&mut ChaCha8Rng::seed_from_u64(
            self.seed ^ (0xBA7C_0000u64 + epoch as u64),
        ));
        let p = Arc::new(p);
        if c.len() > 4 {
            c.clear();
        }
        c.insert(epoch, p.clone());
        p
    }

    /// Training rows of batch `b` of epoch `epoch`; `None` for an unknown batch id.
    pub fn rows(&self, epoch: u32, b: u64) -> Option<Vec<usize>> {
        if b >= self.count() as u64 {
            return None;
        }
        let p = self.perm(epoch);
        let s = b as usize * self.batch;
        Some(p[s..(s + self.batch).min(self.n)].to_vec())
    }

    /// Size of the synchronous round that batch `b` belongs to, with `w` workers.
    pub fn round_size(&self, b: u64, w: usize) -> usize {
        let r = b as usize / w;
        w.min(self.count() - r * w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_every_row_once() {
        let b = Batches::new(1000, 256, 3);
        assert_eq!(b.count(), 4);
        let mut all: Vec<usize> = (0..4).flat_map(|i| b.rows(1, i).unwrap()).collect();
        assert_eq!(b.rows(1, 3).unwrap().len(), 1000 - 768);
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        assert!(b.rows(1, 4).is_none());
        assert_ne!(b.rows(0, 0), b.rows(1, 0));
        assert_eq!(b.round_size(3, 3), 1);
        assert_eq!(b.round_size(1, 3), 3);
    }
}
