//! Linear backends: who computes each linear product of the forward pass.
//!
//! The forward pass ([`crate::llama::Llama::forward`]) never touches a weight matrix itself:
//! every product `y = x W^T + b` goes through a [`Linear`] that a [`LinearBackend`] built when
//! the model was loaded. What differs between the modes is only the backend:
//! - [`DenseBackend`]: local F32 weights (plaintext checkpoints, and AloePri-obfuscated ones, whose
//!   obfuscation lives in the weights);
//! - local quantized weights (GGUF blocks kept as loaded);
//! - two remote servers on additive secret shares (the client holds no product, only shares).
//!
//! The model asks for five kinds of map per model ([`LinearKind`]); q/k/v and gate/up are fused
//! (their [`LinearPart`]s are stacked as rows), and the attention scale `1/sqrt(hd)` is a part's
//! `scale`, so that every backend sees the same maps whatever it does with them.
use crate::error::{ModelError, Result};
use crate::kernels;
use crate::weights::Weights;
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// Which linear map of a block (or the head).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinearKind {
    /// Fused `q | k | v` projections, `[(nh + 2 nkv) hd, d]`, q rows scaled by `1/sqrt(hd)`.
    Qkv,
    /// Attention output projection `[d, nh hd]`.
    O,
    /// Fused `gate | up` projections `[2 ffn, d]`.
    GateUp,
    /// FFN down projection `[d, ffn]`.
    Down,
    /// LM head `[V, d]` (the embedding table when tied).
    Head,
}

impl LinearKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qkv => "qkv",
            Self::O => "o",
            Self::GateUp => "gate_up",
            Self::Down => "down",
            Self::Head => "head",
        }
    }
}

/// A linear map of the model: its kind and block (`None` for the head).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinearId {
    pub layer: Option<usize>,
    pub kind: LinearKind,
}

impl std::fmt::Display for LinearId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.layer {
            Some(l) => write!(f, "layer {l} {}", self.kind.as_str()),
            None => write!(f, "{}", self.kind.as_str()),
        }
    }
}

/// One checkpoint tensor that supplies rows of a linear map: HF name, its row count, a factor
/// every row (and bias entry) is multiplied by, and the HF name of its bias, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearPart {
    pub name: String,
    pub rows: usize,
    pub scale: f64,
    pub bias: Option<String>,
}

/// What a backend is asked to build: `W = [part_0; part_1; ...]` (`[out, in]`, rows stacked in
/// order) and `b` likewise (zeros for a part without bias, when another part has one).
#[derive(Debug, Clone, PartialEq)]
pub struct LinearSpec {
    pub id: LinearId,
    pub parts: Vec<LinearPart>,
    pub in_features: usize,
}

impl LinearSpec {
    pub fn out_features(&self) -> usize {
        self.parts.iter().map(|p| p.rows).sum()
    }

    pub fn has_bias(&self) -> bool {
        self.parts.iter().any(|p| p.bias.is_some())
    }

    /// The stacked F32 weight `[out, in]` (scales applied) and bias from dense `weights`,
    /// checking each part's shape.
    pub fn dense(&self, weights: &Weights, device: &Device) -> Result<(Tensor, Option<Tensor>)> {
        let mut ws = Vec::with_capacity(self.parts.len());
        let mut bs = Vec::with_capacity(self.parts.len());
        for p in &self.parts {
            let w = tensor(weights, &p.name, &[p.rows, self.in_features], device)?;
            ws.push(if p.scale == 1.0 { w } else { (w * p.scale)? });
            if self.has_bias() {
                let b = match &p.bias {
                    Some(n) => tensor(weights, n, &[p.rows], device)?,
                    None => Tensor::zeros(p.rows, DType::F32, device)?,
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
        Ok((w.contiguous()?, b))
    }
}

/// A named tensor of `weights` with the expected shape, as F32 on `device` (no copy when it
/// already is).
pub fn tensor(weights: &Weights, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
    let t = weights
        .get(name)
        .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
    if t.dims() != shape {
        return Err(ModelError::Mismatch(format!(
            "tensor `{name}` has shape {:?}, config implies {:?}",
            t.dims(),
            shape
        )));
    }
    Ok(t.to_dtype(DType::F32)?.to_device(device)?)
}

/// A linear map `y = x W^T + b`, wherever its weights live.
pub trait Linear: Send + Sync + std::fmt::Debug {
    /// `x` `[rows, in]` (contiguous F32) -> `[rows, out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    fn in_features(&self) -> usize;
    fn out_features(&self) -> usize;
}

/// Builds the [`Linear`] maps of a model as it loads.
pub trait LinearBackend {
    fn build(&self, spec: &LinearSpec) -> Result<Arc<dyn Linear>>;
    /// A short name for logs and reports (`f32`, `q8_0`, `shares`, ...).
    fn name(&self) -> &str;
    /// The token embedding table `name` (`[V, d]`) when the backend keeps it in its own format
    /// (rows materialized on lookup); `None` (the default): the model takes it from the F32
    /// weights.
    fn embedding(&self, name: &str) -> Result<Option<Arc<dyn EmbeddingTable>>> {
        let _ = name;
        Ok(None)
    }
}

/// A token embedding table kept in a backend's own format (e.g. quantized blocks).
pub trait EmbeddingTable: Send + Sync + std::fmt::Debug {
    /// `(V, d)`.
    fn shape(&self) -> (usize, usize);
    /// Rows `ids` (each `< V`) as F32, concatenated: `[ids.len() * d]`.
    fn lookup(&self, ids: &[u32]) -> Result<Vec<f32>>;
}

/// Local F32 weights taken from a [`Weights`] map.
#[derive(Debug, Clone, Copy)]
pub struct DenseBackend<'w> {
    weights: &'w Weights,
    device: &'w Device,
}

impl<'w> DenseBackend<'w> {
    pub fn new(weights: &'w Weights, device: &'w Device) -> Self {
        Self { weights, device }
    }
}

impl LinearBackend for DenseBackend<'_> {
    fn build(&self, spec: &LinearSpec) -> Result<Arc<dyn Linear>> {
        let (w, bias) = spec.dense(self.weights, self.device)?;
        Ok(Arc::new(DenseLinear { w, bias }))
    }

    fn name(&self) -> &str {
        "f32"
    }
}

/// A dense F32 map: `w` `[out, in]` contiguous (HF layout).
///
/// Up to [`kernels::SMALL_ROWS`] rows (decode steps) use the few-row kernel of
/// [`kernels::matvec`], which reads each weight row once for all rows and is split across
/// threads only when the product is large; more rows use candle's matmul (gemm).
#[derive(Debug, Clone)]
pub struct DenseLinear {
    w: Tensor,
    bias: Option<Tensor>,
}

impl DenseLinear {
    /// `w` `[out, in]`, `bias` `[out]`.
    pub fn new(w: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out, _) = w.dims2()?;
        if let Some(b) = &bias {
            if b.dims() != [out] {
                return Err(ModelError::Mismatch(format!(
                    "bias of shape {:?} for a weight of {out} rows",
                    b.dims()
                )));
            }
        }
        Ok(Self {
            w: w.contiguous()?,
            bias,
        })
    }

