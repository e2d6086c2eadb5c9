//! Checkpoints read one tensor at a time, so that a model whose F32 weights do not fit in memory
//! (Qwen2.5-Coder-1.5B: ~7 GB) can still be compiled, exported and attacked.
//!
//! [`CheckpointSource::open`] parses only the config, the tokenizer and the tensor tables (HF
//! safetensors headers, sharded or not, or the GGUF header) and checks every shape against the
//! config up front ([`umbra_model::checkpoint::expected_shapes`]), so a checkpoint that is
//! missing a tensor, has one of the wrong shape, or is truncated is refused before any work.
//! [`CheckpointSource::read`] then reads, widens to F32 (and for GGUF dequantizes and un-permutes
//! llama.cpp's q/k rows) one tensor; nothing is cached. A loaded [`Weights`] map is a source too
//! ([`CheckpointSource::from_weights`]), which is what the in-memory compiler and the tests use.
use crate::error::{AloeError, Result};
use crate::keyfile::CONFIG_SECTION;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use umbra_model::checkpoint::{expected_shapes, Checkpoint};
use umbra_model::gguf::{gguf_name, unpermute_rows, GgufFile};
use umbra_model::linear::{DenseLinear, Linear, LinearBackend, LinearSpec};
use umbra_model::llama::Llama;
use umbra_model::tokenizer::TextTokenizer;
use umbra_model::{LlamaConfig, ModelError, Weights};

/// Where one safetensors tensor lives.
#[derive(Debug, Clone)]
struct StEntry {
    file: PathBuf,
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte offset of the data in `file`.
    start: u64,
    len: u64,
}

enum Kind {
    Safetensors(BTreeMap<String, StEntry>),
    Gguf {
        file: Box<GgufFile>,
        /// HF name -> GGUF name.
        names: BTreeMap<String, String>,
        /// `llama` files store q/k rows in llama.cpp's interleaved RoPE order.
        unpermute: bool,
    },
    Memory(Weights),
}

/// A checkpoint whose tensors are read on demand (see the module docs).
pub struct CheckpointSource {
    pub config: LlamaConfig,
    pub tokenizer: Option<TextTokenizer>,
    /// The folder or `.gguf` file it was opened from (`memory` for a loaded map).
    pub path: PathBuf,
    kind: Kind,
    /// HF names and shapes of every tensor the source holds.
    shapes: BTreeMap<String, Vec<usize>>,
    read: BTreeSet<String>,
}

impl std::fmt::Debug for CheckpointSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointSource")
            .field("path", &self.path)
            .field("tensors", &self.shapes.len())
            .finish()
    }
}

fn malformed(path: &Path, msg: String) -> AloeError {
    ModelError::Malformed {
        path: path.into(),
        msg,
    }
    .into()
}

fn is_gguf_file(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && &magic == b"GGUF"
}

/// The config of an HF folder or GGUF file, reading no tensor and no tokenizer. For a GGUF file
/// the `umbra.*` metadata an obfuscated export carries ([`crate::gguf_out`]) becomes the
/// config's `umbra` section, so key checks work on both formats.
pub fn read_config(path: &Path) -> Result<LlamaConfig> {
    if is_gguf_file(path) {
        return gguf_config(&GgufFile::open(path)?);
    }
    if path.is_dir() {
        return Ok(LlamaConfig::from_file(&path.join("config.json"))?);
    }
    Ok(Checkpoint::open_config_and_tokenizer(path)?.0)
}

fn gguf_config(g: &GgufFile) -> Result<LlamaConfig> {
    let mut cfg = g.config()?;
    if let Some(section) = crate::gguf_out::umbra_section(g) {
        cfg.extra.insert(CONFIG_SECTION.into(), section);
    }
    Ok(cfg)
}

/// [`read_config`] and the tokenizer (`tokenizer.json` or GGUF metadata), if the checkpoint has
/// one.
pub fn read_config_and_tokenizer(path: &Path) -> Result<(LlamaConfig, Option<TextTokenizer>)> {
    if is_gguf_file(path) {
        let g = GgufFile::open(path)?;
        let tok = if g.meta("tokenizer.ggml.model").is_some() {
            Some(TextTokenizer::from_gguf(&g)?)
        } else {
            None
        };
        return Ok((gguf_config(&g)?, tok));
    }
    Ok(Checkpoint::open_config_and_tokenizer(path)?)
}

