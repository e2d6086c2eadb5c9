//! `umbra bench engine`: our engine against llama.cpp (the `llama_cpp` Python package) in one
//! run, same threads, same token ids, same token counts; each engine in its own child process
//! (so that peak RSS is its own), one after the other.
//!
//! Cases (`--cases`):
//! - `smollm2-f32`, `smollm2-q8_0`, `smollm2-q4_1`: SmolLM2-135M-Instruct as an F32 GGUF
//!   (the shipped Q4_1 file dequantized), a Q8_0 GGUF (requantized from those F32 values) and
//!   the shipped Q4_1 GGUF; both engines run each file in its own types. Targets: decode
//!   >= 1.0x llama.cpp (F32, Q8_0), >= 0.8x (Q4_1).
//! - `qwen1.5b-q4_k_m`: Qwen2.5-Coder-1.5B-Instruct Q4_K_M as fetched; decode and prefill,
//!   and peak RSS within 1.3x of llama.cpp's.
//!
//! Every case measures (see [`super::engine_child`]) the first-token latency of a
//! `--prompt-tokens` prompt (HaluEval passages, tokenized by the model), and decode tok/s of
//! `--tokens` greedy tokens after a short chat prompt. The table and the JSON report both
//! engines, the ratios, the targets and the machine's load average before and after.
use super::engine_child::{run_ours, ChildReport, ChildSpec, LLAMA_CPP_CHILD};
use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::quant::QuantType;
use crate::tokenizer::ChatMessage;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use umbra_assets::{Asset, Cache};

/// `umbra bench engine`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchEngineArgs {
    /// Where to write the JSON report.
    #[arg(long, default_value = "bench-out/engine.json")]
    pub json: PathBuf,
    /// Cases to run: smollm2-f32, smollm2-q8_0, smollm2-q4_1, qwen1.5b-q4_k_m.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "smollm2-f32,smollm2-q8_0,smollm2-q4_1,qwen1.5b-q4_k_m"
    )]
    pub cases: Vec<String>,
    /// Tokens decoded per measurement.
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    /// Length of the prompt whose first-token latency is measured.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Threads of both engines.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Repetitions of each measurement (the best counts).
    #[arg(long, default_value_t = 2)]
    pub reps: usize,
    /// Where the converted SmolLM2 GGUFs are kept (default: `bench-engine/` in the asset cache).
    #[arg(long)]
    pub work: Option<PathBuf>,
    /// Our engine only.
    #[arg(long)]
    pub no_llama_cpp: bool,
    /// (internal) Run one measurement of our engine from this spec and print its report.
    #[arg(long, hide = true)]
    pub child: Option<PathBuf>,
}

/// The arguments a child of ours gets after the executable (`umbra bench engine --child`).
const CHILD_ARGS: [&str; 3] = ["bench", "engine", "--child"];

struct Case {
    name: &'static str,
    file: PathBuf,
    /// Decode ratio target (ours / llama.cpp), if any.
    target: Option<f64>,
    /// Peak RSS ratio bound (ours / llama.cpp), if any.
    rss_bound: Option<f64>,
}

fn cmd_err(cmd: &str, msg: impl std::fmt::Display) -> ModelError {
    ModelError::Command {
        cmd: cmd.to_string(),
        msg: msg.to_string(),
    }
}

fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

