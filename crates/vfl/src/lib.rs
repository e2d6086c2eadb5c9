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
//!   roles; [`engine`]: in-process runs, centralised baseline, reports;
//! - [`plan`]: the profile-based choice of workers and batch size; [`cli`]: clap arguments and
//!   entry points for `umbra vfl ...` and `umbra bench vfl`.
pub mod budget;
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
pub mod transport;

pub use config::{JobConfig, Mode};
pub use error::{Result, VflError};
pub use metrics::TrainReport;
