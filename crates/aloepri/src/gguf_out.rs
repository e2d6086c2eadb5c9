//! A streaming GGUF (v3) writer for llama.cpp: the header (metadata and every tensor's name,
//! shape, type and offset) is written first, then each tensor as soon as it is computed, so an
//! export never holds the whole model (candle's `gguf_file::write` takes every tensor at once).
//!
//! Layout llama.cpp expects from an HF Llama/Qwen2 checkpoint (as `convert_hf_to_gguf.py` writes):
//! - names `token_embd`, `blk.N.attn_q`, ... ([`umbra_model::gguf::gguf_name`]);
//! - `llama` architecture: q/k rows (and biases) permuted into llama.cpp's interleaved RoPE order
//!   ([`umbra_model::gguf::permute_rows`]); `qwen2` uses the HF (NEOX) order as is;
//! - metadata `{arch}.embedding_length` = the obfuscated width `d + 2h`, and explicit
//!   `attention.key_length` / `value_length` / `rope.dimension_count` = `head_dim` (which is no
//!   longer `d' / heads`), `attention.layer_norm_rms_epsilon` = the rescaled `eps'`;
//! - the tokenizer (`tokenizer.ggml.*`): copied from a GGUF source, or built from the HF
//!   `tokenizer.json` (tokens by id, merges, token types, special ids, chat template). It is the
//!   public plaintext tokenizer: the server only ever sees tau-permuted ids;
//! - `umbra.*`: the key fingerprint and mode (never the key), read back by [`umbra_section`].
//!
//! Quantization ([`GgufQuant`]): 1-D tensors (norms, biases) stay F32; matrices are F32, Q8_0, or
//! Q4_K. A row whose width is not a multiple of the type's block falls back the way llama.cpp's
//! `quantize` does: Q4_K (block 256) -> Q5_0 (block 32) -> F32; Q8_0 (block 32) -> F32.
use crate::error::{AloeError, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use umbra_model::gguf::{gguf_name, permute_rows, GgufFile};
use umbra_model::tokenizer::TextTokenizer;
use umbra_model::LlamaConfig;

/// GGUF data alignment (`general.alignment`).
const ALIGN: u64 = 32;

/// Storage type of the matrices of a GGUF export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GgufQuant {
    F32,
    Q8_0,
    Q4K,
}

impl GgufQuant {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Self::F32),
            "q8_0" | "q8" => Ok(Self::Q8_0),
            "q4_k" | "q4k" => Ok(Self::Q4K),
            o => Err(AloeError::Input(format!(
                "unknown GGUF quantization `{o}` (f32, q8_0, q4_k)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4_k",
        }
    }

    /// llama.cpp's `general.file_type` (`ALL_F32`, `MOSTLY_Q8_0`, `MOSTLY_Q4_K_S`).
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::Q8_0 => 7,
            Self::Q4K => 14,
        }
    }

    /// The type of an HF tensor of `shape` (`[out, in]`: `in` is the quantized row).
    pub fn type_for(self, shape: &[usize]) -> GgmlDType {
        let row = *shape.last().unwrap_or(&0);
        if shape.len() < 2 || row == 0 {
            return GgmlDType::F32;
        }
        let chain: &[GgmlDType] = match self {
            Self::F32 => &[],
            Self::Q8_0 => &[GgmlDType::Q8_0],
            Self::Q4K => &[GgmlDType::Q4K, GgmlDType::Q5_0],
        };
        chain
            .iter()
            .copied()
            .find(|t| row.is_multiple_of(t.block_size()))
            .unwrap_or(GgmlDType::F32)
    }
}

