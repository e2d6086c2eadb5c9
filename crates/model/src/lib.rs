//! `umbra-model`: real checkpoints (HF folders, GGUF), tokenizers and chat templates, and a
//! Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) with KV cache and sampling, on candle.
//!
//! Data flow: [`checkpoint::Checkpoint::open`] reads a folder or a GGUF file into a
//! [`config::LlamaConfig`], a [`weights::Weights`] map in HF layout and naming, and a
//! [`tokenizer::TextTokenizer`]; [`llama::Llama`] runs the forward pass; [`generate`] samples.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod llama;
mod matvec;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use config::{LlamaConfig, ModelPart};
pub use error::{ModelError, Result};
pub use weights::Weights;
