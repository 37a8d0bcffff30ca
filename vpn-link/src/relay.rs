//! The data path: one accept loop per route, one task per relayed connection, and [`pump`],
//! the single place where bytes cross the link in one direction (shaping and faults hook in
//! there).
//!
//! A connection ends cleanly when both directions have reached EOF (each EOF is passed on
//! as a half-close). It is reset on both sides, never closed with a FIN, when the link goes
//! down, when the link shuts down, or when either side fails.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::state::{Admission, Flow, RouteState, Shared, Tally};

/// Copy buffer per direction.
const BUF_SIZE: usize = 64 * 1024;
/// How long a dial to the far side may take before the accepted connection is dropped.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts on `listener` until the link shuts down, spawning a relay per admitted
/// connection onto `tracker`; while the link is down, accepted connections are reset.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    route: Arc<RouteState>,
    shared: Arc<Shared>,
    tracker: TaskTracker,
) {
    let name = route.route.name.as_str();
    loop {
        let accepted = tokio::select! {
            () = shared.root.cancelled() => return,
            r = listener.accept() => r,
        };
        let (inbound, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(route = name, error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        match shared.admit(&route) {
            Some(admission) => {
                tracker.spawn(relay(inbound, peer, admission));
            }
            None => {
                debug!(route = name, %peer, "link down: connection refused");
                reset(inbound);
            }
        }
    }
}

/// Dials the far side and pumps both directions until both reach EOF or the connection is
/// cancelled or fails.
async fn relay(mut inbound: TcpStream, peer: SocketAddr, admission: Admission) {
    let route = &*admission.route;
    let name = route.route.name.as_str();
    let connect = route.route.connect.as_str();
    let dialed = tokio::select! {
        () = admission.cancel.cancelled() => {
            reset(inbound);
            return;
        }
        r = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(connect)) => r,
    };
    let mut outbound = match dialed {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            warn!(route = name, %peer, connect, error = %e, "dial failed");
            reset(inbound);
            return;
        }
        Err(_) => {
            warn!(route = name, %peer, connect, "dial timed out");
            reset(inbound);
            return;
        }
    };
    for s in [&inbound, &outbound] {
        if let Err(e) = s.set_nodelay(true) {
            debug!(route = name, error = %e, "cannot set TCP_NODELAY");
        }
    }
    debug!(route = name, %peer, connect, "relaying");

    let outcome = {
        let (from_dialer, to_dialer) = inbound.split();
        let (from_server, to_server) = outbound.split();
        let forward = pump(
            from_dialer,
            to_server,
            admission.shared.tally(route, Flow::Forward),
        );
        let backward = pump(
            from_server,
            to_dialer,
            admission.shared.tally(route, Flow::Backward),
        );
        tokio::select! {
            () = admission.cancel.cancelled() => Err(io::Error::other("link down")),
            r = async { tokio::try_join!(forward, backward) } => r,
        }
    };
    match outcome {
        Ok((fwd, back)) => debug!(route = name, %peer, fwd, back, "connection closed"),
        Err(e) => {
            debug!(route = name, %peer, error = %e, "connection reset");
            reset(inbound);
            reset(outbound);
        }
    }
}

/// Moves bytes one way across the link: copies `from` into `to` until EOF, then shuts down
/// `to`'s write half so the EOF reaches the other side. Each chunk is charged to `tally`
/// once written. Returns the bytes moved.
///
/// This is the only place relayed bytes pass through; rate limits, delay and loss belong
/// here.
async fn pump<R, W>(mut from: R, mut to: W, tally: Tally<'_>) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    let mut moved = 0u64;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(moved);
        }
        to.write_all(&buf[..n]).await?;
        tally.add(n);
        moved += n as u64;
    }
}

/// Drops `stream` with an abortive close, so the peer sees a reset rather than a FIN.
fn reset(stream: TcpStream) {
    if let Err(e) = stream.set_zero_linger() {
        debug!(error = %e, "cannot set SO_LINGER=0; closing normally");
    }
    drop(stream);
}
