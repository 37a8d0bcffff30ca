//! A minimal hand-written NBD client (fixed newstyle negotiation, simple replies) over any
//! stream: a Unix socket, or a TLS stream after `NBD_OPT_STARTTLS`. It probes the server's
//! edges that the third-party clients never reach.
//!
//! The client's constants are written out here from the protocol document
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>), not taken from the
//! crate, so a wrong constant in the server can't agree with itself.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

/// What the client talks over.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

pub const NBDMAGIC: u64 = 0x4e42444d41474943;
pub const IHAVEOPT: u64 = 0x49484156454f5054;
pub const REPLY_MAGIC: u64 = 0x3e889045565a9;
pub const REQUEST_MAGIC: u32 = 0x25609513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x67446698;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const C_FIXED_NEWSTYLE: u32 = 1;
pub const C_NO_ZEROES: u32 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TF_HAS_FLAGS: u16 = 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1;
pub const CMD_FLAG_NO_HOLE: u16 = 2;
pub const CMD_FLAG_DF: u16 = 4;

pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ESHUTDOWN: u32 = 108;

pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// How long the client waits for any one answer before failing the test.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A reply to a transmission request.
#[derive(Debug)]
pub struct Reply {
    pub error: u32,
    pub cookie: u64,
    pub data: Vec<u8>,
}

/// An option reply.
#[derive(Debug)]
pub struct OptionReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

impl OptionReply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// A minimal NBD client: fixed newstyle negotiation, simple replies.
pub struct Client {
    pub stream: Box<dyn Stream>,
}

impl Client {
    /// Reads the greeting on a freshly connected stream, without answering it.
    pub async fn greeted(stream: impl Stream + 'static) -> Self {
        let mut client = Self {
            stream: Box::new(stream),
        };
        assert_eq!(client.u64().await, NBDMAGIC);
        assert_eq!(client.u64().await, IHAVEOPT);
        let flags = client.u16().await;
        assert_eq!(flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        client
    }

    /// Connects to a Unix socket and reads the greeting, without answering it.
    pub async fn connect_raw(socket: &Path) -> Self {
        Self::greeted(UnixStream::connect(socket).await.expect("connect")).await
    }

    /// Answers the greeting with fixed newstyle and no zeroes.
    pub async fn send_flags(&mut self) {
        self.send(&(C_FIXED_NEWSTYLE | C_NO_ZEROES).to_be_bytes())
            .await;
    }

    /// Connects to a Unix socket and answers the greeting with fixed newstyle and no zeroes.
    pub async fn connect(socket: &Path) -> Self {
        let mut client = Self::connect_raw(socket).await;
        client.send_flags().await;
        client
    }

    /// Connects and enters transmission on `name` with NBD_OPT_GO; returns (size, flags).
    pub async fn go(socket: &Path, name: &str) -> (Self, u64, u16) {
        let mut client = Self::connect(socket).await;
        let (size, flags) = client.opt_go(name).await.expect("GO succeeds");
        (client, size, flags)
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    pub async fn exact(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        tokio::time::timeout(PATIENCE, self.stream.read_exact(&mut buf))
            .await
            .expect("server answers in time")
            .expect("read");
        buf
    }

    pub async fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.exact(2).await.try_into().expect("2 bytes"))
    }

