//! Reprotect (stages 2 and 4 of the four stages): after a committed failover, replicate the
//! machine back the other way, so that it can fail over again (failback) or be protected again.
//!
//! To on-premises, the route is: the Azure VM's agent -> `ps-azure` -> vpn-link -> `mt-onprem`
//! -> `ds-onprem` (or through `ps-onprem` over the link, ExpressRoute-style). At the original
//! location the master target's replica starts as a copy of the old on-premises disks and the
//! initial synchronisation compares block checksums, so only blocks that differ cross the link;
//! at an alternate location the replica starts empty (full copy) and failback creates a new VM.
//! To Azure (after failback), the replica starts from the previous Azure replica: a delta again.
//!
//! Preconditions are checked first ([`check`]), each with ASR's error (and code); a failed
//! check changes nothing. The job "Reprotect" then powers the on-premises VM off, prepares the
//! master target, assigns the process server and starts replication; it ends when the item is
//! Protected in the new direction. Every step is idempotent, so a restart resumes the job.

use std::sync::Arc;

use failback_common::control::now_ms;
use failback_proto::pb::control::{PrepareReplica, RemoveReplica, command};
use failback_proto::pb::operator::{Job, Policy, ReprotectRequest};
use serde::{Deserialize, Serialize};
use tonic::Status;

use super::{CancelRule, Ctx, JobError, Jobs, Spec, enable::wait_protected, failover::remove_vm};
use crate::commands::{self, address_for};
use crate::item::{
    Direction, ItemRow, ItemState, JobKind, Placement, Progress, StepState, default_policy,
};
use crate::state::State;
use crate::store::ComponentRow;

/// What the checks read, in one database call.
pub struct Facts {
    old: Option<ItemRow>,
    running: Option<(i64, String)>,
    components: Vec<ComponentRow>,
    items: Vec<ItemRow>,
    /// Every item of the machine, newest first.
    history: Vec<ItemRow>,
    policies: Vec<Policy>,
}

impl Facts {
    pub async fn load(state: &State, machine: &str) -> Result<Facts, Status> {
        let machine = machine.to_string();
        Ok(state
            .store
            .call(move |db| {
                let old = db.item_of_machine(&machine)?;
                let running = match &old {
                    Some(o) => db.running_job(&o.id)?,
                    None => None,
                };
                Ok(Facts {
                    old,
                    running,
                    components: db.list()?,
                    items: db.items()?,
                    history: db.items_of_machine(&machine)?,
                    policies: db.policies()?,
                })
            })
            .await?)
    }

    fn component(&self, name: &str) -> Option<ComponentRow> {
        self.components.iter().find(|c| c.name == name).cloned()
    }

    fn policy(&self, name: &str) -> Option<Policy> {
        self.policies.iter().find(|p| p.name == name).cloned()
    }

    /// A component of `role`, or a clear error naming what exists.
    fn role(&self, name: &str, role: &str, what: &str) -> Result<ComponentRow, Status> {
        self.component(name)
            .filter(|c| c.role == role)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no {what} named `{name}` is registered; see `srctl infra list`"
                ))
            })
    }

    /// The machines whose active item is in replication group `group`.
    pub fn group_members(&self, group: &str) -> Vec<String> {
        self.items
            .iter()
            .filter(|i| i.replication_group == group)
            .map(|i| i.machine.clone())
            .collect()
    }
}

/// The master target that members of `old`'s replication group already reprotecting to
/// `site` write to, if any (a replication group goes back through one master target).
fn group_master_target(f: &Facts, old: &ItemRow, site: &str) -> Option<String> {
    if old.replication_group.is_empty() {
        return None;
    }
    f.items
        .iter()
        .filter(|i| i.replication_group == old.replication_group && i.machine != old.machine)
        .filter_map(|i| f.components.iter().find(|c| c.name == i.target))
        .find(|c| c.role == "master-target" && c.site == site)
        .map(|c| c.name.clone())
}

/// The disks a master target must have room for when the first member of `old`'s
/// replication group picks it: those of every member not yet reprotecting to `site` (the
/// rest follow it there), or the machine's own when it is in no group.
fn group_disks(f: &Facts, old: &ItemRow, machine: &ComponentRow, site: &str) -> usize {
    if old.replication_group.is_empty() {
        return machine.disks.len();
    }
    f.items
        .iter()
        .filter(|i| i.replication_group == old.replication_group)
        .filter(|i| {
            !f.components
                .iter()
                .any(|c| c.name == i.target && c.site == site)
        })
        .filter_map(|i| f.components.iter().find(|c| c.name == i.machine))
        .map(|c| c.disks.len())
        .sum::<usize>()
        .max(machine.disks.len())
}

