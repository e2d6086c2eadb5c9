//! Errors of the obfuscation crate.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AloeError {
    #[error(transparent)]
    Model(#[from] umbra_model::ModelError),
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
    #[error("invalid obfuscation parameters: {0}")]
    Params(String),
    #[error("{path}: invalid key file: {msg}")]
    KeyFile { path: PathBuf, msg: String },
    #[error("key does not match this checkpoint: key fingerprint {key}, checkpoint expects {checkpoint}")]
    KeyMismatch { key: String, checkpoint: String },
    #[error("{0} is not an Umbra-obfuscated checkpoint (config.json has no `umbra` section)")]
    NotObfuscated(PathBuf),
    #[error("output {0} already exists; remove it or choose another --out")]
    OutputExists(PathBuf),
    #[error("linear algebra: {0}")]
    Linalg(String),
    #[error("{0}")]
    Input(String),
    /// A failure of a step another crate plugs into a command (e.g. the HaluProbe transform of
    /// `umbra obfuscate --halluc-probe`).
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

impl AloeError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, AloeError>;
