//! Each attack recovers (close to) all of tau with the protections it is meant to beat switched
//! off, on tiny random models (fast), and fails where it should. One test uses real SmolLM2
//! weights (first 8192 tokens, 2 layers) at the paper's defaults.
use candle_core::{Device, Tensor};
use umbra_aloepri::compiler::compile_weights;
use umbra_aloepri::{ObfuscationParams, TokenPermutation};
use umbra_attacks::hat::{self, HatConfig};
use umbra_attacks::ia::{self, IaConfig};
use umbra_attacks::score::score;
use umbra_attacks::suite::{run_one, AttackKind, Streams, SuiteConfig};
use umbra_attacks::vma::{self, VmaConfig};
use umbra_attacks::{nn, Target};
use umbra_model::llama::testing::{random_weights, tiny_config};
use umbra_model::{LlamaConfig, Weights};

const VOCAB: usize = 512;

fn tiny() -> (LlamaConfig, Weights) {
    let cfg = tiny_config(64, 4, 2, 2, VOCAB);
    let w = random_weights(&cfg, 11);
    (cfg, w)
}

/// Compiles in memory; returns the attacker's target and tau (for scoring only).
fn obfuscate(
    cfg: &LlamaConfig,
    w: &Weights,
    params: ObfuscationParams,
    seed: u64,
) -> (Target, Vec<u32>) {
    let mut out: Weights = Weights::new();
    let compiled = compile_weights(cfg, w.clone(), &[0], &params, seed, &mut |n, t| {
        let t = match out.remove(n) {
            Some(prev) => Tensor::cat(&[&prev, &t], 0)?,
            None => t,
        };
        out.insert(n.to_string(), t);
        Ok(())
    })
    .unwrap();
    let target = Target::from_parts(cfg.clone(), w.clone(), compiled.config, out).unwrap();
    (target, compiled.key.tau)
}

/// "Keys off": `We~ = Pi (We + noise)`, `Wh~ = Pi Wh'`, everything else plaintext.
fn keys_off(cfg: &LlamaConfig, w: &Weights, alpha_e: f64, seed: u64) -> (Target, Vec<u32>) {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    let tau = TokenPermutation::random(&mut rng, cfg.vocab_size, &[]);
    let idx = Tensor::from_slice(tau.inverse_table(), cfg.vocab_size, &Device::Cpu).unwrap();
    let mut o = w.clone();
    let e = hat::simulate_noise(&w["model.embed_tokens.weight"], alpha_e, seed).unwrap();
    o.insert(
        "model.embed_tokens.weight".into(),
        e.index_select(&idx, 0).unwrap(),
    );
    let h = o["lm_head.weight"].index_select(&idx, 0).unwrap();
    o.insert("lm_head.weight".into(), h);
    let t = Target::from_parts(cfg.clone(), w.clone(), cfg.clone(), o).unwrap();
    (t, tau.forward_table().to_vec())
}

fn hat_cfg(alpha_h: f64) -> HatConfig {
    HatConfig {
        pool: VOCAB,
        anchors: 300,
        assume_alpha_h: alpha_h,
        ..HatConfig::default()
    }
}

#[test]
fn nn_recovers_tau_without_keys_and_nothing_with_keys() {
    let (cfg, w) = tiny();
    let (t, tau) = keys_off(&cfg, &w, 0.0, 1);
    assert_eq!(score(&nn::run(&t, 10).unwrap(), &tau).ttrsr, 1.0);
    // Small noise does not stop it either.
    let (t, tau) = keys_off(&cfg, &w, 0.3, 2);
    assert!(score(&nn::run(&t, 10).unwrap(), &tau).ttrsr > 0.95);
    // Any key P defeats it: chance level is 1/512.
    let (t, tau) = obfuscate(&cfg, &w, ObfuscationParams::exact(8), 3);
    let s = score(&nn::run(&t, 10).unwrap(), &tau);
    assert!(s.ttrsr < 0.02, "{s:?}");
}

#[test]
fn vma_breaks_every_key_when_there_is_no_noise() {
    let (cfg, w) = tiny();
    let vcfg = VmaConfig {
        gate_layers: vec![0, 1],
        ..VmaConfig::default()
    };
    // Exact keys and the paper's structural knobs (lambda, junk, beta) with the noise off:
    // the products are key-free.
    let structural = ObfuscationParams {
        alpha_e: 0.0,
        alpha_h: 0.0,
        h: 16,
        ..ObfuscationParams::paper()
    };
    for (i, p) in [ObfuscationParams::exact(8), structural]
        .into_iter()
        .enumerate()
    {
        let (t, tau) = obfuscate(&cfg, &w, p, 10 + i as u64);
        let s = score(&vma::run(&t, &vcfg).unwrap(), &tau);
        assert!(s.ttrsr > 0.99, "{p:?}: {s:?}");
    }
    // Full embedding noise (alpha_e 1) costs VMA most of its recoveries on this model.
    let noisy = ObfuscationParams {
        alpha_e: 1.0,
        alpha_h: 0.0,
        ..ObfuscationParams::exact(8)
    };
    let (t, tau) = obfuscate(&cfg, &w, noisy, 12);
    let s = score(&vma::run(&t, &vcfg).unwrap(), &tau);
    assert!(s.ttrsr < 0.9, "{s:?}");
}

