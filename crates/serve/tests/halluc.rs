//! `umbra serve --halluc-probe`: every completion carries the probe's score, computed from the
//! taps of the passes that generated it, equal to the offline (teacher-forced) extraction of
//! the same prompt and answer; probes serving cannot score (lookback ratios, FFN statistics)
//! are refused at startup.
mod common;

use common::*;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use umbra_haluprobe::features::{extract_ids, key_shapes, ExtractConfig, Stage};
use umbra_haluprobe::probe::{
    gather, FeatureRef, Net, ProbeFile, ProbeKind, ProbeMeta, TrainConfig,
};
use umbra_haluprobe::store::{Matrix, ModelDims};
use umbra_model::checkpoint::Checkpoint;
use umbra_model::llama::Llama;

fn tiny(dir: &Path) -> Llama {
    let ck = Checkpoint::open(dir).unwrap();
    Llama::new(&ck.config, &ck.weights, &candle_core::Device::Cpu).unwrap()
}

/// A logistic-regression probe on `features` of `model`, fitted to random data (its weights
/// only have to be non-trivial: the test compares two ways of computing the same score).
fn probe(model: &Llama, features: Vec<FeatureRef>, cfg: ExtractConfig, path: &Path) -> ProbeFile {
    let dims = ModelDims::of(model.config());
    let shapes = key_shapes(dims.num_layers, dims.hidden_size, dims.num_heads);
    let cols: usize = features
        .iter()
        .map(|r| {
            let s = &shapes[&r.key];
            if r.layer.is_some() {
                s[1..].iter().product::<usize>()
            } else {
                s.iter().product()
            }
        })
        .sum();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let rows = 64;
    let data: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let y: Vec<f32> = (0..rows).map(|i| (i % 2) as f32).collect();
    let net = Net::fit(&Matrix { rows, cols, data }, &y, &TrainConfig::logreg(1e-3)).unwrap();
    let p = ProbeFile {
        meta: ProbeMeta {
            format: "umbra-haluprobe/1".into(),
            kind: ProbeKind::Logreg,
            features,
            stage: Stage::Generation,
            model: dims,
            extract: cfg,
            threshold: 0.5,
            obfuscated: None,
        },
        net,
    };
    p.save(path).unwrap();
    ProbeFile::load(path).unwrap()
}

fn offline_score(m: &Llama, p: &ProbeFile, prompt: &[u32], answer: &[u32]) -> f32 {
    let mut a = answer.to_vec();
    a.truncate(p.meta.extract.max_answer_tokens);
    let f = &extract_ids(m, &p.meta.extract, prompt, &[a]).unwrap()[0];
    let row = gather(f, &p.meta.features, &p.meta.model).unwrap();
    p.net
        .predict(&Matrix {
            rows: 1,
            cols: row.len(),
            data: row,
        })
        .unwrap()[0]
}

