//! Own answers on tiny random models (no assets): the generation pass's features equal the
//! teacher-forced extraction of the same prompt and answer for every family; batching does not
//! change answers or samples; the resumable job refuses another model's folder, `--limit 0`,
//! no questions, and a split with one class.
mod common;

use candle_core::Device;
use common::tiny_model_dir;
use std::sync::Arc;
use umbra_common::progress::Progress;
use umbra_haluprobe::eval::{EvalConfig, Evaluator};
use umbra_haluprobe::features::{extract_ids, ExtractConfig, Features};
use umbra_haluprobe::generation::{generate_answers, GenSettings};
use umbra_haluprobe::online::TapPlan;
use umbra_haluprobe::opendomain::QaItem;
use umbra_haluprobe::own::{run_generation, OwnJob};
use umbra_haluprobe::source::LoadedModel;
use umbra_haluprobe::store::{FeatureStore, ModelDims};
use umbra_haluprobe::HaluError;
use umbra_model::generate::generate_greedy;
use umbra_model::llama::Llama;
use umbra_model::testing;

fn tiny(layers: usize, seed: u64) -> Llama {
    let cfg = testing::tiny_config(32, 4, 2, layers, 64);
    Llama::new(&cfg, &testing::random_weights(&cfg, seed), &Device::Cpu).unwrap()
}

fn close(key: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{key}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol =
            if key.starts_with("ffn.") || key.starts_with("logit") || key.starts_with("llmcheck") {
                1e-3 * (1.0 + w.abs())
            } else {
                1e-4
            };
        assert!(
            (g - w).abs() <= tol,
            "{key}[{i}]: generation {g}, teacher-forced {w}"
        );
    }
}

#[test]
fn generation_features_equal_teacher_forced_extraction() {
    let m = tiny(3, 5);
    let cfg = ExtractConfig {
        window: 3,
        max_answer_tokens: 6,
        ..ExtractConfig::default()
    };
    let plan = Arc::new(TapPlan::every_family(&ModelDims::of(m.config()), &cfg));
    let prompts: Vec<Vec<u32>> = vec![
        vec![3, 9, 27, 14, 5],
        vec![7, 1, 2, 8, 33, 61, 12, 40, 4],
        vec![11, 22, 6],
    ];
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    // A stop id the second prompt's greedy answer reaches at its 3rd token (so both endings,
    // stop and length with its extra tap step, occur in one batch).
    let free = generate_greedy(&m, &prompts[1], 6).unwrap();
    let stop = vec![free[2]];
    let settings = GenSettings {
        max_new_tokens: 6,
        samples: 3,
        temperature: 1.0,
        prefill_tokens: 12,
    };
    let seeds = [10u64, 20, 30];
    let (answers, cost) = generate_answers(&m, &plan, &refs, &seeds, &stop, &settings).unwrap();
    assert_eq!(cost.prompts, 3);
    assert!(
        cost.prefill_passes >= 2,
        "prefill grouped by the token budget"
    );
    assert!(answers.iter().any(|a| a.stopped) && answers.iter().any(|a| !a.stopped));
    for (p, a) in prompts.iter().zip(&answers) {
        // The same greedy answer as single-sequence generation, cut at the stop id.
        let single = generate_greedy(&m, p, 6).unwrap();
        let cut = single
            .iter()
            .position(|t| stop.contains(t))
            .unwrap_or(single.len());
        assert_eq!(a.ids, single[..cut], "prompt {p:?}");
        assert_eq!(a.samples.len(), 3);
        let Some(got) = &a.features else {
            assert!(a.ids.is_empty());
            continue;
        };
        let want: &Features = &extract_ids(&m, &cfg, p, std::slice::from_ref(&a.ids)).unwrap()[0];
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        for (k, w) in want {
            close(k, &got[k], w);
        }
    }
    // Batching does not change answers or samples: one prompt at a time.
    for (i, p) in refs.iter().enumerate() {
        let (one, _) =
            generate_answers(&m, &plan, &[p], &seeds[i..i + 1], &stop, &settings).unwrap();
        assert_eq!(one[0].ids, answers[i].ids);
        assert_eq!(one[0].samples, answers[i].samples);
    }
    // Samples differ from one another (temperature 1 on a random model).
    assert!(answers[0].samples.windows(2).any(|w| w[0] != w[1]));
    assert!(cost.sample_tokens > 0 && cost.greedy_tokens > 0);
}

fn items(n: usize) -> Vec<QaItem> {
    (0..n)
        .map(|i| QaItem {
            question: format!("What is item {i}?"),
            aliases: vec![format!("zz{i}zz")],
            knowledge: Some(format!("Item {i} is zz{i}zz.")),
        })
        .collect()
}

