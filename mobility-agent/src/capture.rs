//! Write capture: the agent owns the write path of its machine's disks (the stand-in for
//! ASR's filter driver).
//!
//! Every write goes through [`Capture::write`]: it marks the touched 1 MiB regions "hot" in
//! the persisted activity log *before* writing (so a crash never loses track of a region
//! that may differ from the replica, as DRBD's activity log), writes the disk file, and, while
//! replication is on, appends the write to the in-memory replication log. Consistency tags are
//! records in the same log, taken with writes held (the workload is quiesced), optionally with
//! a BLAKE3 digest of every disk for verification. A hot region may be cleared once every log
//! record that touched it has been acknowledged by the process server; as DRBD keeps its
//! active extents, up to [`ACTIVE_REGIONS`] regions stay hot even then, the least recently
//! written cooling first, so that a guest writing all over a working set does not make the
//! activity log durable (fsync, rename, directory fsync, under the write lock) hundreds of times
//! a second. The price: after a crash, up to that many regions are compared by checksum.
//!
//! Bounded memory: when the log plus unacknowledged batches exceed the machine's cap, or the
//! host's budget shared by all its machines ([`crate::budget`]) is used up, writers wait (the
//! guest is throttled, and [`Capture::throttle`] says why) instead of dropping tracking.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use failback_common::vdisk::VDisk;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::budget::{HostBudget, Throttle};
use crate::machine::Machine;

/// Activity-log granularity.
pub const REGION: u64 = 1 << 20;
/// Regions kept hot although acknowledged (DRBD's `al-extents`): 256 MiB per machine.
pub const ACTIVE_REGIONS: usize = 256;
/// How long after a writer last waited its item still shows the throttle.
pub const THROTTLE_SHOWN_FOR: std::time::Duration = std::time::Duration::from_secs(10);
/// Most bytes the initial copy (or a resync) keeps buffered ahead of the sender: more than the
/// sender's 48 MiB window of unacknowledged batches, so the wire never waits for the disk.
pub const COPY_AHEAD: u64 = 64 << 20;

/// One record of the replication log.
#[derive(Debug, Clone)]
pub enum LogEntry {
    Write {
        disk: usize,
        offset: u64,
        data: Bytes,
    },
    Tag(TagRecord),
}

#[derive(Debug, Clone)]
pub struct TagRecord {
    pub id: String,
    pub kind: String,
    pub time_ms: i64,
    /// (disk id, blake3 hex) when verification is on.
    pub digests: Vec<(String, String)>,
}

impl LogEntry {
    pub fn bytes(&self) -> u64 {
        match self {
            LogEntry::Write { data, .. } => data.len() as u64 + 32,
            LogEntry::Tag(_) => 128,
        }
    }
}

struct DiskState {
    id: String,
    /// The disk, raw or an overlay over a frozen base (a failed-over VM's).
    disk: VDisk,
    size: u64,
    /// Per region: hot (may differ from the replica).
    hot: Vec<bool>,
    /// Per region: id of the last log entry that touched it (cleared when acked past it).
    last_entry: Vec<u64>,
}

struct Inner {
    disks: Vec<DiskState>,
    /// (entry id, when captured, entry).
    log: VecDeque<(u64, std::time::Instant, LogEntry)>,
    /// Id the next log entry gets.
    next_entry: u64,
    /// Bytes in the log plus sent-but-unacknowledged.
    buffered: u64,
    logging: bool,
    /// Powered off: writes are refused.
    off: bool,
    /// Writes held for the multi-VM point of this id until the deadline (or its tag).
    held: Option<(String, std::time::Instant)>,
    /// Regions touched only by entries up to this one may be cooled.
    cooled_through: u64,
    /// Acknowledged regions kept hot ([`ACTIVE_REGIONS`]).
    active_regions: usize,
    al_path: PathBuf,
    /// Why writers last waited for space, and when.
    throttled: Option<(Throttle, std::time::Instant)>,
}

impl Inner {
    /// The deadline of a hold in force; an expired hold is dropped.
    fn hold_deadline(&mut self) -> Option<std::time::Instant> {
        match &self.held {
            Some((_, until)) if std::time::Instant::now() < *until => Some(*until),
            Some(_) => {
                self.held = None;
                None
            }
            None => None,
        }
    }
}

