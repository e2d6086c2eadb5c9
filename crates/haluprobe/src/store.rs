//! Feature files: chunks of safetensors plus a JSON manifest, written atomically so that an
//! interrupted extraction resumes from the last complete chunk.
//!
//! Layout of a feature folder:
//! - `manifest.json` ([`Manifest`]): model dimensions, data source, [`ExtractConfig`], the
//!   per-triple shape of every key, and the list of complete chunks;
//! - `chunk-NNNNN.safetensors`: for the `m` triples of that chunk, every key as `[m, ..shape]`
//!   (`hidden.*` in F16, the rest F32), `label` `[m]` F32 (1 = hallucinated) and `row` `[m]`
//!   U32 (the HaluEval row id, for row-level splits);
//! - own-answer folders (`umbra halluc generate`) also hold `answers-NNNNN.jsonl` per chunk
//!   ([`crate::answers::AnswerRecord`]: the question, its aliases, the answer and its label),
//!   and their manifest records how the answers were generated ([`OwnSetup`]); a chunk then
//!   holds one triple per non-empty answer (`row` = question index).
use crate::error::{HaluError, Result};
use crate::keys::{ExtractConfig, Features};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.json";
pub const FORMAT: &str = "umbra-haluprobe-features/1";

/// Dimensions of the model the features come from (checked against probes and models).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelDims {
    pub num_layers: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    pub vocab_size: usize,
}

impl ModelDims {
    pub fn of(cfg: &umbra_model::LlamaConfig) -> Self {
        Self {
            num_layers: cfg.num_hidden_layers,
            hidden_size: cfg.hidden_size,
            num_heads: cfg.num_attention_heads,
            vocab_size: cfg.vocab_size,
        }
    }
}

/// One complete chunk.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChunkInfo {
    pub file: String,
    /// Index of the chunk (rows `index*chunk_rows ..` of the extraction order).
    pub index: usize,
    pub triples: usize,
    /// Own-answer folders: the chunk's answers file and its question count (empty answers
    /// included; they have no triple).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answers: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub questions: Option<usize>,
}

/// How the answers of an own-answer folder were generated (`umbra halluc generate`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OwnSetup {
    /// Question set (`halueval-qa`, `nq-open`, `trivia-qa`, ... or a path).
    pub task: String,
    /// Whether the prompt carries the knowledge passage (HaluEval QA) or is closed book.
    pub knowledge: bool,
    /// Whether the model's chat template wrapped the prompt.
    pub chat: bool,
    /// [`crate::source::model_fingerprint`] of the model that wrote the answers: a folder is
    /// resumed, and its answers re-used, only with the same model.
    pub model_fingerprint: String,
    pub max_new_tokens: usize,
    /// Sampled answers per question (sampling baseline) and their temperature.
    pub samples: usize,
    pub temperature: f32,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub format: String,
    pub model: ModelDims,
    /// Model folder the features were taken from (informational).
    pub model_path: String,
    /// Data source (asset name or path) and seed of the row order.
    pub data: String,
    pub seed: u64,
    pub extract: ExtractConfig,
    pub chunk_rows: usize,
    /// Per-triple shape of every feature key.
    pub keys: BTreeMap<String, Vec<usize>>,
    pub chunks: Vec<ChunkInfo>,
    /// Set in own-answer folders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own: Option<OwnSetup>,
}

impl Manifest {
    /// Whether a resumed run may append to a folder with this manifest.
    ///
    /// A folder written before a feature family existed (e.g. without the `ffn.*` keys) is
    /// another setup: its chunks cannot be mixed with new ones.
    pub fn same_setup(&self, other: &Manifest) -> bool {
        self.format == other.format
            && self.model == other.model
            && self.data == other.data
            && self.seed == other.seed
            && self.extract == other.extract
            && self.chunk_rows == other.chunk_rows
            && self.keys == other.keys
            && self.own == other.own
    }

    pub fn triples(&self) -> usize {
        self.chunks.iter().map(|c| c.triples).sum()
    }
}

pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let p = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&p).map_err(|e| HaluError::io(&p, e))?;
    let m: Manifest = serde_json::from_str(&text).map_err(|e| HaluError::Malformed {
        path: p.clone(),
        what: "feature manifest",
        msg: e.to_string(),
    })?;
    if m.format != FORMAT {
        return Err(HaluError::Malformed {
            path: p,
            what: "feature manifest",
            msg: format!("format `{}`, expected `{FORMAT}`", m.format),
        });
    }
    Ok(m)
}

