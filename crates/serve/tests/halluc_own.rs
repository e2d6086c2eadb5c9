//! `umbra serve --halluc-probe` with a probe trained on the model's own answers (issue 19), on
//! SmolLM2-135M and HaluEval QA (CI fetches both): `umbra halluc generate`'s pipeline answers a
//! slice of questions and a servable probe (hidden states + logit features) is fitted on its
//! features; the server then answers the same prompts, as raw ids and as chat messages, and
//! every completion carries the score that the offline pipeline gives the same generated answer.
mod common;

use common::*;
use serde_json::{json, Value};
use std::sync::Arc;
use umbra_assets::{Asset, Cache};
use umbra_haluprobe::data::{halueval_qa_items, load_halueval_qa, shuffled_indices};
use umbra_haluprobe::eval::load_refs;
use umbra_haluprobe::features::{ExtractConfig, Stage};
use umbra_haluprobe::generation::{generate_answers, GenSettings};
use umbra_haluprobe::online::TapPlan;
use umbra_haluprobe::own::{run_generation, OwnJob};
use umbra_haluprobe::probe::{FeatureRef, Net, ProbeFile, ProbeKind, ProbeMeta, TrainConfig};
use umbra_haluprobe::prompt::own_prompt;
use umbra_haluprobe::source::{resolve_model, LoadedModel};
use umbra_haluprobe::store::FeatureStore;
use umbra_serve::server::{start, ModelSource, ServeConfig};

const QUESTIONS: usize = 40;
const CHECKED: usize = 6;

async fn post(url: &str, path: &str, body: Value) -> Value {
    let r = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_score_equals_the_offline_score_of_own_answers() {
    // Fails with the fetch commands when the assets are missing.
    let data = Cache::from_env()
        .unwrap()
        .require(Asset::HaluEvalQa)
        .unwrap();
    let lm = LoadedModel::open(&resolve_model("smollm2").unwrap()).unwrap();
    let items = halueval_qa_items(&load_halueval_qa(&data).unwrap());
    let cfg = ExtractConfig {
        max_knowledge_tokens: 48,
        max_answer_tokens: 12,
        ..ExtractConfig::default()
    };
    let gen = GenSettings {
        max_new_tokens: 12,
        ..GenSettings::default()
    };
    // 1. Own answers, labelled, with features from the generation pass (`halluc generate`).
    let tmp = tempfile::tempdir().unwrap();
    let job = OwnJob {
        task: "halueval-qa".into(),
        knowledge: true,
        limit: Some(QUESTIONS),
        seed: 3,
        chunk_rows: QUESTIONS,
        batch: 8,
        cfg: cfg.clone(),
        gen: gen.clone(),
    };
    let out = tmp.path().join("own");
    let hidden = umbra_haluprobe::own::Progress::hidden();
    let s = run_generation(&lm, &items, &job, &out, &hidden).unwrap();
    assert!(s.correct > 0 && s.hallucinated > 0, "{}", s.balance_line());
    // 2. A probe serving can compute, fitted on those answers.
    let store = FeatureStore::open(&out).unwrap();
    let refs = vec![
        FeatureRef::new("hidden.generation.mean", Some(20)),
        FeatureRef::new("hidden.query.mean", Some(12)),
        FeatureRef::new("logit.generation", None),
    ];
    let x = load_refs(&store, &refs).unwrap();
    let net = Net::fit(&x, &store.labels, &TrainConfig::logreg(1e-2)).unwrap();
    let probe = ProbeFile {
        meta: ProbeMeta {
            format: umbra_haluprobe::probe::PROBE_FORMAT.into(),
            kind: ProbeKind::Logreg,
            features: refs,
            stage: Stage::Generation,
            model: store.manifest.model.clone(),
            extract: cfg.clone(),
            threshold: 0.5,
            obfuscated: None,
        },
        net,
    };
    let probe_path = tmp.path().join("own-probe.safetensors");
    probe.save(&probe_path).unwrap();
    // 3. Offline: the generation pass's features (full precision) of the first questions.
    let order = shuffled_indices(items.len(), job.seed);
    let qs: Vec<usize> = order[..CHECKED].to_vec();
    let prompts: Vec<_> = qs
        .iter()
        .map(|&r| {
            own_prompt(
                &lm.tokenizer,
                &cfg,
                items[r].knowledge.as_deref(),
                &items[r].question,
            )
            .unwrap()
        })
        .collect();
    let ids: Vec<&[u32]> = prompts.iter().map(|p| p.ids.as_slice()).collect();
    let plan = Arc::new(TapPlan::every_family(&store.manifest.model, &cfg));
    let (answers, _) =
        generate_answers(&lm.model, &plan, &ids, &[0; CHECKED], &lm.eos_ids, &gen).unwrap();
    // 4. The server with that probe, on the same (already loaded) model.
    let mut sc = ServeConfig::new(
        ModelSource::Loaded {
            model: Box::new(lm.model.clone()),
            tokenizer: Some(Box::new(lm.tokenizer.clone())),
            eos_ids: lm.eos_ids.clone(),
        },
        loopback(),
    );
    sc.halluc_probe = Some(probe_path);
    let srv = start(sc).await.unwrap();
    let url = srv.url();
    let mut scores = vec![];
    for (p, a) in prompts.iter().zip(&answers) {
        let f = a.features.as_ref().expect("a non-empty answer");
        let offline = probe.score(f).unwrap();
        let raw = post(
            &url,
            "/v1/completions",
            json!({"prompt": p.ids, "max_tokens": gen.max_new_tokens, "temperature": 0}),
        )
        .await;
        assert_eq!(
            ids_of(&raw),
            a.ids,
            "the server answers as the pipeline did"
        );
        let chat = post(
            &url,
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": p.message}],
                   "max_tokens": gen.max_new_tokens, "temperature": 0}),
        )
        .await;
        for v in [&raw, &chat] {
            let served = v["hallucination_score"]
                .as_f64()
                .unwrap_or_else(|| panic!("no score in {v}")) as f32;
            assert!(
                (served - offline).abs() < 1e-4,
                "served {served}, offline {offline} for `{}`",
                p.message
            );
        }
        scores.push(offline);
    }
    // The scores of different answers differ by far more than the 1e-4 tolerance, so the
    // agreement above is a real check (measured: a spread of 0.012 over these six answers).
    let spread = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
        - scores.iter().fold(f32::INFINITY, |a, &b| a.min(b));
    assert!(spread > 2e-3, "{scores:?}");
    srv.stop().await;
}
