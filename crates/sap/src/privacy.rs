//! Token-level privatization of the customer's cut-layer output.
//!
//! - d_chi-privacy (SAP eq. for the mechanism): `x~ = x + n`, `p(n) ∝ exp(-eta ||n||_2)`;
//!   sampled as a direction uniform on the unit sphere times a radius `r ~ Gamma(d, 1/eta)`
//!   (shape `d`, scale `1/eta`), so `E||n|| = d / eta`.
//! - Gaussian baseline: `n ~ N(0, sigma^2 I)` with `sigma = sqrt(d) / eta`, the same expected
//!   noise norm as d_chi at the same `eta`.
//! - Contributing-token identification (CTI): per-token budgets from class-discrimination
//!   statistics computed by the customer on its own training data,
//!   `UI(c,t) = sum_{k != c} ln( p(t|c) / (p(t|k) + 3 xi) )`, `xi = 1 / max_c N_c`
//!   (`N_c` = tokens in class c), `UI_t = max_c UI(c,t)`, and
//!   two budgets side by side:
//!   - `dchi-cti` (the notes' second reading): `eta_t = eta_0 * clamp(2 sigmoid(UI_t), floor,
//!     2)`: task-relevant tokens get up to twice the budget (less noise), rare /
//!     non-discriminative ones less; a token unseen in training gets the floor (0.1: 10x the
//!     noise);
//!   - `dchi-cti-max` (the notes' first reading): `eta_t = max(UI_t, 0.6) * eta_0`, no upper
//!     bound; an unseen or non-discriminative token gets `0.6 eta_0` (1.67x the noise).
use crate::error::{Result, SapError};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma, StandardNormal};

/// What the customer does to its outputs before they leave (and the centralized baseline).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Privacy {
    /// Split, no noise.
    None,
    /// Split, uniform d_chi noise.
    Dchi,
    /// Split, d_chi noise with CTI per-token budgets `eta_0 clamp(2 sigmoid(UI), floor, 2)`.
    DchiCti,
    /// Split, d_chi noise with CTI per-token budgets `max(UI, 0.6) eta_0`.
    DchiCtiMax,
    /// Split, isotropic Gaussian noise (same expected norm as d_chi).
    Gaussian,
    /// No split: the customer fine-tunes everything itself (LoRA on all blocks, no wire).
    Centralized,
}

impl Privacy {
    pub fn name(self) -> &'static str {
        match self {
            Privacy::None => "none",
            Privacy::Dchi => "dchi",
            Privacy::DchiCti => "dchi-cti",
            Privacy::DchiCtiMax => "dchi-cti-max",
            Privacy::Gaussian => "gaussian",
            Privacy::Centralized => "centralized",
        }
    }
    pub fn noisy(self) -> bool {
        matches!(
            self,
            Privacy::Dchi | Privacy::DchiCti | Privacy::DchiCtiMax | Privacy::Gaussian
        )
    }
    /// Whether the budget is per token (needs CTI statistics).
    pub fn cti(self) -> bool {
        matches!(self, Privacy::DchiCti | Privacy::DchiCtiMax)
    }
}

/// One sample of d_chi noise in `d` dimensions with budget `eta`.
pub fn sample_dchi(d: usize, eta: f64, rng: &mut ChaCha8Rng, out: &mut [f32]) -> Result<()> {
    if !(eta > 0.0 && eta.is_finite()) {
        return Err(SapError::Config(format!("eta must be > 0, got {eta}")));
    }
    let gamma = Gamma::new(d as f64, 1.0 / eta)
        .map_err(|e| SapError::Config(format!("gamma({d}, 1/{eta}): {e}")))?;
    let mut norm2 = 0.0f64;
    for o in out.iter_mut().take(d) {
        let z: f64 = StandardNormal.sample(rng);
        *o = z as f32;
        norm2 += z * z;
    }
    let r = gamma.sample(rng);
    let s = (r / norm2.sqrt().max(1e-30)) as f32;
    for o in out.iter_mut().take(d) {
        *o *= s;
    }
    Ok(())
}

/// Per-token CTI statistics (`UI_t`, indexed by token id).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Cti {
    pub ui: Vec<f32>,
    pub floor: f64,
}

