//! The tensor compiler: a plaintext checkpoint's tensors -> the obfuscated checkpoint's tensors
//! plus the client's key. Tensors are read one at a time from a [`CheckpointSource`], transformed
//! in a fixed order (F64 math, F32 out) and handed to a sink (in [`crate::compiler`]: the
//! streaming safetensors or GGUF writer), so neither the input nor the output is ever held whole
//! in memory.
use crate::error::{AloeError, Result};
use crate::keyfile::ClientKey;
use crate::keys::{HeadKeys, KeyInit};
use crate::linalg::{permutation, to_tensor};
use crate::params::ObfuscationParams;
use crate::source::CheckpointSource;
use crate::tau::TokenPermutation;
use crate::transform::{self, AttentionTransform, FfnTransform};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use umbra_model::{LlamaConfig, Weights};

pub use crate::keyfile::CONFIG_SECTION;

/// The obfuscated tensors in write order with their shapes.
pub fn output_specs(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let d = cfg.hidden_size;
    let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
    let f = cfg.intermediate_size;
    let mut s = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, d],
    )];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        s.push((format!("{p}.input_layernorm.weight"), vec![d]));
        for (n, rows) in [("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)] {
            s.push((format!("{p}.self_attn.{n}_proj.weight"), vec![rows, d]));
            if cfg.qkv_bias() {
                s.push((format!("{p}.self_attn.{n}_proj.bias"), vec![rows]));
            }
        }
        s.push((format!("{p}.self_attn.o_proj.weight"), vec![d, nh * hd]));
        if cfg.o_bias() {
            s.push((format!("{p}.self_attn.o_proj.bias"), vec![d]));
        }
        s.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
        s.push((format!("{p}.mlp.gate_proj.weight"), vec![f, d]));
        s.push((format!("{p}.mlp.up_proj.weight"), vec![f, d]));
        s.push((format!("{p}.mlp.down_proj.weight"), vec![d, f]));
    }
    s.push(("model.norm.weight".into(), vec![d]));
    if !cfg.tie_word_embeddings {
        s.push(("lm_head.weight".into(), vec![cfg.vocab_size, d]));
    }
    s
}

/// The obfuscated model's config: width `d + 2h`, explicit `head_dim`, untied, stock RMSNorm with
/// `eps' = eps * r^2 * d / d'`, and the key fingerprint (never the key).
pub fn obfuscated_config(
    cfg: &LlamaConfig,
    params: &ObfuscationParams,
    fingerprint: &str,
    gain_sq: f64,
) -> LlamaConfig {
    let d = cfg.hidden_size;
    let dp = d + 2 * params.h;
    let mut out = cfg.clone();
    out.hidden_size = dp;
    out.head_dim = Some(cfg.head_dim());
    out.tie_word_embeddings = false;
    out.rms_norm_eps = cfg.rms_norm_eps * gain_sq * d as f64 / dp as f64;
    out.extra.insert(
        CONFIG_SECTION.into(),
        serde_json::json!({
            "format": 1,
            "scheme": "aloepri",
            "key_fingerprint": fingerprint,
            "exact": params.is_exact(),
            "plain_hidden_size": d,
        }),
    );
    out
}

/// The key fingerprint a compiled checkpoint's config records, if any.
pub fn recorded_fingerprint(cfg: &LlamaConfig) -> Option<String> {
    cfg.extra
        .get(CONFIG_SECTION)?
        .get("key_fingerprint")?
        .as_str()
        .map(str::to_string)
}

/// Embedding and head rows are transformed and written this many at a time (bounded memory).
const ROW_CHUNK: usize = 4096;

/// Result of [`compile_weights`].
pub struct Compiled {
    pub config: LlamaConfig,
    pub key: ClientKey,
}

/// Reads a tensor from the source and widens it to F64.
fn take(src: &mut CheckpointSource, name: &str) -> Result<Tensor> {
    Ok(src.read(name)?.to_dtype(candle_core::DType::F64)?)
}

/// [`compile_weights`] into memory: the obfuscated weights (embedding and head chunks stitched
/// back together) and the compile result. For tests, attacks and small models; checkpoints on
/// disk go through [`crate::compiler::compile_checkpoint`], which streams.
pub fn compile_in_memory(
    cfg: &LlamaConfig,
    w: Weights,
    special_ids: &[u32],
    params: &ObfuscationParams,
    seed: u64,
) -> Result<(Weights, Compiled)> {
    let mut out = Weights::new();
    let compiled = compile_weights(cfg, w, special_ids, params, seed, &mut |n, t| {
        let t = match out.remove(n) {
            Some(prev) => Tensor::cat(&[&prev, &t], 0)?,
            None => t,
        };
        out.insert(n.to_string(), t);
        Ok(())
    })?;
    Ok((out, compiled))
}

