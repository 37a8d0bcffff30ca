//! The physical limits `bench replication` compares the path with: how fast the lab's disk
//! takes durable writes the way the path makes them (4 MiB writes, O_DIRECT where the
//! filesystem has it, an fdatasync after each), and how many bytes reach the disk per byte
//! replicated: the block device's own count of bytes written (counted by the kernel, not
//! assumed from the design), with each lab process's `write_bytes` (`/proc/PID/io`) as a
//! breakdown.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

use anyhow::Context;

use crate::labfile::LabState;

/// Bytes per write, as the path's batches.
const WRITE: usize = 4 << 20;
/// O_DIRECT wants buffers aligned to the logical block size; a page covers every disk here.
const ALIGN: usize = 4096;

/// Durable write bandwidth of the disk under a directory.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct DiskBandwidth {
    pub bytes_per_s: f64,
    /// Whether the writes bypassed the page cache (tmpfs, for one, refuses O_DIRECT).
    pub direct: bool,
}

/// Writes `size` bytes of `data` (repeated) to a new file in `dir` in 4 MiB writes, each
/// followed by an fdatasync, and removes the file.
pub fn durable_bandwidth(dir: &Path, size: u64, data: &[u8]) -> anyhow::Result<DiskBandwidth> {
    anyhow::ensure!(!data.is_empty(), "no data to write");
    let path = dir.join("bench-disk-bandwidth");
    let open = |direct: bool| {
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create(true).truncate(true);
        if direct {
            o.custom_flags(nix::fcntl::OFlag::O_DIRECT.bits());
        }
        o.open(&path)
    };
    let (file, direct) = match open(true) {
        Ok(f) => (f, true),
        Err(_) => (
            open(false).with_context(|| format!("creating {}", path.display()))?,
            false,
        ),
    };
    // An aligned 4 MiB buffer holding the data (repeated).
    let mut raw = vec![0u8; WRITE + ALIGN];
    let skew = raw.as_ptr().align_offset(ALIGN);
    let buf = &mut raw[skew..skew + WRITE];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = data[i % data.len()];
    }
    let writes = size.div_ceil(WRITE as u64).max(1);
    let start = Instant::now();
    let result = (|| -> std::io::Result<()> {
        for i in 0..writes {
            file.write_all_at(buf, i * WRITE as u64)?;
            file.sync_data()?;
        }
        Ok(())
    })();
    let secs = start.elapsed().as_secs_f64();
    drop(file);
    let _ = std::fs::remove_file(&path);
    result.with_context(|| format!("writing {}", path.display()))?;
    Ok(DiskBandwidth {
        bytes_per_s: (writes * WRITE as u64) as f64 / secs,
        direct,
    })
}

/// The median of `passes` runs of [`durable_bandwidth`] (one pass on this VM's disk moves by
/// a factor of three from one second to the next).
pub fn durable_bandwidth_median(
    dir: &Path,
    size: u64,
    data: &[u8],
    passes: usize,
) -> anyhow::Result<DiskBandwidth> {
    let mut runs = (0..passes.max(1))
        .map(|_| durable_bandwidth(dir, size, data))
        .collect::<anyhow::Result<Vec<_>>>()?;
    runs.sort_by(|a, b| a.bytes_per_s.total_cmp(&b.bytes_per_s));
    Ok(runs[runs.len() / 2])
}

/// Bytes written to the block device that holds `path` since boot (`/sys/dev/block/M:m/stat`,
/// sectors written), or `None` when no block device holds it (tmpfs). This is what the disk
/// really took: the per-process `write_bytes` below over-counts on this kernel for small
/// files fsynced many times a second (a host's activity log: 4.6 GB attributed to the host
/// while the whole device took 0.46 GB).
pub fn device_bytes_written(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    if major == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).ok()?;
    let sectors: u64 = stat.split_whitespace().nth(6)?.parse().ok()?;
    Some(sectors * 512)
}

/// Bytes the process `pid` has caused to be written to storage (`write_bytes`), 0 when it
/// can't be read (a process gone, a kernel without task I/O accounting).
pub fn write_bytes(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("write_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// `write_bytes` of every running process of the lab in `dir`, by component name.
pub fn lab_write_bytes(dir: &Path) -> anyhow::Result<Vec<(String, u64)>> {
    let lab = LabState::load(dir)?;
    Ok(lab
        .procs
        .iter()
        .filter_map(|p| {
            p.pid
                .map(|pid| (p.name.clone(), write_bytes(&pid.to_string())))
        })
        .collect())
}

/// What each process wrote between two [`lab_write_bytes`] snapshots (only those that wrote).
pub fn written_between(before: &[(String, u64)], after: &[(String, u64)]) -> Vec<(String, u64)> {
    after
        .iter()
        .filter_map(|(name, a)| {
            let b = before
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, b)| *b)
                .unwrap_or(0);
            (*a > b).then(|| (name.clone(), a - b))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_writes_are_counted_by_the_kernel() {
        let dir = tempfile::tempdir().expect("tempdir");
        let before = write_bytes("self");
        let bw = durable_bandwidth(dir.path(), 8 << 20, b"0123456789").expect("bandwidth");
        let after = write_bytes("self");
        assert!(bw.bytes_per_s > 0.0);
        assert!(!dir.path().join("bench-disk-bandwidth").exists());
        // On a filesystem with a block device the kernel counts the 8 MiB (tmpfs counts none).
        if after > before {
            assert!(
                after - before >= 8 << 20,
                "{} bytes counted",
                after - before
            );
        }
    }

    #[test]
    fn the_device_under_a_directory_counts_what_is_written_to_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let Some(before) = device_bytes_written(dir.path()) else {
            // No block device under the temporary directory (tmpfs): nothing to count.
            return;
        };
        durable_bandwidth(dir.path(), 8 << 20, b"0123456789").expect("bandwidth");
        let after = device_bytes_written(dir.path()).expect("still a device");
        assert!(
            after - before >= 8 << 20,
            "{} bytes counted",
            after - before
        );
    }

    #[test]
    fn only_processes_that_wrote_are_listed() {
        let before = vec![("a".to_string(), 10), ("b".to_string(), 5)];
        let after = vec![
            ("a".to_string(), 30),
            ("b".to_string(), 5),
            ("c".to_string(), 7),
        ];
        assert_eq!(
            written_between(&before, &after),
            vec![("a".to_string(), 20), ("c".to_string(), 7)]
        );
    }
}
