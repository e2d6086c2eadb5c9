//! R3eLU, the randomized-response ReLU of private SplitNN (ESORICS 2023, arXiv 2304.09515), as a
//! [`umbra_vfl::cut::CutLayer`].
//!
//! Forward (guest), per row `v` of the smashed data `[B, N]` (already ReLU'd by the bottom):
//! 1. keep the top-`K` entries, clip them to `[0, C]` (`v^`); the other `N - K` units output 0;
//! 2. keep unit `i` with probability (eq. "keep" below)
//!    `p_i = 1/2 + r_i (e^{eps_p/K} / (1 + e^{eps_p/K}) - 1/2)`,
//!    `r_i = v^_i / max_j v^_j` (uniform budget) or `r_i = U_i / max_j U_j` (fine-grained);
//! 3. a kept unit outputs `max(0, v^_i + Lap(b_i))` with `b_i = 2 K C / eps_l` (uniform) or
//!    `b_i = 2 C / (eps_l U_i / sum_{j in topK} U_j)` (fine-grained; equals the uniform scale when
//!    `U` is flat), a dropped one outputs 0.
//!
//! The published tensor is built as `relu(clamp(z, 0, C) * mask + noise)` from `z` with its autograd
//! graph, so the guest back-propagates through the mechanism exactly.
//!
//! Backward (host), per row of the per-example gradient `delta`: the same top-`K` / clip (bound
//! `C_g`) on `|delta|` and keep probabilities; kept units return `sign(delta) |delta^| + Lap(2 K C_g
//! / eps_l)`, the others 0.
//!
//! Defaults: `eps_p = eps_l = eps / 2`, `K = N / 2`, `C = 10`. `eps = inf` keeps the randomized
//! response at its limit `p_i = (1 + r_i) / 2` and adds no noise.
use crate::error::{R3Error, Result};
use candle_core::Tensor;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::sync::Mutex;
use umbra_vfl::cut::CutLayer;
use umbra_vfl::dp::Spent;

/// How the budget is spread over the units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Budget {
    /// Keep ratio from the unit's own value, equal Laplace budget per kept unit.
    Uniform,
    /// Keep ratio and Laplace budget from the Taylor importance `U_j` of each unit.
    Fine,
}

impl std::str::FromStr for Budget {
    type Err = R3Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "uniform" => Ok(Budget::Uniform),
            "fine" => Ok(Budget::Fine),
            _ => Err(R3Error::Config(format!(
                "--budget `{s}`: expected fine or uniform"
            ))),
        }
    }
}

/// Parameters of R3eLU.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct R3eluConfig {
    /// Per-release budget `eps = eps_p + eps_l` (may be `inf`).
    pub eps: f64,
    /// Share of `eps` spent on randomized response (`eps_p = share * eps`); paper: 1/2.
    pub p_share: f64,
    /// `K` as a fraction of the cut width `N` (paper: 1/2).
    pub k_frac: f64,
    /// Forward clip bound `C` (paper: 10).
    pub clip: f64,
    /// Clip bound of the per-example gradient in the backward pass.
    pub grad_clip: f64,
    pub budget: Budget,
}

impl Default for R3eluConfig {
    fn default() -> Self {
        R3eluConfig {
            eps: 2.0,
            p_share: 0.5,
            k_frac: 0.5,
            clip: 10.0,
            grad_clip: 1.0,
            budget: Budget::Fine,
        }
    }
}

