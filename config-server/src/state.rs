//! The configuration server's shared state: database, CA, passphrase, live control sessions
//! and the enrollment rate limiter.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use failback_proto::pb::control::CsMessage;
use tokio::sync::mpsc;
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
            next_conn: AtomicU64::new(1),
        }
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    pub fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
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
