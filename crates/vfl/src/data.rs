//! Tabular data for split learning: loaders (Adult, breast cancer, German credit, Caravan, any CSV
//! with a label column), a seeded `make_classification`-style generator, the 70/30 split, the
//! vertical split of the columns between the two parties and standardisation fitted on the training
//! split only.
use crate::error::{Result, VflError};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What the label is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Binary classification, labels in {0, 1}; BCE loss, AUC.
    Binary,
    /// Regression; MSE loss, RMSE.
    Regression,
}

/// A dense table: `x` is row-major `[n, d]`, `y` is `[n]`. `source[j]` names the original feature
/// an encoded column comes from (one-hot columns of one categorical feature share it).
#[derive(Debug, Clone)]
pub struct Table {
    pub n: usize,
    pub d: usize,
    pub x: Vec<f32>,
    pub y: Vec<f32>,
    pub columns: Vec<String>,
    pub source: Vec<String>,
    pub task: Task,
}

impl Table {
    /// Original feature names in column order, deduplicated.
    pub fn features(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in &self.source {
            if out.last() != Some(s) && !out.contains(s) {
                out.push(s.clone());
            }
        }
        out
    }

    /// Rows `idx` of the columns `cols`, row-major.
    pub fn gather(&self, idx: &[usize], cols: &[usize]) -> Vec<f32> {
        let mut out = Vec::with_capacity(idx.len() * cols.len());
        for &i in idx {
            let row = &self.x[i * self.d..(i + 1) * self.d];
            out.extend(cols.iter().map(|&c| row[c]));
        }
        out
    }

    /// Keep only the columns `cols` (in that order).
    pub fn select_columns(&self, cols: &[usize]) -> Table {
        let idx: Vec<usize> = (0..self.n).collect();
        Table {
            n: self.n,
            d: cols.len(),
            x: self.gather(&idx, cols),
            y: self.y.clone(),
            columns: cols.iter().map(|&c| self.columns[c].clone()).collect(),
            source: cols.iter().map(|&c| self.source[c].clone()).collect(),
            task: self.task,
        }
    }

    fn check(&self) -> Result<()> {
        if self.n == 0 || self.d == 0 {
            return Err(VflError::Data("empty table".into()));
        }
        if self.x.len() != self.n * self.d || self.y.len() != self.n {
            return Err(VflError::Data("inconsistent table shape".into()));
        }
        if self.task == Task::Binary {
            let pos = self.y.iter().filter(|&&v| v == 1.0).count();
            if pos == 0 || pos == self.n {
                return Err(VflError::Data("binary label has a single class".into()));
            }
        }
        Ok(())
    }
}

/// Where a dataset comes from, as written on the command line: `adult`, `breast-cancer`,
/// `german-credit`, `caravan`, `synthetic:NxD`, `csv:PATH:LABEL[:POSITIVE]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DataSpec {
    Adult,
    BreastCancer,
    GermanCredit,
    Caravan,
    Synthetic {
        n: usize,
        d: usize,
    },
    Csv {
        path: PathBuf,
        label: String,
        positive: Option<String>,
    },
}

impl std::str::FromStr for DataSpec {
    type Err = VflError;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |m: &str| VflError::Config(format!("--data `{s}`: {m}"));
        Ok(match s {
            "adult" => DataSpec::Adult,
            "breast-cancer" | "breast_cancer" => DataSpec::BreastCancer,
            "german-credit" | "german_credit" | "germancredit" => DataSpec::GermanCredit,
            "caravan" => DataSpec::Caravan,
            _ if s.starts_with("synthetic:") => {
                let dims = &s["synthetic:".len()..];
                let (n, d) = dims
                    .split_once('x')
                    .ok_or_else(|| bad("expected synthetic:NxD"))?;
                let n: usize = n.parse().map_err(|_| bad("bad N"))?;
                let d: usize = d.parse().map_err(|_| bad("bad D"))?;
                if !(10..=1_000_000).contains(&n) || !(2..=500).contains(&d) {
                    return Err(bad("synthetic supports 10..=1000000 rows x 2..=500 columns"));
                }
                DataSpec::Synthetic { n, d }
            }
            _ if s.starts_with("csv:") => {
                let mut parts = s["csv:".len()..].splitn(3, ':');
                let path = parts.next().unwrap_or_default();
                let label = parts.next().ok_or_else(|| bad("expected csv:PATH:LABEL"))?;
                DataSpec::Csv {
                    path: PathBuf::from(path),
                    label: label.to_string(),
                    positive: parts.next().map(str::to_string),
                }
            }
            _ => {
                return Err(bad(
                    "known: adult, breast-cancer, german-credit, caravan, synthetic:NxD, csv:PATH:LABEL[:POSITIVE]",
                ))
            }
        })
    }
}

