//! Failover to Azure through the real lab processes: test failover leaves replication
//! running and cleanup removes everything; failover at a point, change-point and commit, each
//! verified byte-exact; planned failover loses nothing (the Azure VM's disk equals the source's
//! final disk); the failed-over VM registers from azure-compute and runs a workload; impossible
//! requests are refused and change nothing.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

fn verify_equal(lab: &Path, machine: &str, what: &str) {
    let v = json(srctl(lab, &["item", "verify", machine, "--json"]));
    assert_eq!(v["equal"], true, "{what}: {v}");
}

/// BLAKE3 of a disk, raw or an overlay over the frozen replica.
fn file_digest(path: &Path) -> String {
    failback_common::vdisk::digest_path(path).expect("read disk")
}

/// Protects vm1, hangs the target and starts a planned failover that waits for its final
/// point: returns the running `srctl` and the job's id once the job shows "In progress".
fn start_blocked_planned_failover(lab: &Path) -> (std::process::Child, String) {
    ok(srctl(lab, &["item", "enable", "vm1"]));
    eventually("vm1 Protected with a point", 60, || {
        let v = show(lab, "vm1");
        v["state"] == "Protected"
            && v["recovery_points"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
    });
    ok(srctl(lab, &["lab", "pause", "azure-target"]));
    let child = spawn_srctl(lab, &["planned-failover", "vm1"]);
    let mut id = String::new();
    eventually("the failover job in progress", 30, || {
        let jobs = json(srctl(lab, &["job", "list", "--json"]));
        match jobs.as_array().and_then(|a| {
            a.iter()
                .find(|j| j["name"] == "Planned failover" && j["state"] == "In progress")
                .cloned()
        }) {
            Some(j) => {
                id = j["id"].to_string();
                true
            }
            None => false,
        }
    });
    (child, id)
}

#[test]
fn test_failover_failover_change_point_commit_and_planned_failover() {
    let lab_handle = Lab::up(&["--disk-size", "8MiB", "--machines", "3"]);
    let lab = lab_handle.dir.clone();
    for vm in ["vm1", "vm2", "vm3"] {
        ok(srctl(&lab, &["workload", "start", vm, "--rate", "1"]));
        ok(srctl(&lab, &["item", "enable", vm]));
    }
    // Nothing to commit or change yet.
    let e = fails(srctl(&lab, &["commit", "vm1"]));
    assert!(e.contains("commit follows a completed failover"), "{e}");
    let e = fails(srctl(&lab, &["change-point", "vm1", "--point", "x"]));
    assert!(e.contains("only after a failover"), "{e}");
    for vm in ["vm1", "vm2", "vm3"] {
        eventually(&format!("{vm} Protected with a point"), 60, || {
            let v = show(&lab, vm);
            v["state"] == "Protected"
                && v["recovery_points"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
        });
    }

    // Test failover: vm1-Test runs in Azure while replication goes on undisturbed.
    ok(srctl(&lab, &["test-failover", "vm1"]));
    assert_eq!(show(&lab, "vm1")["state"], "Test failover completed");
    eventually("vm1-Test registered", 30, || {
        infra(&lab, "vm1-Test")["status"] == "connected"
    });
    verify_equal(&lab, "vm1", "test failover");
    // Without reflinks (ext4, tmpfs) the test VM's disk is an overlay over the frozen replica:
    // no full copy was made.
    let azure_storage = lab.join("datastores/azure-storage");
    let overlays = !failback_common::vdisk::reflinks(&azure_storage);
    let replica_overlay = azure_storage.join("replicas/vm1-1/disks/disk0.img.overlay");
    if overlays {
        assert!(
            azure_storage
                .join("vms/vm1-Test/disk0.img.overlay/base")
                .exists()
                && replica_overlay.exists(),
            "the test VM's disk shares the replica's frozen base"
        );
    }
    let points_before = show(&lab, "vm1")["recovery_points"]
        .as_array()
        .map(|a| a.len())
        .unwrap_or(0);
    let newest_before = show(&lab, "vm1")["recovery_points"][points_before - 1]["seq"]
        .as_u64()
        .unwrap_or(0);
    eventually("replication keeps making points", 30, || {
        let v = show(&lab, "vm1");
        v["recovery_points"]
            .as_array()
            .and_then(|a| a.last())
            .and_then(|p| p["seq"].as_u64())
            .is_some_and(|s| s > newest_before)
    });
    ok(srctl(&lab, &["test-failover-cleanup", "vm1"]));
    assert_eq!(show(&lab, "vm1")["state"], "Protected");
    assert_eq!(
        infra(&lab, "vm1-Test"),
        Value::Null,
        "the test VM must be gone"
    );
    assert!(
        !lab.join("datastores/azure-storage/vms/vm1-Test").exists(),
        "its disks must be gone"
    );
    if overlays {
        eventually(
            "the replica folds back once nothing shares its base",
            30,
            || {
                !replica_overlay.exists()
                    && azure_storage
                        .join("replicas/vm1-1/disks/disk0.img")
                        .is_file()
            },
        );
    }

    // Failover at the latest processed point, then change to the oldest, then commit.
    let out = ok(srctl(
        &lab,
        &["failover", "vm1", "--point", "latest-processed"],
    ));
    assert!(
        out.contains("Create the disks at point") && out.contains("Start the VM on azure-compute"),
        "{out}"
    );
    assert_eq!(show(&lab, "vm1")["state"], "Failover completed");
    verify_equal(&lab, "vm1", "failover latest-processed");
    let oldest = show(&lab, "vm1")["recovery_points"][0]["id"]
        .as_str()
        .expect("a point")
        .to_string();
    ok(srctl(&lab, &["change-point", "vm1", "--point", &oldest]));
    let v = json(srctl(&lab, &["item", "verify", "vm1", "--json"]));
    assert_eq!(
        (v["equal"].clone(), v["point"].clone()),
        (Value::Bool(true), Value::String(oldest.clone()))
    );
    ok(srctl(&lab, &["commit", "vm1"]));
    let v = show(&lab, "vm1");
    assert_eq!(v["state"], "Failover committed");
    assert_eq!(
        v["recovery_points"].as_array().map(|a| a.len()),
        Some(0),
        "commit deletes the points"
    );
    let e = fails(srctl(&lab, &["change-point", "vm1", "--point", &oldest]));
    assert!(e.contains("before commit"), "{e}");

    // The failed-over VM's agent registered from azure-compute and runs a workload.
    eventually("vm1 registered in Azure", 30, || {
        let c = infra(&lab, "vm1");
        c["status"] == "connected" && c["site"] == "azure" && c["host"] == "azure-compute"
    });
    ok(srctl(&lab, &["workload", "start", "vm1", "--rate", "1"]));

    // Planned failover: no data loss, the Azure disk equals the source's final disk.
    let out = ok(srctl(&lab, &["planned-failover", "vm2"]));
    assert!(out.contains("Shut down the source machine"), "{out}");
    let source = file_digest(&lab.join("datastores/ds-onprem/vm2/disk0.img"));
    let azure = file_digest(&lab.join("datastores/azure-storage/vms/vm2/disk0.img"));
    assert_eq!(source, azure, "planned failover must lose nothing");
    verify_equal(&lab, "vm2", "planned failover");

    // A planned failover of a source that can't be shut down is refused; nothing changes.
    ok(srctl(&lab, &["lab", "kill", "esx-1"]));
    eventually("vm3 not connected", 30, || {
        infra(&lab, "vm3")["status"] == "not connected"
    });
    let e = fails(srctl(&lab, &["planned-failover", "vm3"]));
    assert!(e.contains("not connected; nothing changed"), "{e}");
    assert_eq!(show(&lab, "vm3")["state"], "Protected");
    // An unplanned failover goes on without the source (the site is lost).
    ok(srctl(&lab, &["failover", "vm3", "--point", "latest"]));
    verify_equal(&lab, "vm3", "unplanned failover with the source down");
}

#[test]
fn a_job_interrupted_by_a_cs_restart_fails_with_a_reason_and_a_rerun_completes() {
    let lab_handle = Lab::up(&["--disk-size", "8MiB", "--machines", "1"]);
    let lab = lab_handle.dir.clone();
    ok(srctl(&lab, &["workload", "start", "vm1", "--rate", "1"]));
    // The target hangs: the planned failover waits for its final point to arrive.
    let (child, _id) = start_blocked_planned_failover(&lab);
    ok(srctl(&lab, &["lab", "restart", "cs"]));
    let mut child = child;
    let _ = child.wait();
    eventually("the CS back", 30, || {
        srctl(&lab, &["job", "list", "--json"]).status.success()
    });
    let jobs = json(srctl(&lab, &["job", "list", "--json"]));
    let job = jobs
        .as_array()
        .and_then(|a| a.iter().find(|j| j["name"] == "Planned failover"))
        .cloned()
        .expect("the job is kept");
    assert_eq!(job["state"], "Failed", "{job}");
    assert!(
        job["error"].as_str().unwrap_or("").contains("restarted"),
        "{job}"
    );
    assert_eq!(
        show(&lab, "vm1")["state"],
        "Protected",
        "never stuck in progress"
    );

    // Run it again with the target back: it completes, losing nothing.
    ok(srctl(&lab, &["lab", "resume", "azure-target"]));
    for c in ["vm1", "azure-target", "azure-compute"] {
        eventually(&format!("{c} connected again"), 30, || {
            infra(&lab, c)["status"] == "connected"
        });
    }
    ok(srctl(&lab, &["planned-failover", "vm1"]));
    let source = file_digest(&lab.join("datastores/ds-onprem/vm1/disk0.img"));
    let azure = file_digest(&lab.join("datastores/azure-storage/vms/vm1/disk0.img"));
    assert_eq!(source, azure);
}

/// Fails plan p1 (vm1 and vm2 in one replication group, vm3 alone) over at
/// `latest-multi-vm-processed`: every disk byte-exact, the group members at one multi-VM point.
/// How many jobs `job list` shows.
fn jobs_listed(lab: &Path) -> Option<usize> {
    json(srctl(lab, &["job", "list", "--json"]))
        .as_array()
        .map(|a| a.len())
}

fn plan_fails_over_to_one_multi_vm_point(lab: &Path, what: &str) {
    ok(srctl(
        lab,
        &[
            "plan",
            "failover",
            "p1",
            "--point",
            "latest-multi-vm-processed",
        ],
    ));
    let v1 = json(srctl(lab, &["item", "verify", "vm1", "--json"]));
    let v2 = json(srctl(lab, &["item", "verify", "vm2", "--json"]));
    assert_eq!(
        (v1["equal"].clone(), v2["equal"].clone()),
        (Value::Bool(true), Value::Bool(true)),
        "{what}"
    );
    assert_eq!(
        v1["point"], v2["point"],
        "{what}: replication group members go to the same point"
    );
    assert!(
        v1["point"].as_str().unwrap_or("").starts_with("mv"),
        "{what}: {v1}"
    );
    verify_equal(lab, "vm3", &format!("{what}, vm3"));
}

#[test]
fn recovery_plan_runs_groups_in_order_with_shared_multi_vm_points() {
    // Two on-premises master targets of two disks each: the plan's reprotect must spread the
    // machines over both, a replication group through one.
    let lab_handle = Lab::up_with_env(
        &[
            "--disk-size",
            "8MiB",
            "--machines",
            "3",
            "--master-targets",
            "2",
        ],
        &[("FBL_CS__MASTER_TARGET_DISK_LIMIT", "2")],
    );
    let lab = lab_handle.dir.clone();
    for (vm, group) in [("vm1", "app"), ("vm2", "app"), ("vm3", "")] {
        ok(srctl(&lab, &["workload", "start", vm, "--rate", "1"]));
        ok(srctl(
            &lab,
            &["item", "enable", vm, "--replication-group", group],
        ));
    }
    ok(srctl(&lab, &["plan", "create", "p1"]));
    ok(srctl(&lab, &["plan", "add", "p1", "vm3", "--group", "1"]));
    ok(srctl(&lab, &["plan", "add", "p1", "vm1", "--group", "2"]));
    ok(srctl(&lab, &["plan", "add", "p1", "vm2", "--group", "2"]));
    let e = fails(srctl(&lab, &["plan", "add", "p1", "vm2", "--group", "8"]));
    assert!(e.contains("groups 1 to 7"), "{e}");
    let e = fails(srctl(
        &lab,
        &["plan", "failover", "p1", "--point", "crash-123"],
    ));
    assert!(e.contains("a custom recovery point"), "{e}");
    for vm in ["vm1", "vm2", "vm3"] {
        eventually(&format!("{vm} Protected with a point"), 60, || {
            let v = show(&lab, vm);
            v["state"] == "Protected"
                && v["recovery_points"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
        });
    }

    ok(srctl(
        &lab,
        &[
            "plan",
            "test-failover",
            "p1",
            "--point",
            "latest-multi-vm-processed",
        ],
    ));
    let jobs = json(srctl(&lab, &["job", "list", "--json"]));
    let job = |item: &str| {
        jobs.as_array()
            .and_then(|a| {
                a.iter()
                    .find(|j| j["name"] == "Test failover" && j["item"] == item)
                    .cloned()
            })
            .expect("a job per machine")
    };
    let (g1, g2a, g2b) = (job("vm3-1"), job("vm1-1"), job("vm2-1"));
    let ended1 = g1["ended_ms"].as_i64().unwrap_or(i64::MAX);
    for j in [&g2a, &g2b] {
        assert!(
            j["started_ms"].as_i64().unwrap_or(0) >= ended1,
            "group 2 must start after group 1 ended: {g1} {j}"
        );
    }
    for vm in ["vm1", "vm2", "vm3"] {
        eventually(&format!("{vm}-Test registered"), 30, || {
            infra(&lab, &format!("{vm}-Test"))["status"] == "connected"
        });
    }
    ok(srctl(&lab, &["plan", "test-failover-cleanup", "p1"]));

    plan_fails_over_to_one_multi_vm_point(&lab, "plan failover");
    ok(srctl(&lab, &["plan", "commit", "p1"]));
    let plan = json(srctl(&lab, &["plan", "show", "p1", "--json"]));
    for m in plan["members"].as_array().expect("members") {
        assert_eq!(m["state"], "Failover committed", "{plan}");
    }

    // A replication group is reprotected through a recovery plan, as a whole: one member
    // alone, or a plan missing a member, is refused and nothing changes.
    for vm in ["vm1", "vm2", "vm3"] {
        eventually(&format!("{vm} registered in Azure"), 30, || {
            infra(&lab, vm)["site"] == "azure" && infra(&lab, vm)["status"] == "connected"
        });
    }
    let jobs_before = jobs_listed(&lab);
    let e = fails(srctl(&lab, &["reprotect", "vm1"]));
    assert!(
        e.contains("replication group `app` with vm2") && e.contains("srctl plan reprotect"),
        "{e}"
    );
    ok(srctl(&lab, &["plan", "create", "p2"]));
    ok(srctl(&lab, &["plan", "add", "p2", "vm1"]));
    let e = fails(srctl(&lab, &["plan", "reprotect", "p2"]));
    assert!(e.contains("vm2 of it is not in plan `p2`"), "{e}");
    let e = fails(srctl(
        &lab,
        &["plan", "reprotect", "p1", "--master-target", "mt-nowhere"],
    ));
    assert!(
        e.contains("nothing was changed") && e.contains("mt-nowhere"),
        "{e}"
    );
    assert_eq!(
        jobs_listed(&lab),
        jobs_before,
        "refused reprotects start no job"
    );
    // Three disks don't fit on one master target of two: refused up front, naming the room.
    let e = fails(srctl(
        &lab,
        &["plan", "reprotect", "p1", "--master-target", "mt-onprem"],
    ));
    assert!(
        e.contains("nothing was changed")
            && e.contains(
                "need 3 disks on the master targets in onprem (`mt-onprem`), which have room for 2"
            ),
        "{e}"
    );
    assert_eq!(
        jobs_listed(&lab),
        jobs_before,
        "refused reprotects start no job"
    );
    assert_eq!(show(&lab, "vm1")["state"], "Failover committed");

    // With no master target named, group 1 (vm3) fills mt-onprem's first disk; the
    // replication group (vm1, vm2: two disks) doesn't fit beside it and goes, whole, to
    // mt-onprem-2. The group keeps sharing points on the way back, and the plan's failback
    // takes all of them to one multi-VM point.
    let out = json(srctl(
        &lab,
        &["plan", "reprotect", "p1", "--wait", "--json"],
    ));
    assert_eq!(out["plan_job"]["state"], "Succeeded", "{out}");
    assert_eq!(out["jobs"].as_array().map(|a| a.len()), Some(3), "{out}");
    for (vm, mt) in [
        ("vm1", "mt-onprem-2"),
        ("vm2", "mt-onprem-2"),
        ("vm3", "mt-onprem"),
    ] {
        let v = show(&lab, vm);
        assert_eq!(
            (v["state"].clone(), v["target"].clone()),
            (Value::String("Protected".into()), Value::String(mt.into())),
            "{v}"
        );
    }
    // Run again, the plan reprotect skips the members already reprotected: no new job.
    let jobs_after = jobs_listed(&lab);
    let again = json(srctl(
        &lab,
        &["plan", "reprotect", "p1", "--wait", "--json"],
    ));
    assert_eq!(again["plan_job"]["state"], "Succeeded", "{again}");
    assert_eq!(
        again["jobs"].as_array().map(|a| a.len()),
        Some(0),
        "{again}"
    );
    assert_eq!(
        jobs_listed(&lab),
        jobs_after.map(|n| n + 1),
        "only the plan's own job is new"
    );
    eventually("a multi-VM point shared on the way back", 60, || {
        let ids = |vm: &str| -> Vec<String> {
            show(&lab, vm)["recovery_points"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["id"].as_str().map(String::from))
                .filter(|id| id.starts_with("mv"))
                .collect()
        };
        let (a, b) = (ids("vm1"), ids("vm2"));
        a.iter().any(|id| b.contains(id))
    });
    eventually("vm3 has a point on the way back", 60, || {
        show(&lab, "vm3")["recovery_points"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
    });
    plan_fails_over_to_one_multi_vm_point(&lab, "plan failback");
}

#[test]
fn cancelling_a_running_failover_is_refused_unless_forced_and_a_rerun_completes() {
    let lab_handle = Lab::up(&["--disk-size", "8MiB", "--machines", "1"]);
    let lab = lab_handle.dir.clone();
    // A failover that can't finish: the target hangs while it waits for the final point.
    let (child, id) = start_blocked_planned_failover(&lab);
    let e = fails(srctl(&lab, &["job", "cancel", &id]));
    assert!(
        e.contains("don't cancel a running failover") && e.contains("won't resume"),
        "{e}"
    );
    assert_eq!(
        show(&lab, "vm1")["state"],
        "Failover in progress",
        "a refused cancel changes nothing"
    );

    ok(srctl(&lab, &["job", "cancel", &id, "--force"]));
    let out = child.wait_with_output().expect("wait");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cancelled by the operator"));
    let job = json(srctl(&lab, &["job", "show", &id, "--json"]));
    assert_eq!(job["state"], "Failed", "{job}");
    assert_eq!(
        show(&lab, "vm1")["state"],
        "Failover cancelled: run the failover again"
    );

    // Running the failover again completes it.
    ok(srctl(&lab, &["lab", "resume", "azure-target"]));
    ok(srctl(
        &lab,
        &["failover", "vm1", "--point", "latest-processed"],
    ));
    assert_eq!(show(&lab, "vm1")["state"], "Failover completed");
    verify_equal(&lab, "vm1", "failover after a cancelled one");
}
