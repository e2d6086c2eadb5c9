//! The encoder's own tokenizer (`tokenizer.json`: WordPiece for both MiniLM and MPNet) with
//! padding off and truncation to `max_len` tokens (including the start and end tokens), checked
//! against the encoder it is used with.
use crate::data::Example;
use crate::encoder::EncoderConfig;
use crate::error::{Result, SapError};
use std::path::Path;

/// A tokenizer that belongs to a given encoder.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub max_len: usize,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and checks that it matches `config`: the same vocabulary size
    /// and, where the config names one, the same padding id. `max_len` is capped by the
    /// encoder's position table.
    pub fn load(dir: &Path, max_len: usize, config: &EncoderConfig) -> Result<Self> {
        let p = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&p)
            .map_err(|e| SapError::Tokenizer(format!("{}: {e}", p.display())))?;
        Self::new(inner, max_len, config)
            .map_err(|e| SapError::Tokenizer(format!("{}: {e}", p.display())))
    }

    fn new(
        mut inner: tokenizers::Tokenizer,
        max_len: usize,
        config: &EncoderConfig,
    ) -> Result<Self> {
        let vocab = inner.get_vocab_size(true);
        if vocab != config.vocab_size {
            return Err(SapError::Tokenizer(format!(
                "has {vocab} tokens but the encoder ({}) has a vocabulary of {}: the tokenizer \
                 does not belong to this encoder",
                config.model_type, config.vocab_size
            )));
        }
        if let (Some(pad), Some(tp)) = (config.pad_token_id, inner.get_padding().map(|p| p.pad_id))
        {
            if pad != tp {
                return Err(SapError::Tokenizer(format!(
                    "pads with id {tp} but the encoder's pad_token_id is {pad}: the tokenizer \
                     does not belong to this encoder"
                )));
            }
        }
        if max_len < 2 {
            return Err(SapError::Config(format!(
                "--max-len {max_len}: needs at least 2"
            )));
        }
        let max_len = max_len.min(config.max_tokens());
        inner.with_padding(None);
        inner
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| SapError::Tokenizer(e.to_string()))?;
        Ok(Tokenizer { inner, max_len })
    }

    /// Token ids with the start and end tokens, at most `max_len`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let e = self
            .inner
            .encode(text, true)
            .map_err(|e| SapError::Tokenizer(e.to_string()))?;
        Ok(e.get_ids().to_vec())
    }
    pub fn encode_all(&self, ex: &[Example]) -> Result<Vec<Vec<u32>>> {
        ex.iter().map(|e| self.encode(&e.text)).collect()
    }
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
    pub fn token_to_id(&self, t: &str) -> Option<u32> {
        self.inner.token_to_id(t)
    }
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
    /// Ids of the special tokens (`[CLS]`/`<s>`, `[SEP]`/`</s>`, padding, unknown, mask): the
    /// tokenizer's added tokens marked special.
    pub fn special_ids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        v.sort_unstable();
        v
    }
}
