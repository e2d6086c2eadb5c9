//! Small dense linear algebra for key generation (nalgebra, f64) and conversion to candle tensors.
use crate::error::{AloeError, Result};
use candle_core::{DType, Device, Tensor};
use nalgebra::DMatrix;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// `rows x cols` with i.i.d. `N(0, std^2)` entries.
pub fn gaussian<R: Rng>(rng: &mut R, rows: usize, cols: usize, std: f64) -> DMatrix<f64> {
    DMatrix::from_fn(rows, cols, |_, _| {
        let z: f64 = StandardNormal.sample(rng);
        z * std
    })
}

/// A Haar-uniform orthogonal `n x n` matrix (QR of a Gaussian with the sign fix).
pub fn haar_orthogonal<R: Rng>(rng: &mut R, n: usize) -> DMatrix<f64> {
    if n == 0 {
        return DMatrix::zeros(0, 0);
    }
    let g = gaussian(rng, n, n, 1.0);
    let qr = g.qr();
    let mut q = qr.q();
    let r = qr.r();
    for j in 0..n {
        if r[(j, j)] < 0.0 {
            q.column_mut(j).neg_mut();
        }
    }
    q
}

/// Inverse of a square matrix, with a clear error when it is singular.
pub fn inverse(m: &DMatrix<f64>) -> Result<DMatrix<f64>> {
    m.clone().try_inverse().ok_or_else(|| {
        AloeError::Linalg(format!(
            "{}x{} key matrix is singular",
            m.nrows(),
            m.ncols()
        ))
    })
}

/// `k` columns spanning (generically) the orthogonal complement of the column space of `a`
/// (`n x r`, rank r): `(I - A (A^T A)^-1 A^T) G` for a Gaussian `G` (`n x k`), orthonormalised.
pub fn complement_basis<R: Rng>(rng: &mut R, a: &DMatrix<f64>, k: usize) -> Result<DMatrix<f64>> {
    let n = a.nrows();
    let ata_inv = inverse(&(a.transpose() * a))?;
    let proj = DMatrix::<f64>::identity(n, n) - a * ata_inv * a.transpose();
    let g = gaussian(rng, n, k, 1.0);
    Ok((proj * g).qr().q())
}

/// A uniformly random permutation of `0..n` as a vector `p` (new position -> old index).
pub fn permutation<R: Rng>(rng: &mut R, n: usize) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.random_range(0..=i);
        p.swap(i, j);
    }
    p
}

/// Inverse of a permutation vector.
pub fn invert_permutation(p: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; p.len()];
    for (i, &j) in p.iter().enumerate() {
        inv[j] = i;
    }
    inv
}

/// `a b` through candle's multithreaded f64 GEMM (nalgebra's product is single-threaded and
/// dominates key generation at `d' = 832`).
pub fn matmul(a: &DMatrix<f64>, b: &DMatrix<f64>) -> DMatrix<f64> {
    let dev = Device::Cpu;
    let ta = Tensor::from_vec(a.transpose().as_slice().to_vec(), a.shape(), &dev);
    let tb = Tensor::from_vec(b.transpose().as_slice().to_vec(), b.shape(), &dev);
    match (ta, tb) {
        (Ok(ta), Ok(tb)) => match ta
            .matmul(&tb)
            .and_then(|c| c.flatten_all()?.to_vec1::<f64>())
        {
            Ok(v) => DMatrix::from_row_slice(a.nrows(), b.ncols(), &v),
            Err(_) => a * b,
        },
        _ => a * b,
    }
}

/// Row-major F64 candle tensor from an f64 nalgebra matrix (transforms run in f64 so that exact
/// mode loses nothing but the final rounding to F32).
pub fn to_tensor(m: &DMatrix<f64>, device: &Device) -> Result<Tensor> {
    let (r, c) = m.shape();
    let data: Vec<f64> = m.transpose().iter().copied().collect();
    Ok(Tensor::from_vec(data, (r, c), device)?)
}

/// f64 nalgebra matrix from a 2-D candle tensor.
pub fn from_tensor(t: &Tensor) -> Result<DMatrix<f64>> {
    let (r, c) = t.dims2()?;
    let data = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(DMatrix::from_row_slice(r, c, &data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn haar_is_orthogonal_and_complement_is_orthogonal_to_a() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let q = haar_orthogonal(&mut rng, 17);
        let err = (q.transpose() * &q - DMatrix::identity(17, 17)).abs().max();
        assert!(err < 1e-12, "{err}");
        let a = gaussian(&mut rng, 10, 4, 1.0);
        let n = complement_basis(&mut rng, &a, 6).unwrap();
        assert_eq!(n.shape(), (10, 6));
        assert!((n.transpose() * &a).abs().max() < 1e-10);
        // full rank complement
        assert!((n.transpose() * &n - DMatrix::identity(6, 6)).abs().max() < 1e-10);
    }

    #[test]
    fn permutation_round_trip_and_tensor_conversion() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let p = permutation(&mut rng, 50);
        let inv = invert_permutation(&p);
        for i in 0..50 {
            assert_eq!(inv[p[i]], i);
        }
        let m = gaussian(&mut rng, 3, 5, 1.0);
        let t = to_tensor(&m, &Device::Cpu).unwrap();
        let back = from_tensor(&t).unwrap();
        assert!((back - m).abs().max() < 1e-6);
    }

    #[test]
    fn singular_inverse_is_an_error() {
        assert!(inverse(&DMatrix::zeros(3, 3)).is_err());
    }
}
