//! Report files: Markdown tables, CSV, an SVG figure of AUROC per layer (feature `plot`), and
//! flat JSON.
use crate::error::Result;
use crate::eval::{CellResult, GridReport};
use std::collections::BTreeMap;
use std::path::Path;
use umbra_common::fs::{write_atomic, write_json};

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
        "{} triples ({} train / {} val / {} test triples, split by question; {:.1}% hallucinated)\n\n{HEADER}\n",
        r.triples,
        r.train_triples,
        r.val_triples,
        r.test_triples,
        100.0 * r.positive_share
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
    m.insert("positive_share".into(), r.positive_share.into());
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

/// SVG: test AUROC per layer for every per-layer feature, baselines as flat lines.
#[cfg(feature = "plot")]
pub fn figure_svg(r: &GridReport) -> Result<String> {
    use umbra_common::plot::{Figure, Panel, Series, Style};
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
    let mut all: Vec<Series> = series
        .into_iter()
        .map(|(name, points)| Series {
            name,
            points,
            style: Style::Line,
        })
        .collect();
    all.extend(r.baselines.iter().map(|b| Series {
        name: format!("baseline: {}", b.name),
        points: vec![(0.0, b.test_auroc), (nl, b.test_auroc)],
        style: Style::Line,
    }));
    let fig = Figure::single(Panel {
        title: format!("HaluProbe: test AUROC per layer ({} triples)", r.triples),
        x_label: "layer".into(),
        y_label: "test AUROC".into(),
        x_range: (0.0, nl),
        y_range: (0.3, 1.0),
        series: all,
    });
    Ok(fig.svg()?)
}

/// Writes `report.md`, `cells.csv`, `report.json` and (feature `plot`) `auroc_by_layer.svg`
/// into `dir`.
pub fn write_report(r: &GridReport, dir: &Path) -> Result<()> {
    let figure = if cfg!(feature = "plot") {
        "![AUROC per layer](auroc_by_layer.svg)\n"
    } else {
        ""
    };
    let md = format!(
        "# HaluProbe report\n\n{}\n## Test AUROC per feature and layer\n\n{}\n{figure}",
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
    #[cfg(feature = "plot")]
    write_atomic(&dir.join("auroc_by_layer.svg"), figure_svg(r)?.as_bytes())?;
    Ok(write_json(&dir.join("report.json"), &flat_json(r))?)
}
