//! The vendor's pretrained text encoder with per-block access, so that it can be split between
//! the customer (embedding layer + blocks `0..k`) and the vendor (blocks `k..L`, LoRA, task
//! head). Two architectures read from an HF folder (`config.json` + `model.safetensors`):
//!
//! - [`bert`]: BERT (all-MiniLM-L6-v2: 6 blocks, d 384);
//! - [`mpnet`]: MPNet (all-mpnet-base-v2: 12 blocks, d 768): BERT's post-LN blocks plus a
//!   relative-position bucket bias shared by every block, positions offset by `pad + 1`, no
//!   token types.
//!
//! Shapes: token ids `[b, t]` (u32), attention mask `[b, t]` (f32, 1 = real token, 0 = pad),
//! hidden states `[b, t, d]`. The additive attention bias [`Encoder::attention_bias`] is
//! `[b, 1, 1, t]` for BERT and `[b, heads, t, t]` for MPNet; either party computes it from the
//! sequence lengths alone.
pub mod bert;
pub mod config;
pub mod layers;
pub mod mpnet;

pub use config::{Arch, EncoderConfig};

use crate::error::{Result, SapError};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use layers::{Block, LayerNorm};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

/// The embedding layer: `LN(word[id] + position[i + offset] (+ token_type[0]))`; BERT has
/// offset 0 and a token-type row, MPNet offset `pad + 1` and none.
#[derive(Debug, Clone)]
pub struct Embeddings {
    pub word: Tensor,
    pub position: Tensor,
    pub token_type: Option<Tensor>,
    pub pos_offset: usize,
    ln: LayerNorm,
}

impl Embeddings {
    /// `ids: [b, t]` -> `[b, t, d]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let d = self.word.dim(1)?;
        if t + self.pos_offset > self.position.dim(0)? {
            return Err(SapError::Model(format!(
                "sequence of {t} tokens exceeds the position table ({} rows, offset {})",
                self.position.dim(0)?,
                self.pos_offset
            )));
        }
        let w = self
            .word
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, d))?;
        let mut x = w.broadcast_add(&self.position.narrow(0, self.pos_offset, t)?.unsqueeze(0)?)?;
        if let Some(ty) = &self.token_type {
            x = x.broadcast_add(&ty.narrow(0, 0, 1)?.unsqueeze(0)?)?;
        }
        self.ln.forward(&x, false)
    }

    /// The embedding-layer output of every vocabulary entry at position `pos`: `[V, d]` (what a
    /// vendor holding the public model can compute for a nearest-neighbour attack).
    pub fn table_at(&self, pos: usize) -> Result<Tensor> {
        let mut x =
            self.word
                .broadcast_add(&self.position.narrow(0, pos + self.pos_offset, 1)?)?;
        if let Some(ty) = &self.token_type {
            x = x.broadcast_add(&ty.narrow(0, 0, 1)?)?;
        }
        self.ln.forward(&x, false)
    }
}

/// The whole encoder (embeddings + blocks). Cheap to clone (tensors are shared).
#[derive(Debug, Clone)]
pub struct Encoder {
    pub config: EncoderConfig,
    pub embeddings: Embeddings,
    pub blocks: Vec<Block>,
    /// MPNet's relative-position bias table `[buckets, heads]`.
    relative_bias: Option<Tensor>,
}

impl Encoder {
    /// Reads an HF `config.json`.
    pub fn read_config(dir: &Path) -> Result<EncoderConfig> {
        let cp = dir.join("config.json");
        let text = std::fs::read_to_string(&cp).map_err(|e| SapError::io(&cp, e))?;
        serde_json::from_str(&text).map_err(|e| SapError::Model(format!("{}: {e}", cp.display())))
    }

