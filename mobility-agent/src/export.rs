//! A running machine's disks over NBD ([`failback_nbd`]): the way real guest software (a
//! filesystem through `nbdfuse` + `fuse2fs`, SQLite, fio's `nbd` engine) reaches them.
//!
//! One Unix socket per machine, `DATA_DIR/nbd/MACHINE.sock`, created 0600 (only the host's
//! user connects), one export per disk named by the disk's id: the URI of vm1's first disk is
//! `nbd+unix:///disk0?socket=DATA_DIR/nbd/vm1.sock`. Writes go through the machine's capture
//! path exactly as the workload generator's do (activity log, replication log, points); reads
//! come from the machine's disk, overlay-aware; a flush or FUA write is durable on the host's
//! disk before the reply. When the machine powers off (a failover's shutdown of the source, a
//! failback's of the Azure VM) or stops on this host, open connections are answered
//! `ESHUTDOWN` and closed and new ones are refused: no write lands on a disk that is no longer
//! the live one.
//!
//! [`HostExports`] holds every running machine's exports under names `MACHINE/DISK`: what the
//! host serves over TCP when `nbd_listen` is set (the `export_tls` module).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use failback_nbd::{Export, ExportInfo, Exports, Refusal};
use tokio_util::sync::CancellationToken;

use crate::capture::Capture;

/// Longest path a Unix socket address holds (`sun_path` less its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Where the host serves `machine`'s disks.
pub fn socket_path(data_dir: &Path, machine: &str) -> PathBuf {
    data_dir.join("nbd").join(format!("{machine}.sock"))
}

/// One disk of a running machine.
pub struct DiskExport {
    capture: Arc<Capture>,
    disk: usize,
    size: u64,
}

impl Export for DiskExport {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Bytes> {
        let capture = self.capture.clone();
        let disk = self.disk;
        tokio::task::spawn_blocking(move || capture.read(disk, offset, len as usize))
            .await
            .map_err(std::io::Error::other)?
            .map(Bytes::from)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> std::io::Result<()> {
        self.capture.write(self.disk, offset, data).await?;
        if fua { self.flush().await } else { Ok(()) }
    }

    async fn flush(&self) -> std::io::Result<()> {
        let capture = self.capture.clone();
        let disk = self.disk;
        tokio::task::spawn_blocking(move || capture.sync(disk))
            .await
            .map_err(std::io::Error::other)?
    }
}

/// A machine's disks, servable while it runs.
pub struct MachineExports {
    machine: String,
    capture: Arc<Capture>,
    /// Cancelled when the machine powers off or stops on this host.
    live: CancellationToken,
}

impl Exports for MachineExports {
    type Export = DiskExport;

    fn list(&self) -> Vec<ExportInfo> {
        self.capture
            .disk_ids()
            .into_iter()
            .map(|(id, size)| ExportInfo {
                description: format!("disk {id} of {} ({size} bytes)", self.machine),
                name: id,
            })
            .collect()
    }

