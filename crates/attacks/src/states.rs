//! Hidden states of a model at one layer, as the server running it sees them (IMA and ISA).
use crate::error::{AttackError, Result};
use candle_core::{Device, Tensor};
use umbra_model::llama::{Llama, TapPoint};
use umbra_model::{Forward, Input};
use umbra_model::{LlamaConfig, Weights};

/// Which residual-stream state is observed: the embedding output (HF `hidden_states[0]`) or the
/// output of block `i` (HF `hidden_states[i+1]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateLayer {
    Embeddings,
    Block(usize),
}

impl StateLayer {
    /// `emb` or a block index.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "emb" | "embeddings" => Ok(Self::Embeddings),
            x => x.parse().map(Self::Block).map_err(|_| {
                AttackError::Input(format!("`{s}` is not a state layer (emb or a block index)"))
            }),
        }
    }

    /// Blocks a model must run to reach this state.
    pub fn blocks(self) -> usize {
        match self {
            Self::Embeddings => 1,
            Self::Block(i) => i + 1,
        }
    }
}

/// A model cut after the blocks a [`StateLayer`] needs.
pub struct StateModel {
    model: Llama,
    layer: StateLayer,
}

impl StateModel {
    /// Builds the first blocks of `cfg`/`w` (tensors are shared, not copied, except the F32
    /// conversion the engine does).
    pub fn new(cfg: &LlamaConfig, w: &Weights, layer: StateLayer) -> Result<Self> {
        let n = layer.blocks();
        if n > cfg.num_hidden_layers {
            return Err(AttackError::Input(format!(
                "state layer {layer:?} but the model has {} blocks",
                cfg.num_hidden_layers
            )));
        }
        let mut c = cfg.clone();
        c.num_hidden_layers = n;
        Ok(Self {
            model: Llama::new(&c, w, &Device::Cpu)?,
            layer,
        })
    }

    /// Width of the states.
    pub fn width(&self) -> usize {
        self.model.config().hidden_size
    }

    /// States of every position of every sequence, concatenated: `[sum len, width]` F32.
    pub fn states(&self, seqs: &[Vec<u32>]) -> Result<Tensor> {
        let mut out = vec![];
        for s in seqs.iter().filter(|s| !s.is_empty()) {
            let ids = Tensor::new(s.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let emb = self.model.embed(&ids)?;
            let st = match self.layer {
                StateLayer::Embeddings => emb,
                StateLayer::Block(i) => {
                    let mut got = None;
                    let mut cache = self.model.new_cache();
                    self.model.forward(
                        Input::Embeds(&emb),
                        &mut cache,
                        Forward::hidden().tap(&mut |p, t| {
                            if p == TapPoint::Layer(i) {
                                got = Some(t.clone());
                            }
                        }),
                    )?;
                    got.ok_or_else(|| AttackError::Input(format!("no state at block {i}")))?
                }
            };
            out.push(st.squeeze(0)?.to_dtype(candle_core::DType::F32)?);
        }
        if out.is_empty() {
            return Err(AttackError::Input("no tokens to compute states for".into()));
        }
        Ok(Tensor::cat(&out, 0)?)
    }
}

/// Rows scaled to unit length.
pub fn unit_rows(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&n)?)
}
