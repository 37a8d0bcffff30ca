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
//! Preconditions are checked first, each with ASR's error (and code); a failed check changes
//! nothing. The job "Reprotect" then powers the on-premises VM off, prepares the master target,
//! assigns the process server and starts replication; it ends when the item is Protected
//! (reverse direction), which the agent's progress reports tell (see `items::on_progress`).

use std::sync::Arc;

use failback_common::control::now_ms;
use failback_proto::pb::control::{DiskInfo, PrepareReplica, RemoveReplica, SetRoute, command};
use failback_proto::pb::operator::{Job, ReprotectRequest};
use tonic::Status;

use crate::db::ComponentRow;
use crate::failover::{FAILOVER_COMMITTED, FAILOVER_COMPLETED, remove_vm, step};
use crate::items::{
    self, ItemRow, Placement, Progress, REPROTECTING, address_for, default_policy, start_command,
};
use crate::state::State;

/// A component of `role`, or a clear error naming what exists.
fn component(state: &State, name: &str, role: &str, what: &str) -> Result<ComponentRow, Status> {
    state
        .store
        .component(name)?
        .filter(|c| c.role == role)
        .ok_or_else(|| {
            Status::not_found(format!(
                "no {what} named `{name}` is registered; see `srctl infra list`"
            ))
        })
}

/// Everything a reprotect decided before changing anything.
struct Plan {
    old: ItemRow,
    machine: ComponentRow,
    ps: ComponentRow,
    ps_address: String,
    mt: ComponentRow,
    target_address: String,
    datastore: String,
    placement: Placement,
    policy: failback_proto::pb::operator::Policy,
    /// The host whose VM of the same name must be off during reprotect (original location).
    power_off: Option<String>,
}