impl std::fmt::Display for DataSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataSpec::Adult => write!(f, "adult"),
            DataSpec::BreastCancer => write!(f, "breast-cancer"),
            DataSpec::GermanCredit => write!(f, "german-credit"),
            DataSpec::Caravan => write!(f, "caravan"),
            DataSpec::Synthetic { n, d } => write!(f, "synthetic:{n}x{d}"),
            DataSpec::Csv {
                path,
                label,
                positive,
            } => {
                write!(f, "csv:{}:{label}", path.display())?;
                if let Some(p) = positive {
                    write!(f, ":{p}")?;
                }
                Ok(())
            }
        }
    }
}

/// The one place that maps a named dataset to a file through `umbra-assets`.
pub fn asset_path(spec: &DataSpec) -> Result<PathBuf> {
    use umbra_assets::{Asset, Cache};
    let asset = match spec {
        DataSpec::Adult => Asset::Adult,
        DataSpec::BreastCancer => Asset::BreastCancer,
        DataSpec::GermanCredit => Asset::GermanCredit,
        DataSpec::Caravan => Asset::Caravan,
        DataSpec::Csv { path, .. } => return Ok(path.clone()),
        DataSpec::Synthetic { .. } => {
            return Err(VflError::Data("synthetic data has no file".into()))
        }
    };
    Ok(Cache::from_env()?.fetch(asset)?)
}

/// Load a dataset (fetching the asset if needed). `seed` drives the synthetic generator.
pub fn load(spec: &DataSpec, seed: u64) -> Result<Table> {
    let t = match spec {
        DataSpec::Synthetic { n, d } => make_classification(*n, *d, seed),
        DataSpec::Adult => load_adult(&asset_path(spec)?)?,
        DataSpec::BreastCancer => load_breast_cancer(&asset_path(spec)?)?,
        DataSpec::GermanCredit => load_csv(&asset_path(spec)?, "creditability", Some("bad"))?,
        DataSpec::Caravan => load_csv(&asset_path(spec)?, "Purchase", Some("Yes"))?,
        DataSpec::Csv {
            path,
            label,
            positive,
        } => load_csv(path, label, positive.as_deref())?,
    };
    t.check()?;
    Ok(t)
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| VflError::io(path, e))
}

/// Raw string cells plus a per-column "is numeric" decision, encoded into a [`Table`]: numeric
/// columns as is (missing -> column mean), categorical ones one-hot (missing is its own level).
fn encode(names: &[String], rows: &[Vec<String>], labels: Vec<f32>, task: Task) -> Result<Table> {
    let k = names.len();
    let missing = |s: &str| s.is_empty() || s == "?" || s == "NA";
    let mut numeric = vec![true; k];
    for r in rows {
        for (j, c) in r.iter().enumerate() {
            if !missing(c) && c.parse::<f64>().is_err() {
                numeric[j] = false;
            }
        }
    }
    let mut columns = Vec::new();
    let mut source = Vec::new();
    // per original column: either (mean) or (levels)
    enum Enc {
        Num(f32),
        Cat(BTreeMap<String, usize>),
    }
    let mut encs = Vec::with_capacity(k);
    for j in 0..k {
        if numeric[j] {
            let vals: Vec<f64> = rows
                .iter()
                .filter_map(|r| r[j].parse::<f64>().ok())
                .collect();
            let mean = if vals.is_empty() {
                0.0
            } else {
                vals.iter().sum::<f64>() / vals.len() as f64
            };
            columns.push(names[j].clone());
            source.push(names[j].clone());
            encs.push(Enc::Num(mean as f32));
        } else {
            let mut levels = BTreeMap::new();
            for r in rows {
                let n = levels.len();
                levels.entry(r[j].clone()).or_insert(n);
            }
            // stable order: sorted level names
            let sorted: Vec<String> = levels.keys().cloned().collect();
            let levels: BTreeMap<String, usize> = sorted
                .iter()
                .enumerate()
                .map(|(i, s)| (s.clone(), i))
                .collect();
            for s in &sorted {
                columns.push(format!("{}={}", names[j], s));
                source.push(names[j].clone());
            }
            encs.push(Enc::Cat(levels));
        }
    }
    let d = columns.len();
    let mut x = Vec::with_capacity(rows.len() * d);
    for r in rows {
        for (j, e) in encs.iter().enumerate() {
            match e {
                Enc::Num(mean) => x.push(r[j].parse::<f32>().unwrap_or(*mean)),
                Enc::Cat(levels) => {
                    let hit = levels.get(&r[j]).copied();
                    x.extend((0..levels.len()).map(|l| if Some(l) == hit { 1.0 } else { 0.0 }));
                }
            }
        }
    }
    Ok(Table {
        n: rows.len(),
        d,
        x,
        y: labels,
        columns,
        source,
        task,
    })
}

