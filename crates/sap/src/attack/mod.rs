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
use crate::error::{Result, SapError};

pub mod mlp;
pub mod nn;
pub mod ridge;

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

/// Positions `0..len` of each sequence, flattened.
pub fn positions_of(lengths: &[u32]) -> Vec<usize> {
    lengths.iter().flat_map(|&l| 0..l as usize).collect()
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
    ridge::ridge(
        &ridge::with_bias(pooled, d),
        &y,
        labels.len(),
        d + 1,
        1,
        lambda,
    )
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
    use crate::encoder::{bert, mpnet, Encoder};
    use candle_core::Device;

    #[test]
    fn recovery_and_attributes() {
        assert_eq!(recovery(&[1, 5, 6], &[1, 5, 7], &[1]), 0.5);
        assert!(Attribute::parse("words:United, delta")
            .unwrap()
            .of("Flying UNITED today"));
        assert!(!Attribute::parse("words:united").unwrap().of("unitedly"));
        assert!(Attribute::Number.of("flight 42"));
        assert!(Attribute::parse("zip").is_err());
    }

    /// Random encoders, k = 0, no noise: nearest neighbour against the table recovers every
    /// token; at k = 2, nearest neighbour against public rows of the same sequences does too.
    #[test]
    fn nearest_neighbour_inverts_clean_rows() {
        for cfg in [bert::tiny(300), mpnet::tiny(300)] {
            let enc = Encoder::random(cfg, 1, &Device::Cpu).unwrap();
            let seqs = vec![vec![0u32, 17, 250, 3], vec![9, 8, 42]];
            let c = crate::roles::Customer::new(&enc, 2).unwrap();
            let cut = c.cut_outputs_at(&seqs, 2, &[0, 2]).unwrap();
            let pos = positions_of(&[4, 3]);
            let pred = nn::nn_decode_table(&enc, &cut[0].concat(), &pos).unwrap();
            assert_eq!(pred, seqs.concat());
            let keys = cut[1].concat();
            let nb = nn::PublicNeighbours::new(&keys, &seqs.concat(), 32, &[0], 100).unwrap();
            let pred = nb.decode(&keys).unwrap();
            assert_eq!(&pred[1..], &seqs.concat()[1..]);
        }
    }
}
