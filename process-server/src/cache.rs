//! The process server's durable disk cache.
//!
//! Agents send ordered, sequence-numbered batches (opaque, already compressed payloads), one
//! stream per replicated item. The PS acknowledges a batch only after [`Cache::append`] has
//! returned (the batch is durable here), forwards cached batches in order
//! ([`Cache::read_after`]) and drops them only after the target acknowledged them
//! ([`Cache::release`]).
//!
//! # Layout
//!
//! ```text
//! DIR/ITEM/00000000000000000001.seg   segment: frames of consecutive batches, named by the
//! DIR/ITEM/00000000000000000042.seg   (20-digit, zero-padded) sequence of its first frame
//! DIR/ITEM/state                      {"released":N}, rewritten via state.tmp + rename
//! ```
//!
//! A frame is `[magic u32][len u32][crc32 u32][seq u64][payload; len]`, little-endian, magic
//! `b"FBLC"`, crc32 (IEEE) over the 8 `seq` bytes followed by the payload. Frames of one item
//! are consecutive across all its segments. A segment is rotated once the next frame would
//! make it larger than `segment_bytes` (default 16 MiB); it is deleted once every batch in it
//! is released, which is how space is given back. Item names are 1-128 characters of
//! `[A-Za-z0-9-]`.
//!
//! # Durability
//!
//! An append writes the whole frame and `fdatasync`s the segment before returning; creating a
//! segment (or an item directory) also fsyncs the parent directory. A release records the
//! released sequence first (durably: file and directory fsynced) whenever it deletes segments,
//! and deletes them afterwards (all but a last one under [`KEEP_RELEASED_BELOW`] that ends at
//! the released sequence, which takes the next frames); segments left behind by a crash in
//! between are deleted on open. A release that deletes nothing, nearly every acknowledgement,
//! only moves the sequence in memory: the record is written (not fsynced) for every item that
//! moved by [`Cache::record_released`], which the PS calls once a second, and when the cache
//! is dropped, so a clean restart never resends a released batch. Until then the frames are
//! still on disk, so losing the record to a crash or a power cut only means resending up to a
//! second of batches the target already holds, which it recognises by sequence. (Writing the
//! record per acknowledgement was a file create, a write and a rename per batch: at 200
//! items, 335 renames a second.) The highest cached sequence survives a restart as
//! `max(last frame on disk, released)`.
//!
//! # Crash recovery
//!
//! [`Cache::open`] scans every segment of every item in order and validates each frame (magic,
//! length within the file, crc, sequence = previous + 1, first frame = the file's name). The
//! first invalid frame is a torn tail (a crash mid-append): its segment is truncated at the
//! start of that frame and every later segment of the item is deleted. Only what was never
//! acknowledged can be torn by a crash; anything else found this way is reported as a
//! [`Truncation`] (and logged) so the owner can mark the item for resync. An empty segment (a
//! crash right after creating it) is deleted.
//!
//! # Hot copies
//!
//! Each appended payload is also kept in memory (a reference-counted `Bytes`, no copy) until it
//! is released, as long as all items' hot copies stay within [`HOT_BYTES`]. `read_after` serves
//! a batch from its hot copy when it has one and reads (and re-validates) the segment otherwise:
//! a forwarder that keeps up never reads back what was just written, one that falls behind (a
//! target down, a slow link) or a restarted PS reads the disk. The hot copy is taken only after
//! the frame's fdatasync succeeded, so it never holds anything that is not durable.
//!
//! # Concurrency
//!
//! `Cache` is `Send + Sync`: a map of items behind an `RwLock`, one `Mutex` per item (appends
//! of different items sync in parallel), an atomic byte counter for capacity. Calls are
//! blocking `std::fs`; async owners wrap them in `spawn_blocking`. One process per cache
//! directory.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// Default segment size at which a new segment file is started (16 MiB).
pub const DEFAULT_SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// Bytes of a frame header: magic, len, crc32, seq.
pub const FRAME_HEADER_BYTES: u64 = 20;
/// A fully released segment still being written is kept (appends continue in it) while it
/// is smaller than this; a larger one is deleted, giving its space back.
pub const KEEP_RELEASED_BELOW: u64 = 1024 * 1024;
/// Free fraction below which cache health is Warning (ASR: < 30 % free).
pub const WARNING_FREE: f64 = 0.30;
/// Free fraction below which cache health is Critical (ASR: < 25 % free).
pub const CRITICAL_FREE: f64 = 0.25;
/// Free fraction below which agents are throttled (ASR: < 20 % free).
pub const THROTTLE_FREE: f64 = 0.20;
/// Most bytes of un-released payloads kept in memory for `read_after` (all items together).
pub const HOT_BYTES: u64 = 64 << 20;

const MAGIC: u32 = u32::from_le_bytes(*b"FBLC");
const HEADER: usize = FRAME_HEADER_BYTES as usize;
const STATE_FILE: &str = "state";
const STATE_TMP: &str = "state.tmp";
const SEGMENT_EXT: &str = "seg";
const MAX_ITEM_NAME: usize = 128;

