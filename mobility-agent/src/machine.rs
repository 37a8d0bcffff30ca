//! A machine's disks: `DATASTORE/MACHINE/DISK.img`, raw sparse files created on first start
//! (never-written regions take no space and are skipped by initial replication), or overlays
//! over a frozen base ([`failback_common::vdisk`]) once a failover made them.

use std::path::PathBuf;

use failback_common::vdisk::VDisk;
use failback_proto::pb::control::DiskInfo;

use crate::config::{AgentConfig, MachineConfig};

pub struct Disk {
    pub id: String,
    pub datastore: String,
    pub path: PathBuf,
    pub size: u64,
}

impl Disk {
    pub fn describe(&self) -> DiskInfo {
        DiskInfo {
            id: self.id.clone(),
            datastore: self.datastore.clone(),
            path: self.path.display().to_string(),
            size_bytes: self.size,
        }
    }
}

pub struct Machine {
    pub name: String,
    pub os: failback_common::os::Os,
    pub disks: Vec<Disk>,
    /// A disk grew since the last start: tracking is lost, a full resync is needed.
    pub resized: bool,
}

impl Machine {
    /// Opens the machine's disks, creating missing ones as sparse files of the configured size.
    pub fn open(config: &MachineConfig, host: &AgentConfig) -> anyhow::Result<Machine> {
        let ds = host.datastore(&config.datastore).ok_or_else(|| {
            anyhow::anyhow!(
                "machine {}: unknown datastore {}",
                config.name,
                config.datastore
            )
        })?;
        let dir = ds.path.join(&config.name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        let mut disks = Vec::new();
        let mut resized = false;
        for d in &config.disk {
            let path = dir.join(format!("{}.img", d.id));
            let size = d.size.as_u64();
            let existing = if VDisk::exists(&path) {
                Some(
                    VDisk::open(&path)
                        .map_err(|e| anyhow::anyhow!("cannot open disk {}: {e}", path.display()))?,
                )
            } else {
                None
            };
            match existing {
                Some(disk) if disk.len() > size => anyhow::bail!(
                    "disk {} of machine {} is {} bytes but configured as {size}: disks can grow, \
                     not shrink; fix `size` in the config",
                    d.id,
                    config.name,
                    disk.len()
                ),
                Some(mut disk) if disk.len() < size => {
                    // The disk was resized: grow it; replication must resync it.
                    let from = disk.len();
                    disk.set_len(size)?;
                    disk.sync_all()?;
                    tracing::warn!(machine = %config.name, disk = %d.id, from, to = size, "disk resized: resync required");
                    resized = true;
                }
                Some(_) => {}
                None => {
                    VDisk::create(&path, size).map_err(|e| {
                        anyhow::anyhow!("cannot create disk {}: {e}", path.display())
                    })?;
                }
            }
            disks.push(Disk {
                id: d.id.clone(),
                datastore: config.datastore.clone(),
                path,
                size,
            });
        }
        Ok(Machine {
            name: config.name.clone(),
            os: config.os,
            disks,
            resized,
        })
    }
}
