//! Ranking metrics shared by the probes, the split-learning reports and the attacks.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A binary label: `f32`/`f64` (`> 0.5` is positive), `bool`, or `u8` (non-zero is positive).
pub trait Label: Copy {
    fn positive(self) -> bool;
}

impl Label for f32 {
    fn positive(self) -> bool {
        self > 0.5
    }
}
impl Label for f64 {
    fn positive(self) -> bool {
        self > 0.5
    }
}
impl Label for bool {
    fn positive(self) -> bool {
        self
    }
}
impl Label for u8 {
    fn positive(self) -> bool {
        self != 0
    }
}

/// Area under the ROC curve of `scores` (higher = more likely positive):
/// `P(s+ > s-) + P(s+ = s-) / 2`, by the Mann-Whitney rank sum with mid-ranks for ties.
/// `None` when one class is absent. Pairs beyond the shorter slice are ignored.
pub fn auroc<L: Label>(scores: &[f32], labels: &[L]) -> Option<f64> {
    let mut idx: Vec<usize> = (0..scores.len().min(labels.len())).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let (mut rank_sum, mut npos) = (0f64, 0usize);
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let mid = (i + j) as f64 / 2.0 + 1.0; // 1-based mid-rank of the tie group
        for &k in &idx[i..=j] {
            if labels[k].positive() {
                rank_sum += mid;
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

/// Percentile-bootstrap 95% interval of [`auroc`], resampling `groups` (items of one group move
/// together, e.g. the two answers of one question). `None` without groups or resamples.
pub fn bootstrap_auroc_ci<L: Label>(
    scores: &[f32],
    labels: &[L],
    groups: &[u32],
    resamples: usize,
    seed: u64,
) -> Option<(f64, f64)> {
    let mut by_group: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for (i, g) in groups
        .iter()
        .enumerate()
        .take(scores.len().min(labels.len()))
    {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_known_values() {
        assert_eq!(
            auroc(&[0.1, 0.2, 0.8, 0.9], &[0.0f32, 0.0, 1.0, 1.0]),
            Some(1.0)
        );
        assert_eq!(
            auroc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]),
            Some(0.0)
        );
        // One tie between a positive and a negative: 3 wins + 0.5 of 4 pairs.
        assert_eq!(auroc(&[0.1, 0.5, 0.5, 0.9], &[0u8, 0, 1, 1]), Some(0.875));
        assert_eq!(auroc(&[0.5, 0.5, 0.5, 0.5], &[0u8, 1, 0, 1]), Some(0.5));
        assert_eq!(auroc(&[0.1, 0.2], &[1.0f32, 1.0]), None);
    }

    #[test]
    fn bootstrap_interval_brackets_the_estimate() {
        let scores: Vec<f32> = (0..200)
            .map(|i| (i % 17) as f32 + (i % 2) as f32 * 4.0)
            .collect();
        let labels: Vec<bool> = (0..200).map(|i| i % 2 == 1).collect();
        let groups: Vec<u32> = (0..200).map(|i| i / 2).collect();
        let a = auroc(&scores, &labels).unwrap();
        let (lo, hi) = bootstrap_auroc_ci(&scores, &labels, &groups, 300, 1).unwrap();
        assert!(lo <= a && a <= hi && hi - lo < 0.3, "{lo} {a} {hi}");
    }
}