impl R3eluConfig {
    pub fn validate(&self) -> Result<()> {
        if self.eps.is_nan() || self.eps <= 0.0 {
            return Err(R3Error::Config(format!(
                "epsilon must be > 0, got {}",
                self.eps
            )));
        }
        if !(self.k_frac > 0.0 && self.k_frac <= 1.0) {
            return Err(R3Error::Config(format!(
                "--k must be in (0, 1], got {}",
                self.k_frac
            )));
        }
        let ok = |c: f64| c > 0.0 && c.is_finite();
        if !ok(self.clip) || !ok(self.grad_clip) {
            return Err(R3Error::Config("clip bounds must be finite and > 0".into()));
        }
        if !(self.p_share > 0.0 && self.p_share < 1.0) {
            return Err(R3Error::Config("p_share must be in (0, 1)".into()));
        }
        Ok(())
    }
    /// `K` for a cut of width `n` (at least 1).
    pub fn k(&self, n: usize) -> usize {
        ((self.k_frac * n as f64).round() as usize).clamp(1, n.max(1))
    }
    pub fn eps_p(&self) -> f64 {
        self.eps * self.p_share
    }
    pub fn eps_l(&self) -> f64 {
        self.eps * (1.0 - self.p_share)
    }
    /// `q = e^{eps_p/K} / (1 + e^{eps_p/K})`, the keep probability of the largest unit.
    pub fn q(&self, k: usize) -> f64 {
        let a = self.eps_p() / k as f64;
        if a.is_infinite() {
            1.0
        } else {
            1.0 / (1.0 + (-a).exp())
        }
    }
    /// Uniform Laplace scale `2 K C / eps_l` for bound `c` (0 when `eps = inf`).
    pub fn laplace_scale(&self, k: usize, c: f64) -> f64 {
        if self.eps_l().is_infinite() {
            0.0
        } else {
            2.0 * k as f64 * c / self.eps_l()
        }
    }
}

/// One draw of `Lap(0, b)` by inversion.
pub fn laplace(b: f64, rng: &mut ChaCha8Rng) -> f64 {
    if b <= 0.0 {
        return 0.0;
    }
    let u: f64 = rng.random::<f64>() - 0.5;
    let a = (1.0 - 2.0 * u.abs()).max(f64::MIN_POSITIVE);
    -b * u.signum() * a.ln()
}

/// Indices of the `k` largest values of `v` (ties by index).
pub fn top_k(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.truncate(k.min(v.len()));
    idx
}

/// What the mechanism does to one row: `mask[i]` = 1 for kept units, `noise[i]` the Laplace draw
/// of a kept unit (0 elsewhere), `keep_prob[i]` the `p_i` it used (0 outside the top-K).
#[derive(Debug, Clone, PartialEq)]
pub struct RowPlan {
    pub mask: Vec<f32>,
    pub noise: Vec<f32>,
    pub keep_prob: Vec<f64>,
    pub scale: Vec<f64>,
}

/// Plan one row. `mag` are the magnitudes ranked and clipped (`v` forward, `|delta|` backward),
/// `c` the clip bound, `importance` the fine-grained `U` (None: uniform budget).
pub fn plan_row(
    mag: &[f32],
    cfg: &R3eluConfig,
    c: f64,
    importance: Option<&[f64]>,
    rng: &mut ChaCha8Rng,
) -> RowPlan {
    let n = mag.len();
    let k = cfg.k(n);
    let top = top_k(mag, k);
    let clipped: Vec<f64> = top.iter().map(|&i| (mag[i] as f64).clamp(0.0, c)).collect();
    let q = cfg.q(k);
    let mut plan = RowPlan {
        mask: vec![0.0; n],
        noise: vec![0.0; n],
        keep_prob: vec![0.0; n],
        scale: vec![0.0; n],
    };
    let uniform_b = cfg.laplace_scale(k, c);
    let (ratios, scales): (Vec<f64>, Vec<f64>) = match importance {
        Some(u) if u.len() == n && u.iter().any(|&x| x > 0.0) => {
            let umax = u.iter().cloned().fold(0.0f64, f64::max);
            let usum: f64 = top.iter().map(|&i| u[i].max(0.0)).sum();
            top.iter()
                .map(|&i| {
                    let ui = u[i].max(0.0);
                    let r = ui / umax;
                    let b = if cfg.eps_l().is_infinite() {
                        0.0
                    } else if ui <= 0.0 || usum <= 0.0 {
                        f64::INFINITY
                    } else {
                        2.0 * c / (cfg.eps_l() * ui / usum)
                    };
                    (r, b)
                })
                .unzip()
        }
        _ => {
            let vmax = clipped.iter().cloned().fold(0.0f64, f64::max);
            clipped
                .iter()
                .map(|&x| (if vmax > 0.0 { x / vmax } else { 0.0 }, uniform_b))
                .unzip()
        }
    };
    for (j, &i) in top.iter().enumerate() {
        let p = 0.5 + ratios[j] * (q - 0.5);
        plan.keep_prob[i] = p;
        plan.scale[i] = scales[j];
        if rng.random::<f64>() < p {
            plan.mask[i] = 1.0;
            // an infinite scale (a unit with no importance) carries no information: drop it
            if scales[j].is_finite() {
                plan.noise[i] = laplace(scales[j], rng) as f32;
            } else {
                plan.mask[i] = 0.0;
            }
        }
    }
    plan
}

