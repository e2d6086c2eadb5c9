//! AloePri key matrices (Algorithm 1) and the per-component keys drawn from them.
//!
//! All keys of one model come from ONE [`KeyInit`]: `P Q = B B^-1 + C F + E D = I` holds for any
//! `P` and `Q` drawn from the same Init (fresh `C` for every writer, fresh `D` for every reader).
use crate::error::Result;
use crate::linalg::{complement_basis, gaussian, haar_orthogonal, inverse, matmul};
use crate::params::ObfuscationParams;
use nalgebra::DMatrix;
use rand::Rng;

/// Algorithm 1 `Init`: the secrets shared by every key of one model.
#[derive(Debug, Clone)]
pub struct KeyInit {
    d: usize,
    h: usize,
    /// `B = U + lambda V` (`d x d`).
    b: DMatrix<f64>,
    b_inv: DMatrix<f64>,
    /// `E = E1 E2` (`d x h`, rank h/2); zero without junk.
    e: DMatrix<f64>,
    /// `F = F1 F2` (`h x d`, rank h/2).
    f: DMatrix<f64>,
    /// `Z` uniform in O(d + 2h).
    z: DMatrix<f64>,
    /// Columns span the left null space of `F1` (`h x h/2`): `C = G Nc^T` gives `C F = 0`.
    c_null: Option<DMatrix<f64>>,
    /// Columns span the null space of `E2` (`h x h/2`): `D = Nd G` gives `E D = 0`.
    d_null: Option<DMatrix<f64>>,
}

impl KeyInit {
    /// Draws the Init for hidden size `d` under `params` (Algorithm 1).
    pub fn new<R: Rng>(rng: &mut R, d: usize, params: &ObfuscationParams) -> Result<Self> {
        let h = params.h;
        let half = h / 2;
        let s = 1.0 / (d as f64).sqrt();
        let u = haar_orthogonal(rng, d);
        let v = gaussian(rng, d, d, s);
        let b = &u + v * params.lambda;
        let b_inv = inverse(&b)?;
        let z = haar_orthogonal(rng, d + 2 * h);
        let f1 = gaussian(rng, h, half, s);
        let f2 = gaussian(rng, half, d, s);
        let f = &f1 * &f2;
        let (e, c_null, d_null) = if params.junk && h > 0 {
            let e1 = gaussian(rng, d, half, s);
            let e2 = gaussian(rng, half, h, s);
            let c_null = complement_basis(rng, &f1, half)?;
            let d_null = complement_basis(rng, &e2.transpose(), half)?;
            (&e1 * &e2, Some(c_null), Some(d_null))
        } else {
            (DMatrix::zeros(d, h), None, None)
        };
        Ok(Self {
            d,
            h,
            b,
            b_inv,
            e,
            f,
            z,
            c_null,
            d_null,
        })
    }

    pub fn d(&self) -> usize {
        self.d
    }

    /// Obfuscated residual width `d' = d + 2h`.
    pub fn d_prime(&self) -> usize {
        self.d + 2 * self.h
    }

    /// KeyMatGen: a writer key `P = [B C E] Z` (`d x d'`) with a fresh `C`, `C F = 0`.
    pub fn p_key<R: Rng>(&self, rng: &mut R) -> DMatrix<f64> {
        let (d, h) = (self.d, self.h);
        let mut bce = DMatrix::zeros(d, d + 2 * h);
        bce.view_mut((0, 0), (d, d)).copy_from(&self.b);
        if let Some(nc) = &self.c_null {
            let g = gaussian(rng, d, h / 2, 1.0 / (d as f64).sqrt());
            let c = g * nc.transpose();
            bce.view_mut((0, d), (d, h)).copy_from(&c);
        }
        bce.view_mut((0, d + h), (d, h)).copy_from(&self.e);
        matmul(&bce, &self.z)
    }

