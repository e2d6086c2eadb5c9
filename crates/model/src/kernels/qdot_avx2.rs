//! AVX2/FMA/F16C versions of the [`super::qdot`] kernels (x86_64, selected at run time), for one
//! or four activation rows per weight row (the weights are unpacked once for all four).
//!
//! Unsigned weight bytes times signed activation bytes go through `vpmaddubsw` (pairs summed
//! to i16; no saturation: weights < 64 or `|w| <= 127` against `|p| <= 127`) and `vpmaddwd`
//! (pairs to i32, optionally times a per-sub-block scale); on CPUs with AVX512-VNNI the
//! 32-block types use `vpdpbusd` (both steps in one) instead. `Q8_0` weights are signed: the
//! sign of each weight is moved onto its activation (`|w| * sign(w) p`). `Q5_0`'s fifth bits are
//! spread from the 32-bit mask to bytes with a byte shuffle and a per-byte bit test. The
//! 32-block types read the split row layout ([`crate::quant::layout`]), eight blocks' scales at
//! a time.
#![allow(clippy::missing_safety_doc)]
use super::qact::{Row256, Row32};
use super::qdot::Kernel;
use crate::quant::QuantType;
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Whether the CPU has AVX512-VNNI on 256-bit vectors (`vpdpbusd ymm`).
fn has_vnni() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vl")
    })
}

pub fn kernel(ty: QuantType) -> Option<Kernel> {
    kernel_with(ty, has_vnni())
}

/// Every SIMD variant this CPU can run for `ty` (tests check each).
#[cfg(test)]
pub fn variants(ty: QuantType) -> Vec<Kernel> {
    let mut v: Vec<Kernel> = kernel_with(ty, false).into_iter().collect();
    // Only the 32-block types have a VNNI variant.
    let b32 = matches!(
        ty,
        QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q5_0 | QuantType::Q8_0
    );
    if b32 && has_vnni() {
        v.extend(kernel_with(ty, true));
    }
    v
}

fn kernel_with(ty: QuantType, vnni: bool) -> Option<Kernel> {
    Some(match (ty, vnni) {
        (QuantType::Q4_0, false) => Kernel::B32(q4_0, q4_0_x4),
        (QuantType::Q4_1, false) => Kernel::B32(q4_1, q4_1_x4),
        (QuantType::Q5_0, false) => Kernel::B32(q5_0, q5_0_x4),
        (QuantType::Q8_0, false) => Kernel::B32(q8_0, q8_0_x4),
        (QuantType::Q4_0, true) => Kernel::B32(q4_0_v, q4_0_v_x4),
        (QuantType::Q4_1, true) => Kernel::B32(q4_1_v, q4_1_v_x4),
        (QuantType::Q5_0, true) => Kernel::B32(q5_0_v, q5_0_v_x4),
        (QuantType::Q8_0, true) => Kernel::B32(q8_0_v, q8_0_v_x4),
        (QuantType::Q4_K, _) => Kernel::B256(q4_k, q4_k_x4),
        (QuantType::Q5_K, _) => Kernel::B256(q5_k, q5_k_x4),
        (QuantType::Q6_K, _) => Kernel::B256(q6_k, q6_k_x4),
        _ => return None,
    })
}

