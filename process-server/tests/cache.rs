//! The process server's durable disk cache: ordered appends, reads, releases that free
//! segment files, durability across reopen, torn-tail recovery, duplicates/gaps/capacity,
//! ASR health thresholds and the append notifier.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use process_server::cache::{
    AppendOutcome, Cache, CacheError, CacheHealth, FRAME_HEADER_BYTES, health,
};

const MIB: u64 = 1024 * 1024;

/// Deterministic payload of batch `seq`: 100 bytes, content depends on the sequence.
fn payload(seq: u64) -> Vec<u8> {
    (0..100u64)
        .map(|i| (seq.wrapping_mul(31).wrapping_add(i * 7) % 251) as u8)
        .collect()
}

fn frame(len: usize) -> u64 {
    FRAME_HEADER_BYTES + len as u64
}

fn segments(dir: &Path, item: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir.join(item))
        .expect("item dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    out.sort();
    out
}

fn append_all(cache: &Cache, item: &str, seqs: std::ops::RangeInclusive<u64>) {
    for seq in seqs {
        assert_eq!(
            cache
                .append(item, seq, payload(seq).into())
                .expect("append"),
            AppendOutcome::Appended,
            "batch {seq}"
        );
    }
}

fn seqs(batches: &[(u64, Bytes)]) -> Vec<u64> {
    batches.iter().map(|(s, _)| *s).collect()
}

fn assert_payloads(batches: &[(u64, Bytes)]) {
    for (seq, data) in batches {
        assert_eq!(data, &payload(*seq), "payload of batch {seq}");
    }
}

#[test]
fn cache_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Cache>();
    check::<Arc<Cache>>();
}

#[test]
fn round_trip_across_segments_and_release_frees_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 120-byte frames, 2 per 256-byte segment.
    let cache = Cache::open_with(dir.path(), MIB, 256).expect("open");
    append_all(&cache, "vm1", 1..=50);
    assert_eq!(cache.last_seq("vm1"), 50);
    assert_eq!(cache.items(), vec!["vm1".to_string()]);
    let files = segments(dir.path(), "vm1");
    assert_eq!(files.len(), 25);
    assert!(files[0].ends_with("00000000000000000001.seg"), "{files:?}");
    assert_eq!(cache.used_bytes(), 50 * frame(100));
    assert_eq!(cache.pending_bytes("vm1"), 50 * 100);

    let all = cache.read_after("vm1", 0, usize::MAX).expect("read");
    assert_eq!(seqs(&all), (1..=50).collect::<Vec<_>>());
    assert_payloads(&all);
    // max_bytes bounds the batch; at least one batch even when it is too small.
    assert_eq!(
        seqs(&cache.read_after("vm1", 10, 250).expect("read")),
        vec![11, 12]
    );
    assert_eq!(
        seqs(&cache.read_after("vm1", 10, 1).expect("read")),
        vec![11]
    );
    assert!(
        cache
            .read_after("vm1", 50, usize::MAX)
            .expect("read")
            .is_empty()
    );
    assert!(
        cache
            .read_after("other", 0, usize::MAX)
            .expect("read")
            .is_empty()
    );

    // Release 1..=31: segments [1,2]..[29,30] go, [31,32] stays (32 is not released).
    cache.release("vm1", 31).expect("release");
    assert_eq!(cache.released_seq("vm1"), 31);
    assert_eq!(segments(dir.path(), "vm1").len(), 10);
    assert_eq!(cache.used_bytes(), 20 * frame(100));
    assert_eq!(cache.pending_bytes("vm1"), 19 * 100);
    let rest = cache.read_after("vm1", 0, usize::MAX).expect("read");
    assert_eq!(seqs(&rest), (32..=50).collect::<Vec<_>>());
    assert_payloads(&rest);
    assert_eq!(
        seqs(&cache.read_after("vm1", 40, usize::MAX).expect("read")),
        (41..=50).collect::<Vec<_>>()
    );

    // Release is idempotent; releasing everything frees everything but keeps the sequence.
    cache.release("vm1", 20).expect("older release");
    assert_eq!(cache.released_seq("vm1"), 31);
    cache.release("vm1", 50).expect("release all");
    // The last segment, small and ending at the release, stays for the next appends.
    let left = segments(dir.path(), "vm1");
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].ends_with("00000000000000000049.seg"), "{left:?}");
    assert_eq!(cache.used_bytes(), 2 * frame(100));
    assert_eq!(cache.pending_bytes("vm1"), 0);
    assert_eq!(cache.last_seq("vm1"), 50);
    assert_eq!(
        cache
            .append("vm1", 50, Bytes::from_static(b"again"))
            .expect("dup"),
        AppendOutcome::Duplicate
    );
    append_all(&cache, "vm1", 51..=51);
    assert_eq!(
        seqs(&cache.read_after("vm1", 0, usize::MAX).expect("read")),
        vec![51]
    );
}