    /// InvKeyMatGen: a reader key `Q = Z^T [B^-1 ; F ; D]` (`d' x d`) with a fresh `D`, `E D = 0`.
    pub fn q_key<R: Rng>(&self, rng: &mut R) -> DMatrix<f64> {
        let (d, h) = (self.d, self.h);
        let s = 1.0 / (d as f64).sqrt();
        let mut stacked = DMatrix::zeros(d + 2 * h, d);
        stacked.view_mut((0, 0), (d, d)).copy_from(&self.b_inv);
        stacked.view_mut((d, 0), (h, d)).copy_from(&self.f);
        let dm = match &self.d_null {
            Some(nd) => nd * gaussian(rng, h / 2, d, s),
            None => gaussian(rng, h, d, s),
        };
        stacked.view_mut((d + h, 0), (h, d)).copy_from(&dm);
        matmul(&self.z.transpose(), &stacked)
    }

    /// `r^2 = ||P||_F^2 / d`: the expected `||x P||^2 / ||x||^2` for isotropic `x`, used to
    /// calibrate the stock RMSNorm of the obfuscated model.
    pub fn expected_gain_sq(p: &DMatrix<f64>) -> f64 {
        p.norm_squared() / p.nrows() as f64
    }
}

/// Per-KV-head attention keys (Algorithm 2), `hd x hd` each, row convention.
#[derive(Debug, Clone)]
pub struct HeadKeys {
    /// `R H Zb` applied to every query head of the group.
    pub q: DMatrix<f64>,
    /// `R H^-1 Zb` applied to the key head.
    pub k: DMatrix<f64>,
    /// `U_vo` applied to the value head.
    pub v: DMatrix<f64>,
    /// `U_vo^-1` applied to the rows of `Wo` of every query head of the group.
    pub o: DMatrix<f64>,
}

impl HeadKeys {
    /// Draws `R` (2x2 rotations on the HF rotate_half pairs `(j, j + hd/2)`), `H = diag(s_j I2)`,
    /// the RoPE block permutation `Zb` with window `beta`, and a well-conditioned random `U_vo`.
    pub fn draw<R: Rng>(rng: &mut R, hd: usize, beta: usize) -> Result<Self> {
        let half = hd / 2;
        let mut rot = DMatrix::zeros(hd, hd);
        let mut scale = DMatrix::zeros(hd, hd);
        let mut scale_inv = DMatrix::zeros(hd, hd);
        for j in 0..half {
            let theta: f64 = rng.random_range(0.0..std::f64::consts::TAU);
            let (s, c) = theta.sin_cos();
            rot[(j, j)] = c;
            rot[(j, j + half)] = s;
            rot[(j + half, j)] = -s;
            rot[(j + half, j + half)] = c;
            let sc: f64 = 2f64.powf(rng.random_range(-1.0..1.0));
            for a in [j, j + half] {
                scale[(a, a)] = sc;
                scale_inv[(a, a)] = 1.0 / sc;
            }
        }
        let zb = block_permutation(rng, hd, beta);
        // U_vo = O1 diag(s) O2 with Haar O1, O2 and s log-uniform in [1/2, 2]: a random invertible
        // map like the paper's N(0, 1/hd) draw, but with condition number <= 4 — a Gaussian
        // 64 x 64 matrix typically has ~300, which amplifies F32 rounding in the served checkpoint.
        let o1 = haar_orthogonal(rng, hd);
        let o2 = haar_orthogonal(rng, hd);
        let s = DMatrix::from_diagonal(&nalgebra::DVector::from_fn(hd, |_, _| {
            2f64.powf(rng.random_range(-1.0..1.0))
        }));
        let u = &o1 * s * &o2;
        let u_inv = inverse(&u)?;
        Ok(Self {
            q: &rot * &scale * &zb,
            k: &rot * &scale_inv * &zb,
            v: u,
            o: u_inv,
        })
    }
}

