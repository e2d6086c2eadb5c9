//! Split mode end to end on a tiny model: the client (embedding, head, key) and the server
//! (blocks only, `POST /v1/split/forward`) generate exactly what the plaintext model generates,
//! the server's hidden states equal the whole obfuscated model's, and hostile or malformed
//! requests get clear 4xx answers without disturbing other sessions.
mod common;

use candle_core::{Device, Tensor};
use common::{answer, loopback, post_text, tiny_model_dir};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;
use umbra_aloepri::compiler::compile_checkpoint;
use umbra_aloepri::ObfuscationParams;
use umbra_model::checkpoint::Checkpoint;
use umbra_model::generate::{generate_greedy, GenerateParams};
use umbra_model::llama::Llama;
use umbra_model::sampling::SamplingParams;
use umbra_model::{Forward, Input};
use umbra_serve::proxy::{start_proxy, ProxyConfig};
use umbra_serve::server::{start, ModelSource, ServeConfig, ServerHandle};
use umbra_serve::split_mode::{decode_f32, encode_f32, SplitClient, FORWARD_PATH};

struct Setup {
    _tmp: tempfile::TempDir,
    plain: PathBuf,
    whole: PathBuf,
    split: PathBuf,
    key: PathBuf,
}

fn setup(h: usize, seed: u64) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let plain = tiny_model_dir(tmp.path());
    let whole = tmp.path().join("obf");
    let key = tmp.path().join("client.key");
    compile_checkpoint(
        &plain,
        &whole,
        &key,
        &ObfuscationParams::exact(h),
        seed,
        &mut |_, _, _| {},
    )
    .unwrap();
    let split = tmp.path().join("split");
    umbra_aloepri::split_parts::write_split(&whole, &split).unwrap();
    Setup {
        _tmp: tmp,
        plain,
        whole,
        split,
        key,
    }
}

async fn serve_server_part(dir: &Path, tweak: impl FnOnce(&mut ServeConfig)) -> ServerHandle {
    let mut cfg = ServeConfig::new(ModelSource::Path(dir.join("server")), loopback());
    tweak(&mut cfg);
    start(cfg).await.unwrap()
}

fn load(dir: &Path) -> Llama {
    let ck = Checkpoint::open(dir).unwrap();
    Llama::new(&ck.config, &ck.weights, &Device::Cpu).unwrap()
}

