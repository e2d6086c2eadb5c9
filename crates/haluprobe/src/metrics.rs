//! Decision metrics of a probe at a threshold (accuracy, F1), the threshold itself, and how far
//! above chance a test AUROC must be before luck is ruled out. AUROC and its bootstrap interval
//! are [`umbra_common::metrics`]'s (re-exported here).
pub use umbra_common::metrics::{auroc, bootstrap_auroc_ci};

/// Accuracy and F1 (positive = hallucinated) of `score >= threshold`.
pub fn accuracy_f1(scores: &[f32], labels: &[f32], threshold: f32) -> (f64, f64) {
    let (mut tp, mut fp, mut fneg, mut ok) = (0f64, 0f64, 0f64, 0usize);
    for (s, l) in scores.iter().zip(labels) {
        let p = *s >= threshold;
        let y = *l > 0.5;
        if p == y {
            ok += 1;
        }
        match (p, y) {
            (true, true) => tp += 1.0,
            (true, false) => fp += 1.0,
            (false, true) => fneg += 1.0,
            _ => {}
        }
    }
    let acc = ok as f64 / scores.len().max(1) as f64;
    let f1 = if tp == 0.0 {
        0.0
    } else {
        2.0 * tp / (2.0 * tp + fp + fneg)
    };
    (acc, f1)
}

/// The threshold on `scores` that maximizes accuracy (midpoints between sorted scores).
pub fn best_threshold(scores: &[f32], labels: &[f32]) -> f32 {
    let mut v: Vec<f32> = scores.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.dedup();
    let mut best = (f64::NEG_INFINITY, 0.5f32);
    let cands = v
        .windows(2)
        .map(|w| (w[0] + w[1]) / 2.0)
        .chain(v.first().map(|x| x - 1.0))
        .chain(v.last().map(|x| x + 1.0));
    for t in cands {
        let (a, _) = accuracy_f1(scores, labels, t);
        if a > best.0 {
            best = (a, t);
        }
    }
    best.1
}

/// The `1 - alpha` quantile of the test AUROC of a detector that knows nothing, on these
/// labels: under the null hypothesis (scores independent of labels, as for a probe fitted
/// without the test rows) every assignment of the scores to the items is equally likely, so
/// the AUROC's null distribution is a permutation distribution. It is estimated by `perms`
/// random permutations of `labels` over `scores` (seeded); with `perms >= 20 / alpha` the
/// estimate is stable. An AUROC above the bound happens by luck with probability `<= alpha`.
pub fn auroc_permutation_bound(
    scores: &[f32],
    labels: &[f32],
    alpha: f64,
    perms: usize,
    seed: u64,
) -> Option<f64> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    auroc(scores, labels)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut l = labels.to_vec();
    let mut vals: Vec<f64> = (0..perms.max(1))
        .filter_map(|_| {
            l.shuffle(&mut rng);
            auroc(scores, &l)
        })
        .collect();
    vals.sort_by(|a, b| a.total_cmp(b));
    let i = (((1.0 - alpha) * vals.len() as f64).ceil() as usize).min(vals.len()) - 1;
    Some(vals[i])
}

/// Normal approximation of the same bound without ties: the Mann-Whitney statistic of `n_pos`
/// positives and `n_neg` negatives has null mean 1/2 and standard deviation
/// `sqrt((n_pos + n_neg + 1) / (12 n_pos n_neg))` on the AUROC scale.
pub fn auroc_null_sd(n_pos: usize, n_neg: usize) -> f64 {
    let (p, n) = (n_pos.max(1) as f64, n_neg.max(1) as f64);
    ((p + n + 1.0) / (12.0 * p * n)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_and_f1() {
        let s = [0.1, 0.2, 0.7, 0.9];
        let l = [0.0, 0.0, 1.0, 1.0];
        let t = best_threshold(&s, &l);
        assert_eq!(accuracy_f1(&s, &l, t), (1.0, 1.0));
        assert_eq!(accuracy_f1(&s, &l, 0.8), (0.75, 2.0 / 3.0));
    }

    #[test]
    fn permutation_bound_matches_the_normal_approximation() {
        // 60 positives and 60 negatives with distinct scores: the 99.9% quantile is about
        // 0.5 + 3.09 sd.
        let scores: Vec<f32> = (0..120).map(|i| i as f32).collect();
        let labels: Vec<f32> = (0..120).map(|i| ((i * 7) % 2) as f32).collect();
        let b = auroc_permutation_bound(&scores, &labels, 1e-3, 40_000, 3).unwrap();
        let want = 0.5 + 3.09 * auroc_null_sd(60, 60);
        assert!((b - want).abs() < 0.015, "{b} vs {want}");
        assert!(auroc_permutation_bound(&scores, &[1.0; 120], 1e-3, 10, 0).is_none());
    }
}
