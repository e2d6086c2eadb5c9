//! Composition of per-release privacy guarantees (the arithmetic; what counts as a release of a
//! record is [`crate::ledger`]'s job).
//!
//! - **Pure releases** (R3eLU, `eps`-DP each, `k` of them): **basic composition** `k eps`
//!   (`delta = 0`), or through zCDP (Bun & Steinke 2016: `eps`-DP is `eps^2/2`-zCDP, Prop. 1.4;
//!   zCDP adds; `rho`-zCDP is `(rho + 2 sqrt(rho ln(1/delta)), delta)`-DP, Prop. 1.3) when that
//!   is smaller ([`pure`] takes the smaller of the two and names it). For the few releases a
//!   record makes here (epochs + inference) basic composition is the smaller one.
//! - **Gaussian releases** (`mu`-GDP each, Dong, Roth & Su 2019): `k` of them compose exactly
//!   to `sqrt(k) mu`-GDP (their Cor. 3.3), converted to `(eps, delta)` by the exact duality
//!   `delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)` (Cor. 2.13).
//! - **Subsampling** helps only when the party that sees the releases does not know which
//!   records a batch holds: a release on a secret `gamma` subsample of an `eps`-DP mechanism is
//!   `ln(1 + gamma (e^eps - 1))`-DP ([`amplified`]). In vertical split learning the host derives
//!   every batch's rows from the shared seed, so the ledger never applies it.
//!
//! No accountant crate is used: crates.io has no maintained RDP/PRV accountant crate (only
//! copies inside unrelated larger crates), and what the ledger needs — basic composition of a
//! handful of pure releases and exact GDP composition — is a few lines each, tested below
//! against hand-computed values.

/// A composed guarantee: `(epsilon, delta)` and the method that gave it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Composed {
    pub epsilon: f64,
    pub delta: f64,
    /// `"basic"`, `"zcdp"` or `"gdp"`.
    pub method: &'static str,
}

/// `k` releases of an `eps`-DP mechanism by basic composition: `k eps`.
pub fn basic(eps: f64, k: usize) -> f64 {
    if k == 0 {
        return 0.0;
    }
    eps * k as f64
}

/// The zCDP parameter of an `eps`-DP release: `eps^2 / 2`.
pub fn zcdp_of_pure(eps: f64) -> f64 {
    eps * eps / 2.0
}

/// `rho`-zCDP as `(eps, delta)`-DP: `rho + 2 sqrt(rho ln(1/delta))`.
pub fn zcdp_epsilon(rho: f64, delta: f64) -> f64 {
    rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt()
}

/// `k` releases of an `eps`-DP mechanism: the smaller of basic composition (`delta = 0`) and the
/// zCDP route at `delta`.
pub fn pure(eps: f64, k: usize, delta: f64) -> Composed {
    let b = basic(eps, k);
    let z = zcdp_epsilon(k as f64 * zcdp_of_pure(eps), delta);
    if z < b {
        Composed {
            epsilon: z,
            delta,
            method: "zcdp",
        }
    } else {
        Composed {
            epsilon: b,
            delta: 0.0,
            method: "basic",
        }
    }
}

/// An `eps`-DP release on a secret `gamma` subsample: `ln(1 + gamma (e^eps - 1))`.
pub fn amplified(eps: f64, gamma: f64) -> f64 {
    if gamma <= 0.0 {
        return 0.0;
    }
    if !eps.is_finite() {
        return f64::INFINITY;
    }
    (gamma * eps.exp_m1()).ln_1p()
}

/// Standard normal CDF (erfc with a Chebyshev fit, |rel err| < 1.2e-7).
pub fn phi(x: f64) -> f64 {
    let z = -x / std::f64::consts::SQRT_2;
    let r = ln_erfc_pos(z.abs()).exp();
    0.5 * if z >= 0.0 { r } else { 2.0 - r }
}

/// `ln Phi(x)`, also in the far left tail where `Phi` itself underflows (`x < -38`).
pub fn ln_phi(x: f64) -> f64 {
    if x > -3.0 {
        return phi(x).ln();
    }
    0.5f64.ln() + ln_erfc_pos(-x / std::f64::consts::SQRT_2)
}

/// `ln erfc(z)` for `z >= 0` (Numerical Recipes' `erfcc`, which is of the form
/// `t exp(-z^2 + P(t))`, so its logarithm never underflows).
fn ln_erfc_pos(z: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.5 * z);
    t.ln()
        + (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
}

