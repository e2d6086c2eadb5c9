//! Private LLM serving: an OpenAI-compatible server that runs any checkpoint (plain or
//! obfuscated, or any [`umbra_model::Llama`] built in memory) and a client-side proxy that holds
//! the AloePri key, so the server only ever sees tau-permuted token ids.
//!
//! * [`server`]: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`,
//!   `GET /health`, `GET /metrics`, on an engine thread fed through a bounded queue ([`engine`]).
//! * [`engine`]: the continuous-batching loop ([`engine::ContinuousBatcher`]): every forward
//!   pass is one `Llama::forward_groups` call over all cohorts (requests admitted together with
//!   equal prompt lengths share one KV cache); decoding cohorts contribute one position each,
//!   prefilling ones a prompt chunk, so long prompts are read in chunks beside other
//!   sequences' decode steps and never starve them.
//! * [`proxy`]: plaintext OpenAI API in front of a server, mapping ids through tau (token mode)
//!   or running the client part of split mode.
//! * [`split_mode`]: split mode — a server of only the transformer blocks
//!   (`POST /v1/split/forward`, input embeddings in, final hidden states out) and the client
//!   that holds embedding, head and key.
//! * [`guard`]: API key, browser origins and content type, checked before a body is read.
//! * [`text`], [`respond`], [`api`], [`http`], [`metrics`]: prompts (cheap bounds first,
//!   tokenization off the runtime), answers (JSON or SSE), wire types, the accept loop,
//!   `/metrics`.
//! * `cli` (feature `cli`): `clap` arguments and `run` for the `umbra` binary.
//! * [`mod@bench`]: `umbra bench serve` (plain vs obfuscated vs split at 1/4/16 clients;
//!   `--soak`: a max-context prompt beside short chats).
//!
//! Responses carry the generated `token_ids` in every choice (and chunk), so a client never
//! needs the server's detokenizer; `return_text: false` skips detokenization altogether.
//! Greedy requests give identical text through the proxy and on the plain model; seeded
//! *sampled* requests are reproducible per checkpoint but not equal across plain and
//! obfuscated ones (the sampler walks candidates in id order, which tau changes).
pub mod api;
pub mod bench;
#[cfg(feature = "cli")]
pub mod cli;
pub mod engine;
pub mod error;
pub mod guard;
pub mod http;
pub mod metrics;
pub mod proxy;
pub mod respond;
pub mod server;
pub mod split_mode;
pub mod text;

pub use error::ServeError;
