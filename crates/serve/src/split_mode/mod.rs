//! Split mode (beyond the paper): the server holds only the transformer blocks of an exact
//! obfuscation ([`umbra_aloepri::split`]); the client holds the embedding, final norm, head
//! and key, and generates by sending input embeddings and reading back final hidden states.
//!
//! * [`wire`]: the request and answer of `POST /v1/split/forward` and the tensor encoding;
//! * [`server`]: the server part behind that route (sessions holding KV caches);
//! * [`batcher`]: concurrent decode steps (server) and heads (client) share one pass;
//! * [`client`]: [`SplitClient`], ids -> tau -> embedding rows -> server -> head -> sample.
//!
//! Both sides check that they belong together: the client's key must be its part's
//! ([`umbra_aloepri::compiler::check_key_for`]) and the server's published key fingerprint
//! must be the key's ([`SplitClient::check_server`], and every answer's header).
pub mod batcher;
pub mod client;
pub mod server;
pub mod wire;

pub use client::{SplitClient, SplitStats};
pub use server::{router, SplitLimits};
pub use wire::{decode_f32, encode_f32, ForwardRequest, ForwardResponse, FORWARD_PATH};
