//! The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) on candle.
//!
//! Shapes use `b` = batch, `t` = new positions in this call, `L` = cached + new positions,
//! `d` = `hidden_size`, `nh`/`nkv` = query/key-value heads, `hd` = `head_dim` (may differ from
//! `d / nh`), `V` = vocabulary, `P` = all new positions of a call (`sum b t` over its groups).
//!
//! One forward pass serves every mode:
//! - [`Llama::forward`]: one batch sharing a KV cache; the input is token ids or embeddings
//!   ([`Input`]), [`Forward`] says which blocks run, which taps fire and what comes back
//!   ([`Output`]: logits of every position, of the last one, or the residual stream).
//! - [`Llama::forward_groups`]: several batches with their own caches in one pass (continuous
//!   batching): every linear product runs once over all their rows, RoPE, the cache append and
//!   attention per group. Groups may differ in length, so a prompt chunk and other sequences'
//!   decode steps share one pass.
//! - Split mode is the same pass: its server part holds the blocks (embeddings in, hidden out),
//!   its client part the embedding and head ([`Llama::embed`], [`Llama::head`]).
//!
//! Every linear product goes through a [`crate::linear::Linear`] built by the
//! [`crate::linear::LinearBackend`] given at load ([`Llama::with_backend`]); [`Llama::new`] uses
//! local F32 weights. Load-time work: q/k/v are fused into one map, gate/up likewise, the
//! `1/sqrt(hd)` attention scale is folded into the q rows, the RoPE tables are precomputed.
//! The KV cache is written in place into buffers that grow by doubling; one-position attention
//! reads them directly ([`crate::kernels::attention`]).
mod block;
#[cfg(test)]
mod tests;

use crate::config::{LlamaConfig, ModelPart};
use crate::error::{ModelError, Result};
pub use crate::kv_cache::KvCache;
use crate::linear::{
    tensor, DenseBackend, EmbeddingTable, Linear, LinearBackend, LinearId, LinearKind, LinearPart,
    LinearSpec,
};
use crate::rope::Rope;
pub use crate::taps::{Tap, TapOptions, TapPoint};
use crate::weights::Weights;
use candle_core::{DType, Device, Tensor};
use std::ops::Range;
use std::sync::Arc;

/// What a forward pass starts from.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// Token ids `[b, t]` (u32, each `< V`); the pass starts at block 0.
    Ids(&'a Tensor),
    /// Input embeddings, or the residual stream entering the first block of the range,
    /// `[b, t, d]`.
    Embeds(&'a Tensor),
}

/// What a forward pass returns for each batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Output {
    /// Logits of every position `[b, t, V]`.
    Logits,
    /// Logits of each row's last position `[b, V]` (the head runs on those rows only).
    #[default]
    LastLogits,
    /// The residual stream after the last block of the range, before the final norm `[b, t, d]`.
    Hidden,
}

/// Options of one forward pass: output, block range and taps.
///
/// ```ignore
/// let logits = model.forward(Input::Ids(&ids), &mut cache, Forward::last_logits())?;
/// let hidden = model.forward(Input::Embeds(&x), &mut cache, Forward::hidden().tap(&mut f))?;
/// ```
#[derive(Default)]
pub struct Forward<'t> {
    pub output: Output,
    /// Blocks to run (indices into the blocks the model holds); `None`: all of them.
    pub blocks: Option<Range<usize>>,
    /// Opt-in taps besides [`crate::taps::TapPoint::Embeddings`] and [`crate::taps::TapPoint::Layer`].
    pub taps: TapOptions,
    /// The hook; `None` runs the plain pass.
    pub tap: Option<Tap<'t>>,
}

impl<'t> Forward<'t> {
    pub fn logits() -> Self {
        Self::output(Output::Logits)
    }

    pub fn last_logits() -> Self {
        Self::output(Output::LastLogits)
    }

    pub fn hidden() -> Self {
        Self::output(Output::Hidden)
    }

    pub fn output(output: Output) -> Self {
        Self {
            output,
            ..Self::default()
        }
    }