/// Errors of the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A file-system call failed.
    #[error("cache I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The batch is neither a retry nor the next one of the item.
    #[error("batch {got} of {item} out of order: expected {expected}")]
    OutOfOrder {
        item: String,
        expected: u64,
        got: u64,
    },
    /// Appending would exceed the capacity; nothing was written.
    #[error(
        "process server cache full: {used} of {capacity} bytes used; replication is throttled \
         until the target drains it"
    )]
    Full { used: u64, capacity: u64 },
    /// A cache file does not hold what it must (a frame read back fails validation, or the
    /// state file is unreadable).
    #[error("cache file {} is corrupt: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    /// The item name is not 1-128 characters of `[A-Za-z0-9-]`.
    #[error("invalid replicated item name {item:?}: use 1-128 letters, digits or '-'")]
    InvalidItem { item: String },
}

/// Result of [`Cache::append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// The batch is now durable in the cache.
    Appended,
    /// The batch was already cached (or released); nothing was written. Acknowledge it again.
    Duplicate,
}

/// Something recovery cut off while opening the cache (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    /// The replicated item.
    pub item: String,
    /// The segment holding the first invalid frame.
    pub path: PathBuf,
    /// Where that segment was truncated (0: the segment was deleted).
    pub offset: u64,
    /// Why the frame was invalid.
    pub reason: String,
    /// Bytes removed from this segment and all later segments of the item.
    pub removed_bytes: u64,
    /// Sequence of the last valid batch kept (0 if none).
    pub kept_last_seq: u64,
}

/// Cache health per ASR's cache free-space thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CacheHealth {
    /// At least 30 % free.
    Healthy,
    /// Less than 30 % free.
    Warning,
    /// Less than 25 % free.
    Critical,
}

impl CacheHealth {
    /// As the process server reports it to the CS.
    pub fn to_proto(self) -> failback_proto::pb::control::Health {
        use failback_proto::pb::control::Health;
        match self {
            CacheHealth::Healthy => Health::Healthy,
            CacheHealth::Warning => Health::Warning,
            CacheHealth::Critical => Health::Critical,
        }
    }

    /// `"Healthy"`, `"Warning"` or `"Critical"`.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheHealth::Healthy => "Healthy",
            CacheHealth::Warning => "Warning",
            CacheHealth::Critical => "Critical",
        }
    }
}

impl fmt::Display for CacheHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Cache health for a free fraction (0.0-1.0), and whether agents must be throttled:
/// Warning below 30 % free, Critical below 25 %, throttled below 20 %. NaN counts as
/// Critical and throttled.
pub fn health(free_fraction: f64) -> (CacheHealth, bool) {
    if free_fraction.is_nan() {
        return (CacheHealth::Critical, true);
    }
    let state = if free_fraction < CRITICAL_FREE {
        CacheHealth::Critical
    } else if free_fraction < WARNING_FREE {
        CacheHealth::Warning
    } else {
        CacheHealth::Healthy
    };
    (state, free_fraction < THROTTLE_FREE)
}

impl Drop for Cache {
    fn drop(&mut self) {
        if let Err(e) = self.record_released() {
            tracing::warn!("recording released batches on close: {e}");
        }
    }
}

/// The durable, per-item, sequence-ordered batch cache. See the module doc.
#[derive(Debug)]
pub struct Cache {
    dir: PathBuf,
    capacity: u64,
    segment_bytes: u64,
    used: AtomicU64,
    /// Bytes of all items' hot copies.
    hot_used: AtomicU64,
    items: RwLock<BTreeMap<String, Arc<Mutex<ItemState>>>>,
    notifiers: Mutex<HashMap<String, Arc<Notify>>>,
    truncations: Vec<Truncation>,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    size: u64,
    /// Sequence of the last frame; `start - 1` while empty.
    last_seq: u64,
}

#[derive(Debug, Clone, Copy)]
struct Loc {
    segment: u64,
    offset: u64,
    len: u32,
}

#[derive(Debug)]
struct ItemState {
    dir: PathBuf,
    /// Removed by `drop_item`; holders of a stale handle must look the item up again.
    dropped: bool,
    dir_ready: bool,
    last_seq: u64,
    released: u64,
    /// What the item's state record on disk says was released (at most `released`).
    recorded: u64,
    /// By first sequence.
    segments: BTreeMap<u64, Segment>,
    /// Un-released batches only.
    index: BTreeMap<u64, Loc>,
    /// In-memory copies of un-released payloads (see "Hot copies").
    hot: BTreeMap<u64, Bytes>,
    pending: u64,
    writer: Option<(u64, File)>,
    /// Set when a failed write could not be rolled back or a sync failed: appends are refused
    /// until the cache is reopened (and recovery has validated the tail).
    poisoned: Option<String>,
}

impl ItemState {
    fn new(dir: PathBuf) -> ItemState {
        ItemState {
            dir,
            dropped: false,
            dir_ready: false,
            last_seq: 0,
            released: 0,
            recorded: 0,
            segments: BTreeMap::new(),
            index: BTreeMap::new(),
            hot: BTreeMap::new(),
            pending: 0,
            writer: None,
            poisoned: None,
        }
    }

    fn disk_bytes(&self) -> u64 {
        self.segments.values().map(|s| s.size).sum()
    }
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    released: u64,
}

impl Cache {
    /// Opens (creating) the cache in `dir` with a capacity in bytes and 16 MiB segments.
    /// Recovers every item: validates every frame, truncates a torn tail and everything after
    /// it, deletes segments already released.
    pub fn open(dir: &Path, capacity: u64) -> Result<Cache, CacheError> {
        Cache::open_with(dir, capacity, DEFAULT_SEGMENT_BYTES)
    }

