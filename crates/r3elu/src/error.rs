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
    #[error("plot: {0}")]
    Plot(String),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
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

/// Write `bytes` to `path` atomically (temp file in the same folder, then rename).
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| R3Error::io(dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(|e| R3Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| R3Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| R3Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| R3Error::io(path, e))
}