impl CheckpointSource {
    /// Opens an HF folder (`model.safetensors` or a sharded index) or a `.gguf` file; checks the
    /// tensor table against the config. No tensor data is read.
    pub fn open(path: &Path) -> Result<Self> {
        let (config, tokenizer) = read_config_and_tokenizer(path)?;
        let kind = if path.is_dir() {
            Kind::Safetensors(safetensors_tables(path)?)
        } else {
            let file = GgufFile::open(path)?;
            let unpermute = file.architecture()? == "llama";
            let mut names = BTreeMap::new();
            for g in file.content.tensor_infos.keys() {
                let hf = umbra_model::gguf::hf_name(g)
                    .ok_or_else(|| ModelError::Gguf(format!("unexpected tensor `{g}`")))?;
                names.insert(hf, g.clone());
            }
            Kind::Gguf {
                file: Box::new(file),
                names,
                unpermute,
            }
        };
        let shapes = match &kind {
            Kind::Safetensors(t) => t
                .iter()
                .map(|(n, e)| (n.clone(), e.shape.clone()))
                .collect(),
            Kind::Gguf { file, names, .. } => names
                .iter()
                .map(|(hf, g)| {
                    (
                        hf.clone(),
                        file.content.tensor_infos[g].shape.dims().to_vec(),
                    )
                })
                .collect(),
            Kind::Memory(_) => unreachable!("opened from a path"),
        };
        if let Kind::Gguf { file, .. } = &kind {
            check_gguf_sizes(file)?;
        }
        let src = Self {
            config,
            tokenizer,
            path: path.into(),
            kind,
            shapes,
            read: BTreeSet::new(),
        };
        src.validate()?;
        Ok(src)
    }

    /// A loaded checkpoint as a source (tensors are handed out as cheap clones).
    pub fn from_weights(
        config: LlamaConfig,
        weights: Weights,
        tokenizer: Option<TextTokenizer>,
    ) -> Result<Self> {
        let shapes = weights
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect();
        let src = Self {
            config,
            tokenizer,
            path: "memory".into(),
            kind: Kind::Memory(weights),
            shapes,
            read: BTreeSet::new(),
        };
        src.validate()?;
        Ok(src)
    }

    fn validate(&self) -> Result<()> {
        let expected = expected_shapes(&self.config);
        for (name, shape) in &expected {
            let got = self
                .shapes
                .get(name)
                .ok_or_else(|| ModelError::MissingTensor(name.clone()))?;
            if got != shape {
                return Err(ModelError::Mismatch(format!(
                    "tensor `{name}` has shape {got:?}, config expects {shape:?}"
                ))
                .into());
            }
        }
        let known: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        for (name, shape) in &self.shapes {
            let tied_head = name == "lm_head.weight"
                && self.config.tie_word_embeddings
                && shape == &[self.config.vocab_size, self.config.hidden_size];
            if !known.contains(name.as_str()) && !tied_head {
                return Err(ModelError::Mismatch(format!(
                    "unexpected tensor `{name}` {shape:?} for a {} model with {} layers",
                    self.config.model_type, self.config.num_hidden_layers
                ))
                .into());
            }
        }
        Ok(())
    }

    /// HF names of every tensor, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.shapes.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }

