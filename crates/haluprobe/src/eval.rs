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
//! - `lookback_lens`: logistic regression on all per-head lookback ratios (generation);
//! - own-answer folders with samples: `sampling_overlap` and `sampling_agreement`, the
//!   consistency of the greedy answer with `K` sampled answers (lexical overlap, exact-match
//!   agreement; [`crate::keys::SAMPLING_NAMES`]), direction chosen on train.
//!
//! `answer_length` (answer tokens) is reported as a reference, not a baseline: HaluEval's
//! hallucinated answers are often full sentences while the right ones are short spans.
//!
//! Families in the grid: `hidden` (per key and layer), `lookback` and `ffn` (per key and layer,
//! and all layers of a key together), `logit`, and three combinations (best hidden cell +
//! logit; + generation lookback; + `ffn.generation.mean`). Folders extracted before the `ffn`
//! family existed have no `ffn.*` keys: the grid then skips that family. With
//! [`EvalConfig::serving`] the best probe is chosen among the inputs `umbra serve` computes.
use crate::data::{split_rows, Split};
use crate::error::{HaluError, Result};
use crate::keys::{
    key_stage, Stage, FFN_KEYS, HIDDEN_KEYS, LLMCHECK_KEY, LOGIT_KEY, LOOKBACK_KEYS, SAMPLING_KEY,
};
use crate::metrics::{accuracy_f1, auroc, best_threshold, bootstrap_auroc_ci};
use crate::probe::{FeatureRef, Net, ProbeFile, ProbeKind, ProbeMeta, TrainConfig, PROBE_FORMAT};
use crate::store::{slice_layer, FeatureStore, Matrix};
use umbra_common::progress::Progress;

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
    /// Select the best probe among inputs `umbra serve` can compute ([`servable`]).
    pub serving: bool,
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
            serving: false,
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
        for (name, idx) in [
            ("training", &splits.train),
            ("validation", &splits.val),
            ("test", &splits.test),
        ] {
            let pos = idx.iter().filter(|&&i| store.labels[i] > 0.5).count();
            if pos == 0 || pos == idx.len() {
                return Err(HaluError::Empty(format!(
                    "the {name} split of {} holds {} triples of one class only ({pos} \
                     hallucinated); extract or generate more questions",
                    store.dir.display(),
                    idx.len()
                )));
            }
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

    /// Training AUROC of `col` in its better direction.
    fn train_auroc(&self, col: &[f32]) -> f64 {
        let tr = pick(col, &self.splits.train);
        let a = auroc(&tr, &self.labels(&self.splits.train)).unwrap_or(0.5);
        a.max(1.0 - a)
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
    /// Share of hallucinated triples (0.5 for given-answer folders).
    pub positive_share: f64,
    pub cells: Vec<CellResult>,
    pub baselines: Vec<CellResult>,
    pub reference: Vec<CellResult>,
    pub best: CellResult,
    pub best_features: Vec<String>,
}

/// Whether `umbra serve` can compute a feature key from its taps (residual stream and logits).
pub fn servable(key: &str) -> bool {
    key.starts_with("hidden.") || key == LOGIT_KEY || key == LLMCHECK_KEY
}

/// The grid under construction: every measured cell and the candidates for the best probe.
#[derive(Default)]
struct Grid {
    cells: Vec<CellResult>,
    /// `(validation AUROC, inputs)` of every candidate probe.
    candidates: Vec<(f64, Vec<FeatureRef>)>,
    best_hidden: Option<(f64, FeatureRef)>,
    saplma: Option<CellResult>,
    lookback_lens: Option<CellResult>,
}

impl Grid {
    fn push(&mut self, f: Fitted) {
        self.candidates.push((f.result.val_auroc, f.refs));
        self.cells.push(f.result);
    }

    /// Logistic regression per hidden-state key and layer; SAPLMA on the middle layer's last
    /// answer token.
    fn hidden(&mut self, ev: &Evaluator<'_>, progress: &Progress) -> Result<()> {
        let nl = ev.store.manifest.model.num_layers;
        for (key, stage) in HIDDEN_KEYS {
            let all = ev.store.load(key)?;
            for l in 0..nl {
                let r = FeatureRef::new(key, Some(l));
                let f = ev.fit_matrix(
                    &slice_layer(&all, nl, l),
                    vec![r.clone()],
                    ProbeKind::Logreg,
                    &r.label(),
                    "hidden",
                    stage.name(),
                    Some(l),
                )?;
                if self
                    .best_hidden
                    .as_ref()
                    .is_none_or(|b| f.result.val_auroc > b.0)
                {
                    self.best_hidden = Some((f.result.val_auroc, r));
                }
                self.push(f);
                progress.inc(1);
            }
            if key == "hidden.generation.last" {
                let mid = nl / 2;
                let f = ev.fit_matrix(
                    &slice_layer(&all, nl, mid),
                    vec![FeatureRef::new(key, Some(mid))],
                    ProbeKind::Mlp,
                    "saplma",
                    "hidden",
                    stage.name(),
                    Some(mid),
                )?;
                self.saplma = Some(f.result);
            }
        }
        Ok(())
    }

    /// Lookback ratios and FFN statistics: per layer and all layers of a key together; Lookback
    /// Lens is the all-layer generation-stage lookback probe.
    fn per_layer_families(
        &mut self,
        ev: &Evaluator<'_>,
        ffn_keys: &[(&str, Stage)],
        progress: &Progress,
    ) -> Result<()> {
        let nl = ev.store.manifest.model.num_layers;
        let families = LOOKBACK_KEYS
            .iter()
            .map(|&(k, st)| ("lookback", k, st))
            .chain(ffn_keys.iter().map(|&(k, st)| ("ffn", k, st)));
        for (family, key, stage) in families {
            let all = ev.store.load(key)?;
            for l in 0..nl {
                let r = FeatureRef::new(key, Some(l));
                let f = ev.fit_matrix(
                    &slice_layer(&all, nl, l),
                    vec![r.clone()],
                    ProbeKind::Logreg,
                    &r.label(),
                    family,
                    stage.name(),
                    Some(l),
                )?;
                self.push(f);
                progress.inc(1);
            }
            let r = FeatureRef::new(key, None);
            let f = ev.fit_matrix(
                &all,
                vec![r],
                ProbeKind::Logreg,
                key,
                family,
                stage.name(),
                None,
            )?;
            if key == "lookback.generation.mean" {
                let mut b = f.result.clone();
                b.name = "lookback_lens".into();
                self.lookback_lens = Some(b);
            }
            self.push(f);
            progress.inc(1);
        }
        Ok(())
    }

    /// Logistic regression on the logit features.
    fn logit(&mut self, ev: &Evaluator<'_>, logit: &Matrix) -> Result<()> {
        let f = ev.fit_matrix(
            logit,
            vec![FeatureRef::new(LOGIT_KEY, None)],
            ProbeKind::Logreg,
            LOGIT_KEY,
            "logit",
            "generation",
            None,
        )?;
        self.push(f);
        Ok(())
    }

    /// Unsupervised baselines (direction chosen on train): perplexity, LLM-Check (layer chosen
    /// on train; every layer's cell is kept), the sampling-consistency scores when the folder
    /// has them; and the answer length as a reference.
    fn unsupervised(
        &mut self,
        ev: &Evaluator<'_>,
        logit: &Matrix,
    ) -> Result<(Vec<CellResult>, CellResult)> {
        let nl = ev.store.manifest.model.num_layers;
        let nlp: Vec<f32> = Evaluator::column(logit, 1).iter().map(|x| -x).collect();
        let mut out = vec![ev.score_column(&nlp, "perplexity", "logit", "generation", None)];
        let length = ev.score_column(
            &Evaluator::column(logit, 7),
            "answer_length",
            "length",
            "generation",
            None,
        );
        let llm = ev.store.load(LLMCHECK_KEY)?;
        let mut llmcheck: Option<(f64, CellResult)> = None;
        for l in 0..nl {
            let col = Evaluator::column(&llm, l);
            let a = ev.train_auroc(&col);
            let mut c = ev.score_column(
                &col,
                &format!("llmcheck@L{l}"),
                "llmcheck",
                "generation",
                Some(l),
            );
            self.cells.push(c.clone());
            if llmcheck.as_ref().is_none_or(|b| a > b.0) {
                c.name = "llmcheck".into();
                llmcheck = Some((a, c));
            }
        }
        out.extend(llmcheck.map(|x| x.1));
        if ev.store.manifest.keys.contains_key(SAMPLING_KEY) {
            let s = ev.store.load(SAMPLING_KEY)?;
            for (j, name) in [(0, "sampling_overlap"), (1, "sampling_agreement")] {
                out.push(ev.score_column(
                    &Evaluator::column(&s, j),
                    name,
                    "sampling",
                    "generation",
                    None,
                ));
            }
        }
        Ok((out, length))
    }

    /// Combinations: the best hidden cell + logit features (servable), + generation lookback
    /// ratios, and + generation FFN statistics when the folder has them.
    fn combinations(&mut self, ev: &Evaluator<'_>, has_ffn: bool) -> Result<()> {
        let Some((_, h)) = self.best_hidden.clone() else {
            return Ok(());
        };
        let logit = FeatureRef::new(LOGIT_KEY, None);
        let lookback = FeatureRef::new("lookback.generation.mean", None);
        let mut combos = vec![
            (
                vec![h.clone(), logit.clone()],
                format!("{}+logit", h.label()),
            ),
            (
                vec![h.clone(), lookback.clone(), logit.clone()],
                format!("{}+lookback+logit", h.label()),
            ),
        ];
        if has_ffn {
            combos.push((
                vec![
                    h.clone(),
                    lookback,
                    logit,
                    FeatureRef::new("ffn.generation.mean", None),
                ],
                format!("{}+lookback+logit+ffn", h.label()),
            ));
        }
        for (refs, name) in combos {
            let x = load_refs(ev.store, &refs)?;
            let f = ev.fit_matrix(
                &x,
                refs,
                ProbeKind::Logreg,
                &name,
                "combo",
                "generation",
                h.layer,
            )?;
            self.push(f);
        }
        Ok(())
    }

    /// The candidate with the best validation AUROC (servable ones only with `serving`),
    /// refitted as `kind`.
    fn select_best(&mut self, ev: &Evaluator<'_>, serving: bool) -> Result<Fitted> {
        let mut cands: Vec<&(f64, Vec<FeatureRef>)> = self
            .candidates
            .iter()
            .filter(|(_, refs)| !serving || refs.iter().all(|r| servable(&r.key)))
            .collect();
        cands.sort_by(|a, b| b.0.total_cmp(&a.0));
        let refs = cands
            .first()
            .map(|c| c.1.clone())
            .ok_or_else(|| HaluError::Empty("no candidate probe".into()))?;
        let x = load_refs(ev.store, &refs)?;
        let (stage, name) = stage_and_name(&refs);
        let family = refs
            .iter()
            .map(|r| r.key.split('.').next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("+");
        let layer = refs[0].layer;
        ev.fit_matrix(&x, refs, ev.cfg.kind, &name, &family, stage.name(), layer)
    }
}

/// Runs the grid and the baselines; selects the best probe on validation AUROC among every
/// cell and the combinations (only servable inputs with `cfg.serving`), refits it as
/// `cfg.kind`, and returns it with the report. `progress` counts the fitted cells.
pub fn run_grid(
    store: &FeatureStore,
    cfg: EvalConfig,
    progress: &Progress,
) -> Result<(GridReport, ProbeFile)> {
    let ev = Evaluator::new(store, cfg)?;
    let nl = store.manifest.model.num_layers;
    let has_ffn = FFN_KEYS
        .iter()
        .all(|(k, _)| store.manifest.keys.contains_key(*k));
    let ffn_keys: &[(&str, Stage)] = if has_ffn { &FFN_KEYS } else { &[] };
    progress.set_length(
        (HIDDEN_KEYS.len() * nl + (LOOKBACK_KEYS.len() + ffn_keys.len()) * (nl + 1)) as u64,
    );
    let mut grid = Grid::default();
    grid.hidden(&ev, progress)?;
    grid.per_layer_families(&ev, ffn_keys, progress)?;
    let logit = store.load(LOGIT_KEY)?;
    grid.logit(&ev, &logit)?;
    let (unsupervised, length) = grid.unsupervised(&ev, &logit)?;
    grid.combinations(&ev, has_ffn)?;
    let best = grid.select_best(&ev, ev.cfg.serving)?;
    let (stage, _) = stage_and_name(&best.refs);
    let probe = probe_file(
        store,
        ev.cfg.kind,
        stage,
        best.refs.clone(),
        best.threshold,
        best.net,
    );
    let mut baselines = unsupervised;
    baselines.extend(grid.saplma);
    baselines.extend(grid.lookback_lens);
    progress.finish();
    Ok((
        GridReport {
            triples: store.len(),
            train_triples: ev.splits.train.len(),
            val_triples: ev.splits.val.len(),
            test_triples: ev.splits.test.len(),
            positive_share: store.labels.iter().filter(|&&l| l > 0.5).count() as f64
                / store.len().max(1) as f64,
            cells: grid.cells,
            baselines,
            reference: vec![length],
            best: best.result,
            best_features: best.refs.iter().map(FeatureRef::label).collect(),
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
