//! Helpers shared by the process-level tests: run the real `srctl` against a lab directory,
//! poll for a state, start a lab that is stopped again when the test ends (even on panic).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const SRCTL: &str = env!("CARGO_BIN_EXE_srctl");

/// Runs `srctl --lab LAB ARGS...`.
pub fn srctl(lab: &Path, args: &[&str]) -> Output {
    Command::new(SRCTL)
        .arg("--lab")
        .arg(lab)
        .args(args)
        .env_remove("FAILBACK_LAB")
        .output()
        .expect("run srctl")
}

/// Starts `srctl --lab LAB ARGS` in the background (stdout discarded, stderr piped), for a
/// command a test acts on while it runs.
pub fn spawn_srctl(lab: &Path, args: &[&str]) -> std::process::Child {
    Command::new(SRCTL)
        .arg("--lab")
        .arg(lab)
        .args(args)
        .env_remove("FAILBACK_LAB")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn srctl")
}

/// The stdout of a command that must succeed.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "srctl failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The stderr of a command that must fail.
pub fn fails(out: Output) -> String {
    assert!(
        !out.status.success(),
        "expected failure: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn json(out: Output) -> Value {
    serde_json::from_str(&ok(out)).expect("json")
}

/// `item show MACHINE --json`, or Null.
pub fn show(lab: &Path, machine: &str) -> Value {
    let out = srctl(lab, &["item", "show", machine, "--json"]);
    if !out.status.success() {
        return Value::Null;
    }
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// The `infra list --json` row of `name`, or Null.
pub fn infra(lab: &Path, name: &str) -> Value {
    let out = srctl(lab, &["infra", "list", "--json"]);
    let all: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    all.as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name).cloned())
        .unwrap_or(Value::Null)
}

/// Polls `f` every 200 ms until it holds; panics after `secs`.
pub fn eventually(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A running lab in a temporary directory, stopped when dropped.
pub struct Lab {
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Lab {
    /// `srctl lab up` with extra arguments (e.g. `--disk-size 8MiB`).
    pub fn up(args: &[&str]) -> Lab {
        Lab::up_with_env(args, &[])
    }

    /// [`Lab::up`] with environment variables for every component (e.g. `FBL_CS__BOOT_DELAY`).
    pub fn up_with_env(args: &[&str], env: &[(&str, &str)]) -> Lab {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("lab");
        ok(Command::new(SRCTL)
            .args(["lab", "up", "--dir"])
            .arg(&dir)
            .args(args)
            .envs(env.iter().copied())
            .output()
            .expect("lab up"));
        Lab { dir, _tmp: tmp }
    }
}

/// `srctl --lab LAB ARGS...` with extra environment variables (inherited by components it
/// starts, e.g. by `lab restart`).
pub fn srctl_env(lab: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(SRCTL)
        .arg("--lab")
        .arg(lab)
        .args(args)
        .env_remove("FAILBACK_LAB")
        .envs(env.iter().copied())
        .output()
        .expect("run srctl")
}

/// Waits until component `name` shows `status` ("connected" / "not connected") in `site`.
pub fn wait_component(lab: &Path, name: &str, site: &str, status: &str) {
    eventually(&format!("{name} {status} in {site}"), 60, || {
        let c = infra(lab, name);
        c["site"] == site && c["status"] == status
    });
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = srctl(&self.dir, &["lab", "down"]);
    }
}

/// Waits until `machine` is Protected and has a recovery point.
pub fn protected_with_a_point(lab: &Path, machine: &str) {
    eventually(&format!("{machine} Protected with a point"), 60, || {
        let v = show(lab, machine);
        v["state"] == "Protected"
            && v["recovery_points"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
    });
}

/// The newest point in `item` (an `item show --json`) taken after `after_ms`, if any.
pub fn point_after(item: &Value, after_ms: i64) -> Option<String> {
    item["recovery_points"]
        .as_array()?
        .iter()
        .filter(|p| p["time_ms"].as_i64().unwrap_or(0) > after_ms)
        .max_by_key(|p| p["seq"].as_u64().unwrap_or(0))
        .and_then(|p| p["id"].as_str().map(str::to_string))
}

/// Waits for a point of `machine` taken after `after_ms` and verifies it byte-exact.
pub fn verify_point_after(lab: &Path, machine: &str, after_ms: i64, context: &str) {
    let mut id = String::new();
    eventually(
        &format!("{context}: a recovery point of {machine} taken after {after_ms}"),
        90,
        || match point_after(&show(lab, machine), after_ms) {
            Some(p) => {
                id = p;
                true
            }
            None => false,
        },
    );
    let v = json(srctl(
        lab,
        &["item", "verify", machine, "--point", &id, "--json"],
    ));
    assert_eq!(v["equal"], true, "{context}: {v}");
}

/// The body of `GET /metrics` at `address` (plain HTTP/1.1, as Prometheus scrapes).
pub fn scrape(address: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(address)
        .unwrap_or_else(|e| panic!("connect to the metrics endpoint {address}: {e}"));
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_string()
}
