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

/// The ChatML template of the byte tokenizer below (`<|im_start|>role\ncontent<|im_end|>\n`).
pub const CHATML_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// GPT-2's byte -> printable-char table (`bytes_to_unicode`): entry `b` is the char that
/// stands for byte `b` in a byte-level BPE vocabulary.
pub fn gpt2_byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).expect("GPT-2 byte chars are valid");
    }
    table
}

/// `tokenizer.json` of a byte-level BPE without merges: ids 0..256 are the bytes,
/// `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` are the special ids 256..259.
pub fn byte_tokenizer_json() -> serde_json::Value {
    use serde_json::json;
    let chars = gpt2_byte_chars();
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..256).map(|b| (chars[b].to_string(), json!(b))).collect();
    let added: Vec<serde_json::Value> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": 256 + i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}

/// Writes the byte tokenizer ([`byte_tokenizer_json`]) and a `tokenizer_config.json` with the
/// [`CHATML_TEMPLATE`] into `dir` (created); panics on an I/O error (tests only).
pub fn write_byte_tokenizer(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).expect("create the tokenizer folder");
    std::fs::write(
        dir.join("tokenizer.json"),
        byte_tokenizer_json().to_string(),
    )
    .expect("write tokenizer.json");
    let tc = serde_json::json!({"chat_template": CHATML_TEMPLATE, "add_bos_token": false, "add_eos_token": false});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string())
        .expect("write tokenizer_config.json");
}
