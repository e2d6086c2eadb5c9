//! The two roles of SAP: what each party computes.
//!
//! - [`Customer`]: embedding layer + blocks `0..k`, frozen. Its clean cut-layer outputs are
//!   computed once per example ([`Customer::cut_outputs`], `len_i x d` values each) and
//!   privatized afresh every time they are sent.
//! - [`Vendor`]: blocks `k..L` with LoRA on query/value, mean pooling over real tokens, linear
//!   head, cross-entropy, AdamW on the LoRA and head parameters only.
use crate::encoder::layers::{mean_pool, Head};
use crate::encoder::Encoder;
use crate::error::{Result, SapError};
use candle_core::{Device, Module, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use umbra_common::progress::Progress;

/// Training hyper-parameters shared by both roles.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub split_at: usize,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lr: f64,
    pub epochs: usize,
    pub batch: usize,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            split_at: 2,
            lora_rank: 8,
            lora_alpha: 16.0,
            lr: 2e-3,
            epochs: 2,
            batch: 32,
            seed: 0,
        }
    }
}

/// Length-bucketed batches for one epoch ("sortish" sampling): shuffle, sort each window of
/// `16 * batch` examples by length, cut into batches, shuffle the batches. Cuts padding on the
/// vendor without making batches deterministic.
pub fn sortish_batches(lens: &[usize], batch: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    let batch = batch.max(1);
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.shuffle(rng);
    let mut out = Vec::new();
    for w in order.chunks_mut(batch * 16) {
        w.sort_by_key(|&i| lens[i]);
        out.extend(w.chunks(batch).map(|c| c.to_vec()));
    }
    out.shuffle(rng);
    out
}

/// Pads ragged rows into `[b, tmax, d]` plus a `[b, tmax]` mask.
pub fn pad_rows(rows: &[&[f32]], d: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let b = rows.len();
    let tmax = rows.iter().map(|r| r.len() / d).max().unwrap_or(1).max(1);
    let mut x = vec![0f32; b * tmax * d];
    let mut m = vec![0f32; b * tmax];
    for (i, r) in rows.iter().enumerate() {
        let t = r.len() / d;
        x[i * tmax * d..i * tmax * d + t * d].copy_from_slice(&r[..t * d]);
        m[i * tmax..i * tmax + t].iter_mut().for_each(|v| *v = 1.0);
    }
    Ok((
        Tensor::from_vec(x, (b, tmax, d), dev)?,
        Tensor::from_vec(m, (b, tmax), dev)?,
    ))
}

/// The customer's frozen bottom: embedding layer and blocks `0..k`.
#[derive(Debug, Clone)]
pub struct Customer {
    enc: Encoder,
    pub k: usize,
}

impl Customer {
    pub fn new(enc: &Encoder, k: usize) -> Result<Self> {
        if k > enc.num_blocks() {
            return Err(SapError::Config(format!(
                "--split-at {k} exceeds the model's {} blocks",
                enc.num_blocks()
            )));
        }
        let mut enc = enc.clone();
        enc.blocks.truncate(k);
        Ok(Customer { enc, k })
    }

    pub fn hidden(&self) -> usize {
        self.enc.hidden()
    }

    /// Clean cut-layer outputs, one `len_i * d` vector per sequence (real tokens only).
    pub fn cut_outputs(&self, seqs: &[Vec<u32>], batch: usize) -> Result<Vec<Vec<f32>>> {
        let mut all = self.cut_outputs_at(seqs, batch, &[self.k])?;
        Ok(all.pop().unwrap_or_default())
    }

