//! Who is calling: roles, sites and the identity a lab certificate carries.
//!
//! A certificate issued by the lab CA names exactly one identity in a URI subject
//! alternative name `failback://ROLE/SITE/NAME`, plus the DNS name `NAME.ROLE.failback.lab`
//! that clients verify when they dial the component: a client dialing a process server
//! accepts only a process server's certificate of that name, never another role's. [`authorize`] reads the caller's identity
//! from the mutual-TLS peer certificate of a request and checks its role; every RPC calls it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tonic::Status;

/// DNS suffix of every lab certificate; `cs.config-server.failback.lab` is the configuration
/// server.
pub const DNS_SUFFIX: &str = "failback.lab";

/// The role a certificate grants. Each RPC accepts a fixed set of roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    ConfigServer,
    ProcessServer,
    MasterTarget,
    /// A mobility-agent process: a hypervisor host (or an Azure compute host) running machines.
    Host,
    /// The mobility agent of one machine.
    Agent,
    /// The simulated site-to-site VPN (its control API serves operators).
    VpnLink,
    Operator,
}

impl Role {
    pub const ALL: [Role; 7] = [
        Role::ConfigServer,
        Role::ProcessServer,
        Role::MasterTarget,
        Role::Host,
        Role::Agent,
        Role::VpnLink,
        Role::Operator,
    ];

    /// Whether the component passphrase may enroll this role. Operators get their
    /// certificates on the CS host (`config-server operator add`), the CS issues its own.
    pub fn enrolls_with_passphrase(self) -> bool {
        matches!(
            self,
            Role::ProcessServer | Role::MasterTarget | Role::Host | Role::Agent | Role::VpnLink
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::ConfigServer => "config-server",
            Role::ProcessServer => "process-server",
            Role::MasterTarget => "master-target",
            Role::Host => "host",
            Role::Agent => "agent",
            Role::VpnLink => "vpn-link",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown role `{s}` (expected one of: {})",
                    Role::ALL.map(Role::as_str).join(", ")
                )
            })
    }
}

/// One of the two sites joined by the VPN link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Site {
    Onprem,
    Azure,
}

impl Site {
    pub fn as_str(self) -> &'static str {
        match self {
            Site::Onprem => "onprem",
            Site::Azure => "azure",
        }
    }

    /// The site on the other end of the VPN link.
    pub fn other(self) -> Site {
        match self {
            Site::Onprem => Site::Azure,
            Site::Azure => Site::Onprem,
        }
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Site {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "onprem" => Ok(Site::Onprem),
            "azure" => Ok(Site::Azure),
            other => Err(format!(
                "unknown site `{other}` (expected `onprem` or `azure`)"
            )),
        }
    }
}

/// The identity a lab certificate names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub role: Role,
    pub site: Site,
    pub name: String,
}

impl Identity {
    pub fn new(role: Role, site: Site, name: impl Into<String>) -> Self {
        Identity {
            role,
            site,
            name: name.into(),
        }
    }

    /// The URI SAN that carries this identity.
    pub fn uri(&self) -> String {
        format!("failback://{}/{}/{}", self.role, self.site, self.name)
    }

    /// The DNS SAN clients check when they dial this component.
    pub fn dns_name(&self) -> String {
        dns_name(self.role, &self.name)
    }

    fn from_uri(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix("failback://")?;
        let mut parts = rest.splitn(3, '/');
        let role = parts.next()?.parse().ok()?;
        let site = parts.next()?.parse().ok()?;
        let name = parts.next()?;
        validate_name(name).ok()?;
        Some(Identity::new(role, site, name))
    }

    /// Reads the identity from a DER certificate issued by the lab CA.
    pub fn from_certificate_der(der: &[u8]) -> Result<Identity, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("unparsable certificate: {e}"))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| format!("bad subject alternative name: {e}"))?
            .ok_or("certificate has no subject alternative name")?;
        san.value
            .general_names
            .iter()
            .find_map(|gn| match gn {
                x509_parser::extensions::GeneralName::URI(u) => Identity::from_uri(u),
                _ => None,
            })
            .ok_or_else(|| "certificate names no failback:// identity".to_string())
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} `{}` ({})", self.role, self.name, self.site)
    }
}

/// The DNS name the component of `role` named `name` is dialed by.
pub fn dns_name(role: Role, name: &str) -> String {
    format!("{}.{role}.{DNS_SUFFIX}", name.to_ascii_lowercase())
}

/// The name of the configuration server's own certificate; no component may take it.
pub const CS_NAME: &str = "cs";