impl Cti {
    /// Computes `UI_t` from the customer's tokenised training texts and labels.
    pub fn fit(
        seqs: &[Vec<u32>],
        labels: &[usize],
        classes: usize,
        vocab: usize,
        floor: f64,
    ) -> Result<Self> {
        if seqs.len() != labels.len() || classes < 2 {
            return Err(SapError::Config(format!(
                "CTI needs one label per text and >= 2 classes ({} texts, {} labels, {classes} classes)",
                seqs.len(),
                labels.len()
            )));
        }
        let mut counts = vec![vec![0u32; vocab]; classes];
        let mut totals = vec![0u64; classes];
        for (s, &l) in seqs.iter().zip(labels) {
            if l >= classes {
                return Err(SapError::Data(format!("label {l} >= {classes} classes")));
            }
            for &t in s {
                let t = t as usize;
                if t < vocab {
                    counts[l][t] += 1;
                    totals[l] += 1;
                }
            }
        }
        let xi = 1.0 / (*totals.iter().max().unwrap_or(&1)).max(1) as f64;
        let ui = (0..vocab)
            .map(|t| {
                let p: Vec<f64> = (0..classes)
                    .map(|c| counts[c][t] as f64 / totals[c].max(1) as f64)
                    .collect();
                let mut best = f64::NEG_INFINITY;
                for c in 0..classes {
                    let mut s = 0.0;
                    for k in 0..classes {
                        if k != c {
                            s += (p[c] / (p[k] + 3.0 * xi)).ln();
                        }
                    }
                    best = best.max(s);
                }
                best.max(-1e4) as f32
            })
            .collect();
        Ok(Cti { ui, floor })
    }

    fn ui_of(&self, t: u32) -> f64 {
        self.ui.get(t as usize).copied().unwrap_or(-1e4) as f64
    }

    /// `eta_t / eta_0 = clamp(2 sigmoid(UI_t), floor, 2)` (`dchi-cti`).
    pub fn factor(&self, t: u32) -> f64 {
        (2.0 / (1.0 + (-self.ui_of(t)).exp())).clamp(self.floor, 2.0)
    }

    /// `eta_t / eta_0 = max(UI_t, 0.6)` (`dchi-cti-max`).
    pub fn factor_max(&self, t: u32) -> f64 {
        self.ui_of(t).max(0.6)
    }
}

/// The customer's privatizer: applies the mechanism to rows of a `[n, d]` matrix whose rows are
/// the tokens `ids`.
#[derive(Debug, Clone)]
pub struct Privatizer {
    pub privacy: Privacy,
    pub eta: f64,
    pub cti: Option<Cti>,
}

impl Privatizer {
    pub fn new(privacy: Privacy, eta: f64, cti: Option<Cti>) -> Result<Self> {
        if privacy.noisy() && !(eta > 0.0 && eta.is_finite()) {
            return Err(SapError::Config(format!("--eta must be > 0, got {eta}")));
        }
        if privacy.cti() && cti.is_none() {
            return Err(SapError::Config(format!(
                "{} needs CTI statistics",
                privacy.name()
            )));
        }
        Ok(Privatizer { privacy, eta, cti })
    }

    /// Budget of token `t`.
    pub fn eta_of(&self, t: u32) -> f64 {
        match (&self.cti, self.privacy) {
            (Some(c), Privacy::DchiCti) => self.eta * c.factor(t),
            (Some(c), Privacy::DchiCtiMax) => self.eta * c.factor_max(t),
            _ => self.eta,
        }
    }

