//! The handshake phase: the fixed newstyle greeting and the client's flags ([`greet`]), then
//! option haggling ([`haggle`]) until the client picks an export, leaves, or (on a connection
//! that requires TLS) asks to start TLS. How options are answered depends on the connection's
//! [`TlsState`]: in the clear on a transport without TLS, or over TLS for an authorized client,
//! `NBD_OPT_EXPORT_NAME`, `ABORT`, `LIST`, `INFO` and `GO` are served (every other option is
//! `NBD_REP_ERR_UNSUP`); before TLS only `STARTTLS` and `ABORT` are; over TLS for a client
//! whose certificate is not authorized only `ABORT` is. It owns the negotiation's bounds:
//! option data length and option count over the whole connection (the deadline is applied by
//! the caller around these functions).

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::proto::{self, client_flags, handshake_flags, info, opt, rep, transmission_flags};
use crate::{Error, Exports, Refusal, io_util};

/// The largest option data the server reads into memory; longer data is read and discarded,
/// and the option answered `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// The most options one connection may send (before and after a TLS upgrade together) before
/// the server hangs up.
pub const MAX_OPTIONS: usize = 1024;

/// The message of `NBD_REP_ERR_TLS_REQD`, sent for every option but `STARTTLS` and `ABORT`
/// before TLS on a connection that requires it.
pub(crate) const TLS_REQUIRED: &str =
    "TLS is required on this server: connect with nbds:// and the lab's certificates";
/// The message of the `NBD_REP_ERR_POLICY` answering `STARTTLS` on a transport without TLS.
const TLS_NOT_OFFERED: &str = "TLS is not offered on this transport";
/// The message of the `NBD_REP_ERR_INVALID` answering a second `STARTTLS`.
const TLS_IN_USE: &str = "TLS is already in use";

/// Where a connection stands with TLS; it decides how options are answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TlsState {
    /// A transport without TLS (a Unix socket): every option is served but `STARTTLS`, which
    /// is refused by policy.
    NotOffered,
    /// TLS is required and not started yet: `STARTTLS` is acknowledged and ends the haggling
    /// with [`Outcome::StartTls`], `ABORT` is acknowledged, `EXPORT_NAME` closes the
    /// connection, every other option is `NBD_REP_ERR_TLS_REQD`.
    Required,
    /// TLS is in use and the client authorized: every option is served as on a transport
    /// without TLS, but a second `STARTTLS` is `NBD_REP_ERR_INVALID`.
    Established,
    /// TLS is in use but the client's certificate is not authorized: `ABORT` is acknowledged,
    /// `EXPORT_NAME` closes the connection, every other option is `NBD_REP_ERR_POLICY` with
    /// this message.
    Denied(String),
}

/// How a round of haggling ended.
pub(crate) enum Outcome<X> {
    /// The client chose an export: transmission starts.
    Transmit(Negotiated<X>),
    /// `STARTTLS` was acknowledged: the TLS handshake comes next on the same stream.
    StartTls,
    /// The session ended without transmission (the client aborted or went away, or the
    /// server is shutting down).
    End,
}

/// What the greeting settled, carried across a TLS upgrade (the greeting and the client's
/// flags are not repeated over TLS), and the options counted so far.
#[derive(Debug)]
pub(crate) struct Session {
    /// The client set `NBD_FLAG_C_NO_ZEROES`.
    no_zeroes: bool,
    /// Options received on this connection so far.
    options: usize,
}

/// The export a negotiation ended on, ready for transmission.
pub(crate) struct Negotiated<X> {
    /// The export.
    pub export: Arc<X>,
    /// Cancelled when the export stops being servable.
    pub token: CancellationToken,
    /// The size announced to the client; requests are checked against it.
    pub size: u64,
    /// The name the client chose.
    pub name: String,
}