    /// [`Cache::open`] with a segment rotation size (bytes; at least one frame per segment).
    pub fn open_with(dir: &Path, capacity: u64, segment_bytes: u64) -> Result<Cache, CacheError> {
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        let mut items = BTreeMap::new();
        let mut truncations = Vec::new();
        let mut used = 0u64;
        let mut entries = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_at(dir))? {
            let entry = entry.map_err(io_at(dir))?;
            let path = entry.path();
            let file_type = entry.file_type().map_err(io_at(&path))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !file_type.is_dir() || validate_item(&name).is_err() {
                tracing::debug!(path = %path.display(), "ignoring foreign entry in cache directory");
                continue;
            }
            entries.push((name, path));
        }
        entries.sort();
        for (name, path) in entries {
            if let Some(state) = recover_item(&name, path, &mut truncations)? {
                used += state.disk_bytes();
                items.insert(name, Arc::new(Mutex::new(state)));
            }
        }
        tracing::info!(
            dir = %dir.display(),
            items = items.len(),
            used,
            capacity,
            truncated = truncations.len(),
            "process server cache opened"
        );
        Ok(Cache {
            dir: dir.to_path_buf(),
            capacity,
            segment_bytes: segment_bytes.max(1),
            used: AtomicU64::new(used),
            hot_used: AtomicU64::new(0),
            items: RwLock::new(items),
            notifiers: Mutex::new(HashMap::new()),
            truncations,
        })
    }

    /// Durably appends batch `seq` of `item` (write + fdatasync, directory fsync when a file is
    /// created) before returning.
    ///
    /// `seq <= last_seq(item)` is a retry: `Ok(Duplicate)`, nothing written. The first batch
    /// of an unknown item may have any `seq >= 1`; otherwise `seq` must be `last_seq + 1`, else
    /// [`CacheError::OutOfOrder`]. If the frame (payload + 20 bytes) does not fit the capacity:
    /// [`CacheError::Full`], nothing written. After a failed sync the item refuses appends
    /// until the cache is reopened.
    pub fn append(
        &self,
        item: &str,
        seq: u64,
        payload: Bytes,
    ) -> Result<AppendOutcome, CacheError> {
        validate_item(item)?;
        let outcome = loop {
            let handle = self.get_or_create(item);
            let mut st = lock(&handle);
            if st.dropped {
                continue;
            }
            let outcome = self.append_locked(item, &mut st, seq, &payload)?;
            if outcome == AppendOutcome::Appended {
                self.keep_hot(&mut st, seq, payload);
            }
            break outcome;
        };
        if outcome == AppendOutcome::Appended {
            let notify = self.notifier(item);
            notify.notify_waiters();
            notify.notify_one();
        }
        Ok(outcome)
    }

    /// Highest durably cached sequence of `item`, released ones included; 0 if unknown.
    pub fn last_seq(&self, item: &str) -> u64 {
        self.with_item(item, |st| st.last_seq).unwrap_or(0)
    }

    /// Batches of `item` with sequence > `after` (and > the released sequence), in order, up
    /// to about `max_bytes` of payload: at least one batch if there is any. Every frame read is
    /// validated again ([`CacheError::Corrupt`] otherwise).
    pub fn read_after(
        &self,
        item: &str,
        after: u64,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Bytes)>, CacheError> {
        validate_item(item)?;
        let Some(handle) = self.get(item) else {
            return Ok(Vec::new());
        };
        let mut plan = Vec::new();
        let mut files: HashMap<u64, (PathBuf, File)> = HashMap::new();
        {
            let st = lock(&handle);
            if st.dropped {
                return Ok(Vec::new());
            }
            let Some(from) = after.max(st.released).checked_add(1) else {
                return Ok(Vec::new());
            };
            let mut total = 0usize;
            for (&seq, loc) in st.index.range(from..) {
                let len = loc.len as usize;
                if !plan.is_empty() && total.saturating_add(len) > max_bytes {
                    break;
                }
                total = total.saturating_add(len);
                plan.push((seq, *loc, st.hot.get(&seq).cloned()));
            }
            // Open under the lock: a concurrent release may unlink the segment afterwards, but
            // an open handle keeps reading it.
            for (_, loc, _) in plan.iter().filter(|(_, _, hot)| hot.is_none()) {
                if let std::collections::hash_map::Entry::Vacant(slot) = files.entry(loc.segment)
                    && let Some(seg) = st.segments.get(&loc.segment)
                {
                    let file = File::open(&seg.path).map_err(io_at(&seg.path))?;
                    slot.insert((seg.path.clone(), file));
                }
            }
        }
        let mut out = Vec::with_capacity(plan.len());
        for (seq, loc, hot) in plan {
            if let Some(payload) = hot {
                out.push((seq, payload));
                continue;
            }
            let Some((path, file)) = files.get_mut(&loc.segment) else {
                return Err(CacheError::Corrupt {
                    path: self.dir.join(item),
                    reason: format!("batch {seq} indexed in missing segment {}", loc.segment),
                });
            };
            out.push((seq, Bytes::from(read_frame(path, file, seq, loc)?)));
        }
        Ok(out)
    }

    /// The target acknowledged everything `<= seq`: persists the released sequence (atomic
    /// state file), then deletes the segments whose batches are all released. Idempotent;
    /// `seq` beyond `last_seq` means the target already holds those batches: they become
    /// duplicates (this also sets the starting point of an unknown item).
    pub fn release(&self, item: &str, seq: u64) -> Result<(), CacheError> {
        validate_item(item)?;
        if seq == 0 {
            return Ok(());
        }
        loop {
            let handle = self.get_or_create(item);
            let mut st = lock(&handle);
            if st.dropped {
                continue;
            }
            return self.release_locked(&mut st, seq);
        }
    }

    /// An item that moves here from another process server which forwarded everything up to
    /// `seq` ("Switch process server"): if this cache holds nothing of it after `seq`, it
    /// continues after `seq`, recorded durably (so a restart does not make the agent think the
    /// cache was lost). Returns whether the position moved; an item already past `seq` is left
    /// as it is.
    pub fn start_after(&self, item: &str, seq: u64) -> Result<bool, CacheError> {
        validate_item(item)?;
        loop {
            let handle = self.get_or_create(item);
            let mut st = lock(&handle);
            if st.dropped {
                continue;
            }
            if seq == 0 || st.last_seq >= seq {
                return Ok(false);
            }
            self.ensure_dir(&mut st)?;
            // Whatever an earlier stint here left is older than `seq`: the target has it.
            self.release_locked(&mut st, seq)?;
            write_state(&st.dir, seq, true)?;
            st.recorded = seq;
            return Ok(true);
        }
    }

    /// Writes the state record (not fsynced) of every item whose released sequence moved
    /// since its record was last written; returns how many. The PS calls it once a second;
    /// dropping the cache calls it too.
    pub fn record_released(&self) -> Result<usize, CacheError> {
        let handles: Vec<Arc<Mutex<ItemState>>> = read(&self.items).values().cloned().collect();
        let mut written = 0;
        for h in handles {
            let mut st = lock(&h);
            if st.dropped || !st.dir_ready || st.released <= st.recorded {
                continue;
            }
            write_state(&st.dir, st.released, false)?;
            st.recorded = st.released;
            written += 1;
        }
        Ok(written)
    }

    /// Highest sequence of `item` the target acknowledged; 0 if none or unknown.
    pub fn released_seq(&self, item: &str) -> u64 {
        self.with_item(item, |st| st.released).unwrap_or(0)
    }

    /// Removes everything of `item`, on disk and in memory (disable replication, or the "PS
    /// cache lost" simulation). Its next batch may start at any sequence. Waiters on its
    /// notifier are woken.
    pub fn drop_item(&self, item: &str) -> Result<(), CacheError> {
        validate_item(item)?;
        let path = self.dir.join(item);
        {
            // Held throughout so nobody recreates the item while its directory goes away.
            let mut map = write(&self.items);
            if let Some(handle) = map.remove(item) {
                let mut st = lock(&handle);
                st.dropped = true;
                st.writer = None;
                self.used.fetch_sub(st.disk_bytes(), Ordering::SeqCst);
                st.segments.clear();
                st.index.clear();
                self.drop_hot(&mut st, u64::MAX);
                st.pending = 0;
            }
            match fs::remove_dir_all(&path) {
                Ok(()) => sync_dir(&self.dir)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(CacheError::Io { path, source: e }),
            }
        }
        tracing::info!(item, "replicated item dropped from the cache");
        self.notifier(item).notify_waiters();
        Ok(())
    }

    /// Items with anything cached or released, sorted.
    pub fn items(&self) -> Vec<String> {
        let handles: Vec<(String, Arc<Mutex<ItemState>>)> = read(&self.items)
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        handles
            .into_iter()
            .filter(|(_, h)| {
                let st = lock(h);
                !st.dropped && (st.last_seq > 0 || !st.segments.is_empty())
            })
            .map(|(k, _)| k)
            .collect()
    }

    /// Bytes of segment files on disk (un-released frames, plus released ones sharing a
    /// segment with un-released ones).
    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Segment rotation size in bytes.
    pub fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `1 - used/capacity`, clamped to 0.0-1.0 (0.0 for a zero capacity).
    pub fn free_fraction(&self) -> f64 {
        if self.capacity == 0 {
            return 0.0;
        }
        (1.0 - self.used_bytes() as f64 / self.capacity as f64).clamp(0.0, 1.0)
    }

    /// [`health`] of this cache's free fraction.
    pub fn health(&self) -> (CacheHealth, bool) {
        health(self.free_fraction())
    }

    /// Un-released payload bytes of `item` (0 if unknown).
    pub fn pending_bytes(&self, item: &str) -> u64 {
        self.with_item(item, |st| st.pending).unwrap_or(0)
    }

    /// What recovery cut off when this cache was opened (empty after a clean shutdown or a
    /// crash that only tore an unacknowledged append).
    pub fn truncations(&self) -> &[Truncation] {
        &self.truncations
    }

    /// The notifier of `item`, signalled on every append (and on `drop_item`). Each append
    /// wakes every task waiting at that moment and leaves one permit, so a forwarder that
    /// reads, finds nothing, then awaits `notified()` does not miss an append in between.
    pub fn notifier(&self, item: &str) -> Arc<Notify> {
        let mut map = lock(&self.notifiers);
        Arc::clone(map.entry(item.to_string()).or_default())
    }

    fn get(&self, item: &str) -> Option<Arc<Mutex<ItemState>>> {
        read(&self.items).get(item).cloned()
    }

    fn get_or_create(&self, item: &str) -> Arc<Mutex<ItemState>> {
        if let Some(handle) = self.get(item) {
            return handle;
        }
        let mut map = write(&self.items);
        Arc::clone(
            map.entry(item.to_string())
                .or_insert_with(|| Arc::new(Mutex::new(ItemState::new(self.dir.join(item))))),
        )
    }

    fn with_item<T>(&self, item: &str, f: impl FnOnce(&ItemState) -> T) -> Option<T> {
        let handle = self.get(item)?;
        let st = lock(&handle);
        if st.dropped { None } else { Some(f(&st)) }
    }

    fn ensure_dir(&self, st: &mut ItemState) -> Result<(), CacheError> {
        if !st.dir_ready {
            fs::create_dir_all(&st.dir).map_err(io_at(&st.dir))?;
            sync_dir(&self.dir)?;
            st.dir_ready = true;
        }
        Ok(())
    }

    fn append_locked(
        &self,
        item: &str,
        st: &mut ItemState,
        seq: u64,
        payload: &[u8],
    ) -> Result<AppendOutcome, CacheError> {
        if st.last_seq > 0 {
            if seq <= st.last_seq {
                return Ok(AppendOutcome::Duplicate);
            }
            if seq != st.last_seq + 1 {
                return Err(CacheError::OutOfOrder {
                    item: item.to_string(),
                    expected: st.last_seq + 1,
                    got: seq,
                });
            }
        } else if seq == 0 {
            return Err(CacheError::OutOfOrder {
                item: item.to_string(),
                expected: 1,
                got: 0,
            });
        }
        if let Some(reason) = &st.poisoned {
            return Err(CacheError::Io {
                path: st.dir.clone(),
                source: io::Error::other(format!("{reason}; reopen the cache to recover")),
            });
        }
        let len = u32::try_from(payload.len()).map_err(|_| CacheError::Io {
            path: st.dir.clone(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "batch payload exceeds 4 GiB"),
        })?;
        let frame = FRAME_HEADER_BYTES + u64::from(len);
        let capacity = self.capacity;
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                used.checked_add(frame).filter(|n| *n <= capacity)
            })
            .map_err(|used| CacheError::Full { used, capacity })?;
        if let Err(e) = self.write_frame(st, seq, payload, len) {
            self.used.fetch_sub(frame, Ordering::SeqCst);
            return Err(e);
        }
        Ok(AppendOutcome::Appended)
    }

    /// Returns the first sequence of the segment the next frame goes to, with `st.writer` open
    /// on it.
    fn segment_for(&self, st: &mut ItemState, seq: u64, frame: u64) -> Result<u64, CacheError> {
        // An empty last segment (a failed first write) is reused only if it is named `seq`.
        if let Some((&start, seg)) = st.segments.last_key_value()
            && seg.size == 0
            && start != seq
        {
            let path = seg.path.clone();
            st.writer = None;
            remove_file_if_exists(&path)?;
            st.segments.remove(&start);
        }
        let reuse = match st.segments.last_key_value() {
            Some((&start, seg)) if seg.size == 0 || seg.size + frame <= self.segment_bytes => {
                Some(start)
            }
            _ => None,
        };
        if let Some(start) = reuse {
            if st.writer.as_ref().map(|(s, _)| *s) != Some(start) {
                let path = &st.segments[&start].path;
                let file = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(io_at(path))?;
                st.writer = Some((start, file));
            }
            return Ok(start);
        }
        self.ensure_dir(st)?;
        let path = st.dir.join(segment_name(seq));
        st.writer = None;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_at(&path))?;
        sync_dir(&st.dir)?;
        st.segments.insert(
            seq,
            Segment {
                path,
                size: 0,
                last_seq: seq - 1,
            },
        );
        st.writer = Some((seq, file));
        Ok(seq)
    }

    fn write_frame(
        &self,
        st: &mut ItemState,
        seq: u64,
        payload: &[u8],
        len: u32,
    ) -> Result<(), CacheError> {
        let frame = FRAME_HEADER_BYTES + u64::from(len);
        let start = self.segment_for(st, seq, frame)?;
        let header = encode_header(seq, payload, len);
        let Some(seg) = st.segments.get_mut(&start) else {
            return Err(CacheError::Corrupt {
                path: st.dir.clone(),
                reason: format!("segment {start} vanished from the index"),
            });
        };
        let Some((_, file)) = st.writer.as_mut() else {
            return Err(CacheError::Corrupt {
                path: seg.path.clone(),
                reason: "segment writer missing".into(),
            });
        };
        let offset = seg.size;
        let written = file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| file.write_all(&header))
            .and_then(|_| file.write_all(payload));
        if let Err(e) = written {
            // Take back a partial frame so later frames do not land behind garbage.
            if let Err(e2) = file.set_len(offset).and_then(|()| file.sync_data()) {
                st.poisoned = Some(format!(
                    "could not roll back a failed write to {}: {e2}",
                    seg.path.display()
                ));
                st.writer = None;
            }
            return Err(CacheError::Io {
                path: seg.path.clone(),
                source: e,
            });
        }
        if let Err(e) = file.sync_data() {
            // After a failed fdatasync the page cache can't be trusted: only a reopen (which
            // validates the tail) may append again.
            st.poisoned = Some(format!("fdatasync of {} failed: {e}", seg.path.display()));
            st.writer = None;
            return Err(CacheError::Io {
                path: seg.path.clone(),
                source: e,
            });
        }
        seg.size += frame;
        seg.last_seq = seq;
        st.index.insert(
            seq,
            Loc {
                segment: start,
                offset,
                len,
            },
        );
        st.pending += u64::from(len);
        st.last_seq = seq;
        Ok(())
    }

    /// Keeps the payload of the just appended batch `seq` in memory if the budget allows.
    fn keep_hot(&self, st: &mut ItemState, seq: u64, payload: Bytes) {
        let len = payload.len() as u64;
        let reserved = self
            .hot_used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                used.checked_add(len).filter(|n| *n <= HOT_BYTES)
            })
            .is_ok();
        if reserved {
            st.hot.insert(seq, payload);
        }
    }

    /// Forgets the hot copies of batches `<= seq`.
    fn drop_hot(&self, st: &mut ItemState, seq: u64) {
        let keep = match seq.checked_add(1) {
            Some(next) => st.hot.split_off(&next),
            None => BTreeMap::new(),
        };
        let gone = std::mem::replace(&mut st.hot, keep);
        let bytes: u64 = gone.values().map(|b| b.len() as u64).sum();
        self.hot_used.fetch_sub(bytes, Ordering::SeqCst);
    }

    fn release_locked(&self, st: &mut ItemState, seq: u64) -> Result<(), CacheError> {
        if seq <= st.released {
            return Ok(());
        }
        self.ensure_dir(st)?;
        // Every fully released segment goes, except a small last one that ends exactly at
        // `seq`: appends continue in it (a forwarder that keeps up releases the segment being
        // written after every batch, and deleting it each time cost a create, an unlink and
        // three fsyncs per batch). A release past its end (a switch, a duplicate) deletes it,
        // so that the next frame starts a segment named by its own sequence.
        let last = st.segments.last_key_value().map(|(k, _)| *k);
        let doomed: Vec<u64> = st
            .segments
            .iter()
            .filter(|(k, s)| {
                let kept = Some(**k) == last
                    && s.last_seq == seq
                    && s.size < KEEP_RELEASED_BELOW.min(self.segment_bytes);
                s.last_seq <= seq && !kept
            })
            .map(|(k, _)| *k)
            .collect();
        if !doomed.is_empty() {
            write_state(&st.dir, seq, true)?;
            st.recorded = seq;
        }
        st.released = seq;
        st.last_seq = st.last_seq.max(seq);
        let keep = match seq.checked_add(1) {
            Some(next) => st.index.split_off(&next),
            None => BTreeMap::new(),
        };
        let gone = std::mem::replace(&mut st.index, keep);
        st.pending -= gone.values().map(|l| u64::from(l.len)).sum::<u64>();
        self.drop_hot(st, seq);

        let mut freed = 0u64;
        let mut failure = None;
        for start in doomed {
            if st.writer.as_ref().map(|(s, _)| *s) == Some(start) {
                st.writer = None;
            }
            let Some(seg) = st.segments.get(&start) else {
                continue;
            };
            match remove_file_if_exists(&seg.path) {
                Ok(()) => {
                    freed += seg.size;
                    st.segments.remove(&start);
                }
                Err(e) => {
                    // Stop here: what is left on disk stays a contiguous run of segments.
                    failure = Some(e);
                    break;
                }
            }
        }
        self.used.fetch_sub(freed, Ordering::SeqCst);
        if freed > 0 {
            sync_dir(&st.dir)?;
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn validate_item(item: &str) -> Result<(), CacheError> {
    let ok = !item.is_empty()
        && item.len() <= MAX_ITEM_NAME
        && item.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(CacheError::InvalidItem {
            item: item.to_string(),
        })
    }
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.{SEGMENT_EXT}")
}

fn frame_crc(seq: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// The header of the frame of batch `seq` carrying `payload` (`len` bytes).
fn encode_header(seq: u64, payload: &[u8], len: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h[8..12].copy_from_slice(&frame_crc(seq, payload).to_le_bytes());
    h[12..20].copy_from_slice(&seq.to_le_bytes());
    h
}

struct Header {
    magic: u32,
    len: u32,
    crc: u32,
    seq: u64,
}

fn decode_header(h: &[u8; HEADER]) -> Header {
    let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&h[12..20]);
    Header {
        magic: u32_at(0),
        len: u32_at(4),
        crc: u32_at(8),
        seq: u64::from_le_bytes(seq),
    }
}

/// Reads and re-validates the frame of batch `seq` at `loc`.
fn read_frame(path: &Path, file: &mut File, seq: u64, loc: Loc) -> Result<Vec<u8>, CacheError> {
    let mut head = [0u8; HEADER];
    file.seek(SeekFrom::Start(loc.offset))
        .and_then(|_| file.read_exact(&mut head))
        .map_err(io_at(path))?;
    let h = decode_header(&head);
    let corrupt = |what: String| CacheError::Corrupt {
        path: path.to_path_buf(),
        reason: format!("frame of batch {seq} at offset {}: {what}", loc.offset),
    };
    if h.magic != MAGIC {
        return Err(corrupt("bad magic".into()));
    }
    if h.len != loc.len || h.seq != seq {
        return Err(corrupt(format!(
            "header says batch {} of {} bytes",
            h.seq, h.len
        )));
    }
    let mut payload = vec![0u8; loc.len as usize];
    file.read_exact(&mut payload).map_err(io_at(path))?;
    if frame_crc(seq, &payload) != h.crc {
        return Err(corrupt("crc mismatch".into()));
    }
    Ok(payload)
}

/// Valid frames of one segment: `(seq, offset, len)`, the valid length, and why scanning
/// stopped early (`None`: the whole file is valid).
struct Scan {
    frames: Vec<(u64, u64, u32)>,
    valid_len: u64,
    file_len: u64,
    stop: Option<String>,
}

fn scan_segment(path: &Path, start: u64) -> Result<Scan, CacheError> {
    let data = fs::read(path).map_err(io_at(path))?;
    let mut frames = Vec::new();
    let mut off = 0usize;
    let mut next = start;
    let mut stop = None;
    while off < data.len() {
        let rest = &data[off..];
        let Some(head) = rest.first_chunk::<HEADER>() else {
            stop = Some(format!(
                "torn frame header ({} of {HEADER} bytes)",
                rest.len()
            ));
            break;
        };
        let h = decode_header(head);
        if h.magic != MAGIC {
            stop = Some(format!("bad magic {:#010x}", h.magic));
            break;
        }
        let len = h.len as usize;
        let Some(payload) = rest[HEADER..].get(..len) else {
            stop = Some(format!(
                "torn frame of batch {}: {} of {len} payload bytes",
                h.seq,
                rest.len() - HEADER
            ));
            break;
        };
        if h.seq != next {
            stop = Some(format!("frame holds batch {}, expected {next}", h.seq));
            break;
        }
        if frame_crc(h.seq, payload) != h.crc {
            stop = Some(format!("crc mismatch in batch {}", h.seq));
            break;
        }
        frames.push((h.seq, off as u64, h.len));
        off += HEADER + len;
        next = next.saturating_add(1);
    }
    Ok(Scan {
        frames,
        valid_len: off as u64,
        file_len: data.len() as u64,
        stop,
    })
}

/// Rebuilds one item from its directory; `None` if nothing of it is left.
fn recover_item(
    item: &str,
    dir: PathBuf,
    truncations: &mut Vec<Truncation>,
) -> Result<Option<ItemState>, CacheError> {
    let mut files = BTreeMap::new();
    for entry in fs::read_dir(&dir).map_err(io_at(&dir))? {
        let entry = entry.map_err(io_at(&dir))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == STATE_TMP {
            // A release that crashed before its rename: the old state file stands.
            remove_file_if_exists(&path)?;
            continue;
        }
        let start = name
            .strip_suffix(".seg")
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|s| *s > 0);
        match start {
            Some(start) => {
                files.insert(start, path);
            }
            None if name == STATE_FILE => {}
            None => tracing::warn!(path = %path.display(), "ignoring foreign file in cache"),
        }
    }
    let released = read_state(&dir)?.unwrap_or(0);

    let mut st = ItemState::new(dir.clone());
    st.dir_ready = true;
    st.released = released;
    st.recorded = released;
    let mut expected: Option<u64> = None;
    let starts: Vec<u64> = files.keys().copied().collect();
    let mut cut: Option<(usize, u64, String)> = None;
    let mut frames_of = Vec::new();
    for (i, &start) in starts.iter().enumerate() {
        let path = &files[&start];
        if let Some(e) = expected
            && start != e
            // A gap behind fully released segments: a crash (or failure) in the middle of
            // deleting them; those are deleted below.
            && e - 1 > released
        {
            cut = Some((
                i,
                0,
                format!("segment starts at batch {start}, expected {e}"),
            ));
            break;
        }
        let scan = scan_segment(path, start)?;
        if scan.file_len == 0 {
            // Created, then a crash before its first frame.
            remove_file_if_exists(path)?;
            continue;
        }
        if !scan.frames.is_empty() {
            expected = Some(start + scan.frames.len() as u64);
            frames_of.push((start, scan.frames, scan.valid_len));
        }
        if let Some(reason) = scan.stop {
            cut = Some((i, scan.valid_len, reason));
            break;
        }
    }

    if let Some((i, offset, reason)) = cut {
        let path = files[&starts[i]].clone();
        let mut removed = 0u64;
        for (j, start) in starts.iter().enumerate().skip(i) {
            let p = &files[start];
            let len = fs::metadata(p).map_err(io_at(p))?.len();
            if j == i && offset > 0 {
                let f = OpenOptions::new().write(true).open(p).map_err(io_at(p))?;
                f.set_len(offset)
                    .and_then(|()| f.sync_all())
                    .map_err(io_at(p))?;
                removed += len - offset;
            } else {
                remove_file_if_exists(p)?;
                removed += len;
            }
        }
        sync_dir(&dir)?;
        let kept_last_seq = expected.map_or(0, |e| e - 1);
        tracing::warn!(
            item,
            path = %path.display(),
            offset,
            removed_bytes = removed,
            kept_last_seq,
            %reason,
            "cache recovery truncated a torn tail"
        );
        truncations.push(Truncation {
            item: item.to_string(),
            path,
            offset,
            reason,
            removed_bytes: removed,
            kept_last_seq,
        });
    }

    let mut removed_released = false;
    for (start, frames, valid_len) in frames_of {
        let path = files[&start].clone();
        let last = start + frames.len() as u64 - 1;
        if last <= released {
            // Released before a crash that came ahead of the deletion.
            remove_file_if_exists(&path)?;
            removed_released = true;
            continue;
        }
        for (seq, offset, len) in frames {
            if seq > released {
                st.index.insert(
                    seq,
                    Loc {
                        segment: start,
                        offset,
                        len,
                    },
                );
                st.pending += u64::from(len);
            }
        }
        st.last_seq = st.last_seq.max(last);
        st.segments.insert(
            start,
            Segment {
                path,
                size: valid_len,
                last_seq: last,
            },
        );
    }
    if removed_released {
        sync_dir(&dir)?;
    }
    st.last_seq = st.last_seq.max(released);
    if let Some((&first, _)) = st.index.first_key_value()
        && released > 0
        && first > released + 1
    {
        tracing::warn!(
            item,
            released,
            first,
            "cache is missing batches after the released point"
        );
    }
    if st.segments.is_empty() && released == 0 {
        // Nothing but an empty directory (a crash while creating the item): forget it.
        let _ = fs::remove_dir(&dir);
        return Ok(None);
    }
    Ok(Some(st))
}

