//! `srctl bench nbd`: what a real guest sees of a machine's disk through the host's NBD
//! export, against a plain NBD server on the same disk, in one run.
//!
//! The same two fio jobs (nbd engine) at equal durability run against:
//! 1. `nbdkit`: Debian's reference NBD server, `nbdkit file` over a file in the lab's
//!    directory (the same filesystem), the baseline;
//! 2. `unprotected`: vm1's export while vm1 is not replicated (the export and the capture
//!    path: activity log, disk file);
//! 3. `protected`: vm1's export while it replicates to Azure (a policy with verification
//!    off, as at scale), with the capture -> target lag meanwhile.
//!
//! Jobs: `seq` sequential 1 MiB writes with a flush every 16 writes; `rand` random 4 KiB
//! writes at queue depth 16 with a flush every 64. Each variant runs `runs` times,
//! interleaved (nbdkit, unprotected, protected, nbdkit, ...), and the median is reported with
//! its ratio to nbdkit's median, and the bytes the lab's processes wrote to storage per byte
//! written while protected (the block device's count, with `/proc/PID/io` as a breakdown). Last, once the protected runs' backlog has drained, `seq`
//! runs on the protected export paced at half its median rate, and the capture -> target lag
//! p99 at its end (over its last 10 s) is reported.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use crate::item;