/// R3eLU on the cut layer. Holds the running Taylor importance `U_j` for the fine budget.
#[derive(Debug)]
pub struct R3elu {
    pub cfg: R3eluConfig,
    importance: Mutex<(Vec<f64>, u64)>,
}

impl R3elu {
    pub fn new(cfg: R3eluConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(R3elu {
            cfg,
            importance: Mutex::new((Vec::new(), 0)),
        })
    }

    /// Fold a batch into the running importance `U_j = mean_t mean_b (g_bj a_bj)^2` (first-order
    /// Taylor). `a`, `g`: `[B, N]` row-major activations and gradients at the cut.
    pub fn observe(&self, a: &[f32], g: &[f32], n: usize) {
        if n == 0 || a.len() != g.len() || !a.len().is_multiple_of(n) {
            return;
        }
        let rows = a.len() / n;
        let mut cur = vec![0.0f64; n];
        for r in 0..rows {
            for (j, c) in cur.iter_mut().enumerate() {
                let t = (a[r * n + j] * g[r * n + j]) as f64;
                *c += t * t / rows as f64;
            }
        }
        let mut st = self.importance.lock().unwrap_or_else(|e| e.into_inner());
        if st.0.len() != n {
            *st = (vec![0.0; n], 0);
        }
        st.1 += 1;
        let t = st.1 as f64;
        for (u, c) in st.0.iter_mut().zip(&cur) {
            *u += (c - *u) / t;
        }
    }

    /// The current `U` (empty before any observation).
    pub fn importance(&self) -> Vec<f64> {
        self.importance
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    fn fine(&self) -> Option<Vec<f64>> {
        if self.cfg.budget != Budget::Fine {
            return None;
        }
        let u = self.importance();
        if u.iter().any(|&x| x > 0.0) {
            Some(u)
        } else {
            None
        }
    }

    /// Forward planning for a `[B, N]` batch of values.
    pub fn plan_forward(&self, v: &[f32], n: usize, rng: &mut ChaCha8Rng) -> Vec<RowPlan> {
        let u = self.fine();
        v.chunks(n.max(1))
            .map(|row| plan_row(row, &self.cfg, self.cfg.clip, u.as_deref(), rng))
            .collect()
    }

    /// The backward mechanism on per-example gradients `delta: [B, N]` (plain values).
    pub fn perturb_gradient(&self, delta: &[f32], n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
        let mut out = vec![0.0f32; delta.len()];
        for (r, row) in delta.chunks(n.max(1)).enumerate() {
            let mag: Vec<f32> = row.iter().map(|x| x.abs()).collect();
            let plan = plan_row(&mag, &self.cfg, self.cfg.grad_clip, None, rng);
            for i in 0..row.len() {
                if plan.mask[i] > 0.0 {
                    let m = (mag[i] as f64).min(self.cfg.grad_clip) as f32;
                    out[r * n + i] = row[i].signum() * m + plan.noise[i];
                }
            }
        }
        out
    }
}

impl CutLayer for R3elu {
    fn name(&self) -> String {
        format!(
            "r3elu(eps={}, k={}, C={}, budget={:?})",
            self.cfg.eps, self.cfg.k_frac, self.cfg.clip, self.cfg.budget
        )
    }

    /// `z: [B, N]` -> `relu(clamp(z, 0, C) * mask + noise)`, differentiable in `z`.
    fn forward(&self, z: &Tensor, rng: &mut ChaCha8Rng) -> umbra_vfl::Result<Tensor> {
        let (b, n) = z.dims2()?;
        let v: Vec<f32> = z.flatten_all()?.to_vec1()?;
        let plans = self.plan_forward(&v, n, rng);
        let mut mask = Vec::with_capacity(b * n);
        let mut noise = Vec::with_capacity(b * n);
        for p in plans {
            mask.extend(p.mask);
            noise.extend(p.noise);
        }
        let mask = Tensor::from_vec(mask, (b, n), z.device())?;
        let noise = Tensor::from_vec(noise, (b, n), z.device())?;
        let clipped = z.clamp(0f32, self.cfg.clip as f32)?;
        Ok(((clipped * mask)? + noise)?.relu()?)
    }

