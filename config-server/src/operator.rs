//! The `Operator` service (role `operator` only): what `srctl` shows and changes. A thin
//! adapter: it authorizes, reads through the store for views, and hands every long operation
//! to [`crate::jobs`], returning the job at once.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use failback_common::control::now_ms;
use failback_common::identity::{Role, authorize};
use failback_proto::pb::control::{
    RemoveMachine, VerifyPoint, VerifyResult, WorkloadCommand, command, command_result,
};
use failback_proto::pb::operator::{
    CancelJobRequest, Component, DatastoreRow, DeleteMachineRequest, DeleteMachineResponse,
    DeletePlanResponse, DeployComponentRequest, DiskRow, DiskVerification, EnableItemRequest,
    FailoverRequest, ItemRequest, Job, JobRequest, ListInfraRequest, ListInfraResponse,
    ListItemsRequest, ListItemsResponse, ListJobsRequest, ListJobsResponse, ListPlansRequest,
    ListPlansResponse, ListPoliciesRequest, ListPoliciesResponse, Plan, PlanAction,
    PlanFailoverRequest, PlanMember, PlanReprotectRequest, PlanReprotectResponse, PlanRequest,
    Policy, RemoveComponentRequest, RemoveComponentResponse, ReprotectRequest, ResyncRequest,
    SwitchPsRequest, Verification, VerifyRequest, VerifyResponse, WorkloadRequest,
    WorkloadResponse, operator_server::Operator,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::health;
use crate::item::ItemRow;
use crate::jobs::{self, Jobs};
use crate::state::State;

pub const CONNECTED: &str = "connected";
pub const NOT_CONNECTED: &str = "not connected";

pub struct OperatorService {
    pub state: Arc<State>,
    pub jobs: Arc<Jobs>,
}

/// Checks a policy an operator sent and fills in what an older client leaves unspecified.
fn validate_policy(p: &mut Policy) -> Result<(), Status> {
    failback_common::identity::validate_name(&p.name).map_err(Status::invalid_argument)?;
    match Verification::try_from(p.verification) {
        Ok(Verification::Unspecified) => p.verification = Verification::Digests as i32,
        Ok(_) => {}
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown verification mode {}; use digests or off",
                p.verification
            )));
        }
    }
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

fn verify_result(
    target: &str,
    r: failback_proto::pb::control::CommandResult,
) -> Result<VerifyResult, Status> {
    match r.detail {
        Some(command_result::Detail::Verify(v)) => Ok(v),
        _ => Err(Status::internal(format!(
            "{target} answered VerifyPoint without a verification"
        ))),
    }
}

impl OperatorService {
    async fn item_of(&self, machine: &str) -> Result<ItemRow, Status> {
        let m = machine.to_string();
        self.state
            .store
            .call(move |db| db.item_of_machine(&m))
            .await?
            .ok_or_else(|| Status::not_found(format!("`{machine}` has no replicated item")))
    }

