//! Per-record privacy accounting of a split-learning run: what one record's data goes through,
//! and the composed guarantee.
//!
//! **What counts.** Every release of a record's cut-layer row: one per training epoch and
//! `inference_releases` after training (the attacks' victim traffic is that release). The host
//! derives each batch's rows from the shared seed (vertical split learning aligns ids), so it
//! knows which records every batch holds: subsampling gives **no amplification**, and a record
//! is released exactly `epochs` times in training, whatever the batch size.
//!
//! **What composes how.** R3eLU's release is `eps`-DP for any two rows (see
//! [`crate::mechanism`]); `k` releases compose to `k eps` (basic composition, `delta = 0`;
//! [`accountant::pure`] would switch to zCDP where that is smaller, never the case for the
//! handful of releases here). The Gaussian baseline's `k` releases compose exactly as GDP
//! ([`accountant::gaussian`]) at the run's `delta`.
//!
//! **What is not a release of the guest's data.** The gradient the host sends back is a
//! function of the published rows, the host's labels and its top model (trained on published
//! rows and labels): post-processing, from the guest's side. R3eLU's backward mechanism
//! protects the host's *labels* from the guest; its count is reported apart
//! (`label_epsilon_total`: one gradient row per record per epoch).
//!
//! **What this does not bound.** The guest trains its bottom model on its raw rows without
//! noise on the parameter updates, and the updated bottom shapes every later release of every
//! other record. `epsilon_total` bounds what a record's own releases reveal (whatever the bottom
//! model and whatever the host sends back, FSHA included); it is not a bound for the whole
//! protocol on neighbouring datasets, which would also need the guest's updates privatized
//! (DP-SGD on the bottom model). The fine-grained budget is not accounted at all: its noise
//! scales come from the guest's private activations.
use crate::accountant;
use crate::config::{Defense, SplitConfig};
use crate::mechanism::Budget;
use serde::{Deserialize, Serialize};

