//! LLM-Check's hidden score (Sriramanan et al., 2024): the mean log-eigenvalue of the
//! covariance of an answer's hidden states, one number per layer (`llmcheck.generation`).

/// LLM-Check hidden score: mean `log λ` over the `m-1` largest eigenvalues of `Z_c Z_c^T / d`
/// (`Z_c`: the `m` rows of `z` centered; rank `m-1`). 0 for a single row.
pub fn llmcheck_score(z: &[&[f32]]) -> f32 {
    let m = z.len();
    if m < 2 {
        return 0.0;
    }
    let d = z[0].len();
    let mut mu = vec![0f64; d];
    for r in z {
        for (a, x) in mu.iter_mut().zip(r.iter()) {
            *a += *x as f64 / m as f64;
        }
    }
    let c: Vec<Vec<f64>> = z
        .iter()
        .map(|r| r.iter().zip(&mu).map(|(x, u)| *x as f64 - u).collect())
        .collect();
    let mut g = vec![0f64; m * m];
    for i in 0..m {
        for j in i..m {
            let s: f64 = c[i].iter().zip(&c[j]).map(|(a, b)| a * b).sum::<f64>() / d as f64;
            g[i * m + j] = s;
            g[j * m + i] = s;
        }
    }
    let mut ev = jacobi_eigenvalues(&mut g, m);
    ev.sort_by(|a, b| b.total_cmp(a));
    let k = m - 1;
    (ev[..k].iter().map(|l| l.max(1e-12).ln()).sum::<f64>() / k as f64) as f32
}

/// Eigenvalues of a symmetric `m x m` matrix (row-major, destroyed) by cyclic Jacobi sweeps.
fn jacobi_eigenvalues(a: &mut [f64], m: usize) -> Vec<f64> {
    for _sweep in 0..60 {
        let off: f64 = (0..m)
            .flat_map(|i| (0..m).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * m + j] * a[i * m + j])
            .sum();
        let diag: f64 = (0..m).map(|i| a[i * m + i] * a[i * m + i]).sum();
        if off <= 1e-22 * diag.max(1e-300) {
            break;
        }
        for p in 0..m {
            for q in p + 1..m {
                let apq = a[p * m + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * m + q] - a[p * m + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let cs = 1.0 / (t * t + 1.0).sqrt();
                let sn = t * cs;
                for k in 0..m {
                    let akp = a[k * m + p];
                    let akq = a[k * m + q];
                    a[k * m + p] = cs * akp - sn * akq;
                    a[k * m + q] = sn * akp + cs * akq;
                }
                for k in 0..m {
                    let apk = a[p * m + k];
                    let aqk = a[q * m + k];
                    a[p * m + k] = cs * apk - sn * aqk;
                    a[q * m + k] = sn * apk + cs * aqk;
                }
            }
        }
    }
    (0..m).map(|i| a[i * m + i]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_matches_known_spectrum() {
        // [[2,1],[1,2]] has eigenvalues 1 and 3.
        let mut a = vec![2.0, 1.0, 1.0, 2.0];
        let mut ev = jacobi_eigenvalues(&mut a, 2);
        ev.sort_by(|a, b| a.total_cmp(b));
        assert!(
            (ev[0] - 1.0).abs() < 1e-9 && (ev[1] - 3.0).abs() < 1e-9,
            "{ev:?}"
        );
    }

    #[test]
    fn llmcheck_two_rows_is_log_of_half_squared_distance() {
        // Two rows x, y: centered gram / d has one non-zero eigenvalue |x-y|^2 / (2d).
        let x = [1.0f32, 0.0, 0.0, 0.0];
        let y = [0.0f32, 3.0, 0.0, 0.0];
        let s = llmcheck_score(&[&x, &y]);
        let want = (10.0f64 / 2.0 / 4.0).ln() as f32;
        assert!((s - want).abs() < 1e-5, "{s} vs {want}");
    }
}
