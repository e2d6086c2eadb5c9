//! Probes on candle: logistic regression and a small MLP over standardized features, and the
//! probe file (safetensors + JSON metadata) that ties a probe to its model and features.
//!
//! A probe computes `p = σ(f(z))`, `z = (x - μ) ⊙ s` with `μ`, `s = 1/σ` fitted on the training
//! rows; logreg: `f(z) = w·z + b`; MLP: ReLU layers (SAPLMA: 256-128-64) then a linear output.
//! Training minimizes mean binary cross-entropy `+ l2 · Σ‖W‖²` with Adam.
use crate::error::{HaluError, Result};
use crate::keys::{key_shapes, ExtractConfig, Features, Stage};
use crate::store::{Matrix, ModelDims};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::path::Path;
use umbra_common::fs::write_atomic;

/// Probe family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    Logreg,
    Mlp,
}

/// Training hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub kind: ProbeKind,
    /// Hidden widths of the MLP (ignored for logreg).
    pub hidden: Vec<usize>,
    pub epochs: usize,
    /// Mini-batch size (0 = full batch).
    pub batch: usize,
    pub lr: f64,
    pub l2: f64,
    pub seed: u64,
}

impl TrainConfig {
    /// Full-batch Adam logistic regression.
    pub fn logreg(l2: f64) -> Self {
        Self {
            kind: ProbeKind::Logreg,
            hidden: vec![],
            epochs: 150,
            batch: 0,
            lr: 0.02,
            l2,
            seed: 0,
        }
    }

    /// MLP with the given hidden widths (SAPLMA: `[256, 128, 64]`).
    pub fn mlp(hidden: Vec<usize>) -> Self {
        Self {
            kind: ProbeKind::Mlp,
            hidden,
            epochs: 30,
            batch: 128,
            lr: 1e-3,
            l2: 1e-4,
            seed: 0,
        }
    }
}

/// A trained network with its input standardization.
#[derive(Debug, Clone)]
pub struct Net {
    pub kind: ProbeKind,
    pub mean: Vec<f32>,
    pub inv_std: Vec<f32>,
    /// `(w [out, in], b [out])` per layer; the last has `out = 1`.
    pub layers: Vec<(Tensor, Tensor)>,
}

fn standardize(x: &Matrix, mean: &[f32], inv_std: &[f32]) -> Result<Tensor> {
    if x.cols != mean.len() {
        return Err(HaluError::FeatureMismatch(format!(
            "{} feature columns, the probe expects {}",
            x.cols,
            mean.len()
        )));
    }
    let mut z = x.data.clone();
    for r in z.chunks_exact_mut(x.cols) {
        for ((v, m), s) in r.iter_mut().zip(mean).zip(inv_std) {
            *v = (*v - m) * s;
        }
    }
    Ok(Tensor::from_vec(z, (x.rows, x.cols), &Device::Cpu)?)
}

fn forward(layers: &[(Tensor, Tensor)], z: &Tensor) -> Result<Tensor> {
    let mut h = z.clone();
    for (i, (w, b)) in layers.iter().enumerate() {
        h = h.matmul(&w.t()?)?.broadcast_add(b)?;
        if i + 1 < layers.len() {
            h = h.relu()?;
        }
    }
    Ok(h.squeeze(1)?)
}

