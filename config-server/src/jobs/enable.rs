//! "Enable protection": the target prepares the replica, the process server gets the route,
//! the agent starts replicating; the job ends when the initial replication is done (the item
//! is Protected). Checks run first and change nothing; a step that fails removes the item.
//! Every step is idempotent, so after a restart the job runs again from the start.

use std::sync::Arc;
use std::time::Duration;

use failback_common::control::now_ms;
use failback_proto::pb::control::{RemoveReplica, RemoveRoute, StopReplication, command};
use failback_proto::pb::operator::{EnableItemRequest, Job};
use tonic::Status;

use super::{CancelRule, Ctx, JobError, Jobs, Spec};
use crate::commands;
use crate::item::{Direction, ItemRow, ItemState, JobKind, Progress, default_policy};
use crate::state::State;
use crate::store::{DbError, StateError};

/// `EnableItem`: checks, then the "Enable protection" job.
pub async fn start(jobs: &Arc<Jobs>, req: EnableItemRequest) -> Result<Job, Status> {
    let state = &jobs.state;
    let name = req.machine.clone();
    let policy_name = if req.policy.is_empty() {
        "default".to_string()
    } else {
        req.policy.clone()
    };
    let (machine, existing, policy, components, items) = state
        .store
        .call(move |db| {
            Ok((
                db.component(&name)?,
                db.item_of_machine(&name)?,
                db.policy(&policy_name)?,
                db.list()?,
                db.items()?,
            ))
        })
        .await?;
    let machine = machine.filter(|c| c.role == "agent").ok_or_else(|| {
        Status::not_found(format!(
            "no machine named `{}` is registered; see `srctl infra list`",
            req.machine
        ))
    })?;
    if !state.connected(&machine.name) {
        return Err(Status::failed_precondition(format!(
            "the agent isn't installed on `{}` (it is not connected to the configuration server); \
             wait until it registers (ASR: up to 15 minutes after boot) and try again",
            machine.name
        )));
    }
    if let Some(existing) = existing {
        let group_hint = if req.replication_group.is_empty() {
            String::new()
        } else {
            "; a machine joins a replication group only when its replication is enabled".into()
        };
        return Err(Status::already_exists(format!(
            "`{}` is already protected (item {}, state {}){group_hint}",
            machine.name, existing.id, existing.state
        )));
    }
    let policy = match policy {
        Some(p) => p,
        None => {
            return Err(Status::not_found(format!(
                "no policy named `{}`; see `srctl policy list`",
                if req.policy.is_empty() {
                    "default"
                } else {
                    &req.policy
                }
            )));
        }
    };
    let site = machine.site.clone();
    let ps_name = if req.process_server.is_empty() {
        crate::placement::least_loaded_ps(state, &components, &items, &site)
            .map(|ps| ps.name.clone())
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "no process server of {site} is connected and healthy (ASR 806); start one \
                     or name one with --process-server"
                ))
            })?
    } else {
        req.process_server.clone()
    };
    let ps = components
        .iter()
        .find(|c| c.name == ps_name && c.role == "process-server")
        .ok_or_else(|| {
            Status::not_found(format!(
                "no process server named `{ps_name}`; see `srctl infra list`"
            ))
        })?;
    if !state.connected(&ps.name) {
        return Err(Status::failed_precondition(format!(
            "process server `{}` is not connected (ASR 806: no heartbeat from the process server); \
             start it or choose another with --process-server",
            ps.name
        )));
    }
    if let Some(h) = state.ps_health(&ps.name)
        && h.cache_health() == failback_proto::pb::control::Health::Critical
    {
        return Err(Status::failed_precondition(format!(
            "process server `{}` is in critical health (cache {} of {} bytes used); choose another \
             with --process-server or let it drain",
            ps.name, h.cache_used_bytes, h.cache_capacity_bytes
        )));
    }
    let target_site = if site == "onprem" { "azure" } else { "onprem" };
    let target = components
        .iter()
        .filter(|c| c.role == "master-target" && c.site == target_site && !c.datastores.is_empty())
        .min_by_key(|c| {
            (
                c.name != "azure-target" && c.name != "mt-onprem",
                c.name.clone(),
            )
        })
        .ok_or_else(|| {
            Status::failed_precondition(format!(
                "no master target with a datastore in {target_site}"
            ))
        })?;
    if !state.connected(&target.name) {
        return Err(Status::failed_precondition(format!(
            "target `{}` is not connected (ASR 78022: no heartbeat from the master target)",
            target.name
        )));
    }
    if commands::address_for(target, &ps.site).is_none() {
        return Err(Status::failed_precondition(format!(
            "target `{}` advertises no address reachable from {} (check its `advertise` config)",
            target.name, ps.site
        )));
    }
    if commands::address_for(ps, &site).is_none() {
        return Err(Status::failed_precondition(format!(
            "process server `{}` advertises no address reachable from {site}",
            ps.name
        )));
    }
    if !req.replication_group.is_empty() {
        failback_common::identity::validate_name(&req.replication_group)
            .map_err(Status::invalid_argument)?;
    }
    let host = components.iter().find(|c| c.name == machine.host);
    let mut item = ItemRow {
        id: String::new(),
        machine: machine.name.clone(),
        direction: Direction::from_site(&site),
        state: ItemState::Enabling,
        process_server: ps.name.clone(),
        target: target.name.clone(),
        datastore: target.datastores[0].name.clone(),
        policy: policy.name.clone(),
        replication_group: req.replication_group.clone(),
        created_ms: now_ms(),
        progress: Progress::default(),
        failover_point: String::new(),
        failover_digests: Vec::new(),
        test_vm: String::new(),
        placement: crate::item::Placement {
            source_host: machine.host.clone(),
            ..commands::home_of(&machine, host)
        },
    };
    item.id = {
        let m = machine.name.clone();
        state.store.call(move |db| db.next_item_id(&m)).await?
    };
    let item_id = item.id.clone();
    jobs.start(
        Spec {
            name: "Enable protection".into(),
            kind: JobKind::Enable,
            item: item.id.clone(),
            params: String::new(),
            parent: 0,
            cancel: CancelRule::Anytime,
        },
        move |db, _| {
            // A machine enabled twice at once: the second insert finds the first.
            if let Some(other) = db.item_of_machine(&item.machine)? {
                return Err(StateError::Refused(crate::item::TransitionError {
                    item: other.id,
                    from: other.state,
                    to: ItemState::Enabling,
                }));
            }
            db.insert_item(&item)?;
            Ok(())
        },
        move |ctx| Box::pin(run(ctx, item_id)),
    )
    .await
}

