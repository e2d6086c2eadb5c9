//! The layers both encoders are made of: dense maps with optional LoRA, layer normalisation, the
//! post-LN transformer block, mean pooling and the classification head.
//!
//! Shapes: hidden states `[b, t, d]`; an additive attention bias broadcastable to
//! `[b, heads, t, t]` (padding: `[b, 1, 1, t]`; MPNet adds its relative-position bias
//! `[1, heads, t, t]`).
use crate::error::Result;
use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Layer normalisation; the differentiable composite form when gradients are needed, the fused
/// kernel otherwise.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    w: Tensor,
    b: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn load(vb: &VarBuilder, d: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            w: vb.get(d, "weight")?,
            b: vb.get(d, "bias")?,
            eps: eps as f32,
        })
    }
    pub fn forward(&self, x: &Tensor, grad: bool) -> Result<Tensor> {
        Ok(if grad {
            candle_nn::ops::layer_norm_slow(x, &self.w, &self.b, self.eps)?
        } else {
            candle_nn::ops::layer_norm(x, &self.w, &self.b, self.eps)?
        })
    }
}

/// Low-rank adapter `Delta W = scale * B A` with `A: [r, in]`, `B: [out, r]` (B starts at zero,
/// so a fresh adapter leaves the model unchanged).
#[derive(Debug, Clone)]
pub struct Lora {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
}

/// A frozen dense layer `y = x W^T + b` (`W: [out, in]`) with an optional trainable LoRA.
#[derive(Debug, Clone)]
pub struct Dense {
    w: Tensor,
    b: Tensor,
    lora: Option<Lora>,
}

impl Dense {
    pub fn load(vb: &VarBuilder, inp: usize, out: usize) -> Result<Self> {
        Ok(Dense {
            w: vb.get((out, inp), "weight")?,
            b: vb.get(out, "bias")?,
            lora: None,
        })
    }
    /// `x: [n, in] -> [n, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = x.matmul(&self.w.t()?)?.broadcast_add(&self.b)?;
        if let Some(l) = &self.lora {
            let low = x.matmul(&l.a.as_tensor().t()?)?;
            y = (y + (low.matmul(&l.b.as_tensor().t()?)? * l.scale)?)?;
        }
        Ok(y)
    }
    fn attach_lora(&mut self, rank: usize, alpha: f64, rng: &mut ChaCha8Rng) -> Result<Vec<Var>> {
        let (out, inp) = self.w.dims2()?;
        let bound = (1.0 / inp as f64).sqrt();
        let a: Vec<f32> = (0..rank * inp)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (rank, inp), self.w.device())?)?;
        let b = Var::zeros((out, rank), DType::F32, self.w.device())?;
        let vars = vec![a.clone(), b.clone()];
        self.lora = Some(Lora {
            a,
            b,
            scale: alpha / rank as f64,
        });
        Ok(vars)
    }
}

/// Where a block's tensors live in a checkpoint (relative to the block's prefix).
pub struct BlockNames {
    pub query: &'static str,
    pub key: &'static str,
    pub value: &'static str,
    pub attn_out: &'static str,
    pub attn_norm: &'static str,
    pub inter: &'static str,
    pub out: &'static str,
    pub out_norm: &'static str,
}

/// Sizes of a block.
#[derive(Debug, Clone, Copy)]
pub struct BlockDims {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub eps: f64,
}

/// One post-LN transformer block (BERT and MPNet layers have the same computation):
/// `a = LN(x + O(softmax(Q K^T / sqrt(dh) + bias) V))`, `y = LN(a + W2 gelu(W1 a))`.
#[derive(Debug, Clone)]
pub struct Block {
    query: Dense,
    key: Dense,
    value: Dense,
    attn_out: Dense,
    ln1: LayerNorm,
    inter: Dense,
    out: Dense,
    ln2: LayerNorm,
    heads: usize,
}

impl Block {
    pub fn load(vb: &VarBuilder, n: &BlockNames, c: BlockDims) -> Result<Self> {
        let (d, f) = (c.hidden, c.intermediate);
        Ok(Block {
            query: Dense::load(&vb.pp(n.query), d, d)?,
            key: Dense::load(&vb.pp(n.key), d, d)?,
            value: Dense::load(&vb.pp(n.value), d, d)?,
            attn_out: Dense::load(&vb.pp(n.attn_out), d, d)?,
            ln1: LayerNorm::load(&vb.pp(n.attn_norm), d, c.eps)?,
            inter: Dense::load(&vb.pp(n.inter), d, f)?,
            out: Dense::load(&vb.pp(n.out), f, d)?,
            ln2: LayerNorm::load(&vb.pp(n.out_norm), d, c.eps)?,
            heads: c.heads,
        })
    }

    /// `h: [b, t, d]`, `bias` broadcastable to `[b, heads, t, t]` -> `[b, t, d]`.
    pub fn forward(&self, h: &Tensor, bias: &Tensor, grad: bool) -> Result<Tensor> {
        let (b, t, d) = h.dims3()?;
        let dh = d / self.heads;
        let x = h.reshape((b * t, d))?;
        let split = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, t, self.heads, dh))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(self.query.forward(&x)?)?;
        let k = split(self.key.forward(&x)?)?;
        let v = split(self.value.forward(&x)?)?;
        let scores = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? / (dh as f64).sqrt())?
            .broadcast_add(bias)?;
        let p = if grad {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let ctx = p
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * t, d))?;
        let a = self
            .ln1
            .forward(&(self.attn_out.forward(&ctx)? + &x)?, grad)?;
        let i = self.inter.forward(&a)?.gelu_erf()?;
        let o = self.ln2.forward(&(self.out.forward(&i)? + &a)?, grad)?;
        Ok(o.reshape((b, t, d))?)
    }

    /// Adds LoRA adapters of rank `rank` to the query and value projections; returns the new
    /// trainable variables.
    pub fn attach_lora(
        &mut self,
        rank: usize,
        alpha: f64,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<Var>> {
        let mut v = self.query.attach_lora(rank, alpha, rng)?;
        v.extend(self.value.attach_lora(rank, alpha, rng)?);
        Ok(v)
    }
}

/// Mean pooling over real tokens: `h: [b, t, d]`, `mask: [b, t]` -> `[b, d]`.
pub fn mean_pool(h: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.unsqueeze(2)?;
    let s = h.broadcast_mul(&m)?.sum(1)?;
    let n = m.sum(1)?.clamp(1.0, f64::MAX)?;
    Ok(s.broadcast_div(&n)?)
}

/// A trainable linear classification head `[b, d] -> [b, C]`.
#[derive(Debug, Clone)]
pub struct Head {
    pub w: Var,
    pub b: Var,
}

impl Head {
    pub fn new(d: usize, classes: usize, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bound = (1.0 / d as f64).sqrt();
        let w: Vec<f32> = (0..classes * d)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        Ok(Head {
            w: Var::from_tensor(&Tensor::from_vec(w, (classes, d), device)?)?,
            b: Var::zeros(classes, DType::F32, device)?,
        })
    }
    pub fn vars(&self) -> Vec<Var> {
        vec![self.w.clone(), self.b.clone()]
    }
}

impl Module for Head {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.w.as_tensor().t()?)?
            .broadcast_add(self.b.as_tensor())
    }
}
