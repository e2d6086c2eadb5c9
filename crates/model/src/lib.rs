//! `umbra-model`: real checkpoints (HF folders, GGUF), tokenizers and chat templates, and a
//! Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) with KV cache, taps and sampling, on candle.
//!
//! Data flow: [`checkpoint::Checkpoint::open`] reads a folder or a GGUF file into a
//! [`config::LlamaConfig`], a [`weights::Weights`] map in HF layout and naming, and a
//! [`tokenizer::TextTokenizer`]; [`llama::Llama`] runs the one forward pass, with every linear
//! product computed by a [`linear::LinearBackend`] chosen at load; [`generate`] samples.
//!
//! Modules: `llama` (the model and its blocks), `linear` (the backend seam), `kv_cache`, `rope`,
//! `taps`, `kernels` (CPU decode kernels, quantized products), `quant` (GGUF block types kept
//! quantized, the quantized backend), `testing` (seeded random models, feature `testing`).

pub mod checkpoint;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod kernels;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod load;
pub mod quant;
#[cfg(feature = "assets")]
pub mod resolve;
pub mod rope;
pub mod sampling;
pub mod taps;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tokenizer;
pub mod weights;

pub use config::{LlamaConfig, ModelPart};
pub use error::{ModelError, Result};
pub use kv_cache::KvCache;
pub use llama::{Forward, Input, Llama, Output};
pub use taps::{Tap, TapOptions, TapPoint};
pub use weights::Weights;
