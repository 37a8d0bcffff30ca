//! Topology files: the documented example (two ESX hosts, machines with several disks, two
//! process servers, a Windows and a Linux master target) comes up as processes, is drawn by
//! `lab graph`, spreads its items over both process servers, and drills every machine
//! byte-exact; bad files are refused before anything starts, naming the file and the key.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/topologies/two-hosts.toml"
);

fn lab_up_t(dir: &Path, file: &str) -> std::process::Output {
    Command::new(SRCTL)
        .args(["lab", "up", "--dir"])
        .arg(dir)
        .args(["-t", file])
        .env_remove("FAILBACK_LAB")
        .output()
        .expect("srctl")
}

/// Stops the lab in its directory when dropped (a failed assertion included).
struct Down(std::path::PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = srctl(&self.0, &["lab", "down"]);
    }
}

#[test]
fn the_documented_example_comes_up_and_drills_every_machine_byte_exact() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("lab");
    ok(lab_up_t(&dir, EXAMPLE));
    let _down = Down(dir.clone());

    let graph = ok(srctl(&dir, &["lab", "graph"]));
    for name in ["sql1", "web2", "ps-2", "mt-lin", "azure-target", "vpn-link"] {
        assert!(graph.contains(name), "{name} missing from\n{graph}");
    }
    assert!(graph.starts_with("flowchart LR"), "{graph}");

    // On a running lab the drill takes every machine (or --only's); --machines sizes a new lab.
    let e = fails(srctl(&dir, &["drill", "--only", "sql1,nope"]));
    assert!(
        e.contains("--only: nope is not a connected on-premises machine")
            && e.contains("app1, sql1, web1, web2"),
        "{e}"
    );
    let e = fails(srctl(&dir, &["drill", "--machines", "2"]));
    assert!(e.contains("--machines sizes the lab a drill starts"), "{e}");
    assert_eq!(
        json(srctl(&dir, &["item", "list", "--json"]))
            .as_array()
            .map(Vec::len),
        Some(0),
        "a refused drill changes nothing"
    );

    let out = Command::new(SRCTL)
        .args(["--lab"])
        .arg(&dir)
        .args(["drill", "--rate", "1", "--json"])
        .output()
        .expect("drill");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(
        out.status.success() && report["ok"] == true,
        "drill failed: {report:#}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let drilled = report["machines"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(drilled, 4, "every machine drilled: {report:#}");

    // Enable chose the least loaded process server each time: both carried items.
    let items = json(srctl(&dir, &["item", "list", "--json"]));
    let used: std::collections::BTreeSet<&str> = items
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["process_server"].as_str())
        .collect();
    assert!(
        used.contains("ps-1") && used.contains("ps-2"),
        "enable spread the items: {used:?}"
    );

    // A Linux machine fails back through a Linux master target: the Windows one is refused,
    // with the OS named first, and nothing changes; without a choice the Linux one is taken.
    ok(srctl(&dir, &["failover", "web1"]));
    ok(srctl(&dir, &["commit", "web1"]));
    wait_component(&dir, "web1", "azure", "connected");
    let before = show(&dir, "web1");
    let jobs = json(srctl(&dir, &["job", "list", "--json"]))
        .as_array()
        .map(Vec::len);
    let e = fails(srctl(
        &dir,
        &[
            "reprotect",
            "web1",
            "--master-target",
            "mt-win",
            "--datastore",
            "ds-a",
        ],
    ));
    assert!(
        e.contains("runs Linux, but master target `mt-win` runs Windows"),
        "{e}"
    );
    assert_eq!(show(&dir, "web1")["id"], before["id"], "no new item");
    assert_eq!(show(&dir, "web1")["state"], "Failover committed");
    assert_eq!(
        json(srctl(&dir, &["job", "list", "--json"]))
            .as_array()
            .map(Vec::len),
        jobs,
        "a refused reprotect starts no job"
    );
    ok(srctl(&dir, &["reprotect", "web1"]));
    assert_eq!(show(&dir, "web1")["target"], "mt-lin");
}

#[test]
fn bad_topology_files_are_refused_before_anything_starts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let example = std::fs::read_to_string(EXAMPLE).expect("example");
    let cases = [
        (
            example.replace(
                "{ name = \"web1\", os = \"linux\", disks = [\"32MiB\"] }",
                "{ name = \"web1\", os = \"linux\", disks = [] }",
            ),
            "site[0].hosts[1].machines[0].disks",
        ),
        (
            example.replace("\"ps-1\", \"ps-2\"", "\"ps-1\", \"PS-1\""),
            "site[0].process_servers[1]",
        ),
        (
            example.replace(
                "hosts = [{ name = \"azure-compute\", datastores = [\"azure-storage\"] }]",
                "hosts = [{ name = \"azure-compute\", datastores = [\"azure-other\"] }]",
            ),
            "site[1].hosts[0].datastores",
        ),
        (
            example.replace("latency = \"20ms\"", "latency = \"20ms\"\nwhatever = 1"),
            "whatever",
        ),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let file = tmp.path().join(format!("bad-{i}.toml"));
        std::fs::write(&file, text).expect("write");
        let dir = tmp.path().join(format!("lab-{i}"));
        let out = lab_up_t(&dir, file.to_str().expect("utf-8"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {i} must be refused");
        assert!(
            err.contains(&file.display().to_string()) && err.contains(key),
            "case {i}: {err}"
        );
        assert!(
            !dir.join("lab.json").exists(),
            "case {i}: nothing may start"
        );
    }
    // A topology file and the default shape's flags together: refused.
    let out = Command::new(SRCTL)
        .args(["lab", "up", "--dir"])
        .arg(tmp.path().join("lab-flags"))
        .args(["-t", EXAMPLE, "--machines", "3"])
        .output()
        .expect("srctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cannot be used with"),
        "{err}"
    );
}

