//! `umbra bench split`: accuracy vs attack success for every defense over a grid of per-release
//! epsilons, as a Markdown table, `report.json`, an SVG frontier figure and PNG reconstructions.
use crate::attacks::AttackConfig;
use crate::cli::{attack_with, AttackReport};
use crate::data;
use crate::error::{write_atomic, R3Error, Result};
use crate::split::{Defense, SplitConfig};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// Everything the bench measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    pub data: String,
    pub n_train: usize,
    pub n_test: usize,
    pub n_aux: usize,
    pub epochs: usize,
    pub cut: usize,
    pub victims: usize,
    pub wall_s: f64,
    pub points: Vec<AttackReport>,
}

fn f(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into())
}

/// The Markdown table of a report.
pub fn table(r: &BenchReport) -> String {
    let mut s = String::from(
        "| defense | eps/release | epsilon_total | test_acc | recon_ssim | recon_mse | classmean_ssim | recon_feature_acc | property_auc | fsha_ssim |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for p in &r.points {
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            p.defense,
            p.epsilon
                .map(|e| format!("{e}"))
                .unwrap_or_else(|| "inf".into()),
            p.epsilon_total
                .map(|e| format!("{e:.1}"))
                .unwrap_or_else(|| "inf".into()),
            f(p.test_acc),
            f(p.recon_ssim),
            f(p.recon_mse),
            f(p.classmean_ssim),
            f(p.recon_feature_acc),
            f(p.property_auc),
            f(p.fsha_ssim),
        );
    }
    s
}

/// Three panels (reconstruction SSIM / property AUC / FSHA SSIM against test accuracy), one
/// line per defense across the epsilon grid.
pub fn frontier_svg(r: &BenchReport) -> Result<String> {
    use plotters::prelude::*;
    let perr = |e: &dyn std::fmt::Display| R3Error::Plot(e.to_string());
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1350, 460)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| perr(&e))?;
        let panels = root.split_evenly((1, 3));
        type Get = fn(&AttackReport) -> Option<f64>;
        let metrics: [(&str, Get); 3] = [
            ("reconstruction SSIM", |p| {
                p.recon_ssim.or(p.recon_feature_acc)
            }),
            ("property AUC", |p| p.property_auc),
            ("FSHA SSIM", |p| p.fsha_ssim),
        ];
        for (panel, (name, get)) in panels.iter().zip(metrics) {
            let mut chart = ChartBuilder::on(panel)
                .caption(format!("{name} vs test accuracy"), ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(44)
                .build_cartesian_2d(0f64..1.0f64, 0f64..1.0f64)
                .map_err(|e| perr(&e))?;
            chart
                .configure_mesh()
                .x_desc("test accuracy")
                .y_desc(name)
                .draw()
                .map_err(|e| perr(&e))?;
            for (ci, def) in ["none", "r3elu", "gaussian-dp"].iter().enumerate() {
                let color = Palette99::pick(ci).to_rgba();
                let mut pts: Vec<(f64, f64)> = r
                    .points
                    .iter()
                    .filter(|p| p.defense == *def)
                    .filter_map(|p| Some((p.test_acc?, get(p)?)))
                    .collect();
                if pts.is_empty() {
                    continue;
                }
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                chart
                    .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                    .map_err(|e| perr(&e))?
                    .label(*def)
                    .legend(move |(x, y)| Circle::new((x, y), 5, color.filled()));
                chart
                    .draw_series(
                        pts.iter()
                            .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
                    )
                    .map_err(|e| perr(&e))?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| perr(&e))?;
        }
        root.present().map_err(|e| perr(&e))?;
    }
    Ok(svg)
}

/// Run the sweep: `none` once, then R3eLU and the Gaussian baseline at every epsilon.
pub fn run(
    base: &SplitConfig,
    eps: &[f64],
    acfg: &AttackConfig,
    with_fsha: bool,
    out: &Path,
) -> Result<BenchReport> {
    let t0 = Instant::now();
    let ds = data::load(base.data, base.sizes, base.seed)?;
    let fsha = with_fsha && ds.image.is_some();
    let mut plan = vec![(Defense::None, f64::INFINITY)];
    for &e in eps {
        plan.push((Defense::R3elu, e));
        plan.push((Defense::GaussianDp, e));
    }
    let mut report = BenchReport {
        data: base.data.to_string(),
        n_train: base.sizes.train,
        n_test: base.sizes.test,
        n_aux: base.sizes.aux,
        epochs: base.epochs,
        cut: base.cut,
        victims: acfg.victims,
        wall_s: 0.0,
        points: Vec::new(),
    };
    std::fs::create_dir_all(out).map_err(|e| R3Error::io(out, e))?;
    for (def, e) in plan {
        // Gaussian at eps = inf is the identity: skip the duplicate of `none`
        if def == Defense::GaussianDp && e.is_infinite() {
            continue;
        }
        let mut cfg = base.clone();
        cfg.defense = def;
        cfg.r3.eps = e;
        tracing::info!("bench split: {def} eps {e}");
        let (rep, rec, fs) = attack_with(&cfg, &ds, true, true, fsha, acfg)?;
        if let Some((h, w)) = ds.image {
            for (tag, ex) in [("recon", &rec), ("fsha", &fs)] {
                if ex.is_empty() {
                    continue;
                }
                let mut imgs: Vec<Vec<f32>> = ex.iter().map(|x| x.0.clone()).collect();
                imgs.extend(ex.iter().map(|x| x.1.clone()));
                let name = format!(
                    "{tag}_{def}_eps{}.png",
                    if e.is_finite() {
                        e.to_string()
                    } else {
                        "inf".into()
                    }
                );
                crate::image::write_grid(&out.join(name), &imgs, ex.len(), h, w)?;
            }
        }
        eprintln!(
            "{def} eps {e}: acc {} recon_ssim {} property_auc {} fsha_ssim {}",
            f(rep.test_acc),
            f(rep.recon_ssim.or(rep.recon_feature_acc)),
            f(rep.property_auc),
            f(rep.fsha_ssim)
        );
        report.points.push(rep);
        report.wall_s = t0.elapsed().as_secs_f64();
        // keep partial results on disk as the sweep goes
        write_atomic(
            &out.join("report.json"),
            serde_json::to_string_pretty(&report)?.as_bytes(),
        )?;
    }
    let t = table(&report);
    println!("{t}");
    write_atomic(&out.join("table.md"), t.as_bytes())?;
    write_atomic(&out.join("frontier.svg"), frontier_svg(&report)?.as_bytes())?;
    write_atomic(
        &out.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    Ok(report)
}
