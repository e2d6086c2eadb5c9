//! Feature extraction from the taps of one teacher-forced forward pass of our engine (given
//! answers: HaluEval QA, dialogue, summarization); the keys are described in [`crate::keys`].
//!
//! A triple (context `K`, query `Q`, answer `A`) is laid out as
//! `"Knowledge: " K[..max_knowledge_tokens] "\nQuestion: " Q "\nAnswer:"` (the prompt, `P` tokens)
//! followed by `" " A` (`n` answer tokens), tokenized piecewise without special tokens; the
//! labels differ per task ([`crate::prompt::Layout`]). The context is truncated to keep
//! sequences short on a CPU (documented in docs/haluprobe.md).
//! The prompt runs once through [`Llama::forward`] with [`TapOptions::FFN`]; each answer
//! continues from a copy of its KV cache with [`TapOptions::ALL`] (attention probabilities and
//! FFN activations too), so both answers to one question share the prompt pass. Stages (paper,
//! Sec. 3):
//! - **understanding**: prompt tokens `0..P` (context + query);
//! - **query**: the boundary tokens `P-1` (last prompt token) and `P` (first answer token);
//! - **generation**: answer tokens `P..P+n`.
use crate::error::{HaluError, Result};
use crate::ffn_stats::{ffn_features, ffn_token_stats};
pub use crate::keys::*;
use crate::llmcheck::llmcheck_score;
use candle_core::{Tensor, D};
use umbra_model::llama::{Llama, TapOptions, TapPoint};
use umbra_model::tokenizer::TextTokenizer;
use umbra_model::{Forward, Input};

/// Token ids of one triple.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub prompt: Vec<u32>,
    pub answer: Vec<u32>,
}

/// Runs the engine with taps and reduces them to [`Features`].
pub struct Extractor<'a> {
    pub model: &'a Llama,
    pub tokenizer: &'a TextTokenizer,
    pub cfg: ExtractConfig,
}

impl<'a> Extractor<'a> {
    pub fn new(model: &'a Llama, tokenizer: &'a TextTokenizer, cfg: ExtractConfig) -> Self {
        Self {
            model,
            tokenizer,
            cfg,
        }
    }

    /// Prompt ids in the layout of `cfg.layout` (context optional; truncated as configured).
    /// Errors on an empty query where the layout has one.
    pub fn encode_prompt(&self, knowledge: Option<&str>, question: &str) -> Result<Vec<u32>> {
        self.cfg
            .layout
            .encode_prompt(self.tokenizer, &self.cfg, knowledge, question)
    }

    /// Answer ids (`" " + answer`, truncated). Errors on an empty answer.
    pub fn encode_answer(&self, answer: &str) -> Result<Vec<u32>> {
        crate::prompt::encode_answer(self.tokenizer, &self.cfg, answer)
    }

    /// Features of each answer to one prompt; the prompt pass runs once and is shared.
    pub fn extract(
        &self,
        knowledge: Option<&str>,
        question: &str,
        answers: &[&str],
    ) -> Result<Vec<Features>> {
        self.extract_mapped(knowledge, question, answers, None)
    }

    /// [`Extractor::extract`] on a model that reads mapped token ids: every id `i` the
    /// tokenizer gives becomes `token_map[i]` (an obfuscated model's `tau`, as its client sends).
    pub fn extract_mapped(
        &self,
        knowledge: Option<&str>,
        question: &str,
        answers: &[&str],
        token_map: Option<&[u32]>,
    ) -> Result<Vec<Features>> {
        let map = |ids: Vec<u32>| map_ids(ids, token_map);
        let prompt = map(self.encode_prompt(knowledge, question)?)?;
        let answers = answers
            .iter()
            .map(|a| map(self.encode_answer(a)?))
            .collect::<Result<Vec<_>>>()?;
        self.extract_ids(&prompt, &answers)
    }

    /// [`Extractor::extract`] on token ids.
    pub fn extract_ids(&self, prompt: &[u32], answers: &[Vec<u32>]) -> Result<Vec<Features>> {
        extract_ids(self.model, &self.cfg, prompt, answers)
    }
}

/// `ids` mapped through `token_map` (an obfuscated model's `tau`); unchanged without one.
pub fn map_ids(ids: Vec<u32>, token_map: Option<&[u32]>) -> Result<Vec<u32>> {
    match token_map {
        None => Ok(ids),
        Some(m) => ids
            .iter()
            .map(|&i| {
                m.get(i as usize).copied().ok_or_else(|| {
                    HaluError::Input(format!(
                        "token id {i} is outside the token map of {} ids",
                        m.len()
                    ))
                })
            })
            .collect(),
    }
}