    /// Calls `tap` at [`crate::taps::TapPoint::Embeddings`], each [`crate::taps::TapPoint::Layer`] and, when the head
    /// runs, [`crate::taps::TapPoint::FinalNorm`].
    pub fn tap(mut self, tap: Tap<'t>) -> Self {
        self.tap = Some(tap);
        self
    }

    /// [`Forward::tap`] plus the opt-in taps of `opts` (attention probabilities, FFN activations).
    pub fn taps(mut self, opts: TapOptions, tap: Tap<'t>) -> Self {
        self.taps = opts;
        self.tap = Some(tap);
        self
    }

    /// Runs only `blocks` (the residual stream enters the first as [`Input::Embeds`]).
    pub fn blocks(mut self, blocks: Range<usize>) -> Self {
        self.blocks = Some(blocks);
        self
    }
}

/// One block's norms and linear maps.
#[derive(Debug, Clone)]
struct Block {
    ln1: Tensor,
    /// `[(nh + 2 nkv) hd, d]`, q rows pre-scaled by `1/sqrt(hd)`.
    qkv: Arc<dyn Linear>,
    /// `[d, nh hd]`.
    o: Arc<dyn Linear>,
    ln2: Tensor,
    /// `[2 ffn, d]`: gate rows then up rows.
    gate_up: Arc<dyn Linear>,
    /// `[d, ffn]`.
    down: Arc<dyn Linear>,
}

/// The token embedding table: F32, or kept by the backend (quantized rows dequantized on lookup).
#[derive(Debug, Clone)]
enum Embedding {
    Dense(Tensor),
    Table(Arc<dyn EmbeddingTable>),
}

/// A loaded Llama-family model.
#[derive(Debug, Clone)]
pub struct Llama {
    cfg: LlamaConfig,
    device: Device,
    /// Which part of a split-mode model this is ([`ModelPart::Full`] for ordinary checkpoints).
    part: ModelPart,
    /// `[V, d]`; `None` in a split-mode server part.
    embed: Option<Embedding>,
    /// Empty in a split-mode client part.
    blocks: Vec<Block>,
    /// Final RMSNorm weight `[d]`; `None` in a split-mode server part.
    norm: Option<Tensor>,
    /// `[V, d]`; `None` in a split-mode server part.
    lm_head: Option<Arc<dyn Linear>>,
    rope: Rope,
    nh: usize,
    nkv: usize,
    hd: usize,
    eps: f32,
    backend: String,
}

impl Llama {
    /// Builds the model from HF-named F32 weights, validating every tensor's presence and shape.
    ///
    /// A part of a split-mode model ([`LlamaConfig::part`]) is refused here, so that no caller
    /// mistakes it for a whole model; load it with [`Llama::new_part`].
    pub fn new(cfg: &LlamaConfig, weights: &Weights, device: &Device) -> Result<Self> {
        if cfg.part() != ModelPart::Full {
            return Err(ModelError::Unsupported(format!(
                "this checkpoint is the {} part of a split-mode model, not a whole model (serve \
                 the server part with `umbra serve`; generate with the client part and \
                 `umbra generate --server`)",
                cfg.part().as_str()
            )));
        }
        Self::new_part(cfg, weights, device)
    }

    /// [`Llama::new`] that also loads a part of a split-mode model, with only what it holds: a
    /// server part the blocks (its [`Llama::embed`] and [`Llama::head`] are errors), a client part
    /// the embedding, final norm and head (no blocks).
    pub fn new_part(cfg: &LlamaConfig, weights: &Weights, device: &Device) -> Result<Self> {
        Self::with_backend(cfg, weights, device, &DenseBackend::new(weights, device))
    }