    /// HF shape of `name`.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        self.shapes
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| ModelError::MissingTensor(name.into()).into())
    }

    /// The opened GGUF file, when the source is one (its tokenizer metadata is copied into GGUF
    /// exports).
    pub fn gguf(&self) -> Option<&GgufFile> {
        match &self.kind {
            Kind::Gguf { file, .. } => Some(file),
            _ => None,
        }
    }

    /// Names never read so far (the compiler refuses a checkpoint with tensors it did not use).
    pub fn unread(&self) -> Vec<&str> {
        self.names().filter(|n| !self.read.contains(*n)).collect()
    }

    /// Reads tensor `name` as F32 on the CPU, in HF layout (`[out, in]`).
    pub fn read(&mut self, name: &str) -> Result<Tensor> {
        let t = match &self.kind {
            Kind::Memory(w) => w
                .get(name)
                .ok_or_else(|| ModelError::MissingTensor(name.into()))?
                .to_dtype(DType::F32)?,
            Kind::Safetensors(tables) => {
                let e = tables
                    .get(name)
                    .ok_or_else(|| ModelError::MissingTensor(name.into()))?;
                read_safetensors_entry(name, e)?
            }
            Kind::Gguf {
                file,
                names,
                unpermute,
            } => {
                let g = names
                    .get(name)
                    .ok_or_else(|| ModelError::MissingTensor(name.into()))?;
                let mut f =
                    std::fs::File::open(&file.path).map_err(|e| AloeError::io(&file.path, e))?;
                let q = file
                    .content
                    .tensor(&mut f, g, &Device::Cpu)
                    .map_err(|e| malformed(&file.path, format!("tensor `{g}`: {e}")))?;
                let mut t = q.dequantize(&Device::Cpu)?;
                if *unpermute {
                    let heads = if name.contains("q_proj.") {
                        Some(self.config.num_attention_heads)
                    } else if name.contains("k_proj.") {
                        Some(self.config.num_kv_heads())
                    } else {
                        None
                    };
                    if let Some(h) = heads {
                        t = unpermute_rows(&t, h)?;
                    }
                }
                t
            }
        };
        self.read.insert(name.to_string());
        Ok(t)
    }

    /// Reads every tensor into a map (small models, or when the whole checkpoint is needed).
    pub fn read_all(&mut self) -> Result<Weights> {
        let names: Vec<String> = self.shapes.keys().cloned().collect();
        names
            .into_iter()
            .map(|n| Ok((n.clone(), self.read(&n)?)))
            .collect()
    }

    /// F32 parameters held by the source.
    pub fn parameters(&self) -> usize {
        self.shapes
            .values()
            .map(|s| s.iter().product::<usize>())
            .sum()
    }
}

impl CheckpointSource {
    /// Builds the engine (F32 weights, every linear map dense) reading one tensor at a time, so
    /// that peak memory is about the model itself rather than the map plus the model's fused
    /// q|k|v and gate|up copies. Refuses a split-mode part, like `Llama::new`.
    pub fn load_model(mut self, device: &Device) -> Result<Llama> {
        if self.config.part() != umbra_model::ModelPart::Full {
            return Err(AloeError::Input(format!(
                "{} is the {} part of a split-mode model, not a whole model",
                self.path.display(),
                self.config.part().as_str()
            )));
        }
        let mut shared = Weights::new();
        let names: Vec<String> = self
            .names()
            .filter(|n| n.ends_with("norm.weight") || *n == "model.embed_tokens.weight")
            .map(str::to_string)
            .collect();
        for n in names {
            let t = self.read(&n)?;
            shared.insert(n, t);
        }
        let cfg = self.config.clone();
        let backend = SourceBackend {
            src: std::sync::Mutex::new(&mut self),
            shared: &shared,
            device,
        };
        Ok(Llama::with_backend(&cfg, &shared, device, &backend)?)
    }
}

/// Dense linear maps read from a source as the model is built (see
/// [`CheckpointSource::load_model`]); tensors in `shared` (the embedding, for a tied head) are
/// not read twice.
struct SourceBackend<'a> {
    src: std::sync::Mutex<&'a mut CheckpointSource>,
    shared: &'a Weights,
    device: &'a Device,
}

impl SourceBackend<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> umbra_model::Result<Tensor> {
        let t = match self.shared.get(name) {
            Some(t) => t.clone(),
            None => {
                let mut src = self
                    .src
                    .lock()
                    .map_err(|_| ModelError::Input("checkpoint source poisoned".into()))?;
                src.read(name)
                    .map_err(|e| ModelError::Input(e.to_string()))?
            }
        };
        if t.dims() != shape {
            return Err(ModelError::Mismatch(format!(
                "tensor `{name}` has shape {:?}, config implies {shape:?}",
                t.dims()
            )));
        }
        Ok(t.to_device(self.device)?)
    }
}

impl LinearBackend for SourceBackend<'_> {
    fn build(&self, spec: &LinearSpec) -> umbra_model::Result<Arc<dyn Linear>> {
        let (mut ws, mut bs) = (vec![], vec![]);
        for p in &spec.parts {
            let w = self.get(&p.name, &[p.rows, spec.in_features])?;
            ws.push(if p.scale == 1.0 { w } else { (w * p.scale)? });
            if spec.has_bias() {
                let b = match &p.bias {
                    Some(n) => self.get(n, &[p.rows])?,
                    None => Tensor::zeros(p.rows, DType::F32, self.device)?,
                };
                bs.push(if p.scale == 1.0 { b } else { (b * p.scale)? });
            }
        }
        let w = if ws.len() == 1 {
            ws.pop().expect("one part")
        } else {
            Tensor::cat(&ws, 0)?
        };
        let b = match bs.len() {
            0 => None,
            1 => bs.pop(),
            _ => Some(Tensor::cat(&bs, 0)?),
        };
        Ok(Arc::new(DenseLinear::new(w, b)?))
    }

    fn name(&self) -> &str {
        "f32"
    }
}