#[test]
fn durable_across_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let cache = Cache::open_with(dir.path(), MIB, 1000).expect("open");
        append_all(&cache, "item-0001", 1..=40);
        append_all(&cache, "vm2", 7..=9);
    }
    {
        let cache = Cache::open_with(dir.path(), MIB, 1000).expect("reopen");
        assert!(cache.truncations().is_empty(), "{:?}", cache.truncations());
        assert_eq!(
            cache.items(),
            vec!["item-0001".to_string(), "vm2".to_string()]
        );
        assert_eq!(cache.last_seq("item-0001"), 40);
        assert_eq!(cache.last_seq("vm2"), 9);
        assert_eq!(cache.used_bytes(), 43 * frame(100));
        let all = cache.read_after("item-0001", 0, usize::MAX).expect("read");
        assert_eq!(seqs(&all), (1..=40).collect::<Vec<_>>());
        assert_payloads(&all);
        assert_eq!(
            seqs(&cache.read_after("vm2", 0, usize::MAX).expect("read")),
            vec![7, 8, 9]
        );
        cache.release("item-0001", 25).expect("release");
    }
    {
        let cache = Cache::open_with(dir.path(), MIB, 1000).expect("reopen");
        assert_eq!(cache.released_seq("item-0001"), 25);
        assert_eq!(cache.last_seq("item-0001"), 40);
        let rest = cache.read_after("item-0001", 0, usize::MAX).expect("read");
        assert_eq!(seqs(&rest), (26..=40).collect::<Vec<_>>());
        assert_payloads(&rest);
        assert_eq!(cache.pending_bytes("item-0001"), 15 * 100);
        append_all(&cache, "item-0001", 41..=41);
        // Everything released: only the small last segment is left, for the next appends.
        cache.release("item-0001", 41).expect("release all");
        assert_eq!(segments(dir.path(), "item-0001").len(), 1);
    }
    let cache = Cache::open_with(dir.path(), MIB, 1000).expect("reopen");
    assert_eq!(cache.last_seq("item-0001"), 41);
    assert_eq!(cache.released_seq("item-0001"), 41);
    assert!(
        cache
            .read_after("item-0001", 0, usize::MAX)
            .expect("read")
            .is_empty()
    );
    assert_eq!(
        cache
            .append("item-0001", 41, Bytes::from_static(b"retry"))
            .expect("dup"),
        AppendOutcome::Duplicate
    );
    assert!(matches!(
        cache.append("item-0001", 43, Bytes::from_static(b"gap")),
        Err(CacheError::OutOfOrder { expected: 42, .. })
    ));
}

