//! The client's per-value loops (encode, mask, sum, range check, Freivalds dots, decode),
//! compiled three times: for AVX-512 (64-bit multiplies and f64 <-> i64 conversions in vector
//! registers), for AVX2, and for the baseline; the fastest the CPU runs is chosen once.
//! The bodies are plain Rust that the compiler vectorizes (`#[inline(always)]` into functions
//! with the target features enabled).
//!
//! The level is chosen at run time (`is_x86_feature_detected!`), never at compile time: a binary
//! built here runs on a CPU without AVX-512 (or without AVX2) through the copies it supports,
//! down to the baseline copy, which every CPU runs. Each `NAME` has a `NAME_at(level, ..)` that
//! the tests call with every level this CPU runs, comparing it with the baseline copy.
use std::sync::OnceLock;

/// Which compiled copy of the loops runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// The target's baseline (SSE2 on x86_64): any CPU.
    Base,
    /// AVX2 + FMA (64-bit multiplies emulated by the compiler).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512 F/DQ/VL (`vpmullq`, `vcvtqq2pd`) on top of AVX2 + FMA.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// Every level this CPU runs, baseline first.
pub fn levels() -> Vec<Level> {
    let mut v = vec![Level::Base];
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") {
            v.push(Level::Avx2);
            if has!("avx512f") && has!("avx512dq") && has!("avx512vl") {
                v.push(Level::Avx512);
            }
        }
    }
    v
}

/// The fastest level this CPU runs (detected once).
pub fn level() -> Level {
    static L: OnceLock<Level> = OnceLock::new();
    *L.get_or_init(|| *levels().last().unwrap_or(&Level::Base))
}

/// Defines `pub fn $name` (the detected level) and `pub fn $at` (a given level), dispatching to
/// copies of `$body` compiled per [`Level`].
macro_rules! versions {
    ($(#[$m:meta])* fn $name:ident / $at:ident($($a:ident: $t:ty),*) -> $r:ty $body:block) => {
        $(#[$m])*
        pub fn $name($($a: $t),*) -> $r {
            $at(level(), $($a),*)
        }

        /// The same loop compiled for `level`; a level the CPU does not run (not in
        /// [`levels`]) runs the baseline copy instead.
        pub fn $at(level: Level, $($a: $t),*) -> $r {
            #[inline(always)]
            fn body($($a: $t),*) -> $r $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
            unsafe fn wide($($a: $t),*) -> $r { body($($a),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($a: $t),*) -> $r { body($($a),*) }
            match level {
                // SAFETY: a level runs its copy only when `levels()` (run-time detection)
                // reports it for this CPU.
                #[cfg(target_arch = "x86_64")]
                Level::Avx512 if supported(level) => unsafe { wide($($a),*) },
                #[cfg(target_arch = "x86_64")]
                Level::Avx2 if supported(level) => unsafe { avx2($($a),*) },
                _ => body($($a),*),
            }
        }
    };
}

/// Whether this CPU runs `level` (detected once).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn supported(level: Level) -> bool {
    static ALL: OnceLock<Vec<Level>> = OnceLock::new();
    ALL.get_or_init(levels).contains(&level)
}

/// `y + 1.5 * 2^52` for `|y| < 2^51` has the exponent of 2^52 and `2^51 + round(y)` (ties to
/// even) in its mantissa, so its bits minus the constant's bits are `round(y)` as an integer:
/// rounding and conversion without a libm call or a saturating cast (both vectorize).
const ROUND: f64 = 6_755_399_441_055_744.0;

/// `round(y)` for `|y| < 2^51` (see [`ROUND`]).
#[inline(always)]
fn round_int(y: f64) -> i64 {
    ((y + ROUND).to_bits() as i64).wrapping_sub(ROUND.to_bits() as i64)
}

versions! {
    /// `out[c] = round(x[c] * f)` as a ring element (two's complement); `|x[c] * f| < 2^51`.
    fn encode_row / encode_row_at(x: &[f32], f: f64, out: &mut [u64]) -> () {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = round_int(v as f64 * f) as u64;
        }
    }
}

versions! {
    /// `out = a - r` (mod 2^64).
    fn sub / sub_at(a: &[u64], r: &[u64], out: &mut [u64]) -> () {
        for ((o, &x), &m) in out.iter_mut().zip(a).zip(r) {
            *o = x.wrapping_sub(m);
        }
    }
}

versions! {
    /// `out = a + b` (mod 2^64).
    fn add / add_at(a: &[u64], b: &[u64], out: &mut [u64]) -> () {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = x.wrapping_add(y);
        }
    }
}

