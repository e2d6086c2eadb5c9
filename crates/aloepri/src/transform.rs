//! Per-component AloePri transforms on HF-layout tensors (`[out, in]`).
//!
//! With row convention `y = x W` and HF storing `W^T`, a reader `W~ = Q W'` becomes
//! `W~_hf = W'_hf Q^T` and a writer `W~ = W P` becomes `W~_hf = P^T W_hf`. RMSNorm weights are
//! folded into the readers that follow them (`W' = diag(w) W`).
use crate::error::Result;
use crate::keys::HeadKeys;
use crate::linalg::to_tensor;
use candle_core::{DType, Device, Tensor, D};
use nalgebra::DMatrix;

/// Reader of the residual stream: `W~_hf = (W_hf * norm_w) Q^T`.
///
/// `w_hf`: `[out, d]`, `norm_w`: `[d]` (folded RMSNorm weight), `q`: `[d', d]` -> `[out, d']`.
pub fn reader(w_hf: &Tensor, norm_w: Option<&Tensor>, q: &Tensor) -> Result<Tensor> {
    let w = match norm_w {
        Some(n) => w_hf.broadcast_mul(&n.unsqueeze(0)?)?,
        None => w_hf.clone(),
    };
    Ok(w.matmul(&q.t()?)?)
}

/// Writer into the residual stream: `W~_hf = P^T W_hf`. `w_hf`: `[d, in]`, `p`: `[d, d']` -> `[d', in]`.
pub fn writer(w_hf: &Tensor, p: &Tensor) -> Result<Tensor> {
    Ok(p.t()?.matmul(w_hf)?)
}

/// Bias of a writer: `b~ = b P`. `b`: `[d]` -> `[d']`.
pub fn writer_bias(b: &Tensor, p: &Tensor) -> Result<Tensor> {
    Ok(b.unsqueeze(0)?.matmul(p)?.squeeze(0)?)
}

/// Adds `alpha * std(W) * N(0, 1)` noise (the paper's `W* = W + alpha N(0, sigma^2)`), seeded.
/// Works in place on one F32 copy of `w` (no separate noise matrix).
pub fn add_noise(w: &Tensor, alpha: f64, seed: u64) -> Result<Tensor> {
    if alpha == 0.0 {
        return Ok(w.clone());
    }
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};
    let mut data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let n = data.len().max(1) as f64;
    let mean = data.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = data.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    let scale = alpha * var.sqrt();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    for x in data.iter_mut() {
        let z: f64 = StandardNormal.sample(&mut rng);
        *x += (z * scale) as f32;
    }
    Ok(Tensor::from_vec(data, w.shape(), w.device())?.to_dtype(w.dtype())?)
}

/// Embedding `We~ = Pi We* P_embed`: row `tau(i)` of the result is `We*[i] P`.
/// `we`: `[V, d]`, `p`: `[d, d']`, `tau_inv[t]` = plaintext id of obfuscated id `t` (a slice of
/// consecutive obfuscated ids gives those rows) -> `[len, d']`.
pub fn embedding(we: &Tensor, p: &Tensor, tau_inv: &[u32]) -> Result<Tensor> {
    Ok(permute_rows(we, tau_inv)?.to_dtype(p.dtype())?.matmul(p)?)
}

/// LM head `Wh~ = Q_head Wh* Pi^T` with the final norm folded in: row `tau(i)` of the HF result
/// is `(Wh*_hf[i] * w_norm) Q^T`. `wh`: `[V, d]`, `q`: `[d', d]` -> `[V, d']`.
pub fn lm_head(wh: &Tensor, final_norm: &Tensor, q: &Tensor, tau_inv: &[u32]) -> Result<Tensor> {
    reader(
        &permute_rows(wh, tau_inv)?.to_dtype(q.dtype())?,
        Some(final_norm),
        q,
    )
}

/// `out[t] = x[src[t]]`.
pub fn permute_rows(x: &Tensor, src: &[u32]) -> Result<Tensor> {
    let idx = Tensor::from_slice(src, src.len(), x.device())?;
    Ok(x.index_select(&idx, 0)?)
}

/// Attention keys of one layer as dense `[nh*hd]`-square matrices that also carry the KV-head
/// permutation `tau_kv` and the in-group query-head permutations `tau_group` (Algorithm 2).
pub struct AttentionTransform {
    /// `M_q` (`[nh*hd, nh*hd]`): old q column block `i` -> new block, times `R H Zb` of its group.
    pub m_q: Tensor,
    /// `M_k` (`[nkv*hd, nkv*hd]`): `R H^-1 Zb`, KV heads permuted.
    pub m_k: Tensor,
    /// `M_v` (`[nkv*hd, nkv*hd]`): `U_vo`, KV heads permuted.
    pub m_v: Tensor,
    /// `M_o` (`[nh*hd, nh*hd]`): rows of `Wo`: new q head block gets `U_vo^-1` of its group.
    pub m_o: Tensor,
}

