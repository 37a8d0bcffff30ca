//! Jobs owned by the configuration server, through the real lab processes: a job outlives the
//! `srctl` that started it (killed with SIGKILL); a CS restart resumes the jobs that are safe
//! to run again and fails a failback cut short in its in-place write as inconsistent; a
//! cancel in that phase does the same; running the failback again completes it byte-exact; a
//! job whose task panics fails with a reason and leaves no half-made item; `item disable`
//! removes an item from every component.
//!
//! The CS's test hooks stop a job at a named step (`FBL_CS__HOLD_AT_STEP`: the job waits
//! until `srctl job resume`) or panic there (`FBL_CS__PANIC_AT_STEP`); `lab restart cs`
//! started from this test's environment runs the CS without them.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

/// The job named `name` in state `state` whose running step starts with `step`: its id.
fn held_job(lab: &Path, name: &str, step: &str) -> String {
    let mut id = String::new();
    eventually(&format!("{name} held at `{step}`"), 60, || {
        let jobs = json(srctl(lab, &["job", "list", "--json"]));
        let found = jobs.as_array().and_then(|a| {
            a.iter()
                .filter(|j| j["name"] == name && j["state"] == "Waiting")
                .find(|j| {
                    j["steps"].as_array().is_some_and(|s| {
                        s.iter().any(|s| {
                            s["state"] == "Waiting"
                                && s["name"].as_str().is_some_and(|n| n.starts_with(step))
                        })
                    })
                })
                .cloned()
        });
        match found {
            Some(j) => {
                id = j["id"].to_string();
                true
            }
            None => false,
        }
    });
    id
}

fn job(lab: &Path, id: &str) -> Value {
    json(srctl(lab, &["job", "show", id, "--json"]))
}

fn verify_equal(lab: &Path, machine: &str, what: &str) {
    let v = json(srctl(lab, &["item", "verify", machine, "--json"]));
    assert_eq!(v["equal"], true, "{what}: {v}");
}

#[test]
fn a_failover_goes_on_when_srctl_is_killed_and_can_be_watched_from_another_shell() {
    let lab_handle = Lab::up_with_env(
        &["--disk-size", "8MiB", "--machines", "1"],
        &[("FBL_CS__HOLD_AT_STEP", "Create the disks")],
    );
    let lab = lab_handle.dir.clone();
    ok(srctl(&lab, &["workload", "start", "vm1", "--rate", "1"]));
    ok(srctl(&lab, &["item", "enable", "vm1"]));
    protected_with_a_point(&lab, "vm1");

    let mut client = spawn_srctl(&lab, &["failover", "vm1", "--point", "latest-processed"]);
    let id = held_job(&lab, "Failover", "Create the disks");
    assert!(
        client.try_wait().expect("try_wait").is_none(),
        "srctl was waiting for the job when it was killed"
    );
    client.kill().expect("SIGKILL srctl");
    let _ = client.wait();
    assert_eq!(
        job(&lab, &id)["state"],
        "Waiting",
        "the job outlives its client"
    );
    assert_eq!(show(&lab, "vm1")["state"], "Failover in progress");

    // Another shell lets it go on and follows it to the end.
    let e = fails(srctl(&lab, &["job", "resume", "1"]));
    assert!(e.contains("is not waiting"), "{e}");
    ok(srctl(&lab, &["job", "resume", &id]));
    let out = ok(srctl(&lab, &["job", "watch", &id]));
    assert!(out.contains("Start the VM on azure-compute"), "{out}");
    let j = job(&lab, &id);
    assert_eq!(j["state"], "Succeeded", "{j}");
    let steps = j["steps"].as_array().expect("steps");
    assert!(
        steps.iter().all(
            |s| s["state"] == "Succeeded" && s["ended_ms"].as_i64() >= s["started_ms"].as_i64()
        ),
        "every step ended, with its times: {j}"
    );
    assert_eq!(show(&lab, "vm1")["state"], "Failover completed");
    verify_equal(&lab, "vm1", "failover that outlived its client");

    // --no-wait prints the job and returns; the job completes without anyone watching.
    let out = ok(srctl(&lab, &["commit", "vm1", "--no-wait"]));
    assert!(out.contains("follow it with `srctl job watch"), "{out}");
    eventually("commit done", 30, || {
        show(&lab, "vm1")["state"] == "Failover committed"
    });
}

