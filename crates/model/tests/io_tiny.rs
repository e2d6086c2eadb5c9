//! Checkpoint I/O on a tiny Llama GGUF that the test writes itself (F32 tensors, q/k permuted the
//! way llama.cpp's converter does, llama metadata, a tiny gpt2 BPE tokenizer), plus error paths.
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use umbra_model::checkpoint::{convert_gguf_to_hf, convert_to_hf, expected_shapes, Checkpoint};
use umbra_model::gguf::{gguf_name, permute_rows};
use umbra_model::tokenizer::{ChatMessage, TextTokenizer};
use umbra_model::{LlamaConfig, ModelError, Weights};

const HIDDEN: usize = 16;
const HEADS: usize = 4;
const KV: usize = 2;
const FFN: usize = 24;
const LAYERS: usize = 2;
const TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

use umbra_model::testing::gpt2_byte_chars as byte_chars;

/// Tokens: 3 specials (type 3), 256 byte tokens, then the merge results.
fn tiny_vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    let mut types = vec![3; 3];
    for c in byte_chars() {
        tokens.push(c.to_string());
        types.push(1);
    }
    let merges: Vec<String> = ["t h", "th e", "Ġ the"].map(String::from).to_vec();
    for m in &merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    (tokens, types, merges)
}

fn vocab_size() -> usize {
    tiny_vocab().0.len()
}

/// Deterministic, distinct values for each tensor.
fn hf_weights(cfg: &LlamaConfig) -> Weights {
    let mut w = Weights::new();
    for (k, (name, shape)) in expected_shapes(cfg).into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|i| ((i * 7 + k * 13) as f32 * 0.37).sin())
            .collect();
        w.insert(name, Tensor::from_vec(data, shape, &Device::Cpu).unwrap());
    }
    w
}

fn tiny_config() -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "vocab_size": vocab_size(), "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "max_position_embeddings": 64, "tie_word_embeddings": true,
    }))
    .unwrap()
}

/// Writes a GGUF the way llama.cpp's converter would for the HF `weights`.
fn write_tiny_gguf(path: &Path, weights: &Weights, arch: &str, tok_model: &str) {
    let (tokens, types, merges) = tiny_vocab();
    let s = |x: &str| Value::String(x.to_string());
    let strs = |v: &[String]| Value::Array(v.iter().map(|x| Value::String(x.clone())).collect());
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s(arch)),
        (
            format!("{arch}.embedding_length"),
            Value::U32(HIDDEN as u32),
        ),
        (format!("{arch}.block_count"), Value::U32(LAYERS as u32)),
        (
            format!("{arch}.feed_forward_length"),
            Value::U32(FFN as u32),
        ),
        (
            format!("{arch}.attention.head_count"),
            Value::U32(HEADS as u32),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            Value::U32(KV as u32),
        ),
        (format!("{arch}.rope.freq_base"), Value::F32(100000.0)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
        (format!("{arch}.context_length"), Value::U32(64)),
        ("tokenizer.ggml.model".into(), s(tok_model)),
        ("tokenizer.ggml.pre".into(), s("smollm")),
        ("tokenizer.ggml.tokens".into(), strs(&tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.iter().map(|t| Value::I32(*t)).collect()),
        ),
        ("tokenizer.ggml.merges".into(), strs(&merges)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(2)),
        ("tokenizer.chat_template".into(), s(TEMPLATE)),
    ];
    let mut qt = vec![];
    for (name, t) in weights {
        let llama = arch == "llama";
        let t = if llama && name.ends_with("q_proj.weight") {
            permute_rows(t, HEADS).unwrap()
        } else if llama && name.ends_with("k_proj.weight") {
            permute_rows(t, KV).unwrap()
        } else {
            t.clone()
        };
        qt.push((
            gguf_name(name).unwrap(),
            QTensor::quantize(&t, GgmlDType::F32).unwrap(),
        ));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qt.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &t_refs).unwrap();
}

fn assert_weights_eq(a: &Weights, b: &Weights) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, t) in a {
        assert_eq!(t.dims(), b[k].dims(), "{k}");
        let x: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = b[k].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(x, y, "tensor {k} differs");
    }
}

