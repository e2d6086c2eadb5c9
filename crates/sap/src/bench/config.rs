//! What `umbra bench sap` runs.
use crate::error::{Result, SapError};
use crate::experiment::{AttackConfig, PrepareConfig};
use crate::privacy::Privacy;
use crate::roles::TrainConfig;
use std::path::PathBuf;

/// Everything the bench does, with defaults for the MiniLM quick run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct BenchConfig {
    pub prepare: PrepareConfig,
    pub train: TrainConfig,
    /// Customer blocks of the measured split.
    pub split_at: usize,
    /// The uniform d_chi sweep.
    pub etas: Vec<f64>,
    /// eta_0 of both CTI budgets.
    pub cti_etas: Vec<f64>,
    pub gaussian_etas: Vec<f64>,
    /// Training seeds of `none` and of the d_chi sweep.
    pub seeds: Vec<u64>,
    /// Training seeds of the CTI and Gaussian settings.
    pub other_seeds: Vec<u64>,
    pub attack: AttackConfig,
    /// Bootstrap replicates of the intervals.
    pub bootstrap: usize,
    /// Largest accuracy loss of the operating point (fraction: 0.01 = 1 point).
    pub max_loss: f64,
    /// Only the vendor's attacks (the privacy side of every setting); no fine-tuning. For
    /// machines where the vendor's training does not fit: the verdict then names the budget at
    /// which the privacy gain reaches the paper's 62 points, and leaves accuracy unmeasured.
    pub attacks_only: bool,
    pub out: PathBuf,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            prepare: PrepareConfig::default(),
            train: TrainConfig::default(),
            split_at: 3,
            etas: vec![3.0, 5.0, 8.0, 12.0, 20.0, 30.0, 50.0, 90.0],
            cti_etas: vec![12.0],
            gaussian_etas: vec![12.0],
            seeds: vec![0, 1, 2],
            other_seeds: vec![0],
            attack: AttackConfig::default(),
            bootstrap: 1000,
            max_loss: 0.01,
            attacks_only: false,
            out: PathBuf::from("report"),
        }
    }
}

impl BenchConfig {
    /// Clear errors for settings no run can use.
    pub fn check(&self) -> Result<()> {
        for &e in self
            .etas
            .iter()
            .chain(&self.cti_etas)
            .chain(&self.gaussian_etas)
        {
            if !(e > 0.0 && e.is_finite()) {
                return Err(SapError::Config(format!("eta must be > 0, got {e}")));
            }
        }
        if self.seeds.is_empty() {
            return Err(SapError::Config("at least one seed".into()));
        }
        if self.train.epochs == 0 || self.train.batch == 0 {
            return Err(SapError::Config("epochs and batch must be > 0".into()));
        }
        Ok(())
    }

    /// Every `(privacy, eta, seed)` to train, `none` first.
    pub fn settings(&self) -> Vec<(Privacy, f64, Vec<u64>)> {
        let mut v = vec![(Privacy::None, 0.0, self.seeds.clone())];
        v.extend(
            self.etas
                .iter()
                .map(|&e| (Privacy::Dchi, e, self.seeds.clone())),
        );
        for &e in &self.cti_etas {
            v.push((Privacy::DchiCti, e, self.other_seeds.clone()));
            v.push((Privacy::DchiCtiMax, e, self.other_seeds.clone()));
        }
        v.extend(
            self.gaussian_etas
                .iter()
                .map(|&e| (Privacy::Gaussian, e, self.other_seeds.clone())),
        );
        v
    }
}
