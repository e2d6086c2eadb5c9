//! `y = x W^T` with `W` quantized: `x` `[m, k]` f32, `W` stacked from row segments of possibly
//! different block types (a fused q|k|v map whose v rows use another type, say), `y` `[m, n]`.
//!
//! The activations are quantized once per call to each 8-bit format the segments need
//! ([`super::qact`]); the weight rows are split across the pool's threads
//! ([`super::pool::parallel_for`]) in ranges of [`GRAIN`] rows; each weight row, while in L1, is
//! dotted with every activation row. Memory traffic is one pass over the packed weights per call,
//! whatever `m`.
use super::pool::{parallel_for, SharedMut};
use super::qact::{Q8Rows256, Q8Rows32};
use super::qdot::Kernel;
use crate::error::{ModelError, Result};
use crate::quant::QMatrix;
use std::cell::RefCell;

/// Weight rows per parallel range.
pub const GRAIN: usize = 16;

/// Weight bytes times activation rows from which a product is split across threads.
pub const PAR_MIN_BYTES: usize = 1 << 15;

/// Rows `col0..col0 + w.rows()` of the stacked weight, each output multiplied by `scale`.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    pub w: &'a QMatrix,
    pub col0: usize,
    pub scale: f32,
    pub kernel: Kernel,
}

thread_local! {
    static ACTS: RefCell<(Q8Rows32, Q8Rows256)> = RefCell::new(Default::default());
}

