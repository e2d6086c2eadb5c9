//! `umbra bench llamacpp`: obfuscated GGUF checkpoints run by an unmodified llama.cpp
//! (`llama-cpp-python`), with token ids in and out, against the plaintext model.
//!
//! One run: the plaintext model in our F32 engine (the reference), the plaintext model exported
//! to GGUF at each `--quant` by the same writer, and for each `--h` the exact-mode obfuscation
//! exported at each `--quant`; every GGUF is run by llama.cpp on the same HaluEval passages
//! (next-token argmax and negative log-likelihood at every position) and the same chat prompts
//! (greedy, argmax of the logits). Obfuscated runs get tau-permuted ids and their outputs are
//! mapped back through tau^-1 — exactly what a client does with a llama.cpp server.
use super::fidelity::{chat_prompt_ids, stop_ids};
use super::{load_passages, peak_rss, resolve_model, tokenize_passages, write_json_opt};
use crate::compiler::{compile_to, export_gguf, OutputFormat};
use crate::error::{AloeError, Result};
use crate::gguf_out::GgufQuant;
use crate::params::ObfuscationParams;
use crate::source::CheckpointSource;
use crate::tau::TokenPermutation;
use candle_core::{Device, Tensor, D};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use umbra_model::generate::{generate, GenerateParams};
use umbra_model::{Forward, Input};

const DRIVER: &str = include_str!("llamacpp_driver.py");

#[derive(Args, Debug, Clone)]
pub struct LlamacppArgs {
    /// Plaintext model: HF folder, GGUF file or model asset (`smollm2`).
    #[arg(long, default_value = "smollm2")]
    pub plain: String,
    /// Expansions of the exact-mode obfuscations (comma-separated; taken as given, not rounded:
    /// llama.cpp reads the explicit head_dim).
    #[arg(long, default_value = "0,64")]
    pub h: String,
    /// GGUF storage of the matrices (comma-separated: f32, q8_0, q4_k).
    #[arg(long, default_value = "f32")]
    pub quant: String,
    /// HaluEval QA passages for next-token agreement.
    #[arg(long, default_value_t = 50)]
    pub texts: usize,
    /// Tokens per passage.
    #[arg(long, default_value_t = 128)]
    pub max_len: usize,
    /// Chat prompts decoded greedily (at most 10).
    #[arg(long, default_value_t = 10)]
    pub chat: usize,
    /// Tokens generated per chat prompt.
    #[arg(long, default_value_t = 32)]
    pub chat_tokens: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// llama.cpp threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// llama.cpp's KV cache type: f32, or f16 (llama.cpp's default; its rounding of K and V
    /// differs between the plaintext and the rotated obfuscated model, which flips near-ties).
    #[arg(long, default_value = "f32")]
    pub kv: String,
    /// Python with `llama_cpp` installed (`pip install llama-cpp-python`).
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Folder for the GGUF files and keys (kept); a temporary one, removed at the end, if omitted.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One model's next-token predictions and greedy answers, in plaintext ids.
#[derive(Debug, Clone, Default)]
struct Run {
    argmax: Vec<Vec<u32>>,
    nll: Vec<Vec<f64>>,
    greedy: Vec<Vec<u32>>,
    seconds: f64,
}

#[derive(Deserialize)]
struct DriverSeq {
    argmax: Vec<u32>,
    nll: Vec<f64>,
}

#[derive(Deserialize)]
struct DriverAnswer {
    seqs: Vec<DriverSeq>,
    greedy: Vec<Vec<u32>>,
    n_vocab: usize,
    seconds: f64,
}

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub model: String,
    pub quant: String,
    pub hidden: usize,
    pub file_mb: f64,
    /// Next-token top-1 agreement with the plaintext model in our F32 engine.
    pub top1_vs_umbra_f32: f64,
    /// ... with the plaintext model's F32 GGUF in llama.cpp.
    pub top1_vs_llamacpp_plain_f32: f64,
    /// ... with the plaintext model's GGUF of the same quantization in llama.cpp.
    pub top1_vs_llamacpp_plain_same_quant: f64,
    pub ppl: f64,
    /// `ppl / ppl` of the plaintext model in our F32 engine.
    pub ppl_ratio: f64,
    /// Chat prompts whose greedy answer is token-for-token the plaintext F32 GGUF's in llama.cpp.
    pub greedy_same_as_llamacpp_plain_f32: usize,
    /// ... the plaintext model's in our F32 engine.
    pub greedy_same_as_umbra_f32: usize,
    pub greedy_prompts: usize,
    pub llamacpp_s: f64,
}

