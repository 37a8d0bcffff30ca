//! `srctl drill`: the whole four-stage cycle of ASR failback on a lab, with a workload on
//! every machine, byte-exact verification at every failover and a report.
//!
//! Stages, in order (each machine in parallel within a stage):
//! 1. `enable-replication`: protect every on-premises machine (forward, to Azure).
//! 2. `failover-to-azure`: failover to the latest point with the source shut down; verify
//!    that each Azure VM's disks equal the source at the point.
//! 3. `commit-azure`: commit (recovery points deleted).
//! 4. `reprotect-to-onprem`: once each Azure VM's agent registered and made a small change,
//!    reprotect through `ps-azure` across the VPN to `mt-onprem`, original location: only
//!    blocks that differ from the old on-premises disks cross the link.
//! 5. `failback`: failover back to the original VMs (Azure VMs shut down, last changes
//!    drained); verify the on-premises disks.
//! 6. `commit-onprem`: commit (the Azure VMs and their disks are deleted).
//! 7. `reprotect-to-azure`: protect the on-premises machines to Azure again (delta against the
//!    previous Azure replica); verify a recovery point taken afterwards.
//!
//! For each stage the report gives its duration and the bytes that crossed vpn-link during
//! it; overall the integrity checks and mismatches, and the replication lag (capture ->
//! target journal) p50/p99 per direction. A failed stage ends the drill; the rest are
//! reported as not run.
//!
//! With `--plan` the machines go into one recovery plan (`drill`, up to 100 machines spread
//! over 7 groups) once protected, and every later stage runs through it: plan failover at
//! latest-processed (groups in order), plan commit, plan reprotect (no master target named:
//! the CS fills the on-premises master targets in order, 60 disks each). A plan job cut
//! short by a fault is run again; members already done are skipped.
//!
//! With `--guest` ([`crate::guest`]) real software (fio, or ext4 with SQLite) writes through
//! the machines' NBD exports instead of the workload generator, and is checked by its own
//! tools after the failover and after the failback.
//!
//! With a scenario ([`crate::scenario`]) faults are injected at their stages by tasks running
//! beside the drill; every operation is then retried until the stage's time limit (a refused
//! or interrupted step changes nothing, and running it again completes it), and the report
//! lists each fault: when it was injected and undone, and how long until replication was
//! healthy again. Every fault still active when the drill ends is undone first.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use failback_proto::pb::operator::{
    EnableItemRequest, FailoverRequest, Item, ReprotectRequest, WorkloadRequest,
};
use serde::Serialize;

use anyhow::Context;

use crate::guest::{Guest, GuestCheck, GuestKind};
use crate::scenario::{Fault, FaultReport, Scenario, Trigger, Until};
use crate::{infra, item, lab, link};

pub use crate::stages::STAGES;

/// How long a scenario run retries a refused step before the stage fails with the refusal.
const RETRY_FOR: Duration = Duration::from_secs(60);
/// How long any one wait of the drill may take before the stage fails.
const STAGE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long `wait_state` waits, once the state is reached, for every item to report a lag.
const LAG_GRACE: Duration = Duration::from_secs(5);
/// The recovery plan of `--plan`.
const PLAN: &str = "drill";

#[derive(Debug, Clone)]
pub struct DrillOptions {
    /// Machines of the lab the drill starts.
    pub machines: usize,
    /// With a running lab: only these machines (empty: every on-premises machine).
    pub only: Vec<String>,
    pub disk_size: u64,
    /// Use this running lab instead of starting one in a temporary directory.
    pub lab: Option<PathBuf>,
    /// Write rate of each machine's workload (MB/s).
    pub rate_mb_s: f64,
    /// Show progress on the terminal.
    pub progress: bool,
    /// Faults to inject.
    pub scenario: Option<Scenario>,
    /// Write the HTML report with plots here.
    pub report: Option<PathBuf>,
    /// Real software on the machines' disks instead of the workload generator, checked by
    /// its own tools after every failover ([`crate::guest`]).
    pub guest: Option<GuestKind>,
    /// Every failover, commit and reprotect through one recovery plan of the machines.
    pub plan: bool,
}

