//! Credentials on disk and the TLS settings built from them.
//!
//! A component's credentials live in `DATA_DIR/identity/` as `cert.pem`, `key.pem` (mode
//! 0600) and `ca.pem`. Servers require a client certificate from the lab CA (client auth is
//! never optional on the mutual-TLS ports) that is not revoked ([`crate::trust`]); clients
//! verify the server's DNS name `NAME.ROLE.failback.lab` (its role as well as its name), so a
//! relayed address (through vpn-link) still verifies.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

pub use crate::certs::{fingerprint, pem_to_der};
use crate::identity::{Identity, Role, dns_name};
use crate::trust::{RevokingVerifier, Trust};

/// Installs the process-wide rustls crypto provider (ring). Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A component's key, its certificate from the lab CA, and the CA certificate.
#[derive(Clone)]
pub struct Credentials {
    pub identity: Identity,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// Errors reading or writing credentials.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate in {path} is not a lab certificate: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error(
        "certificate in {path} names {found}, but this component is configured as {expected}; \
         fix `name`/`site` in the config or remove {dir} to enroll again"
    )]
    WrongIdentity {
        path: PathBuf,
        dir: PathBuf,
        found: Identity,
        expected: Identity,
    },
}

impl Credentials {
    pub fn dir(data_dir: &Path) -> PathBuf {
        data_dir.join("identity")
    }

    /// Loads credentials saved by an earlier enrollment, or `None` if there are none.
    pub fn load(
        data_dir: &Path,
        expected: &Identity,
    ) -> Result<Option<Credentials>, CredentialsError> {
        Self::load_checked(data_dir, |found| found == expected, expected)
    }

    /// Loads credentials of any identity of `role` (an operator's, whatever its name).
    pub fn load_role(data_dir: &Path, role: Role) -> Result<Option<Credentials>, CredentialsError> {
        let example = Identity::new(role, crate::identity::Site::Onprem, "NAME");
        Self::load_checked(data_dir, |found| found.role == role, &example)
    }

    fn load_checked(
        data_dir: &Path,
        accept: impl Fn(&Identity) -> bool,
        expected: &Identity,
    ) -> Result<Option<Credentials>, CredentialsError> {
        let dir = Self::dir(data_dir);
        let cert_path = dir.join("cert.pem");
        if !cert_path.exists() {
            return Ok(None);
        }
        let read = |p: PathBuf| {
            std::fs::read_to_string(&p).map_err(|source| CredentialsError::Read { path: p, source })
        };
        let cert_pem = read(cert_path.clone())?;
        let key_pem = read(dir.join("key.pem"))?;
        let ca_pem = read(dir.join("ca.pem"))?;
        let identity =
            identity_of_pem(&cert_pem).map_err(|reason| CredentialsError::BadCertificate {
                path: cert_path.clone(),
                reason,
            })?;
        if !accept(&identity) {
            return Err(CredentialsError::WrongIdentity {
                path: cert_path,
                dir,
                found: identity,
                expected: expected.clone(),
            });
        }
        Ok(Some(Credentials {
            identity,
            cert_pem,
            key_pem,
            ca_pem,
        }))
    }

    /// Writes the credentials atomically (the certificate last, so its presence means complete).
    pub fn save(&self, data_dir: &Path) -> Result<(), CredentialsError> {
        let dir = Self::dir(data_dir);
        private_dir(&dir).map_err(|source| CredentialsError::Write {
            path: dir.clone(),
            source,
        })?;
        write_private(&dir.join("key.pem"), &self.key_pem)?;
        write_atomic(&dir.join("ca.pem"), &self.ca_pem)?;
        write_atomic(&dir.join("cert.pem"), &self.cert_pem)?;
        Ok(())
    }

    /// TLS for a mutual-TLS server: our certificate; client certificates from the lab CA,
    /// not revoked in `trust`, required.
    pub fn server_config(
        &self,
        trust: Arc<Trust>,
    ) -> Result<Arc<rustls::ServerConfig>, CredentialsError> {
        let verifier = RevokingVerifier::new(&self.ca_pem, trust).map_err(|reason| {
            CredentialsError::BadCertificate {
                path: PathBuf::from("ca.pem"),
                reason,
            }
        })?;
        self.server_config_with(verifier)
    }

    /// TLS for a server that asks for no client certificate (the CS's enrollment port).
    pub fn server_config_without_client_auth(
        &self,
    ) -> Result<Arc<rustls::ServerConfig>, CredentialsError> {
        self.server_config_with(Arc::new(rustls::server::NoClientAuth))
    }

