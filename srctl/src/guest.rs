//! Real guests for `srctl drill --guest fio|fs`: real software writes to each machine's
//! disk through its NBD export ([`crate::vm`]) instead of the workload generator, and after
//! every failover the new side's disk is checked by that software's own tools.
//!
//! - `fio`: each change is fio's random 4 KiB writes with crc32c verification headers over a
//!   region of the disk of its own; a check is `fio --verify_only` of every region written so
//!   far, through the new side's export.
//! - `fs`: the disk carries an ext4 filesystem (`mkfs.ext4` on the disk made a file by
//!   `nbdfuse`, mounted by `fuse2fs`) holding a SQLite database; each change commits a batch
//!   of transactions (one row each) and then unmounts cleanly, as a guest shut down for the
//!   failover would. A check runs `e2fsck -fn` (clean), mounts the filesystem read-only and
//!   asks SQLite for `PRAGMA integrity_check` (`ok`) and every committed row.
//!
//! The tools come from Debian: fio (`fio`), nbdfuse (`libnbd-bin`), fuse2fs (`fuse2fs`),
//! e2fsck and mkfs.ext4 (`e2fsprogs`), sqlite3 (`sqlite3`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::Serialize;

/// What runs on the machines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GuestKind {
    /// fio writing blocks with verification headers.
    Fio,
    /// An ext4 filesystem with a SQLite database taking committed transactions.
    Fs,
}

impl GuestKind {
    pub fn as_str(self) -> &'static str {
        match self {
            GuestKind::Fio => "fio",
            GuestKind::Fs => "fs",
        }
    }

    /// The (tool, Debian package) pairs this guest needs.
    fn tools(self) -> &'static [(&'static str, &'static str)] {
        match self {
            GuestKind::Fio => &[("fio", "fio")],
            GuestKind::Fs => &[
                ("nbdfuse", "libnbd-bin"),
                ("fuse2fs", "fuse2fs"),
                ("mkfs.ext4", "e2fsprogs"),
                ("e2fsck", "e2fsprogs"),
                ("sqlite3", "sqlite3"),
                ("fusermount3", "fuse3"),
            ],
        }
    }

    /// Refuses to start without the tools, naming the packages to install.
    pub fn check_tools(self) -> anyhow::Result<()> {
        let missing: Vec<&str> = self
            .tools()
            .iter()
            .filter(|(tool, _)| crate::vm::which(tool).is_none())
            .map(|(_, package)| *package)
            .collect();
        if !missing.is_empty() {
            bail!(
                "--guest {} needs Debian packages that are missing: {} (apt-get install them, or run scripts/test-deps)",
                self.as_str(),
                missing.join(", ")
            );
        }
        Ok(())
    }
}

/// One check of a guest by its own tools.
#[derive(Debug, Clone, Serialize)]
pub struct GuestCheck {
    pub stage: String,
    pub machine: String,
    /// Where the checked disk runs (`azure`, `onprem`).
    pub site: String,
    pub ok: bool,
    /// What was checked and found (e.g. "e2fsck clean; integrity ok; 300 of 300 rows").
    pub detail: String,
}

/// Rows each change of the `fs` guest commits.
const ROWS_PER_CHANGE: u32 = 100;

/// One machine's guest: what it wrote so far.
#[derive(Debug, Clone)]
pub struct Guest {
    pub kind: GuestKind,
    pub machine: String,
    /// Scratch directory (mount points).
    work: PathBuf,
    disk_size: u64,
    /// fio: regions (offset, size) written so far. fs: rows committed so far.
    regions: Vec<(u64, u64)>,
    rows: u32,
}

impl Guest {
    pub fn new(kind: GuestKind, machine: &str, lab: &Path, disk_size: u64) -> Guest {
        Guest {
            kind,
            machine: machine.to_string(),
            work: lab.join("guest").join(machine),
            disk_size,
            regions: Vec::new(),
            rows: 0,
        }
    }

