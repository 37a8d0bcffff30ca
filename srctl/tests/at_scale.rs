//! A lab at ASR's scale in the default test run: 100 machines on 2 hosts all reach Protected
//! through one process server, no control stream drops while they replicate, a restart of
//! the configuration server is recovered by every component with a bounded number of
//! connection attempts (counted by the components themselves in
//! `flab_control_connects_total`), and a sample of machines is byte-exact afterwards. A file
//! of its own, so that no other test of this crate competes for the two cores meanwhile.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use serde_json::Value;

const MACHINES: usize = 100;
/// Machines under the default policy (digests on), proven byte-exact at the end.
const SAMPLE: [&str; 3] = ["vm1", "vm50", "vm100"];

fn items(dir: &Path) -> Vec<Value> {
    json(srctl(dir, &["item", "list", "--json"]))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn components(dir: &Path) -> Vec<Value> {
    json(srctl(dir, &["infra", "list", "--json"]))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The metrics address of every lab process that runs, by name (`lab.json`; a process
/// server declared for `infra add` later has one but does not run).
fn metrics_addresses(dir: &Path) -> BTreeMap<String, String> {
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("lab.json")).expect("lab.json"))
            .expect("lab.json is JSON");
    state["procs"]
        .as_array()
        .expect("procs")
        .iter()
        .filter(|p| p["deferred"] != true && p["system"] != true && p["pid"].is_u64())
        .filter_map(|p| {
            let m = p["metrics"].as_str().filter(|m| !m.is_empty())?;
            Some((p["name"].as_str()?.to_string(), m.to_string()))
        })
        .collect()
}

/// A counter without labels, e.g. the CS's `flab_cs_control_stream_drops_total`.
fn counter(body: &str, name: &str) -> u64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{body}")) as u64
}

/// `flab_control_connects_total{outcome="attempted"}` of every component, over all the
/// lab's processes but the CS.
fn attempts(dir: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (name, address) in metrics_addresses(dir) {
        if name == "cs" {
            continue;
        }
        for line in scrape(&address).lines() {
            let Some(rest) = line.strip_prefix("flab_control_connects_total{") else {
                continue;
            };
            if !rest.contains("outcome=\"attempted\"") {
                continue;
            }
            let component = rest
                .split_once("component=\"")
                .and_then(|(_, r)| r.split_once('"'))
                .map(|(c, _)| c.to_string())
                .expect("a component label");
            let n = rest
                .rsplit_once(' ')
                .and_then(|(_, v)| v.parse::<f64>().ok())
                .expect("a value") as u64;
            *out.entry(component).or_insert(0) += n;
        }
    }
    out
}

fn cs_drops(dir: &Path) -> u64 {
    let cs = metrics_addresses(dir)["cs"].clone();
    counter(&scrape(&cs), "flab_cs_control_stream_drops_total")
}

#[test]
fn a_hundred_machines_replicate_and_survive_a_cs_restart() {
    let lab = Lab::up(&[
        "--machines",
        &MACHINES.to_string(),
        "--hosts",
        "2",
        "--disk-size",
        "4MiB",
    ]);
    let dir = lab.dir.as_path();
    ok(srctl(
        dir,
        &[
            "policy",
            "create",
            "scale",
            "--verification",
            "off",
            "--retention",
            "1m",
            "--app-interval",
            "0s",
        ],
    ));
    for i in 1..=MACHINES {
        let vm = format!("vm{i}");
        let policy = if SAMPLE.contains(&vm.as_str()) {
            "default"
        } else {
            "scale"
        };
        ok(srctl(dir, &["item", "enable", &vm, "--policy", policy]));
    }
    eventually("all 100 items Protected", 240, || {
        items(dir)
            .iter()
            .filter(|i| i["state"] == "Protected")
            .count()
            == MACHINES
    });
    for vm in SAMPLE.iter().copied().chain(["vm2", "vm3", "vm51", "vm99"]) {
        ok(srctl(dir, &["workload", "start", vm, "--rate", "0.2"]));
    }

    // Thirty seconds replicating: no control stream ends.
    let drops = cs_drops(dir);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < until {
        let all = items(dir);
        let protected = all.iter().filter(|i| i["state"] == "Protected").count();
        assert_eq!(protected, MACHINES, "an item left Protected: {all:?}");
        std::thread::sleep(std::time::Duration::from_secs(3));
    }
    assert_eq!(
        cs_drops(dir),
        drops,
        "control streams dropped while replicating"
    );

    // A CS outage: every component comes back, none storms.
    let before = attempts(dir);
    assert!(
        before.len() >= MACHINES + 4,
        "every agent counts its connection attempts: {before:?}"
    );
    let expected = components(dir).len();
    // Killed, down for three seconds (a restart alone is over in tens of milliseconds,
    // too soon for a storm to show), started again.
    ok(srctl(dir, &["lab", "kill", "cs"]));
    std::thread::sleep(std::time::Duration::from_secs(3));
    ok(srctl(dir, &["lab", "restart", "cs"]));
    eventually("every component connected after the CS restart", 60, || {
        let all = components(dir);
        all.len() == expected
            && all
                .iter()
                .filter(|c| c["role"] != "operator")
                .all(|c| c["status"] == "connected")
    });
    eventually(
        "every item Protected and Healthy after the CS restart",
        60,
        || {
            items(dir)
                .iter()
                .all(|i| i["state"] == "Protected" && i["health"] == "Healthy")
        },
    );
    let after = attempts(dir);
    let most = before
        .iter()
        .map(|(c, n)| (after.get(c).copied().unwrap_or(0) - n, c))
        .max();
    eprintln!("connection attempts after the CS restart, most by one component: {most:?}");
    for (component, n) in &before {
        let made = after.get(component).copied().unwrap_or(0) - n;
        assert!(
            (1..=8).contains(&made),
            "{component} made {made} connection attempts to come back after 3 s without \
             a CS (exponential backoff bounds them; 0 means it never reconnected)"
        );
    }
    let since = now_ms();
    for vm in SAMPLE {
        verify_point_after(dir, vm, since, "after the CS restart");
    }
}
