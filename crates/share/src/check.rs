//! Integrity of the servers' products: a range check and Freivalds checks in Z_2^64.
//!
//! For each weight `W` (`[n, k]`, quantized) the client draws `t` secret vectors `s` uniform in
//! `Z_2^64^n` (ChaCha20, OS-seeded; never sent) and keeps `u = W^T s` (`[k]`, computed once at
//! load). For returned products whose sum is `Z` (`[rows, n]`) and its own encoded input `X`
//! (`[rows, k]`) it accepts only if, for every row `r`:
//!
//! 1. **range**: every `|Z[r, j]|` (as a signed 64-bit integer) is at most `B_j = 2^P L1_j`, the
//!    bound every true product satisfies ([`crate::fixed`]);
//! 2. **Freivalds**: `sum_j Z[r, j] s[j] == sum_c X[r, c] u[c]` (mod 2^64) for each of the `t`
//!    vectors.
//!
//! Cost per layer: `rows * t * (n + k)` multiply-adds, against `rows * n * k` for the product.
//!
//! **Bound.** Z_2^64 is not a field: an error `2^63` in one entry passes a uniform `s` with
//! probability 1/2. The range check removes such errors. If `Z = XW^T + E` passes (1), every
//! entry of `E` (as an integer) has `|E[r, j]| <= 2 B_j <= 2^R` with `R = P + 1 + ceil(log2 max_j L1_j)`,
//! so a nonzero entry is divisible by at most `2^R`. For a row with a nonzero error whose least
//! 2-adic valuation is `v <= R`, `sum_j E[r, j] s[j]` is uniform over a coset of `2^v Z_2^64`
//! as `s` varies, so it is 0 with probability at most `2^-(64 - v) <= 2^-(64 - R)`. With `t`
//! independent vectors a wrong product passes with probability at most `2^-t(64 - R)`;
//! [`vectors_for`] picks the smallest `t` reaching [`TARGET_BITS`]. The servers never see `s`;
//! after one failed check the client refuses to continue with that pair of servers (so repeated
//! probing cannot learn `s` bit by bit).
use crate::error::{Result, ShareError};
use crate::fixed::{Format, QuantWeight};
use rand::RngCore;

/// Security target of the integrity check, in bits (a wrong product passes with probability at
/// most 2^-TARGET_BITS per layer call).
pub const TARGET_BITS: u32 = 40;

/// `(R, t, bits)`: the largest error magnitude exponent `R`, the vectors needed to reach
/// [`TARGET_BITS`], and the bits they give (`t * (64 - R)`).
pub fn vectors_for(format: &Format, l1_max: u64) -> (u32, usize, u32) {
    let l1_bits = 64 - l1_max.max(1).saturating_sub(1).leading_zeros(); // ceil(log2 L1)
    let r = format.bits + 1 + l1_bits;
    let per = 64u32.saturating_sub(r).max(1);
    let t = TARGET_BITS.div_ceil(per) as usize;
    (r, t, t as u32 * per)
}

/// The secret vectors of one weight and the bounds of its rows.
#[derive(Debug, Clone)]
pub struct Checker {
    n: usize,
    k: usize,
    /// `t` vectors `[n]`.
    s: Vec<Vec<u64>>,
    /// `u = W^T s`, `t` vectors `[k]`.
    u: Vec<Vec<u64>>,
    /// `B_j = 2^P L1_j` (below 2^62, [`Format::check_matrix`]).
    bound: Vec<u64>,
    /// Bits of the guarantee (`t * (64 - R)`).
    pub bits: u32,
}

impl Checker {
    /// Draws the vectors from `rng` and computes `u = W^T s`.
    pub fn new(w: &QuantWeight, format: &Format, rng: &mut impl RngCore) -> Self {
        let (_, t, bits) = vectors_for(format, w.l1_max());
        let (n, k) = (w.n, w.k);
        let mut s = Vec::with_capacity(t);
        let mut u = Vec::with_capacity(t);
        for _ in 0..t {
            let sv: Vec<u64> = (0..n).map(|_| rng.next_u64()).collect();
            let mut uv = vec![0u64; k];
            for (j, &sj) in sv.iter().enumerate() {
                crate::lanes::axpy_i16(&mut uv, sj, &w.q[j * k..(j + 1) * k]);
            }
            s.push(sv);
            u.push(uv);
        }
        let bound =
            w.l1.iter()
                .map(|&l| l.saturating_mul(1u64 << format.bits.min(62)))
                .collect();
        Self {
            n,
            k,
            s,
            u,
            bound,
            bits,
        }
    }

