//! Block-key attack: recover the residual-stream key of an *isometric* (exact-mode) obfuscation
//! from the transformer blocks alone, then read tokens back through it.
//!
//! In exact mode (lambda 0, no C/E junk) the writers' key is an isometry `P = [U 0 0] Z`
//! (`d x d'`, `P P^T = I_d`), so the residual stream `x~ = x P` lives in the `d`-dimensional row
//! space of `P`, which the obfuscated embedding `We~ = Pi We P` spans. In an orthonormal basis
//! `Bs` (`d' x d`) of that space (top right singular vectors of `We~`), `y = x~ Bs = x G` with
//! `G` orthogonal, and the readers' key `Q = Z^T [U^T; F; D]` loses its junk rows: `Bs^T Q = G^T`.
//! If attention stays exact, then for every layer the head-summed products of the
//! (norm-folded, HF-layout) projections
//!
//! ```text
//! A_qk = sum_h q_h^T k_kv(h)      A_vo = sum_h v_kv(h)^T o_h^T        (d x d)
//! ```
//!
//! are, restricted to that space, *conjugated* by the key: `Bs^T A~ Bs = G^T A G`. Everything per head (RoPE-commuting rotations R
//! and scalings H on q/k, `U_vo` on v/o, KV-head and in-group head permutations) cancels inside
//! the products or the sums. So the symmetric parts `S_l = A_l + A_l^T` of the plaintext and the
//! obfuscated model have the same spectra, and a random mix `M = sum_l c_l S_l` (generic: distinct
//! eigenvalues although each `S_l` has rank <= 2 nkv hd) gives `G = V S W^T` from the eigenvectors
//! `V` of `M` and `W` of `Bs^T M~ Bs`, up to one sign per eigenvector. Signs come from a second mix (`s_i s_j = sign(D_ij / C_ij)` along a
//! maximum spanning tree of `|C_ij|`), the global sign from the embedding (the sign whose
//! `We~ Bs G^T` rows land closer to plaintext rows). The unkeying map is `K = Bs G^T` (`d' x d`).
//!
//! Consequences, measured in `docs/attacks.md`:
//! - full model on the server: `We~ K = Pi We`, so nearest neighbours recover tau;
//! - split mode (client keeps embedding and head, server runs the blocks under `P`): the server
//!   receives `e_t P` per token and reads `e_t` — the same nearest neighbours recover the prompt.
//!
//! The spectral mismatch between `M` and `M~` is reported: near 0 means the key is an isometry
//! (the attack applies); approximate modes (lambda > 0, junk) break the conjugation.
//! [`read_embeddings`] is the split-mode version: the server part has no embedding, so the
//! subspace comes from the embeddings the server is sent.
//!
//! Cost: `4 L` products `d x (nh hd) x d`, two symmetric eigendecompositions of size `d` and
//! two of size `d'`, and one `V x V x d` nearest-neighbour pass.
use crate::error::{AttackError, Result};
use crate::linalg::{from_dmatrix, nearest_k, to_dmatrix};
use crate::score::Recovery;
use crate::target::Target;
use crate::vote::from_lists;
use candle_core::{DType, Tensor};
use nalgebra::DMatrix;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use umbra_common::progress::Progress;

/// What the block-key attack found besides the tau estimate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BlockKeyReport {
    /// `max |lambda_i(M) - lambda_i(M~)| / max |lambda(M)|`: ~1e-9 for an isometric key.
    pub spectral_mismatch: f64,
    /// `max_l ||Q^T S_l Q - S~_l|| / ||S~_l||` over every layer's products with the recovered key.
    pub key_residual: f64,
    /// Seconds to recover the key (before the nearest-neighbour pass).
    pub key_seconds: f64,
}

impl BlockKeyReport {
    /// Adds `spectral_mismatch`, `key_residual` and `key_seconds` to an attack's extra numbers.
    pub fn record(&self, extra: &mut std::collections::BTreeMap<String, f64>) {
        extra.insert("spectral_mismatch".into(), self.spectral_mismatch);
        extra.insert("key_residual".into(), self.key_residual);
        extra.insert("key_seconds".into(), self.key_seconds);
    }
}

