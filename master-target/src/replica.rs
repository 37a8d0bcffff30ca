//! The durable replica store of ONE replicated item on a master target.
//!
//! A process server sends ordered batches (sequence numbers 1, 2, 3, ...) of write records and
//! consistency tags. [`ReplicaStore::append`] makes a batch durable in a redo journal before it
//! returns, so the master target may acknowledge it; [`ReplicaStore::apply_pending`] later writes
//! journaled batches into the replica disks, first saving the bytes it overwrites in an undo
//! log. The disks always hold the latest applied state (cheap failover to latest, cheap block
//! checksums for resync); any retained recovery point is rebuilt byte-exact by copying the disks
//! and rolling the undo log back to it ([`ReplicaStore::materialize`]).
//!
//! Everything here is synchronous `std::fs` code: async callers use `spawn_blocking`.
//!
//! # Layout
//!
//! ```text
//! DIR/LOCK                       flock(2) held while a ReplicaStore is open (one owner at a time)
//! DIR/disks/DISK.img             replica disk, a sparse file of the disk's size: latest applied state
//!                                (DISK.img.overlay/ instead while a failover VM shares its blocks)
//! DIR/journal/redo-SEQ.log       redo segments; SEQ (20 digits) = first batch in the segment
//! DIR/undo/undo-SEQ.log          undo segments, same naming
//! DIR/state.json                 {"version":1,"applied_seq":N}: batches <= N are in the disk files
//! DIR/points.json                {"version":1,"through_seq":T,"points":[...]}: the recovery points;
//!                                tags of batches <= T are reflected in the list
//! DIR/tmp/                       scratch space (digests of older points), emptied on open
//! ```
//!
//! Both `*.json` files are replaced atomically (write `*.tmp`, fsync, rename, fsync directory).
//!
//! # Frames
//!
//! Redo and undo segments are sequences of frames, all integers little-endian:
//!
//! ```text
//! magic u32 ("FBLR" redo / "FBLU" undo) | payload length u32 | crc32 u32 of (seq ++ payload) | seq u64 | payload
//! ```
//!
//! A redo payload is `version u8 = 1 | count u32 | entries`, each entry either
//! `1u8 | disk str | offset u64 | data bytes` (a write),
//! `2u8 | id str | kind u8 | time_ms i64 | count u32 | (disk str | blake3 str)*` (a tag) or
//! `3u8 | bytes u64` (the batch's writes are already in the disk files: see below), where
//! `str` and `bytes` are a `u32` length followed by the bytes. An undo payload is
//! `version u8 = 1 | count u32 | (disk str | offset u64 | before-image bytes)*`: the bytes each
//! write of the batch overwrote, all read before any write of the batch.
//!
//! # Appending and applying
//!
//! `append(seq)` validates the whole batch (known disks, ranges inside them, a tag travels
//! alone in its batch) before writing anything, writes the frame at the end of the newest redo
//! segment and fdatasyncs it (and the directory when it created a segment), then, for a tag,
//! records the recovery point in `points.json`. Segments rotate at about 64 MiB.
//!
//! `apply_pending` takes each batch `seq > applied_seq` in order and
//! 1. if a retained point is older than the batch and the undo log has no record for it yet,
//!    reads the before-images of all its writes and appends them as one undo frame (fdatasync);
//!    batches no point can roll back past need no undo (initial replication writes none);
//! 2. pwrites the batch's data into the disk files;
//! 3. at a checkpoint (the end of the call, or every 256 MiB of payload; `apply_some` stops at
//!    its own bound) fdatasyncs the written disks, persists `applied_seq` in `state.json` and
//!    deletes redo segments that are applied.
//!
//! While the item has no recovery point and every journaled batch is applied (initial
//! replication; after a commit dropped the points), `append` writes the batch straight into the
//! disk files, fdatasyncs them, and only then journals an in-place frame (one entry
//! `3u8 | bytes u64`) in the batch's place. No point can roll back past such a batch, so it
//! needs no undo, and its data is written once instead of twice (journal, then disk). A crash
//! before the in-place frame is durable leaves some of the batch's writes in the disks while the
//! batch is neither journaled nor acknowledged; the PS sends it again and the same writes are
//! repeated. Applying an in-place frame writes nothing.
//!
//! # Recovery (on open)
//!
//! 1. Redo and undo segments are scanned frame by frame; the first frame that is torn, fails
//!    its crc, or breaks the sequence (redo: consecutive; undo: increasing) is truncated away
//!    together with everything after it.
//! 2. `last_seq` is the last redo frame (or `applied_seq` when every segment was applied and
//!    deleted). Points beyond it are dropped; tags in redo frames past `through_seq` (a crash
//!    between the journal fsync and the `points.json` rename) become points again.
//! 3. `apply_pending` runs. For a batch whose undo record exists only the disk writes are
//!    repeated: its before-images were taken before any write of that batch, so they stay valid
//!    however far the interrupted writes got, and undo records are written strictly in batch
//!    order after the previous batch's writes. A batch without an undo record had no write done
//!    yet (or needs no undo), so step 1 is redone from the disk files.
//!
//! # Recovery points
//!
//! A tag in batch `s` is the state after every write of batches `<= s`. To materialize it, each
//! disk is cloned ([`failback_common::vdisk`]): as a sparse copy of its allocated extents
//! (`copy_file_range`, which reflinks on filesystems that share extents, so a mostly empty
//! disk copies in no time and holes stay holes; an `ioctl(FICLONE)` would need `unsafe`,
//! which this workspace forbids), or, with [`Share::Freeze`], as an overlay over the replica
//! disk frozen in place, which copies only what was written since the freeze. Then the undo
//! records of batches `applied_seq, ..., s + 1` are written back in reverse order (in a copy,
//! zero before-images punch holes). The replica's disks are overlays from a freeze on, until
//! [`ReplicaStore::fold_unshared`] finds their base no longer shared. Pruning deletes undo segments whose batches are all `<=` the oldest retained point.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use failback_common::blocks::{self, BlockDigest};
pub use failback_common::vdisk::Share;
use failback_common::vdisk::{self, VDisk};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// Frame magic of redo segments ("FBLR").
const REDO_MAGIC: u32 = u32::from_le_bytes(*b"FBLR");
/// Frame magic of undo segments ("FBLU").
const UNDO_MAGIC: u32 = u32::from_le_bytes(*b"FBLU");
/// magic + length + crc + seq.
const HEADER_LEN: usize = 20;
/// Largest payload of one frame: keeps a batch in memory comfortably and fits the u32 lengths.
const MAX_PAYLOAD: usize = 1 << 30;
/// Version byte at the start of every payload.
const PAYLOAD_VERSION: u8 = 1;
const ENTRY_WRITE: u8 = 1;
const ENTRY_TAG: u8 = 2;
/// A redo entry standing for a batch whose writes are already durable in the disk files.
const ENTRY_IN_PLACE: u8 = 3;
/// Segment size at which redo and undo logs rotate.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// Redo payload applied between two persisted `applied_seq` checkpoints within one
/// `apply_pending` call.
const CHECKPOINT_BYTES: usize = 256 << 20;
/// Chunk for buffered copies and digests.
const CHUNK: usize = 1 << 20;
const FILE_VERSION: u32 = 1;

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

/// One record of a replicated batch.
#[derive(Clone, PartialEq, Eq)]
pub enum Entry {
    /// Guest write: `data` goes to `disk` at byte `offset` (any length, must end inside the disk).
    Write {
        disk: String,
        offset: u64,
        data: bytes::Bytes,
    },
    /// Consistency tag: becomes a recovery point at the batch's sequence number. A batch that
    /// carries a tag carries nothing else.
    Tag {
        id: String,
        kind: PointKind,
        time_ms: i64,
        digests: Vec<DiskDigest>,
    },
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Entry::Write { disk, offset, data } => f
                .debug_struct("Write")
                .field("disk", disk)
                .field("offset", offset)
                .field("len", &data.len())
                .finish(),
            Entry::Tag {
                id,
                kind,
                time_ms,
                digests,
            } => f
                .debug_struct("Tag")
                .field("id", id)
                .field("kind", kind)
                .field("time_ms", time_ms)
                .field("digests", digests)
                .finish(),
        }
    }
}

/// Consistency of a recovery point (ASR's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PointKind {
    Crash,
    App,
    MultiVmCrash,
    MultiVmApp,
}

impl PointKind {
    /// The kebab-case name (`crash`, `app`, `multi-vm-crash`, `multi-vm-app`).
    pub fn as_str(self) -> &'static str {
        match self {
            PointKind::Crash => "crash",
            PointKind::App => "app",
            PointKind::MultiVmCrash => "multi-vm-crash",
            PointKind::MultiVmApp => "multi-vm-app",
        }
    }

    fn code(self) -> u8 {
        match self {
            PointKind::Crash => 0,
            PointKind::App => 1,
            PointKind::MultiVmCrash => 2,
            PointKind::MultiVmApp => 3,
        }
    }

    fn from_code(code: u8) -> Option<PointKind> {
        Some(match code {
            0 => PointKind::Crash,
            1 => PointKind::App,
            2 => PointKind::MultiVmCrash,
            3 => PointKind::MultiVmApp,
            _ => return None,
        })
    }
}

