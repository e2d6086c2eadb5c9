//! Named tensors in HF layout and naming (`model.layers.{i}.self_attn.q_proj.weight`, `[out, in]`).
//!
//! Loading reads `model.safetensors` or a sharded `model.safetensors.index.json`; every tensor is
//! converted to F32 on the CPU. Writing is atomic (temp file + rename).
use candle_core::Tensor;
use std::collections::BTreeMap;

/// A checkpoint's tensors by HF name.
pub type Weights = BTreeMap<String, Tensor>;
