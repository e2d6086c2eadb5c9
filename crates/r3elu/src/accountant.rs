//! Privacy accounting.
//!
//! R3eLU (the notes' accountant): strong composition with sampling ratio `gamma = B / n` over `T`
//! steps of an `eps`-DP release,
//! `eps_tot = gamma eps sqrt(2 T ln(1/delta)) + gamma eps T (e^{gamma eps} - 1)`.
//!
//! Gaussian baseline at the *same* accounted epsilon: its per-release `(eps, delta_0)` is met
//! exactly (the analytic Gaussian mechanism via mu-GDP, Dong, Roth & Su, Cor. 2.13:
//! `delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)`), then the same composition
//! gives the same `eps_tot` (its `delta` grows by `T gamma delta_0`). The vfl crate's mu-GDP
//! CLT accountant is reported beside it.

/// `eps_tot` of `T` releases of an `eps`-DP mechanism on a `gamma` subsample (strong composition).
pub fn strong_composition(eps: f64, gamma: f64, steps: usize, delta: f64) -> f64 {
    if !eps.is_finite() {
        return f64::INFINITY;
    }
    let t = steps as f64;
    gamma * eps * (2.0 * t * (1.0 / delta).ln()).sqrt()
        + gamma * eps * t * ((gamma * eps).exp() - 1.0)
}

/// Standard normal CDF (erfc with a Chebyshev fit, |rel err| < 1.2e-7).
pub fn phi(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// The `delta` at which a `mu`-GDP mechanism is `(eps, delta)`-DP.
pub fn gdp_delta(eps: f64, mu: f64) -> f64 {
    if mu <= 0.0 {
        return 0.0;
    }
    (phi(-eps / mu + mu / 2.0) - eps.exp() * phi(-eps / mu - mu / 2.0)).max(0.0)
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

/// Noise multiplier of vfl's `GaussianDp` (std `sigma * clip` on L2-clipped rows) that makes one
/// release `(eps, delta_0)`-DP under replace-one neighbours (L2 sensitivity `2 clip`, so
/// `mu = 2 / sigma`). 0 for `eps = inf`.
pub fn gaussian_sigma(eps: f64, delta0: f64) -> f64 {
    if !eps.is_finite() {
        return 0.0;
    }
    2.0 / mu_for(eps, delta0)
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
    fn strong_composition_formula_and_monotonicity() {
        let (eps, g, t, d) = (1.0, 0.01, 1000usize, 1e-5);
        let want =
            0.01 * (2.0 * 1000.0 * (1e5f64).ln()).sqrt() + 0.01 * 1000.0 * (0.01f64.exp() - 1.0);
        assert!((strong_composition(eps, g, t, d) - want).abs() < 1e-12);
        assert!(strong_composition(2.0, g, t, d) > strong_composition(1.0, g, t, d));
        assert!(strong_composition(1.0, g, 2 * t, d) > strong_composition(1.0, g, t, d));
        assert!(strong_composition(f64::INFINITY, g, t, d).is_infinite());
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