    /// Loads an HF folder (`config.json` + `model.safetensors`). A truncated or corrupt weight
    /// file is an error that names the file.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config = Self::read_config(dir)?;
        config.validate()?;
        let wp = dir.join("model.safetensors");
        if !wp.exists() {
            return Err(SapError::Model(format!("{} is missing", wp.display())));
        }
        let tensors = candle_core::safetensors::load(&wp, device).map_err(|e| {
            SapError::Model(format!(
                "{}: not a complete safetensors file ({e}); a truncated download? fetch the \
                 model again",
                wp.display()
            ))
        })?;
        Self::from_tensors(config, tensors, device)
    }

    /// Builds the encoder from named tensors in HF naming (with or without the `bert.` /
    /// `mpnet.` prefix).
    pub fn from_tensors(
        config: EncoderConfig,
        tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let arch = config.arch()?;
        let prefix = match arch {
            Arch::Bert => "bert.",
            Arch::Mpnet => "mpnet.",
        };
        let tensors = tensors
            .into_iter()
            .map(|(k, v)| {
                let k = k.strip_prefix(prefix).map(str::to_string).unwrap_or(k);
                Ok((k, v.to_dtype(DType::F32)?))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let c = &config;
        let missing = |what: &str, e: candle_core::Error| {
            SapError::Model(format!("not a {} checkpoint ({what}): {e}", c.model_type))
        };
        let e = vb.pp("embeddings");
        let ln = LayerNorm::load(&e.pp("LayerNorm"), c.hidden_size, c.layer_norm_eps)
            .map_err(|err| SapError::Model(format!("embeddings: {err}")))?;
        let word = e
            .get((c.vocab_size, c.hidden_size), "word_embeddings.weight")
            .map_err(|err| missing("word embeddings", err))?;
        let position = e
            .get(
                (c.max_position_embeddings, c.hidden_size),
                "position_embeddings.weight",
            )
            .map_err(|err| missing("position embeddings", err))?;
        let (token_type, pos_offset, relative_bias) = match arch {
            Arch::Bert => (
                Some(
                    e.get(
                        (c.type_vocab_size, c.hidden_size),
                        "token_type_embeddings.weight",
                    )
                    .map_err(|err| missing("token types", err))?,
                ),
                0,
                None,
            ),
            Arch::Mpnet => (
                None,
                c.pad_token_id.unwrap_or(1) as usize + 1,
                Some(
                    vb.get(
                        (c.relative_attention_num_buckets, c.num_attention_heads),
                        "encoder.relative_attention_bias.weight",
                    )
                    .map_err(|err| missing("relative attention bias", err))?,
                ),
            ),
        };
        let names = match arch {
            Arch::Bert => &bert::BLOCK_NAMES,
            Arch::Mpnet => &mpnet::BLOCK_NAMES,
        };
        let dims = layers::BlockDims {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            eps: c.layer_norm_eps,
        };
        let blocks = (0..c.num_hidden_layers)
            .map(|i| {
                Block::load(&vb.pp(format!("encoder.layer.{i}")), names, dims)
                    .map_err(|err| SapError::Model(format!("block {i}: {err}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Encoder {
            config,
            embeddings: Embeddings {
                word,
                position,
                token_type,
                pos_offset,
                ln,
            },
            blocks,
            relative_bias,
        })
    }

    pub fn arch(&self) -> Arch {
        // validated at construction
        self.config.arch().unwrap_or(Arch::Bert)
    }
    pub fn hidden(&self) -> usize {
        self.config.hidden_size
    }
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The additive attention bias for a `[b, t]` 0/1 mask: `-1e9` on padded keys (`[b, 1, 1,
    /// t]`), plus MPNet's relative-position bias (`[1, heads, t, t]`), broadcast to `[b, heads,
    /// t, t]`.
    pub fn attention_bias(&self, mask: &Tensor) -> Result<Tensor> {
        let (b, t) = mask.dims2()?;
        let pad = ((mask.ones_like()? - mask)? * -1e9)?.reshape((b, 1, 1, t))?;
        match &self.relative_bias {
            None => Ok(pad),
            Some(table) => {
                let pos = mpnet::position_bias(table, t)?;
                Ok(pos.broadcast_add(&pad)?)
            }
        }
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
        let bias = self.attention_bias(mask)?;
        self.forward_blocks(&h, &bias, 0..self.blocks.len(), false)
    }

    /// Attaches LoRA adapters (query and value) to blocks `range`; returns the trainable
    /// variables.
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

impl Encoder {
    /// Random weights in the architecture's HF naming (tests and synthetic runs).
    pub fn random(config: EncoderConfig, seed: u64, device: &Device) -> Result<Self> {
        use rand::Rng;
        config.validate()?;
        let arch = config.arch()?;
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
        put("embeddings.LayerNorm.weight".into(), vec![d], 0.1, 1.0)?;
        put("embeddings.LayerNorm.bias".into(), vec![d], 0.1, 0.0)?;
        let names = match arch {
            Arch::Bert => {
                put(
                    "embeddings.token_type_embeddings.weight".into(),
                    vec![c.type_vocab_size, d],
                    0.1,
                    0.0,
                )?;
                &bert::BLOCK_NAMES
            }
            Arch::Mpnet => {
                put(
                    "encoder.relative_attention_bias.weight".into(),
                    vec![c.relative_attention_num_buckets, c.num_attention_heads],
                    0.5,
                    0.0,
                )?;
                &mpnet::BLOCK_NAMES
            }
        };
        for i in 0..c.num_hidden_layers {
            let p = format!("encoder.layer.{i}.");
            for (n, o, inp) in [
                (names.query, d, d),
                (names.key, d, d),
                (names.value, d, d),
                (names.attn_out, d, d),
                (names.inter, f, d),
                (names.out, d, f),
            ] {
                put(
                    format!("{p}{n}.weight"),
                    vec![o, inp],
                    (3.0 / inp as f32).sqrt(),
                    0.0,
                )?;
                put(format!("{p}{n}.bias"), vec![o], 0.02, 0.0)?;
            }
            for n in [names.attn_norm, names.out_norm] {
                put(format!("{p}{n}.weight"), vec![d], 0.1, 1.0)?;
                put(format!("{p}{n}.bias"), vec![d], 0.1, 0.0)?;
            }
        }
        Self::from_tensors(config, t, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MPNet's bias differs by relative position and is the same for every batch row; BERT's is
    /// padding only.
    #[test]
    fn attention_bias_shapes() {
        let dev = Device::Cpu;
        let m = Tensor::from_vec(vec![1f32, 1., 1., 1., 1., 0.], (2, 3), &dev).unwrap();
        let e = Encoder::random(mpnet::tiny(50), 1, &dev).unwrap();
        let b = e.attention_bias(&m).unwrap();
        assert_eq!(b.dims(), &[2, 4, 3, 3]);
        let v: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            v[2] > -1e8 && v[9 * 4 + 2] < -1e8,
            "padded key of row 1 is masked"
        );
        let bb = Encoder::random(bert::tiny(50), 1, &dev)
            .unwrap()
            .attention_bias(&m)
            .unwrap();
        assert_eq!(bb.dims(), &[2, 1, 1, 3]);
    }

    /// A split forward (blocks 0..k, then k..L) equals the unsplit one; an unknown model type
    /// and a missing tensor are errors that say what is wrong.
    #[test]
    fn split_equals_unsplit_and_bad_checkpoints_fail_clearly() {
        let dev = Device::Cpu;
        for cfg in [bert::tiny(40), mpnet::tiny(40)] {
            let e = Encoder::random(cfg, 3, &dev).unwrap();
            let ids = Tensor::from_vec(vec![3u32, 7, 9, 11, 2, 5], (2, 3), &dev).unwrap();
            let m = Tensor::ones((2, 3), DType::F32, &dev).unwrap();
            let full: Vec<f32> = e
                .forward(&ids, &m)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let bias = e.attention_bias(&m).unwrap();
            let h = e.embeddings.forward(&ids).unwrap();
            let h = e.forward_blocks(&h, &bias, 0..1, false).unwrap();
            let h = e.forward_blocks(&h, &bias, 1..3, false).unwrap();
            let split: Vec<f32> = h.flatten_all().unwrap().to_vec1().unwrap();
            let err = full
                .iter()
                .zip(&split)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-5, "{err}");
        }
        let mut c = mpnet::tiny(40);
        c.model_type = "roberta".into();
        let e = Encoder::random(c, 1, &dev).unwrap_err();
        assert!(e.to_string().contains("roberta"), "{e}");
        let e = Encoder::from_tensors(mpnet::tiny(40), HashMap::new(), &dev).unwrap_err();
        assert!(e.to_string().contains("embeddings"), "{e}");
    }
}
