//! `umbra serve --share` (a share server) and `umbra proxy --share-servers` (the OpenAI API in
//! front of a share-mode model that runs here).
use super::{runtime, ShareClientArgs};
use crate::error::{Result, ShareError};
use crate::model::{resolve_model, ShareModel};
use crate::server::{serve, PublicWeights, ServerConfig};
use crate::tls::ServerIdentity;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use umbra_serve::server::{ModelSource, ServeConfig};

/// `umbra serve` options of share mode (flattened next to the OpenAI server's).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeShareArgs {
    /// Serve as a share server: public weights only, stateless; clients send additive shares
    /// of every linear layer's input (`umbra generate/proxy --share-servers`).
    #[arg(long)]
    pub share: bool,
    /// With --share: PEM certificate chain (leaf first). Default: a private CA and a certificate
    /// made at start-up (the pin is printed; --tls-ca-out writes the CA).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// With --share: the certificate's PEM private key.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// With --share: write the generated CA certificate here (for clients' --share-ca).
    #[arg(long)]
    pub tls_ca_out: Option<PathBuf>,
    /// With --share: names of the generated certificate (default: localhost, 127.0.0.1, ::1
    /// and --host).
    #[arg(long, value_delimiter = ',')]
    pub tls_names: Vec<String>,
    /// With --share: GEMM threads (0 = every core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// With --share: record every product request (this server's whole view) to this file,
    /// for `umbra attack shares --transcript`.
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// With --share: largest request frame in MiB (larger ones are refused unread).
    #[arg(long, default_value_t = 64)]
    pub max_frame_mib: usize,
    /// With --share: most rows in one request.
    #[arg(long, default_value_t = 8192)]
    pub max_rows: usize,
    /// With --share: MiB of products computed ahead for the clients' masks when this server
    /// is their server B (0: none; those products are then computed when asked for).
    #[arg(long, default_value_t = 256)]
    pub prepare_mib: usize,
}

fn addr(host: &str, port: u16) -> Result<SocketAddr> {
    let ip: std::net::IpAddr = host
        .parse()
        .map_err(|_| ShareError::Config(format!("--host `{host}` is not an IP address")))?;
    Ok(SocketAddr::new(ip, port))
}

/// Runs a share server until Ctrl-C. Prints `listening https://HOST:PORT pin SHA256` on stdout
/// once it accepts connections.
pub fn run_serve(a: &ServeShareArgs, model: &str, host: &str, port: u16) -> Result<()> {
    let path = resolve_model(model)?;
    let identity = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => ServerIdentity::from_pem_files(c, k)?,
        _ => {
            let mut names = a.tls_names.clone();
            if names.is_empty() {
                names = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
                if !names.iter().any(|n| n == host) && host != "0.0.0.0" && host != "::" {
                    names.push(host.into());
                }
            }
            ServerIdentity::generate(&names)?
        }
    };
    if let (Some(out), Some(pem)) = (&a.tls_ca_out, &identity.ca_pem) {
        umbra_common::fs::write_atomic(out, pem.as_bytes())?;
    }
    let t0 = std::time::Instant::now();
    let weights = Arc::new(PublicWeights::load(&path)?);
    eprintln!(
        "umbra serve --share: {} linear maps of {} ({:.0} MiB of i16 weights, fingerprint {}) \
         quantized in {:.1} s",
        weights.table.len(),
        weights.name,
        weights.bytes() as f64 / (1 << 20) as f64,
        &hex::encode(weights.fingerprint)[..16],
        t0.elapsed().as_secs_f64()
    );
    let mut cfg = ServerConfig::new(addr(host, port)?, identity);
    cfg.threads = if a.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        a.threads
    };
    cfg.max_frame = a.max_frame_mib.max(1) << 20;
    cfg.max_rows = a.max_rows.max(1);
    cfg.prepare_bytes = a.prepare_mib << 20;
    cfg.record = a.record.clone();
    let pin = cfg.identity.pin();
    let kernel = cfg.kernel;
    runtime()?.block_on(async move {
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        let (bound, _stats, fut) = serve(weights, cfg, shutdown).await?;
        println!("listening https://{bound} pin {pin}");
        eprintln!(
            "umbra serve --share: kernel {}, clients connect with --share-servers https://{bound},... \
             --share-pin {pin},...",
            kernel.as_str()
        );
        fut.await;
        Ok(())
    })
}

/// `umbra proxy` options of share mode (flattened next to the token-mode proxy's).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ProxyShareArgs {
    /// Share mode: the model (HF folder, GGUF, or `smollm2`) the proxy runs here with every
    /// linear layer on the share servers.
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub client: ShareClientArgs,
}

/// Runs the OpenAI API (`umbra_serve`'s server, batching included) over a share-mode model
/// until Ctrl-C. `ignored` lists token-mode options given that do not apply.
pub fn run_proxy(a: &ProxyShareArgs, host: &str, port: u16, ignored: &[&str]) -> Result<()> {
    if let Some(o) = ignored.first() {
        return Err(ShareError::Config(format!(
            "{o} does not apply with --share-servers (the proxy runs the model itself)"
        )));
    }
    let model = a
        .model
        .as_deref()
        .ok_or_else(|| ShareError::Config("--share-servers needs --model (e.g. smollm2)".into()))?;
    let remote = a.client.remote()?;
    let path = resolve_model(model)?;
    let m = ShareModel::open(&path, a.client.format(), Some(&remote))?;
    eprintln!(
        "umbra proxy: {} on shares (servers {} and {}; integrity bound 2^-{} per layer call)",
        m.name,
        remote.servers[0].url,
        remote.servers[1].url,
        m.integrity_bits()
    );
    let mut cfg = ServeConfig::new(
        ModelSource::Loaded {
            model: Box::new(m.llama),
            tokenizer: m.tokenizer.map(Box::new),
            eos_ids: m.eos_ids,
        },
        addr(host, port)?,
    );
    cfg.model_name = Some(m.name);
    cfg.batch_window = Duration::from_millis(5);
    runtime()?.block_on(async move {
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        let (bound, fut) = umbra_serve::server::serve(cfg, shutdown).await?;
        println!("listening http://{bound}");
        fut.await;
        Ok(())
    })
}
