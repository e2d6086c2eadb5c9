//! The evaluation grid (feature family x stage x layer), the baselines, and the selection of
//! the best probe — all on one row-level train / validation / test split.
//!
//! Every probe is fitted on the training rows; the validation rows choose layers, features and
//! thresholds; the test rows only measure (AUROC with a row-bootstrap 95% interval, accuracy and
//! F1 at the validation threshold). Baselines:
//! - `perplexity`: answer log-perplexity (`-mean_logprob`), direction chosen on train;
//! - `llmcheck`: LLM-Check hidden score (log-det of the answer hidden-state covariance),
//!   layer and direction chosen on train;
//! - `saplma`: MLP 256-128-64 on the last answer token at the middle layer;
//! - `lookback_lens`: logistic regression on all per-head lookback ratios (generation).
//!
//! `answer_length` (answer tokens) is reported as a reference, not a baseline: HaluEval's
//! hallucinated answers are often full sentences while the right ones are short spans.
//!
//! Families in the grid: `hidden` (per key and layer), `lookback` and `ffn` (per key and layer,
//! and all layers of a key together), `logit`, and two combinations (best hidden cell +
//! generation lookback + logit, and the same + `ffn.generation.mean`). Folders extracted before
//! the `ffn` family existed have no `ffn.*` keys: the grid then skips that family.
use crate::data::{split_rows, Split};
use crate::error::{HaluError, Result};
use crate::features::{
    key_stage, Stage, FFN_KEYS, HIDDEN_KEYS, LLMCHECK_KEY, LOGIT_KEY, LOOKBACK_KEYS,
};
use crate::metrics::{accuracy_f1, auroc, best_threshold, bootstrap_auroc_ci};
use crate::probe::{FeatureRef, Net, ProbeFile, ProbeKind, ProbeMeta, TrainConfig, PROBE_FORMAT};
use crate::store::{slice_layer, FeatureStore, Matrix};

/// Split and training settings.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    pub val: f64,
    pub test: f64,
    pub seed: u64,
    pub bootstrap: usize,
    /// L2 strengths tried for logistic regression (chosen per cell on validation).
    pub l2_grid: Vec<f64>,
    pub kind: ProbeKind,
    /// MLP widths for `--probe mlp` and SAPLMA.
    pub mlp_hidden: Vec<usize>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            val: 0.2,
            test: 0.2,
            seed: 0,
            bootstrap: 1000,
            l2_grid: vec![1e-2],
            kind: ProbeKind::Logreg,
            mlp_hidden: vec![256, 128, 64],
        }
    }
}

/// One evaluated detector.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CellResult {
    pub name: String,
    pub family: String,
    pub stage: String,
    pub layer: Option<usize>,
    pub method: String,
    pub val_auroc: f64,
    pub test_auroc: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub accuracy: f64,
    pub f1: f64,
}

/// Triple indices of each split.
#[derive(Debug, Clone)]
pub struct Splits {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    pub test: Vec<usize>,
}

impl Splits {
    pub fn new(store: &FeatureStore, cfg: &EvalConfig) -> Result<Self> {
        let m = split_rows(&store.rows, cfg.val, cfg.test, cfg.seed)?;
        let mut s = Splits {
            train: vec![],
            val: vec![],
            test: vec![],
        };
        for (i, r) in store.rows.iter().enumerate() {
            match m[r] {
                Split::Train => s.train.push(i),
                Split::Val => s.val.push(i),
                Split::Test => s.test.push(i),
            }
        }
        Ok(s)
    }
}

/// Everything the grid needs, with labels and groups per split.
pub struct Evaluator<'a> {
    pub store: &'a FeatureStore,
    pub cfg: EvalConfig,
    pub splits: Splits,
}

fn pick(v: &[f32], idx: &[usize]) -> Vec<f32> {
    idx.iter().map(|&i| v[i]).collect()
}