/// The machine's capture path, shared by the workload, the tagger and the sender.
pub struct Capture {
    inner: Mutex<Inner>,
    /// Signalled when the log gets entries.
    pub data_ready: Notify,
    /// Signalled when buffered bytes drop (writers waiting for space).
    pub space_freed: Notify,
    /// Signalled when a hold of writes ends.
    released: Notify,
    /// Most bytes the log and in-flight batches may hold before writers wait.
    pub cap: u64,
    /// Cancelled when the machine powers off (its NBD exports close).
    running: tokio_util::sync::CancellationToken,
    /// The host's budget, which `buffered` is also counted against.
    budget: Arc<HostBudget>,
}

impl Drop for Capture {
    fn drop(&mut self) {
        let buffered = self.lock().buffered;
        self.budget.give(buffered);
    }
}

#[derive(Serialize, Deserialize, Default)]
struct ActivityLog {
    /// disk id -> hot region indices.
    hot: std::collections::BTreeMap<String, Vec<u64>>,
}

impl Capture {
    /// Opens the machine's disks and its activity log (hot regions from before a crash stay
    /// hot). Fail closed: an activity log that can't be read or parsed, or one missing while
    /// the machine has replicated (`replication.json` exists), makes every region hot, so the
    /// next resync compares the whole machine; a warning names the file.
    pub fn open(
        machine: &Machine,
        state_dir: &Path,
        cap: u64,
        budget: Arc<HostBudget>,
    ) -> std::io::Result<Arc<Capture>> {
        std::fs::create_dir_all(state_dir)?;
        let al_path = state_dir.join("activity-log.json");
        let replicated = state_dir.join("replication.json").exists();
        let (al, all_hot) = match std::fs::read(&al_path) {
            Ok(bytes) => match serde_json::from_slice::<ActivityLog>(&bytes) {
                Ok(al) => (al, false),
                Err(e) => {
                    tracing::warn!(file = %al_path.display(), "the activity log is corrupt ({e}): every region is hot, the whole machine is resynchronised");
                    (ActivityLog::default(), true)
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !replicated => {
                (ActivityLog::default(), false)
            }
            Err(e) => {
                tracing::warn!(file = %al_path.display(), "the activity log can't be read ({e}): every region is hot, the whole machine is resynchronised");
                (ActivityLog::default(), true)
            }
        };
        let mut disks = Vec::new();
        for d in &machine.disks {
            let disk = VDisk::open(&d.path)?;
            let regions = d.size.div_ceil(REGION) as usize;
            let mut hot = vec![all_hot; regions];
            for r in al.hot.get(&d.id).into_iter().flatten() {
                if let Some(h) = hot.get_mut(*r as usize) {
                    *h = true;
                }
            }
            disks.push(DiskState {
                id: d.id.clone(),
                disk,
                size: d.size,
                hot,
                last_entry: vec![0; regions],
            });
        }
        Ok(Arc::new(Capture {
            inner: Mutex::new(Inner {
                disks,
                log: VecDeque::new(),
                next_entry: 1,
                buffered: 0,
                logging: false,
                off: false,
                held: None,
                cooled_through: 0,
                active_regions: ACTIVE_REGIONS,
                al_path,
                throttled: None,
            }),
            data_ready: Notify::new(),
            space_freed: Notify::new(),
            released: Notify::new(),
            cap,
            running: tokio_util::sync::CancellationToken::new(),
            budget,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `bytes` more buffered, for the machine and the host.
    fn hold_bytes(&self, g: &mut Inner, bytes: u64) {
        g.buffered += bytes;
        self.budget.take(bytes);
    }

    /// Up to `bytes` less buffered (never below zero), for the machine and the host.
    fn free_bytes(&self, g: &mut Inner, bytes: u64) {
        let freed = bytes.min(g.buffered);
        g.buffered -= freed;
        self.budget.give(freed);
    }

    /// Why a write would have to wait now, if it would: the machine's cap, or the host's
    /// budget (which a machine with nothing buffered may exceed by one write).
    fn must_wait(&self, g: &Inner, limit: u64) -> Option<Throttle> {
        if g.buffered >= limit {
            Some(Throttle::MachineBuffer)
        } else if g.buffered > 0 && self.budget.exhausted() {
            Some(Throttle::HostBudget)
        } else {
            None
        }
    }

    /// Why writers were held back within the last [`THROTTLE_SHOWN_FOR`], with the limit
    /// that held them (bytes).
    pub fn throttle(&self) -> Option<(Throttle, u64)> {
        let g = self.lock();
        match g.throttled {
            Some((why, at)) if at.elapsed() < THROTTLE_SHOWN_FOR => Some((
                why,
                match why {
                    Throttle::MachineBuffer => self.cap,
                    Throttle::HostBudget => self.budget.cap(),
                },
            )),
            _ => None,
        }
    }

    pub fn disk_ids(&self) -> Vec<(String, u64)> {
        self.lock()
            .disks
            .iter()
            .map(|d| (d.id.clone(), d.size))
            .collect()
    }

    pub fn disk_index(&self, id: &str) -> Option<usize> {
        self.lock().disks.iter().position(|d| d.id == id)
    }

    /// Starts or stops appending writes to the replication log.
    pub fn set_logging(&self, on: bool) {
        let mut g = self.lock();
        g.logging = on;
        if !on {
            g.log.clear();
            let all = g.buffered;
            self.free_bytes(&mut g, all);
            drop(g);
            self.space_freed.notify_waiters();
        }
    }

    /// Writes `data` at `offset` of disk `disk`, waiting while the buffer is full or writes
    /// are held.
    pub async fn write(&self, disk: usize, offset: u64, data: Bytes) -> std::io::Result<()> {
        loop {
            let freed = self.space_freed.notified();
            let host_freed = self.budget.freed.notified();
            let released = self.released.notified();
            let held_until = {
                let mut g = self.lock();
                match g.hold_deadline() {
                    Some(until) => Some(until),
                    None => match self.must_wait(&g, self.cap).filter(|_| g.logging) {
                        // Checked and written under one lock: a hold taken now waits for it.
                        None => return self.write_locked(g, disk, offset, data),
                        Some(why) => {
                            g.throttled = Some((why, std::time::Instant::now()));
                            None
                        }
                    },
                }
            };
            match held_until {
                Some(until) => {
                    tokio::select! {
                        () = released => {}
                        () = tokio::time::sleep_until(until.into()) => {}
                    }
                }
                None => {
                    tokio::select! {
                        () = freed => {}
                        () = host_freed => {}
                    }
                }
            }
        }
    }

    /// Holds every later write until [`Capture::tag`] with the same `id`,
    /// [`Capture::release`], or `max` has passed. When this returns, no write is in progress.
    pub fn hold(&self, id: &str, max: std::time::Duration) -> std::io::Result<()> {
        let mut g = self.lock();
        if g.off {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "the machine is powered off",
            ));
        }
        g.held = Some((id.to_string(), std::time::Instant::now() + max));
        Ok(())
    }

    /// Ends the hold of `id` (if it is the one in force).
    pub fn release(&self, id: &str) {
        let mut g = self.lock();
        if g.held.as_ref().is_some_and(|(h, _)| h == id) {
            g.held = None;
            drop(g);
            self.released.notify_waiters();
        }
    }

    fn write_locked(
        &self,
        mut g: std::sync::MutexGuard<'_, Inner>,
        disk: usize,
        offset: u64,
        data: Bytes,
    ) -> std::io::Result<()> {
        let inner = &mut *g;
        if inner.off {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "the machine is powered off",
            ));
        }
        let d = inner
            .disks
            .get_mut(disk)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such disk"))?;
        let end = offset + data.len() as u64;
        if end > d.size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "write [{offset}, {end}) beyond the end of disk {} ({} bytes)",
                    d.id, d.size
                ),
            ));
        }
        let entry_id = inner.next_entry;
        let mut newly_hot = false;
        for r in (offset / REGION)..end.div_ceil(REGION) {
            let r = r as usize;
            if !d.hot[r] {
                d.hot[r] = true;
                newly_hot = true;
            }
            d.last_entry[r] = entry_id;
        }
        if newly_hot {
            persist_al(&inner.al_path, &inner.disks)?;
        }
        inner.disks[disk].disk.write_at(&data, offset)?;
        if inner.logging {
            let e = LogEntry::Write { disk, offset, data };
            self.hold_bytes(inner, e.bytes());
            inner
                .log
                .push_back((entry_id, std::time::Instant::now(), e));
            inner.next_entry += 1;
            drop(g);
            self.data_ready.notify_one();
        } else {
            inner.next_entry += 1;
        }
        Ok(())
    }

    /// Appends a consistency tag with writes held; with `digest`, records each disk's BLAKE3
    /// (the state the tag stands for). `flush` (app-consistent) syncs the disks first. A hold
    /// of writes for the same `id` (a multi-VM point) ends with it.
    pub fn tag(
        &self,
        id: String,
        kind: &str,
        time_ms: i64,
        digest: bool,
        flush: bool,
    ) -> std::io::Result<()> {
        let mut g = self.lock();
        if !g.logging {
            drop(g);
            self.release(&id);
            return Ok(());
        }
        let mut digests = Vec::new();
        for d in &g.disks {
            if flush {
                d.disk.sync_data()?;
            }
            if digest {
                digests.push((d.id.clone(), d.disk.digest()?));
            }
        }
        let tag_id = id.clone();
        let e = LogEntry::Tag(TagRecord {
            id,
            kind: kind.to_string(),
            time_ms,
            digests,
        });
        let entry_id = g.next_entry;
        g.next_entry += 1;
        self.hold_bytes(&mut g, e.bytes());
        g.log.push_back((entry_id, std::time::Instant::now(), e));
        let releases = g.held.as_ref().is_some_and(|(h, _)| *h == tag_id);
        if releases {
            g.held = None;
        }
        drop(g);
        self.data_ready.notify_one();
        if releases {
            self.released.notify_waiters();
        }
        Ok(())
    }

    /// Takes log entries for one batch: up to `max_bytes`, never mixing a tag with writes.
    /// Returns the entries, the id of the last one and when the first was captured.
    pub fn take_batch(&self, max_bytes: u64) -> Option<(Vec<LogEntry>, u64, std::time::Instant)> {
        let mut g = self.lock();
        let mut out = Vec::new();
        let mut size = 0;
        let mut last = 0;
        let oldest = g.log.front().map(|(_, t, _)| *t)?;
        while let Some((_, _, front)) = g.log.front() {
            let is_tag = matches!(front, LogEntry::Tag(_));
            if is_tag && !out.is_empty() {
                break;
            }
            if !out.is_empty() && size + front.bytes() > max_bytes {
                break;
            }
            let Some((id, _, e)) = g.log.pop_front() else {
                break;
            };
            size += e.bytes();
            last = id;
            out.push(e);
            if is_tag {
                break;
            }
        }
        (!out.is_empty()).then_some((out, last, oldest))
    }

    /// The process server acknowledged `bytes` of buffered records: free the buffer. Regions
    /// stay hot until [`Capture::cool`].
    pub fn acked(&self, bytes: u64) {
        let mut g = self.lock();
        self.free_bytes(&mut g, bytes);
        drop(g);
        self.space_freed.notify_waiters();
    }

    /// Everything up to log entry `entry` is acknowledged, and the sequence that says so is
    /// durable in the sender's state: clear the regions no later entry touches and persist the
    /// activity log if any cooled. The sender calls this at most every few hundred
    /// milliseconds, not per acknowledgement: a region that stays hot a little longer only
    /// means a little more is sent again after a crash, while a durable write per
    /// acknowledgement cost two fsyncs per batch per machine.
    pub fn cool(&self, entry: u64) -> std::io::Result<()> {
        let mut g = self.lock();
        if entry <= g.cooled_through {
            return Ok(());
        }
        g.cooled_through = entry;
        let hot = g.disks.iter().flat_map(|d| &d.hot).filter(|h| **h).count();
        if hot <= g.active_regions {
            return Ok(());
        }
        // The last record that touched the region is acknowledged: the replica has it. Of
        // those, the least recently written cool until only `active_regions` stay hot.
        let mut acked: Vec<(u64, usize, usize)> = Vec::new();
        for (i, d) in g.disks.iter().enumerate() {
            for r in 0..d.hot.len() {
                if d.hot[r] && d.last_entry[r] != 0 && d.last_entry[r] <= entry {
                    acked.push((d.last_entry[r], i, r));
                }
            }
        }
        acked.sort_unstable();
        let excess = hot - g.active_regions;
        for &(_, i, r) in acked.iter().take(excess) {
            g.disks[i].hot[r] = false;
        }
        if excess > 0 && !acked.is_empty() {
            let inner = &*g;
            persist_al(&inner.al_path, &inner.disks)?;
        }
        Ok(())
    }

    /// Keeps at most `regions` acknowledged regions hot from now on (tests: 0 cools every
    /// acknowledged region).
    pub fn set_active_regions(&self, regions: usize) {
        self.lock().active_regions = regions;
    }

    /// Hot regions as (disk, offset, len): what must be re-sent after a crash.
    pub fn hot_regions(&self) -> Vec<(usize, u64, u64)> {
        let g = self.lock();
        let mut out = Vec::new();
        for (i, d) in g.disks.iter().enumerate() {
            for (r, hot) in d.hot.iter().enumerate() {
                if *hot {
                    let off = r as u64 * REGION;
                    out.push((i, off, REGION.min(d.size - off)));
                }
            }
        }
        out
    }

    /// Allocated (ever written) extents of each disk, for initial replication.
    pub fn allocated_extents(&self, disk: usize) -> std::io::Result<Vec<(u64, u64)>> {
        self.lock().disks[disk].disk.extents()
    }

    /// Copies `len` bytes of disk `disk` at `offset` into the log as a write record (initial
    /// replication, or re-sending a hot region after a crash). Read and append happen under
    /// the write lock, so the record takes its place in write order: writes logged before it
    /// are older, writes after it newer. Waits while the buffer holds [`COPY_AHEAD`] or more
    /// (or is full): the copy keeps just ahead of the sender's window instead of reading the
    /// disk hundreds of MiB ahead into fresh memory, and leaves the rest of the buffer to guest
    /// writes.
    pub async fn copy(&self, disk: usize, offset: u64, len: u64) -> std::io::Result<()> {
        let limit = self.cap.min(COPY_AHEAD);
        loop {
            let wait = self.space_freed.notified();
            let host_freed = self.budget.freed.notified();
            if self.must_wait(&self.lock(), limit).is_none() {
                break;
            }
            tokio::select! {
                () = wait => {}
                () = host_freed => {}
            }
        }
        let mut g = self.lock();
        let inner = &mut *g;
        let d = &mut inner.disks[disk];
        // A raw disk reads into uninitialised capacity (no memset of a buffer about to be
        // overwritten); past the end reads as zeros.
        let buf = d.disk.read_vec(offset, len as usize)?;
        let entry_id = inner.next_entry;
        inner.next_entry += 1;
        let end = offset + len;
        for r in (offset / REGION)..end.div_ceil(REGION) {
            d.last_entry[r as usize] = entry_id;
        }
        let e = LogEntry::Write {
            disk,
            offset,
            data: Bytes::from(buf),
        };
        self.hold_bytes(inner, e.bytes());
        inner
            .log
            .push_back((entry_id, std::time::Instant::now(), e));
        drop(g);
        self.data_ready.notify_one();
        Ok(())
    }

    /// The block digest ([`failback_common::blocks`]) of each `block` bytes of disk `disk` in
    /// `[offset, offset + len)`, read with writes held (a hole reads as zeros, as at the
    /// target).
    pub fn block_checksums(
        &self,
        disk: usize,
        offset: u64,
        len: u64,
        block: u64,
    ) -> std::io::Result<Vec<failback_common::blocks::BlockDigest>> {
        let g = self.lock();
        let mut buf = vec![0u8; len as usize];
        g.disks[disk].disk.read_at(&mut buf, offset)?;
        drop(g);
        Ok(buf
            .chunks(block as usize)
            .map(failback_common::blocks::digest)
            .collect())
    }

    /// Powers the machine off: every later write is refused, its exports close.
    pub fn power_off(&self) {
        self.lock().off = true;
        self.running.cancel();
    }

    /// Cancelled once the machine is powered off.
    pub fn running(&self) -> tokio_util::sync::CancellationToken {
        self.running.clone()
    }

    /// `len` bytes of disk `disk` at `offset` as the guest sees them (overlay-aware). Read
    /// under the write lock: never half of a write.
    pub fn read(&self, disk: usize, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let g = self.lock();
        let d = g
            .disks
            .get(disk)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such disk"))?;
        let end = offset.checked_add(len as u64).filter(|e| *e <= d.size);
        if end.is_none() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "read of {len} bytes at {offset} beyond the end of disk {} ({} bytes)",
                    d.id, d.size
                ),
            ));
        }
        d.disk.read_vec(offset, len)
    }

    /// Makes every completed write to disk `disk` durable (fdatasync).
    pub fn sync(&self, disk: usize) -> std::io::Result<()> {
        let g = self.lock();
        let d = g
            .disks
            .get(disk)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such disk"))?;
        d.disk.sync_data()
    }

    /// Forgets `bytes` of buffered records without cooling any region (they are superseded
    /// by a resync).
    pub fn release_buffer(&self, bytes: u64) {
        let mut g = self.lock();
        self.free_bytes(&mut g, bytes);
        drop(g);
        self.space_freed.notify_waiters();
    }

    /// Id of the newest log entry.
    pub fn last_entry_id(&self) -> u64 {
        self.lock().next_entry - 1
    }

    pub fn buffered(&self) -> u64 {
        self.lock().buffered
    }

    pub fn disk_id(&self, disk: usize) -> String {
        self.lock().disks[disk].id.clone()
    }

    /// BLAKE3 of every disk now (the source side of a verification).
    pub fn digests(&self) -> std::io::Result<Vec<(String, String)>> {
        let g = self.lock();
        g.disks
            .iter()
            .map(|d| Ok((d.id.clone(), d.disk.digest()?)))
            .collect()
    }
}