fn ggml_code(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

fn bytes_of(t: GgmlDType, elems: usize) -> u64 {
    (elems / t.block_size() * t.type_size()) as u64
}

/// One tensor of the plan: HF name and shape, GGUF name and type.
#[derive(Debug, Clone)]
struct Entry {
    hf: String,
    gguf: String,
    shape: Vec<usize>,
    dtype: GgmlDType,
    /// Heads whose rows are permuted into llama.cpp's RoPE order (q/k of `llama` files).
    permute_heads: Option<usize>,
}

/// Writes tensors in a fixed order into one `.gguf` file (see the module docs).
pub struct GgufWriter {
    path: PathBuf,
    out: BufWriter<std::fs::File>,
    plan: Vec<Entry>,
    next: usize,
    /// Rows of `plan[next]` written so far (the embedding and head arrive in row chunks).
    rows_done: usize,
    bytes_done: u64,
}

impl GgufWriter {
    /// Writes the header for `specs` (HF name and shape, in write order) of a model with config
    /// `cfg` (the obfuscated one) and `metadata` ([`model_metadata`], [`tokenizer_part`]) into
    /// `file` (empty, opened for writing; `path` names it in errors).
    pub fn create(
        path: &Path,
        file: std::fs::File,
        cfg: &LlamaConfig,
        specs: &[(String, Vec<usize>)],
        quant: GgufQuant,
        metadata: &[(String, Value)],
    ) -> Result<Self> {
        let llama = arch(cfg)? == "llama";
        let mut plan = Vec::with_capacity(specs.len());
        for (hf, shape) in specs {
            let gguf = gguf_name(hf)
                .ok_or_else(|| AloeError::Input(format!("no GGUF name for tensor `{hf}`")))?;
            let permute_heads = if !llama {
                None
            } else if hf.contains(".q_proj.") {
                Some(cfg.num_attention_heads)
            } else if hf.contains(".k_proj.") {
                Some(cfg.num_kv_heads())
            } else {
                None
            };
            plan.push(Entry {
                hf: hf.clone(),
                gguf,
                shape: shape.clone(),
                dtype: quant.type_for(shape),
                permute_heads,
            });
        }
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let mut header = Vec::new();
        header.extend_from_slice(b"GGUF");
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(plan.len() as u64).to_le_bytes());
        header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut header, k);
            header.extend_from_slice(&value_type(v).to_le_bytes());
            put_value(&mut header, v)?;
        }
        let mut offset = 0u64;
        for e in &plan {
            put_str(&mut header, &e.gguf);
            header.extend_from_slice(&(e.shape.len() as u32).to_le_bytes());
            for &d in e.shape.iter().rev() {
                header.extend_from_slice(&(d as u64).to_le_bytes());
            }
            header.extend_from_slice(&ggml_code(e.dtype).to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            offset += bytes_of(e.dtype, e.shape.iter().product()).div_ceil(ALIGN) * ALIGN;
        }
        while !(header.len() as u64).is_multiple_of(ALIGN) {
            header.push(0);
        }
        w.write_all(&header).map_err(|e| AloeError::io(path, e))?;
        Ok(Self {
            path: path.into(),
            out: w,
            plan,
            next: 0,
            rows_done: 0,
            bytes_done: 0,
        })
    }

    /// The storage type chosen for each tensor (HF name, GGML type name).
    pub fn types(&self) -> Vec<(String, String)> {
        self.plan
            .iter()
            .map(|e| (e.hf.clone(), format!("{:?}", e.dtype)))
            .collect()
    }

    /// Writes the next tensor (HF name and layout), whole or as its next chunk of rows.
    pub fn write(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let e = self
            .plan
            .get(self.next)
            .ok_or_else(|| AloeError::Input(format!("unexpected extra tensor `{name}`")))?
            .clone();
        let rows_total = if e.shape.len() > 1 { e.shape[0] } else { 1 };
        let rows = if t.rank() > 1 { t.dims()[0] } else { 1 };
        let whole = self.rows_done == 0 && t.dims() == e.shape.as_slice();
        let chunk_ok = e.shape.len() > 1
            && t.rank() == e.shape.len()
            && t.dims()[1..] == e.shape[1..]
            && e.permute_heads.is_none();
        if e.hf != name || !(whole || chunk_ok) || self.rows_done + rows > rows_total {
            return Err(AloeError::Input(format!(
                "GGUF writer expected `{}` {:?} ({} of {rows_total} rows written), got `{name}` {:?}",
                e.hf,
                e.shape,
                self.rows_done,
                t.dims()
            )));
        }
        let mut t = t.to_dtype(DType::F32)?.contiguous()?;
        if let Some(h) = e.permute_heads {
            t = permute_rows(&t, h)?;
        }
        let data = if e.dtype == GgmlDType::F32 {
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            if let Some(x) = v.iter().find(|x| !x.is_finite()) {
                return Err(AloeError::Input(format!("tensor `{name}` has {x}")));
            }
            v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()
        } else {
            QTensor::quantize(&t, e.dtype)?.data()?.into_owned()
        };
        self.out
            .write_all(&data)
            .map_err(|err| AloeError::io(&self.path, err))?;
        self.bytes_done += data.len() as u64;
        self.rows_done += rows;
        if self.rows_done == rows_total {
            let want = bytes_of(e.dtype, e.shape.iter().product());
            if self.bytes_done != want {
                return Err(AloeError::Input(format!(
                    "tensor `{name}`: wrote {} bytes, the header says {want}",
                    self.bytes_done
                )));
            }
            let pad = want.div_ceil(ALIGN) * ALIGN - want;
            self.out
                .write_all(&vec![0u8; pad as usize])
                .map_err(|err| AloeError::io(&self.path, err))?;
            self.next += 1;
            self.rows_done = 0;
            self.bytes_done = 0;
        }
        Ok(())
    }

    /// Flushes and fsyncs; fails if a tensor of the header was never written.
    pub fn finish(self) -> Result<()> {
        crate::writer::finish_file(
            self.out,
            &self.path,
            self.next,
            self.plan.len(),
            "GGUF tensors",
        )
    }
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(buf: &mut Vec<u8>, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => buf.push(*x),
        Value::I8(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => buf.push(u8::from(*x)),
        Value::String(s) => put_str(buf, s),
        Value::Array(a) => {
            let t = a.first().map(value_type).unwrap_or(8);
            if a.iter().any(|x| value_type(x) != t) {
                return Err(AloeError::Input("GGUF array with mixed types".into()));
            }
            buf.extend_from_slice(&t.to_le_bytes());
            buf.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for x in a {
                put_value(buf, x)?;
            }
        }
    }
    Ok(())
}

