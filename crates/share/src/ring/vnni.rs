//! AVX-512 VNNI tiles (256-bit vectors, EVEX encoding): one share row against four weight rows,
//! `vpdpwssd` (multiply, pair-add and accumulate in one instruction) per digit plane; the 32
//! vector registers hold all 20 accumulators.
use super::{combine, RingMatrix, BLOCK, LANES};

#[cfg(target_arch = "x86_64")]
use super::avx2::{hsum_i32, hsum_i64};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Outputs `j0..j1` of one row (`d`: its `5 * kp` digit planes) into `out`.
#[cfg(target_arch = "x86_64")]
pub(super) fn outputs(d: &[i16], kp: usize, w: &RingMatrix, j0: usize, j1: usize, out: &mut [u64]) {
    debug_assert!(d.len() == 5 * kp && out.len() == j1 - j0);
    let mut j = j0;
    // SAFETY: `Kernel::Vnni` is only chosen when the CPU reports AVX2, AVX512-VNNI and
    // AVX512-VL (`Kernel::available`); every row slice has `kp` entries, a multiple of 16.
    unsafe {
        while j + 4 <= j1 {
            let y = tile::<4>(d, kp, [w.row(j), w.row(j + 1), w.row(j + 2), w.row(j + 3)]);
            out[j - j0..j - j0 + 4].copy_from_slice(&y);
            j += 4;
        }
        while j < j1 {
            out[j - j0] = tile::<1>(d, kp, [w.row(j)])[0];
            j += 1;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn widen_add(acc: &mut [__m256i; 2], v: __m256i) {
    let lo = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(v));
    let hi = _mm256_cvtepi32_epi64(_mm256_extracti128_si256::<1>(v));
    acc[0] = _mm256_add_epi64(acc[0], lo);
    acc[1] = _mm256_add_epi64(acc[1], hi);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
unsafe fn tile<const N: usize>(d: &[i16], kp: usize, w: [&[i16]; N]) -> [u64; N] {
    let z = _mm256_setzero_si256();
    let mut low64 = [[[z; 2]; 3]; N];
    let mut high = [[z; 2]; N];
    let dp = d.as_ptr();
    let mut c0 = 0;
    while c0 < kp {
        let c1 = (c0 + BLOCK).min(kp);
        let mut low = [[z; 3]; N];
        let mut c = c0;
        while c < c1 {
            let dv = |g: usize| _mm256_loadu_si256(dp.add(g * kp + c) as *const __m256i);
            let (d0, d1, d2, h0, h1) = (dv(0), dv(1), dv(2), dv(3), dv(4));
            for n in 0..N {
                // The next tile's rows (the next `N` rows of the matrix, `N kp` entries on) at
                // the same offset: short rows end before the hardware prefetcher warms up.
                // `wrapping_add`: past the last row this is only a hint, never a load.
                _mm_prefetch::<_MM_HINT_T0>(w[n].as_ptr().wrapping_add(c + N * kp) as *const i8);
                let wv = _mm256_loadu_si256(w[n].as_ptr().add(c) as *const __m256i);
                low[n][0] = _mm256_dpwssd_epi32(low[n][0], d0, wv);
                low[n][1] = _mm256_dpwssd_epi32(low[n][1], d1, wv);
                low[n][2] = _mm256_dpwssd_epi32(low[n][2], d2, wv);
                high[n][0] = _mm256_dpwssd_epi32(high[n][0], h0, wv);
                high[n][1] = _mm256_dpwssd_epi32(high[n][1], h1, wv);
            }
            c += LANES;
        }
        for n in 0..N {
            for g in 0..3 {
                widen_add(&mut low64[n][g], low[n][g]);
            }
        }
        c0 = c1;
    }
    let mut y = [0u64; N];
    for n in 0..N {
        let dd = [
            hsum_i64(low64[n][0]),
            hsum_i64(low64[n][1]),
            hsum_i64(low64[n][2]),
        ];
        y[n] = combine(dd, hsum_i32(high[n][0]), hsum_i32(high[n][1]));
    }
    y
}