/// The GGUF name of an HF tensor, for messages.
pub fn gguf_name_of(hf: &str) -> String {
    gguf_name(hf).unwrap_or_else(|| hf.to_string())
}

fn check_gguf_sizes(file: &GgufFile) -> Result<()> {
    let len = std::fs::metadata(&file.path)
        .map_err(|e| AloeError::io(&file.path, e))?
        .len();
    for (name, info) in &file.content.tensor_infos {
        let dt = info.ggml_dtype;
        let elems = info.shape.elem_count();
        if !elems.is_multiple_of(dt.block_size()) {
            return Err(malformed(
                &file.path,
                format!("tensor `{name}`: {elems} elements do not fill {dt:?} blocks"),
            ));
        }
        let bytes = (elems / dt.block_size() * dt.type_size()) as u64;
        let end = file.content.tensor_data_offset + info.offset + bytes;
        if end > len {
            return Err(malformed(
                &file.path,
                format!("tensor `{name}` ends at byte {end} but the file has {len} (truncated?)"),
            ));
        }
    }
    Ok(())
}

fn read_safetensors_entry(name: &str, e: &StEntry) -> Result<Tensor> {
    let mut f = std::fs::File::open(&e.file).map_err(|err| AloeError::io(&e.file, err))?;
    f.seek(SeekFrom::Start(e.start))
        .map_err(|err| AloeError::io(&e.file, err))?;
    let mut buf = vec![0u8; e.len as usize];
    f.read_exact(&mut buf)
        .map_err(|err| AloeError::io(&e.file, err))?;
    Tensor::from_raw_buffer(&buf, e.dtype, &e.shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .map_err(|err| malformed(&e.file, format!("tensor `{name}`: {err}")))
}

/// The tensor tables of an HF folder: `model.safetensors`, or the shards of its index.
fn safetensors_tables(dir: &Path) -> Result<BTreeMap<String, StEntry>> {
    use umbra_model::weights::{INDEX_FILE, SINGLE_FILE};
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return header_entries(&single);
    }
    let index = dir.join(INDEX_FILE);
    if !index.is_file() {
        return Err(malformed(
            dir,
            format!("neither {SINGLE_FILE} nor {INDEX_FILE} found"),
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| AloeError::io(&index, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| malformed(&index, format!("invalid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| malformed(&index, "no `weight_map` object".into()))?;
    let mut shards = BTreeSet::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| malformed(&index, format!("`{name}`: shard is not a string")))?;
        if file.contains("..") || Path::new(file).is_absolute() {
            return Err(malformed(
                &index,
                format!("shard `{file}` escapes the folder"),
            ));
        }
        shards.insert(file.to_string());
    }
    let mut out = BTreeMap::new();
    for shard in shards {
        let path = dir.join(&shard);
        for (name, e) in header_entries(&path)? {
            if out.insert(name.clone(), e).is_some() {
                return Err(malformed(
                    &path,
                    format!("tensor `{name}` is in two shards"),
                ));
            }
        }
    }
    for name in map.keys() {
        if !is_ignored(name) && !out.contains_key(name) {
            return Err(malformed(
                &index,
                format!("tensor `{name}` is listed but missing from its shard"),
            ));
        }
    }
    Ok(out)
}

fn is_ignored(name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq")
}

/// Parses one safetensors header and checks every entry against the file's length.
fn header_entries(path: &Path) -> Result<BTreeMap<String, StEntry>> {
    let bad = |m: String| malformed(path, m);
    let mut f = std::fs::File::open(path).map_err(|e| AloeError::io(path, e))?;
    let file_len = f.metadata().map_err(|e| AloeError::io(path, e))?.len();
    let mut len8 = [0u8; 8];
    f.read_exact(&mut len8)
        .map_err(|_| bad("safetensors: file is shorter than its header".into()))?;
    let header_len = u64::from_le_bytes(len8);
    if header_len > 100_000_000 || 8 + header_len > file_len {
        return Err(bad(format!(
            "safetensors: header length {header_len} exceeds the file ({file_len} bytes)"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header)
        .map_err(|e| AloeError::io(path, e))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("safetensors: invalid header JSON: {e}")))?;
    let data_start = 8 + header_len;
    let mut out = BTreeMap::new();
    for (name, info) in &header {
        if name == "__metadata__" || is_ignored(name) {
            continue;
        }
        let tbad = |m: &str| bad(format!("tensor `{name}`: {m}"));
        let dtype = match info.get("dtype").and_then(|d| d.as_str()) {
            Some("F32") => DType::F32,
            Some("F16") => DType::F16,
            Some("BF16") => DType::BF16,
            Some(o) => return Err(tbad(&format!("unsupported dtype {o} (F32/F16/BF16 only)"))),
            None => return Err(tbad("no dtype")),
        };
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| tbad("no shape"))?
            .iter()
            .map(|d| {
                d.as_u64()
                    .map(|d| d as usize)
                    .ok_or_else(|| tbad("bad shape"))
            })
            .collect::<Result<_>>()?;
        let offs: Vec<u64> = info
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .ok_or_else(|| tbad("no data_offsets"))?
            .iter()
            .map(|d| d.as_u64().ok_or_else(|| tbad("bad data_offsets")))
            .collect::<Result<_>>()?;
        let [begin, end] = offs[..] else {
            return Err(tbad("data_offsets must have two entries"));
        };
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| tbad("shape overflows"))?;
        let nbytes = numel as u64 * dtype.size_in_bytes() as u64;
        if end < begin || end - begin != nbytes {
            return Err(tbad(&format!(
                "data_offsets {begin}..{end} do not match shape {shape:?}"
            )));
        }
        if data_start + end > file_len {
            return Err(tbad(&format!(
                "data ends at byte {} but the file has {file_len} (truncated?)",
                data_start + end
            )));
        }
        out.insert(
            name.clone(),
            StEntry {
                file: path.into(),
                dtype,
                shape,
                start: data_start + begin,
                len: nbytes,
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use umbra_model::testing::{max_abs_diff, random_weights, tiny_config};

    #[test]
    fn hf_folder_reads_tensor_by_tensor_and_refuses_bad_tables() {
        let cfg = tiny_config(32, 4, 2, 2, 64);
        let w = random_weights(&cfg, 1);
        let dir = tempfile::tempdir().unwrap();
        let ck = Checkpoint {
            config: cfg.clone(),
            weights: w.clone(),
            tokenizer: None,
            source: "x".into(),
        };
        let p = dir.path().join("m");
        ck.save_hf(&p, false).unwrap();
        let mut src = CheckpointSource::open(&p).unwrap();
        assert_eq!(src.names().count(), w.len());
        let name = "model.layers.1.mlp.up_proj.weight";
        assert_eq!(max_abs_diff(&src.read(name).unwrap(), &w[name]), 0.0);
        assert_eq!(src.unread().len(), w.len() - 1);
        assert_eq!(src.read_all().unwrap().len(), w.len());
        assert!(src.unread().is_empty());

        // Truncated: refused at open, before any tensor is read.
        let st = p.join("model.safetensors");
        let len = std::fs::metadata(&st).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&st).unwrap();
        f.set_len(len - 10).unwrap();
        let err = CheckpointSource::open(&p).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");

        // The engine built tensor by tensor equals the one built from the map.
        let ids = Tensor::new(&[[3u32, 9, 27, 5]], &Device::Cpu).unwrap();
        let run = |m: &Llama| {
            m.forward(
                umbra_model::Input::Ids(&ids),
                &mut m.new_cache(),
                umbra_model::Forward::logits(),
            )
            .unwrap()
        };
        let a = run(&Llama::new(&cfg, &w, &Device::Cpu).unwrap());
        let src = CheckpointSource::from_weights(cfg.clone(), w.clone(), None).unwrap();
        let b = run(&src.load_model(&Device::Cpu).unwrap());
        assert_eq!(max_abs_diff(&a, &b), 0.0);

        // A missing tensor.
        let mut w2 = w.clone();
        w2.remove("model.norm.weight");
        assert!(CheckpointSource::from_weights(cfg, w2, None).is_err());
    }
}