impl fmt::Display for PointKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A recovery point kind name that is not one of [`PointKind`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown recovery point kind {0:?} (expected crash, app, multi-vm-crash or multi-vm-app)")]
pub struct UnknownPointKind(pub String);

impl FromStr for PointKind {
    type Err = UnknownPointKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            PointKind::Crash,
            PointKind::App,
            PointKind::MultiVmCrash,
            PointKind::MultiVmApp,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
        .ok_or_else(|| UnknownPointKind(s.to_owned()))
    }
}

/// One disk written by [`ReplicaStore::materialize_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaterializedDisk {
    pub disk: String,
    pub path: PathBuf,
    /// An overlay sharing the replica's frozen base (else a copy).
    pub overlay: bool,
}

/// blake3 (hex) of a whole disk.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DiskDigest {
    pub disk: String,
    pub blake3: String,
}

/// A consistency tag applied at the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPoint {
    pub id: String,
    /// The batch that carried the tag: the point is the state after batches `<= seq`.
    pub seq: u64,
    /// Source time of the tag (ms since the Unix epoch).
    pub time_ms: i64,
    pub kind: PointKind,
    /// Digests the source computed when it made the tag (may be empty).
    pub digests: Vec<DiskDigest>,
}

/// A replica disk: its id (also its file name, `ID.img`) and size in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DiskSpec {
    pub id: String,
    pub size: u64,
}

/// What [`ReplicaStore::append`] did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AppendOutcome {
    /// The batch is durable in the journal.
    Appended,
    /// The batch was journaled before (a retry): nothing changed.
    Duplicate,
}

/// Tunables of a [`ReplicaStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// Size at which redo and undo segments rotate. Undo space is reclaimed per segment, so a
    /// smaller value frees space sooner at the cost of more files.
    pub segment_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
        }
    }
}

/// Errors of the replica store.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("batch {got} arrived out of order: the replica expects batch {expected} next")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("write of {len} bytes at offset {offset} does not fit disk {disk:?} ({size} bytes)")]
    OutOfRange {
        disk: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("unknown disk {0:?}: it is not one of this replicated item's disks")]
    UnknownDisk(String),
    #[error("unknown recovery point {0:?} (pruned, dropped, or never received)")]
    UnknownPoint(String),
    #[error("{} is corrupt: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("invalid disk {id:?}: {reason}")]
    InvalidDisk { id: String, reason: String },
    #[error(
        "disk {disk:?} at {} is {actual} bytes but the replicated item says {expected}; \
         resize or remove the file",
        path.display()
    )]
    DiskSizeMismatch {
        disk: String,
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("batch {seq} rejected: {reason}")]
    InvalidBatch { seq: u64, reason: String },
    #[error(
        "batch {seq} is {bytes} bytes encoded, more than the limit of {max}; send smaller batches"
    )]
    BatchTooLarge { seq: u64, bytes: usize, max: usize },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("replica {} is in use by another process or store (lock held)", path.display())]
    Locked { path: PathBuf },
    #[error("replica store stopped after an earlier failure ({0}); reopen it to recover")]
    Poisoned(String),
    #[doc(hidden)]
    #[error("injected fault: simulated crash {0}")]
    FaultInjected(&'static str),
}

/// Where [`ReplicaStore::inject_fault_for_test`] simulates a crash inside `apply_pending`.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// After the undo record of a batch with writes is durable, before any of its disk writes.
    AfterUndo,
    /// After the first disk write of a batch (the others not done).
    AfterFirstWrite,
    /// After all disk writes of a batch are durable, before `applied_seq` is persisted (in
    /// `apply_pending`), or before the in-place frame is journaled (in `append`).
    AfterDiskWrites,
}

impl FaultPoint {
    fn name(self) -> &'static str {
        match self {
            FaultPoint::AfterUndo => "after the undo record",
            FaultPoint::AfterFirstWrite => "after the first disk write",
            FaultPoint::AfterDiskWrites => "after the disk writes",
        }
    }
}

/// blake3 hex of a whole disk, raw or overlay ([`failback_common::vdisk`]).
pub fn file_digest(path: &Path) -> io::Result<String> {
    vdisk::digest_path(path)
}

// ---------------------------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------------------------

/// An open replica disk.
#[derive(Debug)]
struct Disk {
    spec: DiskSpec,
    path: PathBuf,
    /// The disk file (raw, or an overlay once a failover shared its blocks), with
    /// page-cache-free writes of aligned spans (see [`ReplicaStore::write_disk`]).
    disk: VDisk,
}

/// `state.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    applied_seq: u64,
}

/// `points.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct PointsFile {
    version: u32,
    /// Tags of batches `<= through_seq` are reflected in `points` (added, or pruned since).
    through_seq: u64,
    points: Vec<RecoveryPoint>,
}

/// The replica of one replicated item: disks, redo journal, undo log and recovery points.
#[derive(Debug)]
pub struct ReplicaStore {
    dir: PathBuf,
    specs: Vec<DiskSpec>,
    disks: Vec<Disk>,
    redo: SegmentLog,
    undo: SegmentLog,
    /// Highest batch durable in the redo journal.
    last_seq: u64,
    /// Highest batch whose writes are durable in the disk files and recorded in `state.json`.
    applied_seq: u64,
    /// Recovery points, oldest (lowest seq) first.
    points: Vec<RecoveryPoint>,
    /// Equal to `last_seq` while every batch after `applied_seq` was appended in place (their
    /// writes are already in the disk files), so the next one may be too.
    in_place_through: u64,
    /// Set after a failure that leaves memory and disk possibly out of step (a failed fsync,
    /// an injected crash): every later mutation fails until the store is reopened.
    poisoned: Option<String>,
    /// Armed fault for crash tests: where, and in which batch.
    fault: Option<(FaultPoint, u64)>,
    /// Counter for scratch directory names.
    scratch: u64,
    /// Why the disk files no longer hold what the replica acknowledged (a disk file missing or
    /// shorter than recorded when the store opened): the item needs a resynchronisation.
    damage: Option<String>,
    /// Set by [`ReplicaStore::lost_everything`]: the next batch sets where the sequence is.
    rebase: bool,
    /// Exclusive flock on `DIR/LOCK` for the store's lifetime.
    _lock: Flock<File>,
}

impl ReplicaStore {
    /// Grows disk `id` to `size` bytes (the source disk was resized; the new space reads as
    /// zeros until the resync fills it). Shrinking is refused.
    pub fn grow_disk(&mut self, id: &str, size: u64) -> Result<(), ReplicaError> {
        let idx = self
            .disks
            .iter()
            .position(|d| d.spec.id == id)
            .ok_or_else(|| ReplicaError::UnknownDisk(id.to_string()))?;
        let current = self.disks[idx].spec.size;
        if size < current {
            return Err(ReplicaError::InvalidArgument(format!(
                "disk {id} can't shrink from {current} to {size} bytes"
            )));
        }
        if size == current {
            return Ok(());
        }
        let disk = &mut self.disks[idx];
        disk.disk.set_len(size).map_err(io_at(&disk.path))?;
        disk.disk.sync_all().map_err(io_at(&disk.path))?;
        disk.spec.size = size;
        if let Some(spec) = self.specs.iter_mut().find(|s| s.id == id) {
            spec.size = size;
        }
        tracing::info!(disk = %id, size, "replica disk grown");
        Ok(())
    }

    /// Opens or creates the replica in `dir` with these disks (missing `DISK.img` files are
    /// created sparse at the given size; an existing one of another size is an error), and
    /// recovers from a crash: see the module docs. Pending batches are applied before returning.
    pub fn open(dir: &Path, disks: &[DiskSpec]) -> Result<ReplicaStore, ReplicaError> {
        ReplicaStore::open_with(dir, disks, StoreOptions::default())
    }

