//! The job: what both parties agree on before training (the `job.toml` file).
use crate::budget::PartyMachine;
use crate::data::{DataSpec, SplitSpec};
use crate::error::{Result, VflError};
use crate::model::ModelConfig;
use crate::ps;
use crate::transport::Buffers;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Training modes: the four baselines of the paper and PubSub-VFL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Synchronous SplitNN: one worker per party, the passive party waits for each gradient.
    Vfl,
    /// Synchronous data-parallel workers (fixed pairs) and a parameter server per party.
    VflPs,
    /// Asynchronous: one worker per party, up to `p` batches in flight (stale gradients).
    Avfl,
    /// Asynchronous data-parallel fixed worker pairs with an asynchronous parameter server.
    AvflPs,
    /// PubSub-VFL: batch-id keyed channels, any free worker takes any batch (also the next
    /// epoch's while the last ones are in flight: no barrier between epochs), bounded buffers,
    /// deadline with reassignment, semi-asynchronous parameter servers; worker counts of the two
    /// parties are independent.
    #[cfg_attr(feature = "cli", value(name = "pubsub"))]
    #[serde(rename = "pubsub")]
    PubSub,
}

impl Mode {
    pub const ALL: [Mode; 5] = [
        Mode::Vfl,
        Mode::VflPs,
        Mode::Avfl,
        Mode::AvflPs,
        Mode::PubSub,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Vfl => "vfl",
            Mode::VflPs => "vfl-ps",
            Mode::Avfl => "avfl",
            Mode::AvflPs => "avfl-ps",
            Mode::PubSub => "pubsub",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Gaussian DP on the published embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpConfig {
    /// Target mu (mu-GDP) for the whole run; the noise multiplier is calibrated to it.
    pub mu: f64,
    /// L2 clipping bound of each embedding row.
    #[serde(default = "one")]
    pub clip: f64,
}
fn one() -> f64 {
    1.0
}

/// Fault injection (tests and demos).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Faults {
    /// Passive worker 0 dies (stops without answering) after this many batches in epoch 0.
    #[serde(default)]
    pub kill_passive_worker_after: Option<usize>,
    /// Fraction of embedding messages lost.
    #[serde(default)]
    pub drop_embeddings: f64,
    /// Delay added to every gradient message, milliseconds.
    #[serde(default)]
    pub delay_gradients_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobConfig {
    /// Job id carried by every message; messages of other jobs are rejected.
    #[serde(default = "d_job")]
    pub job: String,
    pub data: String,
    #[serde(default = "d_mode")]
    pub mode: Mode,
    #[serde(default = "d_seed")]
    pub seed: u64,
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    #[serde(default = "d_batch")]
    pub batch: usize,
    #[serde(default = "two")]
    pub workers_active: usize,
    #[serde(default = "two")]
    pub workers_passive: usize,
    /// Cores given to the run (for CPU utilisation); default: all available.
    #[serde(default)]
    pub cores: Option<usize>,
    #[serde(default = "d_test")]
    pub test_frac: f64,
    /// Use at most this many rows of the dataset (seeded subset), for quick runs.
    #[serde(default)]
    pub max_rows: Option<usize>,
    /// Waiting deadline T_ddl in seconds.
    #[serde(default = "d_deadline")]
    pub deadline_s: f64,
    #[serde(default)]
    pub buffers: Buffers,
    /// dT0 of the semi-asynchronous PS schedule. The paper uses 5; on Adult we measured the
    /// training loss rising again once dT_t reached 3-4 (epochs 5-7), so the default is 2
    /// (dT_t = 1 for the first epochs, then 2).
    #[serde(default = "d_dt0")]
    pub dt0: usize,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub split: SplitSpec,
    #[serde(default)]
    pub dp: Option<DpConfig>,
    #[serde(default)]
    pub faults: Faults,
    /// Simulated machine of the active party (cores, slowdown); default: the whole host.
    #[serde(default)]
    pub machine_active: Option<PartyMachine>,
    /// Simulated machine of the passive party; see [`crate::budget`].
    #[serde(default)]
    pub machine_passive: Option<PartyMachine>,
    /// Show a progress bar.
    #[serde(default)]
    pub progress: bool,
}

fn d_job() -> String {
    "umbra-vfl".into()
}
fn d_mode() -> Mode {
    Mode::PubSub
}
fn d_seed() -> u64 {
    42
}
fn d_epochs() -> usize {
    5
}
fn d_batch() -> usize {
    256
}
fn two() -> usize {
    2
}
fn d_test() -> f64 {
    0.3
}
fn d_deadline() -> f64 {
    10.0
}
fn d_dt0() -> usize {
    2
}

impl JobConfig {
    pub fn new(data: &str, mode: Mode) -> Self {
        JobConfig {
            job: d_job(),
            data: data.to_string(),
            mode,
            seed: d_seed(),
            epochs: d_epochs(),
            batch: d_batch(),
            workers_active: 2,
            workers_passive: 2,
            cores: None,
            test_frac: d_test(),
            max_rows: None,
            deadline_s: d_deadline(),
            buffers: Buffers::default(),
            dt0: d_dt0(),
            model: ModelConfig::default(),
            split: SplitSpec::default(),
            dp: None,
            faults: Faults::default(),
            machine_active: None,
            machine_passive: None,
            progress: false,
        }
    }

    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| VflError::io(path, e))?;
        let cfg: JobConfig = toml::from_str(&text)
            .map_err(|e| VflError::Config(format!("{}: {e}", path.display())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| VflError::Config(e.to_string()))
    }

    pub fn data_spec(&self) -> Result<DataSpec> {
        self.data.parse()
    }

    pub fn validate(&self) -> Result<()> {
        self.data_spec()?;
        let bad = |m: &str| Err(VflError::Config(m.to_string()));
        if self.epochs == 0 || self.batch == 0 {
            return bad("epochs and batch must be positive");
        }
        if self.workers_active == 0 || self.workers_passive == 0 {
            return bad("worker counts must be positive");
        }
        if !(0.05..0.95).contains(&self.test_frac) {
            return bad("test_frac must be in [0.05, 0.95)");
        }
        if self.deadline_s.is_nan() || self.deadline_s <= 0.0 {
            return bad("deadline_s must be positive");
        }
        if self.job.is_empty() || self.job.len() > 200 {
            return bad("job id must be 1..=200 bytes");
        }
        for m in [self.machine_active, self.machine_passive]
            .into_iter()
            .flatten()
        {
            if m.cores == 0 || !(1.0..=1000.0).contains(&m.slowdown) {
                return bad("a party machine needs cores >= 1 and slowdown in [1, 1000]");
            }
        }
        if let Some(dp) = &self.dp {
            if dp.mu.is_nan() || dp.mu <= 0.0 || dp.clip <= 0.0 {
                return bad("dp.mu and dp.clip must be positive");
            }
        }
        Ok(())
    }

    pub fn cores(&self) -> usize {
        self.cores.unwrap_or_else(crate::metrics::available_cores)
    }

    /// (active workers, passive workers) the mode actually runs.
    pub fn workers(&self) -> (usize, usize) {
        match self.mode {
            Mode::Vfl | Mode::Avfl => (1, 1),
            Mode::VflPs | Mode::AvflPs => (self.workers_passive, self.workers_passive),
            Mode::PubSub => (self.workers_active, self.workers_passive),
        }
    }

    /// Batches a passive worker may have in flight (waiting for their gradient).
    pub fn inflight(&self) -> usize {
        match self.mode {
            Mode::Vfl | Mode::VflPs => 1,
            Mode::Avfl => self.buffers.p.max(1),
            Mode::AvflPs | Mode::PubSub => (self.buffers.p / self.workers().1).max(1),
        }
    }

    /// Whether worker `i` of the passive party talks only to worker `i` of the active party.
    pub fn fixed_pairs(&self) -> bool {
        !matches!(self.mode, Mode::PubSub)
    }

    pub fn ps_sync(&self) -> ps::Sync {
        match self.mode {
            Mode::Vfl | Mode::Avfl | Mode::AvflPs => ps::Sync::Async,
            Mode::VflPs => ps::Sync::Rounds,
            Mode::PubSub => ps::Sync::SemiAsync { dt0: self.dt0 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_roundtrip_with_defaults() {
        let cfg: JobConfig = toml::from_str(
            "data = \"synthetic:1000x10\"\nmode = \"avfl-ps\"\n[split]\nactive_fraction = 0.3\n[buffers]\np = 3\nq = 4\n",
        )
        .unwrap();
        assert_eq!(cfg.mode, Mode::AvflPs);
        assert_eq!(cfg.batch, 256);
        assert_eq!(cfg.model.bottom_depth, 10);
        assert_eq!(cfg.buffers, Buffers { p: 3, q: 4 });
        let back: JobConfig = toml::from_str(&cfg.to_toml().unwrap()).unwrap();
        assert_eq!(back, cfg);
        let example: JobConfig = toml::from_str(include_str!("../job.example.toml")).unwrap();
        example.validate().unwrap();
        assert_eq!(example.split.active.as_ref().unwrap().len(), 7);
        let mut bad = cfg.clone();
        bad.epochs = 0;
        assert!(bad.validate().is_err());
    }
}
