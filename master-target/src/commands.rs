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
    commands: mpsc::Receiver<CsMessage>,
    outbox: mpsc::Sender<ComponentMessage>,
) {
    schedule(
        move |cmd| {
            let replicas = replicas.clone();
            async move { run(&replicas, cmd).await }
        },
        commands,
        outbox,
    )
    .await
}

/// Runs each command through `carry_out` in a task of its own: after the previous command of
/// the same item has finished, at most [`CONCURRENT`] at once; a command id already answered
/// gets the first answer again.
async fn schedule<F, Fut>(
    carry_out: F,
    mut commands: mpsc::Receiver<CsMessage>,
    outbox: mpsc::Sender<ComponentMessage>,
) where
    F: Fn(Command) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Outcome> + Send + 'static,
{
    let carry_out = Arc::new(carry_out);
    let answered = Arc::new(Mutex::new(Answered::default()));
    let slots = Arc::new(Semaphore::new(CONCURRENT));
    // Per item, the done-signal of its latest command: the next one waits for it.
    let mut last: HashMap<String, watch::Receiver<bool>> = HashMap::new();
    while let Some(cmd) = next_command(&mut commands).await {
        last.retain(|_, done| !*done.borrow());
        let (finished, done) = watch::channel(false);
        let before = last.insert(item_of(&cmd), done);
        let (carry_out, answered, slots, outbox) = (
            carry_out.clone(),
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
                    let r = result_of(id, carry_out(cmd).await);
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

#[cfg(test)]
mod tests {
    use super::*;
    use failback_proto::pb::control::{PrepareReplica, cs_message};
    use std::time::Duration;
    use tokio::sync::Notify;

    fn prepare(id: u64, item: &str) -> CsMessage {
        CsMessage {
            kind: Some(cs_message::Kind::Command(Command {
                id,
                kind: Some(command::Kind::PrepareReplica(PrepareReplica {
                    item: item.into(),
                    ..Default::default()
                })),
            })),
        }
    }

    /// The id of the next answer on `outbox` (a generous bound: a wedged scheduler fails).
    async fn answer(outbox: &mut mpsc::Receiver<ComponentMessage>) -> u64 {
        match tokio::time::timeout(Duration::from_secs(30), outbox.recv()).await {
            Ok(Some(ComponentMessage {
                kind: Some(failback_proto::pb::control::component_message::Kind::Result(r)),
            })) => r.id,
            other => panic!("no answer: {other:?}"),
        }
    }

    /// A scheduler whose commands for item `slow` wait until `release` is notified (each
    /// start is counted in `started`); every other command is done at once.
    fn lab(
        release: Arc<Notify>,
        started: Arc<Mutex<Vec<u64>>>,
    ) -> (mpsc::Sender<CsMessage>, mpsc::Receiver<ComponentMessage>) {
        let (commands, rx) = mpsc::channel(64);
        let (outbox, answers) = mpsc::channel(64);
        tokio::spawn(schedule(
            move |cmd: Command| {
                let (release, started) = (release.clone(), started.clone());
                async move {
                    started
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(cmd.id);
                    if item_of(&cmd) == "slow" {
                        release.notified().await;
                    }
                    Ok(None)
                }
            },
            rx,
            outbox,
        ));
        (commands, answers)
    }

    #[tokio::test]
    async fn a_slow_command_for_one_item_does_not_hold_up_another_item() {
        let release = Arc::new(Notify::new());
        let started = Arc::new(Mutex::new(Vec::new()));
        let (commands, mut answers) = lab(release.clone(), started.clone());
        commands.send(prepare(1, "slow")).await.expect("send");
        commands.send(prepare(2, "fast")).await.expect("send");
        assert_eq!(
            answer(&mut answers).await,
            2,
            "the other item's command answered first"
        );
        release.notify_one();
        assert_eq!(answer(&mut answers).await, 1);
    }

    #[tokio::test]
    async fn commands_of_one_item_run_in_order() {
        let release = Arc::new(Notify::new());
        let started = Arc::new(Mutex::new(Vec::new()));
        let (commands, mut answers) = lab(release.clone(), started.clone());
        commands.send(prepare(1, "slow")).await.expect("send");
        commands.send(prepare(2, "slow")).await.expect("send");
        commands.send(prepare(3, "fast")).await.expect("send");
        assert_eq!(answer(&mut answers).await, 3);
        assert_eq!(
            *started.lock().unwrap_or_else(|e| e.into_inner()),
            vec![1, 3],
            "the second command of `slow` waits for the first"
        );
        release.notify_one();
        assert_eq!(answer(&mut answers).await, 1);
        release.notify_one();
        assert_eq!(answer(&mut answers).await, 2);
    }

    #[tokio::test]
    async fn a_command_sent_again_is_answered_without_running_twice() {
        let release = Arc::new(Notify::new());
        let started = Arc::new(Mutex::new(Vec::new()));
        let (commands, mut answers) = lab(release, started.clone());
        commands.send(prepare(5, "fast")).await.expect("send");
        assert_eq!(answer(&mut answers).await, 5);
        commands.send(prepare(5, "fast")).await.expect("send");
        assert_eq!(answer(&mut answers).await, 5);
        assert_eq!(*started.lock().unwrap_or_else(|e| e.into_inner()), vec![5]);
    }
}
