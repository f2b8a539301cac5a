//! A small typed client of the meta service: the three calls the
//! redirector makes, each bounded by a timeout.

use std::time::Duration;

use ironblock_proto::v1 as pb;
use ironblock_proto::v1::meta_client::MetaClient as GrpcClient;
use ironblock_proto::MetaChannel;

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
    client: GrpcClient<MetaChannel>,
    /// `WatchRevisions` on a channel with no per-request timeout.
    watch: GrpcClient<MetaChannel>,
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
    /// A client of the meta group at `addrs` (comma-separated `host:port`
    /// or `http://host:port`; it follows the leader, see [`MetaChannel`]);
    /// every call, with its retries, gives up after `timeout`. Must be
    /// called within a tokio runtime.
    pub fn new(addrs: &str, timeout: Duration) -> Result<MetaLink, MetaError> {
        let bad = |e: ironblock_proto::meta_channel::BadAddress| MetaError::Address {
            addr: e.addr,
            reason: e.reason,
        };
        let (client, watch) = MetaChannel::for_daemon(addrs, timeout).map_err(bad)?;
        Ok(MetaLink {
            client: GrpcClient::new(client),
            watch: GrpcClient::new(watch),
            addr: addrs.to_string(),
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
    /// is bounded by the call timeout, the stream is not. `vip_holder`:
    /// the lease holder name meta frees the leases of when this watch goes
    /// away with the process.
    pub async fn watch_revisions(
        &self,
        watcher: &str,
        vip_holder: &str,
    ) -> Result<tonic::Streaming<pb::RevisionEvent>, MetaError> {
        let mut c = self.watch.clone();
        let req = pb::WatchRevisionsRequest {
            watcher: watcher.to_string(),
            vip_holder: vip_holder.to_string(),
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
