//! Own answers: batched greedy generation whose taps are the probe's features, plus `K`
//! sampled answers per prompt for the sampling-consistency baseline.
//!
//! One batch of prompts (different lengths) runs as:
//! 1. **prefill**: prompts grouped up to `prefill_tokens` per pass, each prompt a group of its own
//!    cache in one [`Llama::forward_groups`] pass with the residual-stream taps (and the FFN tap);
//!    the rows of each group feed its [`OnlineFeatures`] (`set_prompt`, `set_prompt_ffn`);
//! 2. **greedy decode**: every live sequence's next token goes through one `forward_groups` pass
//!    per step with [`TapOptions::ALL`]; the step's taps are the fed token's hidden rows, its
//!    attention row (-> lookback ratios) and FFN activation (-> statistics), exactly what
//!    [`crate::features::extract_ids`] reads teacher-forced; a sequence that ends on
//!    `max_new_tokens` gets one more step to feed its last token (as `umbra serve` does);
//! 3. **samples** (`K > 0`): each prompt's cache is cut back to the prompt
//!    ([`KvCache::truncate`]) and forked `K` times; the first token is drawn from the prefill's
//!    logits, then all `K x batch` sequences decode together without taps.
//!
//! The features therefore come from the pass that wrote the answer (the distribution a server
//! scores), not from a second, teacher-forced pass. Costs are counted in [`GenCost`].
use crate::error::{HaluError, Result};
use crate::features::{lookback_ratio, Features};
use crate::ffn_stats::ffn_stats;
use crate::online::{FfnRow, OnlineFeatures, TapPlan};
use candle_core::Tensor;
use std::sync::Arc;
use std::time::Instant;
use umbra_model::sampling::{Sampler, SamplingParams};
use umbra_model::{Forward, Input, KvCache, Llama, TapOptions, TapPoint};

/// Generation settings of one run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenSettings {
    /// Most answer tokens (greedy and sampled).
    pub max_new_tokens: usize,
    /// Sampled answers per prompt (`K`; 0 = no sampling baseline).
    pub samples: usize,
    /// Temperature of the sampled answers.
    pub temperature: f32,
    /// Prompt tokens per prefill pass (prompts are grouped up to this budget).
    pub prefill_tokens: usize,
}

impl Default for GenSettings {
    fn default() -> Self {
        Self {
            max_new_tokens: 32,
            samples: 0,
            temperature: 1.0,
            prefill_tokens: 1024,
        }
    }
}

/// One prompt's greedy answer, its features and its samples.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Greedy answer ids (stop id excluded).
    pub ids: Vec<u32>,
    /// Ended on a stop id (else on `max_new_tokens`).
    pub stopped: bool,
    /// Features of the generation pass; `None` for an empty answer.
    pub features: Option<Features>,
    /// The `K` sampled answers (stop ids excluded).
    pub samples: Vec<Vec<u32>>,
}

/// What a batch cost: tokens through the model and wall time per phase.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenCost {
    pub prompts: usize,
    pub prompt_tokens: usize,
    pub prefill_passes: usize,
    /// Batched greedy decode passes, and the tokens they fed (tail steps included).
    pub greedy_passes: usize,
    pub greedy_tokens: usize,
    /// Batched sampling decode passes, and the tokens they fed.
    pub sample_passes: usize,
    pub sample_tokens: usize,
    pub prefill_s: f64,
    pub greedy_s: f64,
    pub sample_s: f64,
}

impl GenCost {
    pub fn add(&mut self, o: &GenCost) {
        self.prompts += o.prompts;
        self.prompt_tokens += o.prompt_tokens;
        self.prefill_passes += o.prefill_passes;
        self.greedy_passes += o.greedy_passes;
        self.greedy_tokens += o.greedy_tokens;
        self.sample_passes += o.sample_passes;
        self.sample_tokens += o.sample_tokens;
        self.prefill_s += o.prefill_s;
        self.greedy_s += o.greedy_s;
        self.sample_s += o.sample_s;
    }
}

/// One live sequence of the greedy phase.
struct Greedy {
    feats: OnlineFeatures,
    ids: Vec<u32>,
    logits: Vec<f32>,
    /// Fed its last token for the taps only; done after this step.
    tail: bool,
    done: bool,
    stopped: bool,
}

