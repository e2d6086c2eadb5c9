//! Report files: Markdown tables, CSV, an SVG figure of AUROC per layer, and flat JSON.
use crate::error::{HaluError, Result};
use crate::eval::{CellResult, GridReport};
use crate::store::{write_atomic, write_json};
use std::collections::BTreeMap;
use std::path::Path;

fn fmt_cell(c: &CellResult) -> String {
    format!(
        "| {} | {} | {} | {} | {:.3} | {:.3} [{:.3}, {:.3}] | {:.3} | {:.3} |",
        c.name,
        c.family,
        c.stage,
        c.method,
        c.val_auroc,
        c.test_auroc,
        c.ci_low,
        c.ci_high,
        c.accuracy,
        c.f1
    )
}

const HEADER: &str = "| detector | family | stage | method | val AUROC | test AUROC [95% CI] | acc | F1 |\n|---|---|---|---|---|---|---|---|";

/// The summary table: best probe, baselines, reference, and the best cell per (family, stage).
pub fn summary_markdown(r: &GridReport) -> String {
    let mut s = format!(
        "{} triples ({} train / {} val / {} test triples, split by HaluEval row)\n\n{HEADER}\n",
        r.triples, r.train_triples, r.val_triples, r.test_triples
    );
    s += &format!("{} **(best probe)**\n", fmt_cell(&r.best));
    for b in &r.baselines {
        s += &format!("{} (baseline)\n", fmt_cell(b));
    }
    for b in &r.reference {
        s += &format!("{} (reference)\n", fmt_cell(b));
    }
    s += "\nBest cell per feature family and stage (selected on validation AUROC):\n\n";
    s += HEADER;
    s += "\n";
    for c in best_per_family_stage(&r.cells).values() {
        s += &fmt_cell(c);
        s += "\n";
    }
    s
}

/// For each (family, stage, selection), the cell with the highest validation AUROC.
pub fn best_per_family_stage(cells: &[CellResult]) -> BTreeMap<String, CellResult> {
    let mut m: BTreeMap<String, CellResult> = BTreeMap::new();
    for c in cells {
        let key = format!("{} / {}", c.family, c.name.split('@').next().unwrap_or(""));
        let better = m.get(&key).is_none_or(|b| c.val_auroc > b.val_auroc);
        if better {
            m.insert(key, c.clone());
        }
    }
    m
}

/// Full grid: feature key (rows) x layer (columns), test AUROC.
pub fn layer_table_markdown(r: &GridReport) -> String {
    let mut by_key: BTreeMap<String, BTreeMap<usize, f64>> = BTreeMap::new();
    let mut nl = 0;
    for c in &r.cells {
        if let Some(l) = c.layer {
            let key = c.name.split('@').next().unwrap_or("").to_string();
            if c.family == "combo" {
                continue;
            }
            by_key.entry(key).or_default().insert(l, c.test_auroc);
            nl = nl.max(l + 1);
        }
    }
    let mut s = String::from("| feature \\ layer |");
    for l in 0..nl {
        s += &format!(" {l} |");
    }
    s += "\n|---|";
    s += &"---|".repeat(nl);
    s += "\n";
    for (k, row) in &by_key {
        s += &format!("| {k} |");
        for l in 0..nl {
            match row.get(&l) {
                Some(a) => s += &format!(" {a:.2} |"),
                None => s += " |",
            }
        }
        s += "\n";
    }
    s
}

