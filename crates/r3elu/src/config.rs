//! The job both parties agree on before training, and the cut layer it asks for.
use crate::accountant;
use crate::data::{DataKind, Sizes};
use crate::error::{R3Error, Result};
use crate::mechanism::{R3elu, R3eluConfig};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use umbra_vfl::cut::{CutLayer, GaussianDp, Identity};

/// The defense on the cut layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Defense {
    None,
    R3elu,
    GaussianDp,
}

impl std::fmt::Display for Defense {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Defense::None => "none",
            Defense::R3elu => "r3elu",
            Defense::GaussianDp => "gaussian-dp",
        })
    }
}

/// Everything both parties agree on before training.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SplitConfig {
    pub job: String,
    pub data: DataKind,
    pub sizes: Sizes,
    pub defense: Defense,
    /// R3eLU parameters; `r3.eps` is the per-release epsilon (of the Gaussian baseline too,
    /// unless `epsilon_total` is set) and `r3.clip` also the Gaussian's L2 row clip.
    pub r3: R3eluConfig,
    /// A total epsilon per record instead of a per-release one: each defense's per-release
    /// noise is derived from it over [`SplitConfig::releases`] (see [`SplitConfig::with_total`]).
    #[serde(default)]
    pub epsilon_total: Option<f64>,
    /// Target delta of the composed guarantee (Gaussian; R3eLU composes with delta 0).
    pub delta: f64,
    /// Per-release delta of the Gaussian baseline when it is given a per-release epsilon.
    pub delta0: f64,
    pub epochs: usize,
    /// Times each record's row is published after training (inference; the attacks' victim
    /// traffic is this release).
    #[serde(default = "one")]
    pub inference_releases: usize,
    pub batch: usize,
    pub lr: f64,
    /// Cut width `N`.
    pub cut: usize,
    pub hidden: usize,
    pub top_hidden: usize,
    pub seed: u64,
    #[serde(skip)]
    pub progress: bool,
}

fn one() -> usize {
    1
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            job: "r3elu".into(),
            data: DataKind::FashionMnist,
            sizes: Sizes {
                train: 10_000,
                test: 2_000,
                aux: 5_000,
            },
            defense: Defense::R3elu,
            r3: R3eluConfig::default(),
            epsilon_total: None,
            delta: 1e-5,
            delta0: 1e-6,
            epochs: 5,
            inference_releases: 1,
            batch: 64,
            lr: 1e-3,
            cut: 64,
            hidden: 256,
            top_hidden: 128,
            seed: 7,
            progress: false,
        }
    }
}

impl SplitConfig {
    /// Refuses what cannot run or cannot be accounted: non-positive epsilons, empty splits,
    /// a delta outside (0, 1), zero sizes of the model.
    pub fn validate(&self) -> Result<()> {
        if self.defense != Defense::None {
            self.r3.validate()?;
        }
        if let Some(t) = self.epsilon_total {
            if t.is_nan() || t <= 0.0 {
                return Err(R3Error::Config(format!(
                    "the total epsilon must be > 0, got {t}"
                )));
            }
        }
        if self.epochs == 0 || self.batch == 0 || self.cut < 2 || self.hidden == 0 {
            return Err(R3Error::Config(
                "epochs, batch and hidden must be >= 1 and the cut width >= 2".into(),
            ));
        }
        if self.sizes.train == 0 {
            return Err(R3Error::Config(
                "the training split is empty (--train 0): the guest has no rows to train on".into(),
            ));
        }
        if self.sizes.test == 0 {
            return Err(R3Error::Config(
                "the test split is empty (--test 0): nothing to evaluate the model on".into(),
            ));
        }
        let unit = |d: f64| d > 0.0 && d < 1.0;
        if !unit(self.delta) || !unit(self.delta0) {
            return Err(R3Error::Config("delta must be in (0, 1)".into()));
        }
        Ok(())
    }

    /// Training steps (batches) of the run.
    pub fn steps(&self) -> usize {
        self.epochs * self.sizes.train.div_ceil(self.batch)
    }

    /// Releases of one record's cut-layer row: one per training epoch (the host knows every
    /// batch's rows, so each record is in exactly one batch per epoch) plus the inference ones.
    pub fn releases(&self) -> usize {
        self.epochs + self.inference_releases
    }

    /// This configuration at a total epsilon per record: R3eLU releases at `total / releases`
    /// each (basic composition gives back `total`), the Gaussian baseline's noise comes from
    /// exact GDP composition to `(total, delta)`.
    pub fn with_total(mut self, total: f64) -> Self {
        self.epsilon_total = Some(total);
        self.r3.eps = total / self.releases() as f64;
        self
    }

    /// The Gaussian baseline's noise multiplier (0 for an infinite epsilon).
    pub fn gaussian_sigma(&self) -> f64 {
        match self.epsilon_total {
            Some(t) => accountant::gaussian_sigma_total(t, self.releases(), self.delta),
            None => accountant::gaussian_sigma(self.r3.eps, self.delta0),
        }
    }
}

/// A cut layer shared by the threads of a party.
pub type SharedCut = Arc<dyn CutLayer>;

/// The cut layer of a configuration (each party builds its own from the shared config) and,
/// for R3eLU, the handle that tracks the Taylor importance.
pub fn make_cut(cfg: &SplitConfig) -> Result<(SharedCut, Option<Arc<R3elu>>)> {
    Ok(match cfg.defense {
        Defense::None => (Arc::new(Identity), None),
        Defense::R3elu => {
            let r = Arc::new(R3elu::new(cfg.r3)?);
            (r.clone(), Some(r))
        }
        Defense::GaussianDp => (
            Arc::new(GaussianDp {
                clip: cfg.r3.clip,
                sigma: cfg.gaussian_sigma(),
            }),
            None,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_gets_a_clear_error() {
        let ok = SplitConfig::default();
        ok.validate().unwrap();
        let msg = |c: SplitConfig| c.validate().unwrap_err().to_string();
        let mut c = ok.clone();
        c.r3.eps = 0.0;
        assert!(msg(c).contains("epsilon must be > 0"));
        let mut c = ok.clone();
        c.r3.eps = -2.0;
        assert!(msg(c).contains("epsilon must be > 0"));
        let c = ok.clone().with_total(-1.0);
        assert!(msg(c).contains("epsilon must be > 0"));
        let mut c = ok.clone();
        c.sizes.train = 0;
        assert!(msg(c).contains("training split is empty"));
        let mut c = ok.clone();
        c.sizes.test = 0;
        assert!(msg(c).contains("test split is empty"));
        let mut c = ok.clone();
        c.delta = 0.0;
        assert!(msg(c).contains("delta"));
        // no defense: its epsilon is not used, so not checked
        let mut c = ok;
        c.defense = Defense::None;
        c.r3.eps = 0.0;
        c.validate().unwrap();
    }

    #[test]
    fn a_total_epsilon_sets_both_defenses() {
        let c = SplitConfig {
            epochs: 3,
            ..Default::default()
        }
        .with_total(8.0);
        assert_eq!(c.releases(), 4);
        assert_eq!(c.r3.eps, 2.0);
        let s = c.gaussian_sigma();
        let back = accountant::gaussian(2.0 / s, 4, c.delta).epsilon;
        assert!((back - 8.0).abs() < 1e-6);
    }
}
