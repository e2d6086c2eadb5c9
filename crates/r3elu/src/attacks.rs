//! Attacks by the host on the guest's smashed data, and their success measures.
//!
//! Threat model (as in the R3eLU paper): the host holds an auxiliary set from the same
//! distribution, disjoint from the guest's private rows, and can obtain what the guest's trained
//! bottom + cut layer publishes for it (query access; every query gets fresh mechanism noise).
//! "Real traffic" is what the guest publishes for its first `victims` private training rows.
//! - **Reconstruction**: an inverse MLP `N -> hidden -> d` (sigmoid for images) trained on
//!   (published(aux), aux) pairs, then applied to real traffic. Images: MSE and SSIM against the
//!   originals, next to the class-mean guess (the mean aux image of the true class) — a defense
//!   works when the attack falls to that level. Tables: accuracy of the recovered category of
//!   every one-hot feature, next to the per-feature majority guess.
//! - **Property inference**: an MLP classifier from published rows to the private attribute,
//!   trained on aux; ROC AUC on real traffic (0.5 = no leakage).
//! - **FSHA** (Pasquini et al., CCS 2021): a malicious host trains a pilot encoder/decoder on aux
//!   and a discriminator between the guest's published rows and the pilot's codes, and sends the
//!   guest the discriminator's gradient instead of a task gradient, steering the bottom into the
//!   pilot's (invertible) space; the pilot decoder then inverts real traffic. Non-saturating GAN
//!   loss instead of WGAN-GP (simpler, stable at this size).
//!
//! The victims' traffic is one release of each victim row ([`victim_traffic`], the inference
//! release the ledger counts); reconstruction and property inference attack that same release.
//! FSHA trains its own (malicious) run, walking through the private rows without replacement,
//! and reports how often it released the most-released row.
use crate::config::{make_cut, SplitConfig};
use crate::data::Dataset;
use crate::error::{R3Error, Result};
use crate::guest::{smash, Bottom};
use crate::host::cross_entropy;
use crate::training::Trained;
use candle_core::{Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use umbra_common::metrics::auroc;
use umbra_common::progress::Progress;
use umbra_vfl::model::{grads_of, Adam, Mlp};

/// Attack budgets.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct AttackConfig {
    /// Private rows whose traffic is attacked.
    pub victims: usize,
    /// Epochs over aux for the inverse network and the property classifier.
    pub epochs: usize,
    pub hidden: usize,
    pub lr: f64,
    pub batch: usize,
    /// FSHA training steps (one guest batch each).
    pub fsha_steps: usize,
    /// FSHA learning rate of the hijacked bottom and of the discriminator.
    pub fsha_lr: f64,
    /// FSHA distribution-matching loss: MMD critic (true) or a discriminator (false).
    pub fsha_mmd: bool,
    /// FSHA matches the distributions class by class (the host holds the labels in vertical
    /// SplitNN, so it can pick which class each guest batch comes from).
    pub fsha_by_class: bool,
    pub seed: u64,
}

impl Default for AttackConfig {
    fn default() -> Self {
        AttackConfig {
            victims: 1000,
            epochs: 15,
            hidden: 256,
            lr: 1e-3,
            batch: 128,
            fsha_steps: 1500,
            fsha_lr: 1e-3,
            fsha_mmd: true,
            fsha_by_class: true,
            seed: 11,
        }
    }
}

fn t2(v: &[f32], r: usize, c: usize) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, (r, c), &Device::Cpu)?)
}

fn gather(x: &[f32], d: usize, idx: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(idx.len() * d);
    for &i in idx {
        out.extend_from_slice(&x[i * d..(i + 1) * d]);
    }
    out
}

/// Train `net` to map `inp: [n, a]` to `out: [n, b]` with MSE (`sigmoid` on the output when
/// `unit`); mini-batch Adam.
fn fit_regressor(
    net: &Mlp,
    inp: &[f32],
    a: usize,
    out: &[f32],
    b: usize,
    unit: bool,
    cfg: &AttackConfig,
) -> Result<()> {
    let n = inp.len() / a.max(1);
    let vars = net.vars();
    let mut opt = Adam::new(&vars, cfg.lr)?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0xF17);
    let mut idx: Vec<usize> = (0..n).collect();
    for _ in 0..cfg.epochs {
        idx.shuffle(&mut rng);
        for c in idx.chunks(cfg.batch) {
            let x = t2(&gather(inp, a, c), c.len(), a)?;
            let y = t2(&gather(out, b, c), c.len(), b)?;
            let mut p = net.forward(&x)?;
            if unit {
                p = candle_nn::ops::sigmoid(&p)?;
            }
            let loss = (p - y)?.sqr()?.mean_all()?;
            let g = grads_of(&loss.backward()?, &vars)?;
            opt.step(&vars, &g)?;
        }
    }
    Ok(())
}

