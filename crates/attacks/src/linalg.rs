//! Chunked dense kernels on CPU candle tensors (F32): row signatures of large products, k-nearest
//! neighbours, bases of column spaces, Procrustes and least-squares fits (nalgebra, F64).
//!
//! Everything that touches a `V x V` matrix (V = 49152 for SmolLM2) works on row chunks of
//! [`CHUNK`] rows so that memory stays at `CHUNK * V * 4` bytes (~200 MB).
use crate::error::{AttackError, Result};
use candle_core::{DType, Device, Tensor};
use nalgebra::DMatrix;

/// Rows of the left operand handled per product chunk.
pub const CHUNK: usize = 1024;

/// Worker threads for the per-row selection work (candle's GEMM is already multithreaded).
fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 16)
}

/// `[rows, cols]` F32 tensor from a row-major vector.
pub fn tensor(data: Vec<f32>, rows: usize, cols: usize) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, (rows, cols), &Device::Cpu)?)
}

/// Row-major F32 copy of a 2-D tensor.
pub fn rows_of(t: &Tensor) -> Result<(Vec<f32>, usize, usize)> {
    let (r, c) = t.dims2()?;
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok((v, r, c))
}

/// Runs `f(row_index, row)` over the rows of a row-major `[n, m]` block on all cores and
/// collects one output per row, in order.
fn par_rows<T: Send>(block: &[f32], m: usize, f: &(dyn Fn(usize, &[f32]) -> T + Sync)) -> Vec<T> {
    let n = block.len() / m.max(1);
    let nt = threads().min(n.max(1));
    let per = n.div_ceil(nt);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..nt)
            .map(|k| {
                let lo = (k * per).min(n);
                let hi = ((k + 1) * per).min(n);
                s.spawn(move || {
                    (lo..hi)
                        .map(|r| f(r, &block[r * m..(r + 1) * m]))
                        .collect::<Vec<T>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("row worker panicked"))
            .collect()
    })
}

/// Sort-based signatures of the rows of `x y^T` (`x`: `[n, d]`, `y`: `[m, d]`): for each row,
/// its `top` largest values (descending) then its `top` smallest (ascending), `[n, 2 top]`.
/// Sorting a row cancels any permutation of the columns of the product (the VMA trick).
pub fn row_signatures(
    x: &Tensor,
    y: &Tensor,
    top: usize,
    progress: &dyn Fn(usize),
) -> Result<Vec<f32>> {
    let (n, _) = x.dims2()?;
    let (m, _) = y.dims2()?;
    if top == 0 || 2 * top > m {
        return Err(AttackError::Input(format!(
            "signature size {top} does not fit product rows of width {m}"
        )));
    }
    let yt = y.t()?.contiguous()?;
    let mut out = Vec::with_capacity(n * 2 * top);
    let mut start = 0;
    while start < n {
        let len = CHUNK.min(n - start);
        let block = x.narrow(0, start, len)?.matmul(&yt)?;
        let (data, _, _) = rows_of(&block)?;
        let sigs = par_rows(&data, m, &|_, row| {
            let mut v = row.to_vec();
            let cmp = |a: &f32, b: &f32| b.total_cmp(a);
            let (_, _, _) = v.select_nth_unstable_by(top - 1, cmp);
            let mut hi = v[..top].to_vec();
            hi.sort_unstable_by(cmp);
            let asc = |a: &f32, b: &f32| a.total_cmp(b);
            let (_, _, _) = v.select_nth_unstable_by(top - 1, asc);
            let mut lo = v[..top].to_vec();
            lo.sort_unstable_by(asc);
            hi.extend(lo);
            hi
        });
        for s in sigs {
            out.extend(s);
        }
        start += len;
        progress(start);
    }
    Ok(out)
}

/// Above this many multiply-adds (`n m c`), [`nearest_k`] shortlists candidates in a random
/// projection first ([`nearest_k_projected`]). SmolLM2 (`V^2 d` = 1.4e12) stays exact; a
/// vocabulary of 151,936 at width 896 or 1536 (2e13-3.5e13) is projected.
pub const PROJECT_ABOVE: f64 = 4e12;
/// Width of the random projection of [`nearest_k_projected`].
pub const PROJECTION_DIM: usize = 96;
/// Candidates per query kept from the projection and re-ranked exactly.
pub const SHORTLIST: usize = 64;

