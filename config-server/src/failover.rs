//! Failover to the target site (stage 1 of the four stages), test failover and commit.
//!
//! "Failover" is a job with named steps: check prerequisites; shut the source down (when
//! asked; an unplanned failover goes on if that fails, a planned one stops there and changes
//! nothing); choose the recovery point (for `latest`, first process everything the source
//! has and make a new point: lowest RPO); create the disks at the point in the target's
//! datastore; start the VM on a host of the target site with an agent certificate the CS
//! issues (it registers after the boot delay). The item then shows "Failover completed"
//! until commit, which deletes the recovery points. Change-point re-creates the VM from another
//! point before commit. Test failover starts `MACHINE-Test` in an isolated test network while
//! replication goes on; cleanup removes it and its disks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use failback_common::control::now_ms;
use failback_common::identity::{Identity, Role, Site};
use failback_proto::pb::control::{
    BootMachine, DiskInfo, DropPoints, MakeTag, Materialize, RemoveMachine, ShutdownMachine,
    StopReplication, command,
};
use failback_proto::pb::operator::{FailoverRequest, Job};
use serde::Deserialize;
use tonic::Status;

use crate::items::{self, ItemRow, PROTECTED};
use crate::state::State;

pub const FAILOVER_IN_PROGRESS: &str = "Failover in progress";
pub const FAILOVER_COMPLETED: &str = "Failover completed";
pub const FAILOVER_COMMITTED: &str = "Failover committed";
pub const TEST_IN_PROGRESS: &str = "Test failover in progress";
pub const TEST_COMPLETED: &str = "Test failover completed";
/// A failover cancelled by force: replication is stopped; the failover must run again.
pub const FAILOVER_CANCELLED: &str = "Failover cancelled: run the failover again";
/// A failback cancelled during data synchronisation: the on-premises VM's disks may be half
/// written (ASR: the target VM is corrupted); running the failover again completes it.
pub const FAILBACK_INCONSISTENT: &str =
    "Failover cancelled: the on-premises VM is inconsistent; run the failover again";

const CANCELLED: &str = "cancelled by the operator: replication of this item is stopped and won't resume; run the failover again";

/// `job cancel`: refused for a failover (ASR: don't cancel a running failover) unless forced.
pub fn cancel(state: &State, id: i64, force: bool) -> Result<Job, Status> {
    let job = state
        .store
        .jobs(id)?
        .into_iter()
        .next()
        .ok_or_else(|| Status::not_found(format!("no job {id}; see `srctl job list`")))?;
    if job.state != "In progress" {
        return Err(Status::failed_precondition(format!(
            "job {id} is not running ({})",
            job.state
        )));
    }
    let token = state
        .job_cancel
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&id)
        .cloned();
    let Some(token) = token else {
        return Err(Status::failed_precondition(format!(
            "job {id} ({}) can't be cancelled",
            job.name
        )));
    };
    if !force {
        return Err(Status::failed_precondition(format!(
            "don't cancel a running failover: replication is stopped and won't resume, and the item \
             needs the failover run again; to cancel anyway: `srctl job cancel {id} --force`"
        )));
    }
    token.cancel();
    Ok(job)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unplanned,
    Planned,
    Test,
    ChangePoint,
}

#[derive(Deserialize)]
struct Materialized {
    disks: Vec<(String, String, u64)>,
    digests: Vec<(String, String)>,
}

fn job_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Unplanned => "Failover",
        Kind::Planned => "Planned failover",
        Kind::Test => "Test failover",
        Kind::ChangePoint => "Change recovery point",
    }
}

