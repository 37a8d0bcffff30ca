//! The NBD wire format: every magic number, flag, option, reply type, command and error value
//! this server speaks (named as in the protocol document,
//! <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>), the size limits the
//! server enforces, and the encoders and decoders of the messages. Nothing here does I/O.
//!
//! All integers on the wire are big-endian ("network byte order").

use bytes::{BufMut, Bytes, BytesMut};

/// `NBDMAGIC`, the first 8 bytes the server sends (also called `INIT_PASSWD`).
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: sent by the server after [`NBD_MAGIC`] in newstyle negotiation, and by the client
/// in front of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic in front of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`: magic in front of every transmission request (compact headers).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`: magic in front of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Length of a request header (magic, flags, type, cookie, offset, length).
pub const REQUEST_HEADER_LEN: usize = 28;
/// Length of a simple reply header (magic, error, cookie).
pub const SIMPLE_REPLY_HEADER_LEN: usize = 16;
/// Length of an option header sent by the client (magic, option, data length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Reserved zeroes after the `NBD_OPT_EXPORT_NAME` reply, left out when the client set
/// [`client_flags::NO_ZEROES`].
pub const EXPORT_NAME_ZEROES: usize = 124;
/// The longest string (export name, description, error message) the spec allows on the wire.
pub const MAX_STRING: usize = 4096;

/// Smallest addressable length and alignment advertised in `NBD_INFO_BLOCK_SIZE`: any byte.
pub const MIN_BLOCK_SIZE: u32 = 1;
/// Block size for efficient I/O advertised in `NBD_INFO_BLOCK_SIZE`.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Largest READ or WRITE payload the server accepts (2^25 bytes, the spec's default); also
/// advertised in `NBD_INFO_BLOCK_SIZE`.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// Handshake flags: the 16 bits the server sends after [`IHAVEOPT`].
pub mod handshake_flags {
    /// `NBD_FLAG_FIXED_NEWSTYLE`: the server speaks fixed newstyle negotiation.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// `NBD_FLAG_NO_ZEROES`: the server can leave out the 124 zeroes after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags: the 32 bits the client answers the handshake flags with.
pub mod client_flags {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`: the client speaks fixed newstyle negotiation.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// `NBD_FLAG_C_NO_ZEROES`: the server must not send the 124 zeroes after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every client flag this server knows; the spec has the server drop a client setting others.
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Transmission flags: the 16 bits describing an export, sent when transmission starts.
pub mod transmission_flags {
    /// `NBD_FLAG_HAS_FLAGS`: always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// `NBD_FLAG_READ_ONLY`.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_FLAG_SEND_FLUSH`: `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_FLAG_SEND_FUA`: `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_FLAG_ROTATIONAL`.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_FLAG_SEND_TRIM`: `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_FLAG_SEND_WRITE_ZEROES`: `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE` are supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_FLAG_SEND_DF`: `NBD_CMD_FLAG_DF` is supported (structured replies only).
    pub const SEND_DF: u16 = 1 << 7;
    /// `NBD_FLAG_CAN_MULTI_CONN`: a flush or FUA on one connection covers every connection.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_FLAG_SEND_CACHE`: `NBD_CMD_CACHE` is understood.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_FLAG_SEND_FAST_ZERO`: `NBD_CMD_FLAG_FAST_ZERO` is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;

