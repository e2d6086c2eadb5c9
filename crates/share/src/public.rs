//! The public side of a model: its linear maps quantized to the ring format, in the order the
//! engine builds them, and the fingerprint that client and servers compare at connect.
//!
//! Both sides derive everything from the same checkpoint through the engine's own
//! [`LinearSpec`]s ([`Llama::with_backend`] is called with a backend that records them), so
//! q/k/v and gate/up are fused and the attention scale is folded exactly as in local inference.
use crate::error::{Result, ShareError};
use crate::fixed::QuantWeight;
use candle_core::Device;
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::sync::Arc;
use umbra_model::linear::{Linear, LinearBackend, LinearId, LinearKind, LinearSpec};
use umbra_model::{Llama, LlamaConfig, ModelError, Weights};

/// Version of the quantization and of the fingerprint's layout.
pub const FORMAT_VERSION: u32 = 1;

/// One linear map: its place in the model, the quantized weight, and (client side only) its bias.
#[derive(Debug, Clone)]
pub struct PublicLinear {
    pub id: LinearId,
    pub quant: QuantWeight,
    pub bias: Option<Vec<f32>>,
}

/// Quantizes the map `spec` describes from dense `weights`.
pub fn quantize_spec(spec: &LinearSpec, weights: &Weights) -> Result<PublicLinear> {
    let (w, b) = spec.dense(weights, &Device::Cpu)?;
    let (n, k) = w.dims2()?;
    let data = w.flatten_all()?.to_vec1::<f32>()?;
    let quant = QuantWeight::quantize(&data, n, k)
        .map_err(|e| ShareError::Range(format!("{}: {e}", spec.id)))?;
    let bias = b.map(|b| b.to_vec1::<f32>()).transpose()?;
    Ok(PublicLinear {
        id: spec.id,
        quant,
        bias,
    })
}

/// Running SHA-256 over the quantized maps, in build order.
#[derive(Debug, Clone, Default)]
pub struct Fingerprint(Sha256);

impl Fingerprint {
    pub fn new() -> Self {
        let mut h = Sha256::new();
        h.update(b"umbra-share");
        h.update(FORMAT_VERSION.to_le_bytes());
        Self(h)
    }

    /// Adds map number `index`: its id, shape, row scales and quantized entries.
    pub fn add(&mut self, index: usize, l: &PublicLinear) {
        let h = &mut self.0;
        h.update((index as u32).to_le_bytes());
        h.update(l.id.layer.map_or(-1i64, |v| v as i64).to_le_bytes());
        h.update([kind_code(l.id.kind)]);
        h.update((l.quant.n as u32).to_le_bytes());
        h.update((l.quant.k as u32).to_le_bytes());
        for s in &l.quant.scale {
            h.update(s.to_le_bytes());
        }
        let mut buf = Vec::with_capacity(l.quant.q.len() * 2);
        for q in &l.quant.q {
            buf.extend_from_slice(&q.to_le_bytes());
        }
        h.update(&buf);
    }

    pub fn finish(self) -> [u8; 32] {
        self.0.finalize().into()
    }
}

fn kind_code(k: LinearKind) -> u8 {
    match k {
        LinearKind::Qkv => 0,
        LinearKind::O => 1,
        LinearKind::GateUp => 2,
        LinearKind::Down => 3,
        LinearKind::Head => 4,
    }
}

/// A [`Linear`] that only records that the map exists (the server never runs the model).
#[derive(Debug)]
struct Recorded {
    n: usize,
    k: usize,
}

impl Linear for Recorded {
    fn forward(&self, _x: &candle_core::Tensor) -> umbra_model::Result<candle_core::Tensor> {
        Err(ModelError::Unsupported(
            "a share server holds weights, not a runnable model".into(),
        ))
    }

    fn in_features(&self) -> usize {
        self.k
    }

    fn out_features(&self) -> usize {
        self.n
    }
}

struct Collect<'w> {
    weights: &'w Weights,
    out: RefCell<Vec<PublicLinear>>,
}

impl LinearBackend for Collect<'_> {
    fn build(&self, spec: &LinearSpec) -> umbra_model::Result<Arc<dyn Linear>> {
        let l = quantize_spec(spec, self.weights).map_err(|e| ModelError::Input(e.to_string()))?;
        let r = Recorded {
            n: l.quant.n,
            k: l.quant.k,
        };
        self.out.borrow_mut().push(l);
        Ok(Arc::new(r))
    }

    fn name(&self) -> &str {
        "collect"
    }
}

/// Every linear map of the model quantized, in build order, with the fingerprint.
pub fn collect(cfg: &LlamaConfig, weights: &Weights) -> Result<(Vec<PublicLinear>, [u8; 32])> {
    let c = Collect {
        weights,
        out: RefCell::new(vec![]),
    };
    Llama::with_backend(cfg, weights, &Device::Cpu, &c)?;
    let maps = c.out.into_inner();
    let mut fp = Fingerprint::new();
    for (i, l) in maps.iter().enumerate() {
        fp.add(i, l);
    }
    Ok((maps, fp.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use umbra_model::testing::{random_weights, tiny_config};

    #[test]
    fn maps_come_in_build_order_and_the_fingerprint_tracks_weights() {
        let cfg = tiny_config(32, 4, 2, 2, 64);
        let w = random_weights(&cfg, 1);
        let (maps, fp) = collect(&cfg, &w).unwrap();
        assert_eq!(maps.len(), cfg.num_hidden_layers * 4 + 1);
        assert_eq!(maps[0].id.kind, LinearKind::Qkv);
        assert_eq!(maps[3].id.kind, LinearKind::Down);
        assert_eq!(maps.last().unwrap().id.kind, LinearKind::Head);
        let (_, again) = collect(&cfg, &w).unwrap();
        assert_eq!(fp, again);
        let (_, other) = collect(&cfg, &random_weights(&cfg, 2)).unwrap();
        assert_ne!(fp, other);
    }
}
