//! Command-line entry points (feature `cli`); the `umbra` binary only dispatches to them:
//! - `umbra serve --model M --share --port P` -> [`run_serve`] ([`ServeShareArgs`]);
//! - `umbra generate --model M --share-servers A,B ...` -> [`run_generate`] ([`ShareClientArgs`]);
//! - `umbra proxy --model M --share-servers A,B --port P` -> [`run_proxy`] ([`ProxyShareArgs`]);
//! - `umbra attack shares ...` -> [`run_attack`] ([`AttackSharesArgs`]);
//! - `umbra bench share ...` -> [`run_bench`] ([`BenchShareArgs`]).
mod attack_cmd;
mod bench_cmd;
mod generate_cmd;
mod serve_cmd;

pub use attack_cmd::{run_attack, AttackSharesArgs};
pub use bench_cmd::{run_bench, BenchShareArgs};
pub use generate_cmd::{run_generate, GenerateShare};
pub use serve_cmd::{run_proxy, run_serve, ProxyShareArgs, ServeShareArgs};

use crate::client::parse_pair;
use crate::error::{Result, ShareError};
use crate::fixed::Format;
use crate::model::Remote;
use crate::tls::Trust;
use std::path::PathBuf;
use std::time::Duration;

/// Makes candle's CPU worker threads park after a short spin (`CANDLE_BARRIER_POOL_SPIN_LIMIT`
/// 500 instead of candle's 25,000), unless the user chose a value; must run before the first
/// candle op (the pool reads it once). A share client waits on the network between its small
/// candle ops (norms, residuals, attention glue), and candle's idle workers spin ~1 ms after
/// each op: on the 2-core host that spinning was most of the client's CPU. Measured (`umbra
/// bench share --reps 1`, same loaded host, back to back): client CPU in decode 4.85 s -> 1.47 s
/// for 64 tokens, share decode 4.2 -> 6.0 tok/s; the plaintext run in the same process also got
/// faster (4.1 -> 10.2 tok/s), the spinning stole a core from our own kernel pool there too.
/// The `umbra` binary calls this for share-client commands (`generate`/`proxy
/// --share-servers`, `bench share`).
pub fn short_barrier_spin() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "500");
    }
}

/// How a client reaches the two share servers (`umbra generate`, `umbra proxy`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ShareClientArgs {
    /// Share mode: the two share servers, A then B (`https://host:port,https://host:port`), run
    /// by parties that do not collude. Every linear layer is computed on additive secret shares;
    /// each server sees only uniformly random numbers.
    #[arg(long, value_delimiter = ',')]
    pub share_servers: Vec<String>,
    /// Share mode: CA certificate(s) (PEM) the servers' certificates chain to: one for both, or
    /// A,B (`umbra serve --share --tls-ca-out` writes one).
    #[arg(long, value_delimiter = ',')]
    pub share_ca: Vec<PathBuf>,
    /// Share mode: SHA-256 pins of the servers' certificates, A,B (printed by `umbra serve
    /// --share`).
    #[arg(long, value_delimiter = ',')]
    pub share_pin: Vec<String>,
    /// Share mode: seconds to wait for a connection or a server's answer.
    #[arg(long, default_value_t = 30.0)]
    pub share_timeout_s: f64,
    /// Share mode: bits of the activations' fixed-point format (per-row exponent).
    #[arg(long, default_value_t = Format::DEFAULT_BITS)]
    pub share_bits: u32,
}

impl ShareClientArgs {
    /// Share mode was asked for.
    pub fn active(&self) -> bool {
        !self.share_servers.is_empty()
    }

    pub fn format(&self) -> Format {
        Format {
            bits: self.share_bits,
        }
    }

    /// The two servers and how to trust each.
    pub fn remote(&self) -> Result<Remote> {
        let servers = parse_pair(&self.share_servers)?;
        let trust: [Trust; 2] =
            match (self.share_pin.len(), self.share_ca.len()) {
                (2, 0) => [
                    Trust::pin(&self.share_pin[0])?,
                    Trust::pin(&self.share_pin[1])?,
                ],
                (0, 1) => {
                    let t = Trust::ca_file(&self.share_ca[0])?;
                    [t.clone(), t]
                }
                (0, 2) => [
                    Trust::ca_file(&self.share_ca[0])?,
                    Trust::ca_file(&self.share_ca[1])?,
                ],
                (0, 0) => return Err(ShareError::Config(
                    "share mode needs --share-pin A,B (the pins `umbra serve --share` prints) or \
                     --share-ca CA.pem"
                        .into(),
                )),
                _ => return Err(ShareError::Config(
                    "give either --share-pin with two pins (A,B) or --share-ca with one or two \
                     CA files"
                        .into(),
                )),
            };
        if !(self.share_timeout_s.is_finite() && self.share_timeout_s > 0.0) {
            return Err(ShareError::Config(
                "--share-timeout-s must be a positive number of seconds".into(),
            ));
        }
        Ok(Remote {
            servers,
            trust,
            timeout: Duration::from_secs_f64(self.share_timeout_s),
        })
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| ShareError::Config(format!("tokio runtime: {e}")))
}
