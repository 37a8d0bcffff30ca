//! Enrollment, client side: exchange the lab passphrase and a CSR for a certificate, once.
//!
//! The enrollment port of the configuration server is server-authenticated TLS only; the
//! caller trusts exactly the lab CA it was given (a file, optionally checked against a
//! pinned fingerprint). On later starts the saved credentials are used and nothing is sent.
//! An unreachable CS is retried with backoff (and logged); a refusal (wrong passphrase,
//! duplicate name, bad request) is final and returned.

use std::path::{Path, PathBuf};
use std::time::Duration;

use failback_proto::pb::enroll::{EnrollRequest, enrollment_client::EnrollmentClient};
use serde::Deserialize;
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::identity::{CS_NAME, Identity, Role, dns_name};
use crate::tls::{Credentials, CredentialsError, describe_error, fingerprint, new_key_and_csr};

/// How a component finds and trusts the configuration server (`[cs]` in every config).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct CsSettings {
    /// Mutual-TLS API address of the CS as reachable from this component's site.
    pub address: String,
    /// Enrollment address of the CS (server-authenticated TLS).
    pub enroll_address: String,
    /// The lab CA certificate (PEM) to trust; written by the CS on first start.
    pub ca_cert: PathBuf,
    /// Optional SHA-256 fingerprint the CA file must match (pinning).
    pub ca_fingerprint: Option<String>,
    /// File holding the enrollment passphrase (or give `passphrase`).
    pub passphrase_file: Option<PathBuf>,
    pub passphrase: Option<String>,
}

/// Why enrollment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("cannot read the lab CA certificate {path}: {source}")]
    CaRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the CA certificate {path} has fingerprint {found}, not the pinned {pinned}: \
         it is not this lab's CA"
    )]
    CaMismatch {
        path: PathBuf,
        found: String,
        pinned: String,
    },
    #[error("no passphrase: set `cs.passphrase_file` or `cs.passphrase` in the config")]
    NoPassphrase,
    #[error("cannot read passphrase file {path}: {source}")]
    PassphraseRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration server refused enrollment of {identity}: {message}")]
    Refused { identity: Identity, message: String },
    #[error("bad enrollment address `{address}`: {message}")]
    BadAddress { address: String, message: String },
    #[error("configuration server at {address} unreachable: {message}")]
    Unreachable { address: String, message: String },
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error("cannot create key or CSR: {0}")]
    Key(#[from] rcgen::Error),
    #[error("stopped while waiting for the configuration server")]
    Stopped,
}

impl CsSettings {
    /// The CA certificate, checked against the pinned fingerprint if one is set.
    pub fn read_ca(&self) -> Result<String, EnrollError> {
        let ca = std::fs::read_to_string(&self.ca_cert).map_err(|source| EnrollError::CaRead {
            path: self.ca_cert.clone(),
            source,
        })?;
        if let Some(pinned) = &self.ca_fingerprint {
            let found = fingerprint(&ca).unwrap_or_default();
            if !found.eq_ignore_ascii_case(pinned.trim()) {
                return Err(EnrollError::CaMismatch {
                    path: self.ca_cert.clone(),
                    found,
                    pinned: pinned.clone(),
                });
            }
        }
        Ok(ca)
    }

    fn read_passphrase(&self) -> Result<String, EnrollError> {
        if let Some(p) = &self.passphrase {
            return Ok(p.trim().to_string());
        }
        let path = self
            .passphrase_file
            .as_ref()
            .ok_or(EnrollError::NoPassphrase)?;
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .map_err(|source| EnrollError::PassphraseRead {
                path: path.clone(),
                source,
            })
    }
}

/// One enrollment attempt.
pub async fn enroll_once(
    settings: &CsSettings,
    identity: &Identity,
) -> Result<Credentials, EnrollError> {
    let ca_pem = settings.read_ca()?;
    let passphrase = settings.read_passphrase()?;
    let (key, csr_pem) = new_key_and_csr(identity)?;
    let address = settings.enroll_address.clone();
    let bad = |message: String| EnrollError::BadAddress {
        address: address.clone(),
        message,
    };
    let endpoint = Endpoint::from_shared(format!("https://{address}"))
        .map_err(|e| bad(e.to_string()))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&ca_pem))
                .domain_name(dns_name(Role::ConfigServer, CS_NAME)),
        )
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| EnrollError::Unreachable {
            address: address.clone(),
            message: describe_error(&e),
        })?;
    let response = EnrollmentClient::new(channel)
        .enroll(EnrollRequest {
            name: identity.name.clone(),
            role: identity.role.to_string(),
            site: identity.site.to_string(),
            passphrase,
            csr_pem,
        })
        .await;
    match response {
        Ok(r) => {
            let r = r.into_inner();
            Ok(Credentials {
                identity: identity.clone(),
                cert_pem: r.certificate_pem,
                key_pem: key.serialize_pem(),
                ca_pem: r.ca_certificate_pem,
            })
        }
        // The connection failed or was cut (a listener at its bounds evicts a handshake it
        // could not finish in time, which the caller sees as a cancelled call): try again.
        Err(status)
            if matches!(
                status.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
            ) =>
        {
            Err(EnrollError::Unreachable {
                address,
                message: status.message().to_string(),
            })
        }
        Err(status) => Err(EnrollError::Refused {
            identity: identity.clone(),
            message: status.message().to_string(),
        }),
    }
}

/// Loads saved credentials, or enrolls (retrying while the CS is unreachable) and saves them.
pub async fn ensure_enrolled(
    data_dir: &Path,
    settings: &CsSettings,
    identity: &Identity,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<Credentials, EnrollError> {
    if let Some(creds) = Credentials::load(data_dir, identity)? {
        tracing::info!(%identity, "using saved credentials");
        return Ok(creds);
    }
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match enroll_once(settings, identity).await {
            Ok(creds) => {
                creds.save(data_dir)?;
                tracing::info!(%identity, "enrolled with the configuration server");
                return Ok(creds);
            }
            Err(EnrollError::Unreachable { address, message }) => {
                let wait = backoff.next_delay();
                tracing::warn!(
                    "cannot reach the configuration server at {address} to enroll: {message}; retrying in {wait:?}"
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => return Err(EnrollError::Stopped),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Exponential backoff with jitter, for reconnect loops.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            current: min,
        }
    }

    /// The next wait: the current delay with up to 25 % jitter; the delay then doubles.
    pub fn next_delay(&mut self) -> Duration {
        let jitter = rand::random_range(0.0..0.25);
        let wait = self.current.mul_f64(1.0 + jitter);
        self.current = (self.current * 2).min(self.max);
        wait
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }
}
