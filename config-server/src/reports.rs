//! What the CS does with components' reports, and what it re-sends when a component
//! (re)connects so that replication resumes by itself: targets get their replicas, process
//! servers their routes, agents their replication settings.
//!
//! A report about an item counts only from a component that takes part in it (its machine,
//! process server or target); anything else is logged and dropped. Progress is kept in
//! memory and persisted coalesced; a phase that changes the item's state is written at once.

use std::sync::Arc;

use failback_common::identity::{Identity, Role};
use failback_proto::pb::control::{
    ItemProgress, RemoveRoute, ReplicaDamaged, ReplicationPhase, Report, command, report,
};

use crate::commands;
use crate::item::{
    ItemParties, ItemRow, ItemState, Progress, default_policy, disk_state_label, phase_label,
};
use crate::state::State;
use crate::store::{Db, DbError};

/// Whether `who` takes part in an item with these parties (is its machine, its process
/// server or its target).
fn part_of(who: &Identity, machine: &str, process_server: &str, target: &str) -> bool {
    match who.role {
        Role::Agent => machine == who.name,
        Role::ProcessServer => process_server == who.name,
        Role::MasterTarget => target == who.name,
        _ => false,
    }
}

fn takes_part(who: &Identity, item: &ItemRow) -> bool {
    part_of(who, &item.machine, &item.process_server, &item.target)
}

/// The item a report is about, if `who` (of the role such reports come from) takes part in
/// it. Unknown items are ignored (removed meanwhile); a report about an item the sender has
/// no part in is logged.
fn reporter_of(
    db: &Db<'_>,
    who: &Identity,
    role: Role,
    item: &str,
) -> Result<Option<ItemParties>, DbError> {
    let Some(parties) = db.item_parties(item)? else {
        return Ok(None);
    };
    if who.role != role
        || !part_of(
            who,
            &parties.machine,
            &parties.process_server,
            &parties.target,
        )
    {
        tracing::warn!(%who, item = %parties.id, "dropped a report about an item it takes no part in");
        return Ok(None);
    }
    Ok(Some(parties))
}

/// What a report asks of the layers above the reports (the jobs).
#[derive(Debug, PartialEq, Eq)]
pub enum FollowUp {
    Nothing,
    /// The item's replica lost acknowledged writes: resynchronise it.
    Resync {
        item: String,
        reason: String,
    },
}

/// Takes one report. Progress and recovery points are submitted to the store (checked and
/// written there, in arrival order, without holding up the stream for a commit); a damaged
/// replica is waited for, since it starts a job.
pub async fn on_report(state: &Arc<State>, who: &Identity, r: Report) -> Result<FollowUp, DbError> {
    match r.kind {
        Some(report::Kind::PsStatus(s)) => {
            if who.role == Role::ProcessServer {
                state.set_ps_status(&who.name, s);
            }
            Ok(FollowUp::Nothing)
        }
        Some(report::Kind::Progress(p)) => {
            on_progress(state, who, p).await?;
            Ok(FollowUp::Nothing)
        }
        Some(report::Kind::PointAdded(p)) => {
            let who = who.clone();
            let (st, item) = (state.clone(), p.item.clone());
            state
                .store
                .submit(
                    move |db| {
                        let known = reporter_of(db, &who, Role::MasterTarget, &p.item)?.is_some();
                        if known {
                            db.add_point(&p)?;
                        }
                        Ok(known)
                    },
                    move |r| written(&st, &item, "recording a recovery point", r),
                )
                .await?;
            Ok(FollowUp::Nothing)
        }
        Some(report::Kind::PointsPruned(p)) => {
            let who = who.clone();
            let (st, item) = (state.clone(), p.item.clone());
            state
                .store
                .submit(
                    move |db| {
                        let known = reporter_of(db, &who, Role::MasterTarget, &p.item)?.is_some();
                        if known {
                            db.remove_points(&p.item, &p.ids)?;
                        }
                        Ok(known)
                    },
                    move |r| written(&st, &item, "removing pruned recovery points", r),
                )
                .await?;
            Ok(FollowUp::Nothing)
        }
        Some(report::Kind::ReplicaDamaged(d)) => on_damaged(state, who, d).await,
        None => Ok(FollowUp::Nothing),
    }
}

/// After a submitted report's write: watchers are told, a failure is logged.
fn written(state: &State, item: &str, what: &str, r: Result<bool, DbError>) {
    match r {
        Ok(true) => state.notify(),
        Ok(false) => {}
        Err(e) => tracing::error!(%item, "{what}: {e}"),
    }
}

