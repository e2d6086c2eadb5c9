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

/// Share of the distinct obfuscated ids of `stream` whose best guess is right (TTRSR restricted to
/// the tau entries the attacker actually saw).
pub fn seen_recovery(rec: &Recovery, stream: &[u32], tau_inv: &[u32]) -> f64 {
    let mut seen: Vec<u32> = stream.to_vec();
    seen.sort_unstable();
    seen.dedup();
    if seen.is_empty() {
        return 0.0;
    }
    let ok = seen
        .iter()
        .filter(|&&t| rec.best(t).is_some() && tau_inv.get(t as usize).copied() == rec.best(t))
        .count();
    ok as f64 / seen.len() as f64
}

/// Per-position guesses of a token-level attack (IMA, ISA) turned into per-id candidates: the
/// attacker sees the obfuscated id at every position, so guesses for one id are pooled by a
/// Borda vote (`k - r` points for rank `r`).
pub fn pool_positions(stream: &[u32], guesses: &[Vec<u32>], vocab: usize) -> Recovery {
    let mut pts: Vec<std::collections::HashMap<u32, usize>> = vec![Default::default(); vocab];
    for (&t, g) in stream.iter().zip(guesses) {
        let k = g.len();
        if let Some(p) = pts.get_mut(t as usize) {
            for (r, &c) in g.iter().enumerate() {
                *p.entry(c).or_insert(0) += k - r;
            }
        }
    }
    let mut rec = Recovery::new(vocab);
    for (t, p) in pts.into_iter().enumerate() {
        let mut v: Vec<(u32, usize)> = p.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        rec.candidates[t] = v.into_iter().map(|x| x.0).collect();
    }
    rec
}

/// Share of positions whose true id (`truth`) is among the first `k` guesses.
pub fn position_recovery(guesses: &[Vec<u32>], truth: &[u32], k: usize) -> f64 {
    if truth.is_empty() {
        return 0.0;
    }
    let ok = guesses
        .iter()
        .zip(truth)
        .filter(|(g, t)| g.iter().take(k).any(|x| x == *t))
        .count();
    ok as f64 / truth.len() as f64
}

/// Corpus BLEU-4 (uniform weights, brevity penalty) of recovered sequences against the true ones,
/// on token ids. A recovery of the same length, so the penalty is 1 for every attack here.
pub fn bleu4(hyp: &[Vec<u32>], refs: &[Vec<u32>]) -> f64 {
    use std::collections::HashMap;
    let (mut hl, mut rl) = (0usize, 0usize);
    let mut logp = 0.0;
    for n in 1..=4 {
        let (mut matched, mut total) = (0usize, 0usize);
        for (h, r) in hyp.iter().zip(refs) {
            if n == 1 {
                hl += h.len();
                rl += r.len();
            }
            let mut rc: HashMap<&[u32], usize> = HashMap::new();
            for g in r.windows(n) {
                *rc.entry(g).or_insert(0) += 1;
            }
            for g in h.windows(n) {
                total += 1;
                if let Some(c) = rc.get_mut(g) {
                    if *c > 0 {
                        *c -= 1;
                        matched += 1;
                    }
                }
            }
        }
        if matched == 0 || total == 0 {
            return 0.0;
        }
        logp += (matched as f64 / total as f64).ln() / 4.0;
    }
    let bp = if hl >= rl || hl == 0 {
        1.0
    } else {
        (1.0 - rl as f64 / hl as f64).exp()
    };
    bp * logp.exp()
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
        // Ids 3 and 0 seen; 3 is right, 0 is wrong (guess 2, truth 1).
        assert_eq!(seen_recovery(&rec, &[3, 3, 0], &tau_inv), 0.5);
    }

    #[test]
    fn pooled_votes_and_bleu() {
        // Id 5 seen three times: guesses 1, 1, 2 -> 1 wins.
        let rec = pool_positions(
            &[5, 5, 5, 6],
            &[vec![1, 2], vec![1], vec![2, 1], vec![4]],
            8,
        );
        assert_eq!(rec.best(5), Some(1));
        assert_eq!(rec.best(6), Some(4));
        assert_eq!(rec.best(0), None);
        let g = vec![vec![1], vec![3, 2], vec![9]];
        assert_eq!(position_recovery(&g, &[1, 2, 0], 1), 1.0 / 3.0);
        assert_eq!(position_recovery(&g, &[1, 2, 0], 2), 2.0 / 3.0);
        let r = vec![(0..20).collect::<Vec<u32>>()];
        assert!((bleu4(&r, &r) - 1.0).abs() < 1e-12);
        let mut h = r.clone();
        h[0][10] = 99;
        let b = bleu4(&h, &r);
        assert!(b > 0.5 && b < 0.9, "{b}");
        assert_eq!(bleu4(&[vec![7; 20]], &r), 0.0);
    }
}