#[test]
fn ia_recovers_tau_without_noise() {
    let (cfg, w) = tiny();
    let icfg = IaConfig {
        layers: vec![0, 1],
        k: 10,
    };
    let p = ObfuscationParams {
        alpha_e: 0.0,
        alpha_h: 0.0,
        h: 16,
        ..ObfuscationParams::paper()
    };
    let (t, tau) = obfuscate(&cfg, &w, p, 20);
    let s = score(&ia::run(&t, &icfg).unwrap(), &tau);
    assert!(s.ttrsr > 0.99, "{s:?}");
}

#[test]
fn hat_recovers_tau_under_every_key_without_head_noise() {
    let (cfg, w) = tiny();
    let (t, tau) = obfuscate(&cfg, &w, ObfuscationParams::exact(8), 30);
    let out = hat::run(&t, &hat_cfg(0.0)).unwrap();
    let s = score(&out.recovery, &tau);
    assert!(s.ttrsr > 0.99, "{s:?}");
    // Every structural knob of the paper plus full embedding noise, head noise off: the hat
    // attack reads only the head's column space, which none of them changes. (Head noise at the
    // paper's alpha_h is tested on real weights below: random heads have no structure to match.)
    let paper = ObfuscationParams {
        h: 16,
        alpha_h: 0.0,
        ..ObfuscationParams::paper()
    };
    let (t, tau) = obfuscate(&cfg, &w, paper, 31);
    let out = hat::run(&t, &hat_cfg(0.0)).unwrap();
    let s = score(&out.recovery, &tau);
    assert!(s.ttrsr > 0.99, "{s:?}");
}

#[test]
fn suite_scores_tfma_on_simulated_traffic() {
    let (cfg, w) = tiny();
    let (t, tau) = obfuscate(&cfg, &w, ObfuscationParams::exact(8), 40);
    let tau = TokenPermutation::from_forward(tau).unwrap();
    // A skewed stream with distinct counts (id i appears VOCAB - i times), the same for the client
    // and the attacker: frequency ranks give tau away completely.
    let stream: Vec<u32> = (0..VOCAB as u32)
        .flat_map(|i| std::iter::repeat_n(i, VOCAB - i as usize))
        .collect();
    let streams = Streams::simulate(
        std::slice::from_ref(&stream),
        std::slice::from_ref(&stream),
        &tau,
    )
    .unwrap();
    let suite = SuiteConfig {
        vma: VmaConfig::default(),
        hat: hat_cfg(0.0),
        ia: IaConfig {
            layers: vec![0],
            k: 10,
        },
        k: 10,
    };
    let r = run_one(AttackKind::Tfma, &t, Some(&streams), &tau, &suite).unwrap();
    assert_eq!(r.extra["top100"], 1.0, "{:?}", r.extra);
    assert_eq!(r.extra["token_ttrsr"], 1.0);
    assert_eq!(r.score.ttrsr, 1.0);
    // With the attacker's frequency profile reversed, rank matching fails.
    let rev: Vec<u32> = (0..VOCAB as u32)
        .flat_map(|i| std::iter::repeat_n(i, i as usize + 1))
        .collect();
    let fwd: Vec<u32> = (0..VOCAB as u32)
        .flat_map(|i| std::iter::repeat_n(i, VOCAB - i as usize))
        .collect();
    let streams = Streams::simulate(&[fwd], &[rev], &tau).unwrap();
    let r = run_one(AttackKind::Tfma, &t, Some(&streams), &tau, &suite).unwrap();
    assert!(r.score.ttrsr < 0.05, "{:?}", r.score);
    assert!(run_one(AttackKind::Tfma, &t, None, &tau, &suite).is_err());
}

/// Real weights: SmolLM2-135M's first 8192 tokens and 2 layers, obfuscated at the paper's
/// defaults (h 128, lambda .3, alpha_e 1, alpha_h .2, beta 8, junk).
#[test]
fn hat_breaks_smollm2_slice_at_paper_defaults() {
    let cache = umbra_assets::Cache::from_env().unwrap();
    let dir = cache.root().join("models/SmolLM2-135M-Instruct");
    assert!(
        dir.join("model.safetensors").is_file(),
        "SmolLM2 missing: run `umbra fetch smollm2`"
    );
    let ck = umbra_model::checkpoint::Checkpoint::open(&dir).unwrap();
    let v = 8192;
    let mut cfg = ck.config.clone();
    cfg.vocab_size = v;
    cfg.num_hidden_layers = 2;
    let mut w = Weights::new();
    for (n, t) in ck.weights {
        let layer_ok = !n.starts_with("model.layers.")
            || n.starts_with("model.layers.0.")
            || n.starts_with("model.layers.1.");
        if !layer_ok {
            continue;
        }
        let t = if n == "model.embed_tokens.weight" || n == "lm_head.weight" {
            t.narrow(0, 0, v).unwrap()
        } else {
            t
        };
        w.insert(n, t);
    }
    let (t, tau) = obfuscate(&cfg, &w, ObfuscationParams::paper(), 7);
    let out = hat::run(
        &t,
        &HatConfig {
            pool: 4096,
            anchors: 1500,
            ..HatConfig::default()
        },
    )
    .unwrap();
    let s = score(&out.recovery, &tau);
    assert!(s.ttrsr > 0.9, "{s:?}");
}
