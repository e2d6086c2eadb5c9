//! Proxy -> server -> obfuscated (exact) model equals the plaintext server, and the server never
//! sees a plaintext prompt.
mod common;

use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use umbra_aloepri::compiler::compile_checkpoint;
use umbra_aloepri::ObfuscationParams;
use umbra_serve::proxy::{start_proxy, ProxyConfig, ProxyHandle};
use umbra_serve::server::{start, ModelSource, ServeConfig, ServerHandle};

type Bodies = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

struct Stack {
    plain: ServerHandle,
    obf: ServerHandle,
    proxy: ProxyHandle,
    bodies: Bodies,
}

async fn stack(plain_dir: &Path, work: &Path, h: usize, name: &str) -> Stack {
    let (obf_dir, key) = (work.join("obf"), work.join("client.key"));
    let (p, o, k) = (plain_dir.to_path_buf(), obf_dir.clone(), key.clone());
    tokio::task::spawn_blocking(move || {
        compile_checkpoint(
            &p,
            &o,
            &k,
            &ObfuscationParams::exact(h),
            11,
            &mut |_, _, _| {},
        )
        .unwrap()
    })
    .await
    .unwrap();
    let mut cfg = ServeConfig::new(ModelSource::Path(plain_dir.into()), loopback());
    cfg.model_name = Some(name.into());
    let plain = start(cfg).await.unwrap();
    let bodies: Bodies = Arc::default();
    let mut cfg = ServeConfig::new(ModelSource::Path(obf_dir), loopback());
    cfg.model_name = Some(name.into());
    let rec = bodies.clone();
    cfg.body_hook = Some(Arc::new(move |path: &str, b: &[u8]| {
        rec.lock().unwrap().push((path.to_string(), b.to_vec()))
    }));
    let obf = start(cfg).await.unwrap();
    let mut pcfg = ProxyConfig::new(key, plain_dir.into(), obf.url(), loopback());
    pcfg.model_name = Some(name.into());
    let proxy = start_proxy(pcfg).await.unwrap();
    Stack {
        plain,
        obf,
        proxy,
        bodies,
    }
}

/// Sends each request to the plaintext server and through the proxy; both must agree.
async fn compare(st: &Stack, requests: &[(&str, Value)]) {
    for (path, body) in requests {
        for stream in [false, true] {
            let mut b = body.clone();
            b["stream"] = json!(stream);
            let (sa, a) = post_text(&format!("{}{path}", st.plain.url()), &b).await;
            let (sb, bb) = post_text(&format!("{}{path}", st.proxy.url()), &b).await;
            assert_eq!((sa, sb), (200, 200), "{path} {b}: plain {a} / proxy {bb}");
            let (x, y) = (answer(&a, stream), answer(&bb, stream));
            assert_eq!(x, y, "{path} stream={stream}: plaintext server vs proxy");
            assert!(!x.0.is_empty() || x.1.is_empty());
        }
    }
}

