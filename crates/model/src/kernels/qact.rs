//! Activations quantized to 8 bits for the integer dot products of [`super::qdot`].
//!
//! Two formats, as in llama.cpp (`Q8_0`/`Q8_1` for the 32-element types, `Q8_K` for the
//! k-quants), with f32 scales here instead of f16:
//! - [`Q8Rows32`]: per 32 elements `d = max|x| / 127`, `q = round(x / d)` (i8), and the block's
//!   integer sum `s = sum q` (for the offsets and minimums of the weights);
//! - [`Q8Rows256`]: per 256 elements one `d`, the i8 values, and the sums of each 16 values
//!   (`bsums`, for the k-quants' per-sub-block minimums and offsets).
//!
//! `x_i ~= d q_i` with `|q_i| <= 127`, so the unsigned-by-signed byte products of AVX2
//! (`maddubs`) never saturate against weights of up to 6 bits, nor against `|w| <= 127`.

/// `m` rows of `k` values quantized in blocks of 32 (`k % 32 == 0`).
#[derive(Debug, Clone, Default)]
pub struct Q8Rows32 {
    pub k: usize,
    pub qs: Vec<i8>,
    /// Scale per block, `[m * k / 32]`.
    pub d: Vec<f32>,
    /// Integer sum of each block's values, `[m * k / 32]`.
    pub s: Vec<i32>,
}

/// `m` rows of `k` values quantized in blocks of 256 (`k % 256 == 0`).
#[derive(Debug, Clone, Default)]
pub struct Q8Rows256 {
    pub k: usize,
    pub qs: Vec<i8>,
    /// Scale per block, `[m * k / 256]`.
    pub d: Vec<f32>,
    /// Sum of each 16 values, `[m * k / 16]`.
    pub bsums: Vec<i16>,
}

/// One row of [`Q8Rows32`].
#[derive(Debug, Clone, Copy)]
pub struct Row32<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [i32],
}

/// One row of [`Q8Rows256`].
#[derive(Debug, Clone, Copy)]
pub struct Row256<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub bsums: &'a [i16],
}

impl Q8Rows32 {
    /// Quantizes `x` (`m` rows of `k`, `k % 32 == 0`).
    pub fn quantize(x: &[f32], k: usize) -> Self {
        let mut out = Self::default();
        out.fill(x, k);
        out
    }

    /// [`Q8Rows32::quantize`] into this buffer (reusing its memory).
    pub fn fill(&mut self, x: &[f32], k: usize) {
        debug_assert!(k.is_multiple_of(32) && x.len().is_multiple_of(k.max(1)));
        let nb = x.len() / 32;
        self.k = k;
        self.qs.resize(x.len(), 0);
        self.d.resize(nb, 0.0);
        self.s.resize(nb, 0);
        for (((xb, qb), d), s) in x
            .chunks_exact(32)
            .zip(self.qs.chunks_exact_mut(32))
            .zip(self.d.iter_mut())
            .zip(self.s.iter_mut())
        {
            let (dd, ss) = quantize_block(xb, qb);
            *d = dd;
            *s = ss;
        }
    }

    pub fn rows(&self) -> usize {
        self.qs.len().checked_div(self.k).unwrap_or(0)
    }

    pub fn row(&self, r: usize) -> Row32<'_> {
        let (k, nb) = (self.k, self.k / 32);
        Row32 {
            qs: &self.qs[r * k..(r + 1) * k],
            d: &self.d[r * nb..(r + 1) * nb],
            s: &self.s[r * nb..(r + 1) * nb],
        }
    }
}

impl Q8Rows256 {
    /// Quantizes `x` (`m` rows of `k`, `k % 256 == 0`).
    pub fn quantize(x: &[f32], k: usize) -> Self {
        let mut out = Self::default();
        out.fill(x, k);
        out
    }

    /// [`Q8Rows256::quantize`] into this buffer (reusing its memory).
    pub fn fill(&mut self, x: &[f32], k: usize) {
        debug_assert!(k.is_multiple_of(256) && x.len().is_multiple_of(k.max(1)));
        let nb = x.len() / 256;
        self.k = k;
        self.qs.resize(x.len(), 0);
        self.d.resize(nb, 0.0);
        self.bsums.resize(x.len() / 16, 0);
        for (((xb, qb), d), bs) in x
            .chunks_exact(256)
            .zip(self.qs.chunks_exact_mut(256))
            .zip(self.d.iter_mut())
            .zip(self.bsums.chunks_exact_mut(16))
        {
            *d = quantize_with(xb, qb, amax(xb));
            for (b, q) in bs.iter_mut().zip(qb.chunks_exact(16)) {
                *b = q.iter().map(|&v| v as i16).sum();
            }
        }
    }

