//! Autoregressive generation on [`Llama`]: prefill the prompt, then decode one token at a time
//! with the KV cache, computing the LM head on the last position only.
use crate::error::{ModelError, Result};
use crate::llama::{Forward, Input, Llama};
use crate::sampling::{Sampler, SamplingParams};
use candle_core::Tensor;
use std::time::Instant;

/// Generation settings for one sequence.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerateParams {
    /// Most new tokens to produce (prompt + `max_tokens` must fit `max_position_embeddings`).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Token ids that end generation (typically `cfg.eos_token_ids()`); not included in the output.
    pub stop_ids: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` reached.
    Length,
    /// A stop id was sampled, or the callback returned `false`.
    Stop,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOutput {
    /// Generated ids (prompt and stop id excluded).
    pub ids: Vec<u32>,
    pub finish_reason: FinishReason,
    /// Seconds spent on the prompt forward pass (first logits included).
    pub prefill_s: f64,
    /// Seconds spent after prefill until this sequence finished.
    pub decode_s: f64,
}

impl GenerateOutput {
    /// Decode throughput in tokens/s (tokens after the first, which prefill produced).
    pub fn decode_tok_per_s(&self) -> f64 {
        let n = self.ids.len().saturating_sub(1);
        if self.decode_s > 0.0 {
            n as f64 / self.decode_s
        } else {
            0.0
        }
    }
}

fn check_fits(model: &Llama, prompt_len: usize, max_tokens: usize) -> Result<()> {
    check_fits_in(
        model.config().max_position_embeddings,
        prompt_len,
        max_tokens,
    )
}

fn check_fits_in(max_pos: usize, prompt_len: usize, max_tokens: usize) -> Result<()> {
    if prompt_len == 0 {
        return Err(ModelError::Input("empty prompt".into()));
    }
    if prompt_len + max_tokens > max_pos {
        return Err(ModelError::Input(format!(
            "prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds max_position_embeddings ({max_pos})"
        )));
    }
    Ok(())
}

/// Generates from one prompt. `on_token` sees each generated id (not stop ids) and returns
/// `false` to stop early.
pub fn generate(
    model: &Llama,
    prompt_ids: &[u32],
    params: &GenerateParams,
    on_token: impl FnMut(u32) -> bool,
) -> Result<GenerateOutput> {
    let mut cache = model.new_cache_with_capacity(prompt_ids.len() + params.max_tokens);
    let device = model.device().clone();
    generate_with(
        prompt_ids,
        params,
        model.config().max_position_embeddings,
        |ids| -> Result<Vec<f32>> {
            let ids = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &device)?;
            let logits = model.forward(Input::Ids(&ids), &mut cache, Forward::last_logits())?;
            Ok(logits.squeeze(0)?.to_vec1::<f32>()?)
        },
        on_token,
    )
}

/// The single-sequence generation loop over any next-token function: `step(ids)` appends `ids`
/// (the prompt first, then one sampled id per call) to the sequence it keeps and returns the
/// logits of the last position (`[V]`). [`generate`] steps a local model; split mode
/// steps a remote server between a local embedding and head. `max_positions` bounds prompt +
/// `max_tokens`.
pub fn generate_with<E: From<ModelError>>(
    prompt_ids: &[u32],
    params: &GenerateParams,
    max_positions: usize,
    mut step: impl FnMut(&[u32]) -> std::result::Result<Vec<f32>, E>,
    mut on_token: impl FnMut(u32) -> bool,
) -> std::result::Result<GenerateOutput, E> {
    check_fits_in(max_positions, prompt_ids.len(), params.max_tokens)?;
    let mut sampler = Sampler::new(params.sampling.clone())?;
    let mut out = GenerateOutput {
        ids: vec![],
        finish_reason: FinishReason::Length,
        prefill_s: 0.0,
        decode_s: 0.0,
    };
    if params.max_tokens == 0 {
        return Ok(out);
    }
    let t0 = Instant::now();
    let mut logits = step(prompt_ids)?;
    out.prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    loop {
        let tok = sampler.sample(&logits);
        if params.stop_ids.contains(&tok) {
            out.finish_reason = FinishReason::Stop;
            break;
        }
        out.ids.push(tok);
        if !on_token(tok) {
            out.finish_reason = FinishReason::Stop;
            break;
        }
        if out.ids.len() >= params.max_tokens {
            break;
        }
        logits = step(&[tok])?;
    }
    out.decode_s = t1.elapsed().as_secs_f64();
    Ok(out)
}

/// Generates from `prompts` (all the same length) in one batch; `params[i]` (own sampler, stop
/// ids, `max_tokens`) applies to `prompts[i]`. `on_token(i, id)` returns `false` to stop sequence
/// `i`. Finished sequences are dropped from the batch ([`crate::kv_cache::KvCache::retain`]).
pub fn generate_batch(
    model: &Llama,
    prompts: &[&[u32]],
    params: &[GenerateParams],
    mut on_token: impl FnMut(usize, u32) -> bool,
) -> Result<Vec<GenerateOutput>> {
    let b = prompts.len();
    if b == 0 {
        return Ok(vec![]);
    }
    if params.len() != b {
        return Err(ModelError::Input(format!(
            "{b} prompts but {} parameter sets",
            params.len()
        )));
    }
    let plen = prompts[0].len();
    if let Some(p) = prompts.iter().find(|p| p.len() != plen) {
        return Err(ModelError::Input(format!(
            "batched prompts must have equal length ({plen} vs {})",
            p.len()
        )));
    }
    let max_tokens = params.iter().map(|p| p.max_tokens).max().unwrap_or(0);
    check_fits(model, plen, max_tokens)?;
    let mut samplers = params
        .iter()
        .map(|p| Sampler::new(p.sampling.clone()))
        .collect::<Result<Vec<_>>>()?;
    let mut outs: Vec<GenerateOutput> = (0..b)
        .map(|_| GenerateOutput {
            ids: vec![],
            finish_reason: FinishReason::Length,
            prefill_s: 0.0,
            decode_s: 0.0,
        })
        .collect();
    let mut done: Vec<bool> = params.iter().map(|p| p.max_tokens == 0).collect();
    if done.iter().all(|&d| d) {
        return Ok(outs);
    }
    let device = model.device();
    let mut cache = model.new_cache_with_capacity(plen + max_tokens);
    let t0 = Instant::now();
    let flat: Vec<u32> = prompts.iter().flat_map(|p| p.iter().copied()).collect();
    let ids = Tensor::from_vec(flat, (b, plen), device)?;
    let mut logits = model
        .forward(Input::Ids(&ids), &mut cache, Forward::last_logits())?
        .to_vec2::<f32>()?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for o in outs.iter_mut() {
        o.prefill_s = prefill_s;
    }
    // `active[r]` = the sequence in batch row `r`; finished rows are dropped from the cache.
    let mut active: Vec<usize> = (0..b).collect();
    loop {
        let mut next = Vec::with_capacity(active.len());
        let mut keep = Vec::with_capacity(active.len());
        for (r, &i) in active.iter().enumerate() {
            if done[i] {
                keep.push(false);
                continue;
            }
            let tok = samplers[i].sample(&logits[r]);
            let stop = if params[i].stop_ids.contains(&tok) {
                true
            } else {
                outs[i].ids.push(tok);
                !on_token(i, tok)
            };
            if stop {
                outs[i].finish_reason = FinishReason::Stop;
            }
            if stop || outs[i].ids.len() >= params[i].max_tokens {
                done[i] = true;
                outs[i].decode_s = t1.elapsed().as_secs_f64();
            }
            keep.push(!done[i]);
            if !done[i] {
                next.push(tok);
            }
        }
        if next.is_empty() {
            break;
        }
        if next.len() != active.len() {
            cache.retain(&keep)?;
            active = active
                .iter()
                .zip(&keep)
                .filter(|(_, &k)| k)
                .map(|(&i, _)| i)
                .collect();
        }
        let ids = Tensor::from_vec(next, (active.len(), 1), device)?;
        logits = model
            .forward(Input::Ids(&ids), &mut cache, Forward::last_logits())?
            .to_vec2::<f32>()?;
    }
    Ok(outs)
}

/// Greedy generation of up to `max_tokens`, no stop ids (handy in tests and examples).
pub fn generate_greedy(model: &Llama, prompt_ids: &[u32], max_tokens: usize) -> Result<Vec<u32>> {
    let params = GenerateParams {
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
    };
    Ok(generate(model, prompt_ids, &params, |_| true)?.ids)
}
