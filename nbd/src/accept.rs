//! The accept loops: taking connections off a listener (Unix or TCP), each served in its own
//! task, until shutdown; backing off after a failed accept; bounding how many connections are
//! open at once (one more is closed at once); and, after shutdown, waiting for every
//! connection to close.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Error;

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A listener the loop accepts from.
pub(crate) trait Listener {
    /// An accepted connection.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// The next connection, and who is at the other end (for logs).
    fn accept(&self) -> impl Future<Output = std::io::Result<(Self::Stream, String)>> + Send;
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;

    async fn accept(&self) -> std::io::Result<(Self::Stream, String)> {
        let (stream, _) = tokio::net::UnixListener::accept(self).await?;
        Ok((stream, "a Unix socket peer".to_owned()))
    }
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;

    async fn accept(&self) -> std::io::Result<(Self::Stream, String)> {
        let (stream, peer) = tokio::net::TcpListener::accept(self).await?;
        // Replies are written whole, header and data together: don't hold back small ones.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, %peer, "TCP_NODELAY not set");
        }
        Ok((stream, peer.to_string()))
    }
}

/// Accepts connections on `listener`, serving each with `serve` in its own task, at most
/// `max_connections` at once (if bounded), until `shutdown` is cancelled; then stops accepting
/// and returns once every connection has closed.
pub(crate) async fn accept_loop<L, F, Fut>(
    listener: L,
    max_connections: Option<usize>,
    shutdown: CancellationToken,
    serve: F,
) where
    L: Listener,
    F: Fn(L::Stream) -> Fut,
    Fut: Future<Output = Result<(), Error>> + Send + 'static,
{
    let slots = max_connections.map(|max| (max, Arc::new(Semaphore::new(max))));
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "NBD accept failed");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
                continue;
            }
        };
        let slot = match &slots {
            None => None,
            Some((max, slots)) => match slots.clone().try_acquire_owned() {
                Ok(slot) => Some(slot),
                Err(_) => {
                    tracing::warn!(%peer, max_connections = max, "NBD connection refused: too many open");
                    drop(stream);
                    continue;
                }
            },
        };
        let connection = serve(stream);
        connections.spawn(async move {
            if let Err(error) = connection.await {
                tracing::info!(%error, %peer, "NBD connection ended");
            }
            drop(slot);
        });
    }
    connections.close();
    connections.wait().await;
}