versions! {
    /// Whether every `|z[j]|` (signed) is at most `bound[j]`.
    fn within / within_at(z: &[u64], bound: &[u64]) -> bool {
        let mut bad = 0u64;
        for (&v, &b) in z.iter().zip(bound) {
            bad |= ((v as i64).unsigned_abs() > b) as u64;
        }
        bad == 0
    }
}

versions! {
    /// `sum a[i] b[i]` mod 2^64 (integer addition is associative: the reduction vectorizes).
    fn dot / dot_at(a: &[u64], b: &[u64]) -> u64 {
        a.iter()
            .zip(b)
            .fold(0u64, |s, (x, y)| s.wrapping_add(x.wrapping_mul(*y)))
    }
}

versions! {
    /// `out[j] = (z[j] as i64) * f * scale[j] (+ bias[j])`.
    fn decode_row / decode_row_at(z: &[u64], f: f64, scale: &[f32], out: &mut [f32]) -> () {
        for ((o, &v), &s) in out.iter_mut().zip(z).zip(scale) {
            *o = ((v as i64) as f64 * f * s as f64) as f32;
        }
    }
}

versions! {
    /// `out[j] += bias[j]`.
    fn add_bias / add_bias_at(out: &mut [f32], bias: &[f32]) -> () {
        for (o, &b) in out.iter_mut().zip(bias) {
            *o += b;
        }
    }
}

versions! {
    /// `out[c] = round(row[c] * inv)` clamped to `[-q_max, q_max]`; returns `sum |out[c]|`.
    fn quantize_row / quantize_row_at(row: &[f32], inv: f64, q_max: f64, out: &mut [i16]) -> u64 {
        let mut l1 = 0u64;
        for (o, &v) in out.iter_mut().zip(row) {
            let q = round_int((v as f64 * inv).clamp(-q_max, q_max));
            l1 += q.unsigned_abs();
            *o = q as i16;
        }
        l1
    }
}

