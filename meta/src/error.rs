//! Typed errors of the meta library and their gRPC status codes.

/// Everything that can go wrong in the meta state machine or its store.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The request is malformed (size 0, bad replica count, shrink, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An id or name does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A name is taken by an object with different parameters.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The cluster is not in a state that allows the operation.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// A hard limit or the capacity is reached.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// The sled store failed.
    #[error("metadata store error: {0}")]
    Store(#[from] sled::Error),
    /// A stored record could not be decoded or encoded.
    #[error("corrupt metadata record in tree {tree}: {reason}")]
    Corrupt {
        /// sled tree name.
        tree: &'static str,
        /// What went wrong.
        reason: String,
    },
}

impl MetaError {
    /// The gRPC status code this error maps to.
    pub fn code(&self) -> tonic::Code {
        match self {
            MetaError::InvalidArgument(_) => tonic::Code::InvalidArgument,
            MetaError::NotFound(_) => tonic::Code::NotFound,
            MetaError::AlreadyExists(_) => tonic::Code::AlreadyExists,
            MetaError::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            MetaError::ResourceExhausted(_) => tonic::Code::ResourceExhausted,
            MetaError::Store(_) | MetaError::Corrupt { .. } => tonic::Code::Internal,
        }
    }
}

impl From<MetaError> for tonic::Status {
    fn from(e: MetaError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

/// Result alias for the meta library.
pub type Result<T, E = MetaError> = std::result::Result<T, E>;
