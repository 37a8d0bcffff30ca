//! The lab's shape at scale: `lab up --machines N --hosts H --disks-per-machine D` spreads
//! machines and disks over hosts, a shape that can't run is refused before anything starts,
//! and a policy's verification mode decides whether points carry digests (`item verify`
//! proves a point with them, and says why it can't without).

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

#[test]
fn shapes_that_cannot_run_are_refused_before_anything_starts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cases: [(&[&str], &str); 6] = [
        (&["--machines", "0"], "--machines must be at least 1"),
        (&["--hosts", "0"], "--hosts must be at least 1"),
        (
            &["--disks-per-machine", "0"],
            "--disks-per-machine must be 1 to 60",
        ),
        (
            &["--disks-per-machine", "61"],
            "--disks-per-machine must be 1 to 60",
        ),
        (
            &["--disk-size", "1000B"],
            "--disk-size must be a positive whole number of 4 KiB",
        ),
        // 1,000 machines of 1 TiB: more than any disk here holds.
        (
            &["--machines", "1000", "--disk-size", "1024GiB"],
            "with their replicas, and the filesystem of",
        ),
    ];
    for (i, (args, want)) in cases.iter().enumerate() {
        let dir = tmp.path().join(format!("lab-{i}"));
        let out = Command::new(SRCTL)
            .args(["lab", "up", "--dir"])
            .arg(&dir)
            .args(*args)
            .env_remove("FAILBACK_LAB")
            .output()
            .expect("srctl");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must be refused");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!dir.exists(), "{args:?}: nothing may be created");
    }
}

/// The disks `infra list` shows for `machine`.
fn disks_of(lab: &std::path::Path, machine: &str) -> Vec<Value> {
    infra(lab, machine)["disks"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn machines_and_disks_spread_over_hosts_and_verification_is_a_policy_setting() {
    let lab = Lab::up(&[
        "--machines",
        "5",
        "--hosts",
        "2",
        "--disks-per-machine",
        "3",
        "--disk-size",
        "1MiB",
    ]);
    let dir = &lab.dir;
    for i in 1..=5 {
        let machine = format!("vm{i}");
        let row = infra(dir, &machine);
        let host = if i % 2 == 1 { "esx-1" } else { "esx-2" };
        assert_eq!(row["host"], host, "{machine}: {row}");
        let disks = disks_of(dir, &machine);
        assert_eq!(disks.len(), 3, "{machine}: {disks:?}");
    }

    // A policy without digests, for scale; the default one keeps them.
    ok(srctl(
        dir,
        &["policy", "create", "nodigests", "--verification", "off"],
    ));
    let policies = json(srctl(dir, &["policy", "list", "--json"]));
    let mode = |name: &str| {
        policies
            .as_array()
            .and_then(|a| a.iter().find(|p| p["name"] == name))
            .map(|p| p["verification"].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(mode("default"), "digests", "{policies}");
    assert_eq!(mode("nodigests"), "off", "{policies}");
    assert_eq!(mode("nodigests-failback"), "off", "{policies}");

    ok(srctl(
        dir,
        &["item", "enable", "vm1", "--policy", "nodigests"],
    ));
    ok(srctl(dir, &["item", "enable", "vm2"]));
    protected_with_a_point(dir, "vm1");
    protected_with_a_point(dir, "vm2");
    ok(srctl(dir, &["workload", "start", "vm1", "--rate", "0.5"]));
    ok(srctl(dir, &["workload", "start", "vm2", "--rate", "0.5"]));
    let after = now_ms();
    verify_point_after(dir, "vm2", after, "default policy");
    let mut point = String::new();
    eventually(
        "a point of vm1 after the workload started",
        60,
        || match point_after(&show(dir, "vm1"), after) {
            Some(p) => {
                point = p;
                true
            }
            None => false,
        },
    );
    let err = fails(srctl(dir, &["item", "verify", "vm1", "--point", &point]));
    assert!(
        err.contains("carries no source digests") && err.contains("--verification digests"),
        "{err}"
    );
}

/// Whether `machine`'s item shows an error starting with `prefix` and containing `part`.
fn shows_error(dir: &std::path::Path, machine: &str, prefix: &str, part: &str) -> bool {
    show(dir, machine)["health_errors"]
        .as_array()
        .is_some_and(|e| {
            e.iter().any(|e| {
                e.as_str()
                    .is_some_and(|e| e.starts_with(prefix) && e.contains(part))
            })
        })
}

/// A host's `replication_budget` bounds the replication memory of all its machines together:
/// with the process server stopped and both machines writing, writes wait once the budget is
/// used up, the items say why (ASR's high-churn warning 78188), and once the process server
/// is back everything written reaches the target (a later point verifies byte-exact) and the
/// warning goes.
#[test]
fn a_host_budget_throttles_writes_and_the_items_say_so() {
    let lab = Lab::up(&["--machines", "2", "--disk-size", "32MiB"]);
    let dir = &lab.dir;
    let config = dir.join("config/esx-1.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, format!("replication_budget = \"1 MiB\"\n{text}")).expect("config");
    ok(srctl(dir, &["lab", "restart", "esx-1"]));
    wait_component(dir, "vm1", "onprem", "connected");
    wait_component(dir, "vm2", "onprem", "connected");
    for vm in ["vm1", "vm2"] {
        ok(srctl(dir, &["item", "enable", vm]));
    }
    protected_with_a_point(dir, "vm1");
    protected_with_a_point(dir, "vm2");

    ok(srctl(dir, &["lab", "pause", "ps-onprem"]));
    for vm in ["vm1", "vm2"] {
        ok(srctl(dir, &["workload", "start", vm, "--rate", "2"]));
    }
    let budget =
        "its host's replication memory for all machines (1 MiB, `replication_budget`) is used up";
    eventually("a 78188 warning naming the host's budget", 90, || {
        ["vm1", "vm2"].iter().any(|vm| {
            shows_error(
                dir,
                vm,
                &format!("78188: writes of {vm} are throttled"),
                budget,
            )
        })
    });

    ok(srctl(dir, &["lab", "resume", "ps-onprem"]));
    for vm in ["vm1", "vm2"] {
        ok(srctl(dir, &["workload", "stop", vm]));
    }
    let after = now_ms();
    for vm in ["vm1", "vm2"] {
        verify_point_after(dir, vm, after, "after the throttled writes");
    }
    eventually("the throttle warnings gone", 60, || {
        ["vm1", "vm2"]
            .iter()
            .all(|vm| !shows_error(dir, vm, "78188", ""))
    });
}
