//! The CS's commands to a master target, carried out concurrently across items and in order
//! within one item.
//!
//! After a CS restart the CS re-sends `PrepareReplica` for every item the target holds (a
//! thousand at scale). One at a time, a recovery plan's `Materialize` commands queued behind
//! them and timed out at the CS ("did not answer within 30s"). Each command now runs in its
//! own task: commands of one item wait for the one before (a prepare before the failover that
//! needs it; the same command re-sent is answered from the first's result), and at most
//! [`CONCURRENT`] run at once so a burst doesn't take every blocking thread.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use failback_common::control::{Answered, Outcome, next_command, reply, result_of};
use failback_proto::pb::control::{Command, ComponentMessage, CsMessage, command, command_result};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::data::Replicas;

/// Commands carried out at the same time.
const CONCURRENT: usize = 8;

/// The item a command is about (commands without one share the empty key).
fn item_of(cmd: &Command) -> String {
    match &cmd.kind {
        Some(command::Kind::PrepareReplica(p)) => p.item.clone(),
        Some(command::Kind::VerifyPoint(v)) => v.item.clone(),
        Some(command::Kind::Materialize(m)) => m.item.clone(),
        Some(command::Kind::DropPoints(d)) => d.item.clone(),
        Some(command::Kind::RemoveReplica(r)) => r.item.clone(),
        _ => String::new(),
    }
}

/// Carries out `cmd` on `replicas`.
async fn run(replicas: &Arc<Replicas>, cmd: Command) -> Outcome {
    match cmd.kind {
        Some(command::Kind::PrepareReplica(p)) => {
            replicas.prepare(p).await.map(|_| None).map_err(Into::into)
        }
        Some(command::Kind::VerifyPoint(v)) if !v.vm.is_empty() => replicas
            .digest_vm(&v.item, &v.vm, &v.place)
            .await
            .map(|r| Some(command_result::Detail::Verify(r))),
        Some(command::Kind::VerifyPoint(v)) => replicas
            .verify(&v.item, &v.point)
            .await
            .map(|r| Some(command_result::Detail::Verify(r))),
        Some(command::Kind::Materialize(m)) => replicas
            .materialize(m)
            .await
            .map(|r| Some(command_result::Detail::Materialize(r))),
        Some(command::Kind::DropPoints(d)) => replicas
            .drop_points(&d.item)
            .await
            .map(|_| None)
            .map_err(Into::into),
        Some(command::Kind::RemoveReplica(r)) => replicas
            .remove(&r.item)
            .await
            .map(|_| None)
            .map_err(Into::into),
        _ => Err("a master target doesn't take this command".into()),
    }
}

/// Takes commands from the control stream until it ends and answers each on `outbox`.
pub async fn handle(
    replicas: Arc<Replicas>,
    mut commands: mpsc::Receiver<CsMessage>,
    outbox: mpsc::Sender<ComponentMessage>,
) {
    let answered = Arc::new(Mutex::new(Answered::default()));
    let slots = Arc::new(Semaphore::new(CONCURRENT));
    // Per item, the done-signal of its latest command: the next one waits for it.
    let mut last: HashMap<String, watch::Receiver<bool>> = HashMap::new();
    while let Some(cmd) = next_command(&mut commands).await {
        last.retain(|_, done| !*done.borrow());
        let (finished, done) = watch::channel(false);
        let before = last.insert(item_of(&cmd), done);
        let (replicas, answered, slots, outbox) = (
            replicas.clone(),
            answered.clone(),
            slots.clone(),
            outbox.clone(),
        );
        tokio::spawn(async move {
            if let Some(mut before) = before {
                // Err: the earlier task is gone (it ended, or panicked): go on.
                let _ = before.wait_for(|d| *d).await;
            }
            let Ok(_slot) = slots.acquire().await else {
                return;
            };
            let id = cmd.id;
            let earlier = answered.lock().unwrap_or_else(|e| e.into_inner()).get(id);
            let result = match earlier {
                Some(done) => {
                    tracing::info!(id, "command already carried out: answered again");
                    done
                }
                None => {
                    let r = result_of(id, run(&replicas, cmd).await);
                    answered
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .record(&r);
                    r
                }
            };
            let _ = finished.send(true);
            reply(&outbox, result).await;
        });
    }
}