/// Features of each answer (ids) after one prompt (ids): the prompt pass runs once through
/// [`Llama::forward`] ([`TapOptions::FFN`]), each answer continues from a copy of its KV cache
/// with [`TapOptions::ALL`].
pub fn extract_ids(
    m: &Llama,
    cfg: &ExtractConfig,
    prompt: &[u32],
    answers: &[Vec<u32>],
) -> Result<Vec<Features>> {
    {
        let dev = m.device();
        let p = prompt.len();
        if p == 0 || answers.iter().any(|a| a.is_empty()) {
            return Err(HaluError::Input("empty prompt or answer ids".into()));
        }
        let ids = Tensor::new(prompt, dev)?.unsqueeze(0)?;
        let emb = m.embed(&ids)?;
        let mut cache =
            m.new_cache_with_capacity(p + answers.iter().map(Vec::len).max().unwrap_or(0));
        let mut prompt_layers: Vec<Tensor> = Vec::with_capacity(m.num_layers());
        let mut prompt_ffn: Vec<Tensor> = Vec::with_capacity(m.num_layers());
        let h = m.forward(
            Input::Embeds(&emb),
            &mut cache,
            Forward::hidden().taps(TapOptions::FFN, &mut |pt, t| match pt {
                TapPoint::Layer(_) => prompt_layers.push(t.clone()),
                TapPoint::Ffn(_) => prompt_ffn.push(t.clone()),
                _ => {}
            }),
        )?;
        let first_logits = m.head(&h.narrow(1, p - 1, 1)?)?.squeeze(0)?; // [1,V]
                                                                         // Prompt per layer: [P, d] as rows.
        let prompt_rows: Vec<Vec<Vec<f32>>> = prompt_layers
            .iter()
            .map(|t| t.squeeze(0)?.to_vec2::<f32>())
            .collect::<std::result::Result<_, _>>()?;
        let prompt_stats = prompt_ffn
            .iter()
            .map(ffn_token_stats)
            .collect::<Result<Vec<_>>>()?;
        let mut out = Vec::with_capacity(answers.len());
        for ans in answers {
            let mut c = cache.try_clone()?;
            let aemb = m.embed(&Tensor::new(ans.as_slice(), dev)?.unsqueeze(0)?)?;
            let mut layers: Vec<Tensor> = Vec::with_capacity(m.num_layers());
            let mut attn: Vec<Tensor> = Vec::with_capacity(m.num_layers());
            let mut ffn: Vec<Tensor> = Vec::with_capacity(m.num_layers());
            let ah = m.forward(
                Input::Embeds(&aemb),
                &mut c,
                Forward::hidden().taps(TapOptions::ALL, &mut |pt, t| match pt {
                    TapPoint::Layer(_) => layers.push(t.clone()),
                    TapPoint::Attention(_) => attn.push(t.clone()),
                    TapPoint::Ffn(_) => ffn.push(t.clone()),
                    _ => {}
                }),
            )?;
            let logits = m.head(&ah)?.squeeze(0)?; // [n,V]
            let mut f = reduce(
                cfg,
                &prompt_rows,
                &layers,
                &attn,
                &first_logits,
                &logits,
                ans,
            )?;
            let answer_stats = ffn
                .iter()
                .map(ffn_token_stats)
                .collect::<Result<Vec<_>>>()?;
            f.extend(ffn_features(&prompt_stats, &answer_stats, ans.len())?);
            out.push(f);
        }
        Ok(out)
    }
}

