//! llama.cpp <-> HF tensor names, and llama.cpp's q/k row permutation for `llama` files.
use crate::error::{ModelError, Result};
use candle_core::Tensor;
/// llama.cpp <-> HF names of the whole-model tensors.
const GLOBAL_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// llama.cpp <-> HF names of the per-layer tensors (`blk.N.{gguf}` <-> `model.layers.N.{hf}`).
const LAYER_NAMES: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Renames `name` from one naming to the other: `to_hf` picks the direction.
fn rename(name: &str, to_hf: bool) -> Option<String> {
    let pick = |pair: &(&'static str, &'static str)| {
        if to_hf {
            (pair.0, pair.1)
        } else {
            (pair.1, pair.0)
        }
    };
    if let Some((_, to)) = GLOBAL_NAMES
        .iter()
        .map(pick)
        .find(|(from, _)| *from == name)
    {
        return Some(to.to_string());
    }
    let (prefix_in, prefix_out) = if to_hf {
        ("blk.", "model.layers.")
    } else {
        ("model.layers.", "blk.")
    };
    let (layer, rest) = name.strip_prefix(prefix_in)?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let (_, to) = LAYER_NAMES
        .iter()
        .map(pick)
        .find(|(from, _)| *from == part)?;
    Some(format!("{prefix_out}{layer}.{to}.{kind}"))
}

/// Maps a llama.cpp tensor name to its HF name (`None` for names we do not know).
pub fn hf_name(gguf: &str) -> Option<String> {
    rename(gguf, true)
}

/// Maps an HF tensor name to its llama.cpp name (inverse of [`hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    rename(hf, false)
}

/// llama.cpp's q/k row permutation (`convert_hf_to_gguf.py` `permute`): for `w` of shape
/// `[n_head * head_dim, in]` (or `[n_head * head_dim]` for a bias),
/// `w.reshape(n_head, 2, head_dim/2, in).swapaxes(1, 2).reshape(out, in)`.
pub fn permute_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    reorder_rows(w, n_head, false)
}

/// Inverse of [`permute_rows`]: `w.reshape(n_head, head_dim/2, 2, in).swapaxes(1, 2).reshape(out, in)`.
pub fn unpermute_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    reorder_rows(w, n_head, true)
}

/// The row order of [`unpermute_rows`]: row `i` of the result is row `order[i]` of the input
/// (`out` rows in `n_head` heads).
pub fn unpermute_order(out: usize, n_head: usize) -> Result<Vec<usize>> {
    if n_head == 0 || !out.is_multiple_of(2 * n_head) {
        return Err(ModelError::Mismatch(format!(
            "cannot split {out} rows into {n_head} heads of even width"
        )));
    }
    let hd = out / n_head;
    let half = hd / 2;
    // Result row (h, a, b) of (n_head, 2, half) is input row (h, b, a) of (n_head, half, 2).
    Ok((0..out)
        .map(|i| {
            let (h, r) = (i / hd, i % hd);
            let (a, b) = (r / half, r % half);
            h * hd + 2 * b + a
        })
        .collect())
}

fn reorder_rows(w: &Tensor, n_head: usize, inverse: bool) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let out = dims[0];
    let inner: usize = dims[1..].iter().product();
    if n_head == 0 || !out.is_multiple_of(2 * n_head) {
        return Err(ModelError::Mismatch(format!(
            "cannot split {out} rows into {n_head} heads of even width"
        )));
    }
    let half = out / n_head / 2;
    let (a, b) = if inverse { (half, 2) } else { (2, half) };
    let t = w
        .reshape((n_head, a, b, inner))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn permute_then_unpermute_is_identity_and_matches_numpy() {
        // n_head = 2, head_dim = 4, in = 3.
        let w = Tensor::arange(0f32, 24., &Device::Cpu)
            .unwrap()
            .reshape((8, 3))
            .unwrap();
        let p = permute_rows(&w, 2).unwrap();
        // numpy: rows of head h go [0, 2, 1, 3] (interleave the two halves).
        let rows: Vec<f32> = p
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(rows, vec![0., 6., 3., 9., 12., 18., 15., 21.]);
        let back = unpermute_rows(&p, 2).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        let b = Tensor::arange(0f32, 8., &Device::Cpu).unwrap();
        let pb = permute_rows(&b, 2).unwrap();
        assert_eq!(
            pb.to_vec1::<f32>().unwrap(),
            vec![0., 2., 1., 3., 4., 6., 5., 7.]
        );
        assert_eq!(
            unpermute_rows(&pb, 2).unwrap().to_vec1::<f32>().unwrap(),
            b.to_vec1::<f32>().unwrap()
        );
        assert!(unpermute_rows(&w, 3).is_err());
        // The row order gives the same rows as the tensor reshuffle.
        let order = unpermute_order(8, 2).unwrap();
        let pv = p.to_vec2::<f32>().unwrap();
        let by_order: Vec<Vec<f32>> = order.iter().map(|&r| pv[r].clone()).collect();
        assert_eq!(by_order, w.to_vec2::<f32>().unwrap());
        assert!(unpermute_order(8, 3).is_err());
    }

    #[test]
    fn names_map_both_ways() {
        for (g, h) in [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output.weight", "lm_head.weight"),
            ("output_norm.weight", "model.norm.weight"),
            (
                "blk.12.attn_q.bias",
                "model.layers.12.self_attn.q_proj.bias",
            ),
            (
                "blk.0.attn_output.weight",
                "model.layers.0.self_attn.o_proj.weight",
            ),
            (
                "blk.3.ffn_down.weight",
                "model.layers.3.mlp.down_proj.weight",
            ),
            (
                "blk.3.ffn_norm.weight",
                "model.layers.3.post_attention_layernorm.weight",
            ),
            (
                "blk.3.attn_norm.weight",
                "model.layers.3.input_layernorm.weight",
            ),
        ] {
            assert_eq!(hf_name(g).as_deref(), Some(h));
            assert_eq!(gguf_name(h).as_deref(), Some(g));
        }
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