/// The newest job named `name`, as `job list --json` shows it.
fn newest_job(dir: &Path, name: &str) -> Value {
    json(srctl(dir, &["job", "list", "--json"]))
        .as_array()
        .expect("jobs")
        .iter()
        .filter(|j| j["name"] == name)
        .max_by_key(|j| j["id"].as_i64().unwrap_or(0))
        .cloned()
        .unwrap_or_else(|| panic!("no job `{name}`"))
}

fn step_names(job: &Value) -> Vec<String> {
    job["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter_map(|s| s["name"].as_str().map(str::to_string))
        .collect()
}

/// The items a process server holds routes for (its `routes.json`).
fn routes_of(dir: &Path, ps: &str) -> Value {
    std::fs::read(dir.join("data").join(ps).join("routes.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

#[test]
fn an_item_moves_between_process_servers_byte_exact_and_away_from_a_dead_one_with_a_resync() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("lab");
    ok(lab_up_t(&dir, EXAMPLE));
    let _down = Down(dir.clone());
    ok(srctl(&dir, &["workload", "start", "sql1", "--rate", "2"]));
    ok(srctl(
        &dir,
        &["item", "enable", "sql1", "--process-server", "ps-1"],
    ));
    protected_with_a_point(&dir, "sql1");
    let item = show(&dir, "sql1")["id"].as_str().expect("id").to_string();
    assert!(routes_of(&dir, "ps-1").get(&item).is_some());

    // Refused, nothing changed: the same process server, one of the other site, none.
    let e = fails(srctl(
        &dir,
        &["item", "switch-ps", "sql1", "--process-server", "ps-1"],
    ));
    assert!(e.contains("already replicates through `ps-1`"), "{e}");
    let e = fails(srctl(
        &dir,
        &["item", "switch-ps", "sql1", "--process-server", "ps-azure"],
    ));
    assert!(
        e.contains("switch to a process server of the same site"),
        "{e}"
    );
    let e = fails(srctl(
        &dir,
        &["item", "switch-ps", "sql1", "--process-server", "ps-9"],
    ));
    assert!(e.contains("no process server named `ps-9`"), "{e}");
    assert_eq!(show(&dir, "sql1")["process_server"], "ps-1");

    // Healthy: ps-1 forwards what it holds, ps-2 continues after it; writes go on throughout,
    // no resync, and the replica equals the source at a point taken after the switch.
    let switched_at = now_ms();
    ok(srctl(
        &dir,
        &["item", "switch-ps", "sql1", "--process-server", "ps-2"],
    ));
    let v = show(&dir, "sql1");
    assert_eq!(v["process_server"], "ps-2", "{v}");
    assert_eq!(v["state"], "Protected", "{v}");
    let job = newest_job(&dir, "Switch process server");
    assert_eq!(job["state"], "Succeeded", "{job}");
    assert_eq!(
        step_names(&job),
        [
            "Check prerequisites",
            "Drain ps-1",
            "Switch to ps-2",
            "Release ps-1"
        ],
        "{job}"
    );
    verify_point_after(&dir, "sql1", switched_at, "after the switch to ps-2");
    let agent_log = std::fs::read_to_string(dir.join("logs/esx-a.log")).unwrap_or_default();
    assert!(
        !agent_log.contains("resync required"),
        "a drained switch needs no resync:\n{agent_log}"
    );
    assert!(
        routes_of(&dir, "ps-1").get(&item).is_none(),
        "ps-1 forgot the item: {}",
        routes_of(&dir, "ps-1")
    );
    assert!(routes_of(&dir, "ps-2").get(&item).is_some());

    // ps-2 dies: the switch back to ps-1 goes on without it; what it had not forwarded is
    // lost, so the item resynchronizes by checksums, and the job says so.
    ok(srctl(&dir, &["lab", "kill", "ps-2"]));
    eventually("ps-2 not connected", 30, || {
        infra(&dir, "ps-2")["status"] != "connected"
    });
    let switched_at = now_ms();
    ok(srctl(
        &dir,
        &["item", "switch-ps", "sql1", "--process-server", "ps-1"],
    ));
    let v = show(&dir, "sql1");
    assert_eq!(v["process_server"], "ps-1", "{v}");
    assert_eq!(v["state"], "Protected", "{v}");
    let job = newest_job(&dir, "Switch process server");
    let steps = step_names(&job);
    assert!(
        !steps.iter().any(|s| s.starts_with("Drain"))
            && steps.iter().any(|s| s.starts_with("Resynchronization")),
        "{job}"
    );
    let agent_log = std::fs::read_to_string(dir.join("logs/esx-a.log")).unwrap_or_default();
    assert!(
        agent_log.contains("its cache was lost; resync required"),
        "the agent resynced:\n{agent_log}"
    );
    verify_point_after(
        &dir,
        "sql1",
        switched_at,
        "after the switch away from dead ps-2",
    );

    // ps-2 comes back holding a stale route: the CS has it forget the item.
    ok(srctl(&dir, &["lab", "restart", "ps-2"]));
    wait_component(&dir, "ps-2", "onprem", "connected");
    eventually("ps-2 forgets the item", 30, || {
        routes_of(&dir, "ps-2").get(&item).is_none()
    });
    verify_point_after(&dir, "sql1", now_ms(), "after ps-2 came back");
}
