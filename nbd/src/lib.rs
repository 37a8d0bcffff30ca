//! An NBD server: the network block device protocol (fixed newstyle negotiation, simple
//! replies) over any set of byte-addressed exports. Real guest software (a filesystem through
//! `nbdfuse` + `fuse2fs`, SQLite, fio's `nbd` engine) reaches a lab machine's disks through it.
//!
//! This file owns the public face: what an export is ([`Export`]), how a server finds its
//! exports by name ([`Exports`], [`ExportInfo`], [`Refusal`]), the connection's [`Error`], and
//! the entry points: in the clear, [`serve_connection`] (one accepted stream of any kind) and
//! [`serve_unix`] (an accept loop on a Unix socket); with TLS required and clients authorized
//! by their certificates ([`TlsPolicy`], [`Authorized`]), [`serve_tls_connection`] (one
//! accepted stream) and [`serve_tcp`] (an accept loop on a TCP listener, bounded in
//! connections). The protocol itself lives in [`proto`] (wire format), `negotiate`
//! (handshake), `tls` (the TLS upgrade and the policy) and `transmit` (requests and replies);
//! a connection's course in `connection`, the accept loops in `accept`.
//!
//! What is served, following <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>:
//! - Handshake: fixed newstyle only (a client without `NBD_FLAG_C_FIXED_NEWSTYLE` is
//!   dropped), `NBD_FLAG_NO_ZEROES` honoured. Options `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`,
//!   `GO` (with `NBD_INFO_EXPORT`, `NBD_INFO_BLOCK_SIZE` 1/4096/32 MiB, and `NBD_INFO_NAME` and
//!   `NBD_INFO_DESCRIPTION` when asked); everything else (structured replies, metadata
//!   contexts, extended headers) is `NBD_REP_ERR_UNSUP`. Option data is bounded
//!   ([`MAX_OPTION_DATA`]), so is the option count ([`MAX_OPTIONS`], per connection) and the
//!   negotiation's duration ([`NEGOTIATION_TIMEOUT`], from connect, TLS handshake included).
//! - TLS: on a Unix socket `STARTTLS` is refused by policy. On TCP, TLS is required (the
//!   spec's "FORCEDTLS" mode, libnbd's `nbds://`): before it, `STARTTLS` is acknowledged and
//!   the TLS handshake (TLS 1.2 or 1.3, client certificate required) follows on the same
//!   stream, `ABORT` is acknowledged, `EXPORT_NAME` closes the connection and every other
//!   option is `NBD_REP_ERR_TLS_REQD`. After it the options go on over TLS (the greeting is not
//!   repeated; a second `STARTTLS` is `NBD_REP_ERR_INVALID`) for a client the policy
//!   authorizes; for one it doesn't, every option but `ABORT` is `NBD_REP_ERR_POLICY` carrying
//!   the policy's message (`EXPORT_NAME` closes).
//! - Transmission: flags `HAS_FLAGS`, `SEND_FLUSH`, `SEND_FUA`, `SEND_WRITE_ZEROES`,
//!   `CAN_MULTI_CONN`. READ, WRITE, FLUSH, WRITE_ZEROES (as writes of zeroes) and CACHE (a
//!   no-op); TRIM, BLOCK_STATUS and unknown commands are `NBD_EINVAL`. Requests run
//!   concurrently, bounded by [`MAX_IN_FLIGHT_REQUESTS`] and [`MAX_IN_FLIGHT_BYTES`], and
//!   replies may come out of order. Server shutdown, the export's token, and on TLS the
//!   client's [`Authorized::token`] stop a connection: `NBD_ESHUTDOWN` for what is in flight,
//!   then close.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

mod accept;
mod connection;
mod io_util;
mod negotiate;
pub mod proto;
mod tls;
mod transmit;

pub use negotiate::{MAX_OPTION_DATA, MAX_OPTIONS};
pub use tls::{Authorized, TlsPolicy};
pub use transmit::{MAX_IN_FLIGHT_BYTES, MAX_IN_FLIGHT_REQUESTS, SHUTDOWN_LINGER, ZERO_CHUNK};

/// How long a client may take from connecting to choosing an export (or leaving).
pub const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(30);