const ADULT_COLUMNS: [&str; 14] = [
    "age",
    "workclass",
    "fnlwgt",
    "education",
    "education-num",
    "marital-status",
    "occupation",
    "relationship",
    "race",
    "sex",
    "capital-gain",
    "capital-loss",
    "hours-per-week",
    "native-country",
];

/// UCI Adult: `adult.data` plus `adult.test` from the same folder (its header line is skipped and
/// its labels' trailing `.` removed). Label 1 = `>50K`. 48,842 rows.
pub fn load_adult(data: &Path) -> Result<Table> {
    let mut files = vec![data.to_path_buf()];
    let test = data.with_file_name("adult.test");
    if test.exists() {
        files.push(test);
    }
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    for f in files {
        let text = read(&f)?;
        for (ln, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('|') {
                continue;
            }
            let cells: Vec<String> = line.split(',').map(|c| c.trim().to_string()).collect();
            if cells.len() != 15 {
                return Err(VflError::Parse {
                    path: f.clone(),
                    line: ln + 1,
                    msg: format!("expected 15 fields, got {}", cells.len()),
                });
            }
            let lab = cells[14].trim_end_matches('.');
            let y = match lab {
                ">50K" => 1.0,
                "<=50K" => 0.0,
                other => {
                    return Err(VflError::Parse {
                        path: f.clone(),
                        line: ln + 1,
                        msg: format!("unknown label `{other}`"),
                    })
                }
            };
            labels.push(y);
            rows.push(cells[..14].to_vec());
        }
    }
    let names: Vec<String> = ADULT_COLUMNS.iter().map(|s| s.to_string()).collect();
    encode(&names, &rows, labels, Task::Binary)
}

/// scikit-learn's `breast_cancer.csv`: a first line `569,30,malignant,benign`, then 30 features
/// and the target (0 = malignant, 1 = benign).
pub fn load_breast_cancer(path: &Path) -> Result<Table> {
    let text = read(path)?;
    let mut lines = text.lines();
    let head = lines.next().unwrap_or_default();
    let nfeat: usize = head
        .split(',')
        .nth(1)
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| VflError::Parse {
            path: path.into(),
            line: 1,
            msg: "expected `N,D,...` header".into(),
        })?;
    let names: Vec<String> = (0..nfeat).map(|i| format!("f{i}")).collect();
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    for (ln, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let cells: Vec<String> = line.split(',').map(|c| c.trim().to_string()).collect();
        if cells.len() != nfeat + 1 {
            return Err(VflError::Parse {
                path: path.into(),
                line: ln + 2,
                msg: format!("expected {} fields", nfeat + 1),
            });
        }
        labels.push(parse_label(&cells[nfeat], Some("1"), path, ln + 2)?);
        rows.push(cells[..nfeat].to_vec());
    }
    encode(&names, &rows, labels, Task::Binary)
}

