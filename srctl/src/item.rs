//! `srctl item ...`, `srctl policy ...`, `srctl workload ...`: replicated items, replication
//! policies and the machines' workload generators.

use std::path::Path;

use failback_proto::pb::operator::{
    EnableItemRequest, FailoverRequest, Item, ItemRequest, Job, JobRequest, ListItemsRequest,
    ListPoliciesRequest, Policy, Verification, VerifyRequest, VerifyResponse, WorkloadRequest,
};
use serde_json::json;

use crate::client::{operator, status_message};

fn err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", status_message(&s))
}

/// Starts "Enable protection"; returns its job as started (it ends when the item is
/// Protected: follow it with [`watch`]).
pub async fn enable(dir: &Path, req: EnableItemRequest) -> anyhow::Result<Job> {
    Ok(operator(dir)
        .await?
        .enable_item(req)
        .await
        .map_err(err)?
        .into_inner())
}

/// Starts "Disable replication"; returns its job as started.
pub async fn disable(dir: &Path, machine: &str) -> anyhow::Result<Job> {
    Ok(operator(dir)
        .await?
        .disable_item(ItemRequest {
            machine: machine.into(),
        })
        .await
        .map_err(err)?
        .into_inner())
}

pub async fn list(dir: &Path, machine: &str) -> anyhow::Result<Vec<Item>> {
    Ok(operator(dir)
        .await?
        .list_items(ListItemsRequest {
            machine: machine.to_string(),
        })
        .await
        .map_err(err)?
        .into_inner()
        .items)
}

pub async fn verify(dir: &Path, machine: &str, point: &str) -> anyhow::Result<VerifyResponse> {
    Ok(operator(dir)
        .await?
        .verify(VerifyRequest {
            machine: machine.to_string(),
            point: point.to_string(),
        })
        .await
        .map_err(err)?
        .into_inner())
}

/// Starts "Resynchronize"; returns its job as started.
pub async fn resync(dir: &Path, machine: &str) -> anyhow::Result<Job> {
    Ok(operator(dir)
        .await?
        .resync(failback_proto::pb::operator::ResyncRequest {
            machine: machine.to_string(),
        })
        .await
        .map_err(err)?
        .into_inner())
}

/// `item switch-ps`: the "Switch process server" job.
pub async fn switch_ps(dir: &Path, machine: &str, process_server: &str) -> anyhow::Result<Job> {
    Ok(operator(dir)
        .await?
        .switch_process_server(failback_proto::pb::operator::SwitchPsRequest {
            machine: machine.to_string(),
            process_server: process_server.to_string(),
        })
        .await
        .map_err(err)?
        .into_inner())
}

pub async fn workload(dir: &Path, req: WorkloadRequest) -> anyhow::Result<()> {
    operator(dir).await?.workload(req).await.map_err(err)?;
    Ok(())
}

pub async fn policies(dir: &Path) -> anyhow::Result<Vec<Policy>> {
    Ok(operator(dir)
        .await?
        .list_policies(ListPoliciesRequest {})
        .await
        .map_err(err)?
        .into_inner()
        .policies)
}

pub async fn create_policy(dir: &Path, p: Policy, update: bool) -> anyhow::Result<Policy> {
    let mut c = operator(dir).await?;
    let r = if update {
        c.update_policy(p).await
    } else {
        c.create_policy(p).await
    };
    Ok(r.map_err(err)?.into_inner())
}

pub fn item_json(i: &Item) -> serde_json::Value {
    json!({
        "id": i.id,
        "machine": i.machine,
        "direction": i.direction,
        "state": i.state,
        "health": i.health,
        "health_errors": i.health_errors,
        "process_server": i.process_server,
        "target": i.target,
        "policy": i.policy,
        "replication_group": i.replication_group,
        "rpo_seconds": i.rpo_seconds,
        "initial_percent": i.initial_percent,
        "bytes_replicated": i.bytes_replicated,
        "bytes_per_second": i.bytes_per_second,
        "acked_seq": i.acked_seq,
        "resync_bytes": i.resync_bytes,
        "target_seq": i.target_seq,
        "lag_p50_ms": i.lag_p50_ms,
        "lag_p99_ms": i.lag_p99_ms,
        "resync_blocks_compared": i.resync_blocks_compared,
        "disks": i.disks.iter().map(|d| json!({
            "id": d.id, "size_bytes": d.size_bytes, "state": d.state, "percent": d.percent,
        })).collect::<Vec<_>>(),
        "recovery_points": i.points.iter().map(|p| json!({
            "id": p.id, "time_ms": p.time_ms, "kind": p.kind, "seq": p.seq,
        })).collect::<Vec<_>>(),
    })
}

