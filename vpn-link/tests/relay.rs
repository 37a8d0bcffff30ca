//! End-to-end tests of vpn-link over real sockets on ephemeral ports: byte-exact relaying
//! and counting, link down/up, the control gRPC API, and config errors (library and binary).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use failback_proto::pb::link::link_control_client::LinkControlClient;
use failback_proto::pb::link::{LinkStatusRequest, SetUpRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use vpn_link::Site;

/// An echo server on an ephemeral port: echoes each connection until EOF, then closes.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// Sends `msg` and expects it echoed back through the link.
async fn round_trip(stream: &mut TcpStream, msg: &[u8]) {
    stream.write_all(msg).await.expect("write");
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(PROMPTLY, stream.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("echo read");
    assert_eq!(back, msg);
}

/// Asserts the relay reset the connection: a read fails with ECONNRESET promptly (a clean
/// FIN would read as EOF; data would mean the link let it through).
async fn assert_reset(stream: &mut TcpStream) {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(PROMPTLY, stream.read(&mut buf)).await {
        Err(_) => panic!("connection still open"),
        Ok(Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(Ok(0)) => panic!("connection closed with FIN, expected a reset"),
        Ok(Ok(n)) => panic!("got {n} bytes through a down link"),
    }
}

#[tokio::test]
async fn relays_bytes_exactly_and_counts_each_direction() {
    const LEN: usize = 1024 * 1024;
    let echo = echo_server().await;
    let link = start_link(Site::Onprem, echo).await;

    let payload: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
    let stream = TcpStream::connect(link.route).await.expect("connect");
    let (mut r, mut w) = stream.into_split();
    let to_send = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&to_send).await?;
        w.shutdown().await // half-close: the echo server then finishes and closes
    });
    let mut back = Vec::with_capacity(LEN);
    tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut back))
        .await
        .expect("echo completes")
        .expect("read to end");
    writer.await.expect("writer task").expect("write");
    assert_eq!(back.len(), LEN);
    assert!(back == payload, "echoed bytes differ");

    let len = LEN as u64;
    eventually(&link.handle, "counters", |s| {
        s.bytes_onprem_to_azure == len
            && s.bytes_azure_to_onprem == len
            && s.active_connections == 0
    })
    .await;
    let status = link.handle.status();
    assert!(status.up);
    assert_eq!(status.total_connections, 1);
    let route = &status.routes[0];
    assert_eq!(
        (route.bytes_forward, route.bytes_backward),
        (len, len),
        "{route:?}"
    );
    assert_eq!(route.from_site, "onprem");
    assert_eq!(route.listen, link.route.to_string());
    link.stop().await;
}

#[tokio::test]
async fn azure_route_counts_forward_as_azure_to_onprem() {
    let echo = echo_server().await;
    let link = start_link(Site::Azure, echo).await;
    let mut s = TcpStream::connect(link.route).await.expect("connect");
    round_trip(&mut s, b"hello onprem").await;
    eventually(&link.handle, "counters", |st| {
        st.bytes_azure_to_onprem == 12 && st.bytes_onprem_to_azure == 12
    })
    .await;
    link.stop().await;
}

#[tokio::test]
async fn link_down_resets_connections_and_refuses_new_ones_until_up() {
    let echo = echo_server().await;
    let link = start_link(Site::Onprem, echo).await;

    let mut active = TcpStream::connect(link.route).await.expect("connect");
    round_trip(&mut active, b"before").await;
    eventually(&link.handle, "one active", |s| s.active_connections == 1).await;

    link.handle.set_up(false);
    assert_reset(&mut active).await;
    eventually(&link.handle, "none active", |s| s.active_connections == 0).await;

    let before = link.handle.status();
    assert!(!before.up);
    // The relay still accepts while down, then resets at once: no data crosses.
    let mut refused = TcpStream::connect(link.route)
        .await
        .expect("connect while down");
    assert_reset(&mut refused).await;
    let after = link.handle.status();
    assert_eq!(after.total_connections, before.total_connections);
    assert_eq!(after.bytes_onprem_to_azure, before.bytes_onprem_to_azure);

    link.handle.set_up(true);
    let mut restored = TcpStream::connect(link.route)
        .await
        .expect("connect after up");
    round_trip(&mut restored, b"after").await;
    assert!(link.handle.status().up);
    link.stop().await;
}

