//! Seeded random models for tests and benchmarks (feature `testing`; other crates' tests turn
//! it on in their dev-dependencies).
use crate::config::LlamaConfig;
use crate::weights::Weights;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `max |a - b|` over all entries of two F32 tensors of one shape; panics on a shape or
/// dtype mismatch (tests only).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
        .expect("max_abs_diff: tensors of one shape and dtype F32")
}

/// Random HF-layout F32 weights matching `cfg` (biases when the config implies them, norm
/// weights around 1 but not 1, `lm_head.weight` unless tied). Deterministic in `seed`.
pub fn random_weights(cfg: &LlamaConfig, seed: u64) -> Weights {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut w = Weights::new();
    let d = cfg.hidden_size;
    let (nh, nkv, hd, ffn, v) = (
        cfg.num_attention_heads,
        cfg.num_kv_heads(),
        cfg.head_dim(),
        cfg.intermediate_size,
        cfg.vocab_size,
    );
    let mut put = |name: String, shape: &[usize], lo: f32, hi: f32, rng: &mut ChaCha8Rng| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
        let t = Tensor::from_vec(data, shape, &Device::Cpu).expect("shape matches data");
        w.insert(name, t);
    };
    let s = |fan_in: usize| (3.0f32 / fan_in as f32).sqrt();
    put(
        "model.embed_tokens.weight".into(),
        &[v, d],
        -1.0,
        1.0,
        &mut rng,
    );
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        put(
            format!("{p}.input_layernorm.weight"),
            &[d],
            0.5,
            1.5,
            &mut rng,
        );
        put(
            format!("{p}.post_attention_layernorm.weight"),
            &[d],
            0.5,
            1.5,
            &mut rng,
        );
        put(
            format!("{p}.self_attn.q_proj.weight"),
            &[nh * hd, d],
            -s(d),
            s(d),
            &mut rng,
        );
        put(
            format!("{p}.self_attn.k_proj.weight"),
            &[nkv * hd, d],
            -s(d),
            s(d),
            &mut rng,
        );
        put(
            format!("{p}.self_attn.v_proj.weight"),
            &[nkv * hd, d],
            -s(d),
            s(d),
            &mut rng,
        );
        put(
            format!("{p}.self_attn.o_proj.weight"),
            &[d, nh * hd],
            -s(nh * hd),
            s(nh * hd),
            &mut rng,
        );
        if cfg.qkv_bias() {
            put(
                format!("{p}.self_attn.q_proj.bias"),
                &[nh * hd],
                -0.2,
                0.2,
                &mut rng,
            );
            put(
                format!("{p}.self_attn.k_proj.bias"),
                &[nkv * hd],
                -0.2,
                0.2,
                &mut rng,
            );
            put(
                format!("{p}.self_attn.v_proj.bias"),
                &[nkv * hd],
                -0.2,
                0.2,
                &mut rng,
            );
        }
        if cfg.o_bias() {
            put(
                format!("{p}.self_attn.o_proj.bias"),
                &[d],
                -0.2,
                0.2,
                &mut rng,
            );
        }
        put(
            format!("{p}.mlp.gate_proj.weight"),
            &[ffn, d],
            -s(d),
            s(d),
            &mut rng,
        );
        put(
            format!("{p}.mlp.up_proj.weight"),
            &[ffn, d],
            -s(d),
            s(d),
            &mut rng,
        );
        put(
            format!("{p}.mlp.down_proj.weight"),
            &[d, ffn],
            -s(ffn),
            s(ffn),
            &mut rng,
        );
    }
    put("model.norm.weight".into(), &[d], 0.5, 1.5, &mut rng);
    if !cfg.tie_word_embeddings {
        put("lm_head.weight".into(), &[v, d], -s(d), s(d), &mut rng);
    }
    w
}

/// A small Llama config: `hidden`, `heads`, `kv_heads`, `layers`, `vocab`, ffn = 2*hidden.
pub fn tiny_config(
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    layers: usize,
    vocab: usize,
) -> LlamaConfig {
    let json = serde_json::json!({
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": false,
    });
    serde_json::from_value(json).expect("valid tiny config")
}

/// SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads, 3 KV heads, ffn 1536, vocab 49152).
pub fn smollm2_135m_config() -> LlamaConfig {
    let mut c = tiny_config(576, 9, 3, 30, 49152);
    c.intermediate_size = 1536;
    c.rope_theta = 100_000.0;
    c.max_position_embeddings = 8192;
    c.tie_word_embeddings = true;
    c
}
