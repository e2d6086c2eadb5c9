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

/// Logits of one sequence, `[t, V]`.
fn logits_of(m: &Llama, ids: &[u32]) -> Result<Tensor> {
    let x = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    let mut cache = m.new_cache();
    Ok(m.forward(Input::Ids(&x), &mut cache, Forward::logits())?
        .squeeze(0)?)
}

/// Compares plaintext logits `lp` with the obfuscated model's logits `lo_perm` (obfuscated
/// vocabulary order) on the plaintext sequence `ids`.
fn compare(lp: &Tensor, lo_perm: &Tensor, tau: &TokenPermutation, ids: &[u32]) -> Result<SeqStats> {
    let dev = Device::Cpu;
    // Column v of the un-permuted logits is column tau(v) of the obfuscated ones.
    let idx = Tensor::from_slice(tau.forward_table(), tau.vocab_size(), &dev)?;
    let lo = lo_perm.index_select(&idx, 1)?;
    let diff = (&lo - lp)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let max_abs = lp.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let am_p = lp.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let am_o = lo.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let agree = am_p.iter().zip(&am_o).filter(|(a, b)| a == b).count();
    let lsm_p = candle_core::Tensor::log_sum_exp(lp, D::Minus1)?;
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

/// Running totals over sequences.
#[derive(Default)]
struct Totals {
    agree: usize,
    positions: usize,
    predicted: usize,
    nll_p: f64,
    nll_o: f64,
    kl: f64,
    max_diff: f64,
    max_abs: f64,
}

impl Totals {
    fn add(&mut self, st: SeqStats) {
        self.agree += st.agree;
        self.positions += st.positions;
        self.predicted += st.positions.saturating_sub(1);
        self.nll_p += st.nll_plain;
        self.nll_o += st.nll_obf;
        self.kl += st.kl;
        self.max_diff = self.max_diff.max(st.max_diff);
        self.max_abs = self.max_abs.max(st.max_abs);
    }

    fn report(&self, texts: usize, greedy: usize, same: usize, seconds: f64) -> FidelityReport {
        let ppl_plain = (self.nll_p / self.predicted.max(1) as f64).exp();
        let ppl_obfuscated = (self.nll_o / self.predicted.max(1) as f64).exp();
        FidelityReport {
            texts,
            positions: self.positions,
            top1_agreement: self.agree as f64 / self.positions.max(1) as f64,
            ppl_plain,
            ppl_obfuscated,
            ppl_ratio: ppl_obfuscated / ppl_plain,
            max_rel_logit_diff: if self.max_abs > 0.0 {
                self.max_diff / self.max_abs
            } else {
                0.0
            },
            mean_kl: self.kl / self.positions.max(1) as f64,
            greedy_prompts: greedy,
            greedy_match: if greedy == 0 {
                1.0
            } else {
                same as f64 / greedy as f64
            },
            seconds,
        }
    }
}

fn greedy_prompts<'a>(seqs: &'a [Vec<u32>], opts: &FidelityOptions) -> Vec<&'a [u32]> {
    seqs.iter()
        .filter(|s| s.len() >= opts.greedy_prompt_tokens)
        .take(opts.greedy_prompts)
        .map(|s| &s[..opts.greedy_prompt_tokens])
        .collect()
}

/// Builds a model on demand (so that only one of two large models is in memory at a time).
pub type LoadModel<'a> = &'a mut dyn FnMut() -> Result<Llama>;

/// [`evaluate`] holding one model at a time, for models too large to hold both (Qwen2.5-1.5B in
/// F32: 6.2 GB plaintext + 7.1 GB obfuscated): the plaintext pass writes each sequence's logits
/// (`[t, V]` F32) to a scratch file in `scratch_dir` (removed at the end) and its greedy
/// continuations to memory; the obfuscated pass reads them back. Same numbers as [`evaluate`].
pub fn evaluate_sequential(
    load_plain: LoadModel,
    load_obf: LoadModel,
    tau: &TokenPermutation,
    seqs: &[Vec<u32>],
    opts: &FidelityOptions,
    scratch_dir: &std::path::Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<FidelityReport> {
    use std::io::{Read, Write};
    let start = Instant::now();
    let prompts = greedy_prompts(seqs, opts);
    let total = 2 * (seqs.len() + prompts.len());
    let scratch = Scratch(scratch_dir.join(format!(".umbra-fidelity-{}.f32", std::process::id())));
    let io = |e| crate::AloeError::io(&scratch.0, e);
    let mut plain_greedy = Vec::with_capacity(prompts.len());
    {
        let plain = load_plain()?;
        let mut w = std::io::BufWriter::new(std::fs::File::create(&scratch.0).map_err(io)?);
        for (i, s) in seqs.iter().enumerate() {
            if !s.is_empty() {
                let lp = logits_of(&plain, s)?.flatten_all()?.to_vec1::<f32>()?;
                for x in lp {
                    w.write_all(&x.to_le_bytes()).map_err(io)?;
                }
            }
            progress(i + 1, total);
        }
        w.flush().map_err(io)?;
        for (i, p) in prompts.iter().enumerate() {
            plain_greedy.push(generate_greedy(&plain, p, opts.greedy_tokens)?);
            progress(seqs.len() + i + 1, total);
        }
    }
    let obf = load_obf()?;
    let mut r = std::io::BufReader::new(std::fs::File::open(&scratch.0).map_err(io)?);
    let mut totals = Totals::default();
    let v = tau.vocab_size();
    let base = seqs.len() + prompts.len();
    for (i, s) in seqs.iter().enumerate() {
        if !s.is_empty() {
            let mut buf = vec![0u8; s.len() * v * 4];
            r.read_exact(&mut buf).map_err(io)?;
            let vals: Vec<f32> = buf
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let lp = Tensor::from_vec(vals, (s.len(), v), &Device::Cpu)?;
            let lo = logits_of(&obf, &tau.apply(s)?)?;
            totals.add(compare(&lp, &lo, tau, s)?);
        }
        progress(base + i + 1, total);
    }
    let mut same = 0usize;
    for (i, (p, a)) in prompts.iter().zip(&plain_greedy).enumerate() {
        let b = tau.invert(&generate_greedy(&obf, &tau.apply(p)?, opts.greedy_tokens)?)?;
        same += usize::from(*a == b);
        progress(base + seqs.len() + i + 1, total);
    }
    Ok(totals.report(
        seqs.len(),
        prompts.len(),
        same,
        start.elapsed().as_secs_f64(),
    ))
}

/// A scratch file removed when dropped.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
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
    let prompts = greedy_prompts(seqs, opts);
    let total = seqs.len() + prompts.len();
    let mut totals = Totals::default();
    for (i, s) in seqs.iter().enumerate() {
        if !s.is_empty() {
            let lp = logits_of(plain, s)?;
            let lo = logits_of(obf, &tau.apply(s)?)?;
            totals.add(compare(&lp, &lo, tau, s)?);
        }
        progress(i + 1, total);
    }
    let mut same = 0usize;
    for (i, p) in prompts.iter().enumerate() {
        let a = generate_greedy(plain, p, opts.greedy_tokens)?;
        let b = tau.invert(&generate_greedy(obf, &tau.apply(p)?, opts.greedy_tokens)?)?;
        same += usize::from(a == b);
        progress(seqs.len() + i + 1, total);
    }
    Ok(totals.report(
        seqs.len(),
        prompts.len(),
        same,
        start.elapsed().as_secs_f64(),
    ))
}
