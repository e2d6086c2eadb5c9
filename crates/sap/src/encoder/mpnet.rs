//! MPNet checkpoints (all-mpnet-base-v2): tensor names of a block and the relative-position
//! bias, as in HF's `MPNetEncoder`:
//!
//! `bucket(r)` for `r = j - i` (key minus query position), `B = buckets / 2 = 16`,
//! `E = B / 2 = 8`, `max_distance = 128`, `n = -r`:
//! `bucket = B [n < 0] + (|n| if |n| < E else min(B - 1, E + floor(ln(|n| / E) / ln(128 / E)
//! (B - E))))`; the bias of head `h` at `(i, j)` is `table[bucket(j - i), h]`, the same in every
//! block, added to the attention scores before the softmax.
use super::config::EncoderConfig;
use super::layers::BlockNames;
use crate::error::Result;
use candle_core::Tensor;

/// Where an MPNet layer keeps its tensors (under `encoder.layer.{i}`).
pub const BLOCK_NAMES: BlockNames = BlockNames {
    query: "attention.attn.q",
    key: "attention.attn.k",
    value: "attention.attn.v",
    attn_out: "attention.attn.o",
    attn_norm: "attention.LayerNorm",
    inter: "intermediate.dense",
    out: "output.dense",
    out_norm: "output.LayerNorm",
};

/// HF's `relative_position_bucket` (`max_distance` 128).
pub fn relative_position_bucket(relative: i64, num_buckets: usize) -> usize {
    const MAX_DISTANCE: f64 = 128.0;
    let half = (num_buckets / 2) as i64;
    let n = -relative;
    let mut ret = if n < 0 { half } else { 0 };
    let n = n.abs();
    let max_exact = half / 2;
    if n < max_exact {
        ret += n;
    } else {
        // f32 arithmetic, as HF's float tensor computes it
        let ratio = ((n as f32 / max_exact as f32).ln()
            / (MAX_DISTANCE / max_exact as f64).ln() as f32)
            * (half - max_exact) as f32;
        let large = max_exact + ratio as i64;
        ret += large.min(half - 1);
    }
    ret as usize
}

/// The relative-position bias `[1, heads, t, t]` from the table `[buckets, heads]`.
pub fn position_bias(table: &Tensor, t: usize) -> Result<Tensor> {
    let (buckets, heads) = table.dims2()?;
    let idx: Vec<u32> = (0..t)
        .flat_map(|i| {
            (0..t).map(move |j| relative_position_bucket(j as i64 - i as i64, buckets) as u32)
        })
        .collect();
    let idx = Tensor::from_vec(idx, t * t, table.device())?;
    Ok(table
        .index_select(&idx, 0)?
        .reshape((t, t, heads))?
        .permute((2, 0, 1))?
        .contiguous()?
        .unsqueeze(0)?)
}

/// A tiny MPNet configuration for tests (3 blocks, d 32, 4 heads, pad id 1).
pub fn tiny(vocab: usize) -> EncoderConfig {
    EncoderConfig {
        model_type: "mpnet".into(),
        vocab_size: vocab,
        hidden_size: 32,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        intermediate_size: 64,
        max_position_embeddings: 66,
        type_vocab_size: 1,
        layer_norm_eps: 1e-5,
        hidden_act: "gelu".into(),
        pad_token_id: Some(1),
        relative_attention_num_buckets: 32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values from HF's formula worked by hand: exact below 8, log-spaced up to 15, and the
    /// upper half of the buckets for keys after the query.
    #[test]
    fn buckets_match_the_reference_formula() {
        let b = |r| relative_position_bucket(r, 32);
        assert_eq!(b(0), 0);
        // key before the query (r < 0): n = -r > 0 -> lower half
        assert_eq!(b(-1), 1);
        assert_eq!(b(-7), 7);
        // n = 8: 8 + floor(ln(1) ...) = 8
        assert_eq!(b(-8), 8);
        // n = 16: 8 + floor(ln 2 / ln 16 * 8) = 8 + 2 = 10; n = 64: 8 + 6
        assert_eq!(b(-16), 10);
        assert_eq!(b(-64), 14);
        // n = 127: 8 + floor(ln(15.875)/ln(16) * 8) = 8 + floor(7.98) = 15
        assert_eq!(b(-127), 15);
        assert_eq!(b(-1000), 15);
        // key after the query: upper half
        assert_eq!(b(1), 17);
        assert_eq!(b(16), 26);
        assert_eq!(b(5000), 31);
    }
}
