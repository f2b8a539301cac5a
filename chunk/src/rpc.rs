//! The network transport of replica traffic: gRPC (`ironblock.v1.Replica`,
//! see `proto/ironblock/v1/replica.proto`).
//!
//! - [`ReplicaService`]: the server side, over this chunk's [`LocalPeer`].
//!   Every request is validated (volume id, alignment, bounds, data size)
//!   before it reaches the store; nothing from the wire can panic it.
//! - [`RemotePeer`]: the client side, a [`ReplicaPeer`] over a lazily
//!   connected tonic channel with a per-call timeout.
//! - [`serve_replica`]: runs the service on a listener until cancelled.
//!
//! # Error mapping (reversible)
//!
//! A [`PeerError`] reported by the replica travels as a gRPC status whose
//! code is chosen for generic clients and whose details carry a prost
//! encoded [`pb::ReplicaError`] that [`RemotePeer`] decodes back exactly:
//!
//! | `PeerError`            | code                  | detail                  |
//! |------------------------|-----------------------|-------------------------|
//! | `StaleEpoch{have,got}` | `FAILED_PRECONDITION` | `stale_epoch{have,got}` |
//! | `Checksum{block}`      | `DATA_LOSS`           | `checksum{block}`       |
//! | `NoSpace`              | `RESOURCE_EXHAUSTED`  | `no_space`              |
//! | `Other(msg)`           | `INTERNAL`            | `other{msg}`            |
//! | `Unreachable(msg)`     | `UNAVAILABLE`         | none                    |
//!
//! A malformed request is `INVALID_ARGUMENT` (client side: `Other`).
//! `Unreachable` is a client-side verdict: transport errors, `UNAVAILABLE`,
//! `DEADLINE_EXCEEDED`, `CANCELLED` and the client's own timeout. A status
//! without (or with an undecodable) detail maps by code: the codes above
//! to `Unreachable`, everything else to `Other`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use ironblock_proto::v1 as pb;
use ironblock_proto::v1::replica_client::ReplicaClient;
use ironblock_proto::v1::replica_server::{Replica, ReplicaServer};
use prost::Message;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use crate::replica::{ChunkId, LocalPeer, PeerError, ReplicaPeer};
use crate::store::{ExtentId, BLOCK_SIZE};

/// Largest `data` of one Write and `len` of one Read (16 MiB). A
/// [`RemotePeer`] splits larger I/O into several calls.
pub const MAX_REPLICA_DATA: u64 = 16 << 20;

/// gRPC message size limit on both sides: [`MAX_REPLICA_DATA`] plus room
/// for the envelope.
pub const MAX_MESSAGE_SIZE: usize = (MAX_REPLICA_DATA as usize) + (64 << 10);

/// Default per-call timeout of a [`RemotePeer`].
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Default connect timeout of a [`RemotePeer`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// In-flight calls one connection may have on the server.
pub const MAX_CONCURRENT_CALLS_PER_CONNECTION: usize = 64;

/// HTTP/2 keepalive ping interval on both sides.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// A keepalive ping unanswered this long closes the connection.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of setting up or running the transport.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// The peer address does not form a valid URI.
    #[error("invalid replica address {addr:?}: {reason}")]
    Address { addr: String, reason: String },
    /// The gRPC server failed.
    #[error("replica gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

// ---------------------------------------------------------------------------
// Error mapping
// ---------------------------------------------------------------------------

/// A replica-side [`PeerError`] as a gRPC status (see the module docs).
pub fn peer_error_to_status(e: &PeerError) -> Status {
    use pb::replica_error::{Checksum, Kind, NoSpace, Other, StaleEpoch};
    let (code, kind) = match e {
        PeerError::StaleEpoch { have, got } => (
            Code::FailedPrecondition,
            Some(Kind::StaleEpoch(StaleEpoch {
                have: *have,
                got: *got,
            })),
        ),
        PeerError::Checksum { block } => (
            Code::DataLoss,
            Some(Kind::Checksum(Checksum { block: *block })),
        ),
        PeerError::NoSpace => (Code::ResourceExhausted, Some(Kind::NoSpace(NoSpace {}))),
        PeerError::Other(m) => (
            Code::Internal,
            Some(Kind::Other(Other { message: m.clone() })),
        ),
        PeerError::Unreachable(_) => (Code::Unavailable, None),
    };
    match kind {
        Some(kind) => {
            let detail = pb::ReplicaError { kind: Some(kind) }.encode_to_vec();
            Status::with_details(code, e.to_string(), Bytes::from(detail))
        }
        None => Status::new(code, e.to_string()),
    }
}

/// A status received from a replica as the [`PeerError`] it stands for.
pub fn status_to_peer_error(s: &Status) -> PeerError {
    use pb::replica_error::Kind;
    if !s.details().is_empty() {
        if let Ok(pb::ReplicaError { kind: Some(kind) }) = pb::ReplicaError::decode(s.details()) {
            return match kind {
                Kind::StaleEpoch(x) => PeerError::StaleEpoch {
                    have: x.have,
                    got: x.got,
                },
                Kind::Checksum(x) => PeerError::Checksum { block: x.block },
                Kind::NoSpace(_) => PeerError::NoSpace,
                Kind::Other(x) => PeerError::Other(x.message),
            };
        }
    }
    match s.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
            PeerError::Unreachable(format!("{:?}: {}", s.code(), s.message()))
        }
        // A transport failure below gRPC (connection reset, refused, h2
        // error) surfaces as UNKNOWN with a transport error source.
        Code::Unknown if has_transport_source(s) => {
            PeerError::Unreachable(format!("transport: {}", s.message()))
        }
        code => PeerError::Other(format!("{code:?}: {}", s.message())),
    }
}