fn parse_label(s: &str, positive: Option<&str>, path: &Path, line: usize) -> Result<f32> {
    let s = s.trim().trim_matches('"');
    if let Some(p) = positive {
        return Ok(if s == p { 1.0 } else { 0.0 });
    }
    s.parse::<f32>().map_err(|_| VflError::Parse {
        path: path.into(),
        line,
        msg: format!("label `{s}` is not numeric; give the positive class"),
    })
}

/// Split one CSV line, honouring double quotes (`"a, b"` is one cell, `""` an escaped quote).
pub fn split_csv_line(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur).trim().to_string()),
            _ => cur.push(c),
        }
    }
    out.push(cur.trim().to_string());
    out
}

/// Any CSV with a header and a label column. With `positive` the task is binary (label ==
/// positive); otherwise a label with values only in {0,1} is binary and anything else regression.
/// Quoted cells (with commas inside) are supported.
pub fn load_csv(path: &Path, label: &str, positive: Option<&str>) -> Result<Table> {
    let text = read(path)?;
    let mut lines = text.lines();
    let header: Vec<String> = split_csv_line(lines.next().unwrap_or_default());
    let li = header
        .iter()
        .position(|h| h == label)
        .ok_or_else(|| VflError::Data(format!("{}: no label column `{label}`", path.display())))?;
    // a leading unnamed index column (R's write.csv) is dropped
    let skip_index = header.first().map(|h| h.is_empty()).unwrap_or(false);
    let keep: Vec<usize> = (0..header.len())
        .filter(|&j| j != li && !(skip_index && j == 0))
        .collect();
    let names: Vec<String> = keep.iter().map(|&j| header[j].clone()).collect();
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    for (ln, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let cells = split_csv_line(line);
        if cells.len() != header.len() {
            return Err(VflError::Parse {
                path: path.into(),
                line: ln + 2,
                msg: format!("expected {} fields, got {}", header.len(), cells.len()),
            });
        }
        labels.push(parse_label(&cells[li], positive, path, ln + 2)?);
        rows.push(keep.iter().map(|&j| cells[j].clone()).collect());
    }
    let binary = positive.is_some() || labels.iter().all(|&v| v == 0.0 || v == 1.0);
    let task = if binary {
        Task::Binary
    } else {
        Task::Regression
    };
    encode(&names, &rows, labels, task)
}

/// A seeded `make_classification`-style generator: two classes, two Gaussian clusters per class at
/// vertices of a hypercube (side 2) in the informative subspace, redundant features as sparse
/// random combinations of informative ones, the rest noise, 1% of labels flipped, columns shuffled.
pub fn make_classification(n: usize, d: usize, seed: u64) -> Table {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5EED_C1A5);
    let n_inf = (d / 5).clamp(2.min(d), d);
    let n_red = (d / 5).min(d - n_inf);
    // 4 clusters (2 per class) at distinct hypercube vertices
    let mut centroids: Vec<Vec<f32>> = Vec::new();
    while centroids.len() < 4 {
        let c: Vec<f32> = (0..n_inf)
            .map(|_| if rng.random::<bool>() { 1.0 } else { -1.0 })
            .collect();
        if !centroids.contains(&c) || n_inf < 2 {
            centroids.push(c);
        }
    }
    let combos: Vec<[(usize, f32); 3]> = (0..n_red)
        .map(|_| std::array::from_fn(|_| (rng.random_range(0..n_inf), rng.random_range(-1.0..1.0))))
        .collect();
    let mut perm: Vec<usize> = (0..d).collect();
    perm.shuffle(&mut rng);
    let mut x = vec![0f32; n * d];
    let mut y = vec![0f32; n];
    let mut raw = vec![0f32; d];
    for i in 0..n {
        let cluster = rng.random_range(0..4usize);
        let class = cluster / 2;
        for j in 0..n_inf {
            let z: f32 = StandardNormal.sample(&mut rng);
            raw[j] = centroids[cluster][j] + z;
        }
        for (r, combo) in combos.iter().enumerate() {
            raw[n_inf + r] = combo.iter().map(|&(k, w)| w * raw[k]).sum();
        }
        for v in raw.iter_mut().skip(n_inf + n_red) {
            *v = StandardNormal.sample(&mut rng);
        }
        let row = &mut x[i * d..(i + 1) * d];
        for (j, &p) in perm.iter().enumerate() {
            row[j] = raw[p];
        }
        y[i] = if rng.random::<f32>() < 0.01 {
            rng.random_range(0..2u8) as f32
        } else {
            class as f32
        };
    }
    let columns: Vec<String> = (0..d).map(|j| format!("x{j}")).collect();
    Table {
        n,
        d,
        x,
        y,
        source: columns.clone(),
        columns,
        task: Task::Binary,
    }
}

