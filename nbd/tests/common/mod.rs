//! Test harness shared by the integration tests: a lab of file-backed exports (pwrite/pread
//! through `FileExt` inside `spawn_blocking`, flush = `sync_data`) whose machines can be
//! powered off, a server on a Unix socket in a temporary directory, and helpers that run the
//! third-party judges (failing, with the Debian package to install, when one is missing).
//! The hand-written NBD client is in [`client`]; the PKI and the TCP server with TLS required
//! in [`tls`].
#![allow(dead_code)] // each test binary uses its own part of the harness

pub mod client;
pub mod tls;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use failback_nbd::{Export, ExportInfo, Exports, Refusal};
use tokio_util::sync::CancellationToken;

/// A disk backed by a real file.
pub struct FileExport {
    file: Arc<File>,
    size: u64,
    /// While set, reads never complete (an export whose machine hangs).
    pub stall_reads: AtomicBool,
    /// While set, reads and writes fail with this kind of I/O error.
    pub fail_with: Mutex<Option<std::io::ErrorKind>>,
}

impl FileExport {
    fn injected_failure(&self) -> std::io::Result<()> {
        match *self.fail_with.lock().expect("lock") {
            Some(kind) => Err(std::io::Error::new(kind, "injected by the test")),
            None => Ok(()),
        }
    }
}

impl FileExport {
    fn create(path: &Path, size: u64) -> Self {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .expect("create backing file");
        file.set_len(size).expect("size backing file");
        Self {
            file: Arc::new(file),
            size,
            stall_reads: AtomicBool::new(false),
            fail_with: Mutex::new(None),
        }
    }
}

impl Export for FileExport {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Bytes> {
        if self.stall_reads.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.injected_failure()?;
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, offset)?;
            Ok(Bytes::from(buf))
        })
        .await
        .map_err(std::io::Error::other)?
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> std::io::Result<()> {
        self.injected_failure()?;
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            file.write_all_at(&data, offset)?;
            if fua {
                file.sync_data()?;
            }
            Ok(())
        })
        .await
        .map_err(std::io::Error::other)?
    }

    async fn flush(&self) -> std::io::Result<()> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(std::io::Error::other)?
    }
}

struct Disk {
    export: Arc<FileExport>,
    path: PathBuf,
    description: String,
    token: CancellationToken,
    powered: bool,
}

/// The exports of a small lab: one file-backed disk per name.
pub struct Lab {
    disks: Mutex<BTreeMap<String, Disk>>,
}

/// The refusal text for a name the lab doesn't have.
pub fn unknown_text(name: &str) -> String {
    format!("the lab has no disk named {name:?}")
}

/// The refusal text for a disk whose machine is off.
pub fn powered_off_text(name: &str) -> String {
    format!("the machine owning disk {name:?} is powered off")
}

impl Lab {
    fn new(dir: &Path, disks: &[(&str, u64)]) -> Self {
        let disks = disks
            .iter()
            .map(|&(name, size)| {
                let path = dir.join(format!("{name}.img"));
                let disk = Disk {
                    export: Arc::new(FileExport::create(&path, size)),
                    path,
                    description: format!("test disk {name}"),
                    token: CancellationToken::new(),
                    powered: true,
                };
                (name.to_owned(), disk)
            })
            .collect();
        Self {
            disks: Mutex::new(disks),
        }
    }

    /// The file behind a disk.
    pub fn path(&self, name: &str) -> PathBuf {
        self.disks.lock().expect("lock")[name].path.clone()
    }

    /// The export behind a disk.
    pub fn export(&self, name: &str) -> Arc<FileExport> {
        self.disks.lock().expect("lock")[name].export.clone()
    }

    /// Powers the disk's machine off: open connections are told ESHUTDOWN, new opens refused.
    pub fn power_off(&self, name: &str) {
        let mut disks = self.disks.lock().expect("lock");
        let disk = disks.get_mut(name).expect("disk");
        disk.powered = false;
        disk.token.cancel();
    }

    /// Powers the disk's machine back on.
    pub fn power_on(&self, name: &str) {
        let mut disks = self.disks.lock().expect("lock");
        let disk = disks.get_mut(name).expect("disk");
        disk.powered = true;
        disk.token = CancellationToken::new();
    }
}

impl Exports for Lab {
    type Export = FileExport;

    fn list(&self) -> Vec<ExportInfo> {
        self.disks
            .lock()
            .expect("lock")
            .iter()
            .map(|(name, disk)| ExportInfo {
                name: name.clone(),
                description: disk.description.clone(),
            })
            .collect()
    }

    fn open(&self, name: &str) -> Result<(Arc<FileExport>, CancellationToken), Refusal> {
        let disks = self.disks.lock().expect("lock");
        let Some(disk) = disks.get(name) else {
            return Err(Refusal::Unknown(unknown_text(name)));
        };
        if !disk.powered {
            return Err(Refusal::Unavailable(powered_off_text(name)));
        }
        Ok((disk.export.clone(), disk.token.child_token()))
    }
}

/// A server on a Unix socket in a temporary directory, serving a [`Lab`].
pub struct Server {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub lab: Arc<Lab>,
    pub shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Starts a server whose lab has `disks` (name, size in bytes), all zero.
    pub async fn start(disks: &[(&str, u64)]) -> Self {
        init_tracing();
        let dir = tempfile::tempdir().expect("tempdir");
        let lab = Arc::new(Lab::new(dir.path(), disks));
        let socket = dir.path().join("nbd.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(failback_nbd::serve_unix(
            listener,
            lab.clone(),
            shutdown.clone(),
        ));
        Self {
            dir,
            socket,
            lab,
            shutdown,
            task,
        }
    }

    /// The NBD URI of an export (libnbd's syntax).
    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }

    /// Cancels the server and waits for its accept loop and connections to end.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server stops within 10 s")
            .expect("server task");
    }
}

/// Logs to the test's output, filtered by `RUST_LOG`.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// How long a judge may run before the test fails as hung.
pub const JUDGE_LIMIT: Duration = Duration::from_secs(120);

/// Runs a third-party tool (a judge) to completion. A missing tool fails the test naming the
/// Debian package that provides it (CI installs them through scripts/test-deps); so does a
/// tool still running after [`JUDGE_LIMIT`].
pub async fn judge(program: &str, package: &str, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command = tokio::process::Command::new(program);
    command.args(args).kill_on_drop(true);
    for (key, value) in envs {
        command.env(key, value);
    }
    match tokio::time::timeout(JUDGE_LIMIT, command.output()).await {
        Err(_) => panic!("{program} {args:?} did not finish within {JUDGE_LIMIT:?}"),
        Ok(Ok(output)) => output,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "{program}: {e}; install Debian's `{package}` package (scripts/test-deps installs it)"
        ),
        Ok(Err(e)) => panic!("{program}: {e}"),
    }
}

/// Status and output of a finished tool, for assertion messages.
pub fn describe(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The JSON `nbdinfo --json` printed.
pub fn json(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo printed no JSON ({e}): {}", describe(output)))
}

/// `len` random bytes from the kernel.
pub fn random_bytes(len: usize) -> Vec<u8> {
    use std::io::Read;
    let mut buf = vec![0u8; len];
    File::open("/dev/urandom")
        .expect("open /dev/urandom")
        .read_exact(&mut buf)
        .expect("read /dev/urandom");
    buf
}