#[test]
fn segments_released_before_a_crash_are_not_resent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let saved = tempfile::tempdir().expect("tempdir");
    {
        let cache = Cache::open_with(dir.path(), MIB, 256).expect("open");
        append_all(&cache, "vm1", 1..=10);
        for f in segments(dir.path(), "vm1") {
            fs::copy(&f, saved.path().join(f.file_name().expect("name"))).expect("copy");
        }
        cache.release("vm1", 6).expect("release");
    }
    // Crash after the state file was renamed but before the segments were deleted.
    for f in fs::read_dir(saved.path()).expect("saved") {
        let f = f.expect("entry").path();
        fs::copy(
            &f,
            dir.path().join("vm1").join(f.file_name().expect("name")),
        )
        .expect("restore");
    }
    assert_eq!(segments(dir.path(), "vm1").len(), 5);
    let cache = Cache::open_with(dir.path(), MIB, 256).expect("reopen");
    assert!(cache.truncations().is_empty(), "{:?}", cache.truncations());
    assert_eq!(segments(dir.path(), "vm1").len(), 2);
    assert_eq!(cache.used_bytes(), 4 * frame(100));
    assert_eq!(
        seqs(&cache.read_after("vm1", 0, usize::MAX).expect("read")),
        vec![7, 8, 9, 10]
    );
}

#[test]
fn torn_tail_is_truncated_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let cache = Cache::open_with(dir.path(), MIB, 1000).expect("open");
        append_all(&cache, "vm1", 1..=20);
    }
    // A crash in the middle of appending batch 20: its frame is cut short.
    let last = segments(dir.path(), "vm1").pop().expect("segment");
    let len = fs::metadata(&last).expect("meta").len();
    fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .expect("open seg")
        .set_len(len - 7)
        .expect("truncate");
    {
        let cache = Cache::open_with(dir.path(), MIB, 1000).expect("reopen");
        assert_eq!(cache.last_seq("vm1"), 19);
        assert_eq!(cache.truncations().len(), 1);
        assert_eq!(cache.truncations()[0].kept_last_seq, 19);
        assert_eq!(fs::metadata(&last).expect("meta").len(), len - frame(100));
        assert_eq!(cache.used_bytes(), 19 * frame(100));
        let all = cache.read_after("vm1", 0, usize::MAX).expect("read");
        assert_eq!(seqs(&all), (1..=19).collect::<Vec<_>>());
        assert_payloads(&all);
        // The agent retries batch 20 (never acknowledged): accepted again.
        append_all(&cache, "vm1", 20..=21);
    }
    // A flipped payload byte in the last frame: crc mismatch, truncated.
    let last = segments(dir.path(), "vm1").pop().expect("segment");
    let mut bytes = fs::read(&last).expect("read seg");
    let n = bytes.len();
    bytes[n - 10] ^= 0x40;
    fs::write(&last, &bytes).expect("write seg");
    {
        let cache = Cache::open_with(dir.path(), MIB, 1000).expect("reopen");
        assert_eq!(cache.last_seq("vm1"), 20);
        assert_eq!(cache.truncations().len(), 1);
        assert!(
            cache.truncations()[0].reason.contains("crc"),
            "{:?}",
            cache.truncations()
        );
        let all = cache.read_after("vm1", 0, usize::MAX).expect("read");
        assert_eq!(seqs(&all), (1..=20).collect::<Vec<_>>());
        assert_payloads(&all);
        append_all(&cache, "vm1", 21..=21);
    }
    let cache = Cache::open_with(dir.path(), MIB, 1000).expect("reopen");
    assert!(cache.truncations().is_empty());
    assert_eq!(cache.last_seq("vm1"), 21);
}

#[test]
fn corruption_cuts_everything_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let cache = Cache::open_with(dir.path(), MIB, 256).expect("open");
        append_all(&cache, "vm1", 1..=10);
    }
    // Corrupt batch 5 (first frame of the third segment): 5..=10 are cut.
    let files = segments(dir.path(), "vm1");
    let mut bytes = fs::read(&files[2]).expect("read");
    bytes[FRAME_HEADER_BYTES as usize + 3] ^= 1;
    fs::write(&files[2], &bytes).expect("write");
    let cache = Cache::open_with(dir.path(), MIB, 256).expect("reopen");
    assert_eq!(cache.last_seq("vm1"), 4);
    assert_eq!(segments(dir.path(), "vm1").len(), 2);
    let t = &cache.truncations()[0];
    assert_eq!(
        (t.offset, t.kept_last_seq, t.removed_bytes),
        (0, 4, 6 * frame(100))
    );
    assert_eq!(
        seqs(&cache.read_after("vm1", 0, usize::MAX).expect("read")),
        vec![1, 2, 3, 4]
    );
    append_all(&cache, "vm1", 5..=5);
}