/// Whether `w` holds whole blocks of `bb` bytes that every row of `xs` covers (else the kernels
/// return NaN instead of reading out of bounds).
#[inline(always)]
fn fits32(w: &[u8], bb: usize, xs: &[Row32<'_>]) -> Option<usize> {
    let nb = w.len() / bb;
    (w.len() == nb * bb
        && xs
            .iter()
            .all(|x| x.qs.len() >= nb * 32 && x.d.len() >= nb && x.s.len() >= nb))
    .then_some(nb)
}

#[inline(always)]
fn fits256(w: &[u8], bb: usize, xs: &[Row256<'_>]) -> Option<usize> {
    let nb = w.len() / bb;
    (w.len() == nb * bb
        && xs
            .iter()
            .all(|x| x.qs.len() >= nb * 256 && x.d.len() >= nb && x.bsums.len() >= nb * 16))
    .then_some(nb)
}

/// The safe entry points: one row (`$one`) and four rows (`$four`) of activations.
macro_rules! entries {
    ($one:ident, $four:ident, $imp:ident, $row:ident, $fits:ident, $bb:expr) => {
        fn $one(w: &[u8], x: $row<'_>) -> f32 {
            match $fits(w, $bb, std::slice::from_ref(&x)) {
                // SAFETY: handed out only after the CPU features of `$imp` were detected
                // (`kernel`), and `nb` whole blocks of `w` and `x` are in bounds.
                Some(nb) => unsafe { imp::$imp::<1>(w.as_ptr(), &[x], nb)[0] },
                None => f32::NAN,
            }
        }

        fn $four(w: &[u8], xs: &[$row<'_>; 4]) -> [f32; 4] {
            match $fits(w, $bb, xs) {
                // SAFETY: as above, for each of the four rows.
                Some(nb) => unsafe { imp::$imp::<4>(w.as_ptr(), xs, nb) },
                None => [f32::NAN; 4],
            }
        }
    };
}

entries!(q4_0, q4_0_x4, q4_0, Row32, fits32, 18);
entries!(q4_1, q4_1_x4, q4_1, Row32, fits32, 20);
entries!(q5_0, q5_0_x4, q5_0, Row32, fits32, 22);
entries!(q8_0, q8_0_x4, q8_0, Row32, fits32, 34);
entries!(q4_0_v, q4_0_v_x4, q4_0_v, Row32, fits32, 18);
entries!(q4_1_v, q4_1_v_x4, q4_1_v, Row32, fits32, 20);
entries!(q5_0_v, q5_0_v_x4, q5_0_v, Row32, fits32, 22);
entries!(q8_0_v, q8_0_v_x4, q8_0_v, Row32, fits32, 34);
entries!(q4_k, q4_k_x4, q4_k, Row256, fits256, 144);
entries!(q5_k, q5_k_x4, q5_k, Row256, fits256, 176);
entries!(q6_k, q6_k_x4, q6_k, Row256, fits256, 210);

mod imp {
    use super::*;

    #[inline(always)]
    unsafe fn f16(p: *const u8) -> f32 {
        let h = std::ptr::read_unaligned(p as *const u16);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[inline(always)]
    unsafe fn hsum_i32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }

    /// 16 bytes of nibbles -> 32 bytes: low nibbles (elements 0..16), then high nibbles.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let v = _mm_loadu_si128(p as *const __m128i);
        let hi = _mm_srli_epi16(v, 4);
        _mm256_and_si256(_mm256_set_m128i(hi, v), _mm256_set1_epi8(0x0F))
    }

    /// Byte `i` = 0x10 where bit `i` of `qh` is set, else 0.
    #[inline(always)]
    unsafe fn fifth_bits(qh: u32) -> __m256i {
        let v = _mm256_set1_epi32(qh as i32);
        // Byte i takes byte i/8 of qh ...
        let spread = _mm256_shuffle_epi8(
            v,
            _mm256_setr_epi64x(
                0,
                0x0101_0101_0101_0101,
                0x0202_0202_0202_0202,
                0x0303_0303_0303_0303,
            ),
        );
        // ... and tests its bit i%8.
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    /// 32 unsigned bytes times 32 signed bytes, summed in fours: 8 x i32 (`vpdpbusd` with
    /// `V`, else `vpmaddubsw` + `vpmaddwd`).
    #[inline(always)]
    unsafe fn dot_u8_i8<const V: bool>(u: __m256i, s: __m256i) -> __m256i {
        if V {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
        } else {
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
        }
    }

    #[inline(always)]
    unsafe fn load(p: *const i8) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }

    /// Eight f16 at `p` (or the first `g < 8`, zeros after) as f32.
    #[inline(always)]
    unsafe fn f16x8(p: *const u8, g: usize) -> __m256 {
        if g == 8 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        } else {
            let mut t = [0u16; 8];
            std::ptr::copy_nonoverlapping(p, t.as_mut_ptr() as *mut u8, 2 * g);
            _mm256_cvtph_ps(_mm_loadu_si128(t.as_ptr() as *const __m128i))
        }
    }

    /// Eight f32 at `p` (or the first `g < 8`, zeros after).
    #[inline(always)]
    unsafe fn f32x8(p: *const f32, g: usize) -> __m256 {
        if g == 8 {
            _mm256_loadu_ps(p)
        } else {
            let mut t = [0f32; 8];
            std::ptr::copy_nonoverlapping(p, t.as_mut_ptr(), g);
            _mm256_loadu_ps(t.as_ptr())
        }
    }

    /// Eight i32 at `p` (or the first `g < 8`, zeros after) as f32.
    #[inline(always)]
    unsafe fn i32x8(p: *const i32, g: usize) -> __m256 {
        if g == 8 {
            _mm256_cvtepi32_ps(_mm256_loadu_si256(p as *const __m256i))
        } else {
            let mut t = [0i32; 8];
            std::ptr::copy_nonoverlapping(p, t.as_mut_ptr(), g);
            _mm256_cvtepi32_ps(_mm256_loadu_si256(t.as_ptr() as *const __m256i))
        }
    }

    /// What the second term of a 32-block type is.
    #[derive(Clone, Copy)]
    enum Term {
        /// `w = d (q - o)`: `- o d dx s`.
        Offset(f32),
        /// `w = d q + m`: `+ m dx s` (the `m` run starts at the pointer).
        Min(*const u8),
        /// Nothing (`Q8_0`).
        None,
    }

    /// The split-layout loop of the 32-block types over `R` activation rows, eight blocks per
    /// group: the eight weight scales (one `vcvtph2ps`) times each row's eight activation scales
    /// give the block factors; each block's weights are unpacked once (`weights(i)`), dotted
    /// with every row (`SIGNED`: `Q8_0`'s sign trick), converted and accumulated with the factor
    /// (two alternating accumulators per row, so that one row and four rows give the same
    /// result bit for bit); the offset/min term takes one FMA per group.
    #[inline(always)]
    unsafe fn split32<const R: usize, const V: bool, const SIGNED: bool>(
        d: *const u8,
        xs: &[Row32<'_>; R],
        nb: usize,
        term: Term,
        weights: impl Fn(usize) -> __m256i,
    ) -> [f32; R] {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let mut corr = [_mm256_setzero_ps(); R];
        let mut f = [[0f32; 8]; R];
        let mut i = 0;
        while i < nb {
            let g = (nb - i).min(8);
            let wd = f16x8(d.add(2 * i), g);
            let wm = match term {
                Term::Min(m) => f16x8(m.add(2 * i), g),
                _ => _mm256_setzero_ps(),
            };
            for r in 0..R {
                let xd = f32x8(xs[r].d.as_ptr().add(i), g);
                let sc = _mm256_mul_ps(wd, xd);
                _mm256_storeu_ps(f[r].as_mut_ptr(), sc);
                match term {
                    Term::Offset(_) => {
                        let s = i32x8(xs[r].s.as_ptr().add(i), g);
                        corr[r] = _mm256_fmadd_ps(sc, s, corr[r]);
                    }
                    Term::Min(_) => {
                        let s = i32x8(xs[r].s.as_ptr().add(i), g);
                        corr[r] = _mm256_fmadd_ps(_mm256_mul_ps(wm, xd), s, corr[r]);
                    }
                    Term::None => {}
                }
            }
            for b in 0..g {
                let q = weights(i + b);
                let aq = if SIGNED { _mm256_sign_epi8(q, q) } else { q };
                for r in 0..R {
                    let p = load(xs[r].qs.as_ptr().add(32 * (i + b)));
                    let dot = if SIGNED {
                        dot_u8_i8::<V>(aq, _mm256_sign_epi8(p, q))
                    } else {
                        dot_u8_i8::<V>(aq, p)
                    };
                    let a = &mut acc[r][b % 2];
                    *a = _mm256_fmadd_ps(_mm256_set1_ps(f[r][b]), _mm256_cvtepi32_ps(dot), *a);
                }
            }
            i += g;
        }
        let mut out = [0f32; R];
        for r in 0..R {
            let main = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
            out[r] = match term {
                Term::Offset(o) => main - o * hsum(corr[r]),
                Term::Min(_) => main + hsum(corr[r]),
                Term::None => main,
            };
        }
        out
    }

    /// `(d, m, qh, qs)` run pointers of a split row of `nb` blocks.
    #[inline(always)]
    unsafe fn runs(w: *const u8, ty: QuantType, nb: usize) -> [*const u8; 4] {
        let r = crate::quant::layout::runs(ty, nb);
        [w.add(r[0]), w.add(r[1]), w.add(r[2]), w.add(r[3])]
    }

    #[inline(always)]
    unsafe fn q4_0_any<const R: usize, const V: bool>(
        w: *const u8,
        xs: &[Row32<'_>; R],
        nb: usize,
    ) -> [f32; R] {
        let [d, _, _, qs] = runs(w, QuantType::Q4_0, nb);
        split32::<R, V, false>(d, xs, nb, Term::Offset(8.0), |i| nibbles(qs.add(16 * i)))
    }

    #[inline(always)]
    unsafe fn q4_1_any<const R: usize, const V: bool>(
        w: *const u8,
        xs: &[Row32<'_>; R],
        nb: usize,
    ) -> [f32; R] {
        let [d, m, _, qs] = runs(w, QuantType::Q4_1, nb);
        split32::<R, V, false>(d, xs, nb, Term::Min(m), |i| nibbles(qs.add(16 * i)))
    }

    #[inline(always)]
    unsafe fn q5_0_any<const R: usize, const V: bool>(
        w: *const u8,
        xs: &[Row32<'_>; R],
        nb: usize,
    ) -> [f32; R] {
        let [d, _, qh, qs] = runs(w, QuantType::Q5_0, nb);
        split32::<R, V, false>(d, xs, nb, Term::Offset(16.0), |i| {
            let h = std::ptr::read_unaligned(qh.add(4 * i) as *const u32);
            _mm256_or_si256(nibbles(qs.add(16 * i)), fifth_bits(h))
        })
    }

    #[inline(always)]
    unsafe fn q8_0_any<const R: usize, const V: bool>(
        w: *const u8,
        xs: &[Row32<'_>; R],
        nb: usize,
    ) -> [f32; R] {
        let [d, _, _, qs] = runs(w, QuantType::Q8_0, nb);
        split32::<R, V, true>(d, xs, nb, Term::None, |i| {
            _mm256_loadu_si256(qs.add(32 * i) as *const __m256i)
        })
    }

    macro_rules! featured {
        ($name:ident, $any:ident, $vnni:expr, $feat:literal) => {
            #[target_feature(enable = $feat)]
            pub unsafe fn $name<const R: usize>(
                w: *const u8,
                xs: &[Row32<'_>; R],
                nb: usize,
            ) -> [f32; R] {
                $any::<R, $vnni>(w, xs, nb)
            }
        };
    }

    featured!(q4_0, q4_0_any, false, "avx2,fma,f16c");
    featured!(q4_1, q4_1_any, false, "avx2,fma,f16c");
    featured!(q5_0, q5_0_any, false, "avx2,fma,f16c");
    featured!(q8_0, q8_0_any, false, "avx2,fma,f16c");
    featured!(q4_0_v, q4_0_any, true, "avx2,fma,f16c,avx512vnni,avx512vl");
    featured!(q4_1_v, q4_1_any, true, "avx2,fma,f16c,avx512vnni,avx512vl");
    featured!(q5_0_v, q5_0_any, true, "avx2,fma,f16c,avx512vnni,avx512vl");
    featured!(q8_0_v, q8_0_any, true, "avx2,fma,f16c,avx512vnni,avx512vl");

    /// The eight 6-bit scales and mins of a `Q4_K`/`Q5_K` block as two `[u8; 8]`.
    #[inline(always)]
    unsafe fn scales_mins(s: *const u8) -> ([u8; 8], [u8; 8]) {
        let s = std::slice::from_raw_parts(s, 12);
        let mut sc = [0u8; 8];
        let mut mn = [0u8; 8];
        for j in 0..8 {
            let (a, b) = crate::quant::dequant::scale_min_k4(j, s);
            sc[j] = a;
            mn[j] = b;
        }
        (sc, mn)
    }

    /// `sum_j m_j (bsum_{2j} + bsum_{2j+1})` for the eight mins of a block.
    #[inline(always)]
    unsafe fn mins_dot(mn: &[u8; 8], bs: *const i16) -> i32 {
        // bsums pairs summed: madd with ones over 16 i16 -> 8 i32; mins widened to i32.
        let b = _mm256_loadu_si256(bs as *const __m256i);
        let pairs = _mm256_madd_epi16(b, _mm256_set1_epi16(1));
        let m = _mm256_cvtepu8_epi32(_mm_loadl_epi64(mn.as_ptr() as *const __m128i));
        hsum_i32(_mm256_mullo_epi32(pairs, m))
    }

    /// Shared `Q4_K`/`Q5_K` loop over `R` activation rows; `part(b, j)` gives the 64 values of
    /// part `j` (0..4) as the unsigned bytes of sub-blocks `2j` and `2j + 1`, unpacked once.
    #[inline(always)]
    unsafe fn k4<const R: usize>(
        w: *const u8,
        xs: &[Row256<'_>; R],
        nb: usize,
        bb: usize,
        part: impl Fn(*const u8, usize) -> (__m256i, __m256i),
    ) -> [f32; R] {
        let mut acc = [_mm256_setzero_ps(); R];
        let mut corr = [0f32; R];
        for i in 0..nb {
            let b = w.add(i * bb);
            let (sc, mn) = scales_mins(b.add(4));
            let (d, dmin) = (f16(b), f16(b.add(2)));
            let mut sumi = [_mm256_setzero_si256(); R];
            for j in 0..4 {
                let (lo, hi) = part(b, j);
                let s0 = _mm256_set1_epi16(sc[2 * j] as i16);
                let s1 = _mm256_set1_epi16(sc[2 * j + 1] as i16);
                for r in 0..R {
                    let xp = xs[r].qs.as_ptr().add(256 * i + 64 * j);
                    let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load(xp)), s0);
                    let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load(xp.add(32))), s1);
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(p0, p1));
                }
            }
            for r in 0..R {
                let dx = *xs[r].d.get_unchecked(i);
                acc[r] =
                    _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
                corr[r] += dmin * dx * mins_dot(&mn, xs[r].bsums.as_ptr().add(16 * i)) as f32;
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = hsum(acc[r]) - corr[r];
        }
        out
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_k<const R: usize>(w: *const u8, xs: &[Row256<'_>; R], nb: usize) -> [f32; R] {
        let m4 = _mm256_set1_epi8(0x0F);
        k4::<R>(w, xs, nb, 144, |b, j| {
            let q = _mm256_loadu_si256(b.add(16 + 32 * j) as *const __m256i);
            (
                _mm256_and_si256(q, m4),
                _mm256_and_si256(_mm256_srli_epi16(q, 4), m4),
            )
        })
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q5_k<const R: usize>(w: *const u8, xs: &[Row256<'_>; R], nb: usize) -> [f32; R] {
        let m4 = _mm256_set1_epi8(0x0F);
        let one = _mm256_set1_epi8(1);
        k4::<R>(w, xs, nb, 176, |b, j| {
            let qh = _mm256_loadu_si256(b.add(16) as *const __m256i);
            let q = _mm256_loadu_si256(b.add(48 + 32 * j) as *const __m256i);
            let h0 = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j as i32)), one);
            let h1 = _mm256_and_si256(
                _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j as i32 + 1)),
                one,
            );
            (
                _mm256_or_si256(_mm256_and_si256(q, m4), _mm256_slli_epi16(h0, 4)),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(q, 4), m4),
                    _mm256_slli_epi16(h1, 4),
                ),
            )
        })
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q6_k<const R: usize>(w: *const u8, xs: &[Row256<'_>; R], nb: usize) -> [f32; R] {
        let m4 = _mm256_set1_epi8(0x0F);
        let m2 = _mm256_set1_epi8(3);
        let mut acc = [_mm256_setzero_ps(); R];
        for i in 0..nb {
            let b = w.add(i * 210);
            let sc = b.add(192) as *const i8;
            let mut sumi = [_mm256_setzero_si256(); R];
            for h in 0..2 {
                let ql_a = _mm256_loadu_si256(b.add(64 * h) as *const __m256i);
                let ql_b = _mm256_loadu_si256(b.add(64 * h + 32) as *const __m256i);
                let qh = _mm256_loadu_si256(b.add(128 + 32 * h) as *const __m256i);
                let hi = |s: i32| {
                    let v = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(s));
                    _mm256_slli_epi16(_mm256_and_si256(v, m2), 4)
                };
                let q = [
                    _mm256_or_si256(_mm256_and_si256(ql_a, m4), hi(0)),
                    _mm256_or_si256(_mm256_and_si256(ql_b, m4), hi(2)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql_a, 4), m4), hi(4)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql_b, 4), m4), hi(6)),
                ];
                for (t, q) in q.into_iter().enumerate() {
                    let g = 8 * h + 2 * t;
                    let s = _mm256_set_m128i(
                        _mm_set1_epi16(*sc.add(g + 1) as i16),
                        _mm_set1_epi16(*sc.add(g) as i16),
                    );
                    for r in 0..R {
                        let xp = xs[r].qs.as_ptr().add(256 * i + 128 * h + 32 * t);
                        let p = _mm256_maddubs_epi16(q, load(xp));
                        sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(p, s));
                    }
                }
            }
            // The -32 offset: 32 sum_g sc_g bsum_g.
            let scales = _mm256_cvtepi8_epi16(_mm_loadu_si128(sc as *const __m128i));
            let d = f16(b.add(208));
            for r in 0..R {
                let bs = _mm256_loadu_si256(xs[r].bsums.as_ptr().add(16 * i) as *const __m256i);
                let off = _mm256_slli_epi32(_mm256_madd_epi16(scales, bs), 5);
                let s = d * *xs[r].d.get_unchecked(i);
                let v = _mm256_cvtepi32_ps(_mm256_sub_epi32(sumi[r], off));
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(s), v, acc[r]);
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = hsum(acc[r]);
        }
        out
    }
}
