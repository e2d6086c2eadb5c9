//! GGUF files (llama.cpp) read into HF naming, HF layout and F32.
//!
//! * Metadata `{arch}.*` (arch = `general.architecture`, `llama` or `qwen2`) becomes a
//!   [`LlamaConfig`]; the vocabulary size comes from `tokenizer.ggml.tokens`; the embeddings are
//!   tied when there is no `output.weight`.
//! * Every tensor is dequantized to F32 (Q4_0/Q4_1/Q8_0/K-quants/F16/F32... through candle's
//!   `QTensor::dequantize`).
//! * llama.cpp names map to HF names (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`).
//! * For `llama` files, q/k rows are un-permuted: llama.cpp's converter interleaves the two RoPE
//!   halves of each head (`w.reshape(n_head, 2, head_dim/2, in).swapaxes(1, 2)`); we apply the
//!   inverse so that the weights fit HF's `rotate_half` RoPE.
//!
//! Shapes: candle reverses GGUF's dimension order when reading, so a tensor's candle shape is the
//! numpy/PyTorch shape: `attn_q.weight` is `[n_head*head_dim, hidden]` = HF `[out, in]`,
//! `token_embd.weight` is `[vocab, hidden]`.
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::weights::Weights;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use std::path::Path;

/// An opened GGUF file: its parsed header and where it lives.
pub struct GgufFile {
    pub path: std::path::PathBuf,
    pub content: Content,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .field("metadata", &self.content.metadata.len())
            .finish()
    }
}

