//! Acceptance on the real SmolLM2-135M: exact-mode obfuscation gives the tau-permuted plaintext
//! logits (max |diff| <= 1e-3 x max |logit|, top-1 100%), 50 greedy generations of 32 tokens are
//! identical, and the checkpoint runs in an independent reference forward pass.
#[path = "../../aloepri/tests/common/reference.rs"]
mod reference;

use candle_core::{Device, Tensor, D};
use std::path::PathBuf;
use umbra_aloepri::compiler::compile_checkpoint;
use umbra_aloepri::{ClientKey, ObfuscationParams};
use umbra_assets::{Asset, Cache};
use umbra_model::checkpoint::Checkpoint;
use umbra_model::generate::{generate_batch, GenerateParams};
use umbra_model::llama::Llama;
use umbra_model::{Forward, Input};

fn smollm2() -> PathBuf {
    umbra_assets::Cache::from_env()
        .and_then(|c| c.require_smollm2_hf())
        .unwrap_or_else(|e| panic!("{e}"))
}

fn passages(n: usize) -> Vec<String> {
    let path = Cache::from_env()
        .unwrap()
        .require(Asset::HaluEvalQa)
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .take(n)
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["knowledge"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn exact_mode_is_exact_on_smollm2() {
    let plain_dir = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let (obf_dir, key_path) = (tmp.path().join("obf"), tmp.path().join("client.key"));
    compile_checkpoint(
        &plain_dir,
        &obf_dir,
        &key_path,
        &ObfuscationParams::exact(128),
        5,
        &mut |_, _, _| {},
    )
    .unwrap();
    let tau = ClientKey::load(&key_path).unwrap().permutation().unwrap();

    let pck = Checkpoint::open(&plain_dir).unwrap();
    let tok = pck.tokenizer.clone().unwrap();
    let plain = Llama::new(&pck.config, &pck.weights, &Device::Cpu).unwrap();
    drop(pck);
    let ock = Checkpoint::open(&obf_dir).unwrap();
    assert_eq!(ock.config.hidden_size, 576 + 256);
    assert!(!ock.config.tie_word_embeddings);
    let obf = Llama::new(&ock.config, &ock.weights, &Device::Cpu).unwrap();

    let texts = passages(60);
    let seqs: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| {
            let mut ids = tok.encode(t, false).unwrap();
            ids.truncate(64);
            ids
        })
        .collect();
    let col = Tensor::from_slice(tau.forward_table(), tau.vocab_size(), &Device::Cpu).unwrap();
    let (mut worst, mut positions, mut agree) = (0f32, 0usize, 0usize);
    for ids in seqs.iter().take(10) {
        let run = |m: &Llama, ids: &[u32]| {
            let mut c = m.new_cache();
            m.forward(
                Input::Ids(
                    &Tensor::new(ids, &Device::Cpu)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap(),
                ),
                &mut c,
                Forward::logits(),
            )
            .unwrap()
            .squeeze(0)
            .unwrap()
        };
        let lp = run(&plain, ids);
        let lo = run(&obf, &tau.apply(ids).unwrap())
            .index_select(&col, 1)
            .unwrap();
        let diff = umbra_model::testing::max_abs_diff(&lo, &lp);
        let scale = lp
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        worst = worst.max(diff / scale);
        let a = lp.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
        let b = lo.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
        positions += a.len();
        agree += a.iter().zip(&b).filter(|(x, y)| x == y).count();
    }
    assert!(worst <= 1e-3, "max relative logit difference {worst}");
    assert_eq!(agree, positions, "top-1 agreement must be 100%");

    // 50 greedy generations of 32 tokens, batched, from 16-token prefixes.
    let prompts: Vec<Vec<u32>> = seqs
        .iter()
        .filter(|s| s.len() >= 16)
        .take(50)
        .map(|s| s[..16].to_vec())
        .collect();
    assert_eq!(prompts.len(), 50);
    let params = vec![
        GenerateParams {
            max_tokens: 32,
            ..Default::default()
        };
        50
    ];
    let refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
    let a = generate_batch(&plain, &refs, &params, |_, _| true).unwrap();
    let obf_prompts: Vec<Vec<u32>> = prompts.iter().map(|p| tau.apply(p).unwrap()).collect();
    let refs: Vec<&[u32]> = obf_prompts.iter().map(|p| p.as_slice()).collect();
    let b = generate_batch(&obf, &refs, &params, |_, _| true).unwrap();
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x.ids.len(), 32);
        assert_eq!(
            x.ids,
            tau.invert(&y.ids).unwrap(),
            "greedy generation {i} differs"
        );
    }

    // The obfuscated checkpoint through an independent forward pass written from the HF spec.
    let short = &seqs[0][..6];
    let reference = reference::forward(&ock.config, &ock.weights, &tau.apply(short).unwrap());
    let mut c = plain.new_cache();
    let lp: Vec<Vec<f32>> = plain
        .forward(
            Input::Ids(
                &Tensor::new(short, &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
            ),
            &mut c,
            Forward::logits(),
        )
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let fwd = tau.forward_table();
    for (p, r) in lp.iter().zip(&reference) {
        let scale = p.iter().fold(0f32, |m, x| m.max(x.abs()));
        let worst = (0..p.len())
            .map(|v| (p[v] - r[fwd[v] as usize]).abs())
            .fold(0f32, f32::max);
        assert!(
            worst / scale <= 1e-3,
            "reference forward differs by {}",
            worst / scale
        );
        let am = |x: &[f32]| (0..x.len()).max_by(|&i, &j| x[i].total_cmp(&x[j])).unwrap();
        assert_eq!(fwd[am(p)] as usize, am(r));
    }
}