fn predict(net: &Mlp, inp: &[f32], a: usize, unit: bool) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    for c in inp.chunks(1024 * a.max(1)) {
        let mut p = net.forward(&t2(c, c.len() / a, a)?)?;
        if unit {
            p = candle_nn::ops::sigmoid(&p)?;
        }
        out.extend(p.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Results of the reconstruction attack (image or tabular fields filled as applicable).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReconResult {
    pub recon_mse: Option<f64>,
    pub recon_ssim: Option<f64>,
    /// The class-mean guess (knows the true class, nothing else).
    pub classmean_mse: Option<f64>,
    pub classmean_ssim: Option<f64>,
    pub recon_feature_acc: Option<f64>,
    pub majority_feature_acc: Option<f64>,
    /// FSHA: releases of the most-released private row during the malicious run.
    #[serde(default)]
    pub max_releases: usize,
    /// Up to 8 (original, reconstruction) pairs for images.
    #[serde(skip)]
    pub examples: Vec<(Vec<f32>, Vec<f32>)>,
}

fn mse(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / a.len().max(1) as f64
}

/// Class-mean images of `rows` (`[classes][d]`).
fn class_means(x: &[f32], y: &[u32], d: usize, classes: usize) -> Vec<Vec<f32>> {
    let mut s = vec![vec![0.0f64; d]; classes];
    let mut c = vec![0usize; classes];
    for (i, &yi) in y.iter().enumerate() {
        let k = yi as usize;
        if k >= classes {
            continue;
        }
        c[k] += 1;
        for j in 0..d {
            s[k][j] += x[i * d + j] as f64;
        }
    }
    s.into_iter()
        .zip(c)
        .map(|(v, n)| {
            v.into_iter()
                .map(|t| (t / n.max(1) as f64) as f32)
                .collect()
        })
        .collect()
}

/// Image metrics of reconstructions `rec` of the victims `x`.
fn image_scores(ds: &Dataset, x: &[f32], y: &[u32], rec: &[f32], res: &mut ReconResult) {
    let d = ds.train.d;
    let (h, w) = ds.image.unwrap_or((1, d));
    let means = class_means(&ds.aux.x, &ds.aux.y, d, ds.classes);
    let n = y.len();
    let (mut m, mut s, mut cm, mut cs) = (0.0, 0.0, 0.0, 0.0);
    for i in 0..n {
        let (xi, ri) = (&x[i * d..(i + 1) * d], &rec[i * d..(i + 1) * d]);
        let mi = &means[y[i] as usize % ds.classes];
        m += mse(xi, ri);
        s += crate::image::ssim(xi, ri, h, w);
        cm += mse(xi, mi);
        cs += crate::image::ssim(xi, mi, h, w);
        if res.examples.len() < 8 {
            res.examples.push((xi.to_vec(), ri.to_vec()));
        }
    }
    let nn = n.max(1) as f64;
    res.recon_mse = Some(m / nn);
    res.recon_ssim = Some(s / nn);
    res.classmean_mse = Some(cm / nn);
    res.classmean_ssim = Some(cs / nn);
}

/// Fraction of one-hot groups whose argmax is recovered, and the majority-guess baseline.
fn feature_scores(ds: &Dataset, x: &[f32], rec: &[f32], res: &mut ReconResult) {
    let d = ds.train.d;
    let n = x.len() / d.max(1);
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap_or(0)
    };
    let (mut hit, mut maj, mut tot) = (0usize, 0usize, 0usize);
    for &(s, e) in &ds.groups {
        let mut counts = vec![0usize; e - s];
        for i in 0..ds.aux.n {
            counts[argmax(&ds.aux.x[i * d + s..i * d + e])] += 1;
        }
        let mode = argmax(&counts.iter().map(|&c| c as f32).collect::<Vec<_>>());
        for i in 0..n {
            let truth = argmax(&x[i * d + s..i * d + e]);
            hit += (argmax(&rec[i * d + s..i * d + e]) == truth) as usize;
            maj += (mode == truth) as usize;
            tot += 1;
        }
    }
    res.recon_feature_acc = Some(hit as f64 / tot.max(1) as f64);
    res.majority_feature_acc = Some(maj as f64 / tot.max(1) as f64);
}

/// The victims (the first `victims` private training rows) and one release of each.
#[derive(Debug, Clone)]
pub struct Victims {
    pub x: Vec<f32>,
    pub y: Vec<u32>,
    pub attr: Vec<u8>,
    /// What the guest published for them: `[victims, N]`.
    pub z: Vec<f32>,
}

fn victims(ds: &Dataset, k: usize) -> (Vec<f32>, Vec<u32>, Vec<u8>) {
    let k = k.min(ds.train.n);
    (
        ds.train.x[..k * ds.train.d].to_vec(),
        ds.train.y[..k].to_vec(),
        ds.train.attr[..k].to_vec(),
    )
}

/// One release of every victim row through the trained bottom and its cut layer.
pub fn victim_traffic(tr: &Trained, ds: &Dataset, cfg: &AttackConfig) -> Result<Victims> {
    if cfg.victims == 0 {
        return Err(R3Error::Config("--victims must be >= 1".into()));
    }
    let (x, y, attr) = victims(ds, cfg.victims);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x71C7);
    let z = smash(&tr.bottom, tr.cut.as_ref(), &x, ds.train.d, &mut rng)?;
    Ok(Victims { x, y, attr, z })
}

