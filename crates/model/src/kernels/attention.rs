//! Decode attention (one new position per sequence) read straight from the KV buffers.
use super::dot;
use super::pool::{parallel_for, SharedMut};

/// `q`: `[b, nh, hd]` (pre-scaled by `1/sqrt(hd)`), `kbuf`/`vbuf`: `[b, nkv, cap, hd]` with
/// keys `0..l` valid; head `h` reads KV head `h / (nh / nkv)`. Returns `[b, nh * hd]`.
///
/// The `b * nh` (row, head) pairs are split across the pool's threads
/// ([`super::pool::parallel_for`]) once the cache is long enough to pay for it.
#[allow(clippy::too_many_arguments)]
pub fn attend_one(
    q: &[f32],
    kbuf: &[f32],
    vbuf: &[f32],
    b: usize,
    nh: usize,
    nkv: usize,
    cap: usize,
    hd: usize,
    l: usize,
) -> Vec<f32> {
    let rep = nh / nkv;
    let mut out = vec![0f32; b * nh * hd];
    let shared = SharedMut::new(&mut out);
    let parallel = b * nh * l * hd >= 1 << 16;
    parallel_for(b * nh, 1, parallel, |pairs| {
        let mut scores = vec![0f32; l];
        for bh in pairs {
            let (bi, h) = (bh / nh, bh % nh);
            let g = h / rep;
            let base = (bi * nkv + g) * cap * hd;
            let qv = &q[bh * hd..(bh + 1) * hd];
            // SAFETY: pair bh owns out[bh * hd..(bh + 1) * hd]; pairs go to one thread each.
            let o = unsafe { shared.slice(bh * hd, hd) };
            let mut mx = f32::NEG_INFINITY;
            for (j, s) in scores.iter_mut().enumerate() {
                *s = dot(qv, &kbuf[base + j * hd..base + (j + 1) * hd]);
                mx = mx.max(*s);
            }
            let mut z = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - mx).exp();
                z += *s;
            }
            let inv = 1.0 / z;
            for (j, s) in scores.iter().enumerate() {
                let p = s * inv;
                let vr = &vbuf[base + j * hd..base + (j + 1) * hd];
                for (oc, vc) in o.iter_mut().zip(vr) {
                    *oc += p * vc;
                }
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a direct softmax-weighted sum, with GQA (2 query heads per KV head) and a
    /// buffer capacity larger than the valid length.
    #[test]
    fn matches_direct_softmax() {
        for (b, nh, nkv, cap, hd, l) in [(2, 4, 2, 7, 3, 5), (2, 8, 2, 700, 64, 650)] {
            check(b, nh, nkv, cap, hd, l);
        }
    }

    fn check(b: usize, nh: usize, nkv: usize, cap: usize, hd: usize, l: usize) {
        {
            let f = |i: usize| ((i * 37 % 23) as f32 - 11.0) / 7.0;
            let q: Vec<f32> = (0..b * nh * hd).map(f).collect();
            let k: Vec<f32> = (0..b * nkv * cap * hd).map(|i| f(i + 5)).collect();
            let v: Vec<f32> = (0..b * nkv * cap * hd).map(|i| f(i + 9)).collect();
            let y = attend_one(&q, &k, &v, b, nh, nkv, cap, hd, l);
            for bi in 0..b {
                for h in 0..nh {
                    let g = h / (nh / nkv);
                    let base = (bi * nkv + g) * cap * hd;
                    let qv = &q[(bi * nh + h) * hd..][..hd];
                    let s: Vec<f64> = (0..l)
                        .map(|j| (0..hd).map(|c| (qv[c] * k[base + j * hd + c]) as f64).sum())
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    for c in 0..hd {
                        let want: f64 = (0..l)
                            .map(|j| (s[j] - m).exp() / z * v[base + j * hd + c] as f64)
                            .sum();
                        let got = y[(bi * nh + h) * hd + c] as f64;
                        assert!(
                            (got - want).abs() < 1e-5 * (1.0 + want.abs() * l as f64),
                            "{bi} {h} {c}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
