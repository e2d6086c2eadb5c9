//! Scoring under obfuscation (issue 6, part 5): a probe trained on a plaintext model is moved,
//! with the same secret key as the checkpoint, into the obfuscated model's coordinates, so the
//! provider scores the obfuscated states it computes anyway without learning the tokens.
//!
//! A probe computes `σ(f(W0 z + b0))` with `z = (x - μ) ⊙ s` (see [`crate::probe`]). The
//! transform folds the standardization into the first layer (`W0' = W0 diag(s)`,
//! `b0' = b0 - W0' μ`, then `μ = 0`, `s = 1`) and maps the input blocks of `W0'` (HF layout
//! `[out, in]`) family by family, with the maps of [`umbra_aloepri::statemap::StateMaps`]:
//!
//! | family | under the key | first-layer block |
//! |---|---|---|
//! | `hidden.*` `[L,d]` -> `[L,d']` | `x = x~ Q` (every mode; Algorithm 1: `P_j Q = I`) | `W~ = W' Q^T` per layer |
//! | `lookback.*` `[L,H]` | head `i` of layer `l` moves to `head_perm[l][i]`; values equal in exact mode | columns permuted |
//! | `logit.generation` `[8]` | invariant (log-probs of `tau(a)` under permuted logits; entropies) | unchanged |
//! | `llmcheck.generation` `[L]` | exact mode only: `P P^T = I` keeps the Gram matrix, the `1/d` becomes `1/d'`, so every entry shifts by `ln(d/d')` | unchanged, `b0' -= ln(d/d') Σ w` |
//!
//! Means over tokens (understanding / query / generation mean, window) are linear, so they map
//! like single states.
//!
//! `ffn.*` statistics are refused: obfuscated neuron `t` is plaintext neuron `perm[t]` with its
//! activation scaled by a secret `scale[perm[t]] ∈ [1/2, 2]` (even in exact mode), so the
//! per-layer mean, std, mean/max `|a|`, active share and kurtosis of the obfuscated activation
//! are not functions of the plaintext ones (only the share of positive activations is
//! invariant, and a probe reads all statistics of a layer). LLM-Check scores are refused under approximate keys (`P P^T ≠ I`: the
//! eigenvalues change; they are not a function of `x~ Q` alone).
//!
//! In exact mode the obfuscated model's states are `x P` with `x` the plaintext states, so the
//! transformed probe's score equals the plaintext probe's up to F32 rounding. In approximate
//! modes `x~ Q` is the obfuscated model's own (perturbed) state; the score drifts as much as the
//! states do (measured in docs/haluprobe.md).
//!
//! Security note: the transformed first layer `Q W'` is given to the provider. If the
//! plaintext probe `W'` is public, the provider learns the projections `x W'` of every hidden
//! state on `W'`'s columns: one direction per hidden block for logistic regression (the
//! score's own input), but up to the first MLP width (e.g. 256 of 576) for an MLP. Keep an MLP
//! probe as secret as the key, or use logistic regression.
use crate::error::{HaluError, Result};
use crate::probe::{Net, ObfuscatedFor, ProbeFile};
use crate::store::ModelDims;
use candle_core::{DType, Device, Tensor};
use std::path::Path;
use umbra_aloepri::compiler::{check_key_for, recorded_fingerprint, special_ids};
use umbra_aloepri::statemap::StateMaps;
use umbra_aloepri::{ClientKey, ObfuscationParams};
use umbra_model::checkpoint::Checkpoint;
use umbra_model::tokenizer::TextTokenizer;
use umbra_model::LlamaConfig;

/// How a feature family transforms under the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Covariance {
    /// Hidden states: linear in the residual stream.
    Linear,
    /// Lookback ratios: one value per head, heads permuted.
    HeadPermuted,
    /// Logit features: unchanged.
    Invariant,
    /// LLM-Check scores: shifted by `ln(d/d')` (exact keys only).
    Shifted,
}

/// The family of a feature key, or an error for a key this transform does not know.
pub fn covariance(key: &str) -> Result<Covariance> {
    match key.split('.').next().unwrap_or("") {
        "hidden" => Ok(Covariance::Linear),
        "lookback" => Ok(Covariance::HeadPermuted),
        "logit" => Ok(Covariance::Invariant),
        "llmcheck" => Ok(Covariance::Shifted),
        "ffn" => Err(HaluError::Input(format!(
            "the probe reads `{key}` (FFN activation statistics), which has no transform under \
             the obfuscation key: each obfuscated FFN neuron is a permuted plaintext neuron \
             scaled by a secret factor in [1/2, 2] (in every mode), so the activation's mean, \
             spread, maxima, active share and kurtosis change; train the probe without ffn \
             features (e.g. `--select hidden:L13:generation.last`)"
        ))),
        _ => Err(HaluError::Input(format!(
            "feature `{key}` has no known transform under the obfuscation key"
        ))),
    }
}