/// Mean binary cross-entropy from logits, stable for large `|z|`:
/// `mean(max(z,0) + log(1 + e^{-|z|}) - y z)`.
fn bce_with_logits(z: &Tensor, y: &Tensor) -> Result<Tensor> {
    let sp = (z.relu()? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    Ok((sp - (y * z)?)?.mean_all()?)
}

impl Net {
    /// Fits on `x` `[n, f]` with labels `y` (0/1).
    pub fn fit(x: &Matrix, y: &[f32], cfg: &TrainConfig) -> Result<Net> {
        if x.rows == 0 || x.cols == 0 || y.len() != x.rows {
            return Err(HaluError::Empty(format!(
                "cannot train on {} rows x {} features with {} labels",
                x.rows,
                x.cols,
                y.len()
            )));
        }
        if !y.iter().any(|&l| l > 0.5) || !y.iter().any(|&l| l <= 0.5) {
            return Err(HaluError::Empty(
                "training labels hold only one class".into(),
            ));
        }
        let f = x.cols;
        let n = x.rows as f64;
        let mut mean = vec![0f64; f];
        let mut sq = vec![0f64; f];
        for r in x.data.chunks_exact(f) {
            for (j, v) in r.iter().enumerate() {
                mean[j] += *v as f64;
                sq[j] += (*v as f64) * (*v as f64);
            }
        }
        let mean: Vec<f32> = mean.iter().map(|m| (m / n) as f32).collect();
        let inv_std: Vec<f32> = sq
            .iter()
            .zip(&mean)
            .map(|(s, m)| {
                let var = (s / n - (*m as f64) * (*m as f64)).max(0.0);
                if var > 1e-12 {
                    (1.0 / var.sqrt()) as f32
                } else {
                    1.0
                }
            })
            .collect();
        let z = standardize(x, &mean, &inv_std)?;
        let yt = Tensor::from_vec(y.to_vec(), x.rows, &Device::Cpu)?;
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let widths: Vec<usize> = match cfg.kind {
            ProbeKind::Logreg => vec![f, 1],
            ProbeKind::Mlp => std::iter::once(f)
                .chain(cfg.hidden.iter().copied())
                .chain(std::iter::once(1))
                .collect(),
        };
        let mut vars = Vec::new();
        for w in widths.windows(2) {
            let (fi, fo) = (w[0], w[1]);
            let a = (6.0 / (fi + fo) as f32).sqrt();
            let init: Vec<f32> = if cfg.kind == ProbeKind::Logreg {
                vec![0.0; fi * fo]
            } else {
                (0..fi * fo).map(|_| rng.random_range(-a..a)).collect()
            };
            let wv = Var::from_tensor(&Tensor::from_vec(init, (fo, fi), &Device::Cpu)?)?;
            let bv = Var::from_tensor(&Tensor::zeros(fo, DType::F32, &Device::Cpu)?)?;
            vars.push((wv, bv));
        }
        let params: Vec<Var> = vars
            .iter()
            .flat_map(|(w, b)| [w.clone(), b.clone()])
            .collect();
        let mut opt = candle_nn::AdamW::new(
            params,
            candle_nn::ParamsAdamW {
                lr: cfg.lr,
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        let bs = if cfg.batch == 0 {
            x.rows
        } else {
            cfg.batch.min(x.rows)
        };
        let mut order: Vec<u32> = (0..x.rows as u32).collect();
        for _ in 0..cfg.epochs.max(1) {
            if bs < x.rows {
                use rand::seq::SliceRandom;
                order.shuffle(&mut rng);
            }
            for start in (0..x.rows).step_by(bs) {
                let (zb, yb) = if bs < x.rows {
                    let end = (start + bs).min(x.rows);
                    let idx = Tensor::from_slice(&order[start..end], end - start, &Device::Cpu)?;
                    (z.index_select(&idx, 0)?, yt.index_select(&idx, 0)?)
                } else {
                    (z.clone(), yt.clone())
                };
                let layers: Vec<(Tensor, Tensor)> = vars
                    .iter()
                    .map(|(w, b)| (w.as_tensor().clone(), b.as_tensor().clone()))
                    .collect();
                let logits = forward(&layers, &zb)?;
                let mut loss = bce_with_logits(&logits, &yb)?;
                if cfg.l2 > 0.0 {
                    for (w, _) in &vars {
                        loss = (loss + (w.as_tensor().sqr()?.sum_all()? * cfg.l2)?)?;
                    }
                }
                opt.backward_step(&loss)?;
            }
        }
        Ok(Net {
            kind: cfg.kind,
            mean,
            inv_std,
            layers: vars
                .iter()
                .map(|(w, b)| (w.as_tensor().detach(), b.as_tensor().detach()))
                .collect(),
        })
    }

    /// Pre-sigmoid outputs `f(z)` for the rows of `x`.
    pub fn logits(&self, x: &Matrix) -> Result<Vec<f32>> {
        let z = standardize(x, &self.mean, &self.inv_std)?;
        Ok(forward(&self.layers, &z)?.to_vec1::<f32>()?)
    }

    /// Hallucination probabilities for the rows of `x`.
    pub fn predict(&self, x: &Matrix) -> Result<Vec<f32>> {
        let z = standardize(x, &self.mean, &self.inv_std)?;
        let logits = forward(&self.layers, &z)?;
        Ok(candle_nn::ops::sigmoid(&logits)?.to_vec1::<f32>()?)
    }

    pub fn input_dim(&self) -> usize {
        self.mean.len()
    }
}

/// One block of probe inputs: a feature key, optionally one layer of an `[L, x]` key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct FeatureRef {
    pub key: String,
    pub layer: Option<usize>,
}

impl FeatureRef {
    pub fn new(key: &str, layer: Option<usize>) -> Self {
        Self {
            key: key.into(),
            layer,
        }
    }

    /// `key` or `key@L12`.
    pub fn label(&self) -> String {
        match self.layer {
            Some(l) => format!("{}@L{l}", self.key),
            None => self.key.clone(),
        }
    }

    /// Parses `family:L<layer>:<stage>[.selection]` or a raw key with optional `@L<layer>`:
    /// `hidden:L12:query` -> `hidden.query.mean` layer 12, `hidden:L20:generation.last`,
    /// `lookback:generation` -> `lookback.generation.mean`, `logit` -> `logit.generation`,
    /// `ffn:generation.mean` (or `ffn`) -> `ffn.generation.mean` (all layers),
    /// `ffn:L5:query` -> `ffn.query.mean` layer 5.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || {
            HaluError::Input(format!(
                "bad feature selector `{s}` (e.g. hidden:L12:query, lookback:generation, \
                 ffn:generation.mean, ffn:L5:generation.last, logit)"
            ))
        };
        if let Some((k, l)) = s.split_once("@L") {
            return Ok(Self::new(k, Some(l.parse().map_err(|_| bad())?)));
        }
        let parts: Vec<&str> = s.split(':').collect();
        let (family, layer, stage) = match parts.as_slice() {
            [f] => (*f, None, None),
            [f, st] if !st.starts_with('L') => (*f, None, Some(*st)),
            [f, l] => (*f, Some(*l), None),
            [f, l, st] => (*f, Some(*l), Some(*st)),
            _ => return Err(bad()),
        };
        let layer = layer
            .map(|l| {
                l.strip_prefix('L')
                    .and_then(|x| x.parse().ok())
                    .ok_or_else(bad)
            })
            .transpose()?;
        let stage = stage.unwrap_or(match family {
            "hidden" => "query",
            _ => "generation",
        });
        let key = match (family, stage) {
            ("hidden", st) if st.contains('.') => format!("hidden.{st}"),
            ("hidden", st) => format!("hidden.{st}.mean"),
            ("lookback", "query") => "lookback.query".into(),
            ("lookback", st) if st.contains('.') => format!("lookback.{st}"),
            ("lookback", st) => format!("lookback.{st}.mean"),
            ("ffn", st) if st.contains('.') => format!("ffn.{st}"),
            ("ffn", st) => format!("ffn.{st}.mean"),
            ("logit", _) => "logit.generation".into(),
            ("llmcheck", _) => "llmcheck.generation".into(),
            _ => return Err(bad()),
        };
        Ok(Self::new(&key, layer))
    }
}

