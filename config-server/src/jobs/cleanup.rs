//! "Cleanup test failover": the test VM and its disks are removed; the item shows Protected.
//! Idempotent, so a restart resumes it.

use std::sync::Arc;

use failback_common::control::now_ms;
use failback_proto::pb::control::{RemoveMachine, command};
use failback_proto::pb::operator::Job;
use tonic::Status;

use super::{CancelRule, Ctx, JobError, Jobs, Spec};
use crate::item::{ItemState, JobKind};

/// Checks that `machine` has a test failover to clean up; returns its item id.
pub async fn check(jobs: &Jobs, machine: &str) -> Result<String, Status> {
    let name = machine.to_string();
    let item = jobs
        .state
        .store
        .call(move |db| db.item_of_machine(&name))
        .await?
        .ok_or_else(|| Status::not_found(format!("`{machine}` has no replicated item")))?;
    if item.test_vm.is_empty() {
        return Err(Status::failed_precondition(format!(
            "`{machine}` has no test failover to clean up"
        )));
    }
    Ok(item.id)
}

/// `test-failover-cleanup MACHINE`: checks, then the job.
pub async fn start(jobs: &Arc<Jobs>, machine: &str, parent: i64) -> Result<Job, Status> {
    let item = check(jobs, machine).await?;
    jobs.start(
        Spec {
            name: "Cleanup test failover".into(),
            kind: JobKind::CleanupTest,
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
    if item.test_vm.is_empty() {
        return Ok(());
    }
    let vm = item.test_vm.clone();
    let host = {
        let vm = vm.clone();
        ctx.state
            .store
            .call(move |db| Ok(db.component(&vm)?.map(|c| c.host).unwrap_or_default()))
            .await?
    };
    ctx.step(&format!("Remove {vm} and its disks"), async {
        if !host.is_empty() {
            ctx.command(
                &host,
                command::Kind::RemoveMachine(RemoveMachine {
                    name: vm.clone(),
                    delete_disks: true,
                }),
            )
            .await?;
        }
        let vm = vm.clone();
        let revoked = ctx
            .state
            .store
            .call(move |db| db.remove(&vm, now_ms()))
            .await?;
        ctx.state.revoke(revoked);
        Ok(())
    })
    .await?;
    ctx.state.sessions.drop_session(&vm);
    let id = item.id.clone();
    ctx.state
        .store
        .call(move |db| {
            db.set_test_vm(&id, "")?;
            db.set_failover(&id, "", &[])?;
            db.transition(&id, ItemState::Protected)
                .map(|_| ())
                .or_else(|e| match e {
                    crate::store::StateError::Db(e) => Err(e),
                    other => {
                        tracing::warn!("cleanup: {other}");
                        Ok(())
                    }
                })
        })
        .await?;
    ctx.state.notify();
    Ok(())
}
