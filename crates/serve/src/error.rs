//! Errors of the serving crate (startup and CLI level; request errors are [`crate::api::ApiError`]).

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Model(#[from] umbra_model::error::ModelError),
    #[error(transparent)]
    Aloe(#[from] umbra_aloepri::AloeError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Config(String),
    /// An upstream server answered with an error status, or could not be reached (502) or
    /// timed out (504); `status` is what a proxy should answer with.
    #[error("{message}")]
    Upstream { status: u16, message: String },
    #[error("{0}")]
    Other(String),
}

impl ServeError {
    /// An unreachable (502) or timed-out (504) upstream at `url`.
    pub fn unreachable(url: &str, e: &reqwest::Error) -> Self {
        ServeError::Upstream {
            status: if e.is_timeout() { 504 } else { 502 },
            message: format!("{url}: {e}"),
        }
    }
}
