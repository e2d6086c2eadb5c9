//! `umbra bench vfl`: the five modes on the same data in one run, each repeated with the modes
//! taking turns, one table of median runs.
use crate::budget::PartyMachine;
use crate::config::{JobConfig, Mode};
use crate::engine;
use crate::error::Result;
use crate::metrics::TrainReport;
use std::collections::BTreeMap;

/// What the bench runs.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub data: String,
    pub epochs: usize,
    pub batch: usize,
    pub workers_active: usize,
    pub workers_passive: usize,
    pub max_rows: Option<usize>,
    pub depth: Option<usize>,
    /// Target AUC of the time-to-target column (default: the lowest final AUC of the modes).
    pub target_auc: Option<f64>,
    pub machine_active: Option<PartyMachine>,
    pub machine_passive: Option<PartyMachine>,
    /// Runs of every mode (>= 1).
    pub repeats: u32,
    /// Progress bars for each run.
    pub progress: bool,
}

/// The bench's result: mode name -> its median run, and the target AUC used.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub runs: BTreeMap<String, TrainReport>,
    /// The median runs in `Mode::ALL` order (the table's rows).
    pub rows: Vec<TrainReport>,
    pub target_auc: Option<f64>,
    pub repeats: u32,
}

/// The run with the median wall time (the lower middle one for an even count), carrying the
/// wall times of all runs in `wall_s_runs`.
pub fn median_run(mut runs: Vec<TrainReport>) -> Option<TrainReport> {
    runs.sort_by(|a, b| a.wall_s.total_cmp(&b.wall_s));
    let walls: Vec<f64> = runs.iter().map(|r| r.wall_s).collect();
    let mid = runs.len().checked_sub(1)? / 2;
    let mut r = runs.swap_remove(mid);
    r.wall_s_runs = walls;
    Some(r)
}

/// The job of one mode's run.
fn job(b: &BenchConfig, mode: Mode) -> JobConfig {
    let mut cfg = JobConfig::new(&b.data, mode);
    cfg.epochs = b.epochs;
    cfg.batch = b.batch;
    cfg.workers_active = b.workers_active;
    cfg.workers_passive = b.workers_passive;
    cfg.max_rows = b.max_rows;
    cfg.machine_active = b.machine_active;
    cfg.machine_passive = b.machine_passive;
    if let Some(d) = b.depth {
        cfg.model.bottom_depth = d;
    }
    cfg.progress = b.progress;
    cfg
}

/// Runs every mode `repeats` times; the modes take turns, each round starting one mode later
/// (vfl first, then vfl-ps first, ...), so that changes in machine load and the position in a
/// round hit them alike. `on_run` sees each finished run (round, report).
pub fn run(b: &BenchConfig, mut on_run: impl FnMut(u32, &TrainReport)) -> Result<BenchReport> {
    let n = Mode::ALL.len();
    let repeats = b.repeats.max(1);
    for mode in Mode::ALL {
        job(b, mode).validate()?;
    }
    let mut runs: Vec<Vec<TrainReport>> = vec![Vec::new(); n];
    for rep in 0..repeats as usize {
        for i in (0..n).map(|k| (k + rep) % n) {
            let r = engine::train_inproc(&job(b, Mode::ALL[i]))?;
            on_run(rep as u32, &r);
            runs[i].push(r);
        }
    }
    let mut rows: Vec<TrainReport> = runs.into_iter().filter_map(median_run).collect();
    let target = b.target_auc.or_else(|| {
        rows.iter()
            .filter_map(|r| r.auc)
            .min_by(|a, b| a.total_cmp(b))
    });
    if let Some(t) = target {
        for r in rows.iter_mut() {
            r.time_to_target_s = r.time_to_auc(t);
        }
    }
    let runs = rows.iter().map(|r| (r.mode.clone(), r.clone())).collect();
    Ok(BenchReport {
        runs,
        rows,
        target_auc: target,
        repeats,
    })
}

/// The bench's table: speed-ups against the first mode (vfl) of the same run.
pub fn table(r: &BenchReport) -> String {
    let mut s = format!(
        "target auc {}\nmedian of {} run(s) per mode; wall_range = fastest..slowest run\n",
        r.target_auc
            .map(|t| format!("{t:.4}"))
            .unwrap_or_else(|| "-".into()),
        r.repeats
    );
    s += &format!(
        "{:<10} {:>8} {:>9} {:>13} {:>9} {:>11} {:>9} {:>9} {:>10} {:>10}\n",
        "mode",
        "auc",
        "wall_s",
        "wall_range",
        "speedup",
        "to_target_s",
        "speedup",
        "cpu_util",
        "wait_s",
        "MB"
    );
    let base = r.rows.first().map(|r| r.wall_s).unwrap_or(1.0);
    let base_tt = r.rows.first().and_then(|r| r.time_to_target_s);
    for r in &r.rows {
        let tt = r.time_to_target_s;
        let range = match (r.wall_s_runs.first(), r.wall_s_runs.last()) {
            (Some(lo), Some(hi)) => format!("{lo:.2}..{hi:.2}"),
            _ => "-".into(),
        };
        s += &format!(
            "{:<10} {:>8} {:>9.2} {:>13} {:>8.2}x {:>11} {:>9} {:>8.1}% {:>10.2} {:>10.2}\n",
            r.mode,
            r.auc
                .map(|a| format!("{a:.4}"))
                .or(r.rmse.map(|e| format!("{e:.4}")))
                .unwrap_or_default(),
            r.wall_s,
            range,
            base / r.wall_s.max(1e-9),
            tt.map(|t| format!("{t:.2}")).unwrap_or_else(|| "-".into()),
            match (base_tt, tt) {
                (Some(b), Some(t)) => format!("{:.2}x", b / t.max(1e-9)),
                _ => "-".into(),
            },
            100.0 * r.cpu_util,
            r.wait_s,
            r.bytes as f64 / 1e6
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(wall: f64) -> TrainReport {
        TrainReport {
            mode: "vfl".into(),
            wall_s: wall,
            ..Default::default()
        }
    }

    #[test]
    fn median_run_keeps_every_wall_time() {
        let m = median_run(vec![run_of(3.0), run_of(1.0), run_of(2.0), run_of(9.0)]).unwrap();
        assert_eq!(m.wall_s, 2.0, "lower middle of four");
        assert_eq!(m.wall_s_runs, vec![1.0, 2.0, 3.0, 9.0]);
        assert!(median_run(vec![]).is_none());
    }
}
