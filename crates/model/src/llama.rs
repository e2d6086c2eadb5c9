//! The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) on candle, F32.
//!
//! Shapes use `b` = batch, `t` = new positions in this call, `L` = cached + new positions,
//! `d` = `hidden_size`, `nh`/`nkv` = query/key-value heads, `hd` = `head_dim` (may differ from
//! `d / nh`), `V` = vocabulary.
//!
//! Entry points:
//! - [`Llama::forward`]: ids `[b,t]` -> logits `[b,t,V]` (prefill with causal mask, or decode).
//! - [`Llama::forward_last`]: ids `[b,t]` -> logits of the last position `[b,V]` (generation).
//! - Split mode: [`Llama::embed`] -> [`Llama::forward_embeds`] (blocks only) -> [`Llama::head`].
//! - [`Llama::forward_embeds_with_taps`]: the same blocks, with a [`TapPoint`] callback that sees
//!   the residual stream after the embeddings and after every layer (for probes);
//!   [`Llama::forward_embeds_with_tap_options`] also emits the opt-in taps chosen by
//!   [`TapOptions`] (attention probabilities, FFN activations).
//!
//! Load-time work: q/k/v are fused into one `[(nh+2nkv)*hd, d]` matrix, gate/up likewise, the
//! `1/sqrt(hd)` attention scale is folded into the q rows, and the RoPE cos/sin tables are
//! precomputed. The KV cache is written in place into buffers that grow by doubling.
//!
//! Decode steps (at most 32 rows) avoid candle's per-op rayon dispatch and gemm's per-call
//! packing, which on a small CPU cost more than the work: projections use the few-row kernel in
//! `matvec` (each weight row read once for all rows), single-threaded unless the product has at
//! least `UMBRA_PAR_MIN_WORK` (default 2^22 ≈ the LM head) multiply-adds, and one-position
//! attention reads the cache buffers directly. [`Llama::forward_decode_groups`] batches the
//! decode step of sequences of different lengths (each group with its own cache).
use crate::config::{LlamaConfig, ModelPart};
use crate::error::{ModelError, Result};
use crate::weights::Weights;
use candle_core::{DType, Device, Tensor};

/// Positions for which cos/sin are tabulated at load time; later positions are computed per call.
const ROPE_TABLE_MAX: usize = 8192;
/// Initial KV capacity (positions) when a cache is first written and none was requested.
const DEFAULT_KV_CAPACITY: usize = 256;

/// A linear map in HF layout: `w` is `[out, in]`, contiguous; `y = x @ w^T + b`.
#[derive(Debug, Clone)]
struct Lin {
    w: Tensor,
    bias: Option<Tensor>,
}

impl Lin {
    /// `x`: `[.., in]` -> `[.., out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let n = self.w.dim(0)?;
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = n;
        if rows <= kernels::SMALL_ROWS {
            if let Some(y) = kernels::linear_small(x, &self.w, self.bias.as_ref())? {
                return Ok(y.reshape(out)?);
            }
        }
        let x2 = x.reshape((rows, k))?;
        let mut y = x2.matmul(&self.w.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        Ok(y.reshape(out)?)
    }
}

#[derive(Debug, Clone)]
struct Block {
    ln1: Tensor,
    /// `[(nh + 2 nkv) hd, d]`, q rows pre-scaled by `1/sqrt(hd)`.
    qkv: Lin,
    /// `[d, nh hd]`.
    o: Lin,
    ln2: Tensor,
    /// `[2 ffn, d]`: gate rows then up rows.
    gate_up: Lin,
    /// `[d, ffn]`.
    down: Lin,
}

/// RoPE (HF `rotate_half` pairing: dim `j` with `j + hd/2`).
#[derive(Debug, Clone)]
struct Rope {
    inv_freq: Vec<f64>,
    /// `[table_len, hd/2]` each.
    cos: Tensor,
    sin: Tensor,
    table_len: usize,
}

impl Rope {
    fn new(cfg: &LlamaConfig, device: &Device) -> Result<Self> {
        let hd = cfg.head_dim();
        let base = cfg.rope_theta;
        // HF computes inv_freq in f32; we match that rounding, then work in f64.
        let mut inv_freq: Vec<f64> = (0..hd / 2)
            .map(|i| (1.0f32 / (base as f32).powf((2 * i) as f32 / hd as f32)) as f64)
            .collect();
        if let Some(scaling) = &cfg.rope_scaling {
            apply_rope_scaling(scaling, &mut inv_freq)?;
        }
        let table_len = cfg.max_position_embeddings.clamp(1, ROPE_TABLE_MAX);
        let (cos, sin) = Self::compute(&inv_freq, 0, table_len, device)?;
        Ok(Self {
            inv_freq,
            cos,
            sin,
            table_len,
        })
    }