impl GgufFile {
    /// Parses the header (metadata and tensor table) without reading tensor data. A truncated or
    /// corrupt header gives [`ModelError::Malformed`] naming the file.
    pub fn open(path: &Path) -> Result<Self> {
        let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        let content = Content::read(&mut f).map_err(|e| ModelError::Malformed {
            path: path.into(),
            msg: format!("cannot parse GGUF header: {e}"),
        })?;
        Ok(Self {
            path: path.into(),
            content,
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

    /// Reads and dequantizes every tensor to F32 on the CPU, in HF naming and layout
    /// (q/k un-permuted for `llama` files). `cfg` must come from [`GgufFile::config`].
    pub fn weights(&self, cfg: &LlamaConfig) -> Result<Weights> {
        let unpermute = self.architecture()? == "llama";
        let mut f = std::fs::File::open(&self.path).map_err(|e| ModelError::io(&self.path, e))?;
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        let mut out = Weights::new();
        for name in names {
            let hf = hf_name(name)
                .ok_or_else(|| ModelError::Gguf(format!("unexpected tensor `{name}`")))?;
            let q = self
                .content
                .tensor(&mut f, name, &Device::Cpu)
                .map_err(|e| ModelError::Malformed {
                    path: self.path.clone(),
                    msg: format!("tensor `{name}`: {e}"),
                })?;
            let mut t = q.dequantize(&Device::Cpu)?;
            if unpermute {
                if hf.ends_with("q_proj.weight") || hf.ends_with("q_proj.bias") {
                    t = unpermute_rows(&t, cfg.num_attention_heads)?;
                } else if hf.ends_with("k_proj.weight") || hf.ends_with("k_proj.bias") {
                    t = unpermute_rows(&t, cfg.num_kv_heads())?;
                }
            }
            out.insert(hf, t);
        }
        Ok(out)
    }
}

impl GgufFile {
    /// Writes a copy of this GGUF with every tensor dequantized to F32 (same names, layout and
    /// metadata), atomically. Lets llama.cpp run at the precision of our F32 engine.
    pub fn write_f32_copy(&self, out: &Path) -> Result<()> {
        use candle_core::quantized::{GgmlDType, QTensor};
        let mut f = std::fs::File::open(&self.path).map_err(|e| ModelError::io(&self.path, e))?;
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        let mut tensors = Vec::with_capacity(names.len());
        for name in names {
            let q = self
                .content
                .tensor(&mut f, name, &Device::Cpu)
                .map_err(|e| ModelError::Malformed {
                    path: self.path.clone(),
                    msg: format!("tensor `{name}`: {e}"),
                })?;
            let t = q.dequantize(&Device::Cpu)?;
            tensors.push((name.as_str(), QTensor::quantize(&t, GgmlDType::F32)?));
        }
        let mut metadata: Vec<(&str, &Value)> = self
            .content
            .metadata
            .iter()
            .filter(|(k, _)| k.as_str() != "general.file_type")
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        let file_type = Value::U32(0); // ALL_F32
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

/// llama.cpp <-> HF names of the whole-model tensors.
const GLOBAL_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// llama.cpp <-> HF names of the per-layer tensors (`blk.N.{gguf}` <-> `model.layers.N.{hf}`).
const LAYER_NAMES: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Renames `name` from one naming to the other: `to_hf` picks the direction.
fn rename(name: &str, to_hf: bool) -> Option<String> {
    let pick = |pair: &(&'static str, &'static str)| {
        if to_hf {
            (pair.0, pair.1)
        } else {
            (pair.1, pair.0)
        }
    };
    if let Some((_, to)) = GLOBAL_NAMES
        .iter()
        .map(pick)
        .find(|(from, _)| *from == name)
    {
        return Some(to.to_string());
    }
    let (prefix_in, prefix_out) = if to_hf {
        ("blk.", "model.layers.")
    } else {
        ("model.layers.", "blk.")
    };
    let (layer, rest) = name.strip_prefix(prefix_in)?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let (_, to) = LAYER_NAMES
        .iter()
        .map(pick)
        .find(|(from, _)| *from == part)?;
    Some(format!("{prefix_out}{layer}.{to}.{kind}"))
}

/// Maps a llama.cpp tensor name to its HF name (`None` for names we do not know).
pub fn hf_name(gguf: &str) -> Option<String> {
    rename(gguf, true)
}

/// Maps an HF tensor name to its llama.cpp name (inverse of [`hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    rename(hf, false)
}

/// llama.cpp's q/k row permutation (`convert_hf_to_gguf.py` `permute`): for `w` of shape
/// `[n_head * head_dim, in]` (or `[n_head * head_dim]` for a bias),
/// `w.reshape(n_head, 2, head_dim/2, in).swapaxes(1, 2).reshape(out, in)`.
pub fn permute_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    reorder_rows(w, n_head, false)
}

/// Inverse of [`permute_rows`]: `w.reshape(n_head, head_dim/2, 2, in).swapaxes(1, 2).reshape(out, in)`.
pub fn unpermute_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    reorder_rows(w, n_head, true)
}

fn reorder_rows(w: &Tensor, n_head: usize, inverse: bool) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let out = dims[0];
    let inner: usize = dims[1..].iter().product();
    if n_head == 0 || !out.is_multiple_of(2 * n_head) {
        return Err(ModelError::Mismatch(format!(
            "cannot split {out} rows into {n_head} heads of even width"
        )));
    }
    let half = out / n_head / 2;
    let (a, b) = if inverse { (half, 2) } else { (2, half) };
    let t = w
        .reshape((n_head, a, b, inner))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?;
    Ok(t)
}

/// Convenience: opens `path` and returns its config and F32 HF weights.
pub fn load_gguf(path: &Path) -> Result<(LlamaConfig, Weights)> {
    let g = GgufFile::open(path)?;
    let cfg = g.config()?;
    let w = g.weights(&cfg)?;
    Ok((cfg, w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_then_unpermute_is_identity_and_matches_numpy() {
        // n_head = 2, head_dim = 4, in = 3.
        let w = Tensor::arange(0f32, 24., &Device::Cpu)
            .unwrap()
            .reshape((8, 3))
            .unwrap();
        let p = permute_rows(&w, 2).unwrap();
        // numpy: rows of head h go [0, 2, 1, 3] (interleave the two halves).
        let rows: Vec<f32> = p
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(rows, vec![0., 6., 3., 9., 12., 18., 15., 21.]);
        let back = unpermute_rows(&p, 2).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        let b = Tensor::arange(0f32, 8., &Device::Cpu).unwrap();
        let pb = permute_rows(&b, 2).unwrap();
        assert_eq!(
            pb.to_vec1::<f32>().unwrap(),
            vec![0., 2., 1., 3., 4., 6., 5., 7.]
        );
        assert_eq!(
            unpermute_rows(&pb, 2).unwrap().to_vec1::<f32>().unwrap(),
            b.to_vec1::<f32>().unwrap()
        );
        assert!(unpermute_rows(&w, 3).is_err());
    }

    #[test]
    fn names_map_both_ways() {
        for (g, h) in [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output.weight", "lm_head.weight"),
            ("output_norm.weight", "model.norm.weight"),
            (
                "blk.12.attn_q.bias",
                "model.layers.12.self_attn.q_proj.bias",
            ),
            (
                "blk.0.attn_output.weight",
                "model.layers.0.self_attn.o_proj.weight",
            ),
            (
                "blk.3.ffn_down.weight",
                "model.layers.3.mlp.down_proj.weight",
            ),
            (
                "blk.3.ffn_norm.weight",
                "model.layers.3.post_attention_layernorm.weight",
            ),
            (
                "blk.3.attn_norm.weight",
                "model.layers.3.input_layernorm.weight",
            ),
        ] {
            assert_eq!(hf_name(g).as_deref(), Some(h));
            assert_eq!(gguf_name(h).as_deref(), Some(g));
        }
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
