//! What every component does at start: enroll once (or load its credentials), open the
//! control stream to the CS, and describe itself (addresses, datastores) in its `Hello`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use failback_proto::pb::control::{Datastore, Hello};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::control::{ControlHandle, HelloFn};
use crate::enroll::{CsSettings, EnrollError, ensure_enrolled};
use crate::identity::{CS_NAME, Identity, Role, Site};
use crate::renewal::CredentialsCell;

/// A datastore a component sees: a directory (a volume in containers).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatastoreConfig {
    pub name: String,
    pub path: PathBuf,
}

impl DatastoreConfig {
    /// The datastore as reported to the CS, with capacity and free space of its filesystem.
    pub fn describe(&self) -> Datastore {
        let (capacity, free) = nix::sys::statvfs::statvfs(&self.path)
            .map(|s| {
                let frag = s.fragment_size();
                (s.blocks() * frag, s.blocks_available() * frag)
            })
            .unwrap_or((0, 0));
        Datastore {
            name: self.name.clone(),
            path: self.path.display().to_string(),
            capacity_bytes: capacity,
            free_bytes: free,
        }
    }
}

/// The addresses a component advertises: per site it can be reached from. Defaults to its
/// bound address for its own site.
pub fn advertised(
    advertise: &BTreeMap<String, String>,
    site: Site,
    bound: Option<std::net::SocketAddr>,
) -> std::collections::HashMap<String, String> {
    let mut out: std::collections::HashMap<String, String> =
        advertise.clone().into_iter().collect();
    if let Some(b) = bound {
        out.entry(site.to_string()).or_insert_with(|| b.to_string());
    }
    out
}

/// A base `Hello` for `identity`.
pub fn hello(identity: &Identity) -> Hello {
    Hello {
        name: identity.name.clone(),
        role: identity.role.to_string(),
        site: identity.site.to_string(),
        version: crate::VERSION.to_string(),
        ..Default::default()
    }
}

/// A component that has its credentials and a running control stream.
pub struct Registered {
    /// The component's credentials, renewed over the control stream before they expire.
    pub credentials: CredentialsCell,
    /// Revoked certificates, kept current over the control stream: what the component's
    /// listeners refuse.
    pub trust: std::sync::Arc<crate::trust::Trust>,
    pub control: ControlHandle,
    pub task: tokio::task::JoinHandle<()>,
}

/// Enrolls (first start) or loads credentials from `data_dir`, then opens the control stream.
pub async fn register(
    identity: &Identity,
    data_dir: &Path,
    cs: &CsSettings,
    hello: HelloFn,
    shutdown: &CancellationToken,
) -> Result<Registered, EnrollError> {
    std::fs::create_dir_all(data_dir).map_err(|source| {
        EnrollError::Credentials(crate::tls::CredentialsError::Write {
            path: data_dir.to_path_buf(),
            source,
        })
    })?;
    let credentials = ensure_enrolled(data_dir, cs, identity, shutdown).await?;
    let credentials = CredentialsCell::new(credentials, Some(data_dir.to_path_buf()))?;
    // A bad address is refused now rather than retried forever.
    credentials
        .endpoint(&cs.address, Role::ConfigServer, CS_NAME)
        .map_err(|e| EnrollError::BadAddress {
            address: cs.address.clone(),
            message: e.to_string(),
        })?;
    let trust = crate::trust::Trust::new();
    let dial = crate::control::Dial {
        cell: credentials.clone(),
        address: cs.address.clone(),
    };
    let (control, task) = crate::control::spawn(dial, hello, trust.clone(), shutdown.child_token());
    Ok(Registered {
        credentials,
        trust,
        control,
        task,
    })
}

impl Registered {
    /// How the component's listener secures and bounds its connections: its certificate,
    /// client certificates from the lab CA that the CS has not revoked, `limits`.
    pub fn secured(
        &self,
        limits: crate::listener::ConnLimits,
    ) -> Result<crate::server::Secured, crate::tls::CredentialsError> {
        Ok(crate::server::Secured::new(
            self.credentials.server_config(self.trust.clone())?,
            self.trust.clone(),
            limits,
        ))
    }
}

/// Checks the settings every component shares; errors name the key.
pub fn validate_common(
    file: Option<&Path>,
    name: &str,
    cs: &CsSettings,
    listener: &crate::listener::ConnLimits,
) -> Result<(), crate::config::ConfigError> {
    use crate::config::ConfigError;
    crate::identity::validate_name(name).map_err(|m| ConfigError::key(file, "name", m))?;
    listener
        .validate()
        .map_err(|(k, m)| ConfigError::key(file, format!("listener.{k}"), m))?;
    if cs.address.is_empty() {
        return Err(ConfigError::key(
            file,
            "cs.address",
            "required: the configuration server's API address",
        ));
    }
    if cs.enroll_address.is_empty() {
        return Err(ConfigError::key(
            file,
            "cs.enroll_address",
            "required: the configuration server's enrollment address",
        ));
    }
    if cs.ca_cert.as_os_str().is_empty() {
        return Err(ConfigError::key(
            file,
            "cs.ca_cert",
            "required: the lab CA certificate file",
        ));
    }
    Ok(())
}
