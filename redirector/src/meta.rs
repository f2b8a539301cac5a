//! A small typed client of the meta service: the three calls the
//! redirector makes, each bounded by a timeout.

use std::time::Duration;

use ironblock_proto::v1 as pb;
use ironblock_proto::v1::meta_client::MetaClient as GrpcClient;
use tonic::transport::{Channel, Endpoint};

/// Why a meta call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    /// The meta address cannot be used.
    #[error("bad meta address {addr:?}: {reason}")]
    Address {
        /// What was given.
        addr: String,
        /// Why it is unusable.
        reason: String,
    },
    /// Meta did not answer in time or could not be reached.
    #[error("meta unavailable: {0}")]
    Unavailable(String),
    /// Meta answered with an error status.
    #[error("meta error {code:?}: {message}")]
    Status {
        /// The gRPC code.
        code: tonic::Code,
        /// Meta's message.
        message: String,
    },
}

/// The meta calls the redirector makes. Connects lazily and reconnects;
/// cheap to clone.
#[derive(Clone, Debug)]
pub struct MetaLink {
    client: GrpcClient<Channel>,
    /// `WatchRevisions` on a channel with no per-request timeout.
    watch: GrpcClient<Channel>,
    addr: String,
    timeout: Duration,
}

fn status(s: tonic::Status) -> MetaError {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            MetaError::Unavailable(s.message().to_string())
        }
        code => MetaError::Status {
            code,
            message: s.message().to_string(),
        },
    }
}

macro_rules! call {
    ($self:ident, $method:ident, $req:expr) => {{
        let mut c = $self.client.clone();
        match tokio::time::timeout($self.timeout, c.$method($req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(status(s)),
            Err(_) => Err(MetaError::Unavailable(format!(
                "{} to {} timed out after {:?}",
                stringify!($method),
                $self.addr,
                $self.timeout
            ))),
        }
    }};
}

impl MetaLink {
    /// A client of meta at `addr` (`host:port` or `http://host:port`); every
    /// call gives up after `timeout`. Must be called within a tokio runtime.
    pub fn new(addr: &str, timeout: Duration) -> Result<MetaLink, MetaError> {
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| MetaError::Address {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?
            .connect_timeout(timeout)
            .tcp_nodelay(true);
        let watch = GrpcClient::new(endpoint.clone().connect_lazy());
        let endpoint = endpoint.timeout(timeout);
        Ok(MetaLink {
            client: GrpcClient::new(endpoint.connect_lazy()),
            watch,
            addr: uri,
            timeout,
        })
    }

    /// `AcquireVipLease`.
    pub async fn acquire_vip_lease(
        &self,
        vip: &str,
        holder: &str,
        ttl: Duration,
        token: u64,
        applied_revision: u64,
    ) -> Result<pb::VipLeaseResponse, MetaError> {
        let req = pb::AcquireVipLeaseRequest {
            vip: vip.to_string(),
            holder: holder.to_string(),
            ttl_ms: ttl.as_millis() as u64,
            token,
            applied_revision,
        };
        call!(self, acquire_vip_lease, req)
    }

    /// `WatchRevisions`: meta's revision now and on every change. Opening
    /// is bounded by the call timeout, the stream is not.
    pub async fn watch_revisions(
        &self,
        watcher: &str,
    ) -> Result<tonic::Streaming<pb::RevisionEvent>, MetaError> {
        let mut c = self.watch.clone();
        let req = pb::WatchRevisionsRequest {
            watcher: watcher.to_string(),
        };
        match tokio::time::timeout(self.timeout, c.watch_revisions(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(status(s)),
            Err(_) => Err(MetaError::Unavailable(format!(
                "watch_revisions to {} timed out after {:?}",
                self.addr, self.timeout
            ))),
        }
    }

    /// `GetVipLease`.
    pub async fn get_vip_lease(&self, vip: &str) -> Result<pb::VipLeaseResponse, MetaError> {
        let req = pb::GetVipLeaseRequest {
            vip: vip.to_string(),
        };
        call!(self, get_vip_lease, req)
    }

    /// `ListChunks`.
    pub async fn list_chunks(&self) -> Result<Vec<pb::Chunk>, MetaError> {
        call!(self, list_chunks, pb::ListChunksRequest {}).map(|r| r.chunks)
    }

    /// `ListExports`.
    pub async fn list_exports(&self) -> Result<pb::ListExportsResponse, MetaError> {
        call!(self, list_exports, pb::ListExportsRequest {})
    }
}
