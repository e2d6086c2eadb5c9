//! Errors of the attack crate.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AttackError {
    #[error(transparent)]
    Model(#[from] umbra_model::ModelError),
    #[error(transparent)]
    Aloe(#[from] umbra_aloepri::AloeError),
    #[error(transparent)]
    Asset(#[from] umbra_assets::AssetError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Common(#[from] umbra_common::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Input(String),
}

impl AttackError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, AttackError>;
