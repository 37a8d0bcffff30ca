//! The TLS side of the harness: a throwaway PKI made with rcgen (a CA, the server's
//! certificate, client certificates; ECDSA P-256 keys, PKCS#8 PEM), written out the way
//! libnbd's `tls-certificates=DIR` reads it, the rustls configurations built from it, and a
//! server on a loopback TCP port serving a [`Lab`] through `serve_tcp`, TLS required.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use failback_nbd::{Authorized, TlsPolicy};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio_util::sync::CancellationToken;

use super::Lab;
use super::client::{Client, OPT_STARTTLS, REP_ACK};

/// The host name clients dial and the server's certificate is checked against: libnbd
/// (GnuTLS) checks an IP address in the URI against the certificate's IP addresses.
pub const HOST: &str = "127.0.0.1";

/// A certificate authority.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    /// A new self-signed CA called `name`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    /// The CA's certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA's certificate, DER.
    pub fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// Issues a certificate for `name` (also its subject alternative names: DNS names or IP
    /// addresses) for `purpose`.
    pub fn issue(&self, name: &str, sans: &[&str], purpose: ExtendedKeyUsagePurpose) -> Leaf {
        let sans: Vec<String> = sans.iter().map(|&s| s.to_owned()).collect();
        let mut params = CertificateParams::new(sans).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![purpose];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        }
    }

    /// A client certificate of this CA.
    pub fn client(&self, name: &str) -> Leaf {
        self.issue(name, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// A certificate and its key.
pub struct Leaf {
    pub cert_pem: String,
    /// PKCS#8 (`BEGIN PRIVATE KEY`).
    pub key_pem: String,
    pub cert: CertificateDer<'static>,
    pub key: PrivatePkcs8KeyDer<'static>,
}

impl Leaf {
    /// Writes this client certificate, its key, and `trusted` (the CA the client checks the
    /// server against) into `dir` as libnbd's `tls-certificates=DIR` reads them.
    pub fn write_libnbd_dir(&self, dir: &Path, trusted: &Ca) -> PathBuf {
        std::fs::create_dir_all(dir).expect("create certificates dir");
        std::fs::write(dir.join("ca-cert.pem"), trusted.pem()).expect("write ca-cert.pem");
        std::fs::write(dir.join("client-cert.pem"), &self.cert_pem).expect("write client-cert");
        std::fs::write(dir.join("client-key.pem"), &self.key_pem).expect("write client-key");
        dir.to_owned()
    }

    /// A rustls client configuration presenting this certificate and trusting `trusted`.
    pub fn client_config(&self, trusted: &Ca) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(trusted.der()).expect("add CA");
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![self.cert.clone()], self.private_key())
            .expect("client config");
        Arc::new(config)
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// Sends NBD_OPT_STARTTLS (after the client's flags), expects its acknowledgement, then
/// runs the TLS handshake presenting `client`'s certificate and checking the server's
/// against the lab's CA. `Err` is the handshake's failure as the client sees it.
pub async fn starttls(mut plain: Client, pki: &Pki, client: &Leaf) -> std::io::Result<Client> {
    let reply = plain.ask(OPT_STARTTLS, b"").await;
    assert_eq!(reply.kind, REP_ACK, "{reply:?}");
    let connector = tokio_rustls::TlsConnector::from(client.client_config(&pki.ca));
    let name = ServerName::try_from(HOST).expect("server name");
    let tls = connector.connect(name, plain.stream).await?;
    Ok(Client {
        stream: Box::new(tls),
    })
}

/// [`starttls`], which must succeed.
pub async fn upgrade(plain: Client, pki: &Pki, client: &Leaf) -> Client {
    starttls(plain, pki, client).await.expect("TLS handshake")
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The lab's PKI: its CA and the NBD server's certificate.
pub struct Pki {
    pub ca: Ca,
    pub server: Leaf,
}

impl Pki {
    pub fn new() -> Self {
        let ca = Ca::new("Failback Lab test CA");
        let server = ca.issue("nbd server", &[HOST], ExtendedKeyUsagePurpose::ServerAuth);
        Self { ca, server }
    }

    /// The server's rustls configuration: its certificate, client certificates of the CA
    /// required. Like the lab's gRPC ports' configuration it names ALPN `h2`, which
    /// `TlsPolicy` clears (NBD clients offer no ALPN).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der()).expect("add CA");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .expect("client verifier");
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.server.cert.clone()], self.server.private_key())
            .expect("server config");
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }
}

/// A server on a loopback TCP port, TLS required, serving a [`Lab`].
pub struct TlsServer {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub lab: Arc<Lab>,
    pub shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl TlsServer {
    /// Starts a server whose lab has `disks` (name, size in bytes), all zero, accepting at
    /// most `max_connections` at once and authorizing clients with `authorize`.
    pub async fn start(
        disks: &[(&str, u64)],
        pki: &Pki,
        max_connections: usize,
        authorize: impl Fn(&[CertificateDer<'static>]) -> Result<Authorized, String>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        super::init_tracing();
        let dir = tempfile::tempdir().expect("tempdir");
        let lab = Arc::new(Lab::new(dir.path(), disks));
        let listener = tokio::net::TcpListener::bind((HOST, 0))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local address");
        let policy = Arc::new(TlsPolicy::new(pki.server_config(), authorize));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(failback_nbd::serve_tcp(
            listener,
            lab.clone(),
            policy,
            max_connections,
            shutdown.clone(),
        ));
        Self {
            dir,
            addr,
            lab,
            shutdown,
            task,
        }
    }

    /// The `nbds://` URI of an export for a client whose certificates are in `certificates`.
    pub fn uri(&self, name: &str, certificates: &Path) -> String {
        format!(
            "nbds://{HOST}:{}/{name}?tls-certificates={}",
            self.addr.port(),
            certificates.display()
        )
    }

    /// The plain `nbd://` URI of an export (no TLS).
    pub fn plain_uri(&self, name: &str) -> String {
        format!("nbd://{HOST}:{}/{name}", self.addr.port())
    }

    /// Connects with the hand-written client and reads the greeting.
    pub async fn connect_raw(&self) -> Client {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect");
        Client::greeted(stream).await
    }

    /// Connects with the hand-written client, upgrades to TLS with `client`'s certificate
    /// (NBD_OPT_STARTTLS, then the handshake), ready for the options over TLS.
    pub async fn connect_tls(&self, pki: &Pki, client: &Leaf) -> Client {
        let mut plain = self.connect_raw().await;
        plain.send_flags().await;
        upgrade(plain, pki, client).await
    }

    /// Cancels the server and waits for its accept loop and connections to end.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server stops within 10 s")
            .expect("server task");
    }
}
