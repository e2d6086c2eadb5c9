//! Metrics and reports: AUC, accuracy, RMSE, CPU utilisation measured from the process.
use crate::data::Task;
use serde::{Deserialize, Serialize};
use std::time::Instant;
use umbra_common::metrics::auroc;

/// Metrics of predictions on the test split: `(auc, accuracy, rmse)`, the first two for a
/// binary task (AUC by `umbra_common::metrics::auroc`; `None` when one class is absent), the
/// last for regression.
pub fn evaluate(out: &[f32], y: &[f32], task: Task) -> (Option<f64>, Option<f64>, Option<f64>) {
    match task {
        Task::Binary => (auroc(out, y), Some(accuracy(out, y)), None),
        Task::Regression => (None, None, Some(rmse(out, y))),
    }
}

/// Accuracy of logits thresholded at 0.
pub fn accuracy(logits: &[f32], labels: &[f32]) -> f64 {
    let ok = logits
        .iter()
        .zip(labels)
        .filter(|(&s, &y)| (s > 0.0) == (y > 0.5))
        .count();
    ok as f64 / labels.len().max(1) as f64
}

pub fn rmse(pred: &[f32], y: &[f32]) -> f64 {
    let s: f64 = pred
        .iter()
        .zip(y)
        .map(|(&p, &t)| ((p - t) as f64).powi(2))
        .sum();
    (s / y.len().max(1) as f64).sqrt()
}

/// Process CPU time (user + system) in seconds from `/proc/self/stat` (fields 14 and 15, in
/// USER_HZ = 100 ticks per second on Linux). `None` where unavailable.
pub fn process_cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // the command name may contain spaces: fields start after the last ')'
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14 -> rest[11], stime field 15 -> rest[12]
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / 100.0)
}

/// Measures wall time and process CPU time between `start` and `stop`.
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    t0: Instant,
    cpu0: f64,
    cores: usize,
}

impl CpuMeter {
    pub fn start(cores: usize) -> Self {
        CpuMeter {
            t0: Instant::now(),
            cpu0: process_cpu_seconds().unwrap_or(0.0),
            cores: cores.max(1),
        }
    }
    /// (wall seconds, cpu seconds, utilisation = cpu / (wall x cores)).
    pub fn read(&self) -> (f64, f64, f64) {
        let wall = self.t0.elapsed().as_secs_f64();
        let cpu = process_cpu_seconds().unwrap_or(0.0) - self.cpu0;
        let util = if wall > 0.0 {
            cpu / (wall * self.cores as f64)
        } else {
            0.0
        };
        (wall, cpu, util)
    }
}

/// Cores available to this process.
pub fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// One epoch's numbers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EpochReport {
    pub epoch: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auc: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rmse: Option<f64>,
    pub train_loss: f64,
    pub wall_s: f64,
    pub cpu_util: f64,
    pub wait_s: f64,
    pub bytes_to_active: u64,
    pub bytes_to_passive: u64,
    pub batches: u64,
    pub dropped: u64,
    pub reassigned: u64,
}

/// The report of one training run (`--json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainReport {
    pub mode: String,
    pub data: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auc: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rmse: Option<f64>,
    pub wall_s: f64,
    /// Process CPU seconds / (wall seconds x cores given).
    pub cpu_util: f64,
    pub cores: usize,
    /// Seconds workers spent blocked on the peer, summed over workers.
    pub wait_s: f64,
    /// Bytes sent, both directions together.
    pub bytes: u64,
    pub bytes_to_active: u64,
    pub bytes_to_passive: u64,
    pub workers_active: usize,
    pub workers_passive: usize,
    pub batch: usize,
    pub epochs: usize,
    pub rejected_messages: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dp_mu: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dp_sigma: Option<f64>,
    /// Benchmarks: seconds of training until the epoch AUC first reached the target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_to_target_s: Option<f64>,
    /// Benchmarks: wall seconds of every repeat of this setting (the report is the median run).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wall_s_runs: Vec<f64>,
    pub per_epoch: Vec<EpochReport>,
}

impl TrainReport {
    /// One human line: mode, the task's metric, wall time, CPU use, waiting, traffic, DP.
    pub fn summary_line(&self) -> String {
        let metric = match (self.auc, self.rmse) {
            (Some(a), _) => format!("auc {a:.4}"),
            (_, Some(e)) => format!("rmse {e:.4}"),
            _ => "no metric".into(),
        };
        let mut s = format!(
            "{:<12} {}  wall {:.2} s  cpu_util {:.1}%  wait {:.2} s  bytes {:.2} MB",
            self.mode,
            metric,
            self.wall_s,
            100.0 * self.cpu_util,
            self.wait_s,
            self.bytes as f64 / 1e6
        );
        if let (Some(mu), Some(sigma)) = (self.dp_mu, self.dp_sigma) {
            s.push_str(&format!("  dp mu {mu:.3} (sigma {sigma:.3})"));
        }
        s
    }

    /// Cumulative epoch wall time until an epoch's AUC reached `target` (None if never).
    pub fn time_to_auc(&self, target: f64) -> Option<f64> {
        let mut t = 0.0;
        for e in &self.per_epoch {
            t += e.wall_s;
            if e.auc.is_some_and(|a| a >= target) {
                return Some(t);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluate_reports_the_task_s_metrics() {
        let (auc, acc, rmse) = evaluate(&[-1.0, 0.4, 0.35, 2.0], &[0., 0., 1., 1.], Task::Binary);
        assert_eq!(auc, Some(0.75));
        assert_eq!(acc, Some(0.75));
        assert!(rmse.is_none());
        let (auc, acc, rmse) = evaluate(&[1.0, 3.0], &[0.0, 3.0], Task::Regression);
        assert!(auc.is_none() && acc.is_none());
        assert!((rmse.unwrap() - 0.5f64.sqrt()).abs() < 1e-12);
        assert_eq!(evaluate(&[0.1], &[1.0], Task::Binary).0, None);
    }

    #[test]
    fn cpu_meter_sees_busy_loop() {
        // Spin until the process has used 0.2 s of CPU (on a loaded machine this takes longer
        // than 0.2 s of wall time; 30 s is the cap).
        let m = CpuMeter::start(1);
        let mut x = 0u64;
        let t = Instant::now();
        while m.read().1 < 0.2 && t.elapsed().as_secs() < 30 {
            for _ in 0..100_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
        }
        std::hint::black_box(x);
        let (wall, cpu, util) = m.read();
        assert!(cpu >= 0.2, "cpu {cpu} after {wall} s");
        // other tests of this process may run meanwhile: cpu / wall is positive and bounded by
        // the machine's cores
        assert!(
            util > 0.0 && util <= available_cores() as f64 + 0.5,
            "util {util}"
        );
        assert!((util - cpu / wall).abs() < 1e-3);
    }
}