/// Flat JSON: `best_auroc`, `best_ci_low`, `best_ci_high`, `best_accuracy`, `best_f1`,
/// `best_feature`, `best_stage`, `triples`, `test_triples`, and for each baseline / reference
/// `<name>` (test AUROC), `<name>_ci_low`, `<name>_ci_high`.
pub fn flat_json(r: &GridReport) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("best_auroc".into(), r.best.test_auroc.into());
    m.insert("best_ci_low".into(), r.best.ci_low.into());
    m.insert("best_ci_high".into(), r.best.ci_high.into());
    m.insert("best_val_auroc".into(), r.best.val_auroc.into());
    m.insert("best_accuracy".into(), r.best.accuracy.into());
    m.insert("best_f1".into(), r.best.f1.into());
    m.insert("best_feature".into(), r.best.name.clone().into());
    m.insert("best_stage".into(), r.best.stage.clone().into());
    m.insert("best_method".into(), r.best.method.clone().into());
    m.insert("triples".into(), r.triples.into());
    m.insert("test_triples".into(), r.test_triples.into());
    for b in r.baselines.iter().chain(&r.reference) {
        m.insert(b.name.clone(), b.test_auroc.into());
        m.insert(format!("{}_ci_low", b.name), b.ci_low.into());
        m.insert(format!("{}_ci_high", b.name), b.ci_high.into());
    }
    // One flat key per feature (e.g. `best_hidden_generation_last`): its best cell's test AUROC.
    for c in best_per_family_stage(&r.cells).values() {
        let key = c.name.split('@').next().unwrap_or("");
        m.insert(
            format!("best_{}", key.replace('.', "_")),
            c.test_auroc.into(),
        );
    }
    serde_json::Value::Object(m)
}

/// SVG: test AUROC per layer for every per-layer feature, baselines as horizontal lines.
pub fn figure_svg(r: &GridReport) -> Result<String> {
    use plotters::prelude::*;
    let perr = |e: &dyn std::fmt::Display| HaluError::Plot(e.to_string());
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for c in &r.cells {
        if let (Some(l), true) = (c.layer, c.family != "combo") {
            let key = c.name.split('@').next().unwrap_or("").to_string();
            series
                .entry(key)
                .or_default()
                .push((l as f64, c.test_auroc));
        }
    }
    let nl = series
        .values()
        .flat_map(|v| v.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 620)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| perr(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("HaluProbe: test AUROC per layer ({} triples)", r.triples),
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..nl, 0.3f64..1.0f64)
            .map_err(|e| perr(&e))?;
        chart
            .configure_mesh()
            .x_desc("layer")
            .y_desc("test AUROC")
            .draw()
            .map_err(|e| perr(&e))?;
        for (i, (k, pts)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let mut pts = pts.clone();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(|e| perr(&e))?
                .label(k.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
        for (i, b) in r.baselines.iter().enumerate() {
            let color = Palette99::pick(i + series.len()).to_rgba();
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(0.0, b.test_auroc), (nl, b.test_auroc)],
                    6,
                    4,
                    color.stroke_width(1),
                ))
                .map_err(|e| perr(&e))?
                .label(format!("baseline: {}", b.name))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| perr(&e))?;
        root.present().map_err(|e| perr(&e))?;
    }
    Ok(svg)
}

/// Writes `report.md`, `cells.csv`, `auroc_by_layer.svg` and `report.json` into `dir`.
pub fn write_report(r: &GridReport, dir: &Path) -> Result<()> {
    let md = format!(
        "# HaluProbe report\n\n{}\n## Test AUROC per feature and layer\n\n{}\n![AUROC per layer](auroc_by_layer.svg)\n",
        summary_markdown(r),
        layer_table_markdown(r)
    );
    write_atomic(&dir.join("report.md"), md.as_bytes())?;
    let mut csv = String::from(
        "name,family,stage,layer,method,val_auroc,test_auroc,ci_low,ci_high,accuracy,f1\n",
    );
    for c in r
        .cells
        .iter()
        .chain(&r.baselines)
        .chain(&r.reference)
        .chain([&r.best])
    {
        csv += &format!(
            "{},{},{},{},{},{:.4},{:.4},{:.4},{:.4},{:.4},{:.4}\n",
            c.name,
            c.family,
            c.stage,
            c.layer.map(|l| l.to_string()).unwrap_or_default(),
            c.method,
            c.val_auroc,
            c.test_auroc,
            c.ci_low,
            c.ci_high,
            c.accuracy,
            c.f1
        );
    }
    write_atomic(&dir.join("cells.csv"), csv.as_bytes())?;
    write_atomic(&dir.join("auroc_by_layer.svg"), figure_svg(r)?.as_bytes())?;
    write_json(&dir.join("report.json"), &flat_json(r))
}
