//! A machine's disks: raw sparse files `DATASTORE/MACHINE/DISK.img`, created on first start
//! (never-written regions take no space and are skipped by initial replication).

use std::path::PathBuf;

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
    pub disks: Vec<Disk>,
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
        for d in &config.disk {
            let path = dir.join(format!("{}.img", d.id));
            let size = d.size.as_u64();
            match std::fs::metadata(&path) {
                Ok(meta) if meta.len() != size => anyhow::bail!(
                    "disk {} of machine {} is {} bytes on disk but configured as {size}; resizing a \
                     disk needs a resync, fix the config or remove {}",
                    d.id,
                    config.name,
                    meta.len(),
                    path.display()
                ),
                Ok(_) => {}
                Err(_) => {
                    let f = std::fs::File::create(&path).map_err(|e| {
                        anyhow::anyhow!("cannot create disk {}: {e}", path.display())
                    })?;
                    f.set_len(size)?;
                    f.sync_all()?;
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
            disks,
        })
    }
}