    fn open(&self, name: &str) -> Result<(Arc<DiskExport>, CancellationToken), Refusal> {
        if self.live.is_cancelled() {
            return Err(Refusal::Unavailable(format!(
                "machine {} is powered off (or failed over, or being failed back): its disks \
                 take no more writes here",
                self.machine
            )));
        }
        let disks = self.capture.disk_ids();
        let Some(disk) = disks.iter().position(|(id, _)| id == name) else {
            let known: Vec<&str> = disks.iter().map(|(id, _)| id.as_str()).collect();
            return Err(Refusal::Unknown(format!(
                "machine {} has no disk `{name}`; its exports are: {}",
                self.machine,
                known.join(", ")
            )));
        };
        Ok((
            Arc::new(DiskExport {
                capture: self.capture.clone(),
                disk,
                size: disks[disk].1,
            }),
            self.live.clone(),
        ))
    }
}

/// Every running machine of the host, by name: exports `MACHINE/DISK`.
#[derive(Default)]
pub struct HostExports {
    machines: Mutex<HashMap<String, Arc<MachineExports>>>,
}

impl HostExports {
    fn machines(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<MachineExports>>> {
        self.machines.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves `exports` as `MACHINE/...` until they end (then only if still the same run's).
    fn add(self: &Arc<Self>, exports: Arc<MachineExports>) {
        self.machines()
            .insert(exports.machine.clone(), exports.clone());
        let host = self.clone();
        tokio::spawn(async move {
            exports.live.cancelled().await;
            let mut machines = host.machines();
            if machines
                .get(&exports.machine)
                .is_some_and(|m| Arc::ptr_eq(m, &exports))
            {
                machines.remove(&exports.machine);
            }
        });
    }
}

impl Exports for HostExports {
    type Export = DiskExport;

    fn list(&self) -> Vec<ExportInfo> {
        let mut machines: Vec<Arc<MachineExports>> = self.machines().values().cloned().collect();
        machines.sort_by(|a, b| a.machine.cmp(&b.machine));
        machines
            .iter()
            .filter(|m| !m.live.is_cancelled())
            .flat_map(|m| {
                m.list().into_iter().map(|e| ExportInfo {
                    name: format!("{}/{}", m.machine, e.name),
                    description: e.description,
                })
            })
            .collect()
    }

    fn open(&self, name: &str) -> Result<(Arc<DiskExport>, CancellationToken), Refusal> {
        let Some((machine, disk)) = name.split_once('/') else {
            return Err(Refusal::Unknown(format!(
                "export names on this host are MACHINE/DISK (e.g. vm1/disk0), not `{name}`"
            )));
        };
        let exports = self.machines().get(machine).cloned();
        match exports {
            Some(m) => m.open(disk),
            None => Err(Refusal::Unknown(format!(
                "machine {machine} is not running on this host (powered off, failed over, or \
                 elsewhere): `srctl vm export {machine}` says where its disks are"
            ))),
        }
    }
}

/// Serves `machine`'s disks on its socket (and in `host`, for TCP) until `stop` is cancelled
/// or the machine powers off; the socket file is removed then.
pub fn start(
    data_dir: &Path,
    machine: &str,
    capture: Arc<Capture>,
    host: &Arc<HostExports>,
    stop: &CancellationToken,
) -> anyhow::Result<PathBuf> {
    let live = stop.child_token();
    let running = capture.running();
    let exports = Arc::new(MachineExports {
        machine: machine.to_string(),
        capture,
        live: live.clone(),
    });
    // Powering off ends the exports as stopping the machine does.
    let power = live.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = running.cancelled() => power.cancel(),
            () = power.cancelled() => {}
        }
    });
    host.add(exports.clone());
    let path = socket_path(data_dir, machine);
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        anyhow::bail!(
            "the NBD socket path {} is longer than a Unix socket allows ({MAX_SOCKET_PATH} \
             bytes): give the host a shorter data_dir",
            path.display()
        );
    }
    let dir = path.parent().unwrap_or(data_dir);
    failback_common::tls::private_dir(dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    // A socket left by an earlier run of this host (one process per data dir).
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => anyhow::bail!("cannot remove the stale socket {}: {e}", path.display()),
    }
    let listener = bind_private(&path)?;
    let socket = path.clone();
    let name = machine.to_string();
    let bound = inode(&socket);
    tokio::spawn(async move {
        failback_nbd::serve_unix(listener, exports, live).await;
        // Only this run's socket: the machine may be serving again from a new one already.
        if bound.is_some() && inode(&socket) == bound {
            let _ = std::fs::remove_file(&socket);
        }
        tracing::info!(machine = %name, "NBD exports closed");
    });
    Ok(path)
}

fn inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| m.ino())
}

/// Binds a Unix socket that only this user may connect to (0600, in a 0700 directory, so it
/// is not reachable by others even between bind and chmod).
fn bind_private(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("cannot serve NBD on {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
