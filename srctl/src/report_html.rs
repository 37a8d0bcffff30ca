//! The drill's self-contained HTML report (`drill --report FILE.html`): the stage table, the
//! faults with when they were injected and undone and when every item was healthy again, and
//! plots over the whole run (RPO and lag per machine, the link's throughput each way, each
//! process server's cache) with each stage as a background band and each injected fault as a
//! labelled red band from injection to undo; a dashed line marks when the items were healthy
//! again after it. The plots are SVG drawn by plotters, inline: no script, no network.

use std::fmt::Write as _;

use plotters::prelude::*;

use crate::drill::DrillReport;
use crate::timeline::Timeline;

/// Stage bands, alternating.
const STAGE_FILLS: [RGBColor; 2] = [RGBColor(238, 242, 247), RGBColor(250, 250, 250)];
/// A fault's band (drawn with [`FAULT_OPACITY`]).
pub const FAULT_FILL: RGBColor = RGBColor(220, 50, 47);
const FAULT_OPACITY: f64 = 0.22;
/// When the items were healthy again after a fault.
const HEALTHY: RGBColor = RGBColor(38, 139, 34);
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
/// Plot size in pixels.
pub const PLOT_SIZE: (u32, u32) = (960, 280);

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A named series of (seconds, value) points; `None` values break the line.
struct Series {
    name: String,
    points: Vec<(f64, Option<f64>)>,
}

/// The whole report as one HTML document.
pub fn render(report: &DrillReport, timeline: &Timeline) -> String {
    let mut h = String::new();
    let verdict = if report.ok { "passed" } else { "FAILED" };
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>Failback Lab drill report: {verdict}</title>\n<style>\
         body{{font-family:sans-serif;margin:24px;color:#222;max-width:1000px}}\
         table{{border-collapse:collapse;margin:8px 0 20px}}\
         td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:14px}}\
         th{{background:#f0f0f0}} .ok{{color:#1a7f37}} .failed{{color:#c62828;font-weight:bold}}\
         figure{{margin:0 0 18px}} figcaption{{font-size:13px;color:#555}}\
         </style></head><body>\n<h1>Drill report: <span class=\"{}\">{verdict}</span></h1>\n",
        if report.ok { "ok" } else { "failed" }
    );
    let _ = writeln!(
        h,
        "<p>Machines {}; {} per machine; {:.1} s in all; {} integrity checks, {} mismatches{}.</p>",
        esc(&report.machines.join(", ")),
        human(report.disk_size_bytes as f64, "B"),
        report.seconds,
        report.integrity_checks,
        report.integrity_mismatches,
        report
            .scenario
            .as_ref()
            .map(|s| format!("; scenario <b>{}</b>", esc(s)))
            .unwrap_or_default()
    );
    h.push_str("<h2>Stages</h2>\n<table><tr><th>stage</th><th>result</th><th>from</th><th>took</th><th>across the link</th><th>detail</th></tr>\n");
    for s in &report.stages {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td class=\"{}\">{}</td><td>{:.1} s</td><td>{:.1} s</td><td>{}</td><td>{}</td></tr>",
            esc(&s.name),
            if s.ok { "ok" } else { "failed" },
            if s.ok { "ok" } else { "FAILED" },
            s.started_at_s,
            s.seconds,
            human(s.link_bytes as f64, "B"),
            esc(if s.ok { &s.detail } else { &s.error })
        );
    }
    h.push_str("</table>\n");
    if !report.faults.is_empty() {
        h.push_str("<h2>Faults</h2>\n<table><tr><th>fault</th><th>stage</th><th>injected</th><th>undone</th><th>healthy again after</th><th>health seen</th></tr>\n");
        let t = |v: Option<f64>| v.map(|s| format!("{s:.1} s")).unwrap_or_else(|| "-".into());
        for f in &report.faults {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}{}</td></tr>",
                esc(&f.fault),
                esc(&f.stage),
                t(f.injected_at_s),
                t(f.undone_at_s),
                t(f.healthy_after_s),
                esc(&f.health_seen),
                if f.error.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", esc(&f.error))
                }
            );
        }
        h.push_str("</table>\n");
    }
    h.push_str("<h2>Over the run</h2>\n");
    let per_machine = |pick: fn(&(f64, f64)) -> f64| -> Vec<Series> {
        report
            .machines
            .iter()
            .map(|m| Series {
                name: m.clone(),
                points: timeline
                    .samples
                    .iter()
                    .map(|s| (s.t, s.machines.get(m).map(pick)))
                    .collect(),
            })
            .collect()
    };
    let link = |pick: fn(&(f64, f64)) -> f64, name: &str| Series {
        name: name.into(),
        points: timeline
            .samples
            .iter()
            .map(|s| (s.t, s.link.as_ref().map(pick)))
            .collect(),
    };
    let mut ps: Vec<String> = timeline
        .samples
        .iter()
        .flat_map(|s| s.caches.keys().cloned())
        .collect();
    ps.sort();
    ps.dedup();
    let caches: Vec<Series> = ps
        .iter()
        .map(|name| Series {
            name: name.clone(),
            points: timeline
                .samples
                .iter()
                .map(|s| (s.t, s.caches.get(name).map(|b| b / (1 << 20) as f64)))
                .collect(),
        })
        .collect();
    let plots = [
        ("RPO per machine", "seconds", per_machine(|v| v.0)),
        (
            "Replication lag p99 per machine (capture to target journal)",
            "seconds",
            per_machine(|v| v.1),
        ),
        (
            "Link throughput each way",
            "MB/s",
            vec![
                link(|v| v.0 / 1e6, "onprem to azure"),
                link(|v| v.1 / 1e6, "azure to onprem"),
            ],
        ),
        ("Process server cache used", "MiB", caches),
    ];
    for (title, unit, series) in plots {
        let _ = writeln!(
            h,
            "<figure class=\"plot\" data-title=\"{}\">{}<figcaption>{}: stages as grey bands, faults as red bands (injection to undo), healthy again as a dashed green line.</figcaption></figure>",
            esc(title),
            plot(title, unit, &series, report),
            esc(title)
        );
    }
    h.push_str("</body></html>\n");
    h
}

