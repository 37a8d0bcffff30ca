//! `DIR/lab.json`: what runs where in a lab (ports, pids, configs, logs, the environment kept
//! for restarts). Written by `lab up`, read by every srctl command that finds a lab.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use serde::{Deserialize, Serialize};

/// One process of the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proc {
    pub name: String,
    /// The binary: config-server, vpn-link, process-server, master-target, mobility-agent.
    pub binary: String,
    pub site: String,
    pub args: Vec<String>,
    pub config: PathBuf,
    pub log: PathBuf,
    /// Main listen address (data port, API port, or control port).
    pub listen: String,
    pub pid: Option<u32>,
    /// Extra environment (e.g. `FBL_PS__CACHE_CAPACITY`), kept for restarts.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Where its Prometheus metrics are served (`http://ADDRESS/metrics`); empty: nowhere.
    #[serde(default)]
    pub metrics: String,
    /// A system program (`binary` is its path), not one of the lab's binaries: the lab's
    /// Prometheus server.
    #[serde(default)]
    pub system: bool,
    /// Declared by the topology but started only by `infra add` (a process server deployed
    /// later).
    #[serde(default)]
    pub deferred: bool,
}

/// `DIR/lab.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub dir: PathBuf,
    /// CS API as reached from onprem (what srctl dials).
    pub cs_api: String,
    pub cs_enroll: String,
    pub link_control: String,
    /// The vpn-link's component name (its control API is dialed as `NAME.vpn-link.failback.lab`).
    #[serde(default = "default_link_name")]
    pub link_name: String,
    /// Everything that must show "connected" for the lab to be up (components and machines).
    pub expected: Vec<String>,
    pub procs: Vec<Proc>,
    /// A lab whose components run in containers (written by `deploy/`): how they are run, and
    /// how one of them is started (`deploy/lab add NAME`, `deploy/swarm add NAME`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub containers: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub start_command: String,
}

/// The name `lab up` and the container lab give the vpn-link.
pub const LINK_NAME: &str = "vpn";

fn default_link_name() -> String {
    LINK_NAME.to_string()
}

impl LabState {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("lab.json")
    }

    pub fn load(dir: &Path) -> anyhow::Result<LabState> {
        let path = Self::path(dir);
        let text = std::fs::read_to_string(&path).map_err(|_| {
            anyhow!(
                "no lab in {} (no lab.json): start one with `srctl lab up --dir {}`",
                dir.display(),
                dir.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))
    }

    pub fn save(&self) -> anyhow::Result<()> {
        let path = Self::path(&self.dir);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    pub fn proc(&self, name: &str) -> Option<&Proc> {
        self.procs.iter().find(|p| p.name == name)
    }
}