fn list<T>(s: &str, f: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| f(x.trim()))
        .collect()
}

/// The reference: the plaintext model in our F32 engine.
fn umbra_reference(
    src: CheckpointSource,
    seqs: &[Vec<u32>],
    prompts: &[Vec<u32>],
    stop: &[u32],
    max_tokens: usize,
) -> Result<Run> {
    let t0 = std::time::Instant::now();
    let m = src.load_model(&Device::Cpu)?;
    let mut run = Run::default();
    for s in seqs {
        let x = Tensor::new(s.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let logits = m
            .forward(Input::Ids(&x), &mut m.new_cache(), Forward::logits())?
            .squeeze(0)?;
        run.argmax.push(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
        let lse = logits.log_sum_exp(D::Minus1)?.to_vec1::<f32>()?;
        let rows = logits.to_vec2::<f32>()?;
        run.nll.push(
            (0..s.len() - 1)
                .map(|i| (lse[i] - rows[i][s[i + 1] as usize]) as f64)
                .collect(),
        );
    }
    for p in prompts {
        let params = GenerateParams {
            max_tokens,
            stop_ids: stop.to_vec(),
            ..Default::default()
        };
        run.greedy.push(generate(&m, p, &params, |_| true)?.ids);
    }
    run.seconds = t0.elapsed().as_secs_f64();
    Ok(run)
}

/// Runs `gguf` in llama.cpp on `seqs`/`prompts` (mapped through `tau` when given) and maps the
/// answers back to plaintext ids.
#[allow(clippy::too_many_arguments)]
fn llamacpp(
    a: &LlamacppArgs,
    dir: &Path,
    gguf: &Path,
    tau: Option<&TokenPermutation>,
    seqs: &[Vec<u32>],
    prompts: &[Vec<u32>],
    stop: &[u32],
    vocab: usize,
) -> Result<Run> {
    let map = |v: &[u32]| -> Result<Vec<u32>> {
        match tau {
            Some(t) => t.apply(v),
            None => Ok(v.to_vec()),
        }
    };
    let unmap = |v: &[u32]| -> Result<Vec<u32>> {
        match tau {
            Some(t) => t.invert(v),
            None => Ok(v.to_vec()),
        }
    };
    let max_len = seqs.iter().chain(prompts).map(Vec::len).max().unwrap_or(1);
    let req = serde_json::json!({
        "model": gguf,
        "n_ctx": max_len + a.chat_tokens + 8,
        "threads": a.threads,
        "kv_type": match a.kv.as_str() {
            "f32" => 0,
            "f16" => 1,
            o => return Err(AloeError::Input(format!("--kv `{o}`: expected f32 or f16"))),
        },
        "seqs": seqs.iter().map(|s| map(s)).collect::<Result<Vec<_>>>()?,
        "prompts": prompts.iter().map(|s| map(s)).collect::<Result<Vec<_>>>()?,
        "max_tokens": a.chat_tokens,
        "stop": map(stop)?,
    });
    let req_path = dir.join("llamacpp-request.json");
    let ans_path = dir.join("llamacpp-answer.json");
    let script = dir.join("llamacpp_driver.py");
    umbra_common::fs::write_atomic(&script, DRIVER.as_bytes())?;
    umbra_common::fs::write_json(&req_path, &req)?;
    let out = std::process::Command::new(&a.python)
        .arg(&script)
        .arg(&req_path)
        .arg(&ans_path)
        .output()
        .map_err(|e| AloeError::Input(format!("running {}: {e}", a.python)))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let hint = if err.contains("No module named 'llama_cpp'") {
            " (install it: python3 -m pip install llama-cpp-python)"
        } else {
            ""
        };
        return Err(AloeError::Input(format!(
            "llama.cpp on {} failed{hint}: {}",
            gguf.display(),
            err.lines().rev().take(6).collect::<Vec<_>>().join(" | ")
        )));
    }
    let ans: DriverAnswer = umbra_common::fs::read_json(&ans_path)?;
    if ans.n_vocab != vocab || ans.seqs.len() != seqs.len() {
        return Err(AloeError::Input(format!(
            "llama.cpp answered for {} sequences over {} tokens; expected {} over {vocab}",
            ans.seqs.len(),
            ans.n_vocab,
            seqs.len()
        )));
    }
    Ok(Run {
        argmax: ans
            .seqs
            .iter()
            .map(|s| unmap(&s.argmax))
            .collect::<Result<_>>()?,
        nll: ans.seqs.into_iter().map(|s| s.nll).collect(),
        greedy: ans.greedy.iter().map(|g| unmap(g)).collect::<Result<_>>()?,
        seconds: ans.seconds,
    })
}

fn agreement(a: &Run, b: &Run) -> f64 {
    let (mut same, mut n) = (0usize, 0usize);
    for (x, y) in a.argmax.iter().zip(&b.argmax) {
        same += x.iter().zip(y).filter(|(p, q)| p == q).count();
        n += x.len().min(y.len());
    }
    same as f64 / n.max(1) as f64
}

fn ppl(r: &Run) -> f64 {
    let all: Vec<f64> = r.nll.iter().flatten().copied().collect();
    (all.iter().sum::<f64>() / all.len().max(1) as f64).exp()
}

fn greedy_same(a: &Run, b: &Run) -> usize {
    a.greedy
        .iter()
        .zip(&b.greedy)
        .filter(|(x, y)| x == y)
        .count()
}

/// `umbra bench llamacpp`: prints the table and writes `{rows, acceptance, ...}`.
pub fn run_llamacpp(a: &LlamacppArgs) -> Result<Vec<Row>> {
    let hs = list(&a.h, |x| {
        x.parse::<usize>()
            .map_err(|_| AloeError::Input(format!("--h: `{x}` is not a number")))
    })?;
    let quants = list(&a.quant, GgufQuant::parse)?;
    if !quants.contains(&GgufQuant::F32) {
        return Err(AloeError::Input(
            "--quant must include f32 (the llama.cpp baseline)".into(),
        ));
    }
    let plain_path = resolve_model(&a.plain)?;
    let src = CheckpointSource::open(&plain_path)?;
    let cfg = src.config.clone();
    let tok = src
        .tokenizer
        .clone()
        .ok_or_else(|| AloeError::Input("the plaintext model has no tokenizer".into()))?;
    let stop = stop_ids(&cfg, &tok);
    let texts = load_passages(None, a.texts)?;
    let seqs = tokenize_passages(&tok, &texts, a.max_len)?;
    let prompts = chat_prompt_ids(&tok, a.chat.min(10))?;
    let tmp;
    let dir = match &a.out {
        Some(d) => d.clone(),
        None => {
            tmp = TempDir::new()?;
            tmp.0.clone()
        }
    };
    std::fs::create_dir_all(&dir).map_err(|e| AloeError::io(&dir, e))?;
    eprintln!("reference: {} in our F32 engine ...", plain_path.display());
    let reference = umbra_reference(src, &seqs, &prompts, &stop, a.chat_tokens)?;
    let mb = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.len() as f64 / 1e6)
            .unwrap_or(0.0)
    };
    let mut plain_runs = vec![];
    for &q in &quants {
        let path = dir.join(format!("plain-{}.gguf", q.name()));
        if !path.exists() {
            export_gguf(CheckpointSource::open(&plain_path)?, &path, q)?;
        }
        eprintln!("llama.cpp: {} ...", path.display());
        let run = llamacpp(a, &dir, &path, None, &seqs, &prompts, &stop, cfg.vocab_size)?;
        plain_runs.push((q, path, run));
    }
    let f32_run = plain_runs[quants
        .iter()
        .position(|q| *q == GgufQuant::F32)
        .unwrap_or(0)]
    .2
    .clone();
    let row =
        |model: String, q: GgufQuant, hidden: usize, path: &Path, r: &Run, same_q: &Run| Row {
            model,
            quant: q.name().into(),
            hidden,
            file_mb: mb(path),
            top1_vs_umbra_f32: agreement(r, &reference),
            top1_vs_llamacpp_plain_f32: agreement(r, &f32_run),
            top1_vs_llamacpp_plain_same_quant: agreement(r, same_q),
            ppl: ppl(r),
            ppl_ratio: ppl(r) / ppl(&reference),
            greedy_same_as_llamacpp_plain_f32: greedy_same(r, &f32_run),
            greedy_same_as_umbra_f32: greedy_same(r, &reference),
            greedy_prompts: prompts.len(),
            llamacpp_s: r.seconds,
        };
    let mut rows: Vec<Row> = plain_runs
        .iter()
        .map(|(q, p, r)| row("plaintext".into(), *q, cfg.hidden_size, p, r, r))
        .collect();
    for &h in &hs {
        let params = ObfuscationParams::exact(h);
        for (q, _, plain_q) in &plain_runs {
            let path = dir.join(format!("obf-h{h}-{}.gguf", q.name()));
            let key_path = dir.join(format!("obf-h{h}-{}.key", q.name()));
            if !path.exists() {
                let _ = std::fs::remove_file(&key_path);
                compile_to(
                    CheckpointSource::open(&plain_path)?,
                    &path,
                    &key_path,
                    &params,
                    a.seed,
                    OutputFormat::Gguf(*q),
                    &mut |_, _, _| {},
                )?;
            }
            let key = crate::keyfile::ClientKey::load(&key_path)?;
            let obf_cfg = crate::source::read_config(&path)?;
            crate::compiler::check_key(&obf_cfg, &key)?;
            let tau = key.permutation()?;
            eprintln!("llama.cpp: {} ...", path.display());
            let run = llamacpp(
                a,
                &dir,
                &path,
                Some(&tau),
                &seqs,
                &prompts,
                &stop,
                cfg.vocab_size,
            )?;
            rows.push(row(
                format!("obfuscated h {h}"),
                *q,
                obf_cfg.hidden_size,
                &path,
                &run,
                plain_q,
            ));
        }
    }
    print_rows(&rows, &reference, &seqs);
    let acceptance: Vec<serde_json::Value> = rows
        .iter()
        .filter(|r| r.model != "plaintext" && r.quant == "f32")
        .map(|r| {
            serde_json::json!({
                "model": r.model,
                "top1_vs_llamacpp_plain_f32": r.top1_vs_llamacpp_plain_f32,
                "greedy_identical": r.greedy_same_as_llamacpp_plain_f32,
                "pass": r.top1_vs_llamacpp_plain_f32 >= 0.999
                    && r.greedy_same_as_llamacpp_plain_f32 == r.greedy_prompts,
            })
        })
        .collect();
    write_json_opt(
        a.json.as_deref(),
        &serde_json::json!({
            "plain": plain_path,
            "kv_cache": a.kv,
            "passages": seqs.len(),
            "positions": seqs.iter().map(Vec::len).sum::<usize>(),
            "greedy_prompts": prompts.len(),
            "umbra_f32_ppl": ppl(&reference),
            "umbra_f32_s": reference.seconds,
            "llamacpp_f32_vs_umbra_f32_top1": agreement(&f32_run, &reference),
            "rows": rows,
            "acceptance": acceptance,
            "peak_rss_mib": peak_rss(),
        }),
    )?;
    Ok(rows)
}

