//! The Identity service: name, version, capabilities (controller service,
//! volume accessibility constraints, online expansion), readiness.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use ironblock_proto::csi;
use ironblock_proto::csi::identity_server::Identity;
use ironblock_proto::csi::plugin_capability::{
    service, volume_expansion, Service, Type, VolumeExpansion,
};
use tonic::{Request, Response, Status};

use crate::{DRIVER_NAME, VERSION};

/// A readiness check (the controller asks meta; the node is always ready).
pub type ReadyCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// The Identity service.
pub struct IdentityService {
    /// Whether this process serves the Controller service.
    pub controller: bool,
    /// Run by Probe; an error answers FAILED_PRECONDITION.
    pub ready: Option<ReadyCheck>,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _r: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: VERSION.into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _r: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        let mut caps = vec![csi::PluginCapability {
            r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                r#type: volume_expansion::Type::Online as i32,
            })),
        }];
        if self.controller {
            caps.push(csi::PluginCapability {
                r#type: Some(Type::Service(Service {
                    r#type: service::Type::ControllerService as i32,
                })),
            });
        }
        // Volumes are accessible only from the nodes of their cluster
        // (crate::topology); the CO must match the volumes' and the nodes'
        // topology. A plugin-wide capability: every mode reports it.
        caps.push(csi::PluginCapability {
            r#type: Some(Type::Service(Service {
                r#type: service::Type::VolumeAccessibilityConstraints as i32,
            })),
        });
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: caps,
        }))
    }

    async fn probe(
        &self,
        _r: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        if let Some(check) = &self.ready {
            check()
                .await
                .map_err(|e| Status::failed_precondition(format!("not healthy: {e}")))?;
        }
        Ok(Response::new(csi::ProbeResponse { ready: Some(true) }))
    }
}
