//! Typed errors for HaluProbe; every message is one line that says what to fix.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum HaluError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: malformed {what}: {msg}")]
    Malformed {
        path: PathBuf,
        what: &'static str,
        msg: String,
    },
    #[error("empty data: {0}")]
    Empty(String),
    #[error("probe does not match the model: {0}")]
    ProbeMismatch(String),
    #[error("features do not match: {0}")]
    FeatureMismatch(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error(transparent)]
    Model(#[from] umbra_model::ModelError),
    #[error(transparent)]
    Aloe(#[from] umbra_aloepri::AloeError),
    #[error(transparent)]
    Asset(#[from] umbra_assets::AssetError),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Common(#[from] umbra_common::Error),
}

impl HaluError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, HaluError>;
