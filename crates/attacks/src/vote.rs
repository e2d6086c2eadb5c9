//! Turning nearest-neighbour lists into a [`Recovery`], and rank voting across sources.
use crate::score::Recovery;

/// One source's ranked candidates: `lists[t]` for obfuscated id `t`.
pub fn from_lists(lists: &[Vec<(u32, f32)>]) -> Recovery {
    Recovery {
        candidates: lists
            .iter()
            .map(|l| l.iter().map(|&(i, _)| i).collect())
            .collect(),
    }
}

/// Borda-style vote: every source gives candidate `c` at rank `r` (of `k`) `k - r` points; the
/// combined ranking sorts by total points (ties: smaller id first).
pub fn vote(sources: &[Recovery], vocab: usize, k: usize) -> Recovery {
    let mut out = Recovery::new(vocab);
    for t in 0..vocab {
        let mut pts: Vec<(u32, usize)> = vec![];
        for s in sources {
            if let Some(c) = s.candidates.get(t) {
                for (r, &cand) in c.iter().take(k).enumerate() {
                    match pts.iter_mut().find(|p| p.0 == cand) {
                        Some(p) => p.1 += k - r,
                        None => pts.push((cand, k - r)),
                    }
                }
            }
        }
        pts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        out.candidates[t] = pts.into_iter().take(k).map(|p| p.0).collect();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majority_wins() {
        let a = Recovery {
            candidates: vec![vec![1, 2]],
        };
        let b = Recovery {
            candidates: vec![vec![2, 1]],
        };
        let c = Recovery {
            candidates: vec![vec![2, 0]],
        };
        assert_eq!(vote(&[a.clone(), b, c], 1, 2).best(0), Some(2));
        assert_eq!(vote(&[a], 1, 2).candidates[0], vec![1, 2]);
    }
}