/// A target's report that an item's replica lost acknowledged writes: the item is marked
/// Resync required and a resync follows.
async fn on_damaged(
    state: &Arc<State>,
    who: &Identity,
    d: ReplicaDamaged,
) -> Result<FollowUp, DbError> {
    let who2 = who.clone();
    let id = d.item.clone();
    let marked = state
        .store
        .call(move |db| {
            let Some(item) = reporter_of(db, &who2, Role::MasterTarget, &id)? else {
                return Ok(None);
            };
            Ok(Some((
                item.id.clone(),
                db.transition(&item.id, ItemState::ResyncRequired),
            )))
        })
        .await?;
    let Some((item, marked)) = marked else {
        return Ok(FollowUp::Nothing);
    };
    tracing::error!(%who, %item, reason = %d.reason, "the replica lost acknowledged writes: resync required");
    match marked {
        Ok(_) => {}
        Err(crate::store::StateError::Db(e)) => return Err(e),
        Err(e) => tracing::warn!(%item, "not marked Resync required: {e}"),
    }
    state.notify();
    Ok(FollowUp::Resync {
        item,
        reason: format!("the replica at {} lost writes: {}", who.name, d.reason),
    })
}

/// The state an agent's phase moves an item in `state` to, if any.
fn next_state(phase: ReplicationPhase, state: ItemState) -> Option<ItemState> {
    use ItemState::*;
    match (phase, state) {
        (ReplicationPhase::Delta, InitialReplication | Enabling | Reprotecting) => Some(Protected),
        (ReplicationPhase::Delta, Resyncing | ResyncRequired) => Some(Protected),
        (ReplicationPhase::Resync, Protected | ResyncRequired) => Some(Resyncing),
        (ReplicationPhase::ResyncRequired, s)
            if s != ResyncRequired && s.can_become(ResyncRequired) =>
        {
            Some(ResyncRequired)
        }
        _ => None,
    }
}

/// An agent's progress report: kept in memory (persisted every few seconds); a phase that
/// moves the item is written at once. Checked and applied on the store's thread, in order.
async fn on_progress(state: &Arc<State>, who: &Identity, p: ItemProgress) -> Result<(), DbError> {
    let phase = p.phase();
    let progress = Progress {
        phase: phase_label(phase).to_string(),
        disks: p
            .disks
            .iter()
            .map(|d| {
                (
                    d.id.clone(),
                    (disk_state_label(d.state()).to_string(), d.percent),
                )
            })
            .collect(),
        bytes_sent: p.bytes_sent,
        bytes_per_second: p.bytes_per_second,
        acked_seq: p.acked_seq,
        resync_bytes: p.resync_bytes,
        resync_blocks_compared: p.resync_blocks_compared,
        target_seq: p.target_seq,
        target_seq_at_ms: p.target_seq_at_ms,
        lag_p50_ms: p.lag_p50_ms,
        lag_p99_ms: p.lag_p99_ms,
        ps_down_since_ms: p.ps_down_since_ms,
        app_consistency_error: p.app_consistency_error.clone(),
        write_throttle: crate::item::Throttle::from_pb(p.write_throttle())
            .map(|t| (t, p.throttle_limit_bytes)),
    };
    let who = who.clone();
    let (st, done_state) = (state.clone(), state.clone());
    let item_id = p.item;
    state.store.submit(
        move |db| {
            let Some(item) = reporter_of(db, &who, Role::Agent, &item_id)? else {
                return Ok(None);
            };
            let next = next_state(phase, item.state);
            if !st.record_progress(&item.id, progress.clone()) && next.is_none() {
                return Ok(Some((item, None)));
            }
            db.set_item_progress(&item.id, &progress)?;
            let changed = match next {
                Some(to) => match db.transition(&item.id, to) {
                    Ok(_) => Some(to),
                    Err(crate::store::StateError::Db(e)) => return Err(e),
                    Err(e) => {
                        tracing::warn!(item = %item.id, "progress: {e}");
                        None
                    }
                },
                None => None,
            };
            Ok(Some((item, changed)))
        },
        move |r| {
            match r {
                Ok(Some((item, changed))) => match changed {
                    Some(ItemState::Protected) => {
                        tracing::info!(item = %item.id, direction = %item.direction, from = %item.state, "Protected")
                    }
                    Some(ItemState::ResyncRequired) => {
                        tracing::warn!(item = %item.id, "tracking lost: resync required")
                    }
                    Some(to) => tracing::info!(item = %item.id, "{to}"),
                    None => {}
                },
                Ok(None) => return,
                Err(e) => tracing::error!("progress: {e}"),
            }
            done_state.notify();
        },
    )
    .await
}

/// Re-sends what `who` needs for the active items it takes part in. Components reconnect in
/// any order (after a CS restart all of them do at once): a command that cannot reach its
/// component now is skipped and sent when that component connects, and one item's failure
/// does not hold back the others.
pub fn resume(state: Arc<State>, who: Identity) {
    let span = tracing::info_span!("resume", component = %who);
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            let (role, name) = (who.role, who.name.clone());
            let items = match state
                .store
                .call(move |db| db.items_of_party(role, &name))
                .await
            {
                Ok(items) => items,
                Err(e) => {
                    tracing::warn!("resuming replication: {e}");
                    return;
                }
            };
            for item in items.iter().filter(|i| takes_part(&who, i)) {
                if let Err(e) = resume_item(&state, &who, item).await {
                    tracing::warn!(item = %item.id, "resuming replication: {e}");
                }
            }
            if who.role == Role::ProcessServer {
                forget_stale_routes(&state, &who.name).await;
            }
        },
        span,
    ));
}

