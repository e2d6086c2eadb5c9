//! A focused BERT encoder on candle with per-block access, so that it can be split between the
//! customer (embedding layer + blocks `0..k`) and the vendor (blocks `k..L`, LoRA, task head).
//!
//! Shapes: token ids `[b, t]` (u32), attention mask `[b, t]` (f32, 1 = real token, 0 = pad),
//! hidden states `[b, t, d]` with `d = hidden_size`. The additive attention bias built from the
//! mask is `[b, 1, 1, t]`. Checkpoints in the HF layout are read with or without the `bert.`
//! prefix (all-MiniLM-L6-v2 has none).
use crate::error::{Result, SapError};
use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

/// The fields of an HF `config.json` this encoder uses.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

impl BertConfig {
    /// A tiny configuration for tests.
    pub fn tiny(vocab: usize) -> Self {
        BertConfig {
            vocab_size: vocab,
            hidden_size: 32,
            num_hidden_layers: 3,
            num_attention_heads: 4,
            intermediate_size: 64,
            max_position_embeddings: 64,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_act: "gelu".into(),
        }
    }
    fn validate(&self) -> Result<()> {
        if self.hidden_size == 0
            || self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(SapError::Model(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.hidden_act != "gelu" {
            return Err(SapError::Model(format!(
                "hidden_act {:?} is not supported (only gelu)",
                self.hidden_act
            )));
        }
        Ok(())
    }
}

/// Layer normalisation; the differentiable composite form when gradients are needed, the fused
/// kernel otherwise.
#[derive(Debug, Clone)]
struct LayerNorm {
    w: Tensor,
    b: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn load(vb: &VarBuilder, d: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            w: vb.get(d, "weight")?,
            b: vb.get(d, "bias")?,
            eps: eps as f32,
        })
    }
    fn forward(&self, x: &Tensor, grad: bool) -> Result<Tensor> {
        Ok(if grad {
            candle_nn::ops::layer_norm_slow(x, &self.w, &self.b, self.eps)?
        } else {
            candle_nn::ops::layer_norm(x, &self.w, &self.b, self.eps)?
        })
    }
}

/// Low-rank adapter `Delta W = scale * B A` with `A: [r, in]`, `B: [out, r]` (B starts at zero).
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
    fn load(vb: &VarBuilder, inp: usize, out: usize) -> Result<Self> {
        Ok(Dense {
            w: vb.get((out, inp), "weight")?,
            b: vb.get(out, "bias")?,
            lora: None,
        })
    }
    /// `x: [n, in] -> [n, out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
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

/// One transformer block (post-LN BERT layer).
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
    fn load(vb: &VarBuilder, c: &BertConfig) -> Result<Self> {
        let d = c.hidden_size;
        let att = vb.pp("attention");
        let s = att.pp("self");
        Ok(Block {
            query: Dense::load(&s.pp("query"), d, d)?,
            key: Dense::load(&s.pp("key"), d, d)?,
            value: Dense::load(&s.pp("value"), d, d)?,
            attn_out: Dense::load(&att.pp("output").pp("dense"), d, d)?,
            ln1: LayerNorm::load(&att.pp("output").pp("LayerNorm"), d, c.layer_norm_eps)?,
            inter: Dense::load(&vb.pp("intermediate").pp("dense"), d, c.intermediate_size)?,
            out: Dense::load(&vb.pp("output").pp("dense"), c.intermediate_size, d)?,
            ln2: LayerNorm::load(&vb.pp("output").pp("LayerNorm"), d, c.layer_norm_eps)?,
            heads: c.num_attention_heads,
        })
    }

    /// `h: [b, t, d]`, `bias: [b, 1, 1, t]` -> `[b, t, d]`.
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

/// The embedding layer: `LN(word[id] + position[i] + token_type[0])`.
#[derive(Debug, Clone)]
pub struct Embeddings {
    pub word: Tensor,
    pub position: Tensor,
    pub token_type: Tensor,
    ln: LayerNorm,
}

impl Embeddings {
    /// `ids: [b, t]` -> `[b, t, d]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let d = self.word.dim(1)?;
        if t > self.position.dim(0)? {
            return Err(SapError::Model(format!(
                "sequence of {t} tokens exceeds max_position_embeddings {}",
                self.position.dim(0)?
            )));
        }
        let w = self
            .word
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, d))?;
        let p = self.position.narrow(0, 0, t)?.unsqueeze(0)?;
        let ty = self.token_type.narrow(0, 0, 1)?.unsqueeze(0)?;
        let x = w.broadcast_add(&p)?.broadcast_add(&ty)?;
        self.ln.forward(&x, false)
    }

    /// The embedding-layer output of every vocabulary entry at position `pos`: `[V, d]`
    /// (what a vendor holding the public model can compute for a nearest-neighbour attack).
    pub fn table_at(&self, pos: usize) -> Result<Tensor> {
        let p = self.position.narrow(0, pos, 1)?;
        let ty = self.token_type.narrow(0, 0, 1)?;
        let x = self.word.broadcast_add(&p)?.broadcast_add(&ty)?;
        self.ln.forward(&x, false)
    }
}

/// The whole encoder (embeddings + blocks). Cheap to clone (tensors are shared).
#[derive(Debug, Clone)]
pub struct BertEncoder {
    pub config: BertConfig,
    pub embeddings: Embeddings,
    pub blocks: Vec<Block>,
}

