//! `kill -9` during `umbra obfuscate` (issue 20, item 7): the killed run leaves only its locked
//! staging sibling `.NAME.tmp-PID-N` beside `--out` (no `--out`, no key); the next run for the
//! same `--out` removes that leftover and succeeds, and a staging folder a live run holds is
//! never taken for a leftover.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use umbra_model::checkpoint::Checkpoint;
use umbra_model::testing::{random_weights, tiny_config};

/// A random model large enough that compiling it takes a moment (vocabulary 60k x 384).
fn model(dir: &Path) -> PathBuf {
    let cfg = tiny_config(384, 6, 2, 4, 60_000);
    let ck = Checkpoint {
        weights: random_weights(&cfg, 3),
        config: cfg,
        tokenizer: None,
        source: dir.into(),
    };
    let p = dir.join("plain");
    ck.save_hf(&p, false).unwrap();
    p
}

/// A tiny model whose embedding is NaN: a run on it starts (and cleans stale siblings), then
/// fails at the first tensor it writes.
fn nan_model(dir: &Path) -> PathBuf {
    let cfg = tiny_config(32, 4, 2, 2, 64);
    let mut weights = random_weights(&cfg, 1);
    let e = &weights["model.embed_tokens.weight"];
    let nan = (e.ones_like().unwrap() * f64::NAN).unwrap();
    weights.insert("model.embed_tokens.weight".into(), nan);
    let ck = Checkpoint {
        weights,
        config: cfg,
        tokenizer: None,
        source: dir.into(),
    };
    let p = dir.join("nan");
    ck.save_hf(&p, false).unwrap();
    p
}

fn obfuscate(model: &Path, out: &Path, key: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_umbra"));
    c.args(["obfuscate", "--model"])
        .arg(model)
        .arg("--out")
        .arg(out)
        .arg("--key")
        .arg(key)
        .args(["--seed", "3", "--h", "6"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Hidden siblings of `out` (`.obf.tmp-*`, `.obf.old-*`).
fn siblings(out: &Path) -> Vec<PathBuf> {
    let name = out.file_name().unwrap().to_string_lossy().into_owned();
    let mut v: Vec<PathBuf> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!(".{name}."))
        })
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// Waits until the run has started writing weights into its own staging folder (named with its
/// pid: `.NAME.tmp-PID-N`; another run's leftover may still be there).
fn wait_for_weights(child: &mut Child, out: &Path) -> PathBuf {
    let t0 = Instant::now();
    let name = out.file_name().unwrap().to_string_lossy().into_owned();
    let own = format!(".{name}.tmp-{}-", child.id());
    loop {
        if let Some(s) = siblings(out).into_iter().find(|s| {
            s.file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with(&own))
                && std::fs::metadata(s.join("model.safetensors")).is_ok_and(|m| m.len() > 1 << 20)
        }) {
            return s;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("obfuscate ended ({st}) before it could be killed");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no staging folder appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn killed_obfuscation_leaves_a_staging_folder_that_the_next_run_removes() {
    let dir = tempfile::tempdir().unwrap();
    let plain = model(dir.path());
    let out = dir.path().join("obf");
    let key = dir.path().join("obf.key");

    let mut child = obfuscate(&plain, &out, &key).spawn().unwrap();
    let staging = wait_for_weights(&mut child, &out);
    child.kill().unwrap(); // SIGKILL: no destructor runs
    child.wait().unwrap();
    assert!(staging.is_dir(), "the killed run's staging folder is left");
    assert!(
        !out.exists() && !key.exists(),
        "nothing half-written in place"
    );

    // The next run removes the dead run's leftover ...
    let mut live = obfuscate(&plain, &out, &key).spawn().unwrap();
    let live_staging = wait_for_weights(&mut live, &out);
    assert!(
        !staging.exists(),
        "the second run removed the dead run's leftover"
    );
    // ... but a third run for the same output, started while the second is writing, leaves
    // the second's (locked) staging folder alone; it fails on its own NaN weights.
    let third = obfuscate(&nan_model(dir.path()), &out, &dir.path().join("other.key"))
        .output()
        .unwrap();
    assert!(!third.status.success());
    let err = String::from_utf8_lossy(&third.stderr);
    assert!(err.contains("non-finite"), "{err}");
    assert!(
        live_staging.is_dir(),
        "a live run's staging folder was removed"
    );
    let live_ok = live.wait_with_output().unwrap();
    assert!(live_ok.status.success(), "{live_ok:?}");
    assert!(out.join("model.safetensors").is_file() && key.is_file());
    assert!(siblings(&out).is_empty(), "left: {:?}", siblings(&out));
}
