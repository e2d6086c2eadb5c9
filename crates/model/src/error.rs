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
    /// A GGUF tensor of a ggml type this crate does not read.
    #[error("tensor `{tensor}` has type {type_name}, which umbra does not read (supported: {supported})")]
    UnsupportedQuant {
        tensor: String,
        type_name: String,
        supported: String,
    },
    /// A file shorter than its own header says (a partial download or copy).
    #[error("{path}: truncated: {what} needs bytes up to {needed}, the file has {len}")]
    Truncated {
        path: PathBuf,
        what: String,
        needed: u64,
        len: u64,
    },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("invalid input: {0}")]
    Input(String),
    /// A command the model crate's commands run (a benchmark child, an asset lookup) failed.
    #[error("{cmd}: {msg}")]
    Command { cmd: String, msg: String },
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
