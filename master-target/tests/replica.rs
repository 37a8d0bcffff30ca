//! Tests of `master_target::replica`: an in-memory model of the disks is the oracle for every
//! byte a recovery point or the latest state must hold.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use failback_common::blocks;
use failback_common::vdisk::VDisk;
use master_target::replica::{
    AppendOutcome, DiskDigest, DiskSpec, Entry, FaultPoint, PointKind, RecoveryPoint, ReplicaError,
    ReplicaStore, Share, StoreOptions, file_digest,
};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const MIB: u64 = 1 << 20;

fn two_disks() -> Vec<DiskSpec> {
    vec![
        DiskSpec {
            id: "os".into(),
            size: MIB,
        },
        DiskSpec {
            id: "data".into(),
            size: 256 << 10,
        },
    ]
}

/// The expected contents of every disk.
#[derive(Debug, Clone)]
struct Model {
    disks: BTreeMap<String, Vec<u8>>,
}

impl Model {
    fn new(specs: &[DiskSpec]) -> Model {
        Model {
            disks: specs
                .iter()
                .map(|s| {
                    (
                        s.id.clone(),
                        vec![0; usize::try_from(s.size).expect("size")],
                    )
                })
                .collect(),
        }
    }

    fn apply(&mut self, entries: &[Entry]) {
        for entry in entries {
            if let Entry::Write { disk, offset, data } = entry {
                let bytes = self.disks.get_mut(disk).expect("model disk");
                let at = usize::try_from(*offset).expect("offset");
                bytes[at..at + data.len()].copy_from_slice(data);
            }
        }
    }

    fn digests(&self) -> Vec<DiskDigest> {
        self.disks
            .iter()
            .map(|(disk, bytes)| DiskDigest {
                disk: disk.clone(),
                blake3: blake3::hash(bytes).to_hex().to_string(),
            })
            .collect()
    }
}

fn sorted(mut digests: Vec<DiskDigest>) -> Vec<DiskDigest> {
    digests.sort_by(|a, b| a.disk.cmp(&b.disk));
    digests
}

/// Random overlapping writes: random lengths and offsets, some all-zero data, and some writes
/// that land on (part of) the previous write of the same batch.
fn random_writes(rng: &mut StdRng, specs: &[DiskSpec], max_writes: usize) -> Vec<Entry> {
    let count = rng.random_range(1..=max_writes);
    let mut entries: Vec<Entry> = Vec::with_capacity(count);
    for _ in 0..count {
        let spec = &specs[rng.random_range(0..specs.len())];
        let len = if rng.random_bool(0.1) {
            rng.random_range(16_384..=65_536)
        } else {
            rng.random_range(1..=8_192)
        };
        let max_offset = spec.size - len;
        let offset = match entries.last() {
            Some(Entry::Write { disk, offset, data })
                if disk == &spec.id && rng.random_bool(0.4) =>
            {
                (offset + rng.random_range(0..=data.len() as u64)).min(max_offset)
            }
            _ => rng.random_range(0..=max_offset),
        };
        // Some page-aligned spans: the store writes those past the page cache (O_DIRECT),
        // the others buffered, and both must land in order.
        let (offset, len) = if rng.random_bool(0.25) {
            let len = len.div_ceil(4096) * 4096;
            (
                (offset / 4096 * 4096).min((spec.size - len) / 4096 * 4096),
                len,
            )
        } else {
            (offset, len)
        };
        let mut data = vec![0u8; usize::try_from(len).expect("len")];
        if !rng.random_bool(0.1) {
            rng.fill_bytes(&mut data);
        }
        entries.push(Entry::Write {
            disk: spec.id.clone(),
            offset,
            data: data.into(),
        });
    }
    entries
}

fn tag(id: &str, kind: PointKind, digests: Vec<DiskDigest>) -> Vec<Entry> {
    vec![Entry::Tag {
        id: id.into(),
        kind,
        time_ms: 1_700_000_000_000,
        digests,
    }]
}

/// Asserts the disk at `path` (raw or overlay) holds exactly `expected`, naming the first
/// differing byte.
fn assert_file_bytes(path: &Path, expected: &[u8], what: &str) {
    let disk = VDisk::open_read(path).expect("open materialized disk");
    let mut actual = vec![0u8; usize::try_from(disk.len()).expect("size")];
    disk.read_at(&mut actual, 0)
        .expect("read materialized disk");
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: size of {}",
        path.display()
    );
    if let Some(at) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: {} differs at byte {at}: {} != expected {}",
            path.display(),
            actual[at],
            expected[at]
        );
    }
}