fn job(samples: usize) -> OwnJob {
    let cfg = ExtractConfig {
        max_answer_tokens: 4,
        ..ExtractConfig::default()
    };
    OwnJob {
        task: "synthetic".into(),
        knowledge: true,
        limit: Some(20),
        seed: 1,
        chunk_rows: 10,
        batch: 4,
        gen: GenSettings {
            max_new_tokens: 4,
            samples,
            ..GenSettings::default()
        },
        cfg,
    }
}

#[test]
fn own_job_resumes_and_refuses_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let a = LoadedModel::open(&tiny_model_dir(tmp.path(), "a", 7)).unwrap();
    let b = LoadedModel::open(&tiny_model_dir(tmp.path(), "b", 8)).unwrap();
    assert_ne!(a.fingerprint, b.fingerprint);
    let out = tmp.path().join("own");
    let qs = items(30);
    let hidden = Progress::hidden();
    let s = run_generation(&a, &qs, &job(2), &out, &hidden).unwrap();
    assert_eq!(
        (s.questions, s.chunks_written, s.chunks_skipped),
        (20, 2, 0)
    );
    assert_eq!(s.answered + s.empty, 20);
    // Nothing left to do on a second run.
    let s2 = run_generation(&a, &qs, &job(2), &out, &hidden).unwrap();
    assert_eq!((s2.chunks_written, s2.chunks_skipped), (0, 2));
    // Answers of another model are refused, as is another setup.
    let e = run_generation(&b, &qs, &job(2), &out, &hidden)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("another model") && e.contains(&a.fingerprint),
        "{e}"
    );
    let e = run_generation(&a, &qs, &job(3), &out, &hidden)
        .unwrap_err()
        .to_string();
    assert!(e.contains("another setup"), "{e}");
    // No questions, --limit 0.
    assert!(matches!(
        run_generation(&a, &[], &job(0), &tmp.path().join("x"), &hidden),
        Err(HaluError::Empty(_))
    ));
    let mut j = job(0);
    j.limit = Some(0);
    assert!(matches!(
        run_generation(&a, &qs, &j, &tmp.path().join("y"), &hidden),
        Err(HaluError::Empty(_))
    ));
    // The folder opens as features (with the sampling scores); a random model never names
    // `zzNzz`, so every split holds one class and evaluation says so.
    let store = FeatureStore::open(&out).unwrap();
    assert_eq!(store.len(), s.answered);
    assert!(store.labels.iter().all(|&l| l == 1.0));
    assert_eq!(store.load("sampling.generation").unwrap().cols, 3);
    let e = Evaluator::new(&store, EvalConfig::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("one class only"), "{e}");
}

#[test]
fn prompt_layouts_read_as_documented() {
    use umbra_haluprobe::features::Layout;
    use umbra_haluprobe::prompt::own_prompt;
    let tmp = tempfile::tempdir().unwrap();
    let lm = LoadedModel::open(&tiny_model_dir(tmp.path(), "m", 1)).unwrap();
    let tok = &lm.tokenizer;
    let cfg = ExtractConfig {
        max_knowledge_tokens: 8,
        max_question_tokens: 6,
        ..ExtractConfig::default()
    };
    let text = |ids: Vec<u32>| tok.decode(&ids, false).unwrap();
    // Byte-level tokens: 8 knowledge bytes, 6 query bytes (a dialogue keeps its last ones).
    let qa = Layout::Qa
        .encode_prompt(tok, &cfg, Some("abcdefghijk"), "what is it")
        .unwrap();
    assert_eq!(text(qa), "Knowledge: abcdefgh\nQuestion: what i\nAnswer:");
    let dia = Layout::Dialogue
        .encode_prompt(tok, &cfg, Some("kk"), "0123456789")
        .unwrap();
    assert_eq!(text(dia), "Knowledge: kk\nDialogue: 456789\nResponse:");
    let summ = Layout::Summarization
        .encode_prompt(tok, &cfg, Some("doc"), "")
        .unwrap();
    assert_eq!(text(summ), "Document: doc\nSummary:");
    assert!(Layout::Qa.encode_prompt(tok, &cfg, Some("k"), " ").is_err());
    assert!(Layout::Summarization
        .encode_prompt(tok, &cfg, None, "")
        .is_err());
    // Own answers: one user message through the chat template.
    let p = own_prompt(tok, &cfg, Some("The sky is blue."), "Sky?").unwrap();
    assert!(p.chat);
    assert_eq!(
        p.text,
        format!(
            "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
            p.message
        )
    );
    assert!(p.message.contains("Knowledge: The sky") && p.message.ends_with("Question: Sky?"));
    assert_eq!(p.ids, tok.encode(&p.text, false).unwrap());
}