#[test]
fn a_restart_or_cancel_during_the_in_place_write_leaves_the_vm_inconsistent_and_a_rerun_completes()
{
    let lab_handle = Lab::up_with_env(
        &["--disk-size", "8MiB", "--machines", "1"],
        &[("FBL_CS__HOLD_AT_STEP", "Start replication")],
    );
    let lab = lab_handle.dir.clone();
    ok(srctl(&lab, &["workload", "start", "vm1", "--rate", "1"]));

    // Enable, held before the agent starts; a CS restart (without the hook) resumes the job.
    let out = ok(srctl(&lab, &["item", "enable", "vm1", "--no-wait"]));
    assert!(out.contains("started"), "{out}");
    let id = held_job(&lab, "Enable protection", "Start replication");
    ok(srctl(&lab, &["lab", "restart", "cs"]));
    eventually("the resumed enable job succeeded", 90, || {
        srctl(&lab, &["job", "show", &id, "--json"])
            .status
            .success()
            && job(&lab, &id)["state"] == "Succeeded"
    });
    protected_with_a_point(&lab, "vm1");
    verify_equal(&lab, "vm1", "replication enabled by a resumed job");

    // Stage 1 and 2: failover to Azure, commit, reprotect back.
    ok(srctl(
        &lab,
        &["failover", "vm1", "--point", "latest-processed"],
    ));
    ok(srctl(&lab, &["commit", "vm1"]));
    wait_component(&lab, "vm1", "azure", "connected");
    ok(srctl(&lab, &["reprotect", "vm1"]));
    assert_eq!(show(&lab, "vm1")["state"], "Protected");
    ok(srctl(&lab, &["workload", "start", "vm1", "--rate", "1"]));
    protected_with_a_point(&lab, "vm1");

    // The failback's phase 2 (the in-place write) is held; the CS restarts under it.
    let hold = [("FBL_CS__HOLD_AT_STEP", "Complete failover")];
    ok(srctl_env(&lab, &["lab", "restart", "cs"], &hold));
    for c in ["vm1", "mt-onprem", "esx-1", "ps-azure"] {
        eventually(&format!("{c} connected"), 60, || {
            infra(&lab, c)["status"] == "connected"
        });
    }
    let inconsistent =
        "Failover cancelled: the on-premises VM is inconsistent; run the failover again";
    ok(srctl(&lab, &["failover", "vm1", "--no-wait"]));
    let id = held_job(&lab, "Failover", "Complete failover");
    ok(srctl_env(&lab, &["lab", "restart", "cs"], &hold));
    eventually("the interrupted failback failed", 60, || {
        srctl(&lab, &["job", "show", &id, "--json"])
            .status
            .success()
            && job(&lab, &id)["state"] == "Failed"
    });
    let j = job(&lab, &id);
    assert!(
        j["error"].as_str().unwrap_or("").contains("restarted"),
        "{j}"
    );
    assert_eq!(show(&lab, "vm1")["state"], inconsistent);

    // Run again, held at phase 2 once more, and cancelled there: inconsistent again. The CS
    // restarted: components reconnect in any order, and the failback needs these.
    wait_component(&lab, "vm1", "azure", "connected");
    for c in ["mt-onprem", "esx-1", "ps-azure"] {
        eventually(&format!("{c} connected again"), 60, || {
            infra(&lab, c)["status"] == "connected"
        });
    }
    ok(srctl(&lab, &["failover", "vm1", "--no-wait"]));
    let id = held_job(&lab, "Failover", "Complete failover");
    let e = fails(srctl(&lab, &["job", "cancel", &id]));
    assert!(e.contains("don't cancel a running failover"), "{e}");
    ok(srctl(&lab, &["job", "cancel", &id, "--force"]));
    eventually("the cancelled failback failed", 30, || {
        job(&lab, &id)["state"] == "Failed"
    });
    assert_eq!(show(&lab, "vm1")["state"], inconsistent);

    // The third run goes through: the on-premises disks equal the Azure VM's at the point.
    ok(srctl(&lab, &["failover", "vm1", "--no-wait"]));
    let id = held_job(&lab, "Failover", "Complete failover");
    ok(srctl(&lab, &["job", "resume", &id]));
    ok(srctl(&lab, &["job", "watch", &id]));
    assert_eq!(show(&lab, "vm1")["state"], "Failover completed");
    verify_equal(
        &lab,
        "vm1",
        "failback run again after a restart and a cancel",
    );
}

