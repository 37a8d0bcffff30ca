//! "Commit": after a failover, the recovery points are deleted and the point can't be
//! changed any more; committing a failback also deletes the Azure VM and its disks. Every
//! step is idempotent, so a restart resumes it.

use std::sync::Arc;

use failback_proto::pb::control::{DropPoints, command};
use failback_proto::pb::operator::Job;
use tonic::Status;

use super::{CancelRule, Ctx, JobError, Jobs, Spec};
use crate::item::{Direction, ItemState, JobKind};

/// Checks that `machine` can be committed; returns its item id.
pub async fn check(jobs: &Jobs, machine: &str) -> Result<String, Status> {
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
    let item =
        item.ok_or_else(|| Status::not_found(format!("`{machine}` has no replicated item")))?;
    if item.state != ItemState::FailoverCompleted {
        return Err(Status::failed_precondition(format!(
            "`{machine}` is {}: commit follows a completed failover",
            item.state
        )));
    }
    if let Some((id, name)) = running {
        return Err(Status::failed_precondition(format!(
            "job {id} ({name}) is running on `{machine}`; wait for it (`srctl job show {id}`)"
        )));
    }
    Ok(item.id)
}

/// `commit MACHINE`: checks, then the job.
pub async fn start(jobs: &Arc<Jobs>, machine: &str, parent: i64) -> Result<Job, Status> {
    let item = check(jobs, machine).await?;
    jobs.start(
        Spec {
            name: "Commit".into(),
            kind: JobKind::Commit,
            item: item.clone(),
            params: String::new(),
            parent,
            cancel: CancelRule::Anytime,
        },
        |_, _| Ok(()),
        move |ctx| Box::pin(run(ctx, item)),
    )
    .await
}

/// The job's body: also what a restart resumes.
pub async fn run(ctx: Arc<Ctx>, item_id: String) -> Result<(), JobError> {
    let id = item_id.clone();
    let item = ctx
        .state
        .store
        .call(move |db| db.item(&id))
        .await?
        .ok_or_else(|| Status::not_found(format!("item {item_id} is gone")))?;
    if item.state == ItemState::FailoverCommitted {
        return Ok(());
    }
    ctx.step("Delete recovery points", async {
        ctx.command(
            &item.target,
            command::Kind::DropPoints(DropPoints {
                item: item.id.clone(),
            }),
        )
        .await?;
        let id = item.id.clone();
        ctx.state.store.call(move |db| db.clear_points(&id)).await?;
        Ok(())
    })
    .await?;
    let azure_host = &item.placement.source_host;
    if item.direction == Direction::Reverse && !azure_host.is_empty() {
        // ASR: committing a failback deletes the Azure VM and its disks.
        ctx.step(
            &format!("Delete the Azure VM {} and its disks", item.machine),
            async {
                super::failover::remove_vm(&ctx, azure_host, &item.machine, true).await?;
                let (host, vm) = (azure_host.clone(), item.machine.clone());
                ctx.state
                    .store
                    .call(move |db| db.remove_host_machine(&host, &vm))
                    .await?;
                Ok(())
            },
        )
        .await?;
    }
    let id = item.id.clone();
    ctx.state
        .store
        .call(move |db| Ok(db.transition(&id, ItemState::FailoverCommitted)))
        .await??;
    ctx.state.notify();
    Ok(())
}