/// Checks every precondition; returns the plan or the first violated one.
fn check(state: &State, req: &ReprotectRequest) -> Result<Plan, Status> {
    let store = &state.store;
    failback_common::identity::validate_name(&req.machine).map_err(Status::invalid_argument)?;
    let not_in_db = || {
        Status::failed_precondition(format!(
            "`{}` is not in the configuration server's database: ASR can fail back only a \
             machine the CS knows (was the CS restored from an older backup? restore a newer \
             one, or protect the machine again with `srctl item enable`)",
            req.machine
        ))
    };
    let old = store.item_of_machine(&req.machine)?.ok_or_else(not_in_db)?;
    let machine = store.component(&req.machine)?.ok_or_else(not_in_db)?;
    match old.state.as_str() {
        FAILOVER_COMMITTED => {}
        FAILOVER_COMPLETED => {
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
    if let Some((id, name)) = store.running_job(&old.id)? {
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

    let ps_name = match (req.process_server.as_str(), source_site.as_str()) {
        ("", "azure") => "ps-azure",
        ("", _) => "ps-onprem",
        (name, _) => name,
    };
    let ps = component(state, ps_name, "process-server", "process server")?;
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

    let mt_name = match (req.master_target.as_str(), target_site) {
        ("", "onprem") => "mt-onprem",
        ("", _) => "azure-target",
        (name, _) => name,
    };
    let mt = component(state, mt_name, "master-target", "master target")?;
    if mt.site != target_site {
        return Err(Status::invalid_argument(format!(
            "master target `{}` is in {}, but `{}` replicates to {target_site}",
            mt.name, mt.site, machine.name
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
    let snapshots = state
        .snapshots
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&mt.name)
        .cloned()
        .unwrap_or_default();
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
        let hosts = store.list()?;
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
    } else if let Some(prev) = store
        .items_of_machine(&machine.name)?
        .into_iter()
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
    let in_use: usize = store
        .items()?
        .iter()
        .filter(|i| i.target == mt.name && i.id != old.id)
        .filter_map(|i| store.component(&i.machine).ok().flatten())
        .map(|c| c.disks.len())
        .sum();
    let limit = state.config.master_target_disk_limit;
    if in_use + machine.disks.len() > limit {
        return Err(Status::failed_precondition(format!(
            "master target `{}` would serve {} disks: at most {limit} per master target; use \
             another master target (--master-target)",
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
    let base = store
        .policy(&old.policy)?
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
    let policy = store.policy(&policy_name)?.unwrap_or_else(default_policy);
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

/// `reprotect`: checks, then starts the job "Reprotect" and returns it once replication runs;
/// the job completes when the item is Protected in the new direction.
/// `srctl reprotect MACHINE`: a machine that shares a replication group with others is
/// refused (ASR reprotects replication groups through a recovery plan, all members with the
/// same master target: [`crate::plans::reprotect`]).
pub async fn reprotect(state: &Arc<State>, req: ReprotectRequest) -> Result<Job, Status> {
    if let Some(old) = state.store.item_of_machine(&req.machine)?
        && !old.replication_group.is_empty()
    {
        let others: Vec<String> = group_members(state, &old.replication_group)?
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
    start(state, req).await
}

/// The machines whose active item is in replication group `group`.
pub(crate) fn group_members(state: &State, group: &str) -> Result<Vec<String>, Status> {
    Ok(state
        .store
        .items()?
        .into_iter()
        .filter(|i| i.replication_group == group)
        .map(|i| i.machine)
        .collect())
}

/// Checks every precondition of reprotecting `req.machine`, changing nothing.
pub(crate) fn precheck(state: &State, req: &ReprotectRequest) -> Result<(), Status> {
    check(state, req).map(|_| ())
}

/// Starts the reprotect of one machine once its preconditions hold (no replication group
/// check: a plan reprotects the whole group).
pub(crate) async fn start(state: &Arc<State>, req: ReprotectRequest) -> Result<Job, Status> {
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
    } = check(state, &req)?;
    let store = &state.store;
    let item = ItemRow {
        id: store.next_item_id(&machine.name)?,
        machine: machine.name.clone(),
        direction: if machine.site == "azure" {
            "reverse"
        } else {
            "forward"
        }
        .into(),
        state: REPROTECTING.into(),
        process_server: ps.name.clone(),
        target: mt.name.clone(),
        datastore: datastore.clone(),
        policy: policy.name.clone(),
        replication_group: old.replication_group.clone(),
        created_ms: now_ms(),
        progress: Progress::default(),
        failover_point: String::new(),
        failover_digests: Vec::new(),
        test_vm: String::new(),
        placement,
    };
    store.set_item_active(&old.id, false)?;
    store.insert_item(&item)?;
    let job = store.start_job("Reprotect", &item.id)?;
    store.job_step(job, "Check prerequisites", "Succeeded")?;
    let result = async {
        if let Some(host) = &power_off {
            step(
                state,
                job,
                &format!("Power off the on-premises VM on {host}"),
                remove_vm(state, host, &machine.name, false),
            )
            .await?;
        }
        let prepare_name = if !item.placement.seeded {
            format!("Prepare the master target {} (new disks)", mt.name)
        } else {
            format!(
                "Prepare the master target {} (seeded from the existing disks)",
                mt.name
            )
        };
        step(state, job, &prepare_name, async {
            let mut prepare = items::prepare_command(&item, &machine, &policy);
            if let command::Kind::PrepareReplica(PrepareReplica {
                retention_drive, ..
            }) = &mut prepare
            {
                retention_drive.clone_from(&req.retention_drive);
            }
            state.command(&mt.name, prepare).await.map(|_| ())
        })
        .await?;
        step(
            state,
            job,
            &format!("Assign the process server {}", ps.name),
            async {
                state
                    .command(
                        &ps.name,
                        command::Kind::SetRoute(SetRoute {
                            item: item.id.clone(),
                            target: mt.name.clone(),
                            target_address: target_address.clone(),
                        }),
                    )
                    .await
                    .map(|_| ())
            },
        )
        .await?;
        step(state, job, "Start replication", async {
            state
                .command(
                    &machine.name,
                    start_command(&item, &ps.name, &ps_address, &policy),
                )
                .await
                .map(|_| ())
        })
        .await?;
        store.job_step(
            job,
            if item.placement.seeded {
                "Synchronize data (only blocks that differ)"
            } else {
                "Synchronize data (full copy)"
            },
            "In progress",
        )?;
        Ok::<(), Status>(())
    }
    .await;
    if let Err(status) = result {
        store.end_job(job, Some(status.message()))?;
        store.delete_item(&item.id)?;
        store.set_item_active(&old.id, true)?;
        let _ = state
            .command(
                &mt.name,
                command::Kind::RemoveReplica(RemoveReplica {
                    item: item.id.clone(),
                }),
            )
            .await;
        return Err(status);
    }
    tracing::info!(item = %item.id, ps = %ps.name, target = %mt.name, seeded = item.placement.seeded, "reprotect started");
    store
        .jobs(job)?
        .into_iter()
        .next()
        .ok_or_else(|| Status::internal("job vanished"))
}

/// The seed of a reprotected item's replica (empty if it was not seeded): the original
/// on-premises disks, or the previous Azure replica. The CS re-sends it when the master
/// target reconnects, so a replica lost before it was created is seeded again.
pub fn seed_of(item: &ItemRow, machine: &ComponentRow) -> Vec<DiskInfo> {
    let p = &item.placement;
    if !p.seeded {
        return Vec::new();
    }
    if item.direction == "reverse" {
        p.home_disk_infos()
    } else {
        machine
            .disks
            .iter()
            .map(|d| DiskInfo {
                id: d.id.clone(),
                datastore: item.datastore.clone(),
                path: format!("replicas/{}/disks/{}.img", p.seed_item, d.id),
                size_bytes: d.size,
            })
            .collect()
    }
}

/// Once a reprotected item is Protected, the replicas of this machine's older items on the
/// same target (the seed, earlier cycles) are no longer needed: their space is freed.
pub fn remove_old_replicas(state: &Arc<State>, item: &ItemRow) {
    let state = state.clone();
    let item = item.clone();
    tokio::spawn(async move {
        let Ok(all) = state.store.items_of_machine(&item.machine) else {
            return;
        };
        for old in all
            .into_iter()
            .filter(|o| o.id != item.id && o.target == item.target)
        {
            if let Err(e) = state
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
    });
}
