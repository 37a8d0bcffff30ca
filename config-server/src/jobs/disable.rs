//! "Disable replication": the agent stops replicating, the process server forgets the route
//! and its cached batches, the target deletes the replica and its journal, then the CS
//! forgets the item. Each step is idempotent: a job cut short (a component down, a restart)
//! leaves the item "Disabling replication", and running `item disable` again completes it.

use std::sync::Arc;

use failback_proto::pb::control::{RemoveReplica, RemoveRoute, StopReplication, command};
use failback_proto::pb::operator::Job;
use tonic::Status;

use super::{CancelRule, Ctx, JobError, Jobs, Spec};
use crate::item::{ItemRow, ItemState, JobKind};

/// `item disable MACHINE`: checks, then the job.
pub async fn start(jobs: &Arc<Jobs>, machine: &str) -> Result<Job, Status> {
    let name = machine.to_string();
    let (item, running) = jobs
        .state
        .store
        .call(move |db| {
            let item = db.item_of_machine(&name)?;
            let running = match &item {
                Some(i) => db.running_job(&i.id)?,
                None => None,
            };
            Ok((item, running))
        })
        .await?;
    let item = item.ok_or_else(|| {
        Status::not_found(format!("`{machine}` has no replicated item to disable"))
    })?;
    if let Some((id, name)) = running {
        return Err(Status::failed_precondition(format!(
            "job {id} ({name}) is running on `{machine}`; wait for it (`srctl job show {id}`) \
             or cancel it"
        )));
    }
    item.state.transition(&item.id, ItemState::Disabling)?;
    let id = item.id.clone();
    jobs.start(
        Spec {
            name: "Disable replication".into(),
            kind: JobKind::Disable,
            item: item.id.clone(),
            params: String::new(),
            parent: 0,
            cancel: CancelRule::Anytime,
        },
        move |db, _| {
            db.transition(&id, ItemState::Disabling)?;
            Ok(())
        },
        move |ctx| Box::pin(run(ctx, item.id)),
    )
    .await
}

/// The job's body: also what a restart resumes.
pub async fn run(ctx: Arc<Ctx>, item_id: String) -> Result<(), JobError> {
    let id = item_id.clone();
    let Some(item) = ctx.state.store.call(move |db| db.item(&id)).await? else {
        return Ok(());
    };
    remove_everywhere(&ctx, &item).await?;
    let id = item.id.clone();
    ctx.step("Forget the item", async {
        ctx.state
            .store
            .call(move |db| db.delete_item(&id))
            .await
            .map_err(Status::from)
    })
    .await?;
    ctx.state.forget_progress(&item.id);
    tracing::info!(item = %item.id, "replication disabled");
    Ok(())
}

/// Removes what every component holds for `item`: the agent's replication, the process
/// server's route and cache, the target's replica. A failed-over item's machine runs
/// elsewhere: its agent has nothing of this item to stop.
pub async fn remove_everywhere(ctx: &Ctx, item: &ItemRow) -> Result<(), JobError> {
    if !item.state.failed_over() && ctx.state.connected(&item.machine) {
        ctx.step(&format!("Stop replication on {}", item.machine), async {
            ctx.command(
                &item.machine,
                command::Kind::StopReplication(StopReplication {
                    item: item.id.clone(),
                }),
            )
            .await
            .map(|_| ())
        })
        .await?;
    }
    ctx.step(
        &format!("Remove the route and cache from {}", item.process_server),
        async {
            ctx.command(
                &item.process_server,
                command::Kind::RemoveRoute(RemoveRoute {
                    item: item.id.clone(),
                }),
            )
            .await
            .map(|_| ())
        },
    )
    .await?;
    ctx.step(&format!("Delete the replica on {}", item.target), async {
        ctx.command(
            &item.target,
            command::Kind::RemoveReplica(RemoveReplica {
                item: item.id.clone(),
            }),
        )
        .await
        .map(|_| ())
    })
    .await?;
    Ok(())
}
