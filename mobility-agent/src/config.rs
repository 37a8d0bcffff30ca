//! Configuration of a mobility-agent host (`mobility-agent --config FILE`, env `FBL_AGENT__*`):
//!
//! ```toml
//! name = "esx-1"
//! site = "onprem"
//! data_dir = "lab/esx-1"
//! listen = "127.0.0.1:0"
//! [cs]
//! address = "127.0.0.1:9443"
//! enroll_address = "127.0.0.1:9442"
//! ca_cert = "lab/cs/ca.pem"
//! passphrase_file = "lab/cs/passphrase"
//! [[datastore]]
//! name = "ds-onprem"
//! path = "lab/datastores/ds-onprem"
//! [[machine]]
//! name = "vm1"
//! datastore = "ds-onprem"
//! disk = [{ id = "disk0", size = "64 MiB" }]
//! [app_scripts.vm1]
//! pre = "sqlite3 /mnt/vm1/app.db 'PRAGMA wal_checkpoint(TRUNCATE)'"
//! ```

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use bytesize::ByteSize;
use failback_common::component::{DatastoreConfig, validate_common};
use failback_common::config::ConfigError;
use failback_common::enroll::CsSettings;
use failback_common::identity::{Site, validate_name};
use serde::Deserialize;

/// Disk sizes must be a whole number of these (the replication block).
pub const BLOCK_SIZE: u64 = 4096;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    pub name: String,
    pub site: Site,
    pub data_dir: PathBuf,
    /// Health port of the host.
    pub listen: String,
    pub advertise: BTreeMap<String, String>,
    pub cs: CsSettings,
    /// Bounds of the health port's connections (`[listener]`: handshake timeout, caps).
    pub listener: failback_common::listener::ConnLimits,
    pub datastore: Vec<DatastoreConfig>,
    pub machine: Vec<MachineConfig>,
    /// Most bytes a machine's replication log plus unacknowledged batches may hold before
    /// the workload is throttled.
    pub replication_buffer: ByteSize,
    /// Most bytes all machines of the host may hold together in their replication logs and
    /// unacknowledged batches ([`crate::budget`]); past it, writers wait.
    pub replication_budget: ByteSize,
    /// Prometheus metrics at `http://ADDRESS/metrics` (empty: none).
    pub metrics_listen: String,
    /// Pre and post scripts around app-consistent points, by machine name (any machine that
    /// runs here, configured or booted: [`crate::scripts`]).
    pub app_scripts: BTreeMap<String, crate::scripts::AppScripts>,
    /// Also serves every running machine's disks over TCP at this address (e.g.
    /// `127.0.0.1:10809`; port 0 picks one), TLS required (`nbds://`), for operators' lab
    /// certificates only (the `export_tls` module). Empty: Unix sockets only.
    pub nbd_listen: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub name: String,
    pub datastore: String,
    /// Its operating system (reprotect needs a master target of the same).
    #[serde(default)]
    pub os: failback_common::os::Os,
    #[serde(default)]
    pub disk: Vec<DiskConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub id: String,
    pub size: ByteSize,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            name: "esx-1".into(),
            site: Site::Onprem,
            data_dir: PathBuf::from("agent-data"),
            listen: "127.0.0.1:0".into(),
            advertise: BTreeMap::new(),
            cs: CsSettings::default(),
            listener: Default::default(),
            datastore: Vec::new(),
            machine: Vec::new(),
            replication_buffer: ByteSize::mib(256),
            replication_budget: ByteSize::gib(2),
            metrics_listen: String::new(),
            app_scripts: BTreeMap::new(),
            nbd_listen: String::new(),
        }
    }
}

impl AgentConfig {
    pub fn load(file: Option<&Path>) -> Result<AgentConfig, ConfigError> {
        let cfg: AgentConfig = failback_common::config::load(file, "FBL_AGENT")?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// The address of `nbd_listen`, if set; `Err` says what is wrong with it.
    pub fn nbd_listen(&self) -> Result<Option<std::net::SocketAddr>, String> {
        if self.nbd_listen.is_empty() {
            return Ok(None);
        }
        self.nbd_listen.parse().map(Some).map_err(|e| {
            format!(
                "`{}` is not an address and port ({e}); e.g. \"127.0.0.1:10809\", or leave it \
                 empty for Unix sockets only",
                self.nbd_listen
            )
        })
    }

    pub fn validate(&self, file: Option<&Path>) -> Result<(), ConfigError> {
        validate_common(file, &self.name, &self.cs, &self.listener)?;
        let key = |k: String, m: String| ConfigError::key(file, k, m);
        self.nbd_listen().map_err(|m| key("nbd_listen".into(), m))?;
        if self.replication_budget.as_u64() < 1 << 20 {
            return Err(key(
                "replication_budget".into(),
                format!(
                    "{} is too small: at least 1 MiB (e.g. \"2 GiB\"), for all machines of the \
                     host together",
                    self.replication_budget
                ),
            ));
        }
        if let Some(memory) = failback_common::procstat::memory_limit_bytes()
            && self.replication_budget.as_u64() > memory
        {
            return Err(key(
                "replication_budget".into(),
                format!(
                    "{} is more than this machine's memory ({}): the host could not hold what \
                     it promises to buffer; lower it (the default is 2 GiB)",
                    self.replication_budget,
                    ByteSize::b(memory)
                ),
            ));
        }
        let mut ds_names = HashSet::new();
        for (i, ds) in self.datastore.iter().enumerate() {
            validate_name(&ds.name).map_err(|m| key(format!("datastore[{i}].name"), m))?;
            if !ds_names.insert(ds.name.as_str()) {
                return Err(key(
                    format!("datastore[{i}].name"),
                    format!("duplicate datastore `{}`", ds.name),
                ));
            }
        }
        let mut names = HashSet::new();
        for (i, m) in self.machine.iter().enumerate() {
            validate_name(&m.name).map_err(|e| key(format!("machine[{i}].name"), e))?;
            if !names.insert(m.name.as_str()) {
                return Err(key(
                    format!("machine[{i}].name"),
                    format!("duplicate machine `{}`", m.name),
                ));
            }
            if !ds_names.contains(m.datastore.as_str()) {
                return Err(key(
                    format!("machine[{i}].datastore"),
                    format!(
                        "unknown datastore `{}`: add it as a [[datastore]] of this host",
                        m.datastore
                    ),
                ));
            }
            let mut ids = HashSet::new();
            for (j, d) in m.disk.iter().enumerate() {
                validate_name(&d.id).map_err(|e| key(format!("machine[{i}].disk[{j}].id"), e))?;
                if !ids.insert(d.id.as_str()) {
                    return Err(key(
                        format!("machine[{i}].disk[{j}].id"),
                        format!("duplicate disk `{}`", d.id),
                    ));
                }
                if d.size.as_u64() == 0 || d.size.as_u64() % BLOCK_SIZE != 0 {
                    return Err(key(
                        format!("machine[{i}].disk[{j}].size"),
                        format!("must be a positive multiple of {BLOCK_SIZE} bytes"),
                    ));
                }
            }
        }
        for (name, scripts) in &self.app_scripts {
            validate_name(name).map_err(|e| key(format!("app_scripts.{name}"), e))?;
            if scripts.timeout.is_zero() {
                return Err(key(
                    format!("app_scripts.{name}.timeout"),
                    "must be positive (e.g. \"30s\")".into(),
                ));
            }
        }
        Ok(())
    }

    pub fn datastore(&self, name: &str) -> Option<&DatastoreConfig> {
        self.datastore.iter().find(|d| d.name == name)
    }
}
