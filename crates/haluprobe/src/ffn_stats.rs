//! FFN activation statistics (the `ffn.*` feature family): each token's SwiGLU activation
//! `a = silu(gate(h)) ⊙ up(h)` (`F = intermediate_size` values, [`umbra_model::TapPoint::Ffn`])
//! reduced to [`FFN_STAT_NAMES`], then averaged per stage.
use crate::error::{HaluError, Result};
use crate::keys::{FFN_ACTIVE_THRESHOLD, FFN_KEYS, FFN_STATS};
use candle_core::Tensor;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::FFN_STAT_NAMES;
    use std::collections::BTreeMap;

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
}