    /// Builds the model with every linear map from `backend`; `weights` supplies the rest
    /// (embedding, norms) and whatever the backend does not hold itself.
    pub fn with_backend(
        cfg: &LlamaConfig,
        weights: &Weights,
        device: &Device,
        backend: &dyn LinearBackend,
    ) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.hidden_size;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let (ffn, v) = (cfg.intermediate_size, cfg.vocab_size);
        if v == 0 || ffn == 0 || hd == 0 {
            return Err(ModelError::Mismatch(
                "vocab_size, intermediate_size and head_dim must be > 0".into(),
            ));
        }
        let load = |name: &str, shape: &[usize]| tensor(weights, name, shape, device);
        let part = cfg.part();
        let embed = match part {
            ModelPart::Server => None,
            _ => Some(match backend.embedding("model.embed_tokens.weight")? {
                Some(t) if t.shape() == (v, d) => Embedding::Table(t),
                Some(t) => {
                    return Err(ModelError::Mismatch(format!(
                    "tensor `model.embed_tokens.weight` has shape {:?}, config implies [{v}, {d}]",
                    t.shape()
                )))
                }
                None => Embedding::Dense(load("model.embed_tokens.weight", &[v, d])?.contiguous()?),
            }),
        };
        let n_blocks = match part {
            ModelPart::Client => 0,
            _ => cfg.num_hidden_layers,
        };
        let blocks = (0..n_blocks)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let build = |kind, parts: Vec<LinearPart>, in_features| {
                    backend.build(&LinearSpec {
                        id: LinearId {
                            layer: Some(i),
                            kind,
                        },
                        parts,
                        in_features,
                    })
                };
                let part = |n: &str, rows, scale, bias: bool| LinearPart {
                    name: format!("{p}.{n}.weight"),
                    rows,
                    scale,
                    bias: bias.then(|| format!("{p}.{n}.bias")),
                };
                let qb = cfg.qkv_bias();
                let scale = 1.0 / (hd as f64).sqrt();
                Ok(Block {
                    ln1: load(&format!("{p}.input_layernorm.weight"), &[d])?,
                    ln2: load(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
                    qkv: build(
                        LinearKind::Qkv,
                        vec![
                            part("self_attn.q_proj", nh * hd, scale, qb),
                            part("self_attn.k_proj", nkv * hd, 1.0, qb),
                            part("self_attn.v_proj", nkv * hd, 1.0, qb),
                        ],
                        d,
                    )?,
                    o: build(
                        LinearKind::O,
                        vec![part("self_attn.o_proj", d, 1.0, cfg.o_bias())],
                        nh * hd,
                    )?,
                    gate_up: build(
                        LinearKind::GateUp,
                        vec![
                            part("mlp.gate_proj", ffn, 1.0, false),
                            part("mlp.up_proj", ffn, 1.0, false),
                        ],
                        d,
                    )?,
                    down: build(
                        LinearKind::Down,
                        vec![part("mlp.down_proj", d, 1.0, false)],
                        ffn,
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (norm, lm_head) = match &embed {
            None => (None, None),
            Some(_) => {
                let name = if cfg.tie_word_embeddings {
                    "model.embed_tokens.weight"
                } else {
                    "lm_head.weight"
                };
                let head = backend.build(&LinearSpec {
                    id: LinearId {
                        layer: None,
                        kind: LinearKind::Head,
                    },
                    parts: vec![LinearPart {
                        name: name.into(),
                        rows: v,
                        scale: 1.0,
                        bias: None,
                    }],
                    in_features: d,
                })?;
                (Some(load("model.norm.weight", &[d])?), Some(head))
            }
        };
        Ok(Self {
            cfg: cfg.clone(),
            device: device.clone(),
            part,
            embed,
            blocks,
            norm,
            lm_head,
            rope: Rope::new(cfg, device)?,
            nh,
            nkv,
            hd,
            eps: cfg.rms_norm_eps as f32,
            backend: backend.name().to_string(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Blocks this model holds (0 for a split-mode client part).
    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// Which part of a split-mode model this is.
    pub fn part(&self) -> ModelPart {
        self.part
    }

    /// The name of the linear backend the model was built with.
    pub fn backend(&self) -> &str {
        &self.backend
    }

    fn missing(&self, what: &str) -> ModelError {
        ModelError::Unsupported(format!(
            "this is the {} part of a split-mode model: it has no {what} (the client holds it)",
            self.part.as_str()
        ))
    }

    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    /// An empty cache sized for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.blocks.len())
    }

    /// An empty cache that reserves `capacity` positions up front.
    pub fn new_cache_with_capacity(&self, capacity: usize) -> KvCache {
        KvCache::with_capacity(self.blocks.len(), capacity)
    }

    /// Token embeddings: ids `[b,t]` (u32, each `< V`) -> `[b,t,d]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2().map_err(|_| {
            ModelError::Input(format!(
                "token ids must be [batch, seq], got shape {:?}",
                ids.dims()
            ))
        })?;
        if ids.dtype() != DType::U32 {
            return Err(ModelError::Input(format!(
                "token ids must be u32, got {:?}",
                ids.dtype()
            )));
        }
        if b == 0 || t == 0 {
            return Err(ModelError::Input(format!(
                "empty token ids of shape [{b}, {t}]"
            )));
        }
        let flat = ids.flatten_all()?;
        let vocab = self.cfg.vocab_size;
        let idv = flat.to_vec1::<u32>()?;
        if let Some(bad) = idv.iter().find(|&&i| i as usize >= vocab) {
            return Err(ModelError::Input(format!(
                "token id {bad} is out of range for vocab size {vocab}"
            )));
        }
        let table = self
            .embed
            .as_ref()
            .ok_or_else(|| self.missing("embedding"))?;
        let d = self.cfg.hidden_size;
        let e = match table {
            Embedding::Dense(table) => table.index_select(&flat.to_device(&self.device)?, 0)?,
            Embedding::Table(table) => {
                Tensor::from_vec(table.lookup(&idv)?, (b * t, d), &self.device)?
            }
        };
        Ok(e.reshape((b, t, d))?)
    }

    /// Final norm and LM head: hidden `[.., d]` -> logits `[.., V]`.
    pub fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        let normed = self.final_norm(hidden)?;
        self.lm_head(&normed)
    }

    fn final_norm(&self, hidden: &Tensor) -> Result<Tensor> {
        let w = self
            .norm
            .as_ref()
            .ok_or_else(|| self.missing("final norm"))?;
        Ok(candle_nn::ops::rms_norm(
            &hidden.contiguous()?,
            w,
            self.eps,
        )?)
    }

    /// The LM head over normed rows `[.., d]` -> `[.., V]`.
    fn lm_head(&self, normed: &Tensor) -> Result<Tensor> {
        let head = self
            .lm_head
            .as_ref()
            .ok_or_else(|| self.missing("LM head"))?;
        let dims = normed.dims().to_vec();
        let d = dims[dims.len() - 1];
        let rows = normed.elem_count() / d.max(1);
        let y = head.forward(&normed.reshape((rows, d))?)?;
        let mut out = dims;
        *out.last_mut().expect("at least one dim") = self.cfg.vocab_size;
        Ok(y.reshape(out)?)
    }

    /// One forward pass of one batch that shares `cache`: `input` at `cache.len()`, appending
    /// `t` positions (causal within the call). Returns what `opts.output` asks for.
    ///
    /// Taps see `[b, t, d]` residual streams (and [`crate::taps::TapPoint::FinalNorm`] the normed rows the
    /// head reads: `[b, t, d]` for [`Output::Logits`], `[b, d]` for [`Output::LastLogits`]).
    pub fn forward(
        &self,
        input: Input<'_>,
        cache: &mut KvCache,
        opts: Forward<'_>,
    ) -> Result<Tensor> {
        let mut out = self.run(&[input], &mut [cache], opts, true)?;
        Ok(out.pop().expect("one group in, one out"))
    }

    /// One forward pass over several batches, each with its own cache (continuous batching):
    /// `groups[g] = (input, cache)`. Every linear product runs once over all groups' rows;
    /// RoPE, the cache append and attention run per group. Returns one output per group, equal
    /// to what [`Llama::forward`] gives that group alone.
    ///
    /// Taps see all groups' positions stacked, `[P, d]`: group after group, each batch-major
    /// (row `r`, position `p` of a group of `t` positions at `r * t + p`); attention taps come
    /// once per group, in order.
    pub fn forward_groups(
        &self,
        groups: &mut [(Input<'_>, &mut KvCache)],
        opts: Forward<'_>,
    ) -> Result<Vec<Tensor>> {
        if groups.is_empty() {
            return Ok(vec![]);
        }
        let inputs: Vec<Input<'_>> = groups.iter().map(|(i, _)| *i).collect();
        let mut caches: Vec<&mut KvCache> = groups.iter_mut().map(|(_, c)| &mut **c).collect();
        self.run(&inputs, &mut caches, opts, false)
    }
}
