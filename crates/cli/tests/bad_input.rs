//! Bad input through the real binary: each case gives one `error:` line, a non-zero exit, and
//! leaves no partial output behind.
use std::path::{Path, PathBuf};
use std::process::Command;
use umbra_model::checkpoint::Checkpoint;
use umbra_model::testing::{random_weights, tiny_config};

fn umbra(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_umbra"))
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn tiny_model(dir: &Path) -> PathBuf {
    let cfg = tiny_config(32, 4, 2, 2, 64);
    let ck = Checkpoint {
        weights: random_weights(&cfg, 1),
        config: cfg,
        tokenizer: None,
        source: dir.into(),
    };
    let p = dir.join("tiny");
    ck.save_hf(&p, false).unwrap();
    p
}

/// Asserts failure with exactly one `error:` line mentioning `needle`.
fn assert_fails(args: &[&str], needle: &str) {
    let (ok, _, err) = umbra(args);
    assert!(!ok, "{args:?} should fail");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{args:?}: stderr was {err}");
    assert!(
        lines[0].to_lowercase().contains(&needle.to_lowercase()),
        "{args:?}: `{}` lacks `{needle}`",
        lines[0]
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// `umbra generate` on an obfuscated model with a key file.
fn generate_with_key<'a>(model: &'a Path, key: &'a Path) -> [&'a str; 7] {
    let (m, k) = (model.to_str().unwrap(), key.to_str().unwrap());
    ["generate", "--model", m, "--key", k, "--prompt", "x"]
}

fn obfuscate(model: &Path, out: &Path, key: &Path, seed: &str) -> (bool, String, String) {
    umbra(&[
        "obfuscate",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--exact",
        "--h",
        "4",
        "--seed",
        seed,
    ])
}

#[test]
fn truncated_safetensors_is_refused_without_output() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_model(dir.path());
    let st = m.join("model.safetensors");
    let len = std::fs::metadata(&st).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&st).unwrap();
    f.set_len(len / 2).unwrap();
    let out = dir.path().join("obf");
    let key = dir.path().join("k.key");
    let args = [
        "obfuscate",
        "--model",
        m.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--exact",
    ];
    assert_fails(&args, "model.safetensors");
    assert!(!out.exists() && !key.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "only the input folder may remain: {leftovers:?}"
    );
}

#[test]
fn config_that_does_not_match_weights_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_model(dir.path());
    let cfg_path = m.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("\"intermediate_size\": 64", "\"intermediate_size\": 80");
    std::fs::write(&cfg_path, text).unwrap();
    let out = dir.path().join("obf");
    let (ok, _, err) = obfuscate(&m, &out, &dir.path().join("k"), "1");
    assert!(
        !ok && err.contains("error:") && err.to_lowercase().contains("mlp"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn unsupported_architecture_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_model(dir.path());
    let cfg_path = m.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("\"model_type\": \"llama\"", "\"model_type\": \"gpt2\"");
    std::fs::write(&cfg_path, text).unwrap();
    assert_fails(
        &["generate", "--model", m.to_str().unwrap(), "--prompt", "hi"],
        "unsupported architecture",
    );
}

#[test]
fn missing_tokenizer_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_model(dir.path());
    assert_fails(
        &["generate", "--model", m.to_str().unwrap(), "--prompt", "hi"],
        "tokenizer",
    );
}

#[test]
fn wrong_and_tampered_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_model(dir.path());
    let (a, ka) = (dir.path().join("a"), dir.path().join("a.key"));
    let (b, kb) = (dir.path().join("b"), dir.path().join("b.key"));
    assert!(obfuscate(&m, &a, &ka, "1").0);
    assert!(obfuscate(&m, &b, &kb, "2").0);
    // Existing outputs are never overwritten.
    let (ok, _, err) = obfuscate(&m, &a, &dir.path().join("c.key"), "3");
    assert!(!ok && err.contains("already exists"), "{err}");
    assert_fails(&generate_with_key(&a, &kb), "does not match");
    // An obfuscated model without its key.
    assert_fails(
        &["generate", "--model", a.to_str().unwrap(), "--prompt", "x"],
        "--key",
    );
    // Tamper with tau.
    let text = std::fs::read_to_string(&ka).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let tau = v["tau"].as_array_mut().unwrap();
    tau.swap(5, 6);
    std::fs::write(&ka, serde_json::to_string(&v).unwrap()).unwrap();
    assert_fails(&generate_with_key(&a, &ka), "modified");
    std::fs::write(&ka, b"garbage").unwrap();
    assert_fails(&generate_with_key(&a, &ka), "key file");
}

#[test]
fn bad_parameters_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_model(dir.path());
    let out = dir.path().join("o");
    let args = [
        "obfuscate",
        "--model",
        m.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--key",
        "/tmp/nope.key",
        "--h",
        "3",
    ];
    assert_fails(&args, "h must be even");
    assert!(!out.exists());
    assert_fails(
        &[
            "generate",
            "--model",
            "/definitely/not/here",
            "--prompt",
            "x",
        ],
        "no such",
    );
}

/// Split mode: approximate keys are refused before anything is written, the parts are not
/// whole models for `generate`, and a client part without a tokenizer is refused before any
/// request is sent.
#[test]
fn split_mode_misuse_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_model(dir.path());
    let (ms, out, key) = (
        m.to_str().unwrap(),
        dir.path().join("split"),
        dir.path().join("s.key"),
    );
    let (outs, keys) = (out.to_str().unwrap(), key.to_str().unwrap());
    let split = |extra: &[&'static str]| {
        let mut v = vec![
            "obfuscate",
            "--model",
            ms,
            "--out",
            outs,
            "--key",
            keys,
            "--split",
        ];
        v.extend_from_slice(extra);
        v
    };
    assert_fails(&split(&["--paper"]), "exact key");
    assert!(!out.exists() && !key.exists());
    let (ok, _, err) = umbra(&split(&["--seed", "2"]));
    assert!(ok, "{err}");
    for part in ["client", "server"] {
        let p = out.join(part);
        assert_fails(&generate_with_key(&p, &key), &format!("{part} part"));
    }
    let client = out.join("client");
    assert_fails(
        &[
            "generate",
            "--model",
            client.to_str().unwrap(),
            "--key",
            keys,
            "--server",
            "http://127.0.0.1:1",
            "--prompt",
            "x",
        ],
        // no tokenizer in this tiny model: refused before any request
        "tokenizer",
    );
    // No staging folders are left next to the output.
    let hidden: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
}
