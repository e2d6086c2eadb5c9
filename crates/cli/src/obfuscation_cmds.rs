//! `obfuscate`, `eval fidelity`, `demo` (AloePri).
use crate::model_cmds::{encode_prompt, resolve_model, smollm2_dir, Session};
use crate::util::{bar, peak_rss_mib, write_json};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use umbra_aloepri::compiler::{check_key_for, compile_checkpoint};
use umbra_aloepri::fidelity::{evaluate, FidelityOptions, FidelityReport};
use umbra_aloepri::{ClientKey, ObfuscationParams};
use umbra_assets::{Asset, Cache};
use umbra_model::checkpoint::Checkpoint;
use umbra_model::generate::GenerateParams;
use umbra_model::llama::Llama;
use umbra_model::tokenizer::TextTokenizer;

#[derive(Args, Clone)]
pub struct ObfuscateArgs {
    /// Plaintext HF folder or GGUF file, or `smollm2`.
    #[arg(long)]
    pub model: String,
    /// Output folder (a standard HF Llama checkpoint); must not exist.
    #[arg(long)]
    pub out: PathBuf,
    /// Where to write the client key (mode 0600); must not exist.
    #[arg(long)]
    pub key: PathBuf,
    /// Seed for every key; drawn from the OS when omitted (and recorded in the key file).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Start from the paper's parameters (h 128, lambda .3, alpha_e 1, alpha_h .2, beta 8, C/E
    /// junk) instead of the default exact mode. On SmolLM2-135M they keep 10% top-1 agreement and
    /// hide nothing from the key-free `hat` attack (see README, "What this does and does not protect").
    #[arg(long, conflicts_with = "exact")]
    pub paper: bool,
    /// Residual expansion: hidden size becomes d + 2h [default: 0; 128 with --paper].
    #[arg(long)]
    pub h: Option<usize>,
    /// Non-orthogonal part of B = U + lambda V (approximate unless 0) [default: 0; .3 with --paper].
    #[arg(long)]
    pub lambda: Option<f64>,
    /// Embedding noise, times the embedding's std (approximate unless 0) [default: 0; 1 with --paper].
    #[arg(long = "alpha-e")]
    pub alpha_e: Option<f64>,
    /// LM-head noise, times the head's std (approximate unless 0) [default: 0; .2 with --paper].
    #[arg(long = "alpha-h")]
    pub alpha_h: Option<f64>,
    /// RoPE block-permutation window (1 = none; approximate above 1) [default: 1; 8 with --paper].
    #[arg(long)]
    pub beta: Option<usize>,
    /// Add the C/E junk directions to the keys (needs h >= 2; makes RMSNorm approximate) [on with --paper].
    #[arg(long, conflicts_with = "no_junk")]
    pub junk: bool,
    /// Leave out the C/E junk directions (only meaningful with --paper).
    #[arg(long)]
    pub no_junk: bool,
    /// Refuse every approximate knob: the obfuscated model is mathematically equivalent (the
    /// default; with this flag an approximate knob is an error instead of a choice).
    #[arg(long)]
    pub exact: bool,
    /// Write the compile report as JSON (includes peak_rss_mib).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A HaluProbe probe trained on the plaintext model (`umbra halluc train`): also write it
    /// transformed with this key, to score the obfuscated model's states (docs/haluprobe.md).
    #[arg(long)]
    pub halluc_probe: Option<PathBuf>,
    /// Where the transformed probe goes [default: <out>/halluc-probe.safetensors].
    #[arg(long, requires = "halluc_probe")]
    pub halluc_probe_out: Option<PathBuf>,
    /// Split mode (exact keys only): write <out>/server (the transformer blocks, for `umbra
    /// serve`) and <out>/client (embedding, final norm and head, for `umbra generate --server`)
    /// instead of one checkpoint. The server then never holds the embedding or the head — but it
    /// can still recover an exact key from the blocks (`umbra attack split`; README).
    #[arg(long, conflicts_with = "halluc_probe")]
    pub split: bool,
}