    fn compute(
        inv_freq: &[f64],
        start: usize,
        t: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in start..start + t {
            for &f in inv_freq {
                // HF: float32 position * float32 inv_freq, then cos/sin.
                let a = (p as f32 * f as f32) as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok((
            Tensor::from_vec(cos, (t, half), device)?,
            Tensor::from_vec(sin, (t, half), device)?,
        ))
    }

    /// cos/sin `[t, hd/2]` for positions `start..start+t`.
    fn cos_sin(&self, start: usize, t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        if start + t <= self.table_len {
            Ok((self.cos.narrow(0, start, t)?, self.sin.narrow(0, start, t)?))
        } else {
            Self::compute(&self.inv_freq, start, t, device)
        }
    }
}

/// Applies `rope_scaling` to `inv_freq`. Supports `default` (no-op) and `llama3`.
fn apply_rope_scaling(scaling: &serde_json::Value, inv_freq: &mut [f64]) -> Result<()> {
    let bad = |msg: String| ModelError::Unsupported(format!("rope_scaling: {msg}"));
    if scaling.is_null() {
        return Ok(());
    }
    let obj = scaling
        .as_object()
        .ok_or_else(|| bad(format!("expected an object, got {scaling}")))?;
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    match kind {
        "default" => Ok(()),
        "llama3" => {
            let num = |k: &str| -> Result<f64> {
                obj.get(k)
                    .and_then(|v| v.as_f64())
                    .ok_or_else(|| bad(format!("llama3 scaling needs numeric `{k}`")))
            };
            let factor = num("factor")?;
            let low = num("low_freq_factor")?;
            let high = num("high_freq_factor")?;
            let old_ctx = num("original_max_position_embeddings")?;
            if factor <= 0.0 || high <= low || low <= 0.0 || old_ctx <= 0.0 {
                return Err(bad(format!(
                    "invalid llama3 parameters (factor {factor}, low_freq_factor {low}, high_freq_factor {high}, original_max_position_embeddings {old_ctx})"
                )));
            }
            let low_wl = old_ctx / low;
            let high_wl = old_ctx / high;
            for f in inv_freq.iter_mut() {
                let wl = 2.0 * std::f64::consts::PI / *f;
                *f = if wl < high_wl {
                    *f
                } else if wl > low_wl {
                    *f / factor
                } else {
                    let smooth = (old_ctx / wl - low) / (high - low);
                    (1.0 - smooth) * *f / factor + smooth * *f
                };
            }
            Ok(())
        }
        other => Err(bad(format!(
            "type `{other}` is not supported (supported: default, llama3)"
        ))),
    }
}

/// Where a [`Tap`] callback is invoked during [`Llama::forward_embeds_with_taps`].
///
/// Follows HF `output_hidden_states` except that the last entry is *before* the final norm:
/// `Embeddings` = HF `hidden_states[0]`, `Layer(i)` = residual stream after block `i`
/// (HF `hidden_states[i+1]` for `i < n-1`), `FinalNorm` = after `model.norm` (HF's last entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapPoint {
    Embeddings,
    Layer(usize),
    /// Only emitted by [`Llama::forward_with_taps`] (which applies the head).
    FinalNorm,
    /// Attention probabilities of block `i`, `[b, nh, t, L]` (rows sum to 1, causal), seen
    /// before that block's `Layer(i)`. Opt-in ([`TapOptions::attention`]): only emitted by
    /// [`Llama::forward_embeds_with_tap_options`] (and its shorthand
    /// [`Llama::forward_embeds_with_attention_taps`]); the other entry points never compute it.
    Attention(usize),
    /// The SwiGLU intermediate activation of block `i`, `act(gate(h)) * up(h)` with
    /// `h = post_attention_layernorm(x + attn)`, `[b, t, intermediate_size]`: the input of
    /// `down_proj`, so `Layer(i) = x + attn + down_proj(Ffn(i))`. Seen after `Attention(i)` and
    /// before `Layer(i)`. Opt-in ([`TapOptions::ffn`]): only emitted by
    /// [`Llama::forward_embeds_with_tap_options`]; costs nothing otherwise (the activation is
    /// computed anyway; the tap only hands out a handle to it).
    Ffn(usize),
}

/// Which opt-in taps [`Llama::forward_embeds_with_tap_options`] emits besides
/// [`TapPoint::Embeddings`] and [`TapPoint::Layer`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TapOptions {
    /// [`TapPoint::Attention`]: attention then runs with candle ops for every `t` (no
    /// one-position fast path) so the probabilities exist; results are identical.
    pub attention: bool,
    /// [`TapPoint::Ffn`]: free (the activation exists anyway).
    pub ffn: bool,
}

impl TapOptions {
    /// Residual-stream taps only.
    pub const NONE: Self = Self {
        attention: false,
        ffn: false,
    };
    pub const ATTENTION: Self = Self {
        attention: true,
        ffn: false,
    };
    pub const FFN: Self = Self {
        attention: false,
        ffn: true,
    };
    pub const ALL: Self = Self {
        attention: true,
        ffn: true,
    };
}

/// A read-only hook on hidden states `[b,t,d]`; the tensor is the live activation (cheap clone).
pub type Tap<'a> = &'a mut dyn FnMut(TapPoint, &Tensor);
/// A [`Tap`] reborrowed for one block (`'r` shorter than the hook's own lifetime `'a`).
type TapRef<'r, 'a> = &'r mut (dyn FnMut(TapPoint, &Tensor) + 'a);

/// Per-layer K/V for one batch of sequences that advance together.
///
/// Buffers are `[b, nkv, capacity, hd]`, written in place and grown by doubling; a serving layer
/// keeps one `KvCache` (b = 1) per sequence. Not `Clone` (buffers are mutated in place); use
/// [`KvCache::try_clone`] for a deep copy.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    capacity: usize,
    batch: usize,
}

impl KvCache {
    /// An empty cache for a model with `num_layers` blocks.
    pub fn new(num_layers: usize) -> Self {
        Self::with_capacity(num_layers, DEFAULT_KV_CAPACITY)
    }

    /// Reserves `capacity` positions on first write (grows past it if needed).
    pub fn with_capacity(num_layers: usize, capacity: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
            capacity: capacity.max(1),
            batch: 0,
        }
    }

    /// Cached positions (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Batch size of the cached sequences (0 while empty).
    pub fn batch_size(&self) -> usize {
        if self.len == 0 {
            0
        } else {
            self.batch
        }
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// A deep copy (e.g. to fork a shared prompt prefix).
    pub fn try_clone(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                Some((k, v)) => Ok(Some((k.copy()?, v.copy()?))),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            len: self.len,
            capacity: self.capacity,
            batch: self.batch,
        })
    }

    /// Keeps only the batch rows whose `keep` flag is set (in order), e.g. to drop finished
    /// sequences from a batch. `keep.len()` must equal the cached batch size.
    pub fn retain(&mut self, keep: &[bool]) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        if keep.len() != self.batch {
            return Err(ModelError::Input(format!(
                "retain: {} flags for a cached batch of {}",
                keep.len(),
                self.batch
            )));
        }
        let idx: Vec<u32> = (0..keep.len() as u32)
            .filter(|&i| keep[i as usize])
            .collect();
        if idx.len() == keep.len() {
            return Ok(());
        }
        if idx.is_empty() {
            self.layers.iter_mut().for_each(|l| *l = None);
            self.len = 0;
            self.batch = 0;
            return Ok(());
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            let ix = Tensor::new(idx.as_slice(), k.device())?;
            *k = k.index_select(&ix, 0)?.contiguous()?;
            *v = v.index_select(&ix, 0)?.contiguous()?;
        }
        self.batch = idx.len();
        Ok(())
    }

    /// Forgets all positions; keeps the buffers for reuse.
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Keeps only the first `len` positions (e.g. to roll back a rejected draft).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Writes `k`, `v` (`[b, nkv, t, hd]`, contiguous) at `start` for `layer`; returns views of
    /// positions `0..start+t`.
    fn append(
        &mut self,
        layer: usize,
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (b, nkv, t, hd) = k.dims4()?;
        let need = start + t;
        let slot = &mut self.layers[layer];
        let realloc = match slot {
            Some((kb, _)) => {
                let (kb_b, _, cap, _) = kb.dims4()?;
                kb_b != b || cap < need
            }
            None => true,
        };
        if realloc {
            let mut cap = self.capacity.max(need);
            if let Some((kb, _)) = slot.as_ref() {
                if kb.dim(0)? == b {
                    cap = cap.max(kb.dim(2)? * 2);
                }
            }
            let nk = Tensor::zeros((b, nkv, cap, hd), k.dtype(), k.device())?;
            let nv = Tensor::zeros((b, nkv, cap, hd), v.dtype(), v.device())?;
            if let Some((kb, vb)) = slot.as_ref() {
                if start > 0 && kb.dim(0)? == b {
                    nk.slice_set(&kb.narrow(2, 0, start)?.contiguous()?, 2, 0)?;
                    nv.slice_set(&vb.narrow(2, 0, start)?.contiguous()?, 2, 0)?;
                }
            }
            *slot = Some((nk, nv));
        }
        let (kb, vb) = slot.as_ref().expect("allocated above");
        kb.slice_set(k, 2, start)?;
        vb.slice_set(v, 2, start)?;
        Ok((kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?))
    }
}