fn human(v: f64, unit: &str) -> String {
    let mut v = v;
    for prefix in ["", "Ki", "Mi", "Gi", "Ti"] {
        if v < 1024.0 || prefix == "Ti" {
            return format!("{v:.1} {prefix}{unit}");
        }
        v /= 1024.0;
    }
    format!("{v:.1} {unit}")
}

/// One plot as an SVG element.
fn plot(title: &str, unit: &str, series: &[Series], report: &DrillReport) -> String {
    let mut svg = String::new();
    if let Err(e) = draw(&mut svg, title, unit, series, report) {
        return format!(
            "<p>plot `{}` could not be drawn: {}</p>",
            esc(title),
            esc(&e)
        );
    }
    svg
}

fn draw(
    svg: &mut String,
    title: &str,
    unit: &str,
    series: &[Series],
    report: &DrillReport,
) -> Result<(), String> {
    let x_max = report.seconds.max(1.0);
    let y_top = series
        .iter()
        .flat_map(|s| s.points.iter().filter_map(|p| p.1))
        .fold(0.0f64, f64::max);
    let y_max = if y_top > 0.0 { y_top * 1.15 } else { 1.0 };
    let root = SVGBackend::with_string(svg, PLOT_SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(32)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("seconds since the drill began")
        .y_desc(unit)
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, s) in report.stages.iter().filter(|s| s.seconds > 0.0).enumerate() {
        let (a, b) = (s.started_at_s, s.started_at_s + s.seconds);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(a, 0.0), (b, y_max)],
                STAGE_FILLS[i % 2].filled(),
            )))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(std::iter::once(Text::new(
                s.name.clone(),
                (a, y_max * 0.97),
                ("sans-serif", 10).into_font().color(&RGBColor(90, 90, 90)),
            )))
            .map_err(|e| e.to_string())?;
    }
    for f in &report.faults {
        let Some(from) = f.injected_at_s else {
            continue;
        };
        let to = f.undone_at_s.unwrap_or(from).max(from + x_max / 400.0);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(from, 0.0), (to, y_max)],
                FAULT_FILL.mix(FAULT_OPACITY).filled(),
            )))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(std::iter::once(Text::new(
                f.fault.clone(),
                (from, y_max * 0.88),
                ("sans-serif", 10).into_font().color(&FAULT_FILL),
            )))
            .map_err(|e| e.to_string())?;
        if let Some(after) = f.healthy_after_s {
            let at = f.undone_at_s.unwrap_or(from) + after;
            chart
                .draw_series(DashedLineSeries::new(
                    [(at, 0.0), (at, y_max)],
                    4,
                    3,
                    HEALTHY.stroke_width(1),
                ))
                .map_err(|e| e.to_string())?;
        }
    }
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        // One line per run of samples that have a value.
        let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
        for (t, v) in &s.points {
            match v {
                Some(v) => runs.last_mut().map(|r| r.push((*t, *v))).unwrap_or(()),
                None if runs.last().is_some_and(|r| !r.is_empty()) => runs.push(Vec::new()),
                None => {}
            }
        }
        let mut first = true;
        for run in runs.into_iter().filter(|r| !r.is_empty()) {
            let drawn = chart
                .draw_series(LineSeries::new(run, color.stroke_width(2)))
                .map_err(|e| e.to_string())?;
            if std::mem::take(&mut first) {
                drawn.label(s.name.clone()).legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2))
                });
            }
        }
    }
    if !series.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .draw()
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}
