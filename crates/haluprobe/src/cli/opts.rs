//! Options shared by several `umbra halluc` commands.
use crate::eval::EvalConfig;
use crate::features::{ExtractConfig, Layout};
use crate::probe::ProbeKind;

/// Extraction settings shared by `generate`, `extract`, `score` and `bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExtractOpts {
    /// Context tokens kept per prompt (knowledge passage, document; the rest is cut to keep
    /// sequences short).
    #[arg(long, default_value_t = 96)]
    pub max_knowledge_tokens: usize,
    /// Query tokens kept (question; a dialogue keeps its most recent tokens).
    #[arg(long, default_value_t = 64)]
    pub max_question_tokens: usize,
    /// Answer tokens kept (own answers: the generation limit).
    #[arg(long, default_value_t = 32)]
    pub max_answer_tokens: usize,
    /// Sliding-window length for the `window` token selection.
    #[arg(long, default_value_t = 4)]
    pub window: usize,
}

impl ExtractOpts {
    pub fn config(&self, layout: Layout) -> ExtractConfig {
        ExtractConfig {
            max_knowledge_tokens: self.max_knowledge_tokens,
            max_question_tokens: self.max_question_tokens,
            max_answer_tokens: self.max_answer_tokens,
            window: self.window,
            layout,
        }
    }
}

/// Evaluation settings shared by `train`, `report` and `transfer`.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalOpts {
    /// Fraction of questions held out for validation (selection, thresholds).
    #[arg(long, default_value_t = 0.2)]
    pub val: f64,
    /// Fraction of questions held out for the final test.
    #[arg(long, default_value_t = 0.2)]
    pub test: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Bootstrap resamples (over test questions) for the 95% intervals.
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    /// Choose the best probe among the inputs `umbra serve --halluc-probe` computes (hidden
    /// states, logit and LLM-Check features).
    #[arg(long)]
    pub serving: bool,
}

impl EvalOpts {
    pub fn config(&self, kind: ProbeKind) -> EvalConfig {
        EvalConfig {
            val: self.val,
            test: self.test,
            seed: self.seed,
            bootstrap: self.bootstrap,
            kind,
            serving: self.serving,
            ..EvalConfig::default()
        }
    }
}