/// Materializes `point` into `out` and checks every disk against `model`.
fn assert_point(store: &mut ReplicaStore, point: Option<&str>, model: &Model, out: &Path) {
    let what = point.unwrap_or("latest");
    let files = store.materialize(point, out).expect("materialize");
    assert_eq!(files.len(), model.disks.len(), "{what}: one file per disk");
    for (disk, path) in &files {
        assert_eq!(path, &out.join(format!("{disk}.img")));
        assert_file_bytes(path, &model.disks[disk], &format!("{what}/{disk}"));
    }
    fs::remove_dir_all(out).expect("clean materialized");
}

/// A replica under test with its model, the model at each point, and the next seq.
struct Lab {
    dir: tempfile::TempDir,
    specs: Vec<DiskSpec>,
    options: StoreOptions,
    store: Option<ReplicaStore>,
    model: Model,
    snapshots: Vec<(String, Model)>,
    seq: u64,
}

impl Lab {
    fn new(specs: Vec<DiskSpec>, options: StoreOptions) -> Lab {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ReplicaStore::open_with(&dir.path().join("replica"), &specs, options.clone())
            .expect("open");
        Lab {
            model: Model::new(&specs),
            dir,
            specs,
            options,
            store: Some(store),
            snapshots: Vec::new(),
            seq: 0,
        }
    }

    fn store(&mut self) -> &mut ReplicaStore {
        self.store.as_mut().expect("store open")
    }

    fn replica_dir(&self) -> PathBuf {
        self.dir.path().join("replica")
    }

    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join("out").join(name)
    }

    /// Drops the store (a crash, as far as the files are concerned) and opens it again.
    fn reopen(&mut self) {
        self.store = None;
        self.store = Some(
            ReplicaStore::open_with(&self.replica_dir(), &self.specs, self.options.clone())
                .expect("reopen"),
        );
    }

    fn append(&mut self, entries: Vec<Entry>) {
        self.seq += 1;
        let seq = self.seq;
        assert_eq!(
            self.store().append(seq, &entries).expect("append"),
            AppendOutcome::Appended
        );
        self.model.apply(&entries);
    }

    fn writes(&mut self, rng: &mut StdRng, max_writes: usize) {
        let entries = random_writes(rng, &self.specs, max_writes);
        self.append(entries);
    }

    fn tag(&mut self, id: &str, kind: PointKind) {
        let digests = self.model.digests();
        self.append(tag(id, kind, digests));
        self.snapshots.push((id.to_owned(), self.model.clone()));
    }

    /// Every retained point and the latest state are byte-exact.
    fn check_all(&mut self) {
        let snapshots = self.snapshots.clone();
        let retained: Vec<String> = self.store().points().into_iter().map(|p| p.id).collect();
        for (id, snapshot) in snapshots.iter().filter(|(id, _)| retained.contains(id)) {
            let out = self.out(id);
            assert_point(self.store(), Some(id), snapshot, &out);
        }
        let (model, out) = (self.model.clone(), self.out("latest"));
        assert_point(self.store(), None, &model, &out);
    }
}

fn redo_segments(replica: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(replica.join("journal"))
        .expect("journal dir")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    files
}

fn undo_bytes(replica: &Path) -> u64 {
    fs::read_dir(replica.join("undo"))
        .expect("undo dir")
        .map(|e| e.expect("entry").metadata().expect("metadata").len())
        .sum()
}

#[test]
fn random_workload_every_point_materializes_byte_exact() {
    let mut rng = StdRng::seed_from_u64(0x5eed_f00d);
    let mut lab = Lab::new(two_disks(), StoreOptions::default());
    let kinds = [
        PointKind::Crash,
        PointKind::App,
        PointKind::MultiVmCrash,
        PointKind::MultiVmApp,
    ];
    let mut next_tag = rng.random_range(15..=25);
    for batch in 1..=300 {
        lab.writes(&mut rng, 8);
        if batch == next_tag {
            let id = format!("rp-{batch:03}");
            lab.tag(&id, kinds[lab.snapshots.len() % kinds.len()]);
            next_tag = batch + rng.random_range(15..=25);
        }
        // Apply sometimes after each append, sometimes after a run of them.
        if rng.random_bool(0.4) {
            lab.store().apply_pending().expect("apply");
            assert_eq!(lab.store().applied_seq(), lab.store().last_seq());
        }
        if batch == 150 {
            lab.reopen();
        }
    }
    lab.store().apply_pending().expect("apply");
    assert!(lab.snapshots.len() >= 11, "{} points", lab.snapshots.len());

    let points = lab.store().points();
    let ids: Vec<&str> = points.iter().map(|p| p.id.as_str()).collect();
    let expected: Vec<&str> = lab.snapshots.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, expected, "points oldest first");
    assert!(points.windows(2).all(|w| w[0].seq < w[1].seq));
    for (i, p) in points.iter().enumerate() {
        assert_eq!(p.kind, kinds[i % kinds.len()]);
        assert_eq!(lab.store().point(&p.id).as_ref(), Some(p));
    }

    lab.check_all();
    for p in &points {
        let digests = lab.store().digest(Some(&p.id)).expect("digest at point");
        assert_eq!(
            sorted(digests),
            sorted(p.digests.clone()),
            "digest of {}",
            p.id
        );
    }
    let latest = lab.store().digest(None).expect("digest latest");
    assert_eq!(sorted(latest), lab.model.digests());
    // digest() cleans up after itself.
    let scratch = lab.replica_dir().join("tmp");
    assert!(!scratch.exists() || fs::read_dir(&scratch).expect("tmp").next().is_none());

    // Everything survives a reopen.
    lab.reopen();
    assert_eq!(lab.store().points(), points);
    lab.check_all();
}