    /// The weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.w
    }

    fn small(&self, x: &Tensor, rows: usize) -> Result<Option<Tensor>> {
        let (n, k) = self.w.dims2()?;
        let parallel = rows * n * k >= kernels::par_min_work() && kernels::threads() > 1;
        let y = kernels::with_f32(x, |xs| {
            kernels::with_f32(&self.w, |ws| {
                let mut y = vec![0f32; rows * n];
                kernels::matvec::matmul_rows(xs, rows, ws, n, k, &mut y, parallel).then_some(y)
            })
        })
        .flatten()
        .flatten();
        Ok(match y {
            Some(y) => Some(Tensor::from_vec(y, (rows, n), x.device())?),
            None => None,
        })
    }
}

impl Linear for DenseLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, k) = x.dims2()?;
        if k != self.in_features() {
            return Err(ModelError::Input(format!(
                "linear map of {} inputs given rows of {k}",
                self.in_features()
            )));
        }
        let y = match (rows <= kernels::SMALL_ROWS)
            .then(|| self.small(x, rows))
            .transpose()?
            .flatten()
        {
            Some(y) => y,
            None => x.matmul(&self.w.t()?)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    fn in_features(&self) -> usize {
        self.w.dim(1).unwrap_or(0)
    }

    fn out_features(&self) -> usize {
        self.w.dim(0).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(parts: Vec<LinearPart>) -> LinearSpec {
        LinearSpec {
            id: LinearId {
                layer: Some(0),
                kind: LinearKind::Qkv,
            },
            parts,
            in_features: 3,
        }
    }

    fn part(name: &str, rows: usize, scale: f64, bias: Option<&str>) -> LinearPart {
        LinearPart {
            name: name.into(),
            rows,
            scale,
            bias: bias.map(Into::into),
        }
    }

    #[test]
    fn dense_backend_stacks_scales_and_biases() {
        let dev = Device::Cpu;
        let mut w = Weights::new();
        w.insert(
            "a".into(),
            Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &dev).unwrap(),
        );
        w.insert("b".into(), Tensor::new(&[[1f32, 0., -1.]], &dev).unwrap());
        w.insert("b.bias".into(), Tensor::new(&[10f32], &dev).unwrap());
        let s = spec(vec![
            part("a", 2, 0.5, None),
            part("b", 1, 1.0, Some("b.bias")),
        ]);
        assert_eq!(s.out_features(), 3);
        let lin = DenseBackend::new(&w, &dev).build(&s).unwrap();
        // Few rows (the decode kernel) and many rows (gemm) agree with the hand product.
        for rows in [1usize, 40] {
            let x: Vec<f32> = (0..rows * 3).map(|i| (i % 5) as f32 - 2.0).collect();
            let xt = Tensor::from_vec(x.clone(), (rows, 3), &dev).unwrap();
            let y = lin.forward(&xt).unwrap().to_vec2::<f32>().unwrap();
            for (r, yr) in y.iter().enumerate() {
                let xr = &x[r * 3..r * 3 + 3];
                let want = [
                    0.5 * (xr[0] + 2.0 * xr[1] + 3.0 * xr[2]),
                    0.5 * (4.0 * xr[0] + 5.0 * xr[1] + 6.0 * xr[2]),
                    xr[0] - xr[2] + 10.0,
                ];
                for (g, w) in yr.iter().zip(want) {
                    assert!((g - w).abs() < 1e-5, "rows {rows}: {yr:?} vs {want:?}");
                }
            }
        }
        assert!(lin
            .forward(&Tensor::zeros((1, 4), DType::F32, &dev).unwrap())
            .is_err());
    }

    #[test]
    fn missing_and_misshapen_parts_are_named() {
        let dev = Device::Cpu;
        let mut w = Weights::new();
        w.insert("a".into(), Tensor::zeros((2, 4), DType::F32, &dev).unwrap());
        let b = DenseBackend::new(&w, &dev);
        let e = b.build(&spec(vec![part("a", 2, 1.0, None)])).unwrap_err();
        assert!(e.to_string().contains("`a`"), "{e}");
        let e = b.build(&spec(vec![part("zz", 2, 1.0, None)])).unwrap_err();
        assert!(e.to_string().contains("zz"), "{e}");
    }
}
