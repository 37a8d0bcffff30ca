//! Failover to the other site (stage 1 of the four stages, and stage 3: failback), test
//! failover and change of the recovery point. Reprotect's shape: [`check`] decides everything
//! and changes nothing, returning a [`Plan`]; the job then executes it.
//!
//! The steps: shut the source down (when asked; an unplanned failover goes on if that fails,
//! a planned one stops there and changes nothing); choose the recovery point (for `latest`,
//! first process everything the source has and make a new point: lowest RPO); create the
//! disks at the point in the target's datastore (a failback to the original location writes
//! the on-premises disks in place: phase 2); start the VM on a host of the target site with
//! an agent certificate the CS issues (it registers after the boot delay). The item then
//! shows "Failover completed" until commit. Test failover starts `MACHINE-Test` in an
//! isolated test network while replication goes on.
//!
//! A failover is not resumed after a restart (ASR: run the failover again): the job fails
//! with a reason and [`abandon`] puts the item back where a re-run starts, or marks the
//! on-premises VM inconsistent if the in-place write was under way.

use std::sync::Arc;
use std::time::Duration;

use failback_common::control::now_ms;
use failback_common::identity::{Identity, Role, Site};
use failback_proto::pb::control::{
    BootMachine, DiskInfo, MakeTag, Materialize, RemoveMachine, ShutdownMachine, StopReplication,
    command, command_result,
};
use failback_proto::pb::operator::{FailoverKind, FailoverRequest, Job, SyncMode};
use serde::{Deserialize, Serialize};
use tonic::{Code, Status};

use super::{CancelRule, Ctx, JobError, Jobs, Spec};
use crate::item::{Direction, ItemRow, ItemState, JobKind, failover_job_name, sync_label};
use crate::state::State;
use crate::store::{ComponentRow, DbError, JobRow};

const CANCELLED: &str = "cancelled by the operator: replication of this item is stopped and won't resume; run the failover again";

/// The step of a failback that writes the on-premises disks in place (phase 2).
const IN_PLACE_STEP: &str = "Complete failover: bring the on-premises disks to point";

/// What a failover job was started with (kept with the job).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Params {
    pub item: String,
    /// The item's state before the job: where a failed job puts it back.
    pub before: String,
}

/// Everything a failover decided before changing anything.
pub struct Plan {
    item: ItemRow,
    kind: FailoverKind,
    point: String,
    shutdown: bool,
    sync: SyncMode,
    host: ComponentRow,
    target_site: Site,
}