    /// Vectors held.
    pub fn vectors(&self) -> usize {
        self.s.len()
    }

    /// Checks summed products `z` (`[rows, n]`) against the encoded input `x` (`[rows, k]`);
    /// `what` names the layer in the error.
    pub fn verify(&self, x: &[u64], z: &[u64], what: &dyn std::fmt::Display) -> Result<()> {
        let (n, k) = (self.n, self.k);
        let fail = |message: String| ShareError::Integrity {
            layer: what.to_string(),
            message,
        };
        if n == 0 || k == 0 || !z.len().is_multiple_of(n) || x.len() != z.len() / n * k {
            return Err(fail(format!(
                "{} products for {} inputs of a [{n}, {k}] weight",
                z.len(),
                x.len()
            )));
        }
        for (r, (zr, xr)) in z.chunks_exact(n).zip(x.chunks_exact(k)).enumerate() {
            if !crate::lanes::within(zr, &self.bound) {
                let (j, v, b) = zr
                    .iter()
                    .zip(&self.bound)
                    .enumerate()
                    .find(|(_, (&v, &b))| (v as i64).unsigned_abs() > b)
                    .map(|(j, (&v, &b))| (j, v, b))
                    .unwrap_or((0, 0, 0));
                return Err(fail(format!(
                    "row {r}, output {j}: {} is outside the bound 2^{:.1} every true product \
                     satisfies",
                    v as i64,
                    (b as f64).log2()
                )));
            }
            for (t, (s, u)) in self.s.iter().zip(&self.u).enumerate() {
                let lhs = crate::lanes::dot(zr, s);
                let rhs = crate::lanes::dot(xr, u);
                if lhs != rhs {
                    return Err(fail(format!(
                        "row {r}: the products fail Freivalds vector {t} (a server returned a \
                         wrong product)"
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn setup() -> (
        QuantWeight,
        Format,
        Vec<u64>,
        Vec<u64>,
        rand_chacha::ChaCha20Rng,
    ) {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        let (n, k, rows) = (7, 19, 3);
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let q = QuantWeight::quantize(&w, n, k).unwrap();
        let f = Format::default();
        let x: Vec<f32> = (0..rows * k)
            .map(|_| rng.random_range(-50.0..50.0))
            .collect();
        let mut a = vec![0u64; rows * k];
        f.encode(&x, k, &mut a, &mut [0; 3], &"x").unwrap();
        let z = crate::ring::reference(&a, rows, k, &q.q, n);
        (q, f, a, z, rng)
    }

    #[test]
    fn true_products_pass_and_single_corruptions_fail() {
        let (q, f, a, z, mut rng) = setup();
        let c = Checker::new(&q, &f, &mut rng);
        assert!(c.bits >= TARGET_BITS && c.vectors() >= 1);
        c.verify(&a, &z, &"l").unwrap();
        // One element, odd or high-valuation errors, anywhere.
        for delta in [1u64, 2, 1 << 20, 1 << 40, 1 << 62, 1 << 63, u64::MAX] {
            for idx in [0, 5, z.len() - 1] {
                let mut bad = z.clone();
                bad[idx] = bad[idx].wrapping_add(delta);
                let e = c.verify(&a, &bad, &"layer 2 o").unwrap_err();
                assert!(e.to_string().contains("layer 2 o"), "{e}");
            }
        }
        // The adversarial pair that passes one Freivalds vector half the time in Z_2^64.
        let mut bad = z.clone();
        bad[0] = bad[0].wrapping_add(1 << 63);
        bad[1] = bad[1].wrapping_sub(1 << 63);
        assert!(c.verify(&a, &bad, &"l").is_err());
        // A wrong input length is an error, not a pass.
        assert!(c.verify(&a[1..], &z, &"l").is_err());
    }

    #[test]
    fn the_bound_counts_bits_per_vector() {
        let f = Format { bits: 24 };
        let (r, t, bits) = vectors_for(&f, 1 << 23);
        assert_eq!(r, 48);
        assert_eq!(t, 3);
        assert_eq!(bits, 48);
        let (_, t, _) = vectors_for(&f, (1 << 23) + 1);
        assert_eq!(t, 3); // R = 49: 15 bits per vector, 3 vectors give 45
    }
}