impl BertEncoder {
    /// Loads an HF folder (`config.json` + `model.safetensors`).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cp = dir.join("config.json");
        let text = std::fs::read_to_string(&cp).map_err(|e| SapError::io(&cp, e))?;
        let config: BertConfig = serde_json::from_str(&text)
            .map_err(|e| SapError::Model(format!("{}: {e}", cp.display())))?;
        let wp = dir.join("model.safetensors");
        if !wp.exists() {
            return Err(SapError::Model(format!("{} is missing", wp.display())));
        }
        let tensors = candle_core::safetensors::load(&wp, device)?;
        Self::from_tensors(config, tensors, device)
    }

    /// Builds the encoder from named tensors (HF names, with or without the `bert.` prefix).
    pub fn from_tensors(
        config: BertConfig,
        mut tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        if tensors.keys().any(|k| k.starts_with("bert.")) {
            tensors = tensors
                .into_iter()
                .map(|(k, v)| (k.strip_prefix("bert.").map(str::to_string).unwrap_or(k), v))
                .collect();
        }
        // everything in f32
        let tensors = tensors
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let c = &config;
        let e = vb.pp("embeddings");
        let embeddings = Embeddings {
            word: e
                .get((c.vocab_size, c.hidden_size), "word_embeddings.weight")
                .map_err(|err| SapError::Model(format!("not a BERT checkpoint: {err}")))?,
            position: e.get(
                (c.max_position_embeddings, c.hidden_size),
                "position_embeddings.weight",
            )?,
            token_type: e.get(
                (c.type_vocab_size, c.hidden_size),
                "token_type_embeddings.weight",
            )?,
            ln: LayerNorm::load(&e.pp("LayerNorm"), c.hidden_size, c.layer_norm_eps)?,
        };
        let blocks = (0..c.num_hidden_layers)
            .map(|i| Block::load(&vb.pp(format!("encoder.layer.{i}")), c))
            .collect::<Result<Vec<_>>>()?;
        Ok(BertEncoder {
            config,
            embeddings,
            blocks,
        })
    }

    /// Random weights (for tests and synthetic runs), in HF naming.
    pub fn random(config: BertConfig, seed: u64, device: &Device) -> Result<Self> {
        let c = &config;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut t: HashMap<String, Tensor> = HashMap::new();
        let mut put = |name: String, shape: Vec<usize>, std: f32, mean: f32| -> Result<()> {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| mean + std * (rng.random::<f32>() * 2.0 - 1.0))
                .collect();
            t.insert(name, Tensor::from_vec(v, shape, device)?);
            Ok(())
        };
        let (d, f) = (c.hidden_size, c.intermediate_size);
        put(
            "embeddings.word_embeddings.weight".into(),
            vec![c.vocab_size, d],
            0.5,
            0.0,
        )?;
        put(
            "embeddings.position_embeddings.weight".into(),
            vec![c.max_position_embeddings, d],
            0.1,
            0.0,
        )?;
        put(
            "embeddings.token_type_embeddings.weight".into(),
            vec![c.type_vocab_size, d],
            0.1,
            0.0,
        )?;
        put("embeddings.LayerNorm.weight".into(), vec![d], 0.1, 1.0)?;
        put("embeddings.LayerNorm.bias".into(), vec![d], 0.1, 0.0)?;
        for i in 0..c.num_hidden_layers {
            let p = format!("encoder.layer.{i}.");
            for (n, o, inp) in [
                ("attention.self.query", d, d),
                ("attention.self.key", d, d),
                ("attention.self.value", d, d),
                ("attention.output.dense", d, d),
                ("intermediate.dense", f, d),
                ("output.dense", d, f),
            ] {
                put(
                    format!("{p}{n}.weight"),
                    vec![o, inp],
                    (3.0 / inp as f32).sqrt(),
                    0.0,
                )?;
                put(format!("{p}{n}.bias"), vec![o], 0.02, 0.0)?;
            }
            for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
                put(format!("{p}{n}.weight"), vec![d], 0.1, 1.0)?;
                put(format!("{p}{n}.bias"), vec![d], 0.1, 0.0)?;
            }
        }
        Self::from_tensors(config, t, device)
    }

    pub fn hidden(&self) -> usize {
        self.config.hidden_size
    }
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Additive attention bias `[b, 1, 1, t]` from a `[b, t]` 0/1 mask: 0 for real tokens,
    /// `-1e9` for padding.
    pub fn attention_bias(mask: &Tensor) -> Result<Tensor> {
        let (b, t) = mask.dims2()?;
        Ok(((mask.ones_like()? - mask)? * -1e9)?.reshape((b, 1, 1, t))?)
    }

    /// Runs blocks `range` on `h: [b, t, d]`.
    pub fn forward_blocks(
        &self,
        h: &Tensor,
        bias: &Tensor,
        range: Range<usize>,
        grad: bool,
    ) -> Result<Tensor> {
        if range.end > self.blocks.len() || range.start > range.end {
            return Err(SapError::Config(format!(
                "blocks {range:?} out of 0..{}",
                self.blocks.len()
            )));
        }
        let mut h = h.clone();
        for blk in &self.blocks[range] {
            h = blk.forward(&h, bias, grad)?;
        }
        Ok(h)
    }

    /// Unsplit forward: embeddings and all blocks, `ids, mask: [b, t]` -> `[b, t, d]`.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self.embeddings.forward(ids)?;
        let bias = Self::attention_bias(mask)?;
        self.forward_blocks(&h, &bias, 0..self.blocks.len(), false)
    }

    /// Attaches LoRA adapters to blocks `range`; returns the trainable variables.
    pub fn attach_lora(
        &mut self,
        range: Range<usize>,
        rank: usize,
        alpha: f64,
        seed: u64,
    ) -> Result<Vec<Var>> {
        if rank == 0 {
            return Ok(Vec::new());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut vars = Vec::new();
        for blk in self.blocks[range].iter_mut() {
            vars.extend(blk.attach_lora(rank, alpha, &mut rng)?);
        }
        Ok(vars)
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
