//! `umbra generate --share-servers`: generation with every linear layer on the share servers.
use super::ShareClientArgs;
use crate::error::{Result, ShareError};
use crate::model::{resolve_model, ShareModel};
use std::io::Write;
use std::path::Path;
use umbra_model::generate::{generate, FinishReason, GenerateParams};
use umbra_model::sampling::SamplingParams;
use umbra_model::tokenizer::ChatMessage;

/// What `umbra generate` asks for.
pub struct GenerateShare<'a> {
    pub model: &'a str,
    pub prompt: &'a str,
    pub chat: bool,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub json: Option<&'a Path>,
}

/// Generates, streaming the text to stdout and a summary (timings, traffic) to stderr.
pub fn run_generate(a: &ShareClientArgs, g: &GenerateShare<'_>) -> Result<()> {
    g.sampling.validate()?;
    let remote = a.remote()?;
    let path = resolve_model(g.model)?;
    let m = ShareModel::open(&path, a.format(), Some(&remote))?;
    let tok = m
        .tokenizer
        .as_ref()
        .ok_or_else(|| ShareError::Config(format!("{} has no tokenizer", path.display())))?;
    let ids = if g.chat {
        let text = tok.apply_chat_template(&[ChatMessage::user(g.prompt)], true)?;
        tok.encode(&text, false)?
    } else {
        tok.encode(g.prompt, true)?
    };
    if ids.is_empty() {
        return Err(ShareError::Config("the prompt encodes to no tokens".into()));
    }
    let params = GenerateParams {
        max_tokens: g.max_tokens,
        sampling: g.sampling.clone(),
        stop_ids: m.eos_ids.clone(),
    };
    let mut dec = tok.incremental_decoder(true);
    let mut out_ids = vec![];
    let mut stdout = std::io::stdout();
    let s0 = m.session.stats();
    let out = generate(&m.llama, &ids, &params, |id| {
        out_ids.push(id);
        if let Ok(piece) = dec.push(tok, id) {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }
        true
    })?;
    if let Ok(rest) = dec.flush(tok) {
        print!("{rest}");
    }
    println!();
    let s = m.session.stats();
    let n = out.ids.len().max(1) as f64;
    let finish = if out.finish_reason == FinishReason::Stop {
        "stop"
    } else {
        "length"
    };
    eprintln!(
        "[{} prompt tokens, {} generated, finish {finish}, prefill {:.2}s, {:.1} tok/s, share \
         mode: {} round trips, {:.1} KB sent, {:.1} KB received per token, integrity bound \
         2^-{} per layer call]",
        ids.len(),
        out.ids.len(),
        out.prefill_s,
        out.decode_tok_per_s(),
        s.link.round_trips - s0.link.round_trips,
        (s.link.bytes_sent - s0.link.bytes_sent) as f64 / n / 1e3,
        (s.link.bytes_received - s0.link.bytes_received) as f64 / n / 1e3,
        m.integrity_bits()
    );
    if let Some(j) = g.json {
        let text = tok.decode(&out.ids, true)?;
        umbra_common::fs::write_json(
            j,
            &serde_json::json!({
                "text": text, "ids": out.ids, "prompt_tokens": ids.len(),
                "completion_tokens": out.ids.len(), "finish_reason": finish,
                "prefill_s": out.prefill_s, "decode_s": out.decode_s,
                "tok_s": out.decode_tok_per_s(), "share": s,
                "integrity_bits": m.integrity_bits(),
            }),
        )?;
    }
    Ok(())
}