impl ObfuscateArgs {
    /// Default: exact mode with no expansion; `--paper` starts from the paper's parameters; each
    /// knob flag then overrides its value.
    pub fn params(&self) -> Result<ObfuscationParams> {
        let base = if self.paper {
            ObfuscationParams::paper()
        } else {
            ObfuscationParams::recommended()
        };
        let p = ObfuscationParams {
            h: self.h.unwrap_or(base.h),
            lambda: self.lambda.unwrap_or(base.lambda),
            alpha_e: self.alpha_e.unwrap_or(base.alpha_e),
            alpha_h: self.alpha_h.unwrap_or(base.alpha_h),
            beta: self.beta.unwrap_or(base.beta),
            junk: (base.junk || self.junk) && !self.no_junk,
        };
        if self.exact && !p.is_exact() {
            bail!(
                "--exact refuses approximate knobs; drop --lambda/--alpha-e/--alpha-h/--beta/--junk or --exact"
            );
        }
        Ok(p)
    }

    /// Arguments for `obfuscate` with every knob at its default.
    pub fn defaults(model: String, out: PathBuf, key: PathBuf) -> Self {
        Self {
            model,
            out,
            key,
            seed: None,
            paper: false,
            h: None,
            lambda: None,
            alpha_e: None,
            alpha_h: None,
            beta: None,
            junk: false,
            no_junk: false,
            exact: false,
            json: None,
            halluc_probe: None,
            halluc_probe_out: None,
            split: false,
        }
    }
}

pub fn obfuscate(a: &ObfuscateArgs) -> Result<()> {
    let input = resolve_model(&a.model)?;
    let params = a.params()?;
    params.validate()?;
    let seed = a.seed.unwrap_or_else(rand_seed);
    // Check the probe before compiling, so a bad one costs nothing.
    let probe_out = match &a.halluc_probe {
        Some(p) => {
            let probe = umbra_haluprobe::probe::ProbeFile::load(p)?;
            let (cfg, _) = Checkpoint::open_config_and_tokenizer(&input)?;
            umbra_haluprobe::obfuscated::check_transformable(&probe, &cfg, &params)?;
            let out = a
                .halluc_probe_out
                .clone()
                .unwrap_or_else(|| a.out.join("halluc-probe.safetensors"));
            if out.exists() {
                bail!(
                    "{} already exists; remove it or choose another --halluc-probe-out",
                    out.display()
                );
            }
            Some((p.clone(), out))
        }
        None => None,
    };
    let pb = bar(0, "obfuscating");
    let mut progress = |done: usize, total: usize, name: &str| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
        pb.set_prefix(name.to_string());
    };
    let (report, split_report) = if a.split {
        let (report, split) = umbra_aloepri::split::compile_split(
            &input,
            &a.out,
            &a.key,
            &params,
            seed,
            &mut progress,
        )?;
        (report, Some(split))
    } else {
        let report = compile_checkpoint(&input, &a.out, &a.key, &params, seed, &mut progress)?;
        (report, None)
    };
    pb.finish_and_clear();
    println!("{}", a.out.display());
    eprintln!(
        "obfuscated {} -> {} (hidden {} -> {}, {}), key {} (fingerprint {}), load {:.1}s + transform {:.1}s",
        input.display(),
        a.out.display(),
        report.hidden_plain,
        report.hidden_obfuscated,
        if report.exact { "exact" } else { "approximate" },
        a.key.display(),
        report.fingerprint,
        report.load_s,
        report.transform_s
    );
    if let Some(r) = &split_report {
        eprintln!(
            "split mode: {} ({} tensors, {:.1}M floats: the blocks, for `umbra serve`) and {} \
             ({} tensors, {:.1}M floats: embedding, final norm and head, for `umbra generate \
             --server`)",
            r.server_dir.display(),
            r.server_tensors,
            r.server_params as f64 / 1e6,
            r.client_dir.display(),
            r.client_tensors,
            r.client_params as f64 / 1e6
        );
    }
    let probe_report = match &probe_out {
        Some((p, out)) => {
            let (_, r) =
                umbra_haluprobe::obfuscated::transform_probe_files(p, &input, &a.out, &a.key, out)
                    .with_context(|| {
                        format!(
                    "the checkpoint and key are written, but transforming {} failed (retry with \
                     `umbra halluc obfuscate-probe`)",
                    p.display()
                )
                    })?;
            eprintln!(
                "halluc probe {} -> {} ({} -> {} inputs, {:.1}s)",
                p.display(),
                out.display(),
                r.inputs_plain,
                r.inputs_obfuscated,
                r.seconds
            );
            Some(r)
        }
        None => None,
    };
    if let Some(j) = &a.json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(r) = &probe_report {
            v["halluc_probe_inputs"] = r.inputs_obfuscated.into();
            v["halluc_probe_s"] = r.seconds.into();
        }
        if let Some(r) = &split_report {
            v["split"] = serde_json::to_value(r)?;
        }
        v["peak_rss_mib"] = peak_rss_mib().into();
        v["params"] = serde_json::to_value(params)?;
        write_json(j, &v)?;
    }
    Ok(())
}

