//! Each attack recovers (close to) all of tau with the protections it is meant to beat switched
//! off, on tiny random models (fast), and fails where it should. One test uses real SmolLM2
//! weights (first 8192 tokens, 2 layers) at the paper's defaults.
use candle_core::{Device, Tensor};
use umbra_aloepri::compiler::compile_in_memory;
use umbra_aloepri::{ObfuscationParams, TokenPermutation};
use umbra_attacks::hat::{self, HatConfig};
use umbra_attacks::ia::{self, IaConfig};
use umbra_attacks::ima::{ImaConfig, Reference};
use umbra_attacks::isa::IsaConfig;
use umbra_attacks::score::score;
use umbra_attacks::sda::SdaConfig;
use umbra_attacks::states::StateLayer;
use umbra_attacks::suite::{run_one, AttackKind, Streams, SuiteConfig};
use umbra_attacks::vma::{self, VmaConfig};
use umbra_attacks::{nn, Target};
use umbra_model::testing::{random_weights, tiny_config};
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
    let (out, compiled) = compile_in_memory(cfg, w.clone(), &[0], &params, seed).unwrap();
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

/// The paths the attacks take at vocabulary scale (Qwen2.5, V 151,936): signatures over a
/// key-free subset of columns (hat: largest leverage; VMA: largest `We[i] . Wh[i]`) and
/// nearest neighbours shortlisted in a random projection, forced here on a tiny model.
#[test]
fn scale_paths_recover_tau_too() {
    let (cfg, w) = tiny();
    let (t, tau) = obfuscate(&cfg, &w, ObfuscationParams::exact(8), 31);
    let h = hat::run(
        &t,
        &HatConfig {
            columns: Some(128),
            assume_alpha_h: 0.0,
            ..hat_cfg(0.0)
        },
    )
    .unwrap();
    let s = score(&h.recovery, &tau);
    assert!(s.ttrsr > 0.99, "hat on 128 columns: {s:?}");
    let vcfg = VmaConfig {
        gate_layers: vec![],
        columns: Some(128),
        ..VmaConfig::default()
    };
    let s = score(&vma::run(&t, &vcfg).unwrap(), &tau);
    assert!(s.ttrsr > 0.99, "vma head on 128 columns: {s:?}");

    // Projected nearest neighbours: 3000 rows of width 400, queried with a permutation of
    // themselves plus noise at 5% of their norm.
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let (n, c) = (3000usize, 400usize);
    let refs: Vec<f32> = (0..n * c).map(|_| rng.random_range(-1.0..1.0)).collect();
    let perm: Vec<usize> = {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            p.swap(i, rng.random_range(0..=i));
        }
        p
    };
    let mut q = vec![0f32; n * c];
    for (i, &j) in perm.iter().enumerate() {
        for x in 0..c {
            q[i * c + x] = refs[j * c + x] + 0.05 * rng.random_range(-1.0f32..1.0);
        }
    }
    let refs = Tensor::from_vec(refs, (n, c), &Device::Cpu).unwrap();
    let q = Tensor::from_vec(q, (n, c), &Device::Cpu).unwrap();
    let got = umbra_attacks::linalg::nearest_k_projected(&q, &refs, 3, &|_| {}).unwrap();
    let exact = umbra_attacks::linalg::nearest_k_exact(&q, &refs, 3, &|_| {}).unwrap();
    let hits = got
        .iter()
        .zip(&perm)
        .filter(|(l, &j)| l[0].0 as usize == j)
        .count();
    assert_eq!(hits, n, "projected search lost true neighbours");
    for (a, b) in got.iter().zip(&exact) {
        assert_eq!(a[0].0, b[0].0);
        assert!((a[0].1 - b[0].1).abs() < 1e-3);
    }
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
        hat: hat_cfg(0.0),
        ..SuiteConfig::with_defaults(vec![0], 10)
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

/// A state in `0..n`, skewed towards small ones like word frequencies (`n u^3`).
fn zipf(r: &mut impl rand::Rng, n: usize) -> usize {
    let u: f64 = r.random_range(0.0..1.0);
    ((n as f64 * u * u * u) as usize).min(n - 1)
}

