//! The driver's error type and its gRPC status codes (CSI spec, per call).

use tonic::{Code, Status};

/// An error of a CSI call; each variant is one gRPC code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Internal(String),
}

impl CsiError {
    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            CsiError::InvalidArgument(_) => Code::InvalidArgument,
            CsiError::NotFound(_) => Code::NotFound,
            CsiError::AlreadyExists(_) => Code::AlreadyExists,
            CsiError::FailedPrecondition(_) => Code::FailedPrecondition,
            CsiError::OutOfRange(_) => Code::OutOfRange,
            CsiError::Aborted(_) => Code::Aborted,
            CsiError::ResourceExhausted(_) => Code::ResourceExhausted,
            CsiError::Unavailable(_) => Code::Unavailable,
            CsiError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            CsiError::Internal(_) => Code::Internal,
        }
    }

    /// A meta call failed: keep its code, prefix the message with `what`.
    pub fn from_meta(what: &str, s: &Status) -> CsiError {
        let m = format!("{what}: {}", s.message());
        match s.code() {
            Code::InvalidArgument => CsiError::InvalidArgument(m),
            Code::NotFound => CsiError::NotFound(m),
            Code::AlreadyExists => CsiError::AlreadyExists(m),
            Code::FailedPrecondition => CsiError::FailedPrecondition(m),
            Code::OutOfRange => CsiError::OutOfRange(m),
            Code::Aborted => CsiError::Aborted(m),
            Code::ResourceExhausted => CsiError::ResourceExhausted(m),
            Code::Unavailable => CsiError::Unavailable(m),
            Code::DeadlineExceeded | Code::Cancelled => CsiError::DeadlineExceeded(m),
            _ => CsiError::Internal(m),
        }
    }
}

impl From<CsiError> for Status {
    fn from(e: CsiError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

/// Result of the driver's calls.
pub type Result<T> = std::result::Result<T, CsiError>;
