//! AUROC (Mann-Whitney, ties counted half), bootstrap confidence intervals over rows,
//! accuracy and F1.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Area under the ROC curve of `scores` (higher = more likely label 1) against `labels`
/// (0/1): `P(s+ > s-) + P(s+ = s-)/2`. `None` when one class is absent.
pub fn auroc(scores: &[f32], labels: &[f32]) -> Option<f64> {
    let mut idx: Vec<usize> = (0..scores.len().min(labels.len())).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let (mut rank_sum, mut npos) = (0f64, 0usize);
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0; // 1-based mid-rank of the tie group
        for &k in &idx[i..=j] {
            if labels[k] > 0.5 {
                rank_sum += avg;
                npos += 1;
            }
        }
        i = j + 1;
    }
    let nneg = idx.len() - npos;
    if npos == 0 || nneg == 0 {
        return None;
    }
    Some((rank_sum - (npos * (npos + 1)) as f64 / 2.0) / (npos as f64 * nneg as f64))
}

/// Percentile bootstrap 95% interval of AUROC, resampling *groups* (HaluEval rows: both
/// triples of a row move together). Returns `(low, high)`.
pub fn bootstrap_auroc_ci(
    scores: &[f32],
    labels: &[f32],
    groups: &[u32],
    resamples: usize,
    seed: u64,
) -> Option<(f64, f64)> {
    let mut by_group: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for (i, g) in groups.iter().enumerate() {
        by_group.entry(*g).or_default().push(i);
    }
    let gs: Vec<&Vec<usize>> = by_group.values().collect();
    if gs.is_empty() || resamples == 0 {
        return None;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut vals = Vec::with_capacity(resamples);
    let (mut s, mut l) = (Vec::new(), Vec::new());
    for _ in 0..resamples {
        s.clear();
        l.clear();
        for _ in 0..gs.len() {
            for &i in gs[rng.random_range(0..gs.len())] {
                s.push(scores[i]);
                l.push(labels[i]);
            }
        }
        if let Some(a) = auroc(&s, &l) {
            vals.push(a);
        }
    }
    if vals.is_empty() {
        return None;
    }
    vals.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| vals[((vals.len() - 1) as f64 * p).round() as usize];
    Some((q(0.025), q(0.975)))
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_known_values() {
        assert_eq!(
            auroc(&[0.1, 0.2, 0.8, 0.9], &[0.0, 0.0, 1.0, 1.0]),
            Some(1.0)
        );
        assert_eq!(
            auroc(&[0.9, 0.8, 0.2, 0.1], &[0.0, 0.0, 1.0, 1.0]),
            Some(0.0)
        );
        // One tie between a positive and a negative: 3 wins + 0.5 of 4 pairs.
        assert_eq!(
            auroc(&[0.1, 0.5, 0.5, 0.9], &[0.0, 0.0, 1.0, 1.0]),
            Some(0.875)
        );
        assert_eq!(auroc(&[0.1, 0.2], &[1.0, 1.0]), None);
    }

    #[test]
    fn bootstrap_interval_brackets_the_estimate() {
        let n = 400;
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let labels: Vec<f32> = (0..n).map(|i| (i % 2) as f32).collect();
        let scores: Vec<f32> = labels
            .iter()
            .map(|l| l + rng.random_range(-1.0f32..1.0))
            .collect();
        let groups: Vec<u32> = (0..n as u32).map(|i| i / 2).collect();
        let a = auroc(&scores, &labels).unwrap();
        let (lo, hi) = bootstrap_auroc_ci(&scores, &labels, &groups, 300, 0).unwrap();
        assert!(
            lo < a && a < hi && hi - lo < 0.2 && lo > 0.6,
            "{lo} {a} {hi}"
        );
    }

    #[test]
    fn threshold_and_f1() {
        let s = [0.1, 0.2, 0.7, 0.9];
        let l = [0.0, 0.0, 1.0, 1.0];
        let t = best_threshold(&s, &l);
        assert_eq!(accuracy_f1(&s, &l, t), (1.0, 1.0));
        assert_eq!(accuracy_f1(&s, &l, 0.8), (0.75, 2.0 / 3.0));
    }
}
