//! Closed-form ridge regression, and the ridge inverter built on it: a linear map from
//! privatized cut-layer rows to embedding-layer rows, then nearest-neighbour decoding.
use super::nn::nn_decode_table;
use crate::encoder::Encoder;
use crate::error::{Result, SapError};
use candle_core::{Device, Tensor};

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
pub fn with_bias(x: &[f32], d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len() / d * (d + 1));
    for r in x.chunks(d) {
        out.extend_from_slice(r);
        out.push(1.0);
    }
    out
}

/// A fitted ridge inverter: `x~ (+1) -> E_i(token)`, then nearest neighbour against the
/// embedding layer at the row's position.
pub struct RidgeInverter {
    w: Tensor, // [d + 1, d]
    d: usize,
}

impl RidgeInverter {
    /// `x`: privatized public rows `[n, d]`, `target`: clean embedding-layer rows `[n, d]`.
    pub fn fit(x: &[f32], target: &[f32], d: usize, lambda: f64) -> Result<Self> {
        let n = x.len() / d;
        let xb = with_bias(x, d);
        let w = ridge(&xb, target, n, d + 1, d, lambda)?;
        Ok(RidgeInverter {
            w: Tensor::from_vec(w, (d + 1, d), &Device::Cpu)?,
            d,
        })
    }
    pub fn map(&self, rows: &[f32]) -> Result<Vec<f32>> {
        let n = rows.len() / self.d;
        let xb = Tensor::from_vec(with_bias(rows, self.d), (n, self.d + 1), &Device::Cpu)?;
        Ok(xb.matmul(&self.w)?.flatten_all()?.to_vec1()?)
    }

    /// Token ids of `rows` at `positions`.
    pub fn decode(&self, enc: &Encoder, rows: &[f32], positions: &[usize]) -> Result<Vec<u32>> {
        nn_decode_table(enc, &self.map(rows)?, positions)
    }
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
}