    /// A change by the guest on the disk the machine runs on now: fio writes its next region;
    /// the filesystem guest (made on the first change) commits [`ROWS_PER_CHANGE`] more rows,
    /// then is unmounted cleanly.
    pub async fn change(&mut self, lab: &Path) -> anyhow::Result<String> {
        let uri = export_uri(lab, &self.machine).await?;
        let mut me = self.clone();
        let detail = tokio::task::spawn_blocking(move || {
            let detail = match me.kind {
                GuestKind::Fio => me.fio_write(&uri),
                GuestKind::Fs => me.fs_write(&uri),
            }?;
            anyhow::Ok((me, detail))
        })
        .await
        .map_err(|e| anyhow!("guest task: {e}"))??;
        *self = detail.0;
        Ok(detail.1)
    }

    /// Checks the disk the machine runs on now with the guest's own tools; `Ok` carries what
    /// was found, `Err` what is wrong.
    pub async fn check(&self, lab: &Path) -> anyhow::Result<String> {
        let uri = export_uri(lab, &self.machine).await?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || match me.kind {
            GuestKind::Fio => me.fio_verify(&uri),
            GuestKind::Fs => me.fs_check(&uri),
        })
        .await
        .map_err(|e| anyhow!("guest task: {e}"))?
    }

    fn fio_args(uri: &str, offset: u64, size: u64) -> Vec<String> {
        vec![
            "--name=guest".into(),
            "--ioengine=nbd".into(),
            format!("--uri={uri}"),
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            "--iodepth=16".into(),
            format!("--offset={offset}"),
            format!("--size={size}"),
            "--verify=crc32c".into(),
            "--verify_state_save=0".into(),
        ]
    }

    fn fio_write(&mut self, uri: &str) -> anyhow::Result<String> {
        // Regions of an eighth of the disk each, one after another.
        let size = (self.disk_size / 8).max(1 << 20) / 4096 * 4096;
        let offset = self.regions.len() as u64 * size;
        if offset + size > self.disk_size {
            bail!("{}: no room for another fio region", self.machine);
        }
        run(Command::new("fio").args(Self::fio_args(uri, offset, size)))?;
        self.regions.push((offset, size));
        Ok(format!(
            "fio wrote {} MiB at {} MiB",
            size >> 20,
            offset >> 20
        ))
    }

    fn fio_verify(&self, uri: &str) -> anyhow::Result<String> {
        for &(offset, size) in &self.regions {
            run(Command::new("fio")
                .args(Self::fio_args(uri, offset, size))
                .arg("--verify_only"))
            .with_context(|| format!("fio --verify_only of the region at {offset}"))?;
        }
        Ok(format!("fio verified {} region(s)", self.regions.len()))
    }

    fn fs_write(&mut self, uri: &str) -> anyhow::Result<String> {
        let attached = Attached::new(&self.work, uri)?;
        let first = self.rows == 0;
        if first {
            run(Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .arg(&attached.file))?;
        }
        let mounted = Mounted::new(&attached, &self.work.join("fs"), false)?;
        let db = mounted.dir.join("app.db");
        let mut sql = String::from(
            "PRAGMA journal_mode=WAL;\nCREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, machine TEXT, payload BLOB);\n",
        );
        for id in self.rows + 1..=self.rows + ROWS_PER_CHANGE {
            // One committed transaction each.
            sql.push_str(&format!(
                "INSERT INTO t VALUES ({id}, '{}', randomblob(2000));\n",
                self.machine
            ));
        }
        sql.push_str("PRAGMA wal_checkpoint(TRUNCATE);\n");
        run_with_input(Command::new("sqlite3").arg(&db), &sql)?;
        mounted.unmount()?;
        attached.detach()?;
        self.rows += ROWS_PER_CHANGE;
        Ok(format!(
            "{}{} transactions committed (ext4 + SQLite over NBD)",
            if first { "mkfs.ext4; " } else { "" },
            ROWS_PER_CHANGE
        ))
    }

    fn fs_check(&self, uri: &str) -> anyhow::Result<String> {
        let attached = Attached::new(&self.work, uri)?;
        run(Command::new("e2fsck").arg("-fn").arg(&attached.file))
            .context("e2fsck -fn finds the filesystem damaged")?;
        let mounted = Mounted::new(&attached, &self.work.join("fs"), true)?;
        // A WAL database on a read-only filesystem opens only as immutable (no -shm file can
        // be made); the checkpoint before the unmount left everything in the database file.
        let db = format!("file:{}?immutable=1", mounted.dir.join("app.db").display());
        let integrity = run(Command::new("sqlite3")
            .arg(&db)
            .arg("PRAGMA integrity_check;"))?;
        let rows = run(Command::new("sqlite3")
            .arg(&db)
            .arg("SELECT count(*), coalesce(max(id), 0) FROM t;"))?;
        mounted.unmount()?;
        attached.detach()?;
        if integrity.trim() != "ok" {
            bail!("SQLite integrity_check: {}", integrity.trim());
        }
        let want = format!("{}|{}", self.rows, self.rows);
        if rows.trim() != want {
            bail!(
                "SQLite has rows (count|max id) {}, {} were committed",
                rows.trim(),
                self.rows
            );
        }
        Ok(format!(
            "e2fsck clean; integrity ok; {} of {} rows",
            self.rows, self.rows
        ))
    }
}

