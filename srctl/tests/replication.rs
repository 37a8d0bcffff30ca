//! Forward replication through the real lab processes: initial and delta replication with a
//! workload running end byte-exact; kill -9 of the process server, the agent host and the
//! target mid-replication loses no acknowledged write (a later point verifies equal); bad
//! requests are refused with ASR's words and change nothing.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

#[test]
fn replication_is_byte_exact_and_survives_kill_9_of_each_hop() {
    let lab_handle = Lab::up(&["--disk-size", "32MiB"]);
    let lab = lab_handle.dir.clone();

    // Bad requests first: nothing changes.
    let e = fails(srctl(&lab, &["item", "enable", "vm9"]));
    assert!(e.contains("no machine named `vm9`"), "{e}");
    let e = fails(srctl(&lab, &["item", "enable", "vm1", "--policy", "nope"]));
    assert!(e.contains("no policy named `nope`"), "{e}");
    let e = fails(srctl(&lab, &["policy", "update", "default-failback"]));
    assert!(e.contains("can't be edited"), "{e}");
    assert_eq!(ok(srctl(&lab, &["item", "list", "--json"])).trim(), "[]");

    ok(srctl(
        &lab,
        &[
            "workload",
            "start",
            "vm1",
            "--rate",
            "2",
            "--write-size",
            "16KiB",
        ],
    ));
    let out = ok(srctl(&lab, &["item", "enable", "vm1"]));
    assert!(out.contains("Initial replication in progress"), "{out}");
    let e = fails(srctl(&lab, &["item", "enable", "vm1"]));
    assert!(e.contains("already protected"), "{e}");
    eventually("vm1 Protected", 60, || {
        show(&lab, "vm1")["state"] == "Protected"
    });
    let v = show(&lab, "vm1");
    assert_eq!(v["disks"][0]["state"], "Complete", "{v}");
    assert_eq!(v["process_server"], "ps-onprem");
    assert_eq!(v["target"], "azure-target");
    verify_point_after(&lab, "vm1", 0, "initial replication");

    // kill -9 of each hop while the workload keeps writing; after a restart replication
    // resumes and a later point is byte-exact: no acknowledged write was lost.
    for component in ["ps-onprem", "azure-target", "esx-1"] {
        if component == "esx-1" {
            // Make sure writes are in flight: with the PS hung they pile up unacknowledged in
            // the agent's memory, and only the persisted activity log remembers them.
            ok(srctl(&lab, &["lab", "pause", "ps-onprem"]));
            ok(srctl(&lab, &["workload", "set", "vm1", "--rate", "8"]));
            std::thread::sleep(Duration::from_millis(3000));
        }
        ok(srctl(&lab, &["lab", "kill", component]));
        std::thread::sleep(Duration::from_millis(500));
        if component == "esx-1" {
            ok(srctl(&lab, &["lab", "resume", "ps-onprem"]));
        }
        ok(srctl(&lab, &["lab", "restart", component]));
        if component == "esx-1" {
            // The workload died with the host; start it again.
            eventually("vm1 back", 30, || {
                srctl(&lab, &["workload", "start", "vm1", "--rate", "2"])
                    .status
                    .success()
            });
        }
        // A point taken after the restart: it includes every write acknowledged before the
        // crash and every write made since.
        verify_point_after(
            &lab,
            "vm1",
            now_ms(),
            &format!("after kill -9 of {component}"),
        );
    }

    // The agent isn't installed (not connected): enabling vm2 is refused.
    ok(srctl(&lab, &["lab", "kill", "esx-1"]));
    // Once the CS has seen the agent go (its stream broke, or its heartbeats stopped).
    wait_component(&lab, "vm2", "onprem", "not connected");
    let e = fails(srctl(&lab, &["item", "enable", "vm2"]));
    assert!(e.contains("the agent isn't installed"), "{e}");
    let items: Value =
        serde_json::from_str(&ok(srctl(&lab, &["item", "list", "--json"]))).expect("json");
    assert_eq!(items.as_array().map(|a| a.len()), Some(1));
}

