//! The master target (MT): receives replication data from a process server and writes it to
//! replica disks in the datastores it sees, keeping recovery points.
//!
//! Two instances in the default lab: `mt-onprem` (sees `ds-onprem`, receives failback data)
//! and `azure-target` (the Azure-side target storage, datastore `azure-storage`). It registers
//! with the CS (reporting its datastores), keeps its control stream, and serves its data port
//! (mutual TLS, process servers only) with a gRPC health service for readiness.
//!
//! # Layout
//! - [`replica`]: the durable replica store of one item (journal, disks, undo log, points).
//! - [`commands`]: the CS's commands, concurrent across items, in order within one.
//! - [`data`]: the `TargetData` service, the applier, verification.
//! - [`retention`]: which recovery points to keep (ASR's pruning rules).
//! - [`metrics`]: the `flab_mt_*` series of the `/metrics` endpoint.

pub mod commands;
pub mod data;
pub mod metrics;
pub mod replica;
pub mod retention;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use failback_common::component::{DatastoreConfig, advertised, hello, register, validate_common};
use failback_common::config::ConfigError;
use failback_common::enroll::CsSettings;
use failback_common::identity::{Identity, Role, Site};
use failback_proto::pb::control::Hello;
use failback_proto::pb::data::target_data_server::TargetDataServer;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// `master-target --config FILE` (env `FBL_MT__*`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MtConfig {
    pub name: String,
    pub site: Site,
    pub data_dir: PathBuf,
    /// Data port.
    pub listen: String,
    pub advertise: BTreeMap<String, String>,
    pub cs: CsSettings,
    /// Bounds of the data port's connections (`[listener]`: handshake timeout, caps).
    pub listener: failback_common::listener::ConnLimits,
    /// Datastores this MT's host can read and write.
    pub datastore: Vec<DatastoreConfig>,
    /// How a failover creates a VM's disks from the replica (`failover_disks`).
    pub failover_disks: FailoverDisks,
    /// The master target's operating system: it fails back machines of the same. Unset for
    /// Azure's target storage, which takes any machine.
    pub os: Option<failback_common::os::Os>,
    /// Prometheus metrics at `http://ADDRESS/metrics` (empty: none).
    pub metrics_listen: String,
}

/// How the disks of a failed-over (or test) VM are made from the replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum FailoverDisks {
    /// A copy where the datastore's filesystem shares extents (the copy is a reflink), an
    /// overlay over the frozen replica otherwise.
    #[default]
    Auto,
    /// Always a sparse copy of the allocated extents (reflinked where the filesystem can).
    Copy,
    /// Always an overlay sharing the replica's frozen base, where the filesystem allows it.
    Overlay,
}

impl TryFrom<String> for FailoverDisks {
    type Error = String;

    fn try_from(s: String) -> Result<FailoverDisks, String> {
        match s.as_str() {
            "auto" => Ok(FailoverDisks::Auto),
            "copy" => Ok(FailoverDisks::Copy),
            "overlay" => Ok(FailoverDisks::Overlay),
            other => Err(format!(
                "`{other}` is not a way to make failover disks: use auto, copy or overlay"
            )),
        }
    }
}

impl FailoverDisks {
    /// The sharing for disks made in `dir`.
    pub fn share_in(self, dir: &Path) -> replica::Share {
        match self {
            FailoverDisks::Copy => replica::Share::Copy,
            FailoverDisks::Overlay => replica::Share::Freeze,
            FailoverDisks::Auto if failback_common::vdisk::reflinks(dir) => replica::Share::Copy,
            FailoverDisks::Auto => replica::Share::Freeze,
        }
    }
}

impl Default for MtConfig {
    fn default() -> Self {
        MtConfig {
            name: "mt-onprem".into(),
            site: Site::Onprem,
            data_dir: PathBuf::from("mt-data"),
            listen: "127.0.0.1:9444".into(),
            advertise: BTreeMap::new(),
            cs: CsSettings::default(),
            listener: Default::default(),
            datastore: Vec::new(),
            failover_disks: FailoverDisks::Auto,
            os: Default::default(),
            metrics_listen: String::new(),
        }
    }
}