/// The job's body: also what a restart resumes.
pub async fn run(ctx: Arc<Ctx>, item_id: String) -> Result<(), JobError> {
    let result = steps(&ctx, &item_id).await;
    if let Err(e) = &result {
        tracing::warn!(item = %item_id, "enable failed, removing the item: {}", e.message());
        abandon(&ctx.state, &item_id).await?;
    }
    result
}

/// Rolls a failed (or panicked) enable back: what the components were told for the item is
/// removed, then the item itself, unless it made it to Protected.
pub async fn abandon(state: &Arc<State>, item_id: &str) -> Result<(), DbError> {
    let id = item_id.to_string();
    let item = state.store.call(move |db| db.item(&id)).await?;
    let Some(item) = item.filter(|i| i.state != ItemState::Protected) else {
        return Ok(());
    };
    // Best effort: a component that is down has nothing running for the item after its
    // restart that the CS would not correct (no route, no replica command is re-sent).
    let _ = state
        .sessions
        .command(
            &item.machine,
            command::Kind::StopReplication(StopReplication {
                item: item.id.clone(),
            }),
        )
        .await;
    let _ = state
        .sessions
        .command(
            &item.process_server,
            command::Kind::RemoveRoute(RemoveRoute {
                item: item.id.clone(),
            }),
        )
        .await;
    let _ = state
        .sessions
        .command(
            &item.target,
            command::Kind::RemoveReplica(RemoveReplica {
                item: item.id.clone(),
            }),
        )
        .await;
    let id = item.id.clone();
    state.store.call(move |db| db.delete_item(&id)).await?;
    state.forget_progress(&item.id);
    state.notify();
    Ok(())
}