#[test]
fn resync_moves_only_the_blocks_that_differ() {
    let lab_handle = Lab::up(&["--disk-size", "32MiB", "--machines", "1"]);
    let lab = lab_handle.dir.clone();
    ok(srctl(&lab, &["workload", "start", "vm1", "--rate", "8"]));
    ok(srctl(&lab, &["item", "enable", "vm1"]));
    eventually("vm1 Protected", 60, || {
        show(&lab, "vm1")["state"] == "Protected"
    });
    ok(srctl(&lab, &["workload", "stop", "vm1"]));
    verify_point_after(&lab, "vm1", now_ms(), "before the resync");

    // Change three 64 KiB blocks of the source behind the agent's back (as an offline edit
    // would); the replica no longer matches and nothing tracked it.
    let disk = lab.join("datastores/ds-onprem/vm1/disk0.img");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .expect("open disk");
        for off in [1u64 << 20, 5 << 20, (9 << 20) + 4096] {
            f.write_all_at(&[0x5a; 1000], off).expect("write");
        }
    }
    let link_bytes = |lab: &Path| -> u64 {
        let v: Value =
            serde_json::from_str(&ok(srctl(lab, &["link", "status", "--json"]))).expect("json");
        v["bytes_onprem_to_azure"].as_u64().unwrap_or(0)
    };
    let before = link_bytes(&lab);
    let out = ok(srctl(&lab, &["item", "resync", "vm1"]));
    assert!(out.contains("Resynchronization in progress"), "{out}");
    eventually("resync done", 60, || {
        let v = show(&lab, "vm1");
        v["state"] == "Protected" && v["resync_blocks_compared"].as_u64().unwrap_or(0) > 0
    });
    let v = show(&lab, "vm1");
    let moved = v["resync_bytes"].as_u64().unwrap_or(0);
    assert!(
        moved > 0 && moved <= 3 * 65536,
        "only the 3 changed blocks may move, moved {moved}: {v}"
    );
    let crossed = link_bytes(&lab) - before;
    assert!(
        crossed < (1 << 20),
        "{crossed} bytes crossed the link for a 32 MiB disk"
    );
    verify_point_after(&lab, "vm1", now_ms(), "after the resync");
}