/// Generates the greedy answer (with features) and `settings.samples` sampled answers for each
/// prompt. `sample_seeds[i]` seeds prompt `i`'s samples (sample `k` uses `seed + k`), so the
/// samples do not depend on how prompts are batched.
pub fn generate_answers(
    model: &Llama,
    plan: &Arc<TapPlan>,
    prompts: &[&[u32]],
    sample_seeds: &[u64],
    stop_ids: &[u32],
    settings: &GenSettings,
) -> Result<(Vec<Answer>, GenCost)> {
    let n = prompts.len();
    if sample_seeds.len() != n {
        return Err(HaluError::Input(format!(
            "{n} prompts but {} sample seeds",
            sample_seeds.len()
        )));
    }
    let max_pos = model.config().max_position_embeddings;
    for p in prompts {
        if p.is_empty() {
            return Err(HaluError::Input("empty prompt".into()));
        }
        if p.len() + settings.max_new_tokens + 1 > max_pos {
            return Err(HaluError::Input(format!(
                "a prompt of {} tokens + {} answer tokens exceeds the model's {max_pos} positions",
                p.len(),
                settings.max_new_tokens
            )));
        }
    }
    let mut cost = GenCost {
        prompts: n,
        prompt_tokens: prompts.iter().map(|p| p.len()).sum(),
        ..GenCost::default()
    };
    let mut caches: Vec<KvCache> = prompts
        .iter()
        .map(|p| model.new_cache_with_capacity(p.len() + settings.max_new_tokens + 1))
        .collect();
    let t0 = Instant::now();
    let mut seqs = prefill(model, plan, prompts, &mut caches, settings, &mut cost)?;
    cost.prefill_s = t0.elapsed().as_secs_f64();
    let first_logits: Vec<Vec<f32>> = seqs.iter().map(|s| s.logits.clone()).collect();
    let t1 = Instant::now();
    greedy_decode(
        model,
        plan,
        prompts,
        &mut caches,
        &mut seqs,
        stop_ids,
        settings,
        &mut cost,
    )?;
    cost.greedy_s = t1.elapsed().as_secs_f64();
    let t2 = Instant::now();
    let samples = if settings.samples > 0 {
        sample_decode(
            model,
            prompts,
            caches,
            &first_logits,
            sample_seeds,
            stop_ids,
            settings,
            &mut cost,
        )?
    } else {
        vec![vec![]; n]
    };
    cost.sample_s = t2.elapsed().as_secs_f64();
    let answers = seqs
        .into_iter()
        .zip(samples)
        .map(|(s, samples)| {
            Ok(Answer {
                features: s.feats.finish()?,
                ids: s.ids,
                stopped: s.stopped,
                samples,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((answers, cost))
}

/// Per group of a pass: its stacked rows `r0..r0 + len`.
fn offsets(lens: &[usize]) -> Vec<usize> {
    let mut o = Vec::with_capacity(lens.len());
    let mut r = 0;
    for l in lens {
        o.push(r);
        r += l;
    }
    o
}

/// The prompts' passes (grouped up to `prefill_tokens`), with the prompt taps fed to each
/// sequence's [`OnlineFeatures`].
fn prefill(
    model: &Llama,
    plan: &Arc<TapPlan>,
    prompts: &[&[u32]],
    caches: &mut [KvCache],
    settings: &GenSettings,
    cost: &mut GenCost,
) -> Result<Vec<Greedy>> {
    let dev = model.device();
    let mut seqs = Vec::with_capacity(prompts.len());
    let mut i = 0;
    while i < prompts.len() {
        let mut j = i;
        let mut tokens = 0;
        while j < prompts.len() && (j == i || tokens + prompts[j].len() <= settings.prefill_tokens)
        {
            tokens += prompts[j].len();
            j += 1;
        }
        let ids = prompts[i..j]
            .iter()
            .map(|p| Ok(Tensor::new(*p, dev)?.unsqueeze(0)?))
            .collect::<Result<Vec<_>>>()?;
        let lens: Vec<usize> = prompts[i..j].iter().map(|p| p.len()).collect();
        let offs = offsets(&lens);
        let mut layers: Vec<Vec<Vec<f32>>> = vec![];
        let mut ffn: Vec<Vec<[f32; crate::keys::FFN_STATS]>> = vec![];
        let mut err: Option<HaluError> = None;
        let mut groups: Vec<(Input<'_>, &mut KvCache)> = ids
            .iter()
            .map(Input::Ids)
            .zip(caches[i..j].iter_mut())
            .collect();
        let opts = TapOptions {
            attention: false,
            ffn: plan.ffn,
        };
        let out = model.forward_groups(
            &mut groups,
            Forward::last_logits().taps(opts, &mut |pt, t| {
                let r: Result<()> = (|| {
                    match pt {
                        TapPoint::Layer(l) if plan.layers.binary_search(&l).is_ok() => {
                            layers.push(t.to_vec2::<f32>()?)
                        }
                        TapPoint::Ffn(_) => {
                            ffn.push(t.to_vec2::<f32>()?.iter().map(|r| ffn_stats(r)).collect())
                        }
                        _ => {}
                    }
                    Ok(())
                })();
                if let (Err(e), None) = (r, &err) {
                    err = Some(e);
                }
            }),
        )?;
        if let Some(e) = err {
            return Err(e);
        }
        cost.prefill_passes += 1;
        for (g, (logits, (&r0, &len))) in out.iter().zip(offs.iter().zip(&lens)).enumerate() {
            let mut feats = OnlineFeatures::new(plan.clone());
            let rows: Vec<Vec<Vec<f32>>> =
                layers.iter().map(|l| l[r0..r0 + len].to_vec()).collect();
            feats.set_prompt(&rows)?;
            if plan.ffn {
                feats.set_prompt_ffn(ffn.iter().map(|l| l[r0..r0 + len].to_vec()).collect())?;
            }
            let logits = logits.squeeze(0)?.to_vec1::<f32>()?;
            let _ = g;
            seqs.push(Greedy {
                feats,
                ids: vec![],
                logits,
                tail: false,
                done: false,
                stopped: false,
            });
        }
        i = j;
    }
    Ok(seqs)
}

/// Taps of one decode pass, per layer: hidden rows `[G][d]`, attention maps (one per group),
/// FFN statistics `[G]`.
#[derive(Default)]
struct StepTaps {
    hidden: Vec<Vec<Vec<f32>>>,
    attention: Vec<Vec<Tensor>>,
    ffn: Vec<Vec<[f32; crate::keys::FFN_STATS]>>,
}

/// Greedy decoding of every sequence, one batched pass per step, taps fed to the features.
#[allow(clippy::too_many_arguments)]
fn greedy_decode(
    model: &Llama,
    plan: &Arc<TapPlan>,
    prompts: &[&[u32]],
    caches: &mut [KvCache],
    seqs: &mut [Greedy],
    stop_ids: &[u32],
    settings: &GenSettings,
    cost: &mut GenCost,
) -> Result<()> {
    let dev = model.device();
    let mut greedy = Sampler::new(SamplingParams::greedy())?;
    let nl = plan.num_layers;
    loop {
        // Pick each live sequence's next token; collect the ones to feed.
        let mut feed: Vec<(usize, u32)> = vec![];
        for (q, s) in seqs.iter_mut().enumerate() {
            if s.done {
                continue;
            }
            if s.tail {
                s.done = true;
                continue;
            }
            let tok = greedy.sample(&s.logits);
            if stop_ids.contains(&tok) {
                s.done = true;
                s.stopped = true;
                continue;
            }
            s.feats.push_token(&s.logits, tok);
            s.ids.push(tok);
            if s.ids.len() >= settings.max_new_tokens {
                if s.feats.needs_tail() {
                    s.tail = true;
                    feed.push((q, tok));
                } else {
                    s.done = true;
                }
            } else {
                feed.push((q, tok));
            }
        }
        if feed.is_empty() {
            return Ok(());
        }
        let ids = feed
            .iter()
            .map(|&(_, t)| Ok(Tensor::new(&[[t]], dev)?))
            .collect::<Result<Vec<_>>>()?;
        let mut taps = StepTaps {
            attention: vec![vec![]; nl],
            ..StepTaps::default()
        };
        let mut err: Option<HaluError> = None;
        let out = {
            let mut want: Vec<bool> = vec![false; caches.len()];
            for &(q, _) in &feed {
                want[q] = true;
            }
            let mut groups: Vec<(Input<'_>, &mut KvCache)> = caches
                .iter_mut()
                .zip(want)
                .filter(|(_, w)| *w)
                .map(|(c, _)| c)
                .zip(&ids)
                .map(|(c, t)| (Input::Ids(t), c))
                .collect();
            let opts = TapOptions {
                attention: plan.lookback,
                ffn: plan.ffn,
            };
            model.forward_groups(
                &mut groups,
                Forward::last_logits().taps(opts, &mut |pt, t| {
                    let r: Result<()> = (|| {
                        match pt {
                            TapPoint::Layer(l) if plan.layers.binary_search(&l).is_ok() => {
                                taps.hidden.push(t.to_vec2::<f32>()?)
                            }
                            TapPoint::Attention(l) if l < nl => taps.attention[l].push(t.clone()),
                            TapPoint::Ffn(_) => taps
                                .ffn
                                .push(t.to_vec2::<f32>()?.iter().map(|r| ffn_stats(r)).collect()),
                            _ => {}
                        }
                        Ok(())
                    })();
                    if let (Err(e), None) = (r, &err) {
                        err = Some(e);
                    }
                }),
            )?
        };
        if let Some(e) = err {
            return Err(e);
        }
        cost.greedy_passes += 1;
        cost.greedy_tokens += feed.len();
        // `feed` is in sequence order, as the groups were built.
        for (g, &(q, _)) in feed.iter().enumerate() {
            let s = &mut seqs[q];
            let rows: Vec<&[f32]> = taps.hidden.iter().map(|l| l[g].as_slice()).collect();
            s.feats.push_hidden(&rows)?;
            if plan.lookback {
                s.feats
                    .push_lookback(lookback_row(&taps.attention, g, prompts[q].len())?)?;
            }
            if plan.ffn {
                let row: FfnRow = taps.ffn.iter().map(|l| l[g]).collect();
                s.feats.push_ffn(row)?;
            }
            s.logits = out[g].squeeze(0)?.to_vec1::<f32>()?;
        }
    }
}

/// Lookback ratios `[L*H]` of group `g`'s fed token from its attention maps `[1, H, 1, Lg]`
/// (one per layer), `p` prompt positions.
fn lookback_row(attention: &[Vec<Tensor>], g: usize, p: usize) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    for (l, maps) in attention.iter().enumerate() {
        let a = maps.get(g).ok_or_else(|| {
            HaluError::Input(format!("no attention map of layer {l} for group {g}"))
        })?;
        let (_, nh, t, len) = a.dims4()?;
        if t != 1 || len <= p {
            return Err(HaluError::Input(format!(
                "decode attention map of shape {:?} after a {p}-token prompt",
                a.dims()
            )));
        }
        let v = a.flatten_all()?.to_vec1::<f32>()?;
        out.extend((0..nh).map(|h| lookback_ratio(&v[h * len..(h + 1) * len], p)));
    }
    Ok(out)
}

/// `K` sampled answers per prompt from its prompt cache (forked), all decoded together.
#[allow(clippy::too_many_arguments)]
fn sample_decode(
    model: &Llama,
    prompts: &[&[u32]],
    caches: Vec<KvCache>,
    first_logits: &[Vec<f32>],
    seeds: &[u64],
    stop_ids: &[u32],
    settings: &GenSettings,
    cost: &mut GenCost,
) -> Result<Vec<Vec<Vec<u32>>>> {
    let dev = model.device();
    let k = settings.samples;
    struct S {
        q: usize,
        sampler: Sampler,
        cache: KvCache,
        ids: Vec<u32>,
        logits: Vec<f32>,
        done: bool,
    }
    let mut seqs: Vec<S> = Vec::with_capacity(prompts.len() * k);
    for (q, mut cache) in caches.into_iter().enumerate() {
        cache.truncate(prompts[q].len());
        for j in 0..k {
            let c = if j + 1 == k {
                std::mem::replace(&mut cache, model.new_cache())
            } else {
                cache.try_clone()?
            };
            let params = SamplingParams::with_temperature(
                settings.temperature,
                seeds[q].wrapping_add(j as u64),
            );
            seqs.push(S {
                q,
                sampler: Sampler::new(params)?,
                cache: c,
                ids: vec![],
                logits: first_logits[q].clone(),
                done: false,
            });
        }
    }
    loop {
        let mut feed: Vec<usize> = vec![];
        for (i, s) in seqs.iter_mut().enumerate() {
            if s.done {
                continue;
            }
            let tok = s.sampler.sample(&s.logits);
            if stop_ids.contains(&tok) {
                s.done = true;
                continue;
            }
            s.ids.push(tok);
            if s.ids.len() >= settings.max_new_tokens {
                s.done = true;
            } else {
                feed.push(i);
            }
        }
        if feed.is_empty() {
            break;
        }
        let ids = feed
            .iter()
            .map(|&i| Ok(Tensor::new(&[[*seqs[i].ids.last().unwrap_or(&0)]], dev)?))
            .collect::<Result<Vec<_>>>()?;
        let out = {
            let mut want = vec![false; seqs.len()];
            for &i in &feed {
                want[i] = true;
            }
            let mut groups: Vec<(Input<'_>, &mut KvCache)> = seqs
                .iter_mut()
                .zip(want)
                .filter(|(_, w)| *w)
                .map(|(s, _)| &mut s.cache)
                .zip(&ids)
                .map(|(c, t)| (Input::Ids(t), c))
                .collect();
            model.forward_groups(&mut groups, Forward::last_logits())?
        };
        cost.sample_passes += 1;
        cost.sample_tokens += feed.len();
        for (g, &i) in feed.iter().enumerate() {
            seqs[i].logits = out[g].squeeze(0)?.to_vec1::<f32>()?;
        }
    }
    let mut per: Vec<Vec<Vec<u32>>> = vec![vec![]; prompts.len()];
    for s in seqs {
        per[s.q].push(s.ids);
    }
    Ok(per)
}