/// Runs the benchmark (or, with `--child`, one measurement of our engine); returns the report.
pub fn run(a: &BenchEngineArgs) -> Result<serde_json::Value> {
    if let Some(spec) = &a.child {
        let text = std::fs::read_to_string(spec).map_err(|e| ModelError::io(spec, e))?;
        let spec: ChildSpec = serde_json::from_str(&text)
            .map_err(|e| cmd_err("bench engine --child", format!("bad spec: {e}")))?;
        let rep = run_ours(&spec)?;
        let line = serde_json::to_string(&rep).map_err(|e| cmd_err("bench engine", e))?;
        println!("{line}");
        return serde_json::to_value(rep).map_err(|e| cmd_err("bench engine", e));
    }
    let cache = Cache::from_env().map_err(|e| cmd_err("asset cache", e))?;
    let require = |asset| cache.require(asset).map_err(|e| cmd_err("bench engine", e));
    let work = match &a.work {
        Some(w) => w.clone(),
        None => cache.root().join("bench-engine"),
    };
    std::fs::create_dir_all(&work).map_err(|e| ModelError::io(&work, e))?;
    let mut cases = vec![];
    for c in &a.cases {
        cases.push(match c.as_str() {
            "smollm2-f32" | "smollm2-q8_0" | "smollm2-q4_1" => {
                let shipped = require(Asset::SmolLM2Gguf)?;
                let (file, target) = match c.as_str() {
                    "smollm2-f32" => (converted(&shipped, &work, None)?, 1.0),
                    "smollm2-q8_0" => (converted(&shipped, &work, Some(QuantType::Q8_0))?, 1.0),
                    _ => (shipped, 0.8),
                };
                Case {
                    name: match c.as_str() {
                        "smollm2-f32" => "SmolLM2-135M F32",
                        "smollm2-q8_0" => "SmolLM2-135M Q8_0",
                        _ => "SmolLM2-135M Q4_1",
                    },
                    file,
                    target: Some(target),
                    rss_bound: None,
                }
            }
            "qwen1.5b-q4_k_m" => Case {
                name: "Qwen2.5-Coder-1.5B Q4_K_M",
                file: require(Asset::Qwen15b)?,
                target: None,
                rss_bound: Some(1.3),
            },
            other => {
                return Err(ModelError::Input(format!(
                    "--cases: unknown case `{other}` (smollm2-f32, smollm2-q8_0, smollm2-q4_1, \
                     qwen1.5b-q4_k_m)"
                )))
            }
        });
    }
    let passages = require(Asset::HaluEvalQa)?;
    let load_before = load_avg();
    eprintln!("load average before: {load_before}");
    let mut rows = vec![];
    for case in &cases {
        let spec = prompts(case, &passages, a)?;
        eprintln!("[{}] ours ...", case.name);
        let ours = child_ours(&spec, &work)?;
        let lcpp = if a.no_llama_cpp {
            None
        } else {
            eprintln!("[{}] llama.cpp ...", case.name);
            match child_llama_cpp(&spec) {
                Ok(r) => Some(r),
                Err(e) => {
                    eprintln!("llama.cpp: {e}");
                    None
                }
            }
        };
        rows.push((case, ours, lcpp));
    }
    let load_after = load_avg();
    print_table(&rows, a, &load_before, &load_after);
    let report = json!({
        "threads": a.threads, "tokens": a.tokens, "prompt_tokens": a.prompt_tokens, "reps": a.reps,
        "load_avg_before": load_before, "load_avg_after": load_after,
        "cases": rows.iter().map(|(c, o, l)| {
            let ratio = l.as_ref().map(|l| o.decode_tok_s / l.decode_tok_s);
            let rss_ratio = l.as_ref().map(|l| o.peak_rss_mib / l.peak_rss_mib);
            json!({
                "case": c.name, "file": c.file, "ours": o, "llama_cpp": l,
                "decode_ratio": ratio, "decode_target": c.target,
                "decode_target_met": ratio.zip(c.target).map(|(r, t)| r >= t),
                "prefill_ratio": l.as_ref().map(|l| o.prefill_tok_s / l.prefill_tok_s),
                "rss_ratio": rss_ratio, "rss_bound": c.rss_bound,
                "rss_bound_met": rss_ratio.zip(c.rss_bound).map(|(r, b)| r <= b),
                "greedy_ids_agree": l.as_ref().map(|l| agreement(&o.ids, &l.ids)),
            })
        }).collect::<Vec<_>>(),
    });
    umbra_common::fs::write_json(&a.json, &report).map_err(|e| cmd_err("writing the report", e))?;
    eprintln!("wrote {}", a.json.display());
    Ok(report)
}

/// The F32 or requantized copy of the shipped SmolLM2 GGUF in `work` (made once).
fn converted(shipped: &Path, work: &Path, ty: Option<QuantType>) -> Result<PathBuf> {
    let name = match ty {
        None => "smollm2-135m-f32.gguf".to_string(),
        Some(t) => format!("smollm2-135m-{}.gguf", t.name().to_ascii_lowercase()),
    };
    let out = work.join(name);
    if !out.is_file() {
        eprintln!("writing {} ...", out.display());
        GgufFile::open(shipped)?.write_converted(&out, ty)?;
    }
    Ok(out)
}

/// The long prompt (HaluEval passages, cut to `--prompt-tokens` ids) and the short chat prompt,
/// tokenized by the case's own tokenizer.
fn prompts(case: &Case, passages: &Path, a: &BenchEngineArgs) -> Result<ChildSpec> {
    let (_, tok) = Checkpoint::open_config_and_tokenizer(&case.file)?;
    let tok = tok.ok_or_else(|| {
        cmd_err(
            "bench engine",
            format!("{} has no tokenizer", case.file.display()),
        )
    })?;
    let text = std::fs::read_to_string(passages).map_err(|e| ModelError::io(passages, e))?;
    let mut long = vec![];
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| cmd_err("bench engine", format!("{}: {e}", passages.display())))?;
        if let Some(k) = v["knowledge"].as_str() {
            long.extend(tok.encode(&format!("{k}\n"), false)?);
        }
        if long.len() >= a.prompt_tokens {
            break;
        }
    }
    long.truncate(a.prompt_tokens);
    let chat = tok.apply_chat_template(
        &[ChatMessage::user(
            "Write a long story about a lighthouse keeper and the sea.",
        )],
        true,
    )?;
    Ok(ChildSpec {
        model: case.file.clone(),
        dtype: "auto".into(),
        long_prompt: long,
        short_prompt: tok.encode(&chat, false)?,
        tokens: a.tokens,
        reps: a.reps,
        threads: a.threads,
    })
}

