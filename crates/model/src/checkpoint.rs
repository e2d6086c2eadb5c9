//! A whole checkpoint (config + F32 HF weights + tokenizer) from an HF folder or a `.gguf` file,
//! validated against the config, and written back as an HF folder atomically.
//!
//! ```no_run
//! # fn main() -> umbra_model::Result<()> {
//! use umbra_model::checkpoint::{convert_gguf_to_hf, Checkpoint};
//! let ck = Checkpoint::open("SmolLM2-135M-Instruct.Q4_1.gguf".as_ref())?;
//! ck.save_hf("out/smollm2".as_ref(), false)?; // config.json, model.safetensors, tokenizer.json, ...
//! # Ok(()) }
//! ```
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::tokenizer::TextTokenizer;
use crate::weights::{load_safetensors_dir, save_safetensors_atomic, write_file_atomic, Weights};
use std::path::{Path, PathBuf};

/// A loaded checkpoint. `weights` are F32 on the CPU, HF naming and layout, and match `config`
/// (see [`expected_shapes`]).
#[derive(Debug)]
pub struct Checkpoint {
    pub config: LlamaConfig,
    pub weights: Weights,
    pub tokenizer: Option<TextTokenizer>,
    /// The folder or `.gguf` file it was read from.
    pub source: PathBuf,
}

pub use crate::config::expected_shapes;

/// Checks `weights` against `cfg`: every expected tensor present ([`ModelError::MissingTensor`])
/// with its expected shape ([`ModelError::Mismatch`] naming tensor and both shapes), and no
/// unknown tensor ([`ModelError::Mismatch`]). A tied model may still carry an `lm_head.weight`
/// of the right shape.
pub fn validate_weights(cfg: &LlamaConfig, weights: &Weights) -> Result<()> {
    let expected = expected_shapes(cfg);
    for (name, shape) in &expected {
        let t = weights
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.clone()))?;
        if t.dims() != shape.as_slice() {
            return Err(ModelError::Mismatch(format!(
                "tensor `{name}` has shape {:?}, config expects {:?}",
                t.dims(),
                shape
            )));
        }
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    for (name, t) in weights {
        if known.contains(name.as_str()) {
            continue;
        }
        if name == "lm_head.weight" && cfg.tie_word_embeddings {
            let want = [cfg.vocab_size, cfg.hidden_size];
            if t.dims() != want {
                return Err(ModelError::Mismatch(format!(
                    "tensor `lm_head.weight` has shape {:?}, config expects {want:?}",
                    t.dims()
                )));
            }
            continue;
        }
        return Err(ModelError::Mismatch(format!(
            "unexpected tensor `{name}` {:?} for a {} model with {} layers",
            t.dims(),
            cfg.model_type,
            cfg.num_hidden_layers
        )));
    }
    Ok(())
}

