//! Text tokenizers (HF `tokenizers`) with special tokens, streaming decode and chat templates.
//!
//! Sources:
//! * an HF folder: `tokenizer.json` (required) plus `tokenizer_config.json` (chat template,
//!   bos/eos/pad/unk tokens) and, if present, `chat_template.jinja`;
//! * GGUF metadata (`tokenizer.ggml.*`): a `gpt2` byte-level BPE is rebuilt as an HF tokenizer
//!   whose pre-tokenizer matches `tokenizer.ggml.pre`, and can be saved as `tokenizer.json`.
//!
//! Chat templates are rendered with minijinja following the HF conventions (`messages`,
//! `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`, `tojson`, Python string
//! methods, `trim_blocks` + `lstrip_blocks`).
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

mod chat_ids;

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A compiled HF chat template (Jinja source kept for saving).
#[derive(Clone)]
pub struct ChatTemplate {
    source: String,
    env: minijinja::Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish()
    }
}

const TEMPLATE_NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`; a syntax error gives [`ModelError::ChatTemplate`].
    pub fn new(source: impl Into<String>) -> Result<Self> {
        let source = source.into();
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| ModelError::ChatTemplate(format!("cannot compile: {e:#}")))?;
        Ok(Self { source, env })
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` the way `transformers`' `apply_chat_template(tokenize=False)` does.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        })
        .map_err(|e| ModelError::ChatTemplate(format!("{e:#}")))
    }
}

/// HF's `tojson`: Python `json.dumps(x, ensure_ascii=False, indent=indent)` formatting
/// (`", "` and `": "` separators when not indented; no HTML escaping).
fn tojson(
    value: minijinja::Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<minijinja::Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| {
        minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("tojson: {e}"),
        )
    })?;
    let mut out = String::new();
    py_json(&json, indent, sort_keys.unwrap_or(false), 0, &mut out);
    Ok(minijinja::Value::from_safe_string(out))
}

