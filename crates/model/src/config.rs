//! HF `config.json` for the Llama family, read with serde.
//!
//! Unknown keys are kept in [`LlamaConfig::extra`] and written back unchanged, so a converted or
//! obfuscated checkpoint stays a faithful HF config.
use crate::error::{ModelError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Architectures this engine runs. Qwen2 differs from Llama only by q/k/v biases.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2"];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LlamaConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Explicit head width; HF defaults it to `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama/Mistral: q/k/v/o biases when true. Qwen2 always has q/k/v biases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default = "default_act", skip_serializing_if = "String::is_empty")]
    pub hidden_act: String,
    /// Keys we do not interpret (torch_dtype, sliding_window, umbra fingerprint, ...).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Which part of a split-mode model a checkpoint holds (`config.json`: `umbra.split`).
///
/// Split mode keeps the embedding, the final norm and the LM head with the client and serves only
/// the transformer blocks: a `Server` checkpoint has the blocks and nothing else, a `Client` one
/// the embedding, final norm and head and no blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelPart {
    Full,
    Server,
    Client,
}

impl ModelPart {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Server => "server",
            Self::Client => "client",
        }
    }
}

impl LlamaConfig {
    /// The part of a split-mode model this config describes ([`ModelPart::Full`] unless
    /// `umbra.split` says `server` or `client`).
    pub fn part(&self) -> ModelPart {
        match self
            .extra
            .get("umbra")
            .and_then(|u| u.get("split"))
            .and_then(|s| s.as_str())
        {
            Some("server") => ModelPart::Server,
            Some("client") => ModelPart::Client,
            _ => ModelPart::Full,
        }
    }
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096
}
fn default_act() -> String {
    "silu".into()
}

impl LlamaConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.into(),
            msg: e.to_string(),
        })?;
        cfg.validate().map_err(|msg| match msg {
            ModelError::Config { msg, .. } => ModelError::Config {
                path: path.into(),
                msg,
            },
            other => other,
        })?;
        Ok(cfg)
    }

    /// Checks the architecture and the internal consistency of the sizes.
    pub fn validate(&self) -> Result<()> {
        if !SUPPORTED_MODEL_TYPES.contains(&self.model_type.as_str()) {
            return Err(ModelError::UnsupportedArch(self.model_type.clone()));
        }
        if self.hidden_act != "silu" {
            return Err(ModelError::UnsupportedArch(format!(
                "{} with hidden_act={}",
                self.model_type, self.hidden_act
            )));
        }
        let bad = |msg: String| ModelError::Config {
            path: "config.json".into(),
            msg,
        };
        if self.hidden_size == 0 || self.num_attention_heads == 0 || self.num_hidden_layers == 0 {
            return Err(bad(
                "hidden_size, num_attention_heads and num_hidden_layers must be > 0".into(),
            ));
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({kv})",
                self.num_attention_heads
            )));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(bad(
                "hidden_size is not a multiple of num_attention_heads and no head_dim is given"
                    .into(),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(bad(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            )));
        }
        Ok(())
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether q/k/v projections carry a bias (Qwen2, or Llama with `attention_bias`).
    pub fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2" || self.attention_bias.unwrap_or(false)
    }

    /// Whether `o_proj` carries a bias (Llama `attention_bias` only; Qwen2 has none).
    pub fn o_bias(&self) -> bool {
        self.model_type != "qwen2" && self.attention_bias.unwrap_or(false)
    }

    /// EOS ids from the config (a number or a list).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        ids_of(self.eos_token_id.as_ref())
    }

    pub fn bos_token_ids(&self) -> Vec<u32> {
        ids_of(self.bos_token_id.as_ref())
    }

    /// Writes the config as pretty JSON (not atomic; callers write into a staging folder).
    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serializes")
    }
}

fn ids_of(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

/// Every tensor a Llama-family model with `cfg` must have, with its HF shape
/// (`d` = hidden, `h`/`kv` = heads, `hd` = head_dim, `f` = intermediate, `V` = vocab):
///
/// * `model.embed_tokens.weight` `[V, d]`, `model.norm.weight` `[d]`,
///   `lm_head.weight` `[V, d]` (absent when `tie_word_embeddings`);
/// * per layer `i`: `input_layernorm.weight` / `post_attention_layernorm.weight` `[d]`,
///   `self_attn.q_proj.weight` `[h*hd, d]`, `k_proj`/`v_proj` `[kv*hd, d]`,
///   `o_proj.weight` `[d, h*hd]` (+ q/k/v biases `[h*hd]`/`[kv*hd]` when
///   [`LlamaConfig::qkv_bias`], o bias `[d]` when [`LlamaConfig::o_bias`]),
///   `mlp.gate_proj`/`up_proj` `[f, d]`, `mlp.down_proj` `[d, f]`.
///
/// A split-mode part ([`LlamaConfig::part`]) expects only what it holds: a server part the
/// layers, a client part the embedding, final norm and head.
pub fn expected_shapes(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let all = full_shapes(cfg);
    let is_layer = |n: &str| n.starts_with("model.layers.");
    match cfg.part() {
        ModelPart::Full => all,
        ModelPart::Server => all.into_iter().filter(|(n, _)| is_layer(n)).collect(),
        ModelPart::Client => all.into_iter().filter(|(n, _)| !is_layer(n)).collect(),
    }
}

fn full_shapes(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let d = cfg.hidden_size;
    let (h, kv, hd, f, v) = (
        cfg.num_attention_heads,
        cfg.num_kv_heads(),
        cfg.head_dim(),
        cfg.intermediate_size,
        cfg.vocab_size,
    );
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, d])];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        out.push((format!("{p}.input_layernorm.weight"), vec![d]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![h * hd, d]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv * hd, d]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv * hd, d]));
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![d, h * hd]));
        if cfg.qkv_bias() {
            out.push((format!("{p}.self_attn.q_proj.bias"), vec![h * hd]));
            out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv * hd]));
            out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv * hd]));
        }
        if cfg.o_bias() {
            out.push((format!("{p}.self_attn.o_proj.bias"), vec![d]));
        }
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![f, d]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![f, d]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![d, f]));
    }
    out.push(("model.norm.weight".to_string(), vec![d]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, d]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_smollm_like_config_and_keeps_extra_keys() {
        let json = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":576,
            "intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,
            "vocab_size":49152,"rms_norm_eps":1e-5,"rope_theta":100000.0,"tie_word_embeddings":true,
            "torch_dtype":"bfloat16","eos_token_id":[2,0]}"#;
        let cfg: LlamaConfig = serde_json::from_str(json).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.head_dim(), 64);
        assert_eq!(cfg.num_kv_heads(), 3);
        assert_eq!(cfg.eos_token_ids(), vec![2, 0]);
        let back = cfg.to_json_string();
        assert!(back.contains("torch_dtype"));
    }

    #[test]
    fn rejects_unknown_arch_and_bad_heads() {
        let mut cfg: LlamaConfig = serde_json::from_str(
            r#"{"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
            "num_key_value_heads":3,"vocab_size":100}"#,
        )
        .unwrap();
        assert!(matches!(cfg.validate(), Err(ModelError::Config { .. })));
        cfg.num_key_value_heads = Some(2);
        cfg.validate().unwrap();
        cfg.model_type = "gpt2".into();
        assert!(matches!(
            cfg.validate(),
            Err(ModelError::UnsupportedArch(_))
        ));
    }
}
