//! Ring kernels: `Y = X W^T mod 2^64` for 64-bit shares `X` (`[m, k]`, any value of Z_2^64)
//! and narrow public weights `W` (`[n, k]`, i16 in `[-32767, 32767]`, HF's `[out, in]` layout).
//!
//! x86 has no 64x16-bit vector multiply, so each share is cut into five signed 16-bit digits
//! (see [`digits_of`]) and every digit plane is multiplied with `vpmaddwd` (AVX2) or `vpdpwssd`
//! (AVX-512 VNNI), which multiply 16 pairs of i16 and add adjacent products into 8 i32 lanes:
//!
//! ```text
//! x = d0 + 2^11 d1 + 2^22 d2 + 2^32 (h0 + 2^16 h1)   (mod 2^64)
//!     |d0|, |d1| <= 1024, 0 <= d2 <= 1024             exact: low 32 bits of x
//!     h0, h1 in [-2^15, 2^15)                         high 32 bits of x, mod 2^32
//! x W^T = D0 + 2^11 D1 + 2^22 D2 + 2^32 (E0 + 2^16 E1)   (mod 2^64),  Dg = sum_c dg[c] w[c]
//! ```
//! `E0`, `E1` are only needed mod 2^32, so their i32 lanes may wrap. `D0..D2` must be exact:
//! a lane gains at most `2 * 1024 * 32767 < 2^26` per instruction, so the i32 lanes are widened
//! into i64 accumulators every [`BLOCK`] inputs (16 instructions, `< 2^30`), which never
//! overflows. The madd pair sum itself cannot overflow because weights avoid `-32768`.
//!
//! Layout: weights are stored once per server as `[n, kp]` i16 (`kp` = `k` rounded up to 16,
//! zero padded); share rows are decomposed once per request into `[m, 5, kp]` digit planes.
//! Tiles of 1 row x 2 outputs (AVX2, 16 registers) or 1 row x 4 outputs (VNNI, 32 registers)
//! keep every accumulator in a register; outputs are processed in blocks of [`OUT_BLOCK`] so a
//! block of weights stays in L2 while every row passes over it (prefill), and blocks are split
//! over the server's thread pool. A portable path (`wrapping_mul`) serves other CPUs and is the
//! reference the tests compare against.
mod avx2;
mod vnni;

use crate::error::{Result, ShareError};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Digit planes per share.
pub const DIGITS: usize = 5;
/// i16 lanes of one 256-bit vector; `kp` is a multiple of it.
pub const LANES: usize = 16;
/// Inputs between two widenings of the exact low-digit accumulators (16 instructions).
pub const BLOCK: usize = 256;
/// Outputs per block of work (a block of weights stays in L2 while every row passes over it).
pub const OUT_BLOCK: usize = 64;
/// Largest weight magnitude (`-32768` would let `vpmaddwd` overflow).
pub const W_MAX: i16 = i16::MAX;

/// Which implementation runs the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Kernel {
    /// `wrapping_mul` in scalar code (any CPU; the reference).
    Portable,
    /// `vpmaddwd` + `vpaddd`, 1 x 2 tiles.
    Avx2,
    /// `vpdpwssd` (AVX-512 VNNI on 256-bit vectors), 1 x 4 tiles.
    Vnni,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub fn best() -> Kernel {
        static K: OnceLock<Kernel> = OnceLock::new();
        *K.get_or_init(|| {
            let all = Kernel::available();
            *all.last().unwrap_or(&Kernel::Portable)
        })
    }

    /// Every kernel this CPU runs, slowest first.
    pub fn available() -> Vec<Kernel> {
        let mut v = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                v.push(Kernel::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx512vl")
            {
                v.push(Kernel::Vnni);
            }
        }
        v
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            Kernel::Avx2 => "avx2",
            Kernel::Vnni => "avx512-vnni",
        }
    }
}

/// `k` rounded up to whole vectors.
pub fn padded(k: usize) -> usize {
    k.div_ceil(LANES) * LANES
}

/// A public weight matrix `[n, k]` in the kernels' layout (rows padded to `kp` with zeros).
#[derive(Debug, Clone)]
pub struct RingMatrix {
    n: usize,
    k: usize,
    kp: usize,
    w: Vec<i16>,
}