#[test]
fn duplicates_gaps_and_capacity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let capacity = 5 * frame(100) + 50;
    // 2 full frames per segment, so a release frees space.
    let cache = Cache::open_with(dir.path(), capacity, 256).expect("open");
    // The first batch of an unknown item may start anywhere (PS switch).
    append_all(&cache, "vm1", 500..=502);
    let used = cache.used_bytes();
    assert_eq!(
        cache.append("vm1", 501, payload(501).into()).expect("dup"),
        AppendOutcome::Duplicate
    );
    assert_eq!(
        cache
            .append("vm1", 1, Bytes::from_static(b"old"))
            .expect("dup"),
        AppendOutcome::Duplicate
    );
    assert_eq!(cache.used_bytes(), used);
    assert_eq!(cache.last_seq("vm1"), 502);

    let err = cache
        .append("vm1", 505, Bytes::from_static(b"gap"))
        .expect_err("gap");
    assert!(
        matches!(&err, CacheError::OutOfOrder { item, expected: 503, got: 505 } if item == "vm1"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "batch 505 of vm1 out of order: expected 503"
    );
    assert!(matches!(
        cache.append("vm2", 0, Bytes::from_static(b"zero")),
        Err(CacheError::OutOfOrder { expected: 1, .. })
    ));
    assert!(matches!(
        cache.append("../x", 1, Bytes::from_static(b"x")),
        Err(CacheError::InvalidItem { .. })
    ));
    assert!(matches!(
        cache.append("a b", 1, Bytes::from_static(b"x")),
        Err(CacheError::InvalidItem { .. })
    ));

    append_all(&cache, "vm1", 503..=504);
    assert_eq!(cache.used_bytes(), 5 * frame(100));
    let seg_len = || {
        segments(dir.path(), "vm1")
            .iter()
            .map(|p| fs::metadata(p).expect("m").len())
            .sum::<u64>()
    };
    let on_disk = seg_len();
    let err = cache
        .append("vm1", 505, payload(505).into())
        .expect_err("full");
    assert!(
        matches!(err, CacheError::Full { used, capacity: c } if used == 5 * frame(100) && c == capacity),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&capacity.to_string()) && msg.contains("throttled"),
        "{msg}"
    );
    assert_eq!(cache.used_bytes(), 5 * frame(100));
    assert_eq!(seg_len(), on_disk);
    assert_eq!(cache.last_seq("vm1"), 504);
    // A batch that fits the rest still goes in; after the target drains, the full one does.
    assert_eq!(
        cache
            .append("vm1", 505, Bytes::from_static(&[1u8; 30]))
            .expect("fits"),
        AppendOutcome::Appended
    );
    cache.release("vm1", 503).expect("release");
    append_all(&cache, "vm1", 506..=506);
    assert_eq!(cache.used_bytes(), 2 * frame(100) + frame(30));
}

#[test]
fn drop_item_removes_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = Cache::open_with(dir.path(), MIB, 256).expect("open");
    append_all(&cache, "vm1", 1..=5);
    append_all(&cache, "vm2", 1..=2);
    cache.release("vm1", 2).expect("release");
    cache.drop_item("vm1").expect("drop");
    assert!(!dir.path().join("vm1").exists());
    assert_eq!(cache.items(), vec!["vm2".to_string()]);
    assert_eq!(cache.used_bytes(), 2 * frame(100));
    assert_eq!((cache.last_seq("vm1"), cache.released_seq("vm1")), (0, 0));
    // Starts over anywhere.
    append_all(&cache, "vm1", 900..=900);
    drop(cache);
    let cache = Cache::open_with(dir.path(), MIB, 256).expect("reopen");
    assert_eq!(cache.last_seq("vm1"), 900);
    assert_eq!(cache.released_seq("vm1"), 0);
    assert_eq!(
        seqs(&cache.read_after("vm1", 0, usize::MAX).expect("read")),
        vec![900]
    );
}