/// One disk as served.
///
/// The server checks every request against [`Export::size`] (as read when the client chose
/// the export) before calling [`Export::read`] or [`Export::write`], so an implementation sees
/// only in-bounds, non-empty ranges of at most [`proto::MAX_PAYLOAD`] bytes. Calls for one
/// connection can overlap (clients pipeline requests), and so can calls from several
/// connections to the same export.
pub trait Export: Send + Sync + 'static {
    /// The export's size in bytes.
    fn size(&self) -> u64;

    /// Reads exactly `len` bytes at `offset` (`offset + len <= size` is checked by the server
    /// before calling). Returning a different number of bytes is answered `NBD_EIO`.
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = std::io::Result<bytes::Bytes>> + Send;

    /// Writes `data` at `offset` (in bounds, checked by the server); with `fua` the data must
    /// be durable before returning.
    fn write(
        &self,
        offset: u64,
        data: bytes::Bytes,
        fua: bool,
    ) -> impl Future<Output = std::io::Result<()>> + Send;

    /// Makes every completed write durable, whichever connection made it: the server
    /// advertises `NBD_FLAG_CAN_MULTI_CONN`.
    fn flush(&self) -> impl Future<Output = std::io::Result<()>> + Send;
}

/// One export as listed by `NBD_OPT_LIST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The name a client opens it by.
    pub name: String,
    /// One line for humans (may be empty); also sent as `NBD_INFO_DESCRIPTION`.
    pub description: String,
}

/// Why an export can't be opened. The text is sent to the client as the message of an
/// `NBD_REP_ERR_UNKNOWN` option reply (cut to the spec's 4096 bytes), or, for a client that
/// used `NBD_OPT_EXPORT_NAME` and so can't be sent an error, only logged before the server
/// closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No export by that name.
    #[error("{0}")]
    Unknown(String),
    /// The export exists but can't be served now (machine powered off, failed over).
    #[error("{0}")]
    Unavailable(String),
}

impl Refusal {
    /// The text sent to the client.
    pub fn message(&self) -> &str {
        match self {
            Self::Unknown(text) | Self::Unavailable(text) => text,
        }
    }
}

/// The exports a server offers, resolved by name at negotiation time.
pub trait Exports: Send + Sync + 'static {
    /// The export type served.
    type Export: Export;

    /// Names (and a one-line description) for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<ExportInfo>;

    /// Opens export `name` for a new connection (`NBD_OPT_INFO`, `NBD_OPT_GO` or
    /// `NBD_OPT_EXPORT_NAME`; the empty name is the spec's "default export").
    ///
    /// `Ok` gives the export and a token that is cancelled when the export stops being
    /// servable (machine powered off / failed over): the server then answers every in-flight
    /// and later request with `NBD_ESHUTDOWN` and closes the connection (after at most
    /// [`SHUTDOWN_LINGER`]). A token already cancelled is refused like
    /// [`Refusal::Unavailable`]. `Err` is sent as an option error reply carrying the
    /// refusal's text.
    fn open(&self, name: &str) -> Result<(Arc<Self::Export>, CancellationToken), Refusal>;
}