/// The `k` nearest rows of `refs` (`[m, c]`) for every row of `queries` (`[n, c]`) by Euclidean
/// distance, best first, as `(ref_index, distance)`. Exact up to [`PROJECT_ABOVE`]; above it
/// (vocabulary-by-vocabulary searches of a 0.5B/1.5B model) the candidates come from
/// [`nearest_k_projected`].
pub fn nearest_k(
    queries: &Tensor,
    refs: &Tensor,
    k: usize,
    progress: &dyn Fn(usize),
) -> Result<Vec<Vec<(u32, f32)>>> {
    let (n, c) = queries.dims2()?;
    let (m, c2) = refs.dims2()?;
    if c != c2 {
        return Err(AttackError::Input(format!(
            "nearest neighbours between widths {c} and {c2}"
        )));
    }
    if n as f64 * m as f64 * c as f64 > PROJECT_ABOVE && c > 2 * PROJECTION_DIM {
        return nearest_k_projected(queries, refs, k, progress);
    }
    nearest_k_exact(queries, refs, k, progress)
}

/// [`nearest_k`] by a full scan (`n m c` multiply-adds).
pub fn nearest_k_exact(
    queries: &Tensor,
    refs: &Tensor,
    k: usize,
    progress: &dyn Fn(usize),
) -> Result<Vec<Vec<(u32, f32)>>> {
    let (n, c) = queries.dims2()?;
    let (m, c2) = refs.dims2()?;
    if c != c2 {
        return Err(AttackError::Input(format!(
            "nearest neighbours between widths {c} and {c2}"
        )));
    }
    let k = k.min(m);
    let rt = refs.t()?.contiguous()?;
    let rn: Vec<f32> = refs.sqr()?.sum(1)?.to_vec1::<f32>()?;
    let qn: Vec<f32> = queries.sqr()?.sum(1)?.to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(n);
    let mut start = 0;
    while start < n {
        let len = CHUNK.min(n - start);
        let block = queries.narrow(0, start, len)?.matmul(&rt)?;
        let (data, _, _) = rows_of(&block)?;
        let rn = &rn;
        let qn = &qn;
        let res = par_rows(&data, m, &|r, row| {
            let best = smallest_k(row, k, |j, dot| rn[j] - 2.0 * dot);
            let q = qn[start + r];
            best.into_iter()
                .map(|(j, d)| (j, (d + q).max(0.0).sqrt()))
                .collect::<Vec<_>>()
        });
        out.extend(res);
        start += len;
        progress(start);
    }
    Ok(out)
}

/// The `k` smallest `score(j, row[j])` of a row, ascending, as `(j, score)`.
fn smallest_k(row: &[f32], k: usize, score: impl Fn(usize, f32) -> f32) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (j, &x) in row.iter().enumerate() {
        let dist = score(j, x);
        if best.len() < k || dist < best[best.len() - 1].1 {
            let pos = best.partition_point(|b| b.1 <= dist);
            best.insert(pos, (j as u32, dist));
            best.truncate(k);
        }
    }
    best
}

