//! `umbra eval quant`: how far the quantized paths move a model from its F32 path, on real
//! text (HaluEval QA `knowledge` passages, cut to `--max-len` tokens).
//!
//! The reference is the model with `--dtype f32` (a GGUF dequantized exactly); each `--dtypes`
//! entry is the same file loaded that way (`auto`: the file's own blocks; `q8_0`, `q4_0`,
//! `q4_k`, ...: every matrix requantized from the exact F32 values at load). Per passage both
//! run one forward pass over all positions; reported: top-1 agreement (share of positions whose
//! argmax matches), the perplexity ratio `exp(mean NLL_q - mean NLL_f32)` of the passage's own
//! next tokens, and the largest relative logit difference `max |l_q - l_f| / max |l_f|`.
use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, Result};
use crate::llama::{Forward, Input, Llama};
use crate::load::{load_model, WeightDtype};
use crate::sampling::argmax;
use candle_core::{Device, Tensor};
use serde::Serialize;
use std::path::{Path, PathBuf};
use umbra_assets::{Asset, Cache};

/// `umbra eval quant`.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalQuantArgs {
    /// HF folder or GGUF file, or `smollm2` / `qwen2.5-coder-0.5b` / `qwen2.5-coder-1.5b` (the
    /// cached GGUFs).
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// Quantized paths compared with the F32 path (each a `--dtype`).
    #[arg(long, value_delimiter = ',', default_value = "q8_0,auto,q4_0")]
    pub dtypes: Vec<String>,
    /// Number of passages.
    #[arg(long, default_value_t = 200)]
    pub texts: usize,
    /// Tokens per passage (longer ones are cut).
    #[arg(long, default_value_t = 128)]
    pub max_len: usize,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One quantized path against the F32 path.
#[derive(Debug, Clone, Serialize)]
pub struct QuantFidelity {
    pub dtype: String,
    /// How the weights were held.
    pub weights: String,
    pub weight_mib: f64,
    pub top1_agreement: f64,
    pub ppl_ratio: f64,
    pub ppl: f64,
    pub max_rel_logit_diff: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalQuantReport {
    pub model: PathBuf,
    pub passages: usize,
    pub positions: usize,
    pub f32_ppl: f64,
    pub f32_weight_mib: f64,
    pub paths: Vec<QuantFidelity>,
}

fn resolve(spec: &str) -> Result<PathBuf> {
    let asset = match spec {
        "smollm2" => Some(Asset::SmolLM2Gguf),
        "qwen2.5-coder-0.5b" => Some(Asset::Qwen05b),
        "qwen2.5-coder-1.5b" => Some(Asset::Qwen15b),
        _ => None,
    };
    match asset {
        Some(a) => Cache::from_env()
            .and_then(|c| c.require(a))
            .map_err(|e| ModelError::Command {
                cmd: "eval quant".into(),
                msg: e.to_string(),
            }),
        None => Ok(PathBuf::from(spec)),
    }
}

/// Up to `n` HaluEval QA `knowledge` passages.
fn passages(n: usize) -> Result<Vec<String>> {
    let path = resolve_asset(Asset::HaluEvalQa)?;
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let mut out = vec![];
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| ModelError::Command {
            cmd: "eval quant".into(),
            msg: format!("{}: {e}", path.display()),
        })?;
        if let Some(k) = v["knowledge"].as_str().filter(|k| !k.trim().is_empty()) {
            out.push(k.to_string());
        }
        if out.len() == n {
            break;
        }
    }
    Ok(out)
}

fn resolve_asset(a: Asset) -> Result<PathBuf> {
    Cache::from_env()
        .and_then(|c| c.require(a))
        .map_err(|e| ModelError::Command {
            cmd: "eval quant".into(),
            msg: e.to_string(),
        })
}

/// Logits `[t, V]` of every position of `ids`, row-major.
fn logits(m: &Llama, ids: &[u32]) -> Result<Vec<f32>> {
    let x = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu)?;
    let mut cache = m.new_cache_with_capacity(ids.len());
    let l = m.forward(Input::Ids(&x), &mut cache, Forward::logits())?;
    Ok(l.flatten_all()?.to_vec1::<f32>()?)
}

/// `-log softmax(row)[target]`.
fn nll(row: &[f32], target: u32) -> f64 {
    let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = row.iter().map(|&v| (v as f64 - mx).exp()).sum();
    -(row[target as usize] as f64 - mx - z.ln())
}

