//! Shared link state: the up/down gate with its per-connection cancellation, and the byte
//! and connection counters behind `Status`.
//!
//! The gate and the admission of a connection are decided under one lock, so a connection
//! is either admitted before the link goes down (and is then reset with it) or refused.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use failback_proto::pb::link as pb;
use tokio_util::sync::CancellationToken;

use crate::config::{Route, Site};

/// Per-route state: the validated route, where it actually listens, its counters.
pub(crate) struct RouteState {
    pub(crate) route: Route,
    /// The bound listen address (differs from `route.listen` when that used port 0).
    pub(crate) addr: SocketAddr,
    /// Bytes from the dialer to the server.
    forward: AtomicU64,
    /// Bytes from the server back to the dialer.
    backward: AtomicU64,
    active: AtomicU64,
}

impl RouteState {
    pub(crate) fn new(route: Route, addr: SocketAddr) -> Self {
        RouteState {
            route,
            addr,
            forward: AtomicU64::new(0),
            backward: AtomicU64::new(0),
            active: AtomicU64::new(0),
        }
    }
}

/// Which way bytes flow on a relayed connection, relative to its dialer.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Flow {
    /// Dialer to server.
    Forward,
    /// Server to dialer.
    Backward,
}

/// Whether the link is up, and the token every admitted connection hangs off.
struct Gate {
    up: bool,
    /// Cancelled (and replaced) when the link goes down: resets every connection admitted
    /// since the last time it went down.
    epoch: CancellationToken,
}

pub(crate) struct Shared {
    /// Cancelled when the link shuts down; parent of every epoch.
    pub(crate) root: CancellationToken,
    gate: Mutex<Gate>,
    onprem_to_azure: AtomicU64,
    azure_to_onprem: AtomicU64,
    active: AtomicU64,
    total: AtomicU64,
    pub(crate) routes: Vec<Arc<RouteState>>,
}

impl Shared {
    pub(crate) fn new(routes: Vec<Arc<RouteState>>) -> Self {
        let root = CancellationToken::new();
        Shared {
            gate: Mutex::new(Gate {
                up: true,
                epoch: root.child_token(),
            }),
            root,
            onprem_to_azure: AtomicU64::new(0),
            azure_to_onprem: AtomicU64::new(0),
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            routes,
        }
    }

    fn gate(&self) -> MutexGuard<'_, Gate> {
        // The critical sections cannot leave the gate inconsistent, so poison is harmless.
        self.gate.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a new connection on `route` if the link is up.
    pub(crate) fn admit(self: &Arc<Self>, route: &Arc<RouteState>) -> Option<Admission> {
        let cancel = {
            let gate = self.gate();
            if !gate.up {
                return None;
            }
            gate.epoch.child_token()
        };
        self.total.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        route.active.fetch_add(1, Ordering::Relaxed);
        Some(Admission {
            cancel,
            shared: Arc::clone(self),
            route: Arc::clone(route),
        })
    }

    /// Sets the gate; going down cancels every admitted connection. Returns whether the
    /// state changed.
    pub(crate) fn set_up(&self, up: bool) -> bool {
        let mut gate = self.gate();
        if gate.up == up {
            return false;
        }
        gate.up = up;
        if !up {
            gate.epoch.cancel();
            gate.epoch = self.root.child_token();
        }
        true
    }

    /// The counters to charge for bytes flowing `flow` on `route`.
    pub(crate) fn tally<'a>(&'a self, route: &'a RouteState, flow: Flow) -> Tally<'a> {
        let site = match flow {
            Flow::Forward => route.route.from_site,
            Flow::Backward => route.route.from_site.other(),
        };
        Tally {
            route: match flow {
                Flow::Forward => &route.forward,
                Flow::Backward => &route.backward,
            },
            link: match site {
                Site::Onprem => &self.onprem_to_azure,
                Site::Azure => &self.azure_to_onprem,
            },
        }
    }

    pub(crate) fn status(&self) -> pb::LinkStatus {
        let up = self.gate().up;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        pb::LinkStatus {
            up,
            bytes_onprem_to_azure: load(&self.onprem_to_azure),
            bytes_azure_to_onprem: load(&self.azure_to_onprem),
            active_connections: load(&self.active),
            total_connections: load(&self.total),
            routes: self
                .routes
                .iter()
                .map(|r| pb::Route {
                    name: r.route.name.clone(),
                    listen: r.addr.to_string(),
                    connect: r.route.connect.clone(),
                    from_site: r.route.from_site.to_string(),
                    bytes_forward: load(&r.forward),
                    bytes_backward: load(&r.backward),
                    active_connections: load(&r.active),
                })
                .collect(),
        }
    }
}

/// An admitted connection: its cancellation, and its place in the active counts until
/// dropped.
pub(crate) struct Admission {
    /// Cancelled when the link goes down or shuts down.
    pub(crate) cancel: CancellationToken,
    pub(crate) shared: Arc<Shared>,
    pub(crate) route: Arc<RouteState>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.shared.active.fetch_sub(1, Ordering::Relaxed);
        self.route.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The two counters one direction of one connection charges: its route's and the link's.
pub(crate) struct Tally<'a> {
    route: &'a AtomicU64,
    link: &'a AtomicU64,
}

impl Tally<'_> {
    pub(crate) fn add(&self, n: usize) {
        let n = n as u64;
        self.route.fetch_add(n, Ordering::Relaxed);
        self.link.fetch_add(n, Ordering::Relaxed);
    }
}
