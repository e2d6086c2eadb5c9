//! The SAP wire format and its validation. Only these cross between customer and vendor:
//! privatized cut-layer rows (one per real token, no padding), training labels, the vendor's
//! output logits on evaluation batches, and control messages.
//!
//! Layout (little endian): `b"SAP1"`, kind `u8`, header length `u32`, header (UTF-8 JSON of
//! [`Header`], unknown fields rejected), payload length `u32`, payload (`f32` values).
use crate::error::{Result, SapError};

pub const MAGIC: &[u8; 4] = b"SAP1";
/// Longest sequence a peer may send.
pub const MAX_TOKENS: u32 = 512;
/// Largest payload accepted (values).
pub const MAX_VALUES: usize = 1 << 27;
/// Largest activation payload per message in bytes (below NATS' default 1 MiB limit).
pub const MAX_PAYLOAD_BYTES: usize = 900_000;
/// Most parts one batch may be split into.
pub const MAX_PARTS: u32 = 4096;

/// Message kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum Kind {
    /// Customer -> vendor: privatized rows `[sum(lengths), d]` of a training batch + labels.
    Train = 1,
    /// Customer -> vendor: privatized rows of an evaluation batch (no labels).
    Eval = 2,
    /// Vendor -> customer: logits `[n, classes]` of an evaluation batch.
    Logits = 3,
    /// Either way: control (hello, ready, ack, done, report).
    Control = 4,
}

/// Control payloads.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Ctrl {
    /// Customer -> vendor: what to build.
    Hello {
        classes: u32,
        split_at: u32,
        hidden: u32,
        lora_rank: u32,
        lr: f64,
        seed: u64,
    },
    /// Vendor -> customer: model built, subscribed.
    Ready,
    /// Vendor -> customer: training batch processed (flow control), with its loss.
    Ack { batch: u64, loss: f64 },
    /// Customer -> vendor: no more batches.
    Done,
    /// Vendor -> customer: summary.
    Report {
        steps: u64,
        bytes_in: u64,
        vendor_s: f64,
    },
}

/// Message header.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    #[serde(default)]
    pub epoch: u32,
    #[serde(default)]
    pub batch: u64,
    /// Width of a row (Train/Eval) or number of classes (Logits).
    #[serde(default)]
    pub cols: u32,
    /// Tokens per example (Train/Eval).
    #[serde(default)]
    pub lengths: Vec<u32>,
    /// Labels (Train only).
    #[serde(default)]
    pub labels: Vec<u32>,
    #[serde(default)]
    pub ctrl: Option<Ctrl>,
    /// A batch too large for one message (NATS caps payloads at 1 MiB) travels as `parts`
    /// messages `part = 0..parts` (0 parts = 1).
    #[serde(default)]
    pub part: u32,
    #[serde(default)]
    pub parts: u32,
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq)]
pub struct Msg {
    pub kind: Kind,
    pub header: Header,
    pub payload: Vec<f32>,
}

impl Msg {
    pub fn control(c: Ctrl) -> Self {
        Msg {
            kind: Kind::Control,
            header: Header {
                ctrl: Some(c),
                ..Default::default()
            },
            payload: Vec::new(),
        }
    }