/// Names in `dir` (to check that no temp folder is left behind).
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    gguf: PathBuf,
    weights: Weights,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let weights = hf_weights(&tiny_config());
    let gguf = root.join("tiny.gguf");
    write_tiny_gguf(&gguf, &weights, "llama", "gpt2");
    Fixture {
        _dir: dir,
        root,
        gguf,
        weights,
    }
}

fn check_tokenizer(t: &TextTokenizer) {
    let id = |s: &str| t.token_to_id(s).unwrap();
    // Digits are split one by one, the space before them stands alone (SmolLM2 pre-tokenizer).
    assert_eq!(
        t.encode("the the 12", false).unwrap(),
        vec![id("the"), id("Ġthe"), id("Ġ"), id("1"), id("2")]
    );
    assert_eq!(
        t.encode("<|im_start|>the<|im_end|>", false).unwrap(),
        vec![1, id("the"), 2]
    );
    assert_eq!(t.special_token_ids(), vec![0, 1, 2]);
    assert_eq!((t.bos_id(), t.eos_id()), (Some(1), Some(2)));
    for s in ["the 12 thé 😀", "a\n\n  b", "x<|im_end|>"] {
        assert_eq!(t.decode(&t.encode(s, false).unwrap(), false).unwrap(), s);
    }
    assert_eq!(t.decode(&[1, id("the"), 2], true).unwrap(), "the");
    let chat = t
        .apply_chat_template(&[ChatMessage::user("hi")], true)
        .unwrap();
    assert_eq!(
        chat,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn tiny_gguf_opens_to_the_hf_originals() {
    let fx = fixture();
    let ck = Checkpoint::open(&fx.gguf).unwrap();
    let c = &ck.config;
    assert_eq!(
        (
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_kv_heads()
        ),
        (HIDDEN, LAYERS, HEADS, KV)
    );
    assert_eq!(
        (c.intermediate_size, c.vocab_size, c.max_position_embeddings),
        (FFN, vocab_size(), 64)
    );
    assert_eq!(c.rope_theta, 100000.0);
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-9);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.head_dim, None);
    assert_eq!(c.eos_token_ids(), vec![2]);
    // q/k come back un-permuted: bit-identical to what we started from.
    assert_weights_eq(&fx.weights, &ck.weights);
    check_tokenizer(ck.tokenizer.as_ref().unwrap());
    let (cfg2, tok2) = Checkpoint::open_config_and_tokenizer(&fx.gguf).unwrap();
    assert_eq!(&cfg2, c);
    assert!(tok2.is_some());
}

