//! Accepting TLS connections with bounds: a connection cap, a handshake timeout, and idle
//! handshakes evicted before a new connection is refused.
//!
//! Every listener of the lab (the CS's enrollment and API ports, process servers, master
//! targets, hosts) accepts through [`incoming`]: the TLS handshake runs here, not in tonic,
//! so that it has a deadline ([`ConnLimits::handshake_timeout`]) and a budget. At most
//! [`ConnLimits::max_connections`] connections are open at once, of which at most
//! [`ConnLimits::max_handshaking`] may still be in their handshake. A new connection arriving
//! at either bound evicts the oldest connection still in its handshake (an idle or slow
//! client) rather than being refused: a flood of idle connections from one address cannot
//! keep a real component out. Only when every open connection has finished its handshake is
//! the new one refused (closed at once, logged). Established connections carry their client
//! certificate's fingerprint to [`Trust`], which cuts them when the certificate is revoked.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::trust::{Trust, fingerprint_der};

/// Bounds of one listener (`[listener]` in a component's config).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnLimits {
    /// A connection that has not finished its TLS handshake this long after it was accepted
    /// is closed.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Most connections in their handshake at once.
    pub max_handshaking: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            handshake_timeout: Duration::from_secs(10),
            max_connections: 8192,
            max_handshaking: 512,
        }
    }
}

impl ConnLimits {
    /// Checks the bounds, naming the key that is wrong.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.handshake_timeout < Duration::from_millis(100) {
            return Err(("handshake_timeout", "must be at least 100ms".into()));
        }
        if self.max_connections == 0 {
            return Err(("max_connections", "must be at least 1".into()));
        }
        if self.max_handshaking == 0 || self.max_handshaking > self.max_connections {
            return Err((
                "max_handshaking",
                "must be between 1 and max_connections".into(),
            ));
        }
        Ok(())
    }
}

/// What a listener counts; shared by its accept loop and its connections.
#[derive(Default)]
pub struct Counters {
    /// Connections in their handshake, oldest first, each cut by its token when evicted.
    handshaking: Mutex<BTreeMap<u64, CancellationToken>>,
    established: AtomicUsize,
    next_id: AtomicU64,
    refused: AtomicU64,
    evicted: AtomicU64,
    timed_out: AtomicU64,
}

impl Counters {
    pub fn established(&self) -> usize {
        self.established.load(Ordering::Relaxed)
    }
    pub fn handshaking(&self) -> usize {
        lock(&self.handshaking).len()
    }
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
    pub fn timed_out(&self) -> u64 {
        self.timed_out.load(Ordering::Relaxed)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A TCP connection that ends when its certificate is revoked, and counts itself out of the
/// listener's established connections when it closes.
pub struct Guarded {
    stream: TcpStream,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Set once the handshake succeeded: what to count down and unregister on drop.
    done: Option<(Arc<Counters>, Arc<Trust>, Option<u64>)>,
}

impl Guarded {
    fn poll_cut(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        self.cut.as_mut().poll(cx).is_ready().then(|| {
            std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "connection cut: certificate revoked or listener evicted it",
            )
        })
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some((counters, trust, id)) = self.done.take() {
            counters.established.fetch_sub(1, Ordering::Relaxed);
            if let Some(id) = id {
                trust.closed(id);
            }
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.poll_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.poll_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.poll_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl Connected for Guarded {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

/// A stream of established TLS connections for `serve_with_incoming`.
pub type Incoming = tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<Guarded>>>;

/// Accepts on `listener` until `shutdown`, handshaking with `tls` under `limits`.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    trust: Arc<Trust>,
    limits: ConnLimits,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
) -> Incoming {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(tls);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                () = shutdown.cancelled() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, usually: wait a little rather than spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some((id, token)) = admit(&counters, &limits) else {
                let n = counters.refused.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(
                        %peer,
                        refused = n,
                        "connection refused: {} connections open, all past their handshake",
                        counters.established()
                    );
                }
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, trust, counters) = (
                acceptor.clone(),
                tx.clone(),
                trust.clone(),
                counters.clone(),
            );
            tokio::spawn(async move {
                let guarded = Guarded {
                    stream: tcp,
                    cut: Box::pin(token.clone().cancelled_owned()),
                    done: None,
                };
                let handshake = tokio::select! {
                    r = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(guarded)) => r,
                    () = token.cancelled() => {
                        lock(&counters.handshaking).remove(&id);
                        tracing::debug!(%peer, "evicted a connection still in its handshake");
                        return;
                    }
                };
                // Counted as established before it leaves the handshaking set, so the total
                // never dips below what is open.
                let mut tls = match handshake {
                    Ok(Ok(tls)) => {
                        counters.established.fetch_add(1, Ordering::Relaxed);
                        lock(&counters.handshaking).remove(&id);
                        tls
                    }
                    Ok(Err(e)) => {
                        lock(&counters.handshaking).remove(&id);
                        tracing::debug!(%peer, "TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => {
                        lock(&counters.handshaking).remove(&id);
                        counters.timed_out.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, "no TLS handshake within {:?}", limits.handshake_timeout);
                        return;
                    }
                };
                let fingerprint = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| fingerprint_der(c.as_ref()));
                let registered = fingerprint.map(|fp| trust.opened(fp, token.clone()));
                tls.get_mut().0.done = Some((counters, trust, registered));
                let _ = tx.send(Ok(tls)).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Makes room for a new connection: its id and eviction token, or `None` to refuse it.
fn admit(counters: &Counters, limits: &ConnLimits) -> Option<(u64, CancellationToken)> {
    let mut handshaking = lock(&counters.handshaking);
    let full = |h: usize| {
        h + counters.established() >= limits.max_connections || h >= limits.max_handshaking
    };
    if full(handshaking.len()) {
        let (_, oldest) = handshaking.pop_first()?;
        oldest.cancel();
        counters.evicted.fetch_add(1, Ordering::Relaxed);
        if full(handshaking.len()) {
            return None;
        }
    }
    let id = counters.next_id.fetch_add(1, Ordering::Relaxed);
    let token = CancellationToken::new();
    handshaking.insert(id, token.clone());
    Some((id, token))
}

/// Raises this process's open-file limit to its hard limit, so the connection caps, not the
/// descriptor limit, decide when a listener refuses.
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
    }
}
