//! Nearest-neighbour inversion.
//!
//! - Against the public embedding layer ([`nn_decode_table`], `k = 0`): the vendor holds the
//!   embedding layer, so for a row at position `i` it ranks every vocabulary entry `v` by
//!   `||x~ - E_i(v)||` with `E_i(v)` the embedding-layer output of `v` at `i`.
//! - Against the attacker's own public text at the split ([`PublicNeighbours`], any `k`): the
//!   vendor runs its public text through the same `k` blocks and answers each received row with
//!   the token of the closest clean public row (1-NN in the cut-layer space).
use crate::encoder::Encoder;
use crate::error::{Result, SapError};
use candle_core::{Device, Tensor};

/// Nearest-neighbour decoding against the public embedding layer: `rows: [n, d]`, each at
/// position `positions[j]`; returns the predicted token ids.
pub fn nn_decode_table(enc: &Encoder, rows: &[f32], positions: &[usize]) -> Result<Vec<u32>> {
    let d = enc.hidden();
    if rows.len() != positions.len() * d {
        return Err(SapError::Config(
            "nn_decode: rows/positions mismatch".into(),
        ));
    }
    let dev = Device::Cpu;
    let mut out = vec![0u32; positions.len()];
    let maxp = positions.iter().copied().max().unwrap_or(0);
    for p in 0..=maxp {
        let idx: Vec<usize> = (0..positions.len())
            .filter(|&j| positions[j] == p)
            .collect();
        if idx.is_empty() {
            continue;
        }
        let mut x = Vec::with_capacity(idx.len() * d);
        for &j in &idx {
            x.extend_from_slice(&rows[j * d..(j + 1) * d]);
        }
        let x = Tensor::from_vec(x, (idx.len(), d), &dev)?;
        let table = enc.embeddings.table_at(p)?; // [V, d]
        let norms = table.sqr()?.sum(1)?; // [V]
                                          // argmin ||x - e||^2 = argmax (2 x.e - ||e||^2)
        let s = (x.matmul(&table.t()?)? * 2.0)?.broadcast_sub(&norms.unsqueeze(0)?)?;
        let best: Vec<u32> = s.argmax(1)?.to_vec1()?;
        for (j, b) in idx.iter().zip(best) {
            out[*j] = b;
        }
    }
    Ok(out)
}

/// `argmin_j ||q_i - k_j||^2` for query rows `q: [n, d]` against key rows `keys: [m, d]`, in
/// chunks of queries.
pub fn nearest_rows(q: &[f32], keys: &Tensor, d: usize) -> Result<Vec<u32>> {
    let norms = keys.sqr()?.sum(1)?.unsqueeze(0)?; // [1, m]
    let mut out = Vec::with_capacity(q.len() / d.max(1));
    for chunk in q.chunks(512 * d) {
        let x = Tensor::from_slice(chunk, (chunk.len() / d, d), keys.device())?;
        let s = (x.matmul(&keys.t()?)? * 2.0)?.broadcast_sub(&norms)?;
        out.extend(s.argmax(1)?.to_vec1::<u32>()?);
    }
    Ok(out)
}

/// Clean public rows at the split and their tokens (special tokens left out).
pub struct PublicNeighbours {
    keys: Tensor,
    tokens: Vec<u32>,
    d: usize,
}

impl PublicNeighbours {
    /// `rows: [n, d]` clean cut-layer rows of the public text, `tokens: [n]` their ids; at most
    /// `max_rows` are kept (evenly spaced).
    pub fn new(
        rows: &[f32],
        tokens: &[u32],
        d: usize,
        special: &[u32],
        max_rows: usize,
    ) -> Result<Self> {
        if rows.len() != tokens.len() * d {
            return Err(SapError::Config("public rows/tokens mismatch".into()));
        }
        let keep: Vec<usize> = (0..tokens.len())
            .filter(|&i| !special.contains(&tokens[i]))
            .collect();
        let step = keep.len().div_ceil(max_rows.max(1)).max(1);
        let keep: Vec<usize> = keep.into_iter().step_by(step).collect();
        if keep.is_empty() {
            return Err(SapError::Config(
                "no public rows for the nearest-neighbour attack".into(),
            ));
        }
        let mut k = Vec::with_capacity(keep.len() * d);
        for &i in &keep {
            k.extend_from_slice(&rows[i * d..(i + 1) * d]);
        }
        Ok(PublicNeighbours {
            keys: Tensor::from_vec(k, (keep.len(), d), &Device::Cpu)?,
            tokens: keep.iter().map(|&i| tokens[i]).collect(),
            d,
        })
    }

    /// The token of the nearest public row for each received row.
    pub fn decode(&self, rows: &[f32]) -> Result<Vec<u32>> {
        Ok(nearest_rows(rows, &self.keys, self.d)?
            .into_iter()
            .map(|j| self.tokens[j as usize])
            .collect())
    }
}
