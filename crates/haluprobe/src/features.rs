//! Feature extraction from the taps of one forward pass of our engine.
//!
//! A triple (knowledge `K`, question `Q`, answer `A`) is laid out as
//! `"Knowledge: " K[..max_knowledge_tokens] "\nQuestion: " Q "\nAnswer:"` (the prompt, `P` tokens)
//! followed by `" " A` (`n` answer tokens), tokenized piecewise without special tokens. The
//! knowledge is truncated to keep sequences short on a CPU (documented in docs/haluprobe.md).
//! The prompt runs once through [`Llama::forward_embeds_with_tap_options`] with
//! [`TapOptions::FFN`]; each answer continues from a copy of its KV cache with
//! [`TapOptions::ALL`] (attention probabilities and FFN activations too), so both answers to one
//! question share the prompt pass. Stages (paper, Sec. 3):
//! - **understanding**: prompt tokens `0..P` (knowledge + question);
//! - **query**: the boundary tokens `P-1` (last prompt token) and `P` (first answer token);
//! - **generation**: answer tokens `P..P+n`.
//!
//! Feature families and keys (`L` layers, `d` hidden size, `H` heads); `Layer(i)` taps are the
//! residual stream after block `i`:
//! - `hidden.understanding.mean` `[L,d]`: mean over prompt tokens;
//! - `hidden.query.mean` `[L,d]`: mean of the two boundary tokens;
//! - `hidden.generation.{last,mean,window}` `[L,d]`: last answer token, mean over answer tokens,
//!   mean over the sliding window of the last `window` positions ending at the last answer token;
//! - `lookback.query` / `lookback.generation.mean` `[L,H]`: Lookback-Lens ratio
//!   `LR = a_ctx / (a_ctx + a_new)` where `a_ctx` is the mean attention of an answer position on
//!   the prompt tokens and `a_new` its mean attention on answer tokens up to itself; at the first
//!   answer token, and averaged over all answer tokens;
//! - `logit.generation` `[8]`: log-prob of the first answer token, mean / min / sum of the answer
//!   log-probs (mean = -log perplexity), mean / max / first-token entropy of the next-token
//!   distribution, and the answer length in tokens;
//! - `llmcheck.generation` `[L]`: LLM-Check hidden score, mean of `log λ_i` over the non-zero
//!   eigenvalues of `Z_c Z_c^T / d`, `Z_c` = centered hidden states of the last prompt token and
//!   the answer tokens (`n+1` rows);
//! - `ffn.understanding.mean`, `ffn.query.mean`, `ffn.generation.{last,mean}` `[L, 7]`: FFN
//!   activation statistics. For every token and layer, the SwiGLU activation
//!   `a = silu(gate(h)) ⊙ up(h)` (`F = intermediate_size` values, the input of `down_proj`,
//!   [`TapPoint::Ffn`]) is reduced to [`FFN_STAT_NAMES`]: mean `μ = Σa/F`, standard deviation
//!   `σ = sqrt(Σ(a-μ)²/F)`, mean `|a|`, max `|a|`, the share of neurons with
//!   `|a| > `[`FFN_ACTIVE_THRESHOLD`], the share with `a > 0`, and the kurtosis
//!   `Σ(a-μ)⁴/F / σ⁴` (0 when `σ = 0`); the stage rows are then the mean of these per-token
//!   vectors over the prompt tokens / the two boundary tokens / the answer tokens, or the last
//!   answer token's vector. Moments are accumulated in f64.
use crate::error::{HaluError, Result};
use candle_core::{Tensor, D};
use std::collections::BTreeMap;
use umbra_model::llama::{Llama, TapOptions, TapPoint};
use umbra_model::tokenizer::TextTokenizer;
use umbra_model::{Forward, Input};

/// Which part of the forward pass a feature comes from.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Understanding,
    Query,
    Generation,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Understanding => "understanding",
            Stage::Query => "query",
            Stage::Generation => "generation",
        }
    }
}

/// Extraction settings; stored in the feature manifest and in every probe file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExtractConfig {
    /// Knowledge tokens kept (the rest is cut) to keep sequences short.
    pub max_knowledge_tokens: usize,
    pub max_question_tokens: usize,
    pub max_answer_tokens: usize,
    /// Sliding-window length for `hidden.generation.window`.
    pub window: usize,
}

