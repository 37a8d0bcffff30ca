//! Faults that used to pass silently, leaving a replica unequal to its source while the item
//! showed Protected: each must now be detected, resynchronised by the lab itself, and end
//! byte-exact (the lab's BLAKE3 verification of a point taken afterwards).
//! - a replica disk, or the whole replica, deleted while the master target is down;
//! - a corrupt activity log after kill -9 of the host (every region becomes hot);
//! - fsync errors at the PS cache and at the target journal (an LD_PRELOAD shim makes them
//!   fail with EIO): nothing is acknowledged past them, and after a restart the replica ends
//!   byte-exact.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

/// The jobs of the lab, newest first.
fn jobs(lab: &Path) -> Vec<Value> {
    json(srctl(lab, &["job", "list", "--json"]))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The last lines of a component's log.
fn tail(lab: &Path, name: &str) -> String {
    let log = std::fs::read_to_string(lab.join(format!("logs/{name}.log"))).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
fn a_replica_disk_deleted_while_the_target_is_down_is_resynchronized() {
    let lab_handle = Lab::up(&["--disk-size", "16MiB", "--machines", "1"]);
    let lab = lab_handle.dir.clone();
    ok(srctl(&lab, &["workload", "start", "vm1", "--rate", "2"]));
    ok(srctl(&lab, &["item", "enable", "vm1"]));
    protected_with_a_point(&lab, "vm1");
    let item = show(&lab, "vm1")["id"].as_str().expect("id").to_string();

    ok(srctl(&lab, &["lab", "kill", "azure-target"]));
    let disk = lab.join(format!(
        "datastores/azure-storage/replicas/{item}/disks/disk0.img"
    ));
    std::fs::remove_file(&disk).expect("delete the replica disk");
    ok(srctl(&lab, &["lab", "restart", "azure-target"]));

    // The CS resynchronises the item by itself, in a job that says why.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while !jobs(&lab).iter().any(|j| {
        j["name"].as_str().is_some_and(|n| {
            n.starts_with("Resynchronize (the replica at azure-target lost writes")
        }) && j["state"] == "Succeeded"
    }) {
        if std::time::Instant::now() > deadline {
            panic!(
                "no automatic resync succeeded within 90 s\njobs: {:#?}\nitem: {}\n\
                 azure-target.log:\n{}\ncs.log:\n{}",
                jobs(&lab),
                show(&lab, "vm1"),
                tail(&lab, "azure-target"),
                tail(&lab, "cs")
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    eventually("vm1 Protected after the resync", 60, || {
        let v = show(&lab, "vm1");
        v["state"] == "Protected" && v["resync_blocks_compared"].as_u64().unwrap_or(0) > 0
    });
    let log = std::fs::read_to_string(lab.join("logs/azure-target.log")).expect("log");
    assert!(log.contains("replica disk missing"), "{log}");
    verify_point_after(&lab, "vm1", now_ms(), "after the deleted replica disk");

    // The whole replica gone: the CS knows it existed, so the target makes it anew, takes
    // the stream where it is, and reports lost data rather than waiting for batch 1.
    let resyncs = |lab: &Path| {
        jobs(lab)
            .iter()
            .filter(|j| {
                j["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("Resynchronize (the replica at azure-target"))
                    && j["state"] == "Succeeded"
            })
            .count()
    };
    let done = resyncs(&lab);
    ok(srctl(&lab, &["lab", "kill", "azure-target"]));
    std::fs::remove_dir_all(lab.join(format!("datastores/azure-storage/replicas/{item}")))
        .expect("delete the replica");
    ok(srctl(&lab, &["lab", "restart", "azure-target"]));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    while resyncs(&lab) <= done {
        if std::time::Instant::now() > deadline {
            panic!(
                "no second automatic resync succeeded within 180 s\njobs: {:#?}\nitem: {}\n\
                 azure-target.log:\n{}\ncs.log:\n{}\nesx-1.log:\n{}",
                jobs(&lab),
                show(&lab, "vm1"),
                tail(&lab, "azure-target"),
                tail(&lab, "cs"),
                tail(&lab, "esx-1")
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    let log = std::fs::read_to_string(lab.join("logs/azure-target.log")).expect("log");
    assert!(log.contains("the replica's directory is gone"), "{log}");
    verify_point_after(&lab, "vm1", now_ms(), "after the deleted replica directory");
}

#[test]
fn a_corrupt_activity_log_after_kill_9_makes_the_whole_machine_resync() {
    let lab_handle = Lab::up(&["--disk-size", "16MiB", "--machines", "1"]);
    let lab = lab_handle.dir.clone();
    ok(srctl(&lab, &["workload", "start", "vm1", "--rate", "2"]));
    ok(srctl(&lab, &["item", "enable", "vm1"]));
    protected_with_a_point(&lab, "vm1");

    ok(srctl(&lab, &["lab", "kill", "esx-1"]));
    let al = lab.join("data/esx-1/machines/vm1/activity-log.json");
    assert!(al.exists(), "{} missing", al.display());
    std::fs::write(&al, b"{\"hot\": {\"disk0\": [1, 2,").expect("corrupt the activity log");
    ok(srctl(&lab, &["lab", "restart", "esx-1"]));

    // Every region hot: the resync compares the whole disk (16 MiB: 256 checksum blocks of
    // 64 KiB), not the few 1 MiB regions that were hot at the kill (16 blocks each).
    eventually("a resync of the whole machine", 90, || {
        let v = show(&lab, "vm1");
        v["state"] == "Protected" && v["resync_blocks_compared"].as_u64().unwrap_or(0) >= 256
    });
    let log = std::fs::read_to_string(lab.join("logs/esx-1.log")).expect("log");
    assert!(
        log.contains("the activity log is corrupt") && log.contains(&al.display().to_string()),
        "{log}"
    );
    verify_point_after(&lab, "vm1", now_ms(), "after the corrupt activity log");
}

/// Builds the LD_PRELOAD shim that fails fsync/fdatasync under a prefix (fixtures/fsync-fail.c).
fn fsync_shim(dir: &Path) -> std::path::PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fsync-fail.c");
    let out = dir.join("fsync-fail.so");
    let status = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&out)
        .arg(&src)
        .arg("-ldl")
        .status()
        .expect("cc (gcc) is needed to build the fsync fault shim");
    assert!(status.success(), "building {} failed", src.display());
    out
}

fn progress(lab: &Path) -> (u64, u64) {
    let v = show(lab, "vm1");
    (
        v["acked_seq"].as_u64().unwrap_or(0),
        v["target_seq"].as_u64().unwrap_or(0),
    )
}

/// Waits until `field` of vm1's progress stays the same over a window of reports (the agent
/// reports every second): what "nothing more is acknowledged" looks like from outside.
fn stalls(lab: &Path, what: &str, field: impl Fn((u64, u64)) -> u64) -> u64 {
    let mut last = field(progress(lab));
    let mut since = std::time::Instant::now();
    eventually(what, 60, || {
        let now = field(progress(lab));
        if now != last {
            last = now;
            since = std::time::Instant::now();
        }
        since.elapsed() >= std::time::Duration::from_secs(3)
    });
    last
}

#[test]
fn an_fsync_error_at_the_ps_cache_or_the_target_journal_acknowledges_nothing() {
    let tools = tempfile::tempdir().expect("tempdir");
    let shim = fsync_shim(tools.path());
    let trigger = tools.path().join("fail-fsync-under");
    let lab_handle = Lab::up_with_env(
        &["--disk-size", "16MiB", "--machines", "1"],
        &[
            ("LD_PRELOAD", shim.to_str().expect("utf-8")),
            ("FBL_FSYNC_FAIL_TRIGGER", trigger.to_str().expect("utf-8")),
        ],
    );
    let lab = lab_handle.dir.clone();
    ok(srctl(&lab, &["workload", "start", "vm1", "--rate", "2"]));
    ok(srctl(&lab, &["item", "enable", "vm1"]));
    protected_with_a_point(&lab, "vm1");
    let item = show(&lab, "vm1")["id"].as_str().expect("id").to_string();

    // The PS cache's disk fails its fsyncs: the PS acknowledges nothing more to the agent.
    std::fs::write(
        &trigger,
        lab.join("data/ps-onprem/cache").display().to_string(),
    )
    .expect("arm");
    eventually(
        "the PS refusing batches it could not make durable",
        30,
        || {
            std::fs::read_to_string(lab.join("logs/ps-onprem.log"))
                .is_ok_and(|l| l.contains("Input/output error"))
        },
    );
    let acked = stalls(&lab, "the agent's acknowledged batches to stop", |p| p.0);
    std::fs::remove_file(&trigger).expect("disarm");
    ok(srctl(&lab, &["lab", "restart", "ps-onprem"]));
    eventually("acknowledgements again after the PS restart", 60, || {
        progress(&lab).0 > acked
    });
    verify_point_after(&lab, "vm1", now_ms(), "after the PS cache's fsync errors");

    // The target's journal fails its fsyncs: the target applies nothing more (the PS holds
    // the batches meanwhile, so the agent's acknowledgements go on).
    std::fs::write(
        &trigger,
        lab.join(format!("datastores/azure-storage/replicas/{item}/journal"))
            .display()
            .to_string(),
    )
    .expect("arm");
    eventually(
        "the target refusing batches it could not journal",
        30,
        || {
            std::fs::read_to_string(lab.join("logs/azure-target.log"))
                .is_ok_and(|l| l.contains("Input/output error"))
        },
    );
    let at_target = stalls(&lab, "the target's journaled batches to stop", |p| p.1);
    let acked = progress(&lab).0;
    eventually("the PS still taking the agent's batches", 30, || {
        progress(&lab).0 > acked
    });
    std::fs::remove_file(&trigger).expect("disarm");
    ok(srctl(&lab, &["lab", "restart", "azure-target"]));
    eventually("the target journaling again after its restart", 60, || {
        progress(&lab).1 > at_target
    });
    verify_point_after(
        &lab,
        "vm1",
        now_ms(),
        "after the target journal's fsync errors",
    );
}
