//! IMA, the learned inversion attack: an inverter from hidden states to tokens, trained on the
//! attacker's own labelled states and applied to the states the server sees for victim prompts.
//!
//! Threat model (the paper's): the server runs the obfuscated model, so it sees the obfuscated
//! states `S~` (`[n, d']`) of every request at every layer, and it holds the public plaintext
//! model, the algorithm and public text. It does not know tau, so it cannot label the obfuscated
//! states of its own text with plaintext tokens; it trains the inverter on states it can label:
//! - [`Reference::OwnKey`] (default for obfuscated checkpoints): it obfuscates the public model
//!   itself with the published algorithm and knobs under a fresh key of its own (only the blocks
//!   up to the observed layer), runs that model on its own public text (ids through its own tau)
//!   and labels each state with the plaintext token;
//! - [`Reference::Plain`]: the plaintext model's states (only applicable when the observed states
//!   have the plaintext width; it is what an attacker does against an un-keyed model).
//!
//! Inverter (cheap, linear): ridge regression `M = (X^T X + r I)^-1 X^T Y` from states `X`
//! (`[N, w]`) to the plaintext embedding rows of their tokens `Y` (`[N, d]`), then per victim
//! state the `k` plaintext ids whose embedding rows are nearest by cosine to `s~ M`. The ridge
//! `r` is `ridge x tr(X^T X) / w`. Cost: `N w^2 + n V d` (SmolLM2: ~1 min).
//!
//! The inverter learns the attacker's own basis; a secret key gives the victim's states another
//! one, so it should recover nothing (the paper's 0%). With the victim's key (or no key) it
//! recovers almost everything: that is the test that the inverter itself works.
use crate::error::{AttackError, Result};
use crate::linalg::{nearest_k, select_rows, to_dmatrix};
use crate::states::{unit_rows, StateLayer, StateModel};
use crate::target::Target;
use candle_core::{DType, Tensor};
use nalgebra::DMatrix;
use umbra_aloepri::compiler::compile_in_memory;
use umbra_aloepri::ObfuscationParams;
use umbra_common::progress::Progress;
use umbra_model::{LlamaConfig, Weights};

/// Where the inverter's labelled training states come from.
#[derive(Debug, Clone)]
pub enum Reference {
    /// The public plaintext model.
    Plain,
    /// The public model obfuscated by the attacker under its own key (`seed`) with `params`.
    OwnKey {
        params: ObfuscationParams,
        seed: u64,
    },
}

/// Knobs of IMA.
#[derive(Debug, Clone)]
pub struct ImaConfig {
    pub layer: StateLayer,
    /// `None`: [`Reference::OwnKey`] with [`assumed_params`] when the observed checkpoint is an
    /// umbra one or has another width, else [`Reference::Plain`].
    pub reference: Option<Reference>,
    /// Seed of the attacker's own key.
    pub seed: u64,
    /// Relative ridge (times the mean diagonal of `X^T X`).
    pub ridge: f64,
    /// Candidates kept per victim token.
    pub k: usize,
}

impl Default for ImaConfig {
    fn default() -> Self {
        Self {
            layer: StateLayer::Block(0),
            reference: None,
            seed: 0x1a7a,
            ridge: 1e-3,
            k: 10,
        }
    }
}

/// The attacker's guess of the victim's knobs, from what the obfuscated config publishes: the
/// width gives `h = (d' - d) / 2`, the `exact` flag the mode; otherwise the paper's defaults.
pub fn assumed_params(t: &Target) -> ObfuscationParams {
    let h = t
        .obf_cfg
        .hidden_size
        .saturating_sub(t.plain_cfg.hidden_size)
        / 2;
    if t.declared_exact() {
        ObfuscationParams::exact(h)
    } else {
        ObfuscationParams {
            h,
            ..ObfuscationParams::paper()
        }
    }
}

/// The first `blocks` blocks of a model (plus embedding, final norm and head).
pub fn truncated(cfg: &LlamaConfig, w: &Weights, blocks: usize) -> (LlamaConfig, Weights) {
    let mut c = cfg.clone();
    c.num_hidden_layers = blocks.min(cfg.num_hidden_layers);
    let keep = |n: &str| match n.strip_prefix("model.layers.") {
        Some(rest) => rest
            .split('.')
            .next()
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| i < c.num_hidden_layers),
        None => true,
    };
    let w = w
        .iter()
        .filter(|(n, _)| keep(n))
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    (c, w)
}

/// The attacker's own obfuscation of the first `blocks` blocks of the public model:
/// `(config, weights, own tau forward table)`.
pub fn own_obfuscation(
    t: &Target,
    blocks: usize,
    params: &ObfuscationParams,
    seed: u64,
) -> Result<(LlamaConfig, Weights, Vec<u32>)> {
    let (cfg, w) = truncated(&t.plain_cfg, &t.plain_weights(blocks)?, blocks);
    let (out, compiled) = compile_in_memory(&cfg, w, &[], params, seed)?;
    Ok((compiled.config, out, compiled.key.tau))
}

