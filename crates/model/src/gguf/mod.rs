//! GGUF files (llama.cpp) read into HF naming and layout: as F32, or with the quantized tensors
//! kept as they are ([`GgufFile::quant_weights`]).
//!
//! * The header is read by [`reader`] with every length checked against the file: a truncated
//!   file, an unknown value type or an unsupported ggml tensor type is a typed error before any
//!   tensor data is read.
//! * Metadata `{arch}.*` (arch = `general.architecture`, `llama` or `qwen2`) becomes a
//!   [`LlamaConfig`]; the vocabulary size comes from `tokenizer.ggml.tokens`; the embeddings are
//!   tied when there is no `output.weight`. Every tensor's shape is checked against the shapes the
//!   config implies ([`GgufFile::check_tensors`]) before data is read, so a file whose metadata
//!   disagrees with its tensors is named as such.
//! * Dequantization is exact ([`crate::quant::dequant`]).
//! * llama.cpp names map to HF names (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`).
//! * For `llama` files, q/k rows are un-permuted: llama.cpp's converter interleaves the two RoPE
//!   halves of each head (`w.reshape(n_head, 2, head_dim/2, in).swapaxes(1, 2)`); we apply the
//!   inverse so that the weights fit HF's `rotate_half` RoPE. `qwen2` files are not permuted
//!   (llama.cpp's converter permutes only for its `llama` architecture; Qwen2 runs NeoX-style
//!   RoPE, which is HF's `rotate_half`), and keep their q/k/v biases.
//!
//! Shapes: a GGUF tensor's dimensions run innermost first; shapes here are reversed to
//! numpy/PyTorch order, so `attn_q.weight` is `[n_head*head_dim, hidden]` = HF `[out, in]` and
//! `token_embd.weight` is `[vocab, hidden]`.
mod names;
pub mod reader;

use crate::config::{expected_shapes, LlamaConfig};
use crate::error::{ModelError, Result};
use crate::quant::backend::storable_type;
use crate::quant::{dequant, QMatrix, QuantType, QuantWeights, WeightDtype};
use crate::weights::Weights;
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
pub use names::{gguf_name, hf_name, permute_rows, unpermute_rows};
pub use reader::TensorEntry;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

/// An opened GGUF file: its parsed header and where it lives.
pub struct GgufFile {
    pub path: std::path::PathBuf,
    /// The header as candle's type (metadata and tensor table; offsets relative to the data).
    pub content: Content,
    /// The tensor table with this crate's types, sizes and absolute offsets.
    pub tensors: BTreeMap<String, TensorEntry>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .field("metadata", &self.content.metadata.len())
            .finish()
    }
}