    /// [`ReplicaStore::open`] with explicit [`StoreOptions`].
    pub fn open_with(
        dir: &Path,
        disks: &[DiskSpec],
        options: StoreOptions,
    ) -> Result<ReplicaStore, ReplicaError> {
        validate_specs(disks)?;
        create_dir(dir)?;
        let lock_path = dir.join("LOCK");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_at(&lock_path))?;
        let lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, Errno::EWOULDBLOCK)) => return Err(ReplicaError::Locked { path: dir.into() }),
            Err((_, errno)) => return Err(io_at(&lock_path)(errno.into())),
        };
        let disks_dir = dir.join("disks");
        create_dir(&disks_dir)?;
        // A replica opened before (its `state.json` is written when it is first opened) has
        // disk files that hold what it acknowledged: one missing or shorter than recorded lost
        // writes (fail closed: recreated, and flagged).
        let established = dir.join("state.json").exists();
        let scratch = dir.join("tmp");
        match fs::remove_dir_all(&scratch) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_at(&scratch)(e)),
        }
        let mut open_disks = Vec::with_capacity(disks.len());
        let mut damage = Vec::new();
        for spec in disks {
            let (disk, lost) = open_disk(&disks_dir, spec, established)?;
            open_disks.push(disk);
            damage.extend(lost);
        }

        let state: StateFile = match read_json(&dir.join("state.json"))? {
            Some(state) => state,
            None => {
                // A new replica: from now on its disk files are expected, so one that goes
                // missing later is lost data, not a new replica (see `established`).
                let fresh = StateFile {
                    version: FILE_VERSION,
                    applied_seq: 0,
                };
                write_json_atomic(&dir.join("state.json"), &fresh)?;
                fresh
            }
        };
        let segment_bytes = options.segment_bytes.max(1);
        let redo = SegmentLog::open(
            dir.join("journal"),
            "redo",
            REDO_MAGIC,
            SeqRule::Consecutive,
            segment_bytes,
        )?;
        let undo = SegmentLog::open(
            dir.join("undo"),
            "undo",
            UNDO_MAGIC,
            SeqRule::Increasing,
            segment_bytes,
        )?;
        let applied_seq = state.applied_seq;
        if let Some(first) = redo.first_seq()
            && first > applied_seq.saturating_add(1)
        {
            return Err(ReplicaError::Corrupt {
                path: redo.dir.clone(),
                reason: format!(
                    "the journal starts at batch {first} but only batches up to {applied_seq} \
                     are applied: batches {} to {} are missing",
                    applied_seq + 1,
                    first - 1
                ),
            });
        }
        let last_seq = redo.last_seq().unwrap_or(0).max(applied_seq);

        let mut store = ReplicaStore {
            dir: dir.to_path_buf(),
            specs: disks.to_vec(),
            disks: open_disks,
            redo,
            undo,
            last_seq,
            applied_seq,
            points: Vec::new(),
            in_place_through: 0,
            poisoned: None,
            fault: None,
            scratch: 0,
            damage: (!damage.is_empty()).then(|| damage.join("; ")),
            rebase: false,
            _lock: lock,
        };
        store.recover_points()?;
        store.gc_undo()?;
        store.apply_pending()?;
        tracing::debug!(
            dir = %store.dir.display(),
            last_seq = store.last_seq,
            applied_seq = store.applied_seq,
            points = store.points.len(),
            "replica opened"
        );
        Ok(store)
    }

    /// Why the replica's disks lost acknowledged writes, if they did (see `open`): the
    /// owner resynchronises the item and drops the points, which can't be read any more.
    pub fn damage(&self) -> Option<&str> {
        self.damage.as_deref()
    }

    /// A replica made anew because the one the item had is gone (`reason`): damaged, and the
    /// next batch, whatever its number, continues the item's stream here (the sender can't
    /// go back to batch 1; the resync the owner starts fills in the disks).
    pub fn lost_everything(&mut self, reason: String) {
        self.damage = Some(reason);
        self.rebase = self.last_seq == 0;
    }

    /// Highest batch durably journaled (0 = none).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Highest batch applied to the disk files.
    pub fn applied_seq(&self) -> u64 {
        self.applied_seq
    }

    /// The replica's disks.
    pub fn disks(&self) -> &[DiskSpec] {
        &self.specs
    }

    /// Redo plus undo bytes on disk (for status).
    pub fn journal_bytes(&self) -> u64 {
        self.redo.bytes() + self.undo.bytes()
    }

    /// Bytes of the redo journal (batches journaled, kept while a point needs them).
    pub fn redo_bytes(&self) -> u64 {
        self.redo.bytes()
    }

    /// Bytes of the undo log (before-images that take the disks back to a point).
    pub fn undo_bytes(&self) -> u64 {
        self.undo.bytes()
    }

    /// Recovery points, oldest first.
    pub fn points(&self) -> Vec<RecoveryPoint> {
        self.points.clone()
    }

    /// The recovery point `id`, if retained.
    pub fn point(&self, id: &str) -> Option<RecoveryPoint> {
        self.points.iter().find(|p| p.id == id).cloned()
    }

    /// Durably appends batch `seq` (fdatasync before `Ok`). Sequence numbers start at 1.
    ///
    /// `seq <= last_seq` is a retry: `Ok(Duplicate)` and nothing changes. Any other
    /// `seq != last_seq + 1` is [`ReplicaError::OutOfOrder`]. A write to an unknown disk or
    /// outside a disk, or a tag sharing its batch with other entries, rejects the whole batch
    /// and nothing of it is journaled. A tag becomes a recovery point at `seq`.
    pub fn append(&mut self, seq: u64, entries: &[Entry]) -> Result<AppendOutcome, ReplicaError> {
        self.check_poisoned()?;
        if seq <= self.last_seq {
            return Ok(AppendOutcome::Duplicate);
        }
        if std::mem::take(&mut self.rebase) && seq > self.last_seq + 1 {
            // Nothing before `seq` is here or can come: recorded as applied (empty).
            write_json_atomic(
                &self.dir.join("state.json"),
                &StateFile {
                    version: FILE_VERSION,
                    applied_seq: seq - 1,
                },
            )?;
            self.applied_seq = seq - 1;
            self.last_seq = seq - 1;
            self.in_place_through = seq - 1;
            tracing::warn!(dir = %self.dir.display(), from = seq, "a replica made anew takes the stream from batch {seq}");
        }
        let expected = self.last_seq + 1;
        if seq != expected {
            return Err(ReplicaError::OutOfOrder { expected, got: seq });
        }
        let point = self.validate_batch(seq, entries)?;
        let nothing_pending =
            self.applied_seq == self.last_seq || self.in_place_through == self.last_seq;
        if point.is_none() && self.points.is_empty() && nothing_pending {
            return self.append_in_place(seq, entries);
        }
        let frame = encode_batch(seq, entries)?;
        if let Err(failure) = self.redo.append(seq, &frame) {
            return Err(if failure.fatal {
                self.poison(failure.error)
            } else {
                failure.error
            });
        }
        self.last_seq = seq;
        if let Some(point) = point {
            tracing::debug!(point = %point.id, seq, kind = %point.kind, "recovery point journaled");
            self.points.push(point);
            if let Err(e) = self.persist_points() {
                // The tag is durable in the journal; reopening re-derives the point from it.
                return Err(self.poison(e));
            }
        }
        Ok(AppendOutcome::Appended)
    }

    /// The in-place form of `append` (see the module docs): the writes go straight into the
    /// disk files and are fdatasynced, then a small in-place frame is journaled in the batch's
    /// place. Only while no point exists and nothing journaled is pending.
    fn append_in_place(
        &mut self,
        seq: u64,
        entries: &[Entry],
    ) -> Result<AppendOutcome, ReplicaError> {
        let mut touched = BTreeSet::new();
        let mut bytes = 0u64;
        for entry in entries {
            if let Entry::Write { disk, offset, data } = entry {
                let d = self.check_write(disk, *offset, data.len())?;
                self.write_disk(d, *offset, data)?;
                touched.insert(d);
                bytes += data.len() as u64;
            }
        }
        self.sync_disks(&mut touched)?;
        self.maybe_fault(FaultPoint::AfterDiskWrites, seq)?;
        let mut frame = FrameBuf::with_capacity(14);
        frame.put_u8(PAYLOAD_VERSION);
        frame.put_u32(1);
        frame.put_u8(ENTRY_IN_PLACE);
        frame.put_u64(bytes);
        if let Err(failure) = self.redo.append(seq, &frame.finish(REDO_MAGIC, seq)) {
            return Err(if failure.fatal {
                self.poison(failure.error)
            } else {
                failure.error
            });
        }
        self.last_seq = seq;
        self.in_place_through = seq;
        Ok(AppendOutcome::Appended)
    }

    /// Applies journaled batches to the disk files (undo record first, then the writes; see the
    /// module docs). Cheap when nothing is pending.
    pub fn apply_pending(&mut self) -> Result<(), ReplicaError> {
        while self.apply_some(CHECKPOINT_BYTES)? {}
        Ok(())
    }

    /// Applies journaled batches as [`ReplicaStore::apply_pending`] does, but stops at the
    /// first checkpoint after about `max_bytes` of redo payload. Returns whether batches are
    /// still pending. The applier calls it in a loop, releasing the store between calls, so that
    /// appends (which wait for the store) wait for one bounded step, never for a whole backlog.
    pub fn apply_some(&mut self, max_bytes: usize) -> Result<bool, ReplicaError> {
        self.check_poisoned()?;
        if self.applied_seq >= self.last_seq {
            return Ok(false);
        }
        let mut touched = BTreeSet::new();
        let mut done = self.applied_seq;
        let mut since_checkpoint = 0usize;
        for seq in self.applied_seq + 1..=self.last_seq {
            let payload = self.redo.read(seq)?;
            let items = decode_batch(&payload).map_err(|reason| ReplicaError::Corrupt {
                path: self.redo.dir.clone(),
                reason: format!("batch {seq}: {reason}"),
            })?;
            let mut writes = Vec::new();
            for item in &items {
                if let BatchItem::Write { disk, offset, data } = *item {
                    writes.push((self.check_write(disk, offset, data.len())?, offset, data));
                }
            }
            if self.needs_undo(seq) && !self.undo.contains(seq) {
                let frame = self.before_images(seq, &writes)?;
                if let Err(failure) = self.undo.append(seq, &frame) {
                    return Err(if failure.fatal {
                        self.poison(failure.error)
                    } else {
                        failure.error
                    });
                }
            } else if self.undo.contains(seq) {
                tracing::info!(seq, "redoing the disk writes of an interrupted batch");
            }
            if !writes.is_empty() {
                self.maybe_fault(FaultPoint::AfterUndo, seq)?;
            }
            for (i, &(disk, offset, data)) in writes.iter().enumerate() {
                self.write_disk(disk, offset, data)?;
                touched.insert(disk);
                if i == 0 {
                    self.maybe_fault(FaultPoint::AfterFirstWrite, seq)?;
                }
            }
            done = seq;
            since_checkpoint += payload.len();
            if !writes.is_empty() && self.fault == Some((FaultPoint::AfterDiskWrites, seq)) {
                self.sync_disks(&mut touched)?;
                self.maybe_fault(FaultPoint::AfterDiskWrites, seq)?;
            }
            if since_checkpoint >= max_bytes {
                break;
            }
        }
        self.checkpoint(done, &mut touched)?;
        Ok(self.applied_seq < self.last_seq)
    }

    /// Removes the points for which `keep` is false (never the newest point) and deletes the
    /// undo segments no retained point needs. Returns the removed ids.
    pub fn prune(
        &mut self,
        keep: impl Fn(&RecoveryPoint) -> bool,
    ) -> Result<Vec<String>, ReplicaError> {
        self.check_poisoned()?;
        let newest = self.points.len().saturating_sub(1);
        let mut removed = Vec::new();
        let mut retained = Vec::with_capacity(self.points.len());
        for (i, point) in std::mem::take(&mut self.points).into_iter().enumerate() {
            if i == newest || keep(&point) {
                retained.push(point);
            } else {
                removed.push(point.id);
            }
        }
        self.points = retained;
        if !removed.is_empty() {
            // Points first, undo second: a crash in between leaves unneeded undo (collected on
            // open), never a point without its undo.
            self.persist_points()?;
            tracing::info!(removed = ?removed, "recovery points pruned");
        }
        self.gc_undo()?;
        Ok(removed)
    }

    /// Removes all recovery points and all undo data (ASR's "commit" deletes recovery points).
    /// The disks keep the latest state.
    pub fn drop_points(&mut self) -> Result<(), ReplicaError> {
        self.check_poisoned()?;
        self.points.clear();
        self.persist_points()?;
        self.gc_undo()
    }

    /// Writes each disk as of `point` (`None` = latest) to `out_dir/DISK.img` as a raw sparse
    /// copy, byte-exact and sparse where the replica is sparse. Returns (disk id, path) pairs.
    pub fn materialize(
        &mut self,
        point: Option<&str>,
        out_dir: &Path,
    ) -> Result<Vec<(String, PathBuf)>, ReplicaError> {
        Ok(self
            .materialize_with(point, out_dir, Share::Copy)?
            .into_iter()
            .map(|m| (m.disk, m.path))
            .collect())
    }

    /// [`ReplicaStore::materialize`], each disk made as `share` says: a copy, or an overlay
    /// sharing the replica's frozen base ([`failback_common::vdisk`]), which copies only the
    /// blocks written since the freeze plus the point's rollback. The replica's own disks
    /// become overlays when `share` freezes them; they fold back by themselves once nothing
    /// shares their base ([`ReplicaStore::fold_unshared`]).
    pub fn materialize_with(
        &mut self,
        point: Option<&str>,
        out_dir: &Path,
        share: Share,
    ) -> Result<Vec<MaterializedDisk>, ReplicaError> {
        self.apply_pending()?;
        let target = match point {
            None => self.applied_seq,
            Some(id) => {
                self.point(id)
                    .ok_or_else(|| ReplicaError::UnknownPoint(id.into()))?
                    .seq
            }
        };
        if let Some(missing) = (target + 1..=self.applied_seq).find(|s| !self.undo.contains(*s)) {
            return Err(ReplicaError::Corrupt {
                path: self.undo.dir.clone(),
                reason: format!(
                    "the undo record of batch {missing} is missing, so point {:?} cannot be \
                     rebuilt",
                    point.unwrap_or("latest")
                ),
            });
        }
        create_dir(out_dir)?;
        let disks_dir = self.dir.join("disks");
        if fs::canonicalize(out_dir).map_err(io_at(out_dir))?
            == fs::canonicalize(&disks_dir).map_err(io_at(&disks_dir))?
        {
            return Err(ReplicaError::InvalidArgument(format!(
                "{} holds the replica disks themselves; materialize elsewhere",
                out_dir.display()
            )));
        }
        let mut outputs = Vec::with_capacity(self.disks.len());
        let mut shared = Vec::with_capacity(self.disks.len());
        for disk in &mut self.disks {
            let path = out_dir.join(format!("{}.img", disk.spec.id));
            let (out, overlay) = disk.disk.clone_to(&path, share).map_err(io_at(&path))?;
            outputs.push((path, out));
            shared.push(overlay);
        }
        for seq in (target + 1..=self.applied_seq).rev() {
            let payload = self.undo.read(seq)?;
            let images = decode_undo(&payload).map_err(|reason| ReplicaError::Corrupt {
                path: self.undo.dir.clone(),
                reason: format!("undo record of batch {seq}: {reason}"),
            })?;
            for &(disk, offset, data) in images.iter().rev() {
                let idx = self.check_write(disk, offset, data.len())?;
                let (path, out) = &mut outputs[idx];
                out.restore_at(data, offset).map_err(io_at(path))?;
            }
        }
        for (path, out) in &outputs {
            out.sync_all().map_err(io_at(path))?;
        }
        fsync_dir(out_dir)?;
        Ok(self
            .specs
            .iter()
            .zip(outputs)
            .zip(shared)
            .map(|((s, (path, _)), overlay)| MaterializedDisk {
                disk: s.id.clone(),
                path,
                overlay,
            })
            .collect())
    }

    /// Folds each replica disk that is an overlay no other disk shares any more back into a
    /// raw disk (copying only its delta). Returns how many folded. Cheap when none is an
    /// overlay: one `fstat` per overlay disk.
    pub fn fold_unshared(&mut self) -> Result<usize, ReplicaError> {
        self.check_poisoned()?;
        let mut folded = 0;
        for d in 0..self.disks.len() {
            let disk = &mut self.disks[d];
            if !disk.disk.is_overlay() {
                continue;
            }
            match disk.disk.fold_if_unshared() {
                Ok(true) => folded += 1,
                Ok(false) => {}
                Err(e) => {
                    let err = io_at(&self.disks[d].path)(e);
                    return Err(self.poison(err));
                }
            }
        }
        Ok(folded)
    }

    /// Whether any replica disk is an overlay over a frozen base.
    pub fn has_overlay(&self) -> bool {
        self.disks.iter().any(|d| d.disk.is_overlay())
    }

    /// Whether replica disk `id` is an overlay over a frozen base (for status and tests).
    pub fn disk_is_overlay(&self, id: &str) -> Option<bool> {
        self.disks
            .iter()
            .find(|d| d.spec.id == id)
            .map(|d| d.disk.is_overlay())
    }

    /// blake3 hex digest of each disk as of `point` (`None` = latest).
    pub fn digest(&mut self, point: Option<&str>) -> Result<Vec<DiskDigest>, ReplicaError> {
        self.apply_pending()?;
        let Some(id) = point else {
            return self
                .disks
                .iter()
                .map(|d| {
                    Ok(DiskDigest {
                        disk: d.spec.id.clone(),
                        blake3: d.disk.digest().map_err(io_at(&d.path))?,
                    })
                })
                .collect();
        };
        if self.point(id).is_none() {
            return Err(ReplicaError::UnknownPoint(id.into()));
        }
        self.scratch += 1;
        let scratch = ScratchDir(self.dir.join("tmp").join(format!(
            "digest-{}-{}",
            std::process::id(),
            self.scratch
        )));
        // A verification must not change the replica's layout: it shares an already frozen
        // base, else copies.
        let files = self.materialize_with(Some(id), &scratch.0, Share::IfFrozen)?;
        files
            .iter()
            .map(|m| {
                Ok(DiskDigest {
                    disk: m.disk.clone(),
                    blake3: vdisk::digest_path(&m.path).map_err(io_at(&m.path))?,
                })
            })
            .collect()
    }

    /// The block digest ([`failback_common::blocks`]) of each `block_size` block of `disk` in
    /// `[offset, offset + len)` of the latest state (the last block may be shorter). Holes
    /// read as zeros.
    pub fn block_checksums(
        &mut self,
        disk: &str,
        offset: u64,
        len: u64,
        block_size: u64,
    ) -> Result<Vec<BlockDigest>, ReplicaError> {
        self.apply_pending()?;
        if block_size == 0 {
            return Err(ReplicaError::InvalidArgument(
                "block_size must be positive".into(),
            ));
        }
        let idx = self.check_write(disk, offset, usize::try_from(len).unwrap_or(usize::MAX))?;
        let Disk { disk, path, .. } = &self.disks[idx];
        let end = offset + len;
        let blocks = usize::try_from(len.div_ceil(block_size)).unwrap_or(usize::MAX);
        let mut sums = Vec::with_capacity(blocks.min(1 << 16));
        let mut buf = vec![0u8; usize::try_from(block_size).unwrap_or(CHUNK).min(CHUNK)];
        let mut zero_sum: Option<(u64, BlockDigest)> = None;
        // First offset >= the current block that holds data (u64::MAX: none), once known.
        let mut next_data: Option<u64> = None;
        let mut start = offset;
        while start < end {
            let stop = end.min(start.saturating_add(block_size));
            let data_at = match next_data {
                Some(at) if at >= start => at,
                _ => disk
                    .next_data(start)
                    .map_err(io_at(path))?
                    .unwrap_or(u64::MAX),
            };
            next_data = Some(data_at);
            if data_at >= stop {
                let sum = match zero_sum {
                    Some((n, sum)) if n == stop - start => sum,
                    _ => {
                        let sum = blocks::zeros(stop - start);
                        zero_sum = Some((stop - start, sum));
                        sum
                    }
                };
                sums.push(sum);
            } else {
                let mut hasher = blocks::Hasher::new();
                let mut pos = start;
                while pos < stop {
                    let n = usize::try_from(stop - pos)
                        .unwrap_or(usize::MAX)
                        .min(buf.len());
                    disk.read_at(&mut buf[..n], pos).map_err(io_at(path))?;
                    hasher.update(&buf[..n]);
                    pos += n as u64;
                }
                sums.push(hasher.finish());
            }
            start = stop;
        }
        Ok(sums)
    }

    /// Arms a simulated crash at `at` while `apply_pending` applies batch `seq` (which must
    /// contain writes). The store is poisoned afterwards, like a crashed process: drop and
    /// reopen it. `None` disarms.
    #[doc(hidden)]
    pub fn inject_fault_for_test(&mut self, fault: Option<(FaultPoint, u64)>) {
        self.fault = fault;
    }

    // -- internals ------------------------------------------------------------------------------

    fn check_poisoned(&self) -> Result<(), ReplicaError> {
        match &self.poisoned {
            Some(reason) => Err(ReplicaError::Poisoned(reason.clone())),
            None => Ok(()),
        }
    }

    fn poison(&mut self, err: ReplicaError) -> ReplicaError {
        tracing::error!(dir = %self.dir.display(), error = %err, "replica store poisoned");
        self.poisoned = Some(err.to_string());
        err
    }

    fn maybe_fault(&mut self, at: FaultPoint, seq: u64) -> Result<(), ReplicaError> {
        if self.fault != Some((at, seq)) {
            return Ok(());
        }
        self.fault = None;
        Err(self.poison(ReplicaError::FaultInjected(at.name())))
    }

    /// Index of `disk` after checking that `[offset, offset + len)` lies inside it.
    fn check_write(&self, disk: &str, offset: u64, len: usize) -> Result<usize, ReplicaError> {
        let idx = self
            .disks
            .iter()
            .position(|d| d.spec.id == disk)
            .ok_or_else(|| ReplicaError::UnknownDisk(disk.into()))?;
        let size = self.disks[idx].spec.size;
        let len = len as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(idx),
            _ => Err(ReplicaError::OutOfRange {
                disk: disk.into(),
                offset,
                len,
                size,
            }),
        }
    }

    fn validate_batch(
        &self,
        seq: u64,
        entries: &[Entry],
    ) -> Result<Option<RecoveryPoint>, ReplicaError> {
        let mut point = None;
        for entry in entries {
            match entry {
                Entry::Write { disk, offset, data } => {
                    self.check_write(disk, *offset, data.len())?;
                }
                Entry::Tag {
                    id,
                    kind,
                    time_ms,
                    digests,
                } => {
                    if entries.len() != 1 {
                        return Err(ReplicaError::InvalidBatch {
                            seq,
                            reason: format!(
                                "a batch carrying consistency tag {id:?} must carry nothing else \
                                 (it has {} entries)",
                                entries.len()
                            ),
                        });
                    }
                    if id.is_empty() {
                        return Err(ReplicaError::InvalidBatch {
                            seq,
                            reason: "consistency tag with an empty id".into(),
                        });
                    }
                    if self.points.iter().any(|p| p.id == *id) {
                        return Err(ReplicaError::InvalidBatch {
                            seq,
                            reason: format!("recovery point {id:?} already exists"),
                        });
                    }
                    point = Some(RecoveryPoint {
                        id: id.clone(),
                        seq,
                        time_ms: *time_ms,
                        kind: *kind,
                        digests: digests.clone(),
                    });
                }
            }
        }
        Ok(point)
    }

    /// Whether batch `seq` needs an undo record: some retained point lies before it.
    fn needs_undo(&self, seq: u64) -> bool {
        self.points.first().is_some_and(|p| p.seq < seq)
    }

    /// The undo frame of batch `seq`: the current bytes under each of its writes.
    fn before_images(
        &self,
        seq: u64,
        writes: &[(usize, u64, &[u8])],
    ) -> Result<Vec<u8>, ReplicaError> {
        let size = 5 + writes
            .iter()
            .map(|(d, _, data)| 16 + self.disks[*d].spec.id.len() + data.len())
            .sum::<usize>();
        if size > MAX_PAYLOAD {
            return Err(ReplicaError::BatchTooLarge {
                seq,
                bytes: size,
                max: MAX_PAYLOAD,
            });
        }
        let mut frame = FrameBuf::with_capacity(size);
        frame.put_u8(PAYLOAD_VERSION);
        frame.put_u32(writes.len() as u32);
        for &(d, offset, data) in writes {
            let disk = &self.disks[d];
            frame.put_str(&disk.spec.id);
            frame.put_u64(offset);
            frame.put_u32(data.len() as u32);
            let slot = frame.zeroed(data.len());
            disk.disk.read_at(slot, offset).map_err(io_at(&disk.path))?;
        }
        Ok(frame.finish(UNDO_MAGIC, seq))
    }

    /// Writes `data` into disk `d` at `offset`: directly (no page cache) when the span is
    /// aligned, buffered otherwise. The caller fdatasyncs. A failure poisons the store.
    fn write_disk(&mut self, d: usize, offset: u64, data: &[u8]) -> Result<(), ReplicaError> {
        self.disks[d].disk.write_at(data, offset).map_err(|e| {
            let err = io_at(&self.disks[d].path)(e);
            self.poison(err)
        })
    }

    fn sync_disks(&mut self, touched: &mut BTreeSet<usize>) -> Result<(), ReplicaError> {
        for &d in touched.iter() {
            if let Err(e) = self.disks[d].disk.sync_data() {
                let err = io_at(&self.disks[d].path)(e);
                return Err(self.poison(err));
            }
        }
        touched.clear();
        Ok(())
    }

    /// Makes batches `<= done` durable in the disks and in `state.json`, then drops applied
    /// redo segments.
    fn checkpoint(&mut self, done: u64, touched: &mut BTreeSet<usize>) -> Result<(), ReplicaError> {
        if done <= self.applied_seq {
            return Ok(());
        }
        self.sync_disks(touched)?;
        write_json_atomic(
            &self.dir.join("state.json"),
            &StateFile {
                version: FILE_VERSION,
                applied_seq: done,
            },
        )?;
        self.applied_seq = done;
        self.redo.remove_through(done, true)?;
        Ok(())
    }

    fn persist_points(&self) -> Result<(), ReplicaError> {
        write_json_atomic(
            &self.dir.join("points.json"),
            &PointsFile {
                version: FILE_VERSION,
                through_seq: self.last_seq,
                points: self.points.clone(),
            },
        )
    }

    /// Loads `points.json` and reconciles it with the journal (see the module docs).
    fn recover_points(&mut self) -> Result<(), ReplicaError> {
        let path = self.dir.join("points.json");
        let file: PointsFile = read_json(&path)?.unwrap_or_default();
        let mut points = file.points;
        let mut changed = file.through_seq != self.last_seq;
        let before = points.len();
        points.retain(|p| p.seq <= self.last_seq);
        if points.len() != before {
            tracing::warn!(
                dropped = before - points.len(),
                last_seq = self.last_seq,
                "recovery points beyond the journal's end dropped"
            );
        }
        let through = file.through_seq.min(self.last_seq);
        let tagged: Vec<u64> = self
            .redo
            .index
            .range(through.saturating_add(1)..)
            .map(|(s, _)| *s)
            .collect();
        for seq in tagged {
            let payload = self.redo.read(seq)?;
            let items = decode_batch(&payload).map_err(|reason| ReplicaError::Corrupt {
                path: self.redo.dir.clone(),
                reason: format!("batch {seq}: {reason}"),
            })?;
            for item in items {
                if let BatchItem::Tag(point) = item
                    && !points.iter().any(|p| p.id == point.id)
                {
                    tracing::info!(point = %point.id, seq, "recovery point recovered from the journal");
                    points.push(RecoveryPoint { seq, ..point });
                    changed = true;
                }
            }
        }
        points.sort_by_key(|p| p.seq);
        self.points = points;
        if changed {
            self.persist_points()?;
        }
        Ok(())
    }

    /// Deletes undo segments that no retained point (and no in-flight batch) needs.
    fn gc_undo(&mut self) -> Result<(), ReplicaError> {
        let oldest = self.points.first().map_or(u64::MAX, |p| p.seq);
        let removed = self
            .undo
            .remove_through(oldest.min(self.applied_seq), false)?;
        if removed > 0 {
            tracing::debug!(segments = removed, "undo segments deleted");
        }
        Ok(())
    }
}