    pub async fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.exact(4).await.try_into().expect("4 bytes"))
    }

    pub async fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.exact(8).await.try_into().expect("8 bytes"))
    }

    /// An option as sent: header and data.
    pub fn option_bytes(option: u32, data: &[u8]) -> Vec<u8> {
        let mut msg = Vec::new();
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        msg
    }

    pub async fn option(&mut self, option: u32, data: &[u8]) {
        self.send(&Self::option_bytes(option, data)).await;
    }

    pub async fn option_reply(&mut self) -> OptionReply {
        assert_eq!(self.u64().await, REPLY_MAGIC, "option reply magic");
        let option = self.u32().await;
        let kind = self.u32().await;
        let len = self.u32().await;
        assert!(len <= 1 << 20, "option reply of {len} bytes");
        let data = self.exact(len as usize).await;
        OptionReply { option, kind, data }
    }

    /// Sends an option and returns its single reply.
    pub async fn ask(&mut self, option: u32, data: &[u8]) -> OptionReply {
        self.option(option, data).await;
        let reply = self.option_reply().await;
        assert_eq!(reply.option, option, "reply names the option");
        reply
    }

    /// NBD_OPT_INFO / NBD_OPT_GO data: name and information requests.
    pub fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut data = Vec::new();
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for request in requests {
            data.extend_from_slice(&request.to_be_bytes());
        }
        data
    }

    /// Sends INFO or GO; returns the NBD_REP_INFO items by type, or the final error reply.
    pub async fn info_or_go(
        &mut self,
        option: u32,
        name: &str,
        requests: &[u16],
    ) -> Result<BTreeMap<u16, Vec<u8>>, OptionReply> {
        self.option(option, &Self::info_data(name, requests)).await;
        let mut items = BTreeMap::new();
        loop {
            let reply = self.option_reply().await;
            assert_eq!(reply.option, option);
            match reply.kind {
                REP_INFO => {
                    let kind = u16::from_be_bytes([reply.data[0], reply.data[1]]);
                    let previous = items.insert(kind, reply.data[2..].to_vec());
                    assert!(previous.is_none(), "info {kind} sent twice");
                }
                REP_ACK => return Ok(items),
                _ => return Err(reply),
            }
        }
    }

    pub async fn opt_go(&mut self, name: &str) -> Result<(u64, u16), OptionReply> {
        let items = self.info_or_go(OPT_GO, name, &[INFO_BLOCK_SIZE]).await?;
        let export = items.get(&INFO_EXPORT).expect("NBD_INFO_EXPORT before ACK");
        assert_eq!(export.len(), 10);
        let size = u64::from_be_bytes(export[..8].try_into().expect("8 bytes"));
        let flags = u16::from_be_bytes([export[8], export[9]]);
        Ok((size, flags))
    }

    pub fn request_bytes(flags: u16, command: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut msg = Vec::with_capacity(28);
        msg.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        msg.extend_from_slice(&flags.to_be_bytes());
        msg.extend_from_slice(&command.to_be_bytes());
        msg.extend_from_slice(&cookie.to_be_bytes());
        msg.extend_from_slice(&offset.to_be_bytes());
        msg.extend_from_slice(&len.to_be_bytes());
        msg
    }

    pub async fn request(&mut self, flags: u16, command: u16, cookie: u64, offset: u64, len: u32) {
        self.send(&Self::request_bytes(flags, command, cookie, offset, len))
            .await;
    }

    pub async fn write(&mut self, flags: u16, cookie: u64, offset: u64, data: &[u8]) {
        let mut msg = Self::request_bytes(flags, CMD_WRITE, cookie, offset, data.len() as u32);
        msg.extend_from_slice(data);
        self.send(&msg).await;
    }

    /// Reads one simple reply; `read_len` is the payload a successful reply carries (the
    /// length of the READ it answers, 0 otherwise).
    pub async fn reply(&mut self, read_len: usize) -> Reply {
        assert_eq!(self.u32().await, SIMPLE_REPLY_MAGIC, "simple reply magic");
        let error = self.u32().await;
        let cookie = self.u64().await;
        let data = if error == 0 && read_len > 0 {
            self.exact(read_len).await
        } else {
            Vec::new()
        };
        Reply {
            error,
            cookie,
            data,
        }
    }

    /// A request and its reply, alone on the connection.
    pub async fn call(&mut self, flags: u16, command: u16, offset: u64, len: u32) -> Reply {
        self.request(flags, command, 7, offset, len).await;
        let read_len = if command == CMD_READ { len as usize } else { 0 };
        let reply = self.reply(read_len).await;
        assert_eq!(reply.cookie, 7, "reply carries the request's cookie");
        reply
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> Reply {
        self.call(0, CMD_READ, offset, len).await
    }

    /// Waits for the server to close the connection; returns how long that took.
    pub async fn expect_closed(&mut self, within: Duration) -> Duration {
        let start = Instant::now();
        let mut buf = [0u8; 64];
        match tokio::time::timeout(within, self.stream.read(&mut buf)).await {
            Err(_) => panic!("connection still open after {within:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => start.elapsed(),
            Ok(Ok(n)) => panic!("unexpected {n} bytes before the close: {:?}", &buf[..n]),
        }
    }
}
