//! Stock transformers loads an obfuscated SmolLM2 checkpoint (issue 18, item 5): `h` 64 is rounded
//! to 72 so that the hidden size `576 + 2h` is a multiple of the 9 heads (transformers 5.x refuses
//! 704), and the obfuscated model run by transformers, with tau-permuted ids in and logits mapped
//! back, agrees with the plaintext model run by transformers (`scripts/transformers_check.py`).
//!
//! Ignored: the test command does not install torch. Run it with a python that has torch and
//! transformers:
//! `UMBRA_TRANSFORMERS_PYTHON=/path/to/venv/bin/python cargo test --release -p umbra-aloepri
//!  --test transformers_check -- --ignored --nocapture`
use std::path::Path;
use umbra_aloepri::compiler::{compile_to, OutputFormat};
use umbra_aloepri::params::round_h_for_heads;
use umbra_aloepri::source::CheckpointSource;
use umbra_aloepri::ObfuscationParams;

#[test]
#[ignore = "needs torch and transformers (UMBRA_TRANSFORMERS_PYTHON)"]
fn transformers_runs_the_obfuscated_smollm2_like_the_plaintext_one() {
    let python = std::env::var("UMBRA_TRANSFORMERS_PYTHON").unwrap_or_else(|_| "python3".into());
    let plain = umbra_assets::Cache::from_env()
        .and_then(|c| c.require_smollm2_hf())
        .unwrap_or_else(|e| panic!("{e}"));
    let src = CheckpointSource::open(&plain).unwrap();
    let (d, heads) = (src.config.hidden_size, src.config.num_attention_heads);
    let h = round_h_for_heads(64, d, heads).unwrap();
    assert_eq!((d + 2 * h) % heads, 0);
    let dir = tempfile::tempdir().unwrap();
    let (out, key) = (dir.path().join("obf"), dir.path().join("obf.key"));
    compile_to(
        src,
        &out,
        &key,
        &ObfuscationParams::exact(h),
        5,
        OutputFormat::Hf,
        &mut |_, _, _| {},
    )
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/transformers_check.py");
    let run = std::process::Command::new(&python)
        .arg(&script)
        .arg(&plain)
        .arg(&out)
        .arg(&key)
        .output()
        .unwrap_or_else(|e| panic!("running {python}: {e}"));
    let stdout = String::from_utf8_lossy(&run.stdout);
    println!("{stdout}");
    assert!(
        run.status.success(),
        "transformers check failed (h {h}): {stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
            .lines()
            .rev()
            .take(8)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        stdout.contains(&format!("hidden_size {}", d + 2 * h)),
        "{stdout}"
    );
}
