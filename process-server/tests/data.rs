//! A real process server (registered with a real CS, on ephemeral ports) refuses bad
//! batches on its data port and caches nothing of them: a corrupted or truncated payload
//! (CRC-32 mismatch), an out-of-order sequence, an agent writing another machine's item, and
//! any agent for an item the CS assigned to nobody here.

use std::time::{Duration, Instant};

use config_server::{ConfigServer, CsConfig};
use failback_common::enroll::{CsSettings, enroll_once};
use failback_common::identity::{Identity, Role, Site};
use failback_common::tls::{Credentials, fingerprint};
use failback_proto::pb::data::{
    AgentBatch, BatchAck, StreamOpen, process_server_data_client::ProcessServerDataClient,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

struct Stream {
    tx: mpsc::Sender<AgentBatch>,
    acks: tonic::Streaming<BatchAck>,
}

async fn open(creds: &Credentials, ps: &str, item: &str) -> Result<(Stream, u64), tonic::Status> {
    let channel = creds
        .endpoint(ps, Role::ProcessServer, "ps-onprem")
        .expect("endpoint")
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (tx, rx) = mpsc::channel(8);
    tx.send(AgentBatch {
        open: Some(StreamOpen { item: item.into() }),
        ..Default::default()
    })
    .await
    .expect("send open");
    let mut acks = ProcessServerDataClient::new(channel)
        .replicate(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = acks.message().await?.expect("first ack");
    Ok((Stream { tx, acks }, first.seq))
}

fn batch(seq: u64, payload: &[u8]) -> AgentBatch {
    AgentBatch {
        open: None,
        seq,
        payload: payload.to_vec().into(),
        crc32: crc32fast::hash(payload),
    }
}

#[tokio::test]
async fn bad_batches_are_refused_and_nothing_is_cached() {
    failback_common::tls::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let enroll = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let api = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let settings = CsSettings {
        address: api.local_addr().expect("addr").to_string(),
        enroll_address: enroll.local_addr().expect("addr").to_string(),
        ca_cert: dir.path().join("cs/ca.pem"),
        passphrase_file: Some(dir.path().join("cs/passphrase")),
        ..Default::default()
    };
    let cs = ConfigServer::open(CsConfig {
        data_dir: dir.path().join("cs"),
        ..CsConfig::default()
    })
    .expect("cs");
    let stop = CancellationToken::new();
    tokio::spawn(cs.serve(enroll, api, stop.clone()));

    // The agents, and the item vm7-1 assigned to vm7's certificate, as a route the CS set
    // earlier and the PS saved (its `routes.json`); the target is never reached in this test.
    let agent = enroll_once(&settings, &Identity::new(Role::Agent, Site::Onprem, "vm7"))
        .await
        .expect("enroll agent");
    let other = enroll_once(&settings, &Identity::new(Role::Agent, Site::Onprem, "vm8"))
        .await
        .expect("enroll agent");
    std::fs::create_dir_all(dir.path().join("ps")).expect("mkdir");
    let route = serde_json::json!({"vm7-1": {
        "target": "azure-target",
        "address": "127.0.0.1:9",
        "source": {"name": "vm7", "fingerprint": fingerprint(&agent.cert_pem).expect("fp")},
    }});
    std::fs::write(dir.path().join("ps/routes.json"), route.to_string()).expect("routes");

    let ps_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let ps_addr = ps_listener.local_addr().expect("addr").to_string();
    let config = process_server::PsConfig {
        name: "ps-onprem".into(),
        site: Site::Onprem,
        data_dir: dir.path().join("ps"),
        cs: settings.clone(),
        ..Default::default()
    };
    tokio::spawn(process_server::run(config, ps_listener, stop.clone()));

    // Wait for the PS data port (it serves once registered).
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut s, last) = loop {
        match open(&agent, &ps_addr, "vm7-1").await {
            Ok(x) => break x,
            Err(e) => {
                assert!(Instant::now() < deadline, "PS not serving: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(last, 0);
    s.tx.send(batch(1, b"good batch")).await.expect("send");
    assert_eq!(s.acks.message().await.expect("ack").expect("ack").seq, 1);

    // A corrupted payload: refused with data loss, nothing cached.
    let mut bad = batch(2, b"second batch");
    bad.crc32 ^= 1;
    s.tx.send(bad).await.expect("send");
    let err = s
        .acks
        .message()
        .await
        .expect_err("corrupted batch must be refused");
    assert_eq!(err.code(), tonic::Code::DataLoss);
    assert!(
        err.message().contains("failed its checksum"),
        "{}",
        err.message()
    );

    // A truncated payload (the CRC was of the whole): refused the same way.
    let (mut s, last) = open(&agent, &ps_addr, "vm7-1").await.expect("reopen");
    assert_eq!(last, 1, "the corrupted batch must not be cached");
    let mut truncated = batch(2, b"second batch, whole");
    truncated.payload = truncated.payload.slice(..6);
    s.tx.send(truncated).await.expect("send");
    let err = s
        .acks
        .message()
        .await
        .expect_err("truncated batch must be refused");
    assert_eq!(err.code(), tonic::Code::DataLoss);

    // Out of order: refused, naming the expected sequence.
    let (mut s, last) = open(&agent, &ps_addr, "vm7-1").await.expect("reopen");
    assert_eq!(last, 1);
    s.tx.send(batch(5, b"from the future")).await.expect("send");
    let err = s.acks.message().await.expect_err("gap must be refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("expected 2"), "{}", err.message());
    let (_s, last) = open(&agent, &ps_addr, "vm7-1").await.expect("reopen");
    assert_eq!(last, 1, "nothing of the refused batches was cached");

    // Another agent can't write vm7's item; vm7 can't write an item nobody assigned.
    let err = open(&other, &ps_addr, "vm7-1")
        .await
        .err()
        .expect("must be refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("assigned it to `vm7`"),
        "{}",
        err.message()
    );
    let err = open(&agent, &ps_addr, "vm7-2")
        .await
        .err()
        .expect("must be refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("no sender"), "{}", err.message());
    let (_s, last) = open(&agent, &ps_addr, "vm7-1").await.expect("reopen");
    assert_eq!(last, 1, "nothing of the refused streams was cached");
    stop.cancel();
}
