//! What the CS does with components' reports, and what it re-sends when a component
//! (re)connects so that replication resumes by itself: targets get their replicas, process
//! servers their routes, agents their replication settings.

use std::sync::Arc;

use failback_common::identity::{Identity, Role};
use failback_proto::pb::control::{Report, SetRoute, command, report};

use crate::db::DbError;
use crate::items::{self, ItemRow, address_for};
use crate::state::State;

pub fn on_report(state: &Arc<State>, who: &Identity, r: Report) -> Result<(), DbError> {
    match r.kind {
        Some(report::Kind::Progress(p)) => items::on_progress(state, p),
        Some(report::Kind::PointAdded(p)) => state.store.add_point(&p),
        Some(report::Kind::PointsPruned(p)) => state.store.remove_points(&p.item, &p.ids),
        Some(report::Kind::PsStatus(s)) => {
            state
                .ps_status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(who.name.clone(), s);
            Ok(())
        }
        None => Ok(()),
    }
}

/// Re-sends what `who` needs for the active items it takes part in. Components reconnect in
/// any order (after a CS restart all of them do at once): a command that cannot reach its
/// component now is skipped and sent when that component connects, and one item's failure
/// does not hold back the others.
pub fn resume(state: Arc<State>, who: Identity) {
    tokio::spawn(async move {
        let items = match state.store.items() {
            Ok(items) => items,
            Err(e) => {
                tracing::warn!(%who, "resuming replication: {e}");
                return;
            }
        };
        for item in items {
            if let Err(e) = resume_item(&state, &who, &item).await {
                tracing::warn!(%who, item = %item.id, "resuming replication: {e}");
            }
        }
    });
}

async fn resume_item(state: &State, who: &Identity, item: &ItemRow) -> Result<(), tonic::Status> {
    let store = &state.store;
    // A failed-over item no longer replicates (its machine now runs at the target site),
    // but its replica stays open on the target: change-point, commit and failback need it.
    if who.role != Role::MasterTarget
        && matches!(
            item.state.as_str(),
            crate::failover::FAILOVER_IN_PROGRESS
                | crate::failover::FAILOVER_COMPLETED
                | crate::failover::FAILOVER_COMMITTED
        )
    {
        return Ok(());
    }
    let policy = store
        .policy(&item.policy)?
        .unwrap_or_else(items::default_policy);
    match who.role {
        Role::MasterTarget if item.target == who.name => {
            if let Some(machine) = store.component(&item.machine)? {
                state
                    .command(&who.name, items::prepare_command(item, &machine, &policy))
                    .await?;
            }
        }
        Role::ProcessServer if item.process_server == who.name => {
            if let Some(target) = store.component(&item.target)? {
                let address = address_for(&target, who.site.as_str()).unwrap_or_default();
                state
                    .command(
                        &who.name,
                        command::Kind::SetRoute(SetRoute {
                            item: item.id.clone(),
                            target: target.name.clone(),
                            target_address: address,
                        }),
                    )
                    .await?;
            }
        }
        Role::Agent if item.machine == who.name => {
            // The machine's disks may have grown: the target grows the replica first. A
            // target that is not connected yet gets the replica (at the current size) when
            // it connects; the target keeps running meanwhile, so the agent starts anyway.
            if let Some(machine) = store.component(&item.machine)?
                && state.connected(&item.target)
            {
                state
                    .command(
                        &item.target,
                        items::prepare_command(item, &machine, &policy),
                    )
                    .await?;
            }
            if let Some(ps) = store.component(&item.process_server)? {
                let address = address_for(&ps, who.site.as_str()).unwrap_or_default();
                state
                    .command(
                        &who.name,
                        items::start_command(item, &ps.name, &address, &policy),
                    )
                    .await?;
            }
        }
        _ => {}
    }
    Ok(())
}
