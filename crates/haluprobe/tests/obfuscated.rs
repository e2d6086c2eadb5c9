//! Scoring under obfuscation on tiny random models (no assets): a probe moved under the key
//! scores the obfuscated model's features exactly like the plaintext probe scores the
//! plaintext features (exact keys, h = 0 and h = 8; logistic regression and MLP; every
//! feature family), and bad input gives clear errors.
use candle_core::Device;
use umbra_aloepri::compiler::compile_in_memory;
use umbra_aloepri::statemap::StateMaps;
use umbra_aloepri::{ClientKey, ObfuscationParams};
use umbra_haluprobe::features::{extract_ids, ExtractConfig, Features, Stage};
use umbra_haluprobe::obfuscated::{check_transformable, transform_probe};
use umbra_haluprobe::probe::{
    gather, FeatureRef, Net, ProbeFile, ProbeMeta, TrainConfig, PROBE_FORMAT,
};
use umbra_haluprobe::score::Scorer;
use umbra_haluprobe::store::{Matrix, ModelDims};
use umbra_haluprobe::HaluError;
use umbra_model::llama::Llama;
use umbra_model::testing::{random_weights, tiny_config};
use umbra_model::{LlamaConfig, Weights};

const SPECIALS: [u32; 2] = [0, 1];

struct Obf {
    cfg: LlamaConfig,
    model: Llama,
    key: ClientKey,
}

fn compile(cfg: &LlamaConfig, w: &Weights, params: ObfuscationParams, seed: u64) -> Obf {
    let (out, c) = compile_in_memory(cfg, w.clone(), &SPECIALS, &params, seed).unwrap();
    Obf {
        model: Llama::new(&c.config, &out, &Device::Cpu).unwrap(),
        cfg: c.config,
        key: c.key,
    }
}

/// Triples (prompt ids, two answers) over plaintext ids 2..96.
fn triples(n: usize) -> Vec<(Vec<u32>, Vec<Vec<u32>>)> {
    (0..n as u32)
        .map(|i| {
            let a = 2 + (i * 7) % 90;
            (
                vec![2 + i % 5, a, 3 + (i * 3) % 80, 4 + i % 11, 9],
                vec![vec![a + 1, 5], vec![a + 2, 7 + i % 30, 40, 8]],
            )
        })
        .collect()
}

/// Features of every answer, on a model that reads ids mapped through `tau` (if any).
fn features(m: &Llama, tau: Option<&[u32]>, data: &[(Vec<u32>, Vec<Vec<u32>>)]) -> Vec<Features> {
    let map = |ids: &[u32]| -> Vec<u32> {
        ids.iter()
            .map(|&i| tau.map_or(i, |t| t[i as usize]))
            .collect()
    };
    data.iter()
        .flat_map(|(p, answers)| {
            let answers: Vec<Vec<u32>> = answers.iter().map(|a| map(a)).collect();
            extract_ids(m, &ExtractConfig::default(), &map(p), &answers).unwrap()
        })
        .collect()
}

fn matrix(f: &[Features], refs: &[FeatureRef], dims: &ModelDims) -> Matrix {
    let mut data = vec![];
    for fe in f {
        data.extend(gather(fe, refs, dims).unwrap());
    }
    Matrix {
        rows: f.len(),
        cols: data.len() / f.len(),
        data,
    }
}

/// A probe fitted on `f` with labels alternating per answer; strong L2 keeps its logits O(1).
fn fit_probe(cfg: &LlamaConfig, f: &[Features], refs: Vec<FeatureRef>, mlp: bool) -> ProbeFile {
    let dims = ModelDims::of(cfg);
    let x = matrix(f, &refs, &dims);
    let y: Vec<f32> = (0..f.len()).map(|i| (i % 2) as f32).collect();
    let tc = if mlp {
        TrainConfig {
            epochs: 20,
            l2: 1e-2,
            ..TrainConfig::mlp(vec![16, 8])
        }
    } else {
        TrainConfig::logreg(0.05)
    };
    let net = Net::fit(&x, &y, &tc).unwrap();
    ProbeFile {
        meta: ProbeMeta {
            format: PROBE_FORMAT.into(),
            kind: tc.kind,
            features: refs,
            stage: Stage::Generation,
            model: dims,
            extract: ExtractConfig::default(),
            threshold: 0.5,
            obfuscated: None,
        },
        net,
    }
}

fn refs_all_families() -> Vec<FeatureRef> {
    vec![
        FeatureRef::new("hidden.generation.last", None),
        FeatureRef::new("hidden.query.mean", Some(1)),
        FeatureRef::new("hidden.generation.window", Some(1)),
        FeatureRef::new("hidden.understanding.mean", Some(0)),
        FeatureRef::new("lookback.generation.mean", None),
        FeatureRef::new("lookback.query", Some(1)),
        FeatureRef::new("logit.generation", None),
        FeatureRef::new("llmcheck.generation", None),
    ]
}