/// Sends the greeting and reads the client's flags. `Ok(None)` means the client went away.
pub(crate) async fn greet<R, W>(rd: &mut R, wr: &mut W) -> Result<Option<Session>, Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let served_flags = handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES;
    wr.write_all(&proto::greeting(served_flags)).await?;
    wr.flush().await?;

    let mut raw_flags = [0u8; 4];
    if !io_util::read_message(rd, &mut raw_flags).await? {
        return Ok(None);
    }
    let flags = u32::from_be_bytes(raw_flags);
    if flags & client_flags::FIXED_NEWSTYLE == 0 || flags & !client_flags::KNOWN != 0 {
        return Err(Error::ClientFlags(flags));
    }
    Ok(Some(Session {
        no_zeroes: flags & client_flags::NO_ZEROES != 0,
        options: 0,
    }))
}

/// Answers options as `tls` decides until the haggling ends (see [`Outcome`]). `shutdown`
/// cancelled ends it: at once while waiting for an option, with `NBD_REP_ERR_SHUTDOWN` for
/// an option already received.
pub(crate) async fn haggle<R, W, E>(
    rd: &mut R,
    wr: &mut W,
    exports: &E,
    shutdown: &CancellationToken,
    tls: &TlsState,
    session: &mut Session,
) -> Result<Outcome<E::Export>, Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    E: Exports,
{
    while session.options < MAX_OPTIONS {
        session.options += 1;
        let mut raw = [0u8; proto::OPTION_HEADER_LEN];
        let got = tokio::select! {
            _ = shutdown.cancelled() => return Ok(Outcome::End),
            got = io_util::read_message(rd, &mut raw) => got?,
        };
        if !got {
            return Ok(Outcome::End);
        }
        let header = proto::OptionHeader::decode(&raw).map_err(Error::OptionMagic)?;
        let option = header.option;
        tracing::debug!(
            option = opt::name(option),
            len = header.length,
            ?tls,
            "NBD option"
        );

        if header.length > MAX_OPTION_DATA {
            io_util::discard(rd, u64::from(header.length)).await?;
            if option == opt::EXPORT_NAME {
                return Err(Error::ExportNameTooLong(header.length));
            }
            let message = format!(
                "{} carries {} bytes of data; this server reads at most {MAX_OPTION_DATA}",
                opt::name(option),
                header.length
            );
            reply_error(wr, option, rep::ERR_TOO_BIG, &message).await?;
            continue;
        }
        let mut data = vec![0u8; header.length as usize];
        rd.read_exact(&mut data).await?;

        if shutdown.is_cancelled() {
            if option == opt::ABORT {
                let _ = reply_ack(wr, option).await;
            } else {
                let message = "the NBD server is shutting down";
                let _ = reply_error(wr, option, rep::ERR_SHUTDOWN, message).await;
            }
            return Ok(Outcome::End);
        }

        let step = match tls {
            TlsState::Required => answer_before_tls(wr, option, &data).await?,
            TlsState::Denied(message) => answer_denied(wr, option, message).await?,
            TlsState::NotOffered | TlsState::Established => {
                answer(wr, exports, tls, session, option, data).await?
            }
        };
        if let Some(outcome) = step {
            return Ok(outcome);
        }
    }
    Err(Error::TooManyOptions(MAX_OPTIONS))
}

/// Answers one option before TLS on a connection that requires it; `Some` ends the haggling.
async fn answer_before_tls<W, X>(
    wr: &mut W,
    option: u32,
    data: &[u8],
) -> Result<Option<Outcome<X>>, Error>
where
    W: AsyncWrite + Unpin,
{
    match option {
        opt::ABORT => {
            let _ = reply_ack(wr, option).await;
            Ok(Some(Outcome::End))
        }
        // It can't be answered with an error: the spec has the server disconnect.
        opt::EXPORT_NAME => Err(Error::TlsRequired),
        opt::STARTTLS if data.is_empty() => {
            reply_ack(wr, option).await?;
            Ok(Some(Outcome::StartTls))
        }
        opt::STARTTLS => {
            let message = "NBD_OPT_STARTTLS takes no data";
            reply_error(wr, option, rep::ERR_INVALID, message).await?;
            Ok(None)
        }
        _ => {
            reply_error(wr, option, rep::ERR_TLS_REQD, TLS_REQUIRED).await?;
            Ok(None)
        }
    }
}

