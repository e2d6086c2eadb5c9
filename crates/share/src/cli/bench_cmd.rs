//! `umbra bench share`: speed, traffic and client CPU of share mode against local plaintext
//! generation in the same run; optionally fidelity, greedy chats, measured ranges, kernels.
use super::ShareClientArgs;
use crate::bench::{
    bench_prompt, best, llama3_configs, measure, paired_ratios, project, Run, Shapes,
};
use crate::error::{Result, ShareError};
use crate::inputs::{InputRange, TappedModel};
use crate::model::{resolve_model, Remote, ShareModel};
use crate::server::{spawn, PublicWeights, ServerConfig};
use crate::tls::{ServerIdentity, Trust};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use umbra_model::checkpoint::Checkpoint;
use umbra_model::generate::{generate, GenerateParams};
use umbra_model::sampling::SamplingParams;
use umbra_model::tokenizer::{ChatMessage, TextTokenizer};
use umbra_model::{Forward, Input, Llama};

/// `umbra bench share`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchShareArgs {
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// Where to write the results.
    #[arg(long)]
    pub json: PathBuf,
    /// Prompt length (HaluEval passages, concatenated).
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens generated per run (greedy, no stop).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Alternating (plaintext, share) repetitions; the best of each is reported.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// GEMM threads of each server this bench starts (0 = every core, as `umbra serve --share`;
    /// server B's work ahead runs at idle priority, so it does not take cores from A).
    #[arg(long, default_value_t = 0)]
    pub server_threads: usize,
    /// Start the two servers as threads of this process instead of child processes (their
    /// CPU time then counts as the client's).
    #[arg(long)]
    pub in_process: bool,
    /// Use two running servers instead (`--share-servers` with `--share-pin`/`--share-ca`).
    #[command(flatten)]
    pub client: ShareClientArgs,
    /// Fidelity against the F32 model on this many HaluEval passages (0: skip).
    #[arg(long, default_value_t = 0)]
    pub fidelity_texts: usize,
    /// Tokens per fidelity passage.
    #[arg(long, default_value_t = 128)]
    pub fidelity_max_len: usize,
    /// Greedy chat answers compared token for token (0: skip; at most 20 prompts).
    #[arg(long, default_value_t = 0)]
    pub greedy_prompts: usize,
    #[arg(long, default_value_t = 64)]
    pub greedy_tokens: usize,
    /// Measure every map's input range on this many passages (0: skip).
    #[arg(long, default_value_t = 0)]
    pub ranges_texts: usize,
}

/// The chat prompts of the greedy comparison.
pub const CHAT_PROMPTS: [&str; 20] = [
    "What is the capital of France?",
    "Write a short story about a robot.",
    "Explain photosynthesis in simple terms.",
    "Give me three tips for learning to code.",
    "What is the difference between a virus and a bacterium?",
    "Write a haiku about the ocean.",
    "How does a rainbow form?",
    "Summarize the plot of Romeo and Juliet.",
    "What are the benefits of regular exercise?",
    "Explain what a neural network is.",
    "Write a polite email declining a meeting invitation.",
    "What causes the seasons on Earth?",
    "List five fruits that are high in vitamin C.",
    "How do airplanes stay in the air?",
    "What is the Pythagorean theorem?",
    "Describe a sunset to someone who has never seen one.",
    "Why is the sky blue?",
    "Give me a recipe for simple pancakes.",
    "What is climate change?",
    "How do I say good morning in Spanish and in French?",
];

/// A share server in a child process (`umbra serve --share`), killed when dropped.
struct ChildServer {
    child: Child,
    url: String,
    pin: String,
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn child_server(exe: &Path, model: &Path, threads: usize) -> Result<ChildServer> {
    let mut child = Command::new(exe)
        .args(["serve", "--share", "--host", "127.0.0.1", "--port", "0"])
        .arg("--model")
        .arg(model)
        .args(["--threads", &threads.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| ShareError::Config(format!("cannot start {}: {e}", exe.display())))?;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| ShareError::Config("no stdout".into()))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(|l| l.ok()) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut guard = ChildServer {
        child,
        url: String::new(),
        pin: String::new(),
    };
    let line = rx
        .recv_timeout(Duration::from_secs(600))
        .map_err(|_| ShareError::Config("the share server did not start".into()))?;
    let parts: Vec<&str> = line.split_whitespace().collect();
    match parts.as_slice() {
        ["listening", url, "pin", pin] => {
            guard.url = url.to_string();
            guard.pin = pin.to_string();
            Ok(guard)
        }
        _ => Err(ShareError::Config(format!(
            "unexpected first line from the share server: {line}"
        ))),
    }
}

/// Keeps whatever runs the servers alive for the bench (dropping it stops them).
#[allow(dead_code)] // the fields are held for their Drop
enum Servers {
    Children(Vec<ChildServer>),
    Threads(Vec<crate::server::RunningServer>),
    External,
}

/// `--server-threads`, 0 resolved to every core.
fn server_threads(a: &BenchShareArgs) -> usize {
    match a.server_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        t => t,
    }
}