    /// What this server advertises for every export: flush, FUA, write-zeroes and multi-conn.
    pub const SERVED: u16 = HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_WRITE_ZEROES | CAN_MULTI_CONN;
}

/// Option types (`NBD_OPT_*`), sent by the client during negotiation.
pub mod opt {
    /// `NBD_OPT_EXPORT_NAME`: choose an export and start transmission; cannot be refused
    /// except by closing the connection.
    pub const EXPORT_NAME: u32 = 1;
    /// `NBD_OPT_ABORT`: the client ends the negotiation.
    pub const ABORT: u32 = 2;
    /// `NBD_OPT_LIST`: list the exports.
    pub const LIST: u32 = 3;
    /// `NBD_OPT_PEEK_EXPORT`: withdrawn, not in use.
    pub const PEEK_EXPORT: u32 = 4;
    /// `NBD_OPT_STARTTLS`: upgrade the connection to TLS.
    pub const STARTTLS: u32 = 5;
    /// `NBD_OPT_INFO`: describe an export without starting transmission.
    pub const INFO: u32 = 6;
    /// `NBD_OPT_GO`: describe an export and start transmission (refusable, unlike `EXPORT_NAME`).
    pub const GO: u32 = 7;
    /// `NBD_OPT_STRUCTURED_REPLY`: use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// `NBD_OPT_LIST_META_CONTEXT`: list metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// `NBD_OPT_SET_META_CONTEXT`: select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// `NBD_OPT_EXTENDED_HEADERS`: use 64-bit request and reply headers.
    pub const EXTENDED_HEADERS: u32 = 11;

    /// The spec's name of an option, for messages and logs.
    pub fn name(option: u32) -> &'static str {
        match option {
            EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
            ABORT => "NBD_OPT_ABORT",
            LIST => "NBD_OPT_LIST",
            PEEK_EXPORT => "NBD_OPT_PEEK_EXPORT",
            STARTTLS => "NBD_OPT_STARTTLS",
            INFO => "NBD_OPT_INFO",
            GO => "NBD_OPT_GO",
            STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
            LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
            SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
            EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
            _ => "an unknown option",
        }
    }
}

/// Option reply types (`NBD_REP_*`), sent by the server during negotiation. Errors have bit 31 set.
pub mod rep {
    const ERROR: u32 = 1 << 31;
    /// `NBD_REP_ACK`: the option succeeded (or a list is complete).
    pub const ACK: u32 = 1;
    /// `NBD_REP_SERVER`: one export in the answer to `NBD_OPT_LIST`.
    pub const SERVER: u32 = 2;
    /// `NBD_REP_INFO`: one piece of information in the answer to `NBD_OPT_INFO`/`NBD_OPT_GO`.
    pub const INFO: u32 = 3;
    /// `NBD_REP_ERR_UNSUP`: the option is not known to this server.
    pub const ERR_UNSUP: u32 = ERROR | 1;
    /// `NBD_REP_ERR_POLICY`: the option is known, but server policy forbids it.
    pub const ERR_POLICY: u32 = ERROR | 2;
    /// `NBD_REP_ERR_INVALID`: the option's data is syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = ERROR | 3;
    /// `NBD_REP_ERR_PLATFORM`: the option is not supported on this platform.
    pub const ERR_PLATFORM: u32 = ERROR | 4;
    /// `NBD_REP_ERR_TLS_REQD`: TLS is required first.
    pub const ERR_TLS_REQD: u32 = ERROR | 5;
    /// `NBD_REP_ERR_UNKNOWN`: the requested export is not available.
    pub const ERR_UNKNOWN: u32 = ERROR | 6;
    /// `NBD_REP_ERR_SHUTDOWN`: the server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERROR | 7;
    /// `NBD_REP_ERR_BLOCK_SIZE_REQD`: the client must ask for `NBD_INFO_BLOCK_SIZE`.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERROR | 8;
    /// `NBD_REP_ERR_TOO_BIG`: the request or the reply is too large to process.
    pub const ERR_TOO_BIG: u32 = ERROR | 9;
}