fn rand_seed() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    u64::from_le_bytes(b) ^ t.rotate_left(17)
}

#[derive(Args)]
pub struct FidelityArgs {
    /// Plaintext model folder (or `smollm2`).
    #[arg(long)]
    pub plain: String,
    /// Obfuscated model folder.
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
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Passages for fidelity: HaluEval QA `knowledge` fields, or lines of a corpus file.
pub fn load_passages(corpus: Option<&Path>, n: usize) -> Result<Vec<String>> {
    let path = match corpus {
        Some(p) => p.to_path_buf(),
        None => Cache::from_env()?.fetch(Asset::HaluEvalQa)?,
    };
    let f = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = vec![];
    for line in std::io::BufReader::new(f).lines() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        let text = if corpus.is_some() {
            line
        } else {
            let v: serde_json::Value = serde_json::from_str(&line)
                .with_context(|| format!("{}: malformed JSONL line", path.display()))?;
            v["knowledge"].as_str().unwrap_or_default().to_string()
        };
        if !text.trim().is_empty() {
            out.push(text);
        }
        if out.len() == n {
            break;
        }
    }
    if out.is_empty() {
        bail!("{}: no passages", path.display());
    }
    Ok(out)
}

pub fn tokenize_passages(
    tok: &TextTokenizer,
    texts: &[String],
    max_len: usize,
) -> Result<Vec<Vec<u32>>> {
    texts
        .iter()
        .map(|t| {
            let mut ids = tok.encode(t, false)?;
            ids.truncate(max_len);
            Ok(ids)
        })
        .filter(|r: &Result<Vec<u32>>| r.as_ref().map(|v| v.len() >= 2).unwrap_or(true))
        .collect()
}

