//! The fixed-point format: public weights as i16 with one scale per output row, activations as
//! integers of at most `P` bits with one power-of-two exponent per row, products in Z_2^64.
//!
//! ```text
//! weights:     W[j, c] ~ q[j, c] * s_j,      q in [-32767, 32767],  s_j = max_c |W[j, c]| / 32767
//! activations: x[r, c] ~ a[r, c] * 2^-e_r,   |a| <= 2^P,            e_r = P - (floor(log2 max_c |x[r, c]|) + 1)
//! product:     y[r, j] = s_j 2^-e_r  sum_c a[r, c] q[j, c]      (the sum is what the servers compute, mod 2^64)
//! ```
//!
//! **Why it cannot overflow.** `|sum_c a q| <= 2^P * L1_j` with `L1_j = sum_c |q[j, c]|`, known at
//! load time for every row of every weight. The format is only accepted for a matrix when
//! `2^P * max_j L1_j < 2^62`, so the true product is an integer of magnitude below 2^62 and its
//! residue mod 2^64 (what the two shares sum to) decodes to it exactly, as a signed 64-bit
//! integer. SmolLM2-135M's largest `L1_j` is measured at load (`umbra bench share` prints it);
//! `P` = [`Format::DEFAULT_BITS`] leaves many bits of headroom on every one of its matrices.
//!
//! **Inputs outside any measured range.** The exponent is chosen per row from that row's own
//! largest magnitude, so no activation is ever outside the format: a row with a massive
//! activation (SmolLM2 has rows whose largest entry is hundreds of times their median) simply
//! gets a smaller exponent, the format widens. What it cannot represent is refused, never
//! wrapped: a non-finite value (NaN, inf) is an error naming the layer. The price of a massive
//! activation is precision, not range: the other entries of that row keep `P - log2(ratio)`
//! bits, which the fidelity measurements include.
//!
//! The exponent `e_r` stays with the client (it is not sent): a server sees only shares.
//!
//! **Error bound.** Against the exact product `y[r, j] = sum_c x[r, c] W[j, c] + b[j]` of the
//! same input with the checkpoint's F32 weights, every decoded output obeys
//! ```text
//! |y^ - y| <= B + 2^-22 (|y| + B),
//! B = 1.01 m_r 2^-P (L1(W_j) + 0.51 k s_j) + 0.51 s_j L1(x_r)
//! ```
//! with `m_r = max_c |x[r, c]|`, `L1` the sum of magnitudes and `s_j = max_c |W[j, c]| / 32767`.
//! Why: the per-row exponent gives `2^-e_r <= 2 m_r 2^-P` (1% slack for `log2` in f32), so
//! rounding moves each input by at most `m_r 2^-P`; rounding a weight moves it by at most
//! `s_j / 2`, and storing `s_j` in f32 by `32767 s_j 2^-24 < 0.002 s_j` more; the ring sum is
//! exact (no overflow, above); decoding (i64 -> f64, two f64 products, the cast to f32 and the
//! bias add in f32) adds at most `2^-22` relative. [`Format::error_bound`] computes it;
//! `tests/smollm2.rs` checks every output of every map of SmolLM2 through two TLS servers
//! against it (the worst case aligns all roundings; measured errors are about `sqrt(k)` times
//! smaller, and the ratio is printed).
use crate::error::{Result, ShareError};

/// Largest magnitude of a quantized weight.
pub const Q_MAX: f64 = crate::ring::W_MAX as f64;

/// Activation format: magnitudes of at most `2^bits` per row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Format {
    pub bits: u32,
}

impl Default for Format {
    fn default() -> Self {
        Self {
            bits: Self::DEFAULT_BITS,
        }
    }
}

impl Format {
    /// 24 bits relative to the row's largest entry: the f32 mantissa of that entry, and
    /// 24 - log2(ratio) bits for an entry `ratio` times smaller.
    pub const DEFAULT_BITS: u32 = 24;

    /// Checks that a matrix whose largest row L1 norm is `l1_max` cannot overflow (module docs).
    pub fn check_matrix(&self, l1_max: u64, what: &str) -> Result<()> {
        let bound = (l1_max as f64) * 2f64.powi(self.bits as i32);
        if !(1..=40).contains(&self.bits) || bound >= 2f64.powi(62) {
            return Err(ShareError::Range(format!(
                "{what}: 2^{} x L1 {l1_max} reaches 2^62; use fewer activation bits",
                self.bits
            )));
        }
        Ok(())
    }

