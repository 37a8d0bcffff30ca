//! Live control sessions and the commands sent on them.
//!
//! A session is one component's control stream. A command goes out on the component's
//! current session and its result counts only if it comes back on that same session: a result
//! on any other stream (another component answering, or an old stream of the same one) is
//! logged and dropped. Command ids are unique across restarts of the CS (the counter starts
//! from the clock), and a job's commands get ids derived from the job and step, so a command
//! re-sent by a resumed job carries the id the component has already answered.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use failback_proto::pb::control::{
    Command, CommandResult, CsMessage, ErrorCode, command, cs_message,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// How long a component has to answer a command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A component's live control stream.
pub struct Session {
    /// Distinguishes a session from the one that replaced it (a reconnect racing the old one).
    pub conn_id: u64,
    /// Downward messages to the component.
    pub tx: mpsc::Sender<Result<CsMessage, tonic::Status>>,
    /// Cancelled when a newer session of the same component replaces this one.
    pub cancel: CancellationToken,
    /// Last heartbeat seen (Unix ms), newer than the database copy, which is throttled.
    pub last_heartbeat_ms: i64,
}

/// A command waiting for its result: on which session it went out.
struct Pending {
    conn_id: u64,
    component: String,
    done: oneshot::Sender<CommandResult>,
}

/// Every live session and every command in flight.
pub struct Sessions {
    live: Mutex<HashMap<String, Session>>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_conn: AtomicU64,
    next_command: AtomicU64,
    /// Bumped whenever a session opens or closes (waiters for a component to connect).
    changed: watch::Sender<u64>,
    /// Control streams that ended (closed, or replaced by a reconnect) since start.
    pub drops: AtomicU64,
}

impl Default for Sessions {
    fn default() -> Self {
        // Command ids start from the clock (ms << 16), so a restarted CS never reuses an id a
        // component may still remember as answered.
        let start = (failback_common::control::now_ms().max(1) as u64) << 16;
        Sessions {
            live: Mutex::default(),
            pending: Mutex::default(),
            next_conn: AtomicU64::new(1),
            next_command: AtomicU64::new(start),
            changed: watch::channel(0).0,
            drops: AtomicU64::new(0),
        }
    }
}

impl Sessions {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The components with a control stream open now, with their last heartbeat (Unix ms).
    pub fn heartbeats(&self) -> Vec<(String, i64)> {
        self.lock()
            .iter()
            .map(|(n, s)| (n.clone(), s.last_heartbeat_ms))
            .collect()
    }