/// Why a connection ended other than by the client's choice. A client that aborts the
/// negotiation, sends `NBD_CMD_DISC` or closes the stream between messages, and a connection
/// closed because its export or the server stopped, end `Ok`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing the stream failed (including an end of stream inside a message).
    #[error("NBD connection I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The client's flags lack `NBD_FLAG_C_FIXED_NEWSTYLE` or carry unknown bits.
    #[error("NBD client flags {0:#x} are not fixed newstyle or carry unknown bits")]
    ClientFlags(u32),
    /// An option header did not start with `IHAVEOPT`.
    #[error("NBD option header has magic {0:#018x}, not IHAVEOPT")]
    OptionMagic(u64),
    /// The client did not choose an export within [`NEGOTIATION_TIMEOUT`].
    #[error("NBD negotiation did not finish within {0:?}")]
    NegotiationTimeout(Duration),
    /// The client sent more than [`MAX_OPTIONS`] options.
    #[error("NBD client sent more than {0} options")]
    TooManyOptions(usize),
    /// `NBD_OPT_EXPORT_NAME` before TLS on a connection that requires it (the option can't be
    /// answered with an error, so the connection is closed).
    #[error("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS on a connection that requires TLS")]
    TlsRequired,
    /// The client sent bytes after `NBD_OPT_STARTTLS` before the server's acknowledgement
    /// (they would be taken for the start of its TLS handshake).
    #[error("NBD client sent {0} bytes after NBD_OPT_STARTTLS ahead of the TLS handshake")]
    DataBeforeTls(usize),
    /// The TLS handshake failed (e.g. no client certificate, or one the configuration's
    /// verifier rejects).
    #[error("NBD TLS handshake failed: {0}")]
    TlsHandshake(std::io::Error),
    /// `NBD_OPT_EXPORT_NAME` from a client whose certificate the [`TlsPolicy`] did not
    /// authorize (the option can't be answered with an error, so the connection is closed).
    #[error("NBD_OPT_EXPORT_NAME from a client that is not authorized: {0}")]
    NotAuthorized(String),
    /// `NBD_OPT_EXPORT_NAME` with a name longer than [`MAX_OPTION_DATA`].
    #[error("NBD_OPT_EXPORT_NAME with a {0}-byte name")]
    ExportNameTooLong(u32),
    /// `NBD_OPT_EXPORT_NAME` with a name that is not UTF-8.
    #[error("NBD_OPT_EXPORT_NAME with a name that is not UTF-8")]
    ExportNameNotUtf8,
    /// `NBD_OPT_EXPORT_NAME` for an export that can't be opened (this option can't be
    /// answered with an error, so the connection is closed).
    #[error("NBD_OPT_EXPORT_NAME {name:?} refused: {refusal}")]
    Refused {
        /// The name asked for.
        name: String,
        /// Why it was refused.
        refusal: Refusal,
    },
    /// A request header did not start with `NBD_REQUEST_MAGIC`.
    #[error("NBD request header has magic {0:#010x}")]
    RequestMagic(u32),
    /// A WRITE longer than [`proto::MAX_PAYLOAD`]: answered `NBD_EINVAL`, then the
    /// connection is closed, since its payload can't be skipped safely.
    #[error("NBD write of {0} bytes exceeds the maximum payload")]
    WriteTooLarge(u32),
}

/// Serves one already-accepted connection in the clear (a Unix socket): the handshake, then
/// transmission on the chosen export, until the client leaves, the export's token or
/// `shutdown` is cancelled, or the client breaks the protocol.
pub async fn serve_connection<S, E>(
    stream: S,
    exports: Arc<E>,
    shutdown: CancellationToken,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    E: Exports,
{
    connection::serve_plain(stream, &*exports, &shutdown).await
}

/// Serves one accepted stream (TCP) on which TLS is required: the greeting, `STARTTLS`, the
/// TLS handshake and the client's authorization by `tls`, the rest of the handshake over TLS,
/// then transmission over TLS, until the client leaves, the export's token, the client's
/// [`Authorized::token`] or `shutdown` is cancelled, or the client breaks the protocol.
pub async fn serve_tls_connection<S, E>(
    stream: S,
    exports: Arc<E>,
    tls: Arc<TlsPolicy>,
    shutdown: CancellationToken,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    E: Exports,
{
    connection::serve_tls(stream, &*exports, &tls, &shutdown).await
}

/// Accepts connections on a Unix listener, serving each in its own task, until `shutdown`
/// is cancelled; then stops accepting and returns once every connection has closed (each
/// within [`SHUTDOWN_LINGER`] of the cancellation, or sooner).
pub async fn serve_unix<E: Exports>(
    listener: tokio::net::UnixListener,
    exports: Arc<E>,
    shutdown: CancellationToken,
) {
    let stop = shutdown.clone();
    accept::accept_loop(listener, None, shutdown, move |stream| {
        serve_connection(stream, exports.clone(), stop.clone())
    })
    .await;
}

/// Accepts connections on a TCP listener, TLS required on every one
/// ([`serve_tls_connection`]), each served in its own task, at most `max_connections` open at
/// once (one more is closed at once, and logged); after `shutdown` is cancelled, stops
/// accepting and returns once every connection has closed.
pub async fn serve_tcp<E: Exports>(
    listener: tokio::net::TcpListener,
    exports: Arc<E>,
    tls: Arc<TlsPolicy>,
    max_connections: usize,
    shutdown: CancellationToken,
) {
    let stop = shutdown.clone();
    accept::accept_loop(listener, Some(max_connections), shutdown, move |stream| {
        serve_tls_connection(stream, exports.clone(), tls.clone(), stop.clone())
    })
    .await;
}