#[test]
fn a_panicking_job_fails_with_a_reason_and_disable_removes_an_item_everywhere() {
    let lab_handle = Lab::up_with_env(
        &["--disk-size", "8MiB", "--machines", "1"],
        &[("FBL_CS__PANIC_AT_STEP", "Assign the process server")],
    );
    let lab = lab_handle.dir.clone();
    let e = fails(srctl(&lab, &["item", "enable", "vm1"]));
    assert!(e.contains("panicked"), "{e}");
    let jobs = json(srctl(&lab, &["job", "list", "--json"]));
    let j = &jobs.as_array().expect("jobs")[0];
    assert_eq!(j["state"], "Failed", "{j}");
    assert!(
        j["error"].as_str().unwrap_or("").contains("internal error"),
        "{j}"
    );
    assert_eq!(show(&lab, "vm1"), Value::Null, "no half-made item is left");

    // Without the hook, enabling works; disabling removes the item from every component.
    ok(srctl(&lab, &["lab", "restart", "cs"]));
    eventually("the CS back", 30, || {
        srctl(&lab, &["job", "list", "--json"]).status.success()
    });
    // Components reconnect to the restarted CS in any order; enable needs these.
    for c in ["vm1", "ps-onprem", "azure-target"] {
        wait_component(
            &lab,
            c,
            if c == "azure-target" {
                "azure"
            } else {
                "onprem"
            },
            "connected",
        );
    }
    ok(srctl(&lab, &["workload", "start", "vm1", "--rate", "1"]));
    ok(srctl(&lab, &["item", "enable", "vm1"]));
    protected_with_a_point(&lab, "vm1");
    let id = show(&lab, "vm1")["id"].as_str().expect("id").to_string();
    let replica = lab.join("datastores/azure-storage/replicas").join(&id);
    let cache = lab.join("data/ps-onprem/cache").join(&id);
    assert!(
        replica.exists() && cache.exists(),
        "the item is on the target and the PS"
    );
    let e = fails(srctl(&lab, &["item", "disable", "vm9"]));
    assert!(e.contains("has no replicated item"), "{e}");
    let out = ok(srctl(&lab, &["item", "disable", "vm1"]));
    assert!(
        out.contains("Remove the route and cache from ps-onprem"),
        "{out}"
    );
    assert_eq!(show(&lab, "vm1"), Value::Null);
    assert!(
        !replica.exists(),
        "the replica is deleted: {}",
        replica.display()
    );
    assert!(
        !cache.exists(),
        "the PS cache is dropped: {}",
        cache.display()
    );
    // The agent stopped: the item's replication does not come back.
    ok(srctl(&lab, &["item", "enable", "vm1"]));
    protected_with_a_point(&lab, "vm1");
    assert_ne!(show(&lab, "vm1")["id"], id.as_str(), "a new item");
    verify_equal(&lab, "vm1", "enabled again after disable");
}