    /// Adds noise in place; `rows.len() == ids.len() * d`.
    pub fn apply(
        &self,
        rows: &mut [f32],
        ids: &[u32],
        d: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<()> {
        if rows.len() != ids.len() * d {
            return Err(SapError::Config(format!(
                "privatize: {} values for {} tokens of width {d}",
                rows.len(),
                ids.len()
            )));
        }
        if !self.privacy.noisy() {
            return Ok(());
        }
        let mut n = vec![0f32; d];
        for (row, &t) in rows.chunks_mut(d).zip(ids) {
            match self.privacy {
                Privacy::Gaussian => {
                    let sigma = (d as f64).sqrt() / self.eta;
                    for x in row.iter_mut() {
                        let z: f64 = StandardNormal.sample(rng);
                        *x += (sigma * z) as f32;
                    }
                }
                _ => {
                    sample_dchi(d, self.eta_of(t), rng, &mut n)?;
                    for (x, v) in row.iter_mut().zip(&n) {
                        *x += v;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Radius is Gamma(d, 1/eta): mean d/eta, variance d/eta^2; direction is uniform (the mean
    /// of many unit directions is near 0 and each coordinate has second moment 1/d).
    #[test]
    fn dchi_radius_and_direction() {
        let (d, eta, n) = (64usize, 20.0, 4000usize);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut v = vec![0f32; d];
        let mut radii = Vec::new();
        let mut mean_dir = vec![0f64; d];
        let mut m2 = 0.0;
        for _ in 0..n {
            sample_dchi(d, eta, &mut rng, &mut v).unwrap();
            let r = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            radii.push(r);
            for (m, x) in mean_dir.iter_mut().zip(&v) {
                *m += *x as f64 / r;
            }
            m2 += (v[0] as f64 / r).powi(2);
        }
        let mean = radii.iter().sum::<f64>() / n as f64;
        let var = radii.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n as f64;
        let (em, ev) = (d as f64 / eta, d as f64 / (eta * eta));
        // standard error of the mean is sqrt(ev/n) = 0.006; allow 5 se
        assert!(
            (mean - em).abs() < 5.0 * (ev / n as f64).sqrt(),
            "mean {mean} vs {em}"
        );
        assert!((var / ev - 1.0).abs() < 0.15, "var {var} vs {ev}");
        let md = mean_dir
            .iter()
            .map(|m| (m / n as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        // |mean of n uniform unit vectors| ~ 1/sqrt(n) = 0.016
        assert!(md < 0.05, "mean direction norm {md}");
        let m2 = m2 / n as f64;
        assert!(
            (m2 * d as f64 - 1.0).abs() < 0.15,
            "E[u_0^2] * d = {}",
            m2 * d as f64
        );
    }

    #[test]
    fn gaussian_matches_dchi_expected_norm() {
        let (d, eta) = (128usize, 50.0);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let p = Privatizer::new(Privacy::Gaussian, eta, None).unwrap();
        let mut rows = vec![0f32; d * 500];
        p.apply(&mut rows, &vec![5; 500], d, &mut rng).unwrap();
        let mean = rows
            .chunks(d)
            .map(|r| r.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt())
            .sum::<f64>()
            / 500.0;
        assert!((mean / (d as f64 / eta) - 1.0).abs() < 0.03, "{mean}");
        assert!(Privatizer::new(Privacy::Dchi, 0.0, None).is_err());
        assert!(Privatizer::new(Privacy::DchiCti, 1.0, None).is_err());
    }

    /// A token that only occurs in one class gets the largest budget; one spread evenly gets
    /// about eta_0; an unseen one gets the floor. Noise scales accordingly.
    #[test]
    fn cti_budgets_follow_class_discrimination() {
        let mut seqs = Vec::new();
        let mut labels = Vec::new();
        for i in 0..200 {
            let c = i % 2;
            // token 10: only class 0; token 11: both classes; tokens 20..: filler
            // same number of tokens in both classes
            let mut s = vec![11u32, 20 + (i % 7) as u32];
            s.push(if c == 0 { 10 } else { 20 + (i % 5) as u32 });
            seqs.push(s);
            labels.push(c);
        }
        let cti = Cti::fit(&seqs, &labels, 2, 50, 0.1).unwrap();
        assert!(cti.factor(10) > 1.9, "{}", cti.factor(10));
        assert!((cti.factor(11) - 1.0).abs() < 0.05, "{}", cti.factor(11));
        assert!((cti.factor(40) - 0.1).abs() < 1e-9, "{}", cti.factor(40));
        // the max(UI, 0.6) budget: unseen and even tokens get 0.6, the one-class token its UI
        assert_eq!(cti.factor_max(40), 0.6);
        assert_eq!(cti.factor_max(11), 0.6);
        assert!(cti.factor_max(10) > 2.0, "{}", cti.factor_max(10));
        let p = Privatizer::new(Privacy::DchiCti, 10.0, Some(cti)).unwrap();
        let d = 32;
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let norm_of = |t: u32, rng: &mut ChaCha8Rng| {
            let mut r = vec![0f32; d * 300];
            p.apply(&mut r, &vec![t; 300], d, rng).unwrap();
            r.chunks(d)
                .map(|r| r.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt())
                .sum::<f64>()
                / 300.0
        };
        let (a, b) = (norm_of(10, &mut rng), norm_of(40, &mut rng));
        // expected norms d/(2 eta) = 1.6 and d/(0.1 eta) = 32
        assert!((a - 1.6).abs() < 0.15 && (b - 32.0).abs() < 2.0, "{a} {b}");
    }

    #[test]
    fn eta_must_be_positive_and_finite() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut v = vec![0f32; 8];
        for eta in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let e = sample_dchi(8, eta, &mut rng, &mut v)
                .unwrap_err()
                .to_string();
            assert!(e.contains("eta must be > 0"), "{e}");
            for p in [Privacy::Dchi, Privacy::Gaussian] {
                let e = Privatizer::new(p, eta, None).unwrap_err().to_string();
                assert!(e.contains("--eta must be > 0"), "{e}");
            }
        }
        // no noise, no budget: eta is not read
        assert!(Privatizer::new(Privacy::None, 0.0, None).is_ok());
        // CTI without its statistics
        let e = Privatizer::new(Privacy::DchiCtiMax, 10.0, None).unwrap_err();
        assert!(e.to_string().contains("needs CTI statistics"), "{e}");
    }
}
