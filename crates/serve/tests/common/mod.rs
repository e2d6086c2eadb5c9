//! Shared test helpers: a tiny random model with a byte-level tokenizer and a chat template,
//! SSE parsing, and SmolLM2 lookup.
#![allow(dead_code)]
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use umbra_model::checkpoint::Checkpoint;
use umbra_model::testing::{random_weights, tiny_config};
use umbra_model::tokenizer::TextTokenizer;
use umbra_serve::server::{start, ModelSource, ServeConfig, ServerHandle};

pub const TINY_VOCAB: usize = 260;
pub use umbra_model::testing::write_byte_tokenizer as write_tokenizer;

/// Writes a tiny random HF checkpoint (no EOS, so generations run to `max_tokens`).
pub fn tiny_model_dir(root: &Path) -> PathBuf {
    let tokdir = root.join("tok");
    write_tokenizer(&tokdir);
    let tokenizer = TextTokenizer::from_hf_dir(&tokdir).unwrap();
    let config = tiny_config(32, 4, 2, 2, TINY_VOCAB);
    let weights = random_weights(&config, 7);
    let dir = root.join("tiny");
    let ck = Checkpoint {
        config,
        weights,
        tokenizer: Some(tokenizer),
        source: dir.clone(),
    };
    ck.save_hf(&dir, true).unwrap();
    dir
}

/// A tiny random HF checkpoint with a long context (`context` positions) and `layers` blocks
/// of width `hidden`, with the byte-level tokenizer (no EOS).
pub fn tiny_long_model_dir(root: &Path, hidden: usize, layers: usize, context: usize) -> PathBuf {
    let tokdir = root.join("tok");
    write_tokenizer(&tokdir);
    let tokenizer = TextTokenizer::from_hf_dir(&tokdir).unwrap();
    let mut config = tiny_config(hidden, 4, 2, layers, TINY_VOCAB);
    config.max_position_embeddings = context;
    let weights = random_weights(&config, 9);
    let dir = root.join("tiny-long");
    let ck = Checkpoint {
        config,
        weights,
        tokenizer: Some(tokenizer),
        source: dir.clone(),
    };
    ck.save_hf(&dir, true).unwrap();
    dir
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub async fn start_tiny(root: &Path, tweak: impl FnOnce(&mut ServeConfig)) -> ServerHandle {
    let dir = tiny_model_dir(root);
    let mut cfg = ServeConfig::new(ModelSource::Path(dir), loopback());
    cfg.model_name = Some("tiny".into());
    tweak(&mut cfg);
    start(cfg).await.unwrap()
}

/// `data:` payloads of an SSE body (including `[DONE]`).
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.trim().to_string())
        .collect()
}

/// Concatenated text and token ids of a streamed completion or chat, plus the finish reason.
pub fn join_stream(body: &str) -> (String, Vec<u32>, Option<String>) {
    let data = sse_data(body);
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "stream must end with [DONE]: {body}"
    );
    let (mut text, mut ids, mut finish) = (String::new(), vec![], None);
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        assert!(v.get("error").is_none(), "error chunk: {d}");
        let Some(c) = v["choices"].get(0) else {
            continue;
        };
        if let Some(t) = c["text"].as_str() {
            text.push_str(t);
        }
        if let Some(t) = c["delta"]["content"].as_str() {
            text.push_str(t);
        }
        for id in c["token_ids"].as_array().unwrap() {
            ids.push(id.as_u64().unwrap() as u32);
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    (text, ids, finish)
}

pub fn ids_of(v: &Value) -> Vec<u32> {
    v["choices"][0]["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The cached SmolLM2-135M-Instruct folder; panics with the fetch command when absent.
pub fn smollm2() -> PathBuf {
    umbra_assets::Cache::from_env()
        .and_then(|c| c.require_smollm2_hf())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// POSTs `body` as JSON; the status and the body text.
pub async fn post_text(url: &str, body: &Value) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Text, ids and finish reason of a (streamed or not) completion or chat answer.
pub fn answer(s: &str, stream: bool) -> (String, Vec<u32>, String) {
    if stream {
        let (t, i, f) = join_stream(s);
        (t, i, f.unwrap())
    } else {
        let v: Value = serde_json::from_str(s).unwrap();
        let c = &v["choices"][0];
        let t = c["text"]
            .as_str()
            .or(c["message"]["content"].as_str())
            .unwrap()
            .to_string();
        (
            t,
            ids_of(&v),
            c["finish_reason"].as_str().unwrap().to_string(),
        )
    }
}
