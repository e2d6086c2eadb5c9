//! Scoring one answer with a probe file: the API serving uses.
//!
//! ```no_run
//! # fn main() -> umbra_haluprobe::Result<()> {
//! use umbra_haluprobe::score::Scorer;
//! # let (model, tok) = umbra_haluprobe::source::load_model(std::path::Path::new("model"))?;
//! let scorer = Scorer::load(std::path::Path::new("probe.safetensors"), model.config())?;
//! let s = scorer.score(&model, &tok, Some("Paris is the capital of France."), "Capital of France?", "Paris")?;
//! println!("{} at the {} stage", s.score, s.stage.name());
//! # Ok(()) }
//! ```
use crate::error::Result;
use crate::features::Extractor;
use crate::keys::{Features, Stage};
use crate::probe::ProbeFile;
use std::path::Path;
use umbra_model::llama::Llama;
use umbra_model::tokenizer::TextTokenizer;

/// A probe's verdict on one answer.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Score {
    /// Probability that the answer is hallucinated.
    pub score: f32,
    /// The stage whose features the probe reads (the score is available after it).
    pub stage: Stage,
    pub threshold: f32,
    pub hallucinated: bool,
}

/// A probe checked against one model.
#[derive(Debug, Clone)]
pub struct Scorer {
    pub probe: ProbeFile,
}

impl Scorer {
    /// Loads a probe file and checks it matches `cfg` (layer count, hidden size, heads).
    pub fn load(path: &Path, cfg: &umbra_model::LlamaConfig) -> Result<Self> {
        let probe = ProbeFile::load(path)?;
        probe.check_model(cfg)?;
        Ok(Self { probe })
    }

    /// Wraps an in-memory probe after the same check.
    pub fn new(probe: ProbeFile, cfg: &umbra_model::LlamaConfig) -> Result<Self> {
        probe.check_model(cfg)?;
        Ok(Self { probe })
    }

    /// Score from already-extracted features (e.g. taps collected during serving).
    pub fn score_features(&self, f: &Features) -> Result<Score> {
        let score = self.probe.score(f)?;
        let threshold = self.probe.meta.threshold;
        Ok(Score {
            score,
            stage: self.probe.meta.stage,
            threshold,
            hallucinated: score >= threshold,
        })
    }

    /// Runs one tapped forward pass over (knowledge, question, answer) and scores it.
    pub fn score(
        &self,
        model: &Llama,
        tok: &TextTokenizer,
        knowledge: Option<&str>,
        question: &str,
        answer: &str,
    ) -> Result<Score> {
        self.score_mapped(model, tok, None, knowledge, question, answer)
    }

    /// [`Scorer::score`] on an obfuscated model: the tokenizer's ids are mapped through
    /// `token_map` (the client key's `tau`) before the forward pass, as the client sends them.
    pub fn score_mapped(
        &self,
        model: &Llama,
        tok: &TextTokenizer,
        token_map: Option<&[u32]>,
        knowledge: Option<&str>,
        question: &str,
        answer: &str,
    ) -> Result<Score> {
        self.probe.check_model(model.config())?;
        let ex = Extractor::new(model, tok, self.probe.meta.extract.clone());
        let f = ex.extract_mapped(knowledge, question, &[answer], token_map)?;
        let f = f
            .into_iter()
            .next()
            .ok_or_else(|| crate::HaluError::Input("extraction returned no features".into()))?;
        self.score_features(&f)
    }
}