impl RingMatrix {
    /// `w` row-major `[n, k]`; every entry must be in `[-32767, 32767]`.
    pub fn new(n: usize, k: usize, w: &[i16]) -> Result<Self> {
        if w.len() != n * k || k == 0 || n == 0 {
            return Err(ShareError::Shape(format!(
                "weight of {} entries for [{n}, {k}]",
                w.len()
            )));
        }
        if w.contains(&i16::MIN) {
            return Err(ShareError::Shape(
                "ring weights must be in [-32767, 32767]".into(),
            ));
        }
        let kp = padded(k);
        let mut data = vec![0i16; n * kp];
        for (dst, src) in data.chunks_exact_mut(kp).zip(w.chunks_exact(k)) {
            dst[..k].copy_from_slice(src);
        }
        Ok(Self { n, k, kp, w: data })
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// Row `j` (length `kp`, zero padded).
    pub fn row(&self, j: usize) -> &[i16] {
        &self.w[j * self.kp..(j + 1) * self.kp]
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.w.len() * 2
    }
}

/// The five digits of `x` (module docs): `x = d0 + 2^11 d1 + 2^22 d2 + 2^32 (h0 + 2^16 h1)` mod 2^64.
#[inline]
pub fn digits_of(x: u64) -> [i16; DIGITS] {
    let l = (x & 0xffff_ffff) as i64;
    let d0 = ((l + 1024) & 2047) - 1024;
    let l1 = (l - d0) >> 11;
    let d1 = ((l1 + 1024) & 2047) - 1024;
    let d2 = (l1 - d1) >> 11; // in [0, 1024]
    let h = (x >> 32) as u32;
    let h0 = h as u16 as i16;
    let h1 = (h.wrapping_sub(h0 as i32 as u32) >> 16) as u16 as i16;
    [d0 as i16, d1 as i16, d2 as i16, h0, h1]
}

/// Recombines per-digit dot products: `D0 + 2^11 D1 + 2^22 D2 + 2^32 (E0 + 2^16 E1)` mod 2^64.
#[inline]
pub(crate) fn combine(d: [i64; 3], e0: i32, e1: i32) -> u64 {
    let lo = (d[0] as u64)
        .wrapping_add((d[1] as u64) << 11)
        .wrapping_add((d[2] as u64) << 22);
    let hi = (e0 as u32).wrapping_add((e1 as u32) << 16) as u64;
    lo.wrapping_add(hi << 32)
}

/// Share rows `[m, k]` decomposed into digit planes `[m, 5, kp]`.
#[derive(Debug, Clone)]
pub struct Digits {
    m: usize,
    k: usize,
    kp: usize,
    data: Vec<i16>,
}

impl Digits {
    /// Decomposes `x` (`[m, k]` row-major).
    pub fn new(x: &[u64], m: usize, k: usize) -> Result<Self> {
        if x.len() != m * k || k == 0 {
            return Err(ShareError::Shape(format!(
                "{} share values for [{m}, {k}]",
                x.len()
            )));
        }
        let kp = padded(k);
        let mut data = vec![0i16; m * DIGITS * kp];
        for (row, xs) in data.chunks_exact_mut(DIGITS * kp).zip(x.chunks_exact(k)) {
            for (c, &v) in xs.iter().enumerate() {
                let d = digits_of(v);
                for (g, &dg) in d.iter().enumerate() {
                    row[g * kp + c] = dg;
                }
            }
        }
        Ok(Self { m, k, kp, data })
    }

    pub fn rows(&self) -> usize {
        self.m
    }

    /// Row `r`'s planes (`5 * kp`).
    fn row(&self, r: usize) -> &[i16] {
        &self.data[r * DIGITS * self.kp..(r + 1) * DIGITS * self.kp]
    }
}

/// `y[r, j] = sum_c x[r, c] w[j, c]` mod 2^64, the definition (scalar `wrapping_mul`).
pub fn reference(x: &[u64], m: usize, k: usize, w: &[i16], n: usize) -> Vec<u64> {
    let mut y = vec![0u64; m * n];
    for r in 0..m {
        for j in 0..n {
            let mut acc = 0u64;
            for c in 0..k {
                acc = acc.wrapping_add(x[r * k + c].wrapping_mul(w[j * k + c] as i64 as u64));
            }
            y[r * n + j] = acc;
        }
    }
    y
}

/// Outputs `j0..j1` for every row into `out` (`[m, j1 - j0]`).
fn block(kernel: Kernel, x: &Digits, w: &RingMatrix, j0: usize, j1: usize, out: &mut [u64]) {
    let width = j1 - j0;
    for r in 0..x.m {
        let d = x.row(r);
        let o = &mut out[r * width..(r + 1) * width];
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => avx2::outputs(d, x.kp, w, j0, j1, o),
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => vnni::outputs(d, x.kp, w, j0, j1, o),
            _ => portable(d, x.kp, w, j0, j1, o),
        }
    }
}

/// The digit formula in scalar code (what the vector kernels compute, lane by lane).
fn portable(d: &[i16], kp: usize, w: &RingMatrix, j0: usize, j1: usize, out: &mut [u64]) {
    for (o, j) in out.iter_mut().zip(j0..j1) {
        let wr = w.row(j);
        let mut dd = [0i64; 3];
        let mut e = [0i32; 2];
        for c in 0..kp {
            let wc = wr[c] as i64;
            for (g, acc) in dd.iter_mut().enumerate() {
                *acc += d[g * kp + c] as i64 * wc;
            }
            for (g, acc) in e.iter_mut().enumerate() {
                *acc = acc.wrapping_add((d[(3 + g) * kp + c] as i32).wrapping_mul(wc as i32));
            }
        }
        *o = combine(dd, e[0], e[1]);
    }
}