/// Information types (`NBD_INFO_*`) inside an `NBD_REP_INFO` reply.
pub mod info {
    /// `NBD_INFO_EXPORT`: size and transmission flags (always sent).
    pub const EXPORT: u16 = 0;
    /// `NBD_INFO_NAME`: the export's canonical name.
    pub const NAME: u16 = 1;
    /// `NBD_INFO_DESCRIPTION`: a human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command flags (`NBD_CMD_FLAG_*`), in each transmission request.
pub mod cmd_flags {
    /// `NBD_CMD_FLAG_FUA`: the written data must be durable before the reply.
    pub const FUA: u16 = 1 << 0;
    /// `NBD_CMD_FLAG_NO_HOLE`: `NBD_CMD_WRITE_ZEROES` must not punch a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `NBD_CMD_FLAG_DF`: don't fragment a structured read reply.
    pub const DF: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_REQ_ONE`: one extent per context in `NBD_CMD_BLOCK_STATUS`.
    pub const REQ_ONE: u16 = 1 << 3;
    /// `NBD_CMD_FLAG_FAST_ZERO`: fail `NBD_CMD_WRITE_ZEROES` unless it is fast.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// `NBD_CMD_FLAG_PAYLOAD_LEN`: extended headers only.
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Request types (`NBD_CMD_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ` (0).
    Read,
    /// `NBD_CMD_WRITE` (1): followed by *length* bytes of payload.
    Write,
    /// `NBD_CMD_DISC` (2): soft disconnect, no reply.
    Disc,
    /// `NBD_CMD_FLUSH` (3).
    Flush,
    /// `NBD_CMD_TRIM` (4).
    Trim,
    /// `NBD_CMD_CACHE` (5).
    Cache,
    /// `NBD_CMD_WRITE_ZEROES` (6).
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS` (7).
    BlockStatus,
    /// Any other type (including `NBD_CMD_RESIZE`, 8).
    Unknown(u16),
}

impl Command {
    const READ: u16 = 0;
    const WRITE: u16 = 1;
    const DISC: u16 = 2;
    const FLUSH: u16 = 3;
    const TRIM: u16 = 4;
    const CACHE: u16 = 5;
    const WRITE_ZEROES: u16 = 6;
    const BLOCK_STATUS: u16 = 7;

    /// The command of a request's type field.
    pub fn from_wire(kind: u16) -> Self {
        match kind {
            Self::READ => Self::Read,
            Self::WRITE => Self::Write,
            Self::DISC => Self::Disc,
            Self::FLUSH => Self::Flush,
            Self::TRIM => Self::Trim,
            Self::CACHE => Self::Cache,
            Self::WRITE_ZEROES => Self::WriteZeroes,
            Self::BLOCK_STATUS => Self::BlockStatus,
            other => Self::Unknown(other),
        }
    }

    /// The request type field of this command.
    pub fn to_wire(self) -> u16 {
        match self {
            Self::Read => Self::READ,
            Self::Write => Self::WRITE,
            Self::Disc => Self::DISC,
            Self::Flush => Self::FLUSH,
            Self::Trim => Self::TRIM,
            Self::Cache => Self::CACHE,
            Self::WriteZeroes => Self::WRITE_ZEROES,
            Self::BlockStatus => Self::BLOCK_STATUS,
            Self::Unknown(other) => other,
        }
    }

    /// The command flags the server accepts on this command; a request carrying any other flag
    /// is answered `NBD_EINVAL`. FUA is accepted on every command (the spec requires that once
    /// `NBD_FLAG_SEND_FUA` is advertised); NO_HOLE only on WRITE_ZEROES. DF, REQ_ONE and
    /// FAST_ZERO belong to features this server does not advertise.
    pub fn allowed_flags(self) -> u16 {
        match self {
            Self::WriteZeroes => cmd_flags::FUA | cmd_flags::NO_HOLE,
            _ => cmd_flags::FUA,
        }
    }
}

/// Error values (`NBD_E*`) in the error field of a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    /// `NBD_EPERM`: operation not permitted.
    Perm = 1,
    /// `NBD_EIO`: input/output error.
    Io = 5,
    /// `NBD_ENOMEM`: cannot allocate memory.
    NoMem = 12,
    /// `NBD_EINVAL`: invalid argument.
    Inval = 22,
    /// `NBD_ENOSPC`: no space left on device (also: a write past the export's end).
    NoSpc = 28,
    /// `NBD_EOVERFLOW`: value too large.
    Overflow = 75,
    /// `NBD_ENOTSUP`: operation not supported.
    NotSup = 95,
    /// `NBD_ESHUTDOWN`: the server (or the export) is shutting down.
    Shutdown = 108,
}