async fn steps(ctx: &Ctx, item_id: &str) -> Result<(), JobError> {
    let id = item_id.to_string();
    let (item, machine, ps, target, policy) = ctx
        .state
        .store
        .call(move |db| {
            let Some(item) = db.item(&id)? else {
                return Ok(None);
            };
            Ok(Some((
                db.component(&item.machine)?,
                db.component(&item.process_server)?,
                db.component(&item.target)?,
                db.policy(&item.policy)?.unwrap_or_else(default_policy),
                item,
            )))
        })
        .await?
        .map(|(m, p, t, pol, i)| (i, m, p, t, pol))
        .ok_or_else(|| Status::not_found(format!("item {item_id} is gone")))?;
    let missing =
        |what: &str| Status::failed_precondition(format!("{what} is no longer registered"));
    let machine = machine.ok_or_else(|| missing("the machine"))?;
    let ps = ps.ok_or_else(|| missing("the process server"))?;
    let target = target.ok_or_else(|| missing("the target"))?;
    let target_address = commands::address_for(&target, &ps.site).unwrap_or_default();
    let ps_address = commands::address_for(&ps, &machine.site).unwrap_or_default();

    ctx.step("Prepare the target", async {
        ctx.command(
            &target.name,
            commands::prepare(&item, &machine, &ps, &policy),
        )
        .await
        .map(|_| ())
    })
    .await?;
    ctx.step("Assign the process server", async {
        ctx.command(
            &ps.name,
            commands::route(&item, &target.name, &target_address, &machine),
        )
        .await
        .map(|_| ())
    })
    .await?;
    ctx.step("Start replication", async {
        ctx.command(
            &machine.name,
            commands::start(&item, &ps.name, &ps_address, &policy),
        )
        .await
        .map(|_| ())
    })
    .await?;
    let id = item.id.clone();
    ctx.state
        .store
        .call(
            move |db| match db.transition(&id, ItemState::InitialReplication) {
                // Already Protected (a fast copy, or a resumed job): fine.
                Err(StateError::Refused(_)) | Ok(_) => Ok(()),
                Err(StateError::Db(e)) => Err(e),
                Err(StateError::NoItem(_)) => Ok(()),
            },
        )
        .await?;
    tracing::info!(item = %item.id, ps = %ps.name, target = %target.name, "protection enabled");
    ctx.step(
        "Initial replication",
        wait_protected(ctx, "Initial replication", &item.id),
    )
    .await
}

/// Waits until the item is Protected, reporting the initial copy's progress on `step`.
pub async fn wait_protected(ctx: &Ctx, step: &str, item: &str) -> Result<(), Status> {
    let mut last_reported = -1.0;
    loop {
        let id = item.to_string();
        let state = ctx
            .state
            .wait_for(Duration::from_secs(1), || {
                let id = id.clone();
                async move {
                    let lookup = id.clone();
                    match ctx.state.store.call(move |db| db.item(&lookup)).await {
                        Ok(Some(i)) if i.state == ItemState::Protected => Some(Ok(())),
                        Ok(Some(_)) => None,
                        Ok(None) => Some(Err(Status::not_found(format!("item {id} is gone")))),
                        Err(e) => Some(Err(e.into())),
                    }
                }
            })
            .await;
        if let Some(r) = state {
            return r;
        }
        if let Some(p) = ctx.state.live_progress(item) {
            let fraction = p.percent() / 100.0;
            if (fraction - last_reported).abs() >= 0.01 {
                last_reported = fraction;
                ctx.progress(step, fraction).await;
            }
        }
    }
}