/// A fitted probe with its inputs.
pub struct Fitted {
    pub refs: Vec<FeatureRef>,
    pub net: Net,
    pub threshold: f32,
    pub result: CellResult,
}

impl<'a> Evaluator<'a> {
    pub fn new(store: &'a FeatureStore, cfg: EvalConfig) -> Result<Self> {
        let splits = Splits::new(store, &cfg)?;
        if splits.train.is_empty() || splits.val.is_empty() || splits.test.is_empty() {
            return Err(HaluError::Empty(
                "a split is empty; extract more rows".into(),
            ));
        }
        Ok(Self { store, cfg, splits })
    }

    fn labels(&self, idx: &[usize]) -> Vec<f32> {
        pick(&self.store.labels, idx)
    }

    /// Scores -> metrics: threshold on validation, AUROC (+ CI), accuracy, F1 on test.
    #[allow(clippy::too_many_arguments)]
    pub fn measure(
        &self,
        name: &str,
        family: &str,
        stage: &str,
        layer: Option<usize>,
        method: &str,
        val_scores: &[f32],
        test_scores: &[f32],
    ) -> CellResult {
        let yv = self.labels(&self.splits.val);
        let yt = self.labels(&self.splits.test);
        let groups: Vec<u32> = self
            .splits
            .test
            .iter()
            .map(|&i| self.store.rows[i])
            .collect();
        let thr = best_threshold(val_scores, &yv);
        let (acc, f1) = accuracy_f1(test_scores, &yt, thr);
        let a = auroc(test_scores, &yt).unwrap_or(0.5);
        let (lo, hi) =
            bootstrap_auroc_ci(test_scores, &yt, &groups, self.cfg.bootstrap, self.cfg.seed)
                .unwrap_or((a, a));
        CellResult {
            name: name.into(),
            family: family.into(),
            stage: stage.into(),
            layer,
            method: method.into(),
            val_auroc: auroc(val_scores, &yv).unwrap_or(0.5),
            test_auroc: a,
            ci_low: lo,
            ci_high: hi,
            accuracy: acc,
            f1,
        }
    }

    /// Fits a probe of `kind` on matrix `x` (all triples) and measures it; for logreg the L2
    /// strength is chosen on validation.
    #[allow(clippy::too_many_arguments)]
    pub fn fit_matrix(
        &self,
        x: &Matrix,
        refs: Vec<FeatureRef>,
        kind: ProbeKind,
        name: &str,
        family: &str,
        stage: &str,
        layer: Option<usize>,
    ) -> Result<Fitted> {
        let xtr = x.select(&self.splits.train);
        let xv = x.select(&self.splits.val);
        let xt = x.select(&self.splits.test);
        let ytr = self.labels(&self.splits.train);
        let yv = self.labels(&self.splits.val);
        let cfgs: Vec<TrainConfig> = match kind {
            ProbeKind::Logreg => self
                .cfg
                .l2_grid
                .iter()
                .map(|&l2| TrainConfig::logreg(l2))
                .collect(),
            ProbeKind::Mlp => vec![TrainConfig::mlp(self.cfg.mlp_hidden.clone())],
        };
        let mut best: Option<(f64, Net, Vec<f32>)> = None;
        for mut c in cfgs {
            c.seed = self.cfg.seed;
            let net = Net::fit(&xtr, &ytr, &c)?;
            let pv = net.predict(&xv)?;
            let a = auroc(&pv, &yv).unwrap_or(0.5);
            if best.as_ref().is_none_or(|b| a > b.0) {
                best = Some((a, net, pv));
            }
        }
        let (_, net, pv) = best.ok_or_else(|| HaluError::Input("no probe configuration".into()))?;
        let pt = net.predict(&xt)?;
        let method = match kind {
            ProbeKind::Logreg => "logreg",
            ProbeKind::Mlp => "mlp",
        };
        let result = self.measure(name, family, stage, layer, method, &pv, &pt);
        let threshold = best_threshold(&pv, &yv);
        Ok(Fitted {
            refs,
            net,
            threshold,
            result,
        })
    }

