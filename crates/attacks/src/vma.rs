//! VMA, the vocabulary-matching attack (Thomas et al., ICML'25) on weight products.
//!
//! Assumption: every reader key `Q` undoes every writer key `P` of the same model (`P Q = I`,
//! Algorithm 1), so products of a vocabulary matrix with a reader are key-free up to a
//! permutation on the right: `We~ Wh~^T = Pi We* Wh*'^T Pi^T` and
//! `We~ Wgate~^T = Pi We* Wgate'^T Z_f` (Z_f the FFN neuron permutation). Sorting each row of such
//! a product cancels the right-hand permutation, so row `tau(i)` of the obfuscated product and
//! row `i` of the plaintext one have the same sorted values; only the embedding/head noise
//! (`alpha_e`, `alpha_h`) separates them. Each source (head, gate of each chosen layer) gives
//! ranked nearest neighbours of the sorted-row signatures; the sources vote (cross-layer voting).
//!
//! Cost: per source two `V x d x m` products (`m` = V for the head, d_ffn for a gate) plus
//! `V x V x 2 top` for matching: on SmolLM2 (V 49152) about 3 TFLOP for the head source.
use crate::error::Result;
use crate::linalg::{nearest_k, row_signatures, select_rows, top_k_indices};
use crate::score::Recovery;
use crate::target::Target;
use crate::vote::{from_lists, vote};
use candle_core::Tensor;
use umbra_common::progress::Progress;

#[derive(Debug, Clone)]
pub struct VmaConfig {
    /// Values kept from each end of a sorted product row.
    pub top: usize,
    /// Use the `We Wh^T` source.
    pub head: bool,
    /// Layers whose `We Wgate^T` products vote too.
    pub gate_layers: Vec<usize>,
    /// Candidates kept per obfuscated id.
    pub k: usize,
    /// Head-source signatures over this many columns: the tokens of largest `We[i] . Wh[i]` on
    /// each side (key-free: `P Q = I` makes the diagonal of `We~ Wh~^T` that of `We Wh^T`,
    /// permuted). `None`: all V, or 4096 when a full `V x V` pass exceeds
    /// [`crate::linalg::PROJECT_ABOVE`].
    pub columns: Option<usize>,
}

impl Default for VmaConfig {
    fn default() -> Self {
        Self {
            top: 32,
            head: true,
            gate_layers: vec![0],
            k: 10,
            columns: None,
        }
    }
}

/// Ranked candidates from one product source.
fn source(
    plain_x: &Tensor,
    plain_y: &Tensor,
    obf_x: &Tensor,
    obf_y: &Tensor,
    cfg: &VmaConfig,
    what: &str,
) -> Result<Recovery> {
    let (v, _) = plain_x.dims2()?;
    let pb = Progress::new((3 * v) as u64, what);
    let sp = row_signatures(plain_x, plain_y, cfg.top, &|n| pb.set_position(n as u64))?;
    let so = row_signatures(obf_x, obf_y, cfg.top, &|n| pb.set_position((v + n) as u64))?;
    let c = 2 * cfg.top;
    let sp = crate::linalg::tensor(sp, v, c)?;
    let so = crate::linalg::tensor(so, v, c)?;
    let nn = nearest_k(&so, &sp, cfg.k, &|n| pb.set_position((2 * v + n) as u64))?;
    pb.finish();
    Ok(from_lists(&nn))
}

/// Runs VMA; returns ranked plaintext candidates per obfuscated id.
pub fn run(t: &Target, cfg: &VmaConfig) -> Result<Recovery> {
    let pe = t.plain_embed()?;
    let oe = t.obf_embed()?;
    let mut sources = vec![];
    if cfg.head {
        let ph = t.fold_final_norm(&t.plain_head_raw()?)?;
        let oh = t.obf_head()?;
        let (v, d) = pe.dims2()?;
        let columns = cfg.columns.or_else(|| {
            ((v as f64) * (v as f64) * (d as f64) > crate::linalg::PROJECT_ABOVE).then_some(4096)
        });
        let (ph, oh) = if let Some(n) = columns {
            let diag = |e: &Tensor, h: &Tensor| -> Result<Vec<f32>> {
                Ok((e * h)?.sum(1)?.to_vec1::<f32>()?)
            };
            let n = n.clamp(2 * cfg.top, v);
            let pc = top_k_indices(&diag(&pe, &ph)?, n);
            let oc = top_k_indices(&diag(&oe, &oh)?, n);
            (select_rows(&ph, &pc)?, select_rows(&oh, &oc)?)
        } else {
            (ph, oh)
        };
        sources.push(source(&pe, &ph, &oe, &oh, cfg, "vma head")?);
        tracing::info!("vma: head source done");
    }
    for &l in &cfg.gate_layers {
        if l >= t.layers() {
            return Err(crate::error::AttackError::Input(format!(
                "layer {l} out of range (the model has {})",
                t.layers()
            )));
        }
        let (pg, og) = t.gate(l)?;
        sources.push(source(&pe, &pg, &oe, &og, cfg, &format!("vma gate {l}"))?);
        tracing::info!("vma: gate source of layer {l} done");
    }
    Ok(vote(&sources, t.vocab(), cfg.k))
}
