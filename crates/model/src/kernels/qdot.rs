//! Dot products of one quantized weight row with one 8-bit activation row
//! ([`super::qact`]), per block type; integer sums inside a block, f32 across blocks.
//!
//! With `w_i = dw (q_i - o)` (offset `o`: 8 for `Q4_0`, 16 for `Q5_0`, 0 for `Q8_0`) or
//! `w_i = dw q_i + mw` (`Q4_1`), and `x_i ~= dx p_i` (`s = sum p_i`) per 32-block:
//! `sum_i w_i x_i = dw dx (sum q_i p_i - o s)` or `dw dx sum q_i p_i + mw dx s`.
//! The k-quants (256-blocks of 8 or 16 sub-blocks with 6/8-bit scales `sc_j` and mins `m_j`):
//! `Q4_K`/`Q5_K`: `dx (d sum_j sc_j sum q p - dmin sum_j m_j bsum_j)`;
//! `Q6_K`: `d dx sum_g sc_g (sum q p - 32 bsum_g)` over 16-groups `g`.
//!
//! Rows of the 32-element types are in the split layout of [`crate::quant::layout`].
//! [`Kernel::for_type`] picks the AVX2/FMA/F16C versions (run-time detection) or the portable
//! ones below; both compute the same integer sums, so they differ only by f32 rounding.
use super::qact::{Row256, Row32};
use crate::quant::dequant::{f16_at, scale_min_k4};
use crate::quant::{layout, QuantType};