#[tokio::test]
async fn failed_dial_closes_the_accepted_connection() {
    // A port with nothing listening: bind, read the port, close.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr")
    };
    let link = start_link(Site::Onprem, closed).await;
    let mut s = TcpStream::connect(link.route).await.expect("connect");
    assert_reset(&mut s).await;
    eventually(&link.handle, "none active", |st| st.active_connections == 0).await;
    link.stop().await;
}

#[tokio::test]
async fn control_api_reports_health_status_and_sets_the_link() {
    let echo = echo_server().await;
    let link = start_link(Site::Azure, echo).await;
    let endpoint = format!("http://{}", link.control);

    // Wait for readiness through the health service.
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    let channel = loop {
        if let Ok(c) = Channel::from_shared(endpoint.clone())
            .expect("endpoint uri")
            .connect()
            .await
        {
            break c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "control API never came up"
        );
        tokio::time::sleep(POLL).await;
    };
    let serving = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "failback.link.v1.LinkControl".into(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status;
    assert_eq!(serving, ServingStatus::Serving as i32);

    let mut client = LinkControlClient::new(channel);
    let mut s = TcpStream::connect(link.route).await.expect("connect route");
    round_trip(&mut s, b"ping").await;
    eventually(&link.handle, "counters", |st| st.bytes_onprem_to_azure == 4).await;

    let status = client
        .status(LinkStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert!(status.up);
    assert_eq!(status.routes.len(), 1);
    assert_eq!(status.routes[0].name, "r");
    assert_eq!(status.routes[0].from_site, "azure");
    assert_eq!(
        (status.bytes_azure_to_onprem, status.bytes_onprem_to_azure),
        (4, 4)
    );

    let down = client
        .set_up(SetUpRequest { up: false })
        .await
        .expect("set down")
        .into_inner();
    assert!(!down.up);
    assert!(!link.handle.status().up);
    assert_reset(&mut s).await;

    let up = client
        .set_up(SetUpRequest { up: true })
        .await
        .expect("set up")
        .into_inner();
    assert!(up.up);
    let mut again = TcpStream::connect(link.route).await.expect("reconnect");
    round_trip(&mut again, b"pong").await;
    link.stop().await;
}

const BAD_SITE: &str = r#"
control_listen = "127.0.0.1:0"
[[route]]
name = "cs-enroll"
from_site = "mars"
listen = "127.0.0.1:0"
connect = "cs:443"
"#;

#[test]
fn bad_from_site_names_key_and_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("link.toml");
    std::fs::write(&path, BAD_SITE).expect("write config");
    let msg = vpn_link::config::load(Some(&path))
        .expect_err("must refuse mars")
        .to_string();
    assert!(msg.contains("route[0].from_site"), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("mars"), "{msg}");
}

#[test]
fn binary_exits_2_on_bad_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("link.toml");
    std::fs::write(&path, BAD_SITE).expect("write config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vpn-link"))
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run vpn-link");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("route[0].from_site"), "{stderr}");
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
}

#[test]
fn binary_exits_1_naming_route_and_address_when_listen_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("link.toml");
    let config = format!(
        "control_listen = \"127.0.0.1:0\"\n[cs]\naddress = \"127.0.0.1:1\"\nenroll_address = \"127.0.0.1:1\"\nca_cert = \"ca.pem\"\n[[route]]\nname = \"ps-data\"\nfrom_site = \"onprem\"\nlisten = \"{addr}\"\nconnect = \"127.0.0.1:1\"\n"
    );
    std::fs::write(&path, config).expect("write config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vpn-link"))
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run vpn-link");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("ps-data") && stderr.contains(&addr.to_string()),
        "{stderr}"
    );
}