/// `[q, k, v, o]` -> (`sym(A_qk)`, `sym(A_vo)`), f64.
fn products(p: &[Tensor; 4], nh: usize, nkv: usize, hd: usize) -> Result<[DMatrix<f64>; 2]> {
    let [q, k, v, o] = p;
    let rep = nh / nkv;
    let expand = |t: &Tensor| -> Result<Tensor> {
        let d = t.dims2()?.1;
        // [nkv*hd, d] -> [nh*hd, d], kv head g repeated for its `rep` query heads.
        Ok(t.reshape((nkv, 1, hd, d))?
            .repeat((1, rep, 1, 1))?
            .reshape((nh * hd, d))?)
    };
    let q = q.to_dtype(DType::F64)?;
    let k = expand(&k.to_dtype(DType::F64)?)?;
    let v = expand(&v.to_dtype(DType::F64)?)?;
    let ot = o.to_dtype(DType::F64)?.t()?.contiguous()?; // [nh*hd, d]
    let qk = q.t()?.matmul(&k)?;
    let vo = v.t()?.matmul(&ot)?;
    let sym = |a: Tensor| -> Result<DMatrix<f64>> {
        let m = to_dmatrix(&a)?;
        Ok(&m + m.transpose())
    };
    Ok([sym(qk)?, sym(vo)?])
}

/// The `keep` eigenpairs of largest magnitude, sorted by value (eigenvectors as columns).
fn eig_sorted(m: DMatrix<f64>, keep: usize) -> (Vec<f64>, DMatrix<f64>) {
    let n = m.nrows();
    let e = nalgebra::SymmetricEigen::new(m);
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| e.eigenvalues[b].abs().total_cmp(&e.eigenvalues[a].abs()));
    idx.truncate(keep);
    idx.sort_by(|&a, &b| e.eigenvalues[a].total_cmp(&e.eigenvalues[b]));
    let vals = idx.iter().map(|&i| e.eigenvalues[i]).collect();
    let vecs = DMatrix::from_fn(n, keep, |r, c| e.eigenvectors[(r, idx[c])]);
    (vals, vecs)
}

/// Orthonormal basis `[d', d]` of the row space of the obfuscated embedding (the residual
/// stream's subspace); the identity when there is no expansion.
fn residual_basis(t: &Target, d: usize, dp: usize) -> Result<DMatrix<f64>> {
    if d == dp {
        return Ok(DMatrix::identity(d, d));
    }
    rows_basis(&t.obf_embed()?, d)
}

/// Orthonormal basis `[d', d]` of the span of `rows` (`[n, d']`, e.g. the input embeddings a
/// split-mode server receives): the top `d` eigenvectors of `rows^T rows`.
fn rows_basis(rows: &Tensor, d: usize) -> Result<DMatrix<f64>> {
    let dp = rows.dims2()?.1;
    if dp < d {
        return Err(AttackError::Input(format!(
            "obfuscated width {dp} below plaintext {d}"
        )));
    }
    if d == dp {
        return Ok(DMatrix::identity(d, d));
    }
    let e = rows.to_dtype(DType::F64)?;
    let gram = to_dmatrix(&e.t()?.matmul(&e)?)?;
    Ok(eig_sorted(gram, d).1)
}

