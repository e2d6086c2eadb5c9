//! The versioned wire format between the parties and its validation.
//!
//! Layout (little endian): `b"UMBV"`, version `u16`, kind `u8`, job id (`u16` length + UTF-8),
//! epoch `u32`, batch id `u64`, seq `u64`, rows `u32`, cols `u32`, payload (`u32` length + bytes).
//! Tensor payloads are `rows x cols` f32 values; control payloads are UTF-8 JSON.
use crate::error::{Result, VflError};

pub const MAGIC: &[u8; 4] = b"UMBV";
pub const VERSION: u16 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Passive -> active: published embedding `z_p` of a training batch, `[rows, emb]`.
    Embedding = 1,
    /// Active -> passive: `dL/dz_p` of a batch, `[rows, emb]`.
    Gradient = 2,
    /// Passive -> active: embeddings of a chunk of the test split.
    Eval = 3,
    /// Passive -> active: end of an epoch; `batch` = number of eval chunks sent.
    EpochEnd = 4,
    /// Passive -> active: training finished.
    Done = 5,
    /// Active -> passive: subscribed and ready.
    Ready = 6,
    /// Passive -> active: a batch attempt was dropped at its deadline (informational).
    Dropped = 7,
    /// Active -> passive: final metrics as JSON.
    Report = 8,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Embedding,
            2 => Kind::Gradient,
            3 => Kind::Eval,
            4 => Kind::EpochEnd,
            5 => Kind::Done,
            6 => Kind::Ready,
            7 => Kind::Dropped,
            8 => Kind::Report,
            _ => return None,
        })
    }
}

/// One message.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub kind: Kind,
    pub job: String,
    pub epoch: u32,
    pub batch: u64,
    pub seq: u64,
    pub rows: u32,
    pub cols: u32,
    pub payload: Vec<u8>,
}

impl Envelope {
    /// A tensor message; `data` is `[rows, cols]` row-major.
    #[allow(clippy::too_many_arguments)]
    pub fn tensor(
        kind: Kind,
        job: &str,
        epoch: u32,
        batch: u64,
        seq: u64,
        rows: usize,
        cols: usize,
        data: &[f32],
    ) -> Self {
        let mut payload = Vec::with_capacity(data.len() * 4);
        for v in data {
            payload.extend_from_slice(&v.to_le_bytes());
        }
        Envelope {
            kind,
            job: job.to_string(),
            epoch,
            batch,
            seq,
            rows: rows as u32,
            cols: cols as u32,
            payload,
        }
    }

    /// A control message with an optional text payload.
    pub fn control(kind: Kind, job: &str, epoch: u32, batch: u64, text: &str) -> Self {
        Envelope {
            kind,
            job: job.to_string(),
            epoch,
            batch,
            seq: 0,
            rows: 0,
            cols: 0,
            payload: text.as_bytes().to_vec(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let job = self.job.as_bytes();
        let mut out = Vec::with_capacity(40 + job.len() + self.payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.push(self.kind as u8);
        out.extend_from_slice(&(job.len() as u16).to_le_bytes());
        out.extend_from_slice(job);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.batch.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.rows.to_le_bytes());
        out.extend_from_slice(&self.cols.to_le_bytes());
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.payload);
        out
    }

    /// Parse bytes from the wire; never panics on any input.
    pub fn decode(b: &[u8]) -> Result<Self> {
        let mut r = Reader { b, at: 0 };
        if r.take(4)? != MAGIC {
            return Err(VflError::Message("bad magic".into()));
        }
        let version = u16::from_le_bytes(r.arr()?);
        if version != VERSION {
            return Err(VflError::Message(format!(
                "unsupported version {version} (this build speaks {VERSION})"
            )));
        }
        let kind_b = r.take(1)?[0];
        let kind = Kind::from_u8(kind_b)
            .ok_or_else(|| VflError::Message(format!("unknown kind {kind_b}")))?;
        let jl = u16::from_le_bytes(r.arr()?) as usize;
        let job = std::str::from_utf8(r.take(jl)?)
            .map_err(|_| VflError::Message("job id is not UTF-8".into()))?
            .to_string();
        let epoch = u32::from_le_bytes(r.arr()?);
        let batch = u64::from_le_bytes(r.arr()?);
        let seq = u64::from_le_bytes(r.arr()?);
        let rows = u32::from_le_bytes(r.arr()?);
        let cols = u32::from_le_bytes(r.arr()?);
        let pl = u32::from_le_bytes(r.arr()?) as usize;
        let payload = r.take(pl)?.to_vec();
        if r.at != b.len() {
            return Err(VflError::Message("trailing bytes".into()));
        }
        Ok(Envelope {
            kind,
            job,
            epoch,
            batch,
            seq,
            rows,
            cols,
            payload,
        })
    }

    /// Check job id, kind and shape against what the receiver expects, then return the f32 data.
    pub fn validated_tensor(
        &self,
        job: &str,
        kind: Kind,
        rows: usize,
        cols: usize,
    ) -> Result<Vec<f32>> {
        if self.job != job {
            return Err(VflError::Message(format!(
                "foreign job id `{}` (expected `{job}`)",
                self.job
            )));
        }
        if self.kind != kind {
            return Err(VflError::Message(format!(
                "expected {kind:?}, got {:?}",
                self.kind
            )));
        }
        if self.rows as usize != rows || self.cols as usize != cols {
            return Err(VflError::Message(format!(
                "{:?} of batch {} has shape [{}, {}], expected [{rows}, {cols}]",
                self.kind, self.batch, self.rows, self.cols
            )));
        }
        if self.payload.len() != rows * cols * 4 {
            return Err(VflError::Message(format!(
                "payload has {} bytes, shape says {}",
                self.payload.len(),
                rows * cols * 4
            )));
        }
        let data: Vec<f32> = self
            .payload
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if data.iter().any(|v| !v.is_finite()) {
            return Err(VflError::Message("non-finite values".into()));
        }
        Ok(data)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| VflError::Message("truncated message".into()))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_validation() {
        let data = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let m = Envelope::tensor(Kind::Embedding, "job1", 2, 7, 99, 2, 3, &data);
        let b = m.encode();
        let d = Envelope::decode(&b).unwrap();
        assert_eq!(d, m);
        assert_eq!(
            d.validated_tensor("job1", Kind::Embedding, 2, 3).unwrap(),
            data
        );
        assert!(d.validated_tensor("other", Kind::Embedding, 2, 3).is_err());
        assert!(d.validated_tensor("job1", Kind::Embedding, 3, 2).is_err());
        assert!(d.validated_tensor("job1", Kind::Gradient, 2, 3).is_err());
    }

    #[test]
    fn garbage_is_rejected_not_panicking() {
        let m = Envelope::tensor(Kind::Gradient, "j", 0, 1, 1, 1, 2, &[1.0, f32::NAN]);
        let b = m.encode();
        assert!(Envelope::decode(&b)
            .unwrap()
            .validated_tensor("j", Kind::Gradient, 1, 2)
            .is_err());
        for cut in 0..b.len() {
            assert!(Envelope::decode(&b[..cut]).is_err());
        }
        let mut v = b.clone();
        v[4] = 9; // version
        assert!(Envelope::decode(&v).is_err());
        let mut k = b.clone();
        k[6] = 200; // kind
        assert!(Envelope::decode(&k).is_err());
        assert!(Envelope::decode(b"hello world").is_err());
        let mut long = b.clone();
        long.push(0);
        assert!(Envelope::decode(&long).is_err());
    }
}
