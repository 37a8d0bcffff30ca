//! A real filesystem on an export, as the lab's guests will use one: `nbdfuse` (Debian's
//! `libnbd-bin`) shows the export as a file, `mkfs.ext4` formats it, `fuse2fs` (`fuse2fs`)
//! mounts the ext4 filesystem and files are written and read back through it; `e2fsck` then
//! checks the filesystem through NBD and in the backing file, and `debugfs` reads a file
//! straight out of the backing file. Needs FUSE (/dev/fuse) and root, as the lab's hosts have.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Server, describe, judge, random_bytes};

const MIB: u64 = 1024 * 1024;

/// A FUSE mount, lazily unmounted when dropped (so a failing test leaves nothing mounted),
/// with the daemon serving it.
struct Mount {
    point: PathBuf,
    daemon: tokio::process::Child,
}

impl Mount {
    /// Starts `program` (a FUSE daemon kept in the foreground) and waits for `point` to be
    /// mounted.
    async fn start(program: &str, package: &str, args: &[&str], point: &Path) -> Self {
        let daemon = tokio::process::Command::new(program)
            .args(args)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{program}: {e}; install Debian's `{package}` package (scripts/test-deps)")
            });
        let mut mount = Self {
            point: point.to_owned(),
            daemon,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !mounted(point) {
            if let Ok(Some(status)) = mount.daemon.try_wait() {
                panic!("{program} {args:?} exited ({status}) without mounting {point:?}");
            }
            assert!(
                Instant::now() < deadline,
                "{program} did not mount {point:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        mount
    }

    /// Unmounts and waits for the daemon to exit cleanly.
    async fn unmount(mut self) {
        let point = self.point.to_str().expect("utf-8 path").to_owned();
        let output = judge("umount", "mount", &[&point], &[]).await;
        assert!(output.status.success(), "umount: {}", describe(&output));
        let status = tokio::time::timeout(Duration::from_secs(30), self.daemon.wait())
            .await
            .expect("FUSE daemon exits after the unmount")
            .expect("wait");
        assert!(
            status.success(),
            "FUSE daemon for {point} exited with {status}"
        );
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if mounted(&self.point) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.point)
                .status();
        }
    }
}

fn mounted(point: &Path) -> bool {
    let point = point.to_str().expect("utf-8 path");
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("read mountinfo")
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(point))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_through_nbdfuse_and_fuse2fs_survives_fsck() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: this test mounts FUSE filesystems (nbdfuse, fuse2fs)"
    );
    let server = Server::start(&[("disk0", 64 * MIB)]).await;
    let nbd_dir = server.dir.path().join("nbd");
    let fs_dir = server.dir.path().join("fs");
    std::fs::create_dir(&nbd_dir).expect("mkdir");
    std::fs::create_dir(&fs_dir).expect("mkdir");
    let nbd_arg = nbd_dir.to_str().expect("utf-8 path");
    let fs_arg = fs_dir.to_str().expect("utf-8 path");
    let device = nbd_dir.join("nbd");
    let device_arg = device.to_str().expect("utf-8 path");
    let uri = server.uri("disk0");

    let nbd_mount = Mount::start("nbdfuse", "libnbd-bin", &[nbd_arg, &uri], &nbd_dir).await;
    let output = judge("mkfs.ext4", "e2fsprogs", &["-q", "-F", device_arg], &[]).await;
    assert!(output.status.success(), "mkfs.ext4: {}", describe(&output));

    // Files written through the filesystem.
    let big = random_bytes(5 * MIB as usize);
    let small = b"written through ext4, fuse2fs, nbdfuse and NBD\n".to_vec();
    let fuse2fs_args = [device_arg, fs_arg, "-f", "-o", "fakeroot"];
    let fs_mount = Mount::start("fuse2fs", "fuse2fs", &fuse2fs_args, &fs_dir).await;
    {
        let (fs_dir, big, small) = (fs_dir.clone(), big.clone(), small.clone());
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir(fs_dir.join("data")).expect("mkdir in ext4");
            std::fs::write(fs_dir.join("data/big.bin"), &big).expect("write big");
            std::fs::write(fs_dir.join("data/small.txt"), &small).expect("write small");
            std::fs::File::open(fs_dir.join("data/big.bin"))
                .and_then(|f| f.sync_all())
                .expect("fsync");
        })
        .await
        .expect("writer");
    }
    fs_mount.unmount().await;

    let output = judge("e2fsck", "e2fsprogs", &["-f", "-n", device_arg], &[]).await;
    assert!(
        output.status.success(),
        "e2fsck through NBD: {}",
        describe(&output)
    );

    // Mounted again (read-only), the files read back.
    let fuse2fs_ro = [device_arg, fs_arg, "-f", "-o", "ro,fakeroot"];
    let fs_mount = Mount::start("fuse2fs", "fuse2fs", &fuse2fs_ro, &fs_dir).await;
    let read_big = std::fs::read(fs_dir.join("data/big.bin")).expect("read big");
    assert!(read_big == big, "big.bin read back differs");
    assert_eq!(
        std::fs::read(fs_dir.join("data/small.txt")).expect("read small"),
        small
    );
    fs_mount.unmount().await;
    nbd_mount.unmount().await;

    // The filesystem is really in the export's backing file.
    let backing = server.lab.path("disk0");
    let backing_arg = backing.to_str().expect("utf-8 path");
    let output = judge("e2fsck", "e2fsprogs", &["-f", "-n", backing_arg], &[]).await;
    assert!(
        output.status.success(),
        "e2fsck on the backing file: {}",
        describe(&output)
    );
    let output = judge(
        "debugfs",
        "e2fsprogs",
        &["-R", "cat /data/big.bin", backing_arg],
        &[],
    )
    .await;
    assert!(output.status.success(), "debugfs: {}", describe(&output));
    assert!(output.stdout == big, "big.bin in the backing file differs");
    server.stop().await;
}