#[test]
fn tiny_gguf_converts_to_hf_folder_and_reopens_equal() {
    let fx = fixture();
    let out = fx.root.join("hf");
    let ck = convert_gguf_to_hf(&fx.gguf, &out, false).unwrap();
    assert_eq!(
        entries(&fx.root),
        vec!["hf", "tiny.gguf"],
        "no temp folder left behind"
    );
    assert_eq!(
        entries(&out),
        vec![
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    let back = Checkpoint::open(&out).unwrap();
    assert_weights_eq(&fx.weights, &back.weights);
    let mut want = ck.config.clone();
    want.extra.insert("torch_dtype".into(), "float32".into());
    assert_eq!(back.config, want);
    check_tokenizer(back.tokenizer.as_ref().unwrap());
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["chat_template"], TEMPLATE);
    assert_eq!(
        (tc["bos_token"].as_str(), tc["eos_token"].as_str()),
        (Some("<|im_start|>"), Some("<|im_end|>"))
    );
    let gc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("generation_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (gc["bos_token_id"].as_u64(), gc["eos_token_id"].as_u64()),
        (Some(1), Some(2))
    );
    // The written tokenizer.json is a plain HF tokenizer.
    let hf = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let ids = hf.encode("the the 12", false).unwrap().get_ids().to_vec();
    assert_eq!(
        ids,
        back.tokenizer
            .as_ref()
            .unwrap()
            .encode("the the 12", false)
            .unwrap()
    );

    // Refuses to overwrite a non-empty folder unless asked; overwrite replaces it atomically.
    let e = back.save_hf(&out, false).unwrap_err();
    assert!(matches!(e, ModelError::Input(_)), "{e:?}");
    std::fs::write(out.join("stale.txt"), "x").unwrap();
    back.save_hf(&out, true).unwrap();
    assert!(!out.join("stale.txt").exists());
    assert_eq!(entries(&fx.root), vec!["hf", "tiny.gguf"]);
    // An empty existing folder is fine without overwrite.
    let empty = fx.root.join("empty");
    std::fs::create_dir(&empty).unwrap();
    back.save_hf(&empty, false).unwrap();
    assert!(empty.join("model.safetensors").is_file());
}

#[test]
fn incremental_decoder_holds_back_partial_utf8() {
    let fx = fixture();
    let t =
        TextTokenizer::from_gguf(&umbra_model::gguf::GgufFile::open(&fx.gguf).unwrap()).unwrap();
    let text = "the 😀é!";
    let ids = t.encode(text, false).unwrap();
    let mut dec = t.incremental_decoder(false);
    let mut pieces = vec![];
    for &id in &ids {
        pieces.push(dec.push(&t, id).unwrap());
    }
    pieces.push(dec.flush(&t).unwrap());
    assert_eq!(pieces.concat(), text);
    // The emoji is 4 byte tokens: three pushes yield nothing, the fourth the whole character.
    let emoji_at = pieces.iter().position(|p| p.contains('😀')).unwrap();
    assert_eq!(pieces[emoji_at], "😀");
    assert!(
        pieces[emoji_at - 3..emoji_at].iter().all(|p| p.is_empty()),
        "{pieces:?}"
    );
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')));
}

// ---------- error paths: right variant, and no output folder (nor temp folder) left behind ----------

fn assert_no_output(root: &Path, out: &Path, before: &[String]) {
    assert!(!out.exists(), "{} must not exist", out.display());
    assert_eq!(entries(root), before, "no temp folder left behind");
}

/// Converts the tiny GGUF into `root/hf` and returns that folder.
fn hf_folder(fx: &Fixture) -> PathBuf {
    let hf = fx.root.join("hf");
    convert_gguf_to_hf(&fx.gguf, &hf, false).unwrap();
    hf
}

#[test]
fn truncated_safetensors_is_malformed_and_writes_nothing() {
    let fx = fixture();
    let hf = hf_folder(&fx);
    let st = hf.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 100]).unwrap();
    let out = fx.root.join("out");
    let before = entries(&fx.root);
    match convert_to_hf(&hf, &out, false) {
        Err(ModelError::Malformed { path, msg }) => assert_eq!(path, st, "{msg}"),
        other => panic!("expected Malformed, got {other:?}"),
    }
    assert_no_output(&fx.root, &out, &before);
}

#[test]
fn truncated_gguf_is_a_truncation_error_and_writes_nothing() {
    let fx = fixture();
    let bytes = std::fs::read(&fx.gguf).unwrap();
    let out = fx.root.join("out");
    for cut in [3, 40, bytes.len() / 3, bytes.len() - 64] {
        std::fs::write(&fx.gguf, &bytes[..cut]).unwrap();
        let before = entries(&fx.root);
        let e = convert_gguf_to_hf(&fx.gguf, &out, false).unwrap_err();
        assert!(
            matches!(e, ModelError::Truncated { len, .. } if len == cut as u64),
            "cut {cut}: {e:?}"
        );
        assert!(e.to_string().contains("tiny.gguf"), "{e}");
        assert_no_output(&fx.root, &out, &before);
    }
}

#[test]
fn config_weight_mismatch_names_tensor_and_shapes() {
    let fx = fixture();
    let hf = hf_folder(&fx);
    let p = hf.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["intermediate_size"] = (FFN * 2).into();
    std::fs::write(&p, cfg.to_string()).unwrap();
    let out = fx.root.join("out");
    let before = entries(&fx.root);
    let e = convert_to_hf(&hf, &out, false).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ModelError::Mismatch(_)), "{e:?}");
    assert!(
        msg.contains("model.layers.0.mlp.gate_proj.weight")
            && msg.contains("[24, 16]")
            && msg.contains("[48, 16]"),
        "{msg}"
    );
    assert_no_output(&fx.root, &out, &before);
}

#[test]
fn missing_tokenizer_json_is_a_tokenizer_error() {
    let fx = fixture();
    let hf = hf_folder(&fx);
    std::fs::remove_file(hf.join("tokenizer.json")).unwrap();
    let out = fx.root.join("out");
    let before = entries(&fx.root);
    let e = convert_to_hf(&hf, &out, false).unwrap_err();
    assert!(
        matches!(e, ModelError::Tokenizer(_)) && e.to_string().contains("tokenizer.json"),
        "{e:?}"
    );
    assert_no_output(&fx.root, &out, &before);
    // Without any tokenizer file the folder is a weights-only checkpoint.
    std::fs::remove_file(hf.join("tokenizer_config.json")).unwrap();
    assert!(Checkpoint::open(&hf).unwrap().tokenizer.is_none());
}

