//! Features of one completion collected *while it is generated* (serving): the reductions of
//! [`crate::features::extract_ids`], fed from the taps of the prefill and of each decode step
//! instead of a second, teacher-forced pass.
//!
//! A server keeps one [`OnlineFeatures`] per sequence:
//! 1. [`OnlineFeatures::set_prompt`] with the prefill's residual rows `[P, d]` of each layer in
//!    [`TapPlan::layers`];
//! 2. [`OnlineFeatures::push_token`] with the logits row a content token was sampled from (the
//!    stop token is not part of the answer);
//! 3. [`OnlineFeatures::push_hidden`] with the residual row `[d]` of each planned layer when that
//!    token is fed back (the next decode step);
//! 4. at the end, if [`OnlineFeatures::needs_tail`] (the sequence stopped on `max_tokens`, so its
//!    last token was never fed), one more decode step, then [`OnlineFeatures::finish`].
//!
//! Answers are cut at `max_answer_tokens` as in extraction. Lookback ratios need attention
//! probabilities and `ffn.*` statistics the FFN activations, which the server's batched decode
//! step does not request: probes that read them are refused by [`TapPlan::for_probe`]. Own-answer
//! generation ([`crate::generation`]) asks for both ([`TapPlan::every_family`]) and also feeds
//! [`OnlineFeatures::set_prompt_ffn`], [`OnlineFeatures::push_lookback`] and
//! [`OnlineFeatures::push_ffn`], so that every family comes from the generation pass itself.
use crate::error::{HaluError, Result};
use crate::features::{logit_vector, mean_rows, Features};
use crate::ffn_stats::ffn_features;
use crate::keys::{key_shapes, ExtractConfig, FFN_STATS, LLMCHECK_KEY, LOGIT_KEY, LOOKBACK_KEYS};
use crate::llmcheck::llmcheck_score;
use crate::probe::ProbeMeta;
use crate::store::ModelDims;

/// Per-token FFN statistics of every layer (`[L]` rows of [`FFN_STATS`]).
pub type FfnRow = Vec<[f32; FFN_STATS]>;

/// Which layers a probe's features need, and the extraction settings it was trained with.
#[derive(Debug, Clone, PartialEq)]
pub struct TapPlan {
    /// Residual-stream layers (`TapPoint::Layer(i)`) to tap, ascending.
    pub layers: Vec<usize>,
    /// `[L, d]` of the model.
    pub num_layers: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    pub window: usize,
    pub max_answer_tokens: usize,
    /// Whether lookback ratios are fed ([`OnlineFeatures::push_lookback`]).
    pub lookback: bool,
    /// Whether FFN statistics are fed ([`OnlineFeatures::set_prompt_ffn`], `push_ffn`).
    pub ffn: bool,
}

impl TapPlan {
    /// Every layer and every family (own-answer generation).
    pub fn every_family(dims: &ModelDims, cfg: &ExtractConfig) -> Self {
        Self {
            layers: (0..dims.num_layers).collect(),
            num_layers: dims.num_layers,
            hidden_size: dims.hidden_size,
            num_heads: dims.num_heads,
            window: cfg.window.max(1),
            max_answer_tokens: cfg.max_answer_tokens.max(1),
            lookback: true,
            ffn: true,
        }
    }