fn start_servers(a: &BenchShareArgs, path: &Path) -> Result<(Servers, Remote, &'static str)> {
    if a.client.active() {
        return Ok((Servers::External, a.client.remote()?, "external"));
    }
    let exe = std::env::current_exe().ok();
    let is_umbra = exe
        .as_deref()
        .and_then(|e| e.file_stem())
        .is_some_and(|s| s.to_string_lossy() == "umbra");
    let (urls, pins, servers, how) = if !a.in_process && is_umbra {
        let exe = exe.expect("checked above");
        let s = vec![
            child_server(&exe, path, server_threads(a))?,
            child_server(&exe, path, server_threads(a))?,
        ];
        let urls = vec![s[0].url.clone(), s[1].url.clone()];
        let pins = [s[0].pin.clone(), s[1].pin.clone()];
        (urls, pins, Servers::Children(s), "child processes")
    } else {
        let w = Arc::new(PublicWeights::load(path)?);
        let names = ["localhost".to_string(), "127.0.0.1".to_string()];
        let mk = || -> Result<crate::server::RunningServer> {
            let mut c = ServerConfig::new(
                ([127, 0, 0, 1], 0).into(),
                ServerIdentity::generate(&names)?,
            );
            c.threads = server_threads(a);
            spawn(w.clone(), c)
        };
        let s = vec![mk()?, mk()?];
        let urls = vec![s[0].url(), s[1].url()];
        let pins = [s[0].pin.clone(), s[1].pin.clone()];
        (urls, pins, Servers::Threads(s), "threads of this process")
    };
    let remote = Remote {
        servers: crate::client::parse_pair(&urls)?,
        trust: [Trust::pin(&pins[0])?, Trust::pin(&pins[1])?],
        timeout: Duration::from_secs(120),
    };
    Ok((servers, remote, how))
}

fn chat_ids(tok: &TextTokenizer, prompt: &str) -> Result<Vec<u32>> {
    let text = tok.apply_chat_template(&[ChatMessage::user(prompt)], true)?;
    Ok(tok.encode(&text, false)?)
}

