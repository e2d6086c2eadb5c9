//! IA, invariant attacks (Lin et al., EMNLP'24): per-token features that the keys cannot change.
//!
//! For an embedding row `e` (plaintext `We[i]`, obfuscated `We~[tau(i)] = e* P`) and a layer `l`:
//! - Gate-IA: mean and standard deviation over the FFN neurons of `e Wgate_l'` — the obfuscated
//!   product is `e* Wgate_l' Z_f` (`P Q = I`), a permutation of the plaintext one;
//! - Attn-IA: the position-0 self score `sum_heads (e Wq_h)(e Wk_g(h))^T` — `R H Zb` and
//!   `R H^-1 Zb` cancel in the product and head permutations only reorder the sum.
//!
//! Features of the chosen layers are standardised (plaintext column statistics) and matched by
//! nearest neighbour. Only embedding noise (`alpha_e`) protects. Cost: `V x d x (d_ffn + q + k)`
//! per layer and side, plus `V x V x 3L` for matching.
use crate::error::{AttackError, Result};
use crate::linalg::{nearest_k, tensor, CHUNK};
use crate::progress::bar;
use crate::score::Recovery;
use crate::target::Target;
use crate::vote::from_lists;
use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct IaConfig {
    pub layers: Vec<usize>,
    pub k: usize,
}

/// `[V, 3 L]` features: per layer mean and std of `e Wgate^T`, and the self score.
fn features(
    embed: &Tensor,
    per_layer: &[(Tensor, Tensor, Tensor)],
    groups: usize,
    hd: usize,
    progress: &dyn Fn(usize),
) -> Result<Vec<f32>> {
    let (v, _) = embed.dims2()?;
    let nl = per_layer.len();
    let mut out = vec![0f32; v * 3 * nl];
    let mut start = 0;
    while start < v {
        let len = (4 * CHUNK).min(v - start);
        let e = embed.narrow(0, start, len)?;
        for (l, (g, q, k)) in per_layer.iter().enumerate() {
            let gv = e.matmul(&g.t()?)?;
            let mean = gv.mean(1)?.to_vec1::<f32>()?;
            let var = gv.broadcast_sub(&gv.mean_keepdim(1)?)?.sqr()?.mean(1)?;
            let std = var.sqrt()?.to_vec1::<f32>()?;
            let qv = e.matmul(&q.t()?)?; // [len, nh*hd]
            let kv = e.matmul(&k.t()?)?; // [len, nkv*hd]
            let nkv = kv.dims2()?.1 / hd;
            let nh = qv.dims2()?.1 / hd;
            if nh != nkv * groups {
                return Err(AttackError::Input(
                    "q/k head counts do not match the config".into(),
                ));
            }
            // Repeat each kv head over its query group: [len, nkv, 1, hd] -> [len, nh*hd].
            let kr = kv
                .reshape((len, nkv, 1, hd))?
                .broadcast_as((len, nkv, groups, hd))?
                .reshape((len, nh * hd))?;
            let s = (qv * kr)?.sum(1)?.to_vec1::<f32>()?;
            for r in 0..len {
                let base = (start + r) * 3 * nl + 3 * l;
                out[base] = mean[r];
                out[base + 1] = std[r];
                out[base + 2] = s[r];
            }
        }
        start += len;
        progress(start);
    }
    Ok(out)
}

/// Runs IA over `cfg.layers`.
pub fn run(t: &Target, cfg: &IaConfig) -> Result<Recovery> {
    if cfg.layers.is_empty() {
        return Err(AttackError::Input("IA needs at least one layer".into()));
    }
    let v = t.vocab();
    let nh = t.plain_cfg.num_attention_heads;
    let nkv = t.plain_cfg.num_kv_heads();
    let hd = t.plain_cfg.head_dim();
    let mut plain_l = vec![];
    let mut obf_l = vec![];
    for &l in &cfg.layers {
        if l >= t.layers() {
            return Err(AttackError::Input(format!(
                "layer {l} out of range (the model has {})",
                t.layers()
            )));
        }
        let (pg, og) = t.gate(l)?;
        let [pq, pk, oq, ok] = t.qk(l)?;
        plain_l.push((pg, pq, pk));
        obf_l.push((og, oq, ok));
    }
    let pb = bar(3 * v, "ia");
    let fp = features(&t.plain_embed()?, &plain_l, nh / nkv, hd, &|n| {
        pb.set_position(n as u64)
    })?;
    let fo = features(&t.obf_embed()?, &obf_l, nh / nkv, hd, &|n| {
        pb.set_position((v + n) as u64)
    })?;
    let c = 3 * cfg.layers.len();
    // Standardise every feature column by the plaintext statistics.
    let mut mean = vec![0f64; c];
    let mut sq = vec![0f64; c];
    for r in 0..v {
        for j in 0..c {
            let x = fp[r * c + j] as f64;
            mean[j] += x;
            sq[j] += x * x;
        }
    }
    let stdz: Vec<(f32, f32)> = (0..c)
        .map(|j| {
            let m = mean[j] / v as f64;
            let s = (sq[j] / v as f64 - m * m).max(1e-24).sqrt();
            (m as f32, s as f32)
        })
        .collect();
    let z = |f: Vec<f32>| -> Vec<f32> {
        f.iter()
            .enumerate()
            .map(|(i, &x)| (x - stdz[i % c].0) / stdz[i % c].1)
            .collect()
    };
    let fp = tensor(z(fp), v, c)?;
    let fo = tensor(z(fo), v, c)?;
    let nn = nearest_k(&fo, &fp, cfg.k, &|n| pb.set_position((2 * v + n) as u64))?;
    pb.finish_and_clear();
    Ok(from_lists(&nn))
}
