//! `umbra-aloepri`: AloePri covariant obfuscation (arXiv 2603.01499), the paper of
//! `shared/papers/aloepri.md`.
//!
//! A secret [`keys::KeyInit`] (Algorithm 1) and a vocabulary permutation [`tau::TokenPermutation`]
//! turn a public Llama-family checkpoint into an obfuscated one that any HF-compatible engine serves
//! unchanged. [`compiler::compile_checkpoint`] (or [`compiler::compile_to`], which also writes
//! GGUF for llama.cpp through [`gguf_out`]) reads the checkpoint tensor by tensor from a
//! [`source::CheckpointSource`], runs each through the per-component transforms of [`transform`]
//! ([`tensor_compiler::compile_source`]), writes it, and writes the client's
//! [`keyfile::ClientKey`].
//! [`split_parts`] cuts an exact obfuscation into a blocks-only server part and the client's
//! embedding/head part (split mode, beyond the paper). [`fidelity`] measures the obfuscated model against the plaintext one on the same inputs.
//!
//! Row-vector convention throughout the docs: `y = x W`, `x` a row of width `d`. HF stores a linear
//! layer as `W^T` (`[out, in]`).

#[cfg(feature = "cli")]
pub mod cli;
pub mod compiler;
pub mod error;
pub mod fidelity;
pub mod gguf_out;
pub mod keyfile;
pub mod keys;
pub mod linalg;
pub mod params;
pub mod source;
pub mod split_parts;
pub mod statemap;
pub mod tau;
pub mod tensor_compiler;
pub mod transform;
pub mod writer;

pub use error::{AloeError, Result};
pub use keyfile::ClientKey;
pub use params::ObfuscationParams;
pub use tau::TokenPermutation;
