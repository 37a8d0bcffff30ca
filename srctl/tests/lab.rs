//! The local lab as real processes, driven through the real `srctl` binary: everything
//! registers; link down cuts exactly the azure side off and link up restores it; components
//! come back after a crash and after a CS restart without enrolling again; `lab down`
//! leaves nothing running; commands against a stopped or missing lab fail clearly.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{SRCTL, ok, srctl};
use serde_json::Value;

fn infra(lab: &Path) -> Vec<Value> {
    let out = srctl(lab, &["infra", "list", "--json"]);
    if !out.status.success() {
        return Vec::new();
    }
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn status(rows: &[Value], name: &str) -> String {
    rows.iter()
        .find(|r| r["name"] == name)
        .and_then(|r| r["status"].as_str())
        .unwrap_or("absent")
        .to_string()
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

const AZURE: [&str; 3] = ["azure-target", "ps-azure", "azure-compute"];
const ONPREM: [&str; 6] = ["cs", "ps-onprem", "mt-onprem", "esx-1", "vm1", "vm2"];

fn pids(lab: &Path) -> Vec<u32> {
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(lab.join("lab.json")).expect("lab.json"))
            .expect("json");
    state["procs"]
        .as_array()
        .expect("procs")
        .iter()
        .filter_map(|p| p["pid"].as_u64().map(|p| p as u32))
        .collect()
}

/// Stops the lab even if an assertion fails midway.
struct Guard<'a>(&'a Path);
impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let _ = srctl(self.0, &["lab", "down"]);
    }
}

#[test]
fn lab_registers_survives_faults_and_stops_cleanly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let lab = tmp.path().join("lab");
    let out = ok(Command::new(SRCTL)
        .args(["lab", "up", "--dir"])
        .arg(&lab)
        .args(["--disk-size", "8MiB"])
        .output()
        .expect("lab up"));
    let _guard = Guard(&lab);
    assert!(
        out.contains("every component and machine registered"),
        "{out}"
    );

    // Everything registered, with the fields the JSON promises; hosts list machines.
    let rows = infra(&lab);
    for name in ONPREM.iter().chain(AZURE.iter()) {
        assert_eq!(status(&rows, name), "connected", "{name}: {rows:?}");
    }
    for key in ["name", "role", "site", "address", "version", "status"] {
        assert!(rows.iter().all(|r| r.get(key).is_some()), "missing {key}");
    }
    let esx = rows.iter().find(|r| r["name"] == "esx-1").expect("esx-1");
    assert_eq!(esx["machines"], serde_json::json!(["vm1", "vm2"]));
    assert_eq!(esx["datastores"][0]["name"], "ds-onprem");
    let vm1 = rows.iter().find(|r| r["name"] == "vm1").expect("vm1");
    assert_eq!(vm1["disks"][0]["size_bytes"], 8 << 20);
    let ps_azure = rows
        .iter()
        .find(|r| r["name"] == "ps-azure")
        .expect("ps-azure");
    assert_eq!(ps_azure["site"], "azure");

    // The azure side reaches the CS only through the link: its bytes were counted.
    let link: Value =
        serde_json::from_str(&ok(srctl(&lab, &["link", "status", "--json"]))).expect("json");
    assert!(
        link["bytes_azure_to_onprem"].as_u64().unwrap_or(0) > 0,
        "{link}"
    );

    // Link down: the azure side is cut off, onprem is not.
    ok(srctl(&lab, &["link", "down"]));
    eventually("azure side not connected", || {
        let rows = infra(&lab);
        AZURE.iter().all(|n| status(&rows, n) == "not connected")
    });
    let rows = infra(&lab);
    for name in ONPREM {
        assert_eq!(
            status(&rows, name),
            "connected",
            "{name} must stay connected"
        );
    }
    ok(srctl(&lab, &["link", "up"]));
    eventually("azure side connected again", || {
        let rows = infra(&lab);
        AZURE.iter().all(|n| status(&rows, n) == "connected")
    });

    // A crashed component shows "not connected"; restarted, it reconnects without enrolling.
    let cert = lab.join("data/ps-azure/identity/cert.pem");
    let before = std::fs::read_to_string(&cert).expect("cert");
    ok(srctl(&lab, &["lab", "kill", "ps-azure"]));
    eventually("ps-azure not connected", || {
        status(&infra(&lab), "ps-azure") == "not connected"
    });
    ok(srctl(&lab, &["lab", "restart", "ps-azure"]));
    eventually("ps-azure connected", || {
        status(&infra(&lab), "ps-azure") == "connected"
    });
    assert_eq!(
        before,
        std::fs::read_to_string(&cert).expect("cert"),
        "no new enrollment"
    );

    // The CS restarts with its database: everyone reconnects by itself.
    ok(srctl(&lab, &["lab", "restart", "cs"]));
    eventually("everyone reconnected after a CS restart", || {
        let rows = infra(&lab);
        ONPREM
            .iter()
            .chain(AZURE.iter())
            .all(|n| status(&rows, n) == "connected")
    });

    // Down: nothing left running, and commands say the lab isn't running.
    let running = pids(&lab);
    assert_eq!(running.len(), 8);
    ok(srctl(&lab, &["lab", "down"]));
    for pid in running {
        assert!(
            !srctl::lab::alive(pid),
            "pid {pid} still running after lab down"
        );
    }
    let out = srctl(&lab, &["infra", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not answering") && err.contains("is the lab running"),
        "{err}"
    );
}

#[test]
fn commands_without_a_lab_say_how_to_start_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = srctl(&tmp.path().join("nothing-here"), &["infra", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no lab in") && err.contains("srctl lab up --dir"),
        "{err}"
    );

    let out = Command::new(SRCTL)
        .args(["infra", "list"])
        .env_remove("FAILBACK_LAB")
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pass --lab DIR or set FAILBACK_LAB"));
}
