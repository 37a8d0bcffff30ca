//! What a server trusts, and for how long: the lab CA, minus revoked certificates.
//!
//! Every mutual-TLS listener of a component verifies client certificates with
//! [`RevokingVerifier`]: the lab CA's chain and validity (an expired certificate fails the
//! handshake with `certificate expired`), then the certificate's SHA-256 fingerprint against
//! the revocations the configuration server sent over the control session (a revoked one
//! fails with `certificate revoked`). [`Trust::revoke`] also cuts the connections a revoked
//! certificate still has open, so its streams end at once rather than at their next
//! reconnect.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio_util::sync::CancellationToken;

pub use crate::certs::fingerprint_der;

/// Revoked fingerprints and the open connections of each certificate, shared by a server's
/// listeners and the control session that learns about revocations.
#[derive(Default)]
pub struct Trust {
    revoked: RwLock<HashSet<String>>,
    open: Mutex<HashMap<u64, (String, CancellationToken)>>,
    next_id: AtomicU64,
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Trust {
    pub fn new() -> Arc<Trust> {
        Arc::new(Trust::default())
    }

    pub fn is_revoked(&self, fingerprint: &str) -> bool {
        read(&self.revoked).contains(fingerprint)
    }

    /// Adds `fingerprints` to the revoked set and cuts every open connection of theirs.
    /// Returns how many connections were cut.
    pub fn revoke<I: IntoIterator<Item = String>>(&self, fingerprints: I) -> usize {
        let new: Vec<String> = {
            let mut revoked = self.revoked.write().unwrap_or_else(|p| p.into_inner());
            fingerprints
                .into_iter()
                .filter(|f| revoked.insert(f.to_ascii_lowercase()))
                .collect()
        };
        if new.is_empty() {
            return 0;
        }
        let open = lock(&self.open);
        let mut cut = 0;
        for (fp, token) in open.values() {
            if new.iter().any(|n| n.eq_ignore_ascii_case(fp)) {
                token.cancel();
                cut += 1;
            }
        }
        if cut > 0 {
            tracing::warn!(
                connections = cut,
                "cut the connections of revoked certificates"
            );
        }
        cut
    }

    /// Records an open connection of the certificate `fingerprint`, cut by `token` when it is
    /// revoked; the returned id is passed to [`Trust::closed`] when the connection ends. A
    /// certificate revoked between its handshake and now is cut at once.
    pub fn opened(&self, fingerprint: String, token: CancellationToken) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if self.is_revoked(&fingerprint) {
            token.cancel();
        }
        lock(&self.open).insert(id, (fingerprint, token));
        id
    }

    pub fn closed(&self, id: u64) {
        lock(&self.open).remove(&id);
    }

    /// How many connections are open (what the connection cap counts, for tests and metrics).
    pub fn open_connections(&self) -> usize {
        lock(&self.open).len()
    }
}

/// The lab CA's client verifier, refusing revoked certificates as well.
#[derive(Debug)]
pub struct RevokingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust: Arc<TrustRef>,
}

/// `Trust` behind a `Debug` the rustls traits require.
pub struct TrustRef(pub Arc<Trust>);

impl std::fmt::Debug for TrustRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Trust")
    }
}

impl RevokingVerifier {
    /// A verifier requiring a client certificate that chains to `ca_pem`.
    pub fn new(ca_pem: &str, trust: Arc<Trust>) -> Result<Arc<Self>, String> {
        let mut roots = rustls::RootCertStore::empty();
        let ca = crate::certs::pem_to_der(ca_pem)?;
        roots
            .add(CertificateDer::from(ca))
            .map_err(|e| format!("bad CA certificate: {e}"))?;
        let inner = WebPkiClientVerifier::builder(Arc::new(roots))
            .build()
            .map_err(|e| format!("cannot build the client verifier: {e}"))?;
        Ok(Arc::new(RevokingVerifier {
            inner,
            trust: Arc::new(TrustRef(trust)),
        }))
    }
}

impl ClientCertVerifier for RevokingVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let fp = fingerprint_der(end_entity.as_ref());
        if self.trust.0.is_revoked(&fp) {
            tracing::warn!(fingerprint = %fp, "refused a revoked client certificate");
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoking_cuts_only_that_certificates_connections() {
        let trust = Trust::new();
        let (a, b) = (CancellationToken::new(), CancellationToken::new());
        let ida = trust.opened("aa".into(), a.clone());
        trust.opened("bb".into(), b.clone());
        assert_eq!(trust.revoke(["AA".to_string()]), 1);
        assert!(a.is_cancelled() && !b.is_cancelled());
        assert!(trust.is_revoked("aa"));
        // Revoking again cuts nothing more; a closed connection is forgotten.
        assert_eq!(trust.revoke(["aa".to_string()]), 0);
        trust.closed(ida);
        assert_eq!(trust.open_connections(), 1);
        // A connection of a revoked certificate registered late is cut at once.
        let late = CancellationToken::new();
        trust.opened("aa".into(), late.clone());
        assert!(late.is_cancelled());
    }
}