/// `y[r, c] = scale_s * sum_i x[r, i] W[c, i]` for every segment `s` and its columns `c`;
/// `y` is `[m, n]` row-major with `n >= col0 + rows` of every segment. Columns no segment covers
/// are left as they were.
pub fn matmul(
    segs: &[Segment<'_>],
    x: &[f32],
    m: usize,
    k: usize,
    y: &mut [f32],
    n: usize,
) -> Result<()> {
    if x.len() != m * k || y.len() != m * n {
        return Err(ModelError::Input(format!(
            "quantized product: x of {} values for [{m}, {k}], y of {} for [{m}, {n}]",
            x.len(),
            y.len()
        )));
    }
    for s in segs {
        if s.w.cols() != k || s.col0 + s.w.rows() > n {
            return Err(ModelError::Input(format!(
                "quantized product: a [{}, {}] segment at column {} does not fit [{m}, {k}] x [{n}, {k}]^T",
                s.w.rows(),
                s.w.cols(),
                s.col0
            )));
        }
    }
    if m == 0 {
        return Ok(());
    }
    let need32 = segs.iter().any(|s| matches!(s.kernel, Kernel::B32(..)));
    let need256 = segs.iter().any(|s| matches!(s.kernel, Kernel::B256(..)));
    if (need32 && !k.is_multiple_of(32)) || (need256 && !k.is_multiple_of(256)) {
        return Err(ModelError::Input(format!(
            "quantized product: {k} inputs are not whole blocks"
        )));
    }
    ACTS.with(|acts| {
        let mut acts = acts.borrow_mut();
        let (a32, a256) = &mut *acts;
        if need32 {
            a32.fill(x, k);
        }
        if need256 {
            a256.fill(x, k);
        }
        // A buffer this call did not fill holds another call's rows: hand over none of them.
        let a32 = need32.then_some(&*a32);
        let a256 = need256.then_some(&*a256);
        run(segs, a32, a256, m, y, n);
    });
    Ok(())
}

fn run(
    segs: &[Segment<'_>],
    a32: Option<&Q8Rows32>,
    a256: Option<&Q8Rows256>,
    m: usize,
    y: &mut [f32],
    n: usize,
) {
    // Global weight rows: segment after segment.
    let starts: Vec<usize> = segs
        .iter()
        .scan(0, |acc, s| {
            let s0 = *acc;
            *acc += s.w.rows();
            Some(s0)
        })
        .collect();
    let total: usize = segs.iter().map(|s| s.w.rows()).sum();
    let bytes: usize = segs.iter().map(|s| s.w.bytes().len()).sum();
    let out = SharedMut::new(y);
    let rows32: Vec<_> = a32.map_or(vec![], |a| (0..m).map(|r| a.row(r)).collect());
    let rows256: Vec<_> = a256.map_or(vec![], |a| (0..m).map(|r| a.row(r)).collect());
    parallel_for(total, GRAIN, bytes * m >= PAR_MIN_BYTES, |range| {
        for (s, &s0) in segs.iter().zip(&starts) {
            let lo = range.start.max(s0);
            let hi = range.end.min(s0 + s.w.rows());
            for j in lo..hi {
                let wr = s.w.row_bytes(j - s0);
                let c = s.col0 + j - s0;
                // SAFETY (writes): column c belongs to exactly one weight row j, handed to one
                // thread.
                let put = |r: usize, v: f32| unsafe { out.write(r * n + c, v * s.scale) };
                let mut r = 0;
                while r + 4 <= m {
                    let v = match s.kernel {
                        Kernel::B32(_, f) => f(
                            wr,
                            &[rows32[r], rows32[r + 1], rows32[r + 2], rows32[r + 3]],
                        ),
                        Kernel::B256(_, f) => f(
                            wr,
                            &[rows256[r], rows256[r + 1], rows256[r + 2], rows256[r + 3]],
                        ),
                    };
                    for (t, v) in v.into_iter().enumerate() {
                        put(r + t, v);
                    }
                    r += 4;
                }
                for r in r..m {
                    put(
                        r,
                        match s.kernel {
                            Kernel::B32(f, _) => f(wr, rows32[r]),
                            Kernel::B256(f, _) => f(wr, rows256[r]),
                        },
                    );
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantType;

    /// A call that needs only 32-blocks after one that filled the 256-block buffer with fewer
    /// rows (the `--dtype q4_k` fallback on SmolLM2: Q5_0 maps of 576 inputs after Q4_K maps of
    /// 1536) must not read that buffer.
    #[test]
    fn a_stale_activation_buffer_is_not_read() {
        fn seg(w: &QMatrix) -> Segment<'_> {
            Segment {
                w,
                col0: 0,
                scale: 1.0,
                kernel: Kernel::for_type(w.ty()).unwrap(),
            }
        }
        let w256 = QMatrix::quantize(&[0.5; 2 * 256], 2, 256, QuantType::Q4_K).unwrap();
        let mut y = vec![0.0; 2];
        matmul(&[seg(&w256)], &[1.0; 256], 1, 256, &mut y, 2).unwrap();
        let w32 = QMatrix::quantize(&[0.25; 3 * 32], 3, 32, QuantType::Q5_0).unwrap();
        let mut y = vec![0.0; 4 * 3];
        matmul(&[seg(&w32)], &[2.0; 4 * 32], 4, 32, &mut y, 3).unwrap();
        for v in y {
            assert!((v - 16.0).abs() < 0.1, "{v}");
        }
    }

    #[test]
    fn segments_of_mixed_types_match_dequantized_product() {
        let (k, m) = (512, 6);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let mk = |rows: usize, ty, seed: usize| {
            let w: Vec<f32> = (0..rows * k)
                .map(|i| (((i + seed) * 7919 % 1013) as f32 - 506.0) / 500.0)
                .collect();
            QMatrix::quantize(&w, rows, k, ty).unwrap()
        };
        let a = mk(40, QuantType::Q5_0, 1);
        let b = mk(24, QuantType::Q6_K, 2);
        let c = mk(300, QuantType::Q8_0, 3);
        let segs = [
            Segment {
                w: &a,
                col0: 0,
                scale: 0.5,
                kernel: Kernel::for_type(a.ty()).unwrap(),
            },
            Segment {
                w: &b,
                col0: 40,
                scale: 1.0,
                kernel: Kernel::for_type(b.ty()).unwrap(),
            },
            Segment {
                w: &c,
                col0: 64,
                scale: 2.0,
                kernel: Kernel::for_type(c.ty()).unwrap(),
            },
        ];
        let n = 364;
        let mut y = vec![f32::NAN; m * n];
        matmul(&segs, &x, m, k, &mut y, n).unwrap();
        for (s, q) in [(&segs[0], &a), (&segs[1], &b), (&segs[2], &c)] {
            let wd = q.dequantize().unwrap();
            for r in 0..m {
                for j in 0..q.rows() {
                    let want: f64 = (0..k)
                        .map(|i| x[r * k + i] as f64 * wd[j * k + i] as f64)
                        .sum::<f64>()
                        * s.scale as f64;
                    let norm: f64 = (0..k)
                        .map(|i| (x[r * k + i] * wd[j * k + i]).abs() as f64)
                        .sum::<f64>();
                    let got = y[r * n + s.col0 + j] as f64;
                    // 8-bit activations: error well under 1% of the magnitude sum.
                    assert!(
                        (got - want).abs() <= 0.01 * norm * s.scale as f64 + 1e-4,
                        "{r} {j}: {got} vs {want}"
                    );
                }
            }
        }
        assert!(matmul(&segs, &x[1..], m, k, &mut y, n).is_err());
    }
}