/// The attacker's auxiliary rows must exist for the attacks that learn from them.
fn need_aux(ds: &Dataset) -> Result<()> {
    if ds.aux.n == 0 {
        return Err(R3Error::Config(
            "the auxiliary split is empty (--aux 0): the attacks train on the host's auxiliary rows"
                .into(),
        ));
    }
    Ok(())
}

/// Data reconstruction by an inverse network trained on aux.
pub fn reconstruction(
    tr: &Trained,
    ds: &Dataset,
    v: &Victims,
    cfg: &AttackConfig,
) -> Result<ReconResult> {
    need_aux(ds)?;
    let d = ds.train.d;
    let nc = tr.cfg.cut;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5EC0);
    let aux_z = smash(&tr.bottom, tr.cut.as_ref(), &ds.aux.x, d, &mut rng)?;
    let (vx, vy, vz) = (&v.x, &v.y, &v.z);
    let unit = ds.image.is_some();
    let inv = Mlp::new(nc, cfg.hidden, d, 2, cfg.seed ^ 0x1A)?;
    fit_regressor(&inv, &aux_z, nc, &ds.aux.x, d, unit, cfg)?;
    let rec = predict(&inv, vz, nc, unit)?;
    let mut res = ReconResult::default();
    if unit {
        image_scores(ds, vx, vy, &rec, &mut res);
    } else {
        feature_scores(ds, vx, &rec, &mut res);
    }
    Ok(res)
}

/// Property inference: AUC of a classifier from published rows to the private attribute.
pub fn property(tr: &Trained, ds: &Dataset, v: &Victims, cfg: &AttackConfig) -> Result<f64> {
    need_aux(ds)?;
    let d = ds.train.d;
    let nc = tr.cfg.cut;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x9A09);
    let aux_z = smash(&tr.bottom, tr.cut.as_ref(), &ds.aux.x, d, &mut rng)?;
    let (va, vz) = (&v.attr, v.z.clone());
    let net = Mlp::new(nc, 64, 2, 2, cfg.seed ^ 0x2B)?;
    let vars = net.vars();
    let mut opt = Adam::new(&vars, cfg.lr)?;
    let mut idx: Vec<usize> = (0..ds.aux.n).collect();
    // standardise inputs with aux statistics (noise scales differ by orders of magnitude)
    let st = umbra_vfl::data::Standardizer::fit(&aux_z, nc);
    let (mut az, mut vz) = (aux_z, vz);
    st.apply(&mut az);
    st.apply(&mut vz);
    for _ in 0..cfg.epochs {
        idx.shuffle(&mut rng);
        for c in idx.chunks(cfg.batch) {
            let x = t2(&gather(&az, nc, c), c.len(), nc)?;
            let y: Vec<u32> = c.iter().map(|&i| ds.aux.attr[i] as u32).collect();
            let loss = cross_entropy(&net.forward(&x)?, &y)?;
            opt.step(&vars, &grads_of(&loss.backward()?, &vars)?)?;
        }
    }
    let logits = predict(&net, &vz, nc, false)?;
    let scores: Vec<f32> = logits.chunks(2).map(|l| l[1] - l[0]).collect();
    // 0.5 (no information) when the victims hold one value of the attribute only
    Ok(auroc(&scores, va).unwrap_or(0.5))
}

