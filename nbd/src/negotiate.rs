//! The handshake phase: the fixed newstyle greeting, the client's flags, and option haggling
//! (`NBD_OPT_EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO` and `STARTTLS`; every other option is
//! answered `NBD_REP_ERR_UNSUP`) until the client picks an export or leaves. It owns the
//! negotiation's bounds: option data length, option count (the deadline is applied by the
//! caller around [`negotiate`]).

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::proto::{self, client_flags, handshake_flags, info, opt, rep, transmission_flags};
use crate::{Error, Exports, Refusal, io_util};

/// The largest option data the server reads into memory; longer data is read and discarded,
/// and the option answered `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// The most options one negotiation may send before the server hangs up.
pub const MAX_OPTIONS: usize = 1024;

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

/// Runs the handshake on a fresh connection. `Ok(None)` means the session ended without
/// transmission (the client aborted or went away, or the server is shutting down).
pub(crate) async fn negotiate<R, W, E>(
    rd: &mut R,
    wr: &mut W,
    exports: &E,
    shutdown: &CancellationToken,
) -> Result<Option<Negotiated<E::Export>>, Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    E: Exports,
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
    let no_zeroes = flags & client_flags::NO_ZEROES != 0;

    for _ in 0..MAX_OPTIONS {
        let mut raw = [0u8; proto::OPTION_HEADER_LEN];
        let got = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            got = io_util::read_message(rd, &mut raw) => got?,
        };
        if !got {
            return Ok(None);
        }
        let header = proto::OptionHeader::decode(&raw).map_err(Error::OptionMagic)?;
        let option = header.option;
        tracing::debug!(
            option = opt::name(option),
            len = header.length,
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
            return Ok(None);
        }

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
                let reply = proto::export_name_reply(size, transmission_flags::SERVED, no_zeroes);
                wr.write_all(&reply).await?;
                wr.flush().await?;
                return Ok(Some(Negotiated {
                    export,
                    token,
                    size,
                    name,
                }));
            }
            opt::ABORT => {
                // The client may already be gone: the spec asks the server to cope.
                let _ = reply_ack(wr, option).await;
                return Ok(None);
            }
            opt::LIST => {
                if !data.is_empty() {
                    let message = "NBD_OPT_LIST takes no data";
                    reply_error(wr, option, rep::ERR_INVALID, message).await?;
                    continue;
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
            }
            opt::STARTTLS => {
                let (reply, message) = if data.is_empty() {
                    (rep::ERR_POLICY, "TLS is not offered on this transport")
                } else {
                    (rep::ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
                };
                reply_error(wr, option, reply, message).await?;
            }
            opt::INFO | opt::GO => {
                let request = match InfoRequest::parse(&data) {
                    Ok(request) => request,
                    Err(message) => {
                        reply_error(wr, option, rep::ERR_INVALID, message).await?;
                        continue;
                    }
                };
                let (export, token) = match exports.open(&request.name) {
                    Ok((_, token)) if token.is_cancelled() => {
                        let message = gone_message(&request.name);
                        reply_error(wr, option, rep::ERR_UNKNOWN, &message).await?;
                        continue;
                    }
                    Ok(opened) => opened,
                    Err(refusal) => {
                        tracing::debug!(name = %request.name, %refusal, "export refused");
                        reply_error(wr, option, refusal_reply(&refusal), refusal.message()).await?;
                        continue;
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
                if option == opt::GO {
                    return Ok(Some(Negotiated {
                        export,
                        token,
                        size,
                        name: request.name,
                    }));
                }
            }
            _ => {
                let message = format!("{} ({option}) is not supported", opt::name(option));
                reply_error(wr, option, rep::ERR_UNSUP, &message).await?;
            }
        }
    }
    Err(Error::TooManyOptions(MAX_OPTIONS))
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