#[test]
fn recovery_plans_list_remove_delete_wait_at_manual_actions_and_run_scripts() {
    let lab_handle = Lab::up(&["--disk-size", "8MiB", "--machines", "3"]);
    let lab = lab_handle.dir.clone();
    for vm in ["vm1", "vm2"] {
        ok(srctl(&lab, &["item", "enable", vm, "--no-wait"]));
    }
    // vm3's policy makes no point for an hour.
    ok(srctl(
        &lab,
        &[
            "policy",
            "create",
            "slow",
            "--crash-interval",
            "1h",
            "--app-interval",
            "0s",
            "--retention",
            "2h",
            "--rpo-threshold",
            "2h",
        ],
    ));
    ok(srctl(&lab, &["item", "enable", "vm3", "--policy", "slow"]));
    for vm in ["vm1", "vm2"] {
        protected_with_a_point(&lab, vm);
    }
    ok(srctl(&lab, &["plan", "create", "p1"]));
    ok(srctl(&lab, &["plan", "add", "p1", "vm1", "--group", "1"]));
    ok(srctl(&lab, &["plan", "add", "p1", "vm2", "--group", "2"]));
    ok(srctl(&lab, &["plan", "add", "p1", "vm3", "--group", "2"]));

    // A member without a point: refused before any group moves.
    let jobs_before = json(srctl(&lab, &["job", "list", "--json"]));
    let e = fails(srctl(&lab, &["plan", "test-failover", "p1"]));
    assert!(
        e.contains("vm3 (no recovery point)") && e.contains("nothing was changed"),
        "{e}"
    );
    assert_eq!(json(srctl(&lab, &["job", "list", "--json"])), jobs_before);
    assert_eq!(show(&lab, "vm1")["state"], "Protected");
    ok(srctl(&lab, &["plan", "remove", "p1", "vm3"]));
    let plan = json(srctl(&lab, &["plan", "show", "p1", "--json"]));
    assert_eq!(
        plan["members"].as_array().map(|a| a.len()),
        Some(2),
        "{plan}"
    );
    let e = fails(srctl(&lab, &["plan", "remove", "p1", "vm3"]));
    assert!(e.contains("is not in recovery plan `p1`"), "{e}");

    // A manual action between the groups: the plan job waits there until resumed.
    ok(srctl(
        &lab,
        &[
            "plan",
            "add-action",
            "p1",
            "--after-group",
            "1",
            "--manual",
            "check vm1-Test",
        ],
    ));
    ok(srctl(&lab, &["plan", "test-failover", "p1", "--no-wait"]));
    let id = held_job(&lab, "Plan test failover p1", "Manual action after group 1");
    assert_eq!(show(&lab, "vm1")["state"], "Test failover completed");
    assert_eq!(show(&lab, "vm2")["state"], "Protected", "group 2 waits");
    ok(srctl(&lab, &["job", "resume", &id]));
    ok(srctl(&lab, &["job", "watch", &id]));
    assert_eq!(show(&lab, "vm2")["state"], "Test failover completed");
    ok(srctl(&lab, &["plan", "test-failover-cleanup", "p1"]));

    // A failing script fails the plan job with its exit status and last lines.
    let script = lab.join("after-group-1.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"plan=$FBL_PLAN group=$FBL_GROUP direction=$FBL_DIRECTION\"\necho 'DNS not switched' >&2\nexit 3\n",
    )
    .expect("script");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let e = fails(srctl(
        &lab,
        &[
            "plan",
            "add-action",
            "p1",
            "--after-group",
            "1",
            "--script",
            "relative.sh",
        ],
    ));
    assert!(e.contains("must be an absolute path"), "{e}");
    ok(srctl(
        &lab,
        &[
            "plan",
            "add-action",
            "p1",
            "--after-group",
            "1",
            "--script",
            script.to_str().expect("utf-8"),
        ],
    ));
    ok(srctl(&lab, &["plan", "test-failover", "p1", "--no-wait"]));
    let id = held_job(&lab, "Plan test failover p1", "Manual action after group 1");
    ok(srctl(&lab, &["job", "resume", &id]));
    let e = fails(srctl(&lab, &["job", "watch", &id]));
    assert!(
        e.contains("exit status 3")
            && e.contains("plan=p1 group=1 direction=forward")
            && e.contains("DNS not switched"),
        "{e}"
    );
    assert_eq!(
        show(&lab, "vm2")["state"],
        "Protected",
        "later groups not started"
    );
    ok(srctl(&lab, &["plan", "test-failover-cleanup", "p1"]));

    // list and delete.
    let plans = json(srctl(&lab, &["plan", "list", "--json"]));
    assert_eq!(plans.as_array().map(|a| a.len()), Some(1), "{plans}");
    assert_eq!(plans[0]["actions"].as_array().map(|a| a.len()), Some(2));
    ok(srctl(&lab, &["plan", "delete", "p1"]));
    let plans = json(srctl(&lab, &["plan", "list", "--json"]));
    assert_eq!(plans, serde_json::json!([]));
    let e = fails(srctl(&lab, &["plan", "show", "p1"]));
    assert!(e.contains("no recovery plan `p1`"), "{e}");
    assert_eq!(
        show(&lab, "vm1")["state"],
        "Protected",
        "members stay protected"
    );
}

/// Restarts the CS with the test hook holding jobs at `next` (or no hook).
fn restart_cs(lab: &Path, next: Option<&str>) {
    match next {
        Some(step) => ok(srctl_env(
            lab,
            &["lab", "restart", "cs"],
            &[("FBL_CS__HOLD_AT_STEP", step)],
        )),
        None => ok(srctl(lab, &["lab", "restart", "cs"])),
    };
    eventually("the CS back", 30, || {
        srctl(lab, &["job", "list", "--json"]).status.success()
    });
    for c in [
        "ps-onprem",
        "mt-onprem",
        "esx-1",
        "azure-target",
        "ps-azure",
        "azure-compute",
    ] {
        eventually(&format!("{c} connected again"), 60, || {
            infra(lab, c)["status"] == "connected"
        });
    }
}

/// Waits until job `id` ended; returns it.
fn ended(lab: &Path, id: &str) -> Value {
    let mut last = Value::Null;
    eventually(&format!("job {id} ended"), 90, || {
        let out = srctl(lab, &["job", "show", id, "--json"]);
        if !out.status.success() {
            return false;
        }
        last = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        last["state"] == "Succeeded" || last["state"] == "Failed"
    });
    last
}

