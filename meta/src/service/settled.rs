//! The `Meta` service as served: each call answers only once everything
//! its view of the leader's memory may hold went through the log.
//!
//! With group commit (`raft/commit.rs`) memory runs ahead of the log while
//! an entry is in flight, and the state lock is free meanwhile, so a call
//! can read a change that is not durable yet. Each call runs with a record
//! of the submissions it could have seen ([`super::SEEN`]: the newest one
//! when it took the lock, and its own); its answer, an error included,
//! waits for them, and becomes UNAVAILABLE if one did not go through. So
//! nothing speculative leaves meta.

use std::sync::Arc;

use ironblock_proto::v1 as pb;
use ironblock_proto::v1::meta_server::Meta;
use tonic::Request;

use super::{settle, MetaService, Rpc, SEEN};

/// [`MetaService`], each call settled (see the module doc).
#[derive(Clone)]
pub struct Settled(pub MetaService);

macro_rules! settled {
    ($($method:ident($req:ty) -> $resp:ty;)*) => {
        #[tonic::async_trait]
        impl Meta for Settled {
            type WatchRevisionsStream = <MetaService as Meta>::WatchRevisionsStream;

            /// Streams only durable revisions (the announcer's).
            async fn watch_revisions(
                &self,
                req: Request<pb::WatchRevisionsRequest>,
            ) -> Rpc<Self::WatchRevisionsStream> {
                Meta::watch_revisions(&self.0, req).await
            }

            $(
                async fn $method(&self, req: Request<$req>) -> Rpc<$resp> {
                    SEEN.scope(Arc::default(), async {
                        let answer = Meta::$method(&self.0, req).await;
                        settle().await?;
                        answer
                    })
                    .await
                }
            )*
        }
    };
}

settled! {
    register_chunk(pb::RegisterChunkRequest) -> pb::RegisterChunkResponse;
    heartbeat(pb::HeartbeatRequest) -> pb::HeartbeatResponse;
    list_chunks(pb::ListChunksRequest) -> pb::ListChunksResponse;
    drain_chunk(pb::DrainChunkRequest) -> pb::ChunkResponse;
    remove_chunk(pb::RemoveChunkRequest) -> pb::ChunkResponse;
    create_volume(pb::CreateVolumeRequest) -> pb::VolumeResponse;
    get_volume(pb::VolumeRef) -> pb::VolumeResponse;
    list_volumes(pb::ListVolumesRequest) -> pb::ListVolumesResponse;
    delete_volume(pb::VolumeRef) -> pb::DeleteVolumeResponse;
    resize_volume(pb::ResizeVolumeRequest) -> pb::VolumeResponse;
    set_volume_replicas(pb::SetVolumeReplicasRequest) -> pb::VolumeResponse;
    create_snapshot(pb::CreateSnapshotRequest) -> pb::SnapshotResponse;
    list_snapshots(pb::ListSnapshotsRequest) -> pb::ListSnapshotsResponse;
    delete_snapshot(pb::DeleteSnapshotRequest) -> pb::DeleteSnapshotResponse;
    clone_volume(pb::CloneVolumeRequest) -> pb::VolumeResponse;
    acl_add(pb::AclRequest) -> pb::AclResponse;
    acl_remove(pb::AclRequest) -> pb::AclResponse;
    get_extents(pb::GetExtentsRequest) -> pb::GetExtentsResponse;
    list_recovery_tasks(pb::ListRecoveryTasksRequest) -> pb::ListRecoveryTasksResponse;
    complete_recovery(pb::CompleteRecoveryRequest) -> pb::CompleteRecoveryResponse;
    cluster_status(pb::ClusterStatusRequest) -> pb::ClusterStatusResponse;
    list_exports(pb::ListExportsRequest) -> pb::ListExportsResponse;
    acquire_vip_lease(pb::AcquireVipLeaseRequest) -> pb::VipLeaseResponse;
    get_vip_lease(pb::GetVipLeaseRequest) -> pb::VipLeaseResponse;
    report_replica_failure(pb::ReportReplicaFailureRequest) -> pb::ExtentResponse;
    ensure_extent(pb::ExtentRequest) -> pb::ExtentResponse;
    list_chunk_extents(pb::ListChunkExtentsRequest) -> pb::ListChunkExtentsResponse;
    resolve_extent(pb::ExtentRequest) -> pb::ResolveExtentResponse;
    copy_up_extent(pb::ExtentRequest) -> pb::CopyUpExtentResponse;
    commit_copy_up(pb::CommitCopyUpRequest) -> pb::ExtentResponse;
}
