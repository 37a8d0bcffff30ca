//! NBD over TLS, TLS required (the protocol document's "FORCEDTLS" mode, libnbd's `nbds://`).
//! This file owns what a server is given to serve TLS, the [`TlsPolicy`] (the rustls
//! configuration, which verifies client certificates, and the authorization of a client by its
//! verified certificate chain, [`Authorized`]), and the upgrade itself: after the client's
//! `NBD_OPT_STARTTLS` has been acknowledged, the TLS handshake on the very stream the
//! negotiation started on, then the authorization. How options are answered before and after
//! the upgrade is decided in `negotiate` (its `TlsState`); the order of the phases and the
//! effect of [`Authorized::token`] in `connection`.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadHalf, WriteHalf};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::Error;

/// What an authorized client's connection carries with it.
pub struct Authorized {
    /// Cancelled => the connection ends as on server shutdown (in-flight requests answered
    /// `NBD_ESHUTDOWN`, then closed; during negotiation: closed).
    pub token: CancellationToken,
    /// Dropped when the connection ends (e.g. to unregister it somewhere).
    pub guard: Option<Box<dyn Send + Sync>>,
}

impl std::fmt::Debug for Authorized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorized")
            .field("token", &self.token)
            .field("guard", &self.guard.is_some())
            .finish()
    }
}

/// Decides from the client's verified certificate chain whether it may use the exports.
type Authorize =
    dyn Fn(&[CertificateDer<'static>]) -> Result<Authorized, String> + Send + Sync + 'static;

/// How a server serves NBD over TLS: the handshake's configuration and who may go on.
pub struct TlsPolicy {
    acceptor: TlsAcceptor,
    authorize: Box<Authorize>,
}

impl std::fmt::Debug for TlsPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsPolicy").finish_non_exhaustive()
    }
}

impl TlsPolicy {
    /// `config`: a rustls server config that requires and verifies client certificates (the
    /// caller builds it). NBD negotiates no application protocol (libnbd offers no ALPN), so
    /// any ALPN protocols set are cleared (in a clone), lest a client offering some other
    /// protocol be refused.
    ///
    /// `authorize`: called with the verified client chain (end-entity first) after the
    /// handshake; `Err(message)` = the client may not use the exports: every option it sends
    /// but `NBD_OPT_ABORT` is answered `NBD_REP_ERR_POLICY` carrying `message`.
    pub fn new(
        config: Arc<rustls::ServerConfig>,
        authorize: impl Fn(&[CertificateDer<'static>]) -> Result<Authorized, String>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        let config = if config.alpn_protocols.is_empty() {
            config
        } else {
            let mut config = (*config).clone();
            config.alpn_protocols.clear();
            Arc::new(config)
        };
        Self {
            acceptor: TlsAcceptor::from(config),
            authorize: Box::new(authorize),
        }
    }
}

/// A connection after the TLS handshake.
pub(crate) struct Upgraded<S> {
    /// The TLS stream, over the stream the negotiation started on.
    pub stream: TlsStream<S>,
    /// What the policy decided about the client's certificate.
    pub access: Result<Authorized, String>,
}

/// Upgrades a connection whose `NBD_OPT_STARTTLS` was just acknowledged: puts the stream back
/// together from its halves, runs the TLS handshake on it and authorizes the client.
///
/// The client must send nothing between the option and its TLS handshake, so bytes already
/// read into `rd`'s buffer are a protocol error ([`Error::DataBeforeTls`]); a failed
/// handshake (e.g. a client certificate from another CA) is [`Error::TlsHandshake`]. A
/// client refused by the policy is not an error: its refusal is in [`Upgraded::access`].
pub(crate) async fn upgrade<S>(
    rd: BufReader<ReadHalf<S>>,
    wr: WriteHalf<S>,
    policy: &TlsPolicy,
) -> Result<Upgraded<S>, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let early = rd.buffer().len();
    if early > 0 {
        return Err(Error::DataBeforeTls(early));
    }
    let stream = rd.into_inner().unsplit(wr);
    let stream = policy
        .acceptor
        .accept(stream)
        .await
        .map_err(Error::TlsHandshake)?;
    let access = match stream.get_ref().1.peer_certificates() {
        Some(chain) if !chain.is_empty() => (policy.authorize)(chain),
        // Only a configuration that lets clients go without a certificate gets here.
        _ => Err("a client certificate is required".to_owned()),
    };
    match &access {
        Ok(_) => tracing::debug!("NBD client authorized"),
        Err(message) => tracing::info!(%message, "NBD client's certificate not authorized"),
    }
    Ok(Upgraded { stream, access })
}