impl Default for DrillOptions {
    fn default() -> Self {
        DrillOptions {
            machines: 2,
            only: Vec::new(),
            disk_size: 64 << 20,
            lab: None,
            rate_mb_s: 2.0,
            progress: false,
            scenario: None,
            report: None,
            guest: None,
            plan: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    pub name: String,
    pub ok: bool,
    /// When it began, in seconds since the drill began.
    pub started_at_s: f64,
    pub seconds: f64,
    /// Bytes that crossed vpn-link (both ways) during the stage.
    pub link_bytes: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// What the stage did, in a few words (e.g. "2 blocks differed").
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Lag {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub samples: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    pub ok: bool,
    pub lab: String,
    pub machines: Vec<String>,
    pub disk_size_bytes: u64,
    pub stages: Vec<StageReport>,
    pub integrity_checks: u64,
    pub integrity_mismatches: u64,
    /// Replication lag per direction: `forward` (to Azure) and `reverse` (to on-premises).
    pub lag: std::collections::BTreeMap<String, Lag>,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scenario: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub faults: Vec<FaultReport>,
    /// With `--guest`: what runs on the machines, and each check by its own tools.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub guest_checks: Vec<GuestCheck>,
    /// What was sampled each second (with `--report`), for the HTML report's plots.
    #[serde(skip)]
    pub timeline: crate::timeline::Timeline,
}

/// Lag samples (p50, p99) per direction.
#[derive(Default)]
struct LagSamples {
    forward: Vec<(f64, f64)>,
    reverse: Vec<(f64, f64)>,
}

impl LagSamples {
    fn add(&mut self, items: &[Item]) {
        for i in items.iter().filter(|i| i.lag_p99_ms > 0.0) {
            let v = if i.direction == "reverse" {
                &mut self.reverse
            } else {
                &mut self.forward
            };
            v.push((i.lag_p50_ms, i.lag_p99_ms));
        }
    }

    fn summary(v: &[(f64, f64)]) -> Lag {
        let mut p50: Vec<f64> = v.iter().map(|s| s.0).collect();
        p50.sort_by(f64::total_cmp);
        Lag {
            p50_ms: p50.get(p50.len() / 2).copied().unwrap_or(0.0),
            p99_ms: v.iter().map(|s| s.1).fold(0.0, f64::max),
            samples: v.len(),
        }
    }
}

/// The drill's state while it runs.
struct Drill {
    dir: PathBuf,
    machines: Vec<String>,
    rate: f64,
    checks: u64,
    mismatches: u64,
    lag: LagSamples,
    bar: Option<indicatif::ProgressBar>,
    /// Retry failed operations (faults are being injected).
    retry: bool,
    /// Real guests (one per machine), instead of the workload generator.
    guests: Vec<Guest>,
    guest_checks: Vec<GuestCheck>,
    /// The recovery plan every stage after enabling runs through (`--plan`).
    plan: Option<String>,
}

/// When each stage started and ended, shared with the fault tasks.
#[derive(Default)]
struct Clock {
    stages: Mutex<HashMap<String, (Instant, Option<Instant>)>>,
}

impl Clock {
    fn start(&self, stage: &str) {
        self.stages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(stage.into(), (Instant::now(), None));
    }

    fn end(&self, stage: &str) {
        if let Some(s) = self
            .stages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(stage)
        {
            s.1 = Some(Instant::now());
        }
    }

    fn get(&self, stage: &str) -> Option<(Instant, Option<Instant>)> {
        self.stages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(stage)
            .copied()
    }
}

fn temp_lab() -> PathBuf {
    std::env::temp_dir().join(format!(
        "failback-drill-{}-{}",
        std::process::id(),
        failback_common::control::now_ms()
    ))
}

async fn link_total(dir: &Path) -> u64 {
    link::status(dir)
        .await
        .map(|s| s.bytes_onprem_to_azure + s.bytes_azure_to_onprem)
        .unwrap_or(0)
}

/// Runs the drill; the report says whether it passed (the caller turns that into the exit
/// status). Errors are only for a lab that could not be started or found.
pub async fn run(opts: DrillOptions) -> anyhow::Result<DrillReport> {
    if opts.machines == 0 {
        anyhow::bail!("--machines must be at least 1");
    }
    if opts.plan && opts.lab.is_none() && opts.machines > crate::plan::MAX_MACHINES {
        anyhow::bail!(
            "--plan takes at most {} machines (an ASR recovery plan's limit), not {}",
            crate::plan::MAX_MACHINES,
            opts.machines
        );
    }
    // A report that can't be written is known before anything starts.
    if let Some(path) = &opts.report {
        std::fs::write(path, "")
            .map_err(|e| anyhow::anyhow!("cannot write the report to {}: {e}", path.display()))?;
    }
    if let Some(g) = opts.guest {
        g.check_tools()?;
    }
    let started = Instant::now();
    let (dir, own) = match &opts.lab {
        Some(dir) => (dir.clone(), false),
        None => (temp_lab(), true),
    };
    let env = opts
        .scenario
        .as_ref()
        .map(|s| s.env.clone())
        .unwrap_or_default();
    let bar = opts.progress.then(|| {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.enable_steady_tick(Duration::from_millis(100));
        pb
    });
    // Ctrl-C or SIGTERM ends the drill like a failed stage: the lab it started is stopped
    // (its directory kept, with the logs), never left running.
    let interrupt = tokio_util::sync::CancellationToken::new();
    tokio::spawn(failback_common::server::shutdown_on_signal(
        interrupt.clone(),
    ));
    if own {
        if let Some(pb) = &bar {
            pb.set_message(format!("starting a lab in {}", dir.display()));
        }
        let up_options = lab::UpOptions {
            topology: crate::topology::Topology::generated(opts.machines, 1, opts.disk_size)
                .map_err(anyhow::Error::msg)?,
            timeout: Duration::from_secs(60),
            env,
            prometheus: false,
        };
        let up = lab::up(&dir, &up_options);
        tokio::select! {
            r = up => { r?; }
            () = interrupt.cancelled() => {
                let _ = lab::down(&dir).await;
                anyhow::bail!("interrupted while the lab started; stopped it (logs in {})", dir.display());
            }
        }
    }
    let (machines, disk_size) = if own {
        (
            (1..=opts.machines).map(|i| format!("vm{i}")).collect(),
            opts.disk_size,
        )
    } else {
        onprem_machines(&dir, &opts.only).await?
    };
    if opts.plan && machines.len() > crate::plan::MAX_MACHINES {
        anyhow::bail!(
            "--plan takes at most {} machines (an ASR recovery plan's limit); the lab has \
             {}: pick some with --only",
            crate::plan::MAX_MACHINES,
            machines.len()
        );
    }
    let mut drill = Drill {
        dir: dir.clone(),
        machines: machines.clone(),
        rate: opts.rate_mb_s,
        checks: 0,
        mismatches: 0,
        lag: LagSamples::default(),
        bar,
        retry: opts.scenario.is_some(),
        guests: opts
            .guest
            .map(|kind| {
                machines
                    .iter()
                    .map(|m| Guest::new(kind, m, &dir, disk_size))
                    .collect()
            })
            .unwrap_or_default(),
        guest_checks: Vec::new(),
        plan: opts.plan.then(|| PLAN.to_string()),
    };
    let clock = Arc::new(Clock::default());
    let done = tokio_util::sync::CancellationToken::new();
    let sampler = opts
        .report
        .is_some()
        .then(|| crate::timeline::start(dir.clone(), machines.clone(), started, done.clone()));
    let fault_tasks: Vec<_> = opts
        .scenario
        .iter()
        .flat_map(|s| s.faults.iter().cloned())
        .map(|f| {
            tokio::spawn(run_fault(
                dir.clone(),
                machines.clone(),
                f,
                clock.clone(),
                started,
                done.clone(),
            ))
        })
        .collect();
    let mut stages = Vec::new();
    let mut failed = false;
    for name in STAGES {
        if failed {
            stages.push(StageReport {
                name: name.into(),
                ok: false,
                started_at_s: started.elapsed().as_secs_f64(),
                seconds: 0.0,
                link_bytes: 0,
                error: "not run: an earlier stage failed".into(),
                detail: String::new(),
            });
            continue;
        }
        if let Some(pb) = &drill.bar {
            pb.set_message(format!("{name} ..."));
        }
        let link0 = link_total(&dir).await;
        let t0 = Instant::now();
        clock.start(name);
        let result = tokio::select! {
            r = tokio::time::timeout(STAGE_TIMEOUT, drill.stage(name)) => match r {
                Ok(r) => r,
                Err(_) => Err(anyhow::anyhow!("timed out after {STAGE_TIMEOUT:?}")),
            },
            () = interrupt.cancelled() => Err(anyhow::anyhow!("interrupted")),
        };
        clock.end(name);
        let report = StageReport {
            name: name.into(),
            ok: result.is_ok(),
            started_at_s: t0.duration_since(started).as_secs_f64(),
            seconds: t0.elapsed().as_secs_f64(),
            link_bytes: link_total(&dir).await.saturating_sub(link0),
            error: result
                .as_ref()
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default(),
            detail: result.unwrap_or_default(),
        };
        failed = !report.ok;
        if let Some(pb) = &drill.bar {
            pb.println(stage_line(&report));
        }
        stages.push(report);
    }
    // Faults still active are undone; their tasks end.
    done.cancel();
    let mut faults = Vec::new();
    for t in fault_tasks {
        if let Ok(r) = t.await {
            if let Some(pb) = &drill.bar {
                pb.println(fault_line(&r));
            }
            faults.push(r);
        }
    }
    let _ = drill.workloads("stop").await;
    if let Some(pb) = &drill.bar {
        pb.finish_and_clear();
    }
    let timeline = match sampler {
        Some(t) => t.await.unwrap_or_default(),
        None => Default::default(),
    };
    let mut lag = std::collections::BTreeMap::new();
    lag.insert("forward".into(), LagSamples::summary(&drill.lag.forward));
    lag.insert("reverse".into(), LagSamples::summary(&drill.lag.reverse));
    let report = DrillReport {
        ok: !failed && drill.mismatches == 0 && drill.checks > 0,
        lab: dir.display().to_string(),
        machines,
        disk_size_bytes: disk_size,
        stages,
        integrity_checks: drill.checks,
        integrity_mismatches: drill.mismatches,
        lag,
        seconds: started.elapsed().as_secs_f64(),
        scenario: opts.scenario.as_ref().map(|s| s.name.clone()),
        faults,
        guest: opts.guest.map(|g| g.as_str().to_string()),
        guest_checks: std::mem::take(&mut drill.guest_checks),
        timeline,
    };
    if own {
        let _ = lab::down(&dir).await;
        if report.ok {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(report)
}

/// The machines on the lab's on-premises host(s) (those of `only`, if given), and the size of
/// the first one's disks.
async fn onprem_machines(dir: &Path, only: &[String]) -> anyhow::Result<(Vec<String>, u64)> {
    let all = infra::list(dir).await?;
    let mut agents: Vec<_> = all
        .iter()
        .filter(|c| c.role == "agent" && c.site == "onprem" && c.status == "connected")
        .collect();
    agents.sort_by(|a, b| a.name.cmp(&b.name));
    let missing: Vec<&str> = only
        .iter()
        .filter(|m| !agents.iter().any(|a| &a.name == *m))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "--only: {} {} not a connected on-premises machine of the lab in {}; it has: {}",
            missing.join(", "),
            if missing.len() == 1 { "is" } else { "are" },
            dir.display(),
            agents
                .iter()
                .map(|a| a.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !only.is_empty() {
        agents.retain(|a| only.contains(&a.name));
    }
    if agents.is_empty() {
        anyhow::bail!(
            "the lab in {} has no connected on-premises machine to drill",
            dir.display()
        );
    }
    let size = agents[0].disks.iter().map(|d| d.size_bytes).sum();
    Ok((agents.iter().map(|c| c.name.clone()).collect(), size))
}

fn stage_line(s: &StageReport) -> String {
    format!(
        "{:<22} {:<6} {:>7.1} s {:>12}  {}",
        s.name,
        if s.ok { "ok" } else { "FAILED" },
        s.seconds,
        human_bytes(s.link_bytes),
        if s.ok { &s.detail } else { &s.error }
    )
}

fn fault_line(f: &FaultReport) -> String {
    let t = |v: Option<f64>| v.map(|s| format!("{s:.1} s")).unwrap_or_else(|| "-".into());
    format!(
        "fault {:<28} at {:<20} injected {:>7}  undone {:>7}  healthy after {:>7}{}",
        f.fault,
        f.stage,
        t(f.injected_at_s),
        t(f.undone_at_s),
        t(f.healthy_after_s),
        if f.error.is_empty() {
            String::new()
        } else {
            format!("  ({})", f.error)
        }
    )
}

/// The progress (0..1) of `stage`'s work for the drilled machines: the initial
/// synchronisation of the items for enabling and reprotecting (None until replication of one
/// of them started), the failover jobs' steps otherwise (None until the stage's job began).
async fn stage_progress(
    dir: &Path,
    machines: &[String],
    stage: &str,
    since_ms: i64,
) -> Option<f64> {
    let items: Vec<Item> = item::list(dir, "")
        .await
        .ok()?
        .into_iter()
        .filter(|i| machines.contains(&i.machine))
        .collect();
    let jobs = item::jobs(dir, 0).await.ok()?;
    let ours: Vec<_> = jobs
        .iter()
        .filter(|j| j.started_ms >= since_ms && items.iter().any(|i| i.id == j.item))
        .collect();
    if ours.is_empty() {
        return None;
    }
    let n = machines.len().max(1) as f64;
    Some(match stage {
        "enable-replication" | "reprotect-to-onprem" | "reprotect-to-azure" => {
            // The synchronisation's progress exists once replication started: before that a
            // fault hits the job's setup (and a drill retries it), not the replication.
            let replicating: Vec<&Item> = items
                .iter()
                .filter(|i| {
                    ours.iter().any(|j| {
                        j.item == i.id
                            && j.steps
                                .iter()
                                .any(|s| s.name == "Start replication" && s.state == "Succeeded")
                    })
                })
                .collect();
            if replicating.is_empty() {
                return None;
            }
            replicating
                .iter()
                .map(|i| {
                    if i.state == "Protected" {
                        1.0
                    } else {
                        i.initial_percent / 100.0
                    }
                })
                .sum::<f64>()
                / n
        }
        _ => {
            ours.iter()
                .map(|j| {
                    if j.state != "In progress" {
                        1.0
                    } else {
                        let done = j.steps.iter().filter(|s| s.state == "Succeeded").count();
                        (done as f64 / 6.0).min(0.99)
                    }
                })
                .sum::<f64>()
                / n
        }
    })
}

async fn apply(dir: &Path, action: &str, fault: &Fault) -> anyhow::Result<()> {
    use lab::ProcAction;
    let proc = |a| lab::control_proc(dir, &fault.target, a);
    match action {
        "kill" => proc(ProcAction::Kill).await,
        "restart" => proc(ProcAction::Restart).await,
        "pause" => proc(ProcAction::Pause).await,
        "resume" => proc(ProcAction::Resume).await,
        "link-down" => link::set_up(dir, false).await.map(|_| ()),
        "link-up" => link::set_up(dir, true).await.map(|_| ()),
        "link-set" => link::set(dir, &fault.link).await.map(|_| ()),
        "link-clear" => link::set(
            dir,
            &link::SetArgs {
                clear: true,
                ..Default::default()
            },
        )
        .await
        .map(|_| ()),
        other => anyhow::bail!("unknown action `{other}`"),
    }
}

/// Notes the drilled items' worst health and their distinct errors (at most 12).
async fn observe(dir: &Path, machines: &[String], report: &mut FaultReport) {
    let Ok(items) = item::list(dir, "").await else {
        report.health_seen = "Unknown (the CS did not answer)".into();
        return;
    };
    for i in items.iter().filter(|i| machines.contains(&i.machine)) {
        let rank = |h: &str| match h {
            "Critical" => 2,
            "Warning" => 1,
            _ => 0,
        };
        if rank(&i.health) > rank(&report.health_seen) {
            report.health_seen = i.health.clone();
        }
        for e in &i.health_errors {
            if report.errors_seen.len() < 12 && !report.errors_seen.contains(e) {
                report.errors_seen.push(e.clone());
            }
        }
    }
}

/// Healthy, or only the host's CPU or memory being busy (a 2-core lab under load).
fn healthy(i: &Item) -> bool {
    i.health == "Healthy"
        || i.health_errors
            .iter()
            .all(|e| e.contains("CPU use") || e.contains("memory use"))
}

/// Waits until every drilled machine's item is healthy; the seconds it took.
async fn healthy_after(dir: &Path, machines: &[String], from: Instant) -> Option<f64> {
    let deadline = from + Duration::from_secs(180);
    while Instant::now() < deadline {
        if let Ok(items) = item::list(dir, "").await {
            let ours: Vec<&Item> = items
                .iter()
                .filter(|i| machines.contains(&i.machine))
                .collect();
            if ours.len() == machines.len() && ours.iter().all(|i| healthy(i)) {
                return Some(from.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// Injects one fault at its stage, undoes it when due (or when the drill ends), and
/// measures how long replication took to be healthy again.
async fn run_fault(
    dir: PathBuf,
    machines: Vec<String>,
    fault: Fault,
    clock: Arc<Clock>,
    drill_start: Instant,
    done: tokio_util::sync::CancellationToken,
) -> FaultReport {
    let mut report = FaultReport {
        stage: fault.stage.clone(),
        fault: fault.describe(),
        ..Default::default()
    };
    let tick = Duration::from_millis(50);
    let since = |t: Instant| t.duration_since(drill_start).as_secs_f64();
    // Wait for the trigger; give up if the stage ends (or the drill does) first.
    loop {
        if done.is_cancelled() {
            report.error = "not injected: the drill ended before its stage".into();
            return report;
        }
        if let Some((start, end)) = clock.get(&fault.stage) {
            if end.is_some() {
                report.error = "not injected: the stage ended before the trigger".into();
                return report;
            }
            let fire = match fault.trigger {
                Trigger::After(d) => start.elapsed() >= d,
                Trigger::AtProgress(p) => {
                    let since_ms =
                        failback_common::control::now_ms() - start.elapsed().as_millis() as i64;
                    stage_progress(&dir, &machines, &fault.stage, since_ms)
                        .await
                        .is_some_and(|v| v >= p)
                }
            };
            if fire {
                break;
            }
        }
        tokio::time::sleep(tick).await;
    }
    let injected = Instant::now();
    report.injected_at_s = Some(since(injected));
    if let Err(e) = apply(&dir, &fault.action, &fault).await {
        report.error = format!("inject: {e:#}");
        return report;
    }
    let mut recover_from = injected;
    if let Some(undo) = fault.undo() {
        // While the fault lasts, note what the items' health says about it.
        loop {
            let over = match fault.until {
                Until::For(d) => injected.elapsed() >= d,
                Until::StageEnd => clock.get(&fault.stage).is_some_and(|(_, e)| e.is_some()),
                Until::Never => false,
            };
            if over || done.is_cancelled() {
                break;
            }
            observe(&dir, &machines, &mut report).await;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = done.cancelled() => {}
            }
        }
        let undone = Instant::now();
        if let Err(e) = apply(&dir, undo, &fault).await {
            report.error = format!("undo ({undo}): {e:#}");
        }
        report.undone_at_s = Some(since(undone));
        recover_from = undone;
    }
    if !done.is_cancelled() {
        report.healthy_after_s = healthy_after(&dir, &machines, recover_from).await;
    }
    report
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// Prints the report: a table, or one JSON object.
pub fn print(r: &DrillReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    println!(
        "drill of {} ({} each) in {}",
        r.machines.join(", "),
        human_bytes(r.disk_size_bytes),
        r.lab
    );
    println!(
        "{:<22} {:<6} {:>9} {:>12}  DETAIL",
        "STAGE", "RESULT", "TIME", "LINK BYTES"
    );
    for s in &r.stages {
        println!("{}", stage_line(s));
    }
    println!(
        "integrity: {} checks, {} mismatches",
        r.integrity_checks, r.integrity_mismatches
    );
    for c in &r.guest_checks {
        println!(
            "guest {} {:<6} {:<20} {:<7} {:<4} {}",
            r.guest.as_deref().unwrap_or(""),
            c.machine,
            c.stage,
            c.site,
            if c.ok { "ok" } else { "FAIL" },
            c.detail
        );
    }
    for f in &r.faults {
        println!("{}", fault_line(f));
    }
    for (dir, l) in &r.lag {
        println!(
            "lag {dir:<8} p50 {:.0} ms, p99 {:.0} ms ({} samples)",
            l.p50_ms, l.p99_ms, l.samples
        );
    }
    println!(
        "{} in {:.1} s",
        if r.ok { "drill ok" } else { "drill FAILED" },
        r.seconds
    );
    Ok(())
}

/// The active item of `machine`, if the CS answers.
async fn item_of(dir: &Path, machine: &str) -> Option<Item> {
    item::list(dir, machine)
        .await
        .ok()
        .and_then(|items| items.into_iter().find(|i| i.machine == machine))
}

impl Drill {
    fn say(&self, m: String) {
        if let Some(pb) = &self.bar {
            pb.set_message(m);
        }
    }

    /// Runs `op`; with faults injected a failure is retried every second (each operation
    /// first checks whether an earlier attempt already got through) until the stage's limit.
    async fn attempt<T, F, Fut>(&self, what: &str, mut op: F) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        // Faults last seconds; a refusal that outlasts this is not one of theirs (e.g. a master
        // target's 60-disk limit) and ends the stage with its own words, not a timeout.
        let give_up = std::time::Instant::now() + RETRY_FOR;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if self.retry && std::time::Instant::now() < give_up => {
                    self.say(format!("{what}: {e:#}; retrying"));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) if self.retry => {
                    return Err(e.context(format!(
                        "{what} (still refused after {} s of retries)",
                        RETRY_FOR.as_secs()
                    )));
                }
                Err(e) => return Err(e.context(what.to_string())),
            }
        }
    }
    /// Runs a plan job (`start` starts it) to its end, then follows every job it started to
    /// theirs. In a scenario run a plan job cut short by a fault is run again (the members
    /// already done are skipped), for up to [`RETRY_FOR`] after the first failure.
    async fn plan_job<S, Fut>(&self, what: &str, start: S) -> anyhow::Result<usize>
    where
        S: Fn() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<failback_proto::pb::operator::Job>>,
    {
        let watch = |id: i64| async move {
            tokio::time::timeout(STAGE_TIMEOUT, item::watch(&self.dir, id, false))
                .await
                .map_err(|_| anyhow::anyhow!("timed out after {STAGE_TIMEOUT:?}"))
                .and_then(|r| r)
                .and_then(item::succeeded)
        };
        let mut give_up: Option<Instant> = None;
        loop {
            let job = self.attempt(what, &start).await?;
            let outcome = async {
                watch(job.id).await?;
                let children = item::child_jobs(&self.dir, job.id).await?;
                let follow = children.iter().map(|c| async move {
                    watch(c.id).await.map_err(|e| format!("{}: {e:#}", c.item))
                });
                let failed: Vec<String> = futures::future::join_all(follow)
                    .await
                    .into_iter()
                    .filter_map(Result::err)
                    .collect();
                if !failed.is_empty() {
                    anyhow::bail!("{}", failed.join("; "));
                }
                Ok(children.len())
            }
            .await;
            match outcome {
                Ok(n) => return Ok(n),
                Err(e)
                    if self.retry
                        && *give_up.get_or_insert_with(|| Instant::now() + RETRY_FOR)
                            > Instant::now() =>
                {
                    self.say(format!("{what}: {e:#}; running the plan again"));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e.context(what.to_string())),
            }
        }
    }

    /// Starts `start` (a job) for every machine whose item `pending` says still needs it and
    /// follows the jobs to their end, all at once. A job that fails (a fault struck while it
    /// ran) is started again in a scenario run; otherwise the stage fails with its error.
    async fn run_jobs<P, S, Fut>(&self, what: &str, pending: P, start: S) -> anyhow::Result<()>
    where
        P: Fn(Option<&Item>) -> bool,
        S: Fn(String) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<failback_proto::pb::operator::Job>>,
    {
        loop {
            let mut started = Vec::new();
            for m in &self.machines {
                if !pending(item_of(&self.dir, m).await.as_ref()) {
                    continue;
                }
                let job = self
                    .attempt(&format!("{m}: {what}"), || start(m.clone()))
                    .await?;
                started.push((m.clone(), job.id));
            }
            let follow = started.iter().map(|(m, id)| async move {
                let ended = tokio::time::timeout(STAGE_TIMEOUT, item::watch(&self.dir, *id, false))
                    .await
                    .map_err(|_| anyhow::anyhow!("timed out after {STAGE_TIMEOUT:?}"))
                    .and_then(|r| r)
                    .and_then(item::succeeded);
                ended.map_err(|e| format!("{m}: {what}: {e:#}"))
            });
            let failed: Vec<String> = futures::future::join_all(follow)
                .await
                .into_iter()
                .filter_map(Result::err)
                .collect();
            if failed.is_empty() {
                return Ok(());
            }
            if !self.retry {
                anyhow::bail!("{}", failed.join("; "));
            }
            self.say(format!("{}; retrying", failed.join("; ")));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn stage(&mut self, name: &str) -> anyhow::Result<String> {
        match name {
            "enable-replication" => self.enable().await,
            "failover-to-azure" => self.failover("azure").await,
            "commit-azure" | "commit-onprem" => self.commit().await,
            "reprotect-to-onprem" => self.reprotect("azure").await,
            "failback" => self.failover("onprem").await,
            "reprotect-to-azure" => self.reprotect("onprem").await,
            other => anyhow::bail!("unknown stage `{other}`"),
        }
    }

    /// With real guests: each makes a change on the disk its machine runs on now.
    async fn guest_changes(&mut self) -> anyhow::Result<()> {
        for g in &mut self.guests {
            self.bar
                .as_ref()
                .inspect(|pb| pb.set_message(format!("{}: guest change", g.machine)));
            g.change(&self.dir).await.with_context(|| {
                format!("{}: the {} guest's change", g.machine, g.kind.as_str())
            })?;
        }
        Ok(())
    }

    /// With real guests: each checks the disk its machine runs on now (in `site`) with its
    /// own tools; a failed check is a mismatch and fails the stage.
    async fn guest_checks(&mut self, stage: &str, site: &str) -> anyhow::Result<String> {
        let mut failed = Vec::new();
        for g in &self.guests {
            self.say(format!("{}: checking the guest", g.machine));
            let (ok, detail) = match g.check(&self.dir).await {
                Ok(d) => (true, d),
                Err(e) => (false, format!("{e:#}")),
            };
            self.checks += 1;
            if !ok {
                self.mismatches += 1;
                failed.push(format!("{}: {detail}", g.machine));
            }
            self.guest_checks.push(GuestCheck {
                stage: stage.into(),
                machine: g.machine.clone(),
                site: site.into(),
                ok,
                detail,
            });
        }
        if !failed.is_empty() {
            anyhow::bail!("guest checks failed: {}", failed.join("; "));
        }
        Ok(match self.guests.first() {
            Some(g) => format!("; {} guest checks passed", g.kind.as_str()),
            None => String::new(),
        })
    }

    async fn workloads(&self, action: &str) -> anyhow::Result<()> {
        if !self.guests.is_empty() {
            return Ok(());
        }
        for m in &self.machines {
            self.attempt(&format!("{m}: workload {action}"), || {
                item::workload(
                    &self.dir,
                    WorkloadRequest {
                        machine: m.clone(),
                        action: action.into(),
                        rate_mb_s: self.rate,
                        write_size: 64 << 10,
                        pattern: "random".into(),
                        compressible: 0.5,
                    },
                )
            })
            .await?;
        }
        Ok(())
    }

    async fn items(&self) -> anyhow::Result<Vec<Item>> {
        let all = item::list(&self.dir, "").await?;
        Ok(all
            .into_iter()
            .filter(|i| self.machines.contains(&i.machine))
            .collect())
    }

    /// Polls the machines' items until every one is in `state`; samples the lag meanwhile.
    /// Once there, it keeps polling for up to [`LAG_GRACE`] until every item has reported a
    /// lag: an item can reach Protected (the PS acknowledged its copy) just before the
    /// target's first acknowledgement gives its agent a lag sample.
    async fn wait_state(&mut self, state: &str) -> anyhow::Result<Vec<Item>> {
        let mut reached: Option<Instant> = None;
        loop {
            // The CS may be restarting (a fault): keep polling until the stage's limit.
            let Ok(items) = self.items().await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            self.lag.add(&items);
            if items.len() == self.machines.len() && items.iter().all(|i| i.state == state) {
                let since = *reached.get_or_insert_with(Instant::now);
                if items.iter().all(|i| i.lag_p99_ms > 0.0) || since.elapsed() >= LAG_GRACE {
                    return Ok(items);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            reached = None;
            let pct = items.iter().map(|i| i.initial_percent).sum::<f64>()
                / self.machines.len().max(1) as f64;
            self.say(format!("waiting for {state} ({pct:.0} %)"));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until each machine's agent is connected on `site` (after a VM boots, its agent
    /// registers after the boot delay).
    async fn wait_agents(&self, site: &str) -> anyhow::Result<()> {
        loop {
            let Ok(all) = infra::list(&self.dir).await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let ready = self.machines.iter().all(|m| {
                all.iter()
                    .any(|c| &c.name == m && c.site == site && c.status == "connected")
            });
            if ready {
                return Ok(());
            }
            self.say(format!("waiting for the agents to register in {site}"));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn enable(&mut self) -> anyhow::Result<String> {
        self.workloads("start").await?;
        self.run_jobs(
            "enable",
            |i| i.is_none(),
            |m| {
                item::enable(
                    &self.dir,
                    EnableItemRequest {
                        machine: m,
                        ..Default::default()
                    },
                )
            },
        )
        .await?;
        let items = self.wait_state("Protected").await?;
        if let Some(plan) = &self.plan {
            // A plan left by an earlier drill on this lab is replaced.
            if crate::plan::show(&self.dir, plan).await.is_ok() {
                crate::plan::delete(&self.dir, plan).await?;
            }
            let groups = crate::plan::create_spread(&self.dir, plan, &self.machines).await?;
            self.say(format!(
                "recovery plan `{plan}`: {} machines in {groups} groups",
                self.machines.len()
            ));
        }
        // The guests write while their machines replicate.
        self.guest_changes().await?;
        // A recovery point, so that the machines have been replicating for a moment.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let sent: u64 = items.iter().map(|i| i.bytes_replicated).sum();
        Ok(format!(
            "{} protected, {} replicated",
            items.len(),
            human_bytes(sent)
        ))
    }

    /// Fails every machine over to `to` at the latest point (source shut down first) and
    /// verifies the disks at the point.
    async fn failover(&mut self, to: &str) -> anyhow::Result<String> {
        if let Some(plan) = self.plan.clone() {
            // ASR's recommended point for a plan; each machine is verified at its own point.
            self.plan_job(&format!("plan failover to {to}"), || {
                crate::plan::start(&self.dir, &plan, "failover", "latest-processed", true)
            })
            .await?;
        }
        let this: &Drill = self;
        let runs = this.machines.iter().map(|m| async move {
            this.attempt(&format!("{m}: failover"), move || async move {
                if item_of(&this.dir, m)
                    .await
                    .is_some_and(|i| i.state == "Failover completed")
                {
                    return Ok(());
                }
                item::failover(
                    &this.dir,
                    FailoverRequest {
                        machine: m.clone(),
                        point: "latest".into(),
                        shutdown: true,
                        kind: failback_proto::pb::operator::FailoverKind::Unplanned as i32,
                        sync: 0,
                    },
                )
                .await
                .map(|_| ())
            })
            .await
        });
        for r in futures::future::join_all(runs).await {
            r?;
        }
        let mut equal = 0;
        for m in self.machines.clone() {
            let v = self
                .attempt(&format!("{m}: verify"), || item::verify(&self.dir, &m, ""))
                .await?;
            self.checks += 1;
            if v.equal {
                equal += 1;
            } else {
                self.mismatches += 1;
            }
        }
        if equal != self.machines.len() {
            anyhow::bail!(
                "{} of {} machines' disks in {to} differ from the source at the failover point",
                self.machines.len() - equal,
                self.machines.len()
            );
        }
        let stage = if to == "azure" {
            "failover-to-azure"
        } else {
            "failback"
        };
        let guests = self.guest_checks(stage, to).await?;
        Ok(format!(
            "{equal} VMs in {to}, disks equal the source{guests}"
        ))
    }

    async fn commit(&mut self) -> anyhow::Result<String> {
        if let Some(plan) = &self.plan {
            self.plan_job("plan commit", || {
                crate::plan::start(&self.dir, plan, "commit", "", false)
            })
            .await?;
        }
        for m in &self.machines {
            self.attempt(&format!("{m}: commit"), || async {
                if item_of(&self.dir, m)
                    .await
                    .is_some_and(|i| i.state == "Failover committed")
                {
                    return Ok(());
                }
                item::commit(&self.dir, m).await.map(|_| ())
            })
            .await?;
        }
        Ok(format!("{} committed", self.machines.len()))
    }

    /// Reprotects every machine now running in `from` back to the other site.
    async fn reprotect(&mut self, from: &str) -> anyhow::Result<String> {
        self.wait_agents(from).await?;
        // The VMs work in their new site: a small change that must go back.
        self.workloads("start").await?;
        self.guest_changes().await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let direction = if from == "azure" {
            "reverse"
        } else {
            "forward"
        };
        if let Some(plan) = &self.plan {
            // No master target named: the CS fills the master targets in order.
            self.plan_job("plan reprotect", || async {
                crate::plan::reprotect(&self.dir, plan, ReprotectRequest::default())
                    .await?
                    .plan_job
                    .ok_or_else(|| anyhow::anyhow!("the CS started no plan job"))
            })
            .await?;
        } else {
            self.run_jobs(
                "reprotect",
                |i| !i.is_some_and(|i| i.direction == direction && i.state != "Failover committed"),
                |m| {
                    item::reprotect(
                        &self.dir,
                        ReprotectRequest {
                            machine: m,
                            ..Default::default()
                        },
                    )
                },
            )
            .await?;
        }
        let items = self.wait_state("Protected").await?;
        if let Some(i) = items.iter().find(|i| i.direction != direction) {
            anyhow::bail!(
                "{}: Protected, but {} rather than {direction}",
                i.machine,
                i.direction
            );
        }
        let differed: u64 = items.iter().map(|i| i.resync_bytes).sum();
        let compared: u64 = items.iter().map(|i| i.resync_blocks_compared).sum();
        let mut detail = format!(
            "{compared} blocks compared, {} differed",
            human_bytes(differed)
        );
        if from == "onprem" {
            // Back to Azure: check a recovery point taken now, on the new replica.
            let t = failback_common::control::now_ms();
            loop {
                let items = self.wait_state("Protected").await?;
                if items.iter().all(|i| i.points.iter().any(|p| p.time_ms > t)) {
                    break;
                }
                self.say("waiting for a recovery point to verify".into());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            for m in self.machines.clone() {
                let v = self
                    .attempt(&format!("{m}: verify"), || {
                        item::verify(&self.dir, &m, "latest")
                    })
                    .await?;
                self.checks += 1;
                if !v.equal {
                    self.mismatches += 1;
                    anyhow::bail!("{m}: the latest recovery point differs from the source");
                }
            }
            detail.push_str("; latest point verified");
        }
        Ok(detail)
    }
}
