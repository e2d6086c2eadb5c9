//! `obfuscate`, `eval fidelity`, `demo`, `bench llamacpp`: dispatch to `umbra_aloepri::cli`.
//! The one thing added here is `obfuscate --halluc-probe`, which joins two domain crates
//! (HaluProbe depends on AloePri, so AloePri cannot call it): it plugs in as an
//! [`umbra_aloepri::cli::ObfuscateHook`].
use anyhow::Result;
use clap::Args;
use std::path::{Path, PathBuf};
use umbra_aloepri::cli::{ObfuscateHook, ObfuscateOutcome};
use umbra_aloepri::{AloeError, ObfuscationParams};
use umbra_model::LlamaConfig;

pub use umbra_aloepri::cli::{DemoArgs, FidelityArgs, LlamacppArgs};

#[derive(Args, Clone)]
pub struct ObfuscateArgs {
    #[command(flatten)]
    pub inner: umbra_aloepri::cli::ObfuscateArgs,
    /// A HaluProbe probe trained on the plaintext model (`umbra halluc train`): also write it
    /// transformed with this key, to score the obfuscated model's states (docs/haluprobe.md).
    #[arg(long, conflicts_with = "split")]
    pub halluc_probe: Option<PathBuf>,
    /// Where the transformed probe goes [default: <out>/halluc-probe.safetensors].
    #[arg(long, requires = "halluc_probe")]
    pub halluc_probe_out: Option<PathBuf>,
}

/// `--halluc-probe`: checked before compiling, transformed after.
struct ProbeHook {
    probe: PathBuf,
    out: PathBuf,
}

fn boxed(e: impl std::error::Error + Send + Sync + 'static) -> AloeError {
    AloeError::Other(Box::new(e))
}

impl ObfuscateHook for ProbeHook {
    fn before(
        &mut self,
        _input: &Path,
        cfg: &LlamaConfig,
        params: &ObfuscationParams,
    ) -> umbra_aloepri::Result<()> {
        let probe = umbra_haluprobe::probe::ProbeFile::load(&self.probe).map_err(boxed)?;
        umbra_haluprobe::obfuscated::check_transformable(&probe, cfg, params).map_err(boxed)?;
        if self.out.exists() {
            return Err(AloeError::Input(format!(
                "{} already exists; remove it or choose another --halluc-probe-out",
                self.out.display()
            )));
        }
        Ok(())
    }

    fn after(
        &mut self,
        o: &ObfuscateOutcome,
    ) -> umbra_aloepri::Result<serde_json::Map<String, serde_json::Value>> {
        let (_, r) = umbra_haluprobe::obfuscated::transform_probe_files(
            &self.probe,
            &o.input,
            &o.out,
            &o.key,
            &self.out,
        )
        .map_err(|e| {
            AloeError::Input(format!(
                "the checkpoint and key are written, but transforming {} failed (retry with \
                 `umbra halluc obfuscate-probe`): {e}",
                self.probe.display()
            ))
        })?;
        eprintln!(
            "halluc probe {} -> {} ({} -> {} inputs, {:.1}s)",
            self.probe.display(),
            self.out.display(),
            r.inputs_plain,
            r.inputs_obfuscated,
            r.seconds
        );
        let mut m = serde_json::Map::new();
        m.insert("halluc_probe_inputs".into(), r.inputs_obfuscated.into());
        m.insert("halluc_probe_s".into(), r.seconds.into());
        Ok(m)
    }
}

pub fn obfuscate(a: &ObfuscateArgs) -> Result<()> {
    match &a.halluc_probe {
        Some(p) => {
            let out = a
                .halluc_probe_out
                .clone()
                .unwrap_or_else(|| a.inner.out.join("halluc-probe.safetensors"));
            let mut hook = ProbeHook {
                probe: p.clone(),
                out,
            };
            umbra_aloepri::cli::run_obfuscate(&a.inner, &mut hook)?;
        }
        None => {
            umbra_aloepri::cli::run_obfuscate(&a.inner, &mut umbra_aloepri::cli::NoHook)?;
        }
    }
    Ok(())
}