impl GgufFile {
    /// Parses the header (metadata and tensor table) without reading tensor data: a truncated
    /// file is [`ModelError::Truncated`], a corrupt header [`ModelError::Malformed`], a tensor of
    /// an unsupported type [`ModelError::UnsupportedQuant`], each naming the file or tensor.
    pub fn open(path: &Path) -> Result<Self> {
        let h = reader::read_header(path)?;
        let magic = match h.version {
            1 => VersionedMagic::GgufV1,
            2 => VersionedMagic::GgufV2,
            _ => VersionedMagic::GgufV3,
        };
        let tensor_infos: HashMap<String, TensorInfo> = h
            .tensors
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    TensorInfo {
                        ggml_dtype: t.ty.ggml_dtype(),
                        shape: candle_core::Shape::from(t.shape.clone()),
                        offset: t.offset - h.data_offset,
                    },
                )
            })
            .collect();
        Ok(Self {
            path: path.into(),
            content: Content {
                magic,
                metadata: h.metadata,
                tensor_infos,
                tensor_data_offset: h.data_offset,
            },
            tensors: h.tensors.into_iter().collect(),
        })
    }

    /// A metadata value, if present.
    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// `general.architecture` (e.g. `llama`).
    pub fn architecture(&self) -> Result<String> {
        Ok(self.req_str("general.architecture")?.to_string())
    }

    fn req(&self, key: &str) -> Result<&Value> {
        self.meta(key).ok_or_else(|| {
            ModelError::Gguf(format!(
                "{}: missing metadata key `{key}`",
                self.path.display()
            ))
        })
    }

    fn req_str(&self, key: &str) -> Result<&str> {
        match self.req(key)? {
            Value::String(s) => Ok(s),
            v => Err(ModelError::Gguf(format!(
                "metadata `{key}` is not a string: {:?}",
                v.value_type()
            ))),
        }
    }

    /// A numeric metadata value as usize (any integer type).
    pub fn meta_usize(&self, key: &str) -> Result<Option<usize>> {
        self.meta(key)
            .map(|v| value_to_u64(v, key).map(|x| x as usize))
            .transpose()
    }

    /// A float metadata value (F32/F64, or an integer).
    pub fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => value_to_u64(v, key).map(|x| Some(x as f64)),
        }
    }

    /// A string metadata value.
    pub fn meta_string(&self, key: &str) -> Option<&str> {
        match self.meta(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// A boolean metadata value.
    pub fn meta_bool(&self, key: &str) -> Option<bool> {
        match self.meta(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    /// A string-array metadata value (e.g. `tokenizer.ggml.tokens`).
    pub fn meta_strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    v => Err(ModelError::Gguf(format!(
                        "`{key}` holds a non-string {:?}",
                        v.value_type()
                    ))),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(ModelError::Gguf(format!(
                "`{key}` is not an array: {:?}",
                v.value_type()
            ))),
        }
    }

    /// An integer-array metadata value (e.g. `tokenizer.ggml.token_type`).
    pub fn meta_ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| value_to_i64(v, key))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(ModelError::Gguf(format!(
                "`{key}` is not an array: {:?}",
                v.value_type()
            ))),
        }
    }

    /// Builds the HF config from the `{arch}.*` metadata.
    ///
    /// `hidden_size` = `embedding_length`, `num_hidden_layers` = `block_count`,
    /// `intermediate_size` = `feed_forward_length`, heads from `attention.head_count(_kv)`,
    /// `head_dim` from `attention.key_length` (only kept when it differs from hidden/heads),
    /// `rope_theta` = `rope.freq_base`, `rms_norm_eps` = `attention.layer_norm_rms_epsilon`,
    /// `max_position_embeddings` = `context_length`, `vocab_size` = number of tokens.
    pub fn config(&self) -> Result<LlamaConfig> {
        let arch = self.architecture()?;
        let (model_type, class) = match arch.as_str() {
            "llama" => ("llama", "LlamaForCausalLM"),
            "qwen2" => ("qwen2", "Qwen2ForCausalLM"),
            other => {
                return Err(ModelError::UnsupportedArch(format!(
                    "gguf architecture `{other}`"
                )))
            }
        };
        let k = |s: &str| format!("{arch}.{s}");
        let req_usize = |s: &str| -> Result<usize> {
            self.meta_usize(&k(s))?.ok_or_else(|| {
                ModelError::Gguf(format!(
                    "{}: missing metadata key `{}`",
                    self.path.display(),
                    k(s)
                ))
            })
        };
        let hidden = req_usize("embedding_length")?;
        let layers = req_usize("block_count")?;
        let ffn = req_usize("feed_forward_length")?;
        let heads = req_usize("attention.head_count")?;
        let kv_heads = self
            .meta_usize(&k("attention.head_count_kv"))?
            .unwrap_or(heads);
        let key_len = self.meta_usize(&k("attention.key_length"))?;
        if let Some(vl) = self.meta_usize(&k("attention.value_length"))? {
            if Some(vl) != key_len && vl != hidden / heads.max(1) {
                return Err(ModelError::UnsupportedArch(format!(
                    "{arch} with value_length {vl} != key_length"
                )));
            }
        }
        let head_dim = key_len.filter(|&d| heads == 0 || d * heads != hidden);
        let vocab = match self.meta_strings("tokenizer.ggml.tokens")? {
            Some(t) => t.len(),
            None => match self.meta_usize(&k("vocab_size"))? {
                Some(v) => v,
                None => self
                    .content
                    .tensor_infos
                    .get("token_embd.weight")
                    .map(|t| t.shape.dims()[0])
                    .ok_or_else(|| ModelError::Gguf("cannot tell the vocabulary size".into()))?,
            },
        };
        let rope_scaling = match self.meta_string(&k("rope.scaling.type")) {
            None | Some("none") => None,
            Some("linear") => {
                let f = self.meta_f64(&k("rope.scaling.factor"))?.unwrap_or(1.0);
                Some(serde_json::json!({"type": "linear", "rope_type": "linear", "factor": f}))
            }
            Some(other) => {
                return Err(ModelError::UnsupportedArch(format!(
                    "{arch} with rope scaling `{other}`"
                )))
            }
        };
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            return Err(ModelError::UnsupportedArch(format!(
                "{arch} with `rope_freqs.weight` (Llama-3 style RoPE frequency scaling)"
            )));
        }
        let id = |key: &str| -> Result<Option<serde_json::Value>> {
            Ok(self
                .meta_usize(key)?
                .map(|x| serde_json::Value::from(x as u64)))
        };
        let mut extra = serde_json::Map::new();
        extra.insert("torch_dtype".into(), "float32".into());
        if let Some(p) = id("tokenizer.ggml.padding_token_id")? {
            extra.insert("pad_token_id".into(), p);
        }
        let cfg = LlamaConfig {
            architectures: vec![class.to_string()],
            model_type: model_type.to_string(),
            hidden_size: hidden,
            intermediate_size: ffn,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv_heads),
            head_dim,
            vocab_size: vocab,
            rms_norm_eps: self
                .meta_f64(&k("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-6),
            rope_theta: self.meta_f64(&k("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: self.meta_usize(&k("context_length"))?.unwrap_or(4096),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            // Llama files with q/k/v(/o) biases (e.g. converted from `attention_bias=True`).
            attention_bias: (model_type == "llama"
                && self.content.tensor_infos.contains_key("blk.0.attn_q.bias"))
            .then_some(true),
            bos_token_id: id("tokenizer.ggml.bos_token_id")?,
            eos_token_id: id("tokenizer.ggml.eos_token_id")?,
            hidden_act: "silu".into(),
            extra,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the tensor table against the shapes `cfg` (built from this file's metadata)
    /// implies: every expected tensor present ([`ModelError::MissingTensor`]), of the implied
    /// shape, and no tensor the model does not have ([`ModelError::Mismatch`], naming tensor
    /// and shapes).
    pub fn check_tensors(&self, cfg: &LlamaConfig) -> Result<()> {
        let arch = &cfg.model_type;
        let expected: HashMap<String, Vec<usize>> = expected_shapes(cfg).into_iter().collect();
        for (name, t) in &self.tensors {
            let hf = hf_name(name).ok_or_else(|| {
                ModelError::Mismatch(format!(
                    "{}: unexpected tensor `{name}` (not part of a {arch} model)",
                    self.path.display()
                ))
            })?;
            match expected.get(&hf) {
                Some(shape) if *shape == t.shape => {}
                Some(shape) => {
                    return Err(ModelError::Mismatch(format!(
                        "{}: tensor `{name}` has shape {:?}, but the metadata ({arch}.*, \
                         tokenizer) implies {shape:?}",
                        self.path.display(),
                        t.shape
                    )))
                }
                None => {
                    return Err(ModelError::Mismatch(format!(
                        "{}: unexpected tensor `{name}` {:?} for a {arch} model of {} layers \
                         ({arch}.block_count)",
                        self.path.display(),
                        t.shape,
                        cfg.num_hidden_layers
                    )))
                }
            }
        }
        let mut missing: Vec<&String> = expected
            .keys()
            .filter(|hf| gguf_name(hf).is_none_or(|g| !self.tensors.contains_key(&g)))
            .collect();
        missing.sort();
        if let Some(hf) = missing.first() {
            return Err(ModelError::MissingTensor(format!(
                "{} (`{hf}`) in {}: the metadata implies it",
                gguf_name(hf).unwrap_or_default(),
                self.path.display()
            )));
        }
        Ok(())
    }

    /// The bytes of tensor `name`.
    pub fn tensor_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        reader::read_tensor_bytes(&self.path, t)
    }

    /// Tensor `name` dequantized to F32 (exactly), in its GGUF row order.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = &self.tensors[name];
        let bytes = self.tensor_bytes(name)?;
        let mut out = vec![0f32; t.elem_count()];
        dequant::dequantize(t.ty, &bytes, &mut out)?;
        Ok(out)
    }

    /// For a `llama` file, the row order that undoes llama.cpp's q/k permutation of HF tensor
    /// `hf` (`None` for tensors that are not permuted).
    fn unpermute_order(
        &self,
        cfg: &LlamaConfig,
        hf: &str,
        rows: usize,
    ) -> Result<Option<Vec<usize>>> {
        if cfg.model_type != "llama" {
            return Ok(None);
        }
        let heads = if hf.ends_with("q_proj.weight") || hf.ends_with("q_proj.bias") {
            cfg.num_attention_heads
        } else if hf.ends_with("k_proj.weight") || hf.ends_with("k_proj.bias") {
            cfg.num_kv_heads()
        } else {
            return Ok(None);
        };
        names::unpermute_order(rows, heads).map(Some)
    }

    /// Reads and dequantizes every tensor to F32 on the CPU, in HF naming and layout
    /// (q/k un-permuted for `llama` files). `cfg` must come from [`GgufFile::config`].
    pub fn weights(&self, cfg: &LlamaConfig) -> Result<Weights> {
        self.check_tensors(cfg)?;
        let mut out = Weights::new();
        for (name, t) in &self.tensors {
            let hf = hf_name(name).expect("checked by check_tensors");
            let mut v = self.tensor_f32(name)?;
            if let Some(order) = self.unpermute_order(cfg, &hf, t.shape[0])? {
                let inner = t.elem_count() / t.shape[0];
                v = order
                    .iter()
                    .flat_map(|&r| v[r * inner..(r + 1) * inner].iter().copied())
                    .collect();
            }
            out.insert(hf, Tensor::from_vec(v, t.shape.clone(), &Device::Cpu)?);
        }
        Ok(out)
    }

    /// Reads the weights for the quantized engine: every matrix (linear maps and the embedding)
    /// as a [`QMatrix`], the vectors (norms, biases) as F32. With [`WeightDtype::Auto`] quantized
    /// matrices keep their own type (types without a kernel, `Q2_K`/`Q3_K`/`Q5_1`, become
    /// `Q8_0`) and float matrices stay F32; with [`WeightDtype::Quant`] every matrix is
    /// converted to that type (or its fallback, [`storable_type`]); [`WeightDtype::F32`]
    /// dequantizes everything (the returned quantized map is empty).
    pub fn quant_weights(
        &self,
        cfg: &LlamaConfig,
        dtype: WeightDtype,
    ) -> Result<(Weights, QuantWeights)> {
        if dtype == WeightDtype::F32 {
            return Ok((self.weights(cfg)?, QuantWeights::new()));
        }
        self.check_tensors(cfg)?;
        let mut dense = Weights::new();
        let mut quant = QuantWeights::new();
        for (name, t) in &self.tensors {
            let hf = hf_name(name).expect("checked by check_tensors");
            let rows = t.shape[0];
            let order = self.unpermute_order(cfg, &hf, rows)?;
            let target = match (t.shape.len(), dtype) {
                (2, WeightDtype::Quant(q)) => storable_type(q, t.shape[1]),
                (2, _) if t.ty.has_kernel() => t.ty,
                (2, _) if t.ty.is_float() => QuantType::F32,
                (2, _) => storable_type(QuantType::Q8_0, t.shape[1]),
                _ => QuantType::F32,
            };
            if target == QuantType::F32 {
                let mut v = self.tensor_f32(name)?;
                if let Some(order) = &order {
                    let inner = t.elem_count() / rows;
                    v = order
                        .iter()
                        .flat_map(|&r| v[r * inner..(r + 1) * inner].iter().copied())
                        .collect();
                }
                dense.insert(hf, Tensor::from_vec(v, t.shape.clone(), &Device::Cpu)?);
                continue;
            }
            let cols = t.shape[1];
            let m = if target == t.ty {
                QMatrix::new(t.ty, rows, cols, self.tensor_bytes(name)?)?
            } else {
                QMatrix::quantize(&self.tensor_f32(name)?, rows, cols, target)?
            };
            let m = match &order {
                Some(o) => m.reorder_rows(o)?,
                None => m,
            };
            quant.insert(hf, Arc::new(m));
        }
        Ok((dense, quant))
    }
}

impl GgufFile {
    /// Writes a copy of this GGUF with every tensor dequantized to F32 (same names, layout and
    /// metadata), atomically. Lets llama.cpp run at the precision of our F32 engine.
    pub fn write_f32_copy(&self, out: &Path) -> Result<()> {
        self.write_converted(out, None)
    }

    /// Writes a copy of this GGUF (same names, tensor layout and metadata but
    /// `general.file_type`), atomically: with `Some(ty)` every matrix is requantized to `ty` (or
    /// its fallback, [`storable_type`], for rows that are not whole blocks of it) from its exact
    /// F32 values, vectors are F32; with `None` everything is F32.
    pub fn write_converted(&self, out: &Path, ty: Option<QuantType>) -> Result<()> {
        use candle_core::quantized::{QStorage, QTensor};
        let dev = Device::Cpu;
        let mut tensors = Vec::with_capacity(self.tensors.len());
        for (name, t) in &self.tensors {
            let v = self.tensor_f32(name)?;
            let target = match ty {
                Some(q) if t.shape.len() == 2 => storable_type(q, t.shape[1]),
                _ => QuantType::F32,
            };
            let q = if target == QuantType::F32 {
                QTensor::quantize(&Tensor::from_vec(v, t.shape.clone(), &dev)?, GgmlDType::F32)?
            } else {
                let m = QMatrix::quantize(&v, t.shape[0], t.shape[1], target)?;
                let st = QStorage::from_data(m.gguf_bytes().into(), &dev, target.ggml_dtype())?;
                QTensor::new(st, t.shape.clone())?
            };
            tensors.push((name.as_str(), q));
        }
        let mut metadata: Vec<(&str, &Value)> = self
            .content
            .metadata
            .iter()
            .filter(|(k, _)| k.as_str() != "general.file_type")
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        // llama.cpp's `llama_ftype`: ALL_F32 0, MOSTLY_Q4_0 2, Q4_1 3, Q8_0 7, Q5_0 8, Q5_1 9,
        // Q4_K_M 15, Q5_K_M 17, Q6_K 18.
        let file_type = Value::U32(match ty {
            None => 0,
            Some(QuantType::Q4_0) => 2,
            Some(QuantType::Q4_1) => 3,
            Some(QuantType::Q8_0) => 7,
            Some(QuantType::Q5_0) => 8,
            Some(QuantType::Q5_1) => 9,
            Some(QuantType::Q4_K) => 15,
            Some(QuantType::Q5_K) => 17,
            Some(QuantType::Q6_K) => 18,
            Some(other) => {
                return Err(ModelError::Unsupported(format!("writing a {other} GGUF")));
            }
        });
        metadata.push(("general.file_type", &file_type));
        let tmp = out.with_extension("gguf.tmp");
        let res = (|| -> Result<()> {
            let mut w = std::io::BufWriter::new(
                std::fs::File::create(&tmp).map_err(|e| ModelError::io(&tmp, e))?,
            );
            let refs: Vec<(&str, &candle_core::quantized::QTensor)> =
                tensors.iter().map(|(n, t)| (*n, t)).collect();
            candle_core::quantized::gguf_file::write(&mut w, &metadata, &refs)
                .map_err(|e| ModelError::Gguf(format!("writing {}: {e}", out.display())))?;
            std::io::Write::flush(&mut w).map_err(|e| ModelError::io(&tmp, e))?;
            std::fs::rename(&tmp, out).map_err(|e| ModelError::io(out, e))
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    }
}

fn value_to_u64(v: &Value, key: &str) -> Result<u64> {
    let x = value_to_i64(v, key)?;
    u64::try_from(x).map_err(|_| ModelError::Gguf(format!("metadata `{key}` is negative")))
}

fn value_to_i64(v: &Value, key: &str) -> Result<i64> {
    Ok(match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => i64::try_from(*x)
            .map_err(|_| ModelError::Gguf(format!("metadata `{key}` is too large")))?,
        Value::I64(x) => *x,
        v => {
            return Err(ModelError::Gguf(format!(
                "metadata `{key}` is not an integer: {:?}",
                v.value_type()
            )))
        }
    })
}

/// Convenience: opens `path` and returns its config and F32 HF weights.
pub fn load_gguf(path: &Path) -> Result<(LlamaConfig, Weights)> {
    let g = GgufFile::open(path)?;
    let cfg = g.config()?;
    let w = g.weights(&cfg)?;
    Ok((cfg, w))
}