    /// The taps `meta`'s features need; an error for features serving cannot collect.
    pub fn for_probe(meta: &ProbeMeta) -> Result<Self> {
        let nl = meta.model.num_layers;
        let mut layers = vec![];
        for r in &meta.features {
            let hidden = r.key.starts_with("hidden.") || r.key == LLMCHECK_KEY;
            if hidden {
                match r.layer {
                    Some(l) if l < nl => layers.push(l),
                    Some(l) => {
                        return Err(HaluError::FeatureMismatch(format!(
                            "probe reads layer {l} of `{}`, the model has {nl} layers",
                            r.key
                        )))
                    }
                    None => layers.extend(0..nl),
                }
            } else if r.key.starts_with("ffn.") {
                return Err(HaluError::FeatureMismatch(format!(
                    "serving cannot score `{}`: the batched decode step does not emit FFN \
                     activations (TapPoint::Ffn); train the serving probe on hidden-state or \
                     logit features (e.g. `umbra halluc train --select \
                     hidden:L13:generation.last`)",
                    r.key
                )));
            } else if r.key != LOGIT_KEY {
                return Err(HaluError::FeatureMismatch(format!(
                    "serving cannot score `{}`: the batched decode step does not compute \
                     attention probabilities; train the serving probe on hidden-state or logit \
                     features (e.g. `umbra halluc train --select hidden:L13:generation.last`)",
                    r.key
                )));
            }
        }
        layers.sort_unstable();
        layers.dedup();
        Ok(Self {
            layers,
            num_layers: nl,
            hidden_size: meta.model.hidden_size,
            num_heads: meta.model.num_heads,
            window: meta.extract.window.max(1),
            max_answer_tokens: meta.extract.max_answer_tokens.max(1),
            lookback: false,
            ffn: false,
        })
    }
}

/// Per-sequence accumulator; see the module docs for the call order.
#[derive(Debug, Clone)]
pub struct OnlineFeatures {
    plan: std::sync::Arc<TapPlan>,
    /// Per planned layer: mean of the prompt rows, the last `window` prompt rows (at least one).
    prompt_mean: Vec<Vec<f32>>,
    prompt_tail: Vec<Vec<Vec<f32>>>,
    prompt_len: usize,
    /// Per planned layer: the rows of the answer tokens fed so far.
    answer: Vec<Vec<Vec<f32>>>,
    /// Log-probability and entropy of the distribution each answer token was sampled from.
    logprobs: Vec<f32>,
    entropies: Vec<f32>,
    /// Per-token FFN statistics of the prompt, `[L][P]` (plans with `ffn`).
    prompt_ffn: Vec<FfnRow>,
    /// Per answer token fed: lookback ratios `[L*H]` and FFN statistics `[L]`.
    lookback: Vec<Vec<f32>>,
    answer_ffn: Vec<FfnRow>,
}

impl OnlineFeatures {
    pub fn new(plan: std::sync::Arc<TapPlan>) -> Self {
        let k = plan.layers.len();
        Self {
            plan,
            prompt_mean: vec![vec![]; k],
            prompt_tail: vec![vec![]; k],
            prompt_len: 0,
            answer: vec![vec![]; k],
            logprobs: vec![],
            entropies: vec![],
            prompt_ffn: vec![],
            lookback: vec![],
            answer_ffn: vec![],
        }
    }

    /// Per-token FFN statistics of the prompt: `stats[l]` holds the `P` rows of layer `l`
    /// (every layer; plans with `ffn`).
    pub fn set_prompt_ffn(&mut self, stats: Vec<FfnRow>) -> Result<()> {
        if stats.len() != self.plan.num_layers || stats.iter().any(Vec::is_empty) {
            return Err(HaluError::Input(format!(
                "prompt FFN taps: expected {} layers of P > 0 rows",
                self.plan.num_layers
            )));
        }
        self.prompt_ffn = stats;
        Ok(())
    }

    /// Lookback ratios `[L*H]` (layer-major) of the answer token just fed.
    pub fn push_lookback(&mut self, ratios: Vec<f32>) -> Result<()> {
        if self.lookback.len() >= self.logprobs.len() {
            return Ok(());
        }
        let want = self.plan.num_layers * self.plan.num_heads;
        if ratios.len() != want {
            return Err(HaluError::Input(format!(
                "lookback taps: {} ratios, expected {want}",
                ratios.len()
            )));
        }
        self.lookback.push(ratios);
        Ok(())
    }

    /// FFN statistics `[L]` of the answer token just fed.
    pub fn push_ffn(&mut self, stats: FfnRow) -> Result<()> {
        if self.answer_ffn.len() >= self.logprobs.len() {
            return Ok(());
        }
        if stats.len() != self.plan.num_layers {
            return Err(HaluError::Input(format!(
                "FFN taps: {} layers, expected {}",
                stats.len(),
                self.plan.num_layers
            )));
        }
        self.answer_ffn.push(stats);
        Ok(())
    }