/// Where the compiler's output goes.
pub trait TensorSink {
    /// Called once, before the first tensor, with the final obfuscated config (key fingerprint
    /// and rescaled `eps'` included), so that a writer can put it in a header.
    fn begin(&mut self, _config: &LlamaConfig) -> Result<()> {
        Ok(())
    }
    /// One tensor (F32, HF layout), whole or as its next chunk of rows.
    fn write(&mut self, name: &str, t: Tensor) -> Result<()>;
}

/// A closure as a [`TensorSink`].
pub struct FnSink<F>(pub F);

impl<F: FnMut(&str, Tensor) -> Result<()>> TensorSink for FnSink<F> {
    fn write(&mut self, name: &str, t: Tensor) -> Result<()> {
        (self.0)(name, t)
    }
}

/// [`compile_source`] over a loaded map of tensors (consumed).
pub fn compile_weights(
    cfg: &LlamaConfig,
    w: Weights,
    special_ids: &[u32],
    params: &ObfuscationParams,
    seed: u64,
    sink: &mut dyn FnMut(&str, Tensor) -> Result<()>,
) -> Result<Compiled> {
    let mut src = CheckpointSource::from_weights(cfg.clone(), w, None)?;
    compile_source(&mut src, special_ids, params, seed, &mut FnSink(sink))
}

