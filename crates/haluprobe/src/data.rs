//! HaluEval QA as a balanced binary task, and row-level splits.
//!
//! Each JSONL row (`knowledge`, `question`, `right_answer`, `hallucinated_answer`) yields two
//! triples that share the prompt: the faithful one (label 0) and the hallucinated one (label 1).
//! Splits are by row, so the two answers to one question never land on different sides.
use crate::error::{HaluError, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::Path;

/// One HaluEval QA row.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct QaRow {
    pub knowledge: String,
    pub question: String,
    pub right_answer: String,
    pub hallucinated_answer: String,
}

/// Reads HaluEval QA JSONL; every non-blank line must be a row with the four non-empty fields.
pub fn load_halueval_qa(path: &Path) -> Result<Vec<QaRow>> {
    let text = std::fs::read_to_string(path).map_err(|e| HaluError::io(path, e))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: QaRow = serde_json::from_str(line).map_err(|e| HaluError::Malformed {
            path: path.into(),
            what: "HaluEval QA JSONL",
            msg: format!("line {}: {e}", i + 1),
        })?;
        if row.question.trim().is_empty()
            || row.right_answer.trim().is_empty()
            || row.hallucinated_answer.trim().is_empty()
        {
            return Err(HaluError::Malformed {
                path: path.into(),
                what: "HaluEval QA JSONL",
                msg: format!("line {}: empty question or answer", i + 1),
            });
        }
        rows.push(row);
    }
    if rows.is_empty() {
        return Err(HaluError::Empty(format!("{} has no rows", path.display())));
    }
    Ok(rows)
}

/// A seeded permutation of `0..n` (the order in which rows are extracted).
pub fn shuffled_indices(n: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    idx
}

/// Train / validation / test membership of row ids.
#[derive(Debug, Clone, PartialEq, Eq, Copy)]
pub enum Split {
    Train,
    Val,
    Test,
}

/// Assigns each distinct row id to a split by a seeded hash-free shuffle: fractions `val` and
/// `test` of the rows go to validation and test (at least one row each when there are >= 3
/// rows), the rest to training. Deterministic in (`row_ids` as a set, `seed`).
pub fn split_rows(
    row_ids: &[u32],
    val: f64,
    test: f64,
    seed: u64,
) -> Result<std::collections::HashMap<u32, Split>> {
    let mut uniq: Vec<u32> = row_ids.to_vec();
    uniq.sort_unstable();
    uniq.dedup();
    if uniq.len() < 3 {
        return Err(HaluError::Empty(format!(
            "need at least 3 distinct rows to split train/val/test, got {}",
            uniq.len()
        )));
    }
    if !(0.0..1.0).contains(&val) || !(0.0..1.0).contains(&test) || val + test >= 1.0 {
        return Err(HaluError::Input(format!(
            "split fractions val={val} test={test} must be in [0,1) and sum below 1"
        )));
    }
    uniq.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let n = uniq.len();
    let n_test = ((n as f64 * test).round() as usize).clamp(1, n - 2);
    let n_val = ((n as f64 * val).round() as usize).clamp(1, n - 1 - n_test);
    Ok(uniq
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let s = if i < n_test {
                Split::Test
            } else if i < n_test + n_val {
                Split::Val
            } else {
                Split::Train
            };
            (r, s)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_by_row_and_covers_all() {
        let rows: Vec<u32> = (0..100).flat_map(|r| [r, r]).collect();
        let s = split_rows(&rows, 0.2, 0.2, 7).unwrap();
        assert_eq!(s.len(), 100);
        let test = s.values().filter(|&&x| x == Split::Test).count();
        let val = s.values().filter(|&&x| x == Split::Val).count();
        assert_eq!((test, val), (20, 20));
        assert_ne!(split_rows(&rows, 0.2, 0.2, 8).unwrap(), s);
    }

    #[test]
    fn bad_jsonl_and_empty_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.jsonl");
        std::fs::write(&p, "").unwrap();
        assert!(matches!(load_halueval_qa(&p), Err(HaluError::Empty(_))));
        std::fs::write(&p, "{\"knowledge\": 1}\n").unwrap();
        let e = load_halueval_qa(&p).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        assert!(split_rows(&[1, 2], 0.2, 0.2, 0).is_err());
    }
}
