//! The `Operator` service (role `operator` only): what `srctl` shows and changes.

use std::sync::Arc;

use failback_common::control::now_ms;
use failback_common::identity::{Role, authorize};
use failback_proto::pb::control::{RemoveMachine, Resync, VerifyPoint, WorkloadCommand, command};
use failback_proto::pb::operator::{
    CancelJobRequest, Component, DatastoreRow, DeleteMachineRequest, DeleteMachineResponse,
    DiskRow, DiskVerification, EnableItemRequest, FailoverRequest, Item, ItemRequest, Job,
    ListInfraRequest, ListInfraResponse, ListItemsRequest, ListItemsResponse, ListJobsRequest,
    ListJobsResponse, ListPoliciesRequest, ListPoliciesResponse, Plan, PlanFailoverRequest,
    PlanMember, PlanReprotectRequest, PlanReprotectResponse, PlanRequest, Policy,
    RemoveComponentRequest, RemoveComponentResponse, ReprotectRequest, ResyncRequest,
    VerifyRequest, VerifyResponse, WorkloadRequest, WorkloadResponse, operator_server::Operator,
};
use tonic::{Request, Response, Status};

use crate::items;
use crate::state::State;

impl OperatorService {
    /// Compares the disks of the failed-over (or test) VM with the digests the source recorded
    /// at the failover point.
    async fn verify_vm(&self, item: &items::ItemRow) -> Result<VerifyResponse, Status> {
        let vm = if item.test_vm.is_empty() {
            item.machine.clone()
        } else {
            item.test_vm.clone()
        };
        let result = self
            .state
            .command(
                &item.target,
                command::Kind::VerifyPoint(VerifyPoint {
                    item: item.id.clone(),
                    point: String::new(),
                    vm,
                    place: if item.test_vm.is_empty() && crate::failover::in_place(item) {
                        item.placement.home_disk_infos()
                    } else {
                        Vec::new()
                    },
                }),
            )
            .await?;
        let detail: VerifyDetail = serde_json::from_str(&result.detail_json).map_err(|e| {
            Status::internal(format!("bad verification result from {}: {e}", item.target))
        })?;
        let mut equal = !item.failover_digests.is_empty();
        let disks = item
            .failover_digests
            .iter()
            .map(|(disk, source)| {
                let replica = detail
                    .disks
                    .iter()
                    .find(|(d, _, _)| d == disk)
                    .map(|(_, _, r)| r.clone())
                    .unwrap_or_default();
                equal &= &replica == source;
                DiskVerification {
                    disk: disk.clone(),
                    source_blake3: source.clone(),
                    replica_blake3: replica,
                }
            })
            .collect();
        Ok(VerifyResponse {
            equal,
            point: item.failover_point.clone(),
            disks,
        })
    }
}

fn validate_policy(p: &Policy) -> Result<(), Status> {
    failback_common::identity::validate_name(&p.name).map_err(Status::invalid_argument)?;
    if p.crash_interval_s == 0 {
        return Err(Status::invalid_argument(
            "crash_interval_s must be at least 1 second",
        ));
    }
    if p.retention_s < p.crash_interval_s {
        return Err(Status::invalid_argument(
            "retention_s must be at least crash_interval_s, or no point would be kept",
        ));
    }
    if p.rpo_threshold_s == 0 {
        return Err(Status::invalid_argument(
            "rpo_threshold_s must be at least 1 second",
        ));
    }
    Ok(())
}