#[test]
fn duplicates_gaps_and_rejected_batches_change_nothing() {
    let mut lab = Lab::new(two_disks(), StoreOptions::default());
    let first = vec![Entry::Write {
        disk: "os".into(),
        offset: 4096,
        data: vec![0xAA; 5000].into(),
    }];
    lab.append(first);
    // No point yet: written in place, the journal holds a small in-place frame.
    let journal = lab.store().journal_bytes();
    assert!(journal > 0);

    // A retry of batch 1 with other content is a duplicate and is not applied.
    let retry = vec![Entry::Write {
        disk: "os".into(),
        offset: 4096,
        data: vec![0x55; 5000].into(),
    }];
    assert_eq!(
        lab.store().append(1, &retry).expect("dup"),
        AppendOutcome::Duplicate
    );
    assert_eq!(
        lab.store().append(0, &retry).expect("dup 0"),
        AppendOutcome::Duplicate
    );
    assert_eq!(lab.store().last_seq(), 1);
    assert_eq!(lab.store().journal_bytes(), journal);

    // A gap.
    match lab.store().append(3, &retry) {
        Err(ReplicaError::OutOfOrder {
            expected: 2,
            got: 3,
        }) => {}
        other => panic!("expected OutOfOrder, got {other:?}"),
    }

    // A batch with one bad write is rejected whole.
    let bad = vec![
        Entry::Write {
            disk: "os".into(),
            offset: 0,
            data: vec![1; 10].into(),
        },
        Entry::Write {
            disk: "data".into(),
            offset: (256 << 10) - 10,
            data: vec![2; 11].into(),
        },
    ];
    match lab.store().append(2, &bad) {
        Err(ReplicaError::OutOfRange {
            disk,
            offset,
            len: 11,
            size,
        }) => {
            assert_eq!(
                (disk.as_str(), offset, size),
                ("data", (256 << 10) - 10, 256 << 10)
            );
        }
        other => panic!("expected OutOfRange, got {other:?}"),
    }
    let overflow = vec![Entry::Write {
        disk: "os".into(),
        offset: u64::MAX - 2,
        data: vec![1; 10].into(),
    }];
    assert!(matches!(
        lab.store().append(2, &overflow),
        Err(ReplicaError::OutOfRange { .. })
    ));
    let unknown = vec![Entry::Write {
        disk: "nope".into(),
        offset: 0,
        data: vec![1].into(),
    }];
    assert!(
        matches!(lab.store().append(2, &unknown), Err(ReplicaError::UnknownDisk(d)) if d == "nope")
    );
    let mut mixed = tag("rp-1", PointKind::Crash, Vec::new());
    mixed.push(Entry::Write {
        disk: "os".into(),
        offset: 0,
        data: vec![1].into(),
    });
    assert!(matches!(
        lab.store().append(2, &mixed),
        Err(ReplicaError::InvalidBatch { seq: 2, .. })
    ));
    assert_eq!(lab.store().last_seq(), 1);
    assert_eq!(lab.store().journal_bytes(), journal);
    assert!(lab.store().points().is_empty());

    // Nothing of the rejected batches reached the journal: a reopen sees batch 1 only.
    lab.reopen();
    assert_eq!(lab.store().last_seq(), 1);
    assert_eq!(lab.store().applied_seq(), 1);
    lab.append(vec![Entry::Write {
        disk: "data".into(),
        offset: 100,
        data: vec![7; 300].into(),
    }]);
    lab.tag("rp-2", PointKind::App);
    match lab
        .store()
        .append(4, &tag("rp-2", PointKind::Crash, Vec::new()))
    {
        Err(ReplicaError::InvalidBatch { seq: 4, reason }) => assert!(reason.contains("rp-2")),
        other => panic!("expected a duplicate point id rejection, got {other:?}"),
    }
    lab.check_all();
    let out = lab.out("x");
    assert!(matches!(
        lab.store().materialize(Some("rp-1"), &out),
        Err(ReplicaError::UnknownPoint(p)) if p == "rp-1"
    ));

    // Materializing over the replica's own disks is refused (it would truncate them).
    let replica = lab.replica_dir();
    assert!(matches!(
        lab.store().materialize(None, &replica.join("disks")),
        Err(ReplicaError::InvalidArgument(_))
    ));
    lab.check_all();

    // One owner at a time, and the disk sizes must match the spec.
    assert!(matches!(
        ReplicaStore::open(&replica, &lab.specs),
        Err(ReplicaError::Locked { .. })
    ));
    lab.store = None;
    let mut shrunk = lab.specs.clone();
    shrunk[1].size -= 4096;
    match ReplicaStore::open(&replica, &shrunk) {
        Err(ReplicaError::DiskSizeMismatch {
            disk,
            expected,
            actual,
            ..
        }) => {
            assert_eq!(
                (disk.as_str(), expected, actual),
                ("data", (256 << 10) - 4096, 256 << 10)
            );
        }
        other => panic!("expected DiskSizeMismatch, got {other:?}"),
    }
    // A disk file shorter than the spec of a replica in use lost what it held past its end:
    // extended with zeros, and the store says the replica needs a resync.
    let mut grown = lab.specs.clone();
    grown[1].size += 4096;
    let store = ReplicaStore::open(&replica, &grown).expect("opens, damaged");
    let damage = store.damage().expect("damage reported").to_string();
    assert!(
        damage.contains("data.img") && damage.contains("shorter"),
        "{damage}"
    );
    drop(store);
    // So does a missing one (recreated empty).
    fs::remove_file(replica.join("disks/os.img")).expect("remove");
    let store = ReplicaStore::open(&replica, &grown).expect("opens, damaged");
    let damage = store.damage().expect("damage reported").to_string();
    assert!(
        damage.contains("os.img") && damage.contains("missing"),
        "{damage}"
    );
}

