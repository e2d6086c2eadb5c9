//! The customer's clean cut-layer outputs on disk. Its bottom (embeddings + `k` frozen blocks)
//! is deterministic, so each sequence's output is computed once and reused by every run (noise
//! is added per run on top).
//!
//! A file holds one part (train / test / public) at one split: `b"SAPCUT1\0"`, `n: u64`,
//! `d: u64`, the `n` lengths (`u32`), then `sum(len) x d` values (`f32`), little endian. Its
//! name is a hash of the encoder's config and weight-file size, the split, and every token id of
//! the part, so a change of model, tokenizer, `max_len` or data selection gets a new file.
use crate::error::{Result, SapError};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"SAPCUT1\0";

/// FNV-1a over bytes, continuing from `h`.
pub fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    h
}

/// The identity of an encoder folder: its config and the size of its weights.
pub fn model_key(dir: &Path) -> Result<u64> {
    let cp = dir.join("config.json");
    let cfg = std::fs::read(&cp).map_err(|e| SapError::io(&cp, e))?;
    let wp = dir.join("model.safetensors");
    let len = std::fs::metadata(&wp)
        .map_err(|e| SapError::io(&wp, e))?
        .len();
    Ok(fnv1a(fnv1a(0xcbf29ce484222325, &cfg), &len.to_le_bytes()))
}

/// The file for `seqs` at split `k` of the model with key `model`.
pub fn path_for(dir: &Path, model: u64, k: usize, seqs: &[Vec<u32>]) -> PathBuf {
    let mut h = fnv1a(model, &(k as u64).to_le_bytes());
    for s in seqs {
        h = fnv1a(h, &(s.len() as u32).to_le_bytes());
        for t in s {
            h = fnv1a(h, &t.to_le_bytes());
        }
    }
    dir.join(format!("cut-k{k}-n{}-{h:016x}.bin", seqs.len()))
}

/// Writes one part atomically.
pub fn save(path: &Path, rows: &[Vec<f32>], d: usize) -> Result<()> {
    let (stage, f) = umbra_common::fs::Staging::file(path)?;
    let io = |e| SapError::io(stage.path(), e);
    let mut w = BufWriter::new(f);
    w.write_all(MAGIC).map_err(io)?;
    w.write_all(&(rows.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&(d as u64).to_le_bytes()).map_err(io)?;
    for r in rows {
        w.write_all(&((r.len() / d.max(1)) as u32).to_le_bytes())
            .map_err(io)?;
    }
    for r in rows {
        for v in r {
            w.write_all(&v.to_le_bytes()).map_err(io)?;
        }
    }
    w.flush().map_err(io)?;
    drop(w);
    stage.commit(true)?;
    Ok(())
}

/// Reads one part; `None` when the file does not exist. A file that does not hold `lengths`
/// (or is cut short) is an error naming it.
pub fn load(path: &Path, lengths: &[usize], d: usize) -> Result<Option<Vec<Vec<f32>>>> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SapError::io(path, e)),
    };
    let bad = |what: &str| {
        SapError::Data(format!(
            "{}: {what}; delete it to recompute",
            path.display()
        ))
    };
    let mut r = BufReader::new(f);
    let mut head = [0u8; 24];
    r.read_exact(&mut head)
        .map_err(|_| bad("truncated header"))?;
    let n = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default()) as usize;
    let dd = u64::from_le_bytes(head[16..24].try_into().unwrap_or_default()) as usize;
    if &head[..8] != MAGIC || n != lengths.len() || dd != d {
        return Err(bad("not a cut-layer cache of this data"));
    }
    let mut buf = vec![0u8; n * 4];
    r.read_exact(&mut buf)
        .map_err(|_| bad("truncated lengths"))?;
    for (c, &l) in buf.chunks_exact(4).zip(lengths) {
        if u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize != l {
            return Err(bad("sequence lengths differ"));
        }
    }
    let mut out = Vec::with_capacity(n);
    for &l in lengths {
        let mut b = vec![0u8; l * d * 4];
        r.read_exact(&mut b).map_err(|_| bad("truncated values"))?;
        out.push(
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        );
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let seqs = vec![vec![1u32, 2], vec![3]];
        let p = path_for(dir.path(), 7, 6, &seqs);
        assert_ne!(p, path_for(dir.path(), 7, 5, &seqs));
        assert_ne!(p, path_for(dir.path(), 8, 6, &seqs));
        assert!(load(&p, &[2, 1], 2).unwrap().is_none());
        let rows = vec![vec![1.0f32, 2., 3., 4.], vec![5., 6.]];
        save(&p, &rows, 2).unwrap();
        assert_eq!(load(&p, &[2, 1], 2).unwrap().unwrap(), rows);
        assert!(load(&p, &[1, 1], 2).is_err());
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        let e = load(&p, &[2, 1], 2).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }
}
