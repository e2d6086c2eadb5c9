//! `umbra bench share`: share-mode generation against local plaintext generation measured in
//! the same run, on the same prompt, alternating (plaintext, share) repetitions.
//!
//! Reported per mode: prefill tok/s (the prompt's forward), decode tok/s (tokens after the
//! first), the process's CPU seconds for the whole generation (`getrusage`: the client's CPU in
//! share mode, the servers being other processes or threads not counted, see [`Servers`]); for
//! share mode also round trips, bytes sent and received per decoded token and per prompt
//! token, and the client's own share-handling seconds (encode, masks, checks, decode). Then the
//! ratios, and what the client's share of CPU becomes for Llama-3-8B and 70B shapes
//! ([`project`]).
use crate::error::{Result, ShareError};
use crate::frame;
use crate::model::ShareModel;
use candle_core::{Device, Tensor};
use serde::Serialize;
use std::time::Instant;
use umbra_model::generate::{generate_with, GenerateParams};
use umbra_model::linear::LinearKind;
use umbra_model::sampling::SamplingParams;
use umbra_model::{Forward, Input, Llama, LlamaConfig};

/// CPU seconds (user + system) of this process so far.
pub fn process_cpu_s() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    if rc != 0 {
        return 0.0;
    }
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// One generation's measurements.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Run {
    pub prompt_tokens: usize,
    pub generated: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    /// Process CPU seconds for prefill + decode, and for each phase.
    pub cpu_s: f64,
    pub prefill_cpu_s: f64,
    pub decode_cpu_s: f64,
    /// Share mode only: map calls (round trips) in prefill / decode.
    pub prefill_round_trips: u64,
    pub decode_round_trips: u64,
    pub prefill_bytes_sent: u64,
    pub prefill_bytes_received: u64,
    pub decode_bytes_sent: u64,
    pub decode_bytes_received: u64,
    /// Client seconds spent encoding, masking, checking and decoding.
    pub share_handling_s: f64,
}

/// Greedy generation of `max_tokens` (no stop ids) with per-phase measurements.
pub fn measure(
    model: &Llama,
    share: Option<&ShareModel>,
    prompt: &[u32],
    max_tokens: usize,
) -> Result<Run> {
    let params = GenerateParams {
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
    };
    let stats = || share.map(|s| s.session.stats()).unwrap_or_default();
    let s0 = stats();
    let mut s1 = s0;
    let cpu0 = process_cpu_s();
    let mut cpu1 = cpu0;
    let mut cache = model.new_cache_with_capacity(prompt.len() + max_tokens);
    let mut first = true;
    let out = generate_with(
        prompt,
        &params,
        model.config().max_position_embeddings,
        |ids| -> Result<Vec<f32>> {
            let t = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu)?;
            let l = model.forward(Input::Ids(&t), &mut cache, Forward::last_logits())?;
            let v = l.squeeze(0)?.to_vec1::<f32>()?;
            if first {
                s1 = stats();
                cpu1 = process_cpu_s();
                first = false;
            }
            Ok(v)
        },
        |_| true,
    )?;
    let cpu2 = process_cpu_s();
    let cpu = cpu2 - cpu0;
    let s2 = stats();
    let n = out.ids.len();
    Ok(Run {
        prompt_tokens: prompt.len(),
        generated: n,
        prefill_s: out.prefill_s,
        decode_s: out.decode_s,
        prefill_tok_s: prompt.len() as f64 / out.prefill_s.max(1e-9),
        decode_tok_s: out.decode_tok_per_s(),
        cpu_s: cpu,
        prefill_cpu_s: cpu1 - cpu0,
        decode_cpu_s: cpu2 - cpu1,
        prefill_round_trips: s1.link.round_trips - s0.link.round_trips,
        decode_round_trips: s2.link.round_trips - s1.link.round_trips,
        prefill_bytes_sent: s1.link.bytes_sent - s0.link.bytes_sent,
        prefill_bytes_received: s1.link.bytes_received - s0.link.bytes_received,
        decode_bytes_sent: s2.link.bytes_sent - s1.link.bytes_sent,
        decode_bytes_received: s2.link.bytes_received - s1.link.bytes_received,
        share_handling_s: s2.client_s - s0.client_s,
    })
}

