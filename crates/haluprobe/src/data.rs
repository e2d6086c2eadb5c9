//! HaluEval's given-answer tasks (QA, dialogue, summarization) as balanced binary tasks, HaluEval
//! QA as own-answer questions, and row-level splits.
//!
//! Each JSONL row yields two triples that share the prompt: the faithful one (label 0) and the
//! hallucinated one (label 1). Splits are by row, so the two answers to one question never land
//! on different sides.
use crate::error::{HaluError, Result};
use crate::keys::Layout;
use crate::opendomain::QaItem;
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
    Ok(load_given(GivenTask::Qa, path)?
        .into_iter()
        .map(|r| QaRow {
            knowledge: r.context.unwrap_or_default(),
            question: r.query,
            right_answer: r.right,
            hallucinated_answer: r.hallucinated,
        })
        .collect())
}

/// HaluEval QA rows as own-answer questions: the knowledge passage goes into the prompt and
/// the right answer is the one gold alias.
pub fn halueval_qa_items(rows: &[QaRow]) -> Vec<QaItem> {
    rows.iter()
        .map(|r| QaItem {
            question: r.question.clone(),
            aliases: vec![r.right_answer.clone()],
            knowledge: Some(r.knowledge.clone()),
        })
        .collect()
}

/// A HaluEval task with a given faithful and a given hallucinated answer per row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GivenTask {
    /// `knowledge`, `question`, `right_answer`, `hallucinated_answer`.
    Qa,
    /// `knowledge`, `dialogue_history`, `right_response`, `hallucinated_response`.
    Dialogue,
    /// `document`, `right_summary`, `hallucinated_summary` (CNN/DailyMail articles).
    Summarization,
}

impl GivenTask {
    /// `halueval-qa`, `halueval-dialogue`, `halueval-summarization`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "halueval-qa" => Some(Self::Qa),
            "halueval-dialogue" => Some(Self::Dialogue),
            "halueval-summarization" => Some(Self::Summarization),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Qa => "halueval-qa",
            Self::Dialogue => "halueval-dialogue",
            Self::Summarization => "halueval-summarization",
        }
    }

    /// The prompt layout of its triples.
    pub fn layout(self) -> Layout {
        match self {
            Self::Qa => Layout::Qa,
            Self::Dialogue => Layout::Dialogue,
            Self::Summarization => Layout::Summarization,
        }
    }

    /// JSONL fields: (context, query or none, right answer, hallucinated answer).
    fn fields(
        self,
    ) -> (
        &'static str,
        Option<&'static str>,
        &'static str,
        &'static str,
    ) {
        match self {
            Self::Qa => (
                "knowledge",
                Some("question"),
                "right_answer",
                "hallucinated_answer",
            ),
            Self::Dialogue => (
                "knowledge",
                Some("dialogue_history"),
                "right_response",
                "hallucinated_response",
            ),
            Self::Summarization => ("document", None, "right_summary", "hallucinated_summary"),
        }
    }
}

/// One given-answer row of any HaluEval task.
#[derive(Debug, Clone, PartialEq)]
pub struct GivenRow {
    /// Knowledge passage or document.
    pub context: Option<String>,
    /// Question or dialogue history (empty for summarization).
    pub query: String,
    pub right: String,
    pub hallucinated: String,
}

/// Reads a HaluEval JSONL file of `task`; every non-blank line must be an object with the
/// task's fields, all strings, the answers and the query (where there is one) non-empty.
pub fn load_given(task: GivenTask, path: &Path) -> Result<Vec<GivenRow>> {
    let text = std::fs::read_to_string(path).map_err(|e| HaluError::io(path, e))?;
    let what = match task {
        GivenTask::Qa => "HaluEval QA JSONL",
        GivenTask::Dialogue => "HaluEval dialogue JSONL",
        GivenTask::Summarization => "HaluEval summarization JSONL",
    };
    let bad = |line: usize, msg: String| HaluError::Malformed {
        path: path.into(),
        what,
        msg: format!("line {line}: {msg}"),
    };
    let (ctx, query, right, halu) = task.fields();
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(i + 1, e.to_string()))?;
        let field = |name: &str| -> Result<String> {
            v.get(name)
                .and_then(|x| x.as_str())
                .map(str::to_string)
                .ok_or_else(|| bad(i + 1, format!("missing or non-string field `{name}`")))
        };
        let row = GivenRow {
            context: Some(field(ctx)?).filter(|c| !c.trim().is_empty()),
            query: match query {
                Some(q) => field(q)?,
                None => String::new(),
            },
            right: field(right)?,
            hallucinated: field(halu)?,
        };
        if (query.is_some() && row.query.trim().is_empty())
            || row.right.trim().is_empty()
            || row.hallucinated.trim().is_empty()
        {
            return Err(bad(i + 1, "empty question or answer".into()));
        }
        if query.is_none() && row.context.is_none() {
            return Err(bad(i + 1, format!("empty `{ctx}`")));
        }
        rows.push(row);
    }
    if rows.is_empty() {
        return Err(HaluError::Empty(format!("{} has no rows", path.display())));
    }
    Ok(rows)
}

impl From<&QaRow> for GivenRow {
    fn from(r: &QaRow) -> Self {
        Self {
            context: Some(r.knowledge.clone()).filter(|c| !c.trim().is_empty()),
            query: r.question.clone(),
            right: r.right_answer.clone(),
            hallucinated: r.hallucinated_answer.clone(),
        }
    }
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
        // Dialogue and summarization rows; a broken line names its number.
        std::fs::write(
            &p,
            "{\"knowledge\": \"k\", \"dialogue_history\": \"[Human]: hi\", \"right_response\": \"a\", \"hallucinated_response\": \"b\"}\n\n{\"knowledge\": \"k\"}\n",
        )
        .unwrap();
        let e = load_given(GivenTask::Dialogue, &p).unwrap_err().to_string();
        assert!(
            e.contains("line 3") && e.contains("dialogue_history"),
            "{e}"
        );
        std::fs::write(
            &p,
            "{\"document\": \"d\", \"right_summary\": \"a\", \"hallucinated_summary\": \"b\"}\n",
        )
        .unwrap();
        let rows = load_given(GivenTask::Summarization, &p).unwrap();
        assert_eq!(
            (rows[0].context.as_deref(), rows[0].query.as_str()),
            (Some("d"), "")
        );
    }
}
