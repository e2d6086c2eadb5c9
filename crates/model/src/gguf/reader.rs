//! The GGUF header (magic, version, metadata, tensor table) read with every length checked
//! against the file, so that a truncated, corrupt or unsupported file is a typed error
//! ([`ModelError::Truncated`], [`ModelError::Malformed`], [`ModelError::UnsupportedQuant`])
//! before any tensor is read, and no length in the file can trigger a huge allocation.
//!
//! Layout (little-endian; v1 uses u32 where v2/v3 use u64 for counts and string lengths):
//! `"GGUF" u32 version, n_tensors, n_kv, n_kv x (string key, u32 type, value),
//! n_tensors x (string name, u32 n_dims, n_dims x u64 ne, u32 ggml_type, u64 offset)`, then
//! padding to `general.alignment` (default 32), then the tensor data, each tensor at its offset.
//! `ne[0]` is the innermost (column) count: the tensor's shape rows-first is `ne` reversed.
use crate::error::{ModelError, Result};
use crate::quant::QuantType;
use candle_core::quantized::gguf_file::Value;
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

/// One tensor of the table, located and sized.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    pub ty: QuantType,
    /// Rows first (numpy/PyTorch order): `ne` reversed.
    pub shape: Vec<usize>,
    /// Absolute offset of the data in the file.
    pub offset: u64,
    /// Bytes of data.
    pub bytes: u64,
}

impl TensorEntry {
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The parsed header.
#[derive(Debug)]
pub struct Header {
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    /// In file order.
    pub tensors: Vec<(String, TensorEntry)>,
    /// Where the tensor data starts.
    pub data_offset: u64,
    pub file_len: u64,
}

struct Cursor<R> {
    r: R,
    pos: u64,
    len: u64,
    path: PathBuf,
    wide: bool,
}

impl<R: Read> Cursor<R> {
    fn truncated(&self, what: &str, need: u64) -> ModelError {
        ModelError::Truncated {
            path: self.path.clone(),
            what: what.to_string(),
            needed: self.pos.saturating_add(need),
            len: self.len,
        }
    }

    fn malformed(&self, msg: String) -> ModelError {
        ModelError::Malformed {
            path: self.path.clone(),
            msg,
        }
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        if self.pos + N as u64 > self.len {
            return Err(self.truncated(what, N as u64));
        }
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|e| ModelError::io(&self.path, e))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    /// A count or length: u64 in v2/v3, u32 in v1.
    fn len_prefix(&mut self, what: &str) -> Result<u64> {
        if self.wide {
            self.u64(what)
        } else {
            self.u32(what).map(u64::from)
        }
    }

    /// Checks that `count` items of at least `min` bytes each can still fit in the file.
    fn check_fits(&self, what: &str, count: u64, min: u64) -> Result<()> {
        let need = count.saturating_mul(min);
        if need > self.len - self.pos {
            return Err(self.truncated(what, need));
        }
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len_prefix(what)?;
        self.check_fits(what, n, 1)?;
        let mut b = vec![0u8; n as usize];
        self.r
            .read_exact(&mut b)
            .map_err(|e| ModelError::io(&self.path, e))?;
        self.pos += n;
        String::from_utf8(b).map_err(|_| self.malformed(format!("{what} is not UTF-8")))
    }

    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.bytes::<1>(what)?[0]),
            1 => Value::I8(self.bytes::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.bytes(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.bytes(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes(what)?)),
            7 => Value::Bool(self.bytes::<1>(what)?[0] != 0),
            8 => Value::String(self.string(what)?),
            9 => {
                if depth > 2 {
                    return Err(self.malformed(format!("{what}: arrays nested too deep")));
                }
                let et = self.u32(what)?;
                let n = self.len_prefix(what)?;
                let min = match et {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    10..=12 => 8,
                    8 => {
                        if self.wide {
                            8
                        } else {
                            4
                        }
                    }
                    9 => 12,
                    t => return Err(self.malformed(format!("{what}: unknown value type {t}"))),
                };
                self.check_fits(what, n, min)?;
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(et, what, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.bytes(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes(what)?)),
            t => return Err(self.malformed(format!("{what}: unknown value type {t}"))),
        })
    }
}

