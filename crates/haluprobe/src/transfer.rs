//! The transfer matrix: a probe trained on one task and tested on every other, per feature
//! family (the paper's finding to check: lookback ratios transfer across data sets, hidden
//! states do not).
//!
//! Every task is a feature folder of the same model (given answers: HaluEval QA, dialogue,
//! summarization; own answers). For source `s` and family `f` a logistic regression is fitted
//! on `s`'s training split (its L2 strength and, for the hidden family, its layer chosen on
//! `s`'s validation split) and scored on the test split of every target `t` (`t = s` is the
//! in-domain cell): test AUROC with a bootstrap 95% interval over `t`'s questions. The
//! standardization is `s`'s, as a deployed probe would carry it.
use crate::error::{HaluError, Result};
use crate::eval::{EvalConfig, Evaluator};
use crate::keys::LOGIT_KEY;
use crate::metrics::{auroc, bootstrap_auroc_ci};
use crate::probe::{FeatureRef, ProbeKind};
use crate::store::{slice_layer, FeatureStore};

/// A family of the transfer matrix: its name and input key (`per_layer`: one layer, chosen on
/// the source's validation split).
#[derive(Debug, Clone, Copy)]
pub struct Family {
    pub name: &'static str,
    pub key: &'static str,
    pub per_layer: bool,
}

/// The families compared: hidden states (mean over the answer, best layer), the last answer
/// token's hidden state (best layer), lookback ratios, FFN statistics and logit features.
pub const FAMILIES: [Family; 5] = [
    Family {
        name: "hidden",
        key: "hidden.generation.mean",
        per_layer: true,
    },
    Family {
        name: "hidden_last",
        key: "hidden.generation.last",
        per_layer: true,
    },
    Family {
        name: "lookback",
        key: "lookback.generation.mean",
        per_layer: false,
    },
    Family {
        name: "ffn",
        key: "ffn.generation.mean",
        per_layer: false,
    },
    Family {
        name: "logit",
        key: LOGIT_KEY,
        per_layer: false,
    },
];

/// One cell: a probe of `family` trained on `source`, tested on `target`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TransferCell {
    pub family: String,
    pub source: String,
    pub target: String,
    /// The layer of a per-layer family (chosen on the source's validation split).
    pub layer: Option<usize>,
    pub test_auroc: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub test_triples: usize,
}

/// The whole matrix.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TransferMatrix {
    pub tasks: Vec<String>,
    pub families: Vec<String>,
    pub cells: Vec<TransferCell>,
}

impl TransferMatrix {
    pub fn cell(&self, family: &str, source: &str, target: &str) -> Option<&TransferCell> {
        self.cells
            .iter()
            .find(|c| c.family == family && c.source == source && c.target == target)
    }

    /// Mean in-domain (diagonal) and cross-task (off-diagonal) AUROC of a family.
    pub fn summary(&self, family: &str) -> (f64, f64) {
        let (mut d, mut nd, mut o, mut no) = (0.0, 0, 0.0, 0);
        for c in self.cells.iter().filter(|c| c.family == family) {
            if c.source == c.target {
                d += c.test_auroc;
                nd += 1;
            } else {
                o += c.test_auroc;
                no += 1;
            }
        }
        (d / nd.max(1) as f64, o / no.max(1) as f64)
    }

    /// One Markdown table per family (rows: trained on, columns: tested on) and a summary.
    pub fn markdown(&self) -> String {
        let mut s = String::from(
            "| family | in-domain mean AUROC | cross-task mean AUROC | drop |\n|---|---|---|---|\n",
        );
        for f in &self.families {
            let (d, o) = self.summary(f);
            s += &format!("| {f} | {d:.3} | {o:.3} | {:.3} |\n", d - o);
        }
        for f in &self.families {
            s += &format!("\n**{f}** (rows: trained on; columns: tested on)\n\n| train \\ test |");
            for t in &self.tasks {
                s += &format!(" {t} |");
            }
            s += "\n|---|";
            s += &"---|".repeat(self.tasks.len());
            s += "\n";
            for src in &self.tasks {
                s += &format!("| {src} |");
                for t in &self.tasks {
                    match self.cell(f, src, t) {
                        Some(c) => {
                            s += &format!(
                                " {:.3} [{:.3}, {:.3}] |",
                                c.test_auroc, c.ci_low, c.ci_high
                            )
                        }
                        None => s += " – |",
                    }
                }
                s += "\n";
            }
        }
        s
    }