/// Seeded 70/30 split: returns (train rows, test rows).
pub fn train_test_split(n: usize, test_frac: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x7E57));
    let n_test = ((n as f64) * test_frac).round() as usize;
    let test = idx[..n_test].to_vec();
    let train = idx[n_test..].to_vec();
    (train, test)
}

/// Per-column standardisation fitted on the training rows only.
#[derive(Debug, Clone)]
pub struct Standardizer {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Standardizer {
    /// Fit on `x` (`[n, d]` row-major).
    pub fn fit(x: &[f32], d: usize) -> Self {
        let n = (x.len() / d.max(1)).max(1);
        let mut mean = vec![0f64; d];
        let mut sq = vec![0f64; d];
        for row in x.chunks(d) {
            for (j, &v) in row.iter().enumerate() {
                mean[j] += v as f64;
                sq[j] += (v as f64) * (v as f64);
            }
        }
        let mut m = vec![0f32; d];
        let mut s = vec![1f32; d];
        for j in 0..d {
            let mu = mean[j] / n as f64;
            let var = (sq[j] / n as f64 - mu * mu).max(0.0);
            m[j] = mu as f32;
            s[j] = if var > 1e-12 { var.sqrt() as f32 } else { 1.0 };
        }
        Standardizer { mean: m, std: s }
    }

    pub fn apply(&self, x: &mut [f32]) {
        let d = self.mean.len();
        for row in x.chunks_mut(d) {
            for (j, v) in row.iter_mut().enumerate() {
                *v = (*v - self.mean[j]) / self.std[j];
            }
        }
    }
}

/// Which original features each party holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitSpec {
    /// Original feature names of the active party (the rest go to the passive party).
    #[serde(default)]
    pub active: Option<Vec<String>>,
    /// Otherwise: the first `active_fraction` of the original features (default 0.5).
    #[serde(default)]
    pub active_fraction: Option<f64>,
}

impl SplitSpec {
    /// Encoded column indices (active, passive).
    pub fn columns(&self, t: &Table) -> Result<(Vec<usize>, Vec<usize>)> {
        let feats = t.features();
        let active: Vec<String> = match &self.active {
            Some(list) => {
                for f in list {
                    if !feats.contains(f) {
                        return Err(VflError::Config(format!(
                            "split: unknown feature `{f}`; known: {}",
                            feats.join(", ")
                        )));
                    }
                }
                list.clone()
            }
            None => {
                let frac = self.active_fraction.unwrap_or(0.5);
                if !(0.0..1.0).contains(&frac) || frac == 0.0 {
                    return Err(VflError::Config("split: active_fraction in (0,1)".into()));
                }
                let k = ((feats.len() as f64 * frac).round() as usize).clamp(1, feats.len() - 1);
                feats[..k].to_vec()
            }
        };
        let (a, p): (Vec<usize>, Vec<usize>) =
            (0..t.d).partition(|&j| active.contains(&t.source[j]));
        if a.is_empty() || p.is_empty() {
            return Err(VflError::Config(
                "split: each party needs at least one column".into(),
            ));
        }
        Ok((a, p))
    }
}

/// One party's view: standardised train and test features of its columns (labels only for the
/// active party, but both are kept here; the passive code path never reads them).
#[derive(Debug, Clone)]
pub struct PartyData {
    pub d: usize,
    pub train_x: Vec<f32>,
    pub test_x: Vec<f32>,
    pub train_y: Vec<f32>,
    pub test_y: Vec<f32>,
    pub n_train: usize,
    pub n_test: usize,
    pub task: Task,
}