    /// Host side: the per-example gradient through the backward mechanism.
    fn backward(&self, grad: &Tensor, rng: &mut ChaCha8Rng) -> umbra_vfl::Result<Tensor> {
        let (b, n) = grad.dims2()?;
        let g: Vec<f32> = grad.flatten_all()?.to_vec1()?;
        let out = self.perturb_gradient(&g, n, rng);
        Ok(Tensor::from_vec(out, (b, n), grad.device())?)
    }

    /// Not mu-GDP: the R3eLU accountant is [`crate::accountant::strong_composition`].
    fn privacy(&self, _b: usize, _n: usize, _s: usize, _e: usize) -> Option<Spent> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::SeedableRng;

    fn cfg(eps: f64) -> R3eluConfig {
        R3eluConfig {
            eps,
            budget: Budget::Uniform,
            ..Default::default()
        }
    }

    /// Binomial standard error bound: |p^ - p| < 5 sqrt(p(1-p)/n) fails by luck with prob < 1e-6.
    fn close_rate(hits: usize, n: usize, p: f64) -> bool {
        let ph = hits as f64 / n as f64;
        (ph - p).abs() <= 5.0 * (p * (1.0 - p) / n as f64).sqrt() + 1e-12
    }

    #[test]
    fn keep_rates_match_the_formula() {
        // N = 8, K = 4: the top four of the row are ranked, the rest always 0
        let row = [9.0f32, 1.0, 4.0, 0.5, 12.0, 2.0, 0.1, 0.2];
        let c = cfg(4.0);
        let k = c.k(8);
        assert_eq!(k, 4);
        // eps_p / K = 2 / 4
        let q_formula = c.q(k);
        assert!((q_formula - ((0.5f64).exp() / (1.0 + 0.5f64.exp()))).abs() < 1e-12);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let trials = 40_000;
        let mut kept = [0usize; 8];
        for _ in 0..trials {
            let p = plan_row(&row, &c, c.clip, None, &mut rng);
            for (k, m) in kept.iter_mut().zip(&p.mask) {
                *k += (*m > 0.0) as usize;
            }
        }
        // top-4: 12 (clipped to 10), 9, 4, 2; max v^ = 10
        let expect = |v: f64| 0.5 + (v / 10.0) * (q_formula - 0.5);
        for (i, v) in [(4usize, 10.0), (0, 9.0), (2, 4.0), (5, 2.0)] {
            assert!(
                close_rate(kept[i], trials, expect(v)),
                "unit {i}: {} vs {}",
                kept[i],
                expect(v)
            );
        }
        for i in [1usize, 3, 6, 7] {
            assert_eq!(kept[i], 0, "unit {i} is outside the top-K");
        }
    }

    #[test]
    fn laplace_noise_has_the_formula_scale() {
        let c = cfg(2.0); // eps_l = 1, K = 4 of 8, C = 10: b = 80
        let row = [5.0f32; 8];
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut draws = Vec::new();
        for _ in 0..20_000 {
            let p = plan_row(&row, &c, c.clip, None, &mut rng);
            for i in 0..8 {
                if p.mask[i] > 0.0 {
                    assert_eq!(p.scale[i], 80.0);
                    draws.push(p.noise[i] as f64);
                }
            }
        }
        // E|Lap(b)| = b, sd of |X| is b: the mean of n draws is within 5 b / sqrt(n)
        let n = draws.len() as f64;
        let mean_abs = draws.iter().map(|x| x.abs()).sum::<f64>() / n;
        assert!(
            (mean_abs - 80.0).abs() < 5.0 * 80.0 / n.sqrt(),
            "{mean_abs}"
        );
        let mean = draws.iter().sum::<f64>() / n;
        assert!(mean.abs() < 5.0 * 80.0 * 2f64.sqrt() / n.sqrt(), "{mean}");
    }

