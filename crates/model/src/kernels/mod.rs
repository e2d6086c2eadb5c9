//! Hand-written CPU kernels for the paths where candle's per-op dispatch (thread wake-ups for
//! tiny matmuls and softmax) or gemm's per-call packing cost more than the work itself.
//!
//! - [`matvec`]: few-row products `x W^T` for decode steps (each weight row read once).
//! - [`attention`]: one-position attention read straight from the KV cache buffers.
//! - [`qact`], [`qdot`], [`qmatmul`]: products with quantized weights (8-bit activations,
//!   integer dot products on the packed blocks), AVX2 where the CPU has it.
//! - [`pool`]: splitting a product over the persistent worker threads.
use candle_core::{Storage, Tensor};
use std::sync::OnceLock;

pub mod attention;
pub mod matvec;
pub mod pool;
pub mod qact;
pub mod qdot;
#[cfg(target_arch = "x86_64")]
mod qdot_avx2;
pub mod qmatmul;

/// Whether this CPU has AVX2, FMA and F16C (the SIMD kernels' requirement); detected once.
pub fn has_avx2_fma() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Rows up to which the few-row kernel replaces candle's matmul.
pub const SMALL_ROWS: usize = 32;

/// Multiply-adds from which a small-row product is split across threads
/// (`UMBRA_PAR_MIN_WORK`; below it the hand-off costs more than the second thread saves).
pub fn par_min_work() -> usize {
    static V: OnceLock<usize> = OnceLock::new();
    *V.get_or_init(|| {
        std::env::var("UMBRA_PAR_MIN_WORK")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1 << 17)
    })
}

/// Threads the kernels split work over ([`pool::threads`]).
pub fn threads() -> usize {
    pool::threads()
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