/// Removes a scratch directory when dropped.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.0.display(), error = %e, "scratch directory not removed");
        }
    }
}

fn validate_specs(disks: &[DiskSpec]) -> Result<(), ReplicaError> {
    let mut seen = BTreeSet::new();
    for spec in disks {
        let invalid = |reason: &str| ReplicaError::InvalidDisk {
            id: spec.id.clone(),
            reason: reason.into(),
        };
        if spec.id.is_empty() || spec.id.len() > 128 {
            return Err(invalid("the id must be 1 to 128 characters"));
        }
        if spec.id.starts_with(['.', '-'])
            || !spec
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(invalid(
                "the id may hold letters, digits, '.', '_' and '-' and must not start with '.' or '-'",
            ));
        }
        if i64::try_from(spec.size).is_err() {
            return Err(invalid("the size must fit a signed 64-bit file offset"));
        }
        if !seen.insert(spec.id.as_str()) {
            return Err(invalid("listed twice"));
        }
    }
    Ok(())
}

/// Opens `DIR/disks/ID.img` (raw or overlay), creating it raw and sparse (atomically: tmp
/// file, then rename).
/// Opens (or creates) a replica disk; in an `established` replica, a missing disk or one
/// shorter than recorded is recreated or extended with zeros and reported as lost data.
fn open_disk(
    disks_dir: &Path,
    spec: &DiskSpec,
    established: bool,
) -> Result<(Disk, Option<String>), ReplicaError> {
    let path = disks_dir.join(format!("{}.img", spec.id));
    let mut lost = None;
    let mut disk = if VDisk::exists(&path) {
        VDisk::open(&path).map_err(io_at(&path))?
    } else {
        let disk = VDisk::create(&path, spec.size).map_err(io_at(&path))?;
        if established {
            tracing::error!(disk = %spec.id, path = %path.display(), "replica disk missing: recreated empty; the item needs a resync");
            lost = Some(format!("replica disk {} was missing", path.display()));
        } else {
            tracing::info!(disk = %spec.id, size = spec.size, "replica disk created");
        }
        disk
    };
    if established && disk.len() < spec.size {
        tracing::error!(disk = %spec.id, path = %path.display(), size = disk.len(), expected = spec.size, "replica disk shorter than recorded: extended; the item needs a resync");
        lost = Some(format!(
            "replica disk {} was {} bytes, shorter than the {} recorded",
            path.display(),
            disk.len(),
            spec.size
        ));
        disk.set_len(spec.size).map_err(io_at(&path))?;
    }
    if disk.len() != spec.size {
        return Err(ReplicaError::DiskSizeMismatch {
            disk: spec.id.clone(),
            path,
            expected: spec.size,
            actual: disk.len(),
        });
    }
    Ok((
        Disk {
            spec: spec.clone(),
            disk: disk.with_direct(),
            path,
        },
        lost,
    ))
}