    /// Whether `name` has a control stream open now.
    pub fn connected(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Installs `session` for `name`, cancelling the one it replaces.
    pub fn open(&self, name: &str, session: Session) -> bool {
        let replaced = self.lock().insert(name.to_string(), session);
        let had = replaced.is_some();
        if let Some(old) = replaced {
            old.cancel.cancel();
            self.drops.fetch_add(1, Ordering::Relaxed);
        }
        self.changed.send_modify(|v| *v += 1);
        had
    }

    /// Removes `name`'s session if it is still `conn_id`; true if it was.
    pub fn close(&self, name: &str, conn_id: u64) -> bool {
        let mut live = self.lock();
        if live.get(name).is_some_and(|s| s.conn_id == conn_id) {
            live.remove(name);
            drop(live);
            self.drops.fetch_add(1, Ordering::Relaxed);
            self.changed.send_modify(|v| *v += 1);
            true
        } else {
            false
        }
    }

    /// Ends `name`'s session, whichever it is (a removed or re-issued identity).
    pub fn drop_session(&self, name: &str) {
        if let Some(s) = self.lock().remove(name) {
            s.cancel.cancel();
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// Waits up to `within` for `name` to be connected.
    pub async fn wait_connected(&self, name: &str, within: Duration) -> bool {
        let mut rx = self.changed.subscribe();
        let wait = async {
            loop {
                if self.connected(name) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(within, wait).await;
        self.connected(name)
    }

    /// A fresh command id.
    pub fn fresh_id(&self) -> u64 {
        self.next_command.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends a command with id `id` on `component`'s current session and waits for the
    /// result from that session. A refusal becomes a status carrying the component's message:
    /// `NotFound` for `ERROR_CODE_NOT_FOUND`, `FailedPrecondition` otherwise.
    pub async fn command_id(
        &self,
        component: &str,
        id: u64,
        kind: command::Kind,
    ) -> Result<CommandResult, tonic::Status> {
        let (tx, conn_id) = self
            .lock()
            .get(component)
            .map(|s| (s.tx.clone(), s.conn_id))
            .ok_or_else(|| tonic::Status::unavailable(format!("`{component}` is not connected")))?;
        let (done_tx, done_rx) = oneshot::channel();
        self.pending().insert(
            id,
            Pending {
                conn_id,
                component: component.to_string(),
                done: done_tx,
            },
        );
        let msg = CsMessage {
            kind: Some(cs_message::Kind::Command(Command {
                id,
                kind: Some(kind),
            })),
        };
        if tx.send(Ok(msg)).await.is_err() {
            self.pending().remove(&id);
            return Err(tonic::Status::unavailable(format!(
                "`{component}` disconnected"
            )));
        }
        let result = tokio::time::timeout(COMMAND_TIMEOUT, done_rx).await;
        self.pending().remove(&id);
        match result {
            Ok(Ok(r)) if r.ok => Ok(r),
            Ok(Ok(r)) => {
                let message = format!("{component}: {}", r.error);
                Err(match r.code() {
                    ErrorCode::NotFound => tonic::Status::not_found(message),
                    _ => tonic::Status::failed_precondition(message),
                })
            }
            Ok(Err(_)) => Err(tonic::Status::unavailable(format!(
                "`{component}` disconnected before answering"
            ))),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "`{component}` did not answer within {COMMAND_TIMEOUT:?}"
            ))),
        }
    }

    /// [`Sessions::command_id`] with a fresh id.
    pub async fn command(
        &self,
        component: &str,
        kind: command::Kind,
    ) -> Result<CommandResult, tonic::Status> {
        self.command_id(component, self.fresh_id(), kind).await
    }

    /// A result that arrived on session `conn_id` of `component`: completes its command only
    /// if the command went out on that session.
    pub fn result(&self, component: &str, conn_id: u64, result: CommandResult) {
        let mut pending = self.pending();
        match pending.get(&result.id) {
            Some(p) if p.conn_id == conn_id && p.component == component => {
                if let Some(p) = pending.remove(&result.id) {
                    let _ = p.done.send(result);
                }
            }
            Some(p) => tracing::warn!(
                from = %component,
                sent_to = %p.component,
                id = result.id,
                "dropped a command result from a stream the command was not sent on"
            ),
            None => {
                tracing::debug!(from = %component, id = result.id, "result of no pending command")
            }
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use failback_proto::pb::control::{DropPoints, command};

    fn session(
        s: &Sessions,
        name: &str,
    ) -> (u64, mpsc::Receiver<Result<CsMessage, tonic::Status>>) {
        let (tx, rx) = mpsc::channel(4);
        let conn_id = s.next_conn_id();
        s.open(
            name,
            Session {
                conn_id,
                tx,
                cancel: CancellationToken::new(),
                last_heartbeat_ms: 0,
            },
        );
        (conn_id, rx)
    }

    fn ok(id: u64) -> CommandResult {
        CommandResult {
            id,
            ok: true,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_result_counts_only_from_the_session_the_command_went_to() {
        let s = Arc::new(Sessions::default());
        let (target_conn, mut target_rx) = session(&s, "azure-target");
        let (other_conn, _other_rx) = session(&s, "ps-onprem");
        let sent = {
            let s = s.clone();
            tokio::spawn(async move {
                s.command(
                    "azure-target",
                    command::Kind::DropPoints(DropPoints {
                        item: "vm1-1".into(),
                    }),
                )
                .await
            })
        };
        let Some(Ok(CsMessage {
            kind: Some(cs_message::Kind::Command(cmd)),
        })) = target_rx.recv().await
        else {
            panic!("the command reaches the target");
        };
        // Another component answering, and an older stream of the target itself: dropped.
        s.result("ps-onprem", other_conn, ok(cmd.id));
        s.result("azure-target", target_conn + 100, ok(cmd.id));
        tokio::task::yield_now().await;
        assert!(
            !sent.is_finished(),
            "a forged result must not complete the command"
        );
        // A refusal from the real session completes it, with the component's message.
        s.result(
            "azure-target",
            target_conn,
            CommandResult {
                id: cmd.id,
                ok: false,
                error: "no replica of `vm1-1`".into(),
                code: ErrorCode::NotFound as i32,
                detail: None,
            },
        );
        let r = sent.await.expect("join").expect_err("refused");
        assert_eq!(r.code(), tonic::Code::NotFound);
        assert_eq!(r.message(), "azure-target: no replica of `vm1-1`");
    }
}