impl Errno {
    /// The value on the wire.
    pub fn to_wire(self) -> u32 {
        self as u32
    }

    /// The NBD error for an I/O error of an export: the spec asks for `ENOSPC` on a full disk,
    /// quota or file-size limit and `EPERM` on a read-only export; everything else is `EIO`.
    pub fn from_io(error: &std::io::Error) -> Self {
        use std::io::ErrorKind;
        match error.kind() {
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge => {
                Self::NoSpc
            }
            ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => Self::Perm,
            _ => Self::Io,
        }
    }
}

/// A transmission request header (compact form: the only one this server negotiates).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// The client's opaque cookie, echoed in the reply.
    pub cookie: u64,
    /// Offset into the export.
    pub offset: u64,
    /// Length of the range (and of the payload that follows an `NBD_CMD_WRITE`).
    pub length: u32,
}

impl RequestHeader {
    /// Decodes a header; `Err` carries the magic if it is not [`REQUEST_MAGIC`].
    pub fn decode(raw: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, u32> {
        let mut buf = &raw[..];
        let magic = bytes::Buf::get_u32(&mut buf);
        if magic != REQUEST_MAGIC {
            return Err(magic);
        }
        Ok(Self {
            flags: bytes::Buf::get_u16(&mut buf),
            command: Command::from_wire(bytes::Buf::get_u16(&mut buf)),
            cookie: bytes::Buf::get_u64(&mut buf),
            offset: bytes::Buf::get_u64(&mut buf),
            length: bytes::Buf::get_u32(&mut buf),
        })
    }

    /// Encodes the header (what a client sends).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0u8; REQUEST_HEADER_LEN];
        let mut buf = &mut out[..];
        buf.put_u32(REQUEST_MAGIC);
        buf.put_u16(self.flags);
        buf.put_u16(self.command.to_wire());
        buf.put_u64(self.cookie);
        buf.put_u64(self.offset);
        buf.put_u32(self.length);
        out
    }
}

/// An option header sent by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option (`NBD_OPT_*`).
    pub option: u32,
    /// Length of the option data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Decodes an option header; `Err` carries the magic if it is not [`IHAVEOPT`].
    pub fn decode(raw: &[u8; OPTION_HEADER_LEN]) -> Result<Self, u64> {
        let mut buf = &raw[..];
        let magic = bytes::Buf::get_u64(&mut buf);
        if magic != IHAVEOPT {
            return Err(magic);
        }
        Ok(Self {
            option: bytes::Buf::get_u32(&mut buf),
            length: bytes::Buf::get_u32(&mut buf),
        })
    }
}

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn greeting(flags: u16) -> [u8; 18] {
    let mut out = [0u8; 18];
    let mut buf = &mut out[..];
    buf.put_u64(NBD_MAGIC);
    buf.put_u64(IHAVEOPT);
    buf.put_u16(flags);
    out
}

/// Appends one option reply (header and data) to `out`.
pub fn put_option_reply(out: &mut BytesMut, option: u32, reply: u32, data: &[u8]) {
    out.reserve(20 + data.len());
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply);
    out.put_u32(wire_len(data.len()));
    out.put_slice(data);
}

/// Appends an option error reply whose data is `message` (cut to the spec's string limit).
pub fn put_option_error(out: &mut BytesMut, option: u32, reply: u32, message: &str) {
    put_option_reply(out, option, reply, truncate(message, MAX_STRING).as_bytes());
}

/// Appends an `NBD_REP_SERVER` reply for `NBD_OPT_LIST`: name length, name, description.
pub fn put_rep_server(out: &mut BytesMut, name: &str, description: &str) {
    let description = truncate(description, MAX_STRING);
    let mut data = BytesMut::with_capacity(4 + name.len() + description.len());
    data.put_u32(wire_len(name.len()));
    data.put_slice(name.as_bytes());
    data.put_slice(description.as_bytes());
    put_option_reply(out, opt::LIST, rep::SERVER, &data);
}

