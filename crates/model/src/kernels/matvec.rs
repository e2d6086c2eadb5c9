//! Few-row matrix products for decode steps: `y = x W^T` with `x` `[m, k]` (a handful of rows,
//! one per sequence in the batch) and `W` `[n, k]` row-major (HF's `[out, in]` layout).
//!
//! A decode step is memory-bound: every weight is read once per step whatever the batch. The
//! kernel therefore streams each weight row once and dots it with all `m` input rows while it
//! sits in L1, in a 4 (weight rows) x 2 (input rows) AVX2/FMA register block; the inputs
//! (`m * k` floats) stay in L2. One input row (`m = 1`) streams one weight row at a time with
//! four accumulators instead (a single sequential stream is what the hardware prefetcher reads
//! fastest). Output columns are split across the persistent pool ([`super::pool`]) when the
//! product is large enough. Without AVX2/FMA a portable path does the same loop with the
//! 32-lane dot product.
//!
//! General BLAS kernels (gemm) pack the weight panel on every call, which at `m` of 2..32 costs
//! more than the product itself; this path is what makes batched decoding cheaper per token
//! than single-sequence decoding.
use super::has_avx2_fma;
use super::pool::{parallel_for, SharedMut};

/// Columns per parallel grain (a multiple of 4).
const GRAIN: usize = 16;

/// `y[r, j] = sum_c x[r, c] * w[j, c]` for `r < m`, `j < n`; `x`: `m * k`, `w`: `n * k`,
/// `y`: `m * n`, all row-major. `parallel` splits the columns across the pool's threads.
///
/// Returns `false` (and leaves `y` untouched) when the slice lengths do not match the shapes.
pub fn matmul_rows(
    x: &[f32],
    m: usize,
    w: &[f32],
    n: usize,
    k: usize,
    y: &mut [f32],
    parallel: bool,
) -> bool {
    if x.len() != m * k || w.len() != n * k || y.len() != m * n {
        return false;
    }
    if m == 0 || n == 0 {
        return true;
    }
    let out = SharedMut::new(y);
    parallel_for(n, GRAIN, parallel, |cols| {
        columns(x, m, w, k, cols.start, cols.end, &out, n)
    });
    true
}