/// Runs the fidelity evaluation with a progress bar.
pub fn run_fidelity(
    plain: &Path,
    obf: &Path,
    key: &Path,
    texts: &[String],
    max_len: usize,
    greedy: usize,
) -> Result<FidelityReport> {
    let key = ClientKey::load(key)?;
    check_key_for(obf, &key)?;
    let tau = key.permutation()?;
    let pck = Checkpoint::open(plain)?;
    let tok = pck
        .tokenizer
        .clone()
        .context("the plaintext model has no tokenizer")?;
    if tok.vocab_size() > tau.vocab_size() {
        bail!(
            "tokenizer has {} tokens but the key covers {}",
            tok.vocab_size(),
            tau.vocab_size()
        );
    }
    let plain_model = Llama::new(&pck.config, &pck.weights, &Device::Cpu)?;
    drop(pck);
    let ock = Checkpoint::open(obf)?;
    let obf_model = Llama::new(&ock.config, &ock.weights, &Device::Cpu)?;
    drop(ock);
    let seqs = tokenize_passages(&tok, texts, max_len)?;
    let opts = FidelityOptions {
        greedy_prompts: greedy,
        ..FidelityOptions::default()
    };
    let pb = bar(0, "fidelity");
    let report = evaluate(&plain_model, &obf_model, &tau, &seqs, &opts, &mut |d, t| {
        pb.set_length(t as u64);
        pb.set_position(d as u64);
    })?;
    pb.finish_and_clear();
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

pub fn fidelity(a: &FidelityArgs) -> Result<()> {
    let plain = resolve_model(&a.plain)?;
    let texts = load_passages(a.corpus.as_deref(), a.texts)?;
    let r = run_fidelity(&plain, &a.obfuscated, &a.key, &texts, a.max_len, a.greedy)?;
    print_fidelity(&r);
    if let Some(j) = &a.json {
        write_json(j, &r)?;
    }
    Ok(())
}

#[derive(Args)]
pub struct DemoArgs {
    #[arg(long, default_value = "What is the capital of France?")]
    pub prompt: String,
    /// Passages for the fidelity numbers.
    #[arg(long, default_value_t = 20)]
    pub texts: usize,
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
}

pub fn demo(a: &DemoArgs) -> Result<()> {
    let cache = Cache::from_env()?;
    let plain = smollm2_dir(&cache)?;
    let demo_dir = cache.root().join("demo");
    let obf = demo_dir.join("SmolLM2-135M-Instruct-obfuscated");
    let key = demo_dir.join("client.key");
    if !(obf.join("config.json").is_file() && key.is_file()) {
        let _ = std::fs::remove_dir_all(&obf);
        let _ = std::fs::remove_file(&key);
        std::fs::create_dir_all(&demo_dir)?;
        let args = ObfuscateArgs::defaults(plain.display().to_string(), obf.clone(), key.clone());
        obfuscate(&args)?;
    }
    println!("plaintext model : {}", plain.display());
    let hidden = |dir: &Path| -> Result<usize> {
        Ok(Checkpoint::open_config_and_tokenizer(dir)?.0.hidden_size)
    };
    println!(
        "obfuscated model: {}  (default: exact mode, hidden {} -> {})",
        obf.display(),
        hidden(&plain)?,
        hidden(&obf)?
    );
    println!("client key      : {}\n", key.display());
    let p = Session::open(&plain, None)?;
    let o = Session::open(&obf, Some(&key))?;
    let prompt = encode_prompt(&p.tokenizer, &a.prompt, true)?;
    let params = |s: &Session| GenerateParams {
        max_tokens: a.max_tokens,
        stop_ids: s.stop_ids.clone(),
        ..Default::default()
    };
    let (pid, _, pout) = p.generate(&prompt, &params(&p), |_| {})?;
    let (oid, sent, oout) = o.generate(&prompt, &params(&o), |_| {})?;
    println!("prompt: {}", a.prompt);
    println!(
        "ids the client tokenizes : {:?}",
        &prompt[prompt.len().saturating_sub(12)..]
    );
    println!(
        "ids the server receives  : {:?}",
        &sent[sent.len().saturating_sub(12)..]
    );
    println!(
        "what the server would read (with the plaintext tokenizer and no attack): {:?}",
        p.tokenizer
            .decode(&sent, true)
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
        "plaintext  ({:.1} tok/s): {}",
        pout.decode_tok_per_s(),
        p.tokenizer.decode(&pid, true)?.trim()
    );
    println!(
        "obfuscated ({:.1} tok/s): {}",
        oout.decode_tok_per_s(),
        o.tokenizer.decode(&oid, true)?.trim()
    );
    println!("identical: {}\n", pid == oid);
    let texts = load_passages(None, a.texts)?;
    let r = run_fidelity(&plain, &obf, &key, &texts, 128, 10.min(a.texts))?;
    println!("fidelity on {} HaluEval passages:", a.texts);
    print_fidelity(&r);
    Ok(())
}
