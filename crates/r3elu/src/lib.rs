//! `umbra-r3elu`: R3eLU private SplitNN (ESORICS 2023, arXiv 2304.09515) on the `umbra-vfl`
//! split-learning engine, and the attacks it is meant to stop.
//!
//! Modules, each with one job:
//! - [`mechanism`]: R3eLU forward/backward (top-K, clip, randomized-response keep probabilities,
//!   Laplace) and the fine-grained budget from Taylor importance, as a vfl `CutLayer`;
//! - [`accountant`]: strong composition for R3eLU, exact Gaussian calibration for the baseline;
//! - [`data`]: Fashion-MNIST, MNIST-5k and Adult with a private attribute and a disjoint
//!   auxiliary split for the attacker;
//! - [`split`]: guest (features, bottom) and host (labels, top) over a vfl `Transport`;
//! - [`attacks`]: data reconstruction, property inference, FSHA, and their metrics;
//! - [`bench`]: the privacy-utility sweep, table, SVG figure and PNG reconstructions;
//! - [`cli`]: `umbra split train|attack|party` and `umbra bench split`.
pub mod accountant;
pub mod attacks;
pub mod bench;
pub mod cli;
pub mod data;
pub mod error;
pub mod image;
pub mod mechanism;
pub mod split;

pub use error::{R3Error, Result};
