//! The one error type of the split-learning engine.
use std::path::PathBuf;

/// Errors of `umbra-vfl`. Anything a peer or a user can send ends here, never in a panic.
#[derive(Debug, thiserror::Error)]
pub enum VflError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {msg}")]
    Parse {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("dataset: {0}")]
    Data(String),
    #[error("asset: {0}")]
    Asset(#[from] umbra_assets::AssetError),
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("job config: {0}")]
    Config(String),
    #[error("rejected message: {0}")]
    Message(String),
    #[error("transport: {0}")]
    Transport(String),
    #[error("training: {0}")]
    Training(String),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Common(#[from] umbra_common::Error),
}

impl VflError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        VflError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, VflError>;
