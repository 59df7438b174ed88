//! The operator's error type and the bounded set of categories failures are counted by.

use crate::federation::objects::BuildError;
use crate::identity::IdentityError;
use crate::settings::SettingsError;

/// Why a reconciliation or the operator itself failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("{kind} has no {field}")]
    Incomplete {
        kind: &'static str,
        field: &'static str,
    },
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("serving metrics on {addr}: {source}")]
    Serve {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("rendering CRDs: {0}")]
    Crd(#[from] crate::crd::CrdError),
    #[error("installing the {0} signal handler: {1}")]
    Signal(&'static str, #[source] std::io::Error),
    #[error("lost the leader lease {lease} to {holder}; stopping so a standby can lead")]
    LostLease { lease: String, holder: String },
    #[error("a controller task failed: {0}")]
    Task(String),
}

impl Error {
    /// Label value for failure metrics: a small fixed set, never built from messages.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(status)) => match status.code {
                403 => "forbidden",
                404 => "not_found",
                409 => "conflict",
                400 | 422 => "rejected",
                500..=599 => "server_error",
                _ => "api_error",
            },
            Error::Kube(_) => "transport",
            Error::Build(_) => "build",
            Error::Identity(_) => "identity",
            Error::Incomplete { .. } => "incomplete_object",
            Error::Metrics(_)
            | Error::Serve { .. }
            | Error::Settings(_)
            | Error::Crd(_)
            | Error::Signal(..)
            | Error::Task(_) => "internal",
            Error::LostLease { .. } => "lease",
        }
    }
}