fn has_transport_source(s: &Status) -> bool {
    let mut src = std::error::Error::source(s);
    while let Some(e) = src {
        if e.is::<tonic::transport::Error>() || e.is::<std::io::Error>() {
            return true;
        }
        src = e.source();
    }
    false
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg)
}

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

/// The `Replica` gRPC service over this chunk's own copy.
#[derive(Clone)]
pub struct ReplicaService {
    peer: Arc<LocalPeer>,
}

impl ReplicaService {
    pub fn new(peer: Arc<LocalPeer>) -> Self {
        ReplicaService { peer }
    }

    /// The tonic service with message limits for 16 MiB payloads.
    pub fn into_server(self) -> ReplicaServer<ReplicaService> {
        ReplicaServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }

    fn extent_size(&self) -> u64 {
        self.peer.store().extent_size()
    }

    /// A valid extent id from the wire.
    fn extent(&self, e: Option<pb::ExtentRef>) -> Result<ExtentId, Status> {
        let e = e.ok_or_else(|| invalid("missing extent"))?;
        let id = ExtentId::new(e.volume, e.index);
        id.validate().map_err(|e| invalid(e.to_string()))?;
        Ok(id)
    }

    /// `offset..offset+len` is a non-empty, block-aligned range inside the
    /// extent, with `len <= max`.
    fn range(&self, offset: u64, len: u64, max: u64) -> Result<(), Status> {
        if len == 0 || !offset.is_multiple_of(BLOCK_SIZE) || !len.is_multiple_of(BLOCK_SIZE) {
            return Err(invalid(format!(
                "offset {offset} length {len}: not a non-empty multiple of {BLOCK_SIZE}"
            )));
        }
        if len > max {
            return Err(invalid(format!("length {len} exceeds the limit {max}")));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.extent_size() => Ok(()),
            _ => Err(invalid(format!(
                "offset {offset} length {len} is beyond the extent size {}",
                self.extent_size()
            ))),
        }
    }
}

type Rpc<T> = Result<Response<T>, Status>;

fn done<T>(r: Result<T, PeerError>) -> Rpc<T> {
    r.map(Response::new).map_err(|e| {
        tracing::debug!(error = %e, "replica request failed");
        peer_error_to_status(&e)
    })
}

#[tonic::async_trait]
impl Replica for ReplicaService {
    async fn write(&self, req: Request<pb::ReplicaWriteRequest>) -> Rpc<pb::ReplicaWriteResponse> {
        let r = req.into_inner();
        let extent = self.extent(r.extent)?;
        let span = tracing::debug_span!("rpc_write", %extent, epoch = r.epoch, offset = r.offset, len = r.data.len(), fua = r.fua);
        self.range(r.offset, r.data.len() as u64, MAX_REPLICA_DATA)?;
        let res = self
            .peer
            .write(&extent, r.epoch, r.offset, r.data, r.fua)
            .instrument(span)
            .await;
        done(res.map(|()| pb::ReplicaWriteResponse {}))
    }

    async fn read(&self, req: Request<pb::ReplicaReadRequest>) -> Rpc<pb::ReplicaReadResponse> {
        let r = req.into_inner();
        let extent = self.extent(r.extent)?;
        let span = tracing::debug_span!("rpc_read", %extent, epoch = r.epoch, offset = r.offset, len = r.len);
        self.range(r.offset, r.len, MAX_REPLICA_DATA)?;
        let res = self
            .peer
            .read(&extent, r.epoch, r.offset, r.len)
            .instrument(span)
            .await;
        done(res.map(|data| pb::ReplicaReadResponse { data }))
    }