/// Answers one option over TLS from a client that is not authorized; `Some` ends the
/// haggling.
async fn answer_denied<W, X>(
    wr: &mut W,
    option: u32,
    message: &str,
) -> Result<Option<Outcome<X>>, Error>
where
    W: AsyncWrite + Unpin,
{
    match option {
        opt::ABORT => {
            let _ = reply_ack(wr, option).await;
            Ok(Some(Outcome::End))
        }
        opt::EXPORT_NAME => Err(Error::NotAuthorized(message.to_owned())),
        _ => {
            reply_error(wr, option, rep::ERR_POLICY, message).await?;
            Ok(None)
        }
    }
}

/// Answers one option from a client that may use the exports; `Some` ends the haggling.
async fn answer<W, E>(
    wr: &mut W,
    exports: &E,
    tls: &TlsState,
    session: &Session,
    option: u32,
    data: Vec<u8>,
) -> Result<Option<Outcome<E::Export>>, Error>
where
    W: AsyncWrite + Unpin,
    E: Exports,
{
    match option {
        opt::EXPORT_NAME => {
            let name = String::from_utf8(data).map_err(|_| Error::ExportNameNotUtf8)?;
            let (export, token) = match exports.open(&name) {
                Ok(opened) => opened,
                Err(refusal) => return Err(Error::Refused { name, refusal }),
            };
            if token.is_cancelled() {
                let refusal = Refusal::Unavailable(gone_message(&name));
                return Err(Error::Refused { name, refusal });
            }
            let size = crate::Export::size(&*export);
            let reply =
                proto::export_name_reply(size, transmission_flags::SERVED, session.no_zeroes);
            wr.write_all(&reply).await?;
            wr.flush().await?;
            Ok(Some(Outcome::Transmit(Negotiated {
                export,
                token,
                size,
                name,
            })))
        }
        opt::ABORT => {
            // The client may already be gone: the spec asks the server to cope.
            let _ = reply_ack(wr, option).await;
            Ok(Some(Outcome::End))
        }
        opt::LIST => {
            if !data.is_empty() {
                let message = "NBD_OPT_LIST takes no data";
                reply_error(wr, option, rep::ERR_INVALID, message).await?;
                return Ok(None);
            }
            let mut out = BytesMut::new();
            for export in exports.list() {
                if export.name.len() > proto::MAX_STRING {
                    tracing::warn!(name = %export.name, "export name too long for NBD_OPT_LIST");
                    continue;
                }
                proto::put_rep_server(&mut out, &export.name, &export.description);
            }
            proto::put_option_reply(&mut out, option, rep::ACK, &[]);
            send(wr, &out).await?;
            Ok(None)
        }
        opt::STARTTLS => {
            let (reply, message) = if !data.is_empty() {
                (rep::ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
            } else if *tls == TlsState::Established {
                (rep::ERR_INVALID, TLS_IN_USE)
            } else {
                (rep::ERR_POLICY, TLS_NOT_OFFERED)
            };
            reply_error(wr, option, reply, message).await?;
            Ok(None)
        }
        opt::INFO | opt::GO => {
            let request = match InfoRequest::parse(&data) {
                Ok(request) => request,
                Err(message) => {
                    reply_error(wr, option, rep::ERR_INVALID, message).await?;
                    return Ok(None);
                }
            };
            let (export, token) = match exports.open(&request.name) {
                Ok((_, token)) if token.is_cancelled() => {
                    let message = gone_message(&request.name);
                    reply_error(wr, option, rep::ERR_UNKNOWN, &message).await?;
                    return Ok(None);
                }
                Ok(opened) => opened,
                Err(refusal) => {
                    tracing::debug!(name = %request.name, %refusal, "export refused");
                    reply_error(wr, option, refusal_reply(&refusal), refusal.message()).await?;
                    return Ok(None);
                }
            };
            let size = crate::Export::size(&*export);
            let mut out = BytesMut::new();
            proto::put_info_export(&mut out, option, size, transmission_flags::SERVED);
            // Default constraints, but sent unasked: clients ignore what they don't know.
            proto::put_info_block_size(&mut out, option);
            if request.wants(info::NAME) {
                proto::put_info_string(&mut out, option, info::NAME, &request.name);
            }
            if request.wants(info::DESCRIPTION) {
                let description = exports
                    .list()
                    .into_iter()
                    .find(|e| e.name == request.name)
                    .map(|e| e.description)
                    .unwrap_or_default();
                if !description.is_empty() {
                    proto::put_info_string(&mut out, option, info::DESCRIPTION, &description);
                }
            }
            proto::put_option_reply(&mut out, option, rep::ACK, &[]);
            send(wr, &out).await?;
            if option != opt::GO {
                return Ok(None);
            }
            Ok(Some(Outcome::Transmit(Negotiated {
                export,
                token,
                size,
                name: request.name,
            })))
        }
        _ => {
            let message = format!("{} ({option}) is not supported", opt::name(option));
            reply_error(wr, option, rep::ERR_UNSUP, &message).await?;
            Ok(None)
        }
    }
}

/// The option error reply a refusal is sent as. Both kinds are `NBD_REP_ERR_UNKNOWN` ("the
/// requested export is not available"); `NBD_REP_ERR_SHUTDOWN` would be wrong for an export
/// that is down while the server is not (the client must then give up on the whole server).
fn refusal_reply(refusal: &Refusal) -> u32 {
    match refusal {
        Refusal::Unknown(_) | Refusal::Unavailable(_) => rep::ERR_UNKNOWN,
    }
}

fn gone_message(name: &str) -> String {
    format!("export {name:?} is not available right now")
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`: an export name and the information requested.
struct InfoRequest {
    name: String,
    requests: Vec<u16>,
}

impl InfoRequest {
    /// Parses the option data; `Err` is the message for `NBD_REP_ERR_INVALID`.
    fn parse(mut data: &[u8]) -> Result<Self, &'static str> {
        if data.remaining() < 4 {
            return Err("option data too short for an export name length");
        }
        let name_len = data.get_u32() as usize;
        if data.remaining() < name_len.saturating_add(2) {
            return Err("export name length runs past the option data");
        }
        let name = std::str::from_utf8(&data[..name_len])
            .map_err(|_| "export name is not UTF-8")?
            .to_owned();
        data.advance(name_len);
        let count = usize::from(data.get_u16());
        if data.remaining() != count * 2 {
            return Err("information request count does not match the option data");
        }
        let requests = (0..count).map(|_| data.get_u16()).collect();
        Ok(Self { name, requests })
    }

    fn wants(&self, item: u16) -> bool {
        self.requests.contains(&item)
    }
}

async fn reply_ack<W: AsyncWrite + Unpin>(wr: &mut W, option: u32) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    proto::put_option_reply(&mut out, option, rep::ACK, &[]);
    send(wr, &out).await
}

async fn reply_error<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    reply: u32,
    message: &str,
) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    proto::put_option_error(&mut out, option, reply, message);
    send(wr, &out).await
}

async fn send<W: AsyncWrite + Unpin>(wr: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    wr.write_all(bytes).await?;
    wr.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ExportInfo;

    /// A 1 MiB export of zeroes.
    struct Zeroes;

    impl crate::Export for Zeroes {
        fn size(&self) -> u64 {
            1 << 20
        }

        async fn read(&self, _offset: u64, len: u32) -> std::io::Result<bytes::Bytes> {
            Ok(vec![0; len as usize].into())
        }

        async fn write(
            &self,
            _offset: u64,
            _data: bytes::Bytes,
            _fua: bool,
        ) -> std::io::Result<()> {
            Ok(())
        }

        async fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// One export, `disk0`.
    struct OneDisk;

    impl Exports for OneDisk {
        type Export = Zeroes;

        fn list(&self) -> Vec<ExportInfo> {
            vec![ExportInfo {
                name: "disk0".to_owned(),
                description: String::new(),
            }]
        }

        fn open(&self, name: &str) -> Result<(Arc<Zeroes>, CancellationToken), Refusal> {
            match name {
                "disk0" => Ok((Arc::new(Zeroes), CancellationToken::new())),
                _ => Err(Refusal::Unknown(format!("no {name}"))),
            }
        }
    }

    /// An option as the client sends it.
    fn option(option: u32, data: &[u8]) -> Vec<u8> {
        let mut out = proto::IHAVEOPT.to_be_bytes().to_vec();
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    fn options(list: &[(u32, &[u8])]) -> Vec<u8> {
        list.iter().flat_map(|&(o, data)| option(o, data)).collect()
    }

    fn fresh() -> Session {
        Session {
            no_zeroes: true,
            options: 0,
        }
    }

    /// One round of haggling over `input`: its outcome, the option replies (option, reply
    /// type, text) and how many input bytes were left unread.
    async fn haggle_over(
        tls: &TlsState,
        session: &mut Session,
        input: &[u8],
    ) -> (
        Result<Outcome<Zeroes>, Error>,
        Vec<(u32, u32, String)>,
        usize,
    ) {
        let mut rd = input;
        let mut wr = Vec::new();
        let shutdown = CancellationToken::new();
        let outcome = haggle(&mut rd, &mut wr, &OneDisk, &shutdown, tls, session).await;
        let mut replies = Vec::new();
        let mut out = &wr[..];
        while !out.is_empty() {
            assert_eq!(out.get_u64(), proto::OPTION_REPLY_MAGIC);
            let option = out.get_u32();
            let kind = out.get_u32();
            let len = out.get_u32() as usize;
            let text = String::from_utf8_lossy(&out[..len]).into_owned();
            out.advance(len);
            replies.push((option, kind, text));
        }
        (outcome, replies, rd.len())
    }

    fn go_data(name: &str) -> Vec<u8> {
        encode(name.as_bytes(), 0, &[])
    }

    #[tokio::test]
    async fn before_tls_only_starttls_and_abort_are_served() {
        let go = go_data("disk0");
        let mut input = options(&[
            (opt::LIST, b""),
            (opt::GO, &go),
            (0x4242, b""),
            (opt::STARTTLS, b"x"),
            (opt::STARTTLS, b""),
        ]);
        input.extend_from_slice(b"TLS!");
        let (outcome, replies, left) = haggle_over(&TlsState::Required, &mut fresh(), &input).await;
        assert!(matches!(outcome, Ok(Outcome::StartTls)));
        let required = |option| (option, rep::ERR_TLS_REQD, TLS_REQUIRED.to_owned());
        let invalid = "NBD_OPT_STARTTLS takes no data".to_owned();
        assert_eq!(
            replies,
            [
                required(opt::LIST),
                required(opt::GO),
                required(0x4242),
                (opt::STARTTLS, rep::ERR_INVALID, invalid),
                (opt::STARTTLS, rep::ACK, String::new()),
            ]
        );
        assert_eq!(left, 4, "nothing after STARTTLS is read: it belongs to TLS");

        let input = option(opt::ABORT, b"");
        let (outcome, replies, _) = haggle_over(&TlsState::Required, &mut fresh(), &input).await;
        assert!(matches!(outcome, Ok(Outcome::End)));
        assert_eq!(replies, [(opt::ABORT, rep::ACK, String::new())]);

        let input = option(opt::EXPORT_NAME, b"disk0");
        let (outcome, replies, _) = haggle_over(&TlsState::Required, &mut fresh(), &input).await;
        assert!(matches!(outcome, Err(Error::TlsRequired)));
        assert!(replies.is_empty());
    }

    #[tokio::test]
    async fn denied_refuses_every_option_but_abort_with_the_policy_message() {
        let denied = TlsState::Denied("operator role required".to_owned());
        let go = go_data("disk0");
        let input = options(&[
            (opt::LIST, b""),
            (opt::STARTTLS, b""),
            (opt::INFO, &go),
            (opt::GO, &go),
            (opt::ABORT, b""),
        ]);
        let (outcome, replies, _) = haggle_over(&denied, &mut fresh(), &input).await;
        assert!(matches!(outcome, Ok(Outcome::End)));
        let policy = |option| (option, rep::ERR_POLICY, "operator role required".to_owned());
        assert_eq!(
            replies,
            [
                policy(opt::LIST),
                policy(opt::STARTTLS),
                policy(opt::INFO),
                policy(opt::GO),
                (opt::ABORT, rep::ACK, String::new()),
            ]
        );

        let input = option(opt::EXPORT_NAME, b"disk0");
        let (outcome, replies, _) = haggle_over(&denied, &mut fresh(), &input).await;
        assert!(matches!(outcome, Err(Error::NotAuthorized(m)) if m == "operator role required"));
        assert!(replies.is_empty());
    }

    #[tokio::test]
    async fn over_tls_options_are_served_but_a_second_starttls() {
        let go = go_data("disk0");
        let input = options(&[(opt::STARTTLS, b""), (opt::GO, &go)]);
        let (outcome, replies, _) = haggle_over(&TlsState::Established, &mut fresh(), &input).await;
        let Ok(Outcome::Transmit(negotiated)) = outcome else {
            panic!("GO over TLS did not start transmission");
        };
        assert_eq!(
            (negotiated.name.as_str(), negotiated.size),
            ("disk0", 1 << 20)
        );
        assert_eq!(
            replies[0],
            (opt::STARTTLS, rep::ERR_INVALID, TLS_IN_USE.to_owned())
        );
        assert_eq!(
            replies.last().map(|r| (r.0, r.1)),
            Some((opt::GO, rep::ACK))
        );

        let input = option(opt::STARTTLS, b"");
        let (_, replies, _) = haggle_over(&TlsState::NotOffered, &mut fresh(), &input).await;
        assert_eq!(
            replies,
            [(opt::STARTTLS, rep::ERR_POLICY, TLS_NOT_OFFERED.to_owned())]
        );
    }

    #[tokio::test]
    async fn the_option_count_spans_the_upgrade() {
        let mut session = fresh();
        let input = options(&[(opt::LIST, b""), (opt::STARTTLS, b"")]);
        let (outcome, _, _) = haggle_over(&TlsState::Required, &mut session, &input).await;
        assert!(matches!(outcome, Ok(Outcome::StartTls)));
        let input = option(0x4242, b"").repeat(MAX_OPTIONS);
        let (outcome, replies, _) = haggle_over(&TlsState::Established, &mut session, &input).await;
        assert!(matches!(outcome, Err(Error::TooManyOptions(MAX_OPTIONS))));
        assert_eq!(replies.len(), MAX_OPTIONS - 2);
    }

    fn encode(name: &[u8], count: u16, items: &[u16]) -> Vec<u8> {
        let mut data = Vec::new();
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name);
        data.extend_from_slice(&count.to_be_bytes());
        for item in items {
            data.extend_from_slice(&item.to_be_bytes());
        }
        data
    }

    #[test]
    fn info_request_parses_name_and_items() {
        let request = InfoRequest::parse(&encode(b"disk0", 2, &[info::NAME, info::BLOCK_SIZE]))
            .expect("valid");
        assert_eq!(request.name, "disk0");
        assert!(request.wants(info::NAME));
        assert!(!request.wants(info::DESCRIPTION));
    }

    #[test]
    fn info_request_rejects_inconsistent_lengths() {
        assert!(InfoRequest::parse(&[0, 0]).is_err());
        let mut lying = encode(b"disk0", 0, &[]);
        lying[3] = 200; // name length past the data
        assert!(InfoRequest::parse(&lying).is_err());
        let mut huge = encode(b"", 0, &[]);
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(InfoRequest::parse(&huge).is_err());
        assert!(InfoRequest::parse(&encode(b"disk0", 3, &[1])).is_err());
        assert!(InfoRequest::parse(&encode(&[0xff, 0xfe], 0, &[])).is_err());
    }
}
