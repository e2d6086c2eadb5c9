//! The one error type of `umbra-r3elu`.
use std::path::PathBuf;

/// Errors of the R3eLU split-learning crate; bad input ends here, never in a panic.
#[derive(Debug, thiserror::Error)]
pub enum R3Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("dataset: {0}")]
    Data(String),
    #[error("config: {0}")]
    Config(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error(transparent)]
    Vfl(#[from] umbra_vfl::VflError),
    #[error("asset: {0}")]
    Asset(#[from] umbra_assets::AssetError),
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Common(#[from] umbra_common::Error),
}

impl R3Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        R3Error::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, R3Error>;