/// Labelled reference states `([N, w], plaintext ids)` of `public` (plaintext ids).
pub fn reference_states(
    t: &Target,
    layer: StateLayer,
    reference: &Reference,
    public: &[Vec<u32>],
) -> Result<(Tensor, Vec<u32>)> {
    let labels: Vec<u32> = public.iter().flatten().copied().collect();
    let x = match reference {
        Reference::Plain => {
            StateModel::new(&t.plain_cfg, &t.plain_weights(layer.blocks())?, layer)?
                .states(public)?
        }
        Reference::OwnKey { params, seed } => {
            let blocks = match layer {
                StateLayer::Embeddings => 1,
                StateLayer::Block(i) => i + 1,
            };
            let (cfg, w, tau) = own_obfuscation(t, blocks, params, *seed)?;
            let own: Vec<Vec<u32>> = public
                .iter()
                .map(|s| s.iter().map(|&i| tau[i as usize]).collect())
                .collect();
            StateModel::new(&cfg, &w, layer)?.states(&own)?
        }
    };
    Ok((x, labels))
}

/// F64 nalgebra `a^T b` computed by candle (`a`: `[n, p]`, `b`: `[n, q]`).
pub fn gram(a: &Tensor, b: &Tensor) -> Result<DMatrix<f64>> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    to_dmatrix(&a.t()?.matmul(&b)?)
}

/// Ridge map `M` (`[w, q]`) with `x M ~ y`, `r = ridge x mean diag(x^T x)`.
pub fn ridge_map(x: &Tensor, y: &Tensor, ridge: f64) -> Result<Tensor> {
    let xtx = gram(x, x)?;
    let xty = gram(x, y)?;
    let w = xtx.nrows();
    let r = ridge * xtx.trace() / w.max(1) as f64;
    let a = xtx + DMatrix::<f64>::identity(w, w) * r.max(1e-12);
    let m = a
        .cholesky()
        .map(|c| c.solve(&xty))
        .ok_or_else(|| AttackError::Input("IMA ridge system is not positive definite".into()))?;
    crate::linalg::from_dmatrix(&m)
}

/// The `k` plaintext ids whose embedding rows are nearest by cosine to each row of `pred`.
pub fn decode_embeddings(t: &Target, pred: &Tensor, k: usize, what: &str) -> Result<Vec<Vec<u32>>> {
    let e = unit_rows(&t.plain_embed()?)?;
    let q = unit_rows(pred)?;
    let n = q.dims2()?.0;
    let pb = Progress::new(n as u64, what);
    let nn = nearest_k(&q, &e, k, &|i| pb.set_position(i as u64))?;
    pb.finish();
    Ok(nn
        .into_iter()
        .map(|l| l.into_iter().map(|(i, _)| i).collect())
        .collect())
}

/// Runs IMA: `victim` = the obfuscated ids of the victim prompts (what the server received),
/// `public` = the attacker's plaintext texts. Returns `k` candidates per victim token, in order.
pub fn run(
    t: &Target,
    victim: &[Vec<u32>],
    public: &[Vec<u32>],
    cfg: &ImaConfig,
) -> Result<Vec<Vec<u32>>> {
    let reference = cfg.reference.clone().unwrap_or_else(|| {
        let umbra = t
            .obf_cfg
            .extra
            .contains_key(umbra_aloepri::compiler::CONFIG_SECTION);
        if umbra || t.obf_cfg.hidden_size != t.plain_cfg.hidden_size {
            Reference::OwnKey {
                params: assumed_params(t),
                seed: cfg.seed,
            }
        } else {
            Reference::Plain
        }
    });
    tracing::info!("ima: reference {reference:?}");
    let (x, labels) = reference_states(t, cfg.layer, &reference, public)?;
    let s = StateModel::new(&t.obf_cfg, &t.obf_weights(cfg.layer.blocks())?, cfg.layer)?
        .states(victim)?;
    let (xw, sw) = (x.dims2()?.1, s.dims2()?.1);
    if xw != sw {
        return Err(AttackError::Input(format!(
            "IMA: reference states have width {xw}, observed states {sw} (use the own-key reference)"
        )));
    }
    let y = select_rows(&t.plain_embed()?, &labels)?;
    let m = ridge_map(&x, &y, cfg.ridge)?;
    tracing::info!(
        "ima: inverter fitted on {} states of width {xw}",
        labels.len()
    );
    decode_embeddings(t, &s.matmul(&m)?, cfg.k, "ima")
}