#[test]
fn replication_group_members_share_points() {
    let lab_handle = Lab::up(&["--disk-size", "8MiB"]);
    let lab = lab_handle.dir.clone();
    for vm in ["vm1", "vm2"] {
        ok(srctl(&lab, &["workload", "start", vm, "--rate", "1"]));
        ok(srctl(
            &lab,
            &["item", "enable", vm, "--replication-group", "app-tier"],
        ));
    }
    // Joining later is refused: membership is set when replication is enabled.
    let e = fails(srctl(
        &lab,
        &["item", "enable", "vm1", "--replication-group", "other"],
    ));
    assert!(
        e.contains("joins a replication group only when its replication is enabled"),
        "{e}"
    );

    let mut shared = String::new();
    eventually("a point shared by vm1 and vm2", 60, || {
        let ids = |v: Value| -> Vec<(String, String)> {
            v["recovery_points"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|p| {
                            (
                                p["id"].as_str().unwrap_or("").to_string(),
                                p["kind"].as_str().unwrap_or("").to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let a = ids(show(&lab, "vm1"));
        let b = ids(show(&lab, "vm2"));
        match a.iter().rev().find(|p| b.contains(p)) {
            Some((id, kind)) => {
                assert!(
                    kind.starts_with("multi-vm-"),
                    "group members take only coordinated tags: {kind}"
                );
                shared = id.clone();
                true
            }
            None => false,
        }
    });
    for vm in ["vm1", "vm2"] {
        let v: Value = serde_json::from_str(&ok(srctl(
            &lab,
            &["item", "verify", vm, "--point", &shared, "--json"],
        )))
        .expect("json");
        assert_eq!(v["equal"], true, "{vm}: {v}");
        // No member has points of its own.
        let kinds: Vec<String> = show(&lab, vm)["recovery_points"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p["kind"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            kinds.iter().all(|k| k.starts_with("multi-vm")),
            "{vm}: {kinds:?}"
        );
    }
}

#[test]
fn a_lost_process_server_cache_is_detected_and_resynchronized() {
    let lab_handle = Lab::up(&["--disk-size", "16MiB", "--machines", "1"]);
    let lab = lab_handle.dir.clone();
    ok(srctl(&lab, &["workload", "start", "vm1", "--rate", "2"]));
    ok(srctl(&lab, &["item", "enable", "vm1"]));
    eventually("vm1 Protected", 60, || {
        show(&lab, "vm1")["state"] == "Protected"
    });

    // The target hangs, so the PS holds acknowledged batches it could not forward; then the
    // PS dies and its cache disk is lost.
    ok(srctl(&lab, &["lab", "pause", "azure-target"]));
    std::thread::sleep(Duration::from_millis(2000));
    ok(srctl(&lab, &["lab", "kill", "ps-onprem"]));
    std::fs::remove_dir_all(lab.join("data/ps-onprem/cache")).expect("remove the PS cache");
    ok(srctl(&lab, &["lab", "restart", "ps-onprem"]));
    ok(srctl(&lab, &["lab", "resume", "azure-target"]));

    eventually("a full resync after the lost cache", 60, || {
        let v = show(&lab, "vm1");
        v["state"] == "Protected" && v["resync_blocks_compared"].as_u64().unwrap_or(0) > 0
    });
    let log = std::fs::read_to_string(lab.join("logs/esx-1.log")).expect("log");
    assert!(log.contains("its cache was lost; resync required"), "{log}");
    verify_point_after(&lab, "vm1", now_ms(), "after the lost PS cache");
}

#[test]
fn a_grown_disk_is_resynchronized_and_the_replica_grows() {
    let lab_handle = Lab::up(&["--disk-size", "8MiB", "--machines", "1"]);
    let lab = lab_handle.dir.clone();
    ok(srctl(&lab, &["workload", "start", "vm1", "--rate", "1"]));
    ok(srctl(&lab, &["item", "enable", "vm1"]));
    // Protected with data written (and replicated), so the resync has blocks to compare.
    eventually("vm1 Protected with a point", 60, || {
        let v = show(&lab, "vm1");
        v["state"] == "Protected"
            && v["recovery_points"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
    });

    // The VM's disk grows from 8 to 16 MiB (host config), and the host restarts.
    let config = lab.join("config/esx-1.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    assert!(text.contains("size = 8388608"), "{text}");
    std::fs::write(&config, text.replace("size = 8388608", "size = 16777216"))
        .expect("write config");
    ok(srctl(&lab, &["lab", "restart", "esx-1"]));
    eventually("resynchronized after the resize", 60, || {
        let v = show(&lab, "vm1");
        v["state"] == "Protected" && v["resync_blocks_compared"].as_u64().unwrap_or(0) > 0
    });
    let replica = lab.join("datastores/azure-storage/replicas/vm1-1/disks/disk0.img");
    assert_eq!(
        std::fs::metadata(&replica).expect("replica").len(),
        16 << 20,
        "the replica grows"
    );
    eventually("vm1 back", 30, || {
        srctl(&lab, &["workload", "start", "vm1", "--rate", "1"])
            .status
            .success()
    });
    verify_point_after(&lab, "vm1", now_ms(), "after the disk grew");

    // Shrinking is refused with a clear message (the host won't start).
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, text.replace("size = 16777216", "size = 4194304"))
        .expect("write config");
    // `lab restart` reports a component that exits at once, with its log; one that takes
    // longer to refuse says so in its log only.
    let out = srctl(&lab, &["lab", "restart", "esx-1"]);
    if !out.status.success() {
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(
            e.contains("esx-1 exited right after it was started")
                && e.contains("disks can grow, not shrink"),
            "{e}"
        );
    }
    eventually("the host refuses to start", 30, || {
        std::fs::read_to_string(lab.join("logs/esx-1.log"))
            .is_ok_and(|l| l.contains("disks can grow, not shrink"))
    });
}