/// Reads and checks the header of the GGUF file at `path`.
pub fn read_header(path: &Path) -> Result<Header> {
    let f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let len = f.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let mut c = Cursor {
        r: std::io::BufReader::with_capacity(1 << 16, f),
        pos: 0,
        len,
        path: path.into(),
        wide: true,
    };
    let magic = c.bytes::<4>("magic")?;
    if &magic != b"GGUF" {
        return Err(c.malformed(format!("not a GGUF file (magic {magic:02x?})")));
    }
    let version = c.u32("version")?;
    if !(1..=3).contains(&version) {
        return Err(c.malformed(format!("GGUF version {version} (this reader knows 1 to 3)")));
    }
    c.wide = version >= 2;
    let n_tensors = c.len_prefix("tensor count")?;
    let n_kv = c.len_prefix("metadata count")?;
    // A key-value pair takes at least 13 bytes (v2), a tensor entry at least 28.
    c.check_fits("metadata", n_kv, 13)?;
    c.check_fits("tensor table", n_tensors, 28)?;
    let mut metadata = HashMap::with_capacity(n_kv as usize);
    for i in 0..n_kv {
        let key = c.string(&format!("metadata key {i}"))?;
        let ty = c.u32(&format!("metadata `{key}`"))?;
        let v = c.value(ty, &format!("metadata `{key}`"), 0)?;
        if metadata.insert(key.clone(), v).is_some() {
            return Err(c.malformed(format!("metadata key `{key}` appears twice")));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(Value::U32(a)) if a.is_power_of_two() => *a as u64,
        Some(Value::U64(a)) if a.is_power_of_two() => *a,
        Some(v) => {
            return Err(c.malformed(format!("general.alignment {v:?} is not a power of two")));
        }
    };
    let mut raw = Vec::with_capacity(n_tensors as usize);
    let mut seen = HashSet::new();
    for i in 0..n_tensors {
        let name = c.string(&format!("tensor {i} name"))?;
        let what = format!("tensor `{name}`");
        let n_dims = c.u32(&what)?;
        if !(1..=4).contains(&n_dims) {
            return Err(c.malformed(format!("{what} has {n_dims} dimensions")));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            ne.push(c.len_prefix(&what)?);
        }
        let ty = QuantType::from_ggml(c.u32(&what)?, &name)?;
        let offset = c.u64(&what)?;
        if !seen.insert(name.clone()) {
            return Err(c.malformed(format!("{what} appears twice")));
        }
        raw.push((name, ne, ty, offset));
    }
    let data_offset = c.pos.div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, ne, ty, offset) in raw {
        let what = format!("tensor `{name}`");
        let elems = ne
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&e| e <= usize::MAX as u64 / 4)
            .ok_or_else(|| c.malformed(format!("{what}: dimensions {ne:?} overflow")))?;
        let bytes = ty.bytes_for(elems as usize).ok_or_else(|| {
            c.malformed(format!(
                "{what}: {elems} elements are not whole {ty} blocks of {}",
                ty.block_size()
            ))
        })? as u64;
        if ty.block_size() > 1 && ne[0] % ty.block_size() as u64 != 0 {
            return Err(c.malformed(format!(
                "{what}: rows of {} are not whole {ty} blocks of {}",
                ne[0],
                ty.block_size()
            )));
        }
        if offset % alignment != 0 {
            return Err(c.malformed(format!(
                "{what}: data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        let start = data_offset
            .checked_add(offset)
            .ok_or_else(|| c.malformed(format!("{what}: offset {offset} overflows")))?;
        let end = start.saturating_add(bytes);
        if end > len {
            return Err(ModelError::Truncated {
                path: path.into(),
                what: format!("{what} ({ty}, {bytes} bytes at {start})"),
                needed: end,
                len,
            });
        }
        let shape = ne.iter().rev().map(|&d| d as usize).collect();
        tensors.push((
            name,
            TensorEntry {
                ty,
                shape,
                offset: start,
                bytes,
            },
        ));
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        data_offset,
        file_len: len,
    })
}

/// Reads a tensor's bytes (its range was checked against the file length by [`read_header`]).
pub fn read_tensor_bytes(path: &Path, t: &TensorEntry) -> Result<Vec<u8>> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    f.seek(SeekFrom::Start(t.offset))
        .map_err(|e| ModelError::io(path, e))?;
    let mut b = vec![0u8; t.bytes as usize];
    f.read_exact(&mut b).map_err(|e| ModelError::io(path, e))?;
    Ok(b)
}
