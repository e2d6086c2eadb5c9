//! SDA, substitution-cipher decoding of the permuted id stream with a bigram language model.
//!
//! Assumption (the paper's TFMA/SDA setting): the server logs the obfuscated ids of many requests
//! (`traffic`: plaintext ids passed through tau, a simple substitution cipher over the vocabulary)
//! and holds public text of its own (`public`, plaintext ids from the public tokenizer). Attack:
//! 1. start from TFMA's rank-to-rank assignment `m: cipher id -> plaintext id` (made injective:
//!    plaintext ids never seen in public text fill the ranks past the public vocabulary);
//! 2. score an assignment with a smoothed bigram model of the public text,
//!    `S(m) = sum_{(a,b)} n_ab log P(m(b) | m(a))`, `P(y|x) = (c(x,y) + s P(y)) / (c(x) + s)`,
//!    `n_ab` = count of the cipher bigram `(a,b)` in traffic;
//! 3. hill-climb: for every cipher id (most frequent first), try giving it each plaintext id within
//!    `window` frequency ranks of its own rank (swapping with the cipher id that holds it) and keep
//!    the best move if it raises `S`; repeat for `sweeps` passes or until nothing moves.
//!
//! The `k` candidates of a cipher id are its final assignment followed by the other tried
//! plaintext ids, best score first. Cipher ids never seen in traffic get no guess. Cost per sweep:
//! `2 window x (bigram types in traffic)` hash look-ups (SmolLM2, 2000 passages, window 100: ~5 s).
use crate::score::Recovery;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use umbra_common::progress::Progress;

/// Multiply-xorshift hasher for `u64` bigram keys (the default SipHash is the bottleneck here).
#[derive(Default)]
pub struct PairHasher(u64);

impl Hasher for PairHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, x: u64) {
        let h = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = h ^ (h >> 29);
    }
}

type PairMap<V> = HashMap<u64, V, BuildHasherDefault<PairHasher>>;

fn key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

/// Knobs of SDA.
#[derive(Debug, Clone)]
pub struct SdaConfig {
    /// Plaintext ids tried per cipher id: those within this many frequency ranks of its own.
    pub window: usize,
    /// Hill-climbing passes over all cipher ids (stops early when nothing moves).
    pub sweeps: usize,
    /// Dirichlet smoothing `s` of the bigram model towards the unigram distribution.
    pub smoothing: f64,
    /// Candidates kept per cipher id.
    pub k: usize,
    /// Wall-clock budget in seconds for the hill climbing (`None`: no limit).
    pub budget_s: Option<f64>,
}

impl Default for SdaConfig {
    fn default() -> Self {
        Self {
            window: 100,
            sweeps: 8,
            smoothing: 2.0,
            k: 10,
            budget_s: None,
        }
    }
}

/// Smoothed bigram model of the attacker's public text.
struct Bigram {
    pair: PairMap<u32>,
    uni: Vec<f64>,
    count: Vec<f64>,
    s: f64,
}

impl Bigram {
    fn new(public: &[u32], vocab: usize, s: f64) -> Self {
        let mut pair = PairMap::default();
        let mut count = vec![0f64; vocab];
        let mut uni = vec![0.5f64; vocab];
        for w in public.windows(2) {
            *pair.entry(key(w[0], w[1])).or_insert(0) += 1;
            // c(x) counts x as the first of a bigram so that P(.|x) sums to one.
            if let Some(c) = count.get_mut(w[0] as usize) {
                *c += 1.0;
            }
        }
        for &x in public {
            if let Some(c) = uni.get_mut(x as usize) {
                *c += 1.0;
            }
        }
        let n: f64 = uni.iter().sum();
        uni.iter_mut().for_each(|c| *c /= n);
        Self {
            pair,
            uni,
            count,
            s,
        }
    }

