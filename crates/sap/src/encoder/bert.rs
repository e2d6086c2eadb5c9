//! BERT checkpoints (all-MiniLM-L6-v2): tensor names of a block, and a tiny configuration for
//! tests.
use super::config::EncoderConfig;
use super::layers::BlockNames;

/// Where a BERT layer keeps its tensors (under `encoder.layer.{i}`).
pub const BLOCK_NAMES: BlockNames = BlockNames {
    query: "attention.self.query",
    key: "attention.self.key",
    value: "attention.self.value",
    attn_out: "attention.output.dense",
    attn_norm: "attention.output.LayerNorm",
    inter: "intermediate.dense",
    out: "output.dense",
    out_norm: "output.LayerNorm",
};

/// A tiny BERT configuration for tests (3 blocks, d 32, 4 heads).
pub fn tiny(vocab: usize) -> EncoderConfig {
    EncoderConfig {
        model_type: "bert".into(),
        vocab_size: vocab,
        hidden_size: 32,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        intermediate_size: 64,
        max_position_embeddings: 64,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        hidden_act: "gelu".into(),
        pad_token_id: Some(0),
        relative_attention_num_buckets: 32,
    }
}
