//! IA, invariant attacks (Lin et al., EMNLP'24): per-token features that the keys cannot change.
//!
//! For an embedding row `e` (plaintext `We[i]`, obfuscated `We~[tau(i)] = e* P`) and a layer `l`:
//! - Gate-IA: mean and standard deviation over the FFN neurons of `e Wgate_l'` — the obfuscated
//!   product is `e* Wgate_l' Z_f` (`P Q = I`), a permutation of the plaintext one;
//! - Attn-IA: the position-0 self score `sum_heads (e Wq_h)(e Wk_g(h))^T` — `R H Zb` and
//!   `R H^-1 Zb` cancel in the product and head permutations only reorder the sum.
//!
//! Features of the chosen layers are standardised (plaintext column statistics) and matched by
//! nearest neighbour. Only embedding noise (`alpha_e`) protects. Cost: `2 V d^2` per layer and
//! side (the features are quadratic forms of the embedding rows), plus `V x V x 3L` for matching.
use crate::error::{AttackError, Result};
use crate::linalg::{nearest_k, tensor, CHUNK};
use crate::score::Recovery;
use crate::target::Target;
use crate::vote::from_lists;
use candle_core::{DType, Tensor};
use umbra_common::progress::Progress;

#[derive(Debug, Clone)]
pub struct IaConfig {
    pub layers: Vec<usize>,
    pub k: usize,
}

/// One layer's feature maps: the mean row of `Wgate` (`[d]`), and `[G | A]` (`[d, 2d]`) with
/// `G = Wgate^T Wgate / ffn` and `A = sum_h Wq_h^T Wk_g(h)`, so that for an embedding row `e`:
/// mean = `e . m`, second moment = `e G e^T`, self score = `e A e^T`.
struct LayerForms {
    mean: Tensor,
    forms: Tensor,
}

fn layer_forms(g: &Tensor, q: &Tensor, k: &Tensor, groups: usize, hd: usize) -> Result<LayerForms> {
    let (ffn, d) = g.dims2()?;
    let (nq, _) = q.dims2()?;
    let (nk, _) = k.dims2()?;
    let (nh, nkv) = (nq / hd, nk / hd);
    if nh != nkv * groups || nq != nh * hd || nk != nkv * hd {
        return Err(AttackError::Input(
            "q/k head counts do not match the config".into(),
        ));
    }
    let g64 = g.to_dtype(DType::F64)?;
    let mean = g64.mean(0)?.to_dtype(DType::F32)?;
    let gram = (g64.t()?.matmul(&g64)? / ffn as f64)?;
    // Repeat each kv head's rows over its query group: [nkv, 1, hd, d] -> [nh*hd, d].
    let kexp = k
        .to_dtype(DType::F64)?
        .reshape((nkv, 1, hd, d))?
        .broadcast_as((nkv, groups, hd, d))?
        .reshape((nh * hd, d))?;
    let a = q.to_dtype(DType::F64)?.t()?.matmul(&kexp)?;
    let forms = Tensor::cat(&[&gram, &a], 1)?.to_dtype(DType::F32)?;
    Ok(LayerForms { mean, forms })
}

/// `[V, 3 L]` features: per layer mean and std of `e Wgate^T` over the FFN neurons, and the
/// position-0 self score `sum_h (e Wq_h)(e Wk_g(h))^T`, computed as quadratic forms of the
/// embedding rows (`2 V d^2` multiply-adds per layer instead of `V d (ffn + q + k)`; the same
/// numbers up to rounding).
fn features(embed: &Tensor, layers: &[LayerForms], progress: &dyn Fn(usize)) -> Result<Vec<f32>> {
    let (v, d) = embed.dims2()?;
    let nl = layers.len();
    let mut out = vec![0f32; v * 3 * nl];
    let mut start = 0;
    while start < v {
        let len = (4 * CHUNK).min(v - start);
        let e = embed.narrow(0, start, len)?.to_dtype(DType::F32)?;
        for (l, f) in layers.iter().enumerate() {
            let mean = e
                .matmul(&f.mean.unsqueeze(1)?)?
                .squeeze(1)?
                .to_vec1::<f32>()?;
            let ef = e.matmul(&f.forms)?; // [len, 2d]
            let second = (ef.narrow(1, 0, d)? * &e)?.sum(1)?.to_vec1::<f32>()?;
            let score = (ef.narrow(1, d, d)? * &e)?.sum(1)?.to_vec1::<f32>()?;
            for r in 0..len {
                let base = (start + r) * 3 * nl + 3 * l;
                out[base] = mean[r];
                out[base + 1] = (second[r] - mean[r] * mean[r]).max(0.0).sqrt();
                out[base + 2] = score[r];
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
        plain_l.push(layer_forms(&pg, &pq, &pk, nh / nkv, hd)?);
        obf_l.push(layer_forms(&og, &oq, &ok, nh / nkv, hd)?);
    }
    let pb = Progress::new((3 * v) as u64, "ia");
    let fp = features(&t.plain_embed()?, &plain_l, &|n| pb.set_position(n as u64))?;
    let fo = features(&t.obf_embed()?, &obf_l, &|n| {
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
    pb.finish();
    Ok(from_lists(&nn))
}
