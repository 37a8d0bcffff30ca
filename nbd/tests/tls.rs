//! NBD over TCP with TLS required (`nbds://`), mutual TLS, clients authorized by their
//! certificates: judged by libnbd's `nbdinfo` and `nbdcopy` (Debian's `libnbd-bin`, GnuTLS)
//! with certificates made by rcgen, and by the hand-written client over tokio-rustls where a
//! tool can't reach (the option replies, withdrawing an open connection's authorization, the
//! connection limit).
//!
//! libnbd 1.14 reports an option error as "server replied with error to opt_go request:
//! Operation not supported" and prints the server's message only in its debug output
//! (`LIBNBD_DEBUG=1`: "handshake: server error message: ..."), so the tests that check the
//! server's words read that.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::client::*;
use common::tls::{Ca, Leaf, Pki, TlsServer, starttls, upgrade};
use common::{describe, json, judge, random_bytes};
use failback_nbd::Authorized;
use rustls::pki_types::CertificateDer;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1024 * 1024;
/// The server's words to a client without TLS.
const TLS_REQUIRED: &str =
    "TLS is required on this server: connect with nbds:// and the lab's certificates";
/// The policy's words to a client whose certificate is not an operator's.
const NOT_OPERATOR: &str = "operator role required: this certificate belongs to an agent";
/// Enough connections for nbdcopy's several.
const MAX_CONNECTIONS: usize = 16;
/// libnbd's debug output, which carries the server's option error messages.
const LIBNBD_DEBUG: [(&str, &str); 1] = [("LIBNBD_DEBUG", "1")];

/// The lab's operators: the only client certificates the policy authorizes. Every
/// authorization is recorded (its token, to withdraw it) and its guard reports its drop.
#[derive(Clone)]
struct Operators {
    certificates: Arc<Vec<CertificateDer<'static>>>,
    asked: Arc<AtomicUsize>,
    granted: Arc<Mutex<Vec<CancellationToken>>>,
    dropped: mpsc::UnboundedSender<usize>,
}

/// Reports the drop of the guard of authorization number `.0`.
struct Guard(usize, mpsc::UnboundedSender<usize>);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.1.send(self.0);
    }
}

impl Operators {
    fn new(operators: &[&Leaf]) -> (Self, mpsc::UnboundedReceiver<usize>) {
        let (dropped, drops) = mpsc::unbounded_channel();
        let operators = Self {
            certificates: Arc::new(operators.iter().map(|leaf| leaf.cert.clone()).collect()),
            asked: Arc::new(AtomicUsize::new(0)),
            granted: Arc::new(Mutex::new(Vec::new())),
            dropped,
        };
        (operators, drops)
    }

    fn authorize(&self, chain: &[CertificateDer<'static>]) -> Result<Authorized, String> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        if !self.certificates.contains(&chain[0]) {
            return Err(NOT_OPERATOR.to_owned());
        }
        let token = CancellationToken::new();
        let mut granted = self.granted.lock().expect("lock");
        granted.push(token.clone());
        let guard = Guard(granted.len() - 1, self.dropped.clone());
        Ok(Authorized {
            token,
            guard: Some(Box::new(guard)),
        })
    }

    /// The token of authorization number `index`.
    fn token(&self, index: usize) -> CancellationToken {
        self.granted.lock().expect("lock")[index].clone()
    }

    fn asked(&self) -> usize {
        self.asked.load(Ordering::SeqCst)
    }
}

/// A server for `disks` whose policy authorizes `operators` only.
async fn start(
    disks: &[(&str, u64)],
    pki: &Pki,
    operators: &Operators,
    max_connections: usize,
) -> TlsServer {
    let policy = operators.clone();
    TlsServer::start(disks, pki, max_connections, move |chain| {
        policy.authorize(chain)
    })
    .await
}

/// The number of the next authorization whose guard is dropped.
async fn next_drop(drops: &mut mpsc::UnboundedReceiver<usize>) -> usize {
    tokio::time::timeout(PATIENCE, drops.recv())
        .await
        .expect("a guard dropped in time")
        .expect("guards outlive the test's sender")
}

fn all_zero(path: &Path) -> bool {
    std::fs::read(path)
        .expect("read backing file")
        .iter()
        .all(|&b| b == 0)
}