/// Signs `s` with `s_i s_j C_ij ~ D_ij`, propagated along a maximum spanning tree of `|C_ij|`.
fn resolve_signs(c: &DMatrix<f64>, d: &DMatrix<f64>) -> Vec<f64> {
    let n = c.nrows();
    let mut sign = vec![0f64; n];
    let mut in_tree = vec![false; n];
    // Prim: best[j] = (weight, parent) of the heaviest edge from the tree to j.
    let mut best = vec![(-1f64, 0usize); n];
    sign[0] = 1.0;
    in_tree[0] = true;
    for j in 1..n {
        best[j] = (c[(0, j)].abs(), 0);
    }
    for _ in 1..n {
        let Some(j) = (0..n)
            .filter(|&j| !in_tree[j])
            .max_by(|&a, &b| best[a].0.total_cmp(&best[b].0))
        else {
            break;
        };
        let p = best[j].1;
        let ratio = d[(p, j)] * c[(p, j)];
        sign[j] = sign[p] * if ratio < 0.0 { -1.0 } else { 1.0 };
        in_tree[j] = true;
        for k in 0..n {
            if !in_tree[k] && c[(j, k)].abs() > best[k].0 {
                best[k] = (c[(j, k)].abs(), j);
            }
        }
    }
    sign
}

/// Recovers the unkeying map `K` (`d' x d`, as a tensor: `x = x~ K`) from the blocks and the
/// span of the obfuscated embedding; see the module docs.
pub fn recover_key(t: &Target, seed: u64) -> Result<(Tensor, BlockKeyReport)> {
    let (d, dp) = (t.plain_cfg.hidden_size, t.obf_cfg.hidden_size);
    recover_key_in(t, residual_basis(t, d, dp)?, seed)
}

