//! `umbra eval fidelity` and `umbra demo`.
use super::obfuscate::{run_obfuscate, NoHook, ObfuscateArgs};
use super::{load_passages, peak_rss, resolve_model, tokenize_passages, write_json_opt};
use crate::compiler::check_key;
use crate::error::{AloeError, Result};
use crate::fidelity::{evaluate, evaluate_sequential, FidelityOptions, FidelityReport};
use crate::keyfile::ClientKey;
use crate::source::{read_config, CheckpointSource};
use crate::tau::TokenPermutation;
use candle_core::Device;
use clap::Args;
use std::path::PathBuf;
use umbra_common::progress::Progress;
use umbra_model::generate::{generate, GenerateParams};
use umbra_model::llama::Llama;
use umbra_model::tokenizer::{ChatMessage, TextTokenizer};

#[derive(Args, Debug, Clone)]
pub struct FidelityArgs {
    /// Plaintext model: HF folder, GGUF file or model asset (`smollm2`).
    #[arg(long)]
    pub plain: String,
    /// Obfuscated model: HF folder or GGUF file (from `umbra obfuscate`).
    #[arg(long)]
    pub obfuscated: PathBuf,
    #[arg(long)]
    pub key: PathBuf,
    /// Number of passages (HaluEval QA `knowledge` fields unless --corpus is given).
    #[arg(long, default_value_t = 200)]
    pub texts: usize,
    /// A text file with one passage per line, instead of HaluEval.
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Tokens per passage (longer ones are cut).
    #[arg(long, default_value_t = 128)]
    pub max_len: usize,
    /// Greedy continuations compared (32 tokens from each passage's first 16).
    #[arg(long, default_value_t = 50)]
    pub greedy: usize,
    /// Hold one model at a time (plaintext logits go through a scratch file): the default when
    /// both models together exceed --memory-gb.
    #[arg(long)]
    pub sequential: bool,
    /// Memory (GB) both F32 models may take together before fidelity goes sequential.
    #[arg(long, default_value_t = 8.0)]
    pub memory_gb: f64,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// The evaluation behind `umbra eval fidelity` on loaded values: `plain` and `obf` are opened
/// (not read) sources, `key` is checked against `obf`'s config. Models are built one tensor at a
/// time, both at once or one after the other (`sequential`).
pub fn fidelity_of(
    plain: CheckpointSource,
    obf: CheckpointSource,
    key: &ClientKey,
    texts: &[String],
    max_len: usize,
    greedy: usize,
    sequential: bool,
) -> Result<FidelityReport> {
    check_key(&obf.config, key)?;
    let tau = key.permutation()?;
    let tok = plain
        .tokenizer
        .clone()
        .ok_or_else(|| AloeError::Input("the plaintext model has no tokenizer".into()))?;
    if tok.vocab_size() > tau.vocab_size() {
        return Err(AloeError::Input(format!(
            "tokenizer has {} tokens but the key covers {}",
            tok.vocab_size(),
            tau.vocab_size()
        )));
    }
    let seqs = tokenize_passages(&tok, texts, max_len)?;
    let opts = FidelityOptions {
        greedy_prompts: greedy,
        ..FidelityOptions::default()
    };
    let pb = Progress::new(0, "fidelity");
    let mut progress = |d: usize, t: usize| {
        pb.set_length(t as u64);
        pb.set_position(d as u64);
    };
    let dev = Device::Cpu;
    let report = if sequential {
        let (mut plain, mut obf) = (Some(plain), Some(obf));
        let take = |s: &mut Option<CheckpointSource>| -> Result<Llama> {
            s.take()
                .ok_or_else(|| AloeError::Input("model loaded twice".into()))?
                .load_model(&dev)
        };
        evaluate_sequential(
            &mut || take(&mut plain),
            &mut || take(&mut obf),
            &tau,
            &seqs,
            &opts,
            &std::env::temp_dir(),
            &mut progress,
        )?
    } else {
        let p = plain.load_model(&dev)?;
        let o = obf.load_model(&dev)?;
        evaluate(&p, &o, &tau, &seqs, &opts, &mut progress)?
    };
    pb.finish();
    Ok(report)
}

pub fn print_fidelity(r: &FidelityReport) {
    println!("| metric | value |\n|---|---|");
    println!("| passages / positions | {} / {} |", r.texts, r.positions);
    println!("| top1_agreement | {:.4} |", r.top1_agreement);
    println!(
        "| ppl plain / obfuscated | {:.3} / {:.3} |",
        r.ppl_plain, r.ppl_obfuscated
    );
    println!("| ppl_ratio | {:.4} |", r.ppl_ratio);
    println!("| max_rel_logit_diff | {:.2e} |", r.max_rel_logit_diff);
    println!("| mean_kl (nats) | {:.2e} |", r.mean_kl);
    println!(
        "| greedy_match ({} x {} tokens) | {:.3} |",
        r.greedy_prompts, 32, r.greedy_match
    );
    println!("| seconds | {:.1} |", r.seconds);
}

/// `umbra eval fidelity`: prints the table and writes the JSON (report + peak RSS).
pub fn run_fidelity(a: &FidelityArgs) -> Result<FidelityReport> {
    let key = ClientKey::load(&a.key)?;
    let plain = CheckpointSource::open(&resolve_model(&a.plain)?)?;
    let obf = CheckpointSource::open(&a.obfuscated)?;
    let bytes = 4.0 * (plain.parameters() + obf.parameters()) as f64;
    let sequential = a.sequential || bytes > a.memory_gb * 1e9;
    if sequential && !a.sequential {
        eprintln!(
            "both models take {:.1} GB in F32 (> --memory-gb {}): one at a time",
            bytes / 1e9,
            a.memory_gb
        );
    }
    let texts = load_passages(a.corpus.as_deref(), a.texts)?;
    let r = fidelity_of(plain, obf, &key, &texts, a.max_len, a.greedy, sequential)?;
    print_fidelity(&r);
    let mut v = serde_json::to_value(&r).map_err(|e| AloeError::Input(e.to_string()))?;
    v["sequential"] = sequential.into();
    v["peak_rss_mib"] = peak_rss().into();
    write_json_opt(a.json.as_deref(), &v)?;
    Ok(r)
}

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    #[arg(long, default_value = "What is the capital of France?")]
    pub prompt: String,
    /// Passages for the fidelity numbers.
    #[arg(long, default_value_t = 20)]
    pub texts: usize,
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
}