#[test]
fn unsupported_architectures_are_rejected() {
    let fx = fixture();
    let hf = hf_folder(&fx);
    let p = hf.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["model_type"] = "gpt2".into();
    std::fs::write(&p, cfg.to_string()).unwrap();
    let out = fx.root.join("out");
    let before = entries(&fx.root);
    let e = convert_to_hf(&hf, &out, false).unwrap_err();
    assert!(
        matches!(e, ModelError::UnsupportedArch(ref a) if a == "gpt2"),
        "{e:?}"
    );
    assert_no_output(&fx.root, &out, &before);

    let g = fx.root.join("falcon.gguf");
    write_tiny_gguf(&g, &fx.weights, "falcon", "gpt2");
    let before = entries(&fx.root);
    let e = convert_gguf_to_hf(&g, &out, false).unwrap_err();
    assert!(matches!(e, ModelError::UnsupportedArch(_)), "{e:?}");
    assert_no_output(&fx.root, &out, &before);
}

#[test]
fn unsupported_gguf_tokenizer_model_is_a_clear_error() {
    let fx = fixture();
    let g = fx.root.join("spm.gguf");
    write_tiny_gguf(&g, &fx.weights, "llama", "llama");
    let e = Checkpoint::open(&g).unwrap_err();
    assert!(
        matches!(e, ModelError::Tokenizer(_))
            && e.to_string()
                .contains("unsupported GGUF tokenizer model `llama`"),
        "{e}"
    );
}

#[test]
fn missing_tensor_is_reported_and_failed_save_cleans_up() {
    let fx = fixture();
    // In the source folder.
    let hf = hf_folder(&fx);
    let mut w = umbra_model::weights::load_safetensors_dir(&hf).unwrap();
    w.remove("model.layers.1.self_attn.v_proj.weight");
    umbra_model::weights::save_safetensors_atomic(&w, &hf.join("model.safetensors")).unwrap();
    let out = fx.root.join("out");
    let before = entries(&fx.root);
    let e = convert_to_hf(&hf, &out, false).unwrap_err();
    assert!(
        matches!(e, ModelError::MissingTensor(ref n) if n == "model.layers.1.self_attn.v_proj.weight"),
        "{e:?}"
    );
    assert_no_output(&fx.root, &out, &before);

    // In memory, after open: save_hf fails mid-way (config.json already staged) and removes its
    // staging folder.
    let mut ck = Checkpoint::open(&fx.gguf).unwrap();
    ck.weights.remove("model.norm.weight");
    let e = ck.save_hf(&out, false).unwrap_err();
    assert!(
        matches!(e, ModelError::MissingTensor(ref n) if n == "model.norm.weight"),
        "{e:?}"
    );
    assert_no_output(&fx.root, &out, &before);
    // An unexpected extra tensor is a mismatch.
    let mut ck = Checkpoint::open(&fx.gguf).unwrap();
    ck.weights.insert(
        "model.layers.9.mlp.up_proj.weight".into(),
        Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(matches!(
        ck.save_hf(&out, false),
        Err(ModelError::Mismatch(_))
    ));
    assert_no_output(&fx.root, &out, &before);
}

#[test]
fn tiny_qwen2_gguf_keeps_biases_and_row_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config();
    cfg.model_type = "qwen2".into();
    cfg.architectures = vec!["Qwen2ForCausalLM".into()];
    let weights = hf_weights(&cfg);
    assert!(weights.contains_key("model.layers.1.self_attn.k_proj.bias"));
    let g = dir.path().join("qwen.gguf");
    write_tiny_gguf(&g, &weights, "qwen2", "gpt2");
    let ck = Checkpoint::open(&g).unwrap();
    assert_eq!(ck.config.model_type, "qwen2");
    assert!(ck.config.qkv_bias());
    // qwen2 GGUFs use NEOX RoPE: no permutation to undo.
    assert_weights_eq(&weights, &ck.weights);
}
