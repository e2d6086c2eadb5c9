//! Share mode on the real SmolLM2-135M-Instruct (`umbra fetch smollm2`): fidelity of the
//! arithmetic, exactness through two TLS servers, the attacks on a server's view, and the
//! official `openai` client through the share proxy.
use candle_core::{Device, Tensor};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use umbra_model::checkpoint::Checkpoint;
use umbra_model::generate::{generate, GenerateParams};
use umbra_model::sampling::SamplingParams;
use umbra_model::tokenizer::ChatMessage;
use umbra_model::{Forward, Input, Llama};
use umbra_share::attack::{companion, record_victims, report, Attacker};
use umbra_share::client::parse_pair;
use umbra_share::fixed::Format;
use umbra_share::model::{Remote, ShareModel};
use umbra_share::server::{spawn, PublicWeights, RunningServer, ServerConfig};
use umbra_share::tls::{ServerIdentity, Trust};
use umbra_share::transcript::Transcript;

fn smollm2() -> PathBuf {
    let dir = umbra_assets::Cache::from_env().unwrap().smollm2_hf_dir();
    assert!(
        dir.join("model.safetensors").is_file(),
        "SmolLM2 is missing from the cache: run `umbra fetch smollm2` ({})",
        dir.display()
    );
    dir
}

fn servers(path: &std::path::Path) -> (RunningServer, RunningServer, Remote) {
    let w = Arc::new(PublicWeights::load(path).unwrap());
    let names = ["localhost".to_string(), "127.0.0.1".to_string()];
    let mk = || {
        spawn(
            w.clone(),
            ServerConfig::new(
                ([127, 0, 0, 1], 0).into(),
                ServerIdentity::generate(&names).unwrap(),
            ),
        )
        .unwrap()
    };
    let (a, b) = (mk(), mk());
    let r = Remote {
        servers: parse_pair(&[a.url(), b.url()]).unwrap(),
        trust: [Trust::pin(&a.pin).unwrap(), Trust::pin(&b.pin).unwrap()],
        timeout: Duration::from_secs(300),
    };
    (a, b, r)
}

fn passages(
    n: usize,
    max_len: usize,
    tok: &umbra_model::tokenizer::TextTokenizer,
) -> Vec<Vec<u32>> {
    umbra_attacks::suite::load_texts(None, n)
        .unwrap()
        .iter()
        .map(|t| {
            let mut v = tok.encode(t, false).unwrap();
            v.truncate(max_len);
            v
        })
        .filter(|v| v.len() >= 2)
        .collect()
}

#[test]
fn smollm2_fixed_point_arithmetic_keeps_fidelity() {
    let path = smollm2();
    let ck = Checkpoint::open(&path).unwrap();
    let tok = ck.tokenizer.clone().unwrap();
    let plain = Llama::new(&ck.config, &ck.weights, &Device::Cpu).unwrap();
    let local = ShareModel::open(&path, Format::default(), None).unwrap();
    assert!(local.integrity_bits() >= umbra_share::check::TARGET_BITS);
    let seqs = passages(20, 128, &tok);
    let opts = umbra_aloepri::fidelity::FidelityOptions {
        greedy_prompts: 0,
        ..Default::default()
    };
    let id = umbra_aloepri::TokenPermutation::identity(ck.config.vocab_size);
    let r =
        umbra_aloepri::fidelity::evaluate(&plain, &local.llama, &id, &seqs, &opts, &mut |_, _| {})
            .unwrap();
    eprintln!("{r:?}");
    assert!(r.top1_agreement >= 0.998, "{r:?}");
    assert!((r.ppl_ratio - 1.0).abs() <= 1e-3, "{r:?}");
}