/// Greedy generation from a chat prompt; returns plaintext ids, the ids the engine saw and tok/s.
fn chat_greedy(
    model: &Llama,
    prompt: &[u32],
    tau: Option<&TokenPermutation>,
    stop: &[u32],
    max_tokens: usize,
) -> Result<(Vec<u32>, Vec<u32>, f64)> {
    let sent = match tau {
        Some(t) => t.apply(prompt)?,
        None => prompt.to_vec(),
    };
    let params = GenerateParams {
        max_tokens,
        stop_ids: stop.to_vec(),
        ..Default::default()
    };
    let out = generate(model, &sent, &params, |_| true)?;
    let ids = match tau {
        Some(t) => t.invert(&out.ids)?,
        None => out.ids.clone(),
    };
    Ok((ids, sent, out.decode_tok_per_s()))
}

fn encode_chat(tok: &TextTokenizer, prompt: &str) -> Result<Vec<u32>> {
    let text = tok.apply_chat_template(&[ChatMessage::user(prompt)], true)?;
    Ok(tok.encode(&text, false)?)
}

/// `umbra demo`: obfuscates SmolLM2 once (cached), generates privately and in plaintext, and
/// measures fidelity.
pub fn run_demo(a: &DemoArgs) -> Result<()> {
    let plain = resolve_model("smollm2")?;
    let demo_dir = umbra_assets::Cache::from_env()
        .map_err(|e| AloeError::Other(Box::new(e)))?
        .root()
        .join("demo");
    let obf = demo_dir.join("SmolLM2-135M-Instruct-obfuscated");
    let key_path = demo_dir.join("client.key");
    if !(obf.join("config.json").is_file() && key_path.is_file()) {
        let _ = std::fs::remove_dir_all(&obf);
        let _ = std::fs::remove_file(&key_path);
        std::fs::create_dir_all(&demo_dir).map_err(|e| AloeError::io(&demo_dir, e))?;
        let args =
            ObfuscateArgs::defaults(plain.display().to_string(), obf.clone(), key_path.clone());
        run_obfuscate(&args, &mut NoHook)?;
    }
    let key = ClientKey::load(&key_path)?;
    let obf_cfg = read_config(&obf)?;
    check_key(&obf_cfg, &key)?;
    let tau = key.permutation()?;
    let psrc = CheckpointSource::open(&plain)?;
    println!("plaintext model : {}", plain.display());
    println!(
        "obfuscated model: {}  (default: exact mode, hidden {} -> {})",
        obf.display(),
        psrc.config.hidden_size,
        obf_cfg.hidden_size
    );
    println!("client key      : {}\n", key_path.display());
    let tok = psrc
        .tokenizer
        .clone()
        .ok_or_else(|| AloeError::Input("SmolLM2 has no tokenizer".into()))?;
    let stop = stop_ids(&psrc.config, &tok);
    let prompt = encode_chat(&tok, &a.prompt)?;
    let pm = psrc.load_model(&Device::Cpu)?;
    let om = CheckpointSource::open(&obf)?.load_model(&Device::Cpu)?;
    let (pid, _, ptps) = chat_greedy(&pm, &prompt, None, &stop, a.max_tokens)?;
    let obf_stop: Vec<u32> = stop.iter().map(|&s| key.tau[s as usize]).collect();
    let (oid, sent, otps) = chat_greedy(&om, &prompt, Some(&tau), &obf_stop, a.max_tokens)?;
    drop((pm, om));
    println!("prompt: {}", a.prompt);
    let tail = |v: &[u32]| v[v.len().saturating_sub(12)..].to_vec();
    println!("ids the client tokenizes : {:?}", tail(&prompt));
    println!("ids the server receives  : {:?}", tail(&sent));
    println!(
        "what the server would read (with the plaintext tokenizer and no attack): {:?}",
        tok.decode(&sent, true)
            .unwrap_or_default()
            .chars()
            .take(80)
            .collect::<String>()
    );
    println!(
        "(an attacker holding the public checkpoint recovers tau from the weights, e.g. \
         `umbra attack hat` or `blockkey`: 99.98% on this model; README, \
         \"What this does and does not protect\")\n"
    );
    println!(
        "plaintext  ({ptps:.1} tok/s): {}",
        tok.decode(&pid, true)?.trim()
    );
    println!(
        "obfuscated ({otps:.1} tok/s): {}",
        tok.decode(&oid, true)?.trim()
    );
    println!("identical: {}\n", pid == oid);
    let texts = load_passages(None, a.texts)?;
    let r = fidelity_of(
        CheckpointSource::open(&plain)?,
        CheckpointSource::open(&obf)?,
        &key,
        &texts,
        128,
        10.min(a.texts),
        false,
    )?;
    println!("fidelity on {} HaluEval passages:", a.texts);
    print_fidelity(&r);
    Ok(())
}

/// Plaintext chat prompts for greedy comparisons (the demo's question first).
pub const CHAT_PROMPTS: [&str; 10] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a binary search does, in two sentences.",
    "Give me three tips for a job interview.",
    "Translate 'good morning' into Spanish and German.",
    "What is 17 times 23?",
    "Write a Python function that reverses a string.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet in one sentence.",
    "List the planets of the solar system in order.",
];

/// Plaintext ids of the chat prompts under `tok`'s chat template.
pub fn chat_prompt_ids(tok: &TextTokenizer, n: usize) -> Result<Vec<Vec<u32>>> {
    CHAT_PROMPTS
        .iter()
        .take(n)
        .map(|p| encode_chat(tok, p))
        .collect()
}

/// EOS ids: the config's, else the tokenizer's.
pub fn stop_ids(cfg: &umbra_model::LlamaConfig, tok: &TextTokenizer) -> Vec<u32> {
    let e = cfg.eos_token_ids();
    if e.is_empty() {
        tok.eos_id().into_iter().collect()
    } else {
        e
    }
}