/// Everything a probe file records besides its weights.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProbeMeta {
    pub format: String,
    pub kind: ProbeKind,
    /// Inputs, concatenated in this order.
    pub features: Vec<FeatureRef>,
    /// The stage the score is computed at (the latest stage among the inputs).
    pub stage: Stage,
    pub model: ModelDims,
    pub extract: ExtractConfig,
    /// Decision threshold on the probability (chosen on the validation split).
    pub threshold: f32,
    /// Set when the probe was transformed for an obfuscated checkpoint (`umbra obfuscate
    /// --halluc-probe`, [`crate::obfuscated`]): it then reads that checkpoint's obfuscated states
    /// and is refused on any other model. Absent in plaintext probes (older files load as such).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub obfuscated: Option<ObfuscatedFor>,
}

/// The obfuscated checkpoint a transformed probe belongs to.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ObfuscatedFor {
    /// Key fingerprint recorded in the obfuscated checkpoint's `config.json` (never the key).
    pub key_fingerprint: String,
    /// Whether the key is exact (then the score equals the plaintext score up to rounding).
    pub exact: bool,
    /// Hidden size of the plaintext model the probe was trained on.
    pub plain_hidden_size: usize,
}

pub const PROBE_FORMAT: &str = "umbra-haluprobe/1";
const META_KEY: &str = "umbra.haluprobe";