    /// An activation batch (`Train` with labels, or `Eval`) as one or more messages whose
    /// payloads stay under [`MAX_PAYLOAD_BYTES`]; parts split between examples.
    pub fn activation_parts(
        kind: Kind,
        epoch: u32,
        batch: u64,
        cols: usize,
        lengths: &[u32],
        labels: &[u32],
        rows: &[f32],
    ) -> Vec<Msg> {
        let mut groups: Vec<(usize, usize)> = Vec::new(); // example ranges
        let (mut start, mut vals) = (0usize, 0usize);
        for (i, &l) in lengths.iter().enumerate() {
            let v = l as usize * cols;
            if i > start && (vals + v) * 4 > MAX_PAYLOAD_BYTES {
                groups.push((start, i));
                start = i;
                vals = 0;
            }
            vals += v;
        }
        groups.push((start, lengths.len()));
        let parts = groups.len() as u32;
        let mut off = 0usize;
        groups
            .into_iter()
            .enumerate()
            .map(|(p, (a, b))| {
                let n: usize = lengths[a..b].iter().map(|&l| l as usize * cols).sum();
                let payload = rows[off..(off + n).min(rows.len())].to_vec();
                off += n;
                Msg {
                    kind,
                    header: Header {
                        epoch,
                        batch,
                        cols: cols as u32,
                        lengths: lengths[a..b].to_vec(),
                        labels: if kind == Kind::Train {
                            labels[a.min(labels.len())..b.min(labels.len())].to_vec()
                        } else {
                            Vec::new()
                        },
                        ctrl: None,
                        part: p as u32,
                        parts,
                    },
                    payload,
                }
            })
            .collect()
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        let h = serde_json::to_vec(&self.header)?;
        let mut out = Vec::with_capacity(13 + h.len() + 4 * self.payload.len());
        out.extend_from_slice(MAGIC);
        out.push(self.kind as u8);
        out.extend_from_slice(&(h.len() as u32).to_le_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        for v in &self.payload {
            out.extend_from_slice(&v.to_le_bytes());
        }
        Ok(out)
    }

    /// Decodes and validates (shapes, finiteness, bounds); never panics on bad bytes.
    pub fn decode(b: &[u8]) -> Result<Self> {
        let bad = |m: &str| SapError::Message(m.to_string());
        if b.len() < 13 || &b[..4] != MAGIC {
            return Err(bad("not a SAP1 message"));
        }
        let kind = match b[4] {
            1 => Kind::Train,
            2 => Kind::Eval,
            3 => Kind::Logits,
            4 => Kind::Control,
            k => return Err(SapError::Message(format!("unknown kind {k}"))),
        };
        let u32_at = |i: usize| -> Result<u32> {
            b.get(i..i + 4)
                .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
                .ok_or_else(|| bad("truncated"))
        };
        let hl = u32_at(5)? as usize;
        let hb = b.get(9..9 + hl).ok_or_else(|| bad("truncated header"))?;
        let header: Header =
            serde_json::from_slice(hb).map_err(|e| SapError::Message(format!("header: {e}")))?;
        let pl = u32_at(9 + hl)? as usize;
        if pl > MAX_VALUES {
            return Err(bad("payload too large"));
        }
        let start = 13 + hl;
        if b.len() != start + 4 * pl {
            return Err(SapError::Message(format!(
                "payload of {} bytes, header says {pl} values",
                b.len() - start
            )));
        }
        let payload: Vec<f32> = b[start..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let m = Msg {
            kind,
            header,
            payload,
        };
        m.validate()?;
        Ok(m)
    }

    fn validate(&self) -> Result<()> {
        let h = &self.header;
        let err = |m: String| Err(SapError::Message(m));
        if self.payload.iter().any(|v| !v.is_finite()) {
            return err("non-finite value".into());
        }
        if h.parts > MAX_PARTS || (h.parts > 0 && h.part >= h.parts) || (h.parts == 0 && h.part > 0)
        {
            return err(format!("part {} of {}", h.part, h.parts));
        }
        match self.kind {
            Kind::Train | Kind::Eval => {
                if h.ctrl.is_some() || h.cols == 0 || h.lengths.is_empty() {
                    return err("activation message needs cols and lengths, no ctrl".into());
                }
                if h.lengths.iter().any(|&l| l == 0 || l > MAX_TOKENS) {
                    return err(format!("sequence lengths must be 1..={MAX_TOKENS}"));
                }
                let rows: usize = h.lengths.iter().map(|&l| l as usize).sum();
                if rows * h.cols as usize != self.payload.len() {
                    return err(format!(
                        "{} values for {rows} rows of width {}",
                        self.payload.len(),
                        h.cols
                    ));
                }
                let want_labels = if self.kind == Kind::Train {
                    h.lengths.len()
                } else {
                    0
                };
                if h.labels.len() != want_labels {
                    return err(format!(
                        "{} labels for {} examples",
                        h.labels.len(),
                        h.lengths.len()
                    ));
                }
            }
            Kind::Logits => {
                if h.ctrl.is_some()
                    || h.cols == 0
                    || !h.lengths.is_empty()
                    || !h.labels.is_empty()
                    || !self.payload.len().is_multiple_of(h.cols as usize)
                {
                    return err("logits message must be [n, cols] and nothing else".into());
                }
            }
            Kind::Control => {
                if h.ctrl.is_none() || !self.payload.is_empty() || !h.lengths.is_empty() {
                    return err("control message carries only ctrl".into());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_batches_split_into_parts_under_the_limit() {
        let cols = 384;
        let lengths: Vec<u32> = (0..40).map(|i| 20 + i % 30).collect();
        let labels: Vec<u32> = (0..40).map(|i| i % 3).collect();
        let n: usize = lengths.iter().map(|&l| l as usize * cols).sum();
        let rows: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let parts = Msg::activation_parts(Kind::Train, 0, 9, cols, &lengths, &labels, &rows);
        assert!(parts.len() > 1);
        let mut back_rows = Vec::new();
        let mut back_len = Vec::new();
        let mut back_lab = Vec::new();
        for (i, m) in parts.iter().enumerate() {
            let b = m.encode().unwrap();
            assert!(b.len() < 1 << 20, "{}", b.len());
            let d = Msg::decode(&b).unwrap();
            assert_eq!(
                (d.header.part as usize, d.header.parts as usize),
                (i, parts.len())
            );
            back_rows.extend(d.payload);
            back_len.extend(d.header.lengths);
            back_lab.extend(d.header.labels);
        }
        assert_eq!((back_rows, back_len, back_lab), (rows, lengths, labels));
    }

    fn train_msg() -> Msg {
        Msg {
            kind: Kind::Train,
            header: Header {
                epoch: 1,
                batch: 7,
                cols: 2,
                lengths: vec![2, 1],
                labels: vec![0, 1],
                ctrl: None,
                part: 0,
                parts: 0,
            },
            payload: vec![0.5; 6],
        }
    }

    #[test]
    fn roundtrip_and_rejections() {
        let m = train_msg();
        let b = m.encode().unwrap();
        assert_eq!(Msg::decode(&b).unwrap(), m);
        // truncated, wrong magic, bad shape, unknown header field, non-finite, missing labels
        assert!(Msg::decode(&b[..b.len() - 1]).is_err());
        let mut w = b.clone();
        w[0] = b'X';
        assert!(Msg::decode(&w).is_err());
        let mut m2 = train_msg();
        m2.header.lengths = vec![3, 1];
        assert!(Msg::decode(&m2.encode().unwrap()).is_err());
        let mut m3 = train_msg();
        m3.payload[0] = f32::NAN;
        assert!(Msg::decode(&m3.encode().unwrap()).is_err());
        let mut m4 = train_msg();
        m4.kind = Kind::Eval;
        assert!(Msg::decode(&m4.encode().unwrap()).is_err());
        let s = String::from_utf8_lossy(&b).replace("\"epoch\"", "\"text\"");
        assert!(Msg::decode(s.as_bytes()).is_err());
        let mut m5 = train_msg();
        m5.header.part = 2;
        m5.header.parts = 2;
        assert!(Msg::decode(&m5.encode().unwrap()).is_err());
        let c = Msg::control(Ctrl::Ack {
            batch: 3,
            loss: 0.5,
        });
        assert_eq!(Msg::decode(&c.encode().unwrap()).unwrap(), c);
    }
}