/// Checks a failover request; changes nothing.
pub async fn check(state: &State, req: &FailoverRequest) -> Result<Plan, Status> {
    let kind = match req.kind() {
        FailoverKind::Unspecified => FailoverKind::Unplanned,
        k => k,
    };
    let machine = req.machine.clone();
    let (item, points, running, components) = state
        .store
        .call(move |db| {
            let item = db.item_of_machine(&machine)?;
            let (points, running) = match &item {
                Some(i) => (db.points(&i.id)?, db.running_job(&i.id)?),
                None => (Vec::new(), None),
            };
            Ok((item, points, running, db.list()?))
        })
        .await?;
    let item = item.ok_or_else(|| {
        Status::not_found(format!(
            "`{}` has no replicated item; enable it with `srctl item enable {}`",
            req.machine, req.machine
        ))
    })?;
    match kind {
        FailoverKind::Unplanned | FailoverKind::Planned if !item.state.can_fail_over() => {
            return Err(Status::failed_precondition(format!(
                "`{}` is {}: only a Protected item can fail over",
                item.machine, item.state
            )));
        }
        FailoverKind::Test if item.state != ItemState::Protected => {
            return Err(Status::failed_precondition(format!(
                "`{}` is {}: only a Protected item can fail over",
                item.machine, item.state
            )));
        }
        FailoverKind::Test if !item.test_vm.is_empty() => {
            return Err(Status::failed_precondition(format!(
                "test failover VM {} still exists; run `srctl test-failover-cleanup {}` first",
                item.test_vm, item.machine
            )));
        }
        FailoverKind::ChangePoint if item.state != ItemState::FailoverCompleted => {
            return Err(Status::failed_precondition(format!(
                "`{}` is {}: the recovery point can be changed only after a failover and before commit",
                item.machine, item.state
            )));
        }
        _ => {}
    }
    if let Some((id, name)) = running {
        return Err(Status::failed_precondition(format!(
            "job {id} ({name}) is running on `{}`; wait for it (`srctl job show {id}`)",
            item.machine
        )));
    }
    let point = if req.point.is_empty() {
        "latest".to_string()
    } else {
        req.point.clone()
    };
    if points.is_empty() && !(point == "latest" || kind == FailoverKind::Planned) {
        return Err(Status::failed_precondition(format!(
            "`{}` has no recovery point: failover needs at least one",
            item.machine
        )));
    }
    if kind == FailoverKind::Planned && !state.connected(&item.machine) {
        return Err(Status::failed_precondition(format!(
            "planned failover needs to shut `{}` down, but it is not connected; nothing changed \
             (use an unplanned `srctl failover` if the site is lost)",
            item.machine
        )));
    }
    if !matches!(
        point.as_str(),
        "latest" | "latest-processed" | "latest-app-consistent"
    ) && kind != FailoverKind::Planned
        && !points.iter().any(|p| p.id == point)
    {
        return Err(Status::not_found(format!(
            "no recovery point `{point}` for `{}`; see `srctl item show {}`",
            item.machine, item.machine
        )));
    }
    if point == "latest-app-consistent" && !points.iter().any(|p| p.kind.ends_with("app")) {
        return Err(Status::failed_precondition(format!(
            "`{}` has no app-consistent recovery point yet",
            item.machine
        )));
    }
    if req.sync() != SyncMode::Unspecified && item.direction != Direction::Reverse {
        return Err(Status::invalid_argument(
            "--sync applies to failback (a failover back to on-premises) only",
        ));
    }
    let target = components
        .iter()
        .find(|c| c.name == item.target)
        .ok_or_else(|| {
            Status::failed_precondition(format!("target {} is not registered", item.target))
        })?;
    let target_site: Site = target.site.parse().map_err(Status::internal)?;
    let original = item.in_place() && kind != FailoverKind::Test;
    let host = components
        .iter()
        .find(|c| {
            c.role == "host"
                && if original {
                    c.name == item.placement.home_host
                } else {
                    c.site == target.site && c.datastores.iter().any(|d| d.name == item.datastore)
                }
        })
        .cloned()
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
    for (what, name) in [("target", &item.target), ("host", &host.name)] {
        if !state.connected(name) {
            return Err(Status::failed_precondition(format!(
                "{what} `{name}` is not connected: it is needed to create and start the VM; nothing changed"
            )));
        }
    }
    Ok(Plan {
        // ASR shuts the Azure VM down during failback.
        shutdown: req.shutdown
            || (item.direction == Direction::Reverse && kind != FailoverKind::Test),
        item,
        kind,
        point,
        sync: req.sync(),
        host,
        target_site,
    })
}

/// Checks, then starts the failover job (`parent`: the plan job that starts it, or 0).
pub async fn start(jobs: &Arc<Jobs>, req: FailoverRequest, parent: i64) -> Result<Job, Status> {
    let plan = check(&jobs.state, &req).await?;
    let params = Params {
        item: plan.item.id.clone(),
        before: plan.item.state.to_string(),
    };
    let running = if plan.kind == FailoverKind::Test {
        ItemState::TestFailoverInProgress
    } else {
        ItemState::FailoverInProgress
    };
    let id = plan.item.id.clone();
    jobs.start(
        Spec {
            name: failover_job_name(plan.kind).into(),
            kind: JobKind::Failover,
            item: plan.item.id.clone(),
            params: serde_json::to_string(&params).unwrap_or_default(),
            parent,
            cancel: CancelRule::OnlyForced,
        },
        move |db, job| {
            db.transition(&id, running)?;
            db.set_step(
                job,
                "Check prerequisites",
                crate::item::StepState::Succeeded,
                None,
            )?;
            Ok(())
        },
        move |ctx| Box::pin(run(ctx, plan)),
    )
    .await
}