/// One fio job's result.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct FioResult {
    pub mb_per_s: f64,
    pub iops: f64,
    pub p99_ms: f64,
    /// Bytes the job wrote.
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VariantResult {
    pub variant: String,
    pub job: String,
    /// Medians over the runs.
    pub median: FioResult,
    /// Each run.
    pub runs: Vec<FioResult>,
    /// Median throughput and IOPS over nbdkit's; p99 latency over nbdkit's.
    pub throughput_ratio: f64,
    pub p99_ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct NbdReport {
    pub size_bytes: u64,
    pub seconds_per_run: u64,
    pub results: Vec<VariantResult>,
    /// Capture -> target-journal lag p99 of vm1 while the protected runs wrote (ms, worst).
    pub protected_lag_p99_ms: f64,
    /// The `seq` job on the protected export paced at half its median rate, and the lag
    /// p99 (last 10 s) at its end.
    pub half_rate: FioResult,
    pub half_rate_lag_p99_ms: f64,
    /// Bytes the lab's processes wrote to storage while the protected runs wrote (until their
    /// backlog drained), by process, as the kernel attributed them ([`crate::bench_disk`]; it
    /// over-counts the host's many small fsynced activity-log writes).
    pub protected_written: Vec<(String, u64)>,
    /// Bytes the lab's block device took meanwhile, less nbdkit's runs of that phase, per
    /// byte fio wrote through the protected export (0 where no block device holds the lab).
    pub protected_write_amplification: f64,
}

const JOBS: [&str; 2] = ["seq", "rand"];
const VARIANTS: [&str; 3] = ["nbdkit", "unprotected", "protected"];

fn fio_job(job: &str, uri: &str, size: u64, seconds: u64) -> Vec<String> {
    let mut a = vec![
        format!("--name={job}"),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        format!("--size={size}"),
        "--time_based".into(),
        format!("--runtime={seconds}"),
        "--output-format=json".into(),
    ];
    match job {
        "seq" => a.extend(["--rw=write", "--bs=1M", "--iodepth=4", "--fsync=16"].map(String::from)),
        _ => a.extend(
            [
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--fsync=64",
                "--randrepeat=0",
            ]
            .map(String::from),
        ),
    }
    a
}

fn run_fio(
    job: &str,
    uri: &str,
    size: u64,
    seconds: u64,
    rate_mb_s: Option<f64>,
) -> anyhow::Result<FioResult> {
    let out = Command::new("fio")
        .args(fio_job(job, uri, size, seconds))
        .args(rate_mb_s.map(|r| format!("--rate={}k", (r * 1000.0) as u64)))
        .output()
        .context("running fio (Debian package `fio`)")?;
    if !out.status.success() {
        bail!(
            "fio {job} on {uri}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // fio may print notes before its JSON.
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap_or(0)..])
        .with_context(|| format!("fio's JSON: {text}"))?;
    let w = &v["jobs"][0]["write"];
    Ok(FioResult {
        mb_per_s: w["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        iops: w["iops"].as_f64().unwrap_or(0.0),
        p99_ms: w["clat_ns"]["percentile"]["99.000000"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e6,
        bytes: w["io_bytes"].as_u64().unwrap_or(0),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// nbdkit serving `file` on a Unix socket, stopped when dropped.
struct Nbdkit {
    child: std::process::Child,
    uri: String,
}

impl Nbdkit {
    fn start(file: &Path, socket: &Path) -> anyhow::Result<Nbdkit> {
        let child = Command::new("nbdkit")
            .args(["--foreground", "--unix"])
            .arg(socket)
            .arg("file")
            .arg(file)
            .spawn()
            .context("starting nbdkit (Debian package `nbdkit`)")?;
        let uri = format!("nbd+unix:///?socket={}", socket.display());
        for _ in 0..200 {
            if socket.exists() {
                return Ok(Nbdkit { child, uri });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        bail!("nbdkit did not create {}", socket.display())
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn run(
    size: u64,
    runs: usize,
    seconds: u64,
    progress: bool,
) -> anyhow::Result<NbdReport> {
    for (tool, package) in [("fio", "fio"), ("nbdkit", "nbdkit")] {
        if crate::vm::which(tool).is_none() {
            bail!("bench nbd needs {tool}: install the Debian package `{package}`");
        }
    }
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    crate::bench::in_temp_lab(size, progress, |dir: PathBuf| async move {
        let file = dir.join("nbdkit.img");
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(size))
            .with_context(|| format!("creating {}", file.display()))?;
        let nbdkit = Nbdkit::start(&file, &dir.join("nbdkit.sock"))?;
        let ours = crate::vm::exports(&dir, "vm1", Some("disk0")).await?[0]
            .uri
            .clone();
        let mut samples: Vec<Vec<Vec<FioResult>>> =
            vec![vec![Vec::new(); JOBS.len()]; VARIANTS.len()];
        let mut lag = 0f64;
        let mut io0 = Vec::new();
        let mut dev0 = None;
        // Unprotected runs first (nbdkit interleaved), then vm1 is protected and the protected
        // runs follow (nbdkit interleaved again).
        for phase in ["unprotected", "protected"] {
            if phase == "protected" {
                // The lab's defaults, without the digests of every disk at every point.
                crate::item::create_policy(
                    &dir,
                    failback_proto::pb::operator::Policy {
                        name: "bench-nbd".into(),
                        rpo_threshold_s: 60,
                        retention_s: 600,
                        crash_interval_s: 5,
                        app_interval_s: 30,
                        failback_of: String::new(),
                        verification: failback_proto::pb::operator::Verification::Off as i32,
                    },
                    false,
                )
                .await?;
                if progress {
                    eprintln!("bench: protecting vm1");
                }
                crate::bench::enable_and_wait(&dir, "bench-nbd", Duration::from_millis(200))
                    .await?;
                io0 = crate::bench_disk::lab_write_bytes(&dir)?;
                dev0 = crate::bench_disk::device_bytes_written(&dir);
            }
            for run in 0..runs {
                for (j, job) in JOBS.iter().enumerate() {
                    for (v, variant) in VARIANTS.iter().enumerate() {
                        let uri = match *variant {
                            "nbdkit" => nbdkit.uri.clone(),
                            other if other == phase => ours.clone(),
                            _ => continue,
                        };
                        if progress {
                            eprintln!("bench: {variant} {job} run {}", run + 1);
                        }
                        let job = job.to_string();
                        let r = tokio::task::spawn_blocking(move || {
                            run_fio(&job, &uri, size, seconds, None)
                        })
                        .await??;
                        samples[v][j].push(r);
                        if *variant == "protected" {
                            let items = item::list(&dir, "vm1").await?;
                            lag = items.iter().map(|i| i.lag_p99_ms).fold(lag, f64::max);
                        }
                    }
                }
            }
        }
        drop(nbdkit);
        // The guest at half the rate replication kept up with: the lag it sees then, once the
        // unpaced runs' backlog has drained (else the lag measured is the draining's).
        let half = summarize(&samples[2][0]).mb_per_s / 2.0;
        let uri = ours.clone();
        if progress {
            eprintln!("bench: waiting for the backlog to drain");
        }
        wait_drained(&dir).await?;
        let protected_written =
            crate::bench_disk::written_between(&io0, &crate::bench_disk::lab_write_bytes(&dir)?);
        nix::unistd::sync();
        let device = dev0
            .zip(crate::bench_disk::device_bytes_written(&dir))
            .map(|(a, b)| b.saturating_sub(a));
        // nbdkit's runs of the protected phase wrote their file on the same device.
        let nbdkit_bytes: u64 = samples[0]
            .iter()
            .map(|runs| runs[runs.len() / 2..].iter().map(|r| r.bytes).sum::<u64>())
            .sum();
        let fio_bytes: u64 = samples[2].iter().flatten().map(|r| r.bytes).sum();
        let protected_write_amplification = match device {
            Some(d) if fio_bytes > 0 => d.saturating_sub(nbdkit_bytes) as f64 / fio_bytes as f64,
            _ => 0.0,
        };
        if progress {
            eprintln!("bench: protected seq at {half:.0} MB/s");
        }
        let paced = tokio::task::spawn_blocking(move || {
            run_fio("seq", &uri, size, seconds.max(10), Some(half))
        })
        .await??;
        let half_lag = item::list(&dir, "vm1")
            .await?
            .iter()
            .map(|i| i.lag_p99_ms)
            .fold(0.0, f64::max);
        let mut results = Vec::new();
        for (j, job) in JOBS.iter().enumerate() {
            let base = summarize(&samples[0][j]);
            for (v, variant) in VARIANTS.iter().enumerate() {
                let m = summarize(&samples[v][j]);
                results.push(VariantResult {
                    variant: variant.to_string(),
                    job: job.to_string(),
                    median: m,
                    runs: samples[v][j].clone(),
                    throughput_ratio: if base.mb_per_s > 0.0 {
                        m.mb_per_s / base.mb_per_s
                    } else {
                        0.0
                    },
                    p99_ratio: if base.p99_ms > 0.0 {
                        m.p99_ms / base.p99_ms
                    } else {
                        0.0
                    },
                });
            }
        }
        Ok(NbdReport {
            size_bytes: size,
            seconds_per_run: seconds,
            results,
            protected_lag_p99_ms: lag,
            half_rate: paced,
            half_rate_lag_p99_ms: half_lag,
            protected_written,
            protected_write_amplification,
        })
    })
    .await
}

/// Waits until vm1's acknowledged batch has stood still for 2 s (nothing left to send; a tag
/// may move it once), at most 2 minutes.
async fn wait_drained(dir: &Path) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut last = (0u64, tokio::time::Instant::now());
    loop {
        let acked = item::list(dir, "vm1")
            .await?
            .first()
            .map(|i| i.acked_seq)
            .unwrap_or_default();
        let now = tokio::time::Instant::now();
        if acked != last.0 {
            last = (acked, now);
        } else if now - last.1 >= Duration::from_secs(2) {
            return Ok(());
        }
        if now > deadline {
            bail!("vm1's replication backlog did not drain within 2 minutes");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn summarize(runs: &[FioResult]) -> FioResult {
    FioResult {
        mb_per_s: median(runs.iter().map(|r| r.mb_per_s).collect()),
        iops: median(runs.iter().map(|r| r.iops).collect()),
        p99_ms: median(runs.iter().map(|r| r.p99_ms).collect()),
        bytes: runs.iter().map(|r| r.bytes).sum(),
    }
}

pub fn print(r: &NbdReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    println!(
        "fio through NBD, {} MiB, {} s a run, medians over the runs (nbdkit runs beside both phases)",
        r.size_bytes >> 20,
        r.seconds_per_run,
    );
    println!(
        "{:<5} {:<12} {:>9} {:>9} {:>9} {:>8} {:>8}  RUNS (MB/s)",
        "JOB", "EXPORT", "MB/s", "IOPS", "p99 ms", "x nbdkit", "p99 x"
    );
    for v in &r.results {
        println!(
            "{:<5} {:<12} {:>9.1} {:>9.0} {:>9.2} {:>8.2} {:>8.2}  {}",
            v.job,
            v.variant,
            v.median.mb_per_s,
            v.median.iops,
            v.median.p99_ms,
            v.throughput_ratio,
            v.p99_ratio,
            v.runs
                .iter()
                .map(|r| format!("{:.0}", r.mb_per_s))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    println!(
        "capture -> target lag p99 while protected: {:.0} ms",
        r.protected_lag_p99_ms
    );
    if r.protected_write_amplification > 0.0 {
        let by: Vec<String> = r
            .protected_written
            .iter()
            .map(|(name, b)| format!("{name} {:.0} MB", *b as f64 / 1e6))
            .collect();
        println!(
            "written to the disk per byte written while protected (device, counted): {:.2} (by process: {})",
            r.protected_write_amplification,
            by.join(", ")
        );
    }
    println!(
        "protected seq paced at half that rate: {:.1} MB/s, p99 {:.2} ms, lag p99 {:.0} ms",
        r.half_rate.mb_per_s, r.half_rate.p99_ms, r.half_rate_lag_p99_ms
    );
    Ok(())
}