#[test]
fn batches_appended_but_not_applied_survive_a_crash() {
    let mut rng = StdRng::seed_from_u64(7);
    let mut lab = Lab::new(two_disks(), StoreOptions::default());
    for i in 0..30 {
        lab.writes(&mut rng, 6);
        if i % 10 == 9 {
            lab.tag(&format!("rp-{i}"), PointKind::Crash);
        }
    }
    assert_eq!(lab.store().applied_seq(), 0, "nothing applied yet");
    lab.reopen();
    assert_eq!(lab.store().last_seq(), lab.seq);
    lab.store().apply_pending().expect("apply");
    assert_eq!(lab.store().applied_seq(), lab.seq);
    assert_eq!(lab.store().points().len(), 3);
    lab.check_all();
}

/// The applier's bounded steps: each `apply_some` stops at its first checkpoint past the
/// bound (appends interleave between steps), says whether more is pending, and the steps
/// together leave every point and the latest state byte-exact, as one `apply_pending` would.
#[test]
fn applying_in_bounded_steps_interleaves_with_appends_and_loses_nothing() {
    let mut rng = StdRng::seed_from_u64(11);
    let mut lab = Lab::new(two_disks(), StoreOptions::default());
    lab.tag("rp-0", PointKind::Crash);
    for i in 0..40 {
        lab.writes(&mut rng, 6);
        if i % 10 == 9 {
            lab.tag(&format!("rp-{i}"), PointKind::Crash);
        }
    }
    let mut steps = 0;
    let mut applied = lab.store().applied_seq();
    loop {
        // A 1-byte bound: one batch per step.
        let more = lab.store().apply_some(1).expect("apply step");
        let now = lab.store().applied_seq();
        assert_eq!(now, applied + 1, "one batch per step");
        applied = now;
        steps += 1;
        if steps % 7 == 0 {
            // An append between steps, as the data stream's does.
            lab.writes(&mut rng, 3);
        }
        if !more {
            break;
        }
    }
    assert_eq!(lab.store().applied_seq(), lab.seq);
    assert!(
        !lab.store().apply_some(1).expect("nothing left"),
        "nothing pending"
    );
    lab.check_all();
}