// ---------------------------------------------------------------------------------------------
// Segmented frame logs (redo journal and undo log)
// ---------------------------------------------------------------------------------------------

/// How sequence numbers must follow each other in a log.
#[derive(Debug, Clone, Copy)]
enum SeqRule {
    /// Each frame is the previous seq + 1 (redo).
    Consecutive,
    /// Each frame is greater than the previous (undo: batches without undo are skipped).
    Increasing,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    /// Valid bytes (frames end here).
    len: u64,
    /// Seq of the last frame, `None` if the segment is empty.
    last_seq: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct FrameLoc {
    /// Key of the segment (its first seq).
    segment: u64,
    offset: u64,
    payload_len: usize,
}

/// A failed append; `fatal` when the log may no longer match memory (a failed fsync).
struct AppendFailure {
    error: ReplicaError,
    fatal: bool,
}

#[derive(Debug)]
struct SegmentLog {
    dir: PathBuf,
    prefix: &'static str,
    magic: u32,
    segment_bytes: u64,
    /// Segments by the seq in their name, oldest first; the last one is the one appended to.
    segments: BTreeMap<u64, Segment>,
    /// Where each frame lives.
    index: BTreeMap<u64, FrameLoc>,
    /// Writable handle of the last segment (opened lazily).
    active: Option<File>,
}

impl SegmentLog {
    /// Opens the log in `dir`, truncating a torn or invalid tail (and any later segment).
    fn open(
        dir: PathBuf,
        prefix: &'static str,
        magic: u32,
        rule: SeqRule,
        segment_bytes: u64,
    ) -> Result<SegmentLog, ReplicaError> {
        create_dir(&dir)?;
        let mut names = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_at(&dir))? {
            let entry = entry.map_err(io_at(&dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(seq) = name
                .strip_prefix(prefix)
                .and_then(|s| s.strip_prefix('-'))
                .and_then(|s| s.strip_suffix(".log"))
                .filter(|s| s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
            {
                names.push((seq, entry.path()));
            }
        }
        names.sort();

        let mut log = SegmentLog {
            dir: dir.clone(),
            prefix,
            magic,
            segment_bytes,
            segments: BTreeMap::new(),
            index: BTreeMap::new(),
            active: None,
        };
        let mut prev: Option<u64> = None;
        let mut cut = false;
        let mut payload = Vec::new();
        for (key, path) in names {
            if cut {
                fs::remove_file(&path).map_err(io_at(&path))?;
                tracing::warn!(path = %path.display(), "segment after a damaged frame deleted");
                continue;
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io_at(&path))?;
            let file_len = file.metadata().map_err(io_at(&path))?.len();
            let mut pos = 0u64;
            let mut last = None;
            while pos < file_len {
                let frame =
                    read_frame(&file, pos, file_len, magic, &mut payload).map_err(io_at(&path))?;
                let problem = match frame {
                    Err(reason) => Some(reason),
                    Ok(seq) => match (rule, prev) {
                        (SeqRule::Consecutive, Some(p)) if seq != p + 1 => {
                            Some(format!("batch {seq} follows batch {p}"))
                        }
                        (SeqRule::Increasing, Some(p)) if seq <= p => {
                            Some(format!("batch {seq} follows batch {p}"))
                        }
                        _ => {
                            log.index.insert(
                                seq,
                                FrameLoc {
                                    segment: key,
                                    offset: pos,
                                    payload_len: payload.len(),
                                },
                            );
                            prev = Some(seq);
                            last = Some(seq);
                            pos += (HEADER_LEN + payload.len()) as u64;
                            None
                        }
                    },
                };
                if let Some(reason) = problem {
                    tracing::warn!(
                        path = %path.display(),
                        offset = pos,
                        dropped_bytes = file_len - pos,
                        reason = %reason,
                        "damaged tail frame truncated"
                    );
                    file.set_len(pos).map_err(io_at(&path))?;
                    file.sync_all().map_err(io_at(&path))?;
                    cut = true;
                    break;
                }
            }
            log.segments.insert(
                key,
                Segment {
                    path,
                    len: pos,
                    last_seq: last,
                },
            );
        }
        if cut {
            fsync_dir(&dir)?;
        }
        Ok(log)
    }

    fn segment_path(&self, key: u64) -> PathBuf {
        self.dir.join(format!("{}-{key:020}.log", self.prefix))
    }

    fn first_seq(&self) -> Option<u64> {
        self.index.first_key_value().map(|(s, _)| *s)
    }

    fn last_seq(&self) -> Option<u64> {
        self.index.last_key_value().map(|(s, _)| *s)
    }

    fn contains(&self, seq: u64) -> bool {
        self.index.contains_key(&seq)
    }

    fn bytes(&self) -> u64 {
        self.segments.values().map(|s| s.len).sum()
    }

    /// Appends a finished frame and fdatasyncs it.
    fn append(&mut self, seq: u64, frame: &[u8]) -> Result<(), AppendFailure> {
        let soft = |error| AppendFailure {
            error,
            fatal: false,
        };
        let need = frame.len() as u64;
        let rotate = match self.segments.last_key_value() {
            None => true,
            Some((_, seg)) => seg.len > 0 && seg.len + need > self.segment_bytes,
        };
        if rotate {
            let path = self.segment_path(seq);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| soft(io_at(&path)(e)))?;
            fsync_dir(&self.dir).map_err(|error| AppendFailure { error, fatal: true })?;
            self.segments.insert(
                seq,
                Segment {
                    path,
                    len: 0,
                    last_seq: None,
                },
            );
            self.active = Some(file);
        }
        let Some(mut entry) = self.segments.last_entry() else {
            return Err(soft(ReplicaError::Corrupt {
                path: self.dir.clone(),
                reason: "no segment to append to".into(),
            }));
        };
        let key = *entry.key();
        let seg = entry.get_mut();
        if self.active.is_none() {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&seg.path)
                .map_err(|e| soft(io_at(&seg.path)(e)))?;
            self.active = Some(file);
        }
        let Some(file) = &self.active else {
            return Err(soft(ReplicaError::Corrupt {
                path: seg.path.clone(),
                reason: "segment not open".into(),
            }));
        };
        if let Err(e) = file.write_all_at(frame, seg.len) {
            // Cut the partial frame off so the next append continues a clean log; if even that
            // fails, the store must be reopened (recovery truncates it).
            let fatal = file.set_len(seg.len).is_err();
            return Err(AppendFailure {
                error: io_at(&seg.path)(e),
                fatal,
            });
        }
        if let Err(e) = file.sync_data() {
            return Err(AppendFailure {
                error: io_at(&seg.path)(e),
                fatal: true,
            });
        }
        self.index.insert(
            seq,
            FrameLoc {
                segment: key,
                offset: seg.len,
                payload_len: frame.len() - HEADER_LEN,
            },
        );
        seg.len += need;
        seg.last_seq = Some(seq);
        Ok(())
    }

