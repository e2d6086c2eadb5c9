//! Exact mode: on tiny random models of several shapes the obfuscated logits equal the
//! tau-permuted plaintext logits, through our engine AND through an independent reference forward.
mod common;

use candle_core::{Device, Tensor};
use umbra_aloepri::compiler::{compile_weights, output_specs};
use umbra_aloepri::ObfuscationParams;
use umbra_model::llama::Llama;
use umbra_model::testing::{random_weights, tiny_config};
use umbra_model::{Forward, Input};
use umbra_model::{LlamaConfig, Weights};

fn compile(
    cfg: &LlamaConfig,
    w: &Weights,
    params: ObfuscationParams,
    seed: u64,
) -> (LlamaConfig, Weights, umbra_aloepri::ClientKey) {
    let mut out = Weights::new();
    let mut order = vec![];
    let c = compile_weights(cfg, w.clone(), &[0, 1], &params, seed, &mut |n, t| {
        // The embedding and the head arrive in row chunks: stitch them together.
        let t = match out.remove(n) {
            Some(prev) => Tensor::cat(&[&prev, &t], 0).unwrap(),
            None => {
                order.push(n.to_string());
                t
            }
        };
        out.insert(n.to_string(), t);
        Ok(())
    })
    .unwrap();
    let specs = output_specs(&c.config);
    assert_eq!(
        order,
        specs.iter().map(|s| s.0.clone()).collect::<Vec<_>>(),
        "sink order must match the header order"
    );
    for (n, shape) in &specs {
        assert_eq!(out[n].dims(), shape.as_slice(), "{n}");
    }
    (c.config, out, c.key)
}

fn logits(cfg: &LlamaConfig, w: &Weights, ids: &[u32]) -> Vec<Vec<f32>> {
    let m = Llama::new(cfg, w, &Device::Cpu).unwrap();
    let mut cache = m.new_cache();
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.forward(Input::Ids(&x), &mut cache, Forward::logits())
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// max |obf[tau(v)] - plain[v]| / max |plain|, and top-1 agreement.
fn compare(plain: &[Vec<f32>], obf: &[Vec<f32>], tau: &[u32]) -> (f32, f32) {
    let mut max_diff = 0f32;
    let mut max_abs = 0f32;
    let mut agree = 0;
    for (p, o) in plain.iter().zip(obf) {
        let un: Vec<f32> = (0..p.len()).map(|v| o[tau[v] as usize]).collect();
        for (a, b) in p.iter().zip(&un) {
            max_diff = max_diff.max((a - b).abs());
            max_abs = max_abs.max(a.abs());
        }
        let am = |x: &[f32]| {
            x.iter()
                .enumerate()
                .fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m })
                .0
        };
        agree += (am(p) == am(&un)) as usize;
    }
    (max_diff / max_abs, agree as f32 / plain.len() as f32)
}

fn shapes() -> Vec<(&'static str, LlamaConfig)> {
    let mut out = vec![
        ("mha", tiny_config(32, 4, 4, 2, 97)),
        ("gqa", tiny_config(48, 6, 2, 2, 97)),
        ("mqa", tiny_config(32, 4, 1, 2, 97)),
    ];
    let mut tied = tiny_config(32, 4, 2, 2, 97);
    tied.tie_word_embeddings = true;
    out.push(("tied", tied));
    let mut qwen = tiny_config(32, 4, 2, 2, 97);
    qwen.model_type = "qwen2".into();
    out.push(("qwen2-bias", qwen));
    let mut odd = tiny_config(48, 4, 2, 2, 97);
    odd.head_dim = Some(20);
    out.push(("odd-head-dim", odd));
    let mut obias = tiny_config(32, 4, 2, 2, 97);
    obias.attention_bias = Some(true);
    out.push(("llama-attention-bias", obias));
    out
}

