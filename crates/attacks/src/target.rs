//! What the attacker holds: the public plaintext checkpoint and the obfuscated one.
//!
//! Accessors return F32 `[rows, width]` matrices in HF layout with RMSNorm weights folded into the
//! plaintext readers exactly as the compiler folds them (`W' = W diag(w)`), so that key-free
//! products of the two models are directly comparable.
//!
//! Checkpoints opened from disk ([`Target::open`]) are read one tensor at a time on demand
//! (`umbra_aloepri::source::CheckpointSource`), never held whole: the attacks on
//! Qwen2.5-Coder-1.5B (F32: 6.2 GB plaintext + 7.1 GB obfuscated) need the embedding, the head
//! and a few layers at a time. Loaded maps ([`Target::from_parts`]) serve tests and sweeps.
use crate::error::{AttackError, Result};
use candle_core::{DType, Tensor};
use std::path::Path;
use std::sync::Mutex;
use umbra_aloepri::source::CheckpointSource;
use umbra_model::{LlamaConfig, Weights};

/// Where one side's tensors come from.
enum Store {
    Map(Weights),
    Lazy(Box<Mutex<CheckpointSource>>),
}

impl Store {
    fn get(&self, name: &str, which: &str) -> Result<Tensor> {
        let missing = || AttackError::Input(format!("{which} checkpoint has no tensor `{name}`"));
        match self {
            Store::Map(w) => Ok(w.get(name).ok_or_else(missing)?.to_dtype(DType::F32)?),
            Store::Lazy(src) => {
                let mut src = src
                    .lock()
                    .map_err(|_| AttackError::Input("checkpoint source poisoned".into()))?;
                if !src.contains(name) {
                    return Err(missing());
                }
                Ok(src.read(name)?)
            }
        }
    }

    fn names(&self) -> Vec<String> {
        match self {
            Store::Map(w) => w.keys().cloned().collect(),
            Store::Lazy(src) => src
                .lock()
                .map(|s| s.names().map(str::to_string).collect())
                .unwrap_or_default(),
        }
    }

    /// The tensors whose names pass `keep`, as a map.
    fn subset(&self, keep: &dyn Fn(&str) -> bool, which: &str) -> Result<Weights> {
        self.names()
            .into_iter()
            .filter(|n| keep(n))
            .map(|n| Ok((n.clone(), self.get(&n, which)?)))
            .collect()
    }
}

/// The attacker's view (no key).
pub struct Target {
    pub plain_cfg: LlamaConfig,
    pub obf_cfg: LlamaConfig,
    plain: Store,
    obf: Store,
}

fn f32(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?)
}

/// Whether `name` belongs to the embedding, the final norm, the head or one of the first
/// `blocks` layers.
fn in_first_blocks(name: &str, blocks: usize) -> bool {
    match name.strip_prefix("model.layers.") {
        Some(rest) => rest
            .split('.')
            .next()
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| i < blocks),
        None => true,
    }
}

impl Target {
    /// Opens both checkpoints (HF folders or GGUF; tensors are read when an attack needs them)
    /// and checks that they share a vocabulary and a layer count.
    pub fn open(plain: &Path, obfuscated: &Path) -> Result<Self> {
        let p = CheckpointSource::open(plain)?;
        let o = CheckpointSource::open(obfuscated)?;
        Self::check(&p.config, &o.config)?;
        Ok(Self {
            plain_cfg: p.config.clone(),
            obf_cfg: o.config.clone(),
            plain: Store::Lazy(Box::new(Mutex::new(p))),
            obf: Store::Lazy(Box::new(Mutex::new(o))),
        })
    }

    /// Both sides from loaded maps.
    pub fn from_parts(
        plain_cfg: LlamaConfig,
        plain: Weights,
        obf_cfg: LlamaConfig,
        obf: Weights,
    ) -> Result<Self> {
        Self::check(&plain_cfg, &obf_cfg)?;
        Ok(Self {
            plain_cfg,
            obf_cfg,
            plain: Store::Map(plain),
            obf: Store::Map(obf),
        })
    }

    fn check(plain_cfg: &LlamaConfig, obf_cfg: &LlamaConfig) -> Result<()> {
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
        Ok(())
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

    fn plain_t(&self, name: &str) -> Result<Tensor> {
        self.plain.get(name, "plaintext")
    }

    fn obf_t(&self, name: &str) -> Result<Tensor> {
        self.obf.get(name, "obfuscated")
    }

    /// The plaintext tensors of the embedding, final norm, head and the first `blocks` layers
    /// (what a model cut after `blocks` blocks needs; IMA/ISA).
    pub fn plain_weights(&self, blocks: usize) -> Result<Weights> {
        self.plain
            .subset(&|n| in_first_blocks(n, blocks), "plaintext")
    }

    /// [`Target::plain_weights`] of the obfuscated side.
    pub fn obf_weights(&self, blocks: usize) -> Result<Weights> {
        self.obf
            .subset(&|n| in_first_blocks(n, blocks), "obfuscated")
    }

    /// Plaintext embedding `We` `[V, d]`.
    pub fn plain_embed(&self) -> Result<Tensor> {
        self.plain_t("model.embed_tokens.weight")
    }

    /// Plaintext head rows before the final norm is folded (`We` when tied) `[V, d]`.
    pub fn plain_head_raw(&self) -> Result<Tensor> {
        let name = if self.plain_cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        self.plain_t(name)
    }

    /// `Wh diag(w_final)` `[V, d]`, given head rows `raw` (e.g. with simulated noise).
    pub fn fold_final_norm(&self, raw: &Tensor) -> Result<Tensor> {
        let w = self.plain_t("model.norm.weight")?;
        Ok(raw.broadcast_mul(&w.unsqueeze(0)?)?)
    }

    /// Obfuscated embedding `We~` `[V, d']`.
    pub fn obf_embed(&self) -> Result<Tensor> {
        self.obf_t("model.embed_tokens.weight")
    }

    /// Obfuscated head `Wh~` (HF rows) `[V, d']`.
    pub fn obf_head(&self) -> Result<Tensor> {
        let name = if self.obf_cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        self.obf_t(name)
    }

    fn folded(&self, layer: usize, proj: &str, norm: &str) -> Result<Tensor> {
        let w = self.plain_t(&format!("model.layers.{layer}.{proj}.weight"))?;
        let n = self.plain_t(&format!("model.layers.{layer}.{norm}.weight"))?;
        Ok(w.broadcast_mul(&n.unsqueeze(0)?)?)
    }

    fn obf_proj(&self, layer: usize, proj: &str) -> Result<Tensor> {
        self.obf_t(&format!("model.layers.{layer}.{proj}.weight"))
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
        let n = self.obf_t(&format!("model.layers.{layer}.{norm}.weight"))?;
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
                f32(&self.plain_t(&format!("model.layers.{layer}.self_attn.o_proj.weight"))?)?
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