/// Runs nbdcopy from `from` to `to`.
async fn nbdcopy(from: &str, to: &str) -> std::process::Output {
    judge("nbdcopy", "libnbd-bin", &["--flush", from, to], &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbds_clients_with_an_operator_certificate_read_and_write() {
    let size = 12 * MIB + 4096;
    let pki = Pki::new();
    let operator = pki.ca.client("operator");
    let (operators, _drops) = Operators::new(&[&operator]);
    let server = start(&[("disk0", size), ("disk1", MIB)], &pki, &operators, 64).await;
    let certs = operator.write_libnbd_dir(&server.dir.path().join("operator"), &pki.ca);

    let uri = server.uri("disk0", &certs);
    let output = judge("nbdinfo", "libnbd-bin", &["--json", &uri], &[]).await;
    assert!(output.status.success(), "nbdinfo: {}", describe(&output));
    let info = json(&output);
    assert_eq!(info["TLS"], true, "{info}");
    assert_eq!(info["exports"][0]["export-name"], "disk0", "{info}");
    assert_eq!(info["exports"][0]["export-size"], size, "{info}");

    let any = server.uri("", &certs);
    let output = judge("nbdinfo", "libnbd-bin", &["--list", "--json", &any], &[]).await;
    assert!(
        output.status.success(),
        "nbdinfo --list: {}",
        describe(&output)
    );
    let listed = json(&output);
    let mut names: Vec<&str> = listed["exports"]
        .as_array()
        .expect("exports array")
        .iter()
        .map(|e| e["export-name"].as_str().expect("export-name"))
        .collect();
    names.sort();
    assert_eq!(names, ["disk0", "disk1"], "{listed}");

    let data = random_bytes(size as usize);
    let source = server.dir.path().join("source.img");
    std::fs::write(&source, &data).expect("write source");
    let output = nbdcopy(source.to_str().expect("utf-8 path"), &uri).await;
    assert!(output.status.success(), "nbdcopy in: {}", describe(&output));
    assert!(
        std::fs::read(server.lab.path("disk0")).expect("read backing") == data,
        "the backing file differs from the copied image"
    );
    let copy = server.dir.path().join("copy.img");
    std::fs::File::create(&copy).expect("create copy");
    let output = nbdcopy(&uri, copy.to_str().expect("utf-8 path")).await;
    assert!(
        output.status.success(),
        "nbdcopy out: {}",
        describe(&output)
    );
    assert!(
        std::fs::read(&copy).expect("read copy") == data,
        "the image copied back out over nbds:// differs"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_nbd_is_told_that_tls_is_required() {
    let pki = Pki::new();
    let (operators, _drops) = Operators::new(&[]);
    let server = start(&[("disk0", MIB)], &pki, &operators, MAX_CONNECTIONS).await;

    let uri = server.plain_uri("disk0");
    let output = judge("nbdinfo", "libnbd-bin", &[&uri], &LIBNBD_DEBUG).await;
    assert!(
        !output.status.success(),
        "nbdinfo succeeded: {}",
        describe(&output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("server error message: {TLS_REQUIRED}")),
        "the server's TLS message missing: {}",
        describe(&output)
    );
    assert!(
        stderr.contains("server replied with error to opt_go request"),
        "{}",
        describe(&output)
    );

    let source = server.dir.path().join("source.img");
    std::fs::write(&source, vec![0x5a; MIB as usize]).expect("write source");
    let output = nbdcopy(source.to_str().expect("utf-8 path"), &uri).await;
    assert!(
        !output.status.success(),
        "nbdcopy succeeded: {}",
        describe(&output)
    );
    assert!(all_zero(&server.lab.path("disk0")), "written without TLS");
    assert_eq!(operators.asked(), 0, "authorize called without TLS");
    server.stop().await;
}

#[tokio::test]
async fn options_before_tls_get_the_forcedtls_replies() {
    let pki = Pki::new();
    let (operators, _drops) = Operators::new(&[]);
    let server = start(&[("disk0", MIB)], &pki, &operators, MAX_CONNECTIONS).await;

    let mut client = server.connect_raw().await;
    client.send_flags().await;
    for option in [OPT_LIST, OPT_STRUCTURED_REPLY, 0x4242] {
        let reply = client.ask(option, b"").await;
        assert_eq!(reply.kind, REP_ERR_TLS_REQD, "option {option}: {reply:?}");
        assert_eq!(reply.text(), TLS_REQUIRED);
    }
    for option in [OPT_INFO, OPT_GO] {
        let refused = client
            .info_or_go(option, "disk0", &[])
            .await
            .expect_err("no export before TLS");
        assert_eq!(refused.kind, REP_ERR_TLS_REQD, "{refused:?}");
    }
    let reply = client.ask(OPT_STARTTLS, b"junk").await;
    assert_eq!(reply.kind, REP_ERR_INVALID, "{reply:?}");
    // ABORT is acknowledged, then the server closes.
    let reply = client.ask(OPT_ABORT, b"").await;
    assert_eq!(reply.kind, REP_ACK);
    client.expect_closed(PATIENCE).await;

    // EXPORT_NAME can't be refused: the connection is closed.
    let mut client = server.connect_raw().await;
    client.send_flags().await;
    client.option(OPT_EXPORT_NAME, b"disk0").await;
    client.expect_closed(PATIENCE).await;

    // Bytes sent after STARTTLS ahead of its acknowledgement: closed, no handshake.
    let mut client = server.connect_raw().await;
    client.send_flags().await;
    let mut pipelined = Client::option_bytes(OPT_STARTTLS, b"");
    pipelined.extend_from_slice(b"not a TLS ClientHello");
    client.send(&pipelined).await;
    let reply = client.option_reply().await;
    assert_eq!((reply.option, reply.kind), (OPT_STARTTLS, REP_ACK));
    client.expect_closed(PATIENCE).await;

    // After the upgrade the greeting is not repeated; a second STARTTLS is invalid.
    let operator = pki.ca.client("operator");
    drop(operators);
    server.stop().await;
    let (operators, _drops) = Operators::new(&[&operator]);
    let server = start(&[("disk0", MIB)], &pki, &operators, MAX_CONNECTIONS).await;
    let mut client = server.connect_tls(&pki, &operator).await;
    let reply = client.ask(OPT_STARTTLS, b"").await;
    assert_eq!(reply.kind, REP_ERR_INVALID, "{reply:?}");
    assert_eq!(reply.text(), "TLS is already in use");
    let (size, _) = client.opt_go("disk0").await.expect("GO over TLS");
    assert_eq!(size, MIB);
    assert_eq!(client.read(0, 4096).await.error, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_of_another_ca_fails_the_handshake() {
    let pki = Pki::new();
    let other = Ca::new("Some other CA");
    // Same name and purpose as a real operator, but another CA vouches for it.
    let stranger = other.client("operator");
    let (operators, _drops) = Operators::new(&[&stranger]);
    let server = start(&[("disk0", MIB)], &pki, &operators, MAX_CONNECTIONS).await;
    let certs = stranger.write_libnbd_dir(&server.dir.path().join("stranger"), &pki.ca);
    let uri = server.uri("disk0", &certs);

    let output = judge("nbdinfo", "libnbd-bin", &[&uri], &[]).await;
    assert!(
        !output.status.success(),
        "nbdinfo succeeded: {}",
        describe(&output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("gnutls"),
        "not a TLS failure: {}",
        describe(&output)
    );

    let source = server.dir.path().join("source.img");
    std::fs::write(&source, vec![0x5a; MIB as usize]).expect("write source");
    let output = nbdcopy(source.to_str().expect("utf-8 path"), &uri).await;
    assert!(
        !output.status.success(),
        "nbdcopy succeeded: {}",
        describe(&output)
    );

    // GnuTLS sends no certificate the server's CA list doesn't name; rustls sends it anyway,
    // and the server's verifier must reject it. With TLS 1.3 the client's side of the
    // handshake may complete before the server has checked the certificate: then the
    // rejection comes instead of the next answer.
    let mut plain = server.connect_raw().await;
    plain.send_flags().await;
    if let Ok(mut client) = starttls(plain, &pki, &stranger).await {
        let _ = client
            .stream
            .write_all(&Client::option_bytes(OPT_LIST, b""))
            .await;
        client.expect_closed(PATIENCE).await;
    }

    assert!(all_zero(&server.lab.path("disk0")), "a stranger wrote");
    assert_eq!(
        operators.asked(),
        0,
        "authorize called for an unverified chain"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthorized_certificate_is_told_the_policy_message() {
    let pki = Pki::new();
    let operator = pki.ca.client("operator");
    let agent = pki.ca.client("agent");
    let (operators, _drops) = Operators::new(&[&operator]);
    let server = start(&[("disk0", MIB)], &pki, &operators, MAX_CONNECTIONS).await;
    let certs = agent.write_libnbd_dir(&server.dir.path().join("agent"), &pki.ca);
    let uri = server.uri("disk0", &certs);

    let output = judge("nbdinfo", "libnbd-bin", &[&uri], &LIBNBD_DEBUG).await;
    assert!(
        !output.status.success(),
        "nbdinfo succeeded: {}",
        describe(&output)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stdout.contains("with TLS"),
        "TLS not used: {}",
        describe(&output)
    );
    assert!(
        stderr.contains(&format!("server error message: {NOT_OPERATOR}")),
        "the policy's message missing: {}",
        describe(&output)
    );

    let source = server.dir.path().join("source.img");
    std::fs::write(&source, vec![0x5a; MIB as usize]).expect("write source");
    let output = nbdcopy(source.to_str().expect("utf-8 path"), &uri).await;
    assert!(
        !output.status.success(),
        "nbdcopy succeeded: {}",
        describe(&output)
    );
    assert!(all_zero(&server.lab.path("disk0")), "an agent wrote");

    // Every option but ABORT is refused with the policy's message, STARTTLS included.
    let mut client = server.connect_tls(&pki, &agent).await;
    for option in [OPT_LIST, OPT_STARTTLS, OPT_STRUCTURED_REPLY] {
        let reply = client.ask(option, b"").await;
        assert_eq!(reply.kind, REP_ERR_POLICY, "option {option}: {reply:?}");
        assert_eq!(reply.text(), NOT_OPERATOR);
    }
    let refused = client.opt_go("disk0").await.expect_err("GO refused");
    assert_eq!(
        (refused.kind, refused.text()),
        (REP_ERR_POLICY, NOT_OPERATOR.to_owned())
    );
    assert_eq!(client.ask(OPT_ABORT, b"").await.kind, REP_ACK);
    client.expect_closed(PATIENCE).await;
    // EXPORT_NAME can't be refused: the connection is closed.
    let mut client = server.connect_tls(&pki, &agent).await;
    client.option(OPT_EXPORT_NAME, b"disk0").await;
    client.expect_closed(PATIENCE).await;
    server.stop().await;
}

#[tokio::test]
async fn withdrawing_an_authorization_ends_its_connection_and_drops_its_guard() {
    let pki = Pki::new();
    let operator = pki.ca.client("operator");
    let (operators, mut drops) = Operators::new(&[&operator]);
    let server = start(&[("disk0", MIB)], &pki, &operators, MAX_CONNECTIONS).await;
    let export = server.lab.export("disk0");

    // In transmission: what is in flight is answered ESHUTDOWN, then the server closes.
    let mut client = server.connect_tls(&pki, &operator).await;
    client.opt_go("disk0").await.expect("GO");
    let mut bystander = server.connect_tls(&pki, &operator).await;
    bystander.opt_go("disk0").await.expect("GO");
    assert_eq!(client.read(0, 4096).await.error, 0);
    export.stall_reads.store(true, Ordering::SeqCst);
    client.request(0, CMD_READ, 1, 0, 4096).await;
    operators.token(0).cancel();
    let reply = client.reply(4096).await;
    assert_eq!((reply.cookie, reply.error), (1, ESHUTDOWN));
    export.stall_reads.store(false, Ordering::SeqCst);
    assert_eq!(client.read(0, 4096).await.error, ESHUTDOWN);
    client
        .expect_closed(failback_nbd::SHUTDOWN_LINGER + PATIENCE)
        .await;
    assert_eq!(next_drop(&mut drops).await, 0);
    // Another connection's authorization stands.
    assert_eq!(bystander.read(0, 4096).await.error, 0);

    // During the negotiation: closed at once.
    let mut negotiating = server.connect_tls(&pki, &operator).await;
    let reply = negotiating.ask(0x4242, b"").await;
    assert_eq!(reply.kind, REP_ERR_UNSUP, "{reply:?}");
    operators.token(2).cancel();
    negotiating.expect_closed(PATIENCE).await;
    assert_eq!(next_drop(&mut drops).await, 2);

    // The bystander's guard goes when its connection does.
    bystander.request(0, CMD_DISC, 3, 0, 0).await;
    bystander.expect_closed(PATIENCE).await;
    assert_eq!(next_drop(&mut drops).await, 1);
    server.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_at_once() {
    let pki = Pki::new();
    let (operators, _drops) = Operators::new(&[]);
    let server = start(&[("disk0", MIB)], &pki, &operators, 2).await;

    // Two connections are served (they get the greeting) and stay open, negotiating.
    let first = server.connect_raw().await;
    let _second = server.connect_raw().await;
    // The third is closed without a greeting.
    let stream = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let mut third = Client {
        stream: Box::new(stream),
    };
    third.expect_closed(PATIENCE).await;

    // Once one of the two leaves, a new connection is served again.
    drop(first);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut stream = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("connect");
        let mut magic = [0u8; 8];
        let read = tokio::io::AsyncReadExt::read_exact(&mut stream, &mut magic);
        if let Ok(Ok(_)) = tokio::time::timeout(PATIENCE, read).await {
            assert_eq!(u64::from_be_bytes(magic), NBDMAGIC);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no slot freed after a client left"
        );
        tokio::task::yield_now().await;
    }
    // Shutdown closes connections still waiting in the greeting: serve_tcp returns.
    server.stop().await;
}

/// The hand-written client's TLS upgrade agrees with a reference server, nbdkit with
/// `--tls=require --tls-verify-peer` and the same certificates: the replies the tests above
/// demand of this server before and after TLS are the ones nbdkit gives.
#[tokio::test]
async fn the_tls_test_client_agrees_with_the_reference_server() {
    let pki = Pki::new();
    let operator = pki.ca.client("operator");
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("server");
    std::fs::create_dir_all(&certs).expect("mkdir");
    std::fs::write(certs.join("ca-cert.pem"), pki.ca.pem()).expect("write");
    std::fs::write(certs.join("server-cert.pem"), &pki.server.cert_pem).expect("write");
    std::fs::write(certs.join("server-key.pem"), &pki.server.key_pem).expect("write");
    let socket = dir.path().join("nbdkit.sock");
    let socket_arg = socket.to_str().expect("utf-8 path");
    let _nbdkit = tokio::process::Command::new("nbdkit")
        .args(["-f", "--log=null", "-U", socket_arg])
        .args(["--tls=require", "--tls-verify-peer"])
        .arg(format!("--tls-certificates={}", certs.display()))
        .args(["memory", "size=1M"])
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("nbdkit: {e}; install Debian's `nbdkit` package (scripts/test-deps)")
        });
    let deadline = Instant::now() + PATIENCE;
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "nbdkit did not listen on {socket:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut client = Client::connect(&socket).await;
    let reply = client.ask(OPT_LIST, b"").await;
    assert_eq!(reply.kind, REP_ERR_TLS_REQD, "{reply:?}");
    let refused = client.opt_go("").await.expect_err("no export before TLS");
    assert_eq!(refused.kind, REP_ERR_TLS_REQD, "{refused:?}");
    let mut client = upgrade(client, &pki, &operator).await;
    let reply = client.ask(OPT_STARTTLS, b"").await;
    assert_eq!(reply.kind, REP_ERR_INVALID, "{reply:?}");
    let (size, _) = client.opt_go("").await.expect("GO over TLS");
    assert_eq!(size, MIB);
    client.write(CMD_FLAG_FUA, 1, 0, &[7; 512]).await;
    assert_eq!(client.reply(0).await.error, 0);
    assert_eq!(client.read(0, 512).await.data, vec![7; 512]);
    client.request(0, CMD_DISC, 3, 0, 0).await;
    client.expect_closed(PATIENCE).await;
}
