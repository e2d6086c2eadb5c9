//! `umbra obfuscate`: plaintext checkpoint -> obfuscated checkpoint (HF folder, GGUF file, or
//! split-mode parts) and the client key.
use super::{peak_rss, resolve_model, write_json_opt};
use crate::compiler::{compile_to, CompileReport, OutputFormat};
use crate::error::{AloeError, Result};
use crate::gguf_out::GgufQuant;
use crate::params::{round_h_for_heads, ObfuscationParams};
use crate::source::CheckpointSource;
use crate::split_parts::SplitReport;
use clap::Args;
use std::path::{Path, PathBuf};
use umbra_common::progress::Progress;
use umbra_model::LlamaConfig;

#[derive(Args, Clone, Debug)]
pub struct ObfuscateArgs {
    /// Plaintext HF folder or GGUF file, or a model asset (`smollm2`).
    #[arg(long)]
    pub model: String,
    /// Output: an HF folder (a standard Llama/Qwen2 checkpoint), or with `--format gguf` one
    /// `.gguf` file for llama.cpp; must not exist.
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
    /// Residual expansion: hidden size becomes d + 2h [default: 0; 128 with --paper]. Rounded up
    /// so that d + 2h is a multiple of the head count (transformers 5.x needs it) unless
    /// --no-round-h.
    #[arg(long)]
    pub h: Option<usize>,
    /// Keep --h as given even when d + 2h is not a multiple of the head count (llama.cpp and
    /// umbra load such a checkpoint; transformers 5.x refuses it).
    #[arg(long)]
    pub no_round_h: bool,
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
    /// Output format: `hf` (safetensors F32) or `gguf` (one file for an unmodified llama.cpp,
    /// which then runs on tau-permuted token ids).
    #[arg(long, default_value = "hf")]
    pub format: String,
    /// GGUF matrices: f32, q8_0 or q4_k (Q5_0 where a row is not a multiple of 256, as
    /// llama.cpp's quantize does).
    #[arg(long, default_value = "f32")]
    pub quant: String,
    /// Write the compile report as JSON (includes wall time and peak_rss_mib).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Split mode (exact keys only): write <out>/server (the transformer blocks, for `umbra
    /// serve`) and <out>/client (embedding, final norm and head, for `umbra generate --server`)
    /// instead of one checkpoint. The server then never holds the embedding or the head — but it
    /// can still recover an exact key from the blocks (`umbra attack split`; README).
    #[arg(long)]
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
            return Err(AloeError::Params(
                "--exact refuses approximate knobs; drop --lambda/--alpha-e/--alpha-h/--beta/--junk or --exact"
                    .into(),
            ));
        }
        p.validate()?;
        Ok(p)
    }

    /// [`ObfuscateArgs::params`] with `h` rounded for `cfg`'s head count (unless
    /// `--no-round-h`); returns the params and the user's `h` when it was changed.
    pub fn params_for(&self, cfg: &LlamaConfig) -> Result<(ObfuscationParams, Option<usize>)> {
        let mut p = self.params()?;
        if self.no_round_h {
            return Ok((p, None));
        }
        match round_h_for_heads(p.h, cfg.hidden_size, cfg.num_attention_heads) {
            Some(h) if h != p.h => {
                let asked = p.h;
                p.h = h;
                p.validate()?;
                Ok((p, Some(asked)))
            }
            Some(_) => Ok((p, None)),
            None => Ok((p, None)),
        }
    }

    /// The output format from `--format` and `--quant`.
    pub fn output_format(&self) -> Result<OutputFormat> {
        match self.format.to_ascii_lowercase().as_str() {
            "hf" | "safetensors" => {
                if self.quant != "f32" {
                    return Err(AloeError::Input(
                        "--quant needs --format gguf (HF checkpoints are written in F32)".into(),
                    ));
                }
                Ok(OutputFormat::Hf)
            }
            "gguf" => Ok(OutputFormat::Gguf(GgufQuant::parse(&self.quant)?)),
            o => Err(AloeError::Input(format!(
                "--format `{o}`: expected hf or gguf"
            ))),
        }
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
            no_round_h: false,
            lambda: None,
            alpha_e: None,
            alpha_h: None,
            beta: None,
            junk: false,
            no_junk: false,
            exact: false,
            format: "hf".into(),
            quant: "f32".into(),
            json: None,
            split: false,
        }
    }
}