    #[test]
    fn fine_budget_follows_importance() {
        let c = R3eluConfig {
            eps: 4.0,
            budget: Budget::Fine,
            ..Default::default()
        };
        let r = R3elu::new(c).unwrap();
        // importance: unit j has U_j = (g a)^2 with a = 1, g = j + 1
        let a = vec![1.0f32; 4];
        let g = vec![1.0f32, 2.0, 3.0, 4.0];
        r.observe(&a, &g, 4);
        let u = r.importance();
        assert_eq!(u, vec![1.0, 4.0, 9.0, 16.0]);
        // K = 2: rank by value, so units 0 and 1 (largest values) are the top-K
        let row = [8.0f32, 7.0, 1.0, 0.5];
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let trials = 40_000;
        let mut kept = [0usize; 4];
        let mut plan0 = None;
        for _ in 0..trials {
            let p = plan_row(&row, &c, c.clip, Some(&u), &mut rng);
            for (k, m) in kept.iter_mut().zip(&p.mask) {
                *k += (*m > 0.0) as usize;
            }
            plan0 = Some(p);
        }
        let q = c.q(2);
        let p0 = 0.5 + (1.0 / 16.0) * (q - 0.5);
        let p1 = 0.5 + (4.0 / 16.0) * (q - 0.5);
        assert!(close_rate(kept[0], trials, p0), "{} {}", kept[0], p0);
        assert!(close_rate(kept[1], trials, p1), "{} {}", kept[1], p1);
        assert_eq!(kept[2] + kept[3], 0);
        // Laplace budget split eps_l U_j / sum_topK U: scale 2C / (2 * 1/5) = 50 and 2C/(2*4/5)=12.5
        let p = plan0.unwrap();
        assert!((p.scale[0] - 50.0).abs() < 1e-9 && (p.scale[1] - 12.5).abs() < 1e-9);
    }

    #[test]
    fn forward_is_differentiable_and_bounded_without_noise() {
        let r = R3elu::new(cfg(f64::INFINITY)).unwrap();
        let z = Var::from_tensor(
            &Tensor::from_vec(vec![20.0f32, 3.0, -1.0, 0.5], (1, 4), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let out = r.forward(z.as_tensor(), &mut rng).unwrap();
        let v: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
        // top-2 are units 0, 1; unit 0 clipped to 10 and kept with p = 1 (ratio 1, q = 1)
        assert_eq!(v[0], 10.0);
        assert!(v[1] == 3.0 || v[1] == 0.0);
        assert_eq!(v[2], 0.0);
        assert_eq!(v[3], 0.0);
        let g = out.sum_all().unwrap().backward().unwrap();
        let gz: Vec<f32> = g
            .get(z.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(gz[0], 0.0, "clipped unit has zero gradient");
        assert_eq!(gz[1], v[1].signum());
    }

    #[test]
    fn backward_keeps_sign_clips_and_adds_noise_of_the_formula_scale() {
        let c = R3eluConfig {
            eps: 8.0,
            grad_clip: 0.5,
            budget: Budget::Uniform,
            ..Default::default()
        };
        let r = R3elu::new(c).unwrap();
        let delta = [-2.0f32, 0.1, 1.0, -0.01]; // K = 2: units 0 and 2 (|delta| largest)
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut dev = Vec::new();
        let mut kept0 = 0;
        let trials = 20_000;
        for _ in 0..trials {
            let out = r.perturb_gradient(&delta, 4, &mut rng);
            assert_eq!(out[1], 0.0);
            assert_eq!(out[3], 0.0);
            if out[0] != 0.0 {
                kept0 += 1;
                dev.push((out[0] + 0.5) as f64); // sign(-2) * min(2, 0.5) = -0.5
            }
        }
        // both top units are clipped to 0.5 = max, so p = q
        assert!(close_rate(kept0, trials, c.q(2)));
        let b = 2.0 * 2.0 * 0.5 / 4.0; // 2 K C_g / eps_l
        let n = dev.len() as f64;
        let mean_abs = dev.iter().map(|x| x.abs()).sum::<f64>() / n;
        assert!(
            (mean_abs - b).abs() < 5.0 * b / n.sqrt(),
            "{mean_abs} vs {b}"
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        for bad in [
            R3eluConfig {
                eps: 0.0,
                ..Default::default()
            },
            R3eluConfig {
                k_frac: 1.5,
                ..Default::default()
            },
            R3eluConfig {
                clip: -1.0,
                ..Default::default()
            },
            R3eluConfig {
                eps: f64::NAN,
                ..Default::default()
            },
        ] {
            assert!(R3elu::new(bad).is_err());
        }
        assert!("nope".parse::<Budget>().is_err());
    }
}
