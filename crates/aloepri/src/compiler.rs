//! The checkpoint compiler: a plaintext checkpoint on disk (HF folder or GGUF file) -> an
//! obfuscated checkpoint on disk plus the client key (mode 0600).
//!
//! Output formats ([`OutputFormat`]): a standard HF folder (`config.json`, one F32
//! `model.safetensors`, the public tokenizer, `generation_config.json`), or one GGUF file for an
//! unmodified llama.cpp ([`crate::gguf_out`], F32 / Q8_0 / Q4_K). Tensors stream from a
//! [`CheckpointSource`] through [`compile_source`] into the writer: peak memory is about one
//! vocabulary matrix plus one layer, whatever the model's size.
//!
//! Every output is built in a locked staging sibling (`umbra_common::fs::Staging`) and renamed
//! into place at the end: a killed run leaves only a sibling that the next run for the same
//! output removes (never one a live run is writing); a failed run leaves nothing.
pub use crate::keyfile::CONFIG_SECTION;
pub use crate::tensor_compiler::{
    compile_in_memory, compile_source, compile_weights, obfuscated_config, output_specs,
    recorded_fingerprint, Compiled,
};

use crate::error::{AloeError, Result};
use crate::gguf_out::{model_metadata, tokenizer_part, GgufQuant, GgufWriter};
use crate::keyfile::ClientKey;
use crate::params::ObfuscationParams;
use crate::source::{read_config, CheckpointSource};
use crate::tensor_compiler::{FnSink, TensorSink};
use crate::writer::StreamingWriter;
use candle_core::quantized::gguf_file::Value;
use candle_core::Tensor;
use std::path::Path;
use std::time::Instant;
use umbra_common::fs::Staging;
use umbra_model::checkpoint::Checkpoint;
use umbra_model::tokenizer::TextTokenizer;
use umbra_model::LlamaConfig;

/// What [`compile_to`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormat {
    /// An HF folder with one F32 `model.safetensors`.
    Hf,
    /// One `.gguf` file for llama.cpp, matrices stored as given.
    Gguf(GgufQuant),
}

impl OutputFormat {
    pub fn name(self) -> String {
        match self {
            Self::Hf => "hf".into(),
            Self::Gguf(q) => format!("gguf-{}", q.name()),
        }
    }
}

/// Summary of a compile run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CompileReport {
    pub fingerprint: String,
    pub hidden_plain: usize,
    pub hidden_obfuscated: usize,
    /// The expansion `h` the key uses.
    pub h: usize,
    pub tensors: usize,
    pub bytes_written: u64,
    pub exact: bool,
    pub format: String,
    pub load_s: f64,
    pub transform_s: f64,
}