    /// An unsupervised score column: direction chosen on train, then measured.
    fn score_column(
        &self,
        col: &[f32],
        name: &str,
        family: &str,
        stage: &str,
        layer: Option<usize>,
    ) -> CellResult {
        let sign = self.direction(col);
        let v: Vec<f32> = self.splits.val.iter().map(|&i| sign * col[i]).collect();
        let t: Vec<f32> = self.splits.test.iter().map(|&i| sign * col[i]).collect();
        self.measure(name, family, stage, layer, "score", &v, &t)
    }

    /// +1 if higher `col` means hallucinated on the training split, else -1.
    fn direction(&self, col: &[f32]) -> f32 {
        let tr = pick(col, &self.splits.train);
        if auroc(&tr, &self.labels(&self.splits.train)).unwrap_or(0.5) >= 0.5 {
            1.0
        } else {
            -1.0
        }
    }

    fn column(m: &Matrix, j: usize) -> Vec<f32> {
        (0..m.rows).map(|i| m.data[i * m.cols + j]).collect()
    }
}

/// Results of the whole grid.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GridReport {
    pub triples: usize,
    pub train_triples: usize,
    pub val_triples: usize,
    pub test_triples: usize,
    pub cells: Vec<CellResult>,
    pub baselines: Vec<CellResult>,
    pub reference: Vec<CellResult>,
    pub best: CellResult,
    pub best_features: Vec<String>,
}

/// Progress callback: (done, total, what).
pub type Progress<'p> = &'p dyn Fn(usize, usize, &str);