impl MtConfig {
    pub fn load(file: Option<&Path>) -> Result<MtConfig, ConfigError> {
        let cfg: MtConfig = failback_common::config::load(file, "FBL_MT")?;
        validate_common(file, &cfg.name, &cfg.cs, &cfg.listener)?;
        for (i, ds) in cfg.datastore.iter().enumerate() {
            failback_common::identity::validate_name(&ds.name)
                .map_err(|m| ConfigError::key(file, format!("datastore[{i}].name"), m))?;
        }
        Ok(cfg)
    }
}

/// Registers with the CS and serves the data port on `listener` until `shutdown`.
pub async fn run(
    config: MtConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    for ds in &config.datastore {
        std::fs::create_dir_all(&ds.path)
            .map_err(|e| anyhow::anyhow!("datastore {} at {}: {e}", ds.name, ds.path.display()))?;
    }
    let identity = Identity::new(Role::MasterTarget, config.site, &config.name);
    let addresses = advertised(&config.advertise, config.site, listener.local_addr().ok());
    let base = hello(&identity);
    let datastores = config.datastore.clone();
    let snapshots_dir = config.data_dir.join("snapshots");
    let os = config
        .os
        .map_or(failback_proto::pb::control::Os::Unspecified, |o| o.to_pb()) as i32;
    let hello_fn = Arc::new(move || Hello {
        addresses: addresses.clone(),
        datastores: datastores.iter().map(DatastoreConfig::describe).collect(),
        snapshots: snapshots(&snapshots_dir),
        os,
        ..base.clone()
    });
    let registered = register(&identity, &config.data_dir, &config.cs, hello_fn, &shutdown).await?;
    let secured = registered.secured(config.listener)?;
    let replicas = data::Replicas::new(
        config.name.clone(),
        config.datastore.clone(),
        config.failover_disks,
        registered.control.outbox.clone(),
        shutdown.clone(),
    );
    let registry = failback_common::metrics::Metrics::new();
    metrics::register(&registry, replicas.clone());
    failback_common::metrics::start(Some(&config.metrics_listen), &registry, &shutdown).await?;
    tokio::spawn(commands::handle(
        replicas.clone(),
        registered.control.commands,
        registered.control.outbox,
    ));
    let router = failback_common::server::builder()
        .add_service(failback_common::server::health_service())
        .add_service(
            TargetDataServer::new(data::TargetService { replicas })
                .max_decoding_message_size(failback_common::server::MAX_MESSAGE)
                .max_encoding_message_size(failback_common::server::MAX_MESSAGE),
        );
    tracing::info!(address = %listener.local_addr()?, "master target ready");
    failback_common::server::serve(router, listener, secured, shutdown).await?;
    Ok(())
}

/// The VM snapshots on this master target's machine: one file per snapshot in
/// DATA_DIR/snapshots (the lab's stand-in for vSphere snapshots; ASR refuses to reprotect to
/// a master target that has any). Read at every registration.
fn snapshots(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<MtConfig, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("mt.toml");
        let cs = "[cs]\naddress = \"127.0.0.1:7001\"\nenroll_address = \"127.0.0.1:7000\"\n\
                  ca_cert = \"ca.pem\"\npassphrase = \"lab\"\n";
        std::fs::write(&file, format!("{text}{cs}")).expect("write config");
        MtConfig::load(Some(&file))
    }

    #[test]
    fn failover_disks_is_read_and_a_bad_value_names_the_key_and_the_choices() {
        assert_eq!(
            load("failover_disks = \"copy\"\n")
                .expect("valid")
                .failover_disks,
            FailoverDisks::Copy
        );
        assert_eq!(
            load("").expect("default").failover_disks,
            FailoverDisks::Auto
        );
        let e = load("failover_disks = \"reflink\"\n")
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("failover_disks") && e.contains("use auto, copy or overlay"),
            "{e}"
        );
    }
}
