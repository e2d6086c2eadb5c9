//! Unit tests of [`super`]: chat templates, strftime, tokenizer folders and their errors.
use super::*;

const SMOL_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[test]
fn chat_template_renders_like_hf() {
    let t = ChatTemplate::new(SMOL_TEMPLATE).unwrap();
    let s = t
        .render(&[ChatMessage::user("Hi there")], true, "", "")
        .unwrap();
    assert_eq!(
        s,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    );
    let s = t
        .render(
            &[ChatMessage::system("S"), ChatMessage::user("U")],
            false,
            "",
            "",
        )
        .unwrap();
    assert_eq!(
        s,
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
    );
}

#[test]
fn chat_template_helpers_trim_blocks_strip_tojson_raise() {
    // trim_blocks/lstrip_blocks: the newline after a block tag and the indentation before it vanish.
    let t = ChatTemplate::new(
        "{{ bos_token }}\n{% for m in messages %}\n  {% if m.role == 'user' %}\n[U]{{ m.content.strip() }}{{ eos_token }}\n  {% endif %}\n{% endfor %}",
    )
    .unwrap();
    let s = t
        .render(&[ChatMessage::user("  hi  ")], false, "<s>", "</s>")
        .unwrap();
    assert_eq!(s, "<s>\n[U]hi</s>\n");
    let t = ChatTemplate::new(
        "{{ {'a': [1, 'x<y'], 'b': none} | tojson }}|{{ [1] | tojson(indent=2) }}",
    )
    .unwrap();
    assert_eq!(
        t.render(&[], false, "", "").unwrap(),
        "{\"a\": [1, \"x<y\"], \"b\": null}|[\n  1\n]"
    );
    let t = ChatTemplate::new(
        "{% if messages|length == 0 %}{{ raise_exception('need a message') }}{% endif %}",
    )
    .unwrap();
    let e = t.render(&[], false, "", "").unwrap_err();
    assert!(
        matches!(e, ModelError::ChatTemplate(_)) && e.to_string().contains("need a message"),
        "{e}"
    );
    assert!(matches!(
        ChatTemplate::new("{% for %}"),
        Err(ModelError::ChatTemplate(_))
    ));
}

#[test]
fn strftime_formats_known_dates() {
    // 2024-02-29 13:05:09 UTC = 1709211909
    assert_eq!(
        strftime("%d %b %Y %H:%M:%S %j %B %%", 1_709_211_909),
        "29 Feb 2024 13:05:09 060 February %"
    );
    assert_eq!(strftime("%Y-%m-%d", 0), "1970-01-01");
}

#[test]
fn missing_tokenizer_json_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), "{}").unwrap();
    let e = TextTokenizer::from_hf_dir(dir.path()).unwrap_err();
    assert!(matches!(e, ModelError::Tokenizer(_)), "{e:?}");
    assert!(e.to_string().contains("tokenizer.json"), "{e}");
}

#[test]
fn unsupported_pre_tokenizer_is_an_error() {
    assert!(matches!(
        pre_tokenizer_for("falcon"),
        Err(ModelError::Tokenizer(_))
    ));
    for p in ["smollm", "gpt2", "default", "llama-bpe", "qwen2"] {
        pre_tokenizer_for(p).unwrap();
    }
}

fn write_wordlevel_folder(dir: &Path, tokenizer_config: &serde_json::Value) {
    let tj = serde_json::json!({"version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"<s>": 0, "</s>": 1, "hi": 2, "<unk>": 3}, "unk_token": "<unk>"}});
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        tokenizer_config.to_string(),
    )
    .unwrap();
}

#[test]
fn hf_folder_tokenizer_config_forms_and_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let tc = serde_json::json!({
        "bos_token": {"content": "<s>", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false},
        "eos_token": "</s>",
        "custom_key": 5,
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}{{ eos_token }}"}]});
    write_wordlevel_folder(dir.path(), &tc);
    let t = TextTokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!((t.bos_id(), t.eos_id()), (Some(0), Some(1)));
    assert_eq!(t.special_token_ids(), vec![0, 1]);
    assert_eq!(
        t.apply_chat_template(&[ChatMessage::user("hi")], true)
            .unwrap(),
        "<s>hi</s>"
    );
    assert_eq!(t.encode("<s>hi</s>", false).unwrap(), vec![0, 2, 1]);
    assert_eq!(t.decode(&[0, 2, 1], true).unwrap(), "hi");
    let out = t.tokenizer_config_json();
    assert_eq!(out["custom_key"], 5);
    assert_eq!(out["bos_token"], "<s>");
    assert_eq!(out["chat_template"], tc["chat_template"][1]["template"]);
    // Saved and reloaded: same behaviour.
    let dir2 = tempfile::tempdir().unwrap();
    t.save_hf(dir2.path()).unwrap();
    let t2 = TextTokenizer::from_hf_dir(dir2.path()).unwrap();
    assert_eq!(
        t2.apply_chat_template(&[ChatMessage::user("hi")], false)
            .unwrap(),
        "<s>hi</s>"
    );
    // chat_template.jinja overrides the config's template.
    std::fs::write(
        dir2.path().join("chat_template.jinja"),
        "J{{ messages[0].content }}",
    )
    .unwrap();
    let t3 = TextTokenizer::from_hf_dir(dir2.path()).unwrap();
    assert_eq!(
        t3.apply_chat_template(&[ChatMessage::user("hi")], false)
            .unwrap(),
        "Jhi"
    );
    // A named special token that the vocabulary lacks is an error; no template is an error too.
    write_wordlevel_folder(dir.path(), &serde_json::json!({"eos_token": "<|eot|>"}));
    assert!(matches!(
        TextTokenizer::from_hf_dir(dir.path()),
        Err(ModelError::Tokenizer(_))
    ));
    write_wordlevel_folder(dir.path(), &serde_json::json!({}));
    let t4 = TextTokenizer::from_hf_dir(dir.path()).unwrap();
    assert!(matches!(
        t4.apply_chat_template(&[], true),
        Err(ModelError::ChatTemplate(_))
    ));
}
