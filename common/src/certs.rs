//! Certificates as bytes: PEM to DER, and the SHA-256 fingerprints by which the lab names a
//! certificate (what operators pin, what revocations and data-plane assignments list).

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use sha2::{Digest, Sha256};

/// The DER bytes of the first PEM block.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>, String> {
    match CertificateDer::pem_slice_iter(pem.as_bytes()).next() {
        Some(Ok(der)) => Ok(der.as_ref().to_vec()),
        Some(Err(e)) => Err(format!("bad PEM certificate: {e}")),
        None => Err("no PEM certificate found".into()),
    }
}

/// SHA-256 fingerprint (lower-case hex) of a DER certificate.
pub fn fingerprint_der(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// SHA-256 fingerprint (lower-case hex) of a PEM certificate.
pub fn fingerprint(cert_pem: &str) -> Result<String, String> {
    Ok(fingerprint_der(&pem_to_der(cert_pem)?))
}
