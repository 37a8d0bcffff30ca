//! The lab certificate authority, owned by the configuration server.
//!
//! Created on first start and kept in the database (so a backup carries it); valid three
//! years, like ASR's CS certificate. It signs enrollment CSRs with parameters it builds
//! itself from the enrollment request: a CSR can't ask for a role or name of its own choosing.
//! Leaf certificates live as long as the caller says (`cert_lifetime` in the CS config;
//! components renew theirs over the control stream).

use failback_common::identity::Identity;
use failback_common::tls::{Credentials, certificate_params, fingerprint};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::store::{DbError, Store};

/// Why a certificate could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate error: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("stored CA is unusable: {0}")]
    Corrupt(String),
}

/// The CA is valid this long (ASR: the CS certificate is valid three years).
const CA_VALIDITY: std::time::Duration = std::time::Duration::from_secs(3 * 365 * 86_400);

pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// The stored CA, or a new one saved to the store.
    pub fn load_or_create(store: &Store) -> Result<Ca, CaError> {
        let stored =
            store.call_blocking(|db| Ok((db.setting("ca_cert")?, db.setting("ca_key")?)))?;
        if let (Some(cert_pem), Some(key_pem)) = stored {
            let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Corrupt(e.to_string()))?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
                .map_err(|e| CaError::Corrupt(e.to_string()))?;
            return Ok(Ca { cert_pem, issuer });
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Failback Lab CA");
        dn.push(DnType::OrganizationName, "Failback Lab");
        params.distinguished_name = dn;
        set_validity(&mut params, CA_VALIDITY);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let (key_pem, cert) = (key.serialize_pem(), cert_pem.clone());
        store.call_blocking(move |db| {
            db.put_setting("ca_key", &key_pem)?;
            db.put_setting("ca_cert", &cert)
        })?;
        tracing::info!("created the lab certificate authority");
        Ok(Ca {
            cert_pem,
            issuer: Issuer::new(params, key),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Signs `csr_pem` (its signature is verified) for `identity`, valid for `lifetime`;
    /// returns the certificate PEM and its fingerprint.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        lifetime: std::time::Duration,
    ) -> Result<(String, String), CaError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        csr.params = leaf_params(identity, lifetime)?;
        let cert = csr.signed_by(&self.issuer)?;
        let pem = cert.pem();
        let fp = fingerprint(&pem).map_err(CaError::Corrupt)?;
        Ok((pem, fp))
    }

    /// Fresh credentials (key and certificate) for `identity`, valid for `lifetime`: the
    /// CS's own, a failed-over VM's, an operator's.
    pub fn issue(
        &self,
        identity: &Identity,
        lifetime: std::time::Duration,
    ) -> Result<Credentials, CaError> {
        let key = KeyPair::generate()?;
        let cert = leaf_params(identity, lifetime)?.signed_by(&key, &self.issuer)?;
        Ok(Credentials {
            identity: identity.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
        })
    }
}

fn leaf_params(
    identity: &Identity,
    lifetime: std::time::Duration,
) -> Result<CertificateParams, rcgen::Error> {
    let mut params = certificate_params(identity)?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    set_validity(&mut params, lifetime);
    Ok(params)
}

fn set_validity(params: &mut CertificateParams, lifetime: std::time::Duration) {
    let now = OffsetDateTime::now_utc();
    // Tolerate modest clock skew between lab hosts.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::try_from(lifetime).unwrap_or(Duration::days(365));
}
