//! `umbra-haluprobe`: hallucination detection from a model's internal states (HaluProbe,
//! arXiv 2502.13490) on our engine's taps.
//!
//! Pipeline: [`data`] (HaluEval QA rows -> faithful/hallucinated triples, row splits) ->
//! [`features`] (one tapped forward pass -> hidden states, lookback ratios, FFN activation
//! statistics, logit and LLM-Check features per stage) -> [`store`] / [`extract`] (resumable chunked safetensors) ->
//! [`probe`] (logistic regression / MLP on candle) and [`eval`] (AUROC grid, baselines, best
//! probe) -> [`report`] (tables and a figure) -> [`score`] (score one answer with a probe file).
//! [`obfuscated`] moves a probe under an AloePri key, to score an obfuscated model's states.
pub mod bench;
pub mod cli;
pub mod data;
pub mod error;
pub mod eval;
pub mod extract;
pub mod features;
pub mod metrics;
pub mod obfuscated;
pub mod online;
pub mod probe;
pub mod report;
pub mod score;
pub mod store;

pub use error::{HaluError, Result};
