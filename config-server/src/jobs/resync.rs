//! "Resynchronize": the agent compares block checksums with the replica and sends only what
//! differs; the item shows "Resynchronization in progress" from the agent's answer on, and the
//! job ends when it is Protected again. Safe to run again after a restart.

use std::sync::Arc;

use failback_proto::pb::control::{ReplicationPhase, Resync, command};
use failback_proto::pb::operator::Job;
use tonic::Status;

use super::{CancelRule, Ctx, JobError, Jobs, Spec, enable::wait_protected};
use crate::item::{ItemState, JobKind, phase_label};

/// `item resync MACHINE`.
pub async fn start(jobs: &Arc<Jobs>, machine: &str) -> Result<Job, Status> {
    let name = machine.to_string();
    let item = jobs
        .state
        .store
        .call(move |db| db.item_of_machine(&name))
        .await?
        .ok_or_else(|| Status::not_found(format!("`{machine}` has no replicated item")))?;
    if item.state != ItemState::Protected {
        return Err(Status::failed_precondition(format!(
            "`{machine}` is {}: resynchronize a Protected item",
            item.state
        )));
    }
    launch(jobs, "Resynchronize".into(), item.id).await
}

/// Starts the resync job named `name` on `item`.
async fn launch(jobs: &Arc<Jobs>, name: String, item: String) -> Result<Job, Status> {
    jobs.start(
        Spec {
            name,
            kind: JobKind::Resync,
            item: item.clone(),
            params: String::new(),
            parent: 0,
            cancel: CancelRule::Anytime,
        },
        |_, _| Ok(()),
        move |ctx| Box::pin(run(ctx, item)),
    )
    .await
}

/// The resynchronisation the CS starts itself when the target reports that the replica lost
/// acknowledged writes (`reason`). A job running on the item (an enable finishing, say) is
/// waited for first, up to [`WAIT_FOR_RUNNING`]; nothing starts when the item no longer
/// replicates (it stays "Resync required" for the operator).
pub async fn start_automatic(jobs: &Arc<Jobs>, item_id: &str, reason: &str) -> Option<Job> {
    let state = &jobs.state;
    let id = item_id.to_string();
    let found = state
        .wait_for(WAIT_FOR_RUNNING, || {
            let id = id.clone();
            async move {
                match state
                    .store
                    .call(move |db| Ok((db.item(&id)?, db.running_job(&id)?)))
                    .await
                {
                    Ok((item, None)) => Some(Ok(item)),
                    Ok((_, Some(_))) => None,
                    Err(e) => Some(Err(e)),
                }
            }
        })
        .await;
    let item = match found {
        Some(Ok(Some(item))) => item,
        Some(Ok(None)) => return None,
        Some(Err(e)) => {
            tracing::error!(item = %item_id, "automatic resync: {e}");
            return None;
        }
        None => {
            tracing::warn!(item = %item_id, "the replica needs a resync, but a job kept running on the item: left Resync required");
            return None;
        }
    };
    if !matches!(
        item.state,
        ItemState::Protected | ItemState::ResyncRequired | ItemState::Resyncing
    ) {
        tracing::warn!(item = %item_id, state = %item.state, "the replica lost writes, but the item does not replicate now: no resync");
        return None;
    }
    let started = launch(jobs, format!("Resynchronize ({reason})"), item.id).await;
    match started {
        Ok(job) => Some(job),
        Err(e) => {
            tracing::error!(item = %item_id, "automatic resync refused: {}", e.message());
            None
        }
    }
}

/// How long an automatic resync waits for a job already running on the item.
const WAIT_FOR_RUNNING: std::time::Duration = std::time::Duration::from_secs(600);

/// The job's body: also what a restart resumes.
pub async fn run(ctx: Arc<Ctx>, item_id: String) -> Result<(), JobError> {
    let id = item_id.clone();
    let item = ctx
        .state
        .store
        .call(move |db| db.item(&id))
        .await?
        .ok_or_else(|| Status::not_found(format!("item {item_id} is gone")))?;
    ctx.step("Compare checksums and send what differs", async {
        let asked = ctx
            .command(
                &item.machine,
                command::Kind::Resync(Resync {
                    item: item.id.clone(),
                }),
            )
            .await;
        // The agent may already be resynchronising by itself (it found its process server
        // holding less than it had acknowledged): that resync is the one to wait for.
        let resyncing = || {
            ctx.state
                .live_progress(&item.id)
                .is_some_and(|p| {
                    [ReplicationPhase::Resync, ReplicationPhase::ResyncRequired]
                        .iter()
                        .any(|r| p.phase == phase_label(*r))
                })
        };
        match asked {
            Ok(_) => {}
            Err(e) if resyncing() => {
                tracing::info!(item = %item.id, "the agent is resynchronizing already ({}): waiting for it", e.message());
            }
            Err(e) => return Err(e),
        }
        // The agent reports the resync from its answer on (reports sent before it came
        // first on the same stream), so the next consistent report ends it.
        let id = item.id.clone();
        match ctx
            .state
            .store
            .call(move |db| Ok(db.transition(&id, ItemState::Resyncing)))
            .await?
        {
            Ok(_) | Err(crate::store::StateError::Refused(_)) => {}
            Err(e) => return Err(e.into()),
        }
        ctx.state.notify();
        Ok(())
    })
    .await?;
    ctx.step(
        "Resynchronization",
        wait_protected(&ctx, "Resynchronization", &item.id),
    )
    .await
}