/// The best of several runs (largest throughput, smallest CPU), the bench's summary of a mode.
pub fn best(runs: &[Run]) -> Run {
    let mut b = runs.first().copied().unwrap_or_default();
    for r in runs.iter().skip(1) {
        if r.prefill_tok_s > b.prefill_tok_s {
            b.prefill_tok_s = r.prefill_tok_s;
            b.prefill_s = r.prefill_s;
        }
        if r.decode_tok_s > b.decode_tok_s {
            b.decode_tok_s = r.decode_tok_s;
            b.decode_s = r.decode_s;
        }
        if r.cpu_s < b.cpu_s {
            b.cpu_s = r.cpu_s;
            b.share_handling_s = r.share_handling_s;
        }
        b.prefill_cpu_s = b.prefill_cpu_s.min(r.prefill_cpu_s);
        b.decode_cpu_s = b.decode_cpu_s.min(r.decode_cpu_s);
    }
    b
}

/// Share / plaintext ratios, each the median over repetitions of the share run divided by the
/// plaintext run just before it (robust to a machine whose load changes between repetitions).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Ratios {
    pub prefill: f64,
    pub decode: f64,
    pub client_cpu: f64,
    pub client_cpu_prefill: f64,
    pub client_cpu_decode: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// [`Ratios`] of paired runs.
pub fn paired_ratios(plain: &[Run], share: &[Run]) -> Ratios {
    let r = |f: &dyn Fn(&Run) -> f64| {
        median(
            plain
                .iter()
                .zip(share)
                .map(|(p, s)| f(s) / f(p).max(1e-12))
                .collect(),
        )
    };
    Ratios {
        prefill: r(&|x| x.prefill_tok_s),
        decode: r(&|x| x.decode_tok_s),
        client_cpu: r(&|x| x.cpu_s),
        client_cpu_prefill: r(&|x| x.prefill_cpu_s),
        client_cpu_decode: r(&|x| x.decode_cpu_s),
    }
}

/// Per-token shapes of a model: what the client handles and what the servers multiply.
#[derive(Debug, Clone, Serialize)]
pub struct Shapes {
    pub model: String,
    /// Multiply-adds of all linear maps per token (the plaintext model's work).
    pub linear_macs: f64,
    /// Sum over maps of (in + out): values the client encodes, masks, sends, receives, checks
    /// and decodes per token.
    pub client_values: f64,
    /// Bytes sent + received per decoded token (two servers, 8-byte shares; B's masks travel
    /// as stream numbers, PREPAREs not counted).
    pub bytes_per_token: f64,
    pub round_trips_per_token: usize,
    /// Projected client CPU as a share of local plaintext decoding and prefill.
    pub client_cpu_share_decode: f64,
    pub client_cpu_share_prefill: f64,
}

/// The maps of a config: `(kind, in, out)` per map (blocks then head).
pub fn maps_of(cfg: &LlamaConfig) -> Vec<(LinearKind, usize, usize)> {
    let (d, hd) = (cfg.hidden_size, cfg.head_dim());
    let (nh, nkv, ffn) = (
        cfg.num_attention_heads,
        cfg.num_kv_heads(),
        cfg.intermediate_size,
    );
    let mut v = vec![];
    for _ in 0..cfg.num_hidden_layers {
        v.push((LinearKind::Qkv, d, (nh + 2 * nkv) * hd));
        v.push((LinearKind::O, nh * hd, d));
        v.push((LinearKind::GateUp, d, 2 * ffn));
        v.push((LinearKind::Down, ffn, d));
    }
    v.push((LinearKind::Head, d, cfg.vocab_size));
    v
}

