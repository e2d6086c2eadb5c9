//! Split mode on the real SmolLM2-135M through the binary: `obfuscate --split`, `serve` on the
//! server part, `generate --server` with the client part gives the plaintext model's greedy
//! text; and `attack split` measures what that server can read (the block key falls, and with it
//! every prompt token: this test pins that leak, so a change that alters it is noticed). An app
//! speaking the OpenAI API to `umbra proxy --split-client` gets the same text.
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

fn smollm2() -> PathBuf {
    umbra_assets::Cache::from_env()
        .and_then(|c| c.require_smollm2_hf())
        .unwrap_or_else(|e| panic!("{e}"))
}

fn umbra(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_umbra"))
        .args(args)
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "umbra {args:?} failed: {err}");
    err
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// Kills the server when the test ends, pass or fail.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `umbra <args> --port 0` and returns it with the URL it prints once listening.
fn start_listening(args: &[&str]) -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_umbra"))
        .args(args)
        .args(["--port", "0"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let server = Server(child);
    let mut lines = BufReader::new(stderr).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("umbra serve ended before listening")
            .unwrap();
        if let Some(u) = line.split("listening on ").nth(1) {
            break u.split([',', ' ']).next().unwrap_or_default().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (server, url)
}

#[test]
fn split_mode_generates_the_plaintext_text_and_its_server_reads_the_prompts() {
    let plain = smollm2();
    let plain_s = plain.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let split = tmp.path().join("split");
    let key = tmp.path().join("client.key");
    let (split_s, key_s) = (split.to_str().unwrap(), key.to_str().unwrap());
    umbra(&[
        "obfuscate",
        "--model",
        plain_s,
        "--out",
        split_s,
        "--key",
        key_s,
        "--split",
        "--seed",
        "3",
    ]);
    assert!(split.join("server/model.safetensors").is_file());
    assert!(split.join("client/tokenizer.json").is_file());
    assert!(!split.join("server/tokenizer.json").exists());
    let server_dir = split.join("server");
    let (_server, url) = start_listening(&["serve", "--model", server_dir.to_str().unwrap()]);
    let mut plain_texts = vec![];
    for (i, prompt) in ["What is the capital of France?", "Name three colours."]
        .iter()
        .enumerate()
    {
        let (a, b) = (
            tmp.path().join(format!("split-{i}.json")),
            tmp.path().join(format!("plain-{i}.json")),
        );
        let client = split.join("client");
        let generate = |model: &[&str], out: &Path| {
            let mut args = vec!["generate"];
            args.extend_from_slice(model);
            let out = out.to_str().unwrap();
            args.extend([
                "--prompt",
                prompt,
                "--chat",
                "--max-tokens",
                "24",
                "--json",
                out,
            ]);
            umbra(&args);
        };
        let client_s = client.to_str().unwrap();
        generate(&["--model", client_s, "--key", key_s, "--server", &url], &a);
        generate(&["--model", plain_s], &b);
        let (a, b) = (json(&a), json(&b));
        assert_eq!(a["text"], b["text"], "{prompt}");
        plain_texts.push(b["text"].as_str().unwrap().to_string());
        assert_eq!(a["completion_tokens"], b["completion_tokens"]);
        assert!(a["completion_tokens"].as_u64().unwrap() > 0);
        assert_eq!(
            a["split"]["round_trips"].as_u64(),
            a["completion_tokens"].as_u64().map(|n| n.min(23) + 1),
            "one round trip per token: {a}"
        );
    }
    // The OpenAI API in front of split mode: the proxy runs the client part.
    let client = split.join("client");
    let (_proxy, proxy_url) = start_listening(&[
        "proxy",
        "--split-client",
        client.to_str().unwrap(),
        "--key",
        key_s,
        "--upstream",
        &url,
    ]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let v: serde_json::Value = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("{proxy_url}/v1/chat/completions"))
            .json(&serde_json::json!({
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 24, "temperature": 0
            }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert_eq!(
        v["choices"][0]["message"]["content"].as_str(),
        Some(plain_texts[0].as_str()),
        "split proxy vs plaintext generate: {v}"
    );
    let out = tmp.path().join("attack.json");
    umbra(&[
        "attack",
        "split",
        "--plain",
        plain_s,
        "--split",
        split_s,
        "--key",
        key_s,
        "--victims",
        "8",
        "--max-len",
        "64",
        "--json",
        out.to_str().unwrap(),
    ]);
    let r = &json(&out)["split"];
    assert!(r["spectral_mismatch"].as_f64().unwrap() < 1e-6, "{r}");
    assert!(r["token_ttrsr"].as_f64().unwrap() > 0.99, "{r}");
    assert!(r["victim_tokens"].as_f64().unwrap() > 100.0, "{r}");
}