    /// `log P(y | x)`.
    fn lp(&self, x: u32, y: u32) -> f64 {
        let c = self.pair.get(&key(x, y)).copied().unwrap_or(0) as f64;
        let cx = self.count.get(x as usize).copied().unwrap_or(0.0);
        let py = self.uni.get(y as usize).copied().unwrap_or(1e-9);
        ((c + self.s * py) / (cx + self.s)).ln()
    }
}

/// Outcome of [`run`]: the candidates and how the score moved.
pub struct SdaOutput {
    pub recovery: Recovery,
    /// `S(m)` per traffic bigram of the TFMA start and of the final assignment.
    pub start_score: f64,
    pub final_score: f64,
    /// Accepted moves over all sweeps, and sweeps run.
    pub moves: usize,
    pub sweeps: usize,
}

/// Ids with a positive count, most frequent first (ties: smaller id first).
fn ranked(counts: &[u64]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..counts.len() as u32)
        .filter(|&i| counts[i as usize] > 0)
        .collect();
    order.sort_by(|&a, &b| counts[b as usize].cmp(&counts[a as usize]).then(a.cmp(&b)));
    order
}

fn counts(ids: &[u32], vocab: usize) -> Vec<u64> {
    let mut c = vec![0u64; vocab];
    for &i in ids {
        if let Some(x) = c.get_mut(i as usize) {
            *x += 1;
        }
    }
    c
}

