//! Scoring an attack against the client key (the key is used here only, never by an attack).
//!
//! An attack produces, for each obfuscated token id `t`, a ranked list of plaintext candidates
//! (best first). TTRSR (token-to-token recovery success rate) is the share of tau's entries `i`
//! whose obfuscated id `tau(i)` has `i` as its first candidate; top-k recovery is the share with
//! `i` among the first `k`. Ids the attack makes no guess for count as not recovered.
use serde::Serialize;

/// Ranked plaintext candidates per obfuscated id (`candidates[t]`, best first; empty = no guess).
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    pub candidates: Vec<Vec<u32>>,
}

impl Recovery {
    pub fn new(vocab: usize) -> Self {
        Self {
            candidates: vec![vec![]; vocab],
        }
    }

    /// The best guess for obfuscated id `t`.
    pub fn best(&self, t: u32) -> Option<u32> {
        self.candidates.get(t as usize)?.first().copied()
    }
}

/// Flat score of one attack (fractions, not percent).
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Score {
    /// Share of tau entries recovered as the best guess.
    pub ttrsr: f64,
    /// Share of tau entries with the true id among the first 10 candidates.
    pub top10: f64,
    /// Share of obfuscated ids the attack made a guess for.
    pub coverage: f64,
}

/// Scores `rec` against `tau` (`tau[i]` = obfuscated id of plaintext id `i`).
pub fn score(rec: &Recovery, tau: &[u32]) -> Score {
    let n = tau.len().max(1) as f64;
    let (mut top1, mut top10) = (0usize, 0usize);
    for (i, &t) in tau.iter().enumerate() {
        if let Some(c) = rec.candidates.get(t as usize) {
            if c.first() == Some(&(i as u32)) {
                top1 += 1;
            }
            if c.iter().take(10).any(|&x| x == i as u32) {
                top10 += 1;
            }
        }
    }
    let covered = rec.candidates.iter().filter(|c| !c.is_empty()).count();
    Score {
        ttrsr: top1 as f64 / n,
        top10: top10 as f64 / n,
        coverage: covered as f64 / n,
    }
}

/// Token-level recovery on a stream of obfuscated ids: the share of tokens whose best guess is
/// the true plaintext id (`tau_inv[t]`).
pub fn token_recovery(rec: &Recovery, stream: &[u32], tau_inv: &[u32]) -> f64 {
    if stream.is_empty() {
        return 0.0;
    }
    let ok = stream
        .iter()
        .filter(|&&t| rec.best(t).is_some() && tau_inv.get(t as usize).copied() == rec.best(t))
        .count();
    ok as f64 / stream.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_partial_and_empty_recoveries() {
        let tau = vec![2u32, 0, 1, 3];
        let mut rec = Recovery::new(4);
        for (i, &t) in tau.iter().enumerate() {
            rec.candidates[t as usize] = vec![i as u32];
        }
        assert_eq!(score(&rec, &tau).ttrsr, 1.0);
        // Two wrong at top-1; one of them still in the top-10.
        rec.candidates[2] = vec![1, 0];
        rec.candidates[0] = vec![2];
        let s = score(&rec, &tau);
        assert_eq!(s.ttrsr, 0.5);
        assert_eq!(s.top10, 0.75);
        let empty = Recovery::new(4);
        let s = score(&empty, &tau);
        assert_eq!((s.ttrsr, s.coverage), (0.0, 0.0));
        let tau_inv = vec![1u32, 2, 0, 3];
        assert_eq!(token_recovery(&rec, &[3, 3, 0], &tau_inv), 2.0 / 3.0);
    }
}