/// Row-dot functions for one weight type, with the activation format they read: one weight
/// row against one activation row, and against four (the weights unpacked once for all four).
#[derive(Clone, Copy)]
pub enum Kernel {
    /// 32-element blocks against [`super::qact::Q8Rows32`].
    B32(
        fn(&[u8], Row32<'_>) -> f32,
        fn(&[u8], &[Row32<'_>; 4]) -> [f32; 4],
    ),
    /// 256-element blocks against [`super::qact::Q8Rows256`].
    B256(
        fn(&[u8], Row256<'_>) -> f32,
        fn(&[u8], &[Row256<'_>; 4]) -> [f32; 4],
    ),
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::B32(..) => "Kernel::B32",
            Self::B256(..) => "Kernel::B256",
        })
    }
}

/// Four rows through a one-row kernel.
macro_rules! four {
    ($name:ident, $one:ident, $row:ident) => {
        fn $name(w: &[u8], xs: &[$row<'_>; 4]) -> [f32; 4] {
            [
                $one(w, xs[0]),
                $one(w, xs[1]),
                $one(w, xs[2]),
                $one(w, xs[3]),
            ]
        }
    };
}

four!(q4_0_x4, q4_0, Row32);
four!(q4_1_x4, q4_1, Row32);
four!(q5_0_x4, q5_0, Row32);
four!(q8_0_x4, q8_0, Row32);
four!(q4_k_x4, q4_k, Row256);
four!(q5_k_x4, q5_k, Row256);
four!(q6_k_x4, q6_k, Row256);

impl Kernel {
    /// The fastest kernel for `ty` on this CPU; `None` for types without one.
    pub fn for_type(ty: QuantType) -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2_fma() {
            return super::qdot_avx2::kernel(ty);
        }
        Self::portable(ty)
    }

    /// The portable kernel for `ty`.
    pub fn portable(ty: QuantType) -> Option<Self> {
        Some(match ty {
            QuantType::Q4_0 => Self::B32(q4_0, q4_0_x4),
            QuantType::Q4_1 => Self::B32(q4_1, q4_1_x4),
            QuantType::Q5_0 => Self::B32(q5_0, q5_0_x4),
            QuantType::Q8_0 => Self::B32(q8_0, q8_0_x4),
            QuantType::Q4_K => Self::B256(q4_k, q4_k_x4),
            QuantType::Q5_K => Self::B256(q5_k, q5_k_x4),
            QuantType::Q6_K => Self::B256(q6_k, q6_k_x4),
            _ => return None,
        })
    }
}

/// Integer dot of 32 unsigned weights with 32 activations.
#[inline(always)]
fn idot(q: impl Iterator<Item = i32>, p: &[i8]) -> i32 {
    q.zip(p).map(|(a, &b)| a * b as i32).sum()
}

/// The 32 nibbles of a 16-byte `qs` in element order (low nibbles, then high nibbles).
#[inline(always)]
fn nibbles(qs: &[u8]) -> impl Iterator<Item = i32> + '_ {
    qs.iter()
        .map(|&b| (b & 15) as i32)
        .chain(qs.iter().map(|&b| (b >> 4) as i32))
}

/// The 32 five-bit values of a `Q5_0`/`Q5_1` block (`qh` bit `i` is element `i`'s fifth bit).
#[inline(always)]
fn fives(qs: &[u8], qh: u32) -> impl Iterator<Item = i32> + '_ {
    nibbles(qs)
        .enumerate()
        .map(move |(i, v)| v | ((((qh >> i) & 1) << 4) as i32))
}

/// The runs of a split row ([`crate::quant::layout`]): `(nb, d, m, qh, qs)`.
fn runs(ty: QuantType, w: &[u8]) -> (usize, &[u8], &[u8], &[u8], &[u8]) {
    let nb = w.len() / ty.block_bytes();
    let [d, m, qh, qs] = layout::runs(ty, nb);
    (nb, &w[d..m], &w[m..qh], &w[qh..qs], &w[qs..])
}

fn q4_0(w: &[u8], x: Row32<'_>) -> f32 {
    let (nb, d, _, _, qs) = runs(QuantType::Q4_0, w);
    (0..nb)
        .map(|i| {
            let p = &x.qs[32 * i..32 * i + 32];
            let dot = idot(nibbles(&qs[16 * i..16 * i + 16]), p) - 8 * x.s[i];
            f16_at(&d[2 * i..]) * x.d[i] * dot as f32
        })
        .sum()
}

fn q4_1(w: &[u8], x: Row32<'_>) -> f32 {
    let (nb, d, m, _, qs) = runs(QuantType::Q4_1, w);
    (0..nb)
        .map(|i| {
            let p = &x.qs[32 * i..32 * i + 32];
            let dot = idot(nibbles(&qs[16 * i..16 * i + 16]), p);
            f16_at(&d[2 * i..]) * x.d[i] * dot as f32 + f16_at(&m[2 * i..]) * x.d[i] * x.s[i] as f32
        })
        .sum()
}

fn q5_0(w: &[u8], x: Row32<'_>) -> f32 {
    let (nb, d, _, qh, qs) = runs(QuantType::Q5_0, w);
    (0..nb)
        .map(|i| {
            let p = &x.qs[32 * i..32 * i + 32];
            let h = u32::from_le_bytes([qh[4 * i], qh[4 * i + 1], qh[4 * i + 2], qh[4 * i + 3]]);
            let dot = idot(fives(&qs[16 * i..16 * i + 16], h), p) - 16 * x.s[i];
            f16_at(&d[2 * i..]) * x.d[i] * dot as f32
        })
        .sum()
}

fn q8_0(w: &[u8], x: Row32<'_>) -> f32 {
    let (nb, d, _, _, qs) = runs(QuantType::Q8_0, w);
    (0..nb)
        .map(|i| {
            let p = &x.qs[32 * i..32 * i + 32];
            let dot = idot(qs[32 * i..32 * i + 32].iter().map(|&v| v as i8 as i32), p);
            f16_at(&d[2 * i..]) * x.d[i] * dot as f32
        })
        .sum()
}

/// `sum_j sc_j dot_j` and `sum_j m_j bsum_j` of a `Q4_K`/`Q5_K` block whose 256 values are
/// `value(i)`.
#[inline(always)]
fn k4_sums(sc: &[u8], p: &[i8], bs: &[i16], value: impl Fn(usize) -> i32) -> (i32, i32) {
    let (mut isum, mut msum) = (0i32, 0i32);
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, sc);
        let dot: i32 = (0..32)
            .map(|l| value(32 * j + l) * p[32 * j + l] as i32)
            .sum();
        isum += s as i32 * dot;
        msum += m as i32 * (bs[2 * j] as i32 + bs[2 * j + 1] as i32);
    }
    (isum, msum)
}

fn q4_k(w: &[u8], x: Row256<'_>) -> f32 {
    let mut acc = 0f32;
    for (i, b) in w.chunks_exact(144).enumerate() {
        let qs = &b[16..144];
        let value = |e: usize| {
            let (j, l) = (e / 64, e % 64);
            let byte = qs[32 * j + l % 32];
            (if l < 32 { byte & 15 } else { byte >> 4 }) as i32
        };
        let p = &x.qs[256 * i..256 * i + 256];
        let (isum, msum) = k4_sums(&b[4..16], p, &x.bsums[16 * i..16 * i + 16], value);
        acc += x.d[i] * (f16_at(b) * isum as f32 - f16_at(&b[2..]) * msum as f32);
    }
    acc
}

