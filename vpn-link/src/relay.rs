//! The data path: one accept loop per route, one task per relayed connection, and [`pump`],
//! the single place where bytes cross the link in one direction (shaping and faults hook in
//! there).
//!
//! A connection ends cleanly when both directions have reached EOF (each EOF is passed on
//! as a half-close). It is reset on both sides, never closed with a FIN, when the link goes
//! down in down mode `reset`, when the connections are reset, when the link shuts down, or
//! when either side fails. In down mode `stall` a down link keeps its connections but moves
//! no bytes until up.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::shaping::{Delay, chunk_len};
use crate::state::{Admission, Flow, RouteState, SAMPLE_EVERY, Shared, Tally};

/// The largest chunk.
const BUF_SIZE: usize = 64 * 1024;
/// Receive buffer per direction that chunks are split off (more than `IN_FLIGHT`), once the
/// direction has shown it carries bulk data ([`BULK_RATE`]).
const RECV_BUF: usize = 4 * 1024 * 1024;
/// Receive buffer a direction starts with. A lab of 200 replicating machines keeps 200
/// connections through the link, each carrying a tenth of a MB/s: 4 MiB per direction each
/// was 1.6 GB of address space and about 800 MiB resident for a few MB/s in all.
const SMALL_RECV_BUF: usize = 2 * BUF_SIZE;
/// A direction that reads this much within [`RATE_WINDOW`] gets the big buffer for the rest
/// of its life (warm pages reused at hundreds of MB/s).
const BULK_RATE: usize = 4 * 1024 * 1024;
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// Bytes in flight between the reading and the writing half of one pump (the delay line;
/// like a TCP window, it bounds one connection's throughput to this per latency).
const IN_FLIGHT: usize = 1024 * 1024;
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
        let shared = &*admission.shared;
        let forward = pump(
            from_dialer,
            to_server,
            shared,
            shared.tally(route, Flow::Forward),
        );
        let backward = pump(
            from_server,
            to_dialer,
            shared,
            shared.tally(route, Flow::Backward),
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
/// This is the only place relayed bytes pass through, and where shaping and faults apply,
/// with the settings current when each chunk is read:
/// - blackhole: a chunk sent from the blackholed site is dropped (counted as dropped);
/// - bandwidth: the chunk waits for its bytes from the direction's shared token bucket
///   (chunks are ~50 ms worth of the cap so connections interleave);
/// - latency/jitter: the chunk is stamped due at now + latency ± jitter, never before the
///   previous chunk's due time (FIFO), and queued to the writing half, which writes it when
///   due;
/// - stall: while the link is down (down mode `stall`) neither half moves a byte.
async fn pump<R, W>(mut from: R, mut to: W, shared: &Shared, tally: Tally<'_>) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let site = tally.site;
    let (queue, mut due_chunks) = mpsc::unbounded_channel::<(Bytes, Instant)>();
    let in_flight = &Semaphore::new(IN_FLIGHT);
    let reader = async move {
        let mut settings = shared.subscribe_settings();
        let mut up = shared.subscribe_up();
        let mut delay = Delay::new();
        // Chunks are split off one buffer; once the writing half has dropped them, `reserve`
        // takes the same memory back, so the relay keeps writing into warm pages instead of
        // allocating (and faulting in) a fresh buffer per chunk.
        // It starts small and grows once the direction carries bulk data.
        let mut buf = BytesMut::with_capacity(SMALL_RECV_BUF);
        let mut bulk = false;
        let (mut window_start, mut window_bytes) = (Instant::now(), 0usize);
        let mut last_due = Instant::now();
        loop {
            wait_up(&mut up).await;
            let len = chunk_len(settings.borrow().bandwidth, BUF_SIZE);
            if !bulk && window_bytes >= BULK_RATE {
                // `buf` is empty here (everything read was split off or dropped); chunks in
                // flight keep the small buffer alive until written.
                buf = BytesMut::with_capacity(RECV_BUF);
                bulk = true;
            }
            buf.reserve(len);
            let n = (&mut from).take(len as u64).read_buf(&mut buf).await?;
            if n == 0 {
                return io::Result::Ok(()); // dropping `queue` tells the writing half
            }
            if window_start.elapsed() > RATE_WINDOW {
                (window_start, window_bytes) = (Instant::now(), 0);
            }
            window_bytes += n;
            let s = *settings.borrow_and_update();
            if s.blackhole == Some(site) {
                shared.dropped(site, n);
                buf.clear();
                continue;
            }
            let wait = shared.reserve(site, n, s.bandwidth);
            if !wait.is_zero() {
                // A change of settings (e.g. the cap lifted) ends the wait early.
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = settings.changed() => {}
                }
            }
            wait_up(&mut up).await;
            // n <= BUF_SIZE <= IN_FLIGHT, and the semaphore is never closed.
            if let Ok(permits) = in_flight.acquire_many(n as u32).await {
                permits.forget();
            }
            let due = (Instant::now() + delay.sample(&s)).max(last_due);
            last_due = due;
            if queue.send((buf.split().freeze(), due)).is_err() {
                return Ok(()); // the writing half failed; its error ends the pump
            }
        }
    };
    let writer = async {
        let mut up = shared.subscribe_up();
        let mut moved = 0u64;
        while let Some((chunk, due)) = due_chunks.recv().await {
            if due > Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            wait_up(&mut up).await;
            to.write_all(&chunk).await?;
            in_flight.add_permits(chunk.len());
            tally.add(chunk.len());
            moved += chunk.len() as u64;
        }
        wait_up(&mut up).await;
        to.shutdown().await?;
        io::Result::Ok(moved)
    };
    let ((), moved) = tokio::try_join!(reader, writer)?;
    Ok(moved)
}

/// Returns once the link is up (at once unless it is down in down mode `stall`: in `reset`
/// the connection is cancelled instead).
async fn wait_up(up: &mut watch::Receiver<bool>) {
    // The sender lives as long as the link state the pump borrows, so this cannot fail.
    let _ = up.wait_for(|up| *up).await;
}

/// Records the byte counters for the rates every [`SAMPLE_EVERY`], until shutdown.
pub(crate) async fn sample_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.root.cancelled() => return,
            _ = tick.tick() => shared.sample(),
        }
    }
}

/// Takes the link down and up every flap period while one is set, until shutdown.
pub(crate) async fn flap_loop(shared: Arc<Shared>) {
    let mut settings = shared.subscribe_settings();
    loop {
        let period = settings.borrow_and_update().flap;
        tokio::select! {
            () = shared.root.cancelled() => return,
            _ = settings.changed() => {}
            () = async {
                match period {
                    Some(p) => tokio::time::sleep(p).await,
                    None => std::future::pending().await,
                }
            } => {
                let up = !shared.is_up();
                if shared.set_up(up, false) {
                    debug!(up, "link flapped {}", if up { "up" } else { "down" });
                }
            }
        }
    }
}

/// Drops `stream` with an abortive close, so the peer sees a reset rather than a FIN.
fn reset(stream: TcpStream) {
    if let Err(e) = stream.set_zero_linger() {
        debug!(error = %e, "cannot set SO_LINGER=0; closing normally");
    }
    drop(stream);
}