/// Steps another crate adds to `umbra obfuscate` (the binary's `--halluc-probe`: HaluProbe
/// depends on this crate, so it plugs in here rather than being called from it).
pub trait ObfuscateHook {
    /// Runs before anything is compiled (a bad extra input costs nothing).
    fn before(
        &mut self,
        _input: &Path,
        _cfg: &LlamaConfig,
        _params: &ObfuscationParams,
    ) -> Result<()> {
        Ok(())
    }
    /// Runs once the checkpoint and key are written; returns fields for the JSON report.
    fn after(
        &mut self,
        _outcome: &ObfuscateOutcome,
    ) -> Result<serde_json::Map<String, serde_json::Value>> {
        Ok(Default::default())
    }
}

/// No extra steps.
pub struct NoHook;

impl ObfuscateHook for NoHook {}

/// What `umbra obfuscate` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ObfuscateOutcome {
    pub input: PathBuf,
    pub out: PathBuf,
    pub key: PathBuf,
    pub params: ObfuscationParams,
    /// The `--h` the user asked for, when it was rounded.
    pub h_requested: Option<usize>,
    pub report: CompileReport,
    pub split: Option<SplitReport>,
    pub wall_s: f64,
    pub peak_rss_mib: f64,
}

/// `umbra obfuscate`: compiles, prints the output path on stdout and a summary on stderr.
pub fn run_obfuscate(a: &ObfuscateArgs, hook: &mut dyn ObfuscateHook) -> Result<ObfuscateOutcome> {
    let t0 = std::time::Instant::now();
    let input = resolve_model(&a.model)?;
    let format = a.output_format()?;
    let src = CheckpointSource::open(&input)?;
    let (params, h_requested) = a.params_for(&src.config)?;
    if let Some(asked) = h_requested {
        eprintln!(
            "note: h {asked} rounded to {} so that the hidden size {} is a multiple of the {} \
             heads (transformers 5.x needs it; --no-round-h keeps {asked})",
            params.h,
            src.config.hidden_size + 2 * params.h,
            src.config.num_attention_heads
        );
    }
    hook.before(&input, &src.config, &params)?;
    let seed = a.seed.unwrap_or_else(umbra_common::seed::os_seed);
    let pb = Progress::new(0, "obfuscating");
    let mut progress = |done: usize, total: usize, name: &str| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
        pb.set_note(name.to_string());
    };
    let (report, split) = if a.split {
        if format != OutputFormat::Hf {
            return Err(AloeError::Input(
                "--split writes HF folders (no --format gguf)".into(),
            ));
        }
        drop(src);
        let (r, s) = crate::split_parts::compile_split(
            &input,
            &a.out,
            &a.key,
            &params,
            seed,
            &mut progress,
        )?;
        (r, Some(s))
    } else {
        (
            compile_to(src, &a.out, &a.key, &params, seed, format, &mut progress)?,
            None,
        )
    };
    pb.finish();
    println!("{}", a.out.display());
    let mut outcome = ObfuscateOutcome {
        input,
        out: a.out.clone(),
        key: a.key.clone(),
        params,
        h_requested,
        report,
        split,
        wall_s: t0.elapsed().as_secs_f64(),
        peak_rss_mib: peak_rss(),
    };
    let r = &outcome.report;
    eprintln!(
        "obfuscated {} -> {} ({}, hidden {} -> {}, {}), key {} (fingerprint {}), {:.1}s wall, peak RSS {:.0} MiB",
        outcome.input.display(),
        outcome.out.display(),
        r.format,
        r.hidden_plain,
        r.hidden_obfuscated,
        if r.exact { "exact" } else { "approximate" },
        outcome.key.display(),
        r.fingerprint,
        outcome.wall_s,
        outcome.peak_rss_mib
    );
    if let Some(s) = &outcome.split {
        eprintln!(
            "split mode: {} ({} tensors, {:.1}M floats: the blocks, for `umbra serve`) and {} \
             ({} tensors, {:.1}M floats: embedding, final norm and head, for `umbra generate \
             --server`)",
            s.server_dir.display(),
            s.server_tensors,
            s.server_params as f64 / 1e6,
            s.client_dir.display(),
            s.client_tensors,
            s.client_params as f64 / 1e6
        );
    }
    let extra = hook.after(&outcome)?;
    outcome.peak_rss_mib = peak_rss();
    if a.json.is_some() {
        let mut v = serde_json::to_value(&outcome).map_err(|e| AloeError::Input(e.to_string()))?;
        // The flat fields earlier reports had at the top level.
        for (k, x) in serde_json::to_value(&outcome.report)
            .map_err(|e| AloeError::Input(e.to_string()))?
            .as_object()
            .into_iter()
            .flatten()
        {
            v[k] = x.clone();
        }
        for (k, x) in extra {
            v[k] = x;
        }
        write_json_opt(a.json.as_deref(), &v)?;
    }
    Ok(outcome)
}
