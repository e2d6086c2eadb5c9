//! GGUF export: an exact-mode obfuscation written as GGUF (llama.cpp's tensor names, q/k rows in
//! llama.cpp's rotary order, hidden `d + 2h` and the explicit head_dim in the metadata) and read
//! back through `CheckpointSource` gives the tau-permuted plaintext logits. The same check with an
//! unmodified llama.cpp on the real SmolLM2 is `umbra bench llamacpp` (llama-cpp-python is not
//! installed by the test command).
use candle_core::{Device, Tensor};
use umbra_aloepri::compiler::{compile_to, OutputFormat};
use umbra_aloepri::gguf_out::GgufQuant;
use umbra_aloepri::source::CheckpointSource;
use umbra_aloepri::{ClientKey, ObfuscationParams};
use umbra_model::llama::Llama;
use umbra_model::testing::{random_weights, tiny_config};
use umbra_model::{Forward, Input, LlamaConfig};

fn logits(m: &Llama, ids: &[u32]) -> Vec<Vec<f32>> {
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.forward(Input::Ids(&x), &mut m.new_cache(), Forward::logits())
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// Compiles `cfg`'s random model to GGUF F32 at expansion `h`, reads it back, and returns
/// (max |obf[tau v] - plain[v]| / max |plain|, hidden size written in the GGUF).
fn round_trip(cfg: &LlamaConfig, h: usize) -> (f32, usize) {
    let w = random_weights(cfg, 3);
    let plain = Llama::new(cfg, &w, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("obf.gguf");
    let key_path = dir.path().join("obf.key");
    let src = CheckpointSource::from_weights(cfg.clone(), w, None).unwrap();
    compile_to(
        src,
        &out,
        &key_path,
        &ObfuscationParams::exact(h),
        11,
        OutputFormat::Gguf(GgufQuant::F32),
        &mut |_, _, _| {},
    )
    .unwrap();
    let key = ClientKey::load(&key_path).unwrap();
    let back = CheckpointSource::open(&out).unwrap();
    umbra_aloepri::compiler::check_key(&back.config, &key).unwrap();
    let hidden = back.config.hidden_size;
    let obf = back.load_model(&Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..12)
        .map(|i| (i * 7 + 3) % cfg.vocab_size as u32)
        .collect();
    let obf_ids: Vec<u32> = ids.iter().map(|&i| key.tau[i as usize]).collect();
    let (p, o) = (logits(&plain, &ids), logits(&obf, &obf_ids));
    let (mut diff, mut max) = (0f32, 0f32);
    for (p, o) in p.iter().zip(&o) {
        for (v, a) in p.iter().enumerate() {
            diff = diff.max((a - o[key.tau[v] as usize]).abs());
            max = max.max(a.abs());
        }
    }
    // Nothing else was left in the folder: no staging sibling, no temporary file.
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["obf.gguf", "obf.key"]);
    (diff / max, hidden)
}

#[test]
fn obfuscated_gguf_reads_back_to_the_permuted_plaintext_logits() {
    let mut qwen = tiny_config(32, 4, 2, 2, 97);
    qwen.model_type = "qwen2".into();
    for (name, cfg) in [
        ("llama gqa", tiny_config(48, 6, 2, 2, 97)),
        ("qwen2 biases", qwen),
    ] {
        for h in [0, 8] {
            let (rel, hidden) = round_trip(&cfg, h);
            assert_eq!(hidden, cfg.hidden_size + 2 * h, "{name} h {h}");
            assert!(rel < 1e-4, "{name} h {h}: relative logit error {rel}");
        }
    }
}
