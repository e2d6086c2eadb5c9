//! `bench obfuscation`: compile cost and serving cost of AloePri on SmolLM2, in one run.
//!
//! 1. Obfuscation time and peak memory vs simply loading and re-saving the model (GGUF -> HF
//!    folder), each in a child process so the peaks are separate.
//! 2. Generation tokens/s of our engine on the plaintext model and on exact-mode obfuscated models
//!    at h in {0, 32, 64, 128}, same prompt, greedy.
//! 3. llama.cpp (llama-cpp-python, when importable) on the same GGUF as shipped (Q4_1) and on an
//!    F32 copy of it (the precision our engine runs at), as the reference a user would pick.
use crate::model_cmds::{encode_prompt, smollm2_dir, Session};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use umbra_assets::{Asset, Cache};
use umbra_common::fs::write_json;
use umbra_model::generate::GenerateParams;

#[derive(Args)]
pub struct BenchObfuscationArgs {
    /// Expansions h to measure generation speed at (exact mode).
    #[arg(long, value_delimiter = ',', default_value = "0,32,64,128")]
    pub h: Vec<usize>,
    /// Tokens generated per measurement.
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    /// Repetitions per model (the best run counts).
    #[arg(long, default_value_t = 2)]
    pub reps: usize,
    #[arg(long, default_value = "bench-out/obfuscation.json")]
    pub json: PathBuf,
}

