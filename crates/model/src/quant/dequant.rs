//! Exact dequantization of ggml blocks to f32 (the same f32 operations in the same order as
//! llama.cpp's `dequantize_row_*` and the `gguf` Python package, so results are bit-identical).
//!
//! `Q2_K` and `Q3_K` go through candle's dequantizer (they are read, not kept quantized).
use super::QuantType;
use crate::error::{ModelError, Result};

/// An f16 stored little-endian at `b[0..2]`, as f32 (exact).
#[inline(always)]
pub fn f16_at(b: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// The six-bit scale and min of sub-block `j` (0..8) of a `Q4_K`/`Q5_K` block's `scales[12]`:
/// sub-blocks 0..3 keep their low six bits in bytes `j` and `j + 4`; sub-blocks 4..7 keep their
/// low four bits in the nibbles of byte `j + 4` and their top two bits in the top bits of bytes
/// `j - 4` (scale) and `j` (min).
#[inline(always)]
pub fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Dequantizes `out.len()` elements of type `ty` from `bytes` (exactly the bytes of those
/// elements). [`ModelError::Mismatch`] when the lengths disagree.
pub fn dequantize(ty: QuantType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let n = out.len();
    if ty.bytes_for(n) != Some(bytes.len()) {
        return Err(ModelError::Mismatch(format!(
            "{} bytes do not hold {n} {ty} elements",
            bytes.len()
        )));
    }
    let bs = ty.block_size();
    let bb = ty.block_bytes();
    let blocks = bytes.chunks_exact(bb).zip(out.chunks_exact_mut(bs));
    match ty {
        QuantType::F32 => {
            for (b, o) in blocks {
                o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        QuantType::F16 => {
            for (b, o) in blocks {
                o[0] = f16_at(b);
            }
        }
        QuantType::BF16 => {
            for (b, o) in blocks {
                o[0] = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        QuantType::Q4_0 => blocks.for_each(|(b, o)| q4_0(b, o)),
        QuantType::Q4_1 => blocks.for_each(|(b, o)| q4_1(b, o)),
        QuantType::Q5_0 => blocks.for_each(|(b, o)| q5_0(b, o)),
        QuantType::Q5_1 => blocks.for_each(|(b, o)| q5_1(b, o)),
        QuantType::Q8_0 => blocks.for_each(|(b, o)| q8_0(b, o)),
        QuantType::Q4_K => blocks.for_each(|(b, o)| q4_k(b, o)),
        QuantType::Q5_K => blocks.for_each(|(b, o)| q5_k(b, o)),
        QuantType::Q6_K => blocks.for_each(|(b, o)| q6_k(b, o)),
        QuantType::Q2_K | QuantType::Q3_K => via_candle(ty, bytes, out)?,
    }
    Ok(())
}

fn via_candle(ty: QuantType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    use candle_core::quantized::{GgmlDType, QStorage, QTensor};
    let dt = match ty {
        QuantType::Q2_K => GgmlDType::Q2K,
        _ => GgmlDType::Q3K,
    };
    let dev = candle_core::Device::Cpu;
    let st = QStorage::from_data(std::borrow::Cow::Borrowed(bytes), &dev, dt)?;
    let t = QTensor::new(st, out.len())?.dequantize(&dev)?;
    out.copy_from_slice(&t.to_vec1::<f32>()?);
    Ok(())
}

fn q4_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b);
    let qs = &b[2..18];
    for j in 0..16 {
        o[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        o[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

fn q4_1(b: &[u8], o: &mut [f32]) {
    let (d, m) = (f16_at(b), f16_at(&b[2..]));
    let qs = &b[4..20];
    for j in 0..16 {
        o[j] = (qs[j] & 0x0F) as f32 * d + m;
        o[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

fn q5_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        o[j] = (((qs[j] & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
        o[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
    }
}

fn q5_1(b: &[u8], o: &mut [f32]) {
    let (d, m) = (f16_at(b), f16_at(&b[2..]));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        o[j] = ((qs[j] & 0x0F) as u32 | h0) as f32 * d + m;
        o[j + 16] = ((qs[j] >> 4) as u32 | h1) as f32 * d + m;
    }
}

fn q8_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b);
    for (o, &q) in o.iter_mut().zip(&b[2..34]) {
        *o = (q as i8) as f32 * d;
    }
}

fn q4_k(b: &[u8], o: &mut [f32]) {
    let (d, dmin) = (f16_at(b), f16_at(&b[2..]));
    let sc = &b[4..16];
    let qs = &b[16..144];
    for j in 0..4 {
        let (s1, m1) = scale_min_k4(2 * j, sc);
        let (s2, m2) = scale_min_k4(2 * j + 1, sc);
        let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
        let q = &qs[32 * j..32 * j + 32];
        let o = &mut o[64 * j..64 * j + 64];
        for l in 0..32 {
            o[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            o[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

fn q5_k(b: &[u8], o: &mut [f32]) {
    let (d, dmin) = (f16_at(b), f16_at(&b[2..]));
    let sc = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for j in 0..4 {
        let (s1, m1) = scale_min_k4(2 * j, sc);
        let (s2, m2) = scale_min_k4(2 * j + 1, sc);
        let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
        let q = &qs[32 * j..32 * j + 32];
        let o = &mut o[64 * j..64 * j + 64];
        for l in 0..32 {
            let h1 = if qh[l] & (1 << (2 * j)) != 0 { 16 } else { 0 };
            let h2 = if qh[l] & (2 << (2 * j)) != 0 { 16 } else { 0 };
            o[l] = d1 * ((q[l] & 0x0F) + h1) as f32 - m1;
            o[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
        }
    }
}

fn q6_k(b: &[u8], o: &mut [f32]) {
    let d = f16_at(&b[208..]);
    let sc = &b[192..208];
    for h in 0..2 {
        let ql = &b[64 * h..64 * h + 64];
        let qh = &b[128 + 32 * h..128 + 32 * h + 32];
        let sc = &sc[8 * h..8 * h + 8];
        let o = &mut o[128 * h..128 * h + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |i: usize| d * (sc[i] as i8) as f32;
            o[l] = s(is) * q1 as f32;
            o[l + 32] = s(is + 2) * q2 as f32;
            o[l + 64] = s(is + 4) * q3 as f32;
            o[l + 96] = s(is + 6) * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// Our dequantization equals candle's (an independent port of llama.cpp's) on data quantized
    /// by candle, bit for bit.
    #[test]
    fn matches_candle_bit_for_bit() {
        let dev = Device::Cpu;
        let n = 4 * 256;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 13) as f32))
            .collect();
        let t = Tensor::from_vec(x, n, &dev).unwrap();
        for (ty, dt) in [
            (QuantType::Q4_0, GgmlDType::Q4_0),
            (QuantType::Q4_1, GgmlDType::Q4_1),
            (QuantType::Q5_0, GgmlDType::Q5_0),
            (QuantType::Q5_1, GgmlDType::Q5_1),
            (QuantType::Q8_0, GgmlDType::Q8_0),
            (QuantType::Q4_K, GgmlDType::Q4K),
            (QuantType::Q5_K, GgmlDType::Q5K),
            (QuantType::Q6_K, GgmlDType::Q6K),
            (QuantType::F16, GgmlDType::F16),
            (QuantType::BF16, GgmlDType::BF16),
        ] {
            let q = QTensor::quantize(&t, dt).unwrap();
            let bytes = q.data().unwrap();
            let want = q.dequantize(&dev).unwrap().to_vec1::<f32>().unwrap();
            let mut got = vec![0f32; n];
            dequantize(ty, &bytes, &mut got).unwrap();
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{ty} at {i}: {a} vs {b}");
            }
        }
        let mut out = vec![0f32; 31];
        assert!(dequantize(QuantType::Q8_0, &[0u8; 34], &mut out).is_err());
    }
}