/// A probe with its metadata.
#[derive(Debug, Clone)]
pub struct ProbeFile {
    pub meta: ProbeMeta,
    pub net: Net,
}

/// Flat input row of one triple for `refs` (shapes from [`key_shapes`] of `dims`).
pub fn gather(features: &Features, refs: &[FeatureRef], dims: &ModelDims) -> Result<Vec<f32>> {
    let shapes = key_shapes(dims.num_layers, dims.hidden_size, dims.num_heads);
    let mut out = Vec::new();
    for r in refs {
        let shape = shapes.get(&r.key).ok_or_else(|| {
            HaluError::FeatureMismatch(format!("unknown feature key `{}`", r.key))
        })?;
        let v = features
            .get(&r.key)
            .ok_or_else(|| HaluError::FeatureMismatch(format!("feature `{}` missing", r.key)))?;
        let per: usize = shape.iter().product();
        if v.len() != per {
            return Err(HaluError::FeatureMismatch(format!(
                "feature `{}` has {} values, expected {per}",
                r.key,
                v.len()
            )));
        }
        match r.layer {
            None => out.extend_from_slice(v),
            Some(l) if shape.len() == 2 && l < shape[0] => {
                out.extend_from_slice(&v[l * shape[1]..(l + 1) * shape[1]])
            }
            Some(l) => {
                return Err(HaluError::FeatureMismatch(format!(
                    "feature `{}` of shape {shape:?} has no layer {l}",
                    r.key
                )))
            }
        }
    }
    Ok(out)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl ProbeFile {
    /// Writes weights and metadata as one safetensors file, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = vec![
            (
                "mean".into(),
                vec![self.net.mean.len()],
                f32_bytes(&self.net.mean),
            ),
            (
                "inv_std".into(),
                vec![self.net.inv_std.len()],
                f32_bytes(&self.net.inv_std),
            ),
        ];
        for (i, (w, b)) in self.net.layers.iter().enumerate() {
            bufs.push((
                format!("w{i}"),
                w.dims().to_vec(),
                f32_bytes(&w.flatten_all()?.to_vec1()?),
            ));
            bufs.push((format!("b{i}"), b.dims().to_vec(), f32_bytes(&b.to_vec1()?)));
        }
        let views = bufs
            .iter()
            .map(|(k, s, b)| {
                TensorView::new(Dtype::F32, s.clone(), b)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| HaluError::Input(e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let meta =
            serde_json::to_string(&self.meta).map_err(|e| HaluError::Input(e.to_string()))?;
        let md: HashMap<String, String> = [(META_KEY.to_string(), meta)].into();
        let bytes = safetensors::tensor::serialize(views, Some(md))
            .map_err(|e| HaluError::Input(e.to_string()))?;
        Ok(write_atomic(path, &bytes)?)
    }

    /// Reads and validates a probe file (metadata, tensor shapes, layer chain).
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| HaluError::io(path, e))?;
        let bad = |msg: String| HaluError::Malformed {
            path: path.into(),
            what: "probe file",
            msg,
        };
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let meta_s = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .ok_or_else(|| bad(format!("no `{META_KEY}` metadata (not a HaluProbe probe)")))?;
        let meta: ProbeMeta = serde_json::from_str(meta_s).map_err(|e| bad(e.to_string()))?;
        if meta.format != PROBE_FORMAT {
            return Err(bad(format!(
                "format `{}`, expected `{PROBE_FORMAT}`",
                meta.format
            )));
        }
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let get = |k: &str| -> Result<(Vec<usize>, Vec<f32>)> {
            let v = st
                .tensor(k)
                .map_err(|_| bad(format!("missing tensor `{k}`")))?;
            if v.dtype() != Dtype::F32 {
                return Err(bad(format!("tensor `{k}` is not F32")));
            }
            Ok((
                v.shape().to_vec(),
                v.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ))
        };
        let (_, mean) = get("mean")?;
        let (_, inv_std) = get("inv_std")?;
        if mean.len() != inv_std.len() || mean.is_empty() {
            return Err(bad("mean/inv_std sizes differ".into()));
        }
        let mut layers = Vec::new();
        let mut fan_in = mean.len();
        let mut i = 0;
        while let Ok(v) = st.tensor(&format!("w{i}")) {
            let _ = v;
            let (ws, w) = get(&format!("w{i}"))?;
            let (bs, b) = get(&format!("b{i}"))?;
            if ws.len() != 2 || ws[1] != fan_in || bs != [ws[0]] {
                return Err(bad(format!(
                    "layer {i} has shapes {ws:?} / {bs:?} after width {fan_in}"
                )));
            }
            fan_in = ws[0];
            layers.push((
                Tensor::from_vec(w, (ws[0], ws[1]), &Device::Cpu)?,
                Tensor::from_vec(b, bs[0], &Device::Cpu)?,
            ));
            i += 1;
        }
        if layers.is_empty() || fan_in != 1 {
            return Err(bad(
                "no layers, or the last layer does not output one logit".into(),
            ));
        }
        let probe = ProbeFile {
            net: Net {
                kind: meta.kind,
                mean,
                inv_std,
                layers,
            },
            meta,
        };
        let want: usize = probe.expected_input_dim()?;
        if want != probe.net.input_dim() {
            return Err(bad(format!(
                "weights take {} inputs, the listed features give {want}",
                probe.net.input_dim()
            )));
        }
        Ok(probe)
    }

    fn expected_input_dim(&self) -> Result<usize> {
        let d = &self.meta.model;
        let shapes = key_shapes(d.num_layers, d.hidden_size, d.num_heads);
        let mut n = 0;
        for r in &self.meta.features {
            let s = shapes.get(&r.key).ok_or_else(|| {
                HaluError::FeatureMismatch(format!("unknown feature key `{}`", r.key))
            })?;
            n += match r.layer {
                Some(_) if s.len() == 2 => s[1],
                Some(l) => {
                    return Err(HaluError::FeatureMismatch(format!(
                        "feature `{}` has no layer {l}",
                        r.key
                    )))
                }
                None => s.iter().product(),
            };
        }
        Ok(n)
    }

    /// Errors unless the probe was trained on (or transformed for) a model with these
    /// dimensions, and a transformed probe is used only on the obfuscated checkpoint of its key
    /// (a plaintext probe is refused on an obfuscated model and vice versa).
    pub fn check_model(&self, cfg: &umbra_model::LlamaConfig) -> Result<()> {
        let model_fp = umbra_aloepri::compiler::recorded_fingerprint(cfg);
        match (&self.meta.obfuscated, model_fp) {
            (None, Some(fp)) => {
                return Err(HaluError::ProbeMismatch(format!(
                    "this is a plaintext probe but the model is obfuscated (key {fp}); transform \
                     the probe with `umbra obfuscate ... --halluc-probe` or `umbra halluc \
                     obfuscate-probe`"
                )))
            }
            (Some(o), None) => {
                return Err(HaluError::ProbeMismatch(format!(
                    "this probe was transformed for an obfuscated checkpoint (key {}) but the \
                     model is plaintext; use the original probe",
                    o.key_fingerprint
                )))
            }
            (Some(o), Some(fp)) if o.key_fingerprint != fp => {
                return Err(HaluError::ProbeMismatch(format!(
                    "this probe was transformed for the obfuscated checkpoint of key {}, the \
                     model was obfuscated with key {fp}",
                    o.key_fingerprint
                )))
            }
            _ => {}
        }
        let m = ModelDims::of(cfg);
        let p = &self.meta.model;
        if m.num_layers != p.num_layers
            || m.hidden_size != p.hidden_size
            || m.num_heads != p.num_heads
        {
            return Err(HaluError::ProbeMismatch(format!(
                "probe was trained on a model with {} layers, hidden size {}, {} heads; this model has {} layers, hidden size {}, {} heads",
                p.num_layers, p.hidden_size, p.num_heads, m.num_layers, m.hidden_size, m.num_heads
            )));
        }
        Ok(())
    }

    /// Pre-sigmoid probe output for one triple's features.
    pub fn logit(&self, features: &Features) -> Result<f32> {
        let row = gather(features, &self.meta.features, &self.meta.model)?;
        let x = Matrix {
            rows: 1,
            cols: row.len(),
            data: row,
        };
        Ok(self.net.logits(&x)?[0])
    }

    /// Probability that the answer is hallucinated, from one triple's features.
    pub fn score(&self, features: &Features) -> Result<f32> {
        let row = gather(features, &self.meta.features, &self.meta.model)?;
        let x = Matrix {
            rows: 1,
            cols: row.len(),
            data: row,
        };
        Ok(self.net.predict(&x)?[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy(n: usize, f: usize, seed: u64) -> (Matrix, Vec<f32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut data = Vec::new();
        let mut y = Vec::new();
        for i in 0..n {
            let l = (i % 2) as f32;
            for j in 0..f {
                let signal = if j == 0 { 2.0 * l } else { 0.0 };
                data.push(signal + rng.random_range(-1.0f32..1.0) + 10.0);
            }
            y.push(l);
        }
        (
            Matrix {
                rows: n,
                cols: f,
                data,
            },
            y,
        )
    }

    #[test]
    fn logreg_and_mlp_learn_a_separable_signal() {
        let (x, y) = toy(400, 5, 1);
        let (xt, yt) = toy(200, 5, 2);
        for cfg in [TrainConfig::logreg(1e-3), TrainConfig::mlp(vec![16, 8])] {
            let net = Net::fit(&x, &y, &cfg).unwrap();
            let p = net.predict(&xt).unwrap();
            let a = crate::metrics::auroc(&p, &yt).unwrap();
            assert!(a > 0.9, "{:?}: auroc {a}", cfg.kind);
        }
    }

    #[test]
    fn selector_parsing() {
        assert_eq!(
            FeatureRef::parse("hidden:L12:query").unwrap(),
            FeatureRef::new("hidden.query.mean", Some(12))
        );
        assert_eq!(
            FeatureRef::parse("hidden:L3:generation.last").unwrap(),
            FeatureRef::new("hidden.generation.last", Some(3))
        );
        assert_eq!(
            FeatureRef::parse("lookback:generation").unwrap(),
            FeatureRef::new("lookback.generation.mean", None)
        );
        assert_eq!(
            FeatureRef::parse("ffn:generation.mean").unwrap(),
            FeatureRef::new("ffn.generation.mean", None)
        );
        assert_eq!(
            FeatureRef::parse("ffn").unwrap(),
            FeatureRef::new("ffn.generation.mean", None)
        );
        assert_eq!(
            FeatureRef::parse("ffn:L5:query").unwrap(),
            FeatureRef::new("ffn.query.mean", Some(5))
        );
        assert_eq!(
            FeatureRef::parse("ffn:L2:generation.last").unwrap(),
            FeatureRef::new("ffn.generation.last", Some(2))
        );
        assert!(FeatureRef::parse("hidden:Lx:query").is_err());
        assert!(FeatureRef::parse("nope").is_err());
    }
}