/// Greedy chat answers of both models; for a difference, the first differing position and the
/// plaintext model's top-2 logit margin there.
fn greedy(
    plain: &Llama,
    share: &Llama,
    tok: &TextTokenizer,
    n: usize,
    tokens: usize,
    eos: &[u32],
) -> Result<Value> {
    let params = GenerateParams {
        max_tokens: tokens,
        sampling: SamplingParams::greedy(),
        stop_ids: eos.to_vec(),
    };
    let mut rows = vec![];
    let mut same = 0;
    for p in CHAT_PROMPTS.iter().take(n) {
        let ids = chat_ids(tok, p)?;
        let a = generate(plain, &ids, &params, |_| true)?.ids;
        let b = generate(share, &ids, &params, |_| true)?.ids;
        let first = a
            .iter()
            .zip(&b)
            .position(|(x, y)| x != y)
            .or((a.len() != b.len()).then(|| a.len().min(b.len())));
        let mut row = json!({"prompt": p, "tokens": a.len(), "identical": first.is_none(), "text": tok.decode(&a, true)?});
        match first {
            None => same += 1,
            Some(i) => {
                let mut ctx = ids.clone();
                ctx.extend_from_slice(&a[..i]);
                let t = Tensor::new(ctx.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
                let l = plain.forward(
                    Input::Ids(&t),
                    &mut plain.new_cache(),
                    Forward::last_logits(),
                )?;
                let mut v = l.squeeze(0)?.to_vec1::<f32>()?;
                v.sort_unstable_by(|x, y| y.total_cmp(x));
                row["first_difference"] = json!(i);
                row["plain_top2_margin"] = json!(v[0] - v[1]);
                row["share_text"] = json!(tok.decode(&b, true)?);
            }
        }
        rows.push(row);
    }
    Ok(json!({"prompts": rows.len(), "identical": same, "answers": rows}))
}

fn print_runs(plain: &Run, share: &Run) {
    println!(
        "| mode | prefill tok/s | decode tok/s | CPU s (this process): prefill | decode | all |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, r) in [
        ("plaintext, local F32", plain),
        ("share, 2 servers over TLS", share),
    ] {
        println!(
            "| {name} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} |",
            r.prefill_tok_s, r.decode_tok_s, r.prefill_cpu_s, r.decode_cpu_s, r.cpu_s
        );
    }
    let q = |a: f64, b: f64| a / b.max(1e-9);
    println!(
        "| share / plaintext | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
        q(share.prefill_tok_s, plain.prefill_tok_s),
        q(share.decode_tok_s, plain.decode_tok_s),
        q(share.prefill_cpu_s, plain.prefill_cpu_s),
        q(share.decode_cpu_s, plain.decode_cpu_s),
        q(share.cpu_s, plain.cpu_s)
    );
}

fn print_shapes(rows: &[Shapes]) {
    println!("| model | linear MACs/token | client values/token | KB per token (both links) | round trips/token | client CPU share, decode | prefill |");
    println!("|---|---|---|---|---|---|---|");
    for s in rows {
        println!(
            "| {} | {:.3e} | {:.0} | {:.0} | {} | {:.4} | {:.4} |",
            s.model,
            s.linear_macs,
            s.client_values,
            s.bytes_per_token / 1e3,
            s.round_trips_per_token,
            s.client_cpu_share_decode,
            s.client_cpu_share_prefill
        );
    }
}

/// Runs the bench, prints its tables and writes `--json`.
pub fn run_bench(a: &BenchShareArgs) -> Result<Value> {
    let path = resolve_model(&a.model)?;
    let ck = Checkpoint::open(&path)?;
    let tok = ck
        .tokenizer
        .clone()
        .ok_or_else(|| ShareError::Config("the model has no tokenizer".into()))?;
    let eos = ck.eos_token_ids();
    let plain = Llama::new(&ck.config, &ck.weights, &Device::Cpu)?;
    let (servers, remote, how) = start_servers(a, &path)?;
    let share = ShareModel::open(&path, a.client.format(), Some(&remote))?;
    eprintln!(
        "servers: {how}; integrity bound 2^-{} per layer call",
        share.integrity_bits()
    );
    let prompt = bench_prompt(&tok, a.prompt_tokens)?;
    // Warm-up (page cache, allocators, TLS sessions).
    measure(&plain, None, &prompt[..8.min(prompt.len())], 2)?;
    measure(
        &share.llama,
        Some(&share),
        &prompt[..8.min(prompt.len())],
        2,
    )?;
    let (mut pr, mut sr) = (vec![], vec![]);
    for rep in 0..a.reps.max(1) {
        pr.push(measure(&plain, None, &prompt, a.max_tokens)?);
        sr.push(measure(&share.llama, Some(&share), &prompt, a.max_tokens)?);
        eprintln!(
            "rep {}: plaintext {:.1}/{:.1} tok/s, share {:.1}/{:.1} tok/s (prefill/decode)",
            rep + 1,
            pr[rep].prefill_tok_s,
            pr[rep].decode_tok_s,
            sr[rep].prefill_tok_s,
            sr[rep].decode_tok_s
        );
    }
    let (p, s) = (best(&pr), best(&sr));
    let ratios = paired_ratios(&pr, &sr);
    let cpu_share = ratios.client_cpu_decode;
    let dec = (s.generated.saturating_sub(1)).max(1) as f64;
    println!(
        "share mode vs local plaintext generation ({} prompt tokens, {} generated; best of {} repetitions):",
        prompt.len(),
        a.max_tokens,
        a.reps.max(1)
    );
    print_runs(&p, &s);
    println!(
        "median over repetitions of share / plaintext (each share run next to a plaintext run): \
         prefill tok/s {:.3}, decode tok/s {:.3}; client CPU: prefill {:.3}, decode {:.3}, all {:.3}",
        ratios.prefill, ratios.decode, ratios.client_cpu_prefill, ratios.client_cpu_decode, ratios.client_cpu
    );
    println!(
        "per decoded token: {:.0} round trips, {:.1} KB sent, {:.1} KB received; per prompt token: {:.1} KB sent, {:.1} KB received ({} round trips for the prompt); client share handling (encode, masks, checks, decode) {:.2} s of {:.2} s",
        s.decode_round_trips as f64 / dec,
        s.decode_bytes_sent as f64 / dec / 1e3,
        s.decode_bytes_received as f64 / dec / 1e3,
        s.prefill_bytes_sent as f64 / prompt.len() as f64 / 1e3,
        s.prefill_bytes_received as f64 / prompt.len() as f64 / 1e3,
        s.prefill_round_trips,
        s.share_handling_s,
        s.cpu_s
    );
    let mut shapes = vec![project(
        "SmolLM2-135M (measured)",
        &ck.config,
        &ck.config,
        cpu_share,
        ratios.client_cpu_prefill,
    )];
    for (name, cfg) in llama3_configs() {
        shapes.push(project(
            &name,
            &cfg,
            &ck.config,
            cpu_share,
            ratios.client_cpu_prefill,
        ));
    }
    print_shapes(&shapes);
    let mut out = json!({
        "model": share.name, "servers": how, "server_threads": server_threads(a),
        "kernel": crate::ring::Kernel::best().as_str(), "format_bits": share.session.format().bits,
        "integrity_bits": share.integrity_bits(),
        "prompt_tokens": prompt.len(), "max_tokens": a.max_tokens,
        "plaintext_runs": pr, "share_runs": sr, "plaintext": p, "share": s,
        "ratios": ratios,
        "ratios_of_best": {
            "prefill": s.prefill_tok_s / p.prefill_tok_s.max(1e-9),
            "decode": s.decode_tok_s / p.decode_tok_s.max(1e-9),
            "client_cpu": s.cpu_s / p.cpu_s.max(1e-9),
            "client_cpu_prefill": s.prefill_cpu_s / p.prefill_cpu_s.max(1e-9),
            "client_cpu_decode": s.decode_cpu_s / p.decode_cpu_s.max(1e-9),
        },
        "per_decoded_token": {"round_trips": s.decode_round_trips as f64 / dec, "bytes_sent": s.decode_bytes_sent as f64 / dec, "bytes_received": s.decode_bytes_received as f64 / dec},
        "per_prompt_token": {"bytes_sent": s.prefill_bytes_sent as f64 / prompt.len() as f64, "bytes_received": s.prefill_bytes_received as f64 / prompt.len() as f64},
        "projections": shapes,
        "weights": {"l1_max": share.built.l1_max, "check_vectors": share.built.check_vectors, "check_bits": share.built.check_bits},
    });
    if a.ranges_texts > 0 {
        let texts = umbra_attacks::suite::load_texts(None, a.ranges_texts)?;
        let seqs: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| {
                tok.encode(t, false).map(|mut v| {
                    v.truncate(a.fidelity_max_len);
                    v
                })
            })
            .collect::<std::result::Result<_, _>>()?;
        let tm = TappedModel::new(&ck.config, &ck.weights, None)?;
        tm.run(&seqs)?;
        let r: Vec<InputRange> = tm.ranges();
        println!(
            "| map inputs | rows | max abs | largest row max/median | median row max/median |"
        );
        println!("|---|---|---|---|---|");
        for x in &r {
            println!(
                "| {} | {} | {:.1} | {:.0} | {:.1} |",
                x.map, x.rows, x.max_abs, x.max_row_ratio, x.median_row_ratio
            );
        }
        out["ranges"] = json!(r);
    }
    if a.fidelity_texts > 0 {
        let texts = umbra_attacks::suite::load_texts(None, a.fidelity_texts)?;
        let seqs: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| {
                tok.encode(t, false).map(|mut v| {
                    v.truncate(a.fidelity_max_len);
                    v
                })
            })
            .collect::<std::result::Result<Vec<_>, _>>()?
            .into_iter()
            .filter(|v| v.len() >= 2)
            .collect();
        let opts = umbra_aloepri::fidelity::FidelityOptions {
            greedy_prompts: 0,
            ..Default::default()
        };
        let id = umbra_aloepri::TokenPermutation::identity(ck.config.vocab_size);
        let mut last = 0;
        let r = umbra_aloepri::fidelity::evaluate(
            &plain,
            &share.llama,
            &id,
            &seqs,
            &opts,
            &mut |d, t| {
                if d * 10 / t.max(1) != last {
                    last = d * 10 / t.max(1);
                    eprintln!("fidelity: {d}/{t}");
                }
            },
        )?;
        println!(
            "fidelity on {} passages / {} positions: top-1 agreement {:.5}, ppl {:.4} vs {:.4} (ratio {:.5}), max rel logit diff {:.2e}, mean KL {:.2e}",
            r.texts, r.positions, r.top1_agreement, r.ppl_plain, r.ppl_obfuscated, r.ppl_ratio, r.max_rel_logit_diff, r.mean_kl
        );
        out["fidelity"] = json!(r);
    }
    if a.greedy_prompts > 0 {
        let g = greedy(
            &plain,
            &share.llama,
            &tok,
            a.greedy_prompts.min(20),
            a.greedy_tokens,
            &eos,
        )?;
        println!(
            "greedy chat answers ({} tokens max): {} of {} identical",
            a.greedy_tokens, g["identical"], g["prompts"]
        );
        if let Some(rows) = g["answers"].as_array() {
            for r in rows.iter().filter(|r| r["identical"] == json!(false)) {
                println!(
                    "  differs at token {} of \"{}\" (plaintext top-2 logit margin there {:.4})",
                    r["first_difference"],
                    r["prompt"].as_str().unwrap_or(""),
                    r["plain_top2_margin"].as_f64().unwrap_or(f64::NAN)
                );
            }
        }
        out["greedy"] = g;
    }
    drop(share);
    drop(servers);
    umbra_common::fs::write_json(&a.json, &out)?;
    eprintln!("wrote {}", a.json.display());
    Ok(out)
}