/// [`recover_key`] in a given orthonormal basis `bs` (`[d', d]`) of the residual subspace.
fn recover_key_in(t: &Target, bs: DMatrix<f64>, seed: u64) -> Result<(Tensor, BlockKeyReport)> {
    let t0 = std::time::Instant::now();
    let pc = &t.plain_cfg;
    let oc = &t.obf_cfg;
    let (nh, nkv) = (pc.num_attention_heads, pc.num_kv_heads());
    if (oc.num_attention_heads, oc.num_kv_heads()) != (nh, nkv) {
        return Err(AttackError::Input(
            "the obfuscated model has other head counts; the block-key attack needs them equal"
                .into(),
        ));
    }
    let (hd, ohd) = (pc.head_dim(), oc.head_dim());
    let (d, dp) = (pc.hidden_size, oc.hidden_size);
    if dp < d {
        return Err(AttackError::Input(format!(
            "obfuscated width {dp} below plaintext {d}"
        )));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let l = t.layers();
    let mut plain = Vec::with_capacity(2 * l);
    let mut obf = Vec::with_capacity(2 * l);
    let pb = Progress::new(l as u64, "block-key products");
    for layer in 0..l {
        let [p, o] = t.attention(layer)?;
        plain.extend(products(&p, nh, nkv, hd)?);
        obf.extend(products(&o, nh, nkv, ohd)?);
        pb.set_position(layer as u64 + 1);
    }
    pb.finish();
    let coef = |rng: &mut rand_chacha::ChaCha8Rng| -> Vec<f64> {
        (0..plain.len())
            .map(|_| StandardNormal.sample(rng))
            .collect()
    };
    let (c1, c2) = (coef(&mut rng), coef(&mut rng));
    let mix = |ms: &[DMatrix<f64>], c: &[f64]| -> DMatrix<f64> {
        let n = ms[0].nrows();
        ms.iter()
            .zip(c)
            .fold(DMatrix::zeros(n, n), |acc, (m, &w)| acc + m * w)
    };
    // Restricted to the residual subspace, then scaled to unit Frobenius norm on both sides: a
    // uniform factor (the obfuscated model's constant stock-RMSNorm weight
    // `kappa = sqrt(d / d')`, folded here, which compensates the wider norm in the activations)
    // drops out.
    let unit = |m: DMatrix<f64>| {
        let n = m.norm().max(1e-300);
        m / n
    };
    if bs.shape() != (dp, d) {
        return Err(AttackError::Input(format!(
            "residual basis is {:?}, expected ({dp}, {d})",
            bs.shape()
        )));
    }
    let plain: Vec<DMatrix<f64>> = plain.into_iter().map(unit).collect();
    let obf: Vec<DMatrix<f64>> = obf.iter().map(|m| unit(bs.transpose() * m * &bs)).collect();
    let (lp, vp) = eig_sorted(mix(&plain, &c1), d);
    let (lo, wo) = eig_sorted(mix(&obf, &c1), d);
    let scale = lp.iter().fold(0f64, |a, x| a.max(x.abs())).max(1e-300);
    let spectral_mismatch = lp
        .iter()
        .zip(&lo)
        .fold(0f64, |a, (x, y)| a.max((x - y).abs()))
        / scale;
    let c = vp.transpose() * mix(&plain, &c2) * &vp;
    let dd = wo.transpose() * mix(&obf, &c2) * &wo;
    let s = resolve_signs(&c, &dd);
    let g = &vp * DMatrix::from_diagonal(&nalgebra::DVector::from_vec(s)) * wo.transpose(); // d x d
    let mut key_residual = 0f64;
    for (a, b) in plain.iter().zip(&obf) {
        let r = (g.transpose() * a * &g - b).norm() / b.norm().max(1e-300);
        key_residual = key_residual.max(r);
    }
    Ok((
        from_dmatrix(&(bs * g.transpose()))?,
        BlockKeyReport {
            spectral_mismatch,
            key_residual,
            key_seconds: t0.elapsed().as_secs_f64(),
        },
    ))
}

/// Recovers the key, fixes its global sign on the embedding, and matches `We~ K` to `We` by
/// nearest neighbours (`k` candidates per obfuscated id).
pub fn run(t: &Target, k: usize, seed: u64) -> Result<(Recovery, BlockKeyReport)> {
    let (unkey, report) = recover_key(t, seed)?;
    let back = t.obf_embed()?.matmul(&unkey)?; // [V, d]
    let nn = match_rows(t, back, k)?;
    Ok((from_lists(&nn), report))
}

/// Nearest plaintext embedding rows of unkeyed rows `back` (`[n, d]`) after fixing the key's
/// global sign (+K or -K, whichever brings a sample of rows closer to plaintext rows).
fn match_rows(t: &Target, back: Tensor, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
    let pe = t.plain_embed()?;
    let n = back.dims2()?.0;
    let sample: Vec<u32> = (0..n as u32).step_by((n / 512).max(1)).collect();
    let rows = crate::linalg::select_rows(&back, &sample)?;
    let mean_best = |x: &Tensor| -> Result<f64> {
        let nn = nearest_k(x, &pe, 1, &|_| {})?;
        Ok(nn.iter().map(|l| l[0].1 as f64).sum::<f64>() / nn.len().max(1) as f64)
    };
    let back = if mean_best(&rows.neg()?)? < mean_best(&rows)? {
        back.neg()?
    } else {
        back
    };
    let pb = Progress::new(n as u64, "block-key nn");
    let nn = nearest_k(&back, &pe, k, &|i| pb.set_position(i as u64))?;
    pb.finish();
    Ok(nn)
}

/// The split-mode server's attack: `t.obf` is the server part (blocks only) and `received` the
/// input embeddings it was sent (`[n, d']`, `e~ = e P`). The residual subspace comes from the
/// received rows, the key from the blocks, and each row is read back by nearest neighbours.
/// Returns `k` candidate plaintext ids per received row.
pub fn read_embeddings(
    t: &Target,
    received: &Tensor,
    k: usize,
    seed: u64,
) -> Result<(Vec<Vec<u32>>, BlockKeyReport)> {
    let (n, dp) = received.dims2()?;
    let d = t.plain_cfg.hidden_size;
    if dp != t.obf_cfg.hidden_size || dp < d {
        return Err(AttackError::Input(format!(
            "received rows are {dp} wide; the server part is {} and the plaintext model {d}",
            t.obf_cfg.hidden_size
        )));
    }
    if n == 0 {
        return Err(AttackError::Input("no received embeddings to read".into()));
    }
    let received = received.to_dtype(DType::F32)?;
    let bs = rows_basis(&received, d)?;
    let (unkey, report) = recover_key_in(t, bs, seed)?;
    let nn = match_rows(t, received.matmul(&unkey)?, k)?;
    Ok((
        nn.into_iter()
            .map(|l| l.into_iter().map(|(id, _)| id).collect())
            .collect(),
        report,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use umbra_aloepri::compiler::compile_in_memory;
    use umbra_aloepri::ObfuscationParams;
    use umbra_model::testing::{random_weights, tiny_config};

    fn obfuscated(params: ObfuscationParams) -> (Target, Vec<u32>) {
        let cfg = tiny_config(48, 6, 2, 3, 300);
        let w = random_weights(&cfg, 11);
        let (out, compiled) = compile_in_memory(&cfg, w.clone(), &[0], &params, 5).unwrap();
        let target = Target::from_parts(cfg, w, compiled.config, out).unwrap();
        (target, compiled.key.tau)
    }

    fn recovered(r: &Recovery, tau: &[u32]) -> f64 {
        let hit = tau
            .iter()
            .enumerate()
            .filter(|&(i, &o)| r.best(o) == Some(i as u32))
            .count();
        hit as f64 / tau.len() as f64
    }

    /// Exact keys (with and without expansion) are recovered from the blocks alone, and with
    /// them all of tau; the paper's non-isometric key breaks the conjugation.
    #[test]
    fn recovers_isometric_keys_and_fails_on_the_papers() {
        for h in [0, 8] {
            let (t, tau) = obfuscated(ObfuscationParams::exact(h));
            let (r, rep) = run(&t, 1, 3).unwrap();
            assert!(rep.spectral_mismatch < 1e-6, "h {h}: {rep:?}");
            assert!(rep.key_residual < 1e-4, "h {h}: {rep:?}");
            let got = recovered(&r, &tau);
            assert!(got > 0.99, "h {h}: recovered {got}");
        }
        let (t, tau) = obfuscated(ObfuscationParams {
            h: 8,
            alpha_e: 0.0,
            alpha_h: 0.0,
            ..ObfuscationParams::paper()
        });
        let (r, rep) = run(&t, 1, 3).unwrap();
        assert!(rep.spectral_mismatch > 1e-3, "{rep:?}");
        assert!(recovered(&r, &tau) < 0.2, "{}", recovered(&r, &tau));
    }

    /// Split mode: the server holds only the blocks and the embeddings it is sent; it still reads
    /// (nearly) every token, with and without expansion (subspace from the received rows).
    #[test]
    fn split_server_reads_the_embeddings_it_receives() {
        for h in [0, 8] {
            let (full, tau) = obfuscated(ObfuscationParams::exact(h));
            let sent: Vec<u32> = (0..600u32).map(|i| (i * 7919) % 300).collect();
            let obf_ids = Tensor::new(
                sent.iter().map(|&p| tau[p as usize]).collect::<Vec<u32>>(),
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let received = full.obf_embed().unwrap().index_select(&obf_ids, 0).unwrap();
            // The attacker's view: blocks only (no embedding, no head).
            let layers = full.layers();
            let server: umbra_model::Weights = full
                .obf_weights(layers)
                .unwrap()
                .into_iter()
                .filter(|(n, _)| n.starts_with("model.layers."))
                .collect();
            let t = Target::from_parts(
                full.plain_cfg.clone(),
                full.plain_weights(layers).unwrap(),
                full.obf_cfg.clone(),
                server,
            )
            .unwrap();
            assert!(t.obf_embed().is_err());
            let (guesses, rep) = read_embeddings(&t, &received, 1, 3).unwrap();
            let hit = guesses
                .iter()
                .zip(&sent)
                .filter(|(g, &p)| g.first() == Some(&p))
                .count();
            let got = hit as f64 / sent.len() as f64;
            assert!(got > 0.99, "h {h}: read {got} of the tokens ({rep:?})");
        }
    }
}