/// Appends an `NBD_REP_INFO` reply carrying `NBD_INFO_EXPORT`.
pub fn put_info_export(out: &mut BytesMut, option: u32, size: u64, flags: u16) {
    let mut data = [0u8; 12];
    let mut buf = &mut data[..];
    buf.put_u16(info::EXPORT);
    buf.put_u64(size);
    buf.put_u16(flags);
    put_option_reply(out, option, rep::INFO, &data);
}

/// Appends an `NBD_REP_INFO` reply carrying `NBD_INFO_BLOCK_SIZE` with this server's limits.
pub fn put_info_block_size(out: &mut BytesMut, option: u32) {
    let mut data = [0u8; 14];
    let mut buf = &mut data[..];
    buf.put_u16(info::BLOCK_SIZE);
    buf.put_u32(MIN_BLOCK_SIZE);
    buf.put_u32(PREFERRED_BLOCK_SIZE);
    buf.put_u32(MAX_PAYLOAD);
    put_option_reply(out, option, rep::INFO, &data);
}

/// Appends an `NBD_REP_INFO` reply carrying a string item (`NBD_INFO_NAME`,
/// `NBD_INFO_DESCRIPTION`).
pub fn put_info_string(out: &mut BytesMut, option: u32, kind: u16, value: &str) {
    let value = truncate(value, MAX_STRING);
    let mut data = BytesMut::with_capacity(2 + value.len());
    data.put_u16(kind);
    data.put_slice(value.as_bytes());
    put_option_reply(out, option, rep::INFO, &data);
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags and, unless the client
/// negotiated `NBD_FLAG_C_NO_ZEROES`, 124 zeroes.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Bytes {
    let mut out = BytesMut::with_capacity(10 + EXPORT_NAME_ZEROES);
    out.put_u64(size);
    out.put_u16(flags);
    if !no_zeroes {
        out.put_bytes(0, EXPORT_NAME_ZEROES);
    }
    out.freeze()
}

/// A simple reply header: magic, error (0 for success), cookie.
pub fn simple_reply_header(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_HEADER_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_HEADER_LEN];
    let mut buf = &mut out[..];
    buf.put_u32(SIMPLE_REPLY_MAGIC);
    buf.put_u32(error);
    buf.put_u64(cookie);
    out
}

/// `s` cut to at most `max` bytes at a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A length for a 32-bit length field. Every caller bounds its data far below 4 GiB (strings
/// are cut to [`MAX_STRING`]; export names come from the server's own list), so saturating is
/// only a guard.
fn wire_len(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_spell_their_names() {
        assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn request_header_round_trips_and_rejects_bad_magic() {
        let header = RequestHeader {
            flags: cmd_flags::FUA,
            command: Command::Write,
            cookie: 0x0102_0304_0506_0708,
            offset: 4096,
            length: 512,
        };
        let raw = header.encode();
        assert_eq!(RequestHeader::decode(&raw), Ok(header));
        let mut bad = raw;
        bad[0] ^= 0xff;
        assert!(RequestHeader::decode(&bad).is_err());
    }

    #[test]
    fn commands_round_trip() {
        for kind in 0..=9u16 {
            assert_eq!(Command::from_wire(kind).to_wire(), kind);
        }
        assert_eq!(Command::from_wire(8), Command::Unknown(8));
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }

    #[test]
    fn io_errors_map_to_spec_errnos() {
        use std::io::{Error, ErrorKind};
        assert_eq!(
            Errno::from_io(&Error::from(ErrorKind::StorageFull)),
            Errno::NoSpc
        );
        assert_eq!(
            Errno::from_io(&Error::from(ErrorKind::PermissionDenied)),
            Errno::Perm
        );
        assert_eq!(Errno::from_io(&Error::other("boom")), Errno::Io);
    }

    #[test]
    fn export_name_reply_honours_no_zeroes() {
        assert_eq!(export_name_reply(1, 1, true).len(), 10);
        assert_eq!(export_name_reply(1, 1, false).len(), 134);
    }
}