fn persist_al(path: &Path, disks: &[DiskState]) -> std::io::Result<()> {
    let al = ActivityLog {
        hot: disks
            .iter()
            .map(|d| {
                (
                    d.id.clone(),
                    d.hot
                        .iter()
                        .enumerate()
                        .filter(|(_, h)| **h)
                        .map(|(i, _)| i as u64)
                        .collect(),
                )
            })
            .collect(),
    };
    let bytes = serde_json::to_vec(&al).map_err(std::io::Error::other)?;
    failback_common::durable::write(path, &bytes, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::Disk;
    use std::fs::File;
    use std::time::{Duration, Instant};

    fn capture(dir: &Path) -> Arc<Capture> {
        capture_in(dir, 64 << 20, Arc::new(HostBudget::unlimited()))
    }

    fn capture_in(dir: &Path, cap: u64, budget: Arc<HostBudget>) -> Arc<Capture> {
        std::fs::create_dir_all(dir).expect("dir");
        let path = dir.join("d0.img");
        File::create(&path)
            .and_then(|f| f.set_len(1 << 20))
            .expect("disk");
        let machine = Machine {
            name: "vm1".into(),
            os: Default::default(),
            disks: vec![Disk {
                id: "d0".into(),
                datastore: "ds".into(),
                path,
                size: 1 << 20,
            }],
            resized: false,
        };
        let c = Capture::open(&machine, &dir.join("state"), cap, budget).expect("open");
        c.set_logging(true);
        c
    }

    /// vm1 with one disk `d0` of four regions in `dir`.
    fn four_regions(dir: &Path) -> Machine {
        let path = dir.join("d0.img");
        File::create(&path)
            .and_then(|f| f.set_len(4 * REGION))
            .expect("disk");
        Machine {
            name: "vm1".into(),
            os: Default::default(),
            disks: vec![Disk {
                id: "d0".into(),
                datastore: "ds".into(),
                path,
                size: 4 * REGION,
            }],
            resized: false,
        }
    }

    fn tags(c: &Capture) -> Vec<String> {
        c.lock()
            .log
            .iter()
            .filter_map(|(_, _, e)| match e {
                LogEntry::Tag(t) => Some(t.id.clone()),
                LogEntry::Write { .. } => None,
            })
            .collect()
    }

    /// A write issued while writes are held completes only after the tag of the hold, and
    /// lands after it in the log: the tag is a cut no write crosses.
    #[tokio::test]
    async fn held_writes_wait_for_the_tag_of_the_hold_and_come_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = capture(dir.path());
        c.hold("mvc-1", Duration::from_secs(30)).expect("hold");
        let mut writer = {
            let c = c.clone();
            tokio::spawn(async move { c.write(0, 0, Bytes::from_static(b"after")).await })
        };
        // Another tag does not end the hold.
        c.tag("crash-1".into(), "crash", 1, false, false)
            .expect("tag");
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut writer)
                .await
                .is_err(),
            "a held write completed"
        );
        c.tag("mvc-1".into(), "multi-vm-crash", 2, false, false)
            .expect("tag");
        tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the write waits no longer")
            .expect("join")
            .expect("write");
        let log: Vec<bool> = c
            .lock()
            .log
            .iter()
            .map(|(_, _, e)| matches!(e, LogEntry::Tag(_)))
            .collect();
        assert_eq!(log, vec![true, true, false], "tag, tag, then the write");
        assert_eq!(tags(&c), vec!["crash-1", "mvc-1"]);
    }

    /// As DRBD's active extents: acknowledged regions stay hot up to the bound, so writing
    /// them again persists nothing; past it the least recently written cool first.
    #[tokio::test]
    async fn acknowledged_regions_stay_hot_up_to_the_bound_least_recent_cool_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let machine = four_regions(dir.path());
        let state = dir.path().join("state");
        let c = Capture::open(
            &machine,
            &state,
            64 << 20,
            Arc::new(HostBudget::unlimited()),
        )
        .expect("open");
        c.set_active_regions(2);
        c.set_logging(true);
        for r in [3u64, 0, 2] {
            c.write(0, r * REGION, Bytes::from_static(b"x"))
                .await
                .expect("write");
        }
        let al = state.join("activity-log.json");
        let all = c.last_entry_id();
        c.acked(c.buffered());
        c.cool(all).expect("cool");
        let hot: Vec<u64> = c.hot_regions().iter().map(|(_, o, _)| o / REGION).collect();
        assert_eq!(hot, vec![0, 2], "region 3, written first, cooled first");
        // Writing a region that is still hot makes nothing durable (no new file renamed in).
        let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&al).expect("al"));
        c.write(0, 2 * REGION + 10, Bytes::from_static(b"y"))
            .await
            .expect("write");
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&al).expect("al")),
            inode,
            "the activity log was rewritten for a hot region"
        );
        // Within the bound nothing cools, however old.
        let all = c.last_entry_id();
        c.acked(c.buffered());
        c.cool(all).expect("cool");
        assert_eq!(c.hot_regions().len(), 2);
    }

    /// Two machines share a host budget of 64 KiB: once one holds it all, the other's second
    /// write waits (its first may always go) and its capture says the host budget throttles
    /// it; an acknowledgement of the first frees the budget and the write completes. Stopping
    /// a machine (dropping its capture) gives its bytes back.
    #[tokio::test]
    async fn the_host_budget_throttles_every_machine_once_it_is_used_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let budget = Arc::new(HostBudget::new(64 << 10));
        let a = capture_in(&dir.path().join("a"), 1 << 20, budget.clone());
        let b = capture_in(&dir.path().join("b"), 1 << 20, budget.clone());
        a.write(0, 0, Bytes::from(vec![1u8; 64 << 10]))
            .await
            .expect("a");
        assert!(budget.exhausted());
        b.write(0, 0, Bytes::from(vec![2u8; 4096]))
            .await
            .expect("b's first write goes");
        let mut second = {
            let b = b.clone();
            tokio::spawn(async move { b.write(0, 4096, Bytes::from(vec![3u8; 4096])).await })
        };
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut second)
                .await
                .is_err(),
            "b wrote past the host's budget"
        );
        assert_eq!(b.throttle(), Some((Throttle::HostBudget, 64 << 10)));
        assert_eq!(a.throttle(), None, "a was never held back");
        let held = a.buffered();
        a.acked(held);
        tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("b's write goes once a is acknowledged")
            .expect("join")
            .expect("write");
        let before = budget.used();
        let b_held = b.buffered();
        drop(b);
        assert_eq!(
            budget.used(),
            before - b_held,
            "a stopped machine gives its bytes back"
        );
    }

    /// A machine's own buffer, full, throttles it whatever the host's budget.
    #[tokio::test]
    async fn a_full_machine_buffer_throttles_its_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = capture_in(dir.path(), 8192, Arc::new(HostBudget::unlimited()));
        c.write(0, 0, Bytes::from(vec![1u8; 8192]))
            .await
            .expect("write");
        let mut next = {
            let c = c.clone();
            tokio::spawn(async move { c.write(0, 0, Bytes::from(vec![1u8; 10])).await })
        };
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut next)
                .await
                .is_err()
        );
        assert_eq!(c.throttle(), Some((Throttle::MachineBuffer, 8192)));
        c.acked(8192);
        tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("goes")
            .expect("join")
            .expect("write");
    }

    /// An acknowledgement frees the buffer but cools nothing; `cool` clears exactly the regions
    /// no later entry touches, and the activity log on disk says so (what a restart resends).
    #[tokio::test]
    async fn regions_cool_only_when_told_and_only_up_to_the_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let machine = four_regions(dir.path());
        let state = dir.path().join("state");
        let c = Capture::open(
            &machine,
            &state,
            64 << 20,
            Arc::new(HostBudget::unlimited()),
        )
        .expect("open");
        c.set_active_regions(0);
        c.set_logging(true);
        c.write(0, 0, Bytes::from_static(b"a"))
            .await
            .expect("write");
        c.write(0, 2 * REGION, Bytes::from_static(b"b"))
            .await
            .expect("write");
        let first = c.last_entry_id() - 1;
        let on_disk = || -> Vec<u64> {
            let al: ActivityLog = serde_json::from_slice(
                &std::fs::read(state.join("activity-log.json")).expect("al"),
            )
            .expect("parse");
            al.hot.get("d0").cloned().unwrap_or_default()
        };
        assert_eq!(on_disk(), vec![0, 2], "both regions hot before the writes");
        let buffered = c.buffered();
        c.acked(buffered);
        assert_eq!(c.buffered(), 0);
        assert_eq!(
            c.hot_regions().len(),
            2,
            "an acknowledgement alone cools nothing"
        );
        c.cool(first).expect("cool");
        assert_eq!(
            c.hot_regions(),
            vec![(0, 2 * REGION, REGION)],
            "only the region of the first write cooled"
        );
        assert_eq!(on_disk(), vec![2]);
        // A reopened capture (a restart) resends exactly what is still hot.
        drop(c);
        let c = Capture::open(
            &machine,
            &state,
            64 << 20,
            Arc::new(HostBudget::unlimited()),
        )
        .expect("reopen");
        c.set_active_regions(0);
        assert_eq!(c.hot_regions(), vec![(0, 2 * REGION, REGION)]);
    }

    /// An abandoned point releases the writes; a hold nobody ends expires by itself.
    #[tokio::test]
    async fn a_hold_ends_on_release_or_by_itself() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = capture(dir.path());
        c.hold("mvc-2", Duration::from_secs(30)).expect("hold");
        let mut writer = {
            let c = c.clone();
            tokio::spawn(async move { c.write(0, 0, Bytes::from_static(b"x")).await })
        };
        c.release("other");
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut writer)
                .await
                .is_err(),
            "released by another point's id"
        );
        c.release("mvc-2");
        tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("released")
            .expect("join")
            .expect("write");

        c.hold("mvc-3", Duration::from_millis(300)).expect("hold");
        let t0 = Instant::now();
        c.write(0, 0, Bytes::from_static(b"y"))
            .await
            .expect("write");
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
            "expired after {waited:?}"
        );
        assert!(tags(&c).is_empty(), "no tag was taken");
    }
}