/// Squared MMD between the rows of `a: [n, N]` and `b: [m, N]`, Gaussian kernels with
/// bandwidths scaled by the mean squared distance (sum over `{1/4, 1, 4}` times it).
fn mmd(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let sq = |x: &Tensor, y: &Tensor| -> Result<Tensor> {
        let xx = x.sqr()?.sum_keepdim(1)?;
        let yy = y.sqr()?.sum_keepdim(1)?.t()?;
        let xy = x.matmul(&y.t()?)?;
        Ok(xx.broadcast_add(&yy)?.broadcast_sub(&(xy * 2.0)?)?.relu()?)
    };
    let (daa, dbb, dab) = (sq(a, a)?, sq(b, b)?, sq(a, b)?);
    let scale = dab.mean_all()?.detach().to_scalar::<f32>()?.max(1e-6) as f64;
    let mut total: Option<Tensor> = None;
    for f in [0.25, 1.0, 4.0] {
        let h = scale * f;
        let k = |dm: &Tensor| -> Result<Tensor> { Ok((dm / (-h))?.exp()?.mean_all()?) };
        let term = ((k(&daa)? + k(&dbb)?)? - (k(&dab)? * 2.0)?)?;
        total = Some(match total {
            Some(t) => (t + term)?,
            None => term,
        });
    }
    total.ok_or_else(|| R3Error::Config("mmd: no kernels".into()))
}

fn softplus(x: &Tensor) -> Result<Tensor> {
    // max(x, 0) + log(1 + exp(-|x|))
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

/// FSHA against a guest that trusts the host's gradients; returns reconstruction scores of the
/// real traffic after `fsha_steps` steps.
pub fn fsha(split: &SplitConfig, ds: &Dataset, cfg: &AttackConfig) -> Result<ReconResult> {
    let img = ds
        .image
        .ok_or_else(|| R3Error::Config("FSHA is implemented for image data".into()))?;
    need_aux(ds)?;
    if cfg.victims == 0 {
        return Err(R3Error::Config("--victims must be >= 1".into()));
    }
    let d = ds.train.d;
    let nc = split.cut;
    let (cut, _) = make_cut(split)?;
    let bottom = Bottom::new(d, split)?;
    let enc = Mlp::new(d, split.hidden, nc, 2, cfg.seed ^ 0xE1)?;
    let dec = Mlp::new(nc, split.hidden, d, 2, cfg.seed ^ 0xDE)?;
    let dis = Mlp::new(nc, 128, 1, 2, cfg.seed ^ 0xD1)?;
    let (bv, mut ae_v, dv) = (bottom.mlp.vars(), enc.vars(), dis.vars());
    ae_v.extend(dec.vars());
    let mut opt_b = Adam::new(&bv, cfg.fsha_lr)?;
    let mut opt_ae = Adam::new(&ae_v, 1e-3)?;
    let mut opt_d = Adam::new(&dv, cfg.fsha_lr)?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0xF5A);
    let b = split.batch;
    let pb = Progress::maybe(!split.progress, cfg.fsha_steps as u64, "fsha");
    // rows by class (one pool when not matching class by class)
    let pools = |y: &[u32]| -> Vec<Vec<usize>> {
        let k = if cfg.fsha_by_class { ds.classes } else { 1 };
        let mut p = vec![Vec::new(); k];
        for (i, &c) in y.iter().enumerate() {
            p[if cfg.fsha_by_class { c as usize % k } else { 0 }].push(i);
        }
        p
    };
    let (tr_pool, ax_pool) = (pools(&ds.train.y), pools(&ds.aux.y));
    let mut walk = PoolWalk::new(tr_pool, ds.train.n, &mut rng);
    for step in 0..cfg.fsha_steps {
        let c = step % ax_pool.len();
        if walk.pools[c].is_empty() || ax_pool[c].is_empty() {
            continue;
        }
        let bt = walk.next(c, b, &mut rng);
        let ba: Vec<usize> = (0..b)
            .map(|_| ax_pool[c][rng.random_range(0..ax_pool[c].len())])
            .collect();
        let (bt, ba) = (&bt[..], &ba[..]);
        // guest publishes
        let xp = t2(&ds.train.gather(bt), bt.len(), d)?;
        let zp = cut.forward(&bottom.forward(&xp)?, &mut rng)?;
        let zp_host = Var::from_tensor(&zp.detach())?;
        // host: pilot autoencoder on aux
        let xa = t2(&ds.aux.gather(ba), ba.len(), d)?;
        let za = enc.forward(&xa)?.relu()?;
        let rec = candle_nn::ops::sigmoid(&dec.forward(&za)?)?;
        let lae = (rec - &xa)?.sqr()?.mean_all()?;
        opt_ae.step(&ae_v, &grads_of(&lae.backward()?, &ae_v)?)?;
        let za = za.detach();
        // host: adversarial gradient for the guest (make its rows look like pilot codes)
        let lg = if cfg.fsha_mmd {
            mmd(zp_host.as_tensor(), &za)?
        } else {
            softplus(&dis.forward(zp_host.as_tensor())?.neg()?)?.mean_all()?
        };
        let gz = lg
            .backward()?
            .get(zp_host.as_tensor())
            .cloned()
            .unwrap_or(zp.zeros_like()?);
        // guest: back-propagates what it got
        let store = (zp * gz)?.sum_all()?.backward()?;
        opt_b.step(&bv, &grads_of(&store, &bv)?)?;
        if !cfg.fsha_mmd {
            // host: discriminator, pilot codes real, guest rows fake
            let real = dis.forward(&za)?;
            let fake = dis.forward(&zp_host.as_tensor().detach())?;
            let ld = (softplus(&real.neg()?)?.mean_all()? + softplus(&fake)?.mean_all()?)?;
            opt_d.step(&dv, &grads_of(&ld.backward()?, &dv)?)?;
        }
        pb.inc(1);
    }
    pb.finish();
    let (vx, vy, _) = victims(ds, cfg.victims);
    let vz = smash(&bottom, cut.as_ref(), &vx, d, &mut rng)?;
    let rec = predict(&dec, &vz, nc, true)?;
    let mut res = ReconResult {
        // the victims' traffic is one more release of each of them
        max_releases: walk.max_releases() + 1,
        ..Default::default()
    };
    let _ = img;
    image_scores(ds, &vx, &vy, &rec, &mut res);
    Ok(res)
}

