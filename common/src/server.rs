//! Serving a tonic router on a listener the caller already bound (tests bind port 0), with
//! mutual TLS, a gRPC health service, and graceful shutdown on a cancellation token.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, ServerTlsConfig, server::Router};

pub use crate::limits::{CONNECTION_WINDOW, MAX_FRAME, MAX_MESSAGE, STREAM_WINDOW};

/// A tonic server builder with the lab's TLS and transport settings.
pub fn builder(tls: ServerTlsConfig) -> Result<Server, tonic::transport::Error> {
    Server::builder().tls_config(tls).map(|b| {
        b.tcp_nodelay(true)
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(5)))
            // Replication streams carry 4 MiB batches: windows large enough that the next
            // batch flows while the receiver makes the previous one durable.
            .initial_stream_window_size(Some(STREAM_WINDOW))
            .initial_connection_window_size(Some(CONNECTION_WINDOW))
            .max_frame_size(Some(MAX_FRAME))
    })
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

/// Serves `router` on `listener` until `shutdown` is cancelled; calls still in flight
/// [`SHUTDOWN_GRACE`] later are cut.
pub async fn serve(
    router: Router,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    // With a listener of our own, the builder's `tcp_nodelay` does not apply: the incoming
    // stream sets it, or small replies (checksums, acks) wait for Nagle and delayed ACKs.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
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
