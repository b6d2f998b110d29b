//! Client errors: what went wrong, and whether a write's outcome is known.

use std::time::Duration;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// No endpoint could be reached; nothing was sent (or only reads were attempted).
    #[error("no endpoint is reachable: {0}")]
    Unavailable(String),
    /// A write was sent but its result never came back: it may or may not have been applied.
    /// Read the key to find out before retrying a non-idempotent write.
    #[error("the write may or may not have been applied: {0}")]
    OutcomeUnknown(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The server refused the request (bad input, permission, compacted revision, ...).
    #[error("{message}")]
    Server { code: tonic::Code, message: String },
    /// Where a backup was to go (an S3 bucket) refused it or could not be reached.
    #[error("backup destination: {0}")]
    Destination(String),
}

impl Error {
    /// The gRPC status code, for server refusals.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, Error::OutcomeUnknown(_))
    }

    pub(crate) fn server(s: &tonic::Status) -> Error {
        Error::Server {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}
