//! R3eLU, the randomized-response ReLU of private SplitNN (ESORICS 2023, arXiv 2304.09515), as a
//! [`umbra_vfl::cut::CutLayer`], in the notes' literal form.
//!
//! **Forward (guest)**, per row `v` of the smashed data `[B, N]` (already ReLU'd by the bottom):
//! 1. `v^`: the top-`K` entries of `v` clipped to `[0, C]`, **every other entry 0**;
//! 2. **every** unit `i` (all `N`, not only the top-K) is kept with probability
//!    `p_i = 1/2 + r_i (q - 1/2)`, `q = e^a / (1 + e^a)`, `r_i = v^_i / max_j v^_j`, so a unit
//!    outside the top-K (`v^_i = 0`) is kept with probability exactly 1/2;
//! 3. a kept unit outputs `max(0, v^_i + Lap(b))` — `max(0, Lap(b))` outside the top-K — and a
//!    dropped unit outputs 0.
//!
//! The earlier version drew only the top-K units and left the others at exactly 0, so the
//! output showed which units were in the top-K (an unbounded privacy loss); here the zero
//! pattern is randomized response for every unit and is part of the count below.
//!
//! **Privacy of one release** (a local guarantee: it holds for *any* two rows `v, v'`, whatever
//! the bottom model, so a malicious host that steers the bottom, as in FSHA, does not change
//! it). Let `m = min(2K, N)` (the units where `v^` or `v'^` can be non-zero) and
//! `l(a) = ln((1 + e^a) / 2)`. Per unit the output law is an atom `P(y = 0) = 1 - p + p T(v)`,
//! `T(v) = P(v + L <= 0) = e^{-v/b} / 2`, and the density `p f_b(y - v)` on `y > 0`. Since
//! `p in [1/2, q]`, `p/p' <= 2q <= e^{l(a)}` and `(1-p)/(1-p') <= (1+e^a)/2 = e^{l(a)}`, and
//! `T(v)/T(v') , f_b(y-v)/f_b(y-v') <= e^{|v-v'|/b}`; so each unit's log-ratio is at most
//! `l(a) [p_i != p'_i] + |v^_i - v'^_i| / b`. Units outside both top-K sets have
//! `p = p' = 1/2` and `v^ = v'^ = 0`; summing over the `m` others, with
//! `||v^ - v'^||_1 <= m C`:
//!
//! `eps_release <= m l(a) + m C / b`.   (R1)
//!
//! The parameters are set so that (R1) is exactly the requested `eps = eps_p + eps_l`:
//! `b = m C / eps_l` and `a = ln(2 e^{eps_p / m} - 1)` (so `m l(a) = eps_p`). With the defaults
//! (`K = N/2`, `m = 2K`) `b` is the notes' `2 K C / eps_l`; `a` is a little below the notes'
//! `eps_p / K` (which, counted over the `2K` units the two rows' top-K sets can cover, gives
//! `2K l(eps_p/K) > eps_p`). At `eps = 2`, `K = 32`, `N = 64`: `a = 0.0310`, so
//! `p_i in [0.5, 0.508]` whatever the value, and `b = 640` against values of at most `C = 10`.
//!
//! **Backward (host)**, per row of the per-example gradient `delta`: `u`, the top-`K` of
//! `|delta|` clipped to `C_g` with their signs (0 elsewhere); every unit kept with
//! `p_i = 1/2 + (|u_i| / max |u|)(q - 1/2)`; a kept unit returns `u_i + Lap(b_g)`, a dropped one
//! 0. The same argument gives `eps` per release of a gradient row with
//! `b_g = 2 K C_g / eps_l` (signed values: `||u - u'||_1 <= 2 K C_g`). This protects the
//! host's labels from the guest; the gradient depends on the guest's data only through the
//! published rows, so it is not a release of the guest's data (see [`crate::ledger`]).
//!
//! **Fine-grained budget** (`Budget::Fine`): `r_i = U_i / max U` (Taylor importance
//! `U_j = mean (g_j a_j)^2`) and Laplace scales `2C / (eps_l U_j / sum_{topK} U)`. `U` comes from
//! the guest's private activations, so the noise scales depend on private data and the release
//! has no pure-DP bound; the ledger reports such runs as unaccounted.
//!
//! `eps = inf` keeps the randomized response at its limit `q = 1` and adds no noise.
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
    /// Keep ratio from the unit's own value, equal Laplace budget per unit (accounted).
    Uniform,
    /// Keep ratio and Laplace budget from the Taylor importance `U_j` of each unit (the
    /// paper's; not accounted, see the module docs).
    Fine,
}