/// A loaded Llama-family model (F32).
#[derive(Debug, Clone)]
pub struct Llama {
    cfg: LlamaConfig,
    device: Device,
    /// Which part of a split-mode model this is ([`ModelPart::Full`] for ordinary checkpoints).
    part: ModelPart,
    /// `[V, d]`; `None` in a split-mode server part.
    embed: Option<Tensor>,
    /// Empty in a split-mode client part.
    blocks: Vec<Block>,
    /// Final RMSNorm weight `[d]`; `None` in a split-mode server part.
    norm: Option<Tensor>,
    /// `[V, d]` (shares the embedding storage when tied); `None` in a split-mode server part.
    lm_head: Option<Lin>,
    rope: Rope,
    nh: usize,
    nkv: usize,
    hd: usize,
    eps: f32,
}

fn get<'a>(w: &'a Weights, name: &str, shape: &[usize]) -> Result<&'a Tensor> {
    let t = w
        .get(name)
        .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
    if t.dims() != shape {
        return Err(ModelError::Mismatch(format!(
            "tensor `{name}` has shape {:?}, config implies {:?}",
            t.dims(),
            shape
        )));
    }
    Ok(t)
}

impl Llama {
    /// Builds the model from HF-named weights, validating every tensor's presence and shape.
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
    /// the embedding, final norm and head (no blocks: [`Llama::forward_embeds`] is the identity).
    pub fn new_part(cfg: &LlamaConfig, weights: &Weights, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.hidden_size;
        let nh = cfg.num_attention_heads;
        let nkv = cfg.num_kv_heads();
        let hd = cfg.head_dim();
        let ffn = cfg.intermediate_size;
        let v = cfg.vocab_size;
        if v == 0 || ffn == 0 || hd == 0 {
            return Err(ModelError::Mismatch(
                "vocab_size, intermediate_size and head_dim must be > 0".into(),
            ));
        }
        let load = |name: &str, shape: &[usize]| -> Result<Tensor> {
            Ok(get(weights, name, shape)?
                .to_dtype(DType::F32)?
                .to_device(device)?)
        };
        let part = cfg.part();
        let embed = match part {
            ModelPart::Server => None,
            _ => Some(load("model.embed_tokens.weight", &[v, d])?.contiguous()?),
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let n_blocks = match part {
            ModelPart::Client => 0,
            _ => cfg.num_hidden_layers,
        };
        let mut blocks = Vec::with_capacity(n_blocks);
        for i in 0..n_blocks {
            let p = format!("model.layers.{i}");
            let ln1 = load(&format!("{p}.input_layernorm.weight"), &[d])?;
            let ln2 = load(&format!("{p}.post_attention_layernorm.weight"), &[d])?;
            let q = (load(&format!("{p}.self_attn.q_proj.weight"), &[nh * hd, d])? * scale)?;
            let k = load(&format!("{p}.self_attn.k_proj.weight"), &[nkv * hd, d])?;
            let vw = load(&format!("{p}.self_attn.v_proj.weight"), &[nkv * hd, d])?;
            let qkv_w = Tensor::cat(&[&q, &k, &vw], 0)?.contiguous()?;
            let qkv_b = if cfg.qkv_bias() {
                let qb = (load(&format!("{p}.self_attn.q_proj.bias"), &[nh * hd])? * scale)?;
                let kb = load(&format!("{p}.self_attn.k_proj.bias"), &[nkv * hd])?;
                let vb = load(&format!("{p}.self_attn.v_proj.bias"), &[nkv * hd])?;
                Some(Tensor::cat(&[&qb, &kb, &vb], 0)?)
            } else {
                None
            };
            let o_w = load(&format!("{p}.self_attn.o_proj.weight"), &[d, nh * hd])?.contiguous()?;
            let o_b = if cfg.o_bias() {
                Some(load(&format!("{p}.self_attn.o_proj.bias"), &[d])?)
            } else {
                None
            };
            let gate = load(&format!("{p}.mlp.gate_proj.weight"), &[ffn, d])?;
            let up = load(&format!("{p}.mlp.up_proj.weight"), &[ffn, d])?;
            let gu_w = Tensor::cat(&[&gate, &up], 0)?.contiguous()?;
            let down_w = load(&format!("{p}.mlp.down_proj.weight"), &[d, ffn])?.contiguous()?;
            blocks.push(Block {
                ln1,
                qkv: Lin {
                    w: qkv_w,
                    bias: qkv_b,
                },
                o: Lin { w: o_w, bias: o_b },
                ln2,
                gate_up: Lin {
                    w: gu_w,
                    bias: None,
                },
                down: Lin {
                    w: down_w,
                    bias: None,
                },
            });
        }
        let (norm, lm_head) = match &embed {
            None => (None, None),
            Some(embed) => {
                let w = if cfg.tie_word_embeddings {
                    embed.clone()
                } else {
                    load("lm_head.weight", &[v, d])?.contiguous()?
                };
                (
                    Some(load("model.norm.weight", &[d])?),
                    Some(Lin { w, bias: None }),
                )
            }
        };
        let rope = Rope::new(cfg, device)?;
        Ok(Self {
            cfg: cfg.clone(),
            device: device.clone(),
            part,
            embed,
            blocks,
            norm,
            lm_head,
            rope,
            nh,
            nkv,
            hd,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// Which part of a split-mode model this is.
    pub fn part(&self) -> ModelPart {
        self.part
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
        if let Some(bad) = flat
            .to_vec1::<u32>()?
            .into_iter()
            .find(|&i| i as usize >= vocab)
        {
            return Err(ModelError::Input(format!(
                "token id {bad} is out of range for vocab size {vocab}"
            )));
        }
        let table = self
            .embed
            .as_ref()
            .ok_or_else(|| self.missing("embedding"))?;
        let e = table.index_select(&flat.to_device(&self.device)?, 0)?;
        Ok(e.reshape((b, t, self.cfg.hidden_size))?)
    }

    /// Final norm and LM head: hidden `[b,t,d]` -> logits `[b,t,V]` (or `[b,d]` -> `[b,V]`).
    pub fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        let h = candle_nn::ops::rms_norm(&hidden.contiguous()?, self.final_norm()?, self.eps)?;
        self.lm_head(&h)
    }

    fn final_norm(&self) -> Result<&Tensor> {
        self.norm.as_ref().ok_or_else(|| self.missing("final norm"))
    }

    fn lm_head(&self, normed: &Tensor) -> Result<Tensor> {
        self.lm_head
            .as_ref()
            .ok_or_else(|| self.missing("LM head"))?
            .forward(normed)
    }

    /// ids `[b,t]` -> logits `[b,t,V]`; appends `t` positions to `cache` (causal within the call).
    pub fn forward(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let x = self.embed(ids)?;
        let h = self.run_blocks(&x, cache, None, TapOptions::NONE)?;
        self.head(&h)
    }

    /// ids `[b,t]` -> logits of the last position `[b,V]`; the LM head runs on that position only.
    pub fn forward_last(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let x = self.embed(ids)?;
        self.last_logits(&x, cache, None)
    }

    /// Blocks over `x` `[b,t,d]`, then the head on the last position only -> `[b,V]`.
    fn last_logits(&self, x: &Tensor, cache: &mut KvCache, tap: Option<Tap<'_>>) -> Result<Tensor> {
        let h = self.run_blocks(x, cache, tap, TapOptions::NONE)?;
        let t = h.dim(1)?;
        self.head(&h.narrow(1, t - 1, 1)?.squeeze(1)?)
    }

    /// [`Llama::forward_last`] calling `tap` at [`TapPoint::Embeddings`] and each `Layer(i)` with
    /// the residual stream of every position, `[b, t, d]`.
    pub fn forward_last_with_taps(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        tap: Tap<'_>,
    ) -> Result<Tensor> {
        let x = self.embed(ids)?;
        self.last_logits(&x, cache, Some(tap))
    }

    /// Blocks only (no final norm): embeddings `[b,t,d]` -> residual stream `[b,t,d]`.
    pub fn forward_embeds(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.run_blocks(embeds, cache, None, TapOptions::NONE)
    }

    /// [`Llama::forward_embeds`] calling `tap` at [`TapPoint::Embeddings`] and each `Layer(i)`.
    pub fn forward_embeds_with_taps(
        &self,
        embeds: &Tensor,
        cache: &mut KvCache,
        tap: Tap<'_>,
    ) -> Result<Tensor> {
        self.run_blocks(embeds, cache, Some(tap), TapOptions::NONE)
    }

    /// [`Llama::forward_embeds_with_taps`] that also emits the opt-in taps of `opts` per block:
    /// [`TapPoint::Attention`] (for attention-based probes such as lookback ratios) and/or
    /// [`TapPoint::Ffn`] (FFN activation statistics). Results are identical to
    /// [`Llama::forward_embeds`].
    pub fn forward_embeds_with_tap_options(
        &self,
        embeds: &Tensor,
        cache: &mut KvCache,
        opts: TapOptions,
        tap: Tap<'_>,
    ) -> Result<Tensor> {
        self.run_blocks(embeds, cache, Some(tap), opts)
    }

    /// Shorthand for [`Llama::forward_embeds_with_tap_options`] with [`TapOptions::ATTENTION`].
    pub fn forward_embeds_with_attention_taps(
        &self,
        embeds: &Tensor,
        cache: &mut KvCache,
        tap: Tap<'_>,
    ) -> Result<Tensor> {
        self.run_blocks(embeds, cache, Some(tap), TapOptions::ATTENTION)
    }

    /// [`Llama::forward`] with taps, including [`TapPoint::FinalNorm`]; returns logits `[b,t,V]`.
    pub fn forward_with_taps(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        tap: Tap<'_>,
    ) -> Result<Tensor> {
        let x = self.embed(ids)?;
        let h = self.run_blocks(&x, cache, Some(&mut *tap), TapOptions::NONE)?;
        let normed = candle_nn::ops::rms_norm(&h, self.final_norm()?, self.eps)?;
        tap(TapPoint::FinalNorm, &normed);
        self.lm_head(&normed)
    }

    fn run_blocks(
        &self,
        embeds: &Tensor,
        cache: &mut KvCache,
        mut tap: Option<Tap<'_>>,
        opts: TapOptions,
    ) -> Result<Tensor> {
        let (b, t, d) = embeds.dims3().map_err(|_| {
            ModelError::Input(format!(
                "embeddings must be [batch, seq, hidden], got {:?}",
                embeds.dims()
            ))
        })?;
        if d != self.cfg.hidden_size || b == 0 || t == 0 {
            return Err(ModelError::Input(format!(
                "embeddings of shape {:?}, expected [b>0, t>0, {}]",
                embeds.dims(),
                self.cfg.hidden_size
            )));
        }
        if cache.num_layers() != self.blocks.len() {
            return Err(ModelError::Input(format!(
                "KV cache has {} layers, model has {}",
                cache.num_layers(),
                self.blocks.len()
            )));
        }
        if !cache.is_empty() && cache.batch != b {
            return Err(ModelError::Input(format!(
                "KV cache holds batch {}, input has batch {b}",
                cache.batch
            )));
        }
        let start = cache.len();
        let max_pos = self.cfg.max_position_embeddings;
        if start + t > max_pos {
            return Err(ModelError::Input(format!(
                "sequence of {} positions ({start} cached + {t} new) exceeds max_position_embeddings {max_pos}",
                start + t
            )));
        }
        let (cos, sin) = self.rope.cos_sin(start, t, &self.device)?;
        let mask = if t > 1 {
            Some(causal_mask(t, start, &self.device)?)
        } else {
            None
        };
        let mut x = embeds.to_dtype(DType::F32)?.contiguous()?;
        if let Some(tap) = tap.as_mut() {
            tap(TapPoint::Embeddings, &x);
        }
        for (i, blk) in self.blocks.iter().enumerate() {
            let taps = match tap.as_mut() {
                Some(tap) if opts != TapOptions::NONE => Some((opts, &mut **tap)),
                _ => None,
            };
            x = self.block_forward(blk, i, &x, start, &cos, &sin, mask.as_ref(), cache, taps)?;
            if let Some(tap) = tap.as_mut() {
                tap(TapPoint::Layer(i), &x);
            }
        }
        cache.len = start + t;
        cache.batch = b;
        Ok(x)
    }

    /// One block; `taps` = the opt-in taps to emit for it (`None`: the plain path).
    #[allow(clippy::too_many_arguments)]
    fn block_forward(
        &self,
        blk: &Block,
        layer: usize,
        x: &Tensor,
        start: usize,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        taps: Option<(TapOptions, TapRef<'_, '_>)>,
    ) -> Result<Tensor> {
        let (q, k, v) = self.qkv(blk, x)?;
        let Some((opts, tap)) = taps else {
            let (y, _) = self.attend(&q, &k, &v, layer, start, cos, sin, mask, cache, false)?;
            return self.block_out(blk, x, &y, None);
        };
        let (y, probs) = self.attend(
            &q,
            &k,
            &v,
            layer,
            start,
            cos,
            sin,
            mask,
            cache,
            opts.attention,
        )?;
        if let Some(p) = probs {
            tap(TapPoint::Attention(layer), &p);
        }
        self.block_out(blk, x, &y, opts.ffn.then_some((layer, tap)))
    }

    /// Pre-norm and fused QKV projection: `x` `[b,t,d]` -> q `[b,nh,t,hd]` (scale folded in),
    /// k, v `[b,nkv,t,hd]` (before RoPE).
    fn qkv(&self, blk: &Block, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _d) = x.dims3()?;
        let (nh, nkv, hd) = (self.nh, self.nkv, self.hd);
        let h = candle_nn::ops::rms_norm(x, &blk.ln1, self.eps)?;
        let qkv = blk.qkv.forward(&h)?; // [b,t,(nh+2nkv)hd]
        let qkv = qkv
            .reshape((b, t, nh + 2 * nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?; // [b,H,t,hd]
        Ok((
            qkv.narrow(1, 0, nh)?.contiguous()?,
            qkv.narrow(1, nh, nkv)?.contiguous()?,
            qkv.narrow(1, nh + nkv, nkv)?.contiguous()?,
        ))
    }

    /// RoPE at `start`, cache append and attention for one batch that shares `cache`:
    /// q `[b,nh,t,hd]`, k/v `[b,nkv,t,hd]` -> `[b,t,nh*hd]`, and with `probs` the attention
    /// probabilities `[b,nh,t,L]`.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        layer: usize,
        start: usize,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        probs: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let q = candle_nn::rotary_emb::rope(q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(k, cos, sin)?;
        self.attend_roped(&q, &k, v, layer, start, mask, cache, probs)
    }

    /// [`Llama::attend`] after RoPE: cache append and attention. With `probs` it never takes the
    /// one-position fast path, so that the probabilities exist.
    #[allow(clippy::too_many_arguments)]
    fn attend_roped(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        layer: usize,
        start: usize,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        probs: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, _, t, _) = q.dims4()?;
        let (k_all, v_all) = cache.append(layer, start, k, v)?; // [b,nkv,L,hd] views
        let l = start + t;
        if t == 1 && !probs {
            if let Some(y) = self.decode_attention(q, cache, layer, b, l)? {
                return Ok((y, None));
            }
        }
        let (y, att) = self.attention(q, &k_all, &v_all, mask, b, t, l)?;
        // [b,nkv,rep*t,L] -> [b,nh,t,L]: head h = g*rep + r, as in `attention`'s grouping.
        let att = if probs {
            Some(att.reshape((b, self.nh, t, l))?)
        } else {
            None
        };
        Ok((y, att))
    }

    /// Output projection, residual, and the SwiGLU FFN with its residual; `ffn_tap`
    /// (`(layer, tap)`) sees the activation as [`TapPoint::Ffn`] before `down_proj`.
    fn block_out(
        &self,
        blk: &Block,
        x: &Tensor,
        y: &Tensor,
        ffn_tap: Option<(usize, TapRef<'_, '_>)>,
    ) -> Result<Tensor> {
        let x = (x + blk.o.forward(y)?)?;
        let h = candle_nn::ops::rms_norm(&x, &blk.ln2, self.eps)?;
        let gu = blk.gate_up.forward(&h)?;
        let ffn = gu.dim(2)? / 2;
        let act = (candle_nn::ops::silu(&gu.narrow(2, 0, ffn)?)? * gu.narrow(2, ffn, ffn)?)?;
        if let Some((layer, tap)) = ffn_tap {
            tap(TapPoint::Ffn(layer), &act);
        }
        Ok((x + blk.down.forward(&act)?)?)
    }

    /// One decode position for several independent batches at once (continuous batching across
    /// sequences of different lengths).
    ///
    /// `groups[g]` is `(ids, cache)`: the next token of each of the `b_g` rows that share `cache`
    /// (all at position `cache.len()`). Every projection and the FFN run once over all
    /// `B = sum b_g` rows (one GEMM per weight); RoPE, the cache append and attention run per
    /// group against its own cache. Returns last-position logits `[b_g, V]` per group, equal to
    /// what [`Llama::forward_last`] gives each group alone.
    pub fn forward_decode_groups(
        &self,
        groups: &mut [(&[u32], &mut KvCache)],
    ) -> Result<Vec<Tensor>> {
        self.decode_groups(groups, None)
    }

    /// [`Llama::forward_decode_groups`] calling `tap` at [`TapPoint::Embeddings`] and each
    /// `Layer(i)` with the residual stream of all rows, `[B, 1, d]`, groups in order (rows
    /// `r0..r0 + b_g` belong to group `g`). Serving uses it to score completions from the same
    /// pass that generates them.
    pub fn forward_decode_groups_with_taps(
        &self,
        groups: &mut [(&[u32], &mut KvCache)],
        tap: Tap<'_>,
    ) -> Result<Vec<Tensor>> {
        self.decode_groups(groups, Some(tap))
    }

    /// One decode position for several independent sequences given as input embeddings, the
    /// blocks only (split mode's server: no embedding, no head). `groups[g]` is `(x, cache)`
    /// with `x` `[b_g, 1, d]` for the `b_g` rows sharing `cache`. Returns the residual stream
    /// `[b_g, 1, d]` per group (no final norm), equal to what [`Llama::forward_embeds`] gives
    /// each group alone; every projection and the FFN run once over all rows.
    pub fn forward_decode_groups_embeds(
        &self,
        groups: &mut [(&Tensor, &mut KvCache)],
    ) -> Result<Vec<Tensor>> {
        if groups.is_empty() {
            return Ok(vec![]);
        }
        let mut rows = Vec::with_capacity(groups.len());
        for (x, _) in groups.iter() {
            let (n, t, d) = x.dims3()?;
            if t != 1 || d != self.cfg.hidden_size {
                return Err(ModelError::Input(format!(
                    "decode embeddings must be [rows, 1, {}], got {:?}",
                    self.cfg.hidden_size,
                    x.dims()
                )));
            }
            rows.push(n);
        }
        let spans = self.decode_spans(groups.iter().map(|(_, c)| &**c).zip(rows))?;
        let xs: Vec<Tensor> = groups.iter().map(|(x, _)| (*x).clone()).collect();
        let x = Tensor::cat(&xs, 0)?;
        let mut caches: Vec<&mut KvCache> = groups.iter_mut().map(|(_, c)| &mut **c).collect();
        let x = self.decode_blocks(x, &spans, &mut caches, &mut None)?;
        spans
            .iter()
            .map(|&(r0, n, _)| Ok(x.narrow(0, r0, n)?))
            .collect()
    }

    fn decode_groups(
        &self,
        groups: &mut [(&[u32], &mut KvCache)],
        mut tap: Option<Tap<'_>>,
    ) -> Result<Vec<Tensor>> {
        if groups.is_empty() {
            return Ok(vec![]);
        }
        let spans = self.decode_spans(groups.iter().map(|(ids, c)| (&**c, ids.len())))?;
        let flat: Vec<u32> = groups
            .iter()
            .flat_map(|(ids, _)| ids.iter().copied())
            .collect();
        let total = flat.len();
        let ids = Tensor::from_vec(flat, (total, 1), &self.device)?;
        let x = self.embed(&ids)?;
        if let Some(tap) = tap.as_mut() {
            tap(TapPoint::Embeddings, &x);
        }
        let mut caches: Vec<&mut KvCache> = groups.iter_mut().map(|(_, c)| &mut **c).collect();
        let x = self.decode_blocks(x, &spans, &mut caches, &mut tap)?;
        let logits = self.head(&x.squeeze(1)?)?; // [B,V]
        spans
            .iter()
            .map(|&(r0, n, _)| Ok(logits.narrow(0, r0, n)?))
            .collect()
    }

    /// Checks each decode group (`rows` rows on a prefilled `cache` of that batch, room for one
    /// more position) and returns its `(first row, rows, position)`.
    fn decode_spans<'c>(
        &self,
        groups: impl Iterator<Item = (&'c KvCache, usize)>,
    ) -> Result<Vec<(usize, usize, usize)>> {
        let max_pos = self.cfg.max_position_embeddings;
        let mut spans = vec![];
        let mut r0 = 0;
        for (cache, rows) in groups {
            if rows == 0 {
                return Err(ModelError::Input("decode group with no rows".into()));
            }
            if cache.num_layers() != self.blocks.len() {
                return Err(ModelError::Input(format!(
                    "KV cache has {} layers, model has {}",
                    cache.num_layers(),
                    self.blocks.len()
                )));
            }
            if cache.is_empty() || cache.batch != rows {
                return Err(ModelError::Input(format!(
                    "decode group of {rows} rows needs a prefilled cache of that batch (cache: batch {}, {} positions)",
                    cache.batch_size(),
                    cache.len()
                )));
            }
            if cache.len() + 1 > max_pos {
                return Err(ModelError::Input(format!(
                    "sequence of {} positions exceeds max_position_embeddings {max_pos}",
                    cache.len() + 1
                )));
            }
            spans.push((r0, rows, cache.len()));
            r0 += rows;
        }
        Ok(spans)
    }

    /// The blocks over all decode rows `x` `[B, 1, d]` (groups laid out as `spans`), one GEMM
    /// per weight; RoPE, the cache append and attention per group. Advances every cache by one
    /// position and returns the residual stream `[B, 1, d]`.
    fn decode_blocks(
        &self,
        mut x: Tensor,
        spans: &[(usize, usize, usize)],
        caches: &mut [&mut KvCache],
        tap: &mut Option<Tap<'_>>,
    ) -> Result<Tensor> {
        let total: usize = spans.iter().map(|s| s.1).sum();
        // Per-row RoPE tables `[B, 1, hd/2]`, so q and k are rotated once per layer for all rows.
        let (cos, sin) = {
            let per_group = spans
                .iter()
                .map(|&(_, n, start)| {
                    let (c, s) = self.rope.cos_sin(start, 1, &self.device)?;
                    Ok((c.repeat((n, 1))?, s.repeat((n, 1))?))
                })
                .collect::<Result<Vec<_>>>()?;
            let (cs, ss): (Vec<_>, Vec<_>) = per_group.into_iter().unzip();
            let half = self.hd / 2;
            (
                Tensor::cat(&cs, 0)?
                    .reshape((total, 1, half))?
                    .contiguous()?,
                Tensor::cat(&ss, 0)?
                    .reshape((total, 1, half))?
                    .contiguous()?,
            )
        };
        for (layer, blk) in self.blocks.iter().enumerate() {
            let (q, k, v) = self.qkv(blk, &x)?;
            let q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope(&k, &cos, &sin)?;
            let mut ys = Vec::with_capacity(spans.len());
            for (g, cache) in caches.iter_mut().enumerate() {
                let (r0, n, start) = spans[g];
                // Row ranges of contiguous `[B, H, 1, hd]` tensors are contiguous views.
                let (y, _) = self.attend_roped(
                    &q.narrow(0, r0, n)?,
                    &k.narrow(0, r0, n)?,
                    &v.narrow(0, r0, n)?,
                    layer,
                    start,
                    None,
                    cache,
                    false,
                )?;
                ys.push(y);
            }
            let y = if ys.len() == 1 {
                ys.pop().expect("one group")
            } else {
                Tensor::cat(&ys, 0)?
            };
            x = self.block_out(blk, &x, &y, None)?;
            if let Some(tap) = tap.as_mut() {
                tap(TapPoint::Layer(layer), &x);
            }
        }
        for (g, cache) in caches.iter_mut().enumerate() {
            cache.len = spans[g].2 + 1;
        }
        Ok(x)
    }

    /// Attention with candle ops: q `[b,nh,t,hd]` (scaled), k/v `[b,nkv,L,hd]` -> `[b,t,nh*hd]`,
    /// plus the probabilities `[b,nkv,rep*t,L]` it used (a handle to an existing tensor, no copy).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Tensor,
        k_all: &Tensor,
        v_all: &Tensor,
        mask: Option<&Tensor>,
        b: usize,
        t: usize,
        l: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (nh, nkv, hd) = (self.nh, self.nkv, self.hd);
        let rep = nh / nkv;
        // GQA without copying K/V: group the `rep` query heads that share a KV head.
        let q = q.reshape((b, nkv, rep * t, hd))?;
        let att = q.matmul(&k_all.t()?)?; // [b,nkv,rep*t,L] (scale folded into q)
        let att = match mask {
            Some(m) => att
                .reshape((b, nkv, rep, t, l))?
                .broadcast_add(m)?
                .reshape((b, nkv, rep * t, l))?,
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(v_all)?; // [b,nkv,rep*t,hd]
        let y = y
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        Ok((y, att))
    }

    /// One-position attention read straight from the cache buffers (CPU); `None` elsewhere.
    fn decode_attention(
        &self,
        q: &Tensor,
        cache: &KvCache,
        layer: usize,
        b: usize,
        l: usize,
    ) -> Result<Option<Tensor>> {
        let Some((kb, vb)) = cache.layers[layer].as_ref() else {
            return Ok(None);
        };
        let cap = kb.dim(2)?;
        let (nh, nkv, hd) = (self.nh, self.nkv, self.hd);
        let out = kernels::with_f32(q, |qs| {
            kernels::with_f32(kb, |ks| {
                kernels::with_f32(vb, |vs| {
                    kernels::attend_one(qs, ks, vs, b, nh, nkv, cap, hd, l)
                })
            })
        })
        .flatten()
        .flatten();
        match out {
            Some(y) => Ok(Some(Tensor::from_vec(y, (b, 1, nh * hd), &self.device)?)),
            None => Ok(None),
        }
    }
}

/// `[t, start+t]`: 0 where key `j <= start + i`, `-inf` after.
fn causal_mask(t: usize, start: usize, device: &Device) -> Result<Tensor> {
    let l = start + t;
    let m: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..l).map(move |j| {
                if j <= start + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(m, (t, l), device)?)
}

/// Hand-written CPU paths for decode steps, where candle's per-op dispatch (rayon wake-ups
/// for tiny matmuls and softmax) costs more than the work itself.
pub(crate) mod kernels {
    use crate::error::Result;
    use candle_core::{Storage, Tensor};
    use std::sync::OnceLock;

    /// Rows up to which [`linear_small`] replaces candle's matmul.
    pub const SMALL_ROWS: usize = 32;

    /// Multiply-adds from which a small-row matmul is split across threads
    /// (`UMBRA_PAR_MIN_WORK`; a thread wake-up costs more than smaller products).
    fn par_min_work() -> usize {
        static V: OnceLock<usize> = OnceLock::new();
        *V.get_or_init(|| {
            std::env::var("UMBRA_PAR_MIN_WORK")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(1 << 22)
        })
    }

    fn threads() -> usize {
        static V: OnceLock<usize> = OnceLock::new();
        *V.get_or_init(|| {
            std::env::var("RAYON_NUM_THREADS")
                .ok()
                .and_then(|s| s.parse().ok())
                .filter(|&n| n > 0)
                .unwrap_or_else(|| {
                    std::thread::available_parallelism()
                        .map(|n| n.get())
                        .unwrap_or(1)
                })
        })
    }

    /// `x` `[.., k]` (few rows) times `w^T` (`w`: `[n, k]`) plus `bias` -> `[rows, n]` with the
    /// few-row kernel of [`crate::matvec`], multi-threaded only when the product is large.
    /// `None` when not contiguous f32 on the CPU.
    pub fn linear_small(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
        let (n, k) = w.dims2()?;
        let rows = x.elem_count() / k.max(1);
        let parallel = rows * n * k >= par_min_work() && threads() > 1;
        let y = with_f32(x, |xs| {
            with_f32(w, |ws| {
                let mut y = vec![0f32; rows * n];
                crate::matvec::matmul_rows(xs, rows, ws, n, k, &mut y, parallel).then_some(y)
            })
        })
        .flatten()
        .flatten();
        let Some(y) = y else { return Ok(None) };
        let y = Tensor::from_vec(y, (rows, n), x.device())?;
        Ok(Some(match bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        }))
    }

    /// Runs `f` on the contiguous f32 CPU data of `t`; `None` for other devices/dtypes/layouts.
    pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
        let (st, layout) = t.storage_and_layout();
        let (a, b) = layout.contiguous_offsets()?;
        match &*st {
            Storage::Cpu(cs) => Some(f(&cs.as_slice::<f32>().ok()?[a..b])),
            _ => None,
        }
    }

    /// Dot product with 32 independent lanes (vectorizes without reassociation).
    #[inline(always)]
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let body = n / 32 * 32;
        let mut acc = [0f32; 32];
        for (x, y) in a[..body].chunks_exact(32).zip(b[..body].chunks_exact(32)) {
            for j in 0..32 {
                acc[j] += x[j] * y[j];
            }
        }
        let mut s = 0f32;
        for j in 0..8 {
            s += (acc[j] + acc[j + 8]) + (acc[j + 16] + acc[j + 24]);
        }
        for (x, y) in a[body..n].iter().zip(&b[body..n]) {
            s += x * y;
        }
        s
    }