/// Runs SDA on `traffic` (obfuscated ids) with the attacker's `public` plaintext ids.
pub fn run(traffic: &[u32], public: &[u32], vocab: usize, cfg: &SdaConfig) -> SdaOutput {
    let start_t = std::time::Instant::now();
    let lm = Bigram::new(public, vocab, cfg.smoothing);
    let cipher = ranked(&counts(traffic, vocab));
    // Plaintext ranking: public ids by count, then every unseen id (so the assignment is injective).
    let pc = counts(public, vocab);
    let mut plain = ranked(&pc);
    plain.extend((0..vocab as u32).filter(|&i| pc[i as usize] == 0));
    let mut m = vec![u32::MAX; vocab]; // cipher -> plain
    let mut owner = vec![u32::MAX; vocab]; // plain -> cipher
    for (r, &a) in cipher.iter().enumerate() {
        m[a as usize] = plain[r];
        owner[plain[r] as usize] = a;
    }
    // Cipher bigram types with counts, and per cipher id the types it takes part in.
    let mut types: PairMap<u32> = PairMap::default();
    for w in traffic.windows(2) {
        if (w[0] as usize) < vocab && (w[1] as usize) < vocab {
            *types.entry(key(w[0], w[1])).or_insert(0) += 1;
        }
    }
    let mut adj: Vec<Vec<(u32, u32, f64)>> = vec![vec![]; vocab];
    for (&k, &n) in &types {
        let (a, b) = ((k >> 32) as u32, k as u32);
        adj[a as usize].push((a, b, n as f64));
        if a != b {
            adj[b as usize].push((a, b, n as f64));
        }
    }
    let total_types: f64 = types.values().map(|&n| n as f64).sum::<f64>().max(1.0);
    let full_score = |m: &[u32]| -> f64 {
        types
            .iter()
            .map(|(&k, &n)| n as f64 * lm.lp(m[(k >> 32) as usize], m[k as u32 as usize]))
            .sum::<f64>()
            / total_types
    };
    let start_score = full_score(&m);
    // Score change of giving cipher `a` plaintext `q` (and `a`'s old plaintext to `c`, the cipher
    // id that held `q`, if any).
    let delta = |m: &[u32], a: u32, c: Option<u32>, q: u32| -> f64 {
        let p = m[a as usize];
        let map = |x: u32| -> u32 {
            if x == a {
                q
            } else if Some(x) == c {
                p
            } else {
                m[x as usize]
            }
        };
        let mut d = 0.0;
        let mut visit = |&(x, y, n): &(u32, u32, f64)| {
            d += n * (lm.lp(map(x), map(y)) - lm.lp(m[x as usize], m[y as usize]));
        };
        adj[a as usize].iter().for_each(&mut visit);
        if let Some(c) = c {
            // Types with both a and c are already in a's list.
            adj[c as usize]
                .iter()
                .filter(|&&(x, y, _)| x != a && y != a)
                .for_each(&mut visit);
        }
        d
    };
    let rank_plain: Vec<usize> = {
        let mut r = vec![0usize; vocab];
        for (i, &p) in plain.iter().enumerate() {
            r[p as usize] = i;
        }
        r
    };
    let mut cands: Vec<Vec<(u32, f64)>> = vec![vec![]; vocab];
    let (mut moves, mut sweeps) = (0usize, 0usize);
    let pb = Progress::new((cfg.sweeps * cipher.len()) as u64, "sda");
    'outer: for sweep in 0..cfg.sweeps {
        sweeps = sweep + 1;
        let mut moved = 0usize;
        for (ri, &a) in cipher.iter().enumerate() {
            if let Some(b) = cfg.budget_s {
                if start_t.elapsed().as_secs_f64() > b {
                    tracing::info!("sda: budget of {b}s reached in sweep {sweeps}");
                    break 'outer;
                }
            }
            let r = rank_plain[m[a as usize] as usize];
            let lo = r.saturating_sub(cfg.window);
            let hi = (r + cfg.window + 1).min(plain.len());
            let mut tried = Vec::with_capacity(hi - lo);
            let mut best: Option<(u32, f64)> = None;
            for &q in &plain[lo..hi] {
                if q == m[a as usize] {
                    continue;
                }
                let c = owner[q as usize];
                let c = (c != u32::MAX).then_some(c);
                let d = delta(&m, a, c, q);
                tried.push((q, d));
                if d > 1e-9 && best.is_none_or(|(_, bd)| d > bd) {
                    best = Some((q, d));
                }
            }
            if let Some((q, _)) = best {
                let p = m[a as usize];
                let c = owner[q as usize];
                m[a as usize] = q;
                owner[q as usize] = a;
                owner[p as usize] = c;
                if c != u32::MAX {
                    m[c as usize] = p;
                }
                moved += 1;
                // Relative to the new assignment the old one scores -d; keep the list honest.
                let bd = best.map(|b| b.1).unwrap_or(0.0);
                tried = tried
                    .into_iter()
                    .filter(|&(x, _)| x != q)
                    .map(|(x, d)| (x, d - bd))
                    .collect();
                tried.push((p, -bd));
            }
            tried.sort_by(|x, y| y.1.total_cmp(&x.1));
            cands[a as usize] = tried;
            pb.set_position((sweep * cipher.len() + ri + 1) as u64);
        }
        moves += moved;
        tracing::info!("sda: sweep {sweeps}: {moved} moves");
        if moved == 0 {
            break;
        }
    }
    pb.finish();
    let final_score = full_score(&m);
    let mut rec = Recovery::new(vocab);
    for &a in &cipher {
        let mut c = vec![m[a as usize]];
        c.extend(
            cands[a as usize]
                .iter()
                .map(|&(q, _)| q)
                .filter(|&q| q != m[a as usize])
                .take(cfg.k.saturating_sub(1)),
        );
        rec.candidates[a as usize] = c;
    }
    SdaOutput {
        recovery: rec,
        start_score,
        final_score,
        moves,
        sweeps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bigram_probabilities_are_normalised() {
        let public = vec![0u32, 1, 2, 0, 1, 0, 2, 2];
        let lm = Bigram::new(&public, 4, 2.0);
        for x in 0..4 {
            let s: f64 = (0..4).map(|y| lm.lp(x, y).exp()).sum();
            assert!((s - 1.0).abs() < 1e-9, "row {x} sums to {s}");
        }
        assert!(lm.lp(0, 1) > lm.lp(0, 3));
    }
}
