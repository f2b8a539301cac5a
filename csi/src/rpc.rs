//! What every CSI call of the Controller and Node services does around its
//! logic: take the request, run the logic inside a `csi` span that names
//! the call and what it is about ([`Call`]), answer its [`CsiError`] as the
//! gRPC status, wrap its value into the response ([`answer`]). (Calls are
//! counted by method and code in [`crate::metrics::CallMetricsLayer`],
//! below the services.)
//!
//! [`CsiError`]: crate::CsiError

use std::future::Future;

use ironblock_proto::csi;
use tonic::{Request, Response, Status};
use tracing::{info_span, Instrument, Span};

use crate::error::Result;

/// The span of one call about `volume` (a volume id, or the name a volume
/// is created by).
pub fn span(call: &'static str, volume: &str) -> Span {
    info_span!("csi", call, volume = %volume)
}

/// A request of a call that runs in a span of its own.
pub trait Call {
    /// The span naming the call and what it is about.
    fn span(&self) -> Span;
}

/// Requests whose span is [`span`]`(call, &request.field)`.
macro_rules! about_a_volume {
    ($($request:ident: $call:literal, $field:ident;)*) => {$(
        impl Call for csi::$request {
            fn span(&self) -> Span {
                span($call, &self.$field)
            }
        }
    )*};
}

about_a_volume! {
    CreateVolumeRequest: "CreateVolume", name;
    ValidateVolumeCapabilitiesRequest: "ValidateVolumeCapabilities", volume_id;
    DeleteVolumeRequest: "DeleteVolume", volume_id;
    ControllerPublishVolumeRequest: "ControllerPublishVolume", volume_id;
    ControllerUnpublishVolumeRequest: "ControllerUnpublishVolume", volume_id;
    CreateSnapshotRequest: "CreateSnapshot", source_volume_id;
    ControllerExpandVolumeRequest: "ControllerExpandVolume", volume_id;
    ControllerGetVolumeRequest: "ControllerGetVolume", volume_id;
    ControllerModifyVolumeRequest: "ControllerModifyVolume", volume_id;
    NodeStageVolumeRequest: "NodeStageVolume", volume_id;
    NodeUnstageVolumeRequest: "NodeUnstageVolume", volume_id;
    NodePublishVolumeRequest: "NodePublishVolume", volume_id;
    NodeUnpublishVolumeRequest: "NodeUnpublishVolume", volume_id;
    NodeGetVolumeStatsRequest: "NodeGetVolumeStats", volume_id;
    NodeExpandVolumeRequest: "NodeExpandVolume", volume_id;
}

/// Requests about no one volume: their span names only the call.
macro_rules! about_no_volume {
    ($($request:ident: $call:literal;)*) => {$(
        impl Call for csi::$request {
            fn span(&self) -> Span {
                info_span!("csi", call = $call)
            }
        }
    )*};
}

about_no_volume! {
    ListVolumesRequest: "ListVolumes";
    GetCapacityRequest: "GetCapacity";
    ListSnapshotsRequest: "ListSnapshots";
}

impl Call for csi::DeleteSnapshotRequest {
    fn span(&self) -> Span {
        info_span!("csi", call = "DeleteSnapshot", snapshot = %self.snapshot_id)
    }
}

/// Answers one call: `logic` runs on the request inside its span; its value
/// becomes the response by `respond`, its error the status.
pub async fn answer<Q: Call, T, R, F>(
    request: Request<Q>,
    logic: impl FnOnce(Q) -> F,
    respond: impl FnOnce(T) -> R,
) -> std::result::Result<Response<R>, Status>
where
    F: Future<Output = Result<T>>,
{
    let req = request.into_inner();
    let s = req.span();
    match logic(req).instrument(s.clone()).await {
        Ok(value) => Ok(Response::new(respond(value))),
        Err(e) => {
            let status = Status::from(e);
            failed(&s, &status);
            Err(status)
        }
    }
}

/// Logs a failed call at WARN in its span (which names the call and the
/// volume): its gRPC code and message. (It is counted by code in
/// `ironblock_csi_calls_total`, by [`crate::metrics::CallMetricsLayer`].)
pub fn failed(span: &Span, status: &Status) {
    span.in_scope(|| {
        tracing::warn!(code = ?status.code(), message = status.message(), "CSI call failed");
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CsiError;

    #[tokio::test]
    async fn answers_the_value_or_the_mapped_status() {
        let req = || {
            Request::new(csi::DeleteVolumeRequest {
                volume_id: "v1".into(),
                ..Default::default()
            })
        };
        let ok = answer(req(), |q| async move { Ok(q.volume_id) }, |id| id + "!")
            .await
            .map(Response::into_inner);
        assert_eq!(ok.ok().as_deref(), Some("v1!"));
        let e = answer(
            req(),
            |_| async { Err::<(), _>(CsiError::AlreadyExists("taken".into())) },
            |()| (),
        )
        .await
        .err()
        .map(|s| (s.code(), s.message().to_string()));
        assert_eq!(
            e,
            Some((
                tonic::Code::AlreadyExists,
                CsiError::AlreadyExists("taken".into()).to_string()
            ))
        );
    }
}
