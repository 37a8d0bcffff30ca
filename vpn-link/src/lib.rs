//! vpn-link: the simulated site-to-site VPN between `onprem` and `azure`. Every connection
//! between the sites passes through it: a TCP relay that counts the bytes crossing each
//! way and can be taken down (every relayed connection reset or stalled, new ones refused)
//! and up, and shaped at runtime ([`Settings`]: latency and jitter, a bandwidth cap per
//! direction shared by the whole tunnel, flapping, a one-way blackhole).
//!
//! # Layout
//! - [`config`]: the TOML form, validation into [`Route`]s and [`Settings`], loading with
//!   env overrides.
//! - [`shaping`]: the settings, their textual and protobuf forms, the token bucket.
//! - `state`: the up/down gate, per-connection cancellation, settings, counters and rates.
//! - `relay`: accept loops, per-connection relays, and `pump`, the one place bytes cross
//!   (and are shaped); the flap and rate-sampling tasks.
//! - `control`: the `failback.link.v1.LinkControl` gRPC service.
//! - [`metrics`]: the `flab_link_*` series of the `/metrics` endpoint.
//!
//! # Use
//! [`Link::bind`] binds every route listener (port 0 for an ephemeral port; read it back
//! with [`Link::route_addr`]); [`Link::serve`] runs the relay and the control API on an
//! already bound listener until a shutdown future resolves. [`Link::handle`] controls the
//! link in-process, as tests do.

pub mod config;
mod control;
pub mod metrics;
mod relay;
pub mod shaping;
mod state;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use failback_common::server::Secured;
use failback_proto::pb::link::LinkStatus;
use failback_proto::pb::link::link_control_server::LinkControlServer;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;
use tracing::info;

pub use config::{Config, Route, Site};
pub use shaping::{DownMode, Settings};

use crate::control::ControlService;
use crate::state::{RouteState, Shared};

/// A route listener could not be bound. Like every error here, `Display` leaves the cause
/// to `source()` (print with `{:#}` through anyhow for the whole chain).
#[derive(Debug, thiserror::Error)]
#[error("route `{route}`: cannot listen on {addr}")]
pub struct BindError {
    pub route: String,
    pub addr: String,
    #[source]
    pub source: io::Error,
}

/// The link stopped for a reason other than its shutdown signal.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("control API failed")]
    Control(#[from] tonic::transport::Error),
    #[error("relay accept loop stopped unexpectedly: {0}")]
    Relay(String),
}

/// A link with every route listener bound, ready to [`serve`](Link::serve).
pub struct Link {
    shared: Arc<Shared>,
    /// One per route, in the order of `shared.routes`.
    listeners: Vec<TcpListener>,
}

impl Link {
    /// Binds a listener per route. Route names are expected unique (config validation
    /// ensures it); [`route_addr`](Link::route_addr) finds the first of a name.
    pub async fn bind(routes: Vec<Route>) -> Result<Link, BindError> {
        let mut listeners = Vec::with_capacity(routes.len());
        let mut states = Vec::with_capacity(routes.len());
        for route in routes {
            let bound = match TcpListener::bind(route.listen.as_str()).await {
                Ok(l) => l.local_addr().map(|a| (l, a)),
                Err(e) => Err(e),
            };
            let (listener, addr) = bound.map_err(|source| BindError {
                route: route.name.clone(),
                addr: route.listen.clone(),
                source,
            })?;
            listeners.push(listener);
            states.push(Arc::new(RouteState::new(route, addr)));
        }
        Ok(Link {
            shared: Arc::new(Shared::new(states)),
            listeners,
        })
    }

    /// The address the route named `name` actually listens on.
    pub fn route_addr(&self, name: &str) -> Option<SocketAddr> {
        self.shared
            .routes
            .iter()
            .find(|r| r.route.name == name)
            .map(|r| r.addr)
    }

