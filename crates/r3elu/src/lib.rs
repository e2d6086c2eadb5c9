//! `umbra-r3elu`: R3eLU private SplitNN (ESORICS 2023, arXiv 2304.09515) on the `umbra-vfl`
//! split-learning engine, its per-record privacy accounting, and the attacks it is meant to stop.
//!
//! Modules, each with one job:
//! - [`mechanism`]: R3eLU forward/backward (top-K, clip, randomized response on every unit,
//!   Laplace) as a vfl `CutLayer`, with its per-release privacy bound;
//! - [`accountant`]: composition (basic / zCDP for pure releases, exact GDP for Gaussian ones,
//!   amplification by subsampling where it applies);
//! - [`ledger`]: what one record releases in a run and its composed guarantee;
//! - [`config`]: the job both parties agree on and the cut layer it asks for;
//! - [`data`]: Fashion-MNIST, MNIST-5k and Adult with a private attribute and a disjoint
//!   auxiliary split for the attacker;
//! - [`wire`], [`guest`], [`host`]: the two parties over a vfl `Transport`;
//!   [`training`]: both in one process, and the run's report;
//! - [`attacks`]: data reconstruction, property inference, FSHA, and their metrics;
//! - [`experiment`]: one frontier point (train, then attack); [`bench`]: the sweep;
//! - [`image`]: SSIM and PNG grids;
//! - [`cli`] (feature `cli`): `umbra split train|attack|party|bench` and `umbra bench split`,
//!   shared by the `r3elu_party` binary.
pub mod accountant;
pub mod attacks;
pub mod bench;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod data;
pub mod error;
pub mod experiment;
pub mod guest;
pub mod host;
pub mod image;
pub mod ledger;
pub mod mechanism;
pub mod training;
pub mod wire;

pub use error::{R3Error, Result};
