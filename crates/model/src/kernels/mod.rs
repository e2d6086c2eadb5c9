//! Hand-written CPU kernels for the paths where candle's per-op dispatch (rayon wake-ups for
//! tiny matmuls and softmax) or gemm's per-call packing cost more than the work itself.
//!
//! - [`matvec`]: few-row products `x W^T` for decode steps (each weight row read once).
//! - [`attention`]: one-position attention read straight from the KV cache buffers.
use candle_core::{Storage, Tensor};
use std::sync::OnceLock;

pub mod attention;
pub mod matvec;

/// Rows up to which the few-row kernel replaces candle's matmul.
pub const SMALL_ROWS: usize = 32;

/// Multiply-adds from which a small-row product is split across threads
/// (`UMBRA_PAR_MIN_WORK`; a thread wake-up costs more than smaller products).
pub fn par_min_work() -> usize {
    static V: OnceLock<usize> = OnceLock::new();
    *V.get_or_init(|| {
        std::env::var("UMBRA_PAR_MIN_WORK")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1 << 22)
    })
}

/// Threads of the rayon pool the kernels split work over.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Runs `f` on the contiguous f32 CPU data of `t`; `None` for other devices/dtypes/layouts.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (st, layout) = t.storage_and_layout();
    let (a, b) = layout.contiguous_offsets()?;
    match &*st {
        Storage::Cpu(cs) => Some(f(&cs.as_slice::<f32>().ok()?[a..b])),
        _ => None,
    }
}

/// Dot product with 32 independent lanes (vectorizes without reassociation).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let body = n / 32 * 32;
    let mut acc = [0f32; 32];
    for (x, y) in a[..body].chunks_exact(32).zip(b[..body].chunks_exact(32)) {
        for j in 0..32 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut s = 0f32;
    for j in 0..8 {
        s += (acc[j] + acc[j + 8]) + (acc[j + 16] + acc[j + 24]);
    }
    for (x, y) in a[body..n].iter().zip(&b[body..n]) {
        s += x * y;
    }
    s
}
