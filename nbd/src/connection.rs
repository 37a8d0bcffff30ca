//! One connection's course, from accept to close: the order of its phases (greeting, options,
//! on a TLS connection the upgrade and then options again over TLS, transmission), the one
//! negotiation deadline that covers them from connect until transmission (greeting, options
//! and TLS handshake alike), and, on a TLS connection, the end brought by the client's
//! authorization being withdrawn ([`crate::Authorized::token`]), which stops the connection
//! as server shutdown does.

use std::convert::Infallible;
use std::future::Future;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::negotiate::{self, Outcome, Session, TlsState};
use crate::tls::{self, TlsPolicy};
use crate::{Error, Exports, NEGOTIATION_TIMEOUT, transmit};

/// Capacity of a connection's read buffer (large WRITE payloads bypass it).
const READ_BUFFER: usize = 64 * 1024;

/// Serves a connection on a transport without TLS.
pub(crate) async fn serve_plain<S, E>(
    stream: S,
    exports: &E,
    shutdown: &CancellationToken,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    E: Exports,
{
    let deadline = Instant::now() + NEGOTIATION_TIMEOUT;
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
    let Some(session) = greet(&mut rd, &mut wr, shutdown, deadline).await? else {
        return close(wr).await;
    };
    let tls = TlsState::NotOffered;
    options_then_transmit(rd, wr, exports, shutdown, &tls, session, deadline).await
}

/// Serves a connection on which TLS is required.
pub(crate) async fn serve_tls<S, E>(
    stream: S,
    exports: &E,
    policy: &TlsPolicy,
    shutdown: &CancellationToken,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    E: Exports,
{
    let deadline = Instant::now() + NEGOTIATION_TIMEOUT;
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
    let Some(mut session) = greet(&mut rd, &mut wr, shutdown, deadline).await? else {
        return close(wr).await;
    };
    let tls = TlsState::Required;
    let haggling = negotiate::haggle(&mut rd, &mut wr, exports, shutdown, &tls, &mut session);
    // Before TLS the haggling ends only with STARTTLS or the end of the session.
    let Outcome::StartTls = within(deadline, haggling).await? else {
        return close(wr).await;
    };

    let upgraded = tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        upgraded = within(deadline, tls::upgrade(rd, wr, policy)) => upgraded?,
    };
    let (state, authorized) = match upgraded.access {
        Ok(authorized) => (TlsState::Established, Some(authorized)),
        Err(message) => (TlsState::Denied(message), None),
    };
    // Stopped by server shutdown or by the authorization being withdrawn.
    let stop = shutdown.child_token();
    let withdrawn = async {
        match &authorized {
            Some(authorized) => authorized.token.cancelled().await,
            None => std::future::pending().await,
        }
        tracing::info!("NBD client's authorization withdrawn: closing its connection");
        stop.cancel();
        std::future::pending::<Infallible>().await
    };
    let (rd, wr) = tokio::io::split(upgraded.stream);
    let rd = BufReader::with_capacity(READ_BUFFER, rd);
    let served = options_then_transmit(rd, wr, exports, &stop, &state, session, deadline);
    let result = tokio::select! {
        result = served => result,
        never = withdrawn => match never {},
    };
    // The guard goes when the connection has ended.
    drop(authorized);
    result
}

/// The options (until the deadline), then transmission on the chosen export until `stop` is
/// cancelled, the export's token is, or the session ends.
async fn options_then_transmit<R, W, E>(
    mut rd: BufReader<R>,
    mut wr: W,
    exports: &E,
    stop: &CancellationToken,
    tls: &TlsState,
    mut session: Session,
    deadline: Instant,
) -> Result<(), Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
    E: Exports,
{
    let haggling = negotiate::haggle(&mut rd, &mut wr, exports, stop, tls, &mut session);
    let Outcome::Transmit(negotiated) = within(deadline, haggling).await? else {
        // Ended (STARTTLS only ends the haggling on a connection still waiting for TLS).
        return close(wr).await;
    };
    tracing::debug!(export = %negotiated.name, size = negotiated.size, "NBD transmission");
    let stop = transmit::Stop::new(stop.clone(), negotiated.token);
    transmit::transmit(
        rd,
        wr,
        negotiated.export,
        negotiated.size,
        &negotiated.name,
        stop,
    )
    .await
}

/// The greeting, cut short (`Ok(None)`) by `shutdown` as well as by the client going away.
async fn greet<R, W>(
    rd: &mut R,
    wr: &mut W,
    shutdown: &CancellationToken,
    deadline: Instant,
) -> Result<Option<Session>, Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    tokio::select! {
        () = shutdown.cancelled() => Ok(None),
        greeted = within(deadline, negotiate::greet(rd, wr)) => greeted,
    }
}

/// Runs a step of the negotiation, failing it once the negotiation's deadline has passed.
async fn within<T>(
    deadline: Instant,
    step: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout_at(deadline, step)
        .await
        .unwrap_or(Err(Error::NegotiationTimeout(NEGOTIATION_TIMEOUT)))
}

/// Closes a session that ended without transmission.
async fn close<W: AsyncWrite + Unpin>(mut wr: W) -> Result<(), Error> {
    // The client may be gone already; there is nothing to tell it.
    let _ = wr.shutdown().await;
    Ok(())
}
