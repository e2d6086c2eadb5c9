//! The client's per-value loops (encode, mask, sum, range check, Freivalds dots, decode),
//! compiled three times: for AVX-512 (64-bit multiplies and f64 <-> i64 conversions in vector
//! registers), for AVX2, and for the baseline; the fastest the CPU runs is chosen once.
//! The bodies are plain Rust that the compiler vectorizes (`#[inline(always)]` into functions
//! with the target features enabled).
use std::sync::OnceLock;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Base,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

fn level() -> Level {
    static L: OnceLock<Level> = OnceLock::new();
    *L.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512dq") && has!("avx512vl") {
                return Level::Avx512;
            }
            if has!("avx2") && has!("fma") {
                return Level::Avx2;
            }
        }
        Level::Base
    })
}

/// Defines `pub fn $name` dispatching to copies of `$body` compiled per [`Level`].
macro_rules! versions {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),*) -> $r:ty $body:block) => {
        $(#[$m])*
        pub fn $name($($a: $t),*) -> $r {
            #[inline(always)]
            fn body($($a: $t),*) -> $r $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
            unsafe fn wide($($a: $t),*) -> $r { body($($a),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($a: $t),*) -> $r { body($($a),*) }
            match level() {
                // SAFETY: `level()` reports only features the CPU has.
                #[cfg(target_arch = "x86_64")]
                Level::Avx512 => unsafe { wide($($a),*) },
                #[cfg(target_arch = "x86_64")]
                Level::Avx2 => unsafe { avx2($($a),*) },
                Level::Base => body($($a),*),
            }
        }
    };
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
    fn encode_row(x: &[f32], f: f64, out: &mut [u64]) -> () {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = round_int(v as f64 * f) as u64;
        }
    }
}

versions! {
    /// `out = a - r` (mod 2^64).
    fn sub(a: &[u64], r: &[u64], out: &mut [u64]) -> () {
        for ((o, &x), &m) in out.iter_mut().zip(a).zip(r) {
            *o = x.wrapping_sub(m);
        }
    }
}

versions! {
    /// `out = a + b` (mod 2^64).
    fn add(a: &[u64], b: &[u64], out: &mut [u64]) -> () {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = x.wrapping_add(y);
        }
    }
}

versions! {
    /// Whether every `|z[j]|` (signed) is at most `bound[j]`.
    fn within(z: &[u64], bound: &[u64]) -> bool {
        let mut bad = 0u64;
        for (&v, &b) in z.iter().zip(bound) {
            bad |= ((v as i64).unsigned_abs() > b) as u64;
        }
        bad == 0
    }
}

versions! {
    /// `sum a[i] b[i]` mod 2^64 (integer addition is associative: the reduction vectorizes).
    fn dot(a: &[u64], b: &[u64]) -> u64 {
        a.iter()
            .zip(b)
            .fold(0u64, |s, (x, y)| s.wrapping_add(x.wrapping_mul(*y)))
    }
}

versions! {
    /// `out[j] = (z[j] as i64) * f * scale[j] (+ bias[j])`.
    fn decode_row(z: &[u64], f: f64, scale: &[f32], out: &mut [f32]) -> () {
        for ((o, &v), &s) in out.iter_mut().zip(z).zip(scale) {
            *o = ((v as i64) as f64 * f * s as f64) as f32;
        }
    }
}

versions! {
    /// `out[j] += bias[j]`.
    fn add_bias(out: &mut [f32], bias: &[f32]) -> () {
        for (o, &b) in out.iter_mut().zip(bias) {
            *o += b;
        }
    }
}

versions! {
    /// `out[c] = round(row[c] * inv)` clamped to `[-q_max, q_max]`; returns `sum |out[c]|`.
    fn quantize_row(row: &[f32], inv: f64, q_max: f64, out: &mut [i16]) -> u64 {
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
    fn axpy_i16(acc: &mut [u64], s: u64, q: &[i16]) -> () {
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
}
