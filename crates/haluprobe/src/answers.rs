//! The answers of an own-answer folder, one JSON object per question in
//! `answers-NNNNN.jsonl` beside the chunk of features it belongs to.
use crate::error::{HaluError, Result};
use std::path::Path;

/// One question, the model's greedy answer, and its judgement.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AnswerRecord {
    /// Index of the question in the data set (the `row` of its triple).
    pub row: u32,
    pub question: String,
    pub aliases: Vec<String>,
    /// Prompt length in tokens (the prompt text is [`crate::prompt::own_prompt`] of the question).
    pub prompt_tokens: usize,
    /// The greedy answer (special tokens skipped) and its ids.
    pub answer: String,
    pub answer_ids: Vec<u32>,
    /// Ended on a stop id (else on the token limit).
    pub stopped: bool,
    /// Some alias is contained in the answer ([`crate::labels::judge`]).
    pub correct: bool,
    /// Best token F1 over the aliases.
    pub f1: f64,
    /// Whether the answer has a triple in the chunk (empty answers have none).
    pub has_features: bool,
    /// Sampled answers (sampling baseline) and the greedy answer's consistency with them
    /// ([`crate::keys::SAMPLING_NAMES`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<[f32; 3]>,
}

impl AnswerRecord {
    /// 1 = hallucinated, 0 = correct.
    pub fn label(&self) -> f32 {
        if self.correct {
            0.0
        } else {
            1.0
        }
    }
}

/// Writes `records` as JSONL, atomically.
pub fn write_answers(path: &Path, records: &[AnswerRecord]) -> Result<()> {
    let mut text = String::new();
    for r in records {
        text += &serde_json::to_string(r).map_err(|e| HaluError::Input(e.to_string()))?;
        text.push('\n');
    }
    Ok(umbra_common::fs::write_atomic(path, text.as_bytes())?)
}

/// Reads an answers file; a malformed line is an error with its line number.
pub fn read_answers(path: &Path) -> Result<Vec<AnswerRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| HaluError::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| HaluError::Malformed {
                path: path.into(),
                what: "answers JSONL",
                msg: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}