fn state_line(i: &Item) -> String {
    if i.state.starts_with("Initial replication") {
        format!("{} ({:.0} %)", i.state, i.initial_percent)
    } else {
        i.state.clone()
    }
}

pub fn print_list(items: &[Item], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&items.iter().map(item_json).collect::<Vec<_>>())?
        );
        return Ok(());
    }
    println!(
        "{:<8} {:<8} {:<9} {:<40} {:<8} {:>8} {:<10} {:<13} {:>6}",
        "MACHINE", "ITEM", "DIRECTION", "STATE", "HEALTH", "RPO", "PS", "TARGET", "POINTS"
    );
    for i in items {
        println!(
            "{:<8} {:<8} {:<9} {:<40} {:<8} {:>7.1}s {:<10} {:<13} {:>6}",
            i.machine,
            i.id,
            i.direction,
            state_line(i),
            i.health,
            i.rpo_seconds,
            i.process_server,
            i.target,
            i.points.len()
        );
    }
    Ok(())
}

pub fn print_show(i: &Item, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!("{}", serde_json::to_string_pretty(&item_json(i))?);
        return Ok(());
    }
    println!(
        "item            {} ({} replication of {})",
        i.id, i.direction, i.machine
    );
    println!("state           {}", state_line(i));
    println!("health          {}", i.health);
    for e in &i.health_errors {
        println!("                {e}");
    }
    println!("RPO             {:.1} s", i.rpo_seconds);
    println!(
        "route           {} -> {} -> {}",
        i.machine, i.process_server, i.target
    );
    println!("policy          {}", i.policy);
    if !i.replication_group.is_empty() {
        println!("group           {}", i.replication_group);
    }
    println!(
        "replicated      {} bytes, {:.1} MB/s now, batch {}",
        i.bytes_replicated,
        i.bytes_per_second / 1e6,
        i.acked_seq
    );
    println!(
        "lag             p50 {:.0} ms, p99 {:.0} ms (capture -> target journal, last 10 s); target at batch {}",
        i.lag_p50_ms, i.lag_p99_ms, i.target_seq
    );
    if i.resync_blocks_compared > 0 {
        println!(
            "last resync     {} blocks compared, {} bytes differed and were sent",
            i.resync_blocks_compared, i.resync_bytes
        );
    }
    println!("disks");
    for d in &i.disks {
        println!(
            "  {:<10} {:>12} B  {:<12} {:>5.1} %",
            d.id, d.size_bytes, d.state, d.percent
        );
    }
    println!("recovery points ({})", i.points.len());
    for p in i.points.iter().rev().take(20) {
        println!(
            "  {:<22} {:<15} {}",
            p.id,
            p.kind,
            humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(p.time_ms.max(0) as u64)
            )
        );
    }
    Ok(())
}

/// A policy's verification mode as the user types it (`--verification`).
pub fn verification_label(v: i32) -> &'static str {
    match Verification::try_from(v) {
        Ok(Verification::Off) => "off",
        _ => "digests",
    }
}

pub fn print_policies(ps: &[Policy], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        let v: Vec<_> = ps
            .iter()
            .map(|p| json!({
                "name": p.name, "rpo_threshold_s": p.rpo_threshold_s, "retention_s": p.retention_s,
                "crash_interval_s": p.crash_interval_s, "app_interval_s": p.app_interval_s,
                "failback_of": p.failback_of,
                "verification": verification_label(p.verification),
            }))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<20} {:>10} {:>10} {:>10} {:>10} {:<8}  NOTE",
        "NAME", "RPO ALERT", "RETENTION", "CRASH", "APP", "VERIFY"
    );
    for p in ps {
        println!(
            "{:<20} {:>9}s {:>9}s {:>9}s {:>10} {:<8}  {}",
            p.name,
            p.rpo_threshold_s,
            p.retention_s,
            p.crash_interval_s,
            if p.app_interval_s == 0 {
                "off".to_string()
            } else {
                format!("{}s", p.app_interval_s)
            },
            verification_label(p.verification),
            if p.failback_of.is_empty() {
                String::new()
            } else {
                format!("failback policy of {} (not editable)", p.failback_of)
            }
        );
    }
    Ok(())
}