/// Verification result returned by a target (`VerifyPoint` detail).
#[derive(serde::Deserialize)]
struct VerifyDetail {
    point: String,
    equal: bool,
    disks: Vec<(String, String, String)>,
}

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
        let ps_status = self
            .state
            .ps_status
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        for row in rows {
            let live = sessions.get(&row.name);
            let (health, health_errors) = component_health(
                &row.role,
                &row.name,
                live.is_some(),
                ps_status.get(&row.name),
            );
            let cache = ps_status.get(&row.name);
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
                health,
                health_errors,
                cache_used_bytes: cache.map(|c| c.cache_used_bytes).unwrap_or(0),
                cache_capacity_bytes: cache.map(|c| c.cache_capacity_bytes).unwrap_or(0),
                name: row.name,
                role: row.role,
                site: row.site,
                version: row.version,
            });
        }
        components.sort_by_key(|c| (site_rank(&c.site), role_rank(&c.role), c.name.clone()));
        Ok(Response::new(ListInfraResponse { components }))
    }

    async fn list_policies(
        &self,
        request: Request<ListPoliciesRequest>,
    ) -> Result<Response<ListPoliciesResponse>, Status> {
        authorize(&request, "Operator.ListPolicies", &[Role::Operator])?;
        Ok(Response::new(ListPoliciesResponse {
            policies: self.state.store.policies()?,
        }))
    }

    async fn create_policy(&self, request: Request<Policy>) -> Result<Response<Policy>, Status> {
        authorize(&request, "Operator.CreatePolicy", &[Role::Operator])?;
        let mut p = request.into_inner();
        p.failback_of.clear();
        validate_policy(&p)?;
        if p.name.ends_with("-failback") {
            return Err(Status::invalid_argument(
                "names ending in -failback are reserved for the failback policies ASR creates automatically",
            ));
        }
        if self.state.store.policy(&p.name)?.is_some() {
            return Err(Status::already_exists(format!(
                "policy `{}` exists; change it with `srctl policy update`",
                p.name
            )));
        }
        self.state.store.put_policy_with_twin(&p)?;
        Ok(Response::new(p))
    }

    async fn update_policy(&self, request: Request<Policy>) -> Result<Response<Policy>, Status> {
        authorize(&request, "Operator.UpdatePolicy", &[Role::Operator])?;
        let mut p = request.into_inner();
        let existing = self.state.store.policy(&p.name)?.ok_or_else(|| {
            Status::not_found(format!(
                "no policy named `{}`; see `srctl policy list`",
                p.name
            ))
        })?;
        if !existing.failback_of.is_empty() {
            return Err(Status::failed_precondition(format!(
                "`{}` is the failback policy of `{}`: it is created automatically and can't be edited \
                 (RPO threshold 15 min, retention 24 h, app-consistent 60 min)",
                existing.name, existing.failback_of
            )));
        }
        p.failback_of.clear();
        validate_policy(&p)?;
        self.state.store.put_policy_with_twin(&p)?;
        Ok(Response::new(p))
    }

    async fn enable_item(
        &self,
        request: Request<EnableItemRequest>,
    ) -> Result<Response<Item>, Status> {
        authorize(&request, "Operator.EnableItem", &[Role::Operator])?;
        let row = items::enable(&self.state, request.into_inner()).await?;
        Ok(Response::new(items::view(&self.state, &row)?))
    }

    async fn list_items(
        &self,
        request: Request<ListItemsRequest>,
    ) -> Result<Response<ListItemsResponse>, Status> {
        authorize(&request, "Operator.ListItems", &[Role::Operator])?;
        let machine = request.into_inner().machine;
        let rows = self.state.store.items()?;
        if !machine.is_empty() && !rows.iter().any(|r| r.machine == machine) {
            return Err(Status::not_found(format!(
                "`{machine}` has no replicated item; enable it with `srctl item enable {machine}`"
            )));
        }
        let items = rows
            .iter()
            .filter(|r| machine.is_empty() || r.machine == machine)
            .map(|r| items::view(&self.state, r))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(ListItemsResponse { items }))
    }

    async fn verify(
        &self,
        request: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        authorize(&request, "Operator.Verify", &[Role::Operator])?;
        let req = request.into_inner();
        let item = self
            .state
            .store
            .item_of_machine(&req.machine)?
            .ok_or_else(|| {
                Status::not_found(format!("`{}` has no replicated item", req.machine))
            })?;
        if !item.failover_digests.is_empty()
            && (req.point.is_empty() || req.point == "latest" || req.point == item.failover_point)
        {
            return self.verify_vm(&item).await.map(Response::new);
        }
        let points = self.state.store.points(&item.id)?;
        let point = if req.point.is_empty() || req.point == "latest" {
            points.last().map(|p| p.id.clone()).ok_or_else(|| {
                Status::failed_precondition(format!(
                    "`{}` has no recovery point yet (state {}); wait for the first one",
                    req.machine, item.state
                ))
            })?
        } else if points.iter().any(|p| p.id == req.point) {
            req.point.clone()
        } else {
            return Err(Status::not_found(format!(
                "no recovery point `{}` for `{}`; see `srctl item show {}`",
                req.point, req.machine, req.machine
            )));
        };
        let result = self
            .state
            .command(
                &item.target,
                command::Kind::VerifyPoint(VerifyPoint {
                    item: item.id.clone(),
                    point,
                    vm: String::new(),
                    place: Vec::new(),
                }),
            )
            .await?;
        let detail: VerifyDetail = serde_json::from_str(&result.detail_json).map_err(|e| {
            Status::internal(format!("bad verification result from {}: {e}", item.target))
        })?;
        Ok(Response::new(VerifyResponse {
            equal: detail.equal,
            point: detail.point,
            disks: detail
                .disks
                .into_iter()
                .map(|(disk, source_blake3, replica_blake3)| DiskVerification {
                    disk,
                    source_blake3,
                    replica_blake3,
                })
                .collect(),
        }))
    }

    async fn workload(
        &self,
        request: Request<WorkloadRequest>,
    ) -> Result<Response<WorkloadResponse>, Status> {
        authorize(&request, "Operator.Workload", &[Role::Operator])?;
        let req = request.into_inner();
        let machine = self
            .state
            .store
            .component(&req.machine)?
            .filter(|c| c.role == "agent");
        if machine.is_none() {
            return Err(Status::not_found(format!(
                "no machine named `{}`",
                req.machine
            )));
        }
        self.state
            .command(
                &req.machine,
                command::Kind::Workload(WorkloadCommand {
                    action: req.action,
                    rate_mb_s: req.rate_mb_s,
                    write_size: req.write_size,
                    pattern: req.pattern,
                    compressible: req.compressible,
                }),
            )
            .await?;
        Ok(Response::new(WorkloadResponse {}))
    }

    async fn resync(&self, request: Request<ResyncRequest>) -> Result<Response<Item>, Status> {
        authorize(&request, "Operator.Resync", &[Role::Operator])?;
        let machine = request.into_inner().machine;
        let item = self
            .state
            .store
            .item_of_machine(&machine)?
            .ok_or_else(|| Status::not_found(format!("`{machine}` has no replicated item")))?;
        if item.state != items::PROTECTED {
            return Err(Status::failed_precondition(format!(
                "`{machine}` is {}: resynchronize a Protected item",
                item.state
            )));
        }
        let job = self.state.store.start_job("Resynchronize", &item.id)?;
        let sent = self
            .state
            .command(
                &item.machine,
                command::Kind::Resync(Resync {
                    item: item.id.clone(),
                }),
            )
            .await;
        if let Err(status) = sent {
            self.state.store.end_job(job, Some(status.message()))?;
            return Err(status);
        }
        self.state
            .store
            .set_item_state(&item.id, items::RESYNCING)?;
        self.state.store.end_job(job, None)?;
        let row = self.state.store.item(&item.id)?.unwrap_or(item);
        Ok(Response::new(items::view(&self.state, &row)?))
    }

    async fn failover(&self, request: Request<FailoverRequest>) -> Result<Response<Job>, Status> {
        authorize(&request, "Operator.Failover", &[Role::Operator])?;
        Ok(Response::new(
            crate::failover::failover(&self.state, request.into_inner()).await?,
        ))
    }

    async fn reprotect(&self, request: Request<ReprotectRequest>) -> Result<Response<Job>, Status> {
        authorize(&request, "Operator.Reprotect", &[Role::Operator])?;
        Ok(Response::new(
            crate::reprotect::reprotect(&self.state, request.into_inner()).await?,
        ))
    }

    async fn plan_reprotect(
        &self,
        request: Request<PlanReprotectRequest>,
    ) -> Result<Response<PlanReprotectResponse>, Status> {
        authorize(&request, "Operator.PlanReprotect", &[Role::Operator])?;
        Ok(Response::new(
            crate::plans::reprotect(&self.state, request.into_inner()).await?,
        ))
    }

    async fn delete_machine(
        &self,
        request: Request<DeleteMachineRequest>,
    ) -> Result<Response<DeleteMachineResponse>, Status> {
        authorize(&request, "Operator.DeleteMachine", &[Role::Operator])?;
        let req = request.into_inner();
        let store = &self.state.store;
        let host = store
            .component(&req.host)?
            .filter(|c| c.role == "host")
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no host named `{}`; see `srctl infra list`",
                    req.host
                ))
            })?;
        if !host.machines.contains(&req.machine) {
            return Err(Status::not_found(format!(
                "no VM `{}` on {} (it has: {})",
                req.machine,
                host.name,
                host.machines.join(", ")
            )));
        }
        let running_source = store
            .component(&req.machine)?
            .is_some_and(|m| m.host == host.name && self.state.sessions().contains_key(&m.name));
        if let Some(item) = store.item_of_machine(&req.machine)?
            && running_source
        {
            return Err(Status::failed_precondition(format!(
                "`{}` on {} is running and has replicated item {} ({}): it can't be deleted",
                req.machine, host.name, item.id, item.state
            )));
        }
        self.state
            .command(
                &host.name,
                command::Kind::RemoveMachine(RemoveMachine {
                    name: req.machine.clone(),
                    delete_disks: true,
                }),
            )
            .await?;
        store.remove_host_machine(&host.name, &req.machine)?;
        Ok(Response::new(DeleteMachineResponse {}))
    }

    async fn cleanup_test_failover(
        &self,
        request: Request<ItemRequest>,
    ) -> Result<Response<Job>, Status> {
        authorize(&request, "Operator.CleanupTestFailover", &[Role::Operator])?;
        let machine = request.into_inner().machine;
        Ok(Response::new(
            crate::failover::cleanup_test(&self.state, &machine).await?,
        ))
    }

    async fn commit(&self, request: Request<ItemRequest>) -> Result<Response<Item>, Status> {
        authorize(&request, "Operator.Commit", &[Role::Operator])?;
        let machine = request.into_inner().machine;
        let row = crate::failover::commit(&self.state, &machine).await?;
        Ok(Response::new(items::view(&self.state, &row)?))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        authorize(&request, "Operator.ListJobs", &[Role::Operator])?;
        let id = request.into_inner().id;
        let jobs = self.state.store.jobs(id)?;
        if id != 0 && jobs.is_empty() {
            return Err(Status::not_found(format!(
                "no job {id}; see `srctl job list`"
            )));
        }
        Ok(Response::new(ListJobsResponse { jobs }))
    }

    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<Job>, Status> {
        authorize(&request, "Operator.CancelJob", &[Role::Operator])?;
        let req = request.into_inner();
        Ok(Response::new(crate::failover::cancel(
            &self.state,
            req.id,
            req.force,
        )?))
    }

    async fn create_plan(&self, request: Request<PlanRequest>) -> Result<Response<Plan>, Status> {
        authorize(&request, "Operator.CreatePlan", &[Role::Operator])?;
        let name = request.into_inner().name;
        failback_common::identity::validate_name(&name).map_err(Status::invalid_argument)?;
        if !self.state.store.create_plan(&name)? {
            return Err(Status::already_exists(format!(
                "recovery plan `{name}` exists"
            )));
        }
        Ok(Response::new(crate::plans::show(&self.state, &name)?))
    }

    async fn add_to_plan(&self, request: Request<PlanMember>) -> Result<Response<Plan>, Status> {
        authorize(&request, "Operator.AddToPlan", &[Role::Operator])?;
        Ok(Response::new(crate::plans::add(
            &self.state,
            &request.into_inner(),
        )?))
    }

    async fn show_plan(&self, request: Request<PlanRequest>) -> Result<Response<Plan>, Status> {
        authorize(&request, "Operator.ShowPlan", &[Role::Operator])?;
        Ok(Response::new(crate::plans::show(
            &self.state,
            &request.into_inner().name,
        )?))
    }

    async fn plan_failover(
        &self,
        request: Request<PlanFailoverRequest>,
    ) -> Result<Response<Job>, Status> {
        authorize(&request, "Operator.PlanFailover", &[Role::Operator])?;
        Ok(Response::new(
            crate::plans::run(&self.state, request.into_inner()).await?,
        ))
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

/// ASR-like health of a component: heartbeats for all; cache, CPU and memory for process
/// servers (warning > 80 % CPU/memory, > 70 % cache used; critical > 95 %, > 75 %).
pub(crate) fn component_health(
    role: &str,
    name: &str,
    connected: bool,
    ps: Option<&failback_proto::pb::control::PsStatus>,
) -> (String, Vec<String>) {
    let mut health = "Healthy";
    let mut errors = Vec::new();
    let mut raise = |h: &'static str, e: String| {
        if h == "Critical" || health == "Healthy" {
            health = h;
        }
        errors.push(e);
    };
    if role == Role::Operator.as_str() {
        return ("-".into(), errors);
    }
    if !connected {
        let code = match role {
            "process-server" => "806: no heartbeat from the process server",
            "master-target" => "78022: no heartbeat from the master target",
            "agent" => "78174: no heartbeat from the source machine",
            _ => "no heartbeat",
        };
        raise("Critical", format!("{code} {name}"));
    }
    if let Some(ps) = ps.filter(|_| connected) {
        match ps.cache_health.as_str() {
            "Warning" => raise("Warning", "cache free space below 30 %".into()),
            "Critical" if ps.throttled => raise(
                "Critical",
                "cache free space below 20 %: agents throttled".into(),
            ),
            "Critical" => raise("Critical", "cache free space below 25 %".into()),
            _ => {}
        }
        let minutes = ps.upload_estimate_s / 60.0;
        let can_not = |m: f64| {
            if minutes >= 1e9 / 60.0 {
                format!("the cache isn't uploading at all: it can't upload within {m} minutes")
            } else {
                format!("the cache can't upload within {m} minutes (estimate {minutes:.0} min)")
            }
        };
        if minutes > 45.0 {
            raise("Critical", can_not(45.0));
        } else if minutes > 30.0 {
            raise("Warning", can_not(30.0));
        }
        for (what, v) in [("CPU", ps.cpu_percent), ("memory", ps.memory_percent)] {
            if v > 95.0 {
                raise("Critical", format!("{what} use {v:.0} % (over 95 %)"));
            } else if v > 80.0 {
                raise("Warning", format!("{what} use {v:.0} % (over 80 %)"));
            }
        }
    }
    (health.into(), errors)
}