/// The `delta` at which a `mu`-GDP mechanism is `(eps, delta)`-DP:
/// `Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)`, the second term computed as
/// `exp(eps + ln Phi(..))` so that a large `eps` (`e^eps` overflows past 709) stays exact.
pub fn gdp_delta(eps: f64, mu: f64) -> f64 {
    if mu <= 0.0 {
        return 0.0;
    }
    if !mu.is_finite() {
        return 1.0;
    }
    let second = (eps + ln_phi(-eps / mu - mu / 2.0)).exp();
    (phi(-eps / mu + mu / 2.0) - second).max(0.0)
}

/// The largest `mu` with `gdp_delta(eps, mu) <= delta` (bisection; delta grows with mu).
pub fn mu_for(eps: f64, delta: f64) -> f64 {
    if !eps.is_finite() {
        return f64::INFINITY;
    }
    let (mut lo, mut hi) = (1e-6f64, 1.0f64);
    while gdp_delta(eps, hi) < delta && hi < 1e6 {
        hi *= 2.0;
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if gdp_delta(eps, mid) > delta {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    lo
}

/// The smallest `eps` at which a `mu`-GDP mechanism is `(eps, delta)`-DP (bisection; delta
/// falls as eps grows).
pub fn gdp_epsilon(mu: f64, delta: f64) -> f64 {
    if !mu.is_finite() {
        return f64::INFINITY;
    }
    if gdp_delta(0.0, mu) <= delta {
        return 0.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while gdp_delta(hi, mu) > delta && hi < 1e9 {
        hi *= 2.0;
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if gdp_delta(mid, mu) > delta {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

/// `k` releases of a `mu`-GDP mechanism: `sqrt(k) mu`-GDP, as `(eps, delta)`.
pub fn gaussian(mu: f64, k: usize, delta: f64) -> Composed {
    Composed {
        epsilon: gdp_epsilon(mu * (k as f64).sqrt(), delta),
        delta,
        method: "gdp",
    }
}

/// Noise multiplier of vfl's `GaussianDp` (std `sigma * clip` on L2-clipped rows) that makes one
/// release `(eps, delta_0)`-DP under replace-one neighbours (L2 sensitivity `2 clip`, so
/// `mu = 2 / sigma`). 0 for `eps = inf`.
pub fn gaussian_sigma(eps: f64, delta0: f64) -> f64 {
    if !eps.is_finite() {
        return 0.0;
    }
    2.0 / mu_for(eps, delta0)
}

/// Noise multiplier that makes `k` releases together `(eps_total, delta)`-DP (exact GDP
/// composition: per release `mu = mu_total / sqrt(k)`, `sigma = 2 / mu`). 0 for `inf`.
pub fn gaussian_sigma_total(eps_total: f64, k: usize, delta: f64) -> f64 {
    if !eps_total.is_finite() {
        return 0.0;
    }
    2.0 * (k.max(1) as f64).sqrt() / mu_for(eps_total, delta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phi_matches_known_values() {
        assert!((phi(0.0) - 0.5).abs() < 1e-7);
        assert!((phi(1.959_963_985) - 0.975).abs() < 1e-6);
        assert!((phi(-3.0) - 0.001_349_898).abs() < 1e-7);
    }

    #[test]
    fn pure_composition_by_hand() {
        // 3 epochs + 1 inference at eps 2: basic 4 x 2 = 8; zCDP rho = 4 x 2 = 8,
        // 8 + 2 sqrt(8 ln 1e5) = 8 + 2 x 9.5972 = 27.19 > 8, so basic, with delta 0
        let c = pure(2.0, 4, 1e-5);
        assert_eq!((c.epsilon, c.delta, c.method), (8.0, 0.0, "basic"));
        assert!((zcdp_epsilon(8.0, 1e-5) - 27.194_104).abs() < 1e-5);
        // 100 releases at eps 0.1: basic 10; zCDP rho = 100 x 0.005 = 0.5,
        // 0.5 + 2 sqrt(0.5 x 11.5129) = 0.5 + 4.7985 = 5.2985 < 10
        let c = pure(0.1, 100, 1e-5);
        assert_eq!((c.delta, c.method), (1e-5, "zcdp"));
        assert!((c.epsilon - 5.298_525).abs() < 1e-5, "{}", c.epsilon);
        // never below one release, never below k eps for few releases
        for k in 1..=10 {
            for eps in [0.5, 1.0, 2.0, 8.0] {
                let c = pure(eps, k, 1e-5);
                assert!(c.epsilon >= eps - 1e-12);
                assert!(c.epsilon >= k as f64 * eps - 1e-9, "k {k} eps {eps}");
            }
        }
        assert!(pure(f64::INFINITY, 3, 1e-5).epsilon.is_infinite());
        assert_eq!(basic(2.0, 0), 0.0);
    }

    #[test]
    fn amplification_by_hand() {
        // ln(1 + 0.1 (e^1 - 1)) = ln(1.1718282) = 0.158565
        assert!((amplified(1.0, 0.1) - 0.158_565_5).abs() < 1e-6);
        // no subsample, no gain; and never the (wrong) linear gamma * eps below a bound of
        // the exact form for large eps: eps 10, gamma 0.01 -> ln(1 + 0.01 (e^10 - 1)) = 5.3992
        assert!((amplified(2.0, 1.0) - 2.0).abs() < 1e-12);
        assert!((amplified(10.0, 0.01) - 5.399_314).abs() < 1e-5);
        assert!(amplified(10.0, 0.01) > 0.01 * 10.0);
    }

    #[test]
    fn gaussian_composition_is_exact_gdp() {
        // mu = 1: delta(0) = Phi(1/2) - Phi(-1/2) = 0.382925
        assert!((gdp_delta(0.0, 1.0) - 0.382_924_9).abs() < 1e-6);
        // 4 releases of mu = 0.5 are one release of mu = 1
        let a = gaussian(0.5, 4, 1e-5);
        let b = gaussian(1.0, 1, 1e-5);
        assert!((a.epsilon - b.epsilon).abs() < 1e-9 && a.method == "gdp");
        // the epsilon found meets delta: delta(eps_total) = 1e-5
        assert!((gdp_delta(b.epsilon, 1.0) - 1e-5).abs() < 1e-9);
        // calibration from a total: sigma for (8, 1e-5) over 4 releases composes back to 8
        let s = gaussian_sigma_total(8.0, 4, 1e-5);
        let back = gaussian(2.0 / s, 4, 1e-5).epsilon;
        assert!((back - 8.0).abs() < 1e-6, "{back}");
        assert_eq!(gaussian_sigma_total(f64::INFINITY, 4, 1e-5), 0.0);
    }

    #[test]
    fn the_far_tail_stays_exact_at_large_epsilon() {
        // ln Phi(-40) = ln(phi(40) / 40 (1 - 1/40^2 + ...)) = -800 - ln 40 - ln sqrt(2 pi) - 6.2e-4
        let want = -800.0 - 40f64.ln() - (2.0 * std::f64::consts::PI).sqrt().ln() - 6.24e-4;
        assert!((ln_phi(-40.0) - want).abs() < 1e-5, "{}", ln_phi(-40.0));
        assert!((ln_phi(-2.0) - phi(-2.0).ln()).abs() < 1e-12);
        // totals whose e^eps overflows: calibrate from the total and account it back
        for total in [512.0, 2048.0, 8192.0] {
            let s = gaussian_sigma_total(total, 4, 1e-5);
            let back = gaussian(2.0 / s, 4, 1e-5).epsilon;
            assert!((back - total).abs() < 1e-6 * total, "{total}: {back}");
            assert!((gdp_delta(total, 4.0 / s) - 1e-5).abs() < 1e-9);
        }
    }

    #[test]
    fn gaussian_calibration_meets_delta_exactly() {
        for &eps in &[0.5, 1.0, 2.0, 8.0] {
            let mu = mu_for(eps, 1e-6);
            let d = gdp_delta(eps, mu);
            assert!(d <= 1e-6 && d > 0.98e-6, "eps {eps}: mu {mu} delta {d}");
        }
        // less budget, more noise
        assert!(gaussian_sigma(0.5, 1e-6) > gaussian_sigma(2.0, 1e-6));
        // classic bound sqrt(2 ln(1.25/d))/eps (valid for eps < 1) is looser than the exact one
        let classic = (2.0 * (1.25f64 / 1e-6).ln()).sqrt() / 0.5 * 2.0;
        assert!(gaussian_sigma(0.5, 1e-6) < classic);
        assert_eq!(gaussian_sigma(f64::INFINITY, 1e-6), 0.0);
    }
}
