//! The pass itself: inputs stacked as rows `[P, d]`, the blocks, and the outputs per group.
use super::{Forward, Input, Llama, Output};
use crate::error::{ModelError, Result};
use crate::kernels;
use crate::kv_cache::KvCache;
use crate::taps::{TapOptions, TapPoint};
use candle_core::{DType, Device, Tensor};
use std::ops::Range;

/// The hook, reborrowed for one call (`'r` shorter than the hook's own lifetime `'a`).
type TapMut<'r, 'a> = Option<&'r mut (dyn FnMut(TapPoint, &Tensor) + 'a)>;

/// One group's place among the stacked rows: rows `r0..r0 + b t` (batch-major), starting at
/// cache position `start`.
#[derive(Debug, Clone, Copy)]
struct Span {
    r0: usize,
    b: usize,
    t: usize,
    start: usize,
}

impl Span {
    fn rows(&self) -> usize {
        self.b * self.t
    }
}

/// What the blocks of one pass share: the groups' spans, per-row RoPE tables, causal masks.
struct Pass {
    spans: Vec<Span>,
    /// `[P, hd/2]`: row `i`'s position.
    cos: Tensor,
    sin: Tensor,
    /// Per group: `[t, start + t]` for `t > 1`.
    masks: Vec<Option<Tensor>>,
    /// Taps see `[b, t, ..]` (one group through [`Llama::forward`]) rather than `[P, ..]`.
    single: bool,
}

impl Pass {
    /// `x` `[P, n]` as the taps see it.
    fn view(&self, x: &Tensor) -> Result<Tensor> {
        if self.single {
            let s = self.spans[0];
            Ok(x.reshape((s.b, s.t, x.dim(1)?))?)
        } else {
            Ok(x.clone())
        }
    }
}

