//! The one error type of `umbra-sap`.
use std::path::PathBuf;

/// Errors of `umbra-sap`. Bad user input and bad peer messages end here, never in a panic.
#[derive(Debug, thiserror::Error)]
pub enum SapError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("dataset: {0}")]
    Data(String),
    #[error("model: {0}")]
    Model(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("asset: {0}")]
    Asset(#[from] umbra_assets::AssetError),
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("config: {0}")]
    Config(String),
    #[error("rejected message: {0}")]
    Message(String),
    #[error("transport: {0}")]
    Transport(#[from] umbra_vfl::VflError),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Common(#[from] umbra_common::Error),
}

impl SapError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SapError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, SapError>;