async fn complete(url: &str, body: Value) -> Value {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    if body["stream"] == json!(true) {
        let text = r.text().await.unwrap();
        let data = sse_data(&text);
        // The score rides on the chunk that carries the finish reason.
        let last = data
            .iter()
            .filter(|d| d.as_str() != "[DONE]")
            .map(|d| serde_json::from_str::<Value>(d).unwrap())
            .find(|v| v["choices"][0]["finish_reason"].is_string())
            .expect("a final chunk");
        let (_, ids, _) = join_stream(&text);
        json!({"ids": ids, "final": last})
    } else {
        let v: Value = r.json().await.unwrap();
        json!({"ids": ids_of(&v), "final": v})
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_completion_carries_the_offline_score() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_model_dir(tmp.path());
    let m = tiny(&dir);
    let nl = m.num_layers();
    let cfg = ExtractConfig {
        window: 3,
        max_answer_tokens: 5,
        ..ExtractConfig::default()
    };
    let feats = vec![
        FeatureRef::new("hidden.generation.mean", Some(nl - 1)),
        FeatureRef::new("hidden.generation.window", Some(0)),
        FeatureRef::new("hidden.query.mean", Some(1)),
        FeatureRef::new("logit.generation", None),
    ];
    let path = tmp.path().join("probe.safetensors");
    let p = probe(&m, feats, cfg, &path);
    let srv = start_tiny(tmp.path(), |c| c.halluc_probe = Some(path.clone())).await;
    let url = srv.url();
    // max_tokens below the probe's 5-token cut (the last token needs the extra tap step), at
    // it, and above it; streamed and not; sent together so they share batched decode steps.
    let cases: Vec<(Vec<u32>, usize, bool)> = vec![
        (vec![5, 17, 200, 3, 44], 3, false),
        (vec![9, 8, 7], 5, true),
        (vec![100, 101, 102, 103, 104, 105, 106], 8, false),
        (vec![1, 2], 1, true),
    ];
    let futs = cases.iter().map(|(prompt, n, stream)| {
        complete(
            &url,
            json!({"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": stream}),
        )
    });
    let outs = futures::future::join_all(futs).await;
    for ((prompt, n, stream), out) in cases.iter().zip(&outs) {
        let ids: Vec<u32> = serde_json::from_value(out["ids"].clone()).unwrap();
        assert_eq!(ids.len(), *n);
        let got = out["final"]["hallucination_score"]
            .as_f64()
            .unwrap_or_else(|| panic!("no score in {}", out["final"])) as f32;
        let want = offline_score(&m, &p, prompt, &ids);
        assert!(
            (got - want).abs() < 1e-4,
            "prompt {prompt:?} max_tokens {n} stream {stream}: served {got}, offline {want}"
        );
        assert_eq!(out["final"]["hallucination_stage"], "generation");
        assert_eq!(out["final"]["hallucinated"], json!(got >= 0.5));
    }
    // Distinct answers get clearly different scores (the probe is not constant, so the
    // 1e-4 agreement above is a real check).
    let scores: Vec<f64> = outs
        .iter()
        .map(|o| o["final"]["hallucination_score"].as_f64().unwrap())
        .collect();
    assert!(
        scores.windows(2).any(|w| (w[0] - w[1]).abs() > 0.05),
        "{scores:?}"
    );
    srv.stop().await;
}

/// The error `umbra serve` gives at startup for the model in `dir` with `probe`.
async fn refusal(dir: &Path, probe: PathBuf) -> String {
    let mut cfg = umbra_serve::server::ServeConfig::new(
        umbra_serve::server::ModelSource::Path(dir.to_path_buf()),
        loopback(),
    );
    cfg.halluc_probe = Some(probe);
    umbra_serve::server::start(cfg)
        .await
        .err()
        .expect("refused")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_probes_are_refused_at_startup() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_model_dir(tmp.path());
    let m = tiny(&dir);
    let lookback = tmp.path().join("lookback.safetensors");
    probe(
        &m,
        vec![FeatureRef::new("lookback.generation.mean", None)],
        ExtractConfig::default(),
        &lookback,
    );
    let e = refusal(&dir, lookback).await;
    assert!(e.contains("attention probabilities"), "{e}");
    // FFN statistics: the decode step emits no FFN tap.
    let ffn = tmp.path().join("ffn.safetensors");
    probe(
        &m,
        vec![
            FeatureRef::new("hidden.generation.last", Some(1)),
            FeatureRef::new("ffn.generation.mean", None),
        ],
        ExtractConfig::default(),
        &ffn,
    );
    let e = refusal(&dir, ffn).await;
    assert!(e.contains("FFN activations"), "{e}");
    // A probe for a model with other dimensions.
    let mut other = probe(
        &m,
        vec![FeatureRef::new("logit.generation", None)],
        ExtractConfig::default(),
        &tmp.path().join("x.safetensors"),
    );
    other.meta.model.num_layers += 1;
    let wrong = tmp.path().join("wrong.safetensors");
    other.save(&wrong).unwrap();
    let e = refusal(&dir, wrong).await;
    assert!(e.contains("--halluc-probe"), "{e}");
}

/// The provider serves the obfuscated checkpoint with the probe `umbra obfuscate --halluc-probe`
/// transformed under the same key: the score of the same (mapped) request equals the plaintext
/// server's, and the provider never sees a plaintext id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn obfuscated_server_scores_like_the_plaintext_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_model_dir(tmp.path());
    let m = tiny(&dir);
    let nl = m.num_layers();
    let feats = vec![
        FeatureRef::new("hidden.generation.last", Some(nl - 1)),
        FeatureRef::new("hidden.query.mean", Some(0)),
        FeatureRef::new("logit.generation", None),
    ];
    let plain_probe = tmp.path().join("probe.safetensors");
    probe(&m, feats, ExtractConfig::default(), &plain_probe);
    let (obf, key) = (tmp.path().join("obf"), tmp.path().join("client.key"));
    umbra_aloepri::compiler::compile_checkpoint(
        &dir,
        &obf,
        &key,
        &umbra_aloepri::ObfuscationParams::exact(8),
        9,
        &mut |_, _, _| {},
    )
    .unwrap();
    let obf_probe = obf.join("halluc-probe.safetensors");
    umbra_haluprobe::obfuscated::transform_probe_files(&plain_probe, &dir, &obf, &key, &obf_probe)
        .unwrap();
    let tau = umbra_aloepri::ClientKey::load(&key).unwrap().tau;
    let plain = start_tiny(tmp.path(), |c| c.halluc_probe = Some(plain_probe.clone())).await;
    let mut cfg = umbra_serve::server::ServeConfig::new(
        umbra_serve::server::ModelSource::Path(obf.clone()),
        loopback(),
    );
    cfg.halluc_probe = Some(obf_probe);
    let obf_srv = umbra_serve::server::start(cfg).await.unwrap();
    for (prompt, n) in [(vec![5u32, 17, 200, 3, 44], 6usize), (vec![70, 71], 3)] {
        let mapped: Vec<u32> = prompt.iter().map(|&i| tau[i as usize]).collect();
        let body = |p: &[u32]| json!({"prompt": p, "max_tokens": n, "temperature": 0});
        let a = complete(&plain.url(), body(&prompt)).await;
        let b = complete(&obf_srv.url(), body(&mapped)).await;
        let ids: Vec<u32> = serde_json::from_value(a["ids"].clone()).unwrap();
        let obf_ids: Vec<u32> = serde_json::from_value(b["ids"].clone()).unwrap();
        assert_eq!(
            obf_ids,
            ids.iter().map(|&i| tau[i as usize]).collect::<Vec<_>>()
        );
        let (sa, sb) = (
            a["final"]["hallucination_score"].as_f64().unwrap(),
            b["final"]["hallucination_score"].as_f64().unwrap(),
        );
        assert!((sa - sb).abs() < 1e-4, "plaintext {sa} vs obfuscated {sb}");
    }
    // The plaintext probe on the obfuscated model is refused (another key fingerprint).
    let mut cfg = umbra_serve::server::ServeConfig::new(
        umbra_serve::server::ModelSource::Path(obf),
        loopback(),
    );
    cfg.halluc_probe = Some(plain_probe);
    assert!(umbra_serve::server::start(cfg).await.is_err());
    plain.stop().await;
    obf_srv.stop().await;
}