impl Llama {
    /// The forward pass of [`Llama::forward`] / [`Llama::forward_groups`].
    pub(super) fn run(
        &self,
        inputs: &[Input<'_>],
        caches: &mut [&mut KvCache],
        opts: Forward<'_>,
        single: bool,
    ) -> Result<Vec<Tensor>> {
        let Forward {
            output,
            blocks,
            taps,
            mut tap,
        } = opts;
        let range = blocks.unwrap_or(0..self.blocks.len());
        if range.start > range.end || range.end > self.blocks.len() {
            return Err(ModelError::Input(format!(
                "block range {range:?} outside the {} blocks this model holds",
                self.blocks.len()
            )));
        }
        if output != Output::Hidden {
            if self.lm_head.is_none() {
                return Err(self.missing("LM head"));
            }
            if range.end != self.blocks.len() {
                return Err(ModelError::Input(format!(
                    "logits need the last block; the range {range:?} ends before block {}",
                    self.blocks.len()
                )));
            }
        }
        let d = self.cfg.hidden_size;
        let mut spans = Vec::with_capacity(inputs.len());
        let mut xs = Vec::with_capacity(inputs.len());
        let mut r0 = 0;
        for (input, cache) in inputs.iter().zip(caches.iter()) {
            let x = match input {
                Input::Ids(ids) => {
                    if range.start != 0 {
                        return Err(ModelError::Input(format!(
                            "token ids enter at block 0; the range starts at block {} (give the residual stream as embeddings)",
                            range.start
                        )));
                    }
                    self.embed(ids)?
                }
                Input::Embeds(e) => {
                    let ok = matches!(e.dims(), &[b, t, dd] if b > 0 && t > 0 && dd == d);
                    if !ok {
                        return Err(ModelError::Input(format!(
                            "embeddings of shape {:?}, expected [b>0, t>0, {d}]",
                            e.dims()
                        )));
                    }
                    e.to_dtype(DType::F32)?
                }
            };
            let (b, t, _) = x.dims3()?;
            let start = self.check_cache(cache, &range, b, t)?;
            spans.push(Span { r0, b, t, start });
            r0 += b * t;
            xs.push(x.reshape((b * t, d))?);
        }
        let mut x = if xs.len() == 1 {
            xs.pop().expect("one input")
        } else {
            Tensor::cat(&xs, 0)?
        }
        .contiguous()?;
        let pass = self.prepare(spans, single, !range.is_empty())?;
        if let Some(tap) = tap.as_deref_mut() {
            tap(TapPoint::Embeddings, &pass.view(&x)?);
        }
        for layer in range.clone() {
            x = self.block(layer, x, &pass, caches, taps, tap.as_deref_mut())?;
            if let Some(tap) = tap.as_deref_mut() {
                tap(TapPoint::Layer(layer), &pass.view(&x)?);
            }
        }
        if !range.is_empty() {
            for (s, cache) in pass.spans.iter().zip(caches.iter_mut()) {
                cache.advance(range.clone(), s.start + s.t, s.b);
            }
        }
        self.outputs(x, &pass, output, tap)
    }

    /// Checks `cache` for a group of `b` rows and `t` new positions through `range`; returns
    /// the position the group starts at.
    fn check_cache(
        &self,
        cache: &KvCache,
        range: &Range<usize>,
        b: usize,
        t: usize,
    ) -> Result<usize> {
        if cache.num_layers() != self.blocks.len() {
            return Err(ModelError::Input(format!(
                "KV cache has {} layers, model has {}",
                cache.num_layers(),
                self.blocks.len()
            )));
        }
        let start = cache.start_of(range)?;
        if start > 0 && cache.batch_size() != b {
            return Err(ModelError::Input(format!(
                "KV cache holds batch {}, input has batch {b}",
                cache.batch_size()
            )));
        }
        let max_pos = self.cfg.max_position_embeddings;
        if start + t > max_pos {
            return Err(ModelError::Input(format!(
                "sequence of {} positions ({start} cached + {t} new) exceeds max_position_embeddings {max_pos}",
                start + t
            )));
        }
        Ok(start)
    }

    /// Per-row RoPE tables and per-group masks (none needed when no block runs).
    fn prepare(&self, spans: Vec<Span>, single: bool, blocks: bool) -> Result<Pass> {
        let dev = &self.device;
        let half = self.hd / 2;
        let (cos, sin, masks) = if !blocks {
            let z = Tensor::zeros((0, half), DType::F32, dev)?;
            (z.clone(), z, vec![None; spans.len()])
        } else if spans.len() == 1 && spans[0].b == 1 {
            let s = spans[0];
            let (c, si) = self.rope.cos_sin(s.start, s.t, dev)?;
            (
                c.contiguous()?,
                si.contiguous()?,
                vec![causal_mask(s.t, s.start, dev)?],
            )
        } else {
            let mut cs = Vec::with_capacity(spans.len());
            let mut ss = Vec::with_capacity(spans.len());
            let mut masks = Vec::with_capacity(spans.len());
            for s in &spans {
                let (c, si) = self.rope.cos_sin(s.start, s.t, dev)?;
                cs.push(c.repeat((s.b, 1))?);
                ss.push(si.repeat((s.b, 1))?);
                masks.push(causal_mask(s.t, s.start, dev)?);
            }
            (
                Tensor::cat(&cs, 0)?.contiguous()?,
                Tensor::cat(&ss, 0)?.contiguous()?,
                masks,
            )
        };
        Ok(Pass {
            spans,
            cos,
            sin,
            masks,
            single,
        })
    }

    /// Block `layer` over all rows `x` `[P, d]`: fused QKV, RoPE, per-group cache append and
    /// attention, output projection and residual, SwiGLU FFN and residual.
    fn block(
        &self,
        layer: usize,
        x: Tensor,
        pass: &Pass,
        caches: &mut [&mut KvCache],
        opts: TapOptions,
        mut tap: TapMut<'_, '_>,
    ) -> Result<Tensor> {
        let blk = &self.blocks[layer];
        let (nh, nkv, hd) = (self.nh, self.nkv, self.hd);
        let p = x.dim(0)?;
        let h = candle_nn::ops::rms_norm(&x, &blk.ln1, self.eps)?;
        let qkv = blk.qkv.forward(&h)?.reshape((1, p, nh + 2 * nkv, hd))?;
        let q = candle_nn::rotary_emb::rope_thd(
            &qkv.narrow(2, 0, nh)?.contiguous()?,
            &pass.cos,
            &pass.sin,
        )?;
        let k = candle_nn::rotary_emb::rope_thd(
            &qkv.narrow(2, nh, nkv)?.contiguous()?,
            &pass.cos,
            &pass.sin,
        )?;
        let v = qkv.narrow(2, nh + nkv, nkv)?;
        let probs = tap.is_some() && opts.attention;
        let mut ys = Vec::with_capacity(pass.spans.len());
        for ((s, cache), mask) in pass.spans.iter().zip(caches.iter_mut()).zip(&pass.masks) {
            // [1, P, n, hd] rows of this group -> [b, n, t, hd].
            let heads = |x: &Tensor, n: usize| -> Result<Tensor> {
                Ok(x.narrow(1, s.r0, s.rows())?
                    .reshape((s.b, s.t, n, hd))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let (y, att) = self.attend(
                &heads(&q, nh)?,
                &heads(&k, nkv)?,
                &heads(&v, nkv)?,
                layer,
                s.start,
                mask.as_ref(),
                cache,
                probs,
            )?;
            if let (Some(att), Some(tap)) = (att, tap.as_deref_mut()) {
                tap(TapPoint::Attention(layer), &att);
            }
            ys.push(y.reshape((s.rows(), nh * hd))?);
        }
        let y = if ys.len() == 1 {
            ys.pop().expect("one group")
        } else {
            Tensor::cat(&ys, 0)?
        };
        let x = (x + blk.o.forward(&y)?)?;
        let h = candle_nn::ops::rms_norm(&x, &blk.ln2, self.eps)?;
        let gu = blk.gate_up.forward(&h)?;
        let ffn = gu.dim(1)? / 2;
        let act = (candle_nn::ops::silu(&gu.narrow(1, 0, ffn)?)? * gu.narrow(1, ffn, ffn)?)?;
        if let (true, Some(tap)) = (opts.ffn, tap) {
            tap(TapPoint::Ffn(layer), &pass.view(&act)?);
        }
        Ok((x + blk.down.forward(&act)?)?)
    }

    /// Cache append and attention for one group: q `[b,nh,t,hd]` (scaled, roped), k `[b,nkv,t,hd]`
    /// (roped), v `[b,nkv,t,hd]` -> `[b,t,nh*hd]`, and with `probs` the attention probabilities
    /// `[b,nh,t,L]` (then the one-position fast path is skipped, so that they exist).
    #[allow(clippy::too_many_arguments)]
    fn attend(
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
        let (nh, nkv, hd) = (self.nh, self.nkv, self.hd);
        let rep = nh / nkv;
        // GQA without copying K/V: group the `rep` query heads that share a KV head.
        let qg = q.reshape((b, nkv, rep * t, hd))?;
        let att = qg.matmul(&k_all.t()?)?; // [b,nkv,rep*t,L] (scale folded into q)
        let att = match mask {
            Some(m) => att
                .reshape((b, nkv, rep, t, l))?
                .broadcast_add(m)?
                .reshape((b, nkv, rep * t, l))?,
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v_all)?; // [b,nkv,rep*t,hd]
        let y = y
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        // [b,nkv,rep*t,L] -> [b,nh,t,L]: head h = g*rep + r.
        let att = if probs {
            Some(att.reshape((b, nh, t, l))?)
        } else {
            None
        };
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
        let Some((kb, vb)) = cache.buffers(layer) else {
            return Ok(None);
        };
        let cap = kb.dim(2)?;
        let (nh, nkv, hd) = (self.nh, self.nkv, self.hd);
        let out = kernels::with_f32(q, |qs| {
            kernels::with_f32(kb, |ks| {
                kernels::with_f32(vb, |vs| {
                    kernels::attention::attend_one(qs, ks, vs, b, nh, nkv, cap, hd, l)
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

    /// Per group: the residual stream, or the final norm and head over the rows asked for.
    fn outputs(
        &self,
        x: Tensor,
        pass: &Pass,
        output: Output,
        tap: TapMut<'_, '_>,
    ) -> Result<Vec<Tensor>> {
        let d = self.cfg.hidden_size;
        let v = self.cfg.vocab_size;
        match output {
            Output::Hidden => pass
                .spans
                .iter()
                .map(|s| Ok(x.narrow(0, s.r0, s.rows())?.reshape((s.b, s.t, d))?))
                .collect(),
            Output::Logits => {
                let normed = self.final_norm(&x)?;
                if let Some(tap) = tap {
                    tap(TapPoint::FinalNorm, &pass.view(&normed)?);
                }
                let logits = self.lm_head(&normed)?;
                pass.spans
                    .iter()
                    .map(|s| Ok(logits.narrow(0, s.r0, s.rows())?.reshape((s.b, s.t, v))?))
                    .collect()
            }
            Output::LastLogits => {
                let last = if pass.spans.iter().all(|s| s.t == 1) {
                    x
                } else {
                    let idx: Vec<u32> = pass
                        .spans
                        .iter()
                        .flat_map(|s| (0..s.b).map(move |r| (s.r0 + r * s.t + s.t - 1) as u32))
                        .collect();
                    let n = idx.len();
                    x.index_select(&Tensor::from_vec(idx, n, &self.device)?, 0)?
                };
                let normed = self.final_norm(&last)?; // [R, d], R = sum b
                if let Some(tap) = tap {
                    tap(TapPoint::FinalNorm, &normed);
                }
                let logits = self.lm_head(&normed)?;
                let mut k0 = 0;
                pass.spans
                    .iter()
                    .map(|s| {
                        let l = logits.narrow(0, k0, s.b)?;
                        k0 += s.b;
                        Ok(l)
                    })
                    .collect()
            }
        }
    }
}

/// `[t, start+t]`: 0 where key `j <= start + i`, `-inf` after; `None` for one position.
fn causal_mask(t: usize, start: usize, device: &Device) -> Result<Option<Tensor>> {
    if t <= 1 {
        return Ok(None);
    }
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
    Ok(Some(Tensor::from_vec(m, (t, l), device)?))
}
