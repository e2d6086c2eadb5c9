//! The quantized [`LinearBackend`]: every linear map keeps its GGUF blocks; products run on them
//! ([`crate::kernels::qmatmul`]). Norms and biases stay F32; the embedding table stays quantized
//! and its rows are dequantized on lookup (a tied head shares the same blocks).
use super::{QMatrix, QuantType};
use crate::error::{ModelError, Result};
use crate::kernels::qdot::Kernel;
use crate::kernels::{qmatmul, with_f32};
use crate::linear::{tensor, DenseBackend, EmbeddingTable, Linear, LinearBackend, LinearSpec};
use crate::weights::Weights;
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Quantized matrices by HF tensor name (`[out, in]`, as in [`Weights`]).
pub type QuantWeights = BTreeMap<String, Arc<QMatrix>>;

/// The weight precision asked for (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    /// A GGUF file's own types (quantized tensors stay as they are); F32 for HF folders.
    Auto,
    /// Everything dequantized to F32.
    F32,
    /// Every linear map (and the embedding) in this type; where a row length is not a whole
    /// number of its blocks, the fallback llama.cpp uses (`Q4_K` -> `Q5_0`, `Q5_K`/`Q6_K` ->
    /// `Q8_0`).
    Quant(QuantType),
}

impl WeightDtype {
    /// Whether a model is held as dense F32 under this dtype: always under `f32`, and under
    /// `auto` for anything but a GGUF file (`gguf`; an HF folder's weights are F32).
    pub fn is_dense_f32(self, gguf: bool) -> bool {
        self == Self::F32 || (self == Self::Auto && !gguf)
    }

    /// `auto`, `f32`, or a type with a kernel (`q8_0`, `q4_k`, `q4_0`, `q4_1`, `q5_0`, `q5_k`,
    /// `q6_k`).
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "f32" => Ok(Self::F32),
            other => match QuantType::parse(other) {
                Some(t) if t.has_kernel() => Ok(Self::Quant(t)),
                _ => Err(ModelError::Input(format!(
                    "--dtype {s}: expected auto, f32, q8_0, q4_k, q4_0, q4_1, q5_0, q5_k or q6_k"
                ))),
            },
        }
    }

    pub fn name(self) -> String {
        match self {
            Self::Auto => "auto".into(),
            Self::F32 => "f32".into(),
            Self::Quant(t) => t.name().to_ascii_lowercase(),
        }
    }
}

/// The type a `cols`-wide matrix gets when `want` is asked for: `want` itself when `cols` is
/// whole blocks of it, else llama.cpp's fallback.
pub fn storable_type(want: QuantType, cols: usize) -> QuantType {
    let fits = |t: QuantType| t.bytes_for(cols).is_some();
    if fits(want) {
        return want;
    }
    let fallback = match want {
        QuantType::Q4_K | QuantType::Q4_0 | QuantType::Q4_1 => QuantType::Q5_0,
        _ => QuantType::Q8_0,
    };
    if fits(fallback) {
        fallback
    } else {
        QuantType::F32
    }
}

/// Builds [`QuantLinear`]s from `quant`; parts it does not hold come from the F32 `dense`
/// weights (a map none of whose parts is quantized is a [`crate::linear::DenseLinear`]).
#[derive(Debug, Clone, Copy)]
pub struct QuantBackend<'w> {
    quant: &'w QuantWeights,
    dense: &'w Weights,
    device: &'w Device,
}

impl<'w> QuantBackend<'w> {
    pub fn new(quant: &'w QuantWeights, dense: &'w Weights, device: &'w Device) -> Self {
        Self {
            quant,
            dense,
            device,
        }
    }
}

