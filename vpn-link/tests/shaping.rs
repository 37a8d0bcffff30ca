//! End-to-end tests of the runtime shaping and faults of vpn-link over real sockets:
//! bandwidth (one bucket per direction for the whole tunnel), latency and jitter (FIFO),
//! down mode stall, one-way blackhole, resetting the connections, flapping, the control API
//! and the `[shaping]` config table. Timing assertions are about rates and ordering, with
//! generous margins.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use failback_proto::pb::link::link_control_client::LinkControlClient;
use failback_proto::pb::link::{
    Blackhole, DownMode as PbDownMode, LinkSettings, ResetConnectionsRequest, SetRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tonic::transport::Channel;
use vpn_link::{DownMode, Settings, Site};

/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(300);
/// 4 Mbit/s in bytes per second.
const CAP: u64 = 500_000;

/// A server on an ephemeral port: sends `greeting` on accept, then echoes until EOF.
async fn echo_server(greeting: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                if w.write_all(greeting).await.is_ok()
                    && tokio::io::copy(&mut r, &mut w).await.is_ok()
                {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// A server that reads each connection to EOF, then answers with the byte count (u64 BE).
async fn sink_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
    let addr = listener.local_addr().expect("sink addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => total += n as u64,
                        Err(_) => return,
                    }
                }
                let _ = s.write_all(&total.to_be_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

async fn read_exactly(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut back = vec![0u8; len];
    tokio::time::timeout(PROMPTLY, stream.read_exact(&mut back))
        .await
        .expect("bytes in time")
        .expect("read");
    back
}

/// Sends `msg` and expects it echoed back through the link.
async fn round_trip(stream: &mut TcpStream, msg: &[u8]) {
    stream.write_all(msg).await.expect("write");
    assert_eq!(read_exactly(stream, msg.len()).await, msg);
}

/// Asserts the relay reset the connection (ECONNRESET, not EOF, no data).
async fn assert_reset(stream: &mut TcpStream) {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(PROMPTLY, stream.read(&mut buf)).await {
        Err(_) => panic!("connection still open"),
        Ok(Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(Ok(0)) => panic!("connection closed with FIN, expected a reset"),
        Ok(Ok(n)) => panic!("got {n} bytes, expected a reset"),
    }
}

/// Asserts nothing arrives (no data, no EOF, no reset) for [`QUIET`].
async fn assert_quiet(stream: &mut TcpStream) {
    let mut buf = [0u8; 64];
    if let Ok(r) = tokio::time::timeout(QUIET, stream.read(&mut buf)).await {
        panic!("expected silence, got {r:?}");
    }
}

/// Sends `len` bytes to a sink through the link, half-closes, and waits for the sink's
/// count; returns when the sink has everything.
async fn send_to_sink(route: SocketAddr, len: usize) {
    let mut s = TcpStream::connect(route).await.expect("connect");
    let payload = vec![7u8; len];
    s.write_all(&payload).await.expect("write");
    s.shutdown().await.expect("half-close");
    let mut count = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut count))
        .await
        .expect("sink answers")
        .expect("read count");
    assert_eq!(u64::from_be_bytes(count), len as u64);
}

#[tokio::test]
async fn bandwidth_cap_paces_a_transfer_and_shows_in_the_rate() {
    const LEN: usize = 2 * 1024 * 1024;
    let sink = sink_server().await;
    let link = start_link(Site::Onprem, sink).await;
    link.set(|s| s.bandwidth = CAP);

    let start = Instant::now();
    let transfer = tokio::spawn(send_to_sink(link.route, LEN));
    // Once the transfer is well under way, the status rate shows the cap.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = link.handle.status();
    let rate = status.rate_onprem_to_azure;
    assert!(
        rate > 0 && rate as f64 <= 1.3 * CAP as f64,
        "rate {rate} B/s against a cap of {CAP} B/s"
    );
    assert_eq!(
        status.settings.and_then(|s| s.bandwidth_bytes_per_sec),
        Some(CAP)
    );
    transfer.await.expect("transfer");
    let elapsed = start.elapsed();
    // 2 MiB at 500 kB/s is 4.2 s.
    assert!(elapsed >= Duration::from_millis(3500), "took {elapsed:?}");
    link.stop().await;
}

#[tokio::test]
async fn two_connections_share_one_cap() {
    const EACH: usize = 768 * 1024;
    let sink = sink_server().await;
    let link = start_link(Site::Azure, sink).await;
    link.set(|s| s.bandwidth = CAP);

    let start = Instant::now();
    let a = tokio::spawn(send_to_sink(link.route, EACH));
    let b = tokio::spawn(send_to_sink(link.route, EACH));
    a.await.expect("a");
    b.await.expect("b");
    let elapsed = start.elapsed().as_secs_f64();
    let total = (2 * EACH) as f64;
    let rate = total / elapsed;
    assert!(
        rate <= 1.15 * CAP as f64,
        "{total} B in {elapsed:.2}s = {rate:.0} B/s against a cap of {CAP} B/s"
    );
    assert_eq!(link.handle.status().bytes_azure_to_onprem, 2 * EACH as u64);
    link.stop().await;
}

#[tokio::test]
async fn latency_delays_each_direction() {
    let echo = echo_server(b"").await;
    let link = start_link(Site::Onprem, echo).await;
    let mut s = TcpStream::connect(link.route).await.expect("connect");
    round_trip(&mut s, b"warm").await;

    link.set(|s| s.latency = Duration::from_millis(100));
    let start = Instant::now();
    round_trip(&mut s, b"ping").await;
    let rtt = start.elapsed();
    assert!(rtt >= Duration::from_millis(200), "round trip {rtt:?}");

    link.set(|s| s.latency = Duration::ZERO);
    let start = Instant::now();
    round_trip(&mut s, b"fast").await;
    assert!(
        start.elapsed() < Duration::from_millis(200),
        "latency lifted"
    );
    link.stop().await;
}

#[tokio::test]
async fn jitter_never_reorders_bytes() {
    const N: u32 = 300;
    let echo = echo_server(b"").await;
    let link = start_link(Site::Onprem, echo).await;
    link.set(|s| {
        s.latency = Duration::from_millis(20);
        s.jitter = Duration::from_millis(20);
    });
    let s = TcpStream::connect(link.route).await.expect("connect");
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        for i in 0..N {
            w.write_all(&i.to_be_bytes()).await.expect("write");
            // Separate chunks, each with its own random delay.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        w
    });
    let mut back = vec![0u8; 4 * N as usize];
    tokio::time::timeout(Duration::from_secs(10), r.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("read");
    let seen: Vec<u32> = back
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(seen, (0..N).collect::<Vec<_>>());
    drop(writer.await.expect("writer"));
    link.stop().await;
}

#[tokio::test]
async fn stall_mode_keeps_connections_and_resumes_after_up() {
    let echo = echo_server(b"").await;
    let link = start_link(Site::Onprem, echo).await;
    link.set(|s| s.down_mode = DownMode::Stall);
    let mut s = TcpStream::connect(link.route).await.expect("connect");
    round_trip(&mut s, b"before").await;

    link.handle.set_up(false);
    s.write_all(b"during").await.expect("write while stalled");
    assert_quiet(&mut s).await;
    let status = link.handle.status();
    assert!(!status.up);
    assert_eq!(status.active_connections, 1, "kept");
    assert_eq!(
        status.bytes_onprem_to_azure, 6,
        "nothing crossed while down"
    );

    // New connections are still refused while down.
    let mut refused = TcpStream::connect(link.route).await.expect("connect");
    assert_reset(&mut refused).await;

    link.handle.set_up(true);
    assert_eq!(read_exactly(&mut s, 6).await, b"during");
    round_trip(&mut s, b"after").await;

    // Switching to down mode reset while stalled resets the stalled connections.
    link.handle.set_up(false);
    link.set(|s| s.down_mode = DownMode::Reset);
    assert_reset(&mut s).await;
    link.stop().await;
}

#[tokio::test]
async fn blackhole_drops_one_direction_only() {
    let echo = echo_server(b"hello").await;
    let link = start_link(Site::Onprem, echo).await;
    link.set(|s| s.blackhole = Some(Site::Onprem));
    let mut s = TcpStream::connect(link.route).await.expect("connect");
    // azure -> onprem flows.
    assert_eq!(read_exactly(&mut s, 5).await, b"hello");
    // onprem -> azure is dropped: the echo server never sees it.
    s.write_all(b"ping").await.expect("write");
    eventually(&link.handle, "ping dropped", |st| {
        st.dropped_onprem_to_azure == 4
    })
    .await;
    assert_quiet(&mut s).await;
    assert_eq!(link.handle.status().bytes_onprem_to_azure, 0);

    // Lifted: the same connection works again (the dropped bytes are gone for good).
    link.set(|s| s.blackhole = None);
    round_trip(&mut s, b"pong").await;

    // The other way: onprem -> azure flows, the echo is dropped.
    link.set(|s| s.blackhole = Some(Site::Azure));
    s.write_all(b"abc").await.expect("write");
    eventually(&link.handle, "echo dropped", |st| {
        st.bytes_onprem_to_azure == 7 && st.dropped_azure_to_onprem == 3
    })
    .await;
    assert_quiet(&mut s).await;
    assert_eq!(link.handle.status().active_connections, 1, "still up");
    link.stop().await;
}

#[tokio::test]
async fn reset_connections_resets_existing_ones_only() {
    let echo = echo_server(b"").await;
    let link = start_link(Site::Azure, echo).await;
    let mut old = TcpStream::connect(link.route).await.expect("connect");
    round_trip(&mut old, b"old").await;
    eventually(&link.handle, "one active", |s| s.active_connections == 1).await;

    link.handle.reset_connections();
    assert_reset(&mut old).await;
    let mut new = TcpStream::connect(link.route).await.expect("connect");
    round_trip(&mut new, b"new").await;
    assert!(link.handle.status().up);
    link.stop().await;
}

#[tokio::test]
async fn flap_alternates_until_switched_off() {
    let echo = echo_server(b"").await;
    let link = start_link(Site::Onprem, echo).await;
    link.set(|s| s.flap = Some(Duration::from_millis(150)));
    eventually(&link.handle, "flapped down", |s| !s.up).await;
    eventually(&link.handle, "flapped up", |s| s.up).await;
    eventually(&link.handle, "flapped down again", |s| !s.up).await;

    // Off leaves the link up.
    link.set(|s| s.flap = None);
    let status = link.handle.status();
    assert!(status.up);
    assert_eq!(status.settings.and_then(|s| s.flap_period_ms), Some(0));
    let mut s = TcpStream::connect(link.route).await.expect("connect");
    round_trip(&mut s, b"steady").await;

    // An explicit down stops flapping too, and stays down.
    link.set(|s| s.flap = Some(Duration::from_millis(100)));
    link.handle.set_up(false);
    assert_eq!(link.handle.settings().flap, None);
    tokio::time::sleep(QUIET).await;
    assert!(!link.handle.status().up);
    link.stop().await;
}

async fn control_client(addr: SocketAddr) -> LinkControlClient<Channel> {
    let endpoint = format!("http://{addr}");
    let deadline = Instant::now() + PROMPTLY;
    loop {
        if let Ok(c) = Channel::from_shared(endpoint.clone())
            .expect("endpoint uri")
            .connect()
            .await
        {
            return LinkControlClient::new(c);
        }
        assert!(Instant::now() < deadline, "control API never came up");
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test]
async fn control_api_sets_merges_clears_and_resets() {
    let echo = echo_server(b"").await;
    let link = start_link(Site::Onprem, echo).await;
    let mut client = control_client(link.control).await;

    let set = |settings: LinkSettings, clear: bool| SetRequest {
        settings: Some(settings),
        clear,
    };
    let st = client
        .set(set(
            LinkSettings {
                latency_ms: Some(30),
                bandwidth_bytes_per_sec: Some(1_250_000),
                down_mode: Some(PbDownMode::Stall as i32),
                ..Default::default()
            },
            false,
        ))
        .await
        .expect("set")
        .into_inner();
    let got = st.settings.expect("settings");
    assert_eq!(got.latency_ms, Some(30));
    assert_eq!(got.bandwidth_bytes_per_sec, Some(1_250_000));
    assert_eq!(got.down_mode, Some(PbDownMode::Stall as i32));
    assert_eq!(got.blackhole, Some(Blackhole::Off as i32));

    // Absent fields are kept.
    let got = client
        .set(set(
            LinkSettings {
                blackhole: Some(Blackhole::AzureToOnprem as i32),
                ..Default::default()
            },
            false,
        ))
        .await
        .expect("merge")
        .into_inner()
        .settings
        .expect("settings");
    assert_eq!(got.latency_ms, Some(30));
    assert_eq!(got.blackhole, Some(Blackhole::AzureToOnprem as i32));
    assert_eq!(link.handle.settings().blackhole, Some(Site::Azure));

    // A bad field names itself and changes nothing.
    let err = client
        .set(set(
            LinkSettings {
                latency_ms: Some(5),
                flap_period_ms: Some(1),
                ..Default::default()
            },
            false,
        ))
        .await
        .expect_err("flap too short");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("flap_period_ms"), "{err:?}");
    assert_eq!(link.handle.settings().latency, Duration::from_millis(30));

    // clear restores the defaults, then applies what is present.
    client
        .set(set(
            LinkSettings {
                jitter_ms: Some(1),
                ..Default::default()
            },
            true,
        ))
        .await
        .expect("clear");
    assert_eq!(
        link.handle.settings(),
        Settings {
            jitter: Duration::from_millis(1),
            ..Settings::default()
        }
    );

    let mut s = TcpStream::connect(link.route).await.expect("connect");
    round_trip(&mut s, b"x").await;
    let st = client
        .reset_connections(ResetConnectionsRequest {})
        .await
        .expect("reset")
        .into_inner();
    assert!(st.up);
    assert_reset(&mut s).await;
    link.stop().await;
}

#[test]
fn binary_names_a_bad_shaping_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("link.toml");
    std::fs::write(
        &path,
        "control_listen = \"127.0.0.1:0\"\n[shaping]\nlatency = \"100ms\"\nbandwidth = \"fast\"\n",
    )
    .expect("write config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vpn-link"))
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run vpn-link");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("shaping.bandwidth"), "{stderr}");
    assert!(stderr.contains("fast"), "{stderr}");
}
