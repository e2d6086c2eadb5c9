//! The command line of this crate (feature `cli`): `umbra obfuscate`, `umbra eval fidelity`,
//! `umbra demo` and `umbra bench llamacpp`. Each command is a clap [`clap::Args`] struct plus a
//! `run_*` function; the `umbra` binary only dispatches to them.
//!
//! Models are named by path (HF folder or GGUF file) or by asset name (`smollm2`, fetched and
//! converted on first use; other model assets of `umbra fetch` by their cached GGUF).
mod fidelity;
mod llamacpp;
mod obfuscate;

pub use fidelity::{run_demo, run_fidelity, DemoArgs, FidelityArgs};
pub use llamacpp::{run_llamacpp, LlamacppArgs};
pub use obfuscate::{run_obfuscate, NoHook, ObfuscateArgs, ObfuscateHook, ObfuscateOutcome};

use crate::error::{AloeError, Result};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use umbra_assets::{Asset, Cache};
use umbra_model::tokenizer::TextTokenizer;

/// A model path or name ([`umbra_model::resolve`]); a model asset missing from the cache is
/// fetched.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    Ok(umbra_model::resolve::resolve_model(
        spec,
        umbra_model::resolve::Fetch::Yes,
    )?)
}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> AloeError {
    AloeError::Other(Box::new(e))
}

/// Passages: lines of `corpus`, or the HaluEval QA `knowledge` fields from the asset cache.
pub fn load_passages(corpus: Option<&Path>, n: usize) -> Result<Vec<String>> {
    let path = match corpus {
        Some(p) => p.to_path_buf(),
        None => Cache::from_env()
            .and_then(|c| c.fetch(Asset::HaluEvalQa))
            .map_err(other)?,
    };
    let f = std::fs::File::open(&path).map_err(|e| AloeError::io(&path, e))?;
    let mut out = vec![];
    for line in std::io::BufReader::new(f).lines() {
        let line = line.map_err(|e| AloeError::io(&path, e))?;
        let text = if corpus.is_some() {
            line
        } else {
            let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| {
                AloeError::Input(format!("{}: malformed JSONL line ({e})", path.display()))
            })?;
            v["knowledge"].as_str().unwrap_or_default().to_string()
        };
        if !text.trim().is_empty() {
            out.push(text);
        }
        if out.len() == n {
            break;
        }
    }
    if out.is_empty() {
        return Err(AloeError::Input(format!("{}: no passages", path.display())));
    }
    Ok(out)
}

/// Plaintext ids of each passage, cut to `max_len` tokens (passages of fewer than 2 dropped).
pub fn tokenize_passages(
    tok: &TextTokenizer,
    texts: &[String],
    max_len: usize,
) -> Result<Vec<Vec<u32>>> {
    let mut out = vec![];
    for t in texts {
        let mut ids = tok.encode(t, false)?;
        ids.truncate(max_len);
        if ids.len() >= 2 {
            out.push(ids);
        }
    }
    Ok(out)
}

/// Writes `value` as JSON (atomically) when a path is given.
fn write_json_opt(path: Option<&Path>, value: &impl serde::Serialize) -> Result<()> {
    if let Some(p) = path {
        umbra_common::fs::write_json(p, value)?;
    }
    Ok(())
}

/// Peak resident memory of this process, MiB (0 where unknown).
fn peak_rss() -> f64 {
    umbra_common::mem::peak_rss_mib().unwrap_or(0.0)
}