/// Rows drawn pool by pool without replacement: each pool is walked in a shuffled order and
/// reshuffled when used up, so every row of a pool is released equally often (within one);
/// counts each row's releases.
struct PoolWalk {
    pools: Vec<Vec<usize>>,
    cursor: Vec<usize>,
    releases: Vec<usize>,
}

impl PoolWalk {
    fn new(mut pools: Vec<Vec<usize>>, n: usize, rng: &mut ChaCha8Rng) -> Self {
        for p in pools.iter_mut() {
            p.shuffle(rng);
        }
        let cursor = vec![0; pools.len()];
        PoolWalk {
            pools,
            cursor,
            releases: vec![0; n],
        }
    }

    /// The next `b` rows of pool `c` (fewer only when the pool is smaller than `b`).
    fn next(&mut self, c: usize, b: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
        let len = self.pools[c].len();
        let mut out = Vec::with_capacity(b.min(len));
        while out.len() < b.min(len) {
            if self.cursor[c] == len {
                self.pools[c].shuffle(rng);
                self.cursor[c] = 0;
            }
            let i = self.pools[c][self.cursor[c]];
            self.cursor[c] += 1;
            self.releases[i] += 1;
            out.push(i);
        }
        out
    }

    fn max_releases(&self) -> usize {
        self.releases.iter().copied().max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fsha_walk_releases_every_row_equally_often() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        // two pools of 10 and 5 rows; 6 draws of 4 from each
        let pools = vec![(0..10).collect(), (10..15).collect()];
        let mut w = PoolWalk::new(pools, 15, &mut rng);
        for _ in 0..6 {
            assert_eq!(w.next(0, 4, &mut rng).len(), 4);
            assert_eq!(w.next(1, 4, &mut rng).len(), 4);
        }
        // 24 draws over 10 rows: each row 2 or 3 times; 24 over 5: 4 or 5 times
        assert!(w.releases[..10].iter().all(|&r| r == 2 || r == 3));
        assert!(w.releases[10..].iter().all(|&r| r == 4 || r == 5));
        assert_eq!(w.max_releases(), 5);
        // a pool smaller than the batch gives what it has, each row once
        let mut w = PoolWalk::new(vec![vec![0, 1]], 2, &mut rng);
        assert_eq!(w.next(0, 4, &mut rng).len(), 2);
        assert_eq!(w.releases, vec![1, 1]);
    }
}