#[test]
fn a_cs_restart_resumes_each_idempotent_job_kind_and_fails_the_others_for_a_rerun() {
    let lab_handle = Lab::up_with_env(
        &["--disk-size", "8MiB", "--machines", "2"],
        &[("FBL_CS__HOLD_AT_STEP", "Compare checksums")],
    );
    let lab = lab_handle.dir.clone();
    for vm in ["vm1", "vm2"] {
        ok(srctl(&lab, &["workload", "start", vm, "--rate", "1"]));
        ok(srctl(&lab, &["item", "enable", vm]));
        protected_with_a_point(&lab, vm);
    }
    let resumed = |lab: &Path, id: &str, what: &str| {
        let j = ended(lab, id);
        assert_eq!(
            j["state"], "Succeeded",
            "{what} resumed after the restart: {j}"
        );
    };

    // Resync: resumed.
    ok(srctl(&lab, &["item", "resync", "vm1", "--no-wait"]));
    let id = held_job(&lab, "Resynchronize", "Compare checksums");
    restart_cs(&lab, Some("Create the disks"));
    resumed(&lab, &id, "resync");
    assert_eq!(show(&lab, "vm1")["state"], "Protected");

    // Test failover: failed with a reason, the item back where a re-run starts.
    ok(srctl(&lab, &["test-failover", "vm1", "--no-wait"]));
    let id = held_job(&lab, "Test failover", "Create the disks");
    restart_cs(&lab, Some("Remove vm1-Test"));
    let j = ended(&lab, &id);
    assert_eq!(j["state"], "Failed", "{j}");
    assert!(
        j["error"].as_str().unwrap_or("").contains("restarted"),
        "{j}"
    );
    assert_eq!(show(&lab, "vm1")["state"], "Protected");
    ok(srctl(&lab, &["test-failover", "vm1"]));
    assert_eq!(show(&lab, "vm1")["state"], "Test failover completed");

    // Cleanup: resumed.
    ok(srctl(&lab, &["test-failover-cleanup", "vm1", "--no-wait"]));
    let id = held_job(&lab, "Cleanup test failover", "Remove vm1-Test");
    restart_cs(&lab, Some("Delete recovery points"));
    resumed(&lab, &id, "cleanup");
    assert_eq!(show(&lab, "vm1")["state"], "Protected");
    assert_eq!(infra(&lab, "vm1-Test"), Value::Null);

    // Commit: resumed.
    ok(srctl(
        &lab,
        &["failover", "vm1", "--point", "latest-processed"],
    ));
    ok(srctl(&lab, &["commit", "vm1", "--no-wait"]));
    let id = held_job(&lab, "Commit", "Delete recovery points");
    restart_cs(&lab, Some("Start replication"));
    resumed(&lab, &id, "commit");
    assert_eq!(show(&lab, "vm1")["state"], "Failover committed");

    // Reprotect: resumed, and the item ends Protected in the reverse direction.
    wait_component(&lab, "vm1", "azure", "connected");
    ok(srctl(&lab, &["reprotect", "vm1", "--no-wait"]));
    let id = held_job(&lab, "Reprotect", "Start replication");
    restart_cs(&lab, Some("Delete the replica"));
    resumed(&lab, &id, "reprotect");
    let v = show(&lab, "vm1");
    assert_eq!(
        (v["state"].clone(), v["direction"].clone()),
        ("Protected".into(), "reverse".into())
    );

    // Disable: resumed; nothing of the item is left.
    ok(srctl(&lab, &["item", "disable", "vm1", "--no-wait"]));
    let id = held_job(&lab, "Disable replication", "Delete the replica");
    restart_cs(&lab, Some("Group 1"));
    resumed(&lab, &id, "disable");
    assert_eq!(show(&lab, "vm1"), Value::Null);

    // A plan failover: failed with a reason; run again, it completes.
    ok(srctl(&lab, &["plan", "create", "p"]));
    ok(srctl(&lab, &["plan", "add", "p", "vm2"]));
    ok(srctl(
        &lab,
        &[
            "plan",
            "failover",
            "p",
            "--point",
            "latest-processed",
            "--no-wait",
        ],
    ));
    let id = held_job(&lab, "Plan failover p", "Group 1");
    restart_cs(&lab, None);
    let j = ended(&lab, &id);
    assert_eq!(j["state"], "Failed", "{j}");
    assert!(
        j["error"].as_str().unwrap_or("").contains("restarted"),
        "{j}"
    );
    assert_eq!(show(&lab, "vm2")["state"], "Protected");
    ok(srctl(
        &lab,
        &["plan", "failover", "p", "--point", "latest-processed"],
    ));
    assert_eq!(show(&lab, "vm2")["state"], "Failover completed");
    verify_equal(&lab, "vm2", "plan failover run again after a restart");
}
