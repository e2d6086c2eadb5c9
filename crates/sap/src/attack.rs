//! The honest-but-curious vendor's attacks on what it receives.
//!
//! - **Embedding inversion, nearest neighbour** (for `k = 0`): the vendor holds the public
//!   embedding layer, so for a received row at position `i` it ranks every vocabulary entry `v`
//!   by `||x~ - E_i(v)||` with `E_i(v) = LN(word[v] + pos[i] + type[0])` and takes the closest.
//! - **Embedding inversion, learned** (any `k`): on public text the vendor computes the cut-layer
//!   output at `k`, privatizes it with the mechanism it knows (uniform d_chi / Gaussian at the
//!   nominal `eta`), and fits a ridge-regression map `x~ -> E_i(token)` (closed form); a received
//!   row is mapped and then decoded by the nearest neighbour above.
//! - **Attribute inference**: on the same public text it fits a ridge-regression probe from the
//!   mean-pooled privatized rows to a sensitive binary attribute (the text contains a number, or
//!   a word from a list) and scores the received sequences; the result is the ROC AUC.
//!
//! Token recovery counts every non-special token; empirical privacy is
//! `1 - max(recovery of the inversion attacks)`.
use crate::bert::BertEncoder;
use crate::error::{Result, SapError};
use candle_core::{Device, Tensor};

/// The sensitive attribute of a text.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Attribute {
    /// Contains an ASCII digit.
    Number,
    /// Contains one of these lower-case words (as a whole word).
    Words(Vec<String>),
}

impl Attribute {
    /// Parses `number` or `words:a,b,c`.
    pub fn parse(s: &str) -> Result<Self> {
        if s == "number" {
            Ok(Attribute::Number)
        } else if let Some(w) = s.strip_prefix("words:") {
            let w: Vec<String> = w
                .split(',')
                .map(|x| x.trim().to_lowercase())
                .filter(|x| !x.is_empty())
                .collect();
            if w.is_empty() {
                return Err(SapError::Config("words: needs at least one word".into()));
            }
            Ok(Attribute::Words(w))
        } else {
            Err(SapError::Config(format!(
                "unknown attribute {s:?}: use number or words:a,b,c"
            )))
        }
    }
    pub fn of(&self, text: &str) -> bool {
        match self {
            Attribute::Number => text.chars().any(|c| c.is_ascii_digit()),
            Attribute::Words(ws) => text
                .to_lowercase()
                .split(|c: char| !c.is_alphanumeric())
                .any(|t| ws.iter().any(|w| w == t)),
        }
    }
}

