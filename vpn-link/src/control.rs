//! The operator-facing gRPC API (`failback.link.v1.LinkControl`): reads the link status and
//! takes the link down or up, changes its settings, resets its connections, through a
//! [`LinkHandle`].

use failback_proto::pb::link::link_control_server::LinkControl;
use failback_proto::pb::link::{
    LinkStatus, LinkStatusRequest, ResetConnectionsRequest, SetRequest, SetUpRequest,
};

use crate::Settings;
use tonic::{Request, Response, Status};

use crate::LinkHandle;

pub(crate) struct ControlService {
    pub(crate) handle: LinkHandle,
}

#[tonic::async_trait]
impl LinkControl for ControlService {
    async fn status(
        &self,
        _request: Request<LinkStatusRequest>,
    ) -> Result<Response<LinkStatus>, Status> {
        Ok(Response::new(self.handle.status()))
    }

    async fn set_up(&self, request: Request<SetUpRequest>) -> Result<Response<LinkStatus>, Status> {
        self.handle.set_up(request.into_inner().up);
        Ok(Response::new(self.handle.status()))
    }

    /// Merges the present fields into the settings (after restoring the defaults with
    /// `clear`); a bad field is INVALID_ARGUMENT naming it, and changes nothing.
    async fn set(&self, request: Request<SetRequest>) -> Result<Response<LinkStatus>, Status> {
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
        _request: Request<ResetConnectionsRequest>,
    ) -> Result<Response<LinkStatus>, Status> {
        self.handle.reset_connections();
        Ok(Response::new(self.handle.status()))
    }
}
