//! Certificates with a lab-configured lifetime: with `cert_lifetime = 30s`, every component
//! (the CS itself, process servers, targets, hosts, each machine's agent, the vpn-link)
//! renews its certificate over the control stream a third before it expires and goes on
//! working: the lab stays connected and replication ends byte-exact. A certificate that is
//! not renewed is refused once expired, with an error that says so.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use failback_common::enroll::{CsSettings, enroll_once};
use failback_common::identity::{Identity, Role, Site};
use failback_common::tls::{describe_error, fingerprint};
use failback_proto::pb::data::ChecksumRequest;
use failback_proto::pb::data::process_server_data_client::ProcessServerDataClient;
use serde_json::Value;

fn cert_fingerprint(lab: &Path, component: &str) -> String {
    let pem = std::fs::read_to_string(lab.join(format!("data/{component}/identity/cert.pem")))
        .expect("cert");
    fingerprint(&pem).expect("fingerprint")
}

#[test]
fn certificates_renew_before_they_expire_and_an_expired_one_is_refused() {
    failback_common::tls::install_crypto_provider();
    let lab_handle = Lab::up_with_env(
        &["--disk-size", "8MiB", "--machines", "1"],
        &[("FBL_CS__CERT_LIFETIME", "30s")],
    );
    let lab = lab_handle.dir.clone();
    ok(srctl(&lab, &["workload", "start", "vm1", "--rate", "1"]));
    ok(srctl(&lab, &["item", "enable", "vm1"]));
    eventually("vm1 Protected", 60, || {
        show(&lab, "vm1")["state"] == "Protected"
    });
    let first: Vec<(&str, String)> = ["ps-onprem", "azure-target", "esx-1", "vpn"]
        .into_iter()
        .map(|c| (c, cert_fingerprint(&lab, c)))
        .collect();

    // A certificate nobody renews: enrolled by hand, as a stranger with the passphrase would.
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(lab.join("lab.json")).expect("lab.json"))
            .expect("json");
    let settings = CsSettings {
        address: state["cs_api"].as_str().expect("api").into(),
        enroll_address: state["cs_enroll"].as_str().expect("enroll").into(),
        ca_cert: lab.join("data/cs/ca.pem"),
        passphrase_file: Some(lab.join("data/cs/passphrase")),
        ..Default::default()
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let stale = rt
        .block_on(enroll_once(
            &settings,
            &Identity::new(Role::Agent, Site::Onprem, "never-renews"),
        ))
        .expect("enroll");
    let ps = infra(&lab, "ps-onprem")["address"]
        .as_str()
        .expect("address")
        .to_string();
    // A call through the PS's TLS: the handshake's verdict shows in the call's status (TLS 1.3
    // verifies the client's certificate after the client considers itself connected).
    let call = |creds: &failback_common::tls::Credentials| -> tonic::Status {
        rt.block_on(async {
            let channel = creds
                .endpoint(&ps, Role::ProcessServer, "ps-onprem")
                .expect("endpoint")
                .connect_lazy();
            ProcessServerDataClient::new(channel)
                .block_checksums(ChecksumRequest {
                    item: "vm1-1".into(),
                    ..Default::default()
                })
                .await
                .expect_err("never assigned to this agent")
        })
    };
    let fresh = call(&stale);
    assert_eq!(
        fresh.code(),
        tonic::Code::PermissionDenied,
        "a fresh certificate gets past TLS (and is then refused the item): {fresh:?}"
    );

    // Every component renews (its certificate on disk changes) and stays connected.
    eventually("every component renewed its certificate", 60, || {
        first.iter().all(|(c, fp)| &cert_fingerprint(&lab, c) != fp)
    });
    let before = now_ms();
    // Past the first certificates' expiry: what is still connected runs on renewed ones.
    std::thread::sleep(Duration::from_secs(12));
    for name in [
        "ps-onprem",
        "mt-onprem",
        "esx-1",
        "azure-target",
        "ps-azure",
        "azure-compute",
        "vpn",
        "vm1",
    ] {
        wait_component(
            &lab,
            name,
            infra(&lab, name)["site"].as_str().unwrap_or("onprem"),
            "connected",
        );
    }
    let logs = std::fs::read_to_string(lab.join("logs/esx-1.log")).expect("log");
    assert!(logs.contains("certificate renewed"), "{logs}");

    // A point taken after the renewals verifies byte-exact (the data plane took the new
    // certificates: each receiver was told the renewed fingerprint).
    verify_point_after(&lab, "vm1", before, "after the renewals");

    // The hand-enrolled certificate was never renewed: expired now. A call is refused before
    // it reaches the PS's service...
    let refused = call(&stale);
    assert_ne!(
        refused.code(),
        tonic::Code::PermissionDenied,
        "an expired certificate got past TLS: {refused:?}"
    );
    // ...and the server's verdict is the `certificate expired` alert, named as such.
    let verdict = rt.block_on(handshake_verdict(&stale, &ps));
    assert!(
        verdict.contains("CertificateExpired")
            && verdict.starts_with("the certificate has expired"),
        "{verdict}"
    );
}

/// A bare TLS handshake with `creds` to the process server at `address` that writes nothing,
/// then a read: TLS 1.3 verifies the client's certificate after the client considers itself
/// connected, so the server's verdict arrives as an alert on that read (or as end of stream
/// if it accepted). A gRPC call writes its HTTP/2 preface at once instead, and the server's
/// close of a connection with unread bytes can be a reset that discards the alert: the race
/// that hid the expiry now and then.
async fn handshake_verdict(creds: &failback_common::tls::Credentials, address: &str) -> String {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::AsyncReadExt;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(creds.ca_pem.as_bytes()) {
        roots.add(ca.expect("CA PEM")).expect("CA");
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(creds.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("certificate PEM");
    let key = PrivateKeyDer::from_pem_slice(creds.key_pem.as_bytes()).expect("key PEM");
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .expect("client certificate");
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = ServerName::try_from(failback_common::identity::dns_name(
        Role::ProcessServer,
        "ps-onprem",
    ))
    .expect("server name");
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let mut tls = match tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
    {
        Ok(tls) => tls,
        Err(e) => return describe_error(&e),
    };
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await {
        Ok(Ok(n)) => format!("accepted: read {n} bytes"),
        Ok(Err(e)) => describe_error(&e),
        Err(_) => "no verdict within 10 s".into(),
    }
}