/// Without any point (initial replication) batches go straight into the disks and the journal
/// holds only small in-place frames; a crash between the disk writes and that frame loses the
/// unacknowledged batch, which the PS sends again.
#[test]
fn batches_without_points_are_written_in_place_and_survive_a_crash_in_between() {
    let mut rng = StdRng::seed_from_u64(31);
    let mut lab = Lab::new(two_disks(), StoreOptions::default());
    let mut data_bytes = 0;
    for _ in 0..8 {
        let entries = random_writes(&mut rng, &lab.specs, 6);
        data_bytes += entries
            .iter()
            .map(|e| match e {
                Entry::Write { data, .. } => data.len() as u64,
                Entry::Tag { .. } => 0,
            })
            .sum::<u64>();
        lab.append(entries);
    }
    let journal = lab.store().journal_bytes();
    assert!(
        journal < 8 * 64,
        "the journal holds in-place frames ({journal} bytes), not the {data_bytes} bytes of data"
    );
    lab.check_all();

    let entries = random_writes(&mut rng, &lab.specs, 6);
    let seq = lab.seq + 1;
    lab.store()
        .inject_fault_for_test(Some((FaultPoint::AfterDiskWrites, seq)));
    match lab.store().append(seq, &entries) {
        Err(ReplicaError::FaultInjected(_)) => {}
        other => panic!("expected the injected crash, got {other:?}"),
    }
    lab.reopen();
    assert_eq!(
        lab.store().last_seq(),
        seq - 1,
        "the batch was never journaled"
    );
    lab.append(entries); // the PS sends it again
    lab.reopen();
    assert_eq!(lab.store().last_seq(), seq);
    lab.check_all();

    // The first point ends the in-place mode: later batches are journaled (with undo).
    lab.tag("rp-1", PointKind::Crash);
    lab.append(vec![Entry::Write {
        disk: "os".into(),
        offset: 12_345,
        data: vec![0x77; 5000].into(),
    }]);
    assert!(lab.store().journal_bytes() >= 5000, "the data is journaled");
    assert_eq!(lab.store().applied_seq(), seq, "journaled, not applied yet");
    lab.store().apply_pending().expect("apply");
    lab.check_all();
}

#[test]
fn torn_journal_tail_is_truncated_and_the_batch_can_be_sent_again() {
    let mut rng = StdRng::seed_from_u64(11);
    let mut lab = Lab::new(two_disks(), StoreOptions::default());
    for _ in 0..4 {
        lab.writes(&mut rng, 4);
    }
    lab.tag("rp-a", PointKind::App);
    lab.store().apply_pending().expect("apply");
    let durable_model = lab.model.clone();
    lab.writes(&mut rng, 4); // batch 6, torn below
    assert_eq!(lab.store().last_seq(), 6);
    lab.store = None;

    let last = redo_segments(&lab.replica_dir())
        .pop()
        .expect("a redo segment");
    let len = fs::metadata(&last).expect("segment").len();
    fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .expect("open")
        .set_len(len - 7)
        .expect("tear");

    lab.reopen();
    assert_eq!(lab.store().last_seq(), 5, "the torn batch is gone");
    assert_eq!(lab.store().applied_seq(), 5);
    lab.model = durable_model;
    lab.seq = 5;
    lab.writes(&mut rng, 4); // batch 6 again, other content
    lab.check_all();

    // Garbage after the last valid frame is cut off too; a torn tag frame takes its point along.
    lab.tag("rp-b", PointKind::Crash);
    lab.store = None;
    let last = redo_segments(&lab.replica_dir())
        .pop()
        .expect("a redo segment");
    let len = fs::metadata(&last).expect("segment").len();
    fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .expect("open")
        .set_len(len - 3)
        .expect("tear");
    fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .expect("open")
        .write_at(&[0x5a; 100], len - 3)
        .expect("garbage");
    lab.snapshots.pop();
    lab.seq = 6;
    lab.reopen();
    assert_eq!(lab.store().last_seq(), 6);
    let ids: Vec<String> = lab.store().points().into_iter().map(|p| p.id).collect();
    assert_eq!(ids, ["rp-a"]);
    lab.tag("rp-b", PointKind::Crash);
    lab.writes(&mut rng, 4);
    lab.check_all();
    lab.reopen();
    lab.check_all();
}

/// Builds a replica with points and unapplied, heavily overlapping batches, crashes while
/// applying batch `crash_seq` at `fault`, optionally tears the undo tail, reopens, and checks
/// every point and the latest state byte for byte.
fn crash_while_applying(fault: FaultPoint, tear_undo: bool) {
    let mut rng = StdRng::seed_from_u64(23);
    let mut lab = Lab::new(two_disks(), StoreOptions::default());
    for _ in 0..5 {
        lab.writes(&mut rng, 6);
    }
    lab.tag("rp-1", PointKind::Crash);
    for _ in 0..5 {
        lab.writes(&mut rng, 6);
    }
    lab.tag("rp-2", PointKind::App);
    lab.store().apply_pending().expect("apply");
    let applied = lab.store().applied_seq();

    // Pending: 4 batches, each rewriting the same region several times, so a before-image
    // re-read after a partial apply would capture this batch's own data.
    for round in 0..4u8 {
        let entries: Vec<Entry> = (0..4u8)
            .map(|w| Entry::Write {
                disk: "os".into(),
                offset: 10_000 + u64::from(w) * 1500,
                data: vec![0x10 * (round + 1) + w; 4000].into(),
            })
            .chain(random_writes(&mut rng, &lab.specs, 3))
            .collect();
        lab.append(entries);
    }
    let crash_seq = applied + 3;
    lab.store().inject_fault_for_test(Some((fault, crash_seq)));
    match lab.store().apply_pending() {
        Err(ReplicaError::FaultInjected(_)) => {}
        other => panic!("expected the injected crash, got {other:?}"),
    }
    assert!(matches!(
        lab.store().apply_pending(),
        Err(ReplicaError::Poisoned(_))
    ));
    let next = lab.seq + 1;
    assert!(matches!(
        lab.store().append(next, &[]),
        Err(ReplicaError::Poisoned(_))
    ));
    lab.store = None;
    if tear_undo {
        let undo = lab.replica_dir().join("undo");
        let mut segments: Vec<PathBuf> = fs::read_dir(&undo)
            .expect("undo")
            .map(|e| e.expect("entry").path())
            .collect();
        segments.sort();
        let last = segments.pop().expect("an undo segment");
        let len = fs::metadata(&last).expect("segment").len();
        fs::OpenOptions::new()
            .write(true)
            .open(&last)
            .expect("open")
            .set_len(len - 9)
            .expect("tear");
    }
    lab.reopen();
    assert_eq!(
        lab.store().applied_seq(),
        lab.seq,
        "recovery finishes the apply"
    );
    lab.check_all();
    // And it keeps working.
    lab.writes(&mut rng, 4);
    lab.tag("rp-3", PointKind::Crash);
    lab.writes(&mut rng, 4);
    lab.check_all();
}