#[test]
fn exact_mode_matches_plaintext_on_every_shape() {
    let ids: Vec<u32> = vec![0, 5, 17, 42, 3, 96, 11, 64, 8];
    for (name, cfg) in shapes() {
        let w = random_weights(&cfg, 1);
        let plain = logits(&cfg, &w, &ids);
        for h in [0usize, 8] {
            let (ocfg, ow, key) = compile(&cfg, &w, ObfuscationParams::exact(h), 7);
            assert_eq!(ocfg.hidden_size, cfg.hidden_size + 2 * h);
            assert!(!ocfg.tie_word_embeddings);
            let tau = key.permutation().unwrap();
            assert_eq!(
                tau.apply(&[0, 1]).unwrap(),
                vec![0, 1],
                "special ids must be fixed points"
            );
            let moved = ids
                .iter()
                .filter(|&&i| tau.apply(&[i]).unwrap()[0] != i)
                .count();
            assert!(moved >= ids.len() - 3, "{name}: tau should move most ids");
            let obf_ids = tau.apply(&ids).unwrap();
            let obf = logits(&ocfg, &ow, &obf_ids);
            let (rel, top1) = compare(&plain, &obf, tau.forward_table());
            assert!(rel <= 1e-3, "{name} h={h}: max rel logit diff {rel}");
            assert_eq!(top1, 1.0, "{name} h={h}");
            // The same checkpoint through the independent reference forward.
            let reference = common::reference::forward(&ocfg, &ow, &obf_ids);
            let (rel_ref, top1_ref) = compare(&plain, &reference, tau.forward_table());
            assert!(
                rel_ref <= 1e-3,
                "{name} h={h}: reference forward rel diff {rel_ref}"
            );
            assert_eq!(top1_ref, 1.0);
        }
    }
}

#[test]
fn reference_forward_agrees_with_engine_on_plaintext() {
    let ids: Vec<u32> = vec![1, 2, 3, 4, 50];
    for (name, cfg) in shapes() {
        let w = random_weights(&cfg, 3);
        let a = logits(&cfg, &w, &ids);
        let b = common::reference::forward(&cfg, &w, &ids);
        let (rel, _) = compare(&a, &b, &(0..cfg.vocab_size as u32).collect::<Vec<_>>());
        assert!(rel < 1e-4, "{name}: {rel}");
    }
}

#[test]
fn approximate_knobs_change_the_model_and_paper_mode_runs() {
    let cfg = tiny_config(32, 4, 2, 2, 97);
    let w = random_weights(&cfg, 1);
    let ids: Vec<u32> = vec![4, 5, 6, 7, 8, 9];
    let plain = logits(&cfg, &w, &ids);
    let params = ObfuscationParams {
        h: 8,
        ..ObfuscationParams::paper()
    };
    let (ocfg, ow, key) = compile(&cfg, &w, params, 9);
    let tau = key.permutation().unwrap();
    let obf = logits(&ocfg, &ow, &tau.apply(&ids).unwrap());
    let (rel, _) = compare(&plain, &obf, tau.forward_table());
    assert!(
        rel > 1e-3,
        "noise and junk must perturb the logits, got {rel}"
    );
    assert!(obf.iter().flatten().all(|x| x.is_finite()));
}

#[test]
fn same_seed_same_checkpoint_other_seed_other_key() {
    let cfg = tiny_config(32, 4, 2, 1, 50);
    let w = random_weights(&cfg, 1);
    let (_, a, ka) = compile(&cfg, &w, ObfuscationParams::exact(4), 1);
    let (_, b, kb) = compile(&cfg, &w, ObfuscationParams::exact(4), 1);
    let (_, _, kc) = compile(&cfg, &w, ObfuscationParams::exact(4), 2);
    assert_eq!(ka, kb);
    assert_ne!(ka.fingerprint, kc.fingerprint);
    for (n, t) in &a {
        let diff = umbra_model::testing::max_abs_diff(t, &b[n]);
        assert_eq!(diff, 0.0, "{n}");
    }
}
