//! NN: nearest neighbour between obfuscated and plaintext embedding rows.
//!
//! Assumption: the obfuscated residual basis is the plaintext one (no key `P`), so row `tau(i)`
//! of `We~` is row `i` of `We` plus noise. Rows are compared by cosine on their first
//! `min(d, d')` coordinates. Any key `P` defeats it (the paper's 0%); it is the baseline that
//! shows what the noise alone does. Cost: one `V x V x d` product.
use crate::error::Result;
use crate::linalg::nearest_k;
use crate::score::Recovery;
use crate::target::Target;
use crate::vote::from_lists;
use candle_core::Tensor;
use umbra_common::progress::Progress;

fn unit_rows(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&n)?)
}

/// Runs NN with `k` candidates per obfuscated id.
pub fn run(t: &Target, k: usize) -> Result<Recovery> {
    let pe = t.plain_embed()?;
    let oe = t.obf_embed()?;
    let w = pe.dims2()?.1.min(oe.dims2()?.1);
    let pe = unit_rows(&pe.narrow(1, 0, w)?.contiguous()?)?;
    let oe = unit_rows(&oe.narrow(1, 0, w)?.contiguous()?)?;
    let v = t.vocab();
    let pb = Progress::new(v as u64, "nn");
    let nn = nearest_k(&oe, &pe, k, &|n| pb.set_position(n as u64))?;
    pb.finish();
    Ok(from_lists(&nn))
}
