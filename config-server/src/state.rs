//! The configuration server's shared state: database, CA, passphrase, live sessions, what
//! components last reported (kept in memory, persisted coalesced) and the notification that
//! waiters for an item's state or a job's progress listen to.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use failback_common::control::now_ms;
use std::sync::Arc;

use failback_common::trust::Trust;
use failback_proto::pb::control::{CsMessage, PsStatus, Revocations, cs_message};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ca::Ca;
use crate::config::CsConfig;
use crate::item::Progress;
use crate::sessions::Sessions;
use crate::store::Store;

/// An item's progress persisted at most this often (and on every state change).
pub const PERSIST_PROGRESS_EVERY_MS: i64 = 5_000;

/// What an agent last reported for an item, and when it was last written to the database.
#[derive(Debug, Clone, Default)]
pub struct LiveProgress {
    pub progress: Progress,
    pub persisted_ms: i64,
}

/// What failed enrollments are counted by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FailureKey {
    Address(IpAddr),
    /// A component name, lower-cased.
    Name(String),
}

pub struct State {
    pub config: CsConfig,
    pub store: Store,
    pub ca: Ca,
    /// Revoked certificates: what the CS's API listener refuses (and cuts), and what every
    /// component learns over its control session.
    pub trust: Arc<Trust>,
    /// Address the mutual-TLS API is served on (shown for `cs` in `infra list`).
    pub api_address: Mutex<String>,
    pub sessions: Sessions,
    /// Cancelled when the CS shuts down: ends every control stream so the graceful shutdown
    /// of the server (which waits for open streams) completes.
    pub stopping: CancellationToken,
    /// Last status each process server reported.
    pub ps_status: Mutex<HashMap<String, PsStatus>>,
    /// VM snapshots each master target reported when it last registered.
    pub snapshots: Mutex<HashMap<String, Vec<String>>>,
    /// Each item's latest progress (newer than the database copy, which is coalesced).
    pub progress: Mutex<HashMap<String, LiveProgress>>,
    /// Bumped on every change of an item's state or points and of a job: what job tasks and
    /// `WatchJob` wait on instead of polling the database.
    pub changed: watch::Sender<u64>,
    /// Failed enrollment attempts per source address and per name in the last minute.
    failures: Mutex<HashMap<FailureKey, VecDeque<Instant>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl State {
    pub fn new(config: CsConfig, store: Store, ca: Ca, trust: Arc<Trust>) -> State {
        State {
            config,
            store,
            ca,
            trust,
            api_address: Mutex::new(String::new()),
            sessions: Sessions::default(),
            stopping: CancellationToken::new(),
            ps_status: Mutex::default(),
            snapshots: Mutex::default(),
            progress: Mutex::default(),
            changed: watch::channel(0).0,
            failures: Mutex::default(),
        }
    }

    /// Revokes `fingerprints` here and on every connected component (the others learn it
    /// when they connect: every session starts with the whole list).
    pub fn revoke<I: IntoIterator<Item = String>>(&self, fingerprints: I) {
        let fingerprints: Vec<String> = fingerprints.into_iter().collect();
        if fingerprints.is_empty() {
            return;
        }
        self.trust.revoke(fingerprints.iter().cloned());
        let message = CsMessage {
            kind: Some(cs_message::Kind::Revocations(Revocations { fingerprints })),
        };
        for session in self.sessions.lock().values() {
            // A full queue means a stalled component: it gets the whole list on reconnect.
            let _ = session.tx.try_send(Ok(message.clone()));
        }
    }

    /// Whether `name` has a control stream open now.
    pub fn connected(&self, name: &str) -> bool {
        self.sessions.connected(name)
    }

    /// Wakes everyone waiting for a change.
    pub fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Waits until `ready` returns `Some` (checked now and after every change), or `within`.
    pub async fn wait_for<T, F, Fut>(&self, within: Duration, mut ready: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let mut rx = self.changed.subscribe();
        let wait = async {
            loop {
                rx.mark_unchanged();
                if let Some(v) = ready().await {
                    return Some(v);
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(within, wait).await.ok().flatten()
    }

    /// The item's latest progress: the live copy, or the one the database holds.
    pub fn live_progress(&self, item: &str) -> Option<Progress> {
        lock(&self.progress).get(item).map(|p| p.progress.clone())
    }

    pub fn ps_health(&self, name: &str) -> Option<PsStatus> {
        lock(&self.ps_status).get(name).cloned()
    }

    pub fn set_ps_status(&self, name: &str, status: PsStatus) {
        lock(&self.ps_status).insert(name.to_string(), status);
    }

    pub fn all_ps_status(&self) -> HashMap<String, PsStatus> {
        lock(&self.ps_status).clone()
    }

    pub fn snapshots_of(&self, mt: &str) -> Vec<String> {
        lock(&self.snapshots).get(mt).cloned().unwrap_or_default()
    }

    pub fn set_snapshots(&self, mt: &str, snapshots: Vec<String>) {
        lock(&self.snapshots).insert(mt.to_string(), snapshots);
    }

    /// Records a failed enrollment under each of `keys`; returns by how many attempts the
    /// worst of them is past its limit in the last minute (0: within the limits). Keys older
    /// than a minute are forgotten, and the table is bounded: a flood of names can't grow it.
    pub fn record_enroll_failure(&self, keys: &[FailureKey]) -> u32 {
        const MAX_KEYS: usize = 10_000;
        let window = Duration::from_secs(60);
        let mut failures = lock(&self.failures);
        if failures.len() >= MAX_KEYS {
            failures.retain(|_, q| q.back().is_some_and(|t| t.elapsed() <= window));
            if failures.len() >= MAX_KEYS {
                failures.clear();
            }
        }
        let mut excess = 0;
        for key in keys {
            let limit = match key {
                FailureKey::Address(_) => self.config.enroll_failures_per_minute,
                FailureKey::Name(_) => self.config.enroll_failures_per_name,
            };
            let q = failures.entry(key.clone()).or_default();
            while q.front().is_some_and(|t| t.elapsed() > window) {
                q.pop_front();
            }
            q.push_back(Instant::now());
            excess = excess.max((q.len() as u32).saturating_sub(limit));
        }
        excess
    }

    /// Records an agent's progress in memory; returns it with whether it is due to be
    /// persisted (the last write is older than [`PERSIST_PROGRESS_EVERY_MS`]).
    pub fn record_progress(&self, item: &str, progress: Progress) -> bool {
        let now = now_ms();
        let mut all = lock(&self.progress);
        let live = all.entry(item.to_string()).or_default();
        live.progress = progress;
        if now - live.persisted_ms >= PERSIST_PROGRESS_EVERY_MS {
            live.persisted_ms = now;
            true
        } else {
            false
        }
    }

    /// Forgets an item's live progress (it was removed or replaced).
    pub fn forget_progress(&self, item: &str) {
        lock(&self.progress).remove(item);
    }
}
