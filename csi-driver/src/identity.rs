//! The Identity service, and the control plane connection every service
//! shares.

use std::sync::Arc;
use std::time::Duration;

use tessera_proto::csi::identity_server::Identity;
use tessera_proto::csi::plugin_capability::{
    service, volume_expansion, Service, Type, VolumeExpansion,
};
use tessera_proto::csi::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};
use tessera_store::meta::Meta;
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

use crate::DRIVER_NAME;

/// The control plane, connected on first use: the plugin starts (and
/// answers Probe with not-ready) while the control plane is unreachable.
#[derive(Clone)]
pub struct ControlPlane {
    pub endpoints: Vec<String>,
    meta: Arc<Mutex<Option<Meta>>>,
}

impl ControlPlane {
    pub fn new(endpoints: Vec<String>) -> ControlPlane {
        ControlPlane {
            endpoints,
            meta: Arc::new(Mutex::new(None)),
        }
    }

    pub async fn meta(&self) -> Result<Meta, Status> {
        let mut meta = self.meta.lock().await;
        if let Some(m) = meta.as_ref() {
            return Ok(m.clone());
        }
        let m = Meta::connect(&self.endpoints)
            .await
            .map_err(|e| Status::unavailable(format!("the control plane is unreachable: {e}")))?;
        *meta = Some(m.clone());
        Ok(m)
    }

    /// Whether the control plane answers now.
    pub async fn reachable(&self) -> bool {
        let check = async {
            let meta = self.meta().await.ok()?;
            meta.nodes().await.ok()
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(3), check).await,
            Ok(Some(_))
        )
    }
}

pub struct IdentityService {
    pub control_plane: ControlPlane,
    /// Whether this process serves the Controller service.
    pub controller: bool,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let mut capabilities = vec![PluginCapability {
            r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                r#type: volume_expansion::Type::Online as i32,
            })),
        }];
        if self.controller {
            capabilities.push(PluginCapability {
                r#type: Some(Type::Service(Service {
                    r#type: service::Type::ControllerService as i32,
                })),
            });
        }
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse {
            ready: Some(self.control_plane.reachable().await),
        }))
    }
}