    async fn flush(&self, req: Request<pb::ReplicaFlushRequest>) -> Rpc<pb::ReplicaFlushResponse> {
        let r = req.into_inner();
        let extent = self.extent(r.extent)?;
        let span = tracing::debug_span!("rpc_flush", %extent);
        let res = self.peer.flush(&extent).instrument(span).await;
        done(res.map(|()| pb::ReplicaFlushResponse {}))
    }

    async fn unmap(&self, req: Request<pb::ReplicaUnmapRequest>) -> Rpc<pb::ReplicaUnmapResponse> {
        let r = req.into_inner();
        let extent = self.extent(r.extent)?;
        let span = tracing::debug_span!("rpc_unmap", %extent, epoch = r.epoch, offset = r.offset, len = r.len);
        // Unmap carries no data: bounded by the extent only.
        self.range(r.offset, r.len, u64::MAX)?;
        let res = self
            .peer
            .unmap(&extent, r.epoch, r.offset, r.len)
            .instrument(span)
            .await;
        done(res.map(|()| pb::ReplicaUnmapResponse {}))
    }

    async fn repair(
        &self,
        req: Request<pb::ReplicaRepairRequest>,
    ) -> Rpc<pb::ReplicaRepairResponse> {
        let r = req.into_inner();
        let extent = self.extent(r.extent)?;
        let span = tracing::debug_span!("rpc_repair", %extent, block = r.block);
        if r.data.len() as u64 != BLOCK_SIZE {
            return Err(invalid(format!(
                "repair data is {} bytes, must be {BLOCK_SIZE}",
                r.data.len()
            )));
        }
        if r.block >= self.extent_size() / BLOCK_SIZE {
            return Err(invalid(format!(
                "block {} is beyond the extent size {}",
                r.block,
                self.extent_size()
            )));
        }
        let res = self
            .peer
            .repair(&extent, r.block, r.data)
            .instrument(span)
            .await;
        done(res.map(|()| pb::ReplicaRepairResponse {}))
    }

    async fn fence(&self, req: Request<pb::ReplicaFenceRequest>) -> Rpc<pb::ReplicaFenceResponse> {
        let r = req.into_inner();
        let extent = self.extent(r.extent)?;
        let span = tracing::debug_span!("rpc_fence", %extent, epoch = r.epoch);
        let res = self.peer.fence(&extent, r.epoch).instrument(span).await;
        done(res.map(|()| pb::ReplicaFenceResponse {}))
    }

    async fn copy_extent(
        &self,
        req: Request<pb::ReplicaCopyExtentRequest>,
    ) -> Rpc<pb::ReplicaCopyExtentResponse> {
        let r = req.into_inner();
        let src = self.extent(r.src)?;
        let dst = self.extent(r.dst)?;
        if src == dst {
            return Err(invalid(format!("copy of extent {src} onto itself")));
        }
        let span = tracing::debug_span!("rpc_copy_extent", %src, %dst, epoch = r.epoch);
        let res = self
            .peer
            .copy_extent(&src, &dst, r.epoch)
            .instrument(span)
            .await;
        done(res.map(|()| pb::ReplicaCopyExtentResponse {}))
    }
}

/// Serve the `Replica` service for `peer` on `listener` until `shutdown` is
/// cancelled (then stop accepting, finish in-flight calls and return).
pub async fn serve_replica(
    listener: TcpListener,
    peer: Arc<LocalPeer>,
    shutdown: CancellationToken,
) -> Result<(), RpcError> {
    let addr = listener.local_addr().ok();
    let span = tracing::info_span!("replica_rpc", chunk = %peer.chunk(), addr = ?addr);
    async move {
        tracing::info!("replica service up");
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let res = tonic::transport::Server::builder()
            // Bounds the memory one connection can pin with 16 MiB writes.
            .concurrency_limit_per_connection(MAX_CONCURRENT_CALLS_PER_CONNECTION)
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .add_service(ReplicaService::new(peer).into_server())
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await;
        tracing::info!(ok = res.is_ok(), "replica service stopped");
        res.map_err(RpcError::from)
    }
    .instrument(span)
    .await
}

// ---------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------

/// Settings of a [`RemotePeer`].
#[derive(Clone, Debug)]
pub struct RemotePeerConfig {
    /// Every call (including connecting) must finish within this.
    pub call_timeout: Duration,
    /// Connecting must finish within this.
    pub connect_timeout: Duration,
}

