//! The shipped failure scenarios (deploy/scenarios/*.toml) through the real `srctl drill
//! --scenario`: each ends ok with zero integrity mismatches, every fault injected and undone,
//! and replication healthy again afterwards; health shows what the fault did. A scenario with
//! an unknown stage, component or action is refused before anything starts.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::SRCTL;
use serde_json::Value;

fn scenario(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/scenarios")
        .join(format!("{name}.toml"))
}

/// Runs the drill with a shipped scenario; asserts it passed; returns its only fault.
fn drill(name: &str) -> Value {
    let out = Command::new(SRCTL)
        .args(["drill", "--json", "--scenario"])
        .arg(scenario(name))
        .env_remove("FAILBACK_LAB")
        .output()
        .expect("drill");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(
        out.status.success() && report["ok"] == true,
        "{name}: {report:#}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report["integrity_mismatches"], 0, "{report:#}");
    assert_eq!(report["scenario"], name);
    let faults = report["faults"].as_array().expect("faults");
    assert_eq!(faults.len(), 1, "{report:#}");
    let f = faults[0].clone();
    assert!(f["injected_at_s"].is_number(), "{name}: not injected: {f}");
    assert!(f.get("error").is_none(), "{name}: {f}");
    assert!(
        f["healthy_after_s"].as_f64().is_some_and(|s| s < 120.0),
        "{name}: replication not healthy again: {f}"
    );
    f
}

fn saw(f: &Value, what: &str) -> bool {
    f["errors_seen"]
        .as_array()
        .is_some_and(|e| e.iter().any(|e| e.as_str().unwrap_or("").contains(what)))
}

#[test]
fn vpn_down_during_reprotect() {
    let f = drill("vpn-down-during-reprotect");
    assert!(f["undone_at_s"].is_number(), "{f}");
    // The Azure side loses the CS: no heartbeat from the Azure VM or ps-azure.
    assert!(saw(&f, "78174") || saw(&f, "806"), "{f}");
}

#[test]
fn ps_azure_killed_mid_reprotect() {
    let f = drill("ps-azure-killed-mid-reprotect");
    assert!(
        saw(&f, "806: no heartbeat from process server ps-azure"),
        "{f}"
    );
}

#[test]
fn mt_onprem_killed_mid_failback() {
    let f = drill("mt-onprem-killed-mid-failback");
    assert!(f["undone_at_s"].is_number(), "{f}");
}

#[test]
fn cs_restart_during_reprotect() {
    drill("cs-restart-during-reprotect");
}

#[test]
fn slow_link_for_the_whole_failback() {
    let f = drill("slow-link-failback");
    assert!(f["undone_at_s"].is_number(), "{f}");
}

#[test]
fn ps_cache_driven_to_throttling() {
    let f = drill("ps-cache-throttled");
    assert!(saw(&f, "agents throttled"), "{f}");
}

#[test]
fn a_wrong_scenario_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (body, expect) in [
        (
            "[[fault]]\nstage = 'reprotect'\naction = 'kill'\ntarget = 'cs'\n",
            "unknown stage `reprotect`",
        ),
        (
            "[[fault]]\nstage = 'failback'\naction = 'kill'\ntarget = 'ps-mars'\n",
            "unknown component `ps-mars`",
        ),
        (
            "[[fault]]\nstage = 'failback'\naction = 'explode'\n",
            "unknown action `explode`",
        ),
    ] {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, body).expect("write");
        let started = Instant::now();
        let out = Command::new(SRCTL)
            .args(["drill", "--scenario"])
            .arg(&file)
            .env_remove("FAILBACK_LAB")
            .output()
            .expect("drill");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{body}");
        assert!(err.contains(expect), "{err}");
        assert!(err.contains("bad.toml"), "the error names the file: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "refused before a lab starts"
        );
    }
}