/// Approximate [`nearest_k`] for vocabulary-sized searches: both sides are projected on
/// [`PROJECTION_DIM`] random orthonormal directions (fixed seed; distances shrink by the same
/// factor for every pair), the [`SHORTLIST`] nearest candidates of each query in the projection
/// are kept, and those are re-ranked by their exact distance. Cost `n m PROJECTION_DIM + n
/// SHORTLIST c` instead of `n m c` (16x less at c = 1536). A true neighbour is lost only when
/// more than [`SHORTLIST`] others are closer in the projection; the exact matches the attacks
/// look for (distance ~0) always survive.
pub fn nearest_k_projected(
    queries: &Tensor,
    refs: &Tensor,
    k: usize,
    progress: &dyn Fn(usize),
) -> Result<Vec<Vec<(u32, f32)>>> {
    use rand::SeedableRng;
    let (n, c) = queries.dims2()?;
    let (m, _) = refs.dims2()?;
    let r = PROJECTION_DIM.min(c);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x9e37_79b9);
    let g = DMatrix::<f64>::from_fn(c, r, |_, _| {
        rand_distr::Distribution::<f64>::sample(&rand_distr::StandardNormal, &mut rng)
    });
    let basis = from_dmatrix(&g.qr().q())?; // [c, r], orthonormal columns
    let qp = queries.to_dtype(DType::F32)?.matmul(&basis)?;
    let rp = refs.to_dtype(DType::F32)?.matmul(&basis)?;
    let short = nearest_k_exact(&qp, &rp, SHORTLIST.max(k).min(m), &|i| progress(i / 2))?;
    let (qv, _, _) = rows_of(queries)?;
    let (rv, _, _) = rows_of(refs)?;
    let rv = &rv;
    let lists = par_rows(&qv, c, &|i, q| {
        let mut cands: Vec<(u32, f32)> = short[i]
            .iter()
            .map(|&(j, _)| {
                let row = &rv[j as usize * c..(j as usize + 1) * c];
                let d: f32 = q.iter().zip(row).map(|(a, b)| (a - b) * (a - b)).sum();
                (j, d.sqrt())
            })
            .collect();
        cands.sort_by(|a, b| a.1.total_cmp(&b.1));
        cands.truncate(k);
        cands
    });
    progress(n);
    Ok(lists)
}

/// Indices of the `k` largest values, descending (ties: smaller index first).
pub fn top_k_indices(values: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    idx.sort_by(|&a, &b| {
        values[b as usize]
            .total_cmp(&values[a as usize])
            .then(a.cmp(&b))
    });
    idx.truncate(k);
    idx
}

/// Rows `ids` of `x`.
pub fn select_rows(x: &Tensor, ids: &[u32]) -> Result<Tensor> {
    let idx = Tensor::from_slice(ids, ids.len(), x.device())?;
    Ok(x.index_select(&idx, 0)?)
}

/// F64 nalgebra copy of a 2-D tensor.
pub fn to_dmatrix(t: &Tensor) -> Result<DMatrix<f64>> {
    let (r, c) = t.dims2()?;
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(DMatrix::from_row_slice(r, c, &v))
}

/// F32 tensor from an nalgebra matrix.
pub fn from_dmatrix(m: &DMatrix<f64>) -> Result<Tensor> {
    let (r, c) = m.shape();
    let v: Vec<f32> = m.transpose().iter().map(|&x| x as f32).collect();
    tensor(v, r, c)
}

/// An orthonormal basis `U` (`[n, rank]`) of the column space of `a` (`[n, w]`, `w` small):
/// `U = A W_r L_r^{-1/2}` from the top-`rank` eigenpairs `(L, W)` of the Gram matrix `A^T A`.
/// Any injective right factor `A K` (`K`: `w x w'` of rank `w`) leaves the column space, hence
/// the hat matrix `U U^T = A (A^T A)^+ A^T`, unchanged.
pub fn column_basis(a: &Tensor, rank: usize) -> Result<Tensor> {
    let (_, w) = a.dims2()?;
    if rank == 0 || rank > w {
        return Err(AttackError::Input(format!(
            "basis rank {rank} out of range for width {w}"
        )));
    }
    let a64 = a.to_dtype(DType::F64)?;
    let gram = to_dmatrix(&a64.t()?.matmul(&a64)?)?;
    let eig = nalgebra::SymmetricEigen::new(gram);
    let mut order: Vec<usize> = (0..w).collect();
    order.sort_by(|&i, &j| eig.eigenvalues[j].total_cmp(&eig.eigenvalues[i]));
    let mut proj = DMatrix::<f64>::zeros(w, rank);
    for (c, &i) in order.iter().take(rank).enumerate() {
        let l = eig.eigenvalues[i];
        if l <= 0.0 {
            return Err(AttackError::Input(format!(
                "matrix has rank below {rank} (eigenvalue {l:e})"
            )));
        }
        let s = 1.0 / l.sqrt();
        for r in 0..w {
            proj[(r, c)] = eig.eigenvectors[(r, i)] * s;
        }
    }
    Ok(a.to_dtype(DType::F32)?.matmul(&from_dmatrix(&proj)?)?)
}