    /// Compares the disks of the failed-over (or test) VM with the digests the source recorded
    /// at the failover point.
    async fn verify_vm(&self, item: &ItemRow) -> Result<VerifyResponse, Status> {
        let vm = if item.test_vm.is_empty() {
            item.machine.clone()
        } else {
            item.test_vm.clone()
        };
        let result = self
            .state
            .sessions
            .command(
                &item.target,
                command::Kind::VerifyPoint(VerifyPoint {
                    item: item.id.clone(),
                    point: String::new(),
                    vm,
                    place: if item.test_vm.is_empty() && item.in_place() {
                        item.placement.home_disk_infos()
                    } else {
                        Vec::new()
                    },
                }),
            )
            .await?;
        let detail = verify_result(&item.target, result)?;
        let mut equal = !item.failover_digests.is_empty();
        let disks = item
            .failover_digests
            .iter()
            .map(|(disk, source)| {
                let replica = detail
                    .disks
                    .iter()
                    .find(|d| &d.disk == disk)
                    .map(|d| d.replica_blake3.clone())
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

type JobStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<Job, Status>> + Send>>;

#[tonic::async_trait]
impl Operator for OperatorService {
    type WatchJobStream = JobStream;

    async fn list_infra(
        &self,
        request: Request<ListInfraRequest>,
    ) -> Result<Response<ListInfraResponse>, Status> {
        authorize(&request, "Operator.ListInfra", &[Role::Operator])?;
        let rows = self.state.store.call(|db| db.list()).await?;
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
        let ps_status = self.state.all_ps_status();
        for row in rows {
            let live = self
                .state
                .sessions
                .lock()
                .get(&row.name)
                .map(|s| s.last_heartbeat_ms);
            let operator = row.role == Role::Operator.as_str();
            let h = health::component_health(
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
                status: if operator {
                    "-"
                } else if live.is_some() {
                    CONNECTED
                } else {
                    NOT_CONNECTED
                }
                .into(),
                last_heartbeat_ms: live.unwrap_or(row.last_heartbeat_ms),
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
                health: if operator {
                    "-".into()
                } else {
                    h.level.to_string()
                },
                health_errors: h.errors,
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
            policies: self.state.store.call(|db| db.policies()).await?,
        }))
    }

    async fn create_policy(&self, request: Request<Policy>) -> Result<Response<Policy>, Status> {
        authorize(&request, "Operator.CreatePolicy", &[Role::Operator])?;
        let mut p = request.into_inner();
        p.failback_of.clear();
        validate_policy(&mut p)?;
        if p.name.ends_with("-failback") {
            return Err(Status::invalid_argument(
                "names ending in -failback are reserved for the failback policies ASR creates automatically",
            ));
        }
        let policy = p.clone();
        let created = self
            .state
            .store
            .call(move |db| {
                if db.policy(&policy.name)?.is_some() {
                    return Ok(false);
                }
                db.put_policy_with_twin(&policy)?;
                Ok(true)
            })
            .await?;
        if !created {
            return Err(Status::already_exists(format!(
                "policy `{}` exists; change it with `srctl policy update`",
                p.name
            )));
        }
        Ok(Response::new(p))
    }

    async fn update_policy(&self, request: Request<Policy>) -> Result<Response<Policy>, Status> {
        authorize(&request, "Operator.UpdatePolicy", &[Role::Operator])?;
        let mut p = request.into_inner();
        let name = p.name.clone();
        let existing = self
            .state
            .store
            .call(move |db| db.policy(&name))
            .await?
            .ok_or_else(|| {
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
        validate_policy(&mut p)?;
        let policy = p.clone();
        self.state
            .store
            .call(move |db| db.put_policy_with_twin(&policy))
            .await?;
        Ok(Response::new(p))
    }

    async fn enable_item(
        &self,
        request: Request<EnableItemRequest>,
    ) -> Result<Response<Job>, Status> {
        authorize(&request, "Operator.EnableItem", &[Role::Operator])?;
        Ok(Response::new(
            jobs::enable::start(&self.jobs, request.into_inner()).await?,
        ))
    }

    async fn disable_item(&self, request: Request<ItemRequest>) -> Result<Response<Job>, Status> {
        authorize(&request, "Operator.DisableItem", &[Role::Operator])?;
        Ok(Response::new(
            jobs::disable::start(&self.jobs, &request.into_inner().machine).await?,
        ))
    }

    async fn list_items(
        &self,
        request: Request<ListItemsRequest>,
    ) -> Result<Response<ListItemsResponse>, Status> {
        authorize(&request, "Operator.ListItems", &[Role::Operator])?;
        let machine = request.into_inner().machine;
        let items = health::views(
            &self.state,
            (!machine.is_empty()).then_some(machine.as_str()),
        )
        .await?;
        if !machine.is_empty() && items.is_empty() {
            return Err(Status::not_found(format!(
                "`{machine}` has no replicated item; enable it with `srctl item enable {machine}`"
            )));
        }
        Ok(Response::new(ListItemsResponse { items }))
    }

    async fn verify(
        &self,
        request: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        authorize(&request, "Operator.Verify", &[Role::Operator])?;
        let req = request.into_inner();
        let item = self.item_of(&req.machine).await?;
        if !item.failover_digests.is_empty()
            && (req.point.is_empty() || req.point == "latest" || req.point == item.failover_point)
        {
            return self.verify_vm(&item).await.map(Response::new);
        }
        let id = item.id.clone();
        let points = self.state.store.call(move |db| db.points(&id)).await?;
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
            .sessions
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
        let detail = verify_result(&item.target, result)?;
        Ok(Response::new(VerifyResponse {
            equal: detail.equal,
            point: detail.point,
            disks: detail
                .disks
                .into_iter()
                .map(|d| DiskVerification {
                    disk: d.disk,
                    source_blake3: d.source_blake3,
                    replica_blake3: d.replica_blake3,
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
        let name = req.machine.clone();
        let machine = self
            .state
            .store
            .call(move |db| db.component(&name))
            .await?
            .filter(|c| c.role == "agent");
        if machine.is_none() {
            return Err(Status::not_found(format!(
                "no machine named `{}`",
                req.machine
            )));
        }
        self.state
            .sessions
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

    async fn resync(&self, request: Request<ResyncRequest>) -> Result<Response<Job>, Status> {
        authorize(&request, "Operator.Resync", &[Role::Operator])?;
        Ok(Response::new(
            jobs::resync::start(&self.jobs, &request.into_inner().machine).await?,
        ))
    }

    async fn switch_process_server(
        &self,
        request: Request<SwitchPsRequest>,
    ) -> Result<Response<Job>, Status> {
        authorize(&request, "Operator.SwitchProcessServer", &[Role::Operator])?;
        Ok(Response::new(
            jobs::switch_ps::start(&self.jobs, request.into_inner()).await?,
        ))
    }

    async fn failover(&self, request: Request<FailoverRequest>) -> Result<Response<Job>, Status> {
        authorize(&request, "Operator.Failover", &[Role::Operator])?;
        Ok(Response::new(
            jobs::failover::start(&self.jobs, request.into_inner(), 0).await?,
        ))
    }

    async fn reprotect(&self, request: Request<ReprotectRequest>) -> Result<Response<Job>, Status> {
        authorize(&request, "Operator.Reprotect", &[Role::Operator])?;
        Ok(Response::new(
            jobs::reprotect::start(&self.jobs, request.into_inner()).await?,
        ))
    }

    async fn plan_reprotect(
        &self,
        request: Request<PlanReprotectRequest>,
    ) -> Result<Response<PlanReprotectResponse>, Status> {
        authorize(&request, "Operator.PlanReprotect", &[Role::Operator])?;
        Ok(Response::new(
            jobs::plan::start_reprotect(&self.jobs, request.into_inner()).await?,
        ))
    }

    async fn delete_machine(
        &self,
        request: Request<DeleteMachineRequest>,
    ) -> Result<Response<DeleteMachineResponse>, Status> {
        authorize(&request, "Operator.DeleteMachine", &[Role::Operator])?;
        let req = request.into_inner();
        let (host_name, machine_name) = (req.host.clone(), req.machine.clone());
        let (host, machine, item) = self
            .state
            .store
            .call(move |db| {
                Ok((
                    db.component(&host_name)?,
                    db.component(&machine_name)?,
                    db.item_of_machine(&machine_name)?,
                ))
            })
            .await?;
        let host = host.filter(|c| c.role == "host").ok_or_else(|| {
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
        let running_source =
            machine.is_some_and(|m| m.host == host.name && self.state.connected(&m.name));
        if let Some(item) = item
            && running_source
        {
            return Err(Status::failed_precondition(format!(
                "`{}` on {} is running and has replicated item {} ({}): it can't be deleted",
                req.machine, host.name, item.id, item.state
            )));
        }
        self.state
            .sessions
            .command(
                &host.name,
                command::Kind::RemoveMachine(RemoveMachine {
                    name: req.machine.clone(),
                    delete_disks: true,
                }),
            )
            .await?;
        let (h, m) = (host.name.clone(), req.machine.clone());
        self.state
            .store
            .call(move |db| db.remove_host_machine(&h, &m))
            .await?;
        Ok(Response::new(DeleteMachineResponse {}))
    }

    async fn cleanup_test_failover(
        &self,
        request: Request<ItemRequest>,
    ) -> Result<Response<Job>, Status> {
        authorize(&request, "Operator.CleanupTestFailover", &[Role::Operator])?;
        Ok(Response::new(
            jobs::cleanup::start(&self.jobs, &request.into_inner().machine, 0).await?,
        ))
    }

    async fn commit(&self, request: Request<ItemRequest>) -> Result<Response<Job>, Status> {
        authorize(&request, "Operator.Commit", &[Role::Operator])?;
        Ok(Response::new(
            jobs::commit::start(&self.jobs, &request.into_inner().machine, 0).await?,
        ))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        authorize(&request, "Operator.ListJobs", &[Role::Operator])?;
        let req = request.into_inner();
        let (id, parent) = (req.id, req.parent);
        let jobs = self
            .state
            .store
            .call(move |db| {
                if id != 0 {
                    return Ok(db.job(id)?.into_iter().collect::<Vec<_>>());
                }
                db.jobs(parent)
            })
            .await?;
        if id != 0 && jobs.is_empty() {
            return Err(Status::not_found(format!(
                "no job {id}; see `srctl job list`"
            )));
        }
        Ok(Response::new(ListJobsResponse {
            jobs: jobs.iter().map(|j| j.to_pb()).collect(),
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<Job>, Status> {
        authorize(&request, "Operator.CancelJob", &[Role::Operator])?;
        let req = request.into_inner();
        Ok(Response::new(self.jobs.cancel(req.id, req.force).await?))
    }

    async fn resume_job(&self, request: Request<JobRequest>) -> Result<Response<Job>, Status> {
        authorize(&request, "Operator.ResumeJob", &[Role::Operator])?;
        Ok(Response::new(
            self.jobs.resume(request.into_inner().id).await?,
        ))
    }

    async fn watch_job(
        &self,
        request: Request<JobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        authorize(&request, "Operator.WatchJob", &[Role::Operator])?;
        let id = request.into_inner().id;
        let state = self.state.clone();
        let first = state
            .store
            .call(move |db| db.job(id))
            .await?
            .ok_or_else(|| Status::not_found(format!("no job {id}; see `srctl job list`")))?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut changed = state.changed.subscribe();
        tokio::spawn(async move {
            let mut last = first.to_pb();
            if tx.send(Ok(last.clone())).await.is_err() {
                return;
            }
            while last.state == "In progress" || last.state == "Waiting" {
                // Wake on a change; at least once a second for progress that moved in memory.
                let _ = tokio::time::timeout(Duration::from_secs(1), changed.changed()).await;
                let Ok(Some(job)) = state.store.call(move |db| db.job(id)).await else {
                    return;
                };
                let job = job.to_pb();
                if job != last {
                    if tx.send(Ok(job.clone())).await.is_err() {
                        return;
                    }
                    last = job;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn create_plan(&self, request: Request<PlanRequest>) -> Result<Response<Plan>, Status> {
        authorize(&request, "Operator.CreatePlan", &[Role::Operator])?;
        Ok(Response::new(
            jobs::plan::create(&self.state, &request.into_inner().name).await?,
        ))
    }

    async fn add_to_plan(&self, request: Request<PlanMember>) -> Result<Response<Plan>, Status> {
        authorize(&request, "Operator.AddToPlan", &[Role::Operator])?;
        Ok(Response::new(
            jobs::plan::add(&self.state, request.into_inner()).await?,
        ))
    }

    async fn show_plan(&self, request: Request<PlanRequest>) -> Result<Response<Plan>, Status> {
        authorize(&request, "Operator.ShowPlan", &[Role::Operator])?;
        Ok(Response::new(
            jobs::plan::show(&self.state, &request.into_inner().name).await?,
        ))
    }

    async fn list_plans(
        &self,
        request: Request<ListPlansRequest>,
    ) -> Result<Response<ListPlansResponse>, Status> {
        authorize(&request, "Operator.ListPlans", &[Role::Operator])?;
        Ok(Response::new(ListPlansResponse {
            plans: jobs::plan::list(&self.state).await?,
        }))
    }

    async fn remove_from_plan(
        &self,
        request: Request<PlanMember>,
    ) -> Result<Response<Plan>, Status> {
        authorize(&request, "Operator.RemoveFromPlan", &[Role::Operator])?;
        Ok(Response::new(
            jobs::plan::remove(&self.state, request.into_inner()).await?,
        ))
    }

    async fn delete_plan(
        &self,
        request: Request<PlanRequest>,
    ) -> Result<Response<DeletePlanResponse>, Status> {
        authorize(&request, "Operator.DeletePlan", &[Role::Operator])?;
        jobs::plan::delete(&self.state, &request.into_inner().name).await?;
        Ok(Response::new(DeletePlanResponse {}))
    }

    async fn add_plan_action(
        &self,
        request: Request<PlanAction>,
    ) -> Result<Response<Plan>, Status> {
        authorize(&request, "Operator.AddPlanAction", &[Role::Operator])?;
        Ok(Response::new(
            jobs::plan::add_action(&self.state, request.into_inner()).await?,
        ))
    }

    async fn plan_failover(
        &self,
        request: Request<PlanFailoverRequest>,
    ) -> Result<Response<Job>, Status> {
        authorize(&request, "Operator.PlanFailover", &[Role::Operator])?;
        Ok(Response::new(
            jobs::plan::start(&self.jobs, request.into_inner()).await?,
        ))
    }

    async fn deploy_component(
        &self,
        request: Request<DeployComponentRequest>,
    ) -> Result<Response<Job>, Status> {
        authorize(&request, "Operator.DeployComponent", &[Role::Operator])?;
        Ok(Response::new(
            jobs::deploy::start(&self.jobs, request.into_inner()).await?,
        ))
    }

    async fn remove_component(
        &self,
        request: Request<RemoveComponentRequest>,
    ) -> Result<Response<RemoveComponentResponse>, Status> {
        let who = authorize(&request, "Operator.RemoveComponent", &[Role::Operator])?;
        let name = request.into_inner().name;
        // A process server, master target or machine that active items use stays: removing
        // it would strand them.
        let n = name.clone();
        let users: Vec<String> = self
            .state
            .store
            .call(move |db| db.items())
            .await?
            .into_iter()
            .filter(|i| i.process_server == n || i.target == n || i.machine == n)
            .map(|i| i.id)
            .collect();
        if !users.is_empty() {
            return Err(Status::failed_precondition(format!(
                "`{name}` is in use by {}: disable their replication (`srctl item disable \
                 MACHINE`) or move them elsewhere (reprotect through another component) first",
                users.join(", ")
            )));
        }
        let n = name.clone();
        let Some(fingerprint) = self
            .state
            .store
            .call(move |db| db.remove(&n, now_ms()))
            .await?
        else {
            return Err(Status::not_found(format!(
                "no component named `{name}` is registered; see `srctl infra list`"
            )));
        };
        self.state.sessions.drop_session(&name);
        self.state.revoke(Some(fingerprint));
        tracing::info!(%who, component = %name, "removed; its certificate is revoked on every server");
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
