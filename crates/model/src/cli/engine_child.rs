//! One engine measured in its own process (so that its peak RSS is its own): ours
//! ([`run_ours`], the `umbra bench engine --child` mode) or llama.cpp through the `llama_cpp`
//! Python package ([`LLAMA_CPP_CHILD`]). Both do the same thing with the same token ids:
//!
//! 1. load the model (timed);
//! 2. `reps` times: a fresh cache, the long prompt in one call, greedy argmax of the last
//!    position = first-token latency (and prefill tok/s = prompt length / latency);
//! 3. `reps` times: a fresh cache, the short prompt, then `tokens` single-token steps with
//!    greedy argmax each = decode tok/s (wall) and CPU seconds per token (all threads);
//! 4. peak RSS (`VmHWM`) and the generated ids (to check both engines agree).
use crate::error::{ModelError, Result};
use crate::llama::{Forward, Input};
use crate::load::{load_model, WeightDtype};
use crate::sampling::argmax;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

/// What a child measures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildSpec {
    pub model: PathBuf,
    /// `--dtype` for ours (ignored by llama.cpp, which runs the file's own types).
    pub dtype: String,
    pub long_prompt: Vec<u32>,
    pub short_prompt: Vec<u32>,
    pub tokens: usize,
    pub reps: usize,
    pub threads: usize,
}

/// What a child reports (best of `reps` for the speeds).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChildReport {
    pub engine: String,
    pub load_s: f64,
    /// Seconds from the long prompt to the first sampled token.
    pub first_token_s: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    /// Process CPU seconds (all threads) per decoded token, in the best decode run.
    pub decode_cpu_ms_per_tok: f64,
    pub peak_rss_mib: f64,
    /// Greedy ids after the short prompt (first decode run).
    pub ids: Vec<u32>,
    /// How the weights were held (ours) / the file (llama.cpp).
    pub weights: String,
}

/// This process's CPU time (user + system, all threads), seconds.
pub fn process_cpu_s() -> f64 {
    // /proc/self/stat fields 14 and 15 (utime, stime) in clock ticks (100 Hz on Linux).
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let u: f64 = f.get(11)?.parse().ok()?;
            let s: f64 = f.get(12)?.parse().ok()?;
            Some((u + s) / 100.0)
        })
        .unwrap_or(0.0)
}

/// Runs the measurement on our engine in this process.
pub fn run_ours(spec: &ChildSpec) -> Result<ChildReport> {
    let dev = Device::Cpu;
    let t = Instant::now();
    let loaded = load_model(&spec.model, WeightDtype::parse(&spec.dtype)?, &dev)?;
    let load_s = t.elapsed().as_secs_f64();
    let m = &loaded.model;
    let step = |cache: &mut crate::KvCache, ids: &[u32]| -> Result<u32> {
        let x = Tensor::from_slice(ids, (1, ids.len()), &dev)?;
        let logits = m.forward(Input::Ids(&x), cache, Forward::last_logits())?;
        Ok(argmax(&logits.flatten_all()?.to_vec1::<f32>()?))
    };
    let mut rep = ChildReport {
        engine: "umbra".into(),
        load_s,
        first_token_s: f64::INFINITY,
        weights: loaded.dtype.clone(),
        ..Default::default()
    };
    if spec.long_prompt.is_empty() || spec.short_prompt.is_empty() {
        return Err(ModelError::Input("empty prompt".into()));
    }
    for _ in 0..spec.reps.max(1) {
        let mut cache = m.new_cache_with_capacity(spec.long_prompt.len() + 1);
        let t = Instant::now();
        step(&mut cache, &spec.long_prompt)?;
        rep.first_token_s = rep.first_token_s.min(t.elapsed().as_secs_f64());
    }
    for r in 0..spec.reps.max(1) {
        let mut cache = m.new_cache_with_capacity(spec.short_prompt.len() + spec.tokens + 1);
        let mut tok = step(&mut cache, &spec.short_prompt)?;
        let mut ids = vec![tok];
        let (t, c) = (Instant::now(), process_cpu_s());
        for _ in 0..spec.tokens {
            tok = step(&mut cache, &[tok])?;
            ids.push(tok);
        }
        let (wall, cpu) = (t.elapsed().as_secs_f64(), process_cpu_s() - c);
        let tps = spec.tokens as f64 / wall;
        if tps > rep.decode_tok_s {
            rep.decode_tok_s = tps;
            rep.decode_cpu_ms_per_tok = cpu * 1e3 / spec.tokens as f64;
        }
        if r == 0 {
            rep.ids = ids;
        }
    }
    rep.prefill_tok_s = spec.long_prompt.len() as f64 / rep.first_token_s;
    rep.peak_rss_mib = umbra_common::mem::peak_rss_mib().unwrap_or(0.0);
    Ok(rep)
}

/// The llama.cpp child: reads a [`ChildSpec`] as JSON on stdin, prints a [`ChildReport`] as
/// the last line of stdout.
pub const LLAMA_CPP_CHILD: &str = r#"
import json, sys, time, os, resource
import numpy as np
import llama_cpp
spec = json.load(sys.stdin)
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
t = time.time()
m = llama_cpp.Llama(model_path=spec["model"], n_threads=spec["threads"],
                    n_threads_batch=spec["threads"], n_ctx=max(1024, len(spec["long_prompt"]) + 8,
                    len(spec["short_prompt"]) + spec["tokens"] + 8),
                    n_batch=max(512, len(spec["long_prompt"])), verbose=False)
load_s = time.time() - t
nv = m.n_vocab()
def step(ids):
    m.eval(ids)
    logits = np.ctypeslib.as_array(m._ctx.get_logits(), shape=(nv,))
    return int(np.argmax(logits))
first = float("inf")
for _ in range(max(1, spec["reps"])):
    m.reset()
    t = time.time()
    step(spec["long_prompt"])
    first = min(first, time.time() - t)
best = 0.0; cpu_ms = 0.0; ids0 = None
for r in range(max(1, spec["reps"])):
    m.reset()
    tok = step(spec["short_prompt"]); ids = [tok]
    t, c = time.time(), cpu()
    for _ in range(spec["tokens"]):
        tok = step([tok]); ids.append(tok)
    wall, c = time.time() - t, cpu() - c
    tps = spec["tokens"] / wall
    if tps > best:
        best, cpu_ms = tps, c * 1e3 / spec["tokens"]
    if ids0 is None:
        ids0 = ids
peak = 0.0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        peak = float(line.split()[1]) / 1024.0
print(json.dumps({"engine": "llama.cpp " + llama_cpp.__version__, "load_s": load_s,
    "first_token_s": first, "prefill_tok_s": len(spec["long_prompt"]) / first,
    "decode_tok_s": best, "decode_cpu_ms_per_tok": cpu_ms, "peak_rss_mib": peak,
    "ids": ids0, "weights": os.path.basename(spec["model"])}))
"#;