#[test]
fn crash_after_undo_record_before_disk_writes() {
    crash_while_applying(FaultPoint::AfterUndo, false);
}

#[test]
fn crash_with_torn_undo_record() {
    crash_while_applying(FaultPoint::AfterUndo, true);
}

#[test]
fn crash_after_some_disk_writes_of_a_batch() {
    crash_while_applying(FaultPoint::AfterFirstWrite, false);
}

#[test]
fn crash_after_disk_writes_before_applied_seq_is_persisted() {
    crash_while_applying(FaultPoint::AfterDiskWrites, false);
}

#[test]
fn prune_frees_undo_and_drop_points_keeps_latest() {
    let mut rng = StdRng::seed_from_u64(99);
    let options = StoreOptions {
        segment_bytes: 64 << 10,
    };
    let mut lab = Lab::new(two_disks(), options);
    for batch in 1..=120 {
        lab.writes(&mut rng, 3);
        if batch % 10 == 0 {
            lab.tag(&format!("rp-{batch:03}"), PointKind::Crash);
        }
        lab.store().apply_pending().expect("apply");
    }
    lab.writes(&mut rng, 3);
    lab.store().apply_pending().expect("apply");
    let replica = lab.replica_dir();
    let undo_before = undo_bytes(&replica);
    let journal_before = lab.store().journal_bytes();
    assert!(
        undo_before > 500_000,
        "undo holds before-images: {undo_before}"
    );

    // Keep the newer half.
    let cutoff = lab.store().point("rp-060").expect("rp-060").seq;
    let removed = lab
        .store()
        .prune(|p: &RecoveryPoint| p.seq >= cutoff)
        .expect("prune");
    assert_eq!(removed, ["rp-010", "rp-020", "rp-030", "rp-040", "rp-050"]);
    let undo_half = undo_bytes(&replica);
    assert!(
        undo_half < undo_before * 3 / 4,
        "undo {undo_before} -> {undo_half}"
    );
    assert!(lab.store().journal_bytes() < journal_before);
    let out = lab.out("gone");
    assert!(matches!(
        lab.store().materialize(Some("rp-030"), &out),
        Err(ReplicaError::UnknownPoint(_))
    ));
    lab.check_all();

    // Pruning everything keeps the newest point.
    let removed = lab.store().prune(|_| false).expect("prune all");
    assert_eq!(removed.len(), 6);
    let ids: Vec<String> = lab.store().points().into_iter().map(|p| p.id).collect();
    assert_eq!(ids, ["rp-120"]);
    assert!(undo_bytes(&replica) < undo_half / 2);
    lab.reopen();
    lab.check_all();

    lab.store().drop_points().expect("drop points");
    assert!(lab.store().points().is_empty());
    assert_eq!(undo_bytes(&replica), 0);
    lab.check_all();

    // New points after a commit work as before, also across a reopen.
    lab.writes(&mut rng, 3);
    lab.tag("after-commit", PointKind::App);
    lab.writes(&mut rng, 3);
    lab.writes(&mut rng, 3);
    lab.reopen();
    assert_eq!(lab.store().points().len(), 1);
    lab.check_all();
}