/// The job's body, with what a failure leaves: back where it started, or, cancelled, the
/// state ASR describes.
async fn run(ctx: Arc<Ctx>, plan: Plan) -> Result<(), JobError> {
    let before = plan.item.state;
    let result = execute(&ctx, &plan).await;
    let back = match &result {
        Ok(()) => return Ok(()),
        Err(JobError::Cancelled(_)) if plan.kind == FailoverKind::Test => before,
        Err(JobError::Cancelled(_)) if plan.item.direction == Direction::Reverse => {
            ItemState::FailbackInconsistent
        }
        Err(JobError::Cancelled(_)) => ItemState::FailoverCancelled,
        Err(JobError::Failed(_)) => before,
    };
    let id = plan.item.id.clone();
    ctx.state
        .store
        .call(move |db| Ok(db.transition(&id, back)))
        .await??;
    ctx.state.notify();
    result
}

/// After a restart or a panic: the item goes back to where the job found it, or is marked
/// inconsistent if the job was writing the on-premises disks in place.
pub async fn abandon(state: &Arc<State>, job: &JobRow) -> Result<(), DbError> {
    let Ok(params) = serde_json::from_str::<Params>(&job.params) else {
        return Ok(());
    };
    let in_place = job
        .running_step()
        .is_some_and(|s| s.name.starts_with(IN_PLACE_STEP));
    let back = if in_place {
        ItemState::FailbackInconsistent
    } else {
        params.before.parse().unwrap_or(ItemState::Protected)
    };
    let id = params.item.clone();
    let r = state
        .store
        .call(move |db| Ok(db.transition(&id, back)))
        .await?;
    if let Err(e) = r {
        tracing::warn!(job = job.id, "after the interrupted failover: {e}");
    }
    state.notify();
    Ok(())
}

/// Waits until the target reported point `id` of `item`.
async fn wait_point(state: &State, item: &str, id: &str, within: Duration) -> Result<(), Status> {
    let found = state
        .wait_for(within, || {
            let (item, id) = (item.to_string(), id.to_string());
            async move {
                match state.store.call(move |db| db.points(&item)).await {
                    Ok(points) if points.iter().any(|p| p.id == id) => Some(Ok(())),
                    Ok(_) => None,
                    Err(e) => Some(Err(Status::from(e))),
                }
            }
        })
        .await;
    found.unwrap_or_else(|| {
        Err(Status::deadline_exceeded(format!(
            "point {id} did not reach the target within {within:?}"
        )))
    })
}

/// Waits until the target holds every batch the process server had acknowledged when the
/// wait began (phase 1 of a failback: the data is synchronised while the VM still runs).
async fn drained(ctx: &Ctx, item: &str, step: &str) -> Result<(), Status> {
    let want = ctx
        .state
        .live_progress(item)
        .map(|p| p.acked_seq)
        .unwrap_or(0);
    let start = ctx
        .state
        .live_progress(item)
        .map(|p| p.target_seq)
        .unwrap_or(0);
    loop {
        let done = ctx
            .state
            .wait_for(Duration::from_secs(1), || async {
                ctx.state
                    .live_progress(item)
                    .filter(|p| p.target_seq >= want && p.phase == "delta")
                    .map(|_| ())
            })
            .await;
        if done.is_some() {
            return Ok(());
        }
        if let Some(p) = ctx.state.live_progress(item)
            && want > start
        {
            let f = p.target_seq.saturating_sub(start) as f64 / (want - start) as f64;
            ctx.progress(step, f).await;
        }
    }
}