    /// One panel per family: test AUROC (y) per target task (x, numbered as in
    /// [`TransferMatrix::tasks`]), one line per source task.
    #[cfg(feature = "plot")]
    pub fn figure_svg(&self) -> Result<String> {
        use umbra_common::plot::{Figure, Panel, Series, Style};
        let legend = self
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| format!("{} = {t}", i + 1))
            .collect::<Vec<_>>()
            .join(", ");
        let panels = self
            .families
            .iter()
            .map(|f| Panel {
                title: format!("{f}: trained on (lines) / tested on (x)"),
                x_label: format!("test task ({legend})"),
                y_label: "test AUROC".into(),
                x_range: (0.5, self.tasks.len() as f64 + 0.5),
                y_range: (0.3, 1.0),
                series: self
                    .tasks
                    .iter()
                    .map(|src| Series {
                        name: format!("train {src}"),
                        points: self
                            .tasks
                            .iter()
                            .enumerate()
                            .filter_map(|(i, t)| {
                                self.cell(f, src, t).map(|c| (i as f64 + 1.0, c.test_auroc))
                            })
                            .collect(),
                        style: Style::Line,
                    })
                    .collect(),
            })
            .collect();
        Ok(Figure {
            panels,
            panel_width: 560,
            height: 460,
        }
        .svg()?)
    }
}

/// The matrix over `tasks` (name, feature folder), for the families of [`FAMILIES`] that every
/// folder holds. Folders must come from models of the same dimensions.
pub fn transfer_matrix(
    tasks: &[(String, FeatureStore)],
    cfg: &EvalConfig,
) -> Result<TransferMatrix> {
    if tasks.len() < 2 {
        return Err(HaluError::Input(
            "a transfer matrix needs at least two feature folders".into(),
        ));
    }
    let dims = &tasks[0].1.manifest.model;
    if let Some((n, s)) = tasks.iter().find(|(_, s)| s.manifest.model != *dims) {
        return Err(HaluError::FeatureMismatch(format!(
            "task `{n}` ({}) comes from a model of other dimensions than `{}`",
            s.dir.display(),
            tasks[0].0
        )));
    }
    let evs = tasks
        .iter()
        .map(|(_, s)| Evaluator::new(s, cfg.clone()))
        .collect::<Result<Vec<_>>>()?;
    let families: Vec<Family> = FAMILIES
        .into_iter()
        .filter(|f| {
            tasks
                .iter()
                .all(|(_, s)| s.manifest.keys.contains_key(f.key))
        })
        .collect();
    let nl = dims.num_layers;
    let mut cells = vec![];
    for fam in &families {
        let mats = tasks
            .iter()
            .map(|(_, s)| s.load(fam.key))
            .collect::<Result<Vec<_>>>()?;
        for (si, (src, _)) in tasks.iter().enumerate() {
            let ev = &evs[si];
            let layers: Vec<Option<usize>> = if fam.per_layer {
                (0..nl).map(Some).collect()
            } else {
                vec![None]
            };
            let mut best: Option<(f64, Option<usize>, crate::probe::Net)> = None;
            for l in layers {
                let x = match l {
                    Some(l) => slice_layer(&mats[si], nl, l),
                    None => mats[si].clone(),
                };
                let f = ev.fit_matrix(
                    &x,
                    vec![FeatureRef::new(fam.key, l)],
                    ProbeKind::Logreg,
                    fam.name,
                    fam.name,
                    "generation",
                    l,
                )?;
                if best.as_ref().is_none_or(|b| f.result.val_auroc > b.0) {
                    best = Some((f.result.val_auroc, l, f.net));
                }
            }
            let (_, layer, net) =
                best.ok_or_else(|| HaluError::Empty("no probe was fitted".into()))?;
            for (ti, (tgt, store)) in tasks.iter().enumerate() {
                let test = &evs[ti].splits.test;
                let x = match layer {
                    Some(l) => slice_layer(&mats[ti], nl, l),
                    None => mats[ti].clone(),
                }
                .select(test);
                let scores = net.predict(&x)?;
                let labels: Vec<f32> = test.iter().map(|&i| store.labels[i]).collect();
                let groups: Vec<u32> = test.iter().map(|&i| store.rows[i]).collect();
                let a = auroc(&scores, &labels).unwrap_or(0.5);
                let (lo, hi) =
                    bootstrap_auroc_ci(&scores, &labels, &groups, cfg.bootstrap, cfg.seed)
                        .unwrap_or((a, a));
                cells.push(TransferCell {
                    family: fam.name.into(),
                    source: src.clone(),
                    target: tgt.clone(),
                    layer,
                    test_auroc: a,
                    ci_low: lo,
                    ci_high: hi,
                    test_triples: test.len(),
                });
            }
        }
    }
    Ok(TransferMatrix {
        tasks: tasks.iter().map(|(n, _)| n.clone()).collect(),
        families: families.iter().map(|f| f.name.to_string()).collect(),
        cells,
    })
}