impl LinearBackend for QuantBackend<'_> {
    fn build(&self, spec: &LinearSpec) -> Result<Arc<dyn Linear>> {
        if !spec.parts.iter().any(|p| self.quant.contains_key(&p.name)) {
            return DenseBackend::new(self.dense, self.device).build(spec);
        }
        let k = spec.in_features;
        let mut segs = Vec::with_capacity(spec.parts.len());
        let mut col0 = 0;
        for p in &spec.parts {
            let m = match self.quant.get(&p.name) {
                Some(m) => m.clone(),
                None => {
                    // A dense part beside quantized ones (rare): quantize it to 8 bits.
                    let t = tensor(self.dense, &p.name, &[p.rows, k], &Device::Cpu)?;
                    let v = t.flatten_all()?.to_vec1::<f32>()?;
                    Arc::new(QMatrix::quantize(&v, p.rows, k, QuantType::Q8_0)?)
                }
            };
            if m.rows() != p.rows || m.cols() != k {
                return Err(ModelError::Mismatch(format!(
                    "tensor `{}` has shape [{}, {}], config implies [{}, {k}]",
                    p.name,
                    m.rows(),
                    m.cols(),
                    p.rows
                )));
            }
            let kernel = Kernel::for_type(m.ty()).ok_or_else(|| {
                ModelError::Unsupported(format!(
                    "no quantized kernel for {} (tensor `{}`)",
                    m.ty(),
                    p.name
                ))
            })?;
            segs.push(Seg {
                m,
                col0,
                scale: p.scale as f32,
                kernel,
            });
            col0 += p.rows;
        }
        let bias = if spec.has_bias() {
            let mut b = Vec::with_capacity(col0);
            for p in &spec.parts {
                match &p.bias {
                    Some(n) => {
                        let t = tensor(self.dense, n, &[p.rows], &Device::Cpu)?;
                        b.extend(t.to_vec1::<f32>()?.into_iter().map(|v| v * p.scale as f32));
                    }
                    None => b.extend(std::iter::repeat_n(0f32, p.rows)),
                }
            }
            Some(b)
        } else {
            None
        };
        Ok(Arc::new(QuantLinear {
            segs,
            bias,
            k,
            n: col0,
        }))
    }

    fn name(&self) -> &str {
        "quant"
    }

    fn embedding(&self, name: &str) -> Result<Option<Arc<dyn EmbeddingTable>>> {
        Ok(self
            .quant
            .get(name)
            .map(|m| Arc::new(QEmbedding(m.clone())) as Arc<dyn EmbeddingTable>))
    }
}

#[derive(Debug, Clone)]
struct Seg {
    m: Arc<QMatrix>,
    col0: usize,
    scale: f32,
    kernel: Kernel,
}

/// A linear map whose weight rows are quantized blocks (possibly of several types, one per
/// stacked part), `y = x W^T + b`.
#[derive(Debug, Clone)]
pub struct QuantLinear {
    segs: Vec<Seg>,
    bias: Option<Vec<f32>>,
    k: usize,
    n: usize,
}

impl QuantLinear {
    /// The block types of its parts, in order.
    pub fn types(&self) -> Vec<QuantType> {
        self.segs.iter().map(|s| s.m.ty()).collect()
    }
}

impl Linear for QuantLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, k) = x.dims2()?;
        if k != self.k {
            return Err(ModelError::Input(format!(
                "linear map of {} inputs given rows of {k}",
                self.k
            )));
        }
        let segs: Vec<qmatmul::Segment<'_>> = self
            .segs
            .iter()
            .map(|s| qmatmul::Segment {
                w: &s.m,
                col0: s.col0,
                scale: s.scale,
                kernel: s.kernel,
            })
            .collect();
        let n = self.n;
        let mut y = vec![0f32; rows * n];
        let x = x.contiguous()?;
        with_f32(&x, |xs| qmatmul::matmul(&segs, xs, rows, k, &mut y, n))
            .ok_or_else(|| ModelError::Input("quantized product needs F32 CPU input".into()))??;
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(n) {
                for (v, bb) in row.iter_mut().zip(b) {
                    *v += bb;
                }
            }
        }
        Ok(Tensor::from_vec(y, (rows, n), x.device())?)
    }

    fn in_features(&self) -> usize {
        self.k
    }

    fn out_features(&self) -> usize {
        self.n
    }
}

/// A quantized embedding table: rows dequantized on lookup (exactly, as llama.cpp's `get_rows`).
#[derive(Debug, Clone)]
pub struct QEmbedding(pub Arc<QMatrix>);