/// Runs a failover job to completion and returns it.
pub async fn failover(state: &Arc<State>, req: FailoverRequest) -> Result<Job, Status> {
    let kind = match req.kind.as_str() {
        "" | "unplanned" => Kind::Unplanned,
        "planned" => Kind::Planned,
        "test" => Kind::Test,
        "change-point" => Kind::ChangePoint,
        other => {
            return Err(Status::invalid_argument(format!(
                "unknown failover kind `{other}`"
            )));
        }
    };
    let store = &state.store;
    let item = store.item_of_machine(&req.machine)?.ok_or_else(|| {
        Status::not_found(format!(
            "`{}` has no replicated item; enable it with `srctl item enable {}`",
            req.machine, req.machine
        ))
    })?;
    match kind {
        Kind::Unplanned | Kind::Planned
            if !matches!(
                item.state.as_str(),
                PROTECTED | FAILOVER_CANCELLED | FAILBACK_INCONSISTENT
            ) =>
        {
            return Err(Status::failed_precondition(format!(
                "`{}` is {}: only a Protected item can fail over",
                item.machine, item.state
            )));
        }
        Kind::Test if item.state != PROTECTED => {
            return Err(Status::failed_precondition(format!(
                "`{}` is {}: only a Protected item can fail over",
                item.machine, item.state
            )));
        }
        Kind::Test if !item.test_vm.is_empty() => {
            return Err(Status::failed_precondition(format!(
                "test failover VM {} still exists; run `srctl test-failover-cleanup {}` first",
                item.test_vm, item.machine
            )));
        }
        Kind::ChangePoint if item.state != FAILOVER_COMPLETED => {
            return Err(Status::failed_precondition(format!(
                "`{}` is {}: the recovery point can be changed only after a failover and before commit",
                item.machine, item.state
            )));
        }
        _ => {}
    }
    if let Some((id, name)) = store.running_job(&item.id)? {
        return Err(Status::failed_precondition(format!(
            "job {id} ({name}) is running on `{}`; wait for it (`srctl job show {id}`)",
            item.machine
        )));
    }
    let points = store.points(&item.id)?;
    let point_arg = if req.point.is_empty() {
        "latest"
    } else {
        req.point.as_str()
    };
    if points.is_empty() && !(point_arg == "latest" || kind == Kind::Planned) {
        return Err(Status::failed_precondition(format!(
            "`{}` has no recovery point: failover needs at least one",
            item.machine
        )));
    }
    if kind == Kind::Planned && !state.sessions().contains_key(&item.machine) {
        return Err(Status::failed_precondition(format!(
            "planned failover needs to shut `{}` down, but it is not connected; nothing changed \
             (use an unplanned `srctl failover` if the site is lost)",
            item.machine
        )));
    }
    if !matches!(
        point_arg,
        "latest" | "latest-processed" | "latest-app-consistent"
    ) && kind != Kind::Planned
        && !points.iter().any(|p| p.id == point_arg)
    {
        return Err(Status::not_found(format!(
            "no recovery point `{point_arg}` for `{}`; see `srctl item show {}`",
            item.machine, item.machine
        )));
    }
    if point_arg == "latest-app-consistent" && !points.iter().any(|p| p.kind.ends_with("app")) {
        return Err(Status::failed_precondition(format!(
            "`{}` has no app-consistent recovery point yet",
            item.machine
        )));
    }

    let sync = match req.sync.as_str() {
        "" | "before-failover" => "before-failover",
        "full-download" => "full-download",
        other => {
            return Err(Status::invalid_argument(format!(
                "unknown --sync `{other}`: before-failover (synchronise while the VM runs, then \
                 only the last changes) or full-download (no checksums, the whole disks)"
            )));
        }
    };
    if !req.sync.is_empty() && item.direction != "reverse" {
        return Err(Status::invalid_argument(
            "--sync applies to failback (a failover back to on-premises) only",
        ));
    }
    let job = store.start_job(job_name(kind), &item.id)?;
    let before = item.state.clone();
    let running = if kind == Kind::Test {
        TEST_IN_PROGRESS
    } else {
        FAILOVER_IN_PROGRESS
    };
    store.set_item_state(&item.id, running)?;
    store.job_step(job, "Check prerequisites", "Succeeded")?;
    let cancel = tokio_util::sync::CancellationToken::new();
    state
        .job_cancel
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(job, cancel.clone());
    let result = tokio::select! {
        r = run(state, &item, kind, point_arg, req.shutdown, sync, job) => r,
        _ = cancel.cancelled() => Err(Status::cancelled(CANCELLED)),
    };
    state
        .job_cancel
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&job);
    match result {
        Ok(()) => {
            store.end_job(job, None)?;
        }
        Err(status) if status.message() == CANCELLED => {
            store.end_job(job, Some(CANCELLED))?;
            store.set_item_state(
                &item.id,
                if kind == Kind::Test {
                    &before
                } else if item.direction == "reverse" {
                    FAILBACK_INCONSISTENT
                } else {
                    FAILOVER_CANCELLED
                },
            )?;
            return Err(status);
        }
        Err(status) => {
            store.end_job(job, Some(status.message()))?;
            store.set_item_state(&item.id, &before)?;
            return Err(status);
        }
    }
    store
        .jobs(job)?
        .into_iter()
        .next()
        .ok_or_else(|| Status::internal("job vanished"))
}