/// Errors unless `probe` (a plaintext probe for `plain`) can be moved under keys with
/// `params`: it must match the model, not be transformed already, and read LLM-Check scores
/// only under exact keys. Cheap; run it before compiling a checkpoint.
pub fn check_transformable(
    probe: &ProbeFile,
    plain: &LlamaConfig,
    params: &ObfuscationParams,
) -> Result<()> {
    if let Some(o) = &probe.meta.obfuscated {
        return Err(HaluError::Input(format!(
            "the probe is already transformed (for key {}); start from the plaintext probe",
            o.key_fingerprint
        )));
    }
    probe.check_model(plain)?;
    for r in &probe.meta.features {
        if covariance(&r.key)? == Covariance::Shifted && !params.is_exact() {
            return Err(HaluError::Input(format!(
                "the probe reads `{}` (LLM-Check eigenvalue scores), which is not linear in the \
                 hidden states and is preserved only by exact keys; obfuscate in exact mode (no \
                 --paper or approximate knob) or train a probe without llmcheck features",
                r.key
            )));
        }
    }
    Ok(())
}

/// The probe for the obfuscated checkpoint whose config is `obf`, made with `key` from the
/// plaintext model `plain`; `maps` from [`StateMaps::regenerate`] of the same key.
pub fn transform_probe(
    probe: &ProbeFile,
    plain: &LlamaConfig,
    obf: &LlamaConfig,
    key: &ClientKey,
    maps: &StateMaps,
) -> Result<ProbeFile> {
    check_transformable(probe, plain, &key.params)?;
    let fp = recorded_fingerprint(obf).ok_or_else(|| {
        HaluError::Input("the target model is not an Umbra-obfuscated checkpoint".into())
    })?;
    key.check_matches(&fp)?;
    let (l, d, nh) = (
        plain.num_hidden_layers,
        plain.hidden_size,
        plain.num_attention_heads,
    );
    let dp = maps.d_prime;
    if maps.d != d
        || obf.hidden_size != dp
        || obf.num_hidden_layers != l
        || obf.num_attention_heads != nh
        || obf.vocab_size != plain.vocab_size
        || maps.head_perm.len() != l
    {
        return Err(HaluError::ProbeMismatch(format!(
            "the obfuscated model ({} layers, hidden {}, {} heads) does not come from the \
             plaintext model ({l} layers, hidden {d} -> {dp}, {nh} heads) under this key",
            obf.num_hidden_layers, obf.hidden_size, obf.num_attention_heads
        )));
    }
    let net = &probe.net;
    let (w0, b0) = &net.layers[0];
    let w0 = w0.to_dtype(DType::F64)?;
    let mut bias = b0.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let fan = net.input_dim();
    // Fold the standardization: W0' = W0 diag(s), b0' = b0 - W0' mu.
    let s = Tensor::from_vec(
        net.inv_std.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        (1, fan),
        &Device::Cpu,
    )?;
    let wf = w0.broadcast_mul(&s)?; // [out, F]
    let mu = Tensor::from_vec(
        net.mean.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        (fan, 1),
        &Device::Cpu,
    )?;
    let shift = wf.matmul(&mu)?.squeeze(1)?.to_vec1::<f64>()?;
    for (b, sh) in bias.iter_mut().zip(&shift) {
        *b -= sh;
    }
    let q_t = umbra_aloepri::linalg::to_tensor(&maps.q, &Device::Cpu)?.t()?; // [d, d']
    let llm_shift = (d as f64 / dp as f64).ln();
    let mut blocks: Vec<Tensor> = Vec::new();
    let mut col = 0usize;
    for r in &probe.meta.features {
        let layers: Vec<usize> = match r.layer {
            Some(li) => vec![li],
            None => (0..l).collect(),
        };
        match covariance(&r.key)? {
            Covariance::Linear => {
                for _ in &layers {
                    blocks.push(wf.narrow(1, col, d)?.matmul(&q_t)?);
                    col += d;
                }
            }
            Covariance::HeadPermuted => {
                for &li in &layers {
                    let seg = wf.narrow(1, col, nh)?.contiguous()?;
                    // New column head_perm[li][i] takes old column i.
                    let mut inv = vec![0u32; nh];
                    for (i, &j) in maps.head_perm[li].iter().enumerate() {
                        inv[j] = i as u32;
                    }
                    let idx = Tensor::from_vec(inv, nh, &Device::Cpu)?;
                    blocks.push(seg.index_select(&idx, 1)?);
                    col += nh;
                }
            }
            Covariance::Invariant => {
                let w = crate::features::LOGIT_FEATURES;
                blocks.push(wf.narrow(1, col, w)?);
                col += w;
            }
            Covariance::Shifted => {
                let seg = wf.narrow(1, col, layers.len())?;
                let sums = seg.sum(1)?.to_vec1::<f64>()?;
                for (b, sm) in bias.iter_mut().zip(&sums) {
                    *b -= llm_shift * sm;
                }
                blocks.push(seg);
                col += layers.len();
            }
        }
    }
    if col != fan {
        return Err(HaluError::FeatureMismatch(format!(
            "the probe's features cover {col} inputs, its weights take {fan}"
        )));
    }
    let w_new = Tensor::cat(&blocks, 1)?.to_dtype(DType::F32)?;
    let fan_new = w_new.dim(1)?;
    let b_new = Tensor::from_vec(
        bias.iter().map(|&b| b as f32).collect::<Vec<_>>(),
        bias.len(),
        &Device::Cpu,
    )?;
    let mut layers_new = vec![(w_new, b_new)];
    layers_new.extend(net.layers[1..].iter().cloned());
    let mut meta = probe.meta.clone();
    meta.model = ModelDims::of(obf);
    meta.obfuscated = Some(ObfuscatedFor {
        key_fingerprint: fp,
        exact: key.params.is_exact(),
        plain_hidden_size: d,
    });
    let out = ProbeFile {
        meta,
        net: Net {
            kind: net.kind,
            mean: vec![0.0; fan_new],
            inv_std: vec![1.0; fan_new],
            layers: layers_new,
        },
    };
    out.check_model(obf)?;
    Ok(out)
}

