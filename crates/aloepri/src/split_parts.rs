//! Split mode (beyond the paper; the attack issue's proposal): the client keeps the embedding, the
//! final norm and the LM head of an *exact* obfuscation, and the server runs only the transformer
//! blocks, taking input embeddings `e~_t = e_tau(t) P` (`[n, d']`) and returning the final residual
//! stream (`[n, d']`, before the final norm).
//!
//! An obfuscated checkpoint is cut into two standard HF folders:
//! - `server/`: config (`umbra.split = "server"`) and the layers only — no embedding, no head, no
//!   tokenizer;
//! - `client/`: config (`umbra.split = "client"`), the embedding, final norm and head rows
//!   (about `2 V d'` floats: 28M multiply-adds per generated token on SmolLM2-135M) and the
//!   public tokenizer.
//!
//! Only an exact key is accepted: with the embedding and head on the client, the approximate
//! knobs (embedding/head noise, non-orthogonal `B`) would cost fidelity against attacks the server
//! can no longer run. What the server *can* still run is measured in `docs/attacks.md`: the
//! block-key attack recovers the isometric key from the blocks alone and, with it, every token it
//! is sent (`umbra attack split`).
use crate::compiler::CONFIG_SECTION;
use crate::error::{AloeError, Result};
use std::path::{Path, PathBuf};
use umbra_common::fs::Staging;
use umbra_model::checkpoint::Checkpoint;
use umbra_model::{LlamaConfig, ModelPart, Weights};

/// Folder of the server part inside a split output.
pub const SERVER_DIR: &str = "server";
/// Folder of the client part inside a split output.
pub const CLIENT_DIR: &str = "client";

/// What [`write_split`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SplitReport {
    pub server_dir: PathBuf,
    pub client_dir: PathBuf,
    pub server_tensors: usize,
    pub client_tensors: usize,
    /// Floats the server holds (the blocks).
    pub server_params: usize,
    /// Floats the client holds (embedding, final norm, head).
    pub client_params: usize,
}

fn with_part(cfg: &LlamaConfig, part: ModelPart) -> LlamaConfig {
    let mut c = cfg.clone();
    let section = c
        .extra
        .entry(CONFIG_SECTION.to_string())
        .or_insert_with(|| serde_json::json!({}));
    if let Some(m) = section.as_object_mut() {
        m.insert("split".into(), part.as_str().into());
    }
    c
}

/// Cuts an exact obfuscated checkpoint into its server part (blocks) and client part (embedding,
/// final norm, head, tokenizer). Fails on a plaintext, approximate or already split checkpoint.
pub fn split_parts(ck: Checkpoint) -> Result<(Checkpoint, Checkpoint)> {
    let section = ck
        .config
        .extra
        .get(CONFIG_SECTION)
        .ok_or_else(|| AloeError::NotObfuscated(ck.source.clone()))?;
    if ck.config.part() != ModelPart::Full {
        return Err(AloeError::Input(format!(
            "{} is already the {} part of a split model",
            ck.source.display(),
            ck.config.part().as_str()
        )));
    }
    if section.get("exact").and_then(|e| e.as_bool()) != Some(true) {
        return Err(AloeError::Params(format!(
            "{}: split mode needs an exact key (lambda 0, no noise, no junk, beta 1); this \
             checkpoint was obfuscated with approximate knobs",
            ck.source.display()
        )));
    }
    let Checkpoint {
        config,
        weights,
        tokenizer,
        source,
    } = ck;
    let (mut server_w, mut client_w) = (Weights::new(), Weights::new());
    for (name, t) in weights {
        if name.starts_with("model.layers.") {
            server_w.insert(name, t);
        } else {
            client_w.insert(name, t);
        }
    }
    let server = Checkpoint {
        config: with_part(&config, ModelPart::Server),
        weights: server_w,
        tokenizer: None,
        source: source.clone(),
    };
    let client = Checkpoint {
        config: with_part(&config, ModelPart::Client),
        weights: client_w,
        tokenizer,
        source,
    };
    Ok((server, client))
}

fn params(w: &Weights) -> usize {
    w.values().map(|t| t.elem_count()).sum()
}

/// Reads the exact obfuscated checkpoint at `obfuscated` and writes `out/server` and
/// `out/client` ([`SERVER_DIR`], [`CLIENT_DIR`]). Atomic: both parts are written into a locked
/// staging sibling that is renamed to `out` at the end; `out` must not exist.
pub fn write_split(obfuscated: &Path, out: &Path) -> Result<SplitReport> {
    if out.exists() {
        return Err(AloeError::OutputExists(out.into()));
    }
    let (server, client) = split_parts(Checkpoint::open(obfuscated)?)?;
    let staging = Staging::dir(out)?;
    let report = save_parts(&server, &client, staging.path(), out)?;
    staging.commit(false)?;
    Ok(report)
}

/// Writes both parts under `dir` (which becomes `out`).
fn save_parts(
    server: &Checkpoint,
    client: &Checkpoint,
    dir: &Path,
    out: &Path,
) -> Result<SplitReport> {
    server.save_hf(&dir.join(SERVER_DIR), false)?;
    client.save_hf(&dir.join(CLIENT_DIR), false)?;
    Ok(SplitReport {
        server_dir: out.join(SERVER_DIR),
        client_dir: out.join(CLIENT_DIR),
        server_tensors: server.weights.len(),
        client_tensors: client.weights.len(),
        server_params: params(&server.weights),
        client_params: params(&client.weights),
    })
}

