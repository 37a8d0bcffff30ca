//! `srctl`: the operator's command line and the local lab runner.
//!
//! # Layout
//! - [`lab`]: `lab up|down|status`: a topology as OS processes on loopback, its directory
//!   layout (one config, data dir and log per component); [`labfile`]: `lab.json`, what runs
//!   where; [`topology`]: topology files, their checks and their Mermaid drawing.
//! - [`bench`]: benchmarks with a baseline measured in the same run; [`bench_disk`]: the
//!   disk's durable bandwidth and the write amplification they are judged against;
//!   [`bench_link`]: link use under a bandwidth cap.
//! - [`client`]: finding a lab (`--lab DIR` or `FAILBACK_LAB`) and dialing its CS as the
//!   enrolled operator, or its vpn-link control API.
//! - [`infra`]: `infra list|remove`.
//! - [`link`]: `link status|up|down|set|reset`.
//! - [`item`]: items, policies, workloads, failover, reprotect, jobs (following them to the end).
//! - [`plan`]: recovery plans, their members and actions.
//! - [`drill`]: `drill`: the four stages ([`stages`]) with checks and a report.
//! - [`scenario`]: fault scenarios for `drill --scenario`.
//! - [`timeline`]: what a drill samples each second; [`report_html`]: the drill's HTML
//!   report with its plots.
//! - [`prom`]: the lab's own Prometheus server (`lab up --prometheus`).
//! - [`portal`]: `srctl portal`, the read-only live web portal.
//! - [`render`]: `lab render`: a topology as a compose file with its configs; [`stack`]: as
//!   Docker Swarm stack files; [`containers`]: what the two share.

pub mod bench;
pub mod bench_disk;
pub mod bench_link;
pub mod bench_nbd;
pub mod bench_scale;
pub mod client;
pub mod containers;
pub mod drill;
pub mod guest;
pub mod infra;
pub mod item;
pub mod lab;
pub mod labfile;
pub mod link;
pub mod plan;
pub mod portal;
pub mod prom;
pub mod render;
pub mod report_html;
pub mod scenario;
pub mod stack;
pub mod stages;
pub mod timeline;
pub mod topology;
pub mod vm;

/// A size like `64MiB`, `1GiB`, `512KiB` or a plain number of bytes.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("bad size `{s}`: use e.g. 64MiB or 1GiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        _ => anyhow::bail!("bad size `{s}`: use e.g. 64MiB or 1GiB"),
    };
    Ok(n * mult)
}