/// The RoPE block permutation `Zb` (`hd x hd` permutation matrix) moving whole rotate_half pairs
/// `(j, j + hd/2)` inside windows of at most `beta` pairs. Frequencies fall with `j`, so the first
/// quarter of the pairs (the highest frequencies) never move and windows grow towards `beta` in
/// the low-frequency tail. `beta = 1` is the identity (exact). Approximate otherwise: it does not
/// commute with RoPE.
pub fn block_permutation<R: Rng>(rng: &mut R, hd: usize, beta: usize) -> DMatrix<f64> {
    let half = hd / 2;
    let mut order: Vec<usize> = (0..half).collect();
    let mut j = half / 4;
    while beta > 1 && j < half {
        let max_w = beta.min(half - j);
        let w = rng.random_range(1..=max_w);
        let window = &mut order[j..j + w];
        for i in (1..w).rev() {
            let k = rng.random_range(0..=i);
            window.swap(i, k);
        }
        j += w;
    }
    let mut m = DMatrix::zeros(hd, hd);
    for (new, &old) in order.iter().enumerate() {
        m[(old, new)] = 1.0;
        m[(old + half, new + half)] = 1.0;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn max_abs(m: &DMatrix<f64>) -> f64 {
        m.abs().max()
    }

    #[test]
    fn any_p_q_pair_from_one_init_is_an_inverse() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        for params in [
            ObfuscationParams::paper(),
            ObfuscationParams::exact(8),
            ObfuscationParams::exact(0),
        ] {
            let params = ObfuscationParams {
                h: params.h.min(16),
                ..params
            };
            let init = KeyInit::new(&mut rng, 24, &params).unwrap();
            let p1 = init.p_key(&mut rng);
            let p2 = init.p_key(&mut rng);
            let q1 = init.q_key(&mut rng);
            let q2 = init.q_key(&mut rng);
            for (p, q) in [(&p1, &q1), (&p1, &q2), (&p2, &q1)] {
                let err = max_abs(&(p * q - DMatrix::identity(24, 24)));
                assert!(err < 1e-9, "{params:?}: {err}");
            }
            if params.junk {
                // Fresh C per writer: two writer keys differ.
                assert!(max_abs(&(&p1 - &p2)) > 1e-3);
            }
        }
    }

    #[test]
    fn exact_keys_preserve_norms() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let init = KeyInit::new(&mut rng, 16, &ObfuscationParams::exact(4)).unwrap();
        let p = init.p_key(&mut rng);
        let ppt = &p * p.transpose();
        assert!(max_abs(&(ppt - DMatrix::identity(16, 16))) < 1e-10);
        assert!((KeyInit::expected_gain_sq(&p) - 1.0).abs() < 1e-10);
    }

    #[test]
    fn head_keys_preserve_scores_and_values() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let hk = HeadKeys::draw(&mut rng, 8, 1).unwrap();
        // q M_q (k M_k)^T = q k^T
        let prod = &hk.q * hk.k.transpose();
        assert!(max_abs(&(prod - DMatrix::identity(8, 8))) < 1e-10);
        assert!(max_abs(&(&hk.v * &hk.o - DMatrix::identity(8, 8))) < 1e-9);
        let sv = hk.v.clone().singular_values();
        assert!(sv.max() / sv.min() <= 4.0 + 1e-9);
    }

    #[test]
    fn block_permutation_is_a_pair_preserving_permutation() {
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        let m = block_permutation(&mut rng, 64, 8);
        assert!(max_abs(&(&m * m.transpose() - DMatrix::identity(64, 64))) < 1e-12);
        for j in 0..8 {
            assert_eq!(m[(j, j)], 1.0, "high-frequency pair {j} moved");
        }
        let moved = (0..32).filter(|&j| m[(j, j)] == 0.0).count();
        assert!(moved > 0);
        assert_eq!(
            block_permutation(&mut rng, 64, 1),
            DMatrix::identity(64, 64)
        );
    }
}