fn child_ours(spec: &ChildSpec, work: &Path) -> Result<ChildReport> {
    let path = work.join(format!("child-spec-{}.json", std::process::id()));
    let text = serde_json::to_string(spec).map_err(|e| cmd_err("bench engine", e))?;
    std::fs::write(&path, text).map_err(|e| ModelError::io(&path, e))?;
    let exe = std::env::current_exe().map_err(|e| cmd_err("bench engine", e))?;
    let out = Command::new(exe)
        .args(CHILD_ARGS)
        .arg(&path)
        .env("CANDLE_NUM_THREADS", spec.threads.to_string())
        .env("RAYON_NUM_THREADS", spec.threads.to_string())
        .output()
        .map_err(|e| cmd_err("umbra bench engine --child", e));
    let _ = std::fs::remove_file(&path);
    parse_child("umbra bench engine --child", out?)
}

fn child_llama_cpp(spec: &ChildSpec) -> Result<ChildReport> {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(LLAMA_CPP_CHILD)
        .env("OMP_NUM_THREADS", spec.threads.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| cmd_err("python3", e))?;
    let text = serde_json::to_string(spec).map_err(|e| cmd_err("bench engine", e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| cmd_err("python3", e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| cmd_err("python3", e))?;
    parse_child("python3 (llama_cpp; `pip install llama-cpp-python`)", out)
}

fn parse_child(cmd: &str, out: std::process::Output) -> Result<ChildReport> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.trim().lines().rev().take(5).collect();
        return Err(cmd_err(
            cmd,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
        ));
    }
    let line = stdout.trim().lines().last().unwrap_or_default();
    serde_json::from_str(line).map_err(|e| cmd_err(cmd, format!("unreadable report ({e}): {line}")))
}

/// Fraction of positions where two greedy id sequences agree, up to the first difference
/// counted as the agreeing prefix over the shorter length.
fn agreement(a: &[u32], b: &[u32]) -> f64 {
    let n = a.len().min(b.len());
    if n == 0 {
        return 0.0;
    }
    a.iter().zip(b).take_while(|(x, y)| x == y).count() as f64 / n as f64
}

fn print_table(
    rows: &[(&Case, ChildReport, Option<ChildReport>)],
    a: &BenchEngineArgs,
    before: &str,
    after: &str,
) {
    let f = |v: Option<f64>, p: usize| v.map_or("n/a".to_string(), |v| format!("{v:.p$}"));
    println!(
        "{} threads, {} decoded tokens, {}-token prompt, best of {}; load average {before} -> {after}\n",
        a.threads, a.tokens, a.prompt_tokens, a.reps
    );
    println!(
        "| case | decode tok/s ours / llama.cpp | ratio (target) | first token {}-tok prompt s ours / llama.cpp | prefill tok/s ours / llama.cpp | peak RSS MiB ours / llama.cpp | CPU ms/token ours / llama.cpp | greedy ids agree |",
        a.prompt_tokens
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (c, o, l) in rows {
        let ratio = l.as_ref().map(|l| o.decode_tok_s / l.decode_tok_s);
        let target = match (c.target, c.rss_bound) {
            (Some(t), _) => format!(
                " (>= {t:.1}: {})",
                ratio.map_or("n/a", |r| if r >= t { "met" } else { "missed" })
            ),
            (None, Some(b)) => {
                let rr = l.as_ref().map(|l| o.peak_rss_mib / l.peak_rss_mib);
                format!(
                    " (RSS ratio {} <= {b:.1}: {})",
                    f(rr, 2),
                    rr.map_or("n/a", |r| if r <= b { "met" } else { "missed" })
                )
            }
            _ => String::new(),
        };
        println!(
            "| {} | {:.1} / {} | {}{target} | {:.2} / {} | {:.1} / {} | {:.0} / {} | {:.2} / {} | {} |",
            c.name,
            o.decode_tok_s,
            f(l.as_ref().map(|l| l.decode_tok_s), 1),
            f(ratio, 2),
            o.first_token_s,
            f(l.as_ref().map(|l| l.first_token_s), 2),
            o.prefill_tok_s,
            f(l.as_ref().map(|l| l.prefill_tok_s), 1),
            o.peak_rss_mib,
            f(l.as_ref().map(|l| l.peak_rss_mib), 0),
            o.decode_cpu_ms_per_tok,
            f(l.as_ref().map(|l| l.decode_cpu_ms_per_tok), 2),
            f(l.as_ref().map(|l| agreement(&o.ids, &l.ids)), 2),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_is_the_common_prefix() {
        assert_eq!(agreement(&[1, 2, 3, 4], &[1, 2, 9, 4]), 0.5);
        assert_eq!(agreement(&[1, 2], &[1, 2, 3]), 1.0);
        assert_eq!(agreement(&[], &[1]), 0.0);
    }
}
