//! The process server (PS): the data relay between mobility agents and a master target.
//!
//! An on-premises PS (`ps-onprem`) carries forward replication; a temporary one in Azure
//! (`ps-azure`) carries failback replication across the VPN link. It registers with the CS,
//! keeps its control stream, and serves its data port (mutual TLS, agents only) with a gRPC
//! health service for readiness.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use failback_common::component::{advertised, hello, register, validate_common};
use failback_common::config::ConfigError;
use failback_common::enroll::CsSettings;
use failback_common::identity::{Identity, Role, Site};
use failback_proto::pb::control::Hello;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// `process-server --config FILE` (env `FBL_PS__*`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PsConfig {
    pub name: String,
    pub site: Site,
    /// Identity and cache live here.
    pub data_dir: PathBuf,
    /// Data port (ASR: 9443).
    pub listen: String,
    /// Address per site the data port is reached from (e.g. through the VPN link).
    pub advertise: BTreeMap<String, String>,
    pub cs: CsSettings,
}

impl Default for PsConfig {
    fn default() -> Self {
        PsConfig {
            name: "ps-onprem".into(),
            site: Site::Onprem,
            data_dir: PathBuf::from("ps-data"),
            listen: "127.0.0.1:9443".into(),
            advertise: BTreeMap::new(),
            cs: CsSettings::default(),
        }
    }
}

impl PsConfig {
    pub fn load(file: Option<&Path>) -> Result<PsConfig, ConfigError> {
        let cfg: PsConfig = failback_common::config::load(file, "FBL_PS")?;
        validate_common(file, &cfg.name, &cfg.cs)?;
        Ok(cfg)
    }
}

/// Registers with the CS and serves the data port on `listener` until `shutdown`.
pub async fn run(
    config: PsConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let identity = Identity::new(Role::ProcessServer, config.site, &config.name);
    let addresses = advertised(&config.advertise, config.site, listener.local_addr().ok());
    let base = hello(&identity);
    let hello_fn = Arc::new(move || Hello {
        addresses: addresses.clone(),
        ..base.clone()
    });
    let registered = register(&identity, &config.data_dir, &config.cs, hello_fn, &shutdown).await?;
    let router = failback_common::server::builder(registered.credentials.server_tls())?
        .add_service(failback_common::server::health_service());
    tracing::info!(address = %listener.local_addr()?, "process server ready");
    failback_common::server::serve(router, listener, shutdown).await?;
    Ok(())
}