/// The fidelity check at full size: 200 HaluEval passages of up to 128 tokens (too slow
/// for CI on 2 cores; `UMBRA_SHARE_FIDELITY_TEXTS` changes the count). The ring arithmetic runs
/// in this process: through two servers it is bit for bit the same (the test below).
/// `cargo test --release -p umbra-share --test smollm2 -- --ignored --nocapture fidelity_on_200`
#[test]
#[ignore = "slow: 200 passages through the F32 and the ring model (minutes on 2 cores)"]
fn smollm2_fidelity_on_200_halueval_passages() {
    let n = std::env::var("UMBRA_SHARE_FIDELITY_TEXTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let path = smollm2();
    let ck = Checkpoint::open(&path).unwrap();
    let tok = ck.tokenizer.clone().unwrap();
    let plain = Llama::new(&ck.config, &ck.weights, &Device::Cpu).unwrap();
    let local = ShareModel::open(&path, Format::default(), None).unwrap();
    let seqs = passages(n, 128, &tok);
    let opts = umbra_aloepri::fidelity::FidelityOptions {
        greedy_prompts: 0,
        ..Default::default()
    };
    let id = umbra_aloepri::TokenPermutation::identity(ck.config.vocab_size);
    let t0 = std::time::Instant::now();
    let r =
        umbra_aloepri::fidelity::evaluate(&plain, &local.llama, &id, &seqs, &opts, &mut |d, t| {
            if d % 20 == 0 {
                eprintln!("{d}/{t} passages, {:.0} s", t0.elapsed().as_secs_f64());
            }
        })
        .unwrap();
    eprintln!("{} passages: {r:?}", seqs.len());
    assert!(r.top1_agreement >= 0.999, "{r:?}");
    assert!((r.ppl_ratio - 1.0).abs() <= 1e-3, "{r:?}");
}

#[test]
fn smollm2_through_two_servers_is_exact_and_greedy_chat_matches() {
    let path = smollm2();
    let ck = Checkpoint::open(&path).unwrap();
    let tok = ck.tokenizer.clone().unwrap();
    let plain = Llama::new(&ck.config, &ck.weights, &Device::Cpu).unwrap();
    let (_a, _b, r) = servers(&path);
    let share = ShareModel::open(&path, Format::default(), Some(&r)).unwrap();
    let local = ShareModel::open(&path, Format::default(), None).unwrap();
    let text = tok
        .apply_chat_template(&[ChatMessage::user("What is the capital of France?")], true)
        .unwrap();
    let ids = tok.encode(&text, false).unwrap();
    let t = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let run = |m: &Llama| {
        m.forward(Input::Ids(&t), &mut m.new_cache(), Forward::logits())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(
        run(&share.llama),
        run(&local.llama),
        "the shares sum to the ring product exactly"
    );
    let params = GenerateParams {
        max_tokens: 24,
        sampling: SamplingParams::greedy(),
        stop_ids: ck.eos_token_ids(),
    };
    let a = generate(&plain, &ids, &params, |_| true).unwrap().ids;
    let b = generate(&share.llama, &ids, &params, |_| true).unwrap().ids;
    assert_eq!(tok.decode(&a, true).unwrap(), tok.decode(&b, true).unwrap());
    assert!(tok.decode(&b, true).unwrap().contains("Paris"));
}

#[test]
fn smollm2_attacks_on_a_servers_view_read_chance() {
    let path = smollm2();
    let ck = Checkpoint::open(&path).unwrap();
    let tok = ck.tokenizer.clone().unwrap();
    let all = passages(1080, 48, &tok);
    let victims: Vec<Vec<u32>> = all[..8].to_vec();
    let public: Vec<Vec<u32>> = all[1000..].to_vec();
    let dir = tempfile::tempdir().unwrap();
    let tr = dir.path().join("a.bin");
    record_victims(&path, &victims, &tr, Format::default()).unwrap();
    let shares = Transcript::read(&tr).unwrap();
    let control = Transcript::read(&companion(&tr, ".plain.bin")).unwrap();
    let truth: Vec<u32> = victims.iter().flatten().copied().collect();
    let attacker = Attacker {
        cfg: &ck.config,
        weights: &ck.weights,
        public: &public,
        isa_rounds: 2,
    };
    let r = report(&attacker, &shares, Some(&control), 0, &truth).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&r).unwrap());
    for s in &r.scores {
        match s.view.as_str() {
            "shares" => assert!(
                s.top1 <= r.chance_upper,
                "{} on shares: {} > {}",
                s.attack,
                s.top1,
                r.chance_upper
            ),
            _ if s.attack == "NN" => assert!(s.top1 > 0.95, "NN on the control: {}", s.top1),
            _ => assert!(
                s.top1 > 2.0 * r.chance_upper,
                "{} on the control: {}",
                s.attack,
                s.top1
            ),
        }
    }
    assert!(
        r.bytes.p_value > 1e-4 && r.bits.p_value > 1e-4,
        "{:?} {:?}",
        r.bytes,
        r.bits
    );
}

fn python_client(base: &str, model: &str) -> Value {
    // The serving tests' client, so both crates drive their proxies with the same script.
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../serve/tests/python/openai_client.py");
    let check = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output();
    match check {
        Ok(o) if o.status.success() => {}
        _ => panic!("the `openai` Python package is missing: run `python3 -m pip install openai`"),
    }
    let out = std::process::Command::new("python3")
        .arg(&script)
        .args([base, model])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_openai_client_gets_the_plaintext_servers_text_through_the_share_proxy() {
    use umbra_serve::server::{start, ModelSource, ServeConfig};
    let path = smollm2();
    let p2 = path.clone();
    let (a, b, share) = tokio::task::spawn_blocking(move || {
        let (a, b, r) = servers(&p2);
        let m = ShareModel::open(&p2, Format::default(), Some(&r)).unwrap();
        (a, b, m)
    })
    .await
    .unwrap();
    let mut pc = ServeConfig::new(ModelSource::Path(path.clone()), ([127, 0, 0, 1], 0).into());
    pc.model_name = Some("smollm2".into());
    let plain = start(pc).await.unwrap();
    let mut sc = ServeConfig::new(
        ModelSource::Loaded {
            model: Box::new(share.llama),
            tokenizer: share.tokenizer.map(Box::new),
            eos_ids: share.eos_ids,
        },
        ([127, 0, 0, 1], 0).into(),
    );
    sc.model_name = Some("smollm2".into());
    let proxy = start(sc).await.unwrap();
    let (pb, pp) = (plain.url(), proxy.url());
    let (x, y) = tokio::task::spawn_blocking(move || {
        (python_client(&pb, "smollm2"), python_client(&pp, "smollm2"))
    })
    .await
    .unwrap();
    eprintln!("plaintext server: {x}\nshare proxy: {y}");
    for k in [
        "chat",
        "chat_stream",
        "completion",
        "completion_stream",
        "chat_usage",
        "completion_usage",
    ] {
        assert_eq!(x[k], y[k], "{k}");
    }
    assert!(!y["chat"].as_str().unwrap().is_empty());
    assert_eq!(y["error"][0], 404);
    proxy.stop().await;
    plain.stop().await;
    tokio::task::spawn_blocking(move || {
        a.stop();
        b.stop();
    })
    .await
    .unwrap();
}
