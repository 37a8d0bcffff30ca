//! Transport limits every lab connection shares, servers and clients alike.

/// HTTP/2 flow-control windows of every lab connection (both ends).
pub const STREAM_WINDOW: u32 = 32 << 20;
pub const CONNECTION_WINDOW: u32 = 64 << 20;
/// Largest gRPC message on the data plane (a 4 MiB batch plus framing, with headroom); also
/// the most a compressed batch may declare it decompresses to.
pub const MAX_MESSAGE: usize = 64 << 20;
/// Largest HTTP/2 frame accepted (the protocol's default, 16 KiB, costs a frame per 16 KiB).
pub const MAX_FRAME: u32 = (1 << 24) - 1;
/// Most concurrent HTTP/2 streams (calls) one connection may have open at a server: a
/// component needs a handful (control session, a data stream per item it serves).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;
