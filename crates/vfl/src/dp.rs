//! mu-GDP accounting for Gaussian noise on published embeddings (Dong, Roth & Su, "Gaussian
//! Differential Privacy"; Bu et al., "Deep Learning with Gaussian Differential Privacy").
//!
//! One release of a record's clipped embedding row with noise `N(0, (sigma C)^2)` is
//! `(1/sigma)`-GDP. Over `T` steps with sampling ratio `q = B/n` the central-limit accountant gives
//! `mu = q * sqrt(T * (exp(1/sigma^2) - 1))` (eq. 6 of Bu et al.); the conservative bound without
//! amplification by sampling, for `E` epochs (each record released once per epoch), is
//! `mu = sqrt(E) / sigma`.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spent {
    pub sigma: f64,
    /// Moments/CLT accountant with sampling ratio q.
    pub mu_clt: f64,
    /// Plain composition over epochs, no sampling amplification.
    pub mu_composition: f64,
}

pub fn mu_clt(q: f64, steps: usize, sigma: f64) -> f64 {
    if sigma <= 0.0 {
        return f64::INFINITY;
    }
    q * ((steps as f64) * ((1.0 / (sigma * sigma)).exp() - 1.0)).sqrt()
}

pub fn mu_composition(epochs: usize, sigma: f64) -> f64 {
    if sigma <= 0.0 {
        return f64::INFINITY;
    }
    (epochs as f64).sqrt() / sigma
}

/// The smallest noise multiplier `sigma` with `mu_clt(q, steps, sigma) <= mu` (bisection).
pub fn sigma_for_mu(mu: f64, q: f64, steps: usize) -> f64 {
    if !mu.is_finite() {
        return 0.0;
    }
    let (mut lo, mut hi) = (0.05f64, 1000.0f64);
    if mu_clt(q, steps, lo) <= mu {
        return lo;
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mu_clt(q, steps, mid) > mu {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_inverts_accounting() {
        for &mu in &[0.1, 0.5, 1.0, 2.0, 8.0] {
            let s = sigma_for_mu(mu, 256.0 / 34000.0, 5 * 133);
            let got = mu_clt(256.0 / 34000.0, 5 * 133, s);
            assert!(got <= mu + 1e-9 && got > mu * 0.999, "{mu} {s} {got}");
        }
        // more privacy needs more noise
        assert!(sigma_for_mu(0.5, 0.01, 500) > sigma_for_mu(2.0, 0.01, 500));
        assert_eq!(mu_composition(4, 2.0), 1.0);
        assert!(sigma_for_mu(f64::INFINITY, 0.01, 10) == 0.0);
    }
}