fn q5_k(w: &[u8], x: Row256<'_>) -> f32 {
    let mut acc = 0f32;
    for (i, b) in w.chunks_exact(176).enumerate() {
        let (qh, qs) = (&b[16..48], &b[48..176]);
        let value = |e: usize| {
            let (j, l) = (e / 64, e % 64);
            let byte = qs[32 * j + l % 32];
            let bit = 2 * j + usize::from(l >= 32);
            let lo = if l < 32 { byte & 15 } else { byte >> 4 };
            (lo | (((qh[l % 32] >> bit) & 1) << 4)) as i32
        };
        let p = &x.qs[256 * i..256 * i + 256];
        let (isum, msum) = k4_sums(&b[4..16], p, &x.bsums[16 * i..16 * i + 16], value);
        acc += x.d[i] * (f16_at(b) * isum as f32 - f16_at(&b[2..]) * msum as f32);
    }
    acc
}

fn q6_k(w: &[u8], x: Row256<'_>) -> f32 {
    let mut acc = 0f32;
    for (i, b) in w.chunks_exact(210).enumerate() {
        let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
        let p = &x.qs[256 * i..256 * i + 256];
        let bs = &x.bsums[16 * i..16 * i + 16];
        let mut isum = 0i32;
        for e in 0..256 {
            let (h, r) = (e / 128, e % 128);
            let (t, l) = (r / 32, r % 32);
            let lq = ql[64 * h + l + 32 * (t & 1)];
            let lo = if t < 2 { lq & 15 } else { lq >> 4 };
            let hi = (qh[32 * h + l] >> (2 * t)) & 3;
            isum += (sc[e / 16] as i8 as i32) * ((lo | (hi << 4)) as i32) * p[e] as i32;
        }
        let off: i32 = (0..16).map(|g| sc[g] as i8 as i32 * bs[g] as i32).sum();
        acc += f16_at(&b[208..]) * x.d[i] * (isum - 32 * off) as f32;
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::super::qact::{Q8Rows256, Q8Rows32};
    use super::*;
    use crate::quant::QMatrix;

    /// Each kernel (portable and, where present, SIMD) against the dot of the dequantized
    /// weights with the dequantized activations, in f64.
    #[test]
    fn kernels_match_dequantized_products() {
        // 864: 27 blocks of 32 (three groups of eight and a tail of three).
        for k in [768, 864] {
            check_kernels(k);
        }
    }

    fn check_kernels(k: usize) {
        let x: Vec<f32> = (0..k)
            .map(|i| ((i * 131 % 97) as f32 - 48.0) / 17.0)
            .collect();
        let w: Vec<f32> = (0..3 * k)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 300.0)
            .collect();
        let a32 = Q8Rows32::quantize(&x, k);
        let a256 = Q8Rows256::quantize(&x, k);
        for ty in [
            QuantType::Q4_0,
            QuantType::Q4_1,
            QuantType::Q5_0,
            QuantType::Q8_0,
            QuantType::Q4_K,
            QuantType::Q5_K,
            QuantType::Q6_K,
        ] {
            if ty.bytes_for(k).is_none() {
                continue;
            }
            let m = QMatrix::quantize(&w, 3, k, ty).unwrap();
            for r in 0..3 {
                let wr = m.dequantize_row(r).unwrap();
                let (xs, want): (Vec<f32>, f64) = match Kernel::portable(ty).unwrap() {
                    Kernel::B32(..) => {
                        let a = a32.row(0);
                        let xs: Vec<f32> = (0..k).map(|i| a.d[i / 32] * a.qs[i] as f32).collect();
                        let want = xs.iter().zip(&wr).map(|(a, b)| *a as f64 * *b as f64).sum();
                        (xs, want)
                    }
                    Kernel::B256(..) => {
                        let a = a256.row(0);
                        let xs: Vec<f32> = (0..k).map(|i| a.d[i / 256] * a.qs[i] as f32).collect();
                        let want = xs.iter().zip(&wr).map(|(a, b)| *a as f64 * *b as f64).sum();
                        (xs, want)
                    }
                };
                let scale: f64 = xs
                    .iter()
                    .zip(&wr)
                    .map(|(a, b)| (*a * *b).abs() as f64)
                    .sum();
                let mut kernels = vec![Kernel::portable(ty).unwrap()];
                #[cfg(target_arch = "x86_64")]
                if super::super::has_avx2_fma() {
                    kernels.extend(super::super::qdot_avx2::variants(ty));
                }
                for kern in kernels {
                    let w = m.row_bytes(r);
                    // One row, and four rows (the same activation row four times).
                    let (one, four) = match kern {
                        Kernel::B32(f, g) => (f(w, a32.row(0)), g(w, &[a32.row(0); 4])),
                        Kernel::B256(f, g) => (f(w, a256.row(0)), g(w, &[a256.row(0); 4])),
                    };
                    // Bit for bit: a row's result does not depend on the batch around it.
                    assert!(
                        four.iter().all(|v| v.to_bits() == one.to_bits()),
                        "{ty} {kern:?}"
                    );
                    for got in std::iter::once(one).chain(four) {
                        let got = got as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * scale + 1e-6,
                            "{ty} row {r}: {got} vs {want} ({kern:?})"
                        );
                    }
                }
            }
        }
    }

    /// A/B of the kernel variants on a decode-sized matrix (576 x 1536 weights, the size of a
    /// SmolLM2 MLP matrix): the AVX2 one-row kernel (`vpmaddubsw`), the VNNI one-row kernel
    /// where the CPU has it, and the four-row kernels against four one-row calls. Prints ns per
    /// weight row; asserts the variants agree.
    /// `cargo test --release -p umbra-model --lib qdot_variants_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    #[cfg(target_arch = "x86_64")]
    fn qdot_variants_speed() {
        use std::time::Instant;
        if !super::super::has_avx2_fma() {
            return;
        }
        let (n, k) = (576, 1536);
        let x: Vec<f32> = (0..4 * k)
            .map(|i| ((i * 131 % 97) as f32 - 48.0) / 17.0)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 300.0)
            .collect();
        let a32 = Q8Rows32::quantize(&x, k);
        let a256 = Q8Rows256::quantize(&x, k);
        let r32 = [a32.row(0), a32.row(1), a32.row(2), a32.row(3)];
        let r256 = [a256.row(0), a256.row(1), a256.row(2), a256.row(3)];
        let reps = 200;
        for ty in [
            QuantType::Q4_0,
            QuantType::Q4_1,
            QuantType::Q5_0,
            QuantType::Q8_0,
            QuantType::Q4_K,
            QuantType::Q6_K,
        ] {
            let m = QMatrix::quantize(&w, n, k, ty).unwrap();
            let mut line = format!("{ty}:");
            let mut first: Option<f32> = None;
            for (vi, kern) in super::super::qdot_avx2::variants(ty)
                .into_iter()
                .enumerate()
            {
                let time = |four: bool| {
                    let t = Instant::now();
                    let mut s = 0f32;
                    for _ in 0..reps {
                        for j in 0..n {
                            let wr = m.row_bytes(j);
                            s += match (kern, four) {
                                (Kernel::B32(f, _), false) => {
                                    (0..4).map(|r| f(wr, r32[r])).sum::<f32>()
                                }
                                (Kernel::B32(_, g), true) => g(wr, &r32).iter().sum::<f32>(),
                                (Kernel::B256(f, _), false) => {
                                    (0..4).map(|r| f(wr, r256[r])).sum::<f32>()
                                }
                                (Kernel::B256(_, g), true) => g(wr, &r256).iter().sum::<f32>(),
                            };
                        }
                    }
                    (t.elapsed().as_nanos() as f64 / (reps * n) as f64, s)
                };
                let (one, s1) = time(false);
                let (four, s4) = time(true);
                assert_eq!(s1.to_bits(), s4.to_bits(), "{ty} variant {vi}");
                if let Some(f) = first {
                    assert!((f - s1).abs() <= 1e-4 * f.abs(), "{ty} variant {vi}");
                }
                first = Some(s1);
                let name = if vi == 0 { "avx2" } else { "vnni" };
                line += &format!(
                    "  {name}: 4 x one-row {:.0} ns, four-row {:.0} ns ({:.2}x)",
                    one,
                    four,
                    one / four
                );
            }
            println!("{line}");
        }
    }
}