    /// The bound `B + 2^-22 (|y| + B)` of the module docs on `|y^ - y|` for one output: `x_max`,
    /// `x_l1` of the input row, `w_l1`, `w_max` of the weight row (F32, `k` entries), `y` the
    /// exact output.
    pub fn error_bound(
        &self,
        x_max: f64,
        x_l1: f64,
        w_l1: f64,
        w_max: f64,
        k: usize,
        y: f64,
    ) -> f64 {
        let s = w_max / Q_MAX;
        let b = 1.01 * x_max * 2f64.powi(-(self.bits as i32)) * (w_l1 + 0.51 * k as f64 * s)
            + 0.51 * s * x_l1;
        b + 2f64.powi(-22) * (y.abs() + b)
    }

    /// Encodes `x` (`[rows, k]`) into ring elements `out` and per-row exponents `exps`.
    /// A non-finite entry is an error (`what` names the layer).
    pub fn encode(
        &self,
        x: &[f32],
        k: usize,
        out: &mut [u64],
        exps: &mut [i32],
        what: &dyn std::fmt::Display,
    ) -> Result<()> {
        let rows = exps.len();
        if x.len() != rows * k || out.len() != rows * k {
            return Err(ShareError::Shape(format!(
                "{what}: {} activations for [{rows}, {k}]",
                x.len()
            )));
        }
        for ((xr, or), e) in x
            .chunks_exact(k)
            .zip(out.chunks_exact_mut(k))
            .zip(exps.iter_mut())
        {
            let mut m = 0f32;
            let mut finite = true;
            for &v in xr {
                finite &= v.is_finite();
                m = m.max(v.abs());
            }
            if !finite {
                let v = xr
                    .iter()
                    .find(|v| !v.is_finite())
                    .copied()
                    .unwrap_or(f32::NAN);
                return Err(ShareError::Range(format!(
                    "{what}: non-finite activation {v} (refused, not wrapped)"
                )));
            }
            *e = if m > 0.0 {
                // m < 2^(floor(log2 m) + 1), so m 2^e < 2^bits.
                self.bits as i32 - (m.log2().floor() as i32 + 1)
            } else {
                0
            };
            crate::lanes::encode_row(xr, 2f64.powi(*e), or);
        }
        Ok(())
    }
}

/// A public weight quantized to i16 per output row: `W[j, c] ~ q[j, c] * scale[j]`.
#[derive(Debug, Clone)]
pub struct QuantWeight {
    pub n: usize,
    pub k: usize,
    /// `[n, k]` row-major.
    pub q: Vec<i16>,
    /// `[n]`.
    pub scale: Vec<f32>,
    /// `sum_c |q[j, c]|` per row.
    pub l1: Vec<u64>,
}

impl QuantWeight {
    /// Rounds `w` (`[n, k]` row-major F32) to nearest with each row's own scale.
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Result<Self> {
        if w.len() != n * k || n == 0 || k == 0 {
            return Err(ShareError::Shape(format!(
                "{} weights for [{n}, {k}]",
                w.len()
            )));
        }
        let mut q = vec![0i16; n * k];
        let mut scale = vec![0f32; n];
        let mut l1 = vec![0u64; n];
        for j in 0..n {
            let row = &w[j * k..(j + 1) * k];
            if let Some(bad) = row.iter().find(|v| !v.is_finite()) {
                return Err(ShareError::Range(format!(
                    "non-finite weight {bad} in row {j}"
                )));
            }
            let m = row.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
            let s = if m > 0.0 { m / Q_MAX } else { 1.0 };
            let sum = crate::lanes::quantize_row(row, 1.0 / s, Q_MAX, &mut q[j * k..(j + 1) * k]);
            scale[j] = s as f32;
            l1[j] = sum;
        }
        Ok(Self { n, k, q, scale, l1 })
    }

    pub fn l1_max(&self) -> u64 {
        self.l1.iter().copied().max().unwrap_or(0)
    }
}