#[test]
fn block_checksums_match_the_model_and_holes_read_as_zeros() {
    let specs = vec![DiskSpec {
        id: "os".into(),
        size: MIB + 1000,
    }];
    let mut lab = Lab::new(specs, StoreOptions::default());
    lab.append(vec![
        Entry::Write {
            disk: "os".into(),
            offset: 70_000,
            data: vec![3; 10_000].into(),
        },
        Entry::Write {
            disk: "os".into(),
            offset: 500_000,
            data: vec![9; 200_000].into(),
        },
        Entry::Write {
            disk: "os".into(),
            offset: MIB + 990,
            data: vec![4; 10].into(),
        },
    ]);
    // Not applied yet: block_checksums applies first.
    let bytes = lab.model.disks["os"].clone();
    let expect = |offset: usize, len: usize, block: usize| -> Vec<blocks::BlockDigest> {
        bytes[offset..offset + len]
            .chunks(block)
            .map(blocks::digest)
            .collect()
    };
    let size = MIB + 1000;
    let whole = lab
        .store()
        .block_checksums("os", 0, size, 65_536)
        .expect("checksums");
    assert_eq!(whole.len(), 17);
    assert_eq!(whole, expect(0, size as usize, 65_536));
    assert_eq!(
        whole[0],
        blocks::digest(&[0u8; 65_536]),
        "a hole reads as zeros"
    );
    let unaligned = lab
        .store()
        .block_checksums("os", 1000, 300_000, 4096)
        .expect("checksums");
    assert_eq!(unaligned, expect(1000, 300_000, 4096));
    let tail = lab
        .store()
        .block_checksums("os", MIB, 1000, 4096)
        .expect("tail");
    assert_eq!(tail, expect(MIB as usize, 1000, 4096));
    assert!(
        lab.store()
            .block_checksums("os", 0, 0, 4096)
            .expect("empty")
            .is_empty()
    );

    assert!(matches!(
        lab.store().block_checksums("os", MIB, 1001, 4096),
        Err(ReplicaError::OutOfRange { .. })
    ));
    assert!(matches!(
        lab.store().block_checksums("nope", 0, 1, 4096),
        Err(ReplicaError::UnknownDisk(_))
    ));
    assert!(lab.store().block_checksums("os", 0, 4096, 0).is_err());
}

#[test]
fn materializing_a_mostly_empty_1_gib_disk_copies_only_data() {
    let gib = 1u64 << 30;
    let specs = vec![DiskSpec {
        id: "big".into(),
        size: gib,
    }];
    let mut lab = Lab::new(specs, StoreOptions::default());
    let first = vec![
        Entry::Write {
            disk: "big".into(),
            offset: 0,
            data: vec![1; 4096].into(),
        },
        Entry::Write {
            disk: "big".into(),
            offset: gib / 2 + 123,
            data: vec![2; 5000].into(),
        },
        Entry::Write {
            disk: "big".into(),
            offset: gib - 4096,
            data: vec![3; 4096].into(),
        },
    ];
    lab.append(first);
    lab.append(tag("rp-1", PointKind::Crash, Vec::new()));
    lab.append(vec![
        Entry::Write {
            disk: "big".into(),
            offset: 0,
            data: vec![9; 8192].into(),
        },
        Entry::Write {
            disk: "big".into(),
            offset: 100 * MIB,
            data: vec![8; 65_536].into(),
        },
    ]);
    lab.store().apply_pending().expect("apply");

    let check = |path: &Path, expected: &[(u64, usize, u8)]| {
        let meta = fs::metadata(path).expect("metadata");
        assert_eq!(meta.len(), gib);
        let allocated = meta.blocks() * 512;
        assert!(
            allocated < 4 * MIB,
            "{} has {allocated} bytes allocated",
            path.display()
        );
        let file = fs::File::open(path).expect("open");
        for &(offset, len, byte) in expected {
            let mut buf = vec![0xff; len];
            file.read_exact_at(&mut buf, offset).expect("read");
            assert!(
                buf.iter().all(|b| *b == byte),
                "{} at {offset}: expected {byte}",
                path.display()
            );
        }
    };
    let out = lab.out("latest");
    let latest = lab.store().materialize(None, &out).expect("latest");
    check(
        &latest[0].1,
        &[
            (0, 8192, 9),
            (gib / 2 + 123, 5000, 2),
            (100 * MIB, 65_536, 8),
            (gib - 4096, 4096, 3),
            (200 * MIB, 4096, 0),
        ],
    );
    let out = lab.out("rp-1");
    let point = lab.store().materialize(Some("rp-1"), &out).expect("rp-1");
    check(
        &point[0].1,
        &[
            (0, 4096, 1),
            (4096, 4096, 0),
            (gib / 2 + 123, 5000, 2),
            (100 * MIB, 65_536, 0),
            (gib - 4096, 4096, 3),
        ],
    );
}

#[test]
fn file_digest_is_blake3_of_the_contents() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("f");
    let mut data = vec![0u8; 3 * MIB as usize + 17];
    StdRng::seed_from_u64(1).fill_bytes(&mut data);
    fs::write(&path, &data).expect("write");
    assert_eq!(
        file_digest(&path).expect("digest"),
        blake3::hash(&data).to_hex().to_string()
    );
}

