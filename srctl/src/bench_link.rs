//! `srctl bench link`: how much of a bandwidth-capped VPN link reprotect and reverse
//! replication use, for incompressible data and for data that compresses 2:1.
//!
//! A two-machine lab is failed over to Azure and committed; each Azure VM's disk is then
//! filled (vm1: incompressible, vm2: half compressible) and the link capped at B. Each machine
//! is reprotected to its original location in turn: the old on-premises disk is empty, so every
//! block differs and the whole disk crosses the link, compressed by the PS before it. Measured
//! per machine, from the reprotect request until the master target journaled the last batch:
//! the link's throughput azure -> onprem against B (target: at least 0.95), and the effective
//! data rate (disk bytes per second) against B (target for 2:1 data: at least 1.8: compression
//! happens before the link).

use std::path::Path;
use std::time::{Duration, Instant};

use failback_proto::pb::operator::{EnableItemRequest, FailoverRequest, ReprotectRequest};
use serde::Serialize;

use crate::{infra, item, lab, link};

#[derive(Debug, Clone, Serialize)]
pub struct LinkRun {
    pub machine: String,
    pub compressible: f64,
    pub disk_bytes: u64,
    pub seconds: f64,
    pub link_bytes: u64,
    /// Link bytes per second while the data crossed, over B.
    pub link_ratio: f64,
    /// Disk bytes per second delivered to the master target, over B.
    pub data_ratio: f64,
    pub target: f64,
    pub met: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct LinkReport {
    pub bandwidth_bytes_per_s: u64,
    pub runs: Vec<LinkRun>,
}

fn say(progress: bool, m: &str) {
    if progress {
        eprintln!("bench: {m}");
    }
}

async fn azure_to_onprem(dir: &Path) -> anyhow::Result<u64> {
    Ok(link::status(dir).await?.bytes_azure_to_onprem)
}

/// Polls `machine`'s item until `done` holds for it.
async fn wait_item(
    dir: &Path,
    machine: &str,
    what: &str,
    done: impl Fn(&failback_proto::pb::operator::Item) -> bool,
) -> anyhow::Result<failback_proto::pb::operator::Item> {
    let start = Instant::now();
    loop {
        if let Some(i) = item::list(dir, machine).await?.into_iter().next()
            && done(&i)
        {
            return Ok(i);
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(1800),
            "{machine}: not {what} after 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run(bandwidth: u64, size: u64, progress: bool) -> anyhow::Result<LinkReport> {
    anyhow::ensure!(bandwidth > 0, "--bandwidth must be above 0");
    let size = size.div_ceil(1 << 20) * (1 << 20);
    let dir = std::env::temp_dir().join(format!(
        "failback-bench-link-{}-{}",
        std::process::id(),
        failback_common::control::now_ms()
    ));
    say(
        progress,
        &format!("starting a two-machine lab in {}", dir.display()),
    );
    lab::up(
        &dir,
        &lab::UpOptions {
            topology: crate::topology::Topology::generated(2, 1, size)
                .map_err(anyhow::Error::msg)?,
            timeout: Duration::from_secs(60),
            ..Default::default()
        },
    )
    .await?;
    let result = measure(&dir, bandwidth, size, progress).await;
    let _ = lab::down(&dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn measure(
    dir: &Path,
    bandwidth: u64,
    size: u64,
    progress: bool,
) -> anyhow::Result<LinkReport> {
    let machines = [("vm1", 0.0), ("vm2", 0.5)];
    say(
        progress,
        "protect, fail over to Azure, commit (empty disks: quick)",
    );
    for (m, _) in machines {
        item::enable(
            dir,
            EnableItemRequest {
                machine: m.into(),
                ..Default::default()
            },
        )
        .await?;
    }
    for (m, _) in machines {
        wait_item(dir, m, "Protected", |i| i.state == "Protected").await?;
        item::failover(
            dir,
            FailoverRequest {
                machine: m.into(),
                point: "latest".into(),
                shutdown: true,
                kind: failback_proto::pb::operator::FailoverKind::Planned as i32,
                sync: 0,
            },
        )
        .await?;
        item::commit(dir, m).await?;
    }
    say(progress, "waiting for the Azure VMs' agents");
    let start = Instant::now();
    loop {
        let all = infra::list(dir).await?;
        if machines.iter().all(|(m, _)| {
            all.iter()
                .any(|c| c.name == *m && c.site == "azure" && c.status == "connected")
        }) {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(120),
            "the Azure VMs did not register"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    link::set(
        dir,
        &link::SetArgs {
            clear: true,
            bandwidth: Some(bandwidth),
            ..Default::default()
        },
    )
    .await?;
    let mut runs = Vec::new();
    for (m, compressible) in machines {
        say(
            progress,
            &format!(
                "{m}: filling the Azure VM's {} MiB disk ({:.0} % compressible), reprotecting",
                size >> 20,
                compressible * 100.0
            ),
        );
        let path = dir.join(format!("datastores/azure-storage/vms/{m}/disk0.img"));
        let data = crate::bench::payload(8 << 20, compressible, 11);
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            // Raw or an overlay over the frozen replica: written through the disk's layout.
            let mut f = failback_common::vdisk::VDisk::open(&path)?;
            let mut off = 0;
            while off < size {
                let n = (data.len() as u64).min(size - off) as usize;
                f.write_at(&data[..n], off)?;
                off += n as u64;
            }
            f.sync_all()?;
            Ok(())
        })
        .await??;
        let link0 = azure_to_onprem(dir).await?;
        let t0 = failback_common::control::now_ms();
        item::reprotect(
            dir,
            ReprotectRequest {
                machine: m.into(),
                ..Default::default()
            },
        )
        .await?;
        let done = wait_item(dir, m, "fully at the master target", |i| {
            i.direction == "reverse"
                && i.state == "Protected"
                && i.acked_seq > 0
                && i.target_seq >= i.acked_seq
        })
        .await?;
        let seconds = crate::bench::seconds_until_caught_up(t0, &done);
        let link_bytes = azure_to_onprem(dir).await? - link0;
        let link_ratio = link_bytes as f64 / seconds / bandwidth as f64;
        let data_ratio = size as f64 / seconds / bandwidth as f64;
        let (target, met) = if compressible > 0.0 {
            (1.8, data_ratio >= 1.8)
        } else {
            (0.95, link_ratio >= 0.95)
        };
        runs.push(LinkRun {
            machine: m.into(),
            compressible,
            disk_bytes: size,
            seconds,
            link_bytes,
            link_ratio,
            data_ratio,
            target,
            met,
        });
    }
    Ok(LinkReport {
        bandwidth_bytes_per_s: bandwidth,
        runs,
    })
}

pub fn print(r: &LinkReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    let b = r.bandwidth_bytes_per_s as f64;
    println!(
        "link capped at B = {:.2} MB/s ({:.1} Mbit/s); reprotect of a full disk, azure -> onprem",
        b / 1e6,
        b * 8.0 / 1e6
    );
    println!(
        "{:<6} {:>12} {:>9} {:>10} {:>12} {:>11} {:>11}  TARGET",
        "VM", "COMPRESSIBLE", "DISK MiB", "SECONDS", "LINK/B", "DATA/B", "LINK MiB"
    );
    for x in &r.runs {
        println!(
            "{:<6} {:>11.0}% {:>9} {:>10.1} {:>12.3} {:>11.3} {:>11.1}  {} >= {}",
            x.machine,
            x.compressible * 100.0,
            x.disk_bytes >> 20,
            x.seconds,
            x.link_ratio,
            x.data_ratio,
            x.link_bytes as f64 / (1 << 20) as f64,
            if x.compressible > 0.0 { "data" } else { "link" },
            x.target
        );
    }
    let all = r.runs.iter().all(|x| x.met);
    println!(
        "{}",
        if all {
            "targets met"
        } else {
            "targets NOT met"
        }
    );
    Ok(())
}