/// One record's accounted privacy in a run (`None` = unbounded / not accounted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accounting {
    /// Releases of one record's cut-layer row: training epochs + inference passes.
    pub releases: usize,
    /// Epsilon of one release (R3eLU: pure; Gaussian: at `delta0`, or derived from the total).
    pub epsilon_release: Option<f64>,
    /// The composed epsilon over `releases`.
    pub epsilon_total: Option<f64>,
    pub delta_total: f64,
    /// `"basic"`, `"zcdp"`, `"gdp"`, or `"none"`.
    pub composition: String,
    /// Gaussian baseline: noise multiplier (std `sigma * clip`) and the record's total mu.
    pub gaussian_sigma: f64,
    pub mu_total: Option<f64>,
    /// R3eLU: the backward mechanism's guarantee for one of the host's labels over training
    /// (basic composition of `epochs` releases); not part of `epsilon_total`.
    pub label_epsilon_total: Option<f64>,
    /// Why a run is not accounted.
    pub note: Option<String>,
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// The accounting of `cfg` (see the module docs for what it counts).
pub fn account(cfg: &SplitConfig) -> Accounting {
    let k = cfg.releases();
    let none = Accounting {
        releases: k,
        epsilon_release: None,
        epsilon_total: None,
        delta_total: 0.0,
        composition: "none".into(),
        gaussian_sigma: 0.0,
        mu_total: None,
        label_epsilon_total: None,
        note: None,
    };
    match cfg.defense {
        Defense::None => none,
        Defense::R3elu if cfg.r3.budget == Budget::Fine => Accounting {
            note: Some(
                "fine budget: the Laplace scales come from the guest's private activations, \
                 so a release has no DP bound"
                    .into(),
            ),
            ..none
        },
        Defense::R3elu => {
            // (R1) of the mechanism: equal to r3.eps by construction of its parameters
            let eps = cfg.r3.release_epsilon(cfg.cut);
            let c = accountant::pure(eps, k, cfg.delta);
            Accounting {
                epsilon_release: finite(eps),
                epsilon_total: finite(c.epsilon),
                delta_total: c.delta,
                composition: c.method.into(),
                label_epsilon_total: finite(accountant::basic(eps, cfg.epochs)),
                ..none
            }
        }
        Defense::GaussianDp => {
            let sigma = cfg.gaussian_sigma();
            if sigma <= 0.0 {
                return none;
            }
            let mu = 2.0 / sigma;
            let c = accountant::gaussian(mu, k, cfg.delta);
            Accounting {
                epsilon_release: match cfg.epsilon_total {
                    Some(_) => finite(accountant::gdp_epsilon(mu, cfg.delta0)),
                    None => finite(cfg.r3.eps),
                },
                epsilon_total: finite(c.epsilon),
                delta_total: c.delta,
                composition: c.method.into(),
                gaussian_sigma: sigma,
                mu_total: Some(mu * (k as f64).sqrt()),
                ..none
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(defense: Defense, eps: f64, epochs: usize) -> SplitConfig {
        let mut c = SplitConfig {
            defense,
            epochs,
            ..Default::default()
        };
        c.r3.eps = eps;
        c
    }

    #[test]
    fn r3elu_counts_every_epoch_and_the_inference_release() {
        // the case: --train 50000 --epochs 3 --epsilon 2 reported 0.61 (sampling ratio
        // 64/50000 applied); per record it is 3 epochs + 1 inference = 4 releases of eps 2
        let mut c = cfg(Defense::R3elu, 2.0, 3);
        c.sizes.train = 50_000;
        let a = account(&c);
        assert_eq!(a.releases, 4);
        assert!((a.epsilon_release.unwrap() - 2.0).abs() < 1e-9);
        assert!((a.epsilon_total.unwrap() - 8.0).abs() < 1e-9);
        assert_eq!((a.delta_total, a.composition.as_str()), (0.0, "basic"));
        assert!((a.label_epsilon_total.unwrap() - 6.0).abs() < 1e-9);
        // the batch size does not matter (no amplification), the epochs do
        c.batch = 8;
        assert_eq!(account(&c).epsilon_total, a.epsilon_total);
        let a5 = account(&cfg(Defense::R3elu, 2.0, 5));
        assert!((a5.epsilon_total.unwrap() - 12.0).abs() < 1e-9);
        // never below epochs x per-release epsilon
        for (eps, e) in [(0.5, 1), (1.0, 3), (8.0, 10), (64.0, 2)] {
            let a = account(&cfg(Defense::R3elu, eps, e));
            assert!(a.epsilon_total.unwrap() >= e as f64 * eps - 1e-9);
        }
        // no inference release counted when there is none
        let mut c = cfg(Defense::R3elu, 2.0, 3);
        c.inference_releases = 0;
        assert!((account(&c).epsilon_total.unwrap() - 6.0).abs() < 1e-9);
    }

    #[test]
    fn unbounded_and_unaccounted_runs_say_so() {
        let a = account(&cfg(Defense::None, 2.0, 3));
        assert!(a.epsilon_total.is_none() && a.composition == "none");
        let a = account(&cfg(Defense::R3elu, f64::INFINITY, 3));
        assert!(a.epsilon_total.is_none() && a.epsilon_release.is_none());
        let mut c = cfg(Defense::R3elu, 2.0, 3);
        c.r3.budget = Budget::Fine;
        let a = account(&c);
        assert!(a.epsilon_total.is_none());
        assert!(a.note.unwrap().contains("fine budget"));
        assert!(account(&cfg(Defense::GaussianDp, f64::INFINITY, 3))
            .epsilon_total
            .is_none());
    }

    #[test]
    fn gaussian_composes_as_gdp_and_meets_a_total() {
        // per release (2, 1e-6): mu_r = mu_for(2, 1e-6); 4 releases: 2 mu_r -GDP at 1e-5
        let a = account(&cfg(Defense::GaussianDp, 2.0, 3));
        let mu_r = accountant::mu_for(2.0, 1e-6);
        assert!((a.mu_total.unwrap() - 2.0 * mu_r).abs() < 1e-9);
        let want = accountant::gdp_epsilon(2.0 * mu_r, 1e-5);
        assert!((a.epsilon_total.unwrap() - want).abs() < 1e-9);
        assert_eq!((a.composition.as_str(), a.delta_total), ("gdp", 1e-5));
        // at a total epsilon, both defenses are accounted at exactly that total
        for d in [Defense::R3elu, Defense::GaussianDp] {
            let c = cfg(d, 1.0, 3).with_total(16.0);
            let a = account(&c);
            assert!((a.epsilon_total.unwrap() - 16.0).abs() < 1e-6, "{d}");
        }
    }
}