/// Reduces the taps of one answer pass to features (see the module docs).
fn reduce(
    cfg: &ExtractConfig,
    prompt_rows: &[Vec<Vec<f32>>],
    layers: &[Tensor],
    attn: &[Tensor],
    first_logits: &Tensor,
    logits: &Tensor,
    answer: &[u32],
) -> Result<Features> {
    let n = answer.len();
    let nl = layers.len();
    if nl != prompt_rows.len() || attn.len() != nl || nl == 0 {
        return Err(HaluError::Input(format!(
            "taps incomplete: {} prompt layers, {} answer layers, {} attention maps",
            prompt_rows.len(),
            nl,
            attn.len()
        )));
    }
    let d = prompt_rows[0][0].len();
    let p = prompt_rows[0].len();
    let w = cfg.window.max(1);
    let mut f = Features::new();
    let mut und = Vec::with_capacity(nl * d);
    let mut qry = Vec::with_capacity(nl * d);
    let mut last = Vec::with_capacity(nl * d);
    let mut mean = Vec::with_capacity(nl * d);
    let mut win = Vec::with_capacity(nl * d);
    let mut llm = Vec::with_capacity(nl);
    for (li, t) in layers.iter().enumerate() {
        let rows = t.squeeze(0)?.to_vec2::<f32>()?; // [n, d]
        let pr = &prompt_rows[li];
        und.extend(mean_rows(pr.iter().map(Vec::as_slice), d));
        qry.extend(mean_rows([pr[p - 1].as_slice(), rows[0].as_slice()], d));
        last.extend_from_slice(&rows[n - 1]);
        mean.extend(mean_rows(rows.iter().map(Vec::as_slice), d));
        let from_prompt = w.saturating_sub(n).min(p);
        let wrows = pr[p - from_prompt..]
            .iter()
            .chain(rows[n.saturating_sub(w)..].iter())
            .map(Vec::as_slice);
        win.extend(mean_rows(wrows, d));
        let z: Vec<&[f32]> = std::iter::once(pr[p - 1].as_slice())
            .chain(rows.iter().map(Vec::as_slice))
            .collect();
        llm.push(llmcheck_score(&z));
    }
    f.insert("hidden.understanding.mean".into(), und);
    f.insert("hidden.query.mean".into(), qry);
    f.insert("hidden.generation.last".into(), last);
    f.insert("hidden.generation.mean".into(), mean);
    f.insert("hidden.generation.window".into(), win);
    f.insert(LLMCHECK_KEY.into(), llm);
    // Lookback ratios from [1, H, n, P+n] probabilities.
    let mut lq = Vec::new();
    let mut lg = Vec::new();
    for a in attn {
        let (_, nh, t, l) = a.dims4()?;
        if t != n || l != p + n {
            return Err(HaluError::Input(format!(
                "attention map [{nh},{t},{l}] does not match {n} answer tokens after {p}"
            )));
        }
        let v = a.flatten_all()?.to_vec1::<f32>()?;
        for h in 0..nh {
            let mut sum = 0f32;
            for j in 0..n {
                let lr = lookback_ratio(&v[(h * n + j) * l..(h * n + j) * l + p + j + 1], p);
                if j == 0 {
                    lq.push(lr);
                }
                sum += lr;
            }
            lg.push(sum / n as f32);
        }
    }
    f.insert("lookback.query".into(), lq);
    f.insert("lookback.generation.mean".into(), lg);
    f.insert(
        LOGIT_KEY.into(),
        logit_features(first_logits, logits, answer)?,
    );
    Ok(f)
}

/// Lookback ratio of one answer position (Lookback Lens, Chuang et al. 2024):
/// `LR = a_ctx / (a_ctx + a_new)` from its attention row over the `p` prompt positions and the
/// answer positions up to itself (`row.len() - p >= 1` of them), `a_ctx` / `a_new` the mean
/// attention on each part.
pub fn lookback_ratio(row: &[f32], p: usize) -> f32 {
    let ctx = row[..p].iter().sum::<f32>() / p.max(1) as f32;
    let new_n = row.len().saturating_sub(p).max(1);
    let new = row[p..].iter().sum::<f32>() / new_n as f32;
    ctx / (ctx + new).max(1e-30)
}

/// Mean of equal-length rows (`d` values each).
pub(crate) fn mean_rows<'r>(rows: impl IntoIterator<Item = &'r [f32]>, d: usize) -> Vec<f32> {
    let mut acc = vec![0f64; d];
    let mut k = 0usize;
    for r in rows {
        for (a, x) in acc.iter_mut().zip(r) {
            *a += *x as f64;
        }
        k += 1;
    }
    acc.into_iter()
        .map(|a| (a / k.max(1) as f64) as f32)
        .collect()
}

/// `logit.generation` from the logits predicting each answer token: `first` `[1,V]` (at the
/// last prompt token) and `rest` `[n,V]` (at the answer tokens; the last row predicts past the
/// answer and is unused).
fn logit_features(first: &Tensor, rest: &Tensor, answer: &[u32]) -> Result<Vec<f32>> {
    let n = answer.len();
    let pred = if n > 1 {
        Tensor::cat(&[first, &rest.narrow(0, 0, n - 1)?], 0)?
    } else {
        first.clone()
    }; // [n,V]
    let lsm = candle_nn::ops::log_softmax(&pred, D::Minus1)?;
    let ent = (lsm.exp()? * &lsm)?
        .sum(D::Minus1)?
        .neg()?
        .to_vec1::<f32>()?;
    let idx = Tensor::new(answer, pred.device())?.unsqueeze(1)?;
    let lp = lsm.gather(&idx, 1)?.squeeze(1)?.to_vec1::<f32>()?;
    Ok(logit_vector(&lp, &ent))
}

/// `logit.generation` ([`LOGIT_NAMES`] order) from the log-probability of each answer token and
/// the entropy of the distribution it was drawn from (`n >= 1` of each).
pub(crate) fn logit_vector(lp: &[f32], ent: &[f32]) -> Vec<f32> {
    let nf = lp.len() as f32;
    let sum: f32 = lp.iter().sum();
    vec![
        lp[0],
        sum / nf,
        lp.iter().cloned().fold(f32::INFINITY, f32::min),
        sum,
        ent.iter().sum::<f32>() / nf,
        ent.iter().cloned().fold(f32::NEG_INFINITY, f32::max),
        ent[0],
        nf,
    ]
}