/// Decodes summed products `z` (`[rows, n]`, residues mod 2^64) into F32:
/// `y = (z as i64) * scale[j] * 2^-e_r + bias[j]`.
pub fn decode(z: &[u64], exps: &[i32], scale: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
    let n = scale.len();
    for ((zr, &e), or) in z.chunks_exact(n).zip(exps).zip(out.chunks_exact_mut(n)) {
        crate::lanes::decode_row(zr, 2f64.powi(-e), scale, or);
        if let Some(b) = bias {
            crate::lanes::add_bias(or, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_keeps_every_row_within_its_bits_and_refuses_non_finite() {
        let f = Format { bits: 20 };
        let x = [1.0f32, -0.5, 1e-9, 1000.0, -3.0, 0.0, 0.0, 0.0, 0.0];
        let mut out = [0u64; 9];
        let mut e = [0i32; 3];
        f.encode(&x, 3, &mut out, &mut e, &"t").unwrap();
        for (r, row) in out.chunks(3).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                let a = v as i64;
                assert!(a.unsigned_abs() <= 1 << 20, "{a}");
                let back = a as f64 * 2f64.powi(-e[r]);
                let want = x[r * 3 + c] as f64;
                let m = x[r * 3..r * 3 + 3].iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                assert!((back - want).abs() <= m * 2f64.powi(-20), "{back} {want}");
            }
        }
        assert_eq!(e[2], 0);
        let bad = [1.0f32, f32::NAN, 0.0];
        let err = f
            .encode(&bad, 3, &mut [0; 3], &mut [0; 1], &"layer 3 qkv")
            .unwrap_err();
        assert!(
            err.to_string().contains("layer 3 qkv") && err.to_string().contains("NaN"),
            "{err}"
        );
        assert!(f
            .encode(&[f32::INFINITY], 1, &mut [0], &mut [0], &"x")
            .is_err());
    }

    #[test]
    fn quantized_products_decode_to_the_float_product() {
        let (n, k) = (5, 33);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 70.0)
            .collect();
        let x: Vec<f32> = (0..2 * k)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) * 3.0)
            .collect();
        let qw = QuantWeight::quantize(&w, n, k).unwrap();
        let f = Format::default();
        f.check_matrix(qw.l1_max(), "w").unwrap();
        let mut a = vec![0u64; 2 * k];
        let mut e = [0i32; 2];
        f.encode(&x, k, &mut a, &mut e, &"x").unwrap();
        let z = crate::ring::reference(&a, 2, k, &qw.q, n);
        let mut y = vec![0f32; 2 * n];
        decode(&z, &e, &qw.scale, None, &mut y);
        for r in 0..2 {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|c| x[r * k + c] as f64 * w[j * k + c] as f64)
                    .sum();
                let tol = 1e-4
                    * (0..k)
                        .map(|c| (x[r * k + c] * w[j * k + c]).abs() as f64)
                        .sum::<f64>();
                assert!(
                    (y[r * n + j] as f64 - want).abs() <= tol,
                    "{} vs {want}",
                    y[r * n + j]
                );
            }
        }
    }

    /// The documented bound holds on random rows with massive activations, at a coarse format
    /// (where the input rounding term dominates) and the default one (weight rounding
    /// dominates), with bias; and it is not vacuous (the worst error reaches 1% of it).
    #[test]
    fn the_documented_error_bound_holds() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (n, k, rows) = (17, 301, 9);
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.2f32..0.2)).collect();
        let bias: Vec<f32> = (0..n).map(|_| rng.random_range(-1f32..1.0)).collect();
        let x: Vec<f32> = (0..rows * k)
            .map(|i| {
                if i % 97 == 5 {
                    rng.random_range(-900f32..900.0)
                } else {
                    rng.random_range(-2f32..2.0)
                }
            })
            .collect();
        let qw = QuantWeight::quantize(&w, n, k).unwrap();
        for bits in [10, Format::DEFAULT_BITS] {
            let f = Format { bits };
            let mut a = vec![0u64; rows * k];
            let mut e = vec![0i32; rows];
            f.encode(&x, k, &mut a, &mut e, &"x").unwrap();
            let z = crate::ring::reference(&a, rows, k, &qw.q, n);
            let mut y = vec![0f32; rows * n];
            decode(&z, &e, &qw.scale, Some(&bias), &mut y);
            let mut worst = 0f64;
            for r in 0..rows {
                let xr = &x[r * k..(r + 1) * k];
                let x_max = xr.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
                let x_l1: f64 = xr.iter().map(|v| v.abs() as f64).sum();
                for j in 0..n {
                    let wr = &w[j * k..(j + 1) * k];
                    let w_max = wr.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
                    let w_l1: f64 = wr.iter().map(|v| v.abs() as f64).sum();
                    let exact: f64 = xr
                        .iter()
                        .zip(wr)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        + bias[j] as f64;
                    let bound = f.error_bound(x_max, x_l1, w_l1, w_max, k, exact);
                    let err = (y[r * n + j] as f64 - exact).abs();
                    assert!(err <= bound, "bits {bits} r {r} j {j}: {err} > {bound}");
                    worst = worst.max(err / bound);
                }
            }
            eprintln!("bits {bits}: worst |err| / bound {worst:.4}");
            assert!(worst > 0.01, "bits {bits}: the bound is vacuous ({worst})");
        }
    }

    #[test]
    fn formats_that_could_overflow_are_refused() {
        assert!(Format { bits: 24 }.check_matrix(1 << 37, "w").is_ok());
        assert!(Format { bits: 24 }.check_matrix(1 << 38, "w").is_err());
        assert!(Format { bits: 0 }.check_matrix(1, "w").is_err());
    }
}
