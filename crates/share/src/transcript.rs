//! A server's view, recorded: every PRODUCT it received, as received (`umbra serve --share
//! --record a.bin`). `umbra attack shares` reads it back.
//!
//! ```text
//! file   = "UMBRATR1" | fingerprint: [u8; 32] | maps: u32 | maps x (in: u32, out: u32) | record*
//! record = connection: u64 | linear: u32 | rows: u32 | rows x in shares: u64
//! ```
use crate::error::{Result, ShareError};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub const MAGIC: [u8; 8] = *b"UMBRATR1";

/// One received PRODUCT.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub connection: u64,
    pub linear: u32,
    pub rows: u32,
    /// `[rows, in]`.
    pub shares: Vec<u64>,
}

/// Appends records to a file (a server's recorder; one record per PRODUCT, flushed at once).
#[derive(Debug)]
pub struct Recorder {
    path: PathBuf,
    out: Mutex<BufWriter<std::fs::File>>,
}

impl Recorder {
    /// Creates (truncates) `path` and writes the header.
    pub fn create(path: &Path, fingerprint: &[u8; 32], table: &[(u32, u32)]) -> Result<Self> {
        let f = std::fs::File::create(path).map_err(|e| ShareError::io(path, e))?;
        let mut w = BufWriter::new(f);
        let mut head = MAGIC.to_vec();
        head.extend_from_slice(fingerprint);
        head.extend_from_slice(&(table.len() as u32).to_le_bytes());
        for (k, n) in table {
            head.extend_from_slice(&k.to_le_bytes());
            head.extend_from_slice(&n.to_le_bytes());
        }
        w.write_all(&head)
            .and_then(|_| w.flush())
            .map_err(|e| ShareError::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: Mutex::new(w),
        })
    }

    /// Records one PRODUCT; `shares` are its raw little-endian bytes.
    pub fn record(&self, connection: u64, linear: u32, rows: u32, shares: &[u8]) -> Result<()> {
        let mut w = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let mut head = [0u8; 16];
        head[..8].copy_from_slice(&connection.to_le_bytes());
        head[8..12].copy_from_slice(&linear.to_le_bytes());
        head[12..].copy_from_slice(&rows.to_le_bytes());
        w.write_all(&head)
            .and_then(|_| w.write_all(shares))
            .and_then(|_| w.flush())
            .map_err(|e| ShareError::io(&self.path, e))
    }
}

/// A recorded transcript read back.
#[derive(Debug, Clone)]
pub struct Transcript {
    pub fingerprint: [u8; 32],
    pub table: Vec<(u32, u32)>,
    pub records: Vec<Record>,
}

impl Transcript {
    pub fn read(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| ShareError::io(path, e))?;
        let mut r = BufReader::new(f);
        let bad = |m: &str| ShareError::Protocol(format!("{}: {m}", path.display()));
        let mut head = [0u8; 44];
        r.read_exact(&mut head)
            .map_err(|_| bad("too short for a transcript header"))?;
        if head[..8] != MAGIC {
            return Err(bad("not an umbra share transcript"));
        }
        let mut fingerprint = [0u8; 32];
        fingerprint.copy_from_slice(&head[8..40]);
        let maps = u32::from_le_bytes([head[40], head[41], head[42], head[43]]) as usize;
        if maps > 1 << 20 {
            return Err(bad("implausible map count"));
        }
        let mut tb = vec![0u8; maps * 8];
        r.read_exact(&mut tb)
            .map_err(|_| bad("truncated map table"))?;
        let table: Vec<(u32, u32)> = tb
            .chunks_exact(8)
            .map(|c| {
                (
                    u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                    u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
                )
            })
            .collect();
        let mut records = vec![];
        loop {
            let mut h = [0u8; 16];
            match r.read_exact(&mut h) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(ShareError::io(path, e)),
            }
            let connection = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
            let linear = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
            let rows = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes"));
            let k = table
                .get(linear as usize)
                .ok_or_else(|| bad("record of an unknown map"))?
                .0 as usize;
            let n = (rows as usize)
                .checked_mul(k)
                .filter(|&n| n <= 1 << 30)
                .ok_or_else(|| bad("implausible record size"))?;
            let mut b = vec![0u8; n * 8];
            r.read_exact(&mut b).map_err(|_| bad("truncated record"))?;
            let mut shares = Vec::with_capacity(n);
            crate::frame::get_u64s(&b, &mut shares);
            records.push(Record {
                connection,
                linear,
                rows,
                shares,
            });
        }
        Ok(Self {
            fingerprint,
            table,
            records,
        })
    }

    /// The records of map `linear`, in order.
    pub fn of(&self, linear: u32) -> impl Iterator<Item = &Record> {
        self.records.iter().filter(move |r| r.linear == linear)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_truncation_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        let rec = Recorder::create(&p, &[1; 32], &[(2, 3), (3, 2)]).unwrap();
        let bytes = |xs: &[u64]| xs.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        rec.record(7, 0, 1, &bytes(&[5, 6])).unwrap();
        rec.record(7, 1, 2, &bytes(&[1, 2, 3, 4, 5, 6])).unwrap();
        drop(rec);
        let t = Transcript::read(&p).unwrap();
        assert_eq!(t.table, [(2, 3), (3, 2)]);
        assert_eq!(t.records.len(), 2);
        assert_eq!(t.records[1].shares, [1, 2, 3, 4, 5, 6]);
        assert_eq!(t.of(0).count(), 1);
        let len = std::fs::metadata(&p).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len - 3).unwrap();
        assert!(Transcript::read(&p)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
    }
}
