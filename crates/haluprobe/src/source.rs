//! Where models and data sets come from: cached assets by name, or paths; a loaded model with
//! what generation needs (tokenizer, stop ids) and a fingerprint of its weights.
use crate::error::{HaluError, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use umbra_assets::{Asset, Cache};
use umbra_model::checkpoint::Checkpoint;
use umbra_model::llama::Llama;
use umbra_model::tokenizer::TextTokenizer;
use umbra_model::{LlamaConfig, Weights};

/// A model path or name ([`umbra_model::resolve`]); a model asset missing from the cache is an
/// error naming the fetch command.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    Ok(umbra_model::resolve::resolve_model(
        spec,
        umbra_model::resolve::Fetch::No,
    )?)
}

/// The data sets known by name, with their format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataSet {
    HaluEvalQa,
    HaluEvalDialogue,
    HaluEvalSummarization,
    NqOpen,
    TriviaQa,
    WebQuestions,
    SquadOpen,
}

impl DataSet {
    pub const ALL: [DataSet; 7] = [
        DataSet::HaluEvalQa,
        DataSet::HaluEvalDialogue,
        DataSet::HaluEvalSummarization,
        DataSet::NqOpen,
        DataSet::TriviaQa,
        DataSet::WebQuestions,
        DataSet::SquadOpen,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DataSet::HaluEvalQa => "halueval-qa",
            DataSet::HaluEvalDialogue => "halueval-dialogue",
            DataSet::HaluEvalSummarization => "halueval-summarization",
            DataSet::NqOpen => "nq-open",
            DataSet::TriviaQa => "trivia-qa",
            DataSet::WebQuestions => "web-questions",
            DataSet::SquadOpen => "squad-open",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Its asset (`umbra fetch <name>`).
    pub fn asset(self) -> Asset {
        match self {
            DataSet::HaluEvalQa => Asset::HaluEvalQa,
            DataSet::HaluEvalDialogue => Asset::HaluEvalDialogue,
            DataSet::HaluEvalSummarization => Asset::HaluEvalSummarization,
            DataSet::NqOpen => Asset::NqOpen,
            DataSet::TriviaQa => Asset::TriviaQa,
            DataSet::WebQuestions => Asset::WebQuestions,
            DataSet::SquadOpen => Asset::SquadOpen,
        }
    }

    /// The cached file of this data set (fails with the fetch command when it is missing).
    pub fn path(self) -> Result<PathBuf> {
        Ok(Cache::from_env()?.require(self.asset())?)
    }
}

/// A data set name ([`DataSet`]) -> its cached file; anything else is a path.
pub fn resolve_data(spec: &str) -> Result<PathBuf> {
    if let Some(d) = DataSet::parse(spec) {
        return d.path();
    }
    let p = PathBuf::from(spec);
    if !p.is_file() {
        return Err(HaluError::Input(format!(
            "{spec}: no such data file (known data sets: {})",
            DataSet::ALL.map(|d| d.name()).join(", ")
        )));
    }
    Ok(p)
}

/// A loaded plaintext model with its tokenizer.
pub fn load_model(path: &Path) -> Result<(Llama, TextTokenizer)> {
    let m = LoadedModel::open(path)?;
    Ok((m.model, m.tokenizer))
}

/// A model loaded for generation: the engine, its tokenizer, the ids that end an answer and
/// the fingerprint of its weights.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub path: PathBuf,
    pub model: Llama,
    pub tokenizer: TextTokenizer,
    pub eos_ids: Vec<u32>,
    pub fingerprint: String,
}

impl LoadedModel {
    /// Loads an HF folder or GGUF file (it must have a tokenizer).
    pub fn open(path: &Path) -> Result<Self> {
        let ck = Checkpoint::open(path)?;
        let tokenizer = ck
            .tokenizer
            .clone()
            .ok_or_else(|| HaluError::Input(format!("{} has no tokenizer", path.display())))?;
        let model = Llama::new(&ck.config, &ck.weights, &candle_core::Device::Cpu)?;
        Ok(Self {
            path: path.to_path_buf(),
            eos_ids: ck.eos_token_ids(),
            fingerprint: model_fingerprint(&ck.config, &ck.weights)?,
            model,
            tokenizer,
        })
    }
}

/// A short fingerprint of a model: SHA-256 of its config and of a strided sample of every
/// tensor (name, shape, every 4,099th value), hex, first 16 characters. Two checkpoints that
/// differ in any tensor almost surely differ here; it costs milliseconds.
pub fn model_fingerprint(cfg: &LlamaConfig, weights: &Weights) -> Result<String> {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(cfg).map_err(|e| HaluError::Input(e.to_string()))?);
    for (name, t) in weights {
        h.update(name.as_bytes());
        for d in t.dims() {
            h.update((*d as u64).to_le_bytes());
        }
        let flat = t.flatten_all()?;
        let n = flat.elem_count();
        let idx: Vec<u32> = (0..n as u32).step_by(4099).collect();
        let ix = candle_core::Tensor::new(idx.as_slice(), flat.device())?;
        let v = flat
            .to_dtype(candle_core::DType::F32)?
            .index_select(&ix, 0)?
            .to_vec1::<f32>()?;
        for x in v {
            h.update(x.to_le_bytes());
        }
    }
    let d = h.finalize();
    Ok(d.iter().take(8).map(|b| format!("{b:02x}")).collect())
}

/// The client key's `tau` after checking it belongs to the obfuscated `model`.
pub fn token_map_for(model: &Path, key: Option<&Path>) -> Result<Option<Vec<u32>>> {
    let Some(key) = key else { return Ok(None) };
    let key = umbra_aloepri::ClientKey::load(key)?;
    umbra_aloepri::compiler::check_key_for(model, &key)?;
    Ok(Some(key.tau))
}
