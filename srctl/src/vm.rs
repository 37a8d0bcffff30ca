//! `srctl vm export` and `srctl vm attach`: where a running machine's disks are served over
//! NBD (one Unix socket per machine on its host, one export per disk; over TCP with TLS too
//! when the host has `nbd_listen`), and a disk made a file
//! with Debian's `nbdfuse` so real software (mkfs, fuse2fs, SQLite) can use it.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use serde::Serialize;

use crate::labfile::LabState;

/// One disk's export.
#[derive(Debug, Clone, Serialize)]
pub struct DiskExport {
    pub machine: String,
    pub host: String,
    pub disk: String,
    pub size_bytes: u64,
    pub socket: PathBuf,
    /// `nbd+unix:///DISK?socket=SOCKET`, for nbdinfo, nbdcopy, nbdfuse, fio's nbd engine.
    pub uri: String,
    /// `nbds://ADDRESS/MACHINE/DISK?tls-certificates=DIR` when the host also serves over TCP
    /// (its `nbd_listen`): TLS with this lab's operator certificate, which `DIR` holds in the
    /// layout libnbd reads (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_uri: Option<String>,
}

/// Where the host serves a machine's disks (as the host's `export` module lays it out).
fn socket_path(host_data_dir: &Path, machine: &str) -> PathBuf {
    host_data_dir.join("nbd").join(format!("{machine}.sock"))
}

/// The `data_dir` of host `host` in a local lab, from its config file.
fn host_data_dir(lab: &LabState, host: &str) -> anyhow::Result<PathBuf> {
    if !lab.containers.is_empty() {
        bail!(
            "this lab runs in containers ({}): the NBD sockets are inside the host's container; \
             use `docker exec` there, or run a local lab (`srctl lab up`)",
            lab.containers
        );
    }
    let proc = lab
        .procs
        .iter()
        .find(|p| p.name == host)
        .ok_or_else(|| anyhow!("host {host} is not a process of this lab"))?;
    let text = std::fs::read_to_string(&proc.config)
        .with_context(|| format!("reading {}", proc.config.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", proc.config.display()))?;
    let dir = table
        .get("data_dir")
        .and_then(|v| v.as_str())
        .ok_or_else(|| anyhow!("{} has no data_dir", proc.config.display()))?;
    Ok(PathBuf::from(dir))
}

/// The exports of `machine` (only disk `disk` if given), from the CS inventory (which host
/// runs it, its disks) and the lab's files (where that host keeps its sockets).
pub async fn exports(
    dir: &Path,
    machine: &str,
    disk: Option<&str>,
) -> anyhow::Result<Vec<DiskExport>> {
    let components = crate::infra::list(dir).await?;
    let agent = components
        .iter()
        .find(|c| c.name == machine && c.role == "agent")
        .ok_or_else(|| {
            anyhow!("no machine `{machine}` in the inventory: `srctl infra list` shows them")
        })?;
    if agent.host.is_empty() {
        bail!("machine {machine} runs on no host the CS knows of");
    }
    if agent.power_state != "running" && !agent.power_state.is_empty() {
        bail!(
            "machine {machine} is {} on {}: only a running machine's disks are exported",
            agent.power_state,
            agent.host
        );
    }
    let lab = LabState::load(dir)?;
    let host_dir = host_data_dir(&lab, &agent.host)?;
    let socket = socket_path(&host_dir, machine);
    // The host's TCP listener, if it has one (it writes the address it bound).
    let tls = match std::fs::read_to_string(host_dir.join("nbd").join("listen")) {
        Ok(address) => Some((address.trim().to_string(), tls_certificates(dir)?)),
        Err(_) => None,
    };
    if !socket.exists() {
        bail!(
            "{machine} serves no disks on {} ({} is missing): the machine is not running there \
             (powered off, failed over, or not booted yet)",
            agent.host,
            socket.display()
        );
    }
    let out: Vec<DiskExport> = agent
        .disks
        .iter()
        .filter(|d| disk.is_none_or(|want| want == d.id))
        .map(|d| DiskExport {
            machine: machine.to_string(),
            host: agent.host.clone(),
            disk: d.id.clone(),
            size_bytes: d.size_bytes,
            uri: format!("nbd+unix:///{}?socket={}", d.id, socket.display()),
            tls_uri: tls.as_ref().map(|(address, certs)| {
                format!(
                    "nbds://{address}/{machine}/{}?tls-certificates={}",
                    d.id,
                    certs.display()
                )
            }),
            socket: socket.clone(),
        })
        .collect();
    if out.is_empty() {
        let ids: Vec<&str> = agent.disks.iter().map(|d| d.id.as_str()).collect();
        bail!(
            "machine {machine} has no disk `{}`; its disks are: {}",
            disk.unwrap_or_default(),
            ids.join(", ")
        );
    }
    Ok(out)
}

/// The operator's certificate, key and the lab CA in the layout libnbd's
/// `tls-certificates=DIR` reads, in `LAB/operator/nbd-tls` (0700; the key 0600), written anew
/// each time (the certificate is renewed).
fn tls_certificates(dir: &Path) -> anyhow::Result<PathBuf> {
    use failback_common::tls::{private_dir, write_private};
    let creds = crate::client::operator_credentials(dir)?;
    let out = dir.join("operator").join("nbd-tls");
    private_dir(&out).with_context(|| format!("creating {}", out.display()))?;
    write_private(&out.join("ca-cert.pem"), &creds.ca_pem)?;
    write_private(&out.join("client-cert.pem"), &creds.cert_pem)?;
    write_private(&out.join("client-key.pem"), &creds.key_pem)?;
    Ok(out)
}

/// Prints exports as a table or JSON.
pub fn print(exports: &[DiskExport], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(exports)?);
        return Ok(());
    }
    println!("{:<10} {:<8} {:>12}  URI", "MACHINE", "DISK", "BYTES");
    for e in exports {
        println!(
            "{:<10} {:<8} {:>12}  {}",
            e.machine, e.disk, e.size_bytes, e.uri
        );
        if let Some(tls) = &e.tls_uri {
            println!("{:<10} {:<8} {:>12}  {tls}", "", "", "");
        }
    }
    Ok(())
}

