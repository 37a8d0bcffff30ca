//! The transmission phase: reading requests, checking each against the protocol's and this
//! server's bounds, running the valid ones concurrently against the export (a task per
//! request, bounded in count and in bytes held), and sending simple replies, possibly out of
//! order, through a single writer task so that no two replies interleave. It also owns the
//! end of a connection: `NBD_CMD_DISC` (finish what is in flight, then close), a protocol
//! violation, and a stop (server shutdown or the export's token): `NBD_ESHUTDOWN` for
//! everything in flight and everything that arrives during a short linger, then close.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::proto::{self, Command, Errno, MAX_PAYLOAD, RequestHeader};
use crate::{Error, Export, io_util};

/// The most requests of one connection in flight at once (read, running, or reply queued);
/// the server stops reading requests until one completes.
pub const MAX_IN_FLIGHT_REQUESTS: u32 = 128;
/// The most READ/WRITE payload bytes one connection holds at once (write payloads read but not
/// yet written, read data not yet sent). At least [`MAX_PAYLOAD`], so any valid request fits.
pub const MAX_IN_FLIGHT_BYTES: u32 = 4 * MAX_PAYLOAD;
/// After a stop, how long the connection keeps answering requests with `NBD_ESHUTDOWN` (so
/// the client learns why, and sends `NBD_CMD_DISC` as the spec requires of it) before the
/// server closes it.
pub const SHUTDOWN_LINGER: Duration = Duration::from_secs(2);
/// `NBD_CMD_WRITE_ZEROES` is carried out as writes of at most this many zero bytes.
pub const ZERO_CHUNK: usize = 1024 * 1024;

/// Shared source of the zero chunks: never allocated per request.
static ZEROES: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];
/// Capacity of the reply writer's buffer (small replies are batched into one flush).
const WRITE_BUFFER: usize = 256 * 1024;

/// Why a connection must wind down: the server is shutting down, the export stopped being
/// servable, or the connection itself failed (its reply writer could not write).
#[derive(Clone)]
pub(crate) struct Stop {
    server: CancellationToken,
    export: CancellationToken,
    connection: CancellationToken,
}

impl Stop {
    pub(crate) fn new(server: CancellationToken, export: CancellationToken) -> Self {
        Self {
            server,
            export,
            connection: CancellationToken::new(),
        }
    }

    fn is_set(&self) -> bool {
        self.server.is_cancelled() || self.export.is_cancelled() || self.connection.is_cancelled()
    }

    async fn wait(&self) {
        tokio::select! {
            () = self.server.cancelled() => {}
            () = self.export.cancelled() => {}
            () = self.connection.cancelled() => {}
        }
    }
}

/// How the request loop ended without a protocol error.
#[derive(Debug)]
enum End {
    /// `NBD_CMD_DISC`.
    Disc,
    /// The client closed the stream between requests.
    Eof,
    /// Stopped, and the linger ran out.
    Stopped,
}

/// Serves requests on `rd`/`wr` until the session ends.
pub(crate) async fn transmit<R, W, X>(
    mut rd: R,
    wr: W,
    export: Arc<X>,
    size: u64,
    name: &str,
    stop: Stop,
) -> Result<(), Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
    X: Export,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            if let Err(error) = write_replies(wr, rx).await {
                tracing::debug!(%error, "NBD reply writer failed");
                stop.connection.cancel();
            }
        })
    };
    let connection = Connection {
        export,
        size,
        stop: stop.clone(),
        tx,
        tracker: TaskTracker::new(),
        requests: Arc::new(Semaphore::new(MAX_IN_FLIGHT_REQUESTS as usize)),
        bytes: Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES as usize)),
    };

    let linger = async {
        stop.wait().await;
        tokio::time::sleep(SHUTDOWN_LINGER).await;
    };
    let outcome = tokio::select! {
        outcome = connection.serve_requests(&mut rd) => outcome,
        () = linger => Ok(End::Stopped),
    };

    // Whatever ended the loop, what is in flight is finished (or, after a stop, answered
    // NBD_ESHUTDOWN at once) and its replies written before the stream is closed.
    connection.tracker.close();
    connection.tracker.wait().await;
    drop(connection);
    // A client that doesn't read its replies could block the writer for ever; once stopped,
    // it gets one more linger to drain them.
    let mut writer = writer;
    let drain = async {
        stop.wait().await;
        tokio::time::sleep(SHUTDOWN_LINGER).await;
    };
    tokio::select! {
        joined = &mut writer => if joined.is_err() {
            tracing::warn!(export = name, "NBD reply writer panicked");
        },
        () = drain => {
            tracing::debug!(export = name, "NBD client not reading its replies; dropped");
            writer.abort();
        }
    }

    match &outcome {
        Ok(end) => tracing::debug!(export = name, ?end, "NBD connection closed"),
        Err(error) => tracing::info!(export = name, %error, "NBD connection closed"),
    }
    outcome.map(|_| ())
}

