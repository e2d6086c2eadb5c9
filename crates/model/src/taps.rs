//! Taps: read-only hooks on the forward pass's internal states, for probes and attacks.
//!
//! A [`Tap`] is given to a pass through [`crate::llama::Forward::tap`] (or
//! [`crate::llama::Forward::taps`] with [`TapOptions`] for the opt-in points). It sees live
//! activations (cheap handles, no copies) and cannot change them.
use candle_core::Tensor;

/// Where a [`Tap`] is called during a forward pass, in this order per block:
/// `Attention(i)` (opt-in), `Ffn(i)` (opt-in), `Layer(i)`.
///
/// Follows HF `output_hidden_states` except that the last entry is *before* the final norm:
/// `Embeddings` = HF `hidden_states[0]` (the input of the pass's first block), `Layer(i)` =
/// residual stream after block `i` (HF `hidden_states[i+1]` for `i < n-1`), `FinalNorm` = after
/// `model.norm` (HF's last entry; only when the pass runs the head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapPoint {
    Embeddings,
    Layer(usize),
    /// The normed rows the LM head reads.
    FinalNorm,
    /// Attention probabilities of block `i`, `[b, nh, t, L]` (rows sum to 1, causal).
    /// Opt-in ([`TapOptions::attention`]): attention then runs with candle ops for every `t`
    /// (no one-position fast path) so that the probabilities exist; results are identical.
    Attention(usize),
    /// The SwiGLU intermediate activation of block `i`, `act(gate(h)) * up(h)` with
    /// `h = post_attention_layernorm(x + attn)`, `[.., intermediate_size]`: the input of
    /// `down_proj`, so `Layer(i) = x + attn + down_proj(Ffn(i))`. Opt-in ([`TapOptions::ffn`]);
    /// free (the activation exists anyway; the tap only hands out a handle to it).
    Ffn(usize),
}

/// Which opt-in taps a pass emits besides [`TapPoint::Embeddings`], [`TapPoint::Layer`] and
/// [`TapPoint::FinalNorm`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TapOptions {
    /// [`TapPoint::Attention`].
    pub attention: bool,
    /// [`TapPoint::Ffn`].
    pub ffn: bool,
}

impl TapOptions {
    /// Residual-stream taps only.
    pub const NONE: Self = Self {
        attention: false,
        ffn: false,
    };
    pub const ATTENTION: Self = Self {
        attention: true,
        ffn: false,
    };
    pub const FFN: Self = Self {
        attention: false,
        ffn: true,
    };
    pub const ALL: Self = Self {
        attention: true,
        ffn: true,
    };
}

/// A read-only hook on internal states; the tensor is the live activation (cheap clone).
pub type Tap<'a> = &'a mut dyn FnMut(TapPoint, &Tensor);
