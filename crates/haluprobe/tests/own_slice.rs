//! CI: a small own-answer slice end to end on real assets (CI fetches `smollm2` and
//! `halueval-qa`): SmolLM2-135M answers HaluEval QA questions with their knowledge passage
//! (batched greedy generation with taps, two samples each), the answers are labelled against the
//! gold answer and stored with the generation pass's features, and a probe is fitted on them.
//!
//! What it asserts: every stored label is the judgement of the stored answer against its gold
//! aliases, the feature rows are exactly the non-empty answers in order, the sampling
//! consistency is stored for every answer, and a resumed run rewrites nothing.
//!
//! What it does not assert (measured, see docs/haluprobe.md "Own answers"): that a probe beats
//! chance on the slice. On own answers SmolLM2's detectors are weak (best test AUROC 0.6-0.7 on
//! 300 questions), and on a slice that runs in CI time (~40 held-out answers) the 99.9%
//! permutation bound of a chance-level detector is ~0.78, so such an assertion would fail on
//! honest data. The test prints the probe's AUROC next to that bound
//! ([`umbra_haluprobe::metrics::auroc_permutation_bound`]).
use umbra_assets::{Asset, Cache};
use umbra_haluprobe::answers::read_answers;
use umbra_haluprobe::data::{halueval_qa_items, load_halueval_qa};
use umbra_haluprobe::features::ExtractConfig;
use umbra_haluprobe::generation::GenSettings;
use umbra_haluprobe::labels::judge;
use umbra_haluprobe::metrics::{auroc, auroc_permutation_bound};
use umbra_haluprobe::own::{run_generation, OwnJob, Progress};
use umbra_haluprobe::source::{resolve_model, LoadedModel};
use umbra_haluprobe::store::{read_manifest, FeatureStore};

const QUESTIONS: usize = 40;

#[test]
fn smollm2_own_answer_slice_end_to_end() {
    let t0 = std::time::Instant::now();
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
        chunk_rows: 20,
        batch: 20,
        cfg: ExtractConfig {
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
    println!("{} ({:.1}s)", s.balance_line(), t0.elapsed().as_secs_f64());
    assert_eq!((s.questions, s.chunks_written), (QUESTIONS, 2));
    assert_eq!(s.answered + s.empty, QUESTIONS);
    assert_eq!(s.correct + s.hallucinated, s.answered);

    // Labels are the judgement of the stored answers; feature rows are the non-empty answers.
    let manifest = read_manifest(dir.path()).unwrap();
    let mut records = vec![];
    for c in &manifest.chunks {
        records.extend(read_answers(&dir.path().join(c.answers.as_ref().unwrap())).unwrap());
    }
    assert_eq!(records.len(), QUESTIONS);
    for r in &records {
        assert_eq!(r.correct, judge(&r.answer, &r.aliases).correct, "{r:?}");
        assert_eq!(r.has_features, !r.answer_ids.is_empty(), "{r:?}");
        assert_eq!(r.samples.len(), 2, "{r:?}");
        assert!(r.consistency.is_some() || !r.has_features, "{r:?}");
    }
    let store = FeatureStore::open(dir.path()).unwrap();
    let want: Vec<f32> = records
        .iter()
        .filter(|r| r.has_features)
        .map(|r| r.label())
        .collect();
    assert_eq!(store.labels, want);

    // Resuming the finished folder writes nothing.
    let again = run_generation(&lm, &items, &job, dir.path(), &Progress::hidden()).unwrap();
    assert_eq!((again.chunks_written, again.chunks_skipped), (0, 2));

    // The answer log-perplexity (-mean_logprob) against the labels, next to the chance bound
    // (printed only).
    let logit = store.load("logit.generation").unwrap();
    let scores: Vec<f32> = (0..store.len()).map(|i| -logit.row(i)[1]).collect();
    if s.correct > 0 && s.hallucinated > 0 {
        let a = auroc(&scores, &store.labels).unwrap();
        let bound = auroc_permutation_bound(&scores, &store.labels, 1e-3, 5_000, 0).unwrap();
        println!("perplexity AUROC {a:.3}; chance bound (alpha 0.001) {bound:.3}");
    }
    println!("total {:.1}s", t0.elapsed().as_secs_f64());
}