/// Solves the ridge problem `min ||X W - Y||^2 + lambda ||W||^2` for `X: [n, p]`, `Y: [n, q]`
/// (row-major) by Cholesky on `X^T X + lambda I`; returns `W: [p, q]`.
pub fn ridge(x: &[f32], y: &[f32], n: usize, p: usize, q: usize, lambda: f64) -> Result<Vec<f32>> {
    if x.len() != n * p || y.len() != n * q || n == 0 {
        return Err(SapError::Config("ridge: shape mismatch".into()));
    }
    let dev = Device::Cpu;
    let xt = Tensor::from_slice(x, (n, p), &dev)?;
    let yt = Tensor::from_slice(y, (n, q), &dev)?;
    let xtx: Vec<f64> = xt
        .t()?
        .matmul(&xt)?
        .to_dtype(candle_core::DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    let xty: Vec<f64> = xt
        .t()?
        .matmul(&yt)?
        .to_dtype(candle_core::DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    // Cholesky A = L L^T
    let mut a = xtx;
    let scale = (0..p).map(|i| a[i * p + i]).sum::<f64>() / p as f64;
    for i in 0..p {
        a[i * p + i] += lambda * scale.max(1e-12);
    }
    let mut l = vec![0f64; p * p];
    for i in 0..p {
        for j in 0..=i {
            let mut s = a[i * p + j];
            for k in 0..j {
                s -= l[i * p + k] * l[j * p + k];
            }
            if i == j {
                if s <= 0.0 {
                    return Err(SapError::Config(
                        "ridge: matrix not positive definite".into(),
                    ));
                }
                l[i * p + i] = s.sqrt();
            } else {
                l[i * p + j] = s / l[j * p + j];
            }
        }
    }
    let mut w = vec![0f32; p * q];
    let mut z = vec![0f64; p];
    for c in 0..q {
        for i in 0..p {
            let mut s = xty[i * q + c];
            for k in 0..i {
                s -= l[i * p + k] * z[k];
            }
            z[i] = s / l[i * p + i];
        }
        for i in (0..p).rev() {
            let mut s = z[i];
            for k in i + 1..p {
                s -= l[k * p + i] * z[k];
            }
            z[i] = s / l[i * p + i];
            w[i * q + c] = z[i] as f32;
        }
    }
    Ok(w)
}

/// Appends a constant-1 column: `[n, d] -> [n, d + 1]`.
fn with_bias(x: &[f32], d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len() / d * (d + 1));
    for r in x.chunks(d) {
        out.extend_from_slice(r);
        out.push(1.0);
    }
    out
}

/// Nearest-neighbour decoding against the public embedding layer: `rows: [n, d]`, each at
/// position `positions[j]`; returns the predicted token ids.
pub fn nn_decode(enc: &BertEncoder, rows: &[f32], positions: &[usize]) -> Result<Vec<u32>> {
    let d = enc.hidden();
    if rows.len() != positions.len() * d {
        return Err(SapError::Config(
            "nn_decode: rows/positions mismatch".into(),
        ));
    }
    let dev = Device::Cpu;
    let mut out = vec![0u32; positions.len()];
    let maxp = positions.iter().copied().max().unwrap_or(0);
    for p in 0..=maxp {
        let idx: Vec<usize> = (0..positions.len())
            .filter(|&j| positions[j] == p)
            .collect();
        if idx.is_empty() {
            continue;
        }
        let mut x = Vec::with_capacity(idx.len() * d);
        for &j in &idx {
            x.extend_from_slice(&rows[j * d..(j + 1) * d]);
        }
        let x = Tensor::from_vec(x, (idx.len(), d), &dev)?;
        let table = enc.embeddings.table_at(p)?; // [V, d]
        let norms = table.sqr()?.sum(1)?; // [V]
                                          // argmin ||x - e||^2 = argmax (2 x.e - ||e||^2)
        let s = (x.matmul(&table.t()?)? * 2.0)?.broadcast_sub(&norms.unsqueeze(0)?)?;
        let best: Vec<u32> = s.argmax(1)?.to_vec1()?;
        for (j, b) in idx.iter().zip(best) {
            out[*j] = b;
        }
    }
    Ok(out)
}

/// Positions `0..len` of each sequence, flattened.
pub fn positions_of(lengths: &[u32]) -> Vec<usize> {
    lengths.iter().flat_map(|&l| 0..l as usize).collect()
}

/// A fitted learned inverter: `x~ (+1) -> E_i(token)` (ridge), then [`nn_decode`].
pub struct LearnedInverter {
    w: Tensor, // [d + 1, d]
    d: usize,
}

impl LearnedInverter {
    /// `x`: privatized public rows `[n, d]`, `target`: clean embedding-layer rows `[n, d]`.
    pub fn fit(x: &[f32], target: &[f32], d: usize, lambda: f64) -> Result<Self> {
        let n = x.len() / d;
        let xb = with_bias(x, d);
        let w = ridge(&xb, target, n, d + 1, d, lambda)?;
        Ok(LearnedInverter {
            w: Tensor::from_vec(w, (d + 1, d), &Device::Cpu)?,
            d,
        })
    }
    pub fn map(&self, rows: &[f32]) -> Result<Vec<f32>> {
        let n = rows.len() / self.d;
        let xb = Tensor::from_vec(with_bias(rows, self.d), (n, self.d + 1), &Device::Cpu)?;
        Ok(xb.matmul(&self.w)?.flatten_all()?.to_vec1()?)
    }
}

/// Fraction of non-special tokens recovered.
pub fn recovery(pred: &[u32], truth: &[u32], special: &[u32]) -> f64 {
    let mut n = 0usize;
    let mut ok = 0usize;
    for (p, t) in pred.iter().zip(truth) {
        if special.contains(t) {
            continue;
        }
        n += 1;
        ok += usize::from(p == t);
    }
    if n == 0 {
        0.0
    } else {
        ok as f64 / n as f64
    }
}

/// ROC AUC of scores against binary labels (Mann-Whitney, ties count half); 0.5 when a class
/// is missing.
pub fn auc(scores: &[f32], labels: &[bool]) -> f64 {
    umbra_common::metrics::auroc(scores, labels).unwrap_or(0.5)
}

/// Mean of each sequence's rows: `[sum(len), d] -> [n, d]`.
pub fn mean_rows(rows: &[f32], lengths: &[u32], d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(lengths.len() * d);
    let mut off = 0;
    for &l in lengths {
        let l = l as usize;
        let mut m = vec![0f32; d];
        for r in rows[off * d..(off + l) * d].chunks(d) {
            for (a, b) in m.iter_mut().zip(r) {
                *a += b;
            }
        }
        m.iter_mut().for_each(|v| *v /= l.max(1) as f32);
        out.extend(m);
        off += l;
    }
    out
}

/// Attribute probe: ridge regression from pooled rows (+1) to ±1; returns weights `[d + 1]`.
pub fn fit_probe(pooled: &[f32], labels: &[bool], d: usize, lambda: f64) -> Result<Vec<f32>> {
    let y: Vec<f32> = labels.iter().map(|&b| if b { 1.0 } else { -1.0 }).collect();
    ridge(&with_bias(pooled, d), &y, labels.len(), d + 1, 1, lambda)
}

/// Scores of a probe on pooled rows.
pub fn probe_scores(w: &[f32], pooled: &[f32], d: usize) -> Vec<f32> {
    pooled
        .chunks(d)
        .map(|r| r.iter().zip(w).map(|(a, b)| a * b).sum::<f32>() + w[d])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ridge_recovers_a_linear_map() {
        let (n, p, q) = (200, 4, 2);
        let wt = [1.0f32, -2.0, 0.5, 0.0, 3.0, 1.0, -1.0, 0.25];
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..n {
            let r: Vec<f32> = (0..p)
                .map(|j| ((i * 7 + j * 13) % 17) as f32 / 17.0 - 0.5)
                .collect();
            for c in 0..q {
                y.push((0..p).map(|j| r[j] * wt[j * q + c]).sum());
            }
            x.extend(r);
        }
        let w = ridge(&x, &y, n, p, q, 1e-9).unwrap();
        for (a, b) in w.iter().zip(wt) {
            assert!((a - b).abs() < 1e-3, "{w:?}");
        }
    }

    #[test]
    fn auc_and_recovery() {
        assert_eq!(auc(&[0.1, 0.2, 0.3, 0.4], &[false, false, true, true]), 1.0);
        assert_eq!(auc(&[0.4, 0.3, 0.2, 0.1], &[false, false, true, true]), 0.0);
        assert_eq!(auc(&[1.0, 1.0], &[false, true]), 0.5);
        assert_eq!(recovery(&[1, 5, 6], &[1, 5, 7], &[1]), 0.5);
        assert!(Attribute::parse("words:United, delta")
            .unwrap()
            .of("Flying UNITED today"));
        assert!(!Attribute::parse("words:united").unwrap().of("unitedly"));
        assert!(Attribute::Number.of("flight 42"));
        assert!(Attribute::parse("zip").is_err());
    }

    /// Random encoder, k = 0, no noise: nearest neighbour recovers every token.
    #[test]
    fn nn_inverts_clean_embeddings() {
        let enc = BertEncoder::random(crate::bert::BertConfig::tiny(300), 1, &Device::Cpu).unwrap();
        let seqs = vec![vec![1u32, 17, 250, 3], vec![9, 9, 42]];
        let c = crate::split::Customer::new(&enc, 0).unwrap();
        let cut = c.cut_outputs(&seqs, 2).unwrap();
        let rows: Vec<f32> = cut.concat();
        let pos = positions_of(&[4, 3]);
        let pred = nn_decode(&enc, &rows, &pos).unwrap();
        assert_eq!(pred, seqs.concat());
    }
}