/// Summary of [`transform_probe_files`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct TransformReport {
    pub key_fingerprint: String,
    pub exact: bool,
    pub inputs_plain: usize,
    pub inputs_obfuscated: usize,
    pub seconds: f64,
}

/// The special token ids the compiler keeps fixed under `tau`, from the plaintext model's
/// loaded config and tokenizer (no weights: [`special_ids`] reads only these two parts of a
/// checkpoint, so it gets a checkpoint without tensors).
pub fn plain_special_ids(cfg: &LlamaConfig, tok: Option<&TextTokenizer>) -> Vec<u32> {
    special_ids(&Checkpoint {
        config: cfg.clone(),
        weights: Default::default(),
        tokenizer: tok.cloned(),
        source: Default::default(),
    })
}

/// Reads the plaintext probe, the plaintext model's config and tokenizer (for the special ids
/// the compiler kept fixed; its weights are not loaded), the obfuscated checkpoint's config and
/// the client key; writes the transformed probe to `out` atomically. Errors on a key for
/// another checkpoint or a probe for another model.
pub fn transform_probe_files(
    probe: &Path,
    plain_model: &Path,
    obf_model: &Path,
    key: &Path,
    out: &Path,
) -> Result<(ProbeFile, TransformReport)> {
    let t0 = std::time::Instant::now();
    let probe = ProbeFile::load(probe)?;
    let key = ClientKey::load(key)?;
    check_key_for(obf_model, &key)?;
    let (plain_cfg, plain_tok) = Checkpoint::open_config_and_tokenizer(plain_model)?;
    check_transformable(&probe, &plain_cfg, &key.params)?;
    let specials = plain_special_ids(&plain_cfg, plain_tok.as_ref());
    let (obf_cfg, _) = Checkpoint::open_config_and_tokenizer(obf_model)?;
    let maps = StateMaps::regenerate(&plain_cfg, &specials, &key)?;
    let t = transform_probe(&probe, &plain_cfg, &obf_cfg, &key, &maps)?;
    t.save(out)?;
    let report = TransformReport {
        key_fingerprint: key.fingerprint.clone(),
        exact: key.params.is_exact(),
        inputs_plain: probe.net.input_dim(),
        inputs_obfuscated: t.net.input_dim(),
        seconds: t0.elapsed().as_secs_f64(),
    };
    Ok((t, report))
}
