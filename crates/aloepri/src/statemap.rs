//! The maps between a plaintext model's internal states and its obfuscated model's, regenerated
//! from the client key (seed + params) and the plaintext config: what a probe that reads
//! internal states (HaluProbe) needs to be moved into the obfuscated model's coordinates.
//!
//! [`StateMaps::regenerate`] replays the key draws of [`crate::compiler::compile_weights`] in
//! the same order from the key's seed (tau, Algorithm 1 `Init`, then per layer the attention,
//! FFN and residual keys). It checks the replayed tau against the key's, so a key made for
//! another vocabulary or special-token set is refused.
//!
//! **Residual stream.** Every writer adds through some `P_j = [B C_j E] Z` and every reader key
//! `Q = Z^T [B^-1; F; D]` of the same Init satisfies `P_j Q = I` (Algorithm 1), so an obfuscated
//! residual state `x~ = sum_j a_j P_j` gives back `x~ Q = sum_j a_j = x` with ONE `Q`, in every
//! mode. In exact mode (no junk, `lambda = 0`) all writers share `P = [U 0 0] Z` with
//! `P P^T = I`, so also `x~ = x P` and Gram matrices of states are preserved. In approximate
//! modes `x` is the obfuscated model's own (perturbed) plaintext-coordinate state.
//!
//! **Heads.** Query head `g * groups + j` of a layer becomes head
//! `tau_kv[g] * groups + tau_group[g][j]` (Algorithm 2); its attention probabilities are
//! unchanged in exact mode (`R`, `H` commute with RoPE; `Zb = I` at `beta = 1`).
//!
//! **FFN.** Neuron `perm[t]` of the plaintext SwiGLU becomes neuron `t`, with its `up` output
//! (hence its activation `silu(gate) * up`) scaled by `scale[perm[t]] > 0`.
use crate::error::{AloeError, Result};
use crate::keyfile::ClientKey;
use crate::keys::{HeadKeys, KeyInit};
use crate::linalg::permutation;
use crate::params::ObfuscationParams;
use crate::tau::TokenPermutation;
use nalgebra::DMatrix;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use umbra_model::LlamaConfig;

/// Per-layer FFN neuron map: `perm[t]` = plaintext neuron of obfuscated neuron `t`;
/// `scale[i]` = factor on plaintext neuron `i`'s activation.
#[derive(Debug, Clone, PartialEq)]
pub struct FfnMap {
    pub perm: Vec<u32>,
    pub scale: Vec<f32>,
}

/// The regenerated state maps of one obfuscated checkpoint.
#[derive(Debug, Clone)]
pub struct StateMaps {
    pub params: ObfuscationParams,
    /// Plaintext hidden size `d`.
    pub d: usize,
    /// Obfuscated hidden size `d' = d + 2h`.
    pub d_prime: usize,
    /// A reader key `Q` (`d' x d`): `x = x~ Q` for every residual-stream state (row vectors).
    pub q: DMatrix<f64>,
    /// `head_perm[l][i]`: obfuscated index of plaintext query head `i` in layer `l`.
    pub head_perm: Vec<Vec<usize>>,
    /// FFN neuron maps, one per layer.
    pub ffn: Vec<FfnMap>,
}

impl StateMaps {
    /// Replays the compiler's key draws for the plaintext `cfg` (with the `special_ids` the
    /// compiler kept fixed, [`crate::compiler::special_ids`]) from `key`'s seed and params.
    /// Errors when the replayed tau differs from the key's (another checkpoint's key).
    pub fn regenerate(cfg: &LlamaConfig, special_ids: &[u32], key: &ClientKey) -> Result<Self> {
        let params = key.params;
        params.validate()?;
        cfg.validate()?;
        if key.tau.len() != cfg.vocab_size {
            return Err(AloeError::Input(format!(
                "the key covers {} tokens but the plaintext model has {}: the key was made for another checkpoint",
                key.tau.len(),
                cfg.vocab_size
            )));
        }
        let d = cfg.hidden_size;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let groups = nh / nkv;
        let mut rng = ChaCha20Rng::seed_from_u64(key.seed);
        // Same order as compiler::compile_weights.
        let tau = TokenPermutation::random(&mut rng, cfg.vocab_size, special_ids);
        if tau.forward_table() != key.tau.as_slice() {
            return Err(AloeError::Input(
                "replaying the key's seed does not give the key's token permutation: the key was \
                 made for another checkpoint (vocabulary or special tokens differ)"
                    .into(),
            ));
        }
        let init = KeyInit::new(&mut rng, d, &params)?;
        let d_prime = init.d_prime();
        let _noise_e: u64 = rng.random();
        let _noise_h: u64 = rng.random();
        let _p_embed = init.p_key(&mut rng);
        let mut head_perm = Vec::with_capacity(cfg.num_hidden_layers);
        let mut ffn = Vec::with_capacity(cfg.num_hidden_layers);
        let mut q_first = None;
        for _ in 0..cfg.num_hidden_layers {
            let q_q = init.q_key(&mut rng);
            q_first.get_or_insert(q_q);
            let _q_k = init.q_key(&mut rng);
            let _q_v = init.q_key(&mut rng);
            for _ in 0..nkv {
                HeadKeys::draw(&mut rng, hd, params.beta)?;
            }
            let tau_kv = permutation(&mut rng, nkv);
            let tau_group: Vec<Vec<usize>> =
                (0..nkv).map(|_| permutation(&mut rng, groups)).collect();
            let _p_o = init.p_key(&mut rng);
            let _q_gate = init.q_key(&mut rng);
            let _q_up = init.q_key(&mut rng);
            let perm: Vec<u32> = permutation(&mut rng, cfg.intermediate_size)
                .into_iter()
                .map(|x| x as u32)
                .collect();
            let scale: Vec<f32> = (0..cfg.intermediate_size)
                .map(|_| 2f32.powf(rng.random_range(-1.0..1.0)))
                .collect();
            let _p_down = init.p_key(&mut rng);
            let mut hp = vec![0usize; nh];
            for g in 0..nkv {
                for (j, &in_group) in tau_group[g].iter().enumerate().take(groups) {
                    hp[g * groups + j] = tau_kv[g] * groups + in_group;
                }
            }
            head_perm.push(hp);
            ffn.push(FfnMap { perm, scale });
        }
        let q = match q_first {
            Some(q) => q,
            None => init.q_key(&mut rng),
        };
        Ok(Self {
            params,
            d,
            d_prime,
            q,
            head_perm,
            ffn,
        })
    }

    /// `x = x~ Q` for one obfuscated residual row (`d'` values) -> `d` values.
    pub fn to_plain(&self, x_obf: &[f32]) -> Result<Vec<f32>> {
        if x_obf.len() != self.d_prime {
            return Err(AloeError::Input(format!(
                "state has {} values, the obfuscated hidden size is {}",
                x_obf.len(),
                self.d_prime
            )));
        }
        Ok((0..self.d)
            .map(|j| {
                x_obf
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| v as f64 * self.q[(i, j)])
                    .sum::<f64>() as f32
            })
            .collect())
    }
}