#[test]
fn point_kind_names() {
    for (kind, name) in [
        (PointKind::Crash, "crash"),
        (PointKind::App, "app"),
        (PointKind::MultiVmCrash, "multi-vm-crash"),
        (PointKind::MultiVmApp, "multi-vm-app"),
    ] {
        assert_eq!(kind.to_string(), name);
        assert_eq!(name.parse::<PointKind>().expect("parse"), kind);
        assert_eq!(
            serde_json::to_string(&kind).expect("json"),
            format!("\"{name}\"")
        );
    }
    assert!("multi_vm".parse::<PointKind>().is_err());
}

#[test]
fn failover_disks_share_the_frozen_replica_and_both_go_on() {
    let mut rng = StdRng::seed_from_u64(0x00fe_71a9);
    let specs = vec![
        DiskSpec {
            id: "os".into(),
            size: 8 * MIB,
        },
        DiskSpec {
            id: "data".into(),
            size: 2 * MIB + 12_345,
        },
    ];
    let mut lab = Lab::new(specs, StoreOptions::default());
    // Initial replication fills most of both disks.
    for (disk, len) in [("os", 6 * MIB), ("data", 2 * MIB)] {
        let mut data = vec![0u8; len as usize];
        rng.fill_bytes(&mut data);
        lab.append(vec![Entry::Write {
            disk: disk.into(),
            offset: 0,
            data: data.into(),
        }]);
    }
    for i in 0..40 {
        lab.writes(&mut rng, 6);
        if i % 10 == 9 {
            lab.tag(&format!("rp-{i}"), PointKind::Crash);
        }
    }
    lab.store().apply_pending().expect("apply");
    let (point, at_point) = lab.snapshots[1].clone();
    let vm = lab.out("vm");
    let made = lab
        .store()
        .materialize_with(Some(&point), &vm, Share::Freeze)
        .expect("materialize");
    assert!(made.iter().all(|m| m.overlay), "overlays: {made:?}");
    assert_eq!(
        lab.store().disk_is_overlay("os"),
        Some(true),
        "the replica froze"
    );
    for m in &made {
        assert_file_bytes(&m.path, &at_point.disks[&m.disk], "the VM at the point");
        let own = VDisk::open_read(&m.path)
            .expect("open")
            .own_bytes()
            .expect("own");
        assert!(
            own < MIB,
            "{}: {own} bytes of its own: the rollback, not a copy of the disk",
            m.disk
        );
    }
    let os_base = fs::read(vm.join("os.img.overlay/base")).expect("base");

    // Replication goes on (a test failover) and the VM writes its own disk: neither sees the
    // other, and the base never changes.
    let mut vm_disk = VDisk::open(&vm.join("os.img")).expect("vm disk");
    let mut vm_model = at_point.disks["os"].clone();
    for i in 0..30 {
        lab.writes(&mut rng, 6);
        if i % 10 == 9 {
            lab.tag(&format!("rp-after-{i}"), PointKind::App);
        }
        let off = rng.random_range(0..8 * MIB - 9000);
        let mut data = vec![0u8; rng.random_range(1..9000)];
        rng.fill_bytes(&mut data);
        vm_disk.write_at(&data, off).expect("vm write");
        vm_model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    lab.store().apply_pending().expect("apply");
    assert_file_bytes(&vm.join("os.img"), &vm_model, "the VM's own writes");
    assert_file_bytes(
        &vm.join("data.img"),
        &at_point.disks["data"],
        "the VM's other disk",
    );
    lab.check_all();
    assert_eq!(
        fs::read(vm.join("os.img.overlay/base")).expect("base"),
        os_base,
        "the frozen base is never written"
    );
    // Digests share the frozen base too, and a crash of the target keeps the overlays.
    let newest = lab.snapshots.last().expect("points").0.clone();
    let digests = lab.store().digest(Some(&newest)).expect("digest");
    assert_eq!(
        sorted(digests),
        lab.snapshots.last().expect("points").1.digests()
    );
    lab.reopen();
    assert_eq!(lab.store().disk_is_overlay("data"), Some(true));
    lab.check_all();

    // Nothing shares the base once the VM is gone: the replica folds back into raw disks.
    assert_eq!(
        lab.store().fold_unshared().expect("fold"),
        0,
        "still shared"
    );
    drop(vm_disk);
    for disk in ["os", "data"] {
        VDisk::remove(&vm.join(format!("{disk}.img"))).expect("remove vm disk");
    }
    assert_eq!(lab.store().fold_unshared().expect("fold"), 2);
    assert_eq!(lab.store().disk_is_overlay("os"), Some(false));
    let raw = lab.replica_dir().join("disks/os.img");
    assert_eq!(fs::metadata(&raw).expect("raw").nlink(), 1);
    lab.check_all();
    lab.writes(&mut rng, 6);
    lab.reopen();
    lab.check_all();
    assert_file_bytes(&raw, &lab.model.disks["os"].clone(), "raw again");
}
