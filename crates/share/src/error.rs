//! One error type for the share crate.
use std::path::PathBuf;

/// Everything that can go wrong in share mode. [`ShareError::Server`] names the server whose
/// failure ended a request (the proxy answers it with 502).
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("shape: {0}")]
    Shape(String),
    #[error("fixed point: {0}")]
    Range(String),
    /// A share server failed, answered garbage or timed out (502 at the proxy).
    #[error("share server {server}: {message}")]
    Server { server: String, message: String },
    /// The two products do not pass the Freivalds or range check: a server returned a wrong
    /// product. The request ends; no token computed from it is released.
    #[error("integrity check failed at {layer}: {message}")]
    Integrity { layer: String, message: String },
    /// A peer sent a frame that breaks the protocol (the connection is closed).
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("tls: {0}")]
    Tls(String),
    #[error("config: {0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] umbra_model::ModelError),
    #[error(transparent)]
    Serve(#[from] umbra_serve::ServeError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Assets(#[from] umbra_assets::AssetError),
    #[error(transparent)]
    Aloe(#[from] umbra_aloepri::AloeError),
    #[error(transparent)]
    Attack(#[from] umbra_attacks::AttackError),
    #[error(transparent)]
    Common(#[from] umbra_common::Error),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

impl ShareError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub fn server(server: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Server {
            server: server.into(),
            message: message.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, ShareError>;
