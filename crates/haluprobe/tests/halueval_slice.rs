//! End to end on real assets (CI fetches `smollm2` and `halueval-qa`): extract a small slice of
//! HaluEval QA with SmolLM2-135M, resume, train a probe on the logit features and one on the
//! FFN statistics, score a triple.
use umbra_assets::{Asset, Cache};
use umbra_common::progress::Progress;
use umbra_haluprobe::data::{load_halueval_qa, GivenRow};
use umbra_haluprobe::eval::{train_selected, EvalConfig};
use umbra_haluprobe::extract::{run_extraction, ExtractJob};
use umbra_haluprobe::features::ExtractConfig;
use umbra_haluprobe::probe::FeatureRef;
use umbra_haluprobe::score::Scorer;
use umbra_haluprobe::source::{load_model, resolve_model};
use umbra_haluprobe::store::FeatureStore;

/// 120 rows = 240 triples; test split 40% of rows = 48 rows = 96 triples.
const ROWS: usize = 120;

#[test]
fn smollm2_halueval_slice_beats_chance() {
    let cache = Cache::from_env().unwrap();
    let data = cache.require(Asset::HaluEvalQa).unwrap();
    // Fails with the fetch command when SmolLM2 is not in the cache.
    let model_dir = resolve_model("smollm2").unwrap();
    let rows = load_halueval_qa(&data).unwrap();
    let given: Vec<GivenRow> = rows.iter().map(GivenRow::from).collect();
    let hidden = Progress::hidden();
    let (model, tok) = load_model(&model_dir).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = ExtractJob {
        data: "halueval-qa".into(),
        model_path: model_dir.display().to_string(),
        limit: Some(ROWS),
        seed: 0,
        chunk_rows: 40,
        cfg: ExtractConfig {
            max_knowledge_tokens: 48,
            ..ExtractConfig::default()
        },
        token_map: None,
    };
    let s = run_extraction(&model, &tok, &given, &job, dir.path(), &hidden).unwrap();
    assert_eq!((s.triples, s.chunks_written), (2 * ROWS, 3));
    // A second run resumes: nothing left to do.
    let s2 = run_extraction(&model, &tok, &given, &job, dir.path(), &hidden).unwrap();
    assert_eq!((s2.chunks_written, s2.chunks_skipped), (0, 3));
    // Another setup in the same folder is refused.
    let mut other = job.clone();
    other.seed = 1;
    assert!(run_extraction(&model, &tok, &given, &other, dir.path(), &hidden).is_err());
    // A folder of an older extraction (no ffn keys) is not resumed into.
    let old = tempfile::tempdir().unwrap();
    let mut man = umbra_haluprobe::store::read_manifest(dir.path()).unwrap();
    man.keys.retain(|k, _| !k.starts_with("ffn."));
    umbra_common::fs::write_json(&old.path().join("manifest.json"), &man).unwrap();
    let e = run_extraction(&model, &tok, &given, &job, old.path(), &hidden)
        .unwrap_err()
        .to_string();
    assert!(e.contains("older extraction") && e.contains("ffn."), "{e}");

    let store = FeatureStore::open(dir.path()).unwrap();
    let cfg = EvalConfig {
        val: 0.2,
        test: 0.4,
        bootstrap: 200,
        ..EvalConfig::default()
    };
    let (ffn, _) = train_selected(
        &store,
        cfg.clone(),
        vec![FeatureRef::parse("ffn:generation.mean").unwrap()],
    )
    .unwrap();
    // FFN statistics of the answer tokens carry the signal too (measured: see docs/haluprobe.md).
    assert!(ffn.test_auroc > 0.75, "ffn test AUROC {}", ffn.test_auroc);
    let (cell, probe) =
        train_selected(&store, cfg, vec![FeatureRef::parse("logit").unwrap()]).unwrap();
    // Under the null (no signal) the test AUROC of 48 positives vs 48 negatives has standard
    // deviation ~0.06; 0.80 is ~5 sd above chance, and the interval must exclude 0.5.
    assert!(cell.test_auroc > 0.80, "test AUROC {}", cell.test_auroc);
    assert!(
        cell.ci_low > 0.6,
        "interval [{}, {}]",
        cell.ci_low,
        cell.ci_high
    );

    let p = dir.path().join("probe.safetensors");
    probe.save(&p).unwrap();
    let scorer = Scorer::load(&p, model.config()).unwrap();
    let r = &rows[0];
    let good = scorer
        .score(
            &model,
            &tok,
            Some(&r.knowledge),
            &r.question,
            &r.right_answer,
        )
        .unwrap();
    let bad = scorer
        .score(
            &model,
            &tok,
            Some(&r.knowledge),
            &r.question,
            &r.hallucinated_answer,
        )
        .unwrap();
    assert!((0.0..=1.0).contains(&good.score) && (0.0..=1.0).contains(&bad.score));
    assert_eq!(good.stage, umbra_haluprobe::features::Stage::Generation);
}