impl Default for ExtractConfig {
    fn default() -> Self {
        Self {
            max_knowledge_tokens: 96,
            max_question_tokens: 64,
            max_answer_tokens: 32,
            window: 4,
        }
    }
}

/// Number of entries in `logit.generation`.
pub const LOGIT_FEATURES: usize = 8;
/// Names of the `logit.generation` entries, in order.
pub const LOGIT_NAMES: [&str; LOGIT_FEATURES] = [
    "first_logprob",
    "mean_logprob",
    "min_logprob",
    "sum_logprob",
    "mean_entropy",
    "max_entropy",
    "first_entropy",
    "answer_tokens",
];

/// The hidden-state feature keys, with their stage.
pub const HIDDEN_KEYS: [(&str, Stage); 5] = [
    ("hidden.understanding.mean", Stage::Understanding),
    ("hidden.query.mean", Stage::Query),
    ("hidden.generation.last", Stage::Generation),
    ("hidden.generation.mean", Stage::Generation),
    ("hidden.generation.window", Stage::Generation),
];
/// The lookback-ratio keys, with their stage.
pub const LOOKBACK_KEYS: [(&str, Stage); 2] = [
    ("lookback.query", Stage::Query),
    ("lookback.generation.mean", Stage::Generation),
];
pub const LOGIT_KEY: &str = "logit.generation";
pub const LLMCHECK_KEY: &str = "llmcheck.generation";
/// The FFN-statistics keys (`[L, FFN_STATS]` each), with their stage.
pub const FFN_KEYS: [(&str, Stage); 4] = [
    ("ffn.understanding.mean", Stage::Understanding),
    ("ffn.query.mean", Stage::Query),
    ("ffn.generation.last", Stage::Generation),
    ("ffn.generation.mean", Stage::Generation),
];
/// Statistics per layer in the `ffn.*` keys.
pub const FFN_STATS: usize = 7;
/// Names of the per-layer FFN statistics, in order (see the module docs).
pub const FFN_STAT_NAMES: [&str; FFN_STATS] = [
    "mean",
    "std",
    "mean_abs",
    "max_abs",
    "active_frac",
    "positive_frac",
    "kurtosis",
];
/// `|a|` above which a neuron counts as active for `active_frac`.
pub const FFN_ACTIVE_THRESHOLD: f32 = 0.01;

/// The stage of a feature key (`family.stage[.selection]`).
pub fn key_stage(key: &str) -> Option<Stage> {
    match key.split('.').nth(1)? {
        "understanding" => Some(Stage::Understanding),
        "query" => Some(Stage::Query),
        "generation" => Some(Stage::Generation),
        _ => None,
    }
}

/// The per-triple shape of every key for a model with `l` layers, hidden `d`, `h` heads.
pub fn key_shapes(l: usize, d: usize, h: usize) -> BTreeMap<String, Vec<usize>> {
    let mut m = BTreeMap::new();
    for (k, _) in HIDDEN_KEYS {
        m.insert(k.to_string(), vec![l, d]);
    }
    for (k, _) in LOOKBACK_KEYS {
        m.insert(k.to_string(), vec![l, h]);
    }
    m.insert(LOGIT_KEY.to_string(), vec![LOGIT_FEATURES]);
    m.insert(LLMCHECK_KEY.to_string(), vec![l]);
    for (k, _) in FFN_KEYS {
        m.insert(k.to_string(), vec![l, FFN_STATS]);
    }
    m
}

/// Features of one triple: key -> flat row-major values of the shape in [`key_shapes`].
pub type Features = BTreeMap<String, Vec<f32>>;

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

fn enc(tok: &TextTokenizer, s: &str) -> Result<Vec<u32>> {
    Ok(tok.encode(s, false)?)
}

impl<'a> Extractor<'a> {
    pub fn new(model: &'a Llama, tokenizer: &'a TextTokenizer, cfg: ExtractConfig) -> Self {
        Self {
            model,
            tokenizer,
            cfg,
        }
    }