impl std::str::FromStr for Budget {
    type Err = R3Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "uniform" => Ok(Budget::Uniform),
            "fine" => Ok(Budget::Fine),
            _ => Err(R3Error::Config(format!(
                "--budget `{s}`: expected uniform or fine"
            ))),
        }
    }
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Budget::Uniform => "uniform",
            Budget::Fine => "fine",
        })
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
    /// Clip bound `C_g` of the per-example gradient in the backward pass.
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
            budget: Budget::Uniform,
        }
    }
}

/// `ln((1 + e^a) / 2)`, the log-ratio bound of one unit's randomized response.
pub fn rr_loss(a: f64) -> f64 {
    if a.is_infinite() {
        return f64::INFINITY;
    }
    // ln((1 + e^a)/2) = a + ln((1 + e^-a)/2) for large a
    if a > 30.0 {
        a + ((1.0 + (-a).exp()) / 2.0).ln()
    } else {
        ((1.0 + a.exp()) / 2.0).ln()
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

    /// `m = min(2K, N)`: the units whose value or keep probability can differ between two rows.
    pub fn m(&self, n: usize) -> usize {
        (2 * self.k(n)).min(n.max(1))
    }

    pub fn eps_p(&self) -> f64 {
        self.eps * self.p_share
    }

    pub fn eps_l(&self) -> f64 {
        self.eps * (1.0 - self.p_share)
    }

    /// The randomized response's log-odds `a = ln(2 e^{eps_p/m} - 1)` (so that
    /// `m ln((1+e^a)/2) = eps_p`); `inf` for `eps = inf`.
    pub fn log_odds(&self, n: usize) -> f64 {
        let x = self.eps_p() / self.m(n) as f64;
        if x.is_infinite() {
            return f64::INFINITY;
        }
        // ln(2 e^x - 1) = x + ln(2 - e^-x), stable for large x
        x + (2.0 - (-x).exp()).ln()
    }

    /// `q = e^a / (1 + e^a)`, the keep probability of the largest unit (`N` units).
    pub fn q(&self, n: usize) -> f64 {
        let a = self.log_odds(n);
        if a.is_infinite() {
            1.0
        } else {
            1.0 / (1.0 + (-a).exp())
        }
    }

    /// Forward Laplace scale `b = m C / eps_l` (0 when `eps = inf`).
    pub fn forward_scale(&self, n: usize) -> f64 {
        if self.eps_l().is_infinite() {
            0.0
        } else {
            self.m(n) as f64 * self.clip / self.eps_l()
        }
    }

    /// Backward Laplace scale `b_g = 2 K C_g / eps_l` (0 when `eps = inf`).
    pub fn backward_scale(&self, n: usize) -> f64 {
        if self.eps_l().is_infinite() {
            0.0
        } else {
            2.0 * self.k(n) as f64 * self.grad_clip / self.eps_l()
        }
    }

    /// The bound (R1) of one forward release with these parameters:
    /// `m ln((1+e^a)/2) + m C / b` (equals `eps` by construction; `inf` for `eps = inf`).
    pub fn release_epsilon(&self, n: usize) -> f64 {
        let b = self.forward_scale(n);
        if b <= 0.0 {
            return f64::INFINITY;
        }
        let m = self.m(n) as f64;
        m * rr_loss(self.log_odds(n)) + m * self.clip / b
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

/// What the mechanism does to one row.
#[derive(Debug, Clone, PartialEq)]
pub struct RowPlan {
    /// 1 where the unit is kept **and** in the top-K (its clipped value passes), else 0.
    pub mask: Vec<f32>,
    /// The Laplace draw of every kept unit (top-K or not), 0 for dropped units.
    pub noise: Vec<f32>,
    /// 1 for every kept unit.
    pub kept: Vec<f32>,
    /// The `p_i` each unit was kept with (1/2 outside the top-K).
    pub keep_prob: Vec<f64>,
    /// The Laplace scale each unit gets when kept.
    pub scale: Vec<f64>,
}

/// The deterministic part of the mechanism on one row of `n` magnitudes: which units are in
/// the top-K, the clipped values `v^` (0 outside the top-K), the keep probabilities and the
/// Laplace scales. `c` is the clip bound, `b` the uniform Laplace scale, `importance` the
/// fine-grained `U` (None: uniform budget).
#[derive(Debug, Clone, PartialEq)]
pub struct UnitParams {
    pub in_top: Vec<bool>,
    pub value: Vec<f64>,
    pub keep_prob: Vec<f64>,
    pub scale: Vec<f64>,
}

pub fn unit_params(
    mag: &[f32],
    cfg: &R3eluConfig,
    c: f64,
    b: f64,
    importance: Option<&[f64]>,
) -> UnitParams {
    let n = mag.len();
    let top = top_k(mag, cfg.k(n));
    let q = cfg.q(n);
    let mut u = UnitParams {
        in_top: vec![false; n],
        value: vec![0.0; n],
        keep_prob: vec![0.5; n],
        scale: vec![b; n],
    };
    for &i in &top {
        u.in_top[i] = true;
        u.value[i] = (mag[i] as f64).clamp(0.0, c);
    }
    let vmax = u.value.iter().cloned().fold(0.0f64, f64::max);
    match importance {
        Some(imp) if imp.len() == n && imp.iter().any(|&x| x > 0.0) => {
            let umax = imp.iter().cloned().fold(0.0f64, f64::max);
            let usum: f64 = top.iter().map(|&i| imp[i].max(0.0)).sum();
            for &i in &top {
                let ui = imp[i].max(0.0);
                u.keep_prob[i] = 0.5 + (ui / umax) * (q - 0.5);
                u.scale[i] = if cfg.eps_l().is_infinite() {
                    0.0
                } else if ui <= 0.0 || usum <= 0.0 {
                    f64::INFINITY
                } else {
                    2.0 * c / (cfg.eps_l() * ui / usum)
                };
            }
        }
        _ => {
            for &i in &top {
                let r = if vmax > 0.0 { u.value[i] / vmax } else { 0.0 };
                u.keep_prob[i] = 0.5 + r * (q - 0.5);
            }
        }
    }
    u
}

/// Plan one row: [`unit_params`], then every unit kept with its `p_i` and given its Laplace
/// draw when kept.
pub fn plan_row(
    mag: &[f32],
    cfg: &R3eluConfig,
    c: f64,
    b: f64,
    importance: Option<&[f64]>,
    rng: &mut ChaCha8Rng,
) -> RowPlan {
    let n = mag.len();
    let u = unit_params(mag, cfg, c, b, importance);
    let mut plan = RowPlan {
        mask: vec![0.0; n],
        noise: vec![0.0; n],
        kept: vec![0.0; n],
        keep_prob: u.keep_prob,
        scale: u.scale,
    };
    for i in 0..n {
        if rng.random::<f64>() >= plan.keep_prob[i] {
            continue;
        }
        // an infinite scale (a unit with no importance) carries no information: drop it
        if !plan.scale[i].is_finite() {
            continue;
        }
        plan.kept[i] = 1.0;
        plan.mask[i] = f32::from(u.in_top[i]);
        plan.noise[i] = laplace(plan.scale[i], rng) as f32;
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
        u.iter().any(|&x| x > 0.0).then_some(u)
    }

    /// Forward planning for a `[B, N]` batch of values.
    pub fn plan_forward(&self, v: &[f32], n: usize, rng: &mut ChaCha8Rng) -> Vec<RowPlan> {
        let u = self.fine();
        let b = self.cfg.forward_scale(n);
        v.chunks(n.max(1))
            .map(|row| plan_row(row, &self.cfg, self.cfg.clip, b, u.as_deref(), rng))
            .collect()
    }

    /// The backward mechanism on per-example gradients `delta: [B, N]` (plain values).
    pub fn perturb_gradient(&self, delta: &[f32], n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
        let (cg, b) = (self.cfg.grad_clip, self.cfg.backward_scale(n));
        let mut out = vec![0.0f32; delta.len()];
        for (r, row) in delta.chunks(n.max(1)).enumerate() {
            let mag: Vec<f32> = row.iter().map(|x| x.abs()).collect();
            let plan = plan_row(&mag, &self.cfg, cg, b, None, rng);
            for i in 0..row.len() {
                let u = row[i].signum() * (mag[i] as f64).min(cg) as f32;
                out[r * n + i] = plan.mask[i] * u + plan.noise[i];
            }
        }
        out
    }
}

impl CutLayer for R3elu {
    fn name(&self) -> String {
        format!(
            "r3elu(eps={}, k={}, C={}, budget={})",
            self.cfg.eps, self.cfg.k_frac, self.cfg.clip, self.cfg.budget
        )
    }

    /// `z: [B, N]` -> `relu(clamp(z, 0, C) * mask + noise)`, differentiable in `z` (the
    /// guest back-propagates through the mechanism exactly).
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

    /// Not mu-GDP: R3eLU is accounted as pure DP by [`crate::ledger`].
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
    fn the_notes_arithmetic_at_eps_2_and_k_32() {
        // N = 64, K = 32, eps_p = eps_l = 1: m = 64, a = ln(2 e^{1/64} - 1) = 0.0310096,
        // q = 1 / (1 + e^-a) = 0.5077518, b = 64 * 10 / 1 = 640
        let c = cfg(2.0);
        assert_eq!((c.k(64), c.m(64)), (32, 64));
        assert!((c.log_odds(64) - 0.031_009_610_6).abs() < 1e-9);
        assert!((c.q(64) - 0.507_751_781_5).abs() < 1e-9);
        assert_eq!(c.forward_scale(64), 640.0);
        assert_eq!(c.backward_scale(64), 2.0 * 32.0 * 1.0 / 1.0);
        // the bound (R1) is the requested epsilon
        for (eps, k, n) in [
            (2.0, 0.5, 64),
            (0.5, 0.1, 64),
            (64.0, 0.5, 64),
            (8.0, 0.9, 10),
        ] {
            let c = R3eluConfig {
                eps,
                k_frac: k,
                ..cfg(eps)
            };
            assert!(
                (c.release_epsilon(n) - eps).abs() < 1e-9 * eps,
                "{eps} {k} {n}"
            );
        }
        assert!(cfg(f64::INFINITY).release_epsilon(64).is_infinite());
        assert_eq!(cfg(f64::INFINITY).q(64), 1.0);
        assert_eq!(cfg(f64::INFINITY).forward_scale(64), 0.0);
        // ln((1 + e^a) / 2) for a = ln 3: ln 2
        assert!((rr_loss(3f64.ln()) - 2f64.ln()).abs() < 1e-12);
        assert!((rr_loss(100.0) - (100.0 - 2f64.ln())).abs() < 1e-9);
    }

    #[test]
    fn every_unit_is_kept_at_its_rate_and_none_is_always_zero() {
        // N = 8, K = 4: the top four are ranked by value, the other four are kept with 1/2
        let row = [9.0f32, 1.0, 4.0, 0.5, 12.0, 2.0, 0.1, 0.2];
        let c = cfg(4.0);
        let q = c.q(8);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let trials = 40_000;
        let (mut kept, mut nonzero) = ([0usize; 8], [0usize; 8]);
        for _ in 0..trials {
            let p = plan_row(&row, &c, c.clip, c.forward_scale(8), None, &mut rng);
            for i in 0..8 {
                kept[i] += (p.kept[i] > 0.0) as usize;
                // what the forward publishes for this unit: max(0, mask v^ + noise)
                let v = (row[i] as f64).min(10.0) as f32;
                nonzero[i] += (p.mask[i] * v + p.noise[i] > 0.0) as usize;
            }
        }
        // top-4: 12 (clipped to 10), 9, 4, 2; max v^ = 10
        let expect = |v: f64| 0.5 + (v / 10.0) * (q - 0.5);
        for (i, v) in [(4usize, 10.0), (0, 9.0), (2, 4.0), (5, 2.0)] {
            assert!(
                close_rate(kept[i], trials, expect(v)),
                "unit {i}: {}",
                kept[i]
            );
        }
        for i in [1usize, 3, 6, 7] {
            assert!(close_rate(kept[i], trials, 0.5), "unit {i}: {}", kept[i]);
            // kept with 1/2, then max(0, Lap) is non-zero with 1/2
            assert!(
                close_rate(nonzero[i], trials, 0.25),
                "unit {i}: {}",
                nonzero[i]
            );
        }
    }

    /// `ln P(y_i | v^_i, p_i)` of one unit's output: an atom at 0, a density above it.
    fn unit_logp(v: f64, p: f64, b: f64, y: f64) -> f64 {
        if y == 0.0 {
            (1.0 - p + p * 0.5 * (-v / b).exp()).ln()
        } else {
            p.ln() - (y - v).abs() / b - (2.0 * b).ln()
        }
    }

    /// The largest privacy loss `sup_y ln P(y | v) / P(y | v')` between two rows: the units are
    /// independent, so it is the sum of each unit's largest log-ratio (over `y = 0`, `y -> 0+`
    /// and `y` above both values).
    fn worst_loss(v: &[f32], w: &[f32], c: &R3eluConfig) -> f64 {
        let n = v.len();
        let b = c.forward_scale(n);
        let (pv, pw) = (
            unit_params(v, c, c.clip, b, None),
            unit_params(w, c, c.clip, b, None),
        );
        let hi = 10.0 * c.clip + 1.0;
        (0..n)
            .map(|i| {
                [0.0, 1e-9, hi]
                    .iter()
                    .map(|&y| {
                        unit_logp(pv.value[i], pv.keep_prob[i], b, y)
                            - unit_logp(pw.value[i], pw.keep_prob[i], b, y)
                    })
                    .fold(f64::MIN, f64::max)
            })
            .sum()
    }

    #[test]
    fn no_output_tells_two_rows_apart_by_more_than_epsilon() {
        // the pattern of zeros included: every event's probability ratio is at most e^eps
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        for &(eps, k) in &[(1.0, 0.5), (2.0, 0.25), (8.0, 0.5), (0.3, 1.0)] {
            let c = R3eluConfig {
                eps,
                k_frac: k,
                ..cfg(eps)
            };
            let n = 6;
            let mut worst = 0.0f64;
            // the extreme pairs: disjoint top-K sets at the clip bound, and all-zero rows
            let mut pairs = vec![
                (
                    vec![99.0f32, 99.0, 99.0, 0.0, 0.0, 0.0],
                    vec![0.0f32, 0.0, 0.0, 99.0, 99.0, 99.0],
                ),
                (vec![99.0f32; 6], vec![0.0f32; 6]),
            ];
            for _ in 0..300 {
                let r = |rng: &mut ChaCha8Rng| -> Vec<f32> {
                    (0..n).map(|_| rng.random::<f32>() * 14.0).collect()
                };
                pairs.push((r(&mut rng), r(&mut rng)));
            }
            for (v, w) in &pairs {
                for l in [worst_loss(v, w, &c), worst_loss(w, v, &c)] {
                    assert!(
                        l <= eps + 1e-9,
                        "eps {eps} k {k}: loss {l} for {v:?} vs {w:?}"
                    );
                    worst = worst.max(l);
                }
            }
            // the bound is not vacuous: the extreme pairs come within a factor 2 of it
            assert!(worst > 0.5 * eps, "eps {eps}: worst {worst}");
        }
    }

    #[test]
    fn laplace_noise_has_the_scale_of_the_bound() {
        let c = cfg(2.0); // eps_l = 1, K = 4 of 8 (m = 8), C = 10: b = 80
        let row = [5.0f32; 8];
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut draws = Vec::new();
        for _ in 0..20_000 {
            let p = plan_row(&row, &c, c.clip, c.forward_scale(8), None, &mut rng);
            for i in 0..8 {
                if p.kept[i] > 0.0 {
                    assert_eq!(p.scale[i], 80.0);
                    draws.push(p.noise[i] as f64);
                } else {
                    assert_eq!(p.noise[i], 0.0, "a dropped unit has no noise");
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
        r.observe(&[1.0f32; 4], &[1.0f32, 2.0, 3.0, 4.0], 4);
        let u = r.importance();
        assert_eq!(u, vec![1.0, 4.0, 9.0, 16.0]);
        // K = 2: rank by value, so units 0 and 1 (largest values) are the top-K
        let p = unit_params(
            &[8.0f32, 7.0, 1.0, 0.5],
            &c,
            c.clip,
            c.forward_scale(4),
            Some(&u),
        );
        let q = c.q(4);
        assert!((p.keep_prob[0] - (0.5 + (1.0 / 16.0) * (q - 0.5))).abs() < 1e-12);
        assert!((p.keep_prob[1] - (0.5 + (4.0 / 16.0) * (q - 0.5))).abs() < 1e-12);
        assert_eq!(&p.keep_prob[2..], &[0.5, 0.5]);
        // Laplace budget split eps_l U_j / sum_topK U: 2C / (2 * 1/5) = 50 and 2C / (2 * 4/5) = 12.5
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
        // outside the top-K: kept or not, max(0, 0 + 0) with no noise
        assert_eq!((v[2], v[3]), (0.0, 0.0));
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
        assert_eq!((gz[2], gz[3]), (0.0, 0.0));
    }

    #[test]
    fn backward_keeps_sign_clips_and_noises_every_kept_unit() {
        let c = R3eluConfig {
            eps: 8.0,
            grad_clip: 0.5,
            budget: Budget::Uniform,
            ..Default::default()
        };
        let r = R3elu::new(c).unwrap();
        let delta = [-2.0f32, 0.1, 1.0, -0.01]; // K = 2: units 0 and 2 (|delta| largest)
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let (mut dev, mut kept0, mut zero1) = (Vec::new(), 0, 0);
        let trials = 20_000;
        for _ in 0..trials {
            let out = r.perturb_gradient(&delta, 4, &mut rng);
            // unit 1 is outside the top-K: dropped (exactly 0) with 1/2, else pure noise
            zero1 += (out[1] == 0.0) as usize;
            if out[0] != 0.0 {
                kept0 += 1;
                dev.push((out[0] + 0.5) as f64); // sign(-2) * min(2, 0.5) = -0.5
            }
        }
        assert!(close_rate(zero1, trials, 0.5), "{zero1}");
        // both top units are clipped to 0.5 = max, so p = q
        assert!(close_rate(kept0, trials, c.q(4)));
        let b = 2.0 * 2.0 * 0.5 / 4.0; // 2 K C_g / eps_l
        assert_eq!(c.backward_scale(4), b);
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
                eps: -1.0,
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
            let e = R3elu::new(bad).unwrap_err().to_string();
            assert!(e.starts_with("config:"), "{e}");
        }
        assert!("nope".parse::<Budget>().is_err());
    }
}