versions! {
    /// `acc[c] += s * q[c]` (mod 2^64, `q` sign-extended).
    fn axpy_i16 / axpy_i16_at(acc: &mut [u64], s: u64, q: &[i16]) -> () {
        for (a, &w) in acc.iter_mut().zip(q) {
            *a = a.wrapping_add(s.wrapping_mul(w as i64 as u64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loops_agree_with_their_definitions() {
        let x: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.37).collect();
        let mut e = vec![0u64; 37];
        encode_row(&x, 1024.0, &mut e);
        for (o, v) in e.iter().zip(&x) {
            assert_eq!(*o as i64, (*v as f64 * 1024.0).round_ties_even() as i64);
        }
        // Ties go to even.
        encode_row(&[0.5, 1.5, -2.5], 1.0, &mut e[..3]);
        assert_eq!([e[0] as i64, e[1] as i64, e[2] as i64], [0, 2, -2]);
        let a: Vec<u64> = (0..37)
            .map(|i| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        let b: Vec<u64> = (0..37)
            .map(|i| (i as u64 + 3).wrapping_mul(0xc2b2_ae3d_27d4_eb4f))
            .collect();
        let want = a
            .iter()
            .zip(&b)
            .fold(0u64, |s, (x, y)| s.wrapping_add(x.wrapping_mul(*y)));
        assert_eq!(dot(&a, &b), want);
        let (mut s, mut t) = (vec![0u64; 37], vec![0u64; 37]);
        sub(&a, &b, &mut s);
        add(&s, &b, &mut t);
        assert_eq!(t, a);
        assert!(within(&[5, (-5i64) as u64], &[5, 5]));
        assert!(!within(&[5, (-6i64) as u64], &[5, 5]));
        let mut y = vec![0f32; 2];
        decode_row(&[(-4i64) as u64, 8], 0.5, &[2.0, 0.25], &mut y);
        add_bias(&mut y, &[1.0, 1.0]);
        assert_eq!(y, [-3.0, 2.0]);
        let mut q = vec![0i16; 4];
        assert_eq!(
            quantize_row(&[1.0, -2.6, 100.0, 0.5], 1.0, 50.0, &mut q),
            1 + 3 + 50
        );
        assert_eq!(q, [1, -3, 50, 0]);
        let mut acc = vec![1u64, 2];
        axpy_i16(&mut acc, u64::MAX, &[2, -3]);
        assert_eq!(acc, [u64::MAX, 5]);
    }

    /// Every compiled copy this CPU runs gives the baseline copy's result, bit for bit, on
    /// odd lengths (vector bodies and scalar tails) and edge values (ties, wrap-around, the
    /// range check's boundary, clamping). On a CPU without AVX-512 or AVX2 the copies it
    /// lacks are not run: the baseline is what such a CPU uses, and it is checked above.
    #[test]
    fn every_level_this_cpu_runs_matches_the_baseline() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
        eprintln!("levels on this CPU: {:?}", levels());
        assert_eq!(levels()[0], Level::Base);
        assert!(levels().contains(&level()));
        for n in [0usize, 1, 3, 7, 8, 15, 16, 17, 31, 64, 100, 577] {
            let x: Vec<f32> = (0..n)
                .map(|i| match i % 5 {
                    0 => rng.random_range(-1e6f32..1e6),
                    1 => (i as f32) + 0.5,
                    2 => -((i as f32) + 0.5),
                    3 => rng.random_range(-1f32..1.0) * 1e-30,
                    _ => rng.random_range(-3f32..3.0),
                })
                .collect();
            let a: Vec<u64> = (0..n).map(|_| rng.random()).collect();
            let b: Vec<u64> = (0..n)
                .map(|i| {
                    if i % 3 == 0 {
                        u64::MAX - i as u64
                    } else {
                        rng.random()
                    }
                })
                .collect();
            let bound: Vec<u64> = a
                .iter()
                .enumerate()
                .map(|(i, v)| match i % 3 {
                    0 => (*v as i64).unsigned_abs(),
                    1 => (*v as i64).unsigned_abs().saturating_sub(1),
                    _ => u64::MAX,
                })
                .collect();
            let scale: Vec<f32> = (0..n).map(|_| rng.random_range(1e-6f32..1e-2)).collect();
            let q: Vec<i16> = (0..n).map(|_| rng.random_range(-32767..=32767)).collect();
            let s: u64 = rng.random();
            let run = |l: Level| {
                let mut e = vec![0u64; n];
                encode_row_at(l, &x, 2f64.powi(20), &mut e);
                let (mut d, mut t) = (vec![0u64; n], vec![0u64; n]);
                sub_at(l, &a, &b, &mut d);
                add_at(l, &a, &b, &mut t);
                let mut y = vec![0f32; n];
                decode_row_at(l, &a, 2f64.powi(-40), &scale, &mut y);
                add_bias_at(l, &mut y, &x);
                let mut qq = vec![0i16; n];
                let l1 = quantize_row_at(l, &x, 0.01, 32767.0, &mut qq);
                let mut acc = b.clone();
                axpy_i16_at(l, &mut acc, s, &q);
                let ok = (0..=n.min(8)).map(|c| within_at(l, &a[..c], &bound[..c]));
                (
                    e,
                    d,
                    t,
                    y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    qq,
                    l1,
                    acc,
                    ok.collect::<Vec<_>>(),
                    within_at(l, &a, &bound),
                    dot_at(l, &a, &b),
                )
            };
            let base = run(Level::Base);
            for l in levels() {
                assert_eq!(
                    run(l),
                    base,
                    "{l:?} differs from the baseline at length {n}"
                );
            }
        }
    }
}
