//! What the attacker holds: the public plaintext checkpoint and the obfuscated one.
//!
//! Accessors return F32 `[rows, width]` matrices in HF layout with RMSNorm weights folded into the
//! plaintext readers exactly as the compiler folds them (`W' = W diag(w)`), so that key-free
//! products of the two models are directly comparable.
use crate::error::{AttackError, Result};
use candle_core::{DType, Tensor};
use std::path::Path;
use umbra_model::checkpoint::Checkpoint;
use umbra_model::{LlamaConfig, Weights};

/// The attacker's view (no key).
pub struct Target {
    pub plain_cfg: LlamaConfig,
    pub plain: Weights,
    pub obf_cfg: LlamaConfig,
    pub obf: Weights,
}

fn get<'a>(w: &'a Weights, name: &str, which: &str) -> Result<&'a Tensor> {
    w.get(name)
        .ok_or_else(|| AttackError::Input(format!("{which} checkpoint has no tensor `{name}`")))
}

fn f32(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?)
}

impl Target {
    /// Opens both checkpoints (HF folders or GGUF) and checks that they share a vocabulary.
    pub fn open(plain: &Path, obfuscated: &Path) -> Result<Self> {
        let p = Checkpoint::open(plain)?;
        let o = Checkpoint::open(obfuscated)?;
        Self::from_parts(p.config, p.weights, o.config, o.weights)
    }

    pub fn from_parts(
        plain_cfg: LlamaConfig,
        plain: Weights,
        obf_cfg: LlamaConfig,
        obf: Weights,
    ) -> Result<Self> {
        if plain_cfg.vocab_size != obf_cfg.vocab_size {
            return Err(AttackError::Input(format!(
                "vocabularies differ: plaintext {} vs obfuscated {}",
                plain_cfg.vocab_size, obf_cfg.vocab_size
            )));
        }
        if plain_cfg.num_hidden_layers != obf_cfg.num_hidden_layers {
            return Err(AttackError::Input(format!(
                "layer counts differ: plaintext {} vs obfuscated {}",
                plain_cfg.num_hidden_layers, obf_cfg.num_hidden_layers
            )));
        }
        Ok(Self {
            plain_cfg,
            plain,
            obf_cfg,
            obf,
        })
    }

    pub fn vocab(&self) -> usize {
        self.plain_cfg.vocab_size
    }

    pub fn layers(&self) -> usize {
        self.plain_cfg.num_hidden_layers
    }

    /// Whether the obfuscated config declares exact mode (public: it is in `config.json`).
    pub fn declared_exact(&self) -> bool {
        self.obf_cfg
            .extra
            .get("umbra")
            .and_then(|u| u.get("exact"))
            .and_then(|e| e.as_bool())
            .unwrap_or(false)
    }

    /// Plaintext embedding `We` `[V, d]`.
    pub fn plain_embed(&self) -> Result<Tensor> {
        f32(get(&self.plain, "model.embed_tokens.weight", "plaintext")?)
    }

    /// Plaintext head rows before the final norm is folded (`We` when tied) `[V, d]`.
    pub fn plain_head_raw(&self) -> Result<Tensor> {
        let name = if self.plain_cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        f32(get(&self.plain, name, "plaintext")?)
    }

    /// `Wh diag(w_final)` `[V, d]`, given head rows `raw` (e.g. with simulated noise).
    pub fn fold_final_norm(&self, raw: &Tensor) -> Result<Tensor> {
        let w = f32(get(&self.plain, "model.norm.weight", "plaintext")?)?;
        Ok(raw.broadcast_mul(&w.unsqueeze(0)?)?)
    }

    /// Obfuscated embedding `We~` `[V, d']`.
    pub fn obf_embed(&self) -> Result<Tensor> {
        f32(get(&self.obf, "model.embed_tokens.weight", "obfuscated")?)
    }

    /// Obfuscated head `Wh~` (HF rows) `[V, d']`.
    pub fn obf_head(&self) -> Result<Tensor> {
        let name = if self.obf_cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        f32(get(&self.obf, name, "obfuscated")?)
    }

    fn folded(&self, layer: usize, proj: &str, norm: &str) -> Result<Tensor> {
        let w = f32(get(
            &self.plain,
            &format!("model.layers.{layer}.{proj}.weight"),
            "plaintext",
        )?)?;
        let n = f32(get(
            &self.plain,
            &format!("model.layers.{layer}.{norm}.weight"),
            "plaintext",
        )?)?;
        Ok(w.broadcast_mul(&n.unsqueeze(0)?)?)
    }

    fn obf_proj(&self, layer: usize, proj: &str) -> Result<Tensor> {
        f32(get(
            &self.obf,
            &format!("model.layers.{layer}.{proj}.weight"),
            "obfuscated",
        )?)
    }

    /// Plaintext `Wgate diag(w_post)` (HF `[ffn, d]`) and obfuscated `Wgate~` (`[ffn, d']`).
    pub fn gate(&self, layer: usize) -> Result<(Tensor, Tensor)> {
        Ok((
            self.folded(layer, "mlp.gate_proj", "post_attention_layernorm")?,
            self.obf_proj(layer, "mlp.gate_proj")?,
        ))
    }

    /// The obfuscated projection with the obfuscated checkpoint's own norm folded in (stock
    /// RMSNorm weights; all ones when the compiler folded them, which it does).
    fn obf_folded(&self, layer: usize, proj: &str, norm: &str) -> Result<Tensor> {
        let n = f32(get(
            &self.obf,
            &format!("model.layers.{layer}.{norm}.weight"),
            "obfuscated",
        )?)?;
        Ok(self
            .obf_proj(layer, proj)?
            .broadcast_mul(&n.unsqueeze(0)?)?)
    }

    /// Attention projections of one layer with the input norm folded on both sides, HF layout:
    /// plaintext `[q, k, v, o]` (`[nh*hd, d]`, `[nkv*hd, d]`, `[nkv*hd, d]`, `[d, nh*hd]`)
    /// and the obfuscated four (`d'` for `d`).
    pub fn attention(&self, layer: usize) -> Result<[[Tensor; 4]; 2]> {
        let side = |obf: bool| -> Result<[Tensor; 4]> {
            let f = |p: &str| {
                if obf {
                    self.obf_folded(layer, p, "input_layernorm")
                } else {
                    self.folded(layer, p, "input_layernorm")
                }
            };
            let o = if obf {
                self.obf_proj(layer, "self_attn.o_proj")?
            } else {
                f32(get(
                    &self.plain,
                    &format!("model.layers.{layer}.self_attn.o_proj.weight"),
                    "plaintext",
                )?)?
            };
            Ok([
                f("self_attn.q_proj")?,
                f("self_attn.k_proj")?,
                f("self_attn.v_proj")?,
                o,
            ])
        };
        Ok([side(false)?, side(true)?])
    }

    /// Plaintext q and k with the input norm folded (`[nh*hd, d]`, `[nkv*hd, d]`) and the
    /// obfuscated ones (`[nh*hd, d']`, `[nkv*hd, d']`).
    pub fn qk(&self, layer: usize) -> Result<[Tensor; 4]> {
        Ok([
            self.folded(layer, "self_attn.q_proj", "input_layernorm")?,
            self.folded(layer, "self_attn.k_proj", "input_layernorm")?,
            self.obf_proj(layer, "self_attn.q_proj")?,
            self.obf_proj(layer, "self_attn.k_proj")?,
        ])
    }
}
