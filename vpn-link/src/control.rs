//! The operator-facing gRPC API (`failback.link.v1.LinkControl`): reads the link status and
//! takes the link down or up, changes its settings, resets its connections, through a
//! [`LinkHandle`]. Served over mutual TLS, every call requires an operator's certificate.

use failback_proto::pb::link::link_control_server::LinkControl;
use failback_proto::pb::link::{
    LinkStatus, LinkStatusRequest, ResetConnectionsRequest, SetRequest, SetUpRequest,
};

use failback_common::identity::{Role, authorize};
use tonic::{Request, Response, Status};

use crate::Settings;

use crate::LinkHandle;

pub(crate) struct ControlService {
    pub(crate) handle: LinkHandle,
    /// Mutual TLS: every call must come from an operator (in-process tests run without).
    pub(crate) operators_only: bool,
}

impl ControlService {
    fn check<T>(&self, request: &Request<T>, rpc: &str) -> Result<(), Status> {
        if self.operators_only {
            authorize(request, rpc, &[Role::Operator])?;
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl LinkControl for ControlService {
    async fn status(
        &self,
        request: Request<LinkStatusRequest>,
    ) -> Result<Response<LinkStatus>, Status> {
        self.check(&request, "LinkControl.Status")?;
        Ok(Response::new(self.handle.status()))
    }

    async fn set_up(&self, request: Request<SetUpRequest>) -> Result<Response<LinkStatus>, Status> {
        self.check(&request, "LinkControl.SetUp")?;
        self.handle.set_up(request.into_inner().up);
        Ok(Response::new(self.handle.status()))
    }

    /// Merges the present fields into the settings (after restoring the defaults with
    /// `clear`); a bad field is INVALID_ARGUMENT naming it, and changes nothing.
    async fn set(&self, request: Request<SetRequest>) -> Result<Response<LinkStatus>, Status> {
        self.check(&request, "LinkControl.Set")?;
        let req = request.into_inner();
        let fields = req.settings.unwrap_or_default();
        self.handle
            .update_settings(|s| {
                if req.clear {
                    *s = Settings::default();
                }
                s.merge_pb(&fields)
            })
            .map_err(Status::invalid_argument)?;
        Ok(Response::new(self.handle.status()))
    }

    async fn reset_connections(
        &self,
        request: Request<ResetConnectionsRequest>,
    ) -> Result<Response<LinkStatus>, Status> {
        self.check(&request, "LinkControl.ResetConnections")?;
        self.handle.reset_connections();
        Ok(Response::new(self.handle.status()))
    }
}
