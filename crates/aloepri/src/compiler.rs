//! The obfuscation compiler: plaintext checkpoint -> obfuscated standard HF Llama checkpoint plus
//! the client's key. Tensors are transformed one at a time in a fixed order and handed to a sink
//! (the streaming safetensors writer), so the output is never held whole in memory.
use crate::error::{AloeError, Result};
use crate::keyfile::ClientKey;
use crate::keys::{HeadKeys, KeyInit};
use crate::linalg::{permutation, to_tensor};
use crate::params::ObfuscationParams;
use crate::tau::TokenPermutation;
use crate::transform::{self, AttentionTransform, FfnTransform};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use umbra_model::{LlamaConfig, Weights};

/// What a compiled checkpoint records in `config.json` under `umbra`.
pub const CONFIG_SECTION: &str = "umbra";

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

/// Removes a tensor from the input (freeing it once used) and widens it to F64.
fn take(w: &mut Weights, name: &str) -> Result<Tensor> {
    let t = w
        .remove(name)
        .ok_or_else(|| umbra_model::ModelError::MissingTensor(name.into()))?;
    Ok(t.to_dtype(candle_core::DType::F64)?)
}

/// [`compile_weights`] into memory: the obfuscated weights (embedding and head chunks stitched
/// back together) and the compile result. For tests, attacks and small models; checkpoints on
/// disk go through [`compile_checkpoint`], which streams.
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

/// Transforms every tensor of a plaintext model (consumed, so each input is freed once used) and
/// hands the results to `sink(name, tensor)` in [`output_specs`] order of the obfuscated config.
/// The embedding and the head arrive as consecutive row chunks under the same name.
/// `special_ids` stay fixed points of tau. Every key is drawn from `seed` in a fixed order.
pub fn compile_weights(
    cfg: &LlamaConfig,
    mut w: Weights,
    special_ids: &[u32],
    params: &ObfuscationParams,
    seed: u64,
    sink: &mut dyn FnMut(&str, Tensor) -> Result<()>,
) -> Result<Compiled> {
    // Transforms run in F64; what leaves is F32, the checkpoint's storage type.
    let mut sink =
        |name: &str, t: Tensor| -> Result<()> { sink(name, t.to_dtype(candle_core::DType::F32)?) };
    params.validate()?;
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
    // Stock RMSNorm over d' with weight kappa: kappa = r sqrt(d / d'), r^2 = E||xP||^2/||x||^2.
    let kappa = (gain_sq * d as f64 / dp as f64).sqrt();
    let norm_w = transform::norm_weight(kappa, dp, &dev)?;

    // The two vocabulary matrices stay in their storage type and are widened chunk by chunk.
    let take_raw = |w: &mut Weights, name: &str| -> Result<Tensor> {
        w.remove(name)
            .ok_or_else(|| umbra_model::ModelError::MissingTensor(name.into()).into())
    };
    let embed = take_raw(&mut w, "model.embed_tokens.weight")?;
    // Untie first: the head starts from the clean embedding matrix.
    let head_src = if cfg.tie_word_embeddings {
        embed.clone()
    } else {
        take_raw(&mut w, "lm_head.weight")?
    };
    let embed_noisy = transform::add_noise(&embed, params.alpha_e, noise_e)?;
    drop(embed);
    let p_embed_t = to_tensor(&p_embed, &dev)?;
    for rows in tau_inv.chunks(ROW_CHUNK) {
        sink(
            "model.embed_tokens.weight",
            transform::embedding(&embed_noisy, &p_embed_t, rows)?,
        )?;
    }
    drop(embed_noisy);

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

        let in_norm = take(&mut w, &format!("{pre}.input_layernorm.weight"))?;
        sink(&format!("{pre}.input_layernorm.weight"), norm_w.clone())?;
        for (n, m, q) in [
            ("q", &at.m_q, &q_q),
            ("k", &at.m_k, &q_k),
            ("v", &at.m_v, &q_v),
        ] {
            let name = format!("{pre}.self_attn.{n}_proj.weight");
            let wt = take(&mut w, &name)?;
            sink(&name, AttentionTransform::qkv(m, &wt, &in_norm, q)?)?;
            if cfg.qkv_bias() {
                let name = format!("{pre}.self_attn.{n}_proj.bias");
                let b = take(&mut w, &name)?;
                sink(&name, AttentionTransform::bias(m, &b)?)?;
            }
        }
        let name = format!("{pre}.self_attn.o_proj.weight");
        let wo = take(&mut w, &name)?;
        sink(&name, at.o(&wo, &p_o)?)?;
        if cfg.o_bias() {
            let name = format!("{pre}.self_attn.o_proj.bias");
            let b = take(&mut w, &name)?;
            sink(&name, transform::writer_bias(&b, &p_o)?)?;
        }
        let post_norm = take(&mut w, &format!("{pre}.post_attention_layernorm.weight"))?;
        sink(
            &format!("{pre}.post_attention_layernorm.weight"),
            norm_w.clone(),
        )?;
        let name = format!("{pre}.mlp.gate_proj.weight");
        let g = take(&mut w, &name)?;
        sink(&name, ffn.gate(&g, &post_norm, &q_gate)?)?;
        let name = format!("{pre}.mlp.up_proj.weight");
        let u = take(&mut w, &name)?;
        sink(&name, ffn.up(&u, &post_norm, &q_up)?)?;
        let name = format!("{pre}.mlp.down_proj.weight");
        let dn = take(&mut w, &name)?;
        sink(&name, ffn.down(&dn, &p_down)?)?;
    }

    let final_norm = take(&mut w, "model.norm.weight")?;
    sink("model.norm.weight", norm_w.clone())?;
    let q_head = to_tensor(&init.q_key(&mut rng), &dev)?;
    let head_noisy = transform::add_noise(&head_src, params.alpha_h, noise_h)?;
    drop(head_src);
    for rows in tau_inv.chunks(ROW_CHUNK) {
        sink(
            "lm_head.weight",
            transform::lm_head(&head_noisy, &final_norm, &q_head, rows)?,
        )?;
    }

    if let Some(extra) = w.keys().next() {
        return Err(AloeError::Input(format!(
            "unexpected tensor `{extra}` in the checkpoint"
        )));
    }
    let key = ClientKey::new(seed, *params, &tau);
    let config = obfuscated_config(cfg, params, &key.fingerprint, gain_sq);
    Ok(Compiled { config, key })
}