/// A first-order Markov source over `states` of the `VOCAB` ids (3-5 successors each, skewed
/// towards frequent states, random weights): `n` texts of `len` tokens from `seed`.
fn markov_texts(states: usize, n: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    use rand::{Rng, SeedableRng};
    let mut g = rand_chacha::ChaCha20Rng::seed_from_u64(42);
    let ids: Vec<u32> = (0..states as u32)
        .map(|i| (i * 7 + 3) % VOCAB as u32)
        .collect();
    let succ: Vec<Vec<(usize, f64)>> = (0..states)
        .map(|_| {
            (0..g.random_range(3..=5))
                .map(|_| (zipf(&mut g, states), g.random_range(0.2..1.0)))
                .collect()
        })
        .collect();
    let mut r = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let mut s = r.random_range(0..states);
            (0..len)
                .map(|_| {
                    let tot: f64 = succ[s].iter().map(|x| x.1).sum();
                    let mut u = r.random_range(0.0..tot);
                    // Mostly follow the chain; 5% jumps keep it from getting stuck.
                    s = if r.random_bool(0.05) {
                        zipf(&mut r, states)
                    } else {
                        let mut next = succ[s][0].0;
                        for &(j, w) in &succ[s] {
                            if u < w {
                                next = j;
                                break;
                            }
                            u -= w;
                        }
                        next
                    };
                    ids[s]
                })
                .collect()
        })
        .collect()
}

#[test]
fn sda_decodes_a_substitution_cipher_that_frequency_matching_cannot() {
    let (cfg, w) = tiny();
    let (t, tau) = obfuscate(&cfg, &w, ObfuscationParams::exact(8), 50);
    let tau = TokenPermutation::from_forward(tau).unwrap();
    // Client and attacker texts from the same source, disjoint draws; 150 ids in use.
    let client = markov_texts(150, 300, 100, 1);
    let public = markov_texts(150, 300, 100, 2);
    let streams = Streams::simulate(&client, &public, &tau).unwrap();
    let suite = SuiteConfig {
        sda: SdaConfig {
            window: 150,
            sweeps: 10,
            ..SdaConfig::default()
        },
        ..SuiteConfig::with_defaults(vec![0], 10)
    };
    let tfma = run_one(AttackKind::Tfma, &t, Some(&streams), &tau, &suite).unwrap();
    let sda = run_one(AttackKind::Sda, &t, Some(&streams), &tau, &suite).unwrap();
    // Pure permutation, plenty of traffic: the bigram model pins down every id in use but a few
    // of the rarest (seen once or twice), i.e. almost every token of the traffic.
    assert!(sda.extra["seen_ttrsr"] > 0.93, "{:?}", sda.extra);
    assert!(sda.extra["token_ttrsr"] > 0.99, "{:?}", sda.extra);
    assert!(sda.extra["bleu4"] > 0.9, "{:?}", sda.extra);
    assert!(sda.extra["lm_final"] > sda.extra["lm_start"]);
    // Frequency ranks alone get only part of it.
    assert!(tfma.extra["seen_ttrsr"] < 0.5, "tfma {:?}", tfma.extra);
    assert!(sda.score.ttrsr > tfma.score.ttrsr + 0.1);
    // Traffic with no bigram structure (each id drawn independently) gives SDA nothing to use.
    use rand::{Rng, SeedableRng};
    let mut r = rand_chacha::ChaCha20Rng::seed_from_u64(9);
    let mut flat = || -> Vec<Vec<u32>> {
        (0..100)
            .map(|_| (0..100).map(|_| r.random_range(0..150u32)).collect())
            .collect()
    };
    let (c, p) = (flat(), flat());
    let streams = Streams::simulate(&c, &p, &tau).unwrap();
    let sda = run_one(AttackKind::Sda, &t, Some(&streams), &tau, &suite).unwrap();
    assert!(sda.extra["seen_ttrsr"] < 0.2, "{:?}", sda.extra);
}

/// Random texts over the whole tiny vocabulary (client, public) and the streams of them.
fn state_streams(tau: &TokenPermutation) -> Streams {
    use rand::{Rng, SeedableRng};
    let mut r = rand_chacha::ChaCha20Rng::seed_from_u64(5);
    let mut texts = |n: usize| -> Vec<Vec<u32>> {
        (0..n)
            .map(|_| (0..48).map(|_| r.random_range(0..VOCAB as u32)).collect())
            .collect()
    };
    let (client, public) = (texts(8), texts(60));
    Streams::simulate(&client, &public, tau).unwrap()
}

fn state_suite(layer: StateLayer, reference: Option<Reference>) -> SuiteConfig {
    SuiteConfig {
        ima: ImaConfig {
            layer,
            reference,
            ..ImaConfig::default()
        },
        isa: IsaConfig {
            layer,
            ..IsaConfig::default()
        },
        ..SuiteConfig::with_defaults(vec![0], 10)
    }
}

/// "Obfuscation" with every protection off: the identity key (the plaintext model itself).
fn identity_target(cfg: &LlamaConfig, w: &Weights) -> (Target, TokenPermutation) {
    let t = Target::from_parts(cfg.clone(), w.clone(), cfg.clone(), w.clone()).unwrap();
    let id = TokenPermutation::from_forward((0..cfg.vocab_size as u32).collect()).unwrap();
    (t, id)
}