fn py_json(
    v: &serde_json::Value,
    indent: Option<usize>,
    sort: bool,
    level: usize,
    out: &mut String,
) {
    use serde_json::Value as J;
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                py_json(x, indent, sort, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        J::Object(m) if !m.is_empty() => {
            out.push('{');
            let mut entries: Vec<_> = m.iter().collect();
            if sort {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            for (i, (k, x)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(": ");
                py_json(x, indent, sort, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
        other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
    }
}

/// HF's `strftime_now(fmt)`, UTC, supporting `%d %m %Y %y %b %B %H %M %S %j %%`.
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(fmt.as_str(), secs)
}

fn strftime(fmt: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('H') => out.push_str(&format!("{:02}", tod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", tod % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", tod % 60)),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// A tokenizer plus the special-token and chat-template information HF keeps beside it.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// The chat template, if the checkpoint has one.
    pub chat_template: Option<ChatTemplate>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    unk_token: Option<String>,
    add_bos_token: bool,
    add_eos_token: bool,
    /// The original `tokenizer_config.json` keys, written back on save.
    config_extra: serde_json::Map<String, serde_json::Value>,
    /// `inner` with special tokens encoded as text (built on first use, for chat content).
    literal: std::sync::OnceLock<Tokenizer>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

/// A `tokenizer_config.json` special token: `"<s>"` or `{"content": "<s>", ...}`.
fn special_token_str(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// Wraps a bare `tokenizers::Tokenizer` (no chat template, no named special tokens).
    pub fn from_tokenizer(inner: Tokenizer) -> Self {
        Self {
            inner,
            chat_template: None,
            bos_token: None,
            eos_token: None,
            pad_token: None,
            unk_token: None,
            add_bos_token: false,
            add_eos_token: false,
            config_extra: Default::default(),
            literal: Default::default(),
        }
    }

    /// Loads `dir/tokenizer.json` (required) and `dir/tokenizer_config.json` (optional; chat
    /// template and bos/eos/pad/unk tokens). `dir/chat_template.jinja` overrides the template.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.is_file() {
            return Err(ModelError::Tokenizer(format!(
                "{}: file not found (tokenizer.json is required)",
                tj.display()
            )));
        }
        let inner = Tokenizer::from_file(&tj)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", tj.display())))?;
        let mut me = Self::from_tokenizer(inner);
        let tc = dir.join("tokenizer_config.json");
        if tc.is_file() {
            let text = std::fs::read_to_string(&tc).map_err(|e| ModelError::io(&tc, e))?;
            let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                ModelError::Tokenizer(format!("{}: invalid JSON: {e}", tc.display()))
            })?;
            let obj = cfg.as_object().cloned().ok_or_else(|| {
                ModelError::Tokenizer(format!("{}: not a JSON object", tc.display()))
            })?;
            me.bos_token = special_token_str(obj.get("bos_token"));
            me.eos_token = special_token_str(obj.get("eos_token"));
            me.pad_token = special_token_str(obj.get("pad_token"));
            me.unk_token = special_token_str(obj.get("unk_token"));
            me.add_bos_token = obj
                .get("add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            me.add_eos_token = obj
                .get("add_eos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            me.chat_template = match obj.get("chat_template") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s)) => Some(ChatTemplate::new(s.clone())?),
                Some(serde_json::Value::Array(list)) => {
                    // [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
                    let pick = list
                        .iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                        .or_else(|| list.first());
                    match pick
                        .and_then(|t| t.get("template"))
                        .and_then(|t| t.as_str())
                    {
                        Some(s) => Some(ChatTemplate::new(s)?),
                        None => None,
                    }
                }
                Some(_) => {
                    return Err(ModelError::ChatTemplate(format!(
                        "{}: chat_template is not a string",
                        tc.display()
                    )))
                }
            };
            me.config_extra = obj;
        }
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let s = std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?;
            me.chat_template = Some(ChatTemplate::new(s)?);
        }
        for t in [&me.bos_token, &me.eos_token].into_iter().flatten() {
            if me.inner.token_to_id(t).is_none() {
                return Err(ModelError::Tokenizer(format!(
                    "{}: special token `{t}` is not in the vocabulary",
                    tc.display()
                )));
            }
        }
        Ok(me)
    }

    /// Rebuilds the tokenizer stored in GGUF metadata (`tokenizer.ggml.model` = `gpt2`).
    ///
    /// Vocabulary = `tokenizer.ggml.tokens` (id = index), merges = `tokenizer.ggml.merges`
    /// (`"a b"`), tokens with `token_type` 3 (control) become special added tokens and 4
    /// (user-defined) plain added tokens; the pre-tokenizer follows `tokenizer.ggml.pre`
    /// (`smollm`/`starcoder`: individual digits + GPT-2 byte-level; `gpt2`/`default`: GPT-2
    /// byte-level; `llama-bpe`/`llama3`/`smaug-bpe`; `qwen2`). The chat template comes from
    /// `tokenizer.chat_template`.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let model = g.meta_string("tokenizer.ggml.model").ok_or_else(|| {
            ModelError::Tokenizer(format!(
                "{}: no `tokenizer.ggml.model` metadata",
                g.path.display()
            ))
        })?;
        if model != "gpt2" {
            return Err(ModelError::Tokenizer(format!(
                "{}: unsupported GGUF tokenizer model `{model}` (only `gpt2` byte-level BPE is supported)",
                g.path.display()
            )));
        }
        let tokens = g
            .meta_strings("tokenizer.ggml.tokens")?
            .ok_or_else(|| ModelError::Tokenizer("GGUF has no `tokenizer.ggml.tokens`".into()))?;
        let merges = g
            .meta_strings("tokenizer.ggml.merges")?
            .ok_or_else(|| ModelError::Tokenizer("GGUF has no `tokenizer.ggml.merges`".into()))?;
        let types = g
            .meta_ints("tokenizer.ggml.token_type")?
            .unwrap_or_default();
        if !types.is_empty() && types.len() != tokens.len() {
            return Err(ModelError::Tokenizer(format!(
                "{} token types for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| ModelError::Tokenizer(format!("invalid merge `{m}`")))
            })
            .collect::<Result<Vec<_>>>()?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let tok_of = |key: &str| -> Result<Option<String>> {
            Ok(g.meta_usize(key)?.and_then(|i| tokens.get(i).cloned()))
        };
        let unk = match tok_of("tokenizer.ggml.unknown_token_id")? {
            Some(u) => Some(u),
            None => tok_of("tokenizer.ggml.unk_token_id")?,
        };
        let mut builder = BPE::builder().vocab_and_merges(vocab, merges);
        if let Some(u) = &unk {
            builder = builder.unk_token(u.clone());
        }
        let bpe = builder.build().map_err(tok_err)?;
        let mut inner = Tokenizer::new(bpe);
        let pre = g.meta_string("tokenizer.ggml.pre").unwrap_or("default");
        inner.with_pre_tokenizer(Some(pre_tokenizer_for(pre)?));
        if pre == "qwen2" {
            inner.with_normalizer(Some(tokenizers::normalizers::unicode::NFC));
        }
        inner.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));

        let bos_token = tok_of("tokenizer.ggml.bos_token_id")?;
        let eos_token = tok_of("tokenizer.ggml.eos_token_id")?;
        let pad_token = tok_of("tokenizer.ggml.padding_token_id")?;
        let add_bos = g.meta_bool("tokenizer.ggml.add_bos_token").unwrap_or(false);
        let add_eos = g.meta_bool("tokenizer.ggml.add_eos_token").unwrap_or(false);
        let post: PostProcessorWrapper = if add_bos || add_eos {
            let mut single = vec![];
            let mut specials = vec![];
            let mut push =
                |t: &Option<String>, key: &str, single: &mut Vec<String>| -> Result<()> {
                    let t = t.clone().ok_or_else(|| {
                        ModelError::Tokenizer(format!("{key} requested but not set"))
                    })?;
                    let id = tokens.iter().position(|x| *x == t).unwrap_or(0) as u32;
                    single.push(t.clone());
                    specials.push((t, id));
                    Ok(())
                };
            if add_bos {
                push(&bos_token, "add_bos_token", &mut single)?;
            }
            single.push("$A".into());
            if add_eos {
                push(&eos_token, "add_eos_token", &mut single)?;
            }
            let pair: Vec<String> = single
                .iter()
                .cloned()
                .chain(single.iter().map(|s| {
                    if s == "$A" {
                        "$B:1".to_string()
                    } else {
                        format!("{s}:1")
                    }
                }))
                .collect();
            TemplateProcessing::builder()
                .try_single(single)
                .map_err(tok_err)?
                .try_pair(pair)
                .map_err(tok_err)?
                .special_tokens(specials)
                .build()
                .map_err(tok_err)?
                .into()
        } else {
            ByteLevel::new(true, false, true).into()
        };
        inner.with_post_processor(Some(post));

        let mut added = vec![];
        for (i, ty) in types.iter().enumerate() {
            match ty {
                3 => added.push(AddedToken::from(tokens[i].clone(), true)),
                4 => added.push(AddedToken::from(tokens[i].clone(), false).normalized(false)),
                _ => {}
            }
        }
        // Named special tokens are special even if their token_type says otherwise.
        for t in [&bos_token, &eos_token, &pad_token, &unk]
            .into_iter()
            .flatten()
        {
            if !added.iter().any(|a| a.content == *t) {
                added.push(AddedToken::from(t.clone(), true));
            }
        }
        let (special, plain): (Vec<_>, Vec<_>) = added.into_iter().partition(|a| a.special);
        inner.add_special_tokens(&special);
        inner.add_tokens(&plain);

        let chat_template = g
            .meta_string("tokenizer.chat_template")
            .map(ChatTemplate::new)
            .transpose()?;
        Ok(Self {
            inner,
            chat_template,
            bos_token,
            eos_token,
            pad_token,
            unk_token: unk,
            add_bos_token: add_bos,
            add_eos_token: add_eos,
            config_extra: Default::default(),
            literal: Default::default(),
        })
    }

    /// The wrapped HF tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes `text`; `add_special` adds the post-processor's tokens (e.g. BOS). Special tokens
    /// written in the text (`<|im_start|>`) are always matched as single ids.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, add_special)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// Decodes ids; `skip_special` drops special tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Overrides the named bos/eos tokens (they must be in the vocabulary).
    pub fn set_bos_eos(&mut self, bos: Option<&str>, eos: Option<&str>) -> Result<()> {
        for t in [bos, eos].into_iter().flatten() {
            if self.token_to_id(t).is_none() {
                return Err(ModelError::Tokenizer(format!(
                    "`{t}` is not in the vocabulary"
                )));
            }
        }
        self.bos_token = bos.map(str::to_string);
        self.eos_token = eos.map(str::to_string);
        Ok(())
    }

    /// Added tokens as `(id, content, special)`, sorted by id.
    pub fn added_tokens(&self) -> Vec<(u32, String, bool)> {
        let mut v: Vec<_> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| (id, t.content, t.special))
            .collect();
        v.sort();
        v
    }

    /// Ids of the special added tokens (`<|im_start|>`, `<|endoftext|>`, ...), sorted.
    pub fn special_token_ids(&self) -> Vec<u32> {
        self.added_tokens()
            .into_iter()
            .filter(|t| t.2)
            .map(|t| t.0)
            .collect()
    }

    /// Renders `messages` with the chat template ([`ModelError::ChatTemplate`] when there is none).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let t = self.chat_template.as_ref().ok_or_else(|| {
            ModelError::ChatTemplate("this tokenizer has no chat template".into())
        })?;
        t.render(
            messages,
            add_generation_prompt,
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
        )
    }

    /// A streaming decoder for generated ids.
    pub fn incremental_decoder(&self, skip_special: bool) -> IncrementalDecoder {
        IncrementalDecoder {
            ids: vec![],
            prefix_offset: 0,
            read_offset: 0,
            skip_special,
        }
    }

    /// `tokenizer.json` text (pretty).
    pub fn to_tokenizer_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(tok_err)
    }

    /// `tokenizer_config.json` content: the original keys (if loaded from HF) updated with the
    /// chat template, bos/eos/pad/unk tokens and `add_bos_token`/`add_eos_token`.
    pub fn tokenizer_config_json(&self) -> serde_json::Value {
        let mut m = self.config_extra.clone();
        m.entry("tokenizer_class")
            .or_insert_with(|| "PreTrainedTokenizerFast".into());
        m.entry("clean_up_tokenization_spaces")
            .or_insert(false.into());
        let opt = |t: &Option<String>| {
            t.clone()
                .map(serde_json::Value::from)
                .unwrap_or(serde_json::Value::Null)
        };
        m.insert("bos_token".into(), opt(&self.bos_token));
        m.insert("eos_token".into(), opt(&self.eos_token));
        m.insert("pad_token".into(), opt(&self.pad_token));
        m.insert("unk_token".into(), opt(&self.unk_token));
        m.insert("add_bos_token".into(), self.add_bos_token.into());
        m.insert("add_eos_token".into(), self.add_eos_token.into());
        match &self.chat_template {
            Some(t) => m.insert("chat_template".into(), t.source().into()),
            None => m.remove("chat_template"),
        };
        serde_json::Value::Object(m)
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir` (each file atomically).
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        crate::weights::write_file_atomic(
            &dir.join("tokenizer.json"),
            self.to_tokenizer_json()?.as_bytes(),
        )?;
        let cfg = serde_json::to_string_pretty(&self.tokenizer_config_json()).map_err(tok_err)?;
        crate::weights::write_file_atomic(&dir.join("tokenizer_config.json"), cfg.as_bytes())
    }
}

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The HF pre-tokenizer equivalent to llama.cpp's `tokenizer.ggml.pre` type.
fn pre_tokenizer_for(pre: &str) -> Result<PreTokenizerWrapper> {
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        Ok(Split::new(
            SplitPattern::Regex(re.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(tok_err)?
        .into())
    };
    Ok(match pre {
        // SmolLM2's tokenizer.json: Sequence[Digits(individual), ByteLevel(false, true, true)];
        // llama.cpp: regexes `\p{N}` then GPT-2's.
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into()
        }
        "gpt2" | "gpt-2" | "default" => ByteLevel::new(false, true, true).into(),
        "llama-bpe" | "llama3" | "smaug-bpe" => {
            Sequence::new(vec![split(LLAMA3_REGEX)?, ByteLevel::new(false, true, false).into()]).into()
        }
        "qwen2" => Sequence::new(vec![split(QWEN2_REGEX)?, ByteLevel::new(false, false, false).into()]).into(),
        other => {
            return Err(ModelError::Tokenizer(format!(
                "unsupported GGUF pre-tokenizer `{other}` (supported: smollm, starcoder, gpt2, default, llama-bpe, qwen2)"
            )))
        }
    })
}

/// Turns a stream of generated ids into text pieces, emitting only complete UTF-8 text: a token
/// that ends in the middle of a multi-byte character is held back until the character completes.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special: bool,
}

impl IncrementalDecoder {
    /// Adds one id; returns the newly completed text (possibly empty).
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            if let Some(new) = full.strip_prefix(prefix.as_str()) {
                let new = new.to_string();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                return Ok(new);
            }
        }
        Ok(String::new())
    }

    /// Returns whatever is still held back (incomplete characters decode as U+FFFD).
    pub fn flush(&mut self, tok: &TextTokenizer) -> Result<String> {
        let prefix = tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full
            .strip_prefix(prefix.as_str())
            .map(str::to_string)
            .unwrap_or_default())
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

#[cfg(test)]
mod tests;
