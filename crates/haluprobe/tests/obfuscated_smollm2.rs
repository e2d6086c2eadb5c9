//! Scoring under obfuscation on the real model (CI fetches `smollm2` and `halueval-qa`): train
//! a probe on a few HaluEval triples of SmolLM2-135M, compile an exact checkpoint with the
//! paper's width (h = 128, hidden 576 -> 832), transform the probe with the files the CLI uses,
//! and check that the obfuscated model's score equals the plaintext score on held-out triples.
use umbra_aloepri::compiler::compile_checkpoint;
use umbra_aloepri::{ClientKey, ObfuscationParams};
use umbra_assets::{Asset, Cache};
use umbra_haluprobe::data::load_halueval_qa;
use umbra_haluprobe::features::{ExtractConfig, Extractor, Features, Stage};
use umbra_haluprobe::obfuscated::transform_probe_files;
use umbra_haluprobe::probe::{
    gather, FeatureRef, Net, ProbeFile, ProbeKind, ProbeMeta, TrainConfig, PROBE_FORMAT,
};
use umbra_haluprobe::score::Scorer;
use umbra_haluprobe::source::{load_model, resolve_model};
use umbra_haluprobe::store::{Matrix, ModelDims};

const TRAIN_ROWS: usize = 6;
const TEST_ROWS: usize = 3;

#[test]
fn smollm2_exact_h128_obfuscated_score_equals_plaintext_score() {
    let cache = Cache::from_env().unwrap();
    let data = cache.require(Asset::HaluEvalQa).unwrap();
    // Fails with the fetch command when SmolLM2 is not in the cache.
    let model_dir = resolve_model("smollm2").unwrap();
    let rows = load_halueval_qa(&data).unwrap();
    let ecfg = ExtractConfig {
        max_knowledge_tokens: 32,
        max_answer_tokens: 16,
        ..ExtractConfig::default()
    };
    let extract = |ex: &Extractor, map: Option<&[u32]>, r: usize| -> Vec<Features> {
        let row = &rows[r];
        ex.extract_mapped(
            Some(&row.knowledge),
            &row.question,
            &[&row.right_answer, &row.hallucinated_answer],
            map,
        )
        .unwrap()
    };

    let (plain, tok) = load_model(&model_dir).unwrap();
    let ex = Extractor::new(&plain, &tok, ecfg.clone());
    let train: Vec<Features> = (0..TRAIN_ROWS)
        .flat_map(|r| extract(&ex, None, r))
        .collect();
    let test_plain: Vec<Features> = (TRAIN_ROWS..TRAIN_ROWS + TEST_ROWS)
        .flat_map(|r| extract(&ex, None, r))
        .collect();
    let refs = vec![
        FeatureRef::new("hidden.generation.last", Some(12)),
        FeatureRef::new("hidden.query.mean", Some(20)),
        FeatureRef::new("lookback.generation.mean", None),
        FeatureRef::new("logit.generation", None),
        FeatureRef::new("llmcheck.generation", None),
    ];
    let dims = ModelDims::of(plain.config());
    let mut x = vec![];
    for f in &train {
        x.extend(gather(f, &refs, &dims).unwrap());
    }
    let x = Matrix {
        rows: train.len(),
        cols: x.len() / train.len(),
        data: x,
    };
    let y: Vec<f32> = (0..train.len()).map(|i| (i % 2) as f32).collect();
    let probe = ProbeFile {
        meta: ProbeMeta {
            format: PROBE_FORMAT.into(),
            kind: ProbeKind::Logreg,
            features: refs,
            stage: Stage::Generation,
            model: dims,
            extract: ecfg.clone(),
            threshold: 0.5,
            obfuscated: None,
        },
        net: Net::fit(&x, &y, &TrainConfig::logreg(0.05)).unwrap(),
    };
    drop(plain); // free the plaintext model before compiling

    let dir = tempfile::tempdir().unwrap();
    let (probe_path, obf_dir, key_path, out_path) = (
        dir.path().join("probe.safetensors"),
        dir.path().join("obf"),
        dir.path().join("client.key"),
        dir.path().join("halluc-probe.safetensors"),
    );
    probe.save(&probe_path).unwrap();
    let rep = compile_checkpoint(
        &model_dir,
        &obf_dir,
        &key_path,
        &ObfuscationParams::exact(128),
        17,
        &mut |_, _, _| {},
    )
    .unwrap();
    assert_eq!((rep.hidden_plain, rep.hidden_obfuscated), (576, 832));
    let (t, r) =
        transform_probe_files(&probe_path, &model_dir, &obf_dir, &key_path, &out_path).unwrap();
    assert_eq!(r.inputs_obfuscated, r.inputs_plain + 2 * 256);
    assert_eq!(t.meta.model.hidden_size, 832);

    let (obf, _) = load_model(&obf_dir).unwrap();
    let scorer = Scorer::load(&out_path, obf.config()).unwrap();
    let tau = ClientKey::load(&key_path).unwrap().tau;
    let ex = Extractor::new(&obf, &tok, ecfg);
    let test_obf: Vec<Features> = (TRAIN_ROWS..TRAIN_ROWS + TEST_ROWS)
        .flat_map(|r| extract(&ex, Some(&tau), r))
        .collect();
    let mut worst = 0f32;
    for (fp, fo) in test_plain.iter().zip(&test_obf) {
        assert_ne!(
            fp["hidden.generation.last"].len(),
            fo["hidden.generation.last"].len()
        );
        let (lp, lo) = (probe.logit(fp).unwrap(), scorer.probe.logit(fo).unwrap());
        assert!(
            (lp - lo).abs() <= 1e-3 * (1.0 + lp.abs()),
            "logit {lp} vs {lo}"
        );
        let (sp, so) = (
            probe.score(fp).unwrap(),
            scorer.score_features(fo).unwrap().score,
        );
        worst = worst.max((sp - so).abs());
    }
    assert!(worst <= 1e-4, "max |score difference| {worst}");
}