#[test]
fn concurrent_items_share_one_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = Arc::new(Cache::open_with(dir.path(), 64 * MIB, 4096).expect("open"));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let cache = Arc::clone(&cache);
            std::thread::spawn(move || {
                let item = format!("vm{t}");
                append_all(&cache, &item, 1..=100);
                cache.release(&item, 50).expect("release");
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let on_disk: u64 = (0..8)
        .flat_map(|t| segments(dir.path(), &format!("vm{t}")))
        .map(|p| fs::metadata(p).expect("meta").len())
        .sum();
    assert_eq!(cache.used_bytes(), on_disk);
    for t in 0..8 {
        let item = format!("vm{t}");
        let rest = cache.read_after(&item, 0, usize::MAX).expect("read");
        assert_eq!(seqs(&rest), (51..=100).collect::<Vec<_>>());
        assert_payloads(&rest);
    }
}

#[test]
fn health_thresholds() {
    assert_eq!(health(0.35), (CacheHealth::Healthy, false));
    assert_eq!(health(0.30), (CacheHealth::Healthy, false));
    assert_eq!(health(0.28), (CacheHealth::Warning, false));
    assert_eq!(health(0.22), (CacheHealth::Critical, false));
    assert_eq!(health(0.21), (CacheHealth::Critical, false));
    assert_eq!(health(0.15), (CacheHealth::Critical, true));
    assert_eq!(health(0.0), (CacheHealth::Critical, true));
    assert_eq!(CacheHealth::Healthy.to_string(), "Healthy");
    assert_eq!(CacheHealth::Warning.to_string(), "Warning");
    assert_eq!(CacheHealth::Critical.to_string(), "Critical");

    // The cache's own free fraction feeds it.
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = Cache::open_with(dir.path(), 10_000, MIB).expect("open");
    assert_eq!(cache.health(), (CacheHealth::Healthy, false));
    cache
        .append("vm1", 1, vec![0u8; 7_180].into())
        .expect("append");
    assert!((cache.free_fraction() - 0.28).abs() < 1e-9);
    assert_eq!(cache.health(), (CacheHealth::Warning, false));
    cache
        .append("vm1", 2, vec![0u8; 580].into())
        .expect("append");
    assert_eq!(cache.health(), (CacheHealth::Critical, false));
    cache
        .append("vm1", 3, vec![0u8; 780].into())
        .expect("append");
    assert_eq!(cache.health(), (CacheHealth::Critical, true));
}

#[tokio::test]
async fn notifier_wakes_a_waiting_task_on_append() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = Arc::new(Cache::open(dir.path(), MIB).expect("open"));
    let notify = cache.notifier("vm1");
    let waiter = {
        let cache = Arc::clone(&cache);
        tokio::spawn(async move {
            notify.notified().await;
            cache.read_after("vm1", 0, usize::MAX).expect("read")
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished(), "woke without an append");
    let writer = Arc::clone(&cache);
    tokio::task::spawn_blocking(move || writer.append("vm1", 1, Bytes::from_static(b"hello")))
        .await
        .expect("join")
        .expect("append");
    let got = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("woken by the append")
        .expect("join");
    assert_eq!(got, vec![(1, Bytes::from_static(b"hello"))]);

    // An append between a forwarder's read and its await is not missed.
    cache
        .append("vm1", 2, Bytes::from_static(b"again"))
        .expect("append");
    tokio::time::timeout(Duration::from_secs(5), cache.notifier("vm1").notified())
        .await
        .expect("permit left by the append");
}

/// A forwarder that keeps up releases the segment being written after every batch: it stays
/// and takes the next frames (no file created and deleted per batch) until it outgrows
/// KEEP_RELEASED_BELOW; a release past its end (a switch of process server, batches the
/// target already had) deletes it, so the next frame starts a segment named by its sequence
/// and a reopen finds every frame in order.
#[test]
fn a_released_segment_being_written_is_kept_until_it_outgrows_the_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = Cache::open_with(dir.path(), 64 * MIB, 16 * MIB).expect("open");
    let big = Bytes::from(vec![7u8; 300 * 1024]);
    let mut files = Vec::new();
    for seq in 1..=6u64 {
        assert_eq!(
            cache.append("vm1", seq, big.clone()).expect("append"),
            AppendOutcome::Appended
        );
        cache.release("vm1", seq).expect("release");
        files.push(segments(dir.path(), "vm1"));
    }
    // 300 KiB frames: the segment is kept after 1, 2 and 3 frames (< 1 MiB), deleted after
    // the 4th; the 5th frame starts segment 5.
    assert_eq!(files[0].len(), 1);
    assert!(
        files[2][0].ends_with("00000000000000000001.seg"),
        "{files:?}"
    );
    assert!(files[3].is_empty(), "{files:?}");
    assert!(
        files[4][0].ends_with("00000000000000000005.seg"),
        "{files:?}"
    );
    assert_eq!(cache.pending_bytes("vm1"), 0);

    // A release beyond the last frame: the kept segment goes, the next frame starts its own.
    cache.release("vm1", 9).expect("release ahead");
    assert!(segments(dir.path(), "vm1").is_empty());
    assert!(matches!(
        cache.append("vm1", 9, big.clone()).expect("dup"),
        AppendOutcome::Duplicate
    ));
    cache.append("vm1", 10, big.clone()).expect("append");
    let left = segments(dir.path(), "vm1");
    assert!(left[0].ends_with("00000000000000000010.seg"), "{left:?}");
    drop(cache);

    let cache = Cache::open_with(dir.path(), 64 * MIB, 16 * MIB).expect("reopen");
    assert!(cache.truncations().is_empty(), "{:?}", cache.truncations());
    assert_eq!((cache.last_seq("vm1"), cache.released_seq("vm1")), (10, 9));
    assert_eq!(
        seqs(&cache.read_after("vm1", 0, usize::MAX).expect("read")),
        vec![10]
    );
}

/// A release that deletes no segment moves the sequence in memory only; `record_released`
/// (once a second in the PS) and closing the cache write it. After a crash before that
/// (the cache leaked, never dropped), the reopened cache starts from the last record and
/// still holds every batch after it: the target gets some again, none is lost.
#[test]
fn releases_are_recorded_in_bulk_and_a_crash_before_loses_no_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let cache = Cache::open_with(dir.path(), MIB, MIB).expect("open");
        append_all(&cache, "vm1", 1..=20);
        append_all(&cache, "vm2", 1..=20);
        cache.release("vm1", 5).expect("release");
        cache.release("vm2", 6).expect("release");
        assert_eq!(cache.record_released().expect("record"), 2);
        assert_eq!(
            cache.record_released().expect("record"),
            0,
            "nothing moved since"
        );
        cache.release("vm1", 12).expect("release");
        cache.release("vm2", 15).expect("release");
        // A crash: nothing runs on the way out.
        std::mem::forget(cache);
    }
    {
        let cache = Cache::open_with(dir.path(), MIB, MIB).expect("reopen after a crash");
        assert_eq!(cache.released_seq("vm1"), 5);
        assert_eq!(cache.released_seq("vm2"), 6);
        for (item, from) in [("vm1", 6), ("vm2", 7)] {
            let rest = cache.read_after(item, 0, usize::MAX).expect("read");
            assert_eq!(seqs(&rest), (from..=20).collect::<Vec<_>>(), "{item}");
            assert_payloads(&rest);
        }
        cache.release("vm1", 12).expect("release");
        // A clean close records it.
    }
    let cache = Cache::open_with(dir.path(), MIB, MIB).expect("reopen");
    assert_eq!(cache.released_seq("vm1"), 12);
    assert_eq!(
        seqs(&cache.read_after("vm1", 0, usize::MAX).expect("read")),
        (13..=20).collect::<Vec<_>>()
    );
}