/// Llama-3-8B and -70B shapes from their published configs.
pub fn llama3_configs() -> Vec<(String, LlamaConfig)> {
    let mk = |h: usize, l: usize, nh: usize, ffn: usize| -> LlamaConfig {
        serde_json::from_value(serde_json::json!({
            "model_type": "llama", "hidden_size": h, "intermediate_size": ffn,
            "num_hidden_layers": l, "num_attention_heads": nh, "num_key_value_heads": 8,
            "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "max_position_embeddings": 8192, "tie_word_embeddings": false,
        }))
        .expect("valid config")
    };
    vec![
        ("Llama-3-8B".into(), mk(4096, 32, 32, 14336)),
        ("Llama-3-70B".into(), mk(8192, 80, 64, 28672)),
    ]
}

/// Shapes of `cfg`, with the client CPU share projected from a measured model: the client's
/// time per token scales with the values it handles (`client_values`; encode, masks, TLS,
/// Freivalds and decode are linear in them) and with its own non-linear work (norms, RoPE,
/// attention, SiLU: also linear in the width per layer, so in `client_values` to first order);
/// the plaintext model's time scales with its multiply-adds. Both constants come from the
/// measured pair (`measured`, `measured_share`).
pub fn project(
    name: &str,
    cfg: &LlamaConfig,
    measured: &LlamaConfig,
    measured_decode: f64,
    measured_prefill: f64,
) -> Shapes {
    let f = |c: &LlamaConfig| {
        let m = maps_of(c);
        let macs: f64 = m.iter().map(|(_, i, o)| (*i * *o) as f64).sum();
        let ins: f64 = m.iter().map(|(_, i, _)| *i as f64).sum();
        let outs: f64 = m.iter().map(|(_, _, o)| *o as f64).sum();
        (macs, ins + outs, m.len(), ins, outs)
    };
    let (macs, vals, maps, ins, outs) = f(cfg);
    let (mm, mv, ..) = f(measured);
    Shapes {
        model: name.into(),
        linear_macs: macs,
        client_values: vals,
        // A: the shares in, the products out; B: a MASKED frame in, the products out.
        bytes_per_token: (ins + 2.0 * outs) * 8.0
            + maps as f64 * (frame::HEADER + frame::MASKED_LEN) as f64,
        round_trips_per_token: maps,
        client_cpu_share_decode: measured_decode * (vals / mv) / (macs / mm),
        client_cpu_share_prefill: measured_prefill * (vals / mv) / (macs / mm),
    }
}

/// The prompt of `n` tokens the bench uses: HaluEval passages, concatenated and cut.
pub fn bench_prompt(tok: &umbra_model::tokenizer::TextTokenizer, n: usize) -> Result<Vec<u32>> {
    let texts = umbra_attacks::suite::load_texts(None, 50)?;
    let mut ids = vec![];
    for t in texts {
        ids.extend(tok.encode(&t, false)?);
        if ids.len() >= n {
            break;
        }
    }
    if ids.len() < n {
        return Err(ShareError::Config(format!(
            "the passages give only {} tokens, fewer than {n}",
            ids.len()
        )));
    }
    ids.truncate(n);
    Ok(ids)
}

/// Times `f` and returns its result with the seconds it took.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_count_maps_and_values() {
        let smol = umbra_model::testing::smollm2_135m_config();
        let m = maps_of(&smol);
        assert_eq!(m.len(), 121);
        let macs: usize = m.iter().map(|(_, i, o)| i * o).sum();
        // 30 x (576*960 + 576*576 + 576*3072 + 1536*576) + 576*49152
        assert_eq!(
            macs,
            30 * (552_960 + 331_776 + 1_769_472 + 884_736) + 28_311_552
        );
        let p = project("same", &smol, &smol, 0.2, 1.0);
        assert!((p.client_cpu_share_decode - 0.2).abs() < 1e-12);
        assert!((p.client_cpu_share_prefill - 1.0).abs() < 1e-12);
        for (name, cfg) in llama3_configs() {
            let q = project(&name, &cfg, &smol, 0.2, 1.0);
            assert!(
                q.client_cpu_share_decode < 0.2 / 5.0,
                "{name}: {}",
                q.client_cpu_share_decode
            );
        }
        assert!(process_cpu_s() > 0.0);
    }
}
