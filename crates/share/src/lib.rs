//! `umbra-share`: private inference by two-server additive secret sharing of every linear
//! layer (issue 17).
//!
//! The model's weights are public; the client's tokens are not. Every linear map of every
//! block (fused q/k/v, o, fused gate/up, down) and the LM head is computed by two servers on
//! additive shares in Z_2^64: the client encodes the map's input `x` in fixed point, draws a
//! fresh uniform mask `r`, sends `x - r` to server A and `r` to server B (as a seed and a stream
//! number: B's work does not depend on the input, so B can do it ahead), and adds the two
//! products (`(x - r) W^T + r W^T = x W^T`). Everything else (embedding, norms, RoPE,
//! attention and its KV cache, SiLU, residuals, sampling) is the ordinary engine on the client.
//! Either server alone sees uniformly random ring elements: the number of rows and the timing,
//! nothing else. The guarantee fails if the two servers collude.
//!
//! | module | what |
//! |---|---|
//! | [`ring`] | `Z_2^64` GEMM of 64-bit shares by i16 public weights (AVX2, AVX-512 VNNI, portable) |
//! | [`fixed`] | the fixed-point format (per-row exponent activations, per-row scale i16 weights) |
//! | [`check`] | range + Freivalds integrity checks and their bound |
//! | [`public`] | the quantized public maps of a checkpoint and their fingerprint |
//! | [`backend`] | the client's `LinearBackend` (`ShareLinear`: encode, mask, round trip, check, decode) |
//! | [`model`] | a share-mode `Llama` opened and connected |
//! | [`client`], [`server`], [`frame`], [`tls`] | the links: TLS 1.3, binary frames, batching servers |
//! | [`prepare`] | server B's masks from a seed, and their products computed ahead at idle priority |
//! | [`transcript`], [`secrecy`], [`attack`] | a server's recorded view, its statistics, the attacks on it |
//! | [`bench`] | `umbra bench share`: speed, traffic and client CPU against local plaintext generation |
//! | `cli` | clap arguments and entry points (feature `cli`) |
pub mod attack;
pub mod backend;
pub mod bench;
pub mod check;
pub mod client;
pub mod error;
pub mod fixed;
pub mod frame;
pub mod inputs;
pub mod lanes;
pub mod model;
pub mod prepare;
pub mod public;
pub mod ring;
pub mod secrecy;
pub mod server;
pub mod tls;
pub mod transcript;

pub use error::{Result, ShareError};
#[cfg(feature = "cli")]
pub mod cli;
