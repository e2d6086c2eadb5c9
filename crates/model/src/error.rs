//! One error type for the model crate.
use std::path::PathBuf;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid config.json: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("unsupported architecture `{0}` (supported: Llama, Mistral, Qwen2, SmolLM)")]
    UnsupportedArch(String),
    #[error("{path}: malformed checkpoint: {msg}")]
    Malformed { path: PathBuf, msg: String },
    #[error("config does not match weights: {0}")]
    Mismatch(String),
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("gguf: {0}")]
    Gguf(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, ModelError>;
