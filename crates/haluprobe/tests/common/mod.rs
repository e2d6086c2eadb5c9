//! Test helpers: a tiny random checkpoint with a byte-level tokenizer and a chat template.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use umbra_model::checkpoint::Checkpoint;
use umbra_model::testing::{random_weights, tiny_config};
use umbra_model::tokenizer::TextTokenizer;

pub const TINY_VOCAB: usize = 260;
pub use umbra_model::testing::write_byte_tokenizer as write_tokenizer;

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