/// No recorded prompt contains 3 consecutive plaintext prompt ids (and never the full prompt).
fn assert_never_saw(bodies: &Bodies, plain_prompts: &[Vec<u32>]) {
    let bodies = bodies.lock().unwrap();
    assert!(!bodies.is_empty());
    for (path, b) in bodies.iter() {
        assert_eq!(
            path, "/v1/completions",
            "the proxy only sends id completions"
        );
        let v: Value = serde_json::from_slice(b).unwrap();
        let got: Vec<u32> = v["prompt"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        for p in plain_prompts {
            assert_ne!(&got, p);
            for w in p.windows(3) {
                assert!(
                    !got.windows(3).any(|g| g == w),
                    "plaintext id run {w:?} reached the server"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_proxy_matches_plain_server_and_hides_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let plain_dir = tiny_model_dir(tmp.path());
    let st = stack(&plain_dir, tmp.path(), 8, "tiny").await;
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "Grüße, wörld ✓"}], "max_tokens": 20, "temperature": 0});
    let comp =
        json!({"model": "tiny", "prompt": "héllo wörld, 東京", "max_tokens": 20, "temperature": 0});
    let ids =
        json!({"model": "tiny", "prompt": [10, 20, 30, 40], "max_tokens": 8, "temperature": 0});
    compare(
        &st,
        &[
            ("/v1/chat/completions", chat.clone()),
            ("/v1/completions", comp.clone()),
            ("/v1/completions", ids),
        ],
    )
    .await;

    // Stop sequences apply on plaintext at the proxy, like the plain server does.
    let (_, a) = post_text(&format!("{}/v1/completions", st.plain.url()), &comp).await;
    let full = answer(&a, false).0;
    let stop: String = full.chars().skip(3).take(2).collect();
    if !stop.trim().is_empty() {
        let mut b = comp.clone();
        b["stop"] = json!([stop]);
        compare(&st, &[("/v1/completions", b)]).await;
    }

    // Usage, logprob ids mapped back, errors relayed.
    let mut b = comp.clone();
    b["logprobs"] = json!(2);
    let (_, a) = post_text(&format!("{}/v1/completions", st.plain.url()), &b).await;
    let (_, p) = post_text(&format!("{}/v1/completions", st.proxy.url()), &b).await;
    let (a, p): (Value, Value) = (
        serde_json::from_str(&a).unwrap(),
        serde_json::from_str(&p).unwrap(),
    );
    assert_eq!(a["usage"], p["usage"]);
    assert_eq!(
        a["choices"][0]["logprobs"]["token_ids"],
        p["choices"][0]["logprobs"]["token_ids"]
    );
    let ta = a["choices"][0]["logprobs"]["top_logprob_ids"][0][1][0].clone();
    assert_eq!(ta, p["choices"][0]["logprobs"]["top_logprob_ids"][0][1][0]);
    let (s, e) = post_text(
        &format!("{}/v1/completions", st.proxy.url()),
        &json!({"model": "nope", "prompt": "x"}),
    )
    .await;
    assert_eq!(s, 404, "{e}");
    assert!(e.contains("does not exist"), "{e}");
    let (s, e) = post_text(
        &format!("{}/v1/completions", st.proxy.url()),
        &json!({"prompt": "x", "max_tokens": 100000}),
    )
    .await;
    assert_eq!(s, 400, "{e}");
    let (s, e) = post_text(
        &format!("{}/v1/completions", st.proxy.url()),
        &json!({"prompt": 5}),
    )
    .await;
    assert_eq!(s, 400, "{e}");

    // What the server saw: permuted ids only.
    let tok = umbra_model::tokenizer::TextTokenizer::from_hf_dir(&plain_dir).unwrap();
    let msgs = [umbra_model::tokenizer::ChatMessage::user("Grüße, wörld ✓")];
    let chat_ids = tok
        .encode(&tok.apply_chat_template(&msgs, true).unwrap(), false)
        .unwrap();
    let comp_ids = tok.encode("héllo wörld, 東京", true).unwrap();
    assert_never_saw(&st.bodies, &[chat_ids, comp_ids, vec![10, 20, 30, 40]]);
    for (_, b) in st.bodies.lock().unwrap().iter() {
        let s = String::from_utf8_lossy(b);
        assert!(
            !s.contains("Grüße") && !s.contains("wörld") && !s.contains("héllo"),
            "{s}"
        );
    }

    // An upstream that accepts but never answers is a clear 504 after the timeout.
    let hang = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let hang_url = format!("http://{}", hang.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut socks = vec![];
        while let Ok((s, _)) = hang.accept().await {
            socks.push(s);
        }
    });
    let mut cfg = ProxyConfig::new(
        tmp.path().join("client.key"),
        plain_dir.clone(),
        hang_url,
        loopback(),
    );
    cfg.upstream_timeout = std::time::Duration::from_millis(500);
    let slow = start_proxy(cfg).await.unwrap();
    let (s, e) = post_text(&format!("{}/v1/completions", slow.url()), &comp).await;
    assert_eq!(s, 504, "{e}");
    assert!(e.contains("did not answer within"), "{e}");
    slow.stop().await;
    held.abort();

    // A dead upstream is a clear 502.
    let url = st.proxy.url();
    st.obf.stop().await;
    let (s, e) = post_text(&format!("{url}/v1/completions"), &comp).await;
    assert_eq!(s, 502, "{e}");
    let v: Value = serde_json::from_str(&e).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{e}"
    );
    st.proxy.stop().await;
    st.plain.stop().await;
}

fn python_client(base: &str, model: &str) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_client.py");
    let check = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output();
    match check {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "the `openai` Python package is missing: run `python3 -m pip install openai` ({})",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => {
            panic!("python3 is not runnable ({e}); install Python 3 and `pip install openai`")
        }
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

/// The acceptance test on the real SmolLM2-135M-Instruct, exact-mode obfuscation, including the
/// official `openai` Python client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_exact_through_proxy_equals_plain() {
    let plain_dir = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let st = stack(&plain_dir, tmp.path(), 128, "smollm2").await;
    let chat = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Name three fruits. Écris en français aussi ✓"}],
                      "max_tokens": 32, "temperature": 0});
    let comp = json!({"model": "smollm2", "prompt": "The capital of Japan is Tōkyō, which", "max_tokens": 32, "temperature": 0});
    compare(
        &st,
        &[("/v1/chat/completions", chat), ("/v1/completions", comp)],
    )
    .await;

    let (pb, pp) = (st.plain.url(), st.proxy.url());
    let (a, b) = tokio::task::spawn_blocking(move || {
        (python_client(&pb, "smollm2"), python_client(&pp, "smollm2"))
    })
    .await
    .unwrap();
    eprintln!("openai client via the plain server: {a}\nvia the proxy: {b}");
    for k in [
        "chat",
        "chat_stream",
        "completion",
        "completion_stream",
        "chat_usage",
        "completion_usage",
    ] {
        assert_eq!(a[k], b[k], "{k}: plain {a} vs proxy {b}");
    }
    assert!(!a["chat"].as_str().unwrap().is_empty());
    assert_eq!(a["chat"], a["chat_stream"]);
    assert_eq!(b["completion"], b["completion_stream"]);
    assert_eq!(b["error"][0], 404, "{b}");
    assert_eq!(b["models"][0], "smollm2");

    let tok = umbra_model::tokenizer::TextTokenizer::from_hf_dir(&plain_dir).unwrap();
    let p1 = tok
        .encode("The capital of Japan is Tōkyō, which", true)
        .unwrap();
    let p2 = tok.encode("The three primary colors are", true).unwrap();
    assert_never_saw(&st.bodies, &[p1, p2]);
    st.proxy.stop().await;
    st.obf.stop().await;
    st.plain.stop().await;
}
