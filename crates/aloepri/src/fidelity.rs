//! Fidelity of an obfuscated checkpoint against its plaintext model on the same inputs.
//!
//! For each token sequence `x`: plaintext logits `L = f(x)`, obfuscated logits `L~ = f~(tau(x))`,
//! un-permuted as `L~[:, tau(v)]`. Reported: next-token top-1 agreement, perplexity of the text
//! under both models and their ratio, the largest logit difference relative to the largest
//! plaintext logit, and the share of greedy continuations that are identical token for token.
use crate::error::Result;
use crate::tau::TokenPermutation;
use candle_core::{Device, Tensor, D};
use serde::Serialize;
use std::time::Instant;
use umbra_model::generate::generate_greedy;
use umbra_model::llama::Llama;
use umbra_model::{Forward, Input};

/// What to measure.
#[derive(Debug, Clone)]
pub struct FidelityOptions {
    /// Greedy continuations compared (each from the first `greedy_prompt_tokens` of a text).
    pub greedy_prompts: usize,
    pub greedy_prompt_tokens: usize,
    pub greedy_tokens: usize,
}

impl Default for FidelityOptions {
    fn default() -> Self {
        Self {
            greedy_prompts: 50,
            greedy_prompt_tokens: 16,
            greedy_tokens: 32,
        }
    }
}

/// Flat numeric report (fractions, not percent).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FidelityReport {
    pub texts: usize,
    pub positions: usize,
    /// Share of positions where both models' argmax next token agree.
    pub top1_agreement: f64,
    pub ppl_plain: f64,
    pub ppl_obfuscated: f64,
    /// `ppl_obfuscated / ppl_plain`.
    pub ppl_ratio: f64,
    /// `max |L~ - L| / max |L|` over all positions and texts.
    pub max_rel_logit_diff: f64,
    /// Mean KL(plain || obfuscated) of the next-token distributions, nats.
    pub mean_kl: f64,
    pub greedy_prompts: usize,
    /// Share of greedy continuations identical token for token.
    pub greedy_match: f64,
    pub seconds: f64,
}

struct SeqStats {
    agree: usize,
    positions: usize,
    nll_plain: f64,
    nll_obf: f64,
    kl: f64,
    max_diff: f64,
    max_abs: f64,
}

fn seq_stats(plain: &Llama, obf: &Llama, tau: &TokenPermutation, ids: &[u32]) -> Result<SeqStats> {
    let dev = Device::Cpu;
    let run = |m: &Llama, ids: &[u32]| -> Result<Tensor> {
        let x = Tensor::new(ids, &dev)?.unsqueeze(0)?;
        let mut cache = m.new_cache();
        Ok(m.forward(Input::Ids(&x), &mut cache, Forward::logits())?
            .squeeze(0)?)
    };
    let lp = run(plain, ids)?;
    let lo_perm = run(obf, &tau.apply(ids)?)?;
    // Column v of the un-permuted logits is column tau(v) of the obfuscated ones.
    let idx = Tensor::from_slice(tau.forward_table(), tau.vocab_size(), &dev)?;
    let lo = lo_perm.index_select(&idx, 1)?;
    let diff = (&lo - &lp)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let max_abs = lp.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let am_p = lp.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let am_o = lo.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let agree = am_p.iter().zip(&am_o).filter(|(a, b)| a == b).count();
    let lsm_p = candle_core::Tensor::log_sum_exp(&lp, D::Minus1)?;
    let logp = lp.broadcast_sub(&lsm_p.unsqueeze(1)?)?;
    let lsm_o = candle_core::Tensor::log_sum_exp(&lo, D::Minus1)?;
    let logo = lo.broadcast_sub(&lsm_o.unsqueeze(1)?)?;
    let kl = (logp.exp()? * (&logp - &logo)?)?
        .sum_all()?
        .to_scalar::<f32>()? as f64;
    let (mut nll_p, mut nll_o) = (0.0, 0.0);
    let t = ids.len();
    if t > 1 {
        let next = Tensor::from_slice(&ids[1..], t - 1, &dev)?.unsqueeze(1)?;
        nll_p = -logp
            .narrow(0, 0, t - 1)?
            .gather(&next, 1)?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
        nll_o = -logo
            .narrow(0, 0, t - 1)?
            .gather(&next, 1)?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    Ok(SeqStats {
        agree,
        positions: t,
        nll_plain: nll_p,
        nll_obf: nll_o,
        kl,
        max_diff: diff,
        max_abs,
    })
}

/// Measures `obf` (served with `tau`) against `plain` on token sequences of plaintext ids.
/// `progress(done, total)` is called after each step.
pub fn evaluate(
    plain: &Llama,
    obf: &Llama,
    tau: &TokenPermutation,
    seqs: &[Vec<u32>],
    opts: &FidelityOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<FidelityReport> {
    let start = Instant::now();
    let greedy: Vec<&Vec<u32>> = seqs
        .iter()
        .filter(|s| s.len() >= opts.greedy_prompt_tokens)
        .take(opts.greedy_prompts)
        .collect();
    let total = seqs.len() + greedy.len();
    let (mut agree, mut positions, mut nll_p, mut nll_o, mut kl, mut max_diff, mut max_abs) =
        (0usize, 0usize, 0.0, 0.0, 0.0, 0f64, 0f64);
    let mut predicted = 0usize;
    for (i, s) in seqs.iter().enumerate() {
        if s.is_empty() {
            continue;
        }
        let st = seq_stats(plain, obf, tau, s)?;
        agree += st.agree;
        positions += st.positions;
        predicted += st.positions - 1;
        nll_p += st.nll_plain;
        nll_o += st.nll_obf;
        kl += st.kl;
        max_diff = max_diff.max(st.max_diff);
        max_abs = max_abs.max(st.max_abs);
        progress(i + 1, total);
    }
    let mut same = 0usize;
    for (i, s) in greedy.iter().enumerate() {
        let prompt = &s[..opts.greedy_prompt_tokens];
        let a = generate_greedy(plain, prompt, opts.greedy_tokens)?;
        let b = tau.invert(&generate_greedy(
            obf,
            &tau.apply(prompt)?,
            opts.greedy_tokens,
        )?)?;
        same += (a == b) as usize;
        progress(seqs.len() + i + 1, total);
    }
    let ppl_plain = (nll_p / predicted.max(1) as f64).exp();
    let ppl_obfuscated = (nll_o / predicted.max(1) as f64).exp();
    Ok(FidelityReport {
        texts: seqs.len(),
        positions,
        top1_agreement: agree as f64 / positions.max(1) as f64,
        ppl_plain,
        ppl_obfuscated,
        ppl_ratio: ppl_obfuscated / ppl_plain,
        max_rel_logit_diff: if max_abs > 0.0 {
            max_diff / max_abs
        } else {
            0.0
        },
        mean_kl: kl / positions.max(1) as f64,
        greedy_prompts: greedy.len(),
        greedy_match: if greedy.is_empty() {
            1.0
        } else {
            same as f64 / greedy.len() as f64
        },
        seconds: start.elapsed().as_secs_f64(),
    })
}
