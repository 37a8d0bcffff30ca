//! Reprotect and failback through the real lab processes: the drill runs all four stages and
//! ends ok; every reprotect precondition is refused with ASR's error and changes nothing;
//! original location moves only blocks that differ; alternate location creates a new disk;
//! a failback cancelled during data synchronisation leaves the on-premises VM inconsistent
//! and running it again completes it; the ExpressRoute-style route through ps-onprem works.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

fn verify_equal(lab: &Path, machine: &str, what: &str) {
    let v = json(srctl(lab, &["item", "verify", machine, "--json"]));
    assert_eq!(v["equal"], true, "{what}: {v}");
}

/// Protects vm1 with a workload, fails it over to Azure with a shutdown, commits.
fn fail_over_and_commit(lab: &Path) {
    ok(srctl(lab, &["item", "enable", "vm1"]));
    ok(srctl(lab, &["workload", "start", "vm1", "--rate", "1"]));
    eventually("vm1 Protected", 60, || {
        show(lab, "vm1")["state"] == "Protected"
    });
    ok(srctl(lab, &["failover", "vm1", "--shutdown"]));
    verify_equal(lab, "vm1", "failover to Azure");
    ok(srctl(lab, &["commit", "vm1"]));
}

fn item_id(lab: &Path) -> String {
    show(lab, "vm1")["id"].as_str().unwrap_or("").to_string()
}

fn job_count(lab: &Path) -> usize {
    json(srctl(lab, &["job", "list", "--json"]))
        .as_array()
        .map(|a| a.len())
        .unwrap_or(0)
}

/// A reprotect that must be refused with `expect` in its error, changing nothing.
fn refused(lab: &Path, args: &[&str], expect: &str) {
    let (id, jobs) = (item_id(lab), job_count(lab));
    let mut all = vec!["reprotect", "vm1"];
    all.extend_from_slice(args);
    let e = fails(srctl(lab, &all));
    assert!(e.contains(expect), "expected `{expect}` in: {e}");
    let v = show(lab, "vm1");
    assert_eq!(v["id"], id.as_str(), "a refused reprotect creates no item");
    assert_eq!(v["state"], "Failover committed");
    assert_eq!(job_count(lab), jobs, "a refused reprotect starts no job");
}

#[test]
fn the_drill_runs_all_four_stages_and_ends_ok() {
    let out = Command::new(SRCTL)
        .args([
            "drill",
            "--machines",
            "1",
            "--disk-size",
            "16MiB",
            "--rate",
            "1",
            "--json",
        ])
        .env_remove("FAILBACK_LAB")
        .output()
        .expect("drill");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(
        out.status.success(),
        "drill failed: {report:#}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report["ok"], true);
    let stages = report["stages"].as_array().expect("stages");
    let names: Vec<&str> = stages.iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "enable-replication",
            "failover-to-azure",
            "commit-azure",
            "reprotect-to-onprem",
            "failback",
            "commit-onprem",
            "reprotect-to-azure"
        ]
    );
    assert!(stages.iter().all(|s| s["ok"] == true), "{report:#}");
    assert!(report["integrity_checks"].as_u64() >= Some(3), "{report:#}");
    assert_eq!(report["integrity_mismatches"], 0);
    // Original location: only what changed in Azure crosses the link, not the disk.
    let back = stages
        .iter()
        .find(|s| s["name"] == "reprotect-to-onprem")
        .expect("stage");
    let bytes = back["link_bytes"].as_u64().expect("link_bytes");
    assert!(bytes > 0 && bytes < (16 << 20) / 2, "{back}");
    assert!(
        report["lag"]["forward"]["p99_ms"].as_f64() > Some(0.0),
        "{report:#}"
    );
    assert!(
        report["lag"]["reverse"]["p99_ms"].as_f64() > Some(0.0),
        "{report:#}"
    );
}