async fn post(url: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{url}{FORWARD_PATH}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn open_client(s: &Setup, server: &ServerHandle) -> std::sync::Arc<SplitClient> {
    let c = SplitClient::open(
        &s.split.join("client"),
        &s.key,
        &server.url(),
        Duration::from_secs(30),
    );
    std::sync::Arc::new(c.unwrap())
}

async fn health(url: &str) -> Value {
    reqwest::get(format!("{url}/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_generation_equals_the_plaintext_model() {
    for h in [0, 4] {
        let s = setup(h, 21);
        let server = serve_server_part(&s.split, |_| {}).await;
        let client = open_client(&s, &server);
        client.check_server().await.unwrap();
        let plain = load(&s.plain);
        // The last prompt is longer than one request carries (sent in 2 requests).
        let long: Vec<u32> = (0..300u32).map(|i| (i * 7) % 256).collect();
        let prompts: [&[u32]; 4] = [&[1, 2, 3], &[72, 101, 108, 108, 111], &[200; 9], &long];
        for prompt in prompts {
            let want = generate_greedy(&plain, prompt, 12).unwrap();
            let rt = tokio::runtime::Handle::current();
            let (c, prompt_v) = (client.clone(), prompt.to_vec());
            let (out, stats) = tokio::task::spawn_blocking(move || {
                let params = GenerateParams {
                    max_tokens: 12,
                    sampling: SamplingParams::greedy(),
                    stop_ids: vec![],
                };
                c.generate(&rt, &prompt_v, &params, |_| true).unwrap()
            })
            .await
            .unwrap();
            assert_eq!(out.ids, want, "h {h}, prompt {prompt:?}");
            // The prompt in requests of at most ROWS_PER_REQUEST rows, then 11 decode steps.
            let prefill = prompt.len().div_ceil(SplitClient::ROWS_PER_REQUEST);
            assert_eq!(stats.round_trips, prefill + 11);
            assert!(stats.bytes_sent > 0 && stats.bytes_received > 0);
            // The generation closed its session on the server.
            let health = health(&server.url()).await;
            assert_eq!(health["sessions"], 0, "{health}");
        }
        // Hidden states of every row equal the whole obfuscated model's blocks.
        let whole = load(&s.whole);
        let ck = Checkpoint::open(&s.split.join("client")).unwrap();
        let client = Llama::new_part(&ck.config, &ck.weights, &Device::Cpu).unwrap();
        let ids = Tensor::new(&[[5u32, 77, 140, 3]], &Device::Cpu).unwrap();
        let x = client.embed(&ids).unwrap();
        let want = whole
            .forward(Input::Embeds(&x), &mut whole.new_cache(), Forward::hidden())
            .unwrap();
        let d = x.dims()[2];
        let (st, v) = post(
            &server.url(),
            &json!({"rows": 4, "width": d, "return": "all", "close": true,
                    "embeddings": encode_f32(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap())}),
        )
        .await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["closed"], true);
        let got = decode_f32(v["hidden"].as_str().unwrap(), 4 * d, "hidden").unwrap();
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff < 1e-5, "h {h}: max |diff| {diff}");
        server.stop().await;
    }
}

/// Concurrent sessions' decode steps are batched on the server (one forward over all waiting
/// rows); every generation still equals the plaintext model's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_split_generations_are_batched_and_exact() {
    let s = setup(4, 5);
    let server = serve_server_part(&s.split, |_| {}).await;
    let client = open_client(&s, &server);
    let plain = load(&s.plain);
    let prompts: Vec<Vec<u32>> = (0..8u32)
        .map(|i| (0..(2 + i * 3)).map(|j| (i * 31 + j * 7) % 256).collect())
        .collect();
    let rt = tokio::runtime::Handle::current();
    let runs: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (c, p, rt) = (client.clone(), p.clone(), rt.clone());
            tokio::task::spawn_blocking(move || {
                let params = GenerateParams {
                    max_tokens: 24,
                    sampling: SamplingParams::greedy(),
                    stop_ids: vec![],
                };
                c.generate(&rt, &p, &params, |_| true).unwrap().0.ids
            })
        })
        .collect();
    for (p, run) in prompts.iter().zip(runs) {
        let got = run.await.unwrap();
        assert_eq!(got, generate_greedy(&plain, p, 24).unwrap(), "prompt {p:?}");
    }
    let h = health(&server.url()).await;
    assert_eq!(h["sessions"], 0, "{h}");
    // 8 generations x 23 decode steps, all through the batcher, in at most that many forwards.
    let (batches, rows) = (
        h["decode_batches"].as_u64().unwrap(),
        h["decode_rows"].as_u64().unwrap(),
    );
    assert_eq!(rows, 8 * 23, "{h}");
    assert!(batches >= 1 && batches <= rows, "{h}");
    eprintln!("decode: {rows} rows in {batches} forwards");
    server.stop().await;
}