/// One connection's transmission state, shared by the request loop.
struct Connection<X> {
    export: Arc<X>,
    size: u64,
    stop: Stop,
    tx: mpsc::UnboundedSender<Reply>,
    tracker: TaskTracker,
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

impl<X: Export> Connection<X> {
    async fn serve_requests<R: AsyncRead + Unpin>(&self, rd: &mut R) -> Result<End, Error> {
        loop {
            let mut raw = [0u8; proto::REQUEST_HEADER_LEN];
            if !io_util::read_message(rd, &mut raw).await? {
                return Ok(End::Eof);
            }
            let request = RequestHeader::decode(&raw).map_err(Error::RequestMagic)?;
            tracing::trace!(?request, "NBD request");
            if request.command == Command::Disc {
                return Ok(End::Disc);
            }
            // The semaphores are never closed, so acquiring cannot fail.
            let Ok(slot) = self.requests.clone().acquire_owned().await else {
                return Ok(End::Stopped);
            };
            let pending = Pending::new(request.cookie, self.tx.clone(), slot);
            let fua = request.flags & proto::cmd_flags::FUA != 0;

            match request.command {
                Command::Write => {
                    if request.length > MAX_PAYLOAD {
                        // The payload can't be trusted (nor skipped at a bounded cost).
                        pending.finish(Err(Errno::Inval));
                        return Err(Error::WriteTooLarge(request.length));
                    }
                    if let Some(errno) = self.refuse(&request, Errno::NoSpc) {
                        io_util::discard(rd, u64::from(request.length)).await?;
                        pending.finish(Err(errno));
                        continue;
                    }
                    let Some(pending) = self.reserve_bytes(pending, request.length).await else {
                        return Ok(End::Stopped);
                    };
                    let data = read_payload(rd, request.length).await?;
                    let op = Op::Write {
                        offset: request.offset,
                        data,
                        fua,
                    };
                    self.spawn(op, pending);
                }
                Command::Read => {
                    if let Some(errno) = self.refuse(&request, Errno::Inval) {
                        pending.finish(Err(errno));
                        continue;
                    }
                    let Some(pending) = self.reserve_bytes(pending, request.length).await else {
                        return Ok(End::Stopped);
                    };
                    let op = Op::Read {
                        offset: request.offset,
                        len: request.length,
                    };
                    self.spawn(op, pending);
                }
                Command::WriteZeroes => {
                    if let Some(errno) = self.refuse(&request, Errno::NoSpc) {
                        pending.finish(Err(errno));
                        continue;
                    }
                    let op = Op::WriteZeroes {
                        offset: request.offset,
                        len: request.length,
                        fua,
                    };
                    self.spawn(op, pending);
                }
                Command::Flush => match self.refuse(&request, Errno::Inval) {
                    Some(errno) => pending.finish(Err(errno)),
                    None => self.spawn(Op::Flush, pending),
                },
                Command::Cache => {
                    // Not advertised, but understood: a bounds-checked no-op.
                    let result = self.refuse(&request, Errno::Inval).map_or(Ok(None), Err);
                    pending.finish(result);
                }
                Command::Trim | Command::BlockStatus | Command::Unknown(_) | Command::Disc => {
                    let errno = if self.stop.is_set() {
                        Errno::Shutdown
                    } else {
                        Errno::Inval
                    };
                    pending.finish(Err(errno));
                }
            }
        }
    }

    /// The error a request is refused with before any I/O, if any: `NBD_ESHUTDOWN` once
    /// stopped; `NBD_EINVAL` for a flag not valid on the command, and for a zero length or a
    /// READ/WRITE longer than the maximum payload; `past_end` for a range past the export's
    /// end (or overflowing).
    fn refuse(&self, request: &RequestHeader, past_end: Errno) -> Option<Errno> {
        if self.stop.is_set() {
            return Some(Errno::Shutdown);
        }
        if request.flags & !request.command.allowed_flags() != 0 {
            return Some(Errno::Inval);
        }
        let ranged = matches!(
            request.command,
            Command::Read | Command::Write | Command::WriteZeroes | Command::Cache
        );
        if !ranged {
            return None;
        }
        let has_payload = matches!(request.command, Command::Read | Command::Write);
        if has_payload && (request.length == 0 || request.length > MAX_PAYLOAD) {
            return Some(Errno::Inval);
        }
        if request.command == Command::WriteZeroes && request.length == 0 {
            return Some(Errno::Inval);
        }
        let end = request.offset.checked_add(u64::from(request.length));
        if end.is_none_or(|end| end > self.size) {
            return Some(past_end);
        }
        None
    }

    /// Waits until `len` more payload bytes may be held by this connection.
    async fn reserve_bytes(&self, mut pending: Pending, len: u32) -> Option<Pending> {
        let permit = self.bytes.clone().acquire_many_owned(len).await.ok()?;
        if let Some(permits) = pending.permits.as_mut() {
            permits.bytes = Some(permit);
        }
        Some(pending)
    }

