//! The hat attack (new, key-free; not in the paper): column-space matching of the LM heads.
//!
//! The obfuscated head is `Wh~ = Pi Wh*' Q^T` (HF rows; `Q^T`: `d x d'`, rank d). Whatever the
//! key, `Q^T` is injective on row space, so the column space of `Wh~` is `Pi` times that of
//! `Wh*'`, and the hat matrix `H~ = Wh~ (Wh~^T Wh~)^+ Wh~^T = U~ U~^T` equals `Pi H Pi^T` (exact
//! mode) or a small perturbation of it (head noise `alpha_h`). The attack:
//! 1. orthonormal bases `U` (`V x d`) of the plaintext head (with noise simulated at the published
//!    `alpha_h`, drawn by the attacker) and `U~` of the obfuscated head ([`column_basis`]);
//! 2. bootstrap: sort-signatures of hat rows `U_i U^T` (largest and smallest entries), nearest
//!    neighbours from a pool of obfuscated rows to all plaintext rows, keep the `anchors` most
//!    confident pairs (largest second/first distance ratio);
//! 3. an orthogonal Procrustes fit `U~ O ~ U` on the anchors (trimmed: the worst residuals are
//!    dropped and the fit repeated), then nearest neighbours of `U~ O` among the rows of `U`;
//! 4. `rounds` refinements: a ridge fit `U~ M ~ U` on all confident, unique matches and a new
//!    nearest-neighbour pass.
//!
//! Cost: one `V x d'^2` Gram per head, `(V + pool) x V x d` for signatures, `V x V x 2 top` for
//! the bootstrap match and `V x V x d` per round (SmolLM2: about 3 + 0.5 + 2.8 per round TFLOP).
//! At vocabulary scale (Qwen2.5, V 151,936) the signatures use the `columns` rows of largest
//! leverage instead of all V and the matching passes shortlist in a random projection
//! ([`crate::linalg::nearest_k`]): about `(V + pool) x columns x d` + `V x V x 96` per round.
use crate::error::{AttackError, Result};
use crate::linalg::{
    column_basis, dm_rows, from_dmatrix, nearest_k, procrustes, ridge, row_signatures, select_rows,
    tensor, to_dmatrix, top_k_indices,
};
use crate::score::Recovery;
use crate::target::Target;
use crate::vote::from_lists;
use candle_core::Tensor;
use nalgebra::DMatrix;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use umbra_common::progress::Progress;

#[derive(Debug, Clone)]
pub struct HatConfig {
    /// Entries kept from each end of a sorted hat row.
    pub top: usize,
    /// Obfuscated rows whose signatures are computed for the bootstrap.
    pub pool: usize,
    /// Bootstrap pairs kept for the first fit.
    pub anchors: usize,
    /// Head noise the attacker simulates on the plaintext head (the published `alpha_h`).
    pub assume_alpha_h: f64,
    /// Ridge refinement rounds after the Procrustes fit.
    pub rounds: usize,
    /// Candidates kept per obfuscated id.
    pub k: usize,
    pub seed: u64,
    /// Hat-row signatures over this many columns: the rows of largest leverage `||U_i||^2` (a
    /// key-free invariant). `None`: all V columns, or 4096 when a full `V x V` signature pass
    /// exceeds [`crate::linalg::PROJECT_ABOVE`] (0.5B/1.5B vocabularies).
    pub columns: Option<usize>,
}

impl Default for HatConfig {
    fn default() -> Self {
        Self {
            top: 16,
            pool: 8192,
            anchors: 2000,
            assume_alpha_h: 0.2,
            rounds: 2,
            k: 10,
            seed: 0,
            columns: None,
        }
    }
}

/// Result: candidates plus the bootstrap anchors `(obfuscated id, plaintext id)` (for scoring).
pub struct HatOutput {
    pub recovery: Recovery,
    pub anchors: Vec<(u32, u32)>,
}

/// `x + alpha * std(x) * N(0, 1)`, seeded (the attacker's own draw of the published noise).
pub fn simulate_noise(x: &Tensor, alpha: f64, seed: u64) -> Result<Tensor> {
    if alpha == 0.0 {
        return Ok(x.clone());
    }
    let (mut v, r, c) = crate::linalg::rows_of(x)?;
    let n = v.len().max(1) as f64;
    let mean = v.iter().map(|&a| a as f64).sum::<f64>() / n;
    let var = v.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / n;
    let s = alpha * var.sqrt();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    for a in v.iter_mut() {
        let z: f64 = StandardNormal.sample(&mut rng);
        *a += (z * s) as f32;
    }
    tensor(v, r, c)
}