    pub fn rows(&self) -> usize {
        self.qs.len().checked_div(self.k).unwrap_or(0)
    }

    pub fn row(&self, r: usize) -> Row256<'_> {
        let (k, nb) = (self.k, self.k / 256);
        Row256 {
            qs: &self.qs[r * k..(r + 1) * k],
            d: &self.d[r * nb..(r + 1) * nb],
            bsums: &self.bsums[r * k / 16..(r + 1) * k / 16],
        }
    }
}

fn amax(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // SAFETY: AVX2 detected at run time.
        return unsafe { avx2::amax(x) };
    }
    x.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// Quantizes one block with `d = amax / 127`; returns `d`.
fn quantize_with(x: &[f32], q: &mut [i8], amax: f32) -> f32 {
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() && x.len().is_multiple_of(32) {
        // SAFETY: AVX2 detected at run time; lengths checked.
        unsafe { avx2::scale_round(x, q, id) };
        return d;
    }
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (v * id).round_ties_even() as i8;
    }
    d
}

/// One 32-block: returns `(d, sum q)`.
fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let d = quantize_with(x, q, amax(x));
    (d, q.iter().map(|&v| v as i32).sum())
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn amax(x: &[f32]) -> f32 {
        let sign = _mm256_set1_ps(-0.0);
        let mut m = _mm256_setzero_ps();
        let n8 = x.len() / 8 * 8;
        let p = x.as_ptr();
        let mut i = 0;
        while i < n8 {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(i))));
            i += 8;
        }
        let h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
        let mut r = _mm_cvtss_f32(h);
        for v in &x[n8..] {
            r = r.max(v.abs());
        }
        r
    }

    /// `q = round_even(x * id)` for `x.len() % 32 == 0` (values already within +-127).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scale_round(x: &[f32], q: &mut [i8], id: f32) {
        let s = _mm256_set1_ps(id);
        let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let xp = x.as_ptr();
        let qp = q.as_mut_ptr();
        let mut i = 0;
        while i < x.len() {
            let r = |o: usize| {
                _mm256_cvtps_epi32(_mm256_round_ps(
                    _mm256_mul_ps(_mm256_loadu_ps(xp.add(i + o)), s),
                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
                ))
            };
            let (a, b, c, d) = (r(0), r(8), r(16), r(24));
            // Pack 32 i32 -> 32 i8; the packs interleave 128-bit lanes, the permute undoes it.
            let ab = _mm256_packs_epi32(a, b);
            let cd = _mm256_packs_epi32(c, d);
            let v = _mm256_packs_epi16(ab, cd);
            let v = _mm256_permutevar8x32_epi32(v, perm);
            _mm256_storeu_si256(qp.add(i) as *mut __m256i, v);
            i += 32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_within_half_a_step() {
        let k = 512;
        let x: Vec<f32> = (0..2 * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0 * if i % 64 == 3 { 9.0 } else { 1.0 })
            .collect();
        let a = Q8Rows32::quantize(&x, k);
        let b = Q8Rows256::quantize(&x, k);
        assert_eq!((a.rows(), b.rows()), (2, 2));
        for r in 0..2 {
            let (ra, rb) = (a.row(r), b.row(r));
            for i in 0..k {
                let v = x[r * k + i];
                let ea = (ra.d[i / 32] * ra.qs[i] as f32 - v).abs();
                let eb = (rb.d[i / 256] * rb.qs[i] as f32 - v).abs();
                assert!(ea <= ra.d[i / 32] * 0.5 + 1e-6, "{r} {i}");
                assert!(eb <= rb.d[i / 256] * 0.5 + 1e-6, "{r} {i}");
            }
            for bi in 0..k / 32 {
                let s: i32 = ra.qs[bi * 32..bi * 32 + 32].iter().map(|&q| q as i32).sum();
                assert_eq!(ra.s[bi], s);
            }
            for g in 0..k / 16 {
                let s: i16 = rb.qs[g * 16..g * 16 + 16].iter().map(|&q| q as i16).sum();
                assert_eq!(rb.bsums[g], s);
            }
            assert!(ra.qs.iter().chain(rb.qs).all(|&q| q != i8::MIN));
        }
        let z = Q8Rows32::quantize(&[0.0; 32], 32);
        assert_eq!((z.d[0], z.s[0]), (0.0, 0));
    }
}