/// Summary of a [`compile_checkpoint`] run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CompileReport {
    pub fingerprint: String,
    pub hidden_plain: usize,
    pub hidden_obfuscated: usize,
    pub tensors: usize,
    pub bytes_written: u64,
    pub exact: bool,
    pub load_s: f64,
    pub transform_s: f64,
}

/// Special ids that must stay fixed points of tau: the tokenizer's special/added tokens and the
/// config's BOS/EOS.
pub fn special_ids(ck: &umbra_model::checkpoint::Checkpoint) -> Vec<u32> {
    let mut ids: Vec<u32> = ck
        .tokenizer
        .as_ref()
        .map(|t| t.special_token_ids())
        .unwrap_or_default();
    ids.extend(ck.config.bos_token_ids());
    ids.extend(ck.eos_token_ids());
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Compiles the checkpoint at `input` (HF folder or GGUF) into an obfuscated HF folder `out` and
/// writes the client key to `key_path` (mode 0600). Nothing is left behind on failure: the folder
/// is staged as `.{out}.tmp-{pid}` and renamed at the end; `out` and `key_path` must not exist.
/// `progress(done, total, tensor_name)` is called once per tensor.
pub fn compile_checkpoint(
    input: &std::path::Path,
    out: &std::path::Path,
    key_path: &std::path::Path,
    params: &ObfuscationParams,
    seed: u64,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<CompileReport> {
    use std::time::Instant;
    params.validate()?;
    if out.exists() {
        return Err(AloeError::OutputExists(out.into()));
    }
    if key_path.exists() {
        return Err(AloeError::OutputExists(key_path.into()));
    }
    let t0 = Instant::now();
    let ck = umbra_model::checkpoint::Checkpoint::open(input)?;
    let load_s = t0.elapsed().as_secs_f64();
    let specials = special_ids(&ck);
    let gen_config = ck.generation_config_json();
    let umbra_model::checkpoint::Checkpoint {
        config,
        weights,
        tokenizer,
        ..
    } = ck;

    let staging = staging_dir(out, "tmp")?;

    let t1 = Instant::now();
    let result = (|| -> Result<CompileReport> {
        let shape_cfg = obfuscated_config(&config, params, "", 1.0);
        let specs = output_specs(&shape_cfg);
        let total = specs.len();
        let st_path = staging.join("model.safetensors");
        let meta = std::collections::BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let mut writer = crate::writer::StreamingWriter::create(&st_path, specs, meta)?;
        let mut done = 0usize;
        let compiled = compile_weights(&config, weights, &specials, params, seed, &mut |n, t| {
            writer.write(n, &t)?;
            done += 1;
            progress(done, total, n);
            Ok(())
        })?;
        writer.finish()?;
        let mut cfg = compiled.config.clone();
        cfg.extra.insert("torch_dtype".into(), "float32".into());
        std::fs::write(staging.join("config.json"), cfg.to_json_string())
            .map_err(|e| AloeError::io(&staging, e))?;
        if let Some(t) = &tokenizer {
            // The tokenizer is public; the server only ever sees permuted ids.
            t.save_hf(&staging)?;
        }
        let gen = serde_json::to_string_pretty(&gen_config).expect("json");
        std::fs::write(staging.join("generation_config.json"), gen)
            .map_err(|e| AloeError::io(&staging, e))?;
        let bytes_written = std::fs::metadata(&st_path)
            .map_err(|e| AloeError::io(&st_path, e))?
            .len();
        std::fs::rename(&staging, out).map_err(|e| AloeError::io(out, e))?;
        if let Err(e) = compiled.key.save(key_path) {
            let _ = std::fs::remove_dir_all(out);
            return Err(e);
        }
        Ok(CompileReport {
            fingerprint: compiled.key.fingerprint.clone(),
            hidden_plain: config.hidden_size,
            hidden_obfuscated: compiled.config.hidden_size,
            tensors: total,
            bytes_written,
            exact: params.is_exact(),
            load_s,
            transform_s: t1.elapsed().as_secs_f64(),
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

/// The sibling path `.{name}.{tag}-{pid}` of `out` in which an output is written before it is
/// renamed to `out`; creates `out`'s parent and removes a stale one from an earlier crash of
/// this process id. Nothing is created at the path itself.
pub(crate) fn staging_path(out: &std::path::Path, tag: &str) -> Result<std::path::PathBuf> {
    let name = out
        .file_name()
        .ok_or_else(|| {
            AloeError::Input(format!("{}: output path has no folder name", out.display()))
        })?
        .to_string_lossy()
        .into_owned();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| AloeError::io(&parent, e))?;
    let staging = parent.join(format!(".{name}.{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    Ok(staging)
}

/// [`staging_path`], created empty.
pub(crate) fn staging_dir(out: &std::path::Path, tag: &str) -> Result<std::path::PathBuf> {
    let staging = staging_path(out, tag)?;
    std::fs::create_dir(&staging).map_err(|e| AloeError::io(&staging, e))?;
    Ok(staging)
}

/// Opens an obfuscated checkpoint's config and checks that `key` belongs to it.
pub fn check_key_for(model_dir: &std::path::Path, key: &ClientKey) -> Result<()> {
    let (cfg, _) = umbra_model::checkpoint::Checkpoint::open_config_and_tokenizer(model_dir)?;
    let fp =
        recorded_fingerprint(&cfg).ok_or_else(|| AloeError::NotObfuscated(model_dir.into()))?;
    key.check_matches(&fp)?;
    if key.tau.len() != cfg.vocab_size {
        return Err(AloeError::Input(format!(
            "key covers {} tokens but the checkpoint has {}",
            key.tau.len(),
            cfg.vocab_size
        )));
    }
    Ok(())
}