impl AttentionTransform {
    /// `heads[g]`: keys of old KV head `g`; `tau_kv[g]`: its new index; `tau_group[g][j]`: new
    /// in-group index of old query head `g * groups + j`.
    pub fn new(
        heads: &[HeadKeys],
        tau_kv: &[usize],
        tau_group: &[Vec<usize>],
        n_heads: usize,
        hd: usize,
        device: &Device,
    ) -> Result<Self> {
        let n_kv = heads.len();
        let groups = n_heads / n_kv;
        let mut m_q = DMatrix::zeros(n_heads * hd, n_heads * hd);
        let mut m_o = DMatrix::zeros(n_heads * hd, n_heads * hd);
        let mut m_k = DMatrix::zeros(n_kv * hd, n_kv * hd);
        let mut m_v = DMatrix::zeros(n_kv * hd, n_kv * hd);
        for (g, hk) in heads.iter().enumerate() {
            let ng = tau_kv[g];
            m_k.view_mut((g * hd, ng * hd), (hd, hd)).copy_from(&hk.k);
            m_v.view_mut((g * hd, ng * hd), (hd, hd)).copy_from(&hk.v);
            for (j, &in_group) in tau_group[g].iter().enumerate().take(groups) {
                let old = g * groups + j;
                let new = ng * groups + in_group;
                m_q.view_mut((old * hd, new * hd), (hd, hd))
                    .copy_from(&hk.q);
                m_o.view_mut((new * hd, old * hd), (hd, hd))
                    .copy_from(&hk.o);
            }
        }
        Ok(Self {
            m_q: to_tensor(&m_q, device)?,
            m_k: to_tensor(&m_k, device)?,
            m_v: to_tensor(&m_v, device)?,
            m_o: to_tensor(&m_o, device)?,
        })
    }

    /// `W~_hf = M^T (W_hf * norm_w) Q^T` for q/k/v (`m` = `m_q`, `m_k` or `m_v`).
    pub fn qkv(m: &Tensor, w_hf: &Tensor, norm_w: &Tensor, q: &Tensor) -> Result<Tensor> {
        Ok(m.t()?.matmul(&reader(w_hf, Some(norm_w), q)?)?)
    }

    /// q/k/v bias: `b~ = b M`.
    pub fn bias(m: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok(b.unsqueeze(0)?.matmul(m)?.squeeze(0)?)
    }

    /// `Wo~ = M_o Wo P_o`, HF: `Wo~_hf = P^T Wo_hf M_o^T`. `wo_hf`: `[d, nh*hd]` -> `[d', nh*hd]`.
    pub fn o(&self, wo_hf: &Tensor, p: &Tensor) -> Result<Tensor> {
        Ok(writer(wo_hf, p)?.matmul(&self.m_o.t()?)?)
    }
}

/// SwiGLU keys: neuron permutation `Z_f` (`perm[new] = old`) and positive scaling `H_f`.
pub struct FfnTransform {
    pub perm: Vec<u32>,
    pub scale: Vec<f32>,
}

impl FfnTransform {
    /// `Wgate~ = Q Wgate' Z_f` -> HF rows permuted: `[ffn, d']`.
    pub fn gate(&self, w_hf: &Tensor, norm_w: &Tensor, q: &Tensor) -> Result<Tensor> {
        permute_rows(&reader(w_hf, Some(norm_w), q)?, &self.perm)
    }

    /// `Wup~ = Q Wup' H_f Z_f` -> `[ffn, d']`.
    pub fn up(&self, w_hf: &Tensor, norm_w: &Tensor, q: &Tensor) -> Result<Tensor> {
        let s = Tensor::from_slice(&self.scale, self.scale.len(), w_hf.device())?
            .to_dtype(w_hf.dtype())?;
        let scaled = reader(w_hf, Some(norm_w), q)?.broadcast_mul(&s.unsqueeze(1)?)?;
        permute_rows(&scaled, &self.perm)
    }

    /// `Wdown~ = Z_f^T H_f^-1 Wdown P` -> HF `P^T Wdown_hf H_f^-1 Z_f`: `[d', ffn]`.
    pub fn down(&self, w_hf: &Tensor, p: &Tensor) -> Result<Tensor> {
        let s = Tensor::from_slice(&self.scale, self.scale.len(), w_hf.device())?
            .to_dtype(w_hf.dtype())?;
        let scaled = w_hf.broadcast_div(&s.unsqueeze(0)?)?;
        let idx = Tensor::from_slice(&self.perm, self.perm.len(), w_hf.device())?;
        let permuted = scaled.index_select(&idx, D::Minus1)?;
        writer(&permuted, p)
    }
}

/// Constant stock-RMSNorm weight `kappa * 1` of width `d'`.
pub fn norm_weight(kappa: f64, d_prime: usize, device: &Device) -> Result<Tensor> {
    Ok(Tensor::full(kappa, d_prime, device)?)
}
