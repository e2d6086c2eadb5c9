//! Intervals for the bench: a paired bootstrap over test examples, seeds and attacked sequences,
//! and the "-1 point" operating point read off a privacy-vs-loss curve.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Mean of `v` (0 when empty).
pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// The `q` quantile of `v` (sorted in place; nearest rank).
pub fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Percentile 95% interval `(2.5%, 97.5%)`.
pub fn interval95(v: &mut [f64]) -> (f64, f64) {
    (quantile(v, 0.025), quantile(v, 0.975))
}

/// The largest privacy gain reachable with an accuracy loss of at most `max_loss` along a curve
/// of `(loss, gain)` points ordered from the least to the most noise (the unprivatized point
/// `(0, 0)` is implied first). Between a point within the budget and the next one beyond it the
/// curve is linear, so the gain where the loss crosses `max_loss` counts too.
pub fn operating_gain(curve: &[(f64, f64)], max_loss: f64) -> f64 {
    let mut best: f64 = 0.0;
    let mut prev = (0.0f64, 0.0f64);
    for &(l, g) in curve {
        if l <= max_loss {
            best = best.max(g);
        } else if prev.0 <= max_loss && l > prev.0 {
            let t = (max_loss - prev.0) / (l - prev.0);
            best = best.max(prev.1 + t * (g - prev.1));
        }
        prev = (l, g);
    }
    best
}

/// Resampling plan of one bootstrap replicate: which test examples, which seeds, which attacked
/// sequences (indices, with replacement).
pub struct Resample {
    pub test: Vec<usize>,
    pub seeds: Vec<usize>,
    pub seqs: Vec<usize>,
}

/// `b` replicates over `n_test` test examples, `n_seeds` seeds and `n_seqs` sequences; replicate
/// 0 is the identity (the point estimate).
pub fn resamples(
    b: usize,
    n_test: usize,
    n_seeds: usize,
    n_seqs: usize,
    seed: u64,
) -> Vec<Resample> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = vec![Resample {
        test: (0..n_test).collect(),
        seeds: (0..n_seeds).collect(),
        seqs: (0..n_seqs).collect(),
    }];
    let draw = |n: usize, rng: &mut ChaCha8Rng| -> Vec<usize> {
        (0..n).map(|_| rng.random_range(0..n.max(1))).collect()
    };
    for _ in 1..b.max(1) {
        out.push(Resample {
            test: draw(n_test, &mut rng),
            seeds: draw(n_seeds, &mut rng),
            seqs: draw(n_seqs, &mut rng),
        });
    }
    out
}

/// Accuracy of per-seed correctness vectors (`'1'`/`'0'` bytes) under a resample.
pub fn resampled_accuracy(correct: &[&[u8]], r: &Resample) -> f64 {
    if correct.is_empty() || r.test.is_empty() {
        return 0.0;
    }
    let mut acc = 0.0;
    for &s in &r.seeds {
        let c = correct[s % correct.len()];
        let hits = r.test.iter().filter(|&&i| c.get(i) == Some(&b'1')).count();
        acc += hits as f64 / r.test.len() as f64;
    }
    acc / r.seeds.len() as f64
}

/// Token recovery under a resample of sequences: `per_seq[j] = (hits, tokens)` of sequence `j`.
pub fn resampled_recovery(per_seq: &[(u32, u32)], r: &Resample) -> f64 {
    let (mut h, mut n) = (0u64, 0u64);
    for &j in &r.seqs {
        if let Some(&(a, b)) = per_seq.get(j) {
            h += a as u64;
            n += b as u64;
        }
    }
    h as f64 / n.max(1) as f64
}

/// `(hits, tokens)` per sequence from a hit string and each token's sequence index.
pub fn per_sequence(hits: &str, token_seq: &[u32], n_seqs: usize) -> Vec<(u32, u32)> {
    let mut out = vec![(0u32, 0u32); n_seqs];
    for (h, &s) in hits.bytes().zip(token_seq) {
        if let Some(o) = out.get_mut(s as usize) {
            o.0 += u32::from(h == b'1');
            o.1 += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operating_gain_reads_the_crossing() {
        // losses 0.2, 0.6, 1.4, 3 points; gains 10, 30, 50, 80 points
        let c = [(0.002, 0.1), (0.006, 0.3), (0.014, 0.5), (0.03, 0.8)];
        // crossing between 0.6 and 1.4 points at 1.0: 0.3 + 0.5 * 0.2 = 0.4
        assert!((operating_gain(&c, 0.01) - 0.4).abs() < 1e-12);
        // nothing within budget beyond the implied (0, 0): interpolate from it
        assert!((operating_gain(&[(0.02, 0.6)], 0.01) - 0.3).abs() < 1e-12);
        // a noisier point that is cheap again counts
        assert_eq!(operating_gain(&[(0.02, 0.2), (0.005, 0.7)], 0.01), 0.7);
    }

    #[test]
    fn identity_replicate_and_resampled_means() {
        let r = resamples(3, 4, 2, 2, 1);
        assert_eq!(r[0].test, vec![0, 1, 2, 3]);
        let c: Vec<&[u8]> = vec![b"1100", b"1111"];
        assert!((resampled_accuracy(&c, &r[0]) - 0.75).abs() < 1e-12);
        let ps = per_sequence("1101", &[0, 0, 1, 1], 2);
        assert_eq!(ps, vec![(2, 2), (1, 2)]);
        assert!((resampled_recovery(&ps, &r[0]) - 0.75).abs() < 1e-12);
        let mut v = vec![3.0, 1.0, 2.0];
        assert_eq!(quantile(&mut v, 0.5), 2.0);
    }
}
