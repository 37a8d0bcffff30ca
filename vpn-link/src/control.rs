//! The operator-facing gRPC API (`failback.link.v1.LinkControl`): reads the link status and
//! takes the link down or up, through a [`LinkHandle`].

use failback_proto::pb::link::link_control_server::LinkControl;
use failback_proto::pb::link::{LinkStatus, LinkStatusRequest, SetUpRequest};
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
}