    /// The payload of frame `seq`, crc-checked.
    fn read(&self, seq: u64) -> Result<Vec<u8>, ReplicaError> {
        let corrupt = |path: &Path, reason: String| ReplicaError::Corrupt {
            path: path.into(),
            reason,
        };
        let loc = self.index.get(&seq).ok_or_else(|| {
            corrupt(
                &self.dir,
                format!("the {} record of batch {seq} is missing", self.prefix),
            )
        })?;
        let seg = self.segments.get(&loc.segment).ok_or_else(|| {
            corrupt(
                &self.dir,
                format!("segment {} of batch {seq} is gone", loc.segment),
            )
        })?;
        let file = File::open(&seg.path).map_err(io_at(&seg.path))?;
        let mut buf = vec![0u8; HEADER_LEN + loc.payload_len];
        file.read_exact_at(&mut buf, loc.offset)
            .map_err(io_at(&seg.path))?;
        let header = parse_header(&buf);
        if header.magic != self.magic
            || header.len != loc.payload_len
            || header.seq != seq
            || header.crc != frame_crc(seq, &buf[HEADER_LEN..])
        {
            return Err(corrupt(
                &seg.path,
                format!(
                    "frame of batch {seq} at offset {} fails its checks",
                    loc.offset
                ),
            ));
        }
        buf.drain(..HEADER_LEN);
        Ok(buf)
    }