/// `umbra proxy --split-client`: apps speak the OpenAI API to the proxy, which runs the client
/// part and sends the split server only embedding rows; the answers equal the plaintext server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_proxy_in_split_mode_answers_like_the_plaintext_server() {
    let s = setup(4, 33);
    let server = serve_server_part(&s.split, |_| {}).await;
    let mut pcfg = ServeConfig::new(ModelSource::Path(s.plain.clone()), loopback());
    pcfg.model_name = Some("tiny".into());
    let plain = start(pcfg).await.unwrap();
    let mut cfg = ProxyConfig::new(s.key.clone(), PathBuf::new(), server.url(), loopback());
    cfg.split_client = Some(s.split.join("client"));
    cfg.model_name = Some("tiny".into());
    let proxy = start_proxy(cfg).await.unwrap();
    let requests = [
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "Hello there", "max_tokens": 10, "temperature": 0}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi!"}],
                   "max_tokens": 8, "temperature": 0}),
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "abcabc", "max_tokens": 12, "temperature": 0.8,
                   "top_k": 20, "seed": 5}),
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "stop here", "max_tokens": 40, "temperature": 0,
                   "stop": ["O"]}),
        ),
    ];
    for (path, body) in &requests {
        for stream in [false, true] {
            let mut b = body.clone();
            b["stream"] = json!(stream);
            let (sa, a) = post_text(&format!("{}{path}", plain.url()), &b).await;
            let (sb, bb) = post_text(&format!("{}{path}", proxy.url()), &b).await;
            assert_eq!(
                (sa, sb),
                (200, 200),
                "{path} {b}: plain {a} / split proxy {bb}"
            );
            assert_eq!(
                answer(&a, stream),
                answer(&bb, stream),
                "{path} stream={stream}: plaintext server vs split proxy"
            );
            if b.get("stop").is_some() {
                assert_eq!(
                    answer(&a, stream).2,
                    "stop",
                    "the stop sequence is hit: {a}"
                );
            }
        }
    }
    // What split mode cannot do is refused with the reason, and leaves no session open.
    let (st, e) = post_text(
        &format!("{}/v1/completions", proxy.url()),
        &json!({"prompt": "Hi", "max_tokens": 2, "logprobs": 2}),
    )
    .await;
    assert_eq!(st, 400, "{e}");
    assert!(e.contains("split mode"), "{e}");
    let (st, e) = post_text(
        &format!("{}/v1/completions", proxy.url()),
        &json!({"prompt": "Hi", "max_tokens": 4000}),
    )
    .await;
    assert_eq!(st, 400, "{e}");
    assert!(e.contains("context_length_exceeded"), "{e}");
    let health = health(&server.url()).await;
    assert_eq!(health["sessions"], 0, "{health}");
    assert!(health["steps"].as_u64().unwrap() > 0, "{health}");
    // A proxy pointed at a server that is not a split server refuses to start.
    let mut wrong = ProxyConfig::new(s.key.clone(), PathBuf::new(), plain.url(), loopback());
    wrong.split_client = Some(s.split.join("client"));
    let e = start_proxy(wrong).await.err().expect("must refuse");
    assert!(e.to_string().contains("not a split-mode server"), "{e}");
    // The split server's own refusals reach the app with their status: full (429) ...
    let full = serve_server_part(&s.split, |c| c.max_batch = 1).await;
    let mut fcfg = ProxyConfig::new(s.key.clone(), PathBuf::new(), full.url(), loopback());
    fcfg.split_client = Some(s.split.join("client"));
    let fproxy = start_proxy(fcfg).await.unwrap();
    let d = 32 + 2 * 4;
    let (st, v) = post(
        &full.url(),
        &json!({"rows": 1, "width": d, "embeddings": encode_f32(&vec![0.1; d])}),
    )
    .await;
    assert_eq!(st, 200, "{v}"); // holds the only session
    for stream in [false, true] {
        let (st, e) = post_text(
            &format!("{}/v1/completions", fproxy.url()),
            &json!({"prompt": "Hi", "max_tokens": 3, "stream": stream}),
        )
        .await;
        assert_eq!(st, 429, "stream={stream}: {e}");
        assert!(e.contains("rate_limit_error"), "{e}");
    }
    // ... and gone (502).
    full.stop().await;
    let (st, e) = post_text(
        &format!("{}/v1/completions", fproxy.url()),
        &json!({"prompt": "Hi", "max_tokens": 3}),
    )
    .await;
    assert_eq!(st, 502, "{e}");
    fproxy.stop().await;
    proxy.stop().await;
    plain.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_and_malformed_requests_are_refused() {
    let s = setup(0, 21);
    let server = serve_server_part(&s.split, |c| {
        c.max_batch = 2; // at most 2 open sessions
        c.max_body_bytes = 64 << 10;
        c.split_idle = Duration::from_millis(300);
    })
    .await;
    let url = server.url();
    let d = 32;
    let row = encode_f32(&vec![0.1f32; d]);
    let ok = |v: &Value| json!({"rows": 1, "width": d, "embeddings": row, "session": v});
    // A session opens, steps and keeps its position.
    let (st, v) = post(&url, &ok(&Value::Null)).await;
    assert_eq!(st, 200, "{v}");
    let sid = v["session"].as_str().unwrap().to_string();
    assert!(sid.len() > 30, "session ids must be unguessable: {sid}");
    let (st, v) = post(&url, &ok(&json!(sid))).await;
    assert_eq!((st, v["position"].as_u64()), (200, Some(2)), "{v}");
    let cases: Vec<(Value, u16, &str)> = vec![
        (
            json!({"rows": 1, "width": d + 1, "embeddings": row}),
            400,
            "hidden size",
        ),
        (
            json!({"rows": 2, "width": d, "embeddings": row}),
            400,
            "bytes",
        ),
        (
            json!({"rows": 1, "width": d, "embeddings": "%%%"}),
            400,
            "base64",
        ),
        (
            json!({"rows": 1, "width": d, "embeddings": encode_f32(&[f32::NAN; 32])}),
            400,
            "non-finite",
        ),
        (
            json!({"rows": 0, "width": d, "embeddings": ""}),
            400,
            "at least 1",
        ),
        (
            json!({"rows": 1, "width": d, "embeddings": row, "session": "split-nope"}),
            404,
            "no open split session",
        ),
        (
            json!({"rows": 1, "width": d, "embeddings": row, "return": "everything"}),
            400,
            "`return`",
        ),
        (
            json!({"rows": 1, "width": d, "embeddings": row, "junk": 1}),
            400,
            "junk",
        ),
        (json!({"session": sid}), 400, "required"),
        (
            json!({"rows": 100000, "width": d, "embeddings": row}),
            400,
            "positions",
        ),
    ];
    for (body, want, needle) in cases {
        let (st, v) = post(&url, &body).await;
        let msg = v["error"]["message"].as_str().unwrap_or("").to_string();
        assert_eq!(st, want, "{body}: {v}");
        assert!(msg.contains(needle), "{body}: `{msg}` lacks `{needle}`");
    }
    // The good session is unharmed by all of that.
    let (st, v) = post(&url, &ok(&json!(sid))).await;
    assert_eq!((st, v["position"].as_u64()), (200, Some(3)), "{v}");
    // Oversized body: 413.
    let big = encode_f32(&vec![0.5f32; 40 * d * 16]);
    let (st, _) = post(&url, &json!({"rows": 640, "width": d, "embeddings": big})).await;
    assert_eq!(st, 413);
    // Session limit: a second opens, a third is 429.
    let (st, _) = post(&url, &ok(&Value::Null)).await;
    assert_eq!(st, 200);
    let (st, v) = post(&url, &ok(&Value::Null)).await;
    assert_eq!(st, 429, "{v}");
    // OpenAI routes are not served here, with a message saying why.
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .json(&json!({"prompt": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert!(r.text().await.unwrap().contains("split-mode"));
    // Idle sessions expire, with no request needed to free them; then new ones can open again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let health = health(&url).await;
    assert_eq!(health["sessions"], 0, "idle sessions still held: {health}");
    let (st, v) = post(&url, &ok(&json!(sid))).await;
    assert_eq!(st, 404, "{v}");
    let (st, v) = post(&url, &ok(&Value::Null)).await;
    assert_eq!(st, 200, "{v}");
    // Close-only request.
    let sid2 = v["session"].as_str().unwrap();
    let (st, v) = post(&url, &json!({"session": sid2, "close": true})).await;
    assert_eq!((st, &v["closed"]), (200, &json!(true)), "{v}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_are_refused_where_they_do_not_belong() {
    let s = setup(0, 21);
    // The client part is not servable.
    let cfg = ServeConfig::new(ModelSource::Path(s.split.join("client")), loopback());
    let err = match start(cfg).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("the client part must not be served"),
    };
    assert!(err.contains("client part"), "{err}");
    // A probe is refused on the server part before it is read (this file does not exist).
    let mut cfg = ServeConfig::new(ModelSource::Path(s.split.join("server")), loopback());
    cfg.halluc_probe = Some(s.split.join("no-such-probe.safetensors"));
    let err = match start(cfg).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a probe must not be served in split mode"),
    };
    assert!(err.contains("not available in split mode"), "{err}");
    // Neither part is a whole model for local generation.
    for part in ["client", "server"] {
        let ck = Checkpoint::open(&s.split.join(part)).unwrap();
        let err = Llama::new(&ck.config, &ck.weights, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("split-mode"), "{part}: {err}");
    }
    // A split client refuses a plain OpenAI server (not a split server).
    let plain = start(ServeConfig::new(
        ModelSource::Path(s.plain.clone()),
        loopback(),
    ))
    .await
    .unwrap();
    let client = SplitClient::open(
        &s.split.join("client"),
        &s.key,
        &plain.url(),
        Duration::from_secs(10),
    )
    .unwrap();
    let err = client.check_server().await.unwrap_err().to_string();
    assert!(err.contains("not a split-mode server"), "{err}");
    plain.stop().await;
    // The client part refuses a key of another model.
    let other = setup(0, 22);
    let err = SplitClient::open(
        &s.split.join("client"),
        &other.key,
        "http://127.0.0.1:1",
        Duration::from_secs(1),
    )
    .err()
    .expect("a foreign key must be refused")
    .to_string();
    assert!(err.contains("does not match"), "{err}");
}
