//! Prometheus metrics: every process of a lab serves `/metrics` on the address `lab.json`
//! records, Debian's `promtool check metrics` accepts each of them, each carries the names
//! its kind of component must, and a replicating item's series move as replication goes on.
//! The lab's own Prometheus (`lab up --prometheus`, Debian's server) scrapes them all, and
//! every panel query of the shipped Grafana dashboard runs against it (asked through
//! `promtool query`, not our code).

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

/// `promtool check metrics` on `body`: its verdict, or a clear failure naming the package.
fn promtool(name: &str, body: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("promtool: {e}; install Debian's `prometheus` package (scripts/test-deps)")
        });
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics of {name}: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the sample `series` (name with its labels, as exposed), if present.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Each process's name and metrics address, from `lab.json`.
fn endpoints(dir: &Path) -> BTreeMap<String, (String, String)> {
    let lab: Value =
        serde_json::from_slice(&std::fs::read(dir.join("lab.json")).expect("lab.json"))
            .expect("json");
    lab["procs"]
        .as_array()
        .expect("procs")
        .iter()
        .filter(|p| p["deferred"] != true)
        .map(|p| {
            let s = |k: &str| p[k].as_str().expect(k).to_string();
            (s("name"), (s("binary"), s("metrics")))
        })
        .collect()
}

