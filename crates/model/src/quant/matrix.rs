//! [`QMatrix`]: a `[rows, cols]` matrix in one ggml block type, rows of whole blocks (HF
//! `[out, in]` orientation: one row per output feature). Rows of the 32-element types are held in
//! the split layout of [`super::layout`] (same bytes, fields grouped); [`QMatrix::gguf_row`]
//! gives them back in GGUF order.
use super::dequant::dequantize;
use super::layout;
use super::QuantType;
use crate::error::{ModelError, Result};

#[derive(Clone)]
pub struct QMatrix {
    ty: QuantType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({} [{}, {}])", self.ty, self.rows, self.cols)
    }
}

impl QMatrix {
    /// Wraps GGUF-ordered `data` (`rows` rows of `cols` elements of type `ty`);
    /// [`ModelError::Mismatch`] when `cols` is not whole blocks or the byte count is wrong.
    pub fn new(ty: QuantType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        let row_bytes = ty.bytes_for(cols).ok_or_else(|| {
            ModelError::Mismatch(format!(
                "{cols} columns are not whole {ty} blocks of {}",
                ty.block_size()
            ))
        })?;
        if Some(data.len()) != row_bytes.checked_mul(rows) {
            return Err(ModelError::Mismatch(format!(
                "{} bytes for a [{rows}, {cols}] {ty} matrix (expected {} x {row_bytes})",
                data.len(),
                rows
            )));
        }
        let data = if layout::is_split(ty) {
            let mut out = vec![0u8; data.len()];
            for (src, dst) in data
                .chunks_exact(row_bytes.max(1))
                .zip(out.chunks_exact_mut(row_bytes.max(1)))
            {
                layout::split_row(ty, src, dst);
            }
            out
        } else {
            data
        };
        Ok(Self {
            ty,
            rows,
            cols,
            row_bytes,
            data,
        })
    }

    /// Quantizes F32 `w` (`[rows, cols]` row-major) to `ty` with llama.cpp's reference
    /// quantizers (through candle's ports of them).
    pub fn quantize(w: &[f32], rows: usize, cols: usize, ty: QuantType) -> Result<Self> {
        use candle_core::quantized::QTensor;
        if w.len() != rows * cols {
            return Err(ModelError::Mismatch(format!(
                "{} values for a [{rows}, {cols}] matrix",
                w.len()
            )));
        }
        ty.bytes_for(cols).ok_or_else(|| {
            ModelError::Unsupported(format!(
                "cannot quantize rows of {cols} to {ty} (blocks of {})",
                ty.block_size()
            ))
        })?;
        let dt = ty.ggml_dtype();
        let t = candle_core::Tensor::from_slice(w, (rows, cols), &candle_core::Device::Cpu)?;
        let q = QTensor::quantize(&t, dt)?;
        Self::new(ty, rows, cols, q.data()?.into_owned())
    }

    pub fn ty(&self) -> QuantType {
        self.ty
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// All packed bytes, row after row, in the in-memory layout.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// The packed bytes of row `r` in the in-memory layout (panics when `r >= rows`).
    #[inline]
    pub fn row_bytes(&self, r: usize) -> &[u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Row `r` in GGUF block order (panics when `r >= rows`).
    pub fn gguf_row(&self, r: usize) -> std::borrow::Cow<'_, [u8]> {
        let row = self.row_bytes(r);
        if layout::is_split(self.ty) {
            let mut out = vec![0u8; row.len()];
            layout::join_row(self.ty, row, &mut out);
            out.into()
        } else {
            row.into()
        }
    }

    /// All rows in GGUF block order (what a GGUF file holds).
    pub fn gguf_bytes(&self) -> Vec<u8> {
        (0..self.rows)
            .flat_map(|r| self.gguf_row(r).into_owned())
            .collect()
    }

    /// Row `r` dequantized into `out` (`cols` values).
    pub fn dequantize_row_into(&self, r: usize, out: &mut [f32]) -> Result<()> {
        if r >= self.rows {
            return Err(ModelError::Input(format!(
                "row {r} of a matrix of {} rows",
                self.rows
            )));
        }
        dequantize(self.ty, &self.gguf_row(r), out)
    }

    /// Row `r` dequantized.
    pub fn dequantize_row(&self, r: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.cols];
        self.dequantize_row_into(r, &mut out)?;
        Ok(out)
    }

    /// The whole matrix dequantized, `[rows, cols]` row-major.
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, o) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            dequantize(self.ty, &self.gguf_row(r), o)?;
        }
        Ok(out)
    }

    /// Rows `rows` of `self` reordered: row `i` of the result is row `order[i]`.
    pub fn reorder_rows(&self, order: &[usize]) -> Result<Self> {
        if order.len() != self.rows || order.iter().any(|&r| r >= self.rows) {
            return Err(ModelError::Mismatch(format!(
                "row order of {} entries for {} rows",
                order.len(),
                self.rows
            )));
        }
        let mut data = Vec::with_capacity(self.data.len());
        for &r in order {
            data.extend_from_slice(self.row_bytes(r));
        }
        Ok(Self {
            data,
            ..self.clone_shape()
        })
    }

    fn clone_shape(&self) -> Self {
        Self {
            ty: self.ty,
            rows: self.rows,
            cols: self.cols,
            row_bytes: self.row_bytes,
            data: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_sizes_and_reorders_rows() {
        assert!(QMatrix::new(QuantType::Q8_0, 2, 32, vec![0; 68]).is_ok());
        assert!(QMatrix::new(QuantType::Q8_0, 2, 32, vec![0; 67]).is_err());
        assert!(QMatrix::new(QuantType::Q4_K, 1, 576, vec![0; 144]).is_err());
        let w: Vec<f32> = (0..3 * 64).map(|i| i as f32 / 10.0).collect();
        let m = QMatrix::quantize(&w, 3, 64, QuantType::Q8_0).unwrap();
        let r = m.reorder_rows(&[2, 0, 1]).unwrap();
        assert_eq!(r.dequantize_row(0).unwrap(), m.dequantize_row(2).unwrap());
        assert_eq!(r.dequantize_row(1).unwrap(), m.dequantize_row(0).unwrap());
        assert!(m.dequantize_row(3).is_err());
        assert!(m.reorder_rows(&[0, 0]).is_err());
        // The split in-memory layout gives the GGUF bytes back.
        let g = m.gguf_bytes();
        assert_eq!(
            QMatrix::new(QuantType::Q8_0, 3, 64, g.clone())
                .unwrap()
                .gguf_bytes(),
            g
        );
        assert_ne!(m.bytes(), &g[..]);
        let back = m.dequantize().unwrap();
        // Q8_0: within half a step (max |w| / 254) of each block.
        assert!(back
            .iter()
            .zip(&w)
            .all(|(a, b)| (a - b).abs() <= 19.2 / 254.0));
    }
}