/// Special ids that must stay fixed points of tau: the tokenizer's special/added tokens and the
/// config's BOS/EOS (the tokenizer's EOS when the config names none).
pub fn special_ids_of(cfg: &LlamaConfig, tokenizer: Option<&TextTokenizer>) -> Vec<u32> {
    let mut ids: Vec<u32> = tokenizer.map(|t| t.special_token_ids()).unwrap_or_default();
    ids.extend(cfg.bos_token_ids());
    let eos = cfg.eos_token_ids();
    if eos.is_empty() {
        ids.extend(tokenizer.and_then(|t| t.eos_id()));
    } else {
        ids.extend(eos);
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// [`special_ids_of`] a loaded checkpoint.
pub fn special_ids(ck: &Checkpoint) -> Vec<u32> {
    special_ids_of(&ck.config, ck.tokenizer.as_ref())
}

/// Compiles the checkpoint at `input` (HF folder or GGUF) into an obfuscated HF folder `out` and
/// writes the client key to `key_path` (see [`compile_to`]).
/// `progress(done, total, tensor_name)` is called once per written tensor (or row chunk).
pub fn compile_checkpoint(
    input: &Path,
    out: &Path,
    key_path: &Path,
    params: &ObfuscationParams,
    seed: u64,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<CompileReport> {
    let t0 = Instant::now();
    let src = CheckpointSource::open(input)?;
    let load_s = t0.elapsed().as_secs_f64();
    let mut r = compile_to(src, out, key_path, params, seed, OutputFormat::Hf, progress)?;
    r.load_s = load_s;
    Ok(r)
}

/// Compiles `src` into `out` (an HF folder, or a `.gguf` file) and writes the client key to
/// `key_path`. `out` and `key_path` must not exist. Atomic: `out` is built in a locked staging
/// sibling and renamed at the end, then the key is written; on any failure neither exists.
pub fn compile_to(
    mut src: CheckpointSource,
    out: &Path,
    key_path: &Path,
    params: &ObfuscationParams,
    seed: u64,
    format: OutputFormat,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<CompileReport> {
    params.validate()?;
    for p in [out, key_path] {
        if p.symlink_metadata().is_ok() {
            return Err(AloeError::OutputExists(p.into()));
        }
    }
    let t1 = Instant::now();
    let specials = special_ids_of(&src.config, src.tokenizer.as_ref());
    let plain_cfg = src.config.clone();
    let shape_cfg = obfuscated_config(&plain_cfg, params, "", 1.0);
    let specs = output_specs(&shape_cfg);
    let total = specs.len();
    let mut done = 0usize;
    let (compiled, bytes_written) = match format {
        OutputFormat::Hf => {
            let staging = Staging::dir(out)?;
            let st_path = staging.path().join(umbra_model::weights::SINGLE_FILE);
            let meta = std::collections::BTreeMap::from([("format".to_string(), "pt".to_string())]);
            let mut writer = StreamingWriter::create(&st_path, specs, meta)?;
            let compiled = compile_source(
                &mut src,
                &specials,
                params,
                seed,
                &mut FnSink(|n: &str, t: Tensor| {
                    writer.write(n, &t)?;
                    done += 1;
                    progress(done, total, n);
                    Ok(())
                }),
            )?;
            writer.finish()?;
            write_hf_extras(staging.path(), &compiled.config, &mut src)?;
            let bytes = file_len(&st_path)?;
            staging.commit(false)?;
            (compiled, bytes)
        }
        OutputFormat::Gguf(quant) => {
            let name = out
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "umbra".into());
            let tokenizer = tokenizer_part(src.gguf(), src.tokenizer.as_ref(), &plain_cfg)?;
            let (staging, file) = Staging::file(out)?;
            let mut sink = GgufSink {
                path: staging.path(),
                file: Some(file),
                specs: &specs,
                quant,
                name,
                tokenizer,
                writer: None,
                progress: &mut |n: &str| {
                    done += 1;
                    progress(done, total, n);
                },
            };
            let compiled = compile_source(&mut src, &specials, params, seed, &mut sink)?;
            sink.writer
                .take()
                .ok_or_else(|| AloeError::Input("no tensor was written".into()))?
                .finish()?;
            let bytes = file_len(staging.path())?;
            staging.commit(false)?;
            (compiled, bytes)
        }
    };
    if let Err(e) = compiled.key.save(key_path) {
        let _ = if out.is_dir() {
            std::fs::remove_dir_all(out)
        } else {
            std::fs::remove_file(out)
        };
        return Err(e);
    }
    Ok(CompileReport {
        fingerprint: compiled.key.fingerprint.clone(),
        hidden_plain: plain_cfg.hidden_size,
        hidden_obfuscated: compiled.config.hidden_size,
        h: params.h,
        tensors: total,
        bytes_written,
        exact: params.is_exact(),
        format: format.name(),
        load_s: 0.0,
        transform_s: t1.elapsed().as_secs_f64(),
    })
}

/// The GGUF writer as the compiler's sink: its header is written once the final config is known.
struct GgufSink<'a> {
    path: &'a Path,
    file: Option<std::fs::File>,
    specs: &'a [(String, Vec<usize>)],
    quant: GgufQuant,
    name: String,
    tokenizer: Vec<(String, Value)>,
    writer: Option<GgufWriter>,
    progress: &'a mut dyn FnMut(&str),
}

impl TensorSink for GgufSink<'_> {
    fn begin(&mut self, config: &LlamaConfig) -> Result<()> {
        let mut meta = model_metadata(config, self.quant, &self.name)?;
        meta.append(&mut self.tokenizer);
        let file = self
            .file
            .take()
            .ok_or_else(|| AloeError::Input("GGUF header written twice".into()))?;
        self.writer = Some(GgufWriter::create(
            self.path, file, config, self.specs, self.quant, &meta,
        )?);
        Ok(())
    }

    fn write(&mut self, name: &str, t: Tensor) -> Result<()> {
        self.writer
            .as_mut()
            .ok_or_else(|| AloeError::Input("GGUF tensor before the header".into()))?
            .write(name, &t)?;
        (self.progress)(name);
        Ok(())
    }
}

/// Writes `src` as it is (no key) into one GGUF file `out` for llama.cpp, matrices stored as
/// `quant`: the plaintext baseline of the GGUF benchmarks, quantized by the same code as the
/// obfuscated exports. Streams tensor by tensor; atomic like [`compile_to`]. Returns the bytes
/// written.
pub fn export_gguf(mut src: CheckpointSource, out: &Path, quant: GgufQuant) -> Result<u64> {
    if out.symlink_metadata().is_ok() {
        return Err(AloeError::OutputExists(out.into()));
    }
    let cfg = src.config.clone();
    let specs = umbra_model::checkpoint::expected_shapes(&cfg);
    let name = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "umbra".into());
    let mut meta = model_metadata(&cfg, quant, &name)?;
    meta.extend(tokenizer_part(src.gguf(), src.tokenizer.as_ref(), &cfg)?);
    let (staging, file) = Staging::file(out)?;
    let mut w = GgufWriter::create(staging.path(), file, &cfg, &specs, quant, &meta)?;
    for (name, _) in &specs {
        let t = src.read(name)?;
        w.write(name, &t)?;
    }
    w.finish()?;
    let bytes = file_len(staging.path())?;
    staging.commit(false)?;
    Ok(bytes)
}