#[test]
fn exact_keys_give_the_plaintext_score_for_every_family_logreg_and_mlp() {
    let cfg = tiny_config(32, 4, 2, 3, 97);
    let w = random_weights(&cfg, 5);
    let plain = Llama::new(&cfg, &w, &Device::Cpu).unwrap();
    let train = features(&plain, None, &triples(12));
    let test_data = triples(18)[12..].to_vec();
    let test_plain = features(&plain, None, &test_data);
    let probes = [
        fit_probe(&cfg, &train, refs_all_families(), false),
        fit_probe(
            &cfg,
            &train,
            vec![
                FeatureRef::new("hidden.generation.mean", Some(2)),
                FeatureRef::new("lookback.generation.mean", Some(1)),
                FeatureRef::new("logit.generation", None),
            ],
            true,
        ),
    ];
    for h in [0usize, 8] {
        let o = compile(&cfg, &w, ObfuscationParams::exact(h), 21 + h as u64);
        let maps = StateMaps::regenerate(&cfg, &SPECIALS, &o.key).unwrap();
        let test_obf = features(&o.model, Some(&o.key.tau), &test_data);
        for probe in &probes {
            let t = transform_probe(probe, &cfg, &o.cfg, &o.key, &maps).unwrap();
            assert_eq!(t.meta.model.hidden_size, 32 + 2 * h);
            // Through a file and the serving API.
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("p.safetensors");
            t.save(&path).unwrap();
            let scorer = Scorer::load(&path, &o.cfg).unwrap();
            let mut spread = 0;
            for (fp, fo) in test_plain.iter().zip(&test_obf) {
                let (lp, lo) = (probe.logit(fp).unwrap(), scorer.probe.logit(fo).unwrap());
                assert!(
                    (lp - lo).abs() <= 1e-4 * (1.0 + lp.abs()),
                    "{:?} h={h}: logit {lp} vs {lo}",
                    probe.meta.kind
                );
                let (sp, so) = (
                    probe.score(fp).unwrap(),
                    scorer.score_features(fo).unwrap().score,
                );
                assert!((sp - so).abs() <= 1e-4, "score {sp} vs {so}");
                spread += (lp.abs() < 6.0) as usize;
            }
            // The scores are not saturated sigmoids (the logits are compared anyway).
            assert!(spread * 2 >= test_plain.len(), "{:?}", probe.meta.kind);
            // The plaintext probe is refused on the obfuscated model (even at h = 0, where the
            // shapes agree and only the key fingerprint tells them apart).
            assert!(Scorer::new(probe.clone(), &o.cfg).is_err());
            assert_eq!(probe.score(&test_obf[0]).is_err(), h > 0);
        }
    }
}

#[test]
fn approximate_keys_transform_linear_families_and_refuse_llmcheck() {
    let cfg = tiny_config(32, 4, 2, 2, 97);
    let w = random_weights(&cfg, 6);
    let plain = Llama::new(&cfg, &w, &Device::Cpu).unwrap();
    let train = features(&plain, None, &triples(10));
    let params = ObfuscationParams {
        h: 8,
        ..ObfuscationParams::paper()
    };
    let o = compile(&cfg, &w, params, 3);
    let maps = StateMaps::regenerate(&cfg, &SPECIALS, &o.key).unwrap();
    let with_llm = fit_probe(&cfg, &train, refs_all_families(), false);
    let e = transform_probe(&with_llm, &cfg, &o.cfg, &o.key, &maps).unwrap_err();
    assert!(e.to_string().contains("exact"), "{e}");
    let mut refs = refs_all_families();
    refs.pop();
    let probe = fit_probe(&cfg, &train, refs, false);
    let t = transform_probe(&probe, &cfg, &o.cfg, &o.key, &maps).unwrap();
    assert!(!t.meta.obfuscated.as_ref().unwrap().exact);
    let f = features(&o.model, Some(&o.key.tau), &triples(3));
    for fe in &f {
        assert!(t.score(fe).unwrap().is_finite());
    }
}

#[test]
fn bad_input_gives_clear_errors() {
    let cfg = tiny_config(32, 4, 2, 2, 97);
    let w = random_weights(&cfg, 7);
    let plain = Llama::new(&cfg, &w, &Device::Cpu).unwrap();
    let train = features(&plain, None, &triples(8));
    let probe = fit_probe(
        &cfg,
        &train,
        vec![FeatureRef::new("hidden.query.mean", Some(1))],
        false,
    );
    let a = compile(&cfg, &w, ObfuscationParams::exact(4), 1);
    let b = compile(&cfg, &w, ObfuscationParams::exact(4), 2);
    let maps_a = StateMaps::regenerate(&cfg, &SPECIALS, &a.key).unwrap();

    // Key of another checkpoint (same model, other seed).
    let e = transform_probe(&probe, &cfg, &b.cfg, &a.key, &maps_a).unwrap_err();
    assert!(e.to_string().contains("key does not match"), "{e}");
    // A probe trained for another layer count.
    let cfg3 = tiny_config(32, 4, 2, 3, 97);
    let m3 = Llama::new(&cfg3, &random_weights(&cfg3, 7), &Device::Cpu).unwrap();
    let p3 = fit_probe(
        &cfg3,
        &features(&m3, None, &triples(8)),
        vec![FeatureRef::new("hidden.query.mean", Some(2))],
        false,
    );
    let e = transform_probe(&p3, &cfg, &a.cfg, &a.key, &maps_a).unwrap_err();
    assert!(
        matches!(e, HaluError::ProbeMismatch(_)) && e.to_string().contains("3 layers"),
        "{e}"
    );
    // The transformed probe is refused on the plaintext model and on another obfuscation.
    let t = transform_probe(&probe, &cfg, &a.cfg, &a.key, &maps_a).unwrap();
    let e = Scorer::new(t.clone(), &cfg).unwrap_err();
    assert!(e.to_string().contains("model is plaintext"), "{e}");
    let e = Scorer::new(t.clone(), &b.cfg).unwrap_err();
    assert!(e.to_string().contains("obfuscated with key"), "{e}");
    Scorer::new(t.clone(), &a.cfg).unwrap();
    // A plaintext probe on an obfuscated model, and a transform of a transformed probe.
    let e = Scorer::new(probe.clone(), &a.cfg).unwrap_err();
    assert!(e.to_string().contains("plaintext probe"), "{e}");
    let e = check_transformable(&t, &cfg, &a.key.params).unwrap_err();
    assert!(e.to_string().contains("already transformed"), "{e}");
}