    /// A cloneable handle to control the link and read its status.
    pub fn handle(&self) -> LinkHandle {
        LinkHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Relays every route and serves the control API (plus `grpc.health.v1`, SERVING) on
    /// `control` until `shutdown` resolves; then stops accepting, resets the relayed
    /// connections and returns once every relay task has ended.
    ///
    /// With `secured` (what the binary always passes) the control port speaks mutual TLS
    /// under the listener's bounds and only operators may call `LinkControl`; without it,
    /// plaintext and anyone: for tests that drive the link in-process.
    pub async fn serve(
        self,
        control: TcpListener,
        secured: Option<Secured>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let Link { shared, listeners } = self;
        let root = shared.root.clone();

        let tracker = TaskTracker::new();
        tracker.spawn(relay::sample_loop(Arc::clone(&shared)));
        tracker.spawn(relay::flap_loop(Arc::clone(&shared)));
        let mut accepts = JoinSet::new();
        for (listener, route) in listeners.into_iter().zip(&shared.routes) {
            accepts.spawn(relay::accept_loop(
                listener,
                Arc::clone(route),
                Arc::clone(&shared),
                tracker.clone(),
            ));
        }

        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<LinkControlServer<ControlService>>()
            .await;
        let service = ControlService {
            handle: LinkHandle {
                shared: Arc::clone(&shared),
            },
            operators_only: secured.is_some(),
        };
        let router = failback_common::server::builder()
            .add_service(health_service)
            .add_service(LinkControlServer::new(service));
        let grpc: std::pin::Pin<
            Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
        > = match secured {
            Some(secured) => Box::pin(failback_common::server::serve(
                router,
                control,
                secured,
                root.clone(),
            )),
            None => Box::pin(router.serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(control).with_nodelay(Some(true)),
                root.clone().cancelled_owned(),
            )),
        };
        let mut grpc = grpc;

        let result = tokio::select! {
            () = shutdown => {
                info!("vpn-link shutting down");
                root.cancel();
                (&mut grpc).await.map_err(ServeError::from)
            }
            r = &mut grpc => r.map_err(ServeError::from),
            Some(joined) = accepts.join_next() => Err(ServeError::Relay(match joined {
                Ok(()) => "returned".to_string(),
                Err(e) => e.to_string(),
            })),
        };

        root.cancel();
        accepts.shutdown().await;
        tracker.close();
        tracker.wait().await;
        result
    }
}

/// Controls a running (or about to run) [`Link`]; cheap to clone.
#[derive(Clone)]
pub struct LinkHandle {
    shared: Arc<Shared>,
}

impl LinkHandle {
    /// Takes the link up, or down: down resets every relayed connection at once (down mode
    /// `reset`) or freezes them until up (`stall`), and resets new ones as soon as they are
    /// accepted, until the link is up again. Also stops flapping.
    pub fn set_up(&self, up: bool) {
        if self.shared.set_up(up, true) {
            info!(up, "link {}", if up { "up" } else { "down" });
        }
    }

    /// Resets every relayed connection once; the link stays as it is.
    pub fn reset_connections(&self) {
        self.shared.reset_connections();
        info!("relayed connections reset");
    }

    /// The current shaping and fault settings.
    pub fn settings(&self) -> Settings {
        self.shared.settings()
    }

    /// Replaces the shaping and fault settings. Switching flapping off leaves the link up;
    /// switching to down mode `reset` while down resets the stalled connections.
    pub fn set_settings(&self, settings: Settings) {
        self.update_settings(|s| {
            *s = settings;
            Ok::<(), std::convert::Infallible>(())
        })
        .unwrap_or_else(|never| match never {});
    }

    /// Changes the settings through `f`, atomically; nothing changes if `f` fails.
    pub fn update_settings<E>(
        &self,
        f: impl FnOnce(&mut Settings) -> Result<(), E>,
    ) -> Result<Settings, E> {
        let new = self.shared.update_settings(f)?;
        info!(settings = ?new, "link settings changed");
        Ok(new)
    }

    /// The current state and counters.
    pub fn status(&self) -> LinkStatus {
        self.shared.status()
    }
}
