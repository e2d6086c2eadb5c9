//! `umbra bench sap`: accuracy vs empirical privacy of split fine-tuning over a fine eta sweep
//! of uniform d_chi (several seeds), the two CTI budgets and Gaussian noise at chosen budgets,
//! and no privatization at the same split; reads the privacy gain at the paper's "-1 point"
//! operating point with a 95% interval and states whether the paper's claim reproduces.
//!
//! Resumable: every training run and every attack is written to `out/runs/` as it finishes and
//! skipped when its file is there (with the same settings); `bench.json`, `table.md` and
//! `sap.svg` are written at the end.
//!
//! Cost plan: the customer's frozen bottom is computed once per tweet and cached
//! ([`crate::cut_cache`]); the attacks depend on the mechanism, not on the vendor's training,
//! so each setting is attacked once (on privatized test traffic drawn the way the customer
//! sends it) and trained `seeds` times.
pub mod config;
pub mod report;

pub use config::BenchConfig;

use crate::error::Result;
use crate::experiment::{self, AttackReport, Prepared, RunReport, RunSpec};
use crate::privacy::Privacy;
use crate::roles::TrainConfig;
use std::path::Path;

/// A stored result with the settings it was computed under (to resume safely).
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored<T> {
    key: String,
    value: T,
}

/// What must match for a stored training run to be reused: everything but the sweep's lists.
fn run_key(c: &BenchConfig) -> Result<String> {
    Ok(serde_json::to_string(&(
        &c.prepare, &c.train, c.split_at, &c.attack,
    ))?)
}

/// What must match for a stored attack to be reused: the data, the split and the attacker's
/// settings, not the vendor's training (so an `--attacks-only` sweep serves a later full run
/// with other epochs or learning rate).
fn attack_key(c: &BenchConfig) -> Result<String> {
    Ok(serde_json::to_string(&(&c.prepare, c.split_at, &c.attack))?)
}

fn load_stored<T: serde::de::DeserializeOwned>(path: &Path, key: &str) -> Option<T> {
    let s: Stored<T> = umbra_common::fs::read_json(path).ok()?;
    (s.key == key).then_some(s.value)
}

fn store<T: serde::Serialize>(path: &Path, key: &str, value: T) -> Result<()> {
    Ok(umbra_common::fs::write_json(
        path,
        &Stored {
            key: key.to_string(),
            value,
        },
    )?)
}

fn file_name(p: Privacy, eta: f64, k: usize, seed: Option<u64>) -> String {
    match seed {
        Some(s) => format!("train-{}-k{k}-eta{eta}-s{s}.json", p.name()),
        None => format!("attack-{}-k{k}-eta{eta}.json", p.name()),
    }
}