/// Powers `vm` off on `host` (or deletes it with its disks); a VM already gone is fine.
pub async fn remove_vm(ctx: &Ctx, host: &str, vm: &str, delete_disks: bool) -> Result<(), Status> {
    match ctx
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
        Err(e) if e.code() == Code::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn newest(
    points: &[failback_proto::pb::operator::Point],
    app: bool,
    machine: &str,
) -> Result<String, Status> {
    points
        .iter()
        .rev()
        .find(|p| !app || p.kind.ends_with("app"))
        .map(|p| p.id.clone())
        .ok_or_else(|| {
            Status::failed_precondition(format!("`{machine}` has no suitable recovery point"))
        })
}

async fn points_of(
    ctx: &Ctx,
    item: &str,
) -> Result<Vec<failback_proto::pb::operator::Point>, Status> {
    let item = item.to_string();
    Ok(ctx.state.store.call(move |db| db.points(&item)).await?)
}

async fn execute(ctx: &Ctx, plan: &Plan) -> Result<(), JobError> {
    let Plan {
        item,
        kind,
        point: point_arg,
        shutdown,
        sync,
        host,
        target_site,
    } = plan;
    let (kind, shutdown, sync) = (*kind, *shutdown, *sync);
    let state = &ctx.state;
    let vm = if kind == FailoverKind::Test {
        format!("{}-Test", item.machine)
    } else {
        item.machine.clone()
    };
    let failback = item.direction == Direction::Reverse && kind != FailoverKind::Test;
    let original = item.in_place() && kind != FailoverKind::Test;
    let sync_name = sync_label(sync);

    if failback && sync != SyncMode::FullDownload && state.connected(&item.machine) {
        let step = "Synchronize data while the VM runs (phase 1)";
        ctx.step_or(step, CANCELLED, drained(ctx, &item.id, step))
            .await?;
    }

    // Shut the source down and drain it: its last writes become the final point.
    let mut final_point = None;
    if kind == FailoverKind::Planned || (shutdown && kind == FailoverKind::Unplanned) {
        let tag = format!("final-{}", now_ms());
        let r = ctx
            .step_or("Shut down the source machine", CANCELLED, async {
                ctx.command(
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
                let m = item.machine.clone();
                state
                    .store
                    .call(move |db| db.set_power_state(&m, "off"))
                    .await?;
                final_point = Some(tag);
            }
            Err(e @ JobError::Cancelled(_)) => return Err(e),
            Err(e) if kind == FailoverKind::Planned => {
                return Err(Status::failed_precondition(format!(
                    "the source machine could not be shut down and drained: {}",
                    e.message()
                ))
                .into());
            }
            Err(e) => {
                tracing::warn!(item = %item.id, "shutdown failed, failover goes on: {}", e.message())
            }
        }
    }

    // The recovery point.
    let point = match (final_point, point_arg.as_str()) {
        // Planned failover, or `latest` after a drained shutdown: the final point.
        (Some(p), _) if kind == FailoverKind::Planned || point_arg == "latest" => p,
        (_, "latest") => {
            let tag = format!("latest-{}", now_ms());
            let made = ctx
                .step_or(
                    "Process all data and make a new recovery point",
                    CANCELLED,
                    async {
                        ctx.command(
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
                Err(e @ JobError::Cancelled(_)) => return Err(e),
                Err(e) => {
                    // ASR: without a shutdown, or if it fails, the latest point is used.
                    tracing::warn!(item = %item.id, "cannot make a new point ({}): using the latest processed", e.message());
                    newest(&points_of(ctx, &item.id).await?, false, &item.machine)?
                }
            }
        }
        (_, "latest-processed") => newest(&points_of(ctx, &item.id).await?, false, &item.machine)?,
        (_, "latest-app-consistent") => {
            newest(&points_of(ctx, &item.id).await?, true, &item.machine)?
        }
        (_, id) => id.to_string(),
    };

    if kind == FailoverKind::ChangePoint {
        let what = if original {
            "Shut down the VM (its disks are brought to the new point)"
        } else {
            "Shut down the VM and delete its disks"
        };
        ctx.step_or(what, CANCELLED, async {
            ctx.command(
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
        format!("{IN_PLACE_STEP} {point} ({sync_name}, phase 2)")
    } else {
        format!("Create the disks at point {point}")
    };
    let made = ctx
        .step_or(&create, CANCELLED, async {
            let r = ctx
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
                        sync: if original {
                            sync_name.into()
                        } else {
                            String::new()
                        },
                    }),
                )
                .await?;
            match r.detail {
                Some(command_result::Detail::Materialize(m)) => Ok(m),
                _ => Err(Status::internal(format!(
                    "{} answered Materialize without the disks it made",
                    item.target
                ))),
            }
        })
        .await?;

    if matches!(kind, FailoverKind::Unplanned | FailoverKind::Planned) {
        // Replication of this item ends with the failover (best effort: the source may be
        // gone), before the VM's new incarnation takes over its name.
        if state.connected(&item.machine) {
            let _ = ctx
                .command(
                    &item.machine,
                    command::Kind::StopReplication(StopReplication {
                        item: item.id.clone(),
                    }),
                )
                .await;
        }
    }
    ctx.step_or(
        &format!("Start the VM on {}", host.name),
        CANCELLED,
        async {
            let identity = Identity::new(Role::Agent, *target_site, &vm);
            let creds = state
                .ca
                .issue(&identity, state.config.cert_lifetime)
                .map_err(|e| Status::internal(e.to_string()))?;
            let fingerprint =
                failback_common::tls::fingerprint(&creds.cert_pem).map_err(Status::internal)?;
            let (issued, host_name) = (identity.clone(), host.name.clone());
            let replaced = state
                .store
                .call(move |db| db.upsert_issued(&issued, &fingerprint, &host_name, now_ms()))
                .await?;
            state.revoke(replaced);
            // The machine's previous incarnation (on the other site) holds a certificate that
            // is no longer valid: its session ends now, so nothing mistakes it for the new VM.
            state.sessions.drop_session(&vm);
            // A re-run after an interrupted failover finds the VM already there: replace it.
            remove_vm(ctx, &host.name, &vm, false).await?;
            // The VM keeps the machine's OS (it reports it when it registers).
            let source = item.machine.clone();
            let os = state
                .store
                .call(move |db| db.component(&source))
                .await?
                .and_then(|c| c.os)
                .unwrap_or_default();
            ctx.command(
                &host.name,
                command::Kind::Boot(BootMachine {
                    os: os.to_pb() as i32,
                    name: vm.clone(),
                    datastore: item.datastore.clone(),
                    disks: made
                        .disks
                        .iter()
                        .map(|d| DiskInfo {
                            id: d.id.clone(),
                            datastore: item.datastore.clone(),
                            path: d.path.clone(),
                            size_bytes: d.size_bytes,
                        })
                        .collect(),
                    certificate_pem: creds.cert_pem,
                    key_pem: creds.key_pem,
                    ca_pem: creds.ca_pem,
                    boot_delay_ms: state.config.boot_delay.as_millis() as u64,
                    network: if kind == FailoverKind::Test {
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

    let digests: Vec<(String, String)> = made
        .digests
        .iter()
        .map(|d| (d.disk.clone(), d.blake3.clone()))
        .collect();
    let id = item.id.clone();
    let test = kind == FailoverKind::Test;
    let placement = (failback && !original).then(|| {
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
            .map(|d| {
                let rel = ds_path
                    .as_deref()
                    .and_then(|ds| std::path::Path::new(&d.path).strip_prefix(ds).ok())
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| format!("vms/{vm}/{}.img", d.id));
                (d.id.clone(), rel, d.size_bytes)
            })
            .collect();
        placement
    });
    let test_vm = vm.clone();
    let point_id = point.clone();
    state
        .store
        .call(move |db| {
            db.set_failover(&id, &point_id, &digests)?;
            if test {
                db.set_test_vm(&id, &test_vm)?;
            }
            if let Some(p) = &placement {
                db.set_placement(&id, p)?;
            }
            Ok(db.transition(
                &id,
                if test {
                    ItemState::TestFailoverCompleted
                } else {
                    ItemState::FailoverCompleted
                },
            ))
        })
        .await??;
    state.notify();
    tracing::info!(item = %item.id, %vm, %point, "{} completed", failover_job_name(kind));
    Ok(())
}
