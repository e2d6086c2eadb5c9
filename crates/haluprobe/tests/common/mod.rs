//! Test helpers: a tiny random checkpoint with a byte-level tokenizer and a chat template.
#![allow(dead_code)]
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use umbra_model::checkpoint::Checkpoint;
use umbra_model::testing::{random_weights, tiny_config};
use umbra_model::tokenizer::TextTokenizer;

pub const TINY_VOCAB: usize = 260;
pub const CHAT_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

fn bytes_to_unicode() -> Vec<char> {
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
    let mut out = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        out[*b as usize] = char::from_u32(c).unwrap();
    }
    out
}

/// A byte-level tokenizer (ids 0..256 = bytes) with `<|endoftext|>`, `<|im_start|>`,
/// `<|im_end|>` at 256..259 and a chat template.
pub fn write_tokenizer(dir: &Path) {
    let map = bytes_to_unicode();
    let vocab: serde_json::Map<String, Value> =
        (0..256).map(|b| (map[b].to_string(), json!(b))).collect();
    let added: Vec<Value> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"id": 256 + i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tj = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    });
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
    let tc =
        json!({"chat_template": CHAT_TEMPLATE, "add_bos_token": false, "add_eos_token": false});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}

/// Writes a tiny random HF checkpoint (no EOS, so generations run to `max_tokens`).
pub fn tiny_model_dir(root: &Path, name: &str, seed: u64) -> PathBuf {
    let tokdir = root.join("tok");
    write_tokenizer(&tokdir);
    let tokenizer = TextTokenizer::from_hf_dir(&tokdir).unwrap();
    let config = tiny_config(32, 4, 2, 2, TINY_VOCAB);
    let weights = random_weights(&config, seed);
    let dir = root.join(name);
    let ck = Checkpoint {
        config,
        weights,
        tokenizer: Some(tokenizer),
        source: dir.clone(),
    };
    ck.save_hf(&dir, true).unwrap();
    dir
}