/// Whether `path` is a GGUF file (by extension or magic).
pub fn is_gguf(path: &Path) -> bool {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return true;
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

/// The tokenizer of an HF folder: `None` when the folder has neither `tokenizer.json` nor
/// `tokenizer_config.json` (weights-only checkpoint); an error when only one is there.
fn hf_dir_tokenizer(dir: &Path) -> Result<Option<TextTokenizer>> {
    if !dir.join("tokenizer.json").exists() && !dir.join("tokenizer_config.json").exists() {
        return Ok(None);
    }
    TextTokenizer::from_hf_dir(dir).map(Some)
}

pub(crate) fn gguf_tokenizer(g: &GgufFile) -> Result<Option<TextTokenizer>> {
    if g.meta("tokenizer.ggml.model").is_none() {
        return Ok(None);
    }
    TextTokenizer::from_gguf(g).map(Some)
}

pub(crate) fn check_tokenizer(cfg: &LlamaConfig, tok: &Option<TextTokenizer>) -> Result<()> {
    if let Some(t) = tok {
        if let Some(max) = t.added_tokens().iter().map(|a| a.0).max() {
            if max as usize >= cfg.vocab_size {
                return Err(ModelError::Mismatch(format!(
                    "tokenizer has token id {max} but vocab_size is {}",
                    cfg.vocab_size
                )));
            }
        }
    }
    Ok(())
}

impl Checkpoint {
    /// Opens an HF folder (`config.json`, `model.safetensors[.index.json]`, tokenizer files) or a
    /// `.gguf` file, and validates the weights against the config ([`validate_weights`]).
    pub fn open(path: &Path) -> Result<Self> {
        let (config, weights, tokenizer) = if path.is_dir() {
            let config = read_hf_config(path)?;
            let tokenizer = hf_dir_tokenizer(path)?;
            let weights = load_safetensors_dir(path)?;
            (config, weights, tokenizer)
        } else if path.is_file() && is_gguf(path) {
            let g = GgufFile::open(path)?;
            let config = g.config()?;
            let tokenizer = gguf_tokenizer(&g)?;
            let weights = g.weights(&config)?;
            (config, weights, tokenizer)
        } else if !path.exists() {
            return Err(ModelError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            ));
        } else {
            return Err(ModelError::Malformed {
                path: path.into(),
                msg: "not an HF checkpoint folder nor a GGUF file".into(),
            });
        };
        validate_weights(&config, &weights)?;
        check_tokenizer(&config, &tokenizer)?;
        Ok(Self {
            config,
            weights,
            tokenizer,
            source: path.into(),
        })
    }

    /// Reads only the config and the tokenizer (no tensor data).
    pub fn open_config_and_tokenizer(path: &Path) -> Result<(LlamaConfig, Option<TextTokenizer>)> {
        let (config, tokenizer) = if path.is_dir() {
            (read_hf_config(path)?, hf_dir_tokenizer(path)?)
        } else if path.is_file() && is_gguf(path) {
            let g = GgufFile::open(path)?;
            (g.config()?, gguf_tokenizer(&g)?)
        } else {
            return Err(ModelError::Malformed {
                path: path.into(),
                msg: "not an HF checkpoint folder nor a GGUF file".into(),
            });
        };
        check_tokenizer(&config, &tokenizer)?;
        Ok((config, tokenizer))
    }

    /// EOS ids: the config's, else the tokenizer's.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        eos_token_ids(&self.config, self.tokenizer.as_ref())
    }

    /// `generation_config.json` content (bos/eos/pad ids).
    pub fn generation_config_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        let bos = self.config.bos_token_ids();
        let bos = if bos.is_empty() {
            self.tokenizer
                .as_ref()
                .and_then(|t| t.bos_id())
                .into_iter()
                .collect()
        } else {
            bos
        };
        if let Some(b) = bos.first() {
            m.insert("bos_token_id".into(), (*b).into());
        }
        let eos = self.eos_token_ids();
        match eos.len() {
            0 => {}
            1 => {
                m.insert("eos_token_id".into(), eos[0].into());
            }
            _ => {
                m.insert("eos_token_id".into(), eos.into());
            }
        }
        if let Some(p) = self
            .config
            .extra
            .get("pad_token_id")
            .cloned()
            .filter(|p| !p.is_null())
        {
            m.insert("pad_token_id".into(), p);
        } else if let Some(p) = self.tokenizer.as_ref().and_then(|t| t.pad_id()) {
            m.insert("pad_token_id".into(), p.into());
        }
        m.insert("_from_model_config".into(), true.into());
        serde_json::Value::Object(m)
    }

    /// Writes an HF folder: `config.json`, `model.safetensors` (F32), `tokenizer.json` +
    /// `tokenizer_config.json` (when there is a tokenizer) and `generation_config.json`.
    ///
    /// Atomic: everything is written into the sibling `.{name}.tmp-{pid}` folder, which is renamed
    /// to `out_dir` at the end and removed on any error. An existing non-empty `out_dir` is only
    /// replaced when `overwrite` is set. The weights are validated against the config first.
    pub fn save_hf(&self, out_dir: &Path, overwrite: bool) -> Result<()> {
        if out_dir.exists() {
            if !out_dir.is_dir() {
                return Err(ModelError::Input(format!(
                    "{} exists and is not a folder",
                    out_dir.display()
                )));
            }
            let non_empty = std::fs::read_dir(out_dir)
                .map_err(|e| ModelError::io(out_dir, e))?
                .next()
                .is_some();
            if non_empty && !overwrite {
                return Err(ModelError::Input(format!(
                    "{} exists and is not empty (set overwrite to replace it)",
                    out_dir.display()
                )));
            }
        }
        let name = out_dir
            .file_name()
            .ok_or_else(|| {
                ModelError::Input(format!(
                    "{}: output path has no folder name",
                    out_dir.display()
                ))
            })?
            .to_string_lossy()
            .into_owned();
        let parent = match out_dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| ModelError::io(&parent, e))?;
        let pid = std::process::id();
        let tmp = parent.join(format!(".{name}.tmp-{pid}"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
        if let Err(e) = self.write_into(&tmp) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let res = (|| -> Result<()> {
            if out_dir.exists() {
                let old = parent.join(format!(".{name}.old-{pid}"));
                std::fs::rename(out_dir, &old).map_err(|e| ModelError::io(out_dir, e))?;
                if let Err(e) = std::fs::rename(&tmp, out_dir) {
                    let _ = std::fs::rename(&old, out_dir);
                    return Err(ModelError::io(out_dir, e));
                }
                let _ = std::fs::remove_dir_all(&old);
            } else {
                std::fs::rename(&tmp, out_dir).map_err(|e| ModelError::io(out_dir, e))?;
            }
            crate::weights::sync_parent(out_dir);
            Ok(())
        })();
        if res.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        res
    }

    fn write_into(&self, dir: &Path) -> Result<()> {
        let mut cfg = self.config.clone();
        cfg.extra.insert("torch_dtype".into(), "float32".into());
        write_file_atomic(&dir.join("config.json"), cfg.to_json_string().as_bytes())?;
        validate_weights(&self.config, &self.weights)?;
        save_safetensors_atomic(&self.weights, &dir.join(crate::weights::SINGLE_FILE))?;
        if let Some(t) = &self.tokenizer {
            t.save_hf(dir)?;
        }
        let gen = serde_json::to_string_pretty(&self.generation_config_json()).expect("json");
        write_file_atomic(&dir.join("generation_config.json"), gen.as_bytes())?;
        Ok(())
    }
}

