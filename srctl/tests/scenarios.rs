//! The shipped failure scenarios (deploy/scenarios/*.toml) through the real `srctl drill
//! --scenario`: each ends ok with zero integrity mismatches, every fault injected and undone,
//! and replication healthy again afterwards; health shows what the fault did. Each run writes
//! its HTML report (`--report`): every plot has one fault band per injected fault, placed at
//! the times `--json` reports, and a series per machine; headless Chromium renders it to a
//! picture that is not blank. A scenario with an unknown stage, component or action is refused
//! before anything starts.

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

/// Runs the drill with a shipped scenario; asserts it passed and its report is right;
/// returns its only fault.
fn drill(name: &str) -> Value {
    let tmp = tempfile::tempdir().expect("tempdir");
    let html = tmp.path().join("report.html");
    let out = Command::new(SRCTL)
        .args(["drill", "--json", "--scenario"])
        .arg(scenario(name))
        .arg("--report")
        .arg(&html)
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
    check_report(
        name,
        &report,
        &std::fs::read_to_string(&html).expect("the report"),
    );
    f
}

/// A `<rect>` of a plot: (x, width, fill).
fn rects(svg: &str) -> Vec<(f64, f64, String)> {
    svg.split("<rect ")
        .skip(1)
        .filter_map(|r| {
            let attr = |k: &str| {
                r.split(&format!(" {k}=\""))
                    .nth(1)
                    .or_else(|| r.strip_prefix(&format!("{k}=\"")))
                    .and_then(|v| v.split('"').next())
                    .map(str::to_string)
            };
            Some((
                attr("x")?.parse().ok()?,
                attr("width")?.parse().ok()?,
                attr("fill")?,
            ))
        })
        .collect()
}

/// Every plot of the report: a series per machine where plots are per machine, one red band
/// per injected fault, at the times the JSON report gives (mapped through the stage bands,
/// drawn from the same report's stage times: within 2 pixels).
fn check_report(name: &str, report: &Value, html: &str) {
    let stages: Vec<(f64, f64)> = report["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .filter(|s| s["seconds"].as_f64().unwrap_or(0.0) > 0.0)
        .map(|s| {
            (
                s["started_at_s"].as_f64().expect("started_at_s"),
                s["seconds"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    let faults: Vec<(f64, f64)> = report["faults"]
        .as_array()
        .expect("faults")
        .iter()
        .filter_map(|f| {
            let from = f["injected_at_s"].as_f64()?;
            Some((from, f["undone_at_s"].as_f64().unwrap_or(from)))
        })
        .collect();
    let plots: Vec<&str> = html.split("<svg").skip(1).collect();
    assert_eq!(plots.len(), 4, "{name}: four plots");
    for (i, svg) in plots.iter().enumerate() {
        let r = rects(svg);
        let bands: Vec<f64> = r
            .iter()
            .filter(|(_, _, fill)| fill == "#EEF2F7" || fill == "#FAFAFA")
            .map(|(x, _, _)| *x)
            .collect();
        assert_eq!(
            bands.len(),
            stages.len(),
            "{name}: plot {i}: a band per stage"
        );
        let (t0, t1) = (stages[0].0, stages[stages.len() - 1].0);
        let (x0, x1) = (bands[0], bands[bands.len() - 1]);
        let px = |t: f64| x0 + (t - t0) * (x1 - x0) / (t1 - t0);
        let red: Vec<(f64, f64)> = r
            .iter()
            .filter(|(_, _, fill)| fill == "#DC322F")
            .map(|(x, w, _)| (*x, *w))
            .collect();
        assert_eq!(
            red.len(),
            faults.len(),
            "{name}: plot {i}: a band per fault"
        );
        for ((x, w), (from, to)) in red.iter().zip(&faults) {
            assert!(
                (x - px(*from)).abs() <= 2.0,
                "{name}: plot {i}: fault band at x={x}, expected {} ({from} s)",
                px(*from)
            );
            if to > from {
                assert!(
                    (x + w - px(*to)).abs() <= 2.0,
                    "{name}: plot {i}: fault band ends at {}, expected {} ({to} s)",
                    x + w,
                    px(*to)
                );
            }
        }
    }
    for m in report["machines"].as_array().expect("machines") {
        let m = m.as_str().expect("machine");
        for (i, svg) in plots[..2].iter().enumerate() {
            assert!(
                svg.contains(&format!(">\n{m}\n</text>")),
                "{name}: plot {i} has no series {m}"
            );
        }
    }
}

/// Headless Chromium (Debian's `chromium`) renders the report to a picture with content.
#[test]
fn a_drill_report_renders_in_chromium() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let html = tmp.path().join("report.html");
    let out = Command::new(SRCTL)
        .args([
            "drill",
            "--machines",
            "1",
            "--disk-size",
            "8MiB",
            "--rate",
            "1",
            "--json",
        ])
        .arg("--report")
        .arg(&html)
        .env_remove("FAILBACK_LAB")
        .output()
        .expect("drill");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shot = tmp.path().join("report.png");
    let run = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1100,1800",
        ])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", html.display()))
        .output()
        .unwrap_or_else(|e| {
            panic!("chromium: {e}; install Debian's `chromium` package (scripts/test-deps)")
        });
    assert!(
        shot.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&shot).expect("png"),
    ));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("frame");
    let px = info.color_type.samples();
    let pixels = &buf[..info.buffer_size()];
    let inked = pixels
        .chunks(px)
        .filter(|p| p.iter().take(3).any(|c| *c < 200))
        .count();
    let total = pixels.len() / px;
    assert!(
        inked * 100 > total,
        "the screenshot is blank: {inked} of {total} pixels drawn"
    );
    // Kept next to the test's output for a look.
    let keep = std::env::temp_dir().join("failback-drill-report.png");
    let _ = std::fs::copy(&shot, &keep);
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
fn a_plan_drill_of_more_machines_than_a_plan_holds_is_refused_before_anything_starts() {
    let started = Instant::now();
    let out = Command::new(SRCTL)
        .args(["drill", "--plan", "--machines", "101"])
        .env_remove("FAILBACK_LAB")
        .output()
        .expect("drill");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--plan takes at most 100 machines (an ASR recovery plan's limit), not 101"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused before a lab starts"
    );
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
