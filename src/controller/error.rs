//! The reconciler's error: what failed a reconcile, so the controller retries it with backoff,
//! with a short label for logs and metrics.

use crate::mlflow::MlflowError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Mlflow(#[from] MlflowError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("{0}")]
    InvalidResource(String),
    #[error(
        "a {kind} named {name} already exists and is not this endpoint's: rename or delete it, or rename the endpoint"
    )]
    NameConflict { kind: String, name: String },
    /// The API server refused to read or write an owned object; its message as it gave it.
    #[error("could not {verb} {kind} {name}: {message}")]
    ApplyFailed {
        verb: &'static str,
        kind: String,
        name: String,
        message: String,
    },
}

impl Error {
    /// A short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Mlflow(e) => e.label(),
            Error::Kube(_) => "kubernetes",
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.label(),
                _ => "finalizer",
            },
            Error::InvalidResource(_) => "invalid_resource",
            Error::NameConflict { .. } => "name_conflict",
            Error::ApplyFailed { .. } => "apply_failed",
        }
    }
}