/// Confident, unique pairs from nearest-neighbour lists: sorted by the ratio of the second to the
/// first distance, each plaintext id used once, at most `keep`.
fn confident_pairs(queries: &[u32], nn: &[Vec<(u32, f32)>], keep: usize) -> Vec<(u32, u32)> {
    let mut scored: Vec<(f32, u32, u32)> = queries
        .iter()
        .zip(nn)
        .filter_map(|(&q, l)| {
            let first = l.first()?;
            let ratio = match l.get(1) {
                Some(s) => s.1 / first.1.max(1e-12),
                None => f32::INFINITY,
            };
            Some((ratio, q, first.0))
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut used = std::collections::HashSet::new();
    let mut out = vec![];
    for (_, q, p) in scored {
        if used.insert(p) {
            out.push((q, p));
            if out.len() == keep {
                break;
            }
        }
    }
    out
}

/// Trimmed Procrustes: fit, drop the worst 30% residuals, refit (three times).
fn trimmed_procrustes(x: &DMatrix<f64>, y: &DMatrix<f64>) -> Result<DMatrix<f64>> {
    let mut idx: Vec<usize> = (0..x.nrows()).collect();
    let mut o = procrustes(x, y)?;
    for _ in 0..3 {
        let r = x * &o - y;
        let mut res: Vec<(f64, usize)> = (0..x.nrows())
            .map(|i| (r.row(i).norm_squared(), i))
            .collect();
        res.sort_by(|a, b| a.0.total_cmp(&b.0));
        idx = res
            .iter()
            .take((res.len() * 7 / 10).max(x.ncols()))
            .map(|p| p.1)
            .collect();
        o = procrustes(&dm_rows(x, &idx), &dm_rows(y, &idx))?;
    }
    tracing::debug!("procrustes kept {} anchors", idx.len());
    Ok(o)
}

/// Runs the hat attack.
pub fn run(t: &Target, cfg: &HatConfig) -> Result<HatOutput> {
    let v = t.vocab();
    let d = t.plain_cfg.hidden_size;
    let raw = t.plain_head_raw()?;
    let ph = t.fold_final_norm(&raw)?;
    let u_p = column_basis(&ph, d)?;
    let u_sim = if cfg.assume_alpha_h > 0.0 {
        let sim = simulate_noise(&raw, cfg.assume_alpha_h, cfg.seed ^ 0x5eed)?;
        column_basis(&t.fold_final_norm(&sim)?, d)?
    } else {
        u_p.clone()
    };
    let oh = t.obf_head()?;
    if oh.dims2()?.1 < d {
        return Err(AttackError::Input(format!(
            "obfuscated head is narrower ({}) than the plaintext hidden size {d}",
            oh.dims2()?.1
        )));
    }
    let u_o = column_basis(&oh, d)?;
    tracing::info!("hat: bases done");

    // Bootstrap from hat-row signatures.
    let pool: Vec<u32> = {
        let mut ids: Vec<u32> = (0..v as u32).collect();
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(cfg.seed);
        use rand::seq::SliceRandom;
        ids.shuffle(&mut rng);
        ids.truncate(cfg.pool.min(v));
        ids
    };
    // Signature columns: all of them, or at vocabulary scale the rows of largest leverage on
    // each side (the hat matrix's diagonal is invariant: H~[tau(i), tau(i)] = H[i, i]).
    let columns = cfg.columns.or_else(|| {
        ((v as f64) * (v as f64) * (d as f64) > crate::linalg::PROJECT_ABOVE).then_some(4096)
    });
    let cols = |u: &Tensor| -> Result<Tensor> {
        match columns {
            None => Ok(u.clone()),
            Some(n) => {
                let lev = u.sqr()?.sum(1)?.to_vec1::<f32>()?;
                select_rows(u, &top_k_indices(&lev, n.clamp(2 * cfg.top, v)))
            }
        }
    };
    let pb = Progress::new((v + 2 * pool.len()) as u64, "hat signatures");
    let sp = row_signatures(&u_sim, &cols(&u_sim)?, cfg.top, &|n| {
        pb.set_position(n as u64)
    })?;
    let uo_pool = select_rows(&u_o, &pool)?;
    let so = row_signatures(&uo_pool, &cols(&u_o)?, cfg.top, &|n| {
        pb.set_position((v + n) as u64)
    })?;
    let c = 2 * cfg.top;
    let sp = tensor(sp, v, c)?;
    let so = tensor(so, pool.len(), c)?;
    let nn = nearest_k(&so, &sp, 2, &|n| {
        pb.set_position((v + pool.len() + n) as u64)
    })?;
    pb.finish();
    let anchors = confident_pairs(&pool, &nn, cfg.anchors);
    if anchors.len() < d {
        return Err(AttackError::Input(format!(
            "only {} bootstrap anchors for a {d}-dimensional fit",
            anchors.len()
        )));
    }
    tracing::info!("hat: {} anchors", anchors.len());

    let uo64 = to_dmatrix(&u_o)?;
    let up64 = to_dmatrix(&u_p)?;
    let rows = |m: &DMatrix<f64>, ids: &[u32]| {
        dm_rows(m, &ids.iter().map(|&i| i as usize).collect::<Vec<_>>())
    };
    let (aq, ap): (Vec<u32>, Vec<u32>) = anchors.iter().copied().unzip();
    let mut map = trimmed_procrustes(&rows(&uo64, &aq), &rows(&up64, &ap))?;
    let all: Vec<u32> = (0..v as u32).collect();
    let mut lists;
    let mut round = 0;
    loop {
        let x = u_o.matmul(&from_dmatrix(&map)?)?;
        let pb = Progress::new(v as u64, &format!("hat match {round}"));
        lists = nearest_k(&x, &u_p, cfg.k.max(2), &|n| pb.set_position(n as u64))?;
        pb.finish();
        if round == cfg.rounds {
            break;
        }
        let pairs = confident_pairs(&all, &lists, v / 2);
        let (q, p): (Vec<u32>, Vec<u32>) = pairs.into_iter().unzip();
        map = ridge(&rows(&uo64, &q), &rows(&up64, &p), 1e-6)?;
        round += 1;
    }
    for l in lists.iter_mut() {
        l.truncate(cfg.k);
    }
    Ok(HatOutput {
        recovery: from_lists(&lists),
        anchors,
    })
}