/// EOS ids: the config's, else the tokenizer's.
pub fn eos_token_ids(config: &LlamaConfig, tokenizer: Option<&TextTokenizer>) -> Vec<u32> {
    let ids = config.eos_token_ids();
    if !ids.is_empty() {
        return ids;
    }
    tokenizer.and_then(|t| t.eos_id()).into_iter().collect()
}

fn read_hf_config(dir: &Path) -> Result<LlamaConfig> {
    let p = dir.join("config.json");
    if !p.is_file() {
        return Err(ModelError::Malformed {
            path: dir.into(),
            msg: "no config.json".into(),
        });
    }
    LlamaConfig::from_file(&p)
}

/// Opens `src` (HF folder or `.gguf`) and writes it as an HF folder ([`Checkpoint::save_hf`]);
/// returns the opened checkpoint. On any error `out_dir` is left as it was.
pub fn convert_to_hf(src: &Path, out_dir: &Path, overwrite: bool) -> Result<Checkpoint> {
    let ck = Checkpoint::open(src)?;
    ck.save_hf(out_dir, overwrite)?;
    Ok(ck)
}

/// Opens a `.gguf` file and writes it as an HF folder ([`Checkpoint::save_hf`]); returns the
/// opened checkpoint.
pub fn convert_gguf_to_hf(gguf: &Path, out_dir: &Path, overwrite: bool) -> Result<Checkpoint> {
    if !gguf.is_file() || !is_gguf(gguf) {
        return Err(ModelError::Input(format!(
            "{} is not a GGUF file",
            gguf.display()
        )));
    }
    convert_to_hf(gguf, out_dir, overwrite)
}