/// The disk0 export of `machine` once it serves (a VM just failed over boots first).
async fn export_uri(lab: &Path, machine: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match crate::vm::exports(lab, machine, Some("disk0")).await {
            Ok(e) => return Ok(e[0].uri.clone()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// A disk made a file by nbdfuse, detached when dropped.
struct Attached {
    mount: PathBuf,
    file: PathBuf,
    pid: Option<u32>,
}

impl Attached {
    fn new(work: &Path, uri: &str) -> anyhow::Result<Attached> {
        let mount = work.join("nbd");
        let export = crate::vm::DiskExport {
            machine: String::new(),
            host: String::new(),
            disk: "disk0".into(),
            size_bytes: 0,
            socket: PathBuf::new(),
            uri: uri.to_string(),
            tls_uri: None,
        };
        let (file, pid) = crate::vm::attach(&export, &mount)?;
        Ok(Attached {
            mount,
            file,
            pid: Some(pid),
        })
    }

    fn detach(mut self) -> anyhow::Result<()> {
        self.pid = None;
        unmount(&self.mount)
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if self.pid.is_some() {
            let _ = unmount(&self.mount);
        }
    }
}

/// A filesystem mounted by fuse2fs, unmounted when dropped.
struct Mounted {
    dir: PathBuf,
    up: bool,
}

impl Mounted {
    fn new(attached: &Attached, dir: &Path, read_only: bool) -> anyhow::Result<Mounted> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut cmd = Command::new("fuse2fs");
        cmd.arg(&attached.file).arg(dir);
        cmd.args(["-o", if read_only { "ro,fakeroot" } else { "fakeroot" }]);
        run(&mut cmd)?;
        Ok(Mounted {
            dir: dir.to_path_buf(),
            up: true,
        })
    }

    fn unmount(mut self) -> anyhow::Result<()> {
        self.up = false;
        unmount(&self.dir)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.up {
            let _ = unmount(&self.dir);
        }
    }
}

/// `fusermount3 -u DIR`, waiting until the FUSE server let go (fuse2fs writes its last
/// metadata on unmount).
fn unmount(dir: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("fusermount3")
            .arg("-u")
            .arg(dir)
            .output()
            .context("running fusermount3")?;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "fusermount3 -u {}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a tool; its stdout, or an error with its stderr.
fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}{}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_with_input(cmd: &mut Command, input: &str) -> anyhow::Result<String> {
    use std::io::Write;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