fn file_len(p: &Path) -> Result<u64> {
    Ok(std::fs::metadata(p).map_err(|e| AloeError::io(p, e))?.len())
}

/// `config.json` (F32), the public tokenizer and `generation_config.json` beside the weights.
fn write_hf_extras(dir: &Path, cfg: &LlamaConfig, src: &mut CheckpointSource) -> Result<()> {
    let mut cfg = cfg.clone();
    cfg.extra.insert("torch_dtype".into(), "float32".into());
    umbra_common::fs::write_atomic(&dir.join("config.json"), cfg.to_json_string().as_bytes())?;
    // The tokenizer is public; the server only ever sees permuted ids.
    let ck = Checkpoint {
        config: src.config.clone(),
        weights: Default::default(),
        tokenizer: src.tokenizer.take(),
        source: src.path.clone(),
    };
    let res = (|| -> Result<()> {
        if let Some(t) = &ck.tokenizer {
            t.save_hf(dir)?;
        }
        umbra_common::fs::write_json(
            &dir.join("generation_config.json"),
            &ck.generation_config_json(),
        )?;
        Ok(())
    })();
    src.tokenizer = ck.tokenizer;
    res
}

/// Checks that `key` belongs to the obfuscated model whose config is `cfg` (HF `config.json` or
/// an exported GGUF's metadata): same fingerprint, same vocabulary size.
pub fn check_key(cfg: &LlamaConfig, key: &ClientKey) -> Result<()> {
    let fp = recorded_fingerprint(cfg).ok_or_else(|| {
        AloeError::Input(
            "not an Umbra-obfuscated checkpoint (its config has no `umbra` section)".into(),
        )
    })?;
    key.check_matches(&fp)?;
    if key.tau.len() != cfg.vocab_size {
        return Err(AloeError::Input(format!(
            "key covers {} tokens but the checkpoint has {}",
            key.tau.len(),
            cfg.vocab_size
        )));
    }
    Ok(())
}

/// [`check_key`] on the config of an HF folder or GGUF file (reads no tensor).
pub fn check_key_for(model: &Path, key: &ClientKey) -> Result<()> {
    let cfg = read_config(model)?;
    if recorded_fingerprint(&cfg).is_none() {
        return Err(AloeError::NotObfuscated(model.into()));
    }
    check_key(&cfg, key)
}