    /// Clean outputs after the embedding layer and `k` blocks for each `k` in `ks` (all
    /// `<= self.k`), in one pass: `out[j][i]` is sequence `i` at split `ks[j]`.
    /// Sequences are batched by similar length; padding never reaches the output.
    pub fn cut_outputs_at(
        &self,
        seqs: &[Vec<u32>],
        batch: usize,
        ks: &[usize],
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        if let Some(k) = ks.iter().find(|&&k| k > self.k) {
            return Err(SapError::Config(format!(
                "split {k} > customer blocks {}",
                self.k
            )));
        }
        let d = self.hidden();
        let dev = Device::Cpu;
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| seqs[i].len());
        let mut out = vec![vec![Vec::new(); seqs.len()]; ks.len()];
        let pb = Progress::new(seqs.len() as u64, "customer cut layer");
        for chunk in order.chunks(batch.max(1)) {
            let tmax = chunk.iter().map(|&i| seqs[i].len()).max().unwrap_or(1);
            if tmax == 0 {
                return Err(SapError::Data("empty token sequence".into()));
            }
            let mut ids = vec![0u32; chunk.len() * tmax];
            let mut mask = vec![0f32; chunk.len() * tmax];
            for (r, &i) in chunk.iter().enumerate() {
                let s = &seqs[i];
                ids[r * tmax..r * tmax + s.len()].copy_from_slice(s);
                mask[r * tmax..r * tmax + s.len()]
                    .iter_mut()
                    .for_each(|v| *v = 1.0);
            }
            let ids = Tensor::from_vec(ids, (chunk.len(), tmax), &dev)?;
            let mask = Tensor::from_vec(mask, (chunk.len(), tmax), &dev)?;
            let mut h = self.enc.embeddings.forward(&ids)?;
            let bias = self.enc.attention_bias(&mask)?;
            let kmax = ks.iter().copied().max().unwrap_or(0);
            for k in 0..=kmax {
                if k > 0 {
                    h = self.enc.forward_blocks(&h, &bias, k - 1..k, false)?;
                }
                for (j, _) in ks.iter().enumerate().filter(|(_, &kk)| kk == k) {
                    let flat: Vec<f32> = h.flatten_all()?.to_vec1()?;
                    for (r, &i) in chunk.iter().enumerate() {
                        let n = seqs[i].len();
                        out[j][i] = flat[r * tmax * d..(r * tmax + n) * d].to_vec();
                    }
                }
            }
            pb.inc(chunk.len() as u64);
        }
        pb.finish();
        Ok(out)
    }
}

/// The vendor's top: blocks `k..L` with LoRA, pooling and the head, plus its optimiser.
pub struct Vendor {
    enc: Encoder,
    pub k: usize,
    head: Head,
    vars: Vec<Var>,
    opt: AdamW,
}