impl PartyData {
    /// Columns `cols` of `t`, split by `train`/`test` rows, standardised with train statistics.
    pub fn build(t: &Table, cols: &[usize], train: &[usize], test: &[usize]) -> Self {
        let mut train_x = t.gather(train, cols);
        let mut test_x = t.gather(test, cols);
        let st = Standardizer::fit(&train_x, cols.len());
        st.apply(&mut train_x);
        st.apply(&mut test_x);
        let mut train_y: Vec<f32> = train.iter().map(|&i| t.y[i]).collect();
        let mut test_y: Vec<f32> = test.iter().map(|&i| t.y[i]).collect();
        if t.task == Task::Regression {
            // standardise the regression target with train statistics too
            let st = Standardizer::fit(&train_y, 1);
            st.apply(&mut train_y);
            st.apply(&mut test_y);
        }
        PartyData {
            d: cols.len(),
            train_x,
            test_x,
            train_y,
            test_y,
            n_train: train.len(),
            n_test: test.len(),
            task: t.task,
        }
    }

    /// Rows `idx` of the training features.
    pub fn rows(&self, idx: &[usize]) -> Vec<f32> {
        let mut out = Vec::with_capacity(idx.len() * self.d);
        for &i in idx {
            out.extend_from_slice(&self.train_x[i * self.d..(i + 1) * self.d]);
        }
        out
    }

    pub fn labels(&self, idx: &[usize]) -> Vec<f32> {
        idx.iter().map(|&i| self.train_y[i]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses() {
        assert_eq!(
            "synthetic:1000x20".parse::<DataSpec>().unwrap(),
            DataSpec::Synthetic { n: 1000, d: 20 }
        );
        assert!("synthetic:5x2000".parse::<DataSpec>().is_err());
        assert!("nope".parse::<DataSpec>().is_err());
        let c: DataSpec = "csv:/a/b.csv:label:yes".parse().unwrap();
        assert_eq!(c.to_string(), "csv:/a/b.csv:label:yes");
    }

    #[test]
    fn synthetic_is_seeded_and_balanced() {
        let a = make_classification(2000, 30, 7);
        let b = make_classification(2000, 30, 7);
        let c = make_classification(2000, 30, 8);
        assert_eq!(a.x, b.x);
        assert_ne!(a.x, c.x);
        let pos = a.y.iter().sum::<f32>() / a.n as f32;
        assert!((0.4..0.6).contains(&pos), "{pos}");
    }

    #[test]
    fn csv_one_hot_and_split() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.csv");
        std::fs::write(
            &p,
            "a,color,y\n1,red,0\n2,\"blue, dark\",1\n3,red,1\n?,green,0\n5,\"blue, dark\",0\n6,red,1\n",
        )
        .unwrap();
        let t = load_csv(&p, "y", None).unwrap();
        assert_eq!(t.n, 6);
        assert_eq!(t.d, 4); // a + 3 colors
        assert_eq!(t.features(), vec!["a", "color"]);
        // missing numeric -> mean of the others (17/5)
        assert!((t.x[3 * 4] - 3.4).abs() < 1e-6);
        let (ca, cp) = SplitSpec::default().columns(&t).unwrap();
        assert_eq!(ca, vec![0]);
        assert_eq!(cp, vec![1, 2, 3]);
        let bad = SplitSpec {
            active: Some(vec!["zzz".into()]),
            active_fraction: None,
        };
        assert!(bad.columns(&t).is_err());
        assert!(load_csv(&p, "nolabel", None).is_err());
        assert!(t.columns.contains(&"color=blue, dark".to_string()));
        assert_eq!(
            split_csv_line(r#"a,"x ""q"", y",b"#),
            vec!["a", "x \"q\", y", "b"]
        );
    }

    #[test]
    fn standardizer_uses_train_only() {
        let t = make_classification(1000, 6, 1);
        let (tr, te) = train_test_split(t.n, 0.3, 1);
        assert_eq!(te.len(), 300);
        let pd = PartyData::build(&t, &[0, 1, 2], &tr, &te);
        let mean0: f32 = pd.train_x.chunks(3).map(|r| r[0]).sum::<f32>() / pd.n_train as f32;
        assert!(mean0.abs() < 1e-4);
        let mean_test: f32 = pd.test_x.chunks(3).map(|r| r[0]).sum::<f32>() / pd.n_test as f32;
        assert!(mean_test.abs() > 1e-6, "test stats must not be fitted");
    }
}
