//! Serving a tonic router on a listener the caller already bound (tests bind port 0), over
//! TLS accepted under bounds ([`crate::listener`]), with a gRPC health service, and graceful
//! shutdown on a cancellation token.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, server::Router};

pub use crate::limits::{CONNECTION_WINDOW, MAX_FRAME, MAX_MESSAGE, STREAM_WINDOW};
use crate::listener::{ConnLimits, Counters};
use crate::trust::Trust;

/// A tonic server builder with the lab's transport settings (TLS is done by the listener).
pub fn builder() -> Server {
    Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        // Per connection: a peer can't open streams without bound.
        .max_concurrent_streams(Some(crate::limits::MAX_STREAMS_PER_CONNECTION))
        // Replication streams carry 4 MiB batches: windows large enough that the next
        // batch flows while the receiver makes the previous one durable.
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .max_frame_size(Some(MAX_FRAME))
}

/// How a listener secures and bounds its connections.
#[derive(Clone)]
pub struct Secured {
    pub tls: Arc<rustls::ServerConfig>,
    /// Revocations the client verifier consults; also cuts revoked connections.
    pub trust: Arc<Trust>,
    pub limits: ConnLimits,
    /// What the listener counts (open, in handshake, refused, evicted, timed out).
    pub counters: Arc<Counters>,
}

impl Secured {
    pub fn new(tls: Arc<rustls::ServerConfig>, trust: Arc<Trust>, limits: ConnLimits) -> Self {
        Secured {
            tls,
            trust,
            limits,
            counters: Arc::default(),
        }
    }
}

/// The standard gRPC health service, reporting SERVING for the whole server.
pub fn health_service()
-> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, service) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
    });
    service
}

/// How long calls in flight may go on after shutdown is asked for. Streams (data, control,
/// watches) would otherwise hold a stopping server up for as long as their peers keep them.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Serves `router` on `listener` over `secured` until `shutdown` is cancelled; calls still
/// in flight [`SHUTDOWN_GRACE`] later are cut.
pub async fn serve(
    router: Router,
    listener: TcpListener,
    secured: Secured,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let incoming = crate::listener::incoming(
        listener,
        secured.tls,
        secured.trust,
        secured.limits,
        secured.counters,
        shutdown.clone(),
    );
    let graceful =
        router.serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    tokio::select! {
        r = graceful => r,
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("calls still in flight {SHUTDOWN_GRACE:?} after shutdown: cutting them");
            Ok(())
        }
    }
}

/// Binds `address`, with a message naming what could not be bound.
pub async fn bind(address: &str, what: &str) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {address} ({what}): {e}"))?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Cancels `token` on SIGINT or SIGTERM.
pub async fn shutdown_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    token.cancel();
}

/// The whole life of a component binary after argument parsing: tracing, crypto provider,
/// config (exit 2 naming the file and key when it is bad), bind `listen` (from the config),
/// run until SIGINT/SIGTERM, exit 1 with the error if the component fails.
pub async fn component_main<C, Fut>(
    binary: &str,
    config: Result<C, crate::config::ConfigError>,
    listen: impl FnOnce(&C) -> String,
    run: impl FnOnce(C, TcpListener, CancellationToken) -> Fut,
) where
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    crate::telemetry::init(binary);
    crate::tls::install_crypto_provider();
    crate::listener::raise_fd_limit();
    let config = config.unwrap_or_else(|e| {
        eprintln!("{binary}: {e}");
        std::process::exit(2)
    });
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_on_signal(shutdown.clone()));
    let address = listen(&config);
    let result = async {
        let (listener, _) = bind(&address, "listen").await?;
        run(config, listener, shutdown).await
    };
    if let Err(e) = result.await {
        eprintln!("{binary}: {e:#}");
        tracing::error!("{e:#}");
        std::process::exit(1);
    }
}
