//! Serving a tonic router on a listener the caller already bound (tests bind port 0), with
//! mutual TLS, a gRPC health service, and graceful shutdown on a cancellation token.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, ServerTlsConfig, server::Router};

/// A tonic server builder with the lab's TLS and transport settings.
pub fn builder(tls: ServerTlsConfig) -> Result<Server, tonic::transport::Error> {
    Server::builder().tls_config(tls).map(|b| {
        b.tcp_nodelay(true)
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(5)))
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

/// Serves `router` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    router: Router,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    router
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned())
        .await
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
