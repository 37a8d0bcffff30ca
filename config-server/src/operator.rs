//! The `Operator` service (role `operator` only): what `srctl` shows and changes.

use std::sync::Arc;

use failback_common::control::now_ms;
use failback_common::identity::{Role, authorize};
use failback_proto::pb::operator::{
    Component, DatastoreRow, DiskRow, ListInfraRequest, ListInfraResponse, RemoveComponentRequest,
    RemoveComponentResponse, operator_server::Operator,
};
use tonic::{Request, Response, Status};

use crate::state::State;

pub const CONNECTED: &str = "connected";
pub const NOT_CONNECTED: &str = "not connected";

pub struct OperatorService {
    pub state: Arc<State>,
}

#[tonic::async_trait]
impl Operator for OperatorService {
    async fn list_infra(
        &self,
        request: Request<ListInfraRequest>,
    ) -> Result<Response<ListInfraResponse>, Status> {
        authorize(&request, "Operator.ListInfra", &[Role::Operator])?;
        let rows = self.state.store.list()?;
        let sessions = self.state.sessions();
        let api = self
            .state
            .api_address
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default();
        let mut components = vec![Component {
            name: "cs".into(),
            role: Role::ConfigServer.to_string(),
            site: "onprem".into(),
            address: api.clone(),
            addresses: [("onprem".to_string(), api)].into(),
            version: failback_common::VERSION.into(),
            status: CONNECTED.into(),
            last_heartbeat_ms: now_ms(),
            ..Default::default()
        }];
        for row in rows {
            let live = sessions.get(&row.name);
            components.push(Component {
                address: row.addresses.get(&row.site).cloned().unwrap_or_default(),
                addresses: row.addresses.clone().into_iter().collect(),
                // Operators call in; they keep no control stream.
                status: if row.role == Role::Operator.as_str() {
                    "-"
                } else if live.is_some() {
                    CONNECTED
                } else {
                    NOT_CONNECTED
                }
                .into(),
                last_heartbeat_ms: live
                    .map(|s| s.last_heartbeat_ms)
                    .unwrap_or(row.last_heartbeat_ms),
                enrolled_at_ms: row.enrolled_at_ms,
                machines: row.machines,
                host: row.host,
                datastores: row
                    .datastores
                    .into_iter()
                    .map(|d| DatastoreRow {
                        name: d.name,
                        path: d.path,
                        capacity_bytes: d.capacity,
                        free_bytes: d.free,
                    })
                    .collect(),
                disks: row
                    .disks
                    .into_iter()
                    .map(|d| DiskRow {
                        id: d.id,
                        datastore: d.datastore,
                        size_bytes: d.size,
                    })
                    .collect(),
                power_state: row.power_state,
                name: row.name,
                role: row.role,
                site: row.site,
                version: row.version,
            });
        }
        components.sort_by_key(|c| (site_rank(&c.site), role_rank(&c.role), c.name.clone()));
        Ok(Response::new(ListInfraResponse { components }))
    }

    async fn remove_component(
        &self,
        request: Request<RemoveComponentRequest>,
    ) -> Result<Response<RemoveComponentResponse>, Status> {
        let who = authorize(&request, "Operator.RemoveComponent", &[Role::Operator])?;
        let name = request.into_inner().name;
        if !self.state.store.remove(&name)? {
            return Err(Status::not_found(format!(
                "no component named `{name}` is registered; see `srctl infra list`"
            )));
        }
        if let Some(s) = self.state.sessions().remove(&name) {
            s.cancel.cancel();
        }
        tracing::info!(%who, component = %name, "removed; its certificate is no longer accepted");
        Ok(Response::new(RemoveComponentResponse {}))
    }
}

fn site_rank(site: &str) -> u8 {
    u8::from(site != "onprem")
}

fn role_rank(role: &str) -> usize {
    Role::ALL
        .iter()
        .position(|r| r.as_str() == role)
        .unwrap_or(usize::MAX)
}