/// `umbra obfuscate --split`: compiles `input` under an exact key (`params.is_exact()`) and cuts
/// it into `out/server` and `out/client` ([`write_split`]). Everything is built inside one
/// locked staging sibling of `out` (the whole obfuscated checkpoint too, removed before the
/// rename). On failure nothing is left: no `out`, no sibling, no key file.
pub fn compile_split(
    input: &Path,
    out: &Path,
    key_path: &Path,
    params: &crate::ObfuscationParams,
    seed: u64,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<(crate::compiler::CompileReport, SplitReport)> {
    if !params.is_exact() {
        return Err(AloeError::Params(
            "split mode needs an exact key (lambda 0, no noise, no junk, beta 1): with the \
             embedding and head on the client the approximate knobs only cost fidelity"
                .into(),
        ));
    }
    for p in [out, key_path] {
        if p.exists() {
            return Err(AloeError::OutputExists(p.into()));
        }
    }
    let staging = Staging::dir(out)?;
    let whole = staging.path().join("whole");
    let report =
        crate::compiler::compile_checkpoint(input, &whole, key_path, params, seed, progress)?;
    let split = (|| -> Result<SplitReport> {
        let (server, client) = split_parts(Checkpoint::open(&whole)?)?;
        std::fs::remove_dir_all(&whole).map_err(|e| AloeError::io(&whole, e))?;
        let r = save_parts(&server, &client, staging.path(), out)?;
        staging.commit(false)?;
        Ok(r)
    })();
    match split {
        Ok(r) => Ok((report, r)),
        Err(e) => {
            let _ = std::fs::remove_file(key_path);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compiler::compile_in_memory;
    use crate::ObfuscationParams;
    use candle_core::{Device, Tensor};
    use umbra_model::llama::Llama;
    use umbra_model::testing::{max_abs_diff, random_weights, tiny_config};
    use umbra_model::{Forward, Input};

    fn obfuscated(params: &ObfuscationParams) -> Checkpoint {
        let cfg = tiny_config(32, 4, 2, 2, 64);
        let w = random_weights(&cfg, 3);
        let (out, compiled) = compile_in_memory(&cfg, w, &[0], params, 9).unwrap();
        Checkpoint {
            config: compiled.config,
            weights: out,
            tokenizer: None,
            source: "obf".into(),
        }
    }

    /// Client embedding -> server blocks -> client head equals the whole obfuscated model, and
    /// each part refuses what it does not hold.
    #[test]
    fn parts_compose_to_the_whole_model() {
        let ck = obfuscated(&ObfuscationParams::exact(4));
        let dev = Device::Cpu;
        let whole = Llama::new(&ck.config, &ck.weights, &dev).unwrap();
        let (server, client) = split_parts(ck).unwrap();
        assert!(server
            .weights
            .keys()
            .all(|n| n.starts_with("model.layers.")));
        assert!(!client
            .weights
            .keys()
            .any(|n| n.starts_with("model.layers.")));
        assert!(Llama::new(&server.config, &server.weights, &dev).is_err());
        let s = Llama::new_part(&server.config, &server.weights, &dev).unwrap();
        let c = Llama::new_part(&client.config, &client.weights, &dev).unwrap();
        assert_eq!((s.part(), c.part()), (ModelPart::Server, ModelPart::Client));
        let ids = Tensor::new(&[[3u32, 9, 27, 5, 60]], &dev).unwrap();
        let want = whole
            .forward(Input::Ids(&ids), &mut whole.new_cache(), Forward::logits())
            .unwrap();
        let x = c.embed(&ids).unwrap();
        let h = s
            .forward(Input::Embeds(&x), &mut s.new_cache(), Forward::hidden())
            .unwrap();
        let got = c.head(&h).unwrap();
        assert!(max_abs_diff(&want, &got) < 1e-5);
        assert!(s.embed(&ids).is_err() && s.head(&h).is_err());
        let err = s
            .forward(Input::Ids(&ids), &mut s.new_cache(), Forward::logits())
            .unwrap_err()
            .to_string();
        assert!(err.contains("server part"), "{err}");
    }

    #[test]
    fn approximate_and_plaintext_checkpoints_are_refused() {
        let ck = obfuscated(&ObfuscationParams {
            h: 4,
            alpha_e: 0.0,
            alpha_h: 0.0,
            ..ObfuscationParams::paper()
        });
        let err = split_parts(ck).unwrap_err().to_string();
        assert!(err.contains("exact key"), "{err}");
        let cfg = tiny_config(32, 4, 2, 2, 64);
        let plain = Checkpoint {
            config: cfg.clone(),
            weights: random_weights(&cfg, 1),
            tokenizer: None,
            source: "plain".into(),
        };
        assert!(matches!(
            split_parts(plain),
            Err(AloeError::NotObfuscated(_))
        ));
    }

    #[test]
    fn write_split_is_atomic_and_reloads() {
        let ck = obfuscated(&ObfuscationParams::exact(0));
        let dir = tempfile::tempdir().unwrap();
        let full = dir.path().join("obf");
        ck.save_hf(&full, false).unwrap();
        let out = dir.path().join("split");
        let rep = write_split(&full, &out).unwrap();
        let s = Checkpoint::open(&rep.server_dir).unwrap();
        let c = Checkpoint::open(&rep.client_dir).unwrap();
        assert_eq!(s.config.part(), ModelPart::Server);
        assert_eq!(c.config.part(), ModelPart::Client);
        assert_eq!(rep.server_tensors + rep.client_tensors, ck.weights.len());
        // A second run into the same folder fails and leaves it as it was.
        assert!(matches!(
            write_split(&full, &out),
            Err(AloeError::OutputExists(_))
        ));
        // The server part is not a whole obfuscated checkpoint: splitting it again is refused.
        assert!(write_split(&rep.server_dir, &dir.path().join("again")).is_err());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");
    }
}
