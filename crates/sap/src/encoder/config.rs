//! The fields of an HF `config.json` the encoders read, and the architecture they name.
use crate::error::{Result, SapError};

/// Which encoder family a checkpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Bert,
    Mpnet,
}

/// The fields of an HF `config.json` the encoders use (others are ignored).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EncoderConfig {
    /// `bert` (also when absent) or `mpnet`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// MPNet: padding id; positions of real tokens start at `pad_token_id + 1`.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// MPNet: relative-position buckets (32).
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
}

fn default_model_type() -> String {
    "bert".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}
fn default_buckets() -> usize {
    32
}

impl EncoderConfig {
    pub fn arch(&self) -> Result<Arch> {
        match self.model_type.as_str() {
            "bert" => Ok(Arch::Bert),
            "mpnet" => Ok(Arch::Mpnet),
            t => Err(SapError::Model(format!(
                "model_type {t:?} is not supported (bert, mpnet)"
            ))),
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        self.arch()?;
        if self.hidden_size == 0
            || self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(SapError::Model(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.hidden_act != "gelu" {
            return Err(SapError::Model(format!(
                "hidden_act {:?} is not supported (only gelu)",
                self.hidden_act
            )));
        }
        if self.vocab_size == 0 || self.max_position_embeddings == 0 {
            return Err(SapError::Model(
                "vocab_size and max_position_embeddings must be > 0".into(),
            ));
        }
        Ok(())
    }

    /// The longest sequence the position table allows.
    pub fn max_tokens(&self) -> usize {
        match self.arch() {
            Ok(Arch::Mpnet) => self
                .max_position_embeddings
                .saturating_sub(self.pad_token_id.unwrap_or(1) as usize + 1),
            _ => self.max_position_embeddings,
        }
    }
}