    fn server_config_with(
        &self,
        verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    ) -> Result<Arc<rustls::ServerConfig>, CredentialsError> {
        let bad = |reason: String| CredentialsError::BadCertificate {
            path: PathBuf::from("cert.pem"),
            reason,
        };
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| bad(format!("bad certificate PEM: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| bad(format!("bad key PEM: {e}")))?;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| bad(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// TLS for dialing the component of `role` named `server_name` with our client
    /// certificate: the server must prove both.
    pub fn client_tls(&self, role: Role, server_name: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
            .domain_name(dns_name(role, server_name))
    }

    /// An endpoint for `address` (host:port) served by the component of `role` named
    /// `server_name`, with lab timeouts.
    pub fn endpoint(
        &self,
        address: &str,
        role: Role,
        server_name: &str,
    ) -> Result<Endpoint, tonic::transport::Error> {
        Ok(Endpoint::from_shared(format!("https://{address}"))?
            .tls_config(self.client_tls(role, server_name))?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .initial_stream_window_size(crate::limits::STREAM_WINDOW)
            .initial_connection_window_size(crate::limits::CONNECTION_WINDOW)
            .max_frame_size(crate::limits::MAX_FRAME))
    }
}

/// Reads the identity from a PEM certificate.
pub fn identity_of_pem(cert_pem: &str) -> Result<Identity, String> {
    let der = pem_to_der(cert_pem)?;
    Identity::from_certificate_der(&der)
}

/// Certificate parameters the CA signs for `identity` (also used in the CSR).
pub fn certificate_params(identity: &Identity) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(vec![identity.dns_name()])?;
    params
        .subject_alt_names
        .push(SanType::URI(identity.uri().try_into()?));
    if identity.role == Role::Host {
        // A host's NBD exports over TCP are dialed on loopback by clients (libnbd) that check
        // the server's name against the address dialed: see mobility-agent's `export_tls`.
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        params
            .subject_alt_names
            .push(SanType::DnsName("localhost".try_into()?));
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, identity.name.clone());
    dn.push(DnType::OrganizationalUnitName, identity.role.as_str());
    dn.push(DnType::OrganizationName, "Failback Lab");
    params.distinguished_name = dn;
    Ok(params)
}

/// A fresh key pair and a CSR for `identity`. The private key stays with the caller.
pub fn new_key_and_csr(identity: &Identity) -> Result<(KeyPair, String), rcgen::Error> {
    let key = KeyPair::generate()?;
    let csr = certificate_params(identity)?.serialize_request(&key)?;
    Ok((key, csr.pem()?))
}

fn write_atomic(path: &Path, contents: &str) -> Result<(), CredentialsError> {
    write_durable(path, contents, 0o644)
}

/// Writes a secret readable by the owner only.
pub fn write_private(path: &Path, contents: &str) -> Result<(), CredentialsError> {
    write_durable(path, contents, 0o600)
}

/// Writes `path` whole or not at all, durably ([`crate::durable::write`]).
fn write_durable(path: &Path, contents: &str, mode: u32) -> Result<(), CredentialsError> {
    crate::durable::write(path, contents.as_bytes(), mode).map_err(|source| {
        CredentialsError::Write {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Creates `dir` (and its parents) and makes it the owner's only (0700).
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// A short, actionable description of why a connection failed, walking the error chain
/// (ASR's wording where there is one).
pub fn describe_error(err: &(dyn std::error::Error + 'static)) -> String {
    let mut chain = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        chain.push(e.to_string());
        cur = e.source();
    }
    let all = chain.join(": ");
    if all.contains("CertificateExpired") || all.contains("certificate expired") {
        format!(
            "the certificate has expired: renew it (components renew on their own while \
             connected; one that was off too long enrolls again after `srctl infra remove`) ({all})"
        )
    } else if all.contains("CertificateRevoked") || all.contains("certificate revoked") {
        format!("the certificate was revoked (`srctl infra remove`); enroll again ({all})")
    } else if all.contains("UnknownIssuer") || all.contains("BadSignature") {
        format!("peer certificate cannot be authenticated with given CA certificates ({all})")
    } else if all.contains("NotValidForName") || all.contains("not valid for name") {
        format!(
            "peer certificate is not valid for the name dialed: the server is not the component \
             (name and role) expected ({all})"
        )
    } else if all.contains("Connection refused") {
        format!("couldn't connect to server: connection refused ({all})")
    } else {
        all
    }
}
