//! `umbra bench split`: accuracy vs attack success for every defense over a grid of **total**
//! epsilons per record, as a Markdown table, `report.json` and PNG reconstructions (the `cli`
//! edge adds the SVG frontier).
//!
//! At each total `T` both defenses spend exactly `T` on a record (see [`crate::ledger`]):
//! R3eLU releases at `T / releases` each (pure, basic composition), the Gaussian baseline's
//! noise is calibrated so that its releases compose (exact GDP) to `(T, delta)`. FSHA's
//! malicious run walks through the private rows as often as training does, so its point is at
//! the same total.
use crate::attacks::AttackConfig;
use crate::config::{Defense, SplitConfig};
use crate::data;
use crate::error::{R3Error, Result};
use crate::experiment::{self, AttackReport, Attacks};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;
use umbra_common::fs::{write_atomic, write_json};

/// Everything the bench measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    pub data: String,
    pub n_train: usize,
    pub n_test: usize,
    pub n_aux: usize,
    pub epochs: usize,
    /// Releases of one record (epochs + inference).
    pub releases: usize,
    pub cut: usize,
    pub victims: usize,
    pub fsha_steps: usize,
    pub wall_s: f64,
    pub points: Vec<AttackReport>,
}

fn f(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into())
}

fn eps(x: Option<f64>) -> String {
    match x {
        Some(e) if e >= 1e4 => format!("{e:.2e}"),
        Some(e) => format!("{}", (e * 1000.0).round() / 1000.0),
        None => "inf".into(),
    }
}

/// The Markdown table of a report.
pub fn table(r: &BenchReport) -> String {
    let mut s = String::from(
        "| defense | epsilon_total | eps/release | test_acc | recon_ssim | recon_mse | classmean_ssim | recon_feature_acc | property_auc | fsha_ssim | fsha_epsilon_total |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for p in &r.points {
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            p.defense,
            eps(p.epsilon_total),
            eps(p.epsilon_release),
            f(p.test_acc),
            f(p.recon_ssim),
            f(p.recon_mse),
            f(p.classmean_ssim),
            f(p.recon_feature_acc),
            f(p.property_auc),
            f(p.fsha_ssim),
            if p.fsha_ssim.is_some() {
                eps(p.fsha_epsilon_total)
            } else {
                "-".into()
            },
        );
    }
    s
}

/// The sweep: `none` once, then R3eLU and the Gaussian baseline at every total epsilon (`inf`:
/// R3eLU's randomized response alone; the Gaussian at `inf` would be `none` again).
pub fn plan(base: &SplitConfig, totals: &[f64]) -> Vec<SplitConfig> {
    let mut out = vec![SplitConfig {
        defense: Defense::None,
        epsilon_total: None,
        ..base.clone()
    }];
    for &t in totals {
        for d in [Defense::R3elu, Defense::GaussianDp] {
            if d == Defense::GaussianDp && t.is_infinite() {
                continue;
            }
            let c = SplitConfig {
                defense: d,
                ..base.clone()
            };
            out.push(if t.is_finite() {
                c.with_total(t)
            } else {
                let mut c = c;
                c.epsilon_total = None;
                c.r3.eps = f64::INFINITY;
                c
            });
        }
    }
    out
}

/// Run the sweep and write `report.json` (after every point), `table.md` and the PNGs into `out`.
pub fn run(
    base: &SplitConfig,
    totals: &[f64],
    acfg: &AttackConfig,
    with_fsha: bool,
    out: &Path,
) -> Result<BenchReport> {
    let t0 = Instant::now();
    if totals.iter().any(|t| t.is_nan() || *t <= 0.0) {
        return Err(R3Error::Config("every total epsilon must be > 0".into()));
    }
    let ds = data::load(base.data, base.sizes, base.seed)?;
    let which = Attacks {
        fsha: with_fsha && ds.image.is_some(),
        ..Attacks::ALL
    };
    let mut report = BenchReport {
        data: base.data.to_string(),
        n_train: base.sizes.train,
        n_test: base.sizes.test,
        n_aux: base.sizes.aux,
        epochs: base.epochs,
        releases: base.releases(),
        cut: base.cut,
        victims: acfg.victims,
        fsha_steps: if which.fsha { acfg.fsha_steps } else { 0 },
        wall_s: 0.0,
        points: Vec::new(),
    };
    std::fs::create_dir_all(out).map_err(|e| R3Error::io(out, e))?;
    for cfg in plan(base, totals) {
        tracing::info!("bench split: {} total {:?}", cfg.defense, cfg.epsilon_total);
        let p = experiment::run(&cfg, &ds, which, acfg)?;
        if let Some((h, w)) = ds.image {
            let tag_eps = cfg
                .epsilon_total
                .map(|e| e.to_string())
                .unwrap_or_else(|| "inf".into());
            for (tag, ex) in [("recon", &p.recon_examples), ("fsha", &p.fsha_examples)] {
                if ex.is_empty() {
                    continue;
                }
                let mut imgs: Vec<Vec<f32>> = ex.iter().map(|x| x.0.clone()).collect();
                imgs.extend(ex.iter().map(|x| x.1.clone()));
                let name = format!("{tag}_{}_total{tag_eps}.png", cfg.defense);
                crate::image::write_grid(&out.join(name), &imgs, ex.len(), h, w)?;
            }
        }
        let r = &p.report;
        eprintln!(
            "{} total {}: acc {} recon {} property_auc {} fsha_ssim {}",
            r.defense,
            eps(r.epsilon_total),
            f(r.test_acc),
            f(r.recon_ssim.or(r.recon_feature_acc)),
            f(r.property_auc),
            f(r.fsha_ssim)
        );
        report.points.push(p.report);
        report.wall_s = t0.elapsed().as_secs_f64();
        // keep partial results on disk as the sweep goes
        write_json(&out.join("report.json"), &report)?;
    }
    let t = table(&report);
    println!("{t}");
    write_atomic(&out.join("table.md"), t.as_bytes())?;
    write_json(&out.join("report.json"), &report)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger;

    #[test]
    fn the_sweep_spends_each_total_on_both_defenses() {
        let base = SplitConfig {
            epochs: 3,
            ..Default::default()
        };
        let p = plan(&base, &[4.0, 64.0, f64::INFINITY]);
        let names: Vec<String> = p.iter().map(|c| c.defense.to_string()).collect();
        assert_eq!(
            names,
            [
                "none",
                "r3elu",
                "gaussian-dp",
                "r3elu",
                "gaussian-dp",
                "r3elu"
            ]
        );
        for c in &p[1..5] {
            let t = c.epsilon_total.unwrap();
            let a = ledger::account(c);
            assert!(
                (a.epsilon_total.unwrap() - t).abs() < 1e-6 * t,
                "{}",
                c.defense
            );
        }
        // R3eLU at total 4 over 3 epochs + 1 inference: 1 per release
        assert_eq!(p[1].r3.eps, 1.0);
        assert!(p[5].r3.eps.is_infinite() && ledger::account(&p[5]).epsilon_total.is_none());
    }
}