/// Transforms every tensor of a plaintext checkpoint, reading one tensor at a time from `src`,
/// and hands the results to `out` (F32; [`TensorSink::begin`] first) in [`output_specs`] order
/// of the obfuscated config. The embedding and the head arrive as consecutive row chunks under the same
/// name; for a tied model the embedding is read a second time for the head instead of being
/// held through the layers, so memory stays at about one vocabulary matrix plus one layer.
/// `special_ids` stay fixed points of tau. Every key is drawn from `seed` in a fixed order.
pub fn compile_source(
    src: &mut CheckpointSource,
    special_ids: &[u32],
    params: &ObfuscationParams,
    seed: u64,
    out: &mut dyn TensorSink,
) -> Result<Compiled> {
    params.validate()?;
    let cfg = src.config.clone();
    cfg.validate()?;
    let dev = Device::Cpu;
    let d = cfg.hidden_size;
    let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
    let groups = nh / nkv;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);

    let tau = TokenPermutation::random(&mut rng, cfg.vocab_size, special_ids);
    let tau_inv = tau.inverse_table().to_vec();
    let init = KeyInit::new(&mut rng, d, params)?;
    let dp = init.d_prime();
    let noise_e: u64 = rng.random();
    let noise_h: u64 = rng.random();

    let p_embed = init.p_key(&mut rng);
    let gain_sq = KeyInit::expected_gain_sq(&p_embed);
    let key = ClientKey::new(seed, *params, &tau);
    let config = obfuscated_config(&cfg, params, &key.fingerprint, gain_sq);
    out.begin(&config)?;
    // Transforms run in F64; what leaves is F32, the checkpoint's storage type.
    let mut sink = |name: &str, t: Tensor| -> Result<()> {
        out.write(name, t.to_dtype(candle_core::DType::F32)?)
    };
    // Stock RMSNorm over d' with weight kappa: kappa = r sqrt(d / d'), r^2 = E||xP||^2/||x||^2.
    let kappa = (gain_sq * d as f64 / dp as f64).sqrt();
    let norm_w = transform::norm_weight(kappa, dp, &dev)?;

    // The two vocabulary matrices stay in their storage type and are widened chunk by chunk.
    let embed_name = "model.embed_tokens.weight";
    let head_name = if cfg.tie_word_embeddings {
        embed_name
    } else {
        "lm_head.weight"
    };
    {
        let embed = src.read(embed_name)?;
        let embed_noisy = transform::add_noise(&embed, params.alpha_e, noise_e)?;
        drop(embed);
        let p_embed_t = to_tensor(&p_embed, &dev)?;
        for rows in tau_inv.chunks(ROW_CHUNK) {
            sink(
                embed_name,
                transform::embedding(&embed_noisy, &p_embed_t, rows)?,
            )?;
        }
    }

    for i in 0..cfg.num_hidden_layers {
        let pre = format!("model.layers.{i}");
        let q_q = to_tensor(&init.q_key(&mut rng), &dev)?;
        let q_k = to_tensor(&init.q_key(&mut rng), &dev)?;
        let q_v = to_tensor(&init.q_key(&mut rng), &dev)?;
        let heads = (0..nkv)
            .map(|_| HeadKeys::draw(&mut rng, hd, params.beta))
            .collect::<Result<Vec<_>>>()?;
        let tau_kv = permutation(&mut rng, nkv);
        let tau_group: Vec<Vec<usize>> = (0..nkv).map(|_| permutation(&mut rng, groups)).collect();
        let p_o = to_tensor(&init.p_key(&mut rng), &dev)?;
        let q_gate = to_tensor(&init.q_key(&mut rng), &dev)?;
        let q_up = to_tensor(&init.q_key(&mut rng), &dev)?;
        let ffn = FfnTransform {
            perm: permutation(&mut rng, cfg.intermediate_size)
                .into_iter()
                .map(|x| x as u32)
                .collect(),
            scale: (0..cfg.intermediate_size)
                .map(|_| 2f32.powf(rng.random_range(-1.0..1.0)))
                .collect(),
        };
        let p_down = to_tensor(&init.p_key(&mut rng), &dev)?;
        let at = AttentionTransform::new(&heads, &tau_kv, &tau_group, nh, hd, &dev)?;

        let in_norm = take(src, &format!("{pre}.input_layernorm.weight"))?;
        sink(&format!("{pre}.input_layernorm.weight"), norm_w.clone())?;
        for (n, m, q) in [
            ("q", &at.m_q, &q_q),
            ("k", &at.m_k, &q_k),
            ("v", &at.m_v, &q_v),
        ] {
            let name = format!("{pre}.self_attn.{n}_proj.weight");
            let wt = take(src, &name)?;
            sink(&name, AttentionTransform::qkv(m, &wt, &in_norm, q)?)?;
            if cfg.qkv_bias() {
                let name = format!("{pre}.self_attn.{n}_proj.bias");
                let b = take(src, &name)?;
                sink(&name, AttentionTransform::bias(m, &b)?)?;
            }
        }
        let name = format!("{pre}.self_attn.o_proj.weight");
        let wo = take(src, &name)?;
        sink(&name, at.o(&wo, &p_o)?)?;
        if cfg.o_bias() {
            let name = format!("{pre}.self_attn.o_proj.bias");
            let b = take(src, &name)?;
            sink(&name, transform::writer_bias(&b, &p_o)?)?;
        }
        let post_norm = take(src, &format!("{pre}.post_attention_layernorm.weight"))?;
        sink(
            &format!("{pre}.post_attention_layernorm.weight"),
            norm_w.clone(),
        )?;
        let name = format!("{pre}.mlp.gate_proj.weight");
        let g = take(src, &name)?;
        sink(&name, ffn.gate(&g, &post_norm, &q_gate)?)?;
        drop(g);
        let name = format!("{pre}.mlp.up_proj.weight");
        let u = take(src, &name)?;
        sink(&name, ffn.up(&u, &post_norm, &q_up)?)?;
        drop(u);
        let name = format!("{pre}.mlp.down_proj.weight");
        let dn = take(src, &name)?;
        sink(&name, ffn.down(&dn, &p_down)?)?;
    }

    let final_norm = take(src, "model.norm.weight")?;
    sink("model.norm.weight", norm_w.clone())?;
    let q_head = to_tensor(&init.q_key(&mut rng), &dev)?;
    // Untied: the head starts from the clean embedding matrix (read again, not held).
    let head_src = src.read(head_name)?;
    let head_noisy = transform::add_noise(&head_src, params.alpha_h, noise_h)?;
    drop(head_src);
    for rows in tau_inv.chunks(ROW_CHUNK) {
        sink(
            "lm_head.weight",
            transform::lm_head(&head_noisy, &final_norm, &q_head, rows)?,
        )?;
    }

    // A tied checkpoint may carry a copy of the head, which the compiler does not need.
    if let Some(extra) = src
        .unread()
        .into_iter()
        .find(|n| !(cfg.tie_word_embeddings && *n == "lm_head.weight"))
    {
        return Err(AloeError::Input(format!(
            "unexpected tensor `{extra}` in the checkpoint"
        )));
    }
    Ok(Compiled { config, key })
}
