//! Shared link state: the up/down gate with its per-connection cancellation, the shaping
//! settings and token buckets, and the byte and connection counters (and rates) behind
//! `Status`.
//!
//! The gate, the settings and the admission of a connection are decided under one lock, so
//! a connection is either admitted before the link goes down (and is then reset or stalled
//! with it) or refused, and a change of down mode while down applies consistently.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use failback_proto::pb::link as pb;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Route, Site};
use crate::shaping::{Bucket, DownMode, Settings};

/// How often the rate sampler records the counters.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Rates are computed against the newest sample at least this old...
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// ...and samples older than this are discarded.
const SAMPLE_KEEP: Duration = Duration::from_millis(2250);

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

/// Counters of one direction of the tunnel, by sending site.
#[derive(Default)]
struct Way {
    /// Bytes that crossed.
    bytes: AtomicU64,
    /// Bytes read and dropped by a blackhole.
    dropped: AtomicU64,
}

/// A reading of both directions' byte counters.
#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    onprem_to_azure: u64,
    azure_to_onprem: u64,
}

pub(crate) struct Shared {
    /// Cancelled when the link shuts down; parent of every epoch.
    pub(crate) root: CancellationToken,
    gate: Mutex<Gate>,
    /// Mirrors `gate.up` (written under the gate lock) for pumps waiting out a stall.
    up: watch::Sender<bool>,
    /// Written under the gate lock; read by pumps for every chunk.
    settings: watch::Sender<Settings>,
    onprem_to_azure: Way,
    azure_to_onprem: Way,
    /// The bandwidth token buckets, by sending site: one per direction for the tunnel.
    bucket_onprem_to_azure: Mutex<Bucket>,
    bucket_azure_to_onprem: Mutex<Bucket>,
    samples: Mutex<VecDeque<Sample>>,
    active: AtomicU64,
    total: AtomicU64,
    pub(crate) routes: Vec<Arc<RouteState>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // No critical section here can leave its data inconsistent, so poison is harmless.
    m.lock().unwrap_or_else(PoisonError::into_inner)
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
            up: watch::Sender::new(true),
            settings: watch::Sender::new(Settings::default()),
            onprem_to_azure: Way::default(),
            azure_to_onprem: Way::default(),
            bucket_onprem_to_azure: Mutex::new(Bucket::new()),
            bucket_azure_to_onprem: Mutex::new(Bucket::new()),
            samples: Mutex::new(VecDeque::new()),
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            routes,
        }
    }

    fn gate(&self) -> MutexGuard<'_, Gate> {
        lock(&self.gate)
    }

    fn way(&self, site: Site) -> &Way {
        match site {
            Site::Onprem => &self.onprem_to_azure,
            Site::Azure => &self.azure_to_onprem,
        }
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

    /// Sets the gate; going down in down mode `reset` cancels every admitted connection (in
    /// `stall` the pumps wait for up). With `stop_flap`, flapping is switched off first.
    /// Returns whether the state changed.
    pub(crate) fn set_up(&self, up: bool, stop_flap: bool) -> bool {
        let mut gate = self.gate();
        if stop_flap {
            self.settings.send_if_modified(|s| s.flap.take().is_some());
        }
        self.set_up_locked(&mut gate, up)
    }

    fn set_up_locked(&self, gate: &mut Gate, up: bool) -> bool {
        if gate.up == up {
            return false;
        }
        gate.up = up;
        if !up && self.settings.borrow().down_mode == DownMode::Reset {
            Self::reset_locked(&self.root, gate);
        }
        self.up.send_replace(up);
        true
    }

    fn reset_locked(root: &CancellationToken, gate: &mut Gate) {
        gate.epoch.cancel();
        gate.epoch = root.child_token();
    }

    pub(crate) fn is_up(&self) -> bool {
        self.gate().up
    }

    /// Resets every admitted connection once; the gate is unchanged.
    pub(crate) fn reset_connections(&self) {
        let mut gate = self.gate();
        Self::reset_locked(&self.root, &mut gate);
    }

    pub(crate) fn settings(&self) -> Settings {
        *self.settings.borrow()
    }

    /// Changes the settings through `f` (nothing changes if it fails). Switching flapping
    /// off leaves the link up; switching to down mode `reset` while down resets the
    /// connections stalled so far.
    pub(crate) fn update_settings<E>(
        &self,
        f: impl FnOnce(&mut Settings) -> Result<(), E>,
    ) -> Result<Settings, E> {
        let mut gate = self.gate();
        let old = self.settings();
        let mut new = old;
        f(&mut new)?;
        self.settings.send_replace(new);
        if !gate.up {
            if old.flap.is_some() && new.flap.is_none() {
                self.set_up_locked(&mut gate, true);
            } else if old.down_mode == DownMode::Stall && new.down_mode == DownMode::Reset {
                Self::reset_locked(&self.root, &mut gate);
            }
        }
        Ok(new)
    }

    pub(crate) fn subscribe_settings(&self) -> watch::Receiver<Settings> {
        self.settings.subscribe()
    }

    pub(crate) fn subscribe_up(&self) -> watch::Receiver<bool> {
        self.up.subscribe()
    }

    /// Reserves `n` bytes of the bandwidth of the direction sent from `site`; returns how
    /// long to wait before sending them.
    pub(crate) fn reserve(&self, site: Site, n: usize, rate: u64) -> Duration {
        let bucket = match site {
            Site::Onprem => &self.bucket_onprem_to_azure,
            Site::Azure => &self.bucket_azure_to_onprem,
        };
        lock(bucket).reserve(n, rate, Instant::now())
    }

    /// Records `n` bytes sent from `site` and dropped by the blackhole.
    pub(crate) fn dropped(&self, site: Site, n: usize) {
        self.way(site)
            .dropped
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    fn sample_now(&self) -> Sample {
        Sample {
            at: Instant::now(),
            onprem_to_azure: self.onprem_to_azure.bytes.load(Ordering::Relaxed),
            azure_to_onprem: self.azure_to_onprem.bytes.load(Ordering::Relaxed),
        }
    }

    /// Records the counters for the rates (called every [`SAMPLE_EVERY`]).
    pub(crate) fn sample(&self) {
        let now = self.sample_now();
        let mut samples = lock(&self.samples);
        samples.push_back(now);
        while samples
            .front()
            .is_some_and(|s| now.at.duration_since(s.at) > SAMPLE_KEEP)
        {
            samples.pop_front();
        }
    }

    /// Bytes per second each way (onprem->azure, azure->onprem) since the newest sample at
    /// least [`RATE_WINDOW`] old, or the oldest one kept.
    fn rates(&self) -> (u64, u64) {
        let now = self.sample_now();
        let samples = lock(&self.samples);
        let base = samples
            .iter()
            .rev()
            .find(|s| now.at.duration_since(s.at) >= RATE_WINDOW)
            .or_else(|| samples.front());
        let Some(base) = base else {
            return (0, 0);
        };
        let secs = now.at.duration_since(base.at).as_secs_f64();
        if secs < 0.1 {
            return (0, 0);
        }
        let rate = |a: u64, b: u64| (a.saturating_sub(b) as f64 / secs) as u64;
        (
            rate(now.onprem_to_azure, base.onprem_to_azure),
            rate(now.azure_to_onprem, base.azure_to_onprem),
        )
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
            link: &self.way(site).bytes,
            site,
        }
    }

    pub(crate) fn status(&self) -> pb::LinkStatus {
        let (up, settings) = {
            let gate = self.gate();
            (gate.up, self.settings())
        };
        let (rate_onprem_to_azure, rate_azure_to_onprem) = self.rates();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        pb::LinkStatus {
            up,
            settings: Some(settings.to_pb()),
            rate_onprem_to_azure,
            rate_azure_to_onprem,
            dropped_onprem_to_azure: load(&self.onprem_to_azure.dropped),
            dropped_azure_to_onprem: load(&self.azure_to_onprem.dropped),
            bytes_onprem_to_azure: load(&self.onprem_to_azure.bytes),
            bytes_azure_to_onprem: load(&self.azure_to_onprem.bytes),
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

/// The two counters one direction of one connection charges: its route's and the link's;
/// and the site the bytes are sent from.
pub(crate) struct Tally<'a> {
    route: &'a AtomicU64,
    link: &'a AtomicU64,
    pub(crate) site: Site,
}

impl Tally<'_> {
    pub(crate) fn add(&self, n: usize) {
        let n = n as u64;
        self.route.fetch_add(n, Ordering::Relaxed);
        self.link.fetch_add(n, Ordering::Relaxed);
    }
}
