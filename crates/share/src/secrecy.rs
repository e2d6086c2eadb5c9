//! Statistics of what a server sees: is a transcript distinguishable from uniform noise, and do
//! two transcripts of the same prompt share any structure?
//!
//! - [`bytes_chi_square`]: the 256 byte values of the share words (little-endian bytes),
//!   chi-square against uniform, 255 degrees of freedom;
//! - [`bits_chi_square`]: the share of ones at each of the 64 bit positions and the agreement of
//!   adjacent positions, chi-square with 127 degrees of freedom (a fixed-point value that leaked
//!   would show in its high bits);
//! - [`compare`]: two views of the same prompt: equal words, mean Hamming distance (32 for
//!   independent uniform words), correlation of the words read as signed numbers, and the
//!   chi-square of their difference (uniform when at least one side is masked afresh).
//!
//! p-values come from the regularized upper incomplete gamma function `Q(dof/2, x/2)`.
use serde::Serialize;

/// A chi-square statistic with its degrees of freedom and upper-tail p-value.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct ChiSquare {
    pub statistic: f64,
    pub dof: u32,
    pub p_value: f64,
    /// Observations counted (bytes or words).
    pub n: u64,
}

impl ChiSquare {
    fn new(statistic: f64, dof: u32, n: u64) -> Self {
        Self {
            statistic,
            dof,
            p_value: gamma_q(dof as f64 / 2.0, statistic / 2.0),
            n,
        }
    }
}

/// Byte histogram of `words` against uniform.
pub fn bytes_chi_square(words: &[u64]) -> ChiSquare {
    let mut h = [0u64; 256];
    for w in words {
        for b in w.to_le_bytes() {
            h[b as usize] += 1;
        }
    }
    let n = words.len() as u64 * 8;
    let e = n as f64 / 256.0;
    let s = h.iter().map(|&c| (c as f64 - e).powi(2) / e).sum();
    ChiSquare::new(s, 255, n)
}

/// Ones per bit position, and agreements of each pair of adjacent bit positions, against fair
/// coins (127 degrees of freedom): a sign-extended small number (high bits all equal) fails
/// the second part even when its sign is balanced.
pub fn bits_chi_square(words: &[u64]) -> ChiSquare {
    let mut ones = [0u64; 64];
    let mut agree = [0u64; 63];
    for w in words {
        let mut v = *w;
        while v != 0 {
            ones[v.trailing_zeros() as usize] += 1;
            v &= v - 1;
        }
        let mut same = !(w ^ (w >> 1));
        while same != 0 {
            let b = same.trailing_zeros() as usize;
            if b < 63 {
                agree[b] += 1;
            }
            same &= same - 1;
        }
    }
    let n = words.len() as f64;
    let term = |c: &u64| (*c as f64 - n / 2.0).powi(2) * 4.0 / n.max(1.0);
    let s = ones.iter().map(term).sum::<f64>() + agree.iter().map(term).sum::<f64>();
    ChiSquare::new(s, 127, words.len() as u64)
}

/// How two equally long views relate.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Comparison {
    pub words: u64,
    /// Share of positions with the same word (`2^-64` expected for independent uniform words).
    pub equal: f64,
    /// Mean popcount of `a ^ b` (32 expected).
    pub hamming_bits: f64,
    /// Pearson correlation of the words read as signed 64-bit numbers (`~N(0, 1/n)`).
    pub correlation: f64,
    /// Bytes of `a - b` (mod 2^64) against uniform.
    pub difference: ChiSquare,
}

pub fn compare(a: &[u64], b: &[u64]) -> Comparison {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let equal = a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / n.max(1) as f64;
    let hamming = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x ^ y).count_ones() as f64)
        .sum::<f64>()
        / n.max(1) as f64;
    let f = |v: &u64| (*v as i64) as f64 / 2f64.powi(63);
    let (ma, mb) = (
        a.iter().map(f).sum::<f64>() / n.max(1) as f64,
        b.iter().map(f).sum::<f64>() / n.max(1) as f64,
    );
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        let (dx, dy) = (f(x) - ma, f(y) - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    let diff: Vec<u64> = a.iter().zip(b).map(|(x, y)| x.wrapping_sub(*y)).collect();
    Comparison {
        words: n as u64,
        equal,
        hamming_bits: hamming,
        correlation: if saa > 0.0 && sbb > 0.0 {
            sab / (saa * sbb).sqrt()
        } else {
            1.0
        },
        difference: bytes_chi_square(&diff),
    }
}

/// `ln Gamma(x)` (Lanczos, g = 7).
fn ln_gamma(x: f64) -> f64 {
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + 7.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Regularized upper incomplete gamma `Q(s, x)` (series below `s + 1`, continued fraction above).
pub fn gamma_q(s: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    let lg = ln_gamma(s);
    if x < s + 1.0 {
        let (mut sum, mut term, mut a) = (1.0 / s, 1.0 / s, s);
        for _ in 0..10_000 {
            a += 1.0;
            term *= x / a;
            sum += term;
            if term.abs() < sum.abs() * 1e-15 {
                break;
            }
        }
        (1.0 - sum * (-x + s * x.ln() - lg).exp()).clamp(0.0, 1.0)
    } else {
        let tiny = 1e-300;
        let mut b = x + 1.0 - s;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..10_000 {
            let an = -(i as f64) * (i as f64 - s);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let del = d * c;
            h *= del;
            if (del - 1.0).abs() < 1e-15 {
                break;
            }
        }
        ((-x + s * x.ln() - lg).exp() * h).clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn gamma_q_matches_known_chi_square_tails() {
        // chi2(1) tail at 3.841 is 0.05; chi2(10) at 18.307 is 0.05; chi2(255) at 293.25 is 0.05.
        for (dof, x) in [(1.0, 3.841_458_8), (10.0, 18.307_038), (255.0, 293.247_835)] {
            let p = gamma_q(dof / 2.0, x / 2.0);
            assert!((p - 0.05).abs() < 1e-4, "dof {dof}: {p}");
        }
        assert_eq!(gamma_q(2.0, 0.0), 1.0);
    }

    #[test]
    fn uniform_words_pass_and_structured_words_fail() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(9);
        let u: Vec<u64> = (0..20_000).map(|_| rng.random()).collect();
        assert!(bytes_chi_square(&u).p_value > 1e-4);
        assert!(bits_chi_square(&u).p_value > 1e-4);
        // Small fixed-point values (what an unmasked activation looks like) fail both.
        let s: Vec<u64> = (0..20_000)
            .map(|_| rng.random_range(-(1i64 << 24)..1 << 24) as u64)
            .collect();
        assert!(bytes_chi_square(&s).p_value < 1e-12);
        assert!(bits_chi_square(&s).p_value < 1e-12);
        let c = compare(&u, &u);
        assert_eq!((c.equal, c.hamming_bits), (1.0, 0.0));
        let v: Vec<u64> = (0..20_000).map(|_| rng.random()).collect();
        let c = compare(&u, &v);
        assert!(
            c.equal == 0.0 && (c.hamming_bits - 32.0).abs() < 0.2 && c.correlation.abs() < 0.03
        );
        assert!(c.difference.p_value > 1e-4);
    }
}