/// Starts a failover job; returns it as started.
pub async fn start_failover(dir: &Path, req: FailoverRequest) -> anyhow::Result<Job> {
    Ok(operator(dir)
        .await?
        .failover(req)
        .await
        .map_err(err)?
        .into_inner())
}

/// Runs a failover job to its end; an error if it failed.
pub async fn failover(dir: &Path, req: FailoverRequest) -> anyhow::Result<Job> {
    let job = start_failover(dir, req).await?;
    succeeded(watch(dir, job.id, false).await?)
}

/// `job` if it succeeded, else its error.
pub fn succeeded(job: Job) -> anyhow::Result<Job> {
    if job.state == "Succeeded" {
        Ok(job)
    } else {
        anyhow::bail!(
            "job {} {} ({}) {}: {}",
            job.id,
            job.name,
            job.item,
            job.state,
            job.error
        )
    }
}

pub async fn reprotect(
    dir: &Path,
    req: failback_proto::pb::operator::ReprotectRequest,
) -> anyhow::Result<failback_proto::pb::operator::Job> {
    Ok(operator(dir)
        .await?
        .reprotect(req)
        .await
        .map_err(err)?
        .into_inner())
}

pub async fn delete_vm(dir: &Path, machine: &str, host: &str) -> anyhow::Result<()> {
    operator(dir)
        .await?
        .delete_machine(failback_proto::pb::operator::DeleteMachineRequest {
            machine: machine.into(),
            host: host.into(),
        })
        .await
        .map_err(err)?;
    Ok(())
}

/// How long [`watch`] keeps trying to re-attach to a CS that does not answer.
const REATTACH_FOR: std::time::Duration = std::time::Duration::from_secs(120);

/// Follows job `id` until it ends and returns it; with `print`, its steps as they complete
/// (and the running one on a terminal, with its progress). The job runs on the CS whatever
/// happens here; if the CS restarts, this re-attaches.
pub async fn watch(dir: &Path, id: i64, print: bool) -> anyhow::Result<Job> {
    watch_with(dir, id, print, |_| {}).await
}

