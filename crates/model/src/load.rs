//! Loading a model for the engine in the precision asked for (`--dtype`).
//!
//! ```no_run
//! # fn main() -> umbra_model::Result<()> {
//! use umbra_model::load::{load_model, WeightDtype};
//! let m = load_model("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf".as_ref(), WeightDtype::Auto,
//!                    &candle_core::Device::Cpu)?;
//! println!("{} ({})", m.dtype, m.weight_bytes);
//! # Ok(()) }
//! ```
//!
//! - [`WeightDtype::F32`]: [`Checkpoint::open`] (GGUF dequantized) and the F32 backend.
//! - [`WeightDtype::Auto`]: a GGUF keeps its quantized tensors as they are
//!   ([`GgufFile::quant_weights`]) and runs on [`QuantBackend`]; an HF folder runs in F32.
//! - [`WeightDtype::Quant`]: every matrix converted to that type at load, then [`QuantBackend`].
use crate::checkpoint::{check_tokenizer, eos_token_ids, gguf_tokenizer, is_gguf, Checkpoint};
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::llama::Llama;
use crate::quant::backend::storable_type;
use crate::quant::{QMatrix, QuantBackend, QuantType, QuantWeights};
use crate::tokenizer::TextTokenizer;
use crate::weights::Weights;
use candle_core::Device;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use crate::quant::WeightDtype;

/// A model loaded for the engine, with what came with it.
#[derive(Debug)]
pub struct LoadedModel {
    pub model: Llama,
    pub config: LlamaConfig,
    pub tokenizer: Option<TextTokenizer>,
    pub eos_token_ids: Vec<u32>,
    pub source: PathBuf,
    /// What the weights are held as: `f32`, or the quantized types and how many matrices of
    /// each (`q4_k x169, q6_k x29`).
    pub dtype: String,
    /// Bytes of the linear maps' and embedding's weights as held in memory.
    pub weight_bytes: usize,
}

/// Loads a whole model (not a split-mode part) from an HF folder or a GGUF file in `dtype`.
pub fn load_model(path: &Path, dtype: WeightDtype, device: &Device) -> Result<LoadedModel> {
    let gguf = path.is_file() && is_gguf(path);
    if dtype.is_dense_f32(gguf) {
        let ck = Checkpoint::open(path)?;
        let model = Llama::new(&ck.config, &ck.weights, device)?;
        let weight_bytes = ck
            .weights
            .values()
            .filter(|t| t.rank() == 2)
            .map(|t| t.elem_count() * 4)
            .sum();
        return Ok(LoadedModel {
            model,
            eos_token_ids: ck.eos_token_ids(),
            config: ck.config,
            tokenizer: ck.tokenizer,
            source: path.into(),
            dtype: "f32".into(),
            weight_bytes,
        });
    }
    let (config, tokenizer, dense, quant) = if gguf {
        let g = GgufFile::open(path)?;
        let config = g.config()?;
        let tokenizer = gguf_tokenizer(&g)?;
        check_tokenizer(&config, &tokenizer)?;
        let (dense, quant) = g.quant_weights(&config, dtype)?;
        (config, tokenizer, dense, quant)
    } else {
        let WeightDtype::Quant(q) = dtype else {
            unreachable!("auto on an HF folder loads F32 above")
        };
        let ck = Checkpoint::open(path)?;
        let (dense, quant) = quantize_weights(ck.weights, q)?;
        (ck.config, ck.tokenizer, dense, quant)
    };
    if config.part() != crate::config::ModelPart::Full {
        return Err(ModelError::Unsupported(format!(
            "{} is the {} part of a split-mode model; the quantized engine loads whole models",
            path.display(),
            config.part().as_str()
        )));
    }
    let backend = QuantBackend::new(&quant, &dense, device);
    let model = Llama::with_backend(&config, &dense, device, &backend)?;
    let mut counts: BTreeMap<QuantType, usize> = BTreeMap::new();
    for m in quant.values() {
        *counts.entry(m.ty()).or_default() += 1;
    }
    let dense_matrices = dense.values().filter(|t| t.rank() == 2).count();
    let mut parts: Vec<String> = counts
        .iter()
        .map(|(t, n)| format!("{} x{n}", t.name().to_ascii_lowercase()))
        .collect();
    if dense_matrices > 0 {
        parts.push(format!("f32 x{dense_matrices}"));
    }
    let weight_bytes = quant.values().map(|m| m.bytes().len()).sum::<usize>()
        + dense
            .values()
            .filter(|t| t.rank() == 2)
            .map(|t| t.elem_count() * 4)
            .sum::<usize>();
    Ok(LoadedModel {
        model,
        eos_token_ids: eos_token_ids(&config, tokenizer.as_ref()),
        config,
        tokenizer,
        source: path.into(),
        dtype: parts.join(", "),
        weight_bytes,
    })
}

/// Splits F32 `weights` into the vectors (kept F32) and the matrices quantized to `ty` (or its
/// fallback for rows that are not whole blocks of it; matrices that fit no block type stay F32).
pub fn quantize_weights(weights: Weights, ty: QuantType) -> Result<(Weights, QuantWeights)> {
    let mut dense = Weights::new();
    let mut quant = QuantWeights::new();
    for (name, t) in weights {
        if t.rank() != 2 {
            dense.insert(name, t);
            continue;
        }
        let (rows, cols) = t.dims2()?;
        let target = storable_type(ty, cols);
        if target == QuantType::F32 {
            dense.insert(name, t);
            continue;
        }
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        drop(t);
        let m = QMatrix::quantize(&v, rows, cols, target).map_err(|e| {
            ModelError::Unsupported(format!("quantizing `{name}` to {target}: {e}"))
        })?;
        quant.insert(name, Arc::new(m));
    }
    Ok((dense, quant))
}
