//! The learned inverter: an MLP over cut-layer rows, trained by the vendor on its own public
//! text privatized with the mechanism it knows, that classifies each row into a token.
//!
//! `z = (x~ - mu) / sigma` (per-dimension statistics of the training rows),
//! `logits = W2 gelu(W1 z + b1) + b2` over the `vocab` most frequent non-special public tokens
//! (a token outside them cannot be predicted and counts as a miss), cross-entropy, AdamW.
use crate::error::{Result, SapError};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// Size and training of the inverter.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct MlpConfig {
    pub hidden: usize,
    /// Output classes: the most frequent public tokens.
    pub vocab: usize,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    /// At most this many training rows (evenly spaced).
    pub max_rows: usize,
    pub seed: u64,
}

impl Default for MlpConfig {
    fn default() -> Self {
        MlpConfig {
            hidden: 512,
            vocab: 2048,
            epochs: 3,
            batch: 256,
            lr: 2e-3,
            max_rows: 40_000,
            seed: 0,
        }
    }
}

/// A trained MLP inverter.
pub struct MlpInverter {
    w1: Var,
    b1: Var,
    w2: Var,
    b2: Var,
    mu: Tensor,
    sigma: Tensor,
    vocab: Vec<u32>,
    d: usize,
}

fn init(rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> Result<Var> {
    let bound = (1.0 / cols as f64).sqrt();
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect();
    Ok(Var::from_tensor(&Tensor::from_vec(
        v,
        (rows, cols),
        &Device::Cpu,
    )?)?)
}

impl MlpInverter {
    /// Trains on privatized public rows `x: [n, d]` whose tokens are `tokens: [n]`.
    pub fn fit(
        x: &[f32],
        tokens: &[u32],
        d: usize,
        special: &[u32],
        cfg: &MlpConfig,
    ) -> Result<Self> {
        if x.len() != tokens.len() * d || d == 0 {
            return Err(SapError::Config(
                "mlp inverter: rows/tokens mismatch".into(),
            ));
        }
        let mut freq: HashMap<u32, usize> = HashMap::new();
        for t in tokens.iter().filter(|t| !special.contains(t)) {
            *freq.entry(*t).or_default() += 1;
        }
        let mut vocab: Vec<(u32, usize)> = freq.into_iter().collect();
        vocab.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        vocab.truncate(cfg.vocab.max(2));
        let vocab: Vec<u32> = vocab.into_iter().map(|v| v.0).collect();
        let index: HashMap<u32, u32> = vocab
            .iter()
            .enumerate()
            .map(|(i, &t)| (t, i as u32))
            .collect();
        let mut keep: Vec<usize> = (0..tokens.len())
            .filter(|&i| index.contains_key(&tokens[i]))
            .collect();
        let step = keep.len().div_ceil(cfg.max_rows.max(1)).max(1);
        keep = keep.into_iter().step_by(step).collect();
        if keep.len() < 2 {
            return Err(SapError::Config("mlp inverter: too few public rows".into()));
        }
        let dev = Device::Cpu;
        let mut xs = Vec::with_capacity(keep.len() * d);
        for &i in &keep {
            xs.extend_from_slice(&x[i * d..(i + 1) * d]);
        }
        let ys: Vec<u32> = keep.iter().map(|&i| index[&tokens[i]]).collect();
        let xt = Tensor::from_vec(xs, (keep.len(), d), &dev)?;
        let mu = xt.mean(0)?;
        let sigma = (xt.broadcast_sub(&mu)?.sqr()?.mean(0)? + 1e-6)?.sqrt()?;
        let xt = xt.broadcast_sub(&mu)?.broadcast_div(&sigma)?;
        let yt = Tensor::from_vec(ys, keep.len(), &dev)?;
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x1e7e);
        let (w1, w2) = (
            init(cfg.hidden, d, &mut rng)?,
            init(vocab.len(), cfg.hidden, &mut rng)?,
        );
        let b1 = Var::zeros(cfg.hidden, DType::F32, &dev)?;
        let b2 = Var::zeros(vocab.len(), DType::F32, &dev)?;
        let inv = MlpInverter {
            w1,
            b1,
            w2,
            b2,
            mu,
            sigma,
            vocab,
            d,
        };
        let mut opt = AdamW::new(
            vec![
                inv.w1.clone(),
                inv.b1.clone(),
                inv.w2.clone(),
                inv.b2.clone(),
            ],
            ParamsAdamW {
                lr: cfg.lr,
                weight_decay: 1e-4,
                ..Default::default()
            },
        )?;
        let mut order: Vec<u32> = (0..keep.len() as u32).collect();
        for _ in 0..cfg.epochs {
            order.shuffle(&mut rng);
            for b in order.chunks(cfg.batch.max(1)) {
                let idx = Tensor::from_slice(b, b.len(), &dev)?;
                let logits = inv.logits(&xt.index_select(&idx, 0)?)?;
                let loss = candle_nn::loss::cross_entropy(&logits, &yt.index_select(&idx, 0)?)?;
                opt.backward_step(&loss)?;
            }
        }
        Ok(inv)
    }

    /// `z: [n, d]` standardized -> `[n, vocab]`.
    fn logits(&self, z: &Tensor) -> Result<Tensor> {
        let h = z
            .matmul(&self.w1.as_tensor().t()?)?
            .broadcast_add(self.b1.as_tensor())?
            .gelu_erf()?;
        Ok(h.matmul(&self.w2.as_tensor().t()?)?
            .broadcast_add(self.b2.as_tensor())?)
    }

    /// The predicted token of each row of `rows: [n, d]`.
    pub fn decode(&self, rows: &[f32]) -> Result<Vec<u32>> {
        let d = self.d;
        let mut out = Vec::with_capacity(rows.len() / d);
        for chunk in rows.chunks(1024 * d) {
            let x = Tensor::from_slice(chunk, (chunk.len() / d, d), &Device::Cpu)?;
            let z = x.broadcast_sub(&self.mu)?.broadcast_div(&self.sigma)?;
            let best: Vec<u32> = self.logits(&z)?.argmax(1)?.to_vec1()?;
            out.extend(best.into_iter().map(|j| self.vocab[j as usize]));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr::{Distribution, StandardNormal};

    /// Tokens are noisy copies of fixed random centres: the MLP learns to tell them apart far
    /// above chance (1/20), and a token outside its vocabulary is never predicted.
    #[test]
    fn learns_to_invert_noisy_codes() {
        let (d, k, n) = (16usize, 20u32, 4000usize);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let centres: Vec<f32> = (0..k as usize * d)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        let mut make = |n: usize| {
            let mut x = Vec::new();
            let mut t = Vec::new();
            for i in 0..n {
                let c = (i as u32 * 7) % k;
                for j in 0..d {
                    let z: f32 = StandardNormal.sample(&mut rng);
                    x.push(centres[c as usize * d + j] + 0.5 * z);
                }
                t.push(c + 100);
            }
            (x, t)
        };
        let (x, t) = make(n);
        let cfg = MlpConfig {
            hidden: 32,
            vocab: 19,
            epochs: 5,
            batch: 64,
            lr: 1e-2,
            ..Default::default()
        };
        let inv = MlpInverter::fit(&x, &t, d, &[], &cfg).unwrap();
        let (xq, tq) = make(500);
        let pred = inv.decode(&xq).unwrap();
        let acc = pred.iter().zip(&tq).filter(|(a, b)| a == b).count() as f64 / 500.0;
        assert!(acc > 0.8, "accuracy {acc}");
        // the least frequent token (one of the 20) fell outside the 19-token vocabulary
        let all: std::collections::BTreeSet<u32> = pred.into_iter().collect();
        assert!(all.len() <= 19);
    }
}
