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
    #[error("plot: {0}")]
    Plot(String),
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

/// Writes `bytes` to `path` atomically (temp file in the same folder, then rename).
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| std::path::Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| SapError::io(dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| SapError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| SapError::io(path, e))
}