pub(crate) async fn step<T>(
    state: &State,
    job: i64,
    name: &str,
    f: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    state.store.job_step(job, name, "In progress")?;
    match f.await {
        Ok(v) => {
            state.store.job_step(job, name, "Succeeded")?;
            Ok(v)
        }
        Err(e) => {
            state.store.job_step(job, name, "Failed")?;
            Err(e)
        }
    }
}

/// Waits until the target reported point `id` of `item`.
async fn wait_point(state: &State, item: &str, id: &str, within: Duration) -> Result<(), Status> {
    let deadline = Instant::now() + within;
    loop {
        if state.store.points(item)?.iter().any(|p| p.id == id) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Status::deadline_exceeded(format!(
                "point {id} did not reach the target within {within:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the target holds every batch the process server had acknowledged when the
/// wait began (phase 1 of a failback: the data is synchronised while the VM still runs).
async fn drained(state: &State, item: &str) -> Result<(), Status> {
    let progress = |state: &State| -> Result<items::Progress, Status> {
        Ok(state
            .store
            .item(item)?
            .map(|i| i.progress)
            .unwrap_or_default())
    };
    let want = progress(state)?.acked_seq;
    loop {
        let p = progress(state)?;
        if p.target_seq >= want && p.phase == "delta" {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Powers `vm` off on `host` (or deletes it with its disks); a VM already gone is fine.
pub(crate) async fn remove_vm(
    state: &State,
    host: &str,
    vm: &str,
    delete_disks: bool,
) -> Result<(), Status> {
    match state
        .command(
            host,
            command::Kind::RemoveMachine(RemoveMachine {
                name: vm.to_string(),
                delete_disks,
            }),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.message().contains("no machine") => Ok(()),
        Err(e) => Err(e),
    }
}

/// A failback to the original location writes into the on-premises VM's own disks.
pub fn in_place(item: &ItemRow) -> bool {
    item.direction == "reverse"
        && !item.placement.alternate
        && !item.placement.home_disks.is_empty()
}

#[allow(clippy::too_many_arguments)]
async fn run(
    state: &Arc<State>,
    item: &ItemRow,
    kind: Kind,
    point_arg: &str,
    shutdown: bool,
    sync: &str,
    job: i64,
) -> Result<(), Status> {
    let store = &state.store;
    let vm = if kind == Kind::Test {
        format!("{}-Test", item.machine)
    } else {
        item.machine.clone()
    };
    let target = store.component(&item.target)?.ok_or_else(|| {
        Status::failed_precondition(format!("target {} is not registered", item.target))
    })?;
    let target_site: Site = target.site.parse().map_err(Status::internal)?;
    let failback = item.direction == "reverse" && kind != Kind::Test;
    let original = in_place(item) && kind != Kind::Test;
    let host = store
        .list()?
        .into_iter()
        .find(|c| {
            c.role == "host"
                && if original {
                    c.name == item.placement.home_host
                } else {
                    c.site == target.site && c.datastores.iter().any(|d| d.name == item.datastore)
                }
        })
        .ok_or_else(|| {
            Status::failed_precondition(if original {
                format!(
                    "host `{}` of the original location is not registered",
                    item.placement.home_host
                )
            } else {
                format!(
                    "no host in {} sees datastore {} to boot the VM on",
                    target.site, item.datastore
                )
            })
        })?;
    // ASR shuts the Azure VM down during failback.
    let shutdown = shutdown || failback;

    for (what, name) in [("target", &item.target), ("host", &host.name)] {
        if !state.sessions().contains_key(name.as_str()) {
            return Err(Status::failed_precondition(format!(
                "{what} `{name}` is not connected: it is needed to create and start the VM; nothing changed"
            )));
        }
    }

    if failback && sync == "before-failover" && state.sessions().contains_key(&item.machine) {
        step(
            state,
            job,
            "Synchronize data while the VM runs (phase 1)",
            drained(state, &item.id),
        )
        .await?;
    }

    // Shut the source down and drain it: its last writes become the final point.
    let mut final_point = None;
    if kind == Kind::Planned || (shutdown && kind == Kind::Unplanned) {
        let tag = format!("final-{}", now_ms());
        let r = step(state, job, "Shut down the source machine", async {
            state
                .command(
                    &item.machine,
                    command::Kind::Shutdown(ShutdownMachine {
                        item: item.id.clone(),
                        final_tag: tag.clone(),
                    }),
                )
                .await?;
            wait_point(state, &item.id, &tag, Duration::from_secs(60)).await
        })
        .await;
        match r {
            Ok(()) => {
                store.set_power_state(&item.machine, "off")?;
                final_point = Some(tag);
            }
            Err(e) if kind == Kind::Planned => {
                return Err(Status::failed_precondition(format!(
                    "the source machine could not be shut down and drained: {}",
                    e.message()
                )));
            }
            Err(e) => {
                tracing::warn!(item = %item.id, "shutdown failed, failover goes on: {}", e.message())
            }
        }
    }

    // The recovery point.
    let point = match (final_point, point_arg) {
        // Planned failover, or `latest` after a drained shutdown: the final point.
        (Some(p), _) if kind == Kind::Planned || point_arg == "latest" => p,
        (_, "latest") => {
            let tag = format!("latest-{}", now_ms());
            let made = step(
                state,
                job,
                "Process all data and make a new recovery point",
                async {
                    state
                        .command(
                            &item.machine,
                            command::Kind::MakeTag(MakeTag {
                                item: item.id.clone(),
                                id: tag.clone(),
                                kind: "crash".into(),
                            }),
                        )
                        .await?;
                    wait_point(state, &item.id, &tag, Duration::from_secs(60)).await
                },
            )
            .await;
            match made {
                Ok(()) => tag,
                Err(e) => {
                    // ASR: without a shutdown, or if it fails, the latest point is used.
                    tracing::warn!(item = %item.id, "cannot make a new point ({}): using the latest processed", e.message());
                    newest(state, item, false)?
                }
            }
        }
        (_, "latest-processed") => newest(state, item, false)?,
        (_, "latest-app-consistent") => newest(state, item, true)?,
        (_, id) => id.to_string(),
    };

    if kind == Kind::ChangePoint {
        let what = if original {
            "Shut down the VM (its disks are brought to the new point)"
        } else {
            "Shut down the VM and delete its disks"
        };
        step(state, job, what, async {
            state
                .command(
                    &host.name,
                    command::Kind::RemoveMachine(RemoveMachine {
                        name: vm.clone(),
                        delete_disks: !original,
                    }),
                )
                .await
                .map(|_| ())
        })
        .await?;
    }

    let create = if original {
        format!("Complete failover: bring the on-premises disks to point {point} ({sync}, phase 2)")
    } else {
        format!("Create the disks at point {point}")
    };
    let made: Materialized = step(state, job, &create, async {
        let r = state
            .command(
                &item.target,
                command::Kind::Materialize(Materialize {
                    item: item.id.clone(),
                    point: point.clone(),
                    vm: vm.clone(),
                    place: if original {
                        item.placement.home_disk_infos()
                    } else {
                        Vec::new()
                    },
                    sync: if original { sync.into() } else { String::new() },
                }),
            )
            .await?;
        serde_json::from_str(&r.detail_json)
            .map_err(|e| Status::internal(format!("bad materialize result: {e}")))
    })
    .await?;

    if matches!(kind, Kind::Unplanned | Kind::Planned) {
        // Replication of this item ends with the failover (best effort: the source may be
        // gone), before the VM's new incarnation takes over its name.
        let _ = state
            .command(
                &item.machine,
                command::Kind::StopReplication(StopReplication {
                    item: item.id.clone(),
                }),
            )
            .await;
    }
    step(
        state,
        job,
        &format!("Start the VM on {}", host.name),
        async {
            let identity = Identity::new(Role::Agent, target_site, &vm);
            let creds = state
                .ca
                .issue(&identity)
                .map_err(|e| Status::internal(e.to_string()))?;
            let fingerprint =
                failback_common::tls::fingerprint(&creds.cert_pem).map_err(Status::internal)?;
            store.upsert_issued(&identity, &fingerprint, &host.name, now_ms())?;
            // The machine's previous incarnation (on the other site) holds a certificate that
            // is no longer valid: its session ends now, so nothing mistakes it for the new VM.
            if let Some(old) = state.sessions().remove(&vm) {
                old.cancel.cancel();
            }
            // A re-run after an interrupted failover finds the VM already there: replace it.
            let _ = state
                .command(
                    &host.name,
                    command::Kind::RemoveMachine(RemoveMachine {
                        name: vm.clone(),
                        delete_disks: false,
                    }),
                )
                .await;
            state
                .command(
                    &host.name,
                    command::Kind::Boot(BootMachine {
                        name: vm.clone(),
                        datastore: item.datastore.clone(),
                        disks: made
                            .disks
                            .iter()
                            .map(|(id, path, size)| DiskInfo {
                                id: id.clone(),
                                datastore: item.datastore.clone(),
                                path: path.clone(),
                                size_bytes: *size,
                            })
                            .collect(),
                        certificate_pem: creds.cert_pem,
                        key_pem: creds.key_pem,
                        ca_pem: creds.ca_pem,
                        boot_delay_ms: state.config.boot_delay.as_millis() as u64,
                        network: if kind == Kind::Test {
                            "test"
                        } else {
                            "production"
                        }
                        .into(),
                    }),
                )
                .await
                .map(|_| ())
        },
    )
    .await?;

    if kind == Kind::Test {
        store.set_test_vm(&item.id, &vm)?;
        store.set_failover(&item.id, &point, &made.digests)?;
        store.set_item_state(&item.id, TEST_COMPLETED)?;
    } else {
        store.set_failover(&item.id, &point, &made.digests)?;
        if failback && !original {
            // Failed back to a new VM: that is the machine's on-premises home from now on.
            let ds_path = host
                .datastores
                .iter()
                .find(|d| d.name == item.datastore)
                .map(|d| std::path::PathBuf::from(&d.path));
            let mut placement = item.placement.clone();
            placement.home_host = host.name.clone();
            placement.home_datastore = item.datastore.clone();
            placement.home_disks = made
                .disks
                .iter()
                .map(|(id, path, size)| {
                    let rel = ds_path
                        .as_deref()
                        .and_then(|ds| std::path::Path::new(path).strip_prefix(ds).ok())
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| format!("vms/{vm}/{id}.img"));
                    (id.clone(), rel, *size)
                })
                .collect();
            store.set_placement(&item.id, &placement)?;
        }
        store.set_item_state(&item.id, FAILOVER_COMPLETED)?;
    }
    tracing::info!(item = %item.id, %vm, %point, "{} completed", job_name(kind));
    Ok(())
}

fn newest(state: &State, item: &ItemRow, app: bool) -> Result<String, Status> {
    state
        .store
        .points(&item.id)?
        .into_iter()
        .rev()
        .find(|p| !app || p.kind.ends_with("app"))
        .map(|p| p.id)
        .ok_or_else(|| {
            Status::failed_precondition(format!(
                "`{}` has no suitable recovery point",
                item.machine
            ))
        })
}

/// `commit`: deletes the recovery points; the point can't be changed any more.
pub async fn commit(state: &Arc<State>, machine: &str) -> Result<ItemRow, Status> {
    let store = &state.store;
    let item = store
        .item_of_machine(machine)?
        .ok_or_else(|| Status::not_found(format!("`{machine}` has no replicated item")))?;
    if item.state != FAILOVER_COMPLETED {
        return Err(Status::failed_precondition(format!(
            "`{machine}` is {}: commit follows a completed failover",
            item.state
        )));
    }
    let job = store.start_job("Commit", &item.id)?;
    let r = async {
        step(state, job, "Delete recovery points", async {
            state
                .command(
                    &item.target,
                    command::Kind::DropPoints(DropPoints {
                        item: item.id.clone(),
                    }),
                )
                .await
                .map(|_| ())
        })
        .await?;
        store.clear_points(&item.id)?;
        let azure_host = &item.placement.source_host;
        if item.direction == "reverse" && !azure_host.is_empty() {
            // ASR: committing a failback deletes the Azure VM and its disks.
            step(
                state,
                job,
                &format!("Delete the Azure VM {} and its disks", item.machine),
                async {
                    remove_vm(state, azure_host, &item.machine, true).await?;
                    store.remove_host_machine(azure_host, &item.machine)?;
                    Ok(())
                },
            )
            .await?;
        }
        Ok::<(), Status>(())
    }
    .await;
    if let Err(e) = r {
        store.end_job(job, Some(e.message()))?;
        return Err(e);
    }
    store.set_item_state(&item.id, FAILOVER_COMMITTED)?;
    store.end_job(job, None)?;
    Ok(store.item(&item.id)?.unwrap_or(item))
}

/// `test-failover-cleanup`: removes the test VM and its disks; the item shows Protected.
pub async fn cleanup_test(state: &Arc<State>, machine: &str) -> Result<Job, Status> {
    let store = &state.store;
    let item = store
        .item_of_machine(machine)?
        .ok_or_else(|| Status::not_found(format!("`{machine}` has no replicated item")))?;
    if item.test_vm.is_empty() {
        return Err(Status::failed_precondition(format!(
            "`{machine}` has no test failover to clean up"
        )));
    }
    let job = store.start_job("Cleanup test failover", &item.id)?;
    let host = store
        .component(&item.test_vm)?
        .map(|c| c.host)
        .unwrap_or_default();
    let r = step(
        state,
        job,
        &format!("Remove {} and its disks", item.test_vm),
        async {
            if !host.is_empty() {
                state
                    .command(
                        &host,
                        command::Kind::RemoveMachine(RemoveMachine {
                            name: item.test_vm.clone(),
                            delete_disks: true,
                        }),
                    )
                    .await?;
            }
            store.remove(&item.test_vm)?;
            if let Some(s) = state.sessions().remove(&item.test_vm) {
                s.cancel.cancel();
            }
            Ok(())
        },
    )
    .await;
    if let Err(e) = r {
        store.end_job(job, Some(e.message()))?;
        return Err(e);
    }
    store.set_test_vm(&item.id, "")?;
    store.set_failover(&item.id, "", &[])?;
    store.set_item_state(&item.id, PROTECTED)?;
    store.end_job(job, None)?;
    store
        .jobs(job)?
        .into_iter()
        .next()
        .ok_or_else(|| Status::internal("job vanished"))
}
