//! Server API on a tiny random model: shapes, streaming, equality with `generate`, limits,
//! hostile input, queueing and disconnects.
mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use umbra_model::checkpoint::Checkpoint;
use umbra_model::generate::generate_greedy;
use umbra_model::llama::Llama;

async fn post(url: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap())
}

fn reference(dir: &std::path::Path, prompt: &[u32], n: usize) -> Vec<u32> {
    let ck = Checkpoint::open(dir).unwrap();
    let m = Llama::new(&ck.config, &ck.weights, &candle_core::Device::Cpu).unwrap();
    generate_greedy(&m, prompt, n).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_ids_and_text_stream_and_not() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = start_tiny(tmp.path(), |_| {}).await;
    let url = format!("{}/v1/completions", srv.url());
    let prompt = vec![5u32, 17, 200, 3, 44];
    let (st, v) = post(
        &url,
        json!({"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let ids = ids_of(&v);
    assert_eq!(ids, reference(&tmp.path().join("tiny"), &prompt, 12));
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["usage"]["total_tokens"], 17);
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();

    // Streaming gives the same ids and text, chunk by chunk, ending in [DONE].
    let body = json!({"prompt": [prompt.clone()], "max_tokens": 12, "temperature": 0, "stream": true,
                      "stream_options": {"include_usage": true}});
    let (st, s) = post_text(&url, &body).await;
    assert_eq!(st, 200, "{s}");
    let (stext, sids, finish) = join_stream(&s);
    assert_eq!(sids, ids);
    assert_eq!(stext, text);
    assert_eq!(finish.as_deref(), Some("length"));
    let data = sse_data(&s);
    let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 12);

    // A text prompt is the byte-level encoding.
    let (st, v) = post(
        &url,
        json!({"prompt": "héllo", "max_tokens": 4, "temperature": 0}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let bytes: Vec<u32> = "héllo".bytes().map(u32::from).collect();
    assert_eq!(ids_of(&v), reference(&tmp.path().join("tiny"), &bytes, 4));
    assert_eq!(v["usage"]["prompt_tokens"], bytes.len());

    // Logprobs carry ids; seeds reproduce sampled output.
    let (st, v) = post(
        &url,
        json!({"prompt": prompt, "max_tokens": 3, "temperature": 0, "logprobs": 2}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["token_ids"].as_array().unwrap().len(), 3);
    assert_eq!(lp["top_logprob_ids"][0][0][0], lp["token_ids"][0]);
    assert!(lp["token_logprobs"][0].as_f64().unwrap() <= 0.0);
    let sampled =
        json!({"prompt": prompt, "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 42});
    let (_, a) = post(&url, sampled.clone()).await;
    let (_, b) = post(&url, sampled).await;
    assert_eq!(ids_of(&a), ids_of(&b));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_models_health_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = start_tiny(tmp.path(), |_| {}).await;
    let c = reqwest::Client::new();
    let v: Value = c
        .get(format!("{}/v1/models", srv.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"][0]["id"], "tiny");
    let v: Value = c
        .get(format!("{}/health", srv.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["status"], "ok");

    let url = format!("{}/v1/chat/completions", srv.url());
    let msgs =
        json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi ✓"}]);
    let (st, v) = post(
        &url,
        json!({"model": "tiny", "messages": msgs, "max_tokens": 10, "temperature": 0}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let (st, s) = post_text(
        &url,
        &json!({"messages": msgs, "max_tokens": 10, "temperature": 0, "stream": true}),
    )
    .await;
    assert_eq!(st, 200);
    let (stext, sids, _) = join_stream(&s);
    assert_eq!(stext, text);
    assert_eq!(sids, ids_of(&v));
    let first: Value = serde_json::from_str(&sse_data(&s)[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");

    let m = c
        .get(format!("{}/metrics", srv.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for k in [
        "umbra_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 2",
        "umbra_queue_depth 0",
        "umbra_tokens_per_second",
        "umbra_ttft_seconds_count 2",
        "umbra_tpot_seconds_count 2",
        "umbra_generated_tokens_total 20",
    ] {
        assert!(m.contains(k), "metrics lack `{k}`:\n{m}");
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_match_sequential_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = start_tiny(tmp.path(), |c| c.max_batch = 8).await;
    let url = format!("{}/v1/completions", srv.url());
    let prompts: Vec<Vec<u32>> = (0..10u32)
        .map(|i| (0..(3 + i % 3)).map(|j| (i * 31 + j * 7) % 256).collect())
        .collect();
    let futs = prompts.iter().map(|p| {
        let url = url.clone();
        let stream = p.len() % 2 == 0;
        let body =
            json!({"prompt": p, "max_tokens": 10 + p.len(), "temperature": 0, "stream": stream});
        async move {
            let (st, s) = post_text(&url, &body).await;
            assert_eq!(st, 200, "{s}");
            if stream {
                join_stream(&s).1
            } else {
                ids_of(&serde_json::from_str(&s).unwrap())
            }
        }
    });
    let got = futures::future::join_all(futs).await;
    for (p, g) in prompts.iter().zip(got) {
        assert_eq!(
            g,
            reference(&tmp.path().join("tiny"), p, 10 + p.len()),
            "prompt {p:?}"
        );
    }
    // Prompts of three lengths ran together: decode steps must have carried several sequences
    // (cohorts of different lengths share one forward), not one row at a time.
    let m = reqwest::get(format!("{}/metrics", srv.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let metric = |name: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing:\n{m}"))
    };
    let rows_per_step = metric("umbra_decode_rows_total") / metric("umbra_decode_steps_total");
    assert!(
        rows_per_step > 2.0,
        "only {rows_per_step:.2} rows per decode step"
    );
    srv.stop().await;
}

/// Every hostile request gets a 4xx with an OpenAI error body while a normal request runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_4xx_while_others_are_served() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = start_tiny(tmp.path(), |c| {
        c.max_body_bytes = 64 << 10;
        c.body_timeout = Duration::from_millis(800);
        c.header_timeout = Duration::from_millis(800);
        c.max_tokens_limit = 1000;
        c.step_delay = Duration::from_millis(5);
    })
    .await;
    let url = format!("{}/v1/completions", srv.url());
    let normal = tokio::spawn({
        let url = url.clone();
        async move {
            post_text(
                &url,
                &json!({"prompt": [1, 2, 3], "max_tokens": 200, "temperature": 0, "stream": true}),
            )
            .await
        }
    });
    // No connection reuse: after a 413 the server closes the connection it did not read to the
    // end, and a pooled client could race that close on its next request.
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let raw = |body: Vec<u8>| {
        let c = c.clone();
        let url = url.clone();
        async move {
            let r = c
                .post(&url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("malformed JSON", b"{\"prompt\": [1, 2".to_vec(), 400),
        ("not an object", b"[1,2,3]".to_vec(), 400),
        ("empty body", vec![], 400),
        ("invalid UTF-8", b"{\"prompt\": \"\xff\xfe\"}".to_vec(), 400),
        (
            "wrong prompt type",
            br#"{"prompt": {"a": 1}}"#.to_vec(),
            400,
        ),
        (
            "wrong max_tokens type",
            br#"{"prompt": [1], "max_tokens": "ten"}"#.to_vec(),
            400,
        ),
        (
            "negative max_tokens",
            br#"{"prompt": [1], "max_tokens": -5}"#.to_vec(),
            400,
        ),
        (
            "absurd max_tokens",
            br#"{"prompt": [1], "max_tokens": 1000000000000}"#.to_vec(),
            400,
        ),
        (
            "context overflow",
            br#"{"prompt": [1], "max_tokens": 600}"#.to_vec(),
            400,
        ),
        (
            "negative temperature",
            br#"{"prompt": [1], "temperature": -1}"#.to_vec(),
            400,
        ),
        ("bad top_p", br#"{"prompt": [1], "top_p": 7}"#.to_vec(), 400),
        ("negative token id", br#"{"prompt": [1, -3]}"#.to_vec(), 400),
        (
            "token id outside vocab",
            br#"{"prompt": [1, 99999]}"#.to_vec(),
            400,
        ),
        ("empty prompt", br#"{"prompt": []}"#.to_vec(), 400),
        ("missing prompt", br#"{"max_tokens": 3}"#.to_vec(), 400),
        ("n = 3", br#"{"prompt": [1], "n": 3}"#.to_vec(), 400),
        ("bad stop", br#"{"prompt": [1], "stop": 5}"#.to_vec(), 400),
        (
            "unknown model",
            br#"{"model": "gpt-9", "prompt": [1]}"#.to_vec(),
            404,
        ),
        (
            "huge prompt",
            serde_json::to_vec(&json!({"prompt": vec![1u32; 600]})).unwrap(),
            400,
        ),
        (
            "body too large",
            serde_json::to_vec(&json!({"prompt": "a".repeat(100 << 10)})).unwrap(),
            413,
        ),
    ];
    for (what, body, want) in cases {
        let (st, text) = raw(body).await;
        assert_eq!(st, want, "{what}: {text}");
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: not JSON: {text}"));
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no error.message: {text}"));
        assert!(!msg.is_empty(), "{what}");
    }
    let (st, text) = {
        let r = c
            .post(format!("{}/v1/chat/completions", srv.url()))
            .json(&json!({"messages": "hi"}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    assert_eq!(st, 400, "{text}");
    let r = c
        .get(format!("{}/v2/nothing", srv.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);

    // Slow-loris on the body: headers promise 100 bytes, 10 arrive, then nothing.
    let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"prompt\":").await.unwrap();
    let mut resp = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut resp))
        .await
        .expect("server must answer a stalled body")
        .unwrap();
    let head = String::from_utf8_lossy(&resp[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(head.contains("timed out"), "{head}");
    // Slow-loris on the headers: the connection is closed.
    let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut resp))
        .await
        .expect("stalled headers must be cut off");
    assert!(matches!(r, Ok(_) | Err(_)));

    let (st, s) = normal.await.unwrap();
    assert_eq!(st, 200);
    let (_, ids, finish) = join_stream(&s);
    assert_eq!(ids.len(), 200);
    assert_eq!(finish.as_deref(), Some("length"));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_gets_429_and_disconnect_frees_the_slot() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = start_tiny(tmp.path(), |c| {
        c.max_batch = 1;
        c.max_queue = 1;
        c.step_delay = Duration::from_millis(5);
    })
    .await;
    let url = format!("{}/v1/completions", srv.url());
    let c = reqwest::Client::new();
    // A long streamed request holds the only slot; read one chunk, then hang up.
    let mut long = c
        .post(&url)
        .json(&json!({"prompt": [1, 2], "max_tokens": 500, "temperature": 0, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(long.status().as_u16(), 200);
    long.chunk().await.unwrap().unwrap();
    // Fill the queue; with one slot busy and one queued, more get 429.
    let futs: Vec<_> = (0..6)
        .map(|_| {
            let c = c.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let r = c
                    .post(&url)
                    .json(&json!({"prompt": [3], "max_tokens": 5, "temperature": 0}))
                    .send()
                    .await
                    .unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(long);
    let mut codes = vec![];
    for f in futs {
        let (st, body) = f.await.unwrap();
        if st == 429 {
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["error"]["type"], "rate_limit_error", "{body}");
        } else {
            assert_eq!(st, 200, "{body}");
        }
        codes.push(st);
    }
    assert!(codes.contains(&429), "{codes:?}");
    assert!(codes.contains(&200), "{codes:?}");
    // The abandoned sequence was cancelled (not run to 500 tokens).
    let m = c
        .get(format!("{}/metrics", srv.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("umbra_cancelled_total 1"), "{m}");
    let gen: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("umbra_generated_tokens_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(gen < 500, "{m}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streaming_client_that_hangs_up_is_cancelled() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = start_tiny(tmp.path(), |c| {
        c.max_batch = 1;
        c.step_delay = Duration::from_millis(5);
    })
    .await;
    let body = serde_json::to_vec(&json!({"prompt": [1, 2], "max_tokens": 400, "temperature": 0}))
        .unwrap();
    let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(s);
    // The slot is free again long before 400 tokens x 5 ms.
    let t = std::time::Instant::now();
    let (st, v) = post(
        &format!("{}/v1/completions", srv.url()),
        json!({"prompt": [3], "max_tokens": 2}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "waited {:?}",
        t.elapsed()
    );
    let m = reqwest::get(format!("{}/metrics", srv.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("umbra_cancelled_total 1"), "{m}");
    srv.stop().await;
}
