//! The configuration server's shared state: database, CA, passphrase, live control sessions
//! and the enrollment rate limiter.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use failback_proto::pb::control::{
    Command, CommandResult, CsMessage, PsStatus, command, cs_message,
};
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::ca::Ca;
use crate::config::CsConfig;
use crate::db::Store;

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

pub struct State {
    pub config: CsConfig,
    pub store: Store,
    pub ca: Ca,
    pub passphrase: String,
    /// Address the mutual-TLS API is served on (shown for `cs` in `infra list`).
    pub api_address: Mutex<String>,
    pub sessions: Mutex<HashMap<String, Session>>,
    /// Cancelled when the CS shuts down: ends every control stream so the graceful shutdown
    /// of the server (which waits for open streams) completes.
    pub stopping: CancellationToken,
    /// Commands sent to components, waiting for their result.
    pending: Mutex<HashMap<u64, oneshot::Sender<CommandResult>>>,
    /// Running jobs that can be cancelled (forced), by job id.
    pub job_cancel: Mutex<HashMap<i64, CancellationToken>>,
    /// Last status each process server reported.
    pub ps_status: Mutex<HashMap<String, PsStatus>>,
    /// VM snapshots each master target reported when it last registered.
    pub snapshots: Mutex<HashMap<String, Vec<String>>>,
    /// Failed enrollment attempts per source address in the last minute.
    failures: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
    next_conn: AtomicU64,
}

impl State {
    pub fn new(config: CsConfig, store: Store, ca: Ca, passphrase: String) -> State {
        State {
            config,
            store,
            ca,
            passphrase,
            api_address: Mutex::new(String::new()),
            sessions: Mutex::new(HashMap::new()),
            stopping: CancellationToken::new(),
            failures: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            job_cancel: Mutex::new(HashMap::new()),
            ps_status: Mutex::new(HashMap::new()),
            snapshots: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
        }
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    pub fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `name` has a control stream open now.
    pub fn connected(&self, name: &str) -> bool {
        self.sessions().contains_key(name)
    }

    /// Seconds until `ip` may try again, if it has used up its failed attempts.
    pub fn enroll_blocked_for(&self, ip: IpAddr) -> Option<u64> {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let q = failures.entry(ip).or_default();
        let window = std::time::Duration::from_secs(60);
        while q.front().is_some_and(|t| t.elapsed() > window) {
            q.pop_front();
        }
        if q.len() >= self.config.enroll_failures_per_minute as usize {
            let oldest = q.front().map(|t| t.elapsed()).unwrap_or_default();
            Some(window.saturating_sub(oldest).as_secs().max(1))
        } else {
            None
        }
    }

    pub fn record_enroll_failure(&self, ip: IpAddr) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.entry(ip).or_default().push_back(Instant::now());
    }
}

/// How long a component has to answer a command.
const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl State {
    /// Sends a command on `component`'s control stream and waits for its result. A refusal by
    /// the component becomes `FailedPrecondition` carrying its message.
    pub async fn command(
        &self,
        component: &str,
        kind: command::Kind,
    ) -> Result<CommandResult, tonic::Status> {
        let id = self.next_conn_id();
        let tx = self
            .sessions()
            .get(component)
            .map(|s| s.tx.clone())
            .ok_or_else(|| tonic::Status::unavailable(format!("`{component}` is not connected")))?;
        let (done_tx, done_rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, done_tx);
        let msg = CsMessage {
            kind: Some(cs_message::Kind::Command(Command {
                id,
                kind: Some(kind),
            })),
        };
        if tx.send(Ok(msg)).await.is_err() {
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            return Err(tonic::Status::unavailable(format!(
                "`{component}` disconnected"
            )));
        }
        let result = tokio::time::timeout(COMMAND_TIMEOUT, done_rx).await;
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        match result {
            Ok(Ok(r)) if r.ok => Ok(r),
            Ok(Ok(r)) => Err(tonic::Status::failed_precondition(format!(
                "{component}: {}",
                r.error
            ))),
            Ok(Err(_)) => Err(tonic::Status::unavailable(format!(
                "`{component}` disconnected before answering"
            ))),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "`{component}` did not answer within {COMMAND_TIMEOUT:?}"
            ))),
        }
    }

    /// Completes a pending command.
    pub fn command_result(&self, result: CommandResult) {
        if let Some(tx) = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&result.id)
        {
            let _ = tx.send(result);
        }
    }

    pub fn ps_health(&self, name: &str) -> Option<PsStatus> {
        self.ps_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }
}