/// A process server that was down when items were switched away from it forgets them: its
/// routes go, and with them what its cache held (the items replicate elsewhere now).
async fn forget_stale_routes(state: &State, ps: &str) {
    let name = ps.to_string();
    let stale = match state.store.call(move |db| db.stale_routes(&name)).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("stale routes of {ps}: {e}");
            return;
        }
    };
    for item in stale {
        let remove = command::Kind::RemoveRoute(RemoveRoute { item: item.clone() });
        match state.sessions.command(ps, remove).await {
            Ok(_) => {
                tracing::info!(%item, "{ps} forgot the item it no longer serves (switched away while it was down)");
                let (name, id) = (ps.to_string(), item.clone());
                if let Err(e) = state
                    .store
                    .call(move |db| db.remove_stale_route(&name, &id))
                    .await
                {
                    tracing::warn!(%item, "{e}");
                }
            }
            Err(e) => tracing::warn!(%item, "telling {ps} to forget the item: {e}"),
        }
    }
}

/// After `renewed` got a new certificate: the receivers that pin it (the process server of
/// an agent's items, the target of a process server's) are told its new fingerprint.
pub fn reassign(state: Arc<State>, renewed: Identity) {
    let span = tracing::info_span!("reassign", component = %renewed);
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            let (role, name) = (renewed.role, renewed.name.clone());
            let items = match state
                .store
                .call(move |db| db.items_of_party(role, &name))
                .await
            {
                Ok(items) => items,
                Err(e) => {
                    tracing::warn!("telling receivers of a renewed certificate: {e}");
                    return;
                }
            };
            for item in items.iter().filter(|i| takes_part(&renewed, i)) {
                let receiver = match renewed.role {
                    Role::Agent => item.process_server.clone(),
                    Role::ProcessServer => item.target.clone(),
                    _ => continue,
                };
                let row = match state.store.call(move |db| db.component(&receiver)).await {
                    Ok(Some(row)) => row,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(item = %item.id, "{e}");
                        continue;
                    }
                };
                let (Ok(role), Ok(site)) = (row.role.parse(), row.site.parse()) else {
                    continue;
                };
                let receiver = Identity::new(role, site, row.name);
                if let Err(e) = resume_item(&state, &receiver, item).await {
                    tracing::warn!(item = %item.id, "telling {receiver} of a renewed certificate: {e}");
                }
            }
        },
        span,
    ));
}

async fn resume_item(state: &State, who: &Identity, item: &ItemRow) -> Result<(), tonic::Status> {
    // A failed-over item no longer replicates (its machine now runs at the target site), but
    // its replica stays open on the target: change-point, commit and failback need it. A
    // disabled one is going away.
    if (who.role != Role::MasterTarget && item.state.failed_over())
        || item.state == ItemState::Disabling
    {
        return Ok(());
    }
    let (policy_name, machine_name, ps_name, target_name) = (
        item.policy.clone(),
        item.machine.clone(),
        item.process_server.clone(),
        item.target.clone(),
    );
    let (policy, machine, ps, target) = state
        .store
        .call(move |db| {
            Ok((
                db.policy(&policy_name)?.unwrap_or_else(default_policy),
                db.component(&machine_name)?,
                db.component(&ps_name)?,
                db.component(&target_name)?,
            ))
        })
        .await?;
    match who.role {
        Role::MasterTarget => {
            if let (Some(machine), Some(ps)) = (&machine, &ps) {
                state
                    .sessions
                    .command(&who.name, commands::prepare(item, machine, ps, &policy))
                    .await?;
            }
        }
        Role::ProcessServer => {
            if let (Some(target), Some(machine)) = (&target, &machine) {
                let address = commands::address_for(target, who.site.as_str()).unwrap_or_default();
                state
                    .sessions
                    .command(
                        &who.name,
                        commands::route(item, &target.name, &address, machine),
                    )
                    .await?;
            }
        }
        Role::Agent => {
            // The machine's disks may have grown: the target grows the replica first. A
            // target that is not connected yet gets the replica (at the current size) when
            // it connects; the target keeps running meanwhile, so the agent starts anyway.
            if let (Some(machine), Some(ps)) = (&machine, &ps)
                && state.connected(&item.target)
            {
                state
                    .sessions
                    .command(&item.target, commands::prepare(item, machine, ps, &policy))
                    .await?;
            }
            if let Some(ps) = &ps {
                let address = commands::address_for(ps, who.site.as_str()).unwrap_or_default();
                state
                    .sessions
                    .command(
                        &who.name,
                        commands::start(item, &ps.name, &address, &policy),
                    )
                    .await?;
            }
        }
        _ => {}
    }
    Ok(())
}
