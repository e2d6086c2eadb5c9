//! Feature keys, their shapes and stages, and the extraction settings every feature folder and
//! probe file records.
//!
//! Feature families and keys (`L` layers, `d` hidden size, `H` heads); `Layer(i)` taps are the
//! residual stream after block `i`:
//! - `hidden.understanding.mean` `[L,d]`: mean over prompt tokens;
//! - `hidden.query.mean` `[L,d]`: mean of the two boundary tokens;
//! - `hidden.generation.{last,mean,window}` `[L,d]`: last answer token, mean over answer tokens,
//!   mean over the sliding window of the last `window` positions ending at the last answer token;
//! - `lookback.query` / `lookback.generation.mean` `[L,H]`: Lookback-Lens ratio
//!   `LR = a_ctx / (a_ctx + a_new)` where `a_ctx` is the mean attention of an answer position on
//!   the prompt tokens and `a_new` its mean attention on answer tokens up to itself; at the first
//!   answer token, and averaged over all answer tokens;
//! - `logit.generation` `[8]`: log-prob of the first answer token, mean / min / sum of the answer
//!   log-probs (mean = -log perplexity), mean / max / first-token entropy of the next-token
//!   distribution, and the answer length in tokens;
//! - `llmcheck.generation` `[L]`: LLM-Check hidden score, mean of `log λ_i` over the non-zero
//!   eigenvalues of `Z_c Z_c^T / d`, `Z_c` = centered hidden states of the last prompt token and
//!   the answer tokens (`n+1` rows);
//! - `ffn.understanding.mean`, `ffn.query.mean`, `ffn.generation.{last,mean}` `[L, 7]`: FFN
//!   activation statistics. For every token and layer, the SwiGLU activation
//!   `a = silu(gate(h)) ⊙ up(h)` (`F = intermediate_size` values, the input of `down_proj`,
//!   [`TapPoint::Ffn`]) is reduced to [`FFN_STAT_NAMES`]: mean `μ = Σa/F`, standard deviation
//!   `σ = sqrt(Σ(a-μ)²/F)`, mean `|a|`, max `|a|`, the share of neurons with
//!   `|a| > `[`FFN_ACTIVE_THRESHOLD`], the share with `a > 0`, and the kurtosis
//!   `Σ(a-μ)⁴/F / σ⁴` (0 when `σ = 0`); the stage rows are then the mean of these per-token
//!   vectors over the prompt tokens / the two boundary tokens / the answer tokens, or the last
//!   answer token's vector. Moments are accumulated in f64.
//! - `sampling.generation` `[3]` (own-answer folders with `--samples K`, not a probe input): the
//!   consistency of the greedy answer with `K` answers sampled at temperature 1 from the same
//!   prompt (SelfCheckGPT-style, black box): mean unigram F1 between the normalized greedy answer
//!   and each sample (`lexical_overlap`), the share of samples equal to it after normalization
//!   (`exact_agreement`), and the share of distinct normalized samples (`distinct_share`).
use std::collections::BTreeMap;

/// Which part of the forward pass a feature comes from.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Understanding,
    Query,
    Generation,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Understanding => "understanding",
            Stage::Query => "query",
            Stage::Generation => "generation",
        }
    }
}

/// How a (context, query, answer) triple is written as a prompt for teacher-forced extraction
/// (the encoding is [`Layout::encode_prompt`] in [`crate::prompt`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// `Knowledge: K\nQuestion: Q\nAnswer: A` (HaluEval QA).
    #[default]
    Qa,
    /// `Knowledge: K\nDialogue: H\nResponse: R` (HaluEval dialogue).
    Dialogue,
    /// `Document: D\nSummary: S` (HaluEval summarization; no query).
    Summarization,
}

impl Layout {
    /// `(context label, query label, answer cue)`; no query label for summarization.
    pub fn labels(self) -> (&'static str, Option<&'static str>, &'static str) {
        match self {
            Layout::Qa => ("Knowledge: ", Some("Question: "), "\nAnswer:"),
            Layout::Dialogue => ("Knowledge: ", Some("Dialogue: "), "\nResponse:"),
            Layout::Summarization => ("Document: ", None, "\nSummary:"),
        }
    }
}