/// Compares each path in `dtypes` with the F32 path of `model` on `seqs`.
pub fn evaluate(model: &Path, dtypes: &[String], seqs: &[Vec<u32>]) -> Result<EvalQuantReport> {
    let dev = Device::Cpu;
    let reference = load_model(model, WeightDtype::F32, &dev)?;
    let mut others = vec![];
    for d in dtypes {
        others.push((d.clone(), load_model(model, WeightDtype::parse(d)?, &dev)?));
    }
    let v = reference.config.vocab_size;
    let mut positions = 0usize;
    let mut nll_f = 0f64;
    let mut agree = vec![0usize; others.len()];
    let mut nll_q = vec![0f64; others.len()];
    let mut max_rel = vec![0f64; others.len()];
    for (i, ids) in seqs.iter().enumerate() {
        if i % 20 == 0 {
            eprintln!("passage {i}/{}", seqs.len());
        }
        let lf = logits(&reference.model, ids)?;
        let t = ids.len();
        let scale = lf.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12) as f64;
        let top_f: Vec<u32> = lf.chunks_exact(v).map(argmax).collect();
        for p in 0..t - 1 {
            nll_f += nll(&lf[p * v..(p + 1) * v], ids[p + 1]);
        }
        for (j, (_, m)) in others.iter().enumerate() {
            let lq = logits(&m.model, ids)?;
            for (p, row) in lq.chunks_exact(v).enumerate() {
                agree[j] += usize::from(argmax(row) == top_f[p]);
                if p + 1 < t {
                    nll_q[j] += nll(row, ids[p + 1]);
                }
            }
            let d = lq
                .iter()
                .zip(&lf)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs())) as f64;
            max_rel[j] = max_rel[j].max(d / scale);
        }
        positions += t;
    }
    let targets = positions - seqs.len();
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let f32_ppl = (nll_f / targets as f64).exp();
    Ok(EvalQuantReport {
        model: model.into(),
        passages: seqs.len(),
        positions,
        f32_ppl,
        f32_weight_mib: mib(reference.weight_bytes),
        paths: others
            .iter()
            .enumerate()
            .map(|(j, (d, m))| {
                let ppl = (nll_q[j] / targets as f64).exp();
                QuantFidelity {
                    dtype: d.clone(),
                    weights: m.dtype.clone(),
                    weight_mib: mib(m.weight_bytes),
                    top1_agreement: agree[j] as f64 / positions as f64,
                    ppl_ratio: ppl / f32_ppl,
                    ppl,
                    max_rel_logit_diff: max_rel[j],
                }
            })
            .collect(),
    })
}

/// Runs `umbra eval quant`: prints a table, writes JSON when asked.
pub fn run(a: &EvalQuantArgs) -> Result<EvalQuantReport> {
    let model = resolve(&a.model)?;
    let (_, tok) = Checkpoint::open_config_and_tokenizer(&model)?;
    let tok =
        tok.ok_or_else(|| ModelError::Input(format!("{} has no tokenizer", model.display())))?;
    let mut seqs = vec![];
    for p in passages(a.texts)? {
        let mut ids = tok.encode(&p, false)?;
        ids.truncate(a.max_len);
        if ids.len() >= 2 {
            seqs.push(ids);
        }
    }
    if seqs.is_empty() {
        return Err(ModelError::Input(
            "no passages of two tokens or more".into(),
        ));
    }
    let r = evaluate(&model, &a.dtypes, &seqs)?;
    println!(
        "{}: {} passages, {} positions; F32 path: ppl {:.3}, {:.0} MiB of weights\n",
        model.display(),
        r.passages,
        r.positions,
        r.f32_ppl,
        r.f32_weight_mib
    );
    println!("| path | weights | MiB | top-1 agreement vs F32 | ppl ratio | max rel logit diff |");
    println!("|---|---|---|---|---|---|");
    for p in &r.paths {
        println!(
            "| {} | {} | {:.0} | {:.4} | {:.4} | {:.2e} |",
            p.dtype, p.weights, p.weight_mib, p.top1_agreement, p.ppl_ratio, p.max_rel_logit_diff
        );
    }
    if let Some(j) = &a.json {
        umbra_common::fs::write_json(j, &r).map_err(|e| ModelError::Command {
            cmd: "eval quant".into(),
            msg: e.to_string(),
        })?;
        eprintln!("wrote {}", j.display());
    }
    Ok(r)
}