    /// Prompt ids (knowledge optional; truncated as configured). Errors on an empty question.
    pub fn encode_prompt(&self, knowledge: Option<&str>, question: &str) -> Result<Vec<u32>> {
        if question.trim().is_empty() {
            return Err(HaluError::Input("empty question".into()));
        }
        let t = self.tokenizer;
        let mut ids = Vec::new();
        if let Some(k) = knowledge.filter(|k| !k.trim().is_empty()) {
            ids.extend(enc(t, "Knowledge: ")?);
            let mut k = enc(t, k.trim())?;
            k.truncate(self.cfg.max_knowledge_tokens);
            ids.extend(k);
            ids.extend(enc(t, "\n")?);
        }
        ids.extend(enc(t, "Question: ")?);
        let mut q = enc(t, question.trim())?;
        q.truncate(self.cfg.max_question_tokens);
        ids.extend(q);
        ids.extend(enc(t, "\nAnswer:")?);
        Ok(ids)
    }

    /// Answer ids (`" " + answer`, truncated). Errors on an empty answer.
    pub fn encode_answer(&self, answer: &str) -> Result<Vec<u32>> {
        if answer.trim().is_empty() {
            return Err(HaluError::Input("empty answer".into()));
        }
        let mut a = enc(self.tokenizer, &format!(" {}", answer.trim()))?;
        a.truncate(self.cfg.max_answer_tokens);
        if a.is_empty() {
            return Err(HaluError::Input("answer has no tokens".into()));
        }
        Ok(a)
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
        let map = |ids: Vec<u32>| -> Result<Vec<u32>> {
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
        };
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

/// Features of each answer (ids) after one prompt (ids): the prompt pass runs once through
/// [`Llama::forward_embeds_with_tap_options`] ([`TapOptions::FFN`]), each answer continues from
/// a copy of its KV cache with [`TapOptions::ALL`].
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
                let row = &v[(h * n + j) * l..(h * n + j + 1) * l];
                let ctx = row[..p].iter().sum::<f32>() / p as f32;
                let new = row[p..=p + j].iter().sum::<f32>() / (j + 1) as f32;
                let lr = ctx / (ctx + new).max(1e-30);
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

/// Per-token FFN statistics ([`FFN_STAT_NAMES`]) of one [`TapPoint::Ffn`] activation
/// `[1, t, F]` -> `t` rows.
pub fn ffn_token_stats(act: &Tensor) -> Result<Vec<[f32; FFN_STATS]>> {
    let (b, t, f) = act.dims3().map_err(|_| {
        HaluError::Input(format!(
            "FFN activation must be [1, t, F], got {:?}",
            act.dims()
        ))
    })?;
    if b != 1 || t == 0 || f == 0 {
        return Err(HaluError::Input(format!(
            "FFN activation must be [1, t > 0, F > 0], got {:?}",
            act.dims()
        )));
    }
    let v = act.flatten_all()?.to_vec1::<f32>()?;
    Ok(v.chunks_exact(f).map(ffn_stats).collect())
}

/// [`FFN_STAT_NAMES`] of one token's activation `a` (`F > 0` values).
pub fn ffn_stats(a: &[f32]) -> [f32; FFN_STATS] {
    let n = a.len().max(1) as f64;
    let (mut s1, mut s2, mut s3, mut s4, mut sabs) = (0f64, 0f64, 0f64, 0f64, 0f64);
    let (mut max_abs, mut active, mut positive) = (0f32, 0usize, 0usize);
    for &x in a {
        let xf = x as f64;
        let x2 = xf * xf;
        s1 += xf;
        s2 += x2;
        s3 += x2 * xf;
        s4 += x2 * x2;
        sabs += xf.abs();
        max_abs = max_abs.max(x.abs());
        active += (x.abs() > FFN_ACTIVE_THRESHOLD) as usize;
        positive += (x > 0.0) as usize;
    }
    let mu = s1 / n;
    let (e2, e3, e4) = (s2 / n, s3 / n, s4 / n);
    let var = (e2 - mu * mu).max(0.0);
    // Central fourth moment from the raw ones.
    let m4 = (e4 - 4.0 * mu * e3 + 6.0 * mu * mu * e2 - 3.0 * mu.powi(4)).max(0.0);
    let kurt = if var > 1e-30 { m4 / (var * var) } else { 0.0 };
    [
        mu as f32,
        var.sqrt() as f32,
        (sabs / n) as f32,
        max_abs,
        (active as f64 / n) as f32,
        (positive as f64 / n) as f32,
        kurt as f32,
    ]
}

/// The `ffn.*` features from per-layer, per-token statistics of the prompt (`[L][P]`) and of
/// the `n` answer tokens (`[L][n]`).
pub fn ffn_features(
    prompt: &[Vec<[f32; FFN_STATS]>],
    answer: &[Vec<[f32; FFN_STATS]>],
    n: usize,
) -> Result<Vec<(String, Vec<f32>)>> {
    let nl = answer.len();
    if nl == 0
        || prompt.len() != nl
        || prompt.iter().any(Vec::is_empty)
        || answer.iter().any(|a| a.len() != n)
        || n == 0
    {
        return Err(HaluError::Input(format!(
            "FFN taps incomplete: {} prompt layers, {} answer layers for {n} answer tokens",
            prompt.len(),
            nl
        )));
    }
    let mean = |rows: &[&[f32; FFN_STATS]]| -> [f32; FFN_STATS] {
        let mut acc = [0f64; FFN_STATS];
        for r in rows {
            for (a, x) in acc.iter_mut().zip(r.iter()) {
                *a += *x as f64;
            }
        }
        acc.map(|a| (a / rows.len().max(1) as f64) as f32)
    };
    let mut und = Vec::with_capacity(nl * FFN_STATS);
    let mut qry = Vec::with_capacity(nl * FFN_STATS);
    let mut last = Vec::with_capacity(nl * FFN_STATS);
    let mut gen = Vec::with_capacity(nl * FFN_STATS);
    for (p, a) in prompt.iter().zip(answer) {
        und.extend(mean(&p.iter().collect::<Vec<_>>()));
        qry.extend(mean(&[&p[p.len() - 1], &a[0]]));
        last.extend(a[n - 1]);
        gen.extend(mean(&a.iter().collect::<Vec<_>>()));
    }
    Ok(FFN_KEYS
        .iter()
        .map(|(k, _)| k.to_string())
        .zip([und, qry, last, gen])
        .collect())
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

/// LLM-Check hidden score: mean `log λ` over the `m-1` largest eigenvalues of `Z_c Z_c^T / d`
/// (`Z_c`: the `m` rows of `z` centered; rank `m-1`). 0 for a single row.
pub fn llmcheck_score(z: &[&[f32]]) -> f32 {
    let m = z.len();
    if m < 2 {
        return 0.0;
    }
    let d = z[0].len();
    let mut mu = vec![0f64; d];
    for r in z {
        for (a, x) in mu.iter_mut().zip(r.iter()) {
            *a += *x as f64 / m as f64;
        }
    }
    let c: Vec<Vec<f64>> = z
        .iter()
        .map(|r| r.iter().zip(&mu).map(|(x, u)| *x as f64 - u).collect())
        .collect();
    let mut g = vec![0f64; m * m];
    for i in 0..m {
        for j in i..m {
            let s: f64 = c[i].iter().zip(&c[j]).map(|(a, b)| a * b).sum::<f64>() / d as f64;
            g[i * m + j] = s;
            g[j * m + i] = s;
        }
    }
    let mut ev = jacobi_eigenvalues(&mut g, m);
    ev.sort_by(|a, b| b.total_cmp(a));
    let k = m - 1;
    (ev[..k].iter().map(|l| l.max(1e-12).ln()).sum::<f64>() / k as f64) as f32
}

/// Eigenvalues of a symmetric `m x m` matrix (row-major, destroyed) by cyclic Jacobi sweeps.
fn jacobi_eigenvalues(a: &mut [f64], m: usize) -> Vec<f64> {
    for _sweep in 0..60 {
        let off: f64 = (0..m)
            .flat_map(|i| (0..m).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * m + j] * a[i * m + j])
            .sum();
        let diag: f64 = (0..m).map(|i| a[i * m + i] * a[i * m + i]).sum();
        if off <= 1e-22 * diag.max(1e-300) {
            break;
        }
        for p in 0..m {
            for q in p + 1..m {
                let apq = a[p * m + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * m + q] - a[p * m + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let cs = 1.0 / (t * t + 1.0).sqrt();
                let sn = t * cs;
                for k in 0..m {
                    let akp = a[k * m + p];
                    let akq = a[k * m + q];
                    a[k * m + p] = cs * akp - sn * akq;
                    a[k * m + q] = sn * akp + cs * akq;
                }
                for k in 0..m {
                    let apk = a[p * m + k];
                    let aqk = a[q * m + k];
                    a[p * m + k] = cs * apk - sn * aqk;
                    a[q * m + k] = sn * apk + cs * aqk;
                }
            }
        }
    }
    (0..m).map(|i| a[i * m + i]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_matches_known_spectrum() {
        // [[2,1],[1,2]] has eigenvalues 1 and 3.
        let mut a = vec![2.0, 1.0, 1.0, 2.0];
        let mut ev = jacobi_eigenvalues(&mut a, 2);
        ev.sort_by(|a, b| a.total_cmp(b));
        assert!(
            (ev[0] - 1.0).abs() < 1e-9 && (ev[1] - 3.0).abs() < 1e-9,
            "{ev:?}"
        );
    }

    #[test]
    fn ffn_stats_of_a_known_vector() {
        // a = [-2, 0, 0.005, 2]: μ = 0.00125, |a| mean 1.00125, max 2, 2 of 4 above 0.01,
        // 2 of 4 positive; kurtosis of a symmetric two-point-plus-zeros shape ≈ 2.
        let a = [-2.0f32, 0.0, 0.005, 2.0];
        let s = ffn_stats(&a);
        let mu = 0.005f64 / 4.0;
        let dev: Vec<f64> = a.iter().map(|&x| x as f64 - mu).collect();
        let var = dev.iter().map(|d| d * d).sum::<f64>() / 4.0;
        let kurt = dev.iter().map(|d| d.powi(4)).sum::<f64>() / 4.0 / (var * var);
        let want = [mu, var.sqrt(), 4.005 / 4.0, 2.0, 0.5, 0.5, kurt];
        for (i, (g, w)) in s.iter().zip(want).enumerate() {
            assert!(
                (*g as f64 - w).abs() < 1e-5 * (1.0 + w.abs()),
                "{}: {g} vs {w}",
                FFN_STAT_NAMES[i]
            );
        }
        // A constant activation: σ = 0 -> kurtosis 0 (not NaN).
        let c = ffn_stats(&[0.5; 8]);
        assert_eq!((c[1], c[6], c[4], c[5]), (0.0, 0.0, 1.0, 1.0));
    }

    #[test]
    fn ffn_features_reduce_stages_and_reject_bad_taps() {
        let row = |x: f32| [x; FFN_STATS];
        let prompt = vec![vec![row(1.0), row(3.0)], vec![row(0.0), row(2.0)]];
        let answer = vec![vec![row(5.0), row(7.0), row(9.0)], vec![row(1.0); 3]];
        let f: BTreeMap<String, Vec<f32>> = ffn_features(&prompt, &answer, 3)
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(f.len(), FFN_KEYS.len());
        let at = |k: &str, l: usize| f[k][l * FFN_STATS];
        assert_eq!(f["ffn.generation.mean"].len(), 2 * FFN_STATS);
        assert_eq!(
            (
                at("ffn.understanding.mean", 0),
                at("ffn.understanding.mean", 1)
            ),
            (2.0, 1.0)
        );
        assert_eq!(
            (at("ffn.query.mean", 0), at("ffn.query.mean", 1)),
            (4.0, 1.5)
        );
        assert_eq!(
            (at("ffn.generation.last", 0), at("ffn.generation.mean", 0)),
            (9.0, 7.0)
        );
        // Layer counts or token counts that disagree are refused.
        assert!(ffn_features(&prompt[..1], &answer, 3).is_err());
        assert!(ffn_features(&prompt, &answer, 2).is_err());
        assert!(ffn_features(&[], &[], 1).is_err());
        let bad = Tensor::zeros(
            (2, 3, 4),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let e = ffn_token_stats(&bad).unwrap_err().to_string();
        assert!(e.contains("[1, t > 0, F > 0]"), "{e}");
    }

    #[test]
    fn llmcheck_two_rows_is_log_of_half_squared_distance() {
        // Two rows x, y: centered gram / d has one non-zero eigenvalue |x-y|^2 / (2d).
        let x = [1.0f32, 0.0, 0.0, 0.0];
        let y = [0.0f32, 3.0, 0.0, 0.0];
        let s = llmcheck_score(&[&x, &y]);
        let want = (10.0f64 / 2.0 / 4.0).ln() as f32;
        assert!((s - want).abs() < 1e-5, "{s} vs {want}");
    }
}
