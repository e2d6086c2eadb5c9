//! `umbra-common`: the small helpers every Umbra crate shares, written once.
//!
//! - [`fs`]: atomic writes, staging folders renamed into place, stale-leftover cleanup, file locks.
//! - [`metrics`]: AUROC (Mann-Whitney) and its bootstrap interval.
//! - [`progress`]: a progress handle that draws a bar only in the binary (feature `progress`).
//! - [`plot`]: SVG scatter/line figures (feature `plot`).
//! - [`seed`]: seeds from the OS for "no seed given".
//! - [`mem`]: peak resident memory.
pub mod fs;
pub mod mem;
pub mod metrics;
#[cfg(feature = "plot")]
pub mod plot;
pub mod progress;
pub mod seed;

use std::path::{Path, PathBuf};

/// Errors of the shared helpers; each crate wraps them in its own error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Input(String),
    #[error("figure: {0}")]
    Plot(String),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
