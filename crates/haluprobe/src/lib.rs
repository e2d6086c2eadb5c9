//! `umbra-haluprobe`: hallucination detection from a model's internal states (HaluProbe,
//! arXiv 2502.13490) on our engine's taps.
//!
//! Pipeline:
//! - given answers: [`data`] (HaluEval QA, dialogue, summarization rows -> faithful /
//!   hallucinated triples, row splits) -> [`features`] (one teacher-forced tapped pass, laid out
//!   by [`prompt`]) -> [`extract`] -> [`store`] (resumable chunked safetensors);
//! - own answers: [`opendomain`] / [`data`] (questions with gold aliases) -> [`own`] (resumable
//!   job) -> [`generation`] (batched greedy generation whose taps, reduced by [`online`], are
//!   the features; `K` samples) -> [`labels`] (alias match, token F1, sample consistency) ->
//!   [`store`] + [`answers`];
//! - probes: [`probe`] (logistic regression / MLP on candle), [`eval`] (AUROC grid, baselines,
//!   best probe), [`transfer`] (train on one task, test on the others), [`report`];
//! - use: [`score`] (score an answer with a probe file), [`online`] (the features `umbra serve`
//!   collects while it generates), [`obfuscated`] (move a probe under an AloePri key).
//!
//! Feature keys and their shapes: [`keys`]; reductions: [`ffn_stats`], [`llmcheck`]. Models and
//! data sets by name: [`source`]. The `umbra halluc` commands are [`cli`] (feature `cli`).
pub mod answers;
pub mod bench;
#[cfg(feature = "cli")]
pub mod cli;
pub mod data;
pub mod error;
pub mod eval;
pub mod extract;
pub mod features;
pub mod ffn_stats;
pub mod generation;
pub mod keys;
pub mod labels;
pub mod llmcheck;
pub mod metrics;
pub mod obfuscated;
pub mod online;
pub mod opendomain;
pub mod own;
pub mod probe;
pub mod prompt;
pub mod report;
pub mod score;
pub mod source;
pub mod store;
pub mod transfer;

pub use error::{HaluError, Result};