#[test]
fn ima_and_isa_recover_tokens_without_a_key_and_nothing_with_one() {
    let (cfg, w) = tiny();
    let (t, id) = identity_target(&cfg, &w);
    let streams = state_streams(&id);
    for layer in [StateLayer::Embeddings, StateLayer::Block(0)] {
        let suite = state_suite(layer, Some(Reference::Plain));
        for kind in [AttackKind::Ima, AttackKind::Isa] {
            let r = run_one(kind, &t, Some(&streams), &id, &suite).unwrap();
            assert!(
                r.extra["token_ttrsr"] > 0.95,
                "{kind:?} {layer:?} {:?}",
                r.extra
            );
            assert!(
                r.extra["seen_ttrsr"] > 0.95,
                "{kind:?} {layer:?} {:?}",
                r.extra
            );
        }
    }
    // Exact AloePri keys (a secret P, no noise): the attacker's basis is not the victim's.
    let (t, tau) = obfuscate(&cfg, &w, ObfuscationParams::exact(8), 60);
    let tau = TokenPermutation::from_forward(tau).unwrap();
    let streams = state_streams(&tau);
    let suite = state_suite(StateLayer::Block(0), None);
    for kind in [AttackKind::Ima, AttackKind::Isa] {
        let r = run_one(kind, &t, Some(&streams), &tau, &suite).unwrap();
        assert!(r.extra["token_ttrsr"] < 0.05, "{kind:?} {:?}", r.extra);
    }
}

#[test]
fn ima_recovers_tokens_when_the_attacker_holds_the_victims_key() {
    // Exact mode where the attacker's own obfuscation has the victim's key (same seed): the
    // inverter trained on its own states then works on the victim's; with a fresh key it fails.
    let (cfg, w) = tiny();
    let p = ObfuscationParams::exact(8);
    let seed = 70;
    let (out, compiled) = compile_in_memory(&cfg, w.clone(), &[], &p, seed).unwrap();
    let t = Target::from_parts(cfg.clone(), w.clone(), compiled.config, out).unwrap();
    let tau = TokenPermutation::from_forward(compiled.key.tau).unwrap();
    let streams = state_streams(&tau);
    let own = |seed| {
        state_suite(
            StateLayer::Embeddings,
            Some(Reference::OwnKey { params: p, seed }),
        )
    };
    let r = run_one(AttackKind::Ima, &t, Some(&streams), &tau, &own(seed)).unwrap();
    assert!(r.extra["token_ttrsr"] > 0.95, "{:?}", r.extra);
    let r = run_one(AttackKind::Ima, &t, Some(&streams), &tau, &own(seed + 1)).unwrap();
    assert!(r.extra["token_ttrsr"] < 0.05, "{:?}", r.extra);
}

/// SmolLM2-135M's first `v` tokens and first 2 layers.
fn smollm2_slice(v: usize) -> (LlamaConfig, Weights) {
    let dir = umbra_assets::Cache::from_env()
        .and_then(|c| c.require_smollm2_hf())
        .unwrap_or_else(|e| panic!("{e}"));
    let ck = umbra_model::checkpoint::Checkpoint::open(&dir).unwrap();
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
    (cfg, w)
}

/// Real weights, protections off (identity key): IMA and ISA read tokens back from the
/// contextual states after block 0 (positive control for the 0% they get against a key).
#[test]
fn ima_and_isa_invert_smollm2_states_without_a_key() {
    use rand::{Rng, SeedableRng};
    let (cfg, w) = smollm2_slice(4096);
    let (t, id) = identity_target(&cfg, &w);
    let mut r = rand_chacha::ChaCha20Rng::seed_from_u64(3);
    let mut texts = |n: usize| -> Vec<Vec<u32>> {
        (0..n)
            .map(|_| (0..64).map(|_| r.random_range(0..4096u32)).collect())
            .collect()
    };
    let (client, public) = (texts(8), texts(160));
    let streams = Streams::simulate(&client, &public, &id).unwrap();
    let suite = state_suite(StateLayer::Block(0), Some(Reference::Plain));
    for kind in [AttackKind::Ima, AttackKind::Isa] {
        let r = run_one(kind, &t, Some(&streams), &id, &suite).unwrap();
        eprintln!("{kind:?} identity key, block 0: {:?}", r.extra);
        assert!(r.extra["token_ttrsr"] > 0.9, "{kind:?} {:?}", r.extra);
    }
}

/// Real weights: SmolLM2-135M's first 8192 tokens and 2 layers, obfuscated at the paper's
/// defaults (h 128, lambda .3, alpha_e 1, alpha_h .2, beta 8, junk).
#[test]
fn hat_breaks_smollm2_slice_at_paper_defaults() {
    let (cfg, w) = smollm2_slice(8192);
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