/// Runs (or resumes) the bench and writes its report.
pub fn run(cfg: &BenchConfig) -> Result<report::BenchReport> {
    cfg.check()?;
    let t0 = std::time::Instant::now();
    let mut pc = cfg.prepare.clone();
    pc.splits = vec![cfg.split_at];
    if cfg.attacks_only {
        // no training: the customer's train part is not needed beyond CTI statistics
        pc.train_cuts = false;
    }
    let prep = Prepared::new(&pc)?;
    eprintln!(
        "bench sap: {} blocks of {} on the customer side; {} train / {} test / {} public; {} classes",
        cfg.split_at,
        prep.enc.num_blocks(),
        prep.ids[0].len(),
        prep.ids[1].len(),
        prep.ids[2].len(),
        prep.data.classes.len()
    );
    let (key, akey) = (run_key(cfg)?, attack_key(cfg)?);
    let dir = cfg.out.join("runs");
    let k = cfg.split_at;
    let settings = cfg.settings();
    let total: usize = settings
        .iter()
        .map(|s| 1 + if cfg.attacks_only { 0 } else { s.2.len() })
        .sum();
    let mut done = 0usize;
    let (mut runs, mut attacks) = (Vec::new(), Vec::new());
    for (privacy, eta, seeds) in &settings {
        let ap = dir.join(file_name(*privacy, *eta, k, None));
        let a: AttackReport = match load_stored(&ap, &akey) {
            Some(a) => a,
            None => {
                let t = std::time::Instant::now();
                let p = experiment::privatizer(&prep, *privacy, *eta)?;
                let (l, r) = experiment::privatized_test(
                    &prep,
                    k,
                    &p,
                    cfg.attack.attack_n,
                    cfg.attack.seed,
                )?;
                let a = experiment::run_attacks(&prep, k, *privacy, *eta, &l, &r, &cfg.attack)?;
                eprintln!(
                    "  attack {} eta {eta}: recovery nn {:.3} ridge {:.3} mlp {} -> privacy {:.3} ({:.0} s)",
                    privacy.name(),
                    a.recovery_nn,
                    a.recovery_ridge,
                    a.recovery_mlp.map(|v| format!("{v:.3}")).unwrap_or("-".into()),
                    a.empirical_privacy,
                    t.elapsed().as_secs_f64()
                );
                store(&ap, &akey, &a)?;
                a
            }
        };
        attacks.push(a);
        done += 1;
        if cfg.attacks_only {
            continue;
        }
        for &seed in seeds {
            let rp = dir.join(file_name(*privacy, *eta, k, Some(seed)));
            let r: RunReport = match load_stored(&rp, &key) {
                Some(r) => r,
                None => {
                    let spec = RunSpec {
                        privacy: *privacy,
                        eta: *eta,
                        train: TrainConfig {
                            split_at: k,
                            seed,
                            ..cfg.train.clone()
                        },
                    };
                    let (r, _) = experiment::train_one(&prep, &spec)?;
                    store(&rp, &key, &r)?;
                    r
                }
            };
            done += 1;
            eprintln!(
                "[{done}/{total}] {} eta {eta} seed {seed}: acc {:.4} ({:.1} samples/s, {:.0} s)",
                privacy.name(),
                r.test_acc,
                r.samples_per_s,
                r.train_s
            );
            runs.push(r);
        }
    }
    let rep = report::BenchReport::new(cfg, &prep, runs, attacks, t0.elapsed().as_secs_f64())?;
    report::write(cfg, &rep)?;
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_budgets_are_refused_and_settings_list_the_sweep() {
        let mut c = BenchConfig::default();
        assert!(c.check().is_ok());
        assert!(c.etas.len() >= 8);
        let s = c.settings();
        assert_eq!(s[0].0, Privacy::None);
        assert_eq!(
            s.iter().filter(|x| x.0 == Privacy::Dchi).count(),
            c.etas.len()
        );
        assert_eq!(
            s.iter().filter(|x| x.0 == Privacy::DchiCtiMax).count(),
            c.cti_etas.len()
        );
        c.etas.push(0.0);
        assert!(c
            .check()
            .unwrap_err()
            .to_string()
            .contains("eta must be > 0"));
        c.etas.pop();
        c.gaussian_etas = vec![-1.0];
        assert!(c.check().is_err());
    }

    #[test]
    fn attacks_are_reused_across_training_settings_runs_are_not() {
        let a = BenchConfig::default();
        let mut b = a.clone();
        b.train.epochs += 1;
        b.train.lr *= 2.0;
        b.attacks_only = !a.attacks_only;
        assert_eq!(attack_key(&a).unwrap(), attack_key(&b).unwrap());
        assert_ne!(run_key(&a).unwrap(), run_key(&b).unwrap());
        b.attack.attack_n += 1;
        assert_ne!(attack_key(&a).unwrap(), attack_key(&b).unwrap());
        let mut c = a.clone();
        c.split_at += 1;
        assert_ne!(attack_key(&a).unwrap(), attack_key(&c).unwrap());
    }
}