    /// Deletes segments whose frames are all `<= cutoff` (the last one only if `!keep_last`).
    /// Returns how many were deleted.
    fn remove_through(&mut self, cutoff: u64, keep_last: bool) -> Result<usize, ReplicaError> {
        let last_key = self.segments.last_key_value().map(|(k, _)| *k);
        let doomed: Vec<u64> = self
            .segments
            .iter()
            .filter(|(key, seg)| {
                seg.last_seq.is_none_or(|s| s <= cutoff) && !(keep_last && Some(**key) == last_key)
            })
            .map(|(key, _)| *key)
            .collect();
        for key in &doomed {
            if let Some(seg) = self.segments.remove(key) {
                match fs::remove_file(&seg.path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_at(&seg.path)(e)),
                }
            }
            if Some(*key) == last_key {
                self.active = None;
            }
        }
        if !doomed.is_empty() {
            let doomed: BTreeSet<u64> = doomed.iter().copied().collect();
            self.index.retain(|_, loc| !doomed.contains(&loc.segment));
            fsync_dir(&self.dir)?;
        }
        Ok(doomed.len())
    }
}

struct Header {
    magic: u32,
    len: usize,
    crc: u32,
    seq: u64,
}

fn parse_header(buf: &[u8]) -> Header {
    let u32_at = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&buf[12..20]);
    Header {
        magic: u32_at(0),
        len: u32_at(4) as usize,
        crc: u32_at(8),
        seq: u64::from_le_bytes(seq),
    }
}

fn frame_crc(seq: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Reads and checks the frame at `pos` into `payload`: `Ok(Ok(seq))`, or `Ok(Err(reason))`
/// when it is torn or damaged.
fn read_frame(
    file: &File,
    pos: u64,
    file_len: u64,
    magic: u32,
    payload: &mut Vec<u8>,
) -> io::Result<Result<u64, String>> {
    if file_len - pos < HEADER_LEN as u64 {
        return Ok(Err(format!("torn frame header ({} bytes)", file_len - pos)));
    }
    let mut head = [0u8; HEADER_LEN];
    file.read_exact_at(&mut head, pos)?;
    let header = parse_header(&head);
    if header.magic != magic {
        return Ok(Err(format!("bad frame magic {:#010x}", header.magic)));
    }
    if header.len > MAX_PAYLOAD {
        return Ok(Err(format!(
            "frame length {} exceeds the limit",
            header.len
        )));
    }
    if file_len - pos - (HEADER_LEN as u64) < header.len as u64 {
        return Ok(Err(format!(
            "torn frame of batch {} ({} payload bytes)",
            header.seq, header.len
        )));
    }
    payload.clear();
    payload.resize(header.len, 0);
    file.read_exact_at(payload, pos + HEADER_LEN as u64)?;
    if frame_crc(header.seq, payload) != header.crc {
        return Ok(Err(format!(
            "crc mismatch in the frame of batch {}",
            header.seq
        )));
    }
    Ok(Ok(header.seq))
}

// ---------------------------------------------------------------------------------------------
// Payload encoding
// ---------------------------------------------------------------------------------------------

/// A frame under construction: header space, then the payload.
struct FrameBuf(Vec<u8>);

impl FrameBuf {
    fn with_capacity(payload: usize) -> FrameBuf {
        let mut buf = Vec::with_capacity(HEADER_LEN + payload);
        buf.resize(HEADER_LEN, 0);
        FrameBuf(buf)
    }

    fn put_u8(&mut self, v: u8) {
        self.0.push(v);
    }

    fn put_u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn put_u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn put_i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    /// Lengths fit in u32: payloads are capped at [`MAX_PAYLOAD`] before encoding.
    fn put_bytes(&mut self, v: &[u8]) {
        self.put_u32(v.len() as u32);
        self.0.extend_from_slice(v);
    }

    fn put_str(&mut self, v: &str) {
        self.put_bytes(v.as_bytes());
    }

    /// Appends `n` zero bytes and returns them for filling in place.
    fn zeroed(&mut self, n: usize) -> &mut [u8] {
        let start = self.0.len();
        self.0.resize(start + n, 0);
        &mut self.0[start..]
    }

    fn finish(mut self, magic: u32, seq: u64) -> Vec<u8> {
        let payload_len = (self.0.len() - HEADER_LEN) as u32;
        let crc = frame_crc(seq, &self.0[HEADER_LEN..]);
        self.0[0..4].copy_from_slice(&magic.to_le_bytes());
        self.0[4..8].copy_from_slice(&payload_len.to_le_bytes());
        self.0[8..12].copy_from_slice(&crc.to_le_bytes());
        self.0[12..20].copy_from_slice(&seq.to_le_bytes());
        self.0
    }
}

fn encode_batch(seq: u64, entries: &[Entry]) -> Result<Vec<u8>, ReplicaError> {
    let size = 5 + entries
        .iter()
        .map(|e| match e {
            Entry::Write { disk, data, .. } => 17 + disk.len() + data.len(),
            Entry::Tag { id, digests, .. } => {
                18 + id.len()
                    + digests
                        .iter()
                        .map(|d| 8 + d.disk.len() + d.blake3.len())
                        .sum::<usize>()
            }
        })
        .sum::<usize>();
    if size > MAX_PAYLOAD {
        return Err(ReplicaError::BatchTooLarge {
            seq,
            bytes: size,
            max: MAX_PAYLOAD,
        });
    }
    let mut frame = FrameBuf::with_capacity(size);
    frame.put_u8(PAYLOAD_VERSION);
    frame.put_u32(entries.len() as u32);
    for entry in entries {
        match entry {
            Entry::Write { disk, offset, data } => {
                frame.put_u8(ENTRY_WRITE);
                frame.put_str(disk);
                frame.put_u64(*offset);
                frame.put_bytes(data);
            }
            Entry::Tag {
                id,
                kind,
                time_ms,
                digests,
            } => {
                frame.put_u8(ENTRY_TAG);
                frame.put_str(id);
                frame.put_u8(kind.code());
                frame.put_i64(*time_ms);
                frame.put_u32(digests.len() as u32);
                for d in digests {
                    frame.put_str(&d.disk);
                    frame.put_str(&d.blake3);
                }
            }
        }
    }
    Ok(frame.finish(REDO_MAGIC, seq))
}

/// A decoded redo entry, borrowing the payload.
enum BatchItem<'a> {
    Write {
        disk: &'a str,
        offset: u64,
        data: &'a [u8],
    },
    /// The tag as a point (its `seq` is filled in by the caller).
    Tag(RecoveryPoint),
    /// The batch's writes went straight into the disk files before this entry was journaled.
    InPlace,
}

struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    fn new(buf: &'a [u8]) -> Result<Decoder<'a>, String> {
        let mut d = Decoder { buf, pos: 0 };
        match d.u8()? {
            PAYLOAD_VERSION => Ok(d),
            v => Err(format!("unsupported payload version {v}")),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.buf.len())
            .ok_or_else(|| format!("record truncated at byte {}", self.pos))?;
        let slice = &self.buf[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, String> {
        self.array().map(u64::from_le_bytes)
    }

    fn i64(&mut self) -> Result<i64, String> {
        self.array().map(i64::from_le_bytes)
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn str(&mut self) -> Result<&'a str, String> {
        let at = self.pos;
        std::str::from_utf8(self.bytes()?).map_err(|_| format!("invalid UTF-8 string at byte {at}"))
    }

    fn end(&self) -> Result<(), String> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(format!("{} trailing bytes", self.buf.len() - self.pos))
        }
    }
}

fn decode_batch(payload: &[u8]) -> Result<Vec<BatchItem<'_>>, String> {
    let mut d = Decoder::new(payload)?;
    let count = d.u32()?;
    let mut items = Vec::new();
    for _ in 0..count {
        items.push(match d.u8()? {
            ENTRY_WRITE => BatchItem::Write {
                disk: d.str()?,
                offset: d.u64()?,
                data: d.bytes()?,
            },
            ENTRY_IN_PLACE => {
                d.u64()?;
                BatchItem::InPlace
            }
            ENTRY_TAG => {
                let id = d.str()?.to_owned();
                let code = d.u8()?;
                let kind = PointKind::from_code(code)
                    .ok_or_else(|| format!("unknown point kind {code}"))?;
                let time_ms = d.i64()?;
                let n = d.u32()?;
                let mut digests = Vec::new();
                for _ in 0..n {
                    digests.push(DiskDigest {
                        disk: d.str()?.to_owned(),
                        blake3: d.str()?.to_owned(),
                    });
                }
                BatchItem::Tag(RecoveryPoint {
                    id,
                    seq: 0,
                    time_ms,
                    kind,
                    digests,
                })
            }
            other => return Err(format!("unknown entry type {other}")),
        });
    }
    d.end()?;
    Ok(items)
}

/// One undo record entry: (disk, offset, before-image).
type BeforeImage<'a> = (&'a str, u64, &'a [u8]);

/// The before-images of an undo payload, in the order of the batch's writes.
fn decode_undo(payload: &[u8]) -> Result<Vec<BeforeImage<'_>>, String> {
    let mut d = Decoder::new(payload)?;
    let count = d.u32()?;
    let mut images = Vec::new();
    for _ in 0..count {
        images.push((d.str()?, d.u64()?, d.bytes()?));
    }
    d.end()?;
    Ok(images)
}

// ---------------------------------------------------------------------------------------------
// File helpers
// ---------------------------------------------------------------------------------------------

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ReplicaError + '_ {
    move |source| ReplicaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn create_dir(dir: &Path) -> Result<(), ReplicaError> {
    fs::create_dir_all(dir).map_err(io_at(dir))
}

fn fsync_dir(dir: &Path) -> Result<(), ReplicaError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, ReplicaError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ReplicaError::Corrupt {
                path: path.into(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_at(path)(e)),
    }
}

/// Replaces `path` atomically: write `path.tmp`, fsync, rename, fsync the directory.
fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), ReplicaError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| ReplicaError::Io {
        path: path.into(),
        source: io::Error::other(e),
    })?;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let file = File::create(&tmp).map_err(io_at(&tmp))?;
    file.write_all_at(&bytes, 0).map_err(io_at(&tmp))?;
    file.sync_all().map_err(io_at(&tmp))?;
    fs::rename(&tmp, path).map_err(io_at(path))?;
    match path.parent() {
        Some(dir) => fsync_dir(dir),
        None => Ok(()),
    }
}

/// Makes `dst` a disk of `size` bytes starting as the disk image `src`: the seed of a
/// reprotect. Like ASR's master target, which attaches the on-premises VM's own disks, the
/// replica takes over `src` itself: a hard link, no byte copied (the source disk then follows
/// the replica). An overlay `src` is taken over as a new overlay over the same frozen base
/// (only its delta is copied). Across filesystems, or from a larger image, it is a sparse copy
/// instead (reflinked where the filesystem can). Returns whether no full copy was made.
pub fn seed_disk(src: &Path, dst: &Path, size: u64) -> Result<bool, ReplicaError> {
    let mut from = VDisk::open_read(src).map_err(io_at(src))?;
    let (mut out, cheap) = if from.len() > size {
        // A larger image: only its first `size` bytes become the disk.
        from.clone_to(dst, Share::Copy).map_err(io_at(dst))?
    } else if !from.is_overlay() && fs::hard_link(src, dst).is_ok() {
        (VDisk::open(dst).map_err(io_at(dst))?, true)
    } else {
        from.clone_to(dst, Share::IfFrozen).map_err(io_at(dst))?
    };
    out.set_len(size).map_err(io_at(dst))?;
    out.sync_all().map_err(io_at(dst))?;
    Ok(cheap)
}

/// How [`write_in_place`] brings a disk to its new content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlaceMode {
    /// Compare block by block and write only the blocks that differ.
    Delta,
    /// Write every block (holes where the source has zeros), no comparison.
    Full,
}

/// Makes the existing disk `dst` (raw or overlay) byte-equal to `src` by writing into it in
/// place (it is the original disk of a VM: an interrupted call leaves it inconsistent, a
/// repeated call completes it). `dst` is created or resized to `src`'s length. Returns the
/// bytes written.
pub fn write_in_place(src: &Path, dst: &Path, mode: PlaceMode) -> Result<u64, ReplicaError> {
    const BLOCK: usize = 64 << 10;
    let from = VDisk::open_read(src).map_err(io_at(src))?;
    let size = from.len();
    if let Some(dir) = dst.parent() {
        create_dir(dir)?;
    }
    let mut to = if VDisk::exists(dst) {
        VDisk::open(dst).map_err(io_at(dst))?
    } else {
        VDisk::create(dst, size).map_err(io_at(dst))?
    };
    to.set_len(size).map_err(io_at(dst))?;
    let mut a = vec![0u8; CHUNK];
    let mut b = vec![0u8; CHUNK];
    let mut written = 0;
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(CHUNK as u64) as usize;
        from.read_at(&mut a[..n], pos).map_err(io_at(src))?;
        if mode == PlaceMode::Delta {
            to.read_at(&mut b[..n], pos).map_err(io_at(dst))?;
        }
        for start in (0..n).step_by(BLOCK) {
            let end = (start + BLOCK).min(n);
            if mode == PlaceMode::Delta && a[start..end] == b[start..end] {
                continue;
            }
            to.restore_at(&a[start..end], pos + start as u64)
                .map_err(io_at(dst))?;
            written += (end - start) as u64;
        }
        pos += n as u64;
    }
    to.sync_all().map_err(io_at(dst))?;
    Ok(written)
}
