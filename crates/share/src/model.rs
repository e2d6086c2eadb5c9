//! A share-mode model on the client: an ordinary [`Llama`] whose linear maps are
//! [`crate::backend::ShareLinear`]s, connected to two servers (or, for tests and the
//! "arithmetic alone" measurement, to the same ring arithmetic in this process).
use crate::backend::{Built, ShareBackend, ShareSession, Transport};
use crate::client::{Expect, ServerSpec, ShareClient};
use crate::error::Result;
use crate::fixed::Format;
use crate::tls::Trust;
use candle_core::Device;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use umbra_model::checkpoint::Checkpoint;
use umbra_model::tokenizer::TextTokenizer;
use umbra_model::{Llama, LlamaConfig, Weights};

/// Where the servers are and how to trust them.
#[derive(Debug, Clone)]
pub struct Remote {
    pub servers: [ServerSpec; 2],
    pub trust: [Trust; 2],
    /// Longest wait for a connection or an answer.
    pub timeout: Duration,
}

/// A loaded share-mode model.
pub struct ShareModel {
    pub llama: Llama,
    pub tokenizer: Option<TextTokenizer>,
    pub eos_ids: Vec<u32>,
    pub session: Arc<ShareSession>,
    pub built: Built,
    /// The checkpoint folder's name (what `/v1/models` reports).
    pub name: String,
}

/// A model path or name ([`umbra_model::resolve`]); a model asset missing from the cache is an
/// error naming the fetch command.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    Ok(umbra_model::resolve::resolve_model(
        spec,
        umbra_model::resolve::Fetch::No,
    )?)
}

impl ShareModel {
    /// Builds the client model from a config and weights (the weights' linear maps are
    /// quantized and dropped; embedding and norms are kept). `keep` keeps the quantized
    /// matrices too, for [`ShareModel::connect_local`].
    pub fn build(
        cfg: &LlamaConfig,
        weights: &Weights,
        format: Format,
        keep: bool,
    ) -> Result<(Llama, Arc<ShareSession>, Built)> {
        let session = ShareSession::new(format)?;
        let mut backend = ShareBackend::new(weights, session.clone())?;
        if keep {
            backend = backend.keep_weights();
        }
        let llama = Llama::with_backend(cfg, weights, &Device::Cpu, &backend)?;
        Ok((llama, session, backend.finish()))
    }

    /// Opens the checkpoint at `path` and connects to `remote` (`None`: local ring arithmetic).
    pub fn open(path: &Path, format: Format, remote: Option<&Remote>) -> Result<Self> {
        let ck = Checkpoint::open(path)?;
        let eos_ids = ck.eos_token_ids();
        let name = path
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        let (llama, session, built) =
            Self::build(&ck.config, &ck.weights, format, remote.is_none())?;
        let mut m = Self {
            llama,
            tokenizer: ck.tokenizer,
            eos_ids,
            session,
            built,
            name,
        };
        match remote {
            Some(r) => m.connect(r)?,
            None => m.connect_local(),
        }
        Ok(m)
    }

    /// What the servers must announce.
    pub fn expect(&self) -> Expect {
        Expect {
            fingerprint: self.built.fingerprint,
            table: self.built.table.clone(),
        }
    }

    /// Connects both links (fingerprint and map table checked at connect).
    pub fn connect(&mut self, r: &Remote) -> Result<()> {
        let c = ShareClient::connect(&r.servers, &r.trust, self.expect(), r.timeout)?;
        self.session.set_transport(Transport::Remote(Box::new(c)));
        Ok(())
    }

    /// Uses the kept quantized matrices in this process (no servers, no sharing).
    pub fn connect_local(&mut self) {
        let ms = std::mem::take(&mut self.built.matrices);
        self.session.set_transport(Transport::Local(ms));
    }

    /// The weakest integrity bound over all maps, in bits (a wrong product passes a layer's
    /// check with probability at most 2^-bits).
    pub fn integrity_bits(&self) -> u32 {
        self.built.check_bits.iter().copied().min().unwrap_or(0)
    }
}
