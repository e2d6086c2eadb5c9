//! `umbra-attacks`: attacks on AloePri-obfuscated checkpoints and their scoring.
//!
//! Threat model (`shared/papers/aloepri.md`): an honest-but-curious server holding the public
//! plaintext weights, the obfuscated weights and the algorithm, and (for TFMA) the obfuscated id
//! stream of many requests plus public text of its own. No attack reads the client key: the key
//! is used only by [`score`] to count how many of tau's entries an attack recovered (TTRSR).
//!
//! | attack | module | uses | beaten by |
//! |---|---|---|---|
//! | VMA (sorted rows of `We Wh^T`, `We Wgate^T`, voting) | [`vma`] | weights | noise only |
//! | IA (gate mean/std, attention self score) | [`ia`] | weights | noise only |
//! | NN (embedding rows) | [`nn`] | weights | any key `P` |
//! | hat (column space of the head, bootstrap + Procrustes) | [`hat`] | weights | nothing measured so far |
//! | TFMA (frequency ranks) | [`tfma`] | id stream + public text | flat frequency profile |
//! | SDA (bigram LM hill-climbing from TFMA) | [`sda`] | id stream + public text | nothing but little traffic |
//! | IMA (ridge inverter on the attacker's own labelled states) | [`ima`] | states + public text | any secret key |
//! | ISA (plaintext-model states, ICP/Procrustes alignment) | [`isa`] | states + public text | any key `P` |
//!
//! [`suite`] runs them and [`sweep`] runs them with the fidelity evaluation over a parameter grid.

pub mod blockkey;
#[cfg(feature = "cli")]
pub mod cli;
pub mod error;
pub mod hat;
pub mod ia;
pub mod ima;
pub mod isa;
pub mod linalg;
pub mod nn;
pub mod score;
pub mod sda;
pub mod states;
pub mod suite;
pub mod sweep;
pub mod target;
pub mod tfma;
pub mod vma;
pub mod vote;

pub use error::{AttackError, Result};
pub use score::{Recovery, Score};
pub use target::Target;