/// Serializes one chunk (features of `m` triples with their labels and row ids).
pub fn chunk_bytes(
    keys: &BTreeMap<String, Vec<usize>>,
    feats: &[Features],
    labels: &[f32],
    rows: &[u32],
) -> Result<Vec<u8>> {
    let m = feats.len();
    if m == 0 || labels.len() != m || rows.len() != m {
        return Err(HaluError::Input(format!(
            "chunk of {m} triples with {} labels and {} rows",
            labels.len(),
            rows.len()
        )));
    }
    let mut bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (k, shape) in keys {
        let per: usize = shape.iter().product();
        let f16 = k.starts_with("hidden.");
        let mut bytes = Vec::with_capacity(m * per * if f16 { 2 } else { 4 });
        for f in feats {
            let v = f.get(k).filter(|v| v.len() == per).ok_or_else(|| {
                HaluError::FeatureMismatch(format!("key `{k}` missing or wrong size"))
            })?;
            if f16 {
                for x in v {
                    bytes.extend_from_slice(&half::f16::from_f32(*x).to_le_bytes());
                }
            } else {
                for x in v {
                    bytes.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
        let mut s = vec![m];
        s.extend(shape);
        bufs.push((
            k.clone(),
            if f16 { Dtype::F16 } else { Dtype::F32 },
            s,
            bytes,
        ));
    }
    bufs.push((
        "label".into(),
        Dtype::F32,
        vec![m],
        labels.iter().flat_map(|x| x.to_le_bytes()).collect(),
    ));
    bufs.push((
        "row".into(),
        Dtype::U32,
        vec![m],
        rows.iter().flat_map(|x| x.to_le_bytes()).collect(),
    ));
    let views = bufs
        .iter()
        .map(|(k, dt, s, b)| {
            TensorView::new(*dt, s.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| HaluError::Input(format!("tensor `{k}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::tensor::serialize(views, None).map_err(|e| HaluError::Input(e.to_string()))
}

/// A dense `[n, cols]` f32 matrix, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// Rows `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> Matrix {
        let mut data = Vec::with_capacity(idx.len() * self.cols);
        for &i in idx {
            data.extend_from_slice(self.row(i));
        }
        Matrix {
            rows: idx.len(),
            cols: self.cols,
            data,
        }
    }

    /// Columns side by side (same row count).
    pub fn hcat(parts: &[&Matrix]) -> Result<Matrix> {
        let rows = parts.first().map(|m| m.rows).unwrap_or(0);
        if parts.iter().any(|m| m.rows != rows) {
            return Err(HaluError::FeatureMismatch("row counts differ".into()));
        }
        let cols = parts.iter().map(|m| m.cols).sum();
        let mut data = Vec::with_capacity(rows * cols);
        for i in 0..rows {
            for m in parts {
                data.extend_from_slice(m.row(i));
            }
        }
        Ok(Matrix { rows, cols, data })
    }
}

/// A feature folder opened for reading: the manifest plus memory-mapped chunks.
pub struct FeatureStore {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// The chunks with at least one triple, and their memory maps.
    files: Vec<PathBuf>,
    maps: Vec<memmap2::Mmap>,
    pub labels: Vec<f32>,
    pub rows: Vec<u32>,
}

fn malformed(path: &Path, msg: impl Into<String>) -> HaluError {
    HaluError::Malformed {
        path: path.into(),
        what: "feature chunk",
        msg: msg.into(),
    }
}

fn read_f32s(view: &safetensors::tensor::TensorView<'_>) -> Option<Vec<f32>> {
    let b = view.data();
    match view.dtype() {
        Dtype::F32 => Some(
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        Dtype::F16 => Some(
            b.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        Dtype::U32 => Some(
            b.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
                .collect(),
        ),
        _ => None,
    }
}

impl FeatureStore {
    /// Opens and validates a feature folder: manifest, every chunk present with every key at
    /// the manifest's shape, labels in {0, 1}, at least one triple.
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = read_manifest(dir)?;
        if manifest.triples() == 0 {
            return Err(HaluError::Empty(format!(
                "{} holds no triple (run `umbra halluc extract` or `generate` first)",
                dir.display()
            )));
        }
        let mut maps = Vec::new();
        let mut files = Vec::new();
        let mut labels = Vec::new();
        let mut rows = Vec::new();
        for c in manifest.chunks.iter().filter(|c| c.triples > 0) {
            let p = dir.join(&c.file);
            let f = std::fs::File::open(&p).map_err(|e| HaluError::io(&p, e))?;
            // SAFETY: chunks are written once by rename and never modified in place.
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| HaluError::io(&p, e))?;
            {
                let st =
                    SafeTensors::deserialize(&map).map_err(|e| malformed(&p, e.to_string()))?;
                for (k, shape) in &manifest.keys {
                    let v = st
                        .tensor(k)
                        .map_err(|_| malformed(&p, format!("missing key `{k}`")))?;
                    let mut want = vec![c.triples];
                    want.extend(shape);
                    if v.shape() != want.as_slice() {
                        return Err(malformed(
                            &p,
                            format!(
                                "key `{k}` has shape {:?}, manifest says {want:?}",
                                v.shape()
                            ),
                        ));
                    }
                }
                let lab = st
                    .tensor("label")
                    .ok()
                    .and_then(|v| read_f32s(&v))
                    .ok_or_else(|| malformed(&p, "missing or bad `label`"))?;
                let row = st
                    .tensor("row")
                    .ok()
                    .and_then(|v| read_f32s(&v))
                    .ok_or_else(|| malformed(&p, "missing or bad `row`"))?;
                if lab.len() != c.triples || row.len() != c.triples {
                    return Err(malformed(
                        &p,
                        "label/row length differs from the chunk size",
                    ));
                }
                if lab.iter().any(|&l| l != 0.0 && l != 1.0) {
                    return Err(malformed(&p, "labels must be 0 or 1"));
                }
                labels.extend(lab);
                rows.extend(row.into_iter().map(|r| r as u32));
            }
            maps.push(map);
            files.push(p);
        }
        Ok(Self {
            dir: dir.into(),
            manifest,
            files,
            maps,
            labels,
            rows,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Per-triple shape of `key`.
    pub fn shape(&self, key: &str) -> Result<&[usize]> {
        self.manifest
            .keys
            .get(key)
            .map(Vec::as_slice)
            .ok_or_else(|| {
                let family = key.split('.').next().unwrap_or("");
                let has_family = self
                    .manifest
                    .keys
                    .keys()
                    .any(|k| k.split('.').next() == Some(family));
                if family == "ffn" && !has_family {
                    HaluError::FeatureMismatch(format!(
                        "{} has no FFN statistics (`{key}`): it was extracted before the ffn \
                     family existed; re-extract it into a new --out to use ffn features",
                        self.dir.display()
                    ))
                } else {
                    HaluError::FeatureMismatch(format!(
                        "no feature key `{key}` in {}",
                        self.dir.display()
                    ))
                }
            })
    }

    /// `key` for all triples, flattened per triple: `[n, prod(shape)]`.
    pub fn load(&self, key: &str) -> Result<Matrix> {
        let cols: usize = self.shape(key)?.iter().product();
        let mut data = Vec::with_capacity(self.len() * cols);
        for (map, p) in self.maps.iter().zip(&self.files) {
            let p = p.as_path();
            let st = SafeTensors::deserialize(map).map_err(|e| malformed(p, e.to_string()))?;
            let v = st
                .tensor(key)
                .map_err(|_| malformed(p, format!("missing key `{key}`")))?;
            let vals =
                read_f32s(&v).ok_or_else(|| malformed(p, format!("bad dtype for `{key}`")))?;
            if vals.iter().any(|x| !x.is_finite()) {
                return Err(malformed(p, format!("non-finite values in `{key}`")));
            }
            data.extend(vals);
        }
        Ok(Matrix {
            rows: self.len(),
            cols,
            data,
        })
    }

    /// Layer `layer` of a `[L, x]` key: `[n, x]`.
    pub fn load_layer(&self, key: &str, layer: usize) -> Result<Matrix> {
        let shape = self.shape(key)?.to_vec();
        if shape.len() != 2 || layer >= shape[0] {
            return Err(HaluError::FeatureMismatch(format!(
                "key `{key}` of shape {shape:?} has no layer {layer}"
            )));
        }
        let all = self.load(key)?;
        Ok(slice_layer(&all, shape[0], layer))
    }
}

/// Columns of layer `layer` from a `[n, L*x]` matrix.
pub fn slice_layer(all: &Matrix, layers: usize, layer: usize) -> Matrix {
    let x = all.cols / layers;
    let mut data = Vec::with_capacity(all.rows * x);
    for i in 0..all.rows {
        data.extend_from_slice(&all.row(i)[layer * x..(layer + 1) * x]);
    }
    Matrix {
        rows: all.rows,
        cols: x,
        data,
    }
}
