//! `umbra-vfl`: two-party split learning (vertical federated learning) on candle, with the
//! PubSub-VFL scheduler (arXiv 2510.12494) and its four baselines.
//!
//! Modules, each with one job:
//! - [`data`]: loaders, synthetic generator, 70/30 split, vertical split, standardisation;
//! - [`model`]: bottom/top MLPs, losses, Adam;
//! - [`cut`]: the [`cut::CutLayer`] trait between the passive bottom model and the wire
//!   (identity, Gaussian DP); [`dp`]: mu-GDP accounting;
//! - [`message`]: the versioned wire format; [`transport`]: the [`transport::Transport`] trait,
//!   in-process bounded channels and NATS;
//! - [`ps`]: parameter servers and the staleness schedule; [`party`]: the passive and active
//!   roles; [`threads`]: one compute thread per worker; [`budget`]: simulated machines;
//! - [`engine`]: in-process runs, one party over NATS, centralised baseline, reports;
//! - [`plan`]: the profile-based choice of workers and batch size; [`bench`]: the five modes
//!   side by side;
//! - [`cli`] (feature `cli`): clap arguments and entry points for `umbra vfl ...` and
//!   `umbra bench vfl`, shared by the `vfl_party` binary.
//!
//! The library never installs a log subscriber and never changes process-wide settings; the
//! binaries do the former ([`cli::party_main`]).
pub mod bench;
pub mod budget;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod cut;
pub mod data;
pub mod dp;
pub mod engine;
pub mod error;
pub mod message;
pub mod metrics;
pub mod model;
pub mod party;
pub mod plan;
pub mod ps;
pub mod testing;
pub mod threads;
pub mod transport;

pub use config::{JobConfig, Mode};
pub use error::{Result, VflError};
pub use metrics::TrainReport;