#[test]
fn reprotect_preconditions_are_refused_with_asr_errors_and_change_nothing() {
    let lab_handle = Lab::up_with_env(
        &["--disk-size", "8MiB", "--machines", "1"],
        &[("FBL_CS__BOOT_DELAY", "4s")],
    );
    let lab = lab_handle.dir.clone();
    let e = fails(srctl(&lab, &["reprotect", "vm1"]));
    assert!(
        e.contains("not in the configuration server's database"),
        "{e}"
    );
    fail_over_and_commit(&lab);

    // Within the boot delay the Azure VM's agent has not registered yet.
    refused(&lab, &[], "the agent isn't installed on `vm1`");
    wait_component(&lab, "vm1", "azure", "connected");

    refused(&lab, &["--datastore", "azure-storage"], "8061");
    refused(&lab, &["--alternate-location"], "78052");
    refused(&lab, &["--master-target", "azure-target"], "is in azure");
    refused(
        &lab,
        &["--retention-drive", "relative/dir"],
        "absolute path",
    );

    ok(srctl(&lab, &["lab", "kill", "mt-onprem"]));
    wait_component(&lab, "mt-onprem", "onprem", "not connected");
    refused(&lab, &[], "78022");
    std::fs::create_dir_all(lab.join("data/mt-onprem/snapshots")).expect("mkdir");
    std::fs::write(lab.join("data/mt-onprem/snapshots/before-upgrade"), b"").expect("snap");
    ok(srctl(&lab, &["lab", "restart", "mt-onprem"]));
    wait_component(&lab, "mt-onprem", "onprem", "connected");
    refused(&lab, &[], "has snapshots (before-upgrade)");
    std::fs::remove_file(lab.join("data/mt-onprem/snapshots/before-upgrade")).expect("rm");
    ok(srctl(&lab, &["lab", "restart", "mt-onprem"]));

    ok(srctl(&lab, &["lab", "kill", "ps-azure"]));
    wait_component(&lab, "ps-azure", "azure", "not connected");
    refused(&lab, &[], "806");
    ok(srctl(&lab, &["lab", "restart", "ps-azure"]));
    wait_component(&lab, "ps-azure", "azure", "connected");

    ok(srctl_env(
        &lab,
        &["lab", "restart", "cs"],
        &[("FBL_CS__MASTER_TARGET_DISK_LIMIT", "0")],
    ));
    wait_component(&lab, "vm1", "azure", "connected");
    wait_component(&lab, "mt-onprem", "onprem", "connected");
    refused(&lab, &[], "at most 0 per master target");
    ok(srctl(&lab, &["lab", "restart", "cs"]));

    // The VPN is down: the Azure VM can't reach the on-premises CS.
    wait_component(&lab, "vm1", "azure", "connected");
    ok(srctl(&lab, &["link", "down"]));
    wait_component(&lab, "vm1", "azure", "not connected");
    refused(&lab, &[], "95226");
    ok(srctl(&lab, &["link", "up"]));
    wait_component(&lab, "vm1", "azure", "connected");
    wait_component(&lab, "mt-onprem", "onprem", "connected");
    wait_component(&lab, "ps-azure", "azure", "connected");

    // With everything in place, original location moves only the blocks that differ.
    ok(srctl(&lab, &["reprotect", "vm1", "--wait"]));
    let v = show(&lab, "vm1");
    assert_eq!(v["state"], "Protected");
    assert_eq!(v["direction"], "reverse");
    assert_eq!(
        v["policy"], "default-failback",
        "the failback policy is used"
    );
    assert_eq!(v["process_server"], "ps-azure");
    assert_eq!(v["target"], "mt-onprem");
    let sent = v["resync_bytes"].as_u64().expect("resync_bytes");
    assert!(sent < (8 << 20) / 2, "only changed blocks move: {v}");
    // As ASR's master target attaches the on-premises disks, the replica took the old disk
    // over: no byte of it was copied.
    let ino = |p: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(lab.join(p)).expect(p).ino()
    };
    let id = v["id"].as_str().expect("id");
    assert_eq!(
        ino("datastores/ds-onprem/vm1/disk0.img"),
        ino(&format!(
            "datastores/ds-onprem/replicas/{id}/disks/disk0.img"
        ))
    );
    let esx = infra(&lab, "esx-1");
    assert!(
        esx["machines"]
            .as_array()
            .is_some_and(|m| m.iter().any(|n| n == "vm1"))
    );

    // Failback to an older point, then change to the newest: both byte-exact (the replica
    // that took the old disk over keeps its own state when the point replaces the disk).
    ok(srctl(&lab, &["workload", "start", "vm1", "--rate", "2"]));
    let mut points = Vec::new();
    eventually("two recovery points on the way back", 60, || {
        points = show(&lab, "vm1")["recovery_points"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        points.len() >= 2
    });
    let older = points[0]["id"].as_str().expect("id").to_string();
    ok(srctl(&lab, &["failover", "vm1", "--point", &older]));
    verify_equal(&lab, "vm1", "failback to an older point");
    let newest = show(&lab, "vm1")["recovery_points"]
        .as_array()
        .and_then(|p| p.last().cloned())
        .expect("points")["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_ne!(newest, older);
    ok(srctl(&lab, &["change-point", "vm1", "--point", &newest]));
    verify_equal(&lab, "vm1", "failback changed to the newest point");
}

#[test]
fn alternate_location_creates_a_new_vm_with_a_full_copy() {
    let lab_handle = Lab::up(&["--disk-size", "8MiB", "--machines", "1"]);
    let lab = lab_handle.dir.clone();
    fail_over_and_commit(&lab);
    wait_component(&lab, "vm1", "azure", "connected");
    refused(&lab, &["--alternate-location"], "78052");
    let e = fails(srctl(&lab, &["vm", "delete", "vm9", "--host", "esx-1"]));
    assert!(e.contains("no VM `vm9` on esx-1"), "{e}");
    ok(srctl(&lab, &["vm", "delete", "vm1", "--host", "esx-1"]));
    assert!(!lab.join("datastores/ds-onprem/vm1/disk0.img").exists());
    ok(srctl(
        &lab,
        &["reprotect", "vm1", "--alternate-location", "--wait"],
    ));
    let v = show(&lab, "vm1");
    assert_eq!(v["state"], "Protected");
    let job = json(srctl(&lab, &["job", "list", "--json"]));
    let steps = job
        .as_array()
        .and_then(|a| a.iter().rev().find(|j| j["name"] == "Reprotect").cloned())
        .expect("reprotect job")["steps"]
        .to_string();
    assert!(steps.contains("full copy"), "{steps}");

    ok(srctl(&lab, &["failover", "vm1"]));
    let new_disk = lab.join("datastores/ds-onprem/vms/vm1/disk0.img");
    assert!(
        failback_common::vdisk::VDisk::exists(&new_disk),
        "failback created the new VM's disk"
    );
    verify_equal(&lab, "vm1", "failback to an alternate location");
    ok(srctl(&lab, &["commit", "vm1"]));
    wait_component(&lab, "vm1", "onprem", "connected");
    assert_eq!(infra(&lab, "vm1")["host"], "esx-1");
    assert!(
        !lab.join("datastores/azure-storage/vms/vm1").exists(),
        "commit deletes the Azure VM's disks"
    );
}

#[test]
fn a_failback_cancelled_during_synchronisation_is_inconsistent_until_run_again() {
    let lab_handle = Lab::up(&["--disk-size", "8MiB", "--machines", "1"]);
    let lab = lab_handle.dir.clone();
    fail_over_and_commit(&lab);
    wait_component(&lab, "vm1", "azure", "connected");
    // Seed 004: back through the on-premises PS over the link (ExpressRoute-style).
    ok(srctl(
        &lab,
        &[
            "reprotect",
            "vm1",
            "--process-server",
            "ps-onprem",
            "--wait",
        ],
    ));
    assert_eq!(show(&lab, "vm1")["process_server"], "ps-onprem");
    ok(srctl(&lab, &["workload", "start", "vm1", "--rate", "1"]));
    let e = fails(srctl(&lab, &["failover", "vm1", "--sync", "sideways"]));
    assert!(e.contains("unknown --sync `sideways`"), "{e}");

    // The master target hangs: phase 1 can't finish while the Azure VM keeps writing.
    ok(srctl(&lab, &["lab", "pause", "mt-onprem"]));
    let child = spawn_srctl(&lab, &["failover", "vm1"]);
    let mut id = String::new();
    eventually("failback synchronising", 30, || {
        let jobs = json(srctl(&lab, &["job", "list", "--json"]));
        let job = jobs.as_array().and_then(|a| {
            a.iter()
                .find(|j| j["name"] == "Failover" && j["state"] == "In progress")
                .cloned()
        });
        match job {
            Some(j) if j["steps"].to_string().contains("phase 1") => {
                id = j["id"].to_string();
                true
            }
            _ => false,
        }
    });
    ok(srctl(&lab, &["job", "cancel", &id, "--force"]));
    let out = child.wait_with_output().expect("wait");
    assert!(!out.status.success());
    assert_eq!(
        show(&lab, "vm1")["state"],
        "Failover cancelled: the on-premises VM is inconsistent; run the failover again"
    );

    ok(srctl(&lab, &["lab", "resume", "mt-onprem"]));
    ok(srctl(&lab, &["failover", "vm1", "--sync", "full-download"]));
    assert_eq!(show(&lab, "vm1")["state"], "Failover completed");
    verify_equal(&lab, "vm1", "failback run again after a cancel");
    ok(srctl(&lab, &["commit", "vm1"]));
    wait_component(&lab, "vm1", "onprem", "connected");
    ok(srctl(&lab, &["reprotect", "vm1", "--wait"]));
    let v = show(&lab, "vm1");
    assert_eq!(v["state"], "Protected");
    assert_eq!(v["direction"], "forward");
}
