//! SVG figures: panels of scatter points or point-and-line series (feature `plot`).
//!
//! Reports describe a [`Figure`] as data; [`Figure::svg`] draws it with plotters. One drawing
//! routine serves every report (attack sweeps, R3eLU frontiers, SAP and HaluProbe figures).
use crate::{Error, Result};
use plotters::prelude::*;

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Filled circles.
    Points,
    /// Circles joined by a line, in x order.
    Line,
}

/// One named series of `(x, y)` points.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub style: Style,
}

/// One chart: axes, ranges and series (empty series are skipped; legends list the rest).
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_range: (f64, f64),
    pub y_range: (f64, f64),
    pub series: Vec<Series>,
}

/// Panels side by side in one row.
#[derive(Debug, Clone)]
pub struct Figure {
    pub panels: Vec<Panel>,
    /// Width of one panel in pixels.
    pub panel_width: u32,
    pub height: u32,
}

impl Figure {
    /// A figure of one panel.
    pub fn single(panel: Panel) -> Self {
        Self {
            panels: vec![panel],
            panel_width: 800,
            height: 520,
        }
    }

    /// The figure as an SVG document.
    pub fn svg(&self) -> Result<String> {
        let perr = |e: &dyn std::fmt::Display| Error::Plot(e.to_string());
        if self.panels.is_empty() {
            return Err(Error::Plot("a figure needs at least one panel".into()));
        }
        let mut svg = String::new();
        {
            let w = self.panel_width * self.panels.len() as u32;
            let root = SVGBackend::with_string(&mut svg, (w, self.height)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| perr(&e))?;
            let areas = root.split_evenly((1, self.panels.len()));
            for (area, p) in areas.iter().zip(&self.panels) {
                let (x0, x1) = ordered(p.x_range);
                let (y0, y1) = ordered(p.y_range);
                let mut chart = ChartBuilder::on(area)
                    .caption(&p.title, ("sans-serif", 18))
                    .margin(12)
                    .x_label_area_size(38)
                    .y_label_area_size(48)
                    .build_cartesian_2d(x0..x1, y0..y1)
                    .map_err(|e| perr(&e))?;
                chart
                    .configure_mesh()
                    .x_desc(p.x_label.as_str())
                    .y_desc(p.y_label.as_str())
                    .draw()
                    .map_err(|e| perr(&e))?;
                let mut any = false;
                for (ci, s) in p.series.iter().enumerate() {
                    if s.points.is_empty() {
                        continue;
                    }
                    any = true;
                    let color = Palette99::pick(ci).to_rgba();
                    let mut pts = s.points.clone();
                    if s.style == Style::Line {
                        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                        chart
                            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                            .map_err(|e| perr(&e))?;
                    }
                    chart
                        .draw_series(
                            pts.iter()
                                .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
                        )
                        .map_err(|e| perr(&e))?
                        .label(s.name.as_str())
                        .legend(move |(x, y)| Circle::new((x, y), 5, color.filled()));
                }
                if any {
                    chart
                        .configure_series_labels()
                        .background_style(WHITE.mix(0.8))
                        .border_style(BLACK)
                        .draw()
                        .map_err(|e| perr(&e))?;
                }
            }
            root.present().map_err(|e| perr(&e))?;
        }
        Ok(svg)
    }
}

/// `(lo, hi)` with `lo < hi` (a degenerate range is widened by 1).
fn ordered((a, b): (f64, f64)) -> (f64, f64) {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, hi + 0.5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_points_lines_and_legends() {
        let panel = |style| Panel {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            x_range: (0.0, 1.0),
            y_range: (1.0, 1.0),
            series: vec![
                Series {
                    name: "alpha".into(),
                    points: vec![(0.5, 1.0), (0.2, 1.0)],
                    style,
                },
                Series {
                    name: "empty".into(),
                    points: vec![],
                    style,
                },
            ],
        };
        let mut f = Figure::single(panel(Style::Points));
        f.panels.push(panel(Style::Line));
        let svg = f.svg().unwrap();
        assert!(svg.contains("<svg") && svg.contains("circle") && svg.contains("polyline"));
        assert!(svg.contains("alpha") && !svg.contains("empty"));
        assert!(Figure {
            panels: vec![],
            panel_width: 1,
            height: 1
        }
        .svg()
        .is_err());
    }
}
