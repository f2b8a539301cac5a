//! The data-path RPCs chunks call: replica failure reports and the list of
//! extents placed on a chunk.

use ironblock_proto::v1 as pb;
use tonic::{Request, Response};

use super::{extent_pb, MetaService, Rpc};

impl MetaService {
    pub(super) async fn do_report_replica_failure(
        &self,
        req: Request<pb::ReportReplicaFailureRequest>,
    ) -> Rpc<pb::ExtentResponse> {
        let r = req.into_inner();
        let mut st = self.lock().await?;
        // The store key names the generation; older callers send only the
        // volume id (generation 0).
        let key = if r.store_key.is_empty() {
            &r.volume_id
        } else {
            if r.store_key.split(".g").next() != Some(r.volume_id.as_str()) {
                return Err(tonic::Status::invalid_argument(format!(
                    "store key {:?} is not an extent of volume {:?}",
                    r.store_key, r.volume_id
                )));
            }
            &r.store_key
        };
        let res = st.report_replica_failure(key, r.index, r.chunk_id, r.seen_epoch, &r.error);
        self.finish(&mut st);
        let (_, e) = res?;
        Ok(Response::new(pb::ExtentResponse {
            extent: Some(extent_pb(&e)),
        }))
    }

    pub(super) async fn do_list_chunk_extents(
        &self,
        req: Request<pb::ListChunkExtentsRequest>,
    ) -> Rpc<pb::ListChunkExtentsResponse> {
        let r = req.into_inner();
        let st = self.lock().await?;
        let extents = st
            .chunk_extents(r.chunk_id)?
            .iter()
            .map(|(e, _)| extent_pb(e))
            .collect();
        Ok(Response::new(pb::ListChunkExtentsResponse {
            extents,
            revision: st.revision(),
        }))
    }
}