fn read_state(dir: &Path) -> Result<Option<u64>, CacheError> {
    let path = dir.join(STATE_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CacheError::Io { path, source: e }),
    };
    let state: StateFile = serde_json::from_slice(&bytes).map_err(|e| CacheError::Corrupt {
        path: path.clone(),
        reason: format!("unreadable released sequence: {e}"),
    })?;
    Ok(Some(state.released))
}

/// Records `released` (atomically: a temporary file renamed over the state file); `durable`
/// also fsyncs the file and the directory.
fn write_state(dir: &Path, released: u64, durable: bool) -> Result<(), CacheError> {
    let tmp = dir.join(STATE_TMP);
    let path = dir.join(STATE_FILE);
    let body = serde_json::to_vec(&StateFile { released }).map_err(|e| CacheError::Io {
        path: tmp.clone(),
        source: io::Error::other(e),
    })?;
    let mut f = File::create(&tmp).map_err(io_at(&tmp))?;
    f.write_all(&body)
        .and_then(|()| if durable { f.sync_all() } else { Ok(()) })
        .map_err(io_at(&tmp))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(io_at(&path))?;
    if durable { sync_dir(dir) } else { Ok(()) }
}

fn sync_dir(dir: &Path) -> Result<(), CacheError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

fn remove_file_if_exists(path: &Path) -> Result<(), CacheError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CacheError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trips_through_header() {
        let h = decode_header(&encode_header(7, b"abc", 3));
        assert_eq!((h.magic, h.len, h.seq), (MAGIC, 3, 7));
        assert_eq!(h.crc, frame_crc(7, b"abc"));
    }

    /// Hot copies stay within the budget; what does not fit is read back from disk, and the
    /// forwarder sees the same bytes either way; a release frees the memory.
    #[test]
    fn hot_copies_stay_within_the_budget_and_reads_fall_back_to_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path(), 1 << 30).expect("open");
        let batch = 4 << 20;
        let count = HOT_BYTES as usize / batch + 4;
        let payload = |seq: usize| Bytes::from(vec![(seq % 251) as u8; batch]);
        for seq in 1..=count {
            cache
                .append("vm1", seq as u64, payload(seq))
                .expect("append");
        }
        let hot = cache.hot_used.load(Ordering::SeqCst);
        assert!(hot <= HOT_BYTES && hot > 0, "hot bytes {hot}");
        let (in_memory, on_disk) = {
            let handle = cache.get("vm1").expect("item");
            let st = lock(&handle);
            (st.hot.len(), count - st.hot.len())
        };
        assert!(
            in_memory > 0 && on_disk > 0,
            "{in_memory} hot, {on_disk} not"
        );
        let all = cache.read_after("vm1", 0, usize::MAX).expect("read");
        assert_eq!(all.len(), count);
        for (seq, bytes) in &all {
            assert_eq!(bytes, &payload(*seq as usize), "batch {seq}");
        }
        cache.release("vm1", count as u64).expect("release");
        assert_eq!(cache.hot_used.load(Ordering::SeqCst), 0);
    }

    /// An item switched here continues after the batch the old process server forwarded,
    /// also after a restart; one already past it is left alone.
    #[test]
    fn a_switched_item_continues_after_the_drained_batch_across_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let cache = Cache::open(dir.path(), 1 << 30).expect("open");
            assert!(cache.start_after("vm1-1", 41).expect("start"));
            assert_eq!(cache.last_seq("vm1-1"), 41);
            assert!(!cache.start_after("vm1-1", 7).expect("older"), "never back");
        }
        let cache = Cache::open(dir.path(), 1 << 30).expect("reopen");
        assert_eq!(cache.last_seq("vm1-1"), 41, "durable");
        let gap = cache.append("vm1-1", 43, Bytes::from_static(b"x"));
        assert!(
            matches!(gap, Err(CacheError::OutOfOrder { expected: 42, .. })),
            "{gap:?}"
        );
        assert_eq!(
            cache
                .append("vm1-1", 42, Bytes::from_static(b"x"))
                .expect("append"),
            AppendOutcome::Appended
        );
        assert_eq!(
            cache.read_after("vm1-1", 0, 1 << 20).expect("read").len(),
            1
        );
    }

    #[test]
    fn item_names_are_validated() {
        assert!(validate_item("vm1").is_ok());
        assert!(validate_item("item-0001").is_ok());
        for bad in ["", "a/b", "..", "a b", "é", &"x".repeat(129)] {
            assert!(validate_item(bad).is_err(), "{bad:?}");
        }
    }
}