/// llama.cpp's architecture name for a config (`llama` for Llama/Mistral/SmolLM, `qwen2`).
pub fn arch(cfg: &LlamaConfig) -> Result<&'static str> {
    match cfg.model_type.as_str() {
        "llama" | "mistral" => Ok("llama"),
        "qwen2" => Ok("qwen2"),
        o => Err(AloeError::Input(format!("no GGUF architecture for `{o}`"))),
    }
}

/// The model metadata of a GGUF export: general and architecture keys from `cfg` and the `umbra`
/// section of its config ([`tokenizer_part`] adds the tokenizer).
pub fn model_metadata(
    cfg: &LlamaConfig,
    quant: GgufQuant,
    name: &str,
) -> Result<Vec<(String, Value)>> {
    let a = arch(cfg)?;
    let k = |s: &str| format!("{a}.{s}");
    let u = |x: usize| Value::U32(x as u32);
    let hd = cfg.head_dim();
    let mut m: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.file_type".into(), Value::U32(quant.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        ("general.alignment".into(), Value::U32(ALIGN as u32)),
        (k("context_length"), u(cfg.max_position_embeddings)),
        (k("embedding_length"), u(cfg.hidden_size)),
        (k("block_count"), u(cfg.num_hidden_layers)),
        (k("feed_forward_length"), u(cfg.intermediate_size)),
        (k("attention.head_count"), u(cfg.num_attention_heads)),
        (k("attention.head_count_kv"), u(cfg.num_kv_heads())),
        (k("attention.key_length"), u(hd)),
        (k("attention.value_length"), u(hd)),
        (k("rope.dimension_count"), u(hd)),
        (k("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (k("vocab_size"), u(cfg.vocab_size)),
    ];
    if let Some(rs) = &cfg.rope_scaling {
        let ty = rs
            .get("rope_type")
            .or_else(|| rs.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or("none");
        if ty != "linear" {
            return Err(AloeError::Input(format!(
                "RoPE scaling `{ty}` has no GGUF export here (linear only)"
            )));
        }
        let f = rs.get("factor").and_then(|f| f.as_f64()).unwrap_or(1.0);
        m.push((k("rope.scaling.type"), Value::String("linear".into())));
        m.push((k("rope.scaling.factor"), Value::F32(f as f32)));
    }
    if let Some(s) = cfg.extra.get(crate::keyfile::CONFIG_SECTION) {
        if let Some(fp) = s.get("key_fingerprint").and_then(|v| v.as_str()) {
            m.push(("umbra.key_fingerprint".into(), Value::String(fp.into())));
        }
        if let Some(e) = s.get("exact").and_then(|v| v.as_bool()) {
            m.push(("umbra.exact".into(), Value::Bool(e)));
        }
        if let Some(d) = s.get("plain_hidden_size").and_then(|v| v.as_u64()) {
            m.push(("umbra.plain_hidden_size".into(), Value::U64(d)));
        }
        m.push(("umbra.scheme".into(), Value::String("aloepri".into())));
        m.push(("umbra.format".into(), Value::U32(1)));
    }
    Ok(m)
}

/// The tokenizer metadata of a GGUF export: copied from `source_gguf` when it has one, else
/// built from `tokenizer` ([`tokenizer_metadata`]); empty without either.
pub fn tokenizer_part(
    source_gguf: Option<&GgufFile>,
    tokenizer: Option<&TextTokenizer>,
    cfg: &LlamaConfig,
) -> Result<Vec<(String, Value)>> {
    let mut m = vec![];
    match (source_gguf, tokenizer) {
        (Some(g), _) if g.meta("tokenizer.ggml.model").is_some() => {
            let mut keys: Vec<&String> = g
                .content
                .metadata
                .keys()
                .filter(|k| k.starts_with("tokenizer."))
                .collect();
            keys.sort();
            for key in keys {
                m.push((key.clone(), g.content.metadata[key].clone()));
            }
        }
        (_, Some(t)) => m.extend(tokenizer_metadata(t, cfg)?),
        _ => {}
    }
    Ok(m)
}

/// `tokenizer.ggml.*` of a byte-level BPE HF tokenizer (what llama.cpp's converter writes):
/// every id of the config's vocabulary gets a token (`[PAD{i}]`, type unused, past the
/// tokenizer's), merges, token types (control for special added tokens, user-defined for the
/// others), special ids and the chat template.
pub fn tokenizer_metadata(tok: &TextTokenizer, cfg: &LlamaConfig) -> Result<Vec<(String, Value)>> {
    let json: serde_json::Value = serde_json::from_str(&tok.to_tokenizer_json()?)
        .map_err(|e| AloeError::Input(format!("tokenizer.json: {e}")))?;
    let model = &json["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(AloeError::Input(
            "GGUF export needs a BPE tokenizer (tokenizer.json model type BPE)".into(),
        ));
    }
    let vocab = cfg.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; vocab];
    let mut types = vec![1i32; vocab];
    if let Some(v) = model["vocab"].as_object() {
        for (s, id) in v {
            if let Some(slot) = id.as_u64().and_then(|i| tokens.get_mut(i as usize)) {
                *slot = Some(s.clone());
            }
        }
    }
    for (id, content, special) in tok.added_tokens() {
        if let Some(slot) = tokens.get_mut(id as usize) {
            *slot = Some(content);
            types[id as usize] = if special { 3 } else { 4 };
        }
    }
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            Value::String(t.unwrap_or_else(|| {
                types[i] = 5;
                format!("[PAD{i}]")
            }))
        })
        .collect();
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| match x {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Array(p) if p.len() == 2 => {
                        Some(format!("{} {}", p[0].as_str()?, p[1].as_str()?))
                    }
                    _ => None,
                })
                .map(Value::String)
                .collect()
        })
        .unwrap_or_default();
    let mut m = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ];
    if let Some(pre) = guess_pre(&json["pre_tokenizer"]) {
        m.push(("tokenizer.ggml.pre".into(), Value::String(pre.into())));
    }
    let bos = cfg.bos_token_ids().first().copied().or(tok.bos_id());
    let eos = cfg.eos_token_ids().first().copied().or(tok.eos_id());
    for (key, id) in [("bos", bos), ("eos", eos), ("padding", tok.pad_id())] {
        if let Some(id) = id {
            m.push((format!("tokenizer.ggml.{key}_token_id"), Value::U32(id)));
        }
    }
    if let Some(t) = tok.tokenizer_config_json()["chat_template"].as_str() {
        m.push(("tokenizer.chat_template".into(), Value::String(t.into())));
    }
    Ok(m)
}