    fn spawn(&self, op: Op, pending: Pending) {
        self.tracker
            .spawn(handle(self.export.clone(), self.stop.clone(), op, pending));
    }
}

/// What a request asks of the export, checked and ready to run.
enum Op {
    Read { offset: u64, len: u32 },
    Write { offset: u64, data: Bytes, fua: bool },
    Flush,
    WriteZeroes { offset: u64, len: u32, fua: bool },
}

/// Runs one request and queues its reply: `NBD_ESHUTDOWN` without waiting for the export if
/// the connection is (or becomes) stopped.
async fn handle<X: Export>(export: Arc<X>, stop: Stop, op: Op, pending: Pending) {
    let result = tokio::select! {
        biased;
        () = stop.wait() => Err(Errno::Shutdown),
        result = run(&*export, op) => result,
    };
    pending.finish(result);
}

async fn run<X: Export>(export: &X, op: Op) -> Result<Option<Bytes>, Errno> {
    match op {
        Op::Read { offset, len } => {
            let data = export.read(offset, len).await.map_err(export_error)?;
            if data.len() != len as usize {
                tracing::warn!(
                    offset,
                    len,
                    got = data.len(),
                    "export returned a short read"
                );
                return Err(Errno::Io);
            }
            Ok(Some(data))
        }
        Op::Write { offset, data, fua } => {
            export
                .write(offset, data, fua)
                .await
                .map_err(export_error)?;
            Ok(None)
        }
        Op::Flush => {
            export.flush().await.map_err(export_error)?;
            Ok(None)
        }
        Op::WriteZeroes { offset, len, fua } => {
            let len = u64::from(len);
            let mut done = 0u64;
            while done < len {
                let chunk = (len - done).min(ZERO_CHUNK as u64) as usize;
                let zeroes = Bytes::from_static(&ZEROES[..chunk]);
                export
                    .write(offset + done, zeroes, false)
                    .await
                    .map_err(export_error)?;
                done += chunk as u64;
            }
            // FUA covers every chunk: one flush makes them all durable.
            if fua {
                export.flush().await.map_err(export_error)?;
            }
            Ok(None)
        }
    }
}

fn export_error(error: std::io::Error) -> Errno {
    tracing::warn!(%error, "NBD export I/O failed");
    Errno::from_io(&error)
}

/// Reads a WRITE payload of `len` bytes (already checked against [`MAX_PAYLOAD`]).
async fn read_payload<R: AsyncRead + Unpin>(rd: &mut R, len: u32) -> std::io::Result<Bytes> {
    let len = len as usize;
    let mut buf = BytesMut::with_capacity(len);
    let mut limited = (&mut *rd).take(len as u64);
    while buf.len() < len {
        if limited.read_buf(&mut buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf.freeze())
}

/// The in-flight budget one request holds until its reply is written.
struct Permits {
    _request: OwnedSemaphorePermit,
    bytes: Option<OwnedSemaphorePermit>,
}

/// A reply queued for the writer task.
struct Reply {
    cookie: u64,
    error: u32,
    data: Option<Bytes>,
    _permits: Permits,
}

/// A request that owes the client a reply. Dropped without one (its task panicked), it sends
/// `NBD_EIO`, so the client is never left waiting.
struct Pending {
    cookie: u64,
    tx: mpsc::UnboundedSender<Reply>,
    permits: Option<Permits>,
}

impl Pending {
    fn new(cookie: u64, tx: mpsc::UnboundedSender<Reply>, slot: OwnedSemaphorePermit) -> Self {
        Self {
            cookie,
            tx,
            permits: Some(Permits {
                _request: slot,
                bytes: None,
            }),
        }
    }

    fn finish(mut self, result: Result<Option<Bytes>, Errno>) {
        self.send(result);
    }

    fn send(&mut self, result: Result<Option<Bytes>, Errno>) {
        let Some(permits) = self.permits.take() else {
            return;
        };
        let (error, data) = match result {
            Ok(data) => (0, data),
            Err(errno) => (errno.to_wire(), None),
        };
        // A closed channel means the writer is gone with the connection: nobody to tell.
        let _ = self.tx.send(Reply {
            cookie: self.cookie,
            error,
            data,
            _permits: permits,
        });
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.send(Err(Errno::Io));
    }
}

/// The writer task: sends each queued reply whole (header, then any read data), batching
/// whatever is queued into one flush, and closes the stream when every sender is gone.
async fn write_replies<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
) -> std::io::Result<()> {
    let mut wr = BufWriter::with_capacity(WRITE_BUFFER, wr);
    while let Some(reply) = rx.recv().await {
        write_reply(&mut wr, reply).await?;
        while let Ok(reply) = rx.try_recv() {
            write_reply(&mut wr, reply).await?;
        }
        wr.flush().await?;
    }
    // The client may already have closed its end after NBD_CMD_DISC: nothing left to report.
    let _ = wr.shutdown().await;
    Ok(())
}

async fn write_reply<W: AsyncWrite + Unpin>(wr: &mut W, reply: Reply) -> std::io::Result<()> {
    wr.write_all(&proto::simple_reply_header(reply.error, reply.cookie))
        .await?;
    if let Some(data) = &reply.data {
        wr.write_all(data).await?;
    }
    Ok(())
}
