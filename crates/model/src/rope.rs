//! Rotary position embeddings (HF `rotate_half` pairing: dim `j` with `j + hd/2`), with the
//! `llama3` frequency scaling. Tables for the first positions are built at load time.
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use candle_core::{Device, Tensor};

/// Positions for which cos/sin are tabulated at load time; later positions are computed per call.
const ROPE_TABLE_MAX: usize = 8192;

/// RoPE (HF `rotate_half` pairing: dim `j` with `j + hd/2`).
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    inv_freq: Vec<f64>,
    /// `[table_len, hd/2]` each.
    cos: Tensor,
    sin: Tensor,
    table_len: usize,
}

impl Rope {
    pub(crate) fn new(cfg: &LlamaConfig, device: &Device) -> Result<Self> {
        let hd = cfg.head_dim();
        let base = cfg.rope_theta;
        // HF computes inv_freq in f32; we match that rounding, then work in f64.
        let mut inv_freq: Vec<f64> = (0..hd / 2)
            .map(|i| (1.0f32 / (base as f32).powf((2 * i) as f32 / hd as f32)) as f64)
            .collect();
        if let Some(scaling) = &cfg.rope_scaling {
            apply_rope_scaling(scaling, &mut inv_freq)?;
        }
        let table_len = cfg.max_position_embeddings.clamp(1, ROPE_TABLE_MAX);
        let (cos, sin) = Self::compute(&inv_freq, 0, table_len, device)?;
        Ok(Self {
            inv_freq,
            cos,
            sin,
            table_len,
        })
    }

    fn compute(
        inv_freq: &[f64],
        start: usize,
        t: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in start..start + t {
            for &f in inv_freq {
                // HF: float32 position * float32 inv_freq, then cos/sin.
                let a = (p as f32 * f as f32) as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok((
            Tensor::from_vec(cos, (t, half), device)?,
            Tensor::from_vec(sin, (t, half), device)?,
        ))
    }

    /// cos/sin `[t, hd/2]` for positions `start..start+t`.
    pub(crate) fn cos_sin(
        &self,
        start: usize,
        t: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        if start + t <= self.table_len {
            Ok((self.cos.narrow(0, start, t)?, self.sin.narrow(0, start, t)?))
        } else {
            Self::compute(&self.inv_freq, start, t, device)
        }
    }
}

/// Applies `rope_scaling` to `inv_freq`. Supports `default` (no-op) and `llama3`.
fn apply_rope_scaling(scaling: &serde_json::Value, inv_freq: &mut [f64]) -> Result<()> {
    let bad = |msg: String| ModelError::Unsupported(format!("rope_scaling: {msg}"));
    if scaling.is_null() {
        return Ok(());
    }
    let obj = scaling
        .as_object()
        .ok_or_else(|| bad(format!("expected an object, got {scaling}")))?;
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    match kind {
        "default" => Ok(()),
        "llama3" => {
            let num = |k: &str| -> Result<f64> {
                obj.get(k)
                    .and_then(|v| v.as_f64())
                    .ok_or_else(|| bad(format!("llama3 scaling needs numeric `{k}`")))
            };
            let factor = num("factor")?;
            let low = num("low_freq_factor")?;
            let high = num("high_freq_factor")?;
            let old_ctx = num("original_max_position_embeddings")?;
            if factor <= 0.0 || high <= low || low <= 0.0 || old_ctx <= 0.0 {
                return Err(bad(format!(
                    "invalid llama3 parameters (factor {factor}, low_freq_factor {low}, high_freq_factor {high}, original_max_position_embeddings {old_ctx})"
                )));
            }
            let low_wl = old_ctx / low;
            let high_wl = old_ctx / high;
            for f in inv_freq.iter_mut() {
                let wl = 2.0 * std::f64::consts::PI / *f;
                *f = if wl < high_wl {
                    *f
                } else if wl > low_wl {
                    *f / factor
                } else {
                    let smooth = (old_ctx / wl - low) / (high - low);
                    (1.0 - smooth) * *f / factor + smooth * *f
                };
            }
            Ok(())
        }
        other => Err(bad(format!(
            "type `{other}` is not supported (supported: default, llama3)"
        ))),
    }
}
