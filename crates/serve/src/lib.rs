//! Private LLM serving: an OpenAI-compatible server that runs any checkpoint (plain or
//! obfuscated) and a client-side proxy that holds the AloePri key, so the server only ever sees
//! tau-permuted token ids.
//!
//! * [`server`]: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`,
//!   `GET /health`, `GET /metrics`, on an engine thread fed through a bounded queue ([`engine`]).
//! * [`proxy`]: plaintext OpenAI API in front of a server, mapping ids through tau.
//! * [`split`]: split mode — a server of only the transformer blocks (`POST /v1/split/forward`,
//!   input embeddings in, final hidden states out) and the client that holds embedding, head and key.
//! * [`cli`]: `clap` argument structs and `run_*` entry points for the `umbra` binary.
//! * [`mod@bench`]: `umbra bench serve` (plain vs obfuscated, 1/4/16 clients).
//!
//! Responses carry the generated `token_ids` in every choice (and chunk), so a client never
//! needs the server's detokenizer; `return_text: false` skips detokenization altogether.
//! Batching is per cohort (see [`engine`]): requests admitted together with equal prompt
//! lengths share one KV cache and one forward per step; other sequences are stepped in the same
//! iteration with their own forward. Greedy requests give identical text through the proxy and
//! on the plain model; seeded *sampled* requests are reproducible per checkpoint but not equal
//! across plain and obfuscated ones (the sampler walks candidates in id order, which tau changes).
pub mod api;
pub mod bench;
pub mod cli;
pub mod engine;
pub mod error;
pub mod http;
pub mod metrics;
pub mod proxy;
pub mod respond;
pub mod server;
pub mod split;
pub mod text;

pub use error::ServeError;