/// Extraction settings; stored in the feature manifest and in every probe file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExtractConfig {
    /// Context (knowledge, document) tokens kept (the rest is cut) to keep sequences short.
    pub max_knowledge_tokens: usize,
    /// Query (question, dialogue history) tokens kept; a dialogue keeps its last tokens.
    pub max_question_tokens: usize,
    pub max_answer_tokens: usize,
    /// Sliding-window length for `hidden.generation.window`.
    pub window: usize,
    /// Prompt layout of given answers (folders and probes older than it are QA).
    #[serde(default)]
    pub layout: Layout,
}

impl Default for ExtractConfig {
    fn default() -> Self {
        Self {
            max_knowledge_tokens: 96,
            max_question_tokens: 64,
            max_answer_tokens: 32,
            window: 4,
            layout: Layout::Qa,
        }
    }
}

/// Number of entries in `logit.generation`.
pub const LOGIT_FEATURES: usize = 8;
/// Names of the `logit.generation` entries, in order.
pub const LOGIT_NAMES: [&str; LOGIT_FEATURES] = [
    "first_logprob",
    "mean_logprob",
    "min_logprob",
    "sum_logprob",
    "mean_entropy",
    "max_entropy",
    "first_entropy",
    "answer_tokens",
];

/// The hidden-state feature keys, with their stage.
pub const HIDDEN_KEYS: [(&str, Stage); 5] = [
    ("hidden.understanding.mean", Stage::Understanding),
    ("hidden.query.mean", Stage::Query),
    ("hidden.generation.last", Stage::Generation),
    ("hidden.generation.mean", Stage::Generation),
    ("hidden.generation.window", Stage::Generation),
];
/// The lookback-ratio keys, with their stage.
pub const LOOKBACK_KEYS: [(&str, Stage); 2] = [
    ("lookback.query", Stage::Query),
    ("lookback.generation.mean", Stage::Generation),
];
pub const LOGIT_KEY: &str = "logit.generation";
pub const LLMCHECK_KEY: &str = "llmcheck.generation";
/// The FFN-statistics keys (`[L, FFN_STATS]` each), with their stage.
pub const FFN_KEYS: [(&str, Stage); 4] = [
    ("ffn.understanding.mean", Stage::Understanding),
    ("ffn.query.mean", Stage::Query),
    ("ffn.generation.last", Stage::Generation),
    ("ffn.generation.mean", Stage::Generation),
];
/// Statistics per layer in the `ffn.*` keys.
pub const FFN_STATS: usize = 7;
/// Names of the per-layer FFN statistics, in order (see the module docs).
pub const FFN_STAT_NAMES: [&str; FFN_STATS] = [
    "mean",
    "std",
    "mean_abs",
    "max_abs",
    "active_frac",
    "positive_frac",
    "kurtosis",
];
/// `|a|` above which a neuron counts as active for `active_frac`.
pub const FFN_ACTIVE_THRESHOLD: f32 = 0.01;
/// Sampling-consistency scores of own-answer folders (`[SAMPLING_FEATURES]`; not a probe input).
pub const SAMPLING_KEY: &str = "sampling.generation";
pub const SAMPLING_FEATURES: usize = 3;
/// Names of the `sampling.generation` entries, in order.
pub const SAMPLING_NAMES: [&str; SAMPLING_FEATURES] =
    ["lexical_overlap", "exact_agreement", "distinct_share"];

/// The stage of a feature key (`family.stage[.selection]`).
pub fn key_stage(key: &str) -> Option<Stage> {
    match key.split('.').nth(1)? {
        "understanding" => Some(Stage::Understanding),
        "query" => Some(Stage::Query),
        "generation" => Some(Stage::Generation),
        _ => None,
    }
}

/// The per-triple shape of every key for a model with `l` layers, hidden `d`, `h` heads.
pub fn key_shapes(l: usize, d: usize, h: usize) -> BTreeMap<String, Vec<usize>> {
    let mut m = BTreeMap::new();
    for (k, _) in HIDDEN_KEYS {
        m.insert(k.to_string(), vec![l, d]);
    }
    for (k, _) in LOOKBACK_KEYS {
        m.insert(k.to_string(), vec![l, h]);
    }
    m.insert(LOGIT_KEY.to_string(), vec![LOGIT_FEATURES]);
    m.insert(LLMCHECK_KEY.to_string(), vec![l]);
    for (k, _) in FFN_KEYS {
        m.insert(k.to_string(), vec![l, FFN_STATS]);
    }
    m
}

/// Features of one triple: key -> flat row-major values of the shape in [`key_shapes`].
pub type Features = BTreeMap<String, Vec<f32>>;