/// llama.cpp's pre-tokenizer name for the HF pre-tokenizers this workspace builds from GGUF
/// (SmolLM's digits + byte level, Qwen2's regex split); `None` (llama.cpp's default) otherwise.
fn guess_pre(pre: &serde_json::Value) -> Option<&'static str> {
    let text = pre.to_string();
    if text.contains("\"Digits\"") && text.contains("\"ByteLevel\"") {
        Some("smollm")
    } else if text.contains(r"\\p{N}|") || text.contains(r"\p{N}| ") {
        Some("qwen2")
    } else {
        None
    }
}

/// The `umbra` config section of an exported GGUF (`umbra.*` metadata), if any.
pub fn umbra_section(g: &GgufFile) -> Option<serde_json::Value> {
    let fp = g.meta_string("umbra.key_fingerprint")?;
    let mut s = serde_json::json!({
        "format": 1,
        "scheme": "aloepri",
        "key_fingerprint": fp,
    });
    if let Some(e) = g.meta_bool("umbra.exact") {
        s["exact"] = e.into();
    }
    if let Ok(Some(d)) = g.meta_usize("umbra.plain_hidden_size") {
        s["plain_hidden_size"] = d.into();
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quant_types_fall_back_like_llama_cpp() {
        assert_eq!(GgufQuant::Q4K.type_for(&[10, 1536]), GgmlDType::Q4K);
        assert_eq!(GgufQuant::Q4K.type_for(&[10, 576]), GgmlDType::Q5_0);
        assert_eq!(GgufQuant::Q4K.type_for(&[10, 40]), GgmlDType::F32);
        assert_eq!(GgufQuant::Q8_0.type_for(&[10, 40]), GgmlDType::F32);
        assert_eq!(GgufQuant::Q8_0.type_for(&[576]), GgmlDType::F32);
        assert_eq!(GgufQuant::F32.type_for(&[10, 1536]), GgmlDType::F32);
        assert!(GgufQuant::parse("Q4_K").is_ok() && GgufQuant::parse("q3").is_err());
    }
}