/// [`watch`], calling `on_update` with every state of the job it sees.
pub async fn watch_with(
    dir: &Path,
    id: i64,
    print: bool,
    mut on_update: impl FnMut(&Job),
) -> anyhow::Result<Job> {
    use std::io::IsTerminal;
    // Synchronisation steps get a bar of the item's progress; other steps a spinner with the
    // step's elapsed time (their progress is not measurable, so no bar pretends it is).
    let sync_style =
        indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {percent:>3}% {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
    let step_style = indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
    let bar = (print && std::io::stdout().is_terminal()).then(|| {
        let pb = indicatif::ProgressBar::new(1000).with_style(step_style.clone());
        pb.enable_steady_tick(std::time::Duration::from_millis(100));
        pb
    });
    let mut running_step = String::new();
    let mut printed = 0usize;
    let mut lost_since: Option<std::time::Instant> = None;
    loop {
        let stream = match operator(dir).await {
            Ok(mut c) => c.watch_job(JobRequest { id }).await.map_err(err),
            Err(e) => Err(e),
        };
        let mut stream = match stream {
            Ok(s) => {
                lost_since = None;
                s.into_inner()
            }
            Err(e) => {
                let since = *lost_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > REATTACH_FOR || e.to_string().contains("no job") {
                    return Err(e);
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                continue;
            }
        };
        loop {
            let job = match stream.message().await {
                Ok(Some(job)) => job,
                // The CS went away (a restart): re-attach.
                Ok(None) | Err(_) => break,
            };
            on_update(&job);
            let mut prev = if printed == 0 {
                job.started_ms
            } else {
                job.steps
                    .get(printed - 1)
                    .map(|s| s.time_ms)
                    .unwrap_or(job.started_ms)
            };
            for s in job.steps.iter().skip(printed) {
                if s.state == "In progress" || s.state == "Waiting" {
                    if let Some(pb) = &bar {
                        let measured = s.progress.is_some();
                        if running_step != s.name {
                            running_step = s.name.clone();
                            pb.set_style(if measured {
                                sync_style.clone()
                            } else {
                                step_style.clone()
                            });
                            pb.reset_elapsed();
                        }
                        pb.set_message(if s.state == "Waiting" {
                            format!("{} (waiting: `srctl job resume {}`)", s.name, job.id)
                        } else {
                            s.name.clone()
                        });
                        if let Some(p) = s.progress {
                            pb.set_style(sync_style.clone());
                            pb.set_position((p * 1000.0) as u64);
                        }
                    }
                    break;
                }
                if print {
                    let line = format!(
                        "  {:<11} {:>6.2} s  {}",
                        s.state,
                        (s.time_ms - prev).max(0) as f64 / 1000.0,
                        s.name
                    );
                    match &bar {
                        Some(pb) => pb.println(line),
                        None => println!("{line}"),
                    }
                }
                prev = s.time_ms;
                printed += 1;
            }
            if job.state != "In progress" && job.state != "Waiting" {
                if let Some(pb) = &bar {
                    pb.finish_and_clear();
                }
                if print {
                    print_job_summary(&job);
                }
                return Ok(job);
            }
        }
    }
}

/// Starts "Commit"; returns its job as started.
pub async fn start_commit(dir: &Path, machine: &str) -> anyhow::Result<Job> {
    Ok(operator(dir)
        .await?
        .commit(ItemRequest {
            machine: machine.into(),
        })
        .await
        .map_err(err)?
        .into_inner())
}

/// Runs "Commit" to its end; an error if it failed.
pub async fn commit(dir: &Path, machine: &str) -> anyhow::Result<Job> {
    let job = start_commit(dir, machine).await?;
    succeeded(watch(dir, job.id, false).await?)
}

/// Starts "Cleanup test failover"; returns its job as started.
pub async fn start_cleanup_test(dir: &Path, machine: &str) -> anyhow::Result<Job> {
    Ok(operator(dir)
        .await?
        .cleanup_test_failover(ItemRequest {
            machine: machine.into(),
        })
        .await
        .map_err(err)?
        .into_inner())
}

/// Runs "Cleanup test failover" to its end; an error if it failed.
pub async fn cleanup_test(dir: &Path, machine: &str) -> anyhow::Result<Job> {
    let job = start_cleanup_test(dir, machine).await?;
    succeeded(watch(dir, job.id, false).await?)
}

/// `job resume ID`.
pub async fn resume_job(dir: &Path, id: i64) -> anyhow::Result<Job> {
    Ok(operator(dir)
        .await?
        .resume_job(JobRequest { id })
        .await
        .map_err(err)?
        .into_inner())
}

/// Job `id` (0: every job).
pub async fn jobs(dir: &Path, id: i64) -> anyhow::Result<Vec<Job>> {
    Ok(operator(dir)
        .await?
        .list_jobs(failback_proto::pb::operator::ListJobsRequest { id, parent: 0 })
        .await
        .map_err(err)?
        .into_inner()
        .jobs)
}

/// The jobs plan job `parent` started.
pub async fn child_jobs(dir: &Path, parent: i64) -> anyhow::Result<Vec<Job>> {
    Ok(operator(dir)
        .await?
        .list_jobs(failback_proto::pb::operator::ListJobsRequest { id: 0, parent })
        .await
        .map_err(err)?
        .into_inner()
        .jobs)
}

pub fn job_json(j: &Job) -> serde_json::Value {
    json!({
        "id": j.id, "name": j.name, "item": j.item, "state": j.state,
        "started_ms": j.started_ms, "ended_ms": j.ended_ms, "error": j.error,
        "parent": j.parent,
        "steps": j.steps.iter().map(|s| json!({
            "name": s.name, "state": s.state, "time_ms": s.time_ms,
            "started_ms": s.started_ms, "ended_ms": s.ended_ms, "progress": s.progress,
        })).collect::<Vec<_>>(),
    })
}

/// A job with its steps and the time each took.
/// One line: the job, its state, how long it took, its error.
pub fn print_job_summary(j: &failback_proto::pb::operator::Job) {
    let end = if j.ended_ms > 0 {
        j.ended_ms
    } else {
        failback_common::control::now_ms()
    };
    println!(
        "job {} {} ({}): {} in {:.1} s{}",
        j.id,
        j.name,
        j.item,
        j.state,
        (end - j.started_ms) as f64 / 1000.0,
        if j.error.is_empty() {
            String::new()
        } else {
            format!(": {}", j.error)
        }
    );
}

pub fn print_job(j: &failback_proto::pb::operator::Job) {
    print_job_summary(j);
    let mut prev = j.started_ms;
    for s in &j.steps {
        println!(
            "  {:<11} {:>6.2} s  {}",
            s.state,
            (s.time_ms - prev).max(0) as f64 / 1000.0,
            s.name
        );
        prev = s.time_ms;
    }
}