/// Columns `j0..j1` of the product into `out` (`m` rows of stride `ld`; `out` is `y` itself:
/// column `j` of row `r` at `r * ld + j`). Callers hand each column to one thread only.
#[allow(clippy::too_many_arguments)]
fn columns(
    x: &[f32],
    m: usize,
    w: &[f32],
    k: usize,
    j0: usize,
    j1: usize,
    out: &SharedMut<f32>,
    ld: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: AVX2 and FMA were detected at run time; slice bounds are checked by the caller
        // (`x`: m*k, `w`: covers rows j0..j1 of k, `out`: m rows of `ld >= j1`), and columns
        // j0..j1 are this call's alone.
        unsafe {
            if m == 1 {
                avx2::row_stream(x, w, k, j0, j1, out)
            } else {
                avx2::columns(x, m, w, k, j0, j1, out, ld)
            }
        };
        return;
    }
    for j in j0..j1 {
        let wr = &w[j * k..(j + 1) * k];
        for r in 0..m {
            // SAFETY: column j is this call's alone; r * ld + j < m * ld.
            unsafe { out.write(r * ld + j, super::dot(&x[r * k..(r + 1) * k], wr)) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::SharedMut;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_hadd_ps(s, s);
        let s = _mm_hadd_ps(s, s);
        _mm_cvtss_f32(s)
    }

    /// Scalar tail of a dot product over `k8..k`.
    #[inline(always)]
    fn tail(a: &[f32], b: &[f32], k8: usize) -> f32 {
        a[k8..].iter().zip(&b[k8..]).map(|(p, q)| p * q).sum()
    }

    /// `m = 1`: one weight row at a time, four accumulators over 32 floats.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row_stream(
        x: &[f32],
        w: &[f32],
        k: usize,
        j0: usize,
        j1: usize,
        out: &SharedMut<f32>,
    ) {
        let k32 = k / 32 * 32;
        let k8 = k / 8 * 8;
        let xp = x.as_ptr();
        for j in j0..j1 {
            let w0 = w.as_ptr().add(j * k);
            let mut a = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c < k32 {
                for (t, acc) in a.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(
                        _mm256_loadu_ps(xp.add(c + 8 * t)),
                        _mm256_loadu_ps(w0.add(c + 8 * t)),
                        *acc,
                    );
                }
                c += 32;
            }
            while c < k8 {
                a[0] =
                    _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(c)), _mm256_loadu_ps(w0.add(c)), a[0]);
                c += 8;
            }
            let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            out.write(j, hsum(s) + tail(x, &w[j * k..(j + 1) * k], k8));
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn columns(
        x: &[f32],
        m: usize,
        w: &[f32],
        k: usize,
        j0: usize,
        j1: usize,
        out: &SharedMut<f32>,
        ld: usize,
    ) {
        let k8 = k / 8 * 8;
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        let mut j = j0;
        while j + 4 <= j1 {
            let w0 = wp.add(j * k);
            let (w1, w2, w3) = (w0.add(k), w0.add(2 * k), w0.add(3 * k));
            let mut r = 0;
            while r + 2 <= m {
                let (x0, x1) = (xp.add(r * k), xp.add((r + 1) * k));
                let mut acc = [_mm256_setzero_ps(); 8];
                let mut c = 0;
                while c < k8 {
                    let a0 = _mm256_loadu_ps(x0.add(c));
                    let a1 = _mm256_loadu_ps(x1.add(c));
                    let b0 = _mm256_loadu_ps(w0.add(c));
                    let b1 = _mm256_loadu_ps(w1.add(c));
                    let b2 = _mm256_loadu_ps(w2.add(c));
                    let b3 = _mm256_loadu_ps(w3.add(c));
                    acc[0] = _mm256_fmadd_ps(a0, b0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(a0, b1, acc[1]);
                    acc[2] = _mm256_fmadd_ps(a0, b2, acc[2]);
                    acc[3] = _mm256_fmadd_ps(a0, b3, acc[3]);
                    acc[4] = _mm256_fmadd_ps(a1, b0, acc[4]);
                    acc[5] = _mm256_fmadd_ps(a1, b1, acc[5]);
                    acc[6] = _mm256_fmadd_ps(a1, b2, acc[6]);
                    acc[7] = _mm256_fmadd_ps(a1, b3, acc[7]);
                    c += 8;
                }
                for (q, xr) in [(0usize, r), (4, r + 1)] {
                    let xs = &x[xr * k..(xr + 1) * k];
                    for t in 0..4 {
                        let ws = &w[(j + t) * k..(j + t + 1) * k];
                        out.write(xr * ld + j + t, hsum(acc[q + t]) + tail(xs, ws, k8));
                    }
                }
                r += 2;
            }
            if r < m {
                let x0 = xp.add(r * k);
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut c = 0;
                while c < k8 {
                    let a0 = _mm256_loadu_ps(x0.add(c));
                    acc[0] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(w0.add(c)), acc[0]);
                    acc[1] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(w1.add(c)), acc[1]);
                    acc[2] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(w2.add(c)), acc[2]);
                    acc[3] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(w3.add(c)), acc[3]);
                    c += 8;
                }
                let xs = &x[r * k..(r + 1) * k];
                for (t, a) in acc.iter().enumerate() {
                    let ws = &w[(j + t) * k..(j + t + 1) * k];
                    out.write(r * ld + j + t, hsum(*a) + tail(xs, ws, k8));
                }
            }
            j += 4;
        }
        while j < j1 {
            let w0 = wp.add(j * k);
            for r in 0..m {
                let x0 = xp.add(r * k);
                let mut acc = _mm256_setzero_ps();
                let mut c = 0;
                while c < k8 {
                    acc = _mm256_fmadd_ps(
                        _mm256_loadu_ps(x0.add(c)),
                        _mm256_loadu_ps(w0.add(c)),
                        acc,
                    );
                    c += 8;
                }
                out.write(
                    r * ld + j,
                    hsum(acc) + tail(&x[r * k..(r + 1) * k], &w[j * k..(j + 1) * k], k8),
                );
            }
            j += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn naive(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for r in 0..m {
            for j in 0..n {
                y[r * n + j] = (0..k)
                    .map(|c| x[r * k + c] as f64 * w[j * k + c] as f64)
                    .sum();
            }
        }
        y
    }

    #[test]
    fn matches_naive_product_for_odd_shapes() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        // Odd m, n not a multiple of 4, k not a multiple of 8, and sizes that trigger tasks.
        for &(m, n, k) in &[
            (1, 5, 3),
            (2, 4, 8),
            (3, 7, 13),
            (5, 600, 40),
            (16, 1030, 72),
            (9, 3, 17),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let want = naive(&x, m, &w, n, k);
            for parallel in [false, true] {
                let mut y = vec![f32::NAN; m * n];
                assert!(matmul_rows(&x, m, &w, n, k, &mut y, parallel));
                for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                    assert!(
                        (*a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "m {m} n {n} k {k} parallel {parallel} at {i}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn rejects_mismatched_lengths() {
        let mut y = vec![0f32; 4];
        assert!(!matmul_rows(
            &[0.0; 6],
            2,
            &[0.0; 6],
            2,
            3,
            &mut y[..3],
            false
        ));
        assert!(!matmul_rows(&[0.0; 5], 2, &[0.0; 6], 2, 3, &mut y, false));
    }
}