/// Orthogonal Procrustes: the orthogonal `O` minimising `||X O - Y||_F` (`X`, `Y`: `[n, d]`).
pub fn procrustes(x: &DMatrix<f64>, y: &DMatrix<f64>) -> Result<DMatrix<f64>> {
    let m = x.transpose() * y;
    let svd = m.svd(true, true);
    match (svd.u, svd.v_t) {
        (Some(u), Some(vt)) => Ok(u * vt),
        _ => Err(AttackError::Input("Procrustes SVD failed".into())),
    }
}

/// Ridge least squares: `M = (X^T X + r I)^-1 X^T Y`.
pub fn ridge(x: &DMatrix<f64>, y: &DMatrix<f64>, r: f64) -> Result<DMatrix<f64>> {
    let d = x.ncols();
    let a = x.transpose() * x + DMatrix::<f64>::identity(d, d) * r;
    let b = x.transpose() * y;
    a.cholesky()
        .map(|c| c.solve(&b))
        .ok_or_else(|| AttackError::Input("ridge system is not positive definite".into()))
}

/// Rows `ids` of an nalgebra matrix.
pub fn dm_rows(x: &DMatrix<f64>, ids: &[usize]) -> DMatrix<f64> {
    DMatrix::from_fn(ids.len(), x.ncols(), |r, c| x[(ids[r], c)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rand_t(rng: &mut rand_chacha::ChaCha8Rng, r: usize, c: usize) -> Tensor {
        let v: Vec<f32> = (0..r * c).map(|_| rng.random_range(-1.0..1.0)).collect();
        tensor(v, r, c).unwrap()
    }

    #[test]
    fn signatures_ignore_column_permutations_and_nn_finds_itself() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let x = rand_t(&mut rng, 50, 8);
        let y = rand_t(&mut rng, 40, 8);
        let perm: Vec<u32> = (0..40u32).rev().collect();
        let yp = select_rows(&y, &perm).unwrap();
        let a = row_signatures(&x, &y, 5, &|_| {}).unwrap();
        let b = row_signatures(&x, &yp, 5, &|_| {}).unwrap();
        assert_eq!(a.len(), 50 * 10);
        let diff = a
            .iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "{diff}");
        // descending top half
        assert!(a[0] >= a[1] && a[5] <= a[6]);
        let nn = nearest_k(&x, &x, 3, &|_| {}).unwrap();
        for (i, c) in nn.iter().enumerate() {
            assert_eq!(c[0].0, i as u32);
            assert!(c[0].1 < 1e-2 && c[1].1 >= c[0].1);
        }
    }

    #[test]
    fn column_basis_is_key_invariant_and_procrustes_recovers_rotations() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let a = rand_t(&mut rng, 60, 6);
        let k = rand_t(&mut rng, 6, 9); // injective right factor (rank 6)
        let u = column_basis(&a, 6).unwrap();
        let uk = column_basis(&a.matmul(&k).unwrap(), 6).unwrap();
        let h = u.matmul(&u.t().unwrap()).unwrap();
        let hk = uk.matmul(&uk.t().unwrap()).unwrap();
        let diff = umbra_model::testing::max_abs_diff(&h, &hk);
        assert!(diff < 1e-3, "{diff}");
        let x = to_dmatrix(&u).unwrap();
        let y = to_dmatrix(&uk).unwrap();
        let o = procrustes(&x, &y).unwrap();
        assert!((x * o - &y).abs().max() < 1e-3);
        let m = ridge(&to_dmatrix(&uk).unwrap(), &to_dmatrix(&u).unwrap(), 1e-9).unwrap();
        assert!(
            (to_dmatrix(&uk).unwrap() * m - to_dmatrix(&u).unwrap())
                .abs()
                .max()
                < 1e-3
        );
    }
}
