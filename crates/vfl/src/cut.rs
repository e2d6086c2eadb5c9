//! The cut layer between the passive party's bottom model and what it publishes.
//!
//! A [`CutLayer`] sees the embedding `z_p = f_p(x_p)` (`[B, emb]`, with its autograd graph) and
//! returns the tensor that is published; the passive party back-propagates the peer's gradient
//! through that returned tensor, so any differentiable transform (clipping, R3eLU's randomised
//! response, ...) gets its exact backward for free. `backward` may additionally transform the
//! gradient that arrives from the peer before it is back-propagated (e.g. noise on the gradient).
use crate::dp;
use crate::error::Result;
use candle_core::Tensor;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

pub trait CutLayer: Send + Sync {
    fn name(&self) -> String;
    /// `z: [B, emb]` -> published `[B, emb]`, differentiable in `z`.
    fn forward(&self, z: &Tensor, rng: &mut ChaCha8Rng) -> Result<Tensor>;
    /// Gradient w.r.t. the published tensor -> gradient to back-propagate (default: as is).
    fn backward(&self, grad: &Tensor, _rng: &mut ChaCha8Rng) -> Result<Tensor> {
        Ok(grad.clone())
    }
    /// Privacy spent after `steps` steps of batch `batch` over `n` records, if this layer is a
    /// privacy mechanism.
    fn privacy(
        &self,
        _batch: usize,
        _n: usize,
        _steps: usize,
        _epochs: usize,
    ) -> Option<dp::Spent> {
        None
    }
}

/// Publishes the embedding as is.
#[derive(Debug, Clone, Copy, Default)]
pub struct Identity;

impl CutLayer for Identity {
    fn name(&self) -> String {
        "identity".into()
    }
    fn forward(&self, z: &Tensor, _rng: &mut ChaCha8Rng) -> Result<Tensor> {
        Ok(z.clone())
    }
}

/// Gaussian mechanism on embeddings: each row is clipped to L2 norm `clip` (differentiably),
/// then `N(0, (sigma * clip)^2 I)` is added. One release of a record's row is `(1/sigma)`-GDP.
#[derive(Debug, Clone, Copy)]
pub struct GaussianDp {
    pub clip: f64,
    pub sigma: f64,
}

impl CutLayer for GaussianDp {
    fn name(&self) -> String {
        format!("gaussian-dp(clip={}, sigma={:.4})", self.clip, self.sigma)
    }
    fn forward(&self, z: &Tensor, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        let norms = z.sqr()?.sum_keepdim(1)?.sqrt()?;
        // scale = clip / max(norm, clip)  (<= 1)
        let scale = (norms.maximum(self.clip)?.recip()? * self.clip)?;
        let clipped = z.broadcast_mul(&scale)?;
        if self.sigma <= 0.0 {
            return Ok(clipped);
        }
        let std = (self.sigma * self.clip) as f32;
        let n = z.elem_count();
        let noise: Vec<f32> = (0..n)
            .map(|_| {
                let v: f32 = StandardNormal.sample(rng);
                v * std
            })
            .collect();
        let noise = Tensor::from_vec(noise, z.dims(), z.device())?;
        Ok((clipped + noise)?)
    }
    fn privacy(&self, batch: usize, n: usize, steps: usize, epochs: usize) -> Option<dp::Spent> {
        Some(dp::Spent {
            sigma: self.sigma,
            mu_clt: dp::mu_clt(batch as f64 / n as f64, steps, self.sigma),
            mu_composition: dp::mu_composition(epochs, self.sigma),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::SeedableRng;

    #[test]
    fn clipping_bounds_rows_and_is_differentiable() {
        let z = Var::from_tensor(
            &Tensor::from_vec(vec![3.0f32, 4.0, 0.3, 0.4], (2, 2), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let cut = GaussianDp {
            clip: 1.0,
            sigma: 0.0,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let out = cut.forward(z.as_tensor(), &mut rng).unwrap();
        let v: Vec<Vec<f32>> = out.to_vec2().unwrap();
        assert!((v[0][0] - 0.6).abs() < 1e-6 && (v[0][1] - 0.8).abs() < 1e-6);
        assert!((v[1][0] - 0.3).abs() < 1e-6, "small rows untouched");
        let g = out.sum_all().unwrap().backward().unwrap();
        assert!(g.get(z.as_tensor()).is_some());
    }

    #[test]
    fn noise_has_the_right_scale() {
        let z = Tensor::zeros((200, 50), candle_core::DType::F32, &Device::Cpu).unwrap();
        let cut = GaussianDp {
            clip: 2.0,
            sigma: 0.5,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let out: Vec<f32> = cut
            .forward(&z, &mut rng)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let var = out.iter().map(|v| (v * v) as f64).sum::<f64>() / out.len() as f64;
        assert!((var.sqrt() - 1.0).abs() < 0.05, "std {}", var.sqrt());
    }
}