impl Default for RemotePeerConfig {
    fn default() -> Self {
        RemotePeerConfig {
            call_timeout: DEFAULT_CALL_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// A [`ReplicaPeer`] on another chunk, reached over gRPC.
pub struct RemotePeer {
    chunk: ChunkId,
    addr: String,
    client: ReplicaClient<Channel>,
    cfg: RemotePeerConfig,
}

impl std::fmt::Debug for RemotePeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemotePeer")
            .field("chunk", &self.chunk)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl RemotePeer {
    /// A peer for `chunk` at `addr` (`host:port` or `http://host:port`).
    /// Connects lazily, on the first call, and reconnects after failures.
    /// Must be called within a tokio runtime.
    pub fn new(chunk: ChunkId, addr: &str, cfg: RemotePeerConfig) -> Result<Self, RpcError> {
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| RpcError::Address {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?
            .connect_timeout(cfg.connect_timeout)
            .timeout(cfg.call_timeout)
            .tcp_nodelay(true)
            // Notice a silently dead peer (no RST) between calls too.
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let client = ReplicaClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        Ok(RemotePeer {
            chunk,
            addr: uri,
            client,
            cfg,
        })
    }

    /// The URI this peer talks to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Run one call under the per-call timeout, mapping failures.
    async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, PeerError>
    where
        F: FnOnce(ReplicaClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<T>, Status>>,
    {
        let fut = f(self.client.clone());
        match tokio::time::timeout(self.cfg.call_timeout, fut).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => {
                let e = status_to_peer_error(&status);
                tracing::debug!(op, chunk = %self.chunk, code = ?status.code(), error = %e, "replica call failed");
                Err(e)
            }
            Err(_) => {
                tracing::debug!(op, chunk = %self.chunk, "replica call timed out");
                Err(PeerError::Unreachable(format!(
                    "{op} to {} timed out after {:?}",
                    self.chunk, self.cfg.call_timeout
                )))
            }
        }
    }
}

fn extent_ref(e: &ExtentId) -> Option<pb::ExtentRef> {
    Some(pb::ExtentRef {
        volume: e.volume.clone(),
        index: e.index,
    })
}

/// Split `offset..offset+len` into pieces of at most [`MAX_REPLICA_DATA`].
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    let n = len.div_ceil(MAX_REPLICA_DATA).max(1);
    (0..n).map(move |i| {
        let start = i * MAX_REPLICA_DATA;
        (offset + start, (len - start).min(MAX_REPLICA_DATA))
    })
}

#[async_trait]
impl ReplicaPeer for RemotePeer {
    fn chunk(&self) -> &ChunkId {
        &self.chunk
    }

    async fn write(
        &self,
        extent: &ExtentId,
        epoch: u64,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), PeerError> {
        let span = tracing::debug_span!("remote_write", chunk = %self.chunk, %extent, epoch, offset, len = data.len());
        async {
            for (off, len) in pieces(offset, data.len() as u64) {
                let start = (off - offset) as usize;
                let chunk = data.slice(start..start + len as usize);
                let req = pb::ReplicaWriteRequest {
                    extent: extent_ref(extent),
                    epoch,
                    offset: off,
                    data: chunk,
                    fua,
                };
                self.call("write", |mut c| async move { c.write(req).await })
                    .await?;
            }
            Ok(())
        }
        .instrument(span)
        .await
    }

    async fn read(
        &self,
        extent: &ExtentId,
        epoch: u64,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, PeerError> {
        let span =
            tracing::debug_span!("remote_read", chunk = %self.chunk, %extent, epoch, offset, len);
        async {
            if len <= MAX_REPLICA_DATA {
                let req = pb::ReplicaReadRequest {
                    extent: extent_ref(extent),
                    epoch,
                    offset,
                    len,
                };
                let r = self
                    .call("read", |mut c| async move { c.read(req).await })
                    .await?;
                return check_len(r.data, len);
            }
            let mut out = bytes::BytesMut::with_capacity(len.min(64 << 20) as usize);
            for (off, n) in pieces(offset, len) {
                let req = pb::ReplicaReadRequest {
                    extent: extent_ref(extent),
                    epoch,
                    offset: off,
                    len: n,
                };
                let r = self
                    .call("read", |mut c| async move { c.read(req).await })
                    .await?;
                out.extend_from_slice(&check_len(r.data, n)?);
            }
            Ok(out.freeze())
        }
        .instrument(span)
        .await
    }

    async fn flush(&self, extent: &ExtentId) -> Result<(), PeerError> {
        let span = tracing::debug_span!("remote_flush", chunk = %self.chunk, %extent);
        let req = pb::ReplicaFlushRequest {
            extent: extent_ref(extent),
        };
        self.call("flush", |mut c| async move { c.flush(req).await })
            .instrument(span)
            .await
            .map(|_| ())
    }

    async fn unmap(
        &self,
        extent: &ExtentId,
        epoch: u64,
        offset: u64,
        len: u64,
    ) -> Result<(), PeerError> {
        let span =
            tracing::debug_span!("remote_unmap", chunk = %self.chunk, %extent, epoch, offset, len);
        let req = pb::ReplicaUnmapRequest {
            extent: extent_ref(extent),
            epoch,
            offset,
            len,
        };
        self.call("unmap", |mut c| async move { c.unmap(req).await })
            .instrument(span)
            .await
            .map(|_| ())
    }

    async fn repair(&self, extent: &ExtentId, block: u64, good: Bytes) -> Result<(), PeerError> {
        let span = tracing::debug_span!("remote_repair", chunk = %self.chunk, %extent, block);
        let req = pb::ReplicaRepairRequest {
            extent: extent_ref(extent),
            block,
            data: good,
        };
        self.call("repair", |mut c| async move { c.repair(req).await })
            .instrument(span)
            .await
            .map(|_| ())
    }

    async fn fence(&self, extent: &ExtentId, epoch: u64) -> Result<(), PeerError> {
        let span = tracing::debug_span!("remote_fence", chunk = %self.chunk, %extent, epoch);
        let req = pb::ReplicaFenceRequest {
            extent: extent_ref(extent),
            epoch,
        };
        self.call("fence", |mut c| async move { c.fence(req).await })
            .instrument(span)
            .await
            .map(|_| ())
    }

    async fn copy_extent(
        &self,
        src: &ExtentId,
        dst: &ExtentId,
        epoch: u64,
    ) -> Result<(), PeerError> {
        let span =
            tracing::debug_span!("remote_copy_extent", chunk = %self.chunk, %src, %dst, epoch);
        let req = pb::ReplicaCopyExtentRequest {
            src: extent_ref(src),
            dst: extent_ref(dst),
            epoch,
        };
        self.call(
            "copy_extent",
            |mut c| async move { c.copy_extent(req).await },
        )
        .instrument(span)
        .await
        .map(|_| ())
    }
}

/// A reply of the wrong length is a broken replica, never data to pass on.
fn check_len(data: Bytes, want: u64) -> Result<Bytes, PeerError> {
    if data.len() as u64 == want {
        Ok(data)
    } else {
        Err(PeerError::Other(format!(
            "replica returned {} bytes, expected {want}",
            data.len()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_replica_error_round_trips_through_a_status() {
        for e in [
            PeerError::StaleEpoch { have: 7, got: 3 },
            PeerError::Checksum { block: 42 },
            PeerError::NoSpace,
            PeerError::Other("disk on fire".into()),
        ] {
            assert_eq!(status_to_peer_error(&peer_error_to_status(&e)), e);
        }
        let s = peer_error_to_status(&PeerError::StaleEpoch { have: 7, got: 3 });
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(
            peer_error_to_status(&PeerError::Checksum { block: 1 }).code(),
            Code::DataLoss
        );
        assert_eq!(
            peer_error_to_status(&PeerError::NoSpace).code(),
            Code::ResourceExhausted
        );
        assert!(matches!(
            status_to_peer_error(&peer_error_to_status(&PeerError::Unreachable("x".into()))),
            PeerError::Unreachable(_)
        ));
    }

    #[test]
    fn statuses_without_detail_map_by_code() {
        for code in [Code::Unavailable, Code::DeadlineExceeded, Code::Cancelled] {
            assert!(matches!(
                status_to_peer_error(&Status::new(code, "x")),
                PeerError::Unreachable(_)
            ));
        }
        for code in [
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::DataLoss,
            Code::ResourceExhausted,
            Code::Internal,
        ] {
            assert!(matches!(
                status_to_peer_error(&Status::new(code, "x")),
                PeerError::Other(_)
            ));
        }
        // Garbage detail bytes are not trusted.
        let s = Status::with_details(Code::DataLoss, "x", Bytes::from_static(&[0xff, 0xff]));
        assert!(matches!(status_to_peer_error(&s), PeerError::Other(_)));
    }

    #[test]
    fn pieces_cover_the_range() {
        assert_eq!(pieces(4096, 4096).collect::<Vec<_>>(), vec![(4096, 4096)]);
        let m = MAX_REPLICA_DATA;
        assert_eq!(
            pieces(0, 2 * m + 4096).collect::<Vec<_>>(),
            vec![(0, m), (m, m), (2 * m, 4096)]
        );
        assert_eq!(pieces(0, 0).collect::<Vec<_>>(), vec![(0, 0)]);
    }
}