fn print_rows(rows: &[Row], reference: &Run, seqs: &[Vec<u32>]) {
    println!(
        "{} passages / {} positions; plaintext in our F32 engine: ppl {:.3}",
        seqs.len(),
        seqs.iter().map(Vec::len).sum::<usize>(),
        ppl(reference)
    );
    println!("| model | GGUF | hidden | MB | top-1 vs llama.cpp plain F32 | vs plain same quant | vs umbra F32 | ppl ratio | greedy = plain F32 (llama.cpp) | greedy = umbra F32 | s |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.0} | {:.4} | {:.4} | {:.4} | {:.4} | {}/{} | {}/{} | {:.1} |",
            r.model,
            r.quant,
            r.hidden,
            r.file_mb,
            r.top1_vs_llamacpp_plain_f32,
            r.top1_vs_llamacpp_plain_same_quant,
            r.top1_vs_umbra_f32,
            r.ppl_ratio,
            r.greedy_same_as_llamacpp_plain_f32,
            r.greedy_prompts,
            r.greedy_same_as_umbra_f32,
            r.greedy_prompts,
            r.llamacpp_s
        );
    }
}

/// A scratch folder removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        let p = std::env::temp_dir().join(format!(
            "umbra-llamacpp-{}-{}",
            std::process::id(),
            umbra_common::seed::os_seed() % 1_000_000
        ));
        std::fs::create_dir_all(&p).map_err(|e| AloeError::io(&p, e))?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
