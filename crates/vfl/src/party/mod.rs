//! The two party roles. The same code runs both in one process (in-process transport) and as two
//! processes talking over NATS.
//!
//! - [`batches`]: the batch layout both parties derive from the job seed;
//! - [`scheduler`]: leases on batch ids (reassignment after a deadline or a lost worker);
//! - [`wire`]: topics, traffic counters, publishing and decoding;
//! - [`passive`]: the passive party (features, bottom model, cut layer) — its workers publish
//!   embeddings and back-propagate the gradients that come back;
//! - [`active`]: the active party (labels, bottom and top model) — its workers answer each
//!   embedding with `dL/dz_p`; its control loop evaluates each epoch.
//!
//! Both sides keep the state their threads share in one struct (`ActiveShared`,
//! `PassiveShared`); workers take that struct and their own replica.
pub mod active;
pub mod batches;
pub mod passive;
pub(crate) mod scheduler;
pub mod wire;

pub use active::{run_active, ActiveSummary, EvalResult};
pub use batches::Batches;
pub use passive::{run_passive, PassiveEpoch, PassiveSummary};
pub use wire::{Counters, EVAL_CHUNK, TOPIC_CTRL_ACTIVE, TOPIC_CTRL_PASSIVE};