/// Runs the grid and the baselines; selects the best probe on validation AUROC among every
/// cell and a combination (best hidden cell + generation lookback ratios + logit features),
/// refits it as `cfg.kind`, and returns it with the report.
pub fn run_grid(
    store: &FeatureStore,
    cfg: EvalConfig,
    progress: Progress<'_>,
) -> Result<(GridReport, ProbeFile)> {
    let ev = Evaluator::new(store, cfg)?;
    let dims = &store.manifest.model;
    let nl = dims.num_layers;
    let has_ffn = FFN_KEYS
        .iter()
        .all(|(k, _)| store.manifest.keys.contains_key(*k));
    let ffn_keys: &[(&str, Stage)] = if has_ffn { &FFN_KEYS } else { &[] };
    let total = HIDDEN_KEYS.len() * nl + (LOOKBACK_KEYS.len() + ffn_keys.len()) * (nl + 1) + 8;
    let mut done = 0;
    let mut cells: Vec<CellResult> = Vec::new();
    let mut best_hidden: Option<(f64, FeatureRef)> = None;
    let mut candidates: Vec<(f64, Vec<FeatureRef>, String)> = Vec::new();
    let mut saplma = None;
    for (key, stage) in HIDDEN_KEYS {
        let all = store.load(key)?;
        for l in 0..nl {
            let x = slice_layer(&all, nl, l);
            let r = FeatureRef::new(key, Some(l));
            let f = ev.fit_matrix(
                &x,
                vec![r.clone()],
                ProbeKind::Logreg,
                &r.label(),
                "hidden",
                stage.name(),
                Some(l),
            )?;
            if best_hidden
                .as_ref()
                .is_none_or(|b| f.result.val_auroc > b.0)
            {
                best_hidden = Some((f.result.val_auroc, r.clone()));
            }
            candidates.push((f.result.val_auroc, vec![r], f.result.name.clone()));
            cells.push(f.result);
            done += 1;
            progress(done, total, key);
        }
        if key == "hidden.generation.last" {
            let mid = nl / 2;
            let x = slice_layer(&all, nl, mid);
            let f = ev.fit_matrix(
                &x,
                vec![FeatureRef::new(key, Some(mid))],
                ProbeKind::Mlp,
                "saplma",
                "hidden",
                stage.name(),
                Some(mid),
            )?;
            saplma = Some(f.result);
        }
    }
    let mut lookback_lens = None;
    let families = LOOKBACK_KEYS
        .iter()
        .map(|&(k, st)| ("lookback", k, st))
        .chain(ffn_keys.iter().map(|&(k, st)| ("ffn", k, st)));
    for (family, key, stage) in families {
        let all = store.load(key)?;
        for l in 0..nl {
            let x = slice_layer(&all, nl, l);
            let r = FeatureRef::new(key, Some(l));
            let f = ev.fit_matrix(
                &x,
                vec![r.clone()],
                ProbeKind::Logreg,
                &r.label(),
                family,
                stage.name(),
                Some(l),
            )?;
            candidates.push((f.result.val_auroc, vec![r], f.result.name.clone()));
            cells.push(f.result);
            done += 1;
            progress(done, total, key);
        }
        let r = FeatureRef::new(key, None);
        let f = ev.fit_matrix(
            &all,
            vec![r.clone()],
            ProbeKind::Logreg,
            key,
            family,
            stage.name(),
            None,
        )?;
        candidates.push((f.result.val_auroc, vec![r], f.result.name.clone()));
        if key == "lookback.generation.mean" {
            let mut b = f.result.clone();
            b.name = "lookback_lens".into();
            lookback_lens = Some(b);
        }
        cells.push(f.result);
        done += 1;
        progress(done, total, key);
    }
    let logit = store.load(LOGIT_KEY)?;
    let f = ev.fit_matrix(
        &logit,
        vec![FeatureRef::new(LOGIT_KEY, None)],
        ProbeKind::Logreg,
        LOGIT_KEY,
        "logit",
        "generation",
        None,
    )?;
    candidates.push((
        f.result.val_auroc,
        vec![FeatureRef::new(LOGIT_KEY, None)],
        f.result.name.clone(),
    ));
    cells.push(f.result);
    // Baselines.
    let perplexity = {
        let nlp: Vec<f32> = Evaluator::column(&logit, 1).iter().map(|x| -x).collect();
        ev.score_column(&nlp, "perplexity", "logit", "generation", None)
    };
    let length = ev.score_column(
        &Evaluator::column(&logit, 7),
        "answer_length",
        "length",
        "generation",
        None,
    );
    let llm = store.load(LLMCHECK_KEY)?;
    let mut llmcheck: Option<(f64, CellResult)> = None;
    for l in 0..nl {
        let col = Evaluator::column(&llm, l);
        let sign = ev.direction(&col);
        let tr: Vec<f32> = ev.splits.train.iter().map(|&i| sign * col[i]).collect();
        let a = auroc(&tr, &ev.labels(&ev.splits.train)).unwrap_or(0.5);
        let mut c = ev.score_column(
            &col,
            &format!("llmcheck@L{l}"),
            "llmcheck",
            "generation",
            Some(l),
        );
        cells.push(c.clone());
        if llmcheck.as_ref().is_none_or(|b| a > b.0) {
            c.name = "llmcheck".into();
            llmcheck = Some((a, c));
        }
    }
    done += 6;
    progress(done, total, "baselines");
    // Combination candidates: best hidden cell + generation lookback + logit (+ generation
    // FFN statistics when the folder has them).
    if let Some((_, h)) = &best_hidden {
        let base = vec![
            h.clone(),
            FeatureRef::new("lookback.generation.mean", None),
            FeatureRef::new(LOGIT_KEY, None),
        ];
        let mut combos = vec![(base.clone(), format!("{}+lookback+logit", h.label()))];
        if has_ffn {
            let mut refs = base;
            refs.push(FeatureRef::new("ffn.generation.mean", None));
            combos.push((refs, format!("{}+lookback+logit+ffn", h.label())));
        }
        for (refs, name) in combos {
            let x = load_refs(store, &refs)?;
            let f = ev.fit_matrix(
                &x,
                refs.clone(),
                ProbeKind::Logreg,
                &name,
                "combo",
                "generation",
                h.layer,
            )?;
            candidates.push((f.result.val_auroc, refs, name));
            cells.push(f.result);
        }
    }
    done += 2;
    progress(done, total, "combination");
    // Best by validation AUROC, refit as the requested probe kind.
    candidates.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (_, refs, _) = candidates
        .into_iter()
        .next()
        .ok_or_else(|| HaluError::Empty("no candidate probe".into()))?;
    let x = load_refs(store, &refs)?;
    let (stage, name) = stage_and_name(&refs);
    let family = refs
        .iter()
        .map(|r| r.key.split('.').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("+");
    let kind = ev.cfg.kind;
    let best = ev.fit_matrix(
        &x,
        refs.clone(),
        kind,
        &name,
        &family,
        stage.name(),
        refs[0].layer,
    )?;
    let probe = probe_file(
        store,
        kind,
        stage,
        best.refs.clone(),
        best.threshold,
        best.net,
    );
    let baselines: Vec<CellResult> = [
        Some(perplexity),
        llmcheck.map(|x| x.1),
        saplma,
        lookback_lens,
    ]
    .into_iter()
    .flatten()
    .collect();
    progress(total, total, "done");
    Ok((
        GridReport {
            triples: store.len(),
            train_triples: ev.splits.train.len(),
            val_triples: ev.splits.val.len(),
            test_triples: ev.splits.test.len(),
            cells,
            baselines,
            reference: vec![length],
            best: best.result,
            best_features: refs.iter().map(FeatureRef::label).collect(),
        },
        probe,
    ))
}

/// Trains one probe on explicitly selected features (`--select hidden:L12:query,...`).
pub fn train_selected(
    store: &FeatureStore,
    cfg: EvalConfig,
    refs: Vec<FeatureRef>,
) -> Result<(CellResult, ProbeFile)> {
    if refs.is_empty() {
        return Err(HaluError::Input("empty feature selection".into()));
    }
    let ev = Evaluator::new(store, cfg)?;
    let x = load_refs(store, &refs)?;
    let (stage, name) = stage_and_name(&refs);
    let kind = ev.cfg.kind;
    let f = ev.fit_matrix(&x, refs, kind, &name, "selected", stage.name(), None)?;
    let probe = probe_file(store, kind, stage, f.refs.clone(), f.threshold, f.net);
    Ok((f.result, probe))
}

/// The stage a probe on `refs` reads up to (the latest stage among its features; generation
/// when none says) and its name (`label+label+...`).
fn stage_and_name(refs: &[FeatureRef]) -> (Stage, String) {
    let stage = refs
        .iter()
        .filter_map(|r| key_stage(&r.key))
        .max()
        .unwrap_or(Stage::Generation);
    let name = refs
        .iter()
        .map(FeatureRef::label)
        .collect::<Vec<_>>()
        .join("+");
    (stage, name)
}

/// The probe file of a fitted probe on `store`'s model and extraction settings.
fn probe_file(
    store: &FeatureStore,
    kind: ProbeKind,
    stage: Stage,
    features: Vec<FeatureRef>,
    threshold: f32,
    net: Net,
) -> ProbeFile {
    ProbeFile {
        meta: ProbeMeta {
            format: PROBE_FORMAT.into(),
            kind,
            features,
            stage,
            model: store.manifest.model.clone(),
            extract: store.manifest.extract.clone(),
            threshold,
            obfuscated: None,
        },
        net,
    }
}

/// The matrix of `refs` side by side, `[n, Σ widths]`.
pub fn load_refs(store: &FeatureStore, refs: &[FeatureRef]) -> Result<Matrix> {
    let mut parts = Vec::new();
    for r in refs {
        let m = match r.layer {
            Some(l) => store.load_layer(&r.key, l)?,
            None => store.load(&r.key)?,
        };
        parts.push(m);
    }
    Matrix::hcat(&parts.iter().collect::<Vec<_>>())
}
