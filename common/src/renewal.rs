//! Credentials that change while a component runs: certificates have a lab-configured
//! lifetime and are renewed over the control stream before they expire.
//!
//! A [`CredentialsCell`] holds the current credentials. Listeners present whatever it holds
//! at each handshake (a rustls certificate resolver), clients build their TLS from it at each
//! connect, and [`CredentialsCell::replace`] saves renewed credentials durably before anyone
//! uses them. The control stream (module `control`) asks the CS for a new certificate (a
//! fresh key, a CSR) once less than the CS's `renew_within` remains.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tonic::transport::Endpoint;

use crate::identity::{Identity, Role};
use crate::tls::{Credentials, CredentialsError};
use crate::trust::{RevokingVerifier, Trust};

struct Current {
    credentials: Arc<Credentials>,
    certified: Arc<CertifiedKey>,
    not_after_ms: i64,
}

/// The component's credentials as they are now; cheap to clone (shared).
#[derive(Clone)]
pub struct CredentialsCell {
    current: Arc<RwLock<Current>>,
    /// Where renewed credentials are saved (`None`: kept in memory, as the CS's own).
    data_dir: Option<PathBuf>,
}

fn bad(reason: String) -> CredentialsError {
    CredentialsError::BadCertificate {
        path: PathBuf::from("cert.pem"),
        reason,
    }
}

fn current_of(credentials: Credentials) -> Result<Current, CredentialsError> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(credentials.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| bad(format!("bad certificate PEM: {e}")))?;
    let leaf = chain.first().ok_or_else(|| bad("no certificate".into()))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| bad(format!("unparsable certificate: {e}")))?;
    let not_after_ms = parsed.validity().not_after.timestamp() * 1000;
    let key = PrivateKeyDer::from_pem_slice(credentials.key_pem.as_bytes())
        .map_err(|e| bad(format!("bad key PEM: {e}")))?;
    // Also checks that the key is the certificate's.
    let certified = CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider())
        .map_err(|e| bad(format!("certificate and key do not belong together: {e}")))?;
    Ok(Current {
        credentials: Arc::new(credentials),
        certified: Arc::new(certified),
        not_after_ms,
    })
}

impl CredentialsCell {
    /// Holds `credentials`; renewed ones are saved under `data_dir` (if any).
    pub fn new(
        credentials: Credentials,
        data_dir: Option<PathBuf>,
    ) -> Result<CredentialsCell, CredentialsError> {
        Ok(CredentialsCell {
            current: Arc::new(RwLock::new(current_of(credentials)?)),
            data_dir,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The credentials now.
    pub fn get(&self) -> Arc<Credentials> {
        self.read().credentials.clone()
    }

    pub fn identity(&self) -> Identity {
        self.read().credentials.identity.clone()
    }

    /// When the current certificate expires (Unix ms).
    pub fn not_after_ms(&self) -> i64 {
        self.read().not_after_ms
    }

    /// Replaces the credentials (same identity; the key must be the certificate's), saving
    /// them first: a renewed certificate is never used before it is on disk.
    pub fn replace(&self, credentials: Credentials) -> Result<(), CredentialsError> {
        let found = crate::tls::identity_of_pem(&credentials.cert_pem).map_err(bad)?;
        let expected = self.identity();
        if found != expected {
            return Err(bad(format!(
                "the renewed certificate names {found}, not {expected}"
            )));
        }
        let next = current_of(credentials)?;
        if let Some(dir) = &self.data_dir {
            next.credentials.save(dir)?;
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }

    /// An endpoint for `address` served by the component of `role` named `name`, with the
    /// credentials of this moment.
    pub fn endpoint(
        &self,
        address: &str,
        role: Role,
        name: &str,
    ) -> Result<Endpoint, tonic::transport::Error> {
        self.get().endpoint(address, role, name)
    }

    /// TLS for a mutual-TLS server presenting whatever this cell holds at each handshake;
    /// client certificates from the lab CA, not revoked in `trust`, required.
    pub fn server_config(
        &self,
        trust: Arc<Trust>,
    ) -> Result<Arc<rustls::ServerConfig>, CredentialsError> {
        let verifier = RevokingVerifier::new(&self.get().ca_pem, trust).map_err(bad)?;
        self.config_with(verifier)
    }

    /// TLS for a server that asks for no client certificate (the CS's enrollment port).
    pub fn server_config_without_client_auth(
        &self,
    ) -> Result<Arc<rustls::ServerConfig>, CredentialsError> {
        self.config_with(Arc::new(rustls::server::NoClientAuth))
    }

    fn config_with(
        &self,
        verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    ) -> Result<Arc<rustls::ServerConfig>, CredentialsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CellResolver(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Presents the cell's current certificate.
struct CellResolver(CredentialsCell);

impl std::fmt::Debug for CellResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CellResolver")
    }
}

impl ResolvesServerCert for CellResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().certified.clone())
    }
}
