//! ISA, the internal-state attack: find inputs of the public plaintext model whose hidden states
//! reproduce the states the server observed for a victim prompt.
//!
//! Threat model (the paper's, after Dong et al.): the server sees the obfuscated states `S~`
//! (`[n, d']`) of a victim prompt at some layer and holds the public plaintext model and public
//! text; it does not know the key. Discrete, per-position form of the attack:
//! 1. input space: the plaintext model is run on the attacker's public text; the states of every
//!    token in context are averaged per token into centroids `C` (`[T, d]`, one per token seen);
//! 2. alignment: the observed states live in an unknown basis, so the attacker fits a map
//!    `A` (`[d', d]`, orthonormal columns) by iterative closest points — start from the plaintext
//!    basis (`A = [I; 0]`, the right guess when there is no key), then `rounds` times: assign
//!    every observed state to its nearest centroid by cosine and refit `A` by orthogonal Procrustes
//!    on unit rows;
//! 3. decoding: each observed state's `k` nearest centroids (cosine) under the final `A`.
//!
//! Cost: `rounds + 1` products `n x T x d` (SmolLM2, 8k victim tokens, 10k centroids: ~1 min).
//! Without a key (or with the victim's basis) step 3 recovers every token the attacker's text
//! contains; a secret `P` gives a basis the alignment cannot find from the identity start.
use crate::error::{AttackError, Result};
use crate::linalg::{
    from_dmatrix, nearest_k, procrustes, rows_of, select_rows, tensor, to_dmatrix,
};
use crate::states::{unit_rows, StateLayer, StateModel};
use crate::target::Target;
use candle_core::Tensor;
use nalgebra::DMatrix;
use umbra_common::progress::Progress;

/// Knobs of ISA.
#[derive(Debug, Clone)]
pub struct IsaConfig {
    pub layer: StateLayer,
    /// Iterative-closest-point refits of the alignment.
    pub rounds: usize,
    /// Candidates kept per victim token.
    pub k: usize,
}

impl Default for IsaConfig {
    fn default() -> Self {
        Self {
            layer: StateLayer::Block(0),
            rounds: 3,
            k: 10,
        }
    }
}

/// Per-token mean of `states` (`[N, d]`) over `labels`: `(centroids [T, d], token of each row)`.
pub fn centroids(states: &Tensor, labels: &[u32]) -> Result<(Tensor, Vec<u32>)> {
    let mut tokens: Vec<u32> = labels.to_vec();
    tokens.sort_unstable();
    tokens.dedup();
    let slot: std::collections::HashMap<u32, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, &t)| (t, i as u32))
        .collect();
    let (data, n, d) = rows_of(states)?;
    if n != labels.len() {
        return Err(AttackError::Input(format!(
            "{n} states but {} labels",
            labels.len()
        )));
    }
    let mut sum = vec![0f64; tokens.len() * d];
    let mut count = vec![0f64; tokens.len()];
    for (r, l) in labels.iter().enumerate() {
        let j = slot[l] as usize;
        count[j] += 1.0;
        for (acc, &v) in sum[j * d..(j + 1) * d]
            .iter_mut()
            .zip(&data[r * d..(r + 1) * d])
        {
            *acc += v as f64;
        }
    }
    let mean: Vec<f32> = sum
        .chunks(d)
        .zip(&count)
        .flat_map(|(row, &c)| row.iter().map(move |&v| (v / c.max(1.0)) as f32))
        .collect();
    Ok((tensor(mean, tokens.len(), d)?, tokens))
}

/// Runs ISA: `victim` = the obfuscated ids of the victim prompts (what the server received; it
/// observes their states by running its model), `public` = the attacker's plaintext texts.
/// Returns `k` candidates per victim token, in order.
pub fn run(
    t: &Target,
    victim: &[Vec<u32>],
    public: &[Vec<u32>],
    cfg: &IsaConfig,
) -> Result<Vec<Vec<u32>>> {
    let labels: Vec<u32> = public.iter().flatten().copied().collect();
    let x = StateModel::new(
        &t.plain_cfg,
        &t.plain_weights(cfg.layer.blocks())?,
        cfg.layer,
    )?
    .states(public)?;
    let (c, tokens) = centroids(&x, &labels)?;
    let c = unit_rows(&c)?;
    let s = unit_rows(
        &StateModel::new(&t.obf_cfg, &t.obf_weights(cfg.layer.blocks())?, cfg.layer)?
            .states(victim)?,
    )?;
    let (n, dp) = s.dims2()?;
    let d = c.dims2()?.1;
    if n == 0 || tokens.is_empty() {
        return Err(AttackError::Input(
            "ISA needs victim and public tokens".into(),
        ));
    }
    // Identity start: the observed basis is assumed to be the plaintext one.
    let mut a = DMatrix::<f64>::zeros(dp, d);
    for i in 0..dp.min(d) {
        a[(i, i)] = 1.0;
    }
    let sd = to_dmatrix(&s)?;
    let pb = Progress::new(cfg.rounds as u64, "isa align");
    for round in 0..cfg.rounds {
        let q = unit_rows(&s.matmul(&from_dmatrix(&a)?)?)?;
        let nn = nearest_k(&q, &c, 1, &|_| {})?;
        let assign: Vec<u32> = nn.iter().map(|l| l.first().map_or(0, |p| p.0)).collect();
        let target_rows = to_dmatrix(&select_rows(&c, &assign)?)?;
        let next = procrustes(&sd, &target_rows)?;
        let change = (&next - &a).norm() / (d as f64).sqrt();
        a = next;
        tracing::info!("isa: round {}: alignment moved {change:.4}", round + 1);
        pb.set_position(round as u64 + 1);
    }
    pb.finish();
    let q = unit_rows(&s.matmul(&from_dmatrix(&a)?)?)?;
    let pb = Progress::new(n as u64, "isa");
    let nn = nearest_k(&q, &c, cfg.k, &|i| pb.set_position(i as u64))?;
    pb.finish();
    Ok(nn
        .into_iter()
        .map(|l| l.into_iter().map(|(j, _)| tokens[j as usize]).collect())
        .collect())
}