/// Whether the machine's active item `active` came from a reprotect: the machine's item
/// before it (in `history`, newest first) is a committed failover, and nothing but a
/// reprotect makes an item after one.
fn reprotected(active: Option<&ItemRow>, history: &[ItemRow]) -> bool {
    let Some(active) = active else {
        return false;
    };
    active.state != ItemState::FailoverCommitted
        && history
            .iter()
            .skip_while(|i| i.id != active.id)
            .nth(1)
            .is_some_and(|before| before.state == ItemState::FailoverCommitted)
}

/// Everything a reprotect decided before changing anything.
pub struct Plan {
    old: ItemRow,
    machine: ComponentRow,
    ps: ComponentRow,
    ps_address: String,
    mt: ComponentRow,
    target_address: String,
    datastore: String,
    placement: Placement,
    policy: Policy,
    /// The host whose VM of the same name must be off during reprotect (original location).
    power_off: Option<String>,
}

/// Checks every precondition; returns the plan or the first violated one.
fn check(state: &State, f: &Facts, req: &ReprotectRequest) -> Result<Plan, Status> {
    failback_common::identity::validate_name(&req.machine).map_err(Status::invalid_argument)?;
    let not_in_db = || {
        Status::failed_precondition(format!(
            "`{}` is not in the configuration server's database: ASR can fail back only a \
             machine the CS knows (was the CS restored from an older backup? restore a newer \
             one, or protect the machine again with `srctl item enable`)",
            req.machine
        ))
    };
    let old = f.old.clone().ok_or_else(not_in_db)?;
    let machine = f.component(&req.machine).ok_or_else(not_in_db)?;
    match old.state {
        ItemState::FailoverCommitted => {}
        ItemState::FailoverCompleted => {
            return Err(Status::failed_precondition(format!(
                "`{}` failed over but the failover is not committed; commit it first (`srctl commit {}`)",
                req.machine, req.machine
            )));
        }
        other => {
            return Err(Status::failed_precondition(format!(
                "`{}` is {other}: reprotect follows a committed failover",
                req.machine
            )));
        }
    }
    if let Some((id, name)) = f.running.clone() {
        return Err(Status::failed_precondition(format!(
            "job {id} ({name}) is running on `{}`; wait for it (`srctl job show {id}`)",
            req.machine
        )));
    }
    if !state.connected(&machine.name) {
        return Err(if machine.power_state == "starting" {
            Status::failed_precondition(format!(
                "the agent isn't installed on `{}`: it has not registered with the configuration \
                 server since the VM booted (ASR: up to 15 minutes after boot); wait and try again",
                machine.name
            ))
        } else {
            Status::failed_precondition(format!(
                "95226: the VM `{}` can't reach the on-premises configuration server (its agent \
                 is not connected); check the site-to-site VPN (`srctl link status`) and try again",
                machine.name
            ))
        });
    }
    let source_site = machine.site.clone();
    let target_site = if source_site == "azure" {
        "onprem"
    } else {
        "azure"
    };

    let ps_name = match req.process_server.as_str() {
        "" => crate::placement::least_loaded_ps(state, &f.components, &f.items, &source_site)
            .map(|ps| ps.name.clone())
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "806: no process server in {source_site} is connected and healthy: deploy one \
                     (ASR: a process server in Azure for failback) or name one with \
                     --process-server"
                ))
            })?,
        name => name.to_string(),
    };
    let ps = f.role(&ps_name, "process-server", "process server")?;
    if !state.connected(&ps.name) {
        return Err(Status::failed_precondition(format!(
            "806: process server `{}` is not connected (no heartbeat); start it or choose another \
             with --process-server",
            ps.name
        )));
    }
    let ps_address = address_for(&ps, &source_site).ok_or_else(|| {
        Status::failed_precondition(format!(
            "process server `{}` is not reachable from {source_site} (it advertises no address there)",
            ps.name
        ))
    })?;

    // ASR's limit of disks a master target serves is the on-premises master target's (a
    // failback); Azure's target storage has none here.
    let limit = if target_site == "onprem" {
        state.config.master_target_disk_limit
    } else {
        usize::MAX
    };
    let mt_name = match req.master_target.as_str() {
        // A replication group goes back through one master target: the one its members
        // already reprotecting write to.
        "" => match group_master_target(f, &old, target_site) {
            Some(name) => name,
            None => crate::placement::default_master_target(
                state,
                &f.components,
                &f.items,
                &crate::placement::MasterTargetNeed {
                    site: target_site,
                    datastore: &old.placement.home_datastore,
                    os: machine.os,
                    disks: group_disks(f, &old, &machine, target_site),
                    replacing: &old.id,
                    limit,
                },
            )
            .map(|mt| mt.name.clone())
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "no master target in {target_site}: deploy one, then reprotect"
                ))
            })?,
        },
        name => name.to_string(),
    };
    let mt = f.role(&mt_name, "master-target", "master target")?;
    if mt.site != target_site {
        return Err(Status::invalid_argument(format!(
            "master target `{}` is in {}, but `{}` replicates to {target_site}",
            mt.name, mt.site, machine.name
        )));
    }
    if let (Some(machine_os), Some(mt_os)) = (machine.os, mt.os)
        && machine_os != mt_os
    {
        return Err(Status::failed_precondition(format!(
            "`{}` runs {}, but master target `{}` runs {}: a {} machine fails back through a {} \
             master target; choose one with --master-target (or set one up, as for large or \
             Linux failbacks)",
            machine.name,
            machine_os.title(),
            mt.name,
            mt_os.title(),
            machine_os.title(),
            machine_os.title()
        )));
    }
    if !state.connected(&mt.name) {
        return Err(Status::failed_precondition(format!(
            "78022: master target `{}` is not connected (no heartbeat); start it and try again",
            mt.name
        )));
    }
    let target_address = address_for(&mt, &ps.site).ok_or_else(|| {
        Status::failed_precondition(format!(
            "master target `{}` is not reachable from process server `{}` in {}",
            mt.name, ps.name, ps.site
        ))
    })?;
    let snapshots = state.snapshots_of(&mt.name);
    if !snapshots.is_empty() {
        return Err(Status::failed_precondition(format!(
            "master target `{}` has snapshots ({}): ASR can't reprotect to a master target with \
             snapshots; delete or consolidate them and try again",
            mt.name,
            snapshots.join(", ")
        )));
    }

    let home = &old.placement;
    let to_onprem = target_site == "onprem";
    let alternate = to_onprem && (req.alternate_location || home.home_disks.is_empty());
    if to_onprem && !req.alternate_location && home.home_disks.is_empty() {
        return Err(Status::failed_precondition(format!(
            "`{}` has no original on-premises location known to the configuration server (a \
             physical server, or a VM protected from Azure): reprotect it with --alternate-location",
            machine.name
        )));
    }
    let datastore = match req.datastore.as_str() {
        "" if to_onprem && !alternate => home.home_datastore.clone(),
        "" => mt
            .datastores
            .first()
            .map(|d| d.name.clone())
            .unwrap_or_default(),
        name => name.to_string(),
    };
    if !mt.datastores.iter().any(|d| d.name == datastore) {
        return Err(Status::failed_precondition(format!(
            "8061: datastore `{datastore}` is not accessible from the master target's host ({} sees: {})",
            mt.name,
            mt.datastores
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let mut power_off = None;
    let mut seeded = false;
    let mut seed_item = String::new();
    if to_onprem && !alternate {
        if datastore != home.home_datastore {
            return Err(Status::failed_precondition(format!(
                "the original location of `{}` is datastore `{}` on `{}`; to fail back to \
                 `{datastore}`, use --alternate-location",
                machine.name, home.home_datastore, home.home_host
            )));
        }
        if !state.connected(&home.home_host) {
            return Err(Status::failed_precondition(format!(
                "host `{}` is not connected: the on-premises VM `{}` must be powered off during \
                 reprotect; start the host and try again",
                home.home_host, machine.name
            )));
        }
        power_off = Some(home.home_host.clone());
        seeded = true;
    } else if alternate {
        // The new VM is created on the master target's host: no VM of that name may exist there.
        let hosts = &f.components;
        if let Some(host) = hosts.iter().find(|h| {
            h.role == "host"
                && h.site == target_site
                && h.datastores.iter().any(|d| d.name == datastore)
                && h.machines.iter().any(|m| m == &machine.name)
        }) {
            return Err(Status::failed_precondition(format!(
                "78052: a VM named `{}` already exists on `{}`, the master target's host; delete it \
                 (`srctl vm delete {} --host {}`) or fail back to the original location",
                machine.name, host.name, machine.name, host.name
            )));
        }
    } else if let Some(prev) = f
        .history
        .iter()
        .find(|i| i.target == mt.name && i.id != old.id)
    {
        // Back to Azure: the previous Azure replica is the seed (a delta, not a full copy).
        let ds_path = mt
            .datastores
            .iter()
            .find(|d| d.name == prev.datastore)
            .map(|d| d.path.clone());
        if prev.datastore == datastore && ds_path.is_some() {
            seeded = true;
            seed_item = prev.id.clone();
        }
    }
    let in_use = crate::placement::disks_in_use(&f.components, &f.items, &mt.name, &old.id);
    if in_use + machine.disks.len() > limit {
        return Err(Status::failed_precondition(format!(
            "master target `{}` would serve {} disks: at most {limit} per master target; use \
             another master target (--master-target), or deploy one",
            mt.name,
            in_use + machine.disks.len()
        )));
    }
    if !req.retention_drive.is_empty() && !req.retention_drive.starts_with('/') {
        return Err(Status::invalid_argument(format!(
            "--retention-drive `{}` must be an absolute path on the master target",
            req.retention_drive
        )));
    }
    // The failback policy (the base policy's `-failback` twin) on the way back; the base one
    // when protecting to Azure again.
    let base = f
        .policy(&old.policy)
        .map(|p| {
            if p.failback_of.is_empty() {
                p.name
            } else {
                p.failback_of
            }
        })
        .unwrap_or_else(|| "default".into());
    let policy_name = if to_onprem {
        format!("{base}-failback")
    } else {
        base
    };
    let policy = f.policy(&policy_name).unwrap_or_else(default_policy);
    let placement = Placement {
        home_host: home.home_host.clone(),
        home_datastore: home.home_datastore.clone(),
        home_disks: home.home_disks.clone(),
        source_host: machine.host.clone(),
        seeded,
        alternate,
        seed_item,
    };
    Ok(Plan {
        old,
        machine,
        ps,
        ps_address,
        mt,
        target_address,
        datastore,
        placement,
        policy,
        power_off,
    })
}

/// `srctl reprotect MACHINE`: a machine that shares a replication group with others is
/// refused (ASR reprotects replication groups through a recovery plan, all members with the
/// same master target: [`super::plan`]).
pub async fn start(jobs: &Arc<Jobs>, req: ReprotectRequest) -> Result<Job, Status> {
    let _choosing = jobs.reprotecting.lock().await;
    let facts = Facts::load(&jobs.state, &req.machine).await?;
    if let Some(old) = &facts.old
        && !old.replication_group.is_empty()
    {
        let others: Vec<String> = facts
            .group_members(&old.replication_group)
            .into_iter()
            .filter(|m| m != &req.machine)
            .collect();
        if !others.is_empty() {
            return Err(Status::failed_precondition(format!(
                "`{}` is in replication group `{}` with {}: ASR reprotects a replication group \
                 through a recovery plan, every member with the same master target; put them in \
                 a plan (`srctl plan create P`, `srctl plan add P MACHINE`) and run `srctl plan \
                 reprotect P`",
                req.machine,
                old.replication_group,
                others.join(", ")
            )));
        }
    }
    let plan = check(&jobs.state, &facts, &req)?;
    start_checked(jobs, plan, &req, 0).await
}

/// What a plan's precheck found for one member.
pub enum Precheck {
    /// Every precondition holds; the member needs `disks` on a master target of `site`.
    Ready { site: String, disks: usize },
    /// Already reprotected (a plan reprotect cut short and run again): skipped.
    Done,
}

/// Checks every precondition of reprotecting `req.machine`, changing nothing.
pub async fn precheck(state: &State, req: &ReprotectRequest) -> Result<Precheck, Status> {
    let facts = Facts::load(state, &req.machine).await?;
    if reprotected(facts.old.as_ref(), &facts.history) {
        return Ok(Precheck::Done);
    }
    let plan = check(state, &facts, req)?;
    Ok(Precheck::Ready {
        site: plan.mt.site.clone(),
        disks: plan.machine.disks.len(),
    })
}

/// The room (disks) left on the master targets of `site`, or on `named` alone: what a plan
/// reprotect's members need must fit before any of them starts. Unbounded for Azure (target
/// storage; the limit is the on-premises master target's).
pub async fn room(state: &State, site: &str, named: &str) -> Result<usize, Status> {
    if site != "onprem" {
        return Ok(usize::MAX);
    }
    let (components, items) = state.store.call(|db| Ok((db.list()?, db.items()?))).await?;
    let limit = state.config.master_target_disk_limit;
    Ok(components
        .iter()
        .filter(|c| c.role == "master-target" && c.site == site)
        .filter(|c| named.is_empty() || c.name == named)
        .map(|c| {
            limit.saturating_sub(crate::placement::disks_in_use(
                &components,
                &items,
                &c.name,
                "",
            ))
        })
        .sum())
}

/// Starts the reprotect of one machine once its preconditions hold (no replication group
/// check: a plan reprotects the whole group).
pub async fn start_one(
    jobs: &Arc<Jobs>,
    req: &ReprotectRequest,
    parent: i64,
) -> Result<Job, Status> {
    let _choosing = jobs.reprotecting.lock().await;
    let facts = Facts::load(&jobs.state, &req.machine).await?;
    let plan = check(&jobs.state, &facts, req)?;
    start_checked(jobs, plan, req, parent).await
}

/// What a reprotect job runs with (kept with the job, to resume it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Params {
    pub old: String,
    pub item: String,
    pub power_off: Option<String>,
    pub retention_drive: String,
    pub ps_address: String,
    pub target_address: String,
}

async fn start_checked(
    jobs: &Arc<Jobs>,
    plan: Plan,
    req: &ReprotectRequest,
    parent: i64,
) -> Result<Job, Status> {
    let Plan {
        old,
        machine,
        ps,
        ps_address,
        mt,
        target_address,
        datastore,
        placement,
        policy,
        power_off,
    } = plan;
    let id = {
        let m = machine.name.clone();
        jobs.state.store.call(move |db| db.next_item_id(&m)).await?
    };
    let item = ItemRow {
        id,
        machine: machine.name.clone(),
        direction: Direction::from_site(&machine.site),
        state: ItemState::Reprotecting,
        process_server: ps.name.clone(),
        target: mt.name.clone(),
        datastore,
        policy: policy.name.clone(),
        replication_group: old.replication_group.clone(),
        created_ms: now_ms(),
        progress: Progress::default(),
        failover_point: String::new(),
        failover_digests: Vec::new(),
        test_vm: String::new(),
        placement,
    };
    let params = Params {
        old: old.id.clone(),
        item: item.id.clone(),
        power_off,
        retention_drive: req.retention_drive.clone(),
        ps_address,
        target_address,
    };
    let (old_id, new) = (old.id.clone(), item.clone());
    let body_params = params.clone();
    jobs.start(
        Spec {
            name: "Reprotect".into(),
            kind: JobKind::Reprotect,
            item: item.id.clone(),
            params: serde_json::to_string(&params).unwrap_or_default(),
            parent,
            cancel: CancelRule::Anytime,
        },
        move |db, job| {
            db.set_item_active(&old_id, false)?;
            db.insert_item(&new)?;
            db.set_step(job, "Check prerequisites", StepState::Succeeded, None)?;
            Ok(())
        },
        move |ctx| Box::pin(run(ctx, body_params)),
    )
    .await
}

/// The job's body: also what a restart resumes. A failed step rolls back: the new item goes,
/// the old one is active again, the new replica is removed.
pub async fn run(ctx: Arc<Ctx>, p: Params) -> Result<(), JobError> {
    let result = steps(&ctx, &p).await;
    if let Err(e) = &result {
        tracing::warn!(item = %p.item, "reprotect failed, rolling back: {}", e.message());
        abandon(&ctx.state, &p).await?;
    }
    result
}

/// Rolls a failed (or panicked) reprotect back, unless the new item made it to Protected.
pub async fn abandon(state: &Arc<State>, p: &Params) -> Result<(), crate::store::DbError> {
    let (old, new) = (p.old.clone(), p.item.clone());
    let target = state
        .store
        .call(move |db| {
            let Some(item) = db.item(&new)? else {
                return Ok(None);
            };
            if item.state == ItemState::Protected {
                return Ok(None);
            }
            db.delete_item(&new)?;
            db.set_item_active(&old, true)?;
            Ok(Some(item.target))
        })
        .await?;
    state.forget_progress(&p.item);
    if let Some(target) = target {
        let _ = state
            .sessions
            .command(
                &target,
                command::Kind::RemoveReplica(RemoveReplica {
                    item: p.item.clone(),
                }),
            )
            .await;
    }
    state.notify();
    Ok(())
}

async fn steps(ctx: &Ctx, p: &Params) -> Result<(), JobError> {
    let id = p.item.clone();
    let (item, machine, ps, policy) = ctx
        .state
        .store
        .call(move |db| {
            let Some(item) = db.item(&id)? else {
                return Ok(None);
            };
            let machine = db.component(&item.machine)?;
            let ps = db.component(&item.process_server)?;
            let policy = db.policy(&item.policy)?.unwrap_or_else(default_policy);
            Ok(machine.zip(ps).map(|(m, ps)| (item, m, ps, policy)))
        })
        .await?
        .ok_or_else(|| {
            Status::not_found(format!(
                "item {}, its machine or its process server is gone",
                p.item
            ))
        })?;
    if item.state == ItemState::Protected {
        return Ok(());
    }
    if let Some(host) = &p.power_off {
        ctx.step(
            &format!("Power off the on-premises VM on {host}"),
            remove_vm(ctx, host, &machine.name, false),
        )
        .await?;
    }
    let prepare_name = if !item.placement.seeded {
        format!("Prepare the master target {} (new disks)", item.target)
    } else {
        format!(
            "Prepare the master target {} (seeded from the existing disks)",
            item.target
        )
    };
    ctx.step(&prepare_name, async {
        let mut prepare = commands::prepare(&item, &machine, &ps, &policy);
        if let command::Kind::PrepareReplica(PrepareReplica {
            retention_drive, ..
        }) = &mut prepare
        {
            retention_drive.clone_from(&p.retention_drive);
        }
        ctx.command(&item.target, prepare).await.map(|_| ())
    })
    .await?;
    ctx.step(
        &format!("Assign the process server {}", item.process_server),
        async {
            ctx.command(
                &item.process_server,
                commands::route(&item, &item.target, &p.target_address, &machine),
            )
            .await
            .map(|_| ())
        },
    )
    .await?;
    ctx.step("Start replication", async {
        ctx.command(
            &machine.name,
            commands::start(&item, &item.process_server, &p.ps_address, &policy),
        )
        .await
        .map(|_| ())
    })
    .await?;
    tracing::info!(item = %item.id, ps = %item.process_server, target = %item.target, seeded = item.placement.seeded, "reprotect started");
    let sync = if item.placement.seeded {
        "Synchronize data (only blocks that differ)"
    } else {
        "Synchronize data (full copy)"
    };
    ctx.step(sync, wait_protected(ctx, sync, &item.id)).await?;
    remove_old_replicas(ctx, &item).await;
    Ok(())
}

/// Once a reprotected item is Protected, the replicas of this machine's older items on the
/// same target (the seed, earlier cycles) are no longer needed: their space is freed.
async fn remove_old_replicas(ctx: &Ctx, item: &ItemRow) {
    let machine = item.machine.clone();
    let Ok(all) = ctx
        .state
        .store
        .call(move |db| db.items_of_machine(&machine))
        .await
    else {
        return;
    };
    for old in all
        .into_iter()
        .filter(|o| o.id != item.id && o.target == item.target)
    {
        if let Err(e) = ctx
            .state
            .sessions
            .command(
                &item.target,
                command::Kind::RemoveReplica(RemoveReplica {
                    item: old.id.clone(),
                }),
            )
            .await
        {
            tracing::warn!(item = %old.id, "removing the old replica: {}", e.message());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, state: ItemState, created_ms: i64) -> ItemRow {
        ItemRow {
            created_ms,
            ..ItemRow::sample(id, state)
        }
    }

    #[test]
    fn only_an_item_made_after_a_committed_failover_counts_as_reprotected() {
        use ItemState::*;
        let committed = item("vm1-1", FailoverCommitted, 1);
        let back = item("vm1-2", Reprotecting, 2);
        // Never failed over: a plan reprotect must refuse it, not skip it.
        let protected = item("vm1-1", Protected, 1);
        assert!(!reprotected(
            Some(&protected),
            std::slice::from_ref(&protected)
        ));
        // Failed over and committed: still to reprotect.
        assert!(!reprotected(
            Some(&committed),
            std::slice::from_ref(&committed)
        ));
        // Reprotecting (or Protected) after the committed failover: done, skipped.
        let history = [back.clone(), committed.clone()];
        assert!(reprotected(Some(&back), &history));
        // After a whole cycle the active item is again the one after a committed failover.
        let failed_back = item("vm1-2", FailoverCommitted, 2);
        let again = item("vm1-3", Protected, 3);
        let history = [again.clone(), failed_back.clone(), committed.clone()];
        assert!(reprotected(Some(&again), &history));
        assert!(!reprotected(Some(&failed_back), &history[1..]));
        assert!(!reprotected(None, &history));
    }
}