#[test]
fn every_process_serves_metrics_promtool_accepts_and_an_items_series_move() {
    let lab = Lab::up(&["--machines", "1", "--disk-size", "8MiB"]);
    let dir = &lab.dir;
    ok(srctl(dir, &["workload", "start", "vm1", "--rate", "1"]));
    ok(srctl(dir, &["item", "enable", "vm1"]));
    protected_with_a_point(dir, "vm1");
    let item = show(dir, "vm1")["id"].as_str().expect("id").to_string();
    let it = format!("item=\"{item}\"");
    let im = format!("{{{it},machine=\"vm1\"}}");

    // What each kind of process must expose (besides the process's own CPU and memory).
    let required = |binary: &str| -> Vec<String> {
        let mut names = vec![
            "process_cpu_seconds_total".to_string(),
            "process_resident_memory_bytes".to_string(),
        ];
        let add: &[&str] = match binary {
            "config-server" => &[
                "flab_cs_components_connected",
                "flab_cs_control_stream_drops_total",
                "flab_cs_control_messages_total{kind=\"heartbeat\"}",
                "flab_cs_control_messages_total{kind=\"progress\"}",
                "flab_cs_jobs{state=\"Succeeded\"}",
                "flab_cs_heartbeat_age_seconds{component=\"ps-onprem\"}",
            ],
            "process-server" => &[
                "flab_ps_cache_used_bytes",
                "flab_ps_cache_capacity_bytes",
                "flab_ps_compression_ratio",
                "flab_ps_throttled",
                "flab_ps_upload_estimate_seconds",
            ],
            "vpn-link" => &[
                "flab_link_bytes_total{direction=\"onprem_to_azure\"}",
                "flab_link_bytes_total{direction=\"azure_to_onprem\"}",
                "flab_link_up",
                "flab_link_latency_seconds",
                "flab_link_bandwidth_bytes_per_second",
            ],
            _ => &[],
        };
        names.extend(add.iter().map(|s| s.to_string()));
        names
    };
    let endpoints = endpoints(dir);
    assert_eq!(endpoints.len(), 8, "{endpoints:?}");
    let mut bodies = BTreeMap::new();
    for (name, (binary, address)) in &endpoints {
        assert!(
            address.starts_with("127.0.0.1:"),
            "{name}: loopback only: {address}"
        );
        let body = scrape(address);
        promtool(name, &body);
        for series in required(binary) {
            assert!(
                body.lines().any(|l| l.starts_with(&series)),
                "{name} ({binary}) lacks {series}:\n{body}"
            );
        }
        // Every process but the CS keeps control streams and counts their connections.
        if binary != "config-server" {
            assert!(
                body.lines()
                    .any(|l| l.starts_with("flab_control_connects_total{")
                        && l.contains("outcome=\"welcomed\"")),
                "{name} ({binary}) lacks flab_control_connects_total:\n{body}"
            );
        }
        bodies.insert(name.clone(), body);
    }
    // Per item, where the item's work happens.
    let cs = &bodies["cs"];
    assert_eq!(
        sample(
            cs,
            &format!("flab_item_state{{{it},machine=\"vm1\",state=\"Protected\"}}")
        ),
        Some(1.0),
        "{cs}"
    );
    assert_eq!(
        sample(
            cs,
            &format!("flab_item_health{{health=\"Healthy\",{it},machine=\"vm1\"}}")
        ),
        Some(1.0),
        "{cs}"
    );
    let rpo = sample(cs, &format!("flab_item_rpo_seconds{im}")).expect("rpo");
    assert!(rpo < 60.0, "a point every 5 s: RPO {rpo}");
    let host = &bodies["esx-1"];
    let bytes_before = sample(host, &format!("flab_item_replicated_bytes_total{im}"))
        .unwrap_or_else(|| panic!("{host}"));
    assert!(
        bytes_before >= 8.0 * 1024.0 * 1024.0 / 2.0,
        "the initial copy counts: {bytes_before}"
    );
    assert!(
        sample(host, &format!("flab_item_lag_seconds_count{im}")).is_some_and(|n| n >= 1.0),
        "every batch the target journaled is a lag sample:\n{host}"
    );
    assert!(
        sample(host, &format!("flab_item_outofsync_bytes{im}")).is_some(),
        "{host}"
    );
    assert_eq!(
        sample(host, "flab_host_replication_budget_bytes"),
        Some(2.0 * 1024.0 * 1024.0 * 1024.0),
        "the default replication_budget of 2 GiB:\n{host}"
    );
    assert!(
        sample(host, "flab_host_replication_budget_used_bytes").is_some(),
        "{host}"
    );
    let mt = &bodies["azure-target"];
    for name in [
        "flab_mt_journal_bytes",
        "flab_mt_undo_bytes",
        "flab_mt_recovery_points",
        "flab_mt_apply_lag_seconds",
    ] {
        assert!(
            sample(mt, &format!("{name}{{{it}}}")).is_some(),
            "{name}:\n{mt}"
        );
    }
    assert!(
        sample(&bodies["ps-onprem"], "flab_ps_compression_ratio").is_some_and(|r| r > 1.0),
        "the workload writes half-compressible data: {}",
        bodies["ps-onprem"]
    );

    // As replication goes on: bytes grow, a new point brings the RPO down, the journal holds
    // points, and the link carried the bytes.
    let (host_metrics, cs_metrics, mt_metrics) = (
        &endpoints["esx-1"].1,
        &endpoints["cs"].1,
        &endpoints["azure-target"].1,
    );
    eventually("replicated bytes grow", 30, || {
        sample(
            &scrape(host_metrics),
            &format!("flab_item_replicated_bytes_total{im}"),
        )
        .is_some_and(|b| b > bytes_before)
    });
    eventually("the RPO drops when a point arrives", 30, || {
        sample(&scrape(cs_metrics), &format!("flab_item_rpo_seconds{im}")).is_some_and(|r| r < rpo)
    });
    eventually("the target holds points", 30, || {
        sample(
            &scrape(mt_metrics),
            &format!("flab_mt_recovery_points{{{it}}}"),
        )
        .is_some_and(|n| n >= 1.0)
    });
    let link = scrape(&endpoints["vpn"].1);
    assert!(
        sample(
            &link,
            "flab_link_bytes_total{direction=\"onprem_to_azure\"}"
        )
        .is_some_and(|b| b >= bytes_before / 4.0),
        "{link}"
    );

    // The state series follow the item: after a failover, Protected is 0.
    ok(srctl(dir, &["failover", "vm1"]));
    eventually("the state series shows the failover", 30, || {
        let cs = scrape(cs_metrics);
        sample(
            &cs,
            &format!("flab_item_state{{{it},machine=\"vm1\",state=\"Failover completed\"}}"),
        ) == Some(1.0)
            && sample(
                &cs,
                &format!("flab_item_state{{{it},machine=\"vm1\",state=\"Protected\"}}"),
            ) == Some(0.0)
    });

    // Anything but GET /metrics is refused; the endpoint stays up.
    let mut s = std::net::TcpStream::connect(cs_metrics.as_str()).expect("connect");
    s.write_all(b"GET /admin HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    assert!(scrape(cs_metrics).contains("flab_cs_components_connected"));
}

/// `promtool query instant` against the lab's Prometheus: the result vector as JSON.
fn query(prometheus: &str, expr: &str) -> Vec<Value> {
    let out = Command::new("promtool")
        .args(["query", "instant", "-o", "json"])
        .arg(format!("http://{prometheus}"))
        .arg(expr)
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "query `{expr}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

/// `lab up --prometheus`: Debian's Prometheus scrapes every process (those added at runtime
/// too), sees every protected item's RPO, and answers every query of the shipped dashboard.
#[test]
fn the_labs_prometheus_scrapes_every_process_and_the_dashboards_queries_run() {
    let lab = Lab::up(&["--machines", "2", "--disk-size", "8MiB", "--prometheus"]);
    let dir = &lab.dir;
    let status = ok(srctl(dir, &["lab", "status"]));
    let endpoints = endpoints(dir);
    let prometheus = endpoints["prometheus"].1.clone();
    assert!(
        status.contains(&format!("prometheus: http://{prometheus}")),
        "{status}"
    );
    for vm in ["vm1", "vm2"] {
        ok(srctl(dir, &["item", "enable", vm]));
    }
    // Every process is a healthy target, and every protected item has its RPO series.
    eventually("every process scraped", 60, || {
        let up = query(&prometheus, "up == 1");
        endpoints.keys().all(|name| {
            up.iter()
                .any(|s| s["metric"]["component"].as_str() == Some(name.as_str()))
        })
    });
    eventually("an RPO series per protected item", 60, || {
        let rpo = query(&prometheus, "flab_item_rpo_seconds");
        ["vm1", "vm2"].iter().all(|vm| {
            rpo.iter()
                .any(|s| s["metric"]["machine"].as_str() == Some(*vm))
        })
    });

    // The dashboard is import-ready (a datasource input, panels with queries), and each of
    // its queries runs.
    let dashboard: Value = serde_json::from_slice(
        &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana/failback-lab.json"
        ))
        .expect("deploy/grafana/failback-lab.json"),
    )
    .expect("the dashboard is JSON");
    assert_eq!(dashboard["__inputs"][0]["pluginId"], "prometheus");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    assert!(exprs.len() >= 20, "{exprs:?}");
    for expr in &exprs {
        query(&prometheus, expr);
    }
    // A component added at runtime is scraped too.
    ok(srctl(
        dir,
        &[
            "infra",
            "add",
            "process-server",
            "ps-azure-2",
            "--site",
            "azure",
        ],
    ));
    eventually("ps-azure-2 scraped", 60, || {
        query(&prometheus, "up{component=\"ps-azure-2\"} == 1").len() == 1
    });
}