impl EmbeddingTable for QEmbedding {
    fn shape(&self) -> (usize, usize) {
        (self.0.rows(), self.0.cols())
    }

    fn lookup(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let d = self.0.cols();
        let mut out = vec![0f32; ids.len() * d];
        for (o, &id) in out.chunks_exact_mut(d).zip(ids) {
            self.0.dequantize_row_into(id as usize, o)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::{LinearId, LinearKind, LinearPart};

    #[test]
    fn parses_dtypes_and_falls_back_like_llama_cpp() {
        assert_eq!(WeightDtype::parse("auto").unwrap(), WeightDtype::Auto);
        assert_eq!(WeightDtype::parse("F32").unwrap(), WeightDtype::F32);
        assert_eq!(
            WeightDtype::parse("q4_k").unwrap(),
            WeightDtype::Quant(QuantType::Q4_K)
        );
        assert!(WeightDtype::parse("q2_k").is_err());
        assert!(WeightDtype::parse("int4").is_err());
        assert_eq!(storable_type(QuantType::Q4_K, 1536), QuantType::Q4_K);
        assert_eq!(storable_type(QuantType::Q4_K, 576), QuantType::Q5_0);
        assert_eq!(storable_type(QuantType::Q6_K, 576), QuantType::Q8_0);
        assert_eq!(storable_type(QuantType::Q8_0, 40), QuantType::F32);
    }

    #[test]
    fn fused_parts_of_two_types_with_bias_and_scale() {
        let dev = Device::Cpu;
        let k = 256;
        let w = |rows: usize, s: usize| -> Vec<f32> {
            (0..rows * k)
                .map(|i| (((i + s) * 7919 % 1013) as f32 - 506.0) / 600.0)
                .collect()
        };
        let mut quant = QuantWeights::new();
        quant.insert(
            "a".into(),
            Arc::new(QMatrix::quantize(&w(8, 1), 8, k, QuantType::Q4_K).unwrap()),
        );
        let mut dense = Weights::new();
        dense.insert("b".into(), Tensor::from_vec(w(4, 2), (4, k), &dev).unwrap());
        dense.insert(
            "b.bias".into(),
            Tensor::new(&[1f32, 2., 3., 4.], &dev).unwrap(),
        );
        let spec = LinearSpec {
            id: LinearId {
                layer: Some(0),
                kind: LinearKind::Qkv,
            },
            parts: vec![
                LinearPart {
                    name: "a".into(),
                    rows: 8,
                    scale: 0.5,
                    bias: None,
                },
                LinearPart {
                    name: "b".into(),
                    rows: 4,
                    scale: 1.0,
                    bias: Some("b.bias".into()),
                },
            ],
            in_features: k,
        };
        let lin = QuantBackend::new(&quant, &dense, &dev)
            .build(&spec)
            .unwrap();
        assert_eq!((lin.in_features(), lin.out_features()), (k, 12));
        let x: Vec<f32> = (0..2 * k).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
        let y = lin
            .forward(&Tensor::from_vec(x.clone(), (2, k), &dev).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let wa = quant["a"].dequantize().unwrap();
        let wb = w(4, 2);
        for r in 0..2 {
            for j in 0..12 {
                let (row, scale, bias) = if j < 8 {
                    (&wa[j * k..(j + 1) * k], 0.5, 0.0)
                } else {
                    (&wb[(j - 8) * k..(j - 7) * k], 1.0, (j - 7) as f32)
                };
                let want: f32 =
                    scale * row.iter().zip(&x[r * k..]).map(|(a, b)| a * b).sum::<f32>() + bias;
                assert!(
                    (y[r][j] - want).abs() < 0.05,
                    "{r} {j}: {} vs {want}",
                    y[r][j]
                );
            }
        }
        let emb = QuantBackend::new(&quant, &dense, &dev)
            .embedding("a")
            .unwrap()
            .unwrap();
        assert_eq!(emb.shape(), (8, k));
        assert_eq!(emb.lookup(&[3]).unwrap(), wa[3 * k..4 * k].to_vec());
        assert!(emb.lookup(&[8]).is_err());
    }
}
