//! Image helpers: SSIM (Wang et al. 2004) and a minimal grayscale PNG writer.
use crate::error::Result;
use std::io::Write;
use std::path::Path;

/// Mean SSIM of two `[h, w]` images in `[0, 1]` over 7x7 uniform windows (stride 1),
/// `C1 = (0.01)^2`, `C2 = (0.03)^2` (skimage's defaults for data range 1 with a uniform filter).
pub fn ssim(a: &[f32], b: &[f32], h: usize, w: usize) -> f64 {
    const WIN: usize = 7;
    let (c1, c2) = (1e-4f64, 9e-4f64);
    if h < WIN || w < WIN || a.len() != h * w || b.len() != h * w {
        return 0.0;
    }
    let np = (WIN * WIN) as f64;
    let mut total = 0.0;
    let mut cnt = 0usize;
    for i in 0..=h - WIN {
        for j in 0..=w - WIN {
            let (mut sa, mut sb, mut saa, mut sbb, mut sab) = (0.0f64, 0.0, 0.0, 0.0, 0.0);
            for di in 0..WIN {
                for dj in 0..WIN {
                    let x = a[(i + di) * w + j + dj] as f64;
                    let y = b[(i + di) * w + j + dj] as f64;
                    sa += x;
                    sb += y;
                    saa += x * x;
                    sbb += y * y;
                    sab += x * y;
                }
            }
            let (ma, mb) = (sa / np, sb / np);
            // sample covariance as in skimage (ddof = 1)
            let k = np / (np - 1.0);
            let va = (saa / np - ma * ma) * k;
            let vb = (sbb / np - mb * mb) * k;
            let cov = (sab / np - ma * mb) * k;
            total += ((2.0 * ma * mb + c1) * (2.0 * cov + c2))
                / ((ma * ma + mb * mb + c1) * (va + vb + c2));
            cnt += 1;
        }
    }
    total / cnt as f64
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Encode an 8-bit grayscale PNG from `[h, w]` values in `[0, 1]`.
pub fn png_gray(pixels: &[f32], h: usize, w: usize) -> Vec<u8> {
    let mut raw = Vec::with_capacity(h * (w + 1));
    for r in 0..h {
        raw.push(0u8); // filter: none
        for c in 0..w {
            let v = pixels.get(r * w + c).copied().unwrap_or(0.0);
            raw.push((v.clamp(0.0, 1.0) * 255.0).round() as u8);
        }
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    // writing into a Vec cannot fail
    let _ = z.write_all(&raw);
    let idat = z.finish().unwrap_or_default();
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8; 4], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut c = kind.to_vec();
        c.extend_from_slice(data);
        out.extend_from_slice(&c);
        out.extend_from_slice(&crc32(&c).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(w as u32).to_be_bytes());
    ihdr.extend_from_slice(&(h as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit, grayscale
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &idat);
    chunk(b"IEND", &[]);
    out
}

/// Tile `rows x cols` images of `[h, w]` into one grid with a 2-pixel white gutter and write it
/// as a PNG (atomically).
pub fn write_grid(path: &Path, images: &[Vec<f32>], cols: usize, h: usize, w: usize) -> Result<()> {
    let cols = cols.max(1);
    let rows = images.len().div_ceil(cols).max(1);
    let g = 2;
    let (gh, gw) = (rows * (h + g) + g, cols * (w + g) + g);
    let mut canvas = vec![1.0f32; gh * gw];
    for (k, img) in images.iter().enumerate() {
        let (r, c) = (k / cols, k % cols);
        for i in 0..h {
            for j in 0..w {
                canvas[(g + r * (h + g) + i) * gw + g + c * (w + g) + j] =
                    img.get(i * w + j).copied().unwrap_or(0.0);
            }
        }
    }
    Ok(umbra_common::fs::write_atomic(
        path,
        &png_gray(&canvas, gh, gw),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssim_is_one_for_identical_and_lower_for_noise() {
        let a: Vec<f32> = (0..28 * 28)
            .map(|i| ((i * 37) % 97) as f32 / 97.0)
            .collect();
        assert!((ssim(&a, &a, 28, 28) - 1.0).abs() < 1e-9);
        let b: Vec<f32> = a.iter().rev().cloned().collect();
        assert!(ssim(&a, &b, 28, 28) < 0.5);
        let c: Vec<f32> = a.iter().map(|v| v * 0.9 + 0.05).collect();
        assert!(ssim(&a, &c, 28, 28) > ssim(&a, &b, 28, 28));
    }

    #[test]
    fn png_has_signature_and_valid_crc() {
        let p = png_gray(&[0.0, 1.0, 0.5, 0.25], 2, 2);
        assert_eq!(&p[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&p[12..16], b"IHDR");
        // the CRC of IEND is the well-known AE426082
        assert_eq!(&p[p.len() - 4..], &[0xAE, 0x42, 0x60, 0x82]);
    }
}