/// `Y = X W^T` mod 2^64 into `y` (`[m, n]` row-major) with `kernel`, output blocks split over
/// `pool` when given (and worth it).
pub fn gemm(
    kernel: Kernel,
    x: &Digits,
    w: &RingMatrix,
    y: &mut [u64],
    pool: Option<&rayon::ThreadPool>,
) -> Result<()> {
    if x.k != w.k || y.len() != x.m * w.n {
        return Err(ShareError::Shape(format!(
            "product of [{}, {}] shares with a [{}, {}] weight into {} outputs",
            x.m,
            x.k,
            w.n,
            w.k,
            y.len()
        )));
    }
    if !Kernel::available().contains(&kernel) {
        return Err(ShareError::Shape(format!(
            "kernel {} is not available on this CPU",
            kernel.as_str()
        )));
    }
    let n = w.n;
    let blocks: Vec<(usize, usize)> = (0..n)
        .step_by(OUT_BLOCK)
        .map(|j0| (j0, (j0 + OUT_BLOCK).min(n)))
        .collect();
    let run = |&(j0, j1): &(usize, usize)| {
        let mut out = vec![0u64; x.m * (j1 - j0)];
        block(kernel, x, w, j0, j1, &mut out);
        (j0, j1, out)
    };
    let parts: Vec<(usize, usize, Vec<u64>)> = match pool {
        Some(p) if p.current_num_threads() > 1 && blocks.len() > 1 => {
            p.install(|| blocks.par_iter().map(run).collect())
        }
        _ => blocks.iter().map(run).collect(),
    };
    for (j0, j1, out) in parts {
        let width = j1 - j0;
        for r in 0..x.m {
            y[r * n + j0..r * n + j1].copy_from_slice(&out[r * width..(r + 1) * width]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn digits_recombine_to_the_share() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let edge = [
            0u64,
            1,
            u64::MAX,
            1 << 63,
            (1 << 32) - 1,
            1 << 32,
            0x8000_7fff_ffff_fc00,
        ];
        for x in edge.into_iter().chain((0..10_000).map(|_| rng.random())) {
            let d = digits_of(x);
            assert!(d[0].abs() <= 1024 && d[1].abs() <= 1024 && (0..=1024).contains(&d[2]));
            let back = combine(
                [d[0] as i64, d[1] as i64, d[2] as i64],
                d[3] as i32,
                d[4] as i32,
            );
            assert_eq!(back, x, "{x:#x} -> {d:?}");
        }
    }

    fn check(kernel: Kernel, m: usize, k: usize, n: usize, extreme: bool, seed: u64) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let x: Vec<u64> = (0..m * k)
            .map(|_| {
                if extreme {
                    u64::MAX - rng.random_range(0..2)
                } else {
                    rng.random()
                }
            })
            .collect();
        let w: Vec<i16> = (0..n * k)
            .map(|_| {
                if extreme {
                    if rng.random() {
                        W_MAX
                    } else {
                        -W_MAX
                    }
                } else {
                    rng.random_range(-W_MAX..=W_MAX)
                }
            })
            .collect();
        let want = reference(&x, m, k, &w, n);
        let xm = Digits::new(&x, m, k).unwrap();
        let wm = RingMatrix::new(n, k, &w).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for p in [None, Some(&pool)] {
            let mut y = vec![0u64; m * n];
            gemm(kernel, &xm, &wm, &mut y, p).unwrap();
            assert_eq!(y, want, "{kernel:?} m {m} k {k} n {n} extreme {extreme}");
        }
    }

    #[test]
    fn every_kernel_matches_the_wrapping_reference() {
        // Odd shapes (k not a multiple of 16 or of the 256-input block, n not a multiple of
        // the tile or the output block), one and many rows, and the extreme values that would
        // overflow a saturating or unwidened accumulator.
        let shapes = [
            (1, 1, 1),
            (1, 17, 3),
            (3, 257, 5),
            (2, 576, 67),
            (5, 1000, 129),
            (1, 1536, 4),
        ];
        eprintln!("kernels on this CPU: {:?}", Kernel::available());
        for kernel in Kernel::available() {
            for (i, &(m, k, n)) in shapes.iter().enumerate() {
                check(kernel, m, k, n, false, i as u64);
                check(kernel, m, k, n, true, 100 + i as u64);
            }
        }
    }

    #[test]
    fn long_rows_keep_the_low_digits_exact() {
        // 20k inputs: many widenings of the i32 lanes, sums far beyond 2^32.
        for kernel in Kernel::available() {
            check(kernel, 2, 20_000, 6, true, 7);
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(RingMatrix::new(2, 2, &[1, 2, 3]).is_err());
        assert!(RingMatrix::new(1, 2, &[1, i16::MIN]).is_err());
        assert!(Digits::new(&[1, 2, 3], 2, 2).is_err());
        let x = Digits::new(&[1, 2], 1, 2).unwrap();
        let w = RingMatrix::new(1, 3, &[1, 2, 3]).unwrap();
        assert!(gemm(Kernel::Portable, &x, &w, &mut [0], None).is_err());
    }
}