/// Component and machine names: 1-63 characters, letters, digits and `-`, starting with a
/// letter or digit (they become DNS labels).
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok_len = !name.is_empty() && name.len() <= 63;
    let ok_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    let ok_start = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if ok_len && ok_chars && ok_start {
        Ok(())
    } else {
        Err(format!(
            "invalid name `{name}`: use 1-63 letters, digits or '-', starting with a letter or digit"
        ))
    }
}

/// The identity of the mutual-TLS peer of `request`.
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Result<Identity, Status> {
    let certs = request.peer_certs().ok_or_else(|| {
        Status::unauthenticated("no client certificate: enroll with the configuration server first")
    })?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("empty client certificate chain"))?;
    Identity::from_certificate_der(leaf.as_ref()).map_err(Status::unauthenticated)
}

/// The SHA-256 fingerprint of the caller's certificate (lower-case hex), if it sent one.
pub fn peer_fingerprint<T>(request: &tonic::Request<T>) -> Option<String> {
    let certs = request.peer_certs()?;
    certs
        .first()
        .map(|c| crate::certs::fingerprint_der(c.as_ref()))
}

/// The one certificate a receiver accepts data for an item from, as the CS assigned it
/// (`SetRoute.source` at a process server, `PrepareReplica.sender` at a target).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AllowedSender {
    pub name: String,
    pub fingerprint: String,
}

impl From<failback_proto::pb::control::Peer> for AllowedSender {
    fn from(p: failback_proto::pb::control::Peer) -> Self {
        AllowedSender {
            name: p.name,
            fingerprint: p.fingerprint.to_ascii_lowercase(),
        }
    }
}

/// Checks that the caller `who`, whose certificate has `fingerprint` ([`peer_fingerprint`]),
/// is the sender `allowed` for `item` (by name and certificate fingerprint);
/// `PERMISSION_DENIED` naming both otherwise. No assignment at all refuses everyone: a
/// receiver takes nothing for an item the CS has not given it.
pub fn check_sender(
    who: &Identity,
    fingerprint: &str,
    allowed: Option<&AllowedSender>,
    item: &str,
) -> Result<(), Status> {
    let Some(allowed) = allowed.filter(|a| !a.name.is_empty()) else {
        return Err(Status::permission_denied(format!(
            "{who} may not send for item `{item}`: the configuration server has assigned no \
             sender for it here (not yet, or it is not this component's)"
        )));
    };
    let name_ok = who.name == allowed.name;
    let cert_ok = !fingerprint.is_empty() && fingerprint == allowed.fingerprint;
    if name_ok && cert_ok {
        return Ok(());
    }
    tracing::warn!(%who, %item, expected = %allowed.name, "refused a sender not assigned to the item");
    Err(Status::permission_denied(if name_ok {
        format!(
            "{who} may not send for item `{item}`: its certificate is not the one the \
             configuration server assigned (a replaced or older certificate)"
        )
    } else {
        format!(
            "{who} may not send for item `{item}`: the configuration server assigned it to `{}`",
            allowed.name
        )
    }))
}

/// Checks that the caller of `rpc` holds one of `allowed` roles and returns its identity.
pub fn authorize<T>(
    request: &tonic::Request<T>,
    rpc: &str,
    allowed: &[Role],
) -> Result<Identity, Status> {
    let who = peer_identity(request)?;
    if allowed.contains(&who.role) {
        Ok(who)
    } else {
        let roles: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
        Err(Status::permission_denied(format!(
            "{who} may not call {rpc}: it requires role {}",
            roles.join(" or ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trip() {
        let id = Identity::new(Role::ProcessServer, Site::Azure, "ps-azure");
        assert_eq!(Identity::from_uri(&id.uri()), Some(id));
        assert_eq!(Identity::from_uri("failback://boss/azure/x"), None);
        assert_eq!(Identity::from_uri("failback://agent/azure/bad name"), None);
    }

    #[test]
    fn names() {
        assert!(validate_name("vm1-Test").is_ok());
        assert!(validate_name("-x").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name("").is_err());
    }

    #[test]
    fn dns_names_carry_the_role() {
        let ps = Identity::new(Role::ProcessServer, Site::Azure, "PS-Azure");
        assert_eq!(ps.dns_name(), "ps-azure.process-server.failback.lab");
        let same_name = Identity::new(Role::Agent, Site::Azure, "ps-azure");
        assert_ne!(ps.dns_name(), same_name.dns_name());
        assert!(!Role::Operator.enrolls_with_passphrase());
        assert!(!Role::ConfigServer.enrolls_with_passphrase());
        assert!(Role::Agent.enrolls_with_passphrase());
    }
}
