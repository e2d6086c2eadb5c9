//! CI: a small own-answer slice end to end on real assets (CI fetches `smollm2` and
//! `halueval-qa`): SmolLM2-135M answers HaluEval QA questions with their knowledge passage
//! (batched greedy generation with taps, two samples each), the answers are labelled against the
//! gold answer and stored with the generation pass's features; a probe fitted on the training
//! questions must beat chance on the held-out ones by more than luck allows: its test AUROC has
//! to exceed the 99.9% quantile of the AUROC of a detector that knows nothing, computed by
//! permuting the test labels over its scores (a chance-level probe passes with probability
//! <= 0.001; [`umbra_haluprobe::metrics::auroc_permutation_bound`]).
use std::time::Instant;
use umbra_assets::{Asset, Cache};
use umbra_haluprobe::data::{halueval_qa_items, load_halueval_qa};
use umbra_haluprobe::eval::{load_refs, EvalConfig, Evaluator};
use umbra_haluprobe::features::ExtractConfig;
use umbra_haluprobe::generation::GenSettings;
use umbra_haluprobe::metrics::{auroc, auroc_permutation_bound};
use umbra_haluprobe::own::{run_generation, OwnJob, Progress};
use umbra_haluprobe::probe::{FeatureRef, ProbeKind};
use umbra_haluprobe::source::{resolve_model, LoadedModel};
use umbra_haluprobe::store::FeatureStore;

const QUESTIONS: usize = 120;

#[test]
fn smollm2_own_answer_slice_beats_chance() {
    let t0 = Instant::now();
    let data = Cache::from_env()
        .unwrap()
        .require(Asset::HaluEvalQa)
        .unwrap();
    // Fails with the fetch command when SmolLM2 is not in the cache.
    let lm = LoadedModel::open(&resolve_model("smollm2").unwrap()).unwrap();
    let items = halueval_qa_items(&load_halueval_qa(&data).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let job = OwnJob {
        task: "halueval-qa".into(),
        knowledge: true,
        limit: Some(QUESTIONS),
        seed: 11,
        chunk_rows: 60,
        batch: 24,
        cfg: ExtractConfig {
            max_knowledge_tokens: 32,
            max_answer_tokens: 12,
            ..ExtractConfig::default()
        },
        gen: GenSettings {
            max_new_tokens: 12,
            samples: 2,
            ..GenSettings::default()
        },
    };
    let s = run_generation(&lm, &items, &job, dir.path(), &Progress::hidden()).unwrap();
    let gen_s = t0.elapsed().as_secs_f64();
    println!("{} ({gen_s:.1}s)", s.balance_line());
    assert_eq!((s.questions, s.chunks_written), (QUESTIONS, 2));
    assert!(s.usable, "{}", s.balance_line());

    let store = FeatureStore::open(dir.path()).unwrap();
    assert_eq!(store.len(), s.answered);
    let ev = Evaluator::new(
        &store,
        EvalConfig {
            val: 0.1,
            test: 0.45,
            seed: 2,
            ..EvalConfig::default()
        },
    )
    .unwrap();
    let refs = vec![FeatureRef::new("logit.generation", None)];
    let x = load_refs(&store, &refs).unwrap();
    let fitted = ev
        .fit_matrix(
            &x,
            refs,
            ProbeKind::Logreg,
            "logit",
            "logit",
            "generation",
            None,
        )
        .unwrap();
    let scores = fitted.net.predict(&x.select(&ev.splits.test)).unwrap();
    let labels: Vec<f32> = ev.splits.test.iter().map(|&i| store.labels[i]).collect();
    let a = auroc(&scores, &labels).unwrap();
    let bound = auroc_permutation_bound(&scores, &labels, 1e-3, 20_000, 0).unwrap();
    println!(
        "test AUROC {a:.3} on {} answers; chance bound (alpha 0.001) {bound:.3}; total {:.1}s",
        labels.len(),
        t0.elapsed().as_secs_f64()
    );
    assert!(
        a > bound,
        "test AUROC {a:.3} is not above the chance bound {bound:.3}"
    );
}