fn child_json(args: &[&str], json_path: &Path) -> Result<serde_json::Value> {
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .args(args)
        .output()
        .context("spawning umbra")?;
    if !out.status.success() {
        bail!(
            "umbra {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = std::fs::read_to_string(json_path)?;
    Ok(serde_json::from_str(&text)?)
}

fn tok_s(model: &Path, key: Option<&Path>, tokens: usize, reps: usize) -> Result<f64> {
    let s = Session::open(model, key)?;
    let prompt = encode_prompt(
        &s.tokenizer,
        "Write a long story about a lighthouse keeper and the sea.",
        true,
    )?;
    let params = GenerateParams {
        max_tokens: tokens,
        ..Default::default()
    };
    let mut best = 0f64;
    for _ in 0..reps.max(1) {
        let (_, _, out) = s.generate(&prompt, &params, |_| {})?;
        best = best.max(out.decode_tok_per_s());
    }
    Ok(best)
}

fn llama_cpp_tok_s(gguf: &Path, tokens: usize) -> Option<f64> {
    let script = format!(
        r#"
import time, llama_cpp
m = llama_cpp.Llama(model_path={gguf:?}, n_threads=2, n_ctx=512, verbose=False)
best = 0.0
for _ in range(2):
    t = m.tokenize(b"Write a long story about a lighthouse keeper and the sea.")
    m.reset(); m.eval(t)
    t0 = time.time(); n = 0
    for _ in range({tokens}):
        tok = m.sample(temp=0.0)
        m.eval([tok]); n += 1
    best = max(best, n / (time.time() - t0))
print(best)
"#,
        gguf = gguf.display().to_string()
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .lines()
        .last()?
        .parse()
        .ok()
}

pub fn obfuscation(a: &BenchObfuscationArgs) -> Result<()> {
    let cache = Cache::from_env()?;
    let plain = smollm2_dir(&cache)?;
    let gguf = cache.fetch(Asset::SmolLM2Gguf)?;
    let work = tempfile::tempdir()?;
    let w = work.path();

    eprintln!("[1/3] load + re-save vs obfuscate ...");
    let conv_json = w.join("convert.json");
    let conv = child_json(
        &[
            "convert",
            "--gguf",
            &gguf.display().to_string(),
            "--out",
            &w.join("resaved").display().to_string(),
            "--json",
            &conv_json.display().to_string(),
        ],
        &conv_json,
    )?;
    let _ = std::fs::remove_dir_all(w.join("resaved"));
    let obf_json = w.join("obf.json");
    let obf = child_json(
        &[
            "obfuscate",
            "--model",
            &gguf.display().to_string(),
            "--out",
            &w.join("paper").display().to_string(),
            "--key",
            &w.join("paper.key").display().to_string(),
            "--seed",
            "1",
            "--json",
            &obf_json.display().to_string(),
        ],
        &obf_json,
    )?;
    let _ = std::fs::remove_dir_all(w.join("paper"));
    let obf_s = obf["load_s"].as_f64().unwrap_or(0.0) + obf["transform_s"].as_f64().unwrap_or(0.0);
    let conv_s = conv["seconds"].as_f64().unwrap_or(0.0);

    eprintln!("[2/3] generation speed plain vs obfuscated ...");
    let plain_tps = tok_s(&plain, None, a.tokens, a.reps)?;
    let mut rows = vec![];
    for &h in &a.h {
        let dir = w.join(format!("exact-h{h}"));
        let key = w.join(format!("exact-h{h}.key"));
        let j = w.join(format!("exact-h{h}.json"));
        child_json(
            &[
                "obfuscate",
                "--model",
                &plain.display().to_string(),
                "--out",
                &dir.display().to_string(),
                "--key",
                &key.display().to_string(),
                "--exact",
                "--h",
                &h.to_string(),
                "--seed",
                "1",
                "--json",
                &j.display().to_string(),
            ],
            &j,
        )?;
        let tps = tok_s(&dir, Some(&key), a.tokens, a.reps)?;
        let _ = std::fs::remove_dir_all(&dir);
        rows.push(json!({"h": h, "tok_s": tps, "ratio_to_plain": tps / plain_tps}));
    }

    eprintln!("[3/3] llama.cpp reference (Q4_1 as shipped, and an F32 copy: our precision) ...");
    let lcpp_q4 = llama_cpp_tok_s(&gguf, a.tokens);
    let f32_gguf = w.join("smollm2-f32.gguf");
    umbra_model::gguf::GgufFile::open(&gguf)?.write_f32_copy(&f32_gguf)?;
    let lcpp = llama_cpp_tok_s(&f32_gguf, a.tokens);

    println!("| step | seconds | peak RSS MiB |\n|---|---|---|");
    println!(
        "| load + re-save (GGUF -> HF F32) | {conv_s:.1} | {:.0} |",
        conv["peak_rss_mib"].as_f64().unwrap_or(0.0)
    );
    println!(
        "| obfuscate (paper params, h 128) | {obf_s:.1} | {:.0} |",
        obf["peak_rss_mib"].as_f64().unwrap_or(0.0)
    );
    println!("\n| model | decode tok/s | vs plaintext | vs llama.cpp F32 |\n|---|---|---|---|");
    let vs = |t: f64| {
        lcpp.map(|l| format!("{:.2}", t / l))
            .unwrap_or_else(|| "n/a".into())
    };
    println!(
        "| plaintext F32 | {plain_tps:.1} | 1.00 | {} |",
        vs(plain_tps)
    );
    for r in &rows {
        let t = r["tok_s"].as_f64().unwrap_or(0.0);
        println!(
            "| obfuscated exact h={} | {t:.1} | {:.2} | {} |",
            r["h"],
            t / plain_tps,
            vs(t)
        );
    }
    match (lcpp, lcpp_q4) {
        (Some(l), Some(q)) => {
            println!(
                "| llama.cpp F32, 2 threads | {l:.1} | {:.2} | 1.00 |",
                l / plain_tps
            );
            println!(
                "| llama.cpp Q4_1, 2 threads | {q:.1} | {:.2} | {:.2} |",
                q / plain_tps,
                q / l
            );
        }
        _ => println!(
            "| llama.cpp | not measured: `pip install llama-cpp-python` to include it | | |"
        ),
    }
    let report = json!({
        "resave_s": conv_s, "resave_peak_rss_mib": conv["peak_rss_mib"],
        "obfuscate_s": obf_s, "obfuscate_peak_rss_mib": obf["peak_rss_mib"],
        "model_f32_mib": std::fs::metadata(plain.join("model.safetensors")).map(|m| m.len() as f64 / 1048576.0).ok(),
        "plain_tok_s": plain_tps, "obfuscated": rows, "llama_cpp_f32_tok_s": lcpp, "llama_cpp_q4_1_tok_s": lcpp_q4,
        "plain_over_llama_cpp_f32": lcpp.map(|l| plain_tps / l),
        "tokens": a.tokens,
    });
    write_json(&a.json, &report)?;
    eprintln!("wrote {}", a.json.display());
    Ok(())
}