    /// Decode attention (one new position) straight from the KV buffers.
    ///
    /// `q`: `[b, nh, hd]` (pre-scaled), `kbuf`/`vbuf`: `[b, nkv, cap, hd]`, keys `0..l` valid.
    /// Returns `[b, nh * hd]`.
    #[allow(clippy::too_many_arguments)]
    pub fn attend_one(
        q: &[f32],
        kbuf: &[f32],
        vbuf: &[f32],
        b: usize,
        nh: usize,
        nkv: usize,
        cap: usize,
        hd: usize,
        l: usize,
    ) -> Vec<f32> {
        let rep = nh / nkv;
        let mut out = vec![0f32; b * nh * hd];
        let mut scores = vec![0f32; l];
        for (bh, o) in out.chunks_exact_mut(hd).enumerate() {
            let (bi, h) = (bh / nh, bh % nh);
            let g = h / rep;
            let base = (bi * nkv + g) * cap * hd;
            let qv = &q[bh * hd..(bh + 1) * hd];
            let mut mx = f32::NEG_INFINITY;
            for (j, s) in scores.iter_mut().enumerate() {
                *s = dot(qv, &kbuf[base + j * hd..base + (j + 1) * hd]);
                mx = mx.max(*s);
            }
            let mut z = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - mx).exp();
                z += *s;
            }
            let inv = 1.0 / z;
            for (j, s) in scores.iter().enumerate() {
                let p = s * inv;
                let vr = &vbuf[base + j * hd..base + (j + 1) * hd];
                for (oc, vc) in o.iter_mut().zip(vr) {
                    *oc += p * vc;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tap_tests {
    use super::*;

    fn tiny() -> (LlamaConfig, Weights, Llama) {
        let cfg = testing::tiny_config(32, 4, 2, 3, 64);
        let w = testing::random_weights(&cfg, 11);
        let m = Llama::new(&cfg, &w, &Device::Cpu).unwrap();
        (cfg, w, m)
    }

    /// Prefill (t = 5) and a one-position continuation with every tap option: outputs equal
    /// the plain path, taps come in order, and each `Ffn(i)` is the activation that turned the
    /// block's post-attention residual into `Layer(i)`.
    #[test]
    fn ffn_tap_is_opt_in_and_is_the_down_proj_input() {
        let (cfg, w, m) = tiny();
        let ffn = cfg.intermediate_size;
        let emb = m
            .embed(&Tensor::new(&[[1u32, 5, 9, 3, 7]], &Device::Cpu).unwrap())
            .unwrap();
        let one = m
            .embed(&Tensor::new(&[[2u32]], &Device::Cpu).unwrap())
            .unwrap();
        let mut c = m.new_cache();
        let plain = m.forward_embeds(&emb, &mut c).unwrap();
        let plain1 = m.forward_embeds(&one, &mut c).unwrap();
        for opts in [
            TapOptions::NONE,
            TapOptions::FFN,
            TapOptions::ATTENTION,
            TapOptions::ALL,
        ] {
            let mut c = m.new_cache();
            for (x, want) in [(&emb, &plain), (&one, &plain1)] {
                let t = x.dim(1).unwrap();
                let mut points = vec![];
                let mut acts = vec![];
                let mut layers = vec![];
                let out = m
                    .forward_embeds_with_tap_options(x, &mut c, opts, &mut |p, v| {
                        points.push(p);
                        match p {
                            TapPoint::Ffn(_) => acts.push(v.clone()),
                            TapPoint::Layer(_) => layers.push(v.clone()),
                            _ => {}
                        }
                    })
                    .unwrap();
                assert!(testing::max_abs_diff(&out, want) < 1e-5, "{opts:?}");
                let mut order = vec![TapPoint::Embeddings];
                for i in 0..3 {
                    if opts.attention {
                        order.push(TapPoint::Attention(i));
                    }
                    if opts.ffn {
                        order.push(TapPoint::Ffn(i));
                    }
                    order.push(TapPoint::Layer(i));
                }
                assert_eq!(points, order, "{opts:?}");
                if !opts.ffn {
                    assert!(acts.is_empty());
                    continue;
                }
                for (i, (a, out_i)) in acts.iter().zip(&layers).enumerate() {
                    assert_eq!(a.dims(), &[1, t, ffn]);
                    let p = format!("model.layers.{i}");
                    let wt = |n: &str| w.get(&format!("{p}.{n}")).unwrap().clone();
                    // mid = Layer(i) - down_proj(a) is the residual after attention; the SwiGLU
                    // of its post-attention norm, computed here from the HF weights, must give
                    // back `a` (and so `mid + down_proj(a)` reproduces the block output).
                    let down = a
                        .squeeze(0)
                        .unwrap()
                        .matmul(&wt("mlp.down_proj.weight").t().unwrap())
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap();
                    let mid = (out_i - &down).unwrap();
                    let h = candle_nn::ops::rms_norm(
                        &mid.contiguous().unwrap(),
                        &wt("post_attention_layernorm.weight"),
                        cfg.rms_norm_eps as f32,
                    )
                    .unwrap();
                    let proj = |n: &str| {
                        h.squeeze(0)
                            .unwrap()
                            .matmul(&wt(n).t().unwrap())
                            .unwrap()
                            .unsqueeze(0)
                            .unwrap()
                    };
                    let want_a = (candle_nn::ops::silu(&proj("mlp.gate_proj.weight")).unwrap()
                        * proj("mlp.up_proj.weight"))
                    .unwrap();
                    let err = testing::max_abs_diff(a, &want_a);
                    assert!(err < 1e-4, "layer {i} t {t} {opts:?}: {err}");
                }
            }
        }
    }
}

/// Seeded random models for tests and benchmarks (public so other crates' tests can reuse it).
pub mod testing {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// `max |a - b|` over all entries of two F32 tensors of one shape; panics on a shape or
    /// dtype mismatch (tests only).
    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .expect("max_abs_diff: tensors of one shape and dtype F32")
    }

    /// Random HF-layout F32 weights matching `cfg` (biases when the config implies them, norm
    /// weights around 1 but not 1, `lm_head.weight` unless tied). Deterministic in `seed`.
    pub fn random_weights(cfg: &LlamaConfig, seed: u64) -> Weights {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut w = Weights::new();
        let d = cfg.hidden_size;
        let (nh, nkv, hd, ffn, v) = (
            cfg.num_attention_heads,
            cfg.num_kv_heads(),
            cfg.head_dim(),
            cfg.intermediate_size,
            cfg.vocab_size,
        );
        let mut put = |name: String, shape: &[usize], lo: f32, hi: f32, rng: &mut ChaCha8Rng| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
            let t = Tensor::from_vec(data, shape, &Device::Cpu).expect("shape matches data");
            w.insert(name, t);
        };
        let s = |fan_in: usize| (3.0f32 / fan_in as f32).sqrt();
        put(
            "model.embed_tokens.weight".into(),
            &[v, d],
            -1.0,
            1.0,
            &mut rng,
        );
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            put(
                format!("{p}.input_layernorm.weight"),
                &[d],
                0.5,
                1.5,
                &mut rng,
            );
            put(
                format!("{p}.post_attention_layernorm.weight"),
                &[d],
                0.5,
                1.5,
                &mut rng,
            );
            put(
                format!("{p}.self_attn.q_proj.weight"),
                &[nh * hd, d],
                -s(d),
                s(d),
                &mut rng,
            );
            put(
                format!("{p}.self_attn.k_proj.weight"),
                &[nkv * hd, d],
                -s(d),
                s(d),
                &mut rng,
            );
            put(
                format!("{p}.self_attn.v_proj.weight"),
                &[nkv * hd, d],
                -s(d),
                s(d),
                &mut rng,
            );
            put(
                format!("{p}.self_attn.o_proj.weight"),
                &[d, nh * hd],
                -s(nh * hd),
                s(nh * hd),
                &mut rng,
            );
            if cfg.qkv_bias() {
                put(
                    format!("{p}.self_attn.q_proj.bias"),
                    &[nh * hd],
                    -0.2,
                    0.2,
                    &mut rng,
                );
                put(
                    format!("{p}.self_attn.k_proj.bias"),
                    &[nkv * hd],
                    -0.2,
                    0.2,
                    &mut rng,
                );
                put(
                    format!("{p}.self_attn.v_proj.bias"),
                    &[nkv * hd],
                    -0.2,
                    0.2,
                    &mut rng,
                );
            }
            if cfg.o_bias() {
                put(
                    format!("{p}.self_attn.o_proj.bias"),
                    &[d],
                    -0.2,
                    0.2,
                    &mut rng,
                );
            }
            put(
                format!("{p}.mlp.gate_proj.weight"),
                &[ffn, d],
                -s(d),
                s(d),
                &mut rng,
            );
            put(
                format!("{p}.mlp.up_proj.weight"),
                &[ffn, d],
                -s(d),
                s(d),
                &mut rng,
            );
            put(
                format!("{p}.mlp.down_proj.weight"),
                &[d, ffn],
                -s(ffn),
                s(ffn),
                &mut rng,
            );
        }
        put("model.norm.weight".into(), &[d], 0.5, 1.5, &mut rng);
        if !cfg.tie_word_embeddings {
            put("lm_head.weight".into(), &[v, d], -s(d), s(d), &mut rng);
        }
        w
    }

    /// A small Llama config: `hidden`, `heads`, `kv_heads`, `layers`, `vocab`, ffn = 2*hidden.
    pub fn tiny_config(
        hidden: usize,
        heads: usize,
        kv_heads: usize,
        layers: usize,
        vocab: usize,
    ) -> LlamaConfig {
        let json = serde_json::json!({
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "vocab_size": vocab,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 512,
            "tie_word_embeddings": false,
        });
        serde_json::from_value(json).expect("valid tiny config")
    }

    /// SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads, 3 KV heads, ffn 1536, vocab 49152).
    pub fn smollm2_135m_config() -> LlamaConfig {
        let mut c = tiny_config(576, 9, 3, 30, 49152);
        c.intermediate_size = 1536;
        c.rope_theta = 100_000.0;
        c.max_position_embeddings = 8192;
        c.tie_word_embeddings = true;
        c
    }
}