/// Runs `nbdfuse DIR/disk URI` in the background so the disk appears as the file `DIR/disk`
/// (until `fusermount3 -u DIR`, or the machine stops serving it), and waits until the mount
/// is up (nbdfuse writes its pid file then). Returns the file's path and nbdfuse's pid.
pub fn attach(export: &DiskExport, dir: &Path) -> anyhow::Result<(PathBuf, u32)> {
    which("nbdfuse").ok_or_else(|| {
        anyhow!("nbdfuse is not installed: install the Debian package `libnbd-bin`")
    })?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = dir.join("disk");
    if file.exists() {
        bail!(
            "{} exists: a disk is attached there already (detach it with `fusermount3 -u {}`) \
             or the directory is in use; pick an empty directory",
            file.display(),
            dir.display()
        );
    }
    let pidfile = std::env::temp_dir().join(format!(
        "srctl-nbdfuse-{}-{}.pid",
        std::process::id(),
        export.disk
    ));
    let _ = std::fs::remove_file(&pidfile);
    // nbdfuse outlives this command: it must not hold our stdout or stderr (a caller reading
    // them to the end would wait for the detach), so its messages go to a log file.
    let log_path = pidfile.with_extension("log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut child = std::process::Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(&file)
        .arg(&export.uri)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log.try_clone()?)
        .spawn()
        .context("starting nbdfuse")?;
    let said = || {
        std::fs::read_to_string(&log_path)
            .map(|t| t.trim().to_string())
            .unwrap_or_default()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().context("waiting for nbdfuse")? {
            bail!(
                "nbdfuse exited ({status}) attaching {}: {}",
                export.uri,
                said()
            );
        }
        if std::fs::read_to_string(&pidfile).is_ok_and(|p| !p.trim().is_empty()) {
            let _ = std::fs::remove_file(&pidfile);
            return Ok((file, child.id()));
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            bail!("nbdfuse did not mount {} within 20 s", export.uri);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `tool` on the PATH.
pub(crate) fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    })
}