    /// Prompt rows of each planned layer (in [`TapPlan::layers`] order), `[P][d]`.
    pub fn set_prompt(&mut self, rows: &[Vec<Vec<f32>>]) -> Result<()> {
        let d = self.plan.hidden_size;
        if rows.len() != self.plan.layers.len()
            || rows
                .iter()
                .any(|r| r.is_empty() || r.iter().any(|x| x.len() != d))
        {
            return Err(HaluError::Input(format!(
                "prompt taps: expected {} layers of [P > 0, {d}] rows",
                self.plan.layers.len()
            )));
        }
        self.prompt_len = rows[0].len();
        for (i, r) in rows.iter().enumerate() {
            self.prompt_mean[i] = mean_rows(r.iter().map(Vec::as_slice), d);
            let from = r.len().saturating_sub(self.plan.window);
            self.prompt_tail[i] = r[from..].to_vec();
        }
        Ok(())
    }

    /// A content token `token` was sampled from `logits` (the stop token is never pushed).
    pub fn push_token(&mut self, logits: &[f32], token: u32) {
        if self.logprobs.len() >= self.plan.max_answer_tokens || logits.is_empty() {
            return;
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
        let lse = max + z.ln();
        let ent = -logits
            .iter()
            .map(|&x| {
                let lp = x as f64 - lse;
                lp.exp() * lp
            })
            .sum::<f64>();
        let lp = logits
            .get(token as usize)
            .map_or(f64::NEG_INFINITY, |&x| x as f64 - lse);
        self.logprobs.push(lp as f32);
        self.entropies.push(ent as f32);
    }

    /// Residual rows `[d]` of the planned layers for the answer token just fed.
    pub fn push_hidden(&mut self, rows: &[&[f32]]) -> Result<()> {
        if self.answer[..].first().map_or(0, Vec::len) >= self.logprobs.len() {
            return Ok(()); // past the cut, or a token that was never pushed
        }
        if rows.len() != self.plan.layers.len() {
            return Err(HaluError::Input(format!(
                "decode taps: {} layers, expected {}",
                rows.len(),
                self.plan.layers.len()
            )));
        }
        for (a, r) in self.answer.iter_mut().zip(rows) {
            a.push(r.to_vec());
        }
        Ok(())
    }

    /// Answer tokens counted so far (at most `max_answer_tokens`).
    pub fn answer_tokens(&self) -> usize {
        self.logprobs.len()
    }

    /// True when a pushed token has not been fed yet (one more decode step is needed).
    pub fn needs_tail(&self) -> bool {
        let n = self.logprobs.len();
        (!self.plan.layers.is_empty() && self.answer[0].len() < n)
            || (self.plan.lookback && self.lookback.len() < n)
            || (self.plan.ffn && self.answer_ffn.len() < n)
    }

    /// The features, in full shapes (layers a probe does not read are zero); `None` for an
    /// empty answer.
    pub fn finish(&self) -> Result<Option<Features>> {
        let n = self.logprobs.len();
        if n == 0 {
            return Ok(None);
        }
        if self.needs_tail() {
            return Err(HaluError::Input(
                "the last answer token was never fed back".into(),
            ));
        }
        let p = &*self.plan;
        let (nl, d) = (p.num_layers, p.hidden_size);
        let shapes = key_shapes(nl, d, p.num_heads);
        let mut f = Features::new();
        for (k, s) in &shapes {
            f.insert(k.clone(), vec![0f32; s.iter().product()]);
        }
        if !p.layers.is_empty() && self.prompt_len == 0 {
            return Err(HaluError::Input("prompt taps were never set".into()));
        }
        let w = p.window;
        for (i, &l) in p.layers.iter().enumerate() {
            let rows = &self.answer[i];
            let tail = &self.prompt_tail[i];
            let last_prompt = tail.last().expect("set_prompt keeps >= 1 row").as_slice();
            let put = |f: &mut Features, key: &str, v: &[f32]| {
                if let Some(dst) = f.get_mut(key) {
                    dst[l * d..(l + 1) * d].copy_from_slice(v);
                }
            };
            put(&mut f, "hidden.understanding.mean", &self.prompt_mean[i]);
            put(
                &mut f,
                "hidden.query.mean",
                &mean_rows([last_prompt, rows[0].as_slice()], d),
            );
            put(&mut f, "hidden.generation.last", &rows[n - 1]);
            put(
                &mut f,
                "hidden.generation.mean",
                &mean_rows(rows.iter().map(Vec::as_slice), d),
            );
            let from_prompt = w.saturating_sub(n).min(self.prompt_len).min(tail.len());
            let win = tail[tail.len() - from_prompt..]
                .iter()
                .chain(rows[n.saturating_sub(w)..].iter())
                .map(Vec::as_slice);
            put(&mut f, "hidden.generation.window", &mean_rows(win, d));
            let z: Vec<&[f32]> = std::iter::once(last_prompt)
                .chain(rows.iter().map(Vec::as_slice))
                .collect();
            if let Some(v) = f.get_mut(LLMCHECK_KEY) {
                v[l] = llmcheck_score(&z);
            }
        }
        f.insert(
            LOGIT_KEY.into(),
            logit_vector(&self.logprobs, &self.entropies),
        );
        if p.lookback {
            // As in extraction: the first token's ratios, and the f32 mean over the tokens.
            let mut sum = vec![0f32; self.lookback[0].len()];
            for r in &self.lookback {
                for (s, x) in sum.iter_mut().zip(r) {
                    *s += *x;
                }
            }
            let mean = sum.into_iter().map(|s| s / n as f32).collect();
            f.insert(LOOKBACK_KEYS[0].0.into(), self.lookback[0].clone());
            f.insert(LOOKBACK_KEYS[1].0.into(), mean);
        }
        if p.ffn {
            if self.prompt_ffn.is_empty() {
                return Err(HaluError::Input("prompt FFN taps were never set".into()));
            }
            let answer: Vec<FfnRow> = (0..p.num_layers)
                .map(|l| self.answer_ffn.iter().map(|t| t[l]).collect())
                .collect();
            f.extend(ffn_features(&self.prompt_ffn, &answer, n)?);
        }
        Ok(Some(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::{extract_ids, ExtractConfig};
    use crate::probe::FeatureRef;
    use crate::store::ModelDims;
    use candle_core::{Device, Tensor};
    use umbra_model::llama::{Llama, TapPoint};
    use umbra_model::testing;
    use umbra_model::{Forward, Input};

    fn meta(model: &Llama, features: Vec<FeatureRef>, cfg: ExtractConfig) -> ProbeMeta {
        ProbeMeta {
            format: "test".into(),
            kind: crate::probe::ProbeKind::Logreg,
            features,
            stage: crate::features::Stage::Generation,
            model: ModelDims::of(model.config()),
            extract: cfg,
            threshold: 0.5,
            obfuscated: None,
        }
    }

    /// Prefill + step-by-step decoding with taps (as the server does) gives the features of
    /// the offline, teacher-forced extraction of the same prompt and answer.
    #[test]
    fn online_features_equal_offline_extraction() {
        let cfg = testing::tiny_config(32, 4, 2, 3, 64);
        let w = testing::random_weights(&cfg, 3);
        let m = Llama::new(&cfg, &w, &Device::Cpu).unwrap();
        let nl = m.num_layers();
        let ecfg = ExtractConfig {
            window: 3,
            max_answer_tokens: 5,
            ..ExtractConfig::default()
        };
        let prompt: Vec<u32> = (0..7)
            .map(|i| (i * 7 + 3) % cfg.vocab_size as u32)
            .collect();
        for (answer_len, tail) in [(1usize, true), (2, false), (4, true), (5, false)] {
            let answer: Vec<u32> = (0..answer_len as u32).map(|i| (i * 11 + 5) % 60).collect();
            let want = &extract_ids(&m, &ecfg, &prompt, std::slice::from_ref(&answer)).unwrap()[0];
            let feats = vec![
                FeatureRef::new("hidden.generation.last", Some(1)),
                FeatureRef::new("hidden.generation.window", Some(0)),
                FeatureRef::new("hidden.generation.mean", None),
                FeatureRef::new("hidden.query.mean", Some(nl - 1)),
                FeatureRef::new("hidden.understanding.mean", Some(0)),
                FeatureRef::new(LLMCHECK_KEY, Some(1)),
                FeatureRef::new(LOGIT_KEY, None),
            ];
            let plan =
                std::sync::Arc::new(TapPlan::for_probe(&meta(&m, feats, ecfg.clone())).unwrap());
            assert_eq!(plan.layers, (0..nl).collect::<Vec<_>>());
            let mut on = OnlineFeatures::new(plan.clone());
            let mut cache = m.new_cache();
            let mut layers = vec![];
            let ids = Tensor::new(prompt.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let mut logits = m
                .forward(
                    Input::Ids(&ids),
                    &mut cache,
                    Forward::last_logits().tap(&mut |pt, t| {
                        if let TapPoint::Layer(_) = pt {
                            layers.push(t.squeeze(0).unwrap().to_vec2::<f32>().unwrap());
                        }
                    }),
                )
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            on.set_prompt(&layers).unwrap();
            // Feed every answer token but the last unless the sequence "stopped" on a stop id
            // (then the last content token was fed to produce it); `tail` = max_tokens ending.
            for (j, &tok) in answer.iter().enumerate() {
                on.push_token(&logits, tok);
                let last = j + 1 == answer.len();
                if last && tail {
                    assert!(on.needs_tail());
                }
                let mut rows = vec![];
                let ids = Tensor::new(&[[tok]], &Device::Cpu).unwrap();
                let out = m
                    .forward_groups(
                        &mut [(Input::Ids(&ids), &mut cache)],
                        Forward::last_logits().tap(&mut |pt, t| {
                            if let TapPoint::Layer(_) = pt {
                                rows.push(t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                            }
                        }),
                    )
                    .unwrap();
                logits = out[0].squeeze(0).unwrap().to_vec1::<f32>().unwrap();
                let r: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
                on.push_hidden(&r).unwrap();
            }
            assert!(!on.needs_tail());
            let got = on.finish().unwrap().unwrap();
            let d = cfg.hidden_size;
            for key in [
                "hidden.generation.last",
                "hidden.generation.window",
                "hidden.generation.mean",
                "hidden.query.mean",
                "hidden.understanding.mean",
            ] {
                for l in 0..nl {
                    let (a, b) = (
                        &got[key][l * d..(l + 1) * d],
                        &want[key][l * d..(l + 1) * d],
                    );
                    let err = a
                        .iter()
                        .zip(b)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0f32, f32::max);
                    assert!(err < 1e-4, "{key} layer {l} answer {answer_len}: {err}");
                }
            }
            for key in [LLMCHECK_KEY, LOGIT_KEY] {
                for (x, y) in got[key].iter().zip(&want[key]) {
                    assert!((x - y).abs() < 1e-3 * (1.0 + y.abs()), "{key}: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn lookback_probes_are_refused_for_serving() {
        let cfg = testing::tiny_config(32, 4, 2, 3, 64);
        let w = testing::random_weights(&cfg, 3);
        let m = Llama::new(&cfg, &w, &Device::Cpu).unwrap();
        let meta = meta(
            &m,
            vec![FeatureRef::new("lookback.generation.mean", None)],
            ExtractConfig::default(),
        );
        let e = TapPlan::for_probe(&meta).unwrap_err().to_string();
        assert!(e.contains("attention probabilities"), "{e}");
    }

    #[test]
    fn ffn_probes_are_refused_for_serving() {
        let cfg = testing::tiny_config(32, 4, 2, 3, 64);
        let w = testing::random_weights(&cfg, 3);
        let m = Llama::new(&cfg, &w, &Device::Cpu).unwrap();
        for f in [
            FeatureRef::new("ffn.generation.mean", None),
            FeatureRef::new("ffn.query.mean", Some(1)),
        ] {
            let meta = meta(
                &m,
                vec![FeatureRef::new(LOGIT_KEY, None), f],
                ExtractConfig::default(),
            );
            let e = TapPlan::for_probe(&meta).unwrap_err().to_string();
            assert!(e.contains("FFN activations"), "{e}");
        }
    }
}
