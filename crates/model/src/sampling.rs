//! Next-token selection: greedy, or temperature -> top-k -> top-p (nucleus) -> sample, with a
//! seeded ChaCha8 generator so a seed reproduces a sequence exactly.
use crate::error::{ModelError, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How to pick a token from logits.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// `0` = greedy (argmax, ties to the lowest id); otherwise logits are divided by it. `>= 0`.
    pub temperature: f32,
    /// Keep the `k` most likely tokens (ties to lower ids). `k >= 1`.
    pub top_k: Option<usize>,
    /// Keep the smallest most-likely set whose probability is `>= p`. `p` in `(0, 1]`.
    pub top_p: Option<f32>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }

    /// Plain sampling at `temperature` with `seed`.
    pub fn with_temperature(temperature: f32, seed: u64) -> Self {
        Self {
            temperature,
            top_k: None,
            top_p: None,
            seed,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(ModelError::Input(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if self.top_k == Some(0) {
            return Err(ModelError::Input(
                "top_k must be >= 1 (use None to disable)".into(),
            ));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ModelError::Input(format!(
                    "top_p must be in (0, 1], got {p}"
                )));
            }
        }
        Ok(())
    }
}

/// A seeded sampler; one per sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Scratch `(id, logit or weight)` reused across calls.
    cand: Vec<(u32, f32)>,
}

impl Sampler {
    /// Validates `params` and seeds the generator with `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Ok(Self {
            params,
            rng,
            cand: Vec::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks a token id from `logits` (`[V]`). NaN logits are treated as `-inf`; an empty slice
    /// yields 0.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if logits.is_empty() {
            return 0;
        }
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let clean = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
        // Descending logit, ties to lower id.
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        self.cand.clear();
        self.cand.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &x)| (i as u32, clean(x))),
        );
        if let Some(k) = self.params.top_k {
            if k < self.cand.len() {
                self.cand.select_nth_unstable_by(k - 1, order);
                self.cand.truncate(k);
            }
        }
        let need_sorted = self.params.top_p.is_some_and(|p| p < 1.0);
        if need_sorted {
            self.cand.sort_unstable_by(order);
        }
        let max = self
            .cand
            .iter()
            .map(|c| c.1)
            .fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            // Nothing has positive probability; fall back to the lowest surviving id.
            return self.cand.iter().map(|c| c.0).min().unwrap_or(0);
        }
        let inv_t = 1.0 / self.params.temperature as f64;
        let mut total = 0.0f64;
        for c in self.cand.iter_mut() {
            let w = ((c.1 - max) as f64 * inv_t).exp();
            c.1 = w as f32;
            total += w;
        }
        if let (true, Some(p)) = (need_sorted, self.params.top_p) {
            let target = p as f64 * total;
            let mut cum = 0.0f64;
            let mut keep = self.cand.len();
            for (i, c) in self.cand.iter().enumerate() {
                cum += c.1 as f64;
                if cum >= target {
                    keep = i + 1;
                    break;
                }
            }
            self.cand.truncate(keep);
            total = self.cand.iter().map(|c| c.1 as f64).sum();
        }
        let u = self.rng.random::<f64>() * total;
        let mut cum = 0.0f64;
        for c in &self.cand {
            cum += c.1 as f64;
            if u < cum {
                return c.0;
            }
        }
        // Rounding left `u` at the top: the last candidate with non-zero weight.
        self.cand
            .iter()
            .rev()
            .find(|c| c.1 > 0.0)
            .map(|c| c.0)
            .unwrap_or(self.cand[0].0)
    }
}

/// Index of the largest value, ties to the lowest index; NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    let mut found = false;
    for (i, &x) in logits.iter().enumerate() {
        if !x.is_nan() && (!found || x > best_v) {
            best = i;
            best_v = x;
            found = true;
        }
    }
    best as u32
}