impl Vendor {
    pub fn new(enc: &Encoder, classes: usize, cfg: &TrainConfig) -> Result<Self> {
        let k = cfg.split_at;
        let l = enc.num_blocks();
        if k > l {
            return Err(SapError::Config(format!("split_at {k} exceeds {l} blocks")));
        }
        if classes < 2 {
            return Err(SapError::Config(format!("{classes} classes")));
        }
        let mut enc = enc.clone();
        let mut vars = enc.attach_lora(k..l, cfg.lora_rank, cfg.lora_alpha, cfg.seed ^ 0x10a)?;
        let head = Head::new(enc.hidden(), classes, cfg.seed ^ 0x4ead, &Device::Cpu)?;
        vars.extend(head.vars());
        let opt = AdamW::new(
            vars.clone(),
            ParamsAdamW {
                lr: cfg.lr,
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        Ok(Vendor {
            enc,
            k,
            head,
            vars,
            opt,
        })
    }

    /// Number of trainable parameters.
    pub fn trainable(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }

    /// Logits `[b, C]` of rows `[sum(lengths), d]`.
    pub fn logits(&self, rows: &[f32], lengths: &[u32], grad: bool) -> Result<Tensor> {
        let d = self.enc.hidden();
        let mut parts = Vec::with_capacity(lengths.len());
        let mut off = 0usize;
        for &l in lengths {
            let n = l as usize * d;
            let p = rows
                .get(off..off + n)
                .ok_or_else(|| SapError::Message("rows shorter than lengths".into()))?;
            parts.push(p);
            off += n;
        }
        if off != rows.len() {
            return Err(SapError::Message("rows longer than lengths".into()));
        }
        let (x, mask) = pad_rows(&parts, d, &Device::Cpu)?;
        let bias = self.enc.attention_bias(&mask)?;
        let h = self
            .enc
            .forward_blocks(&x, &bias, self.k..self.enc.num_blocks(), grad)?;
        Ok(self.head.forward(&mean_pool(&h, &mask)?)?)
    }

    /// One AdamW step on a batch; returns the loss.
    pub fn train_step(&mut self, rows: &[f32], lengths: &[u32], labels: &[u32]) -> Result<f64> {
        let logits = self.logits(rows, lengths, true)?;
        let classes = logits.dim(1)? as u32;
        if labels.iter().any(|&l| l >= classes) {
            return Err(SapError::Message(format!("label out of 0..{classes}")));
        }
        let y = Tensor::from_vec(labels.to_vec(), labels.len(), &Device::Cpu)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        self.opt.backward_step(&loss)?;
        Ok(loss.to_scalar::<f32>()? as f64)
    }

    /// Logits as a flat `[b * C]` vector (no gradients).
    pub fn predict(&self, rows: &[f32], lengths: &[u32]) -> Result<Vec<f32>> {
        Ok(self
            .logits(rows, lengths, false)?
            .flatten_all()?
            .to_vec1()?)
    }
}

/// Per example, whether the arg-max of its logits (flat `[n * c]`) is its label.
pub fn correct(logits: &[f32], c: usize, labels: &[usize]) -> Vec<bool> {
    if c == 0 {
        return vec![false; labels.len()];
    }
    logits
        .chunks(c)
        .zip(labels)
        .map(|(row, &y)| {
            let mut best = 0;
            for j in 1..row.len() {
                if row[j] > row[best] {
                    best = j;
                }
            }
            best == y
        })
        .collect()
}

/// Accuracy of flat logits `[n * c]` against labels (0 without labels).
pub fn accuracy(logits: &[f32], c: usize, labels: &[usize]) -> f64 {
    let ok = correct(logits, c, labels);
    ok.iter().filter(|&&b| b).count() as f64 / labels.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoder::{bert, mpnet};

    /// Through the split (customer: embeddings + 1 block; vendor: 2 blocks + LoRA + head), the
    /// vendor learns a separable toy task on both architectures: the loss falls and training
    /// accuracy beats chance.
    #[test]
    fn vendor_learns_through_the_split() {
        for cfg in [bert::tiny(60), mpnet::tiny(60)] {
            let enc = Encoder::random(cfg, 2, &Device::Cpu).unwrap();
            let seqs: Vec<Vec<u32>> = (0..64u32)
                .map(|i| vec![0, 10 + (i % 2) * 20 + i % 7, 5 + i % 11, 2])
                .collect();
            let labels: Vec<u32> = (0..64u32).map(|i| i % 2).collect();
            let cut = Customer::new(&enc, 1)
                .unwrap()
                .cut_outputs(&seqs, 16)
                .unwrap();
            let tc = TrainConfig {
                split_at: 1,
                lr: 1e-2,
                ..Default::default()
            };
            let mut v = Vendor::new(&enc, 2, &tc).unwrap();
            assert!(v.trainable() > 0);
            let rows: Vec<f32> = cut.concat();
            let lengths: Vec<u32> = seqs.iter().map(|s| s.len() as u32).collect();
            let first = v.train_step(&rows, &lengths, &labels).unwrap();
            let mut last = first;
            for _ in 0..30 {
                last = v.train_step(&rows, &lengths, &labels).unwrap();
            }
            assert!(last < first * 0.5, "loss {first} -> {last}");
            let logits = v.predict(&rows, &lengths).unwrap();
            let y: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
            assert!(accuracy(&logits, 2, &y) > 0.9);
            // a label outside the head's classes is a rejected message, not a panic
            assert!(v.train_step(&rows, &lengths, &vec![5; 64]).is_err());
        }
    }
}
