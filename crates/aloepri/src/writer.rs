//! A streaming safetensors writer: the header (all names, shapes and offsets) is written first,
//! then each tensor as soon as it is computed, so a compiler never holds the whole output.
use crate::error::{AloeError, Result};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Writes F32 tensors in a fixed order into one `.safetensors` file.
pub struct StreamingWriter {
    path: PathBuf,
    out: BufWriter<std::fs::File>,
    order: Vec<(String, Vec<usize>)>,
    next: usize,
    /// Elements of `order[next]` written so far (tensors may arrive in row chunks).
    filled: usize,
}

impl StreamingWriter {
    /// Creates the file and writes the header for `specs` (name, shape), in write order.
    pub fn create(
        path: &Path,
        specs: Vec<(String, Vec<usize>)>,
        metadata: BTreeMap<String, String>,
    ) -> Result<Self> {
        let mut header = serde_json::Map::new();
        if !metadata.is_empty() {
            header.insert(
                "__metadata__".into(),
                serde_json::to_value(metadata).expect("metadata"),
            );
        }
        let mut offset = 0usize;
        for (name, shape) in &specs {
            let bytes = shape.iter().product::<usize>() * 4;
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
        }
        let mut json = serde_json::to_vec(&header).expect("header");
        while !json.len().is_multiple_of(8) {
            json.push(b' ');
        }
        let file = std::fs::File::create(path).map_err(|e| AloeError::io(path, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let io = |e| AloeError::io(path, e);
        out.write_all(&(json.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(&json).map_err(io)?;
        Ok(Self {
            path: path.into(),
            out,
            order: specs,
            next: 0,
            filled: 0,
        })
    }

    /// Writes the next tensor, or the next rows of it: `t` is the whole tensor or a chunk of rows
    /// (same trailing dims); the writer moves on once all of its elements have arrived.
    pub fn write(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let (want_name, want_shape) = self
            .order
            .get(self.next)
            .ok_or_else(|| AloeError::Input(format!("unexpected extra tensor `{name}`")))?;
        let total: usize = want_shape.iter().product();
        let fits = if self.filled == 0 && t.dims() == want_shape.as_slice() {
            true
        } else {
            want_shape.len() > 1 && t.rank() == want_shape.len() && t.dims()[1..] == want_shape[1..]
        };
        if want_name != name || !fits || self.filled + t.elem_count() > total {
            return Err(AloeError::Input(format!(
                "writer expected `{want_name}` {want_shape:?} ({} of {total} written), got `{name}` {:?}",
                self.filled,
                t.dims()
            )));
        }
        let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut buf = Vec::with_capacity(1 << 16);
        for chunk in data.chunks(1 << 14) {
            buf.clear();
            for x in chunk {
                if !x.is_finite() {
                    return Err(AloeError::Input(format!(
                        "tensor `{name}` has non-finite values"
                    )));
                }
                buf.extend_from_slice(&x.to_le_bytes());
            }
            self.out
                .write_all(&buf)
                .map_err(|e| AloeError::io(&self.path, e))?;
        }
        self.filled += data.len();
        if self.filled == total {
            self.next += 1;
            self.filled = 0;
        }
        Ok(())
    }

    /// Flushes and fsyncs; fails if a tensor of the header was never written.
    pub fn finish(self) -> Result<()> {
        finish_file(self.out, &self.path, self.next, self.order.len(), "tensors")
    }
}

/// Ends a streamed file: fails unless all `planned` tensors (`what`) of its header were written,
/// then flushes and fsyncs it.
pub(crate) fn finish_file(
    out: BufWriter<std::fs::File>,
    path: &Path,
    written: usize,
    planned: usize,
    what: &str,
) -> Result<()> {
    if written != planned {
        return Err(AloeError::Input(format!(
            "only {written} of {planned} {what} were written"
        )));
    }
    let file = out
        .into_inner()
        .map_err(|e| AloeError::io(path, e.into_error()))?;
    file.sync_all().map_err(|e| AloeError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn writes_a_file_safetensors_can_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let a = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = Tensor::new(&[7f32], &Device::Cpu).unwrap();
        let mut w = StreamingWriter::create(
            &p,
            vec![("z.a".into(), vec![2, 3]), ("a.b".into(), vec![1])],
            BTreeMap::from([("format".to_string(), "pt".to_string())]),
        )
        .unwrap();
        assert!(w.write("a.b", &b).is_err(), "out of order must fail");
        w.write("z.a", &a.narrow(0, 0, 1).unwrap()).unwrap();
        assert!(w.write("a.b", &b).is_err(), "z.a is only half written");
        w.write("z.a", &a.narrow(0, 1, 1).unwrap()).unwrap();
        w.write("a.b", &b).unwrap();
        w.finish().unwrap();
        let loaded = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
        assert_eq!(
            loaded["z.a"].to_vec2::<f32>().unwrap(),
            a.to_vec2::<f32>().unwrap()
        );
        assert_eq!(loaded["a.b"].to_vec1::<f32>().unwrap(), vec![7.0]);
    }

    #[test]
    fn unfinished_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let w = StreamingWriter::create(
            &dir.path().join("x"),
            vec![("a".into(), vec![1])],
            BTreeMap::new(),
        )
        .unwrap();
        assert!(w.finish().is_err());
    }
}
