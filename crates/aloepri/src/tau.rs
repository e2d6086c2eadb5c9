//! The client's secret vocabulary permutation `tau` (special tokens stay fixed points).
use crate::error::{AloeError, Result};
use rand::Rng;

/// `tau`: plaintext token id -> obfuscated token id, and its inverse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPermutation {
    forward: Vec<u32>,
    inverse: Vec<u32>,
}

impl TokenPermutation {
    /// A uniformly random permutation of `0..vocab` fixing every id in `fixed`.
    pub fn random<R: Rng>(rng: &mut R, vocab: usize, fixed: &[u32]) -> Self {
        let mut is_fixed = vec![false; vocab];
        for &f in fixed {
            if (f as usize) < vocab {
                is_fixed[f as usize] = true;
            }
        }
        let movable: Vec<u32> = (0..vocab as u32)
            .filter(|&i| !is_fixed[i as usize])
            .collect();
        let perm = crate::linalg::permutation(rng, movable.len());
        let mut forward: Vec<u32> = (0..vocab as u32).collect();
        for (k, &i) in movable.iter().enumerate() {
            forward[i as usize] = movable[perm[k]];
        }
        Self::from_forward(forward).expect("a shuffled identity is a permutation")
    }

    /// The identity (used by tests and by the "keys off" attack targets).
    pub fn identity(vocab: usize) -> Self {
        Self::from_forward((0..vocab as u32).collect()).expect("identity")
    }

    /// Validates that `forward` is a permutation of `0..len`.
    pub fn from_forward(forward: Vec<u32>) -> Result<Self> {
        let n = forward.len();
        let mut inverse = vec![u32::MAX; n];
        for (i, &t) in forward.iter().enumerate() {
            let slot = inverse.get_mut(t as usize).ok_or_else(|| {
                AloeError::Input(format!(
                    "tau maps {i} to {t}, outside the vocabulary of {n}"
                ))
            })?;
            if *slot != u32::MAX {
                return Err(AloeError::Input(format!(
                    "tau is not a permutation: {t} is hit twice"
                )));
            }
            *slot = i as u32;
        }
        Ok(Self { forward, inverse })
    }

    pub fn vocab_size(&self) -> usize {
        self.forward.len()
    }

    pub fn forward_table(&self) -> &[u32] {
        &self.forward
    }

    pub fn inverse_table(&self) -> &[u32] {
        &self.inverse
    }

    /// Maps plaintext ids to obfuscated ids; an out-of-range id is an error.
    pub fn apply(&self, ids: &[u32]) -> Result<Vec<u32>> {
        map(&self.forward, ids)
    }

    /// Maps obfuscated ids back to plaintext ids.
    pub fn invert(&self, ids: &[u32]) -> Result<Vec<u32>> {
        map(&self.inverse, ids)
    }
}

fn map(table: &[u32], ids: &[u32]) -> Result<Vec<u32>> {
    ids.iter()
        .map(|&i| {
            table.get(i as usize).copied().ok_or_else(|| {
                AloeError::Input(format!(
                    "token id {i} is outside the vocabulary of {}",
                    table.len()
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn fixes_specials_and_round_trips() {
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let tau = TokenPermutation::random(&mut rng, 1000, &[0, 1, 2, 999]);
        for s in [0u32, 1, 2, 999] {
            assert_eq!(tau.apply(&[s]).unwrap(), vec![s]);
        }
        let ids: Vec<u32> = (0..1000).collect();
        let fwd = tau.apply(&ids).unwrap();
        assert_eq!(tau.invert(&fwd).unwrap(), ids);
        let moved = ids.iter().zip(&fwd).filter(|(a, b)| a != b).count();
        assert!(moved > 950, "only {moved} ids moved");
        assert!(tau.apply(&[1000]).is_err());
    }

    #[test]
    fn rejects_non_permutations() {
        assert!(TokenPermutation::from_forward(vec![0, 0, 1]).is_err());
        assert!(TokenPermutation::from_forward(vec![0, 5]).is_err());
    }
}
