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
    #[error("{0}")]
    Other(String),
}
