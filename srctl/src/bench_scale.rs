//! `srctl bench scale`: ASR's documented scale on this machine, in one run. It starts a lab of
//! N machines on H hosts and measures, in order: registration; enabling every machine (one
//! policy with verification off, as at scale); D of steady writes at a rate per machine
//! (drops of control streams counted at the CS, RPO and lag over all items, the answer time
//! of `item list` and `infra list`, CPU seconds and peak memory of every process); a restart
//! of the CS while the machines replicate (time until every item is Healthy again, the
//! connection attempts each component made, counted by the components themselves); and a
//! recovery-plan failover of min(N, 100) machines in 7 groups. Before the big lab it runs one
//! machine alone at the same aggregate rate, so that the process server's CPU per MB at N
//! machines has a baseline from the same run (their ratio is the per-item overhead).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use failback_proto::pb::operator::{
    EnableItemRequest, Item, ListItemsRequest, Policy, Verification, WorkloadRequest,
};
use futures::StreamExt;
use serde::Serialize;
use serde_json::json;

use crate::lab::{self, LabState};
use crate::topology::Topology;

/// The bench's policy: points every [`CRASH_INTERVAL_S`], no app-consistent points, a short
/// retention (the journal and undo log of 200 machines stay within a few GiB), no digests.
const POLICY: &str = "bench-scale";
const CRASH_INTERVAL_S: u64 = 5;
const RETENTION_S: u64 = 60;
/// Write size of the workload on every machine (the single-machine baseline uses the same).
const WRITE_SIZE: u64 = 64 << 10;
/// Share of the written data that compresses.
const COMPRESSIBLE: f64 = 0.5;
/// RPCs in flight at once when enabling or starting workloads on every machine.
const PARALLEL: usize = 16;
/// Writes run this long before the steady window starts counting.
const WARMUP: Duration = Duration::from_secs(10);
/// After a CS restart, drops are counted for this long once everything is back.
const AFTER_RESTART: Duration = Duration::from_secs(15);

/// What `bench scale` runs.
#[derive(Debug, Clone)]
pub struct ScaleOptions {
    pub machines: usize,
    pub hosts: usize,
    /// MB/s each machine writes; 0 = idle.
    pub rate_mb_s: f64,
    /// The steady window.
    pub duration: Duration,
    pub disk_size: u64,
    /// Also fail over a plan of min(machines, 100).
    pub plan: bool,
}

impl ScaleOptions {
    /// Refuses what can't run, naming the option (the topology checks the shape).
    pub fn check(&self) -> anyhow::Result<Topology> {
        if !(0.0..=1000.0).contains(&self.rate_mb_s) || self.rate_mb_s.is_nan() {
            anyhow::bail!(
                "--rate must be 0 (idle) to 1000 MB/s per machine, not {}",
                self.rate_mb_s
            );
        }
        if self.duration < Duration::from_secs(5) {
            anyhow::bail!(
                "--duration must be at least 5s (a point every {CRASH_INTERVAL_S} s needs a \
                 window to be measured in), not {:?}",
                self.duration
            );
        }
        Topology::generated(self.machines, self.hosts, self.disk_size).map_err(anyhow::Error::msg)
    }
}

/// CPU and memory of one process of the lab over the steady window.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessUse {
    pub name: String,
    pub binary: String,
    pub cpu_seconds: f64,
    /// CPU seconds per second of the window: cores busy.
    pub cores: f64,
    pub peak_rss_bytes: u64,
}

/// The steady window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Steady {
    pub seconds: f64,
    /// Control streams the CS saw end during the window.
    pub drops: u64,
    /// RPO (age of the latest point) over every item at every poll.
    pub rpo_p50_s: f64,
    pub rpo_p99_s: f64,
    /// Capture-to-target lag p99 of the item where it is worst, and its median over items.
    pub lag_p99_ms_worst: f64,
    pub lag_p99_ms_median: f64,
    /// Payload the agents sent that the process server took, and what the targets
    /// acknowledged of its cache (compressed), per second.
    pub received_mb_s: f64,
    pub delivered_mb_s: f64,
    pub items_protected: usize,
    pub items_healthy: usize,
    /// Up to five distinct health errors seen at the end.
    pub health_errors: Vec<String>,
    pub item_list_max_s: f64,
    pub infra_list_max_s: f64,
    pub processes: Vec<ProcessUse>,
    /// Process-server CPU seconds per MB the agents sent (0 when idle).
    pub ps_cpu_s_per_mb: f64,
    /// Messages a second the CS took from control streams, by kind, most first.
    pub cs_messages_per_s: Vec<(String, f64)>,
}

/// One machine alone at the same aggregate rate.
#[derive(Debug, Clone, Serialize)]
pub struct Single {
    pub rate_mb_s: f64,
    pub seconds: f64,
    pub received_mb_s: f64,
    pub ps_cpu_s_per_mb: f64,
}

/// A CS restart while the machines replicate.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Restart {
    /// From the restart command until every component is connected and every item Protected
    /// and Healthy.
    pub healthy_again_s: f64,
    pub components: usize,
    /// Control-stream connection attempts of the component that made the most, and who.
    pub max_attempts: u64,
    pub max_attempts_component: String,
    pub total_attempts: u64,
    /// Drops the new CS counted in the 15 s after everything was back.
    pub drops_after: u64,
}

/// A recovery-plan failover.
#[derive(Debug, Clone, Serialize)]
pub struct PlanRun {
    pub machines: usize,
    pub groups: usize,
    /// From the request until the plan job ended (the last VM started).
    pub seconds: f64,
    pub state: String,
    pub error: String,
}

/// A target of the issue, and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub what: String,
    pub value: String,
    pub target: String,
    pub met: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    pub machines: usize,
    pub hosts: usize,
    pub disk_size_bytes: u64,
    pub rate_mb_s_each: f64,
    pub verification: &'static str,
    pub crash_interval_s: u64,
    /// `lab up`: processes started and every component registered.
    pub register_s: f64,
    /// From the first enable until every item is Protected.
    pub protected_s: f64,
    pub steady: Steady,
    pub single: Option<Single>,
    /// Process-server CPU per MB at N machines / at one machine.
    pub overhead_ratio: Option<f64>,
    pub restart: Restart,
    pub plan: Option<PlanRun>,
    pub targets: Vec<Target>,
}

fn say(progress: bool, m: &str) {
    if progress {
        eprintln!("bench scale: {m}");
    }
}

/// Runs the benchmark (see the module doc).
pub async fn run(opts: ScaleOptions, progress: bool) -> anyhow::Result<ScaleReport> {
    let topology = opts.check()?;
    let aggregate = opts.rate_mb_s * opts.machines as f64;
    let single = if aggregate > 0.0 {
        say(
            progress,
            &format!("baseline: one machine alone at {aggregate:.1} MB/s"),
        );
        Some(
            single_machine(
                aggregate,
                opts.duration.min(Duration::from_secs(60)),
                progress,
            )
            .await?,
        )
    } else {
        None
    };
    let up = lab::UpOptions {
        topology,
        timeout: Duration::from_secs(120 + opts.machines as u64 / 2),
        env: BTreeMap::new(),
        prometheus: false,
    };
    say(
        progress,
        &format!(
            "{} machines on {} hosts: starting the lab",
            opts.machines, opts.hosts
        ),
    );
    let started = Instant::now();
    crate::bench::in_temp_lab_shaped(up, |dir| async move {
        let register_s = started.elapsed().as_secs_f64();
        say(progress, &format!("registered in {register_s:.1} s"));
        let machines: Vec<String> = (1..=opts.machines).map(|i| format!("vm{i}")).collect();
        create_policy(&dir).await?;
        say(progress, "enabling every machine");
        let protected_s = enable_all(&dir, &machines).await?;
        say(progress, &format!("all Protected in {protected_s:.1} s"));
        if opts.rate_mb_s > 0.0 {
            say(
                progress,
                &format!("workloads: {} MB/s each", opts.rate_mb_s),
            );
            workloads(&dir, &machines, "start", opts.rate_mb_s).await?;
            tokio::time::sleep(WARMUP).await;
        }
        say(progress, &format!("steady window of {:?}", opts.duration));
        let steady = steady(&dir, opts.duration).await?;
        say(progress, "restarting the CS");
        let restart = restart_cs(&dir, opts.machines).await?;
        let plan = if opts.plan {
            if opts.rate_mb_s > 0.0 {
                workloads(&dir, &machines, "stop", 0.0).await?;
            }
            let n = opts.machines.min(crate::plan::MAX_MACHINES);
            say(progress, &format!("plan failover of {n} machines"));
            Some(plan_failover(&dir, &machines[..n]).await?)
        } else {
            None
        };
        let overhead_ratio = single
            .as_ref()
            .filter(|s| s.ps_cpu_s_per_mb > 0.0 && steady.ps_cpu_s_per_mb > 0.0)
            .map(|s| steady.ps_cpu_s_per_mb / s.ps_cpu_s_per_mb);
        let mut r = ScaleReport {
            machines: opts.machines,
            hosts: opts.hosts,
            disk_size_bytes: opts.disk_size,
            rate_mb_s_each: opts.rate_mb_s,
            verification: "off",
            crash_interval_s: CRASH_INTERVAL_S,
            register_s,
            protected_s,
            steady,
            single,
            overhead_ratio,
            restart,
            plan,
            targets: Vec::new(),
        };
        r.targets = targets(&r);
        Ok(r)
    })
    .await
}

async fn create_policy(dir: &Path) -> anyhow::Result<()> {
    crate::item::create_policy(
        dir,
        Policy {
            name: POLICY.into(),
            rpo_threshold_s: 60,
            retention_s: RETENTION_S,
            crash_interval_s: CRASH_INTERVAL_S,
            app_interval_s: 0,
            failback_of: String::new(),
            verification: Verification::Off as i32,
        },
        false,
    )
    .await?;
    Ok(())
}

/// All items, through one connection.
async fn items(
    client: &mut failback_proto::pb::operator::operator_client::OperatorClient<
        tonic::transport::Channel,
    >,
) -> anyhow::Result<Vec<Item>> {
    Ok(client
        .list_items(ListItemsRequest {
            machine: String::new(),
        })
        .await
        .map_err(|s| anyhow::anyhow!(crate::client::status_message(&s)))?
        .into_inner()
        .items)
}

/// Enables every machine with the bench's policy and waits until all are Protected;
/// returns the seconds from the first enable.
async fn enable_all(dir: &Path, machines: &[String]) -> anyhow::Result<f64> {
    let client = crate::client::operator(dir).await?;
    let start = Instant::now();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(machines.iter().cloned())
        .map(|m| {
            let mut c = client.clone();
            async move {
                c.enable_item(EnableItemRequest {
                    machine: m.clone(),
                    policy: POLICY.into(),
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .map_err(|s| anyhow::anyhow!("enabling {m}: {}", crate::client::status_message(&s)))
            }
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let mut client = client;
    let deadline = start + Duration::from_secs(600);
    loop {
        let all = items(&mut client).await?;
        let protected = all.iter().filter(|i| i.state == "Protected").count();
        if protected >= machines.len() {
            return Ok(start.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "only {protected} of {} items were Protected 600 s after the first enable",
                machines.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Starts (`rate` MB/s each) or stops the workload on every machine.
async fn workloads(dir: &Path, machines: &[String], action: &str, rate: f64) -> anyhow::Result<()> {
    let client = crate::client::operator(dir).await?;
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(machines.iter().cloned())
        .map(|m| {
            let mut c = client.clone();
            async move {
                c.workload(WorkloadRequest {
                    machine: m.clone(),
                    action: action.into(),
                    rate_mb_s: rate,
                    write_size: WRITE_SIZE,
                    pattern: "random".into(),
                    compressible: COMPRESSIBLE,
                })
                .await
                .map(|_| ())
                .map_err(|s| {
                    anyhow::anyhow!(
                        "workload {action} on {m}: {}",
                        crate::client::status_message(&s)
                    )
                })
            }
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    Ok(())
}

/// The sum of a metric's series whose labels include every pair of `with`, in Prometheus's
/// text exposition format.
fn metric(text: &str, name: &str, with: &[(&str, &str)]) -> f64 {
    metric_series(text, name)
        .into_iter()
        .filter(|(labels, _)| {
            with.iter()
                .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v)
        .sum()
}

/// Every series of metric `name`: its labels and value.
fn metric_series(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once('}') {
                Some((l, v)) => (l, v),
                None => continue,
            },
            None if rest.starts_with(' ') => ("", rest),
            None => continue,
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let labels = labels
            .split("\",")
            .filter_map(|kv| kv.split_once("=\""))
            .map(|(k, v)| (k.trim().to_string(), v.trim_end_matches('"').to_string()))
            .collect();
        out.push((labels, value));
    }
    out
}

/// The metrics text of lab process `name`.
async fn scrape(state: &LabState, name: &str) -> anyhow::Result<String> {
    let p = state
        .proc(name)
        .ok_or_else(|| anyhow::anyhow!("the lab has no process {name}"))?;
    anyhow::ensure!(!p.metrics.is_empty(), "{name} serves no metrics");
    let (status, body) = crate::prom::get(&p.metrics, "/metrics").await?;
    anyhow::ensure!(status == 200, "{name}'s /metrics answered {status}");
    Ok(body)
}

/// CPU seconds of every running process of the lab.
fn cpu_of(state: &LabState) -> BTreeMap<String, f64> {
    state
        .procs
        .iter()
        .filter_map(|p| {
            let cpu = failback_common::procstat::process_cpu_seconds(p.pid?)?;
            Some((p.name.clone(), cpu))
        })
        .collect()
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The process server the items go through (the generated lab's on-premises one).
const PS: &str = "ps-onprem";

async fn steady(dir: &Path, window: Duration) -> anyhow::Result<Steady> {
    let state = LabState::load(dir)?;
    let mut client = crate::client::operator(dir).await?;
    let drops = |t: &str| metric(t, "flab_cs_control_stream_drops_total", &[]);
    let cs0 = scrape(&state, "cs").await?;
    let ps0 = scrape(&state, PS).await?;
    let cpu0 = cpu_of(&state);
    let start = Instant::now();
    let mut rpo = Vec::new();
    let (mut item_list_max, mut infra_list_max) = (0f64, 0f64);
    let last = loop {
        let t = Instant::now();
        let last = items(&mut client).await?;
        item_list_max = item_list_max.max(t.elapsed().as_secs_f64());
        rpo.extend(last.iter().map(|i| i.rpo_seconds));
        let t = Instant::now();
        client
            .list_infra(failback_proto::pb::operator::ListInfraRequest {})
            .await
            .map_err(|s| anyhow::anyhow!(crate::client::status_message(&s)))?;
        infra_list_max = infra_list_max.max(t.elapsed().as_secs_f64());
        if start.elapsed() >= window {
            break last;
        }
        // A random period: polling at the point interval would see every item at the same
        // phase of its point cycle and report one RPO value.
        let period = Duration::from_millis(rand::random_range(700..1700));
        tokio::time::sleep(period.min(window.saturating_sub(start.elapsed()))).await;
    };
    let seconds = start.elapsed().as_secs_f64();
    let cpu1 = cpu_of(&state);
    let cs1 = scrape(&state, "cs").await?;
    let ps1 = scrape(&state, PS).await?;
    let delta =
        |a: &str, b: &str, name: &str| (metric(b, name, &[]) - metric(a, name, &[])).max(0.0);
    let received = delta(&ps0, &ps1, "flab_ps_received_bytes_total");
    let delivered = delta(&ps0, &ps1, "flab_ps_uploaded_bytes_total");
    let processes: Vec<ProcessUse> = state
        .procs
        .iter()
        .filter_map(|p| {
            let pid = p.pid?;
            let cpu = cpu1.get(&p.name)? - cpu0.get(&p.name)?;
            Some(ProcessUse {
                name: p.name.clone(),
                binary: p.binary.clone(),
                cpu_seconds: cpu,
                cores: cpu / seconds,
                peak_rss_bytes: failback_common::procstat::peak_rss_bytes(pid).unwrap_or(0),
            })
        })
        .collect();
    let ps_cpu = processes
        .iter()
        .find(|p| p.name == PS)
        .map_or(0.0, |p| p.cpu_seconds);
    rpo.sort_by(f64::total_cmp);
    let mut lag: Vec<f64> = last.iter().map(|i| i.lag_p99_ms).collect();
    lag.sort_by(f64::total_cmp);
    let mut health_errors: Vec<String> = last
        .iter()
        .flat_map(|i| i.health_errors.iter().cloned())
        .collect();
    health_errors.sort();
    health_errors.dedup();
    health_errors.truncate(5);
    let kinds = |t: &str| -> BTreeMap<String, f64> {
        metric_series(t, "flab_cs_control_messages_total")
            .into_iter()
            .filter_map(|(l, v)| Some((l.get("kind")?.clone(), v)))
            .collect()
    };
    let before = kinds(&cs0);
    let mut cs_messages_per_s: Vec<(String, f64)> = kinds(&cs1)
        .into_iter()
        .map(|(k, v)| {
            let n = v - before.get(&k).copied().unwrap_or(0.0);
            (k, n.max(0.0) / seconds)
        })
        .filter(|(_, r)| *r > 0.0)
        .collect();
    cs_messages_per_s.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(Steady {
        seconds,
        cs_messages_per_s,
        drops: (drops(&cs1) - drops(&cs0)).max(0.0) as u64,
        rpo_p50_s: percentile(&rpo, 0.5),
        rpo_p99_s: percentile(&rpo, 0.99),
        lag_p99_ms_worst: lag.last().copied().unwrap_or(0.0),
        lag_p99_ms_median: percentile(&lag, 0.5),
        received_mb_s: received / 1e6 / seconds,
        delivered_mb_s: delivered / 1e6 / seconds,
        items_protected: last.iter().filter(|i| i.state == "Protected").count(),
        items_healthy: last.iter().filter(|i| i.health == "Healthy").count(),
        health_errors,
        item_list_max_s: item_list_max,
        infra_list_max_s: infra_list_max,
        processes,
        ps_cpu_s_per_mb: if received > 0.0 {
            ps_cpu / (received / 1e6)
        } else {
            0.0
        },
    })
}

/// `flab_control_connects_total{outcome="attempted"}` of every component, summed over the
/// lab's processes (a host serves its machines' counts).
async fn attempts(state: &LabState) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for p in state
        .procs
        .iter()
        .filter(|p| !p.metrics.is_empty() && p.name != "cs")
    {
        let Ok(text) = scrape(state, &p.name).await else {
            continue;
        };
        for (labels, v) in metric_series(&text, "flab_control_connects_total") {
            if labels.get("outcome").map(String::as_str) == Some("attempted")
                && let Some(c) = labels.get("component")
            {
                *out.entry(c.clone()).or_insert(0) += v as u64;
            }
        }
    }
    out
}

async fn restart_cs(dir: &Path, machines: usize) -> anyhow::Result<Restart> {
    let state = LabState::load(dir)?;
    // Operators (srctl) are listed but keep no control stream.
    let components = crate::infra::list(dir)
        .await?
        .iter()
        .filter(|c| c.role != "operator")
        .count();
    let before = attempts(&state).await;
    let start = Instant::now();
    lab::control_proc(dir, "cs", lab::ProcAction::Restart).await?;
    let deadline = start + Duration::from_secs(300);
    let mut client = loop {
        if let Ok(c) = crate::client::operator(dir).await {
            break c;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the CS did not answer 300 s after its restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    loop {
        let connected = client
            .list_infra(failback_proto::pb::operator::ListInfraRequest {})
            .await
            .map(|r| {
                r.into_inner()
                    .components
                    .iter()
                    .filter(|c| c.status == "connected")
                    .count()
            })
            .unwrap_or(0);
        let healthy = items(&mut client)
            .await
            .map(|all| {
                all.iter()
                    .filter(|i| i.state == "Protected" && i.health == "Healthy")
                    .count()
            })
            .unwrap_or(0);
        if connected >= components && healthy >= machines {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "300 s after the CS restart: {connected} of {components} components connected, \
             {healthy} of {machines} items Protected and Healthy"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let healthy_again_s = start.elapsed().as_secs_f64();
    let state = LabState::load(dir)?;
    tokio::time::sleep(AFTER_RESTART).await;
    let drops_after = metric(
        &scrape(&state, "cs").await?,
        "flab_cs_control_stream_drops_total",
        &[],
    ) as u64;
    let after = attempts(&state).await;
    let per: BTreeMap<&String, u64> = after
        .iter()
        .map(|(c, n)| (c, n.saturating_sub(before.get(c).copied().unwrap_or(0))))
        .collect();
    let (max_attempts_component, max_attempts) = per
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(c, n)| ((*c).clone(), *n))
        .unwrap_or_default();
    Ok(Restart {
        healthy_again_s,
        components,
        max_attempts,
        max_attempts_component,
        total_attempts: per.values().sum(),
        drops_after,
    })
}

async fn plan_failover(dir: &Path, machines: &[String]) -> anyhow::Result<PlanRun> {
    let plan = "bench-scale-plan";
    let groups = crate::plan::create_spread(dir, plan, machines).await?;
    let start = Instant::now();
    let job = crate::plan::start(dir, plan, "failover", "latest-processed", false).await?;
    let job = crate::item::watch(dir, job.id, false).await?;
    Ok(PlanRun {
        machines: machines.len(),
        groups,
        seconds: start.elapsed().as_secs_f64(),
        state: job.state,
        error: job.error,
    })
}

/// One machine writing `rate` MB/s for `window`: the process server's CPU per MB.
async fn single_machine(rate: f64, window: Duration, progress: bool) -> anyhow::Result<Single> {
    let up = lab::UpOptions {
        topology: Topology::generated(1, 1, 256 << 20).map_err(anyhow::Error::msg)?,
        timeout: Duration::from_secs(60),
        env: BTreeMap::new(),
        prometheus: false,
    };
    crate::bench::in_temp_lab_shaped(up, |dir| async move {
        create_policy(&dir).await?;
        let vm = vec!["vm1".to_string()];
        enable_all(&dir, &vm).await?;
        workloads(&dir, &vm, "start", rate).await?;
        tokio::time::sleep(WARMUP).await;
        say(progress, &format!("baseline: measuring for {window:?}"));
        let s = steady(&dir, window).await?;
        Ok(Single {
            rate_mb_s: rate,
            seconds: s.seconds,
            received_mb_s: s.received_mb_s,
            ps_cpu_s_per_mb: s.ps_cpu_s_per_mb,
        })
    })
    .await
}

/// The targets on a 2-core machine, checked against this run.
fn targets(r: &ScaleReport) -> Vec<Target> {
    let mut t = Vec::new();
    let mut add = |what: &str, value: String, target: String, met: bool| {
        t.push(Target {
            what: what.into(),
            value,
            target,
            met,
        })
    };
    let s = &r.steady;
    add(
        "control-stream drops, steady",
        s.drops.to_string(),
        "0".into(),
        s.drops == 0,
    );
    add(
        "item list",
        format!("{:.2} s", s.item_list_max_s),
        "< 1 s".into(),
        s.item_list_max_s < 1.0,
    );
    add(
        "infra list",
        format!("{:.2} s", s.infra_list_max_s),
        "< 1 s".into(),
        s.infra_list_max_s < 1.0,
    );
    if r.rate_mb_s_each > 0.0 {
        add(
            "all Protected after the first enable",
            format!("{:.1} s", r.protected_s),
            "<= 60 s".into(),
            r.protected_s <= 60.0,
        );
        add(
            "capture-to-target lag p99 (worst item)",
            format!("{:.0} ms", s.lag_p99_ms_worst),
            "<= 2000 ms".into(),
            s.lag_p99_ms_worst <= 2000.0,
        );
        let rpo_target = r.crash_interval_s as f64 + 2.0;
        add(
            "RPO p99",
            format!("{:.1} s", s.rpo_p99_s),
            format!("<= {rpo_target:.0} s"),
            s.rpo_p99_s <= rpo_target,
        );
        if let Some(o) = r.overhead_ratio {
            add(
                "per-item overhead (PS CPU per MB, N / 1)",
                format!("{o:.2}"),
                "<= 1.5".into(),
                o <= 1.5,
            );
        }
    } else if let Some(cs) = s.processes.iter().find(|p| p.name == "cs") {
        add(
            "CS CPU, idle",
            format!("{:.1} % of a core", cs.cores * 100.0),
            "< 10 %".into(),
            cs.cores < 0.10,
        );
    }
    add(
        "healthy again after a CS restart",
        format!("{:.1} s", r.restart.healthy_again_s),
        "<= 30 s".into(),
        r.restart.healthy_again_s <= 30.0,
    );
    add(
        "drops after the restart",
        r.restart.drops_after.to_string(),
        "0".into(),
        r.restart.drops_after == 0,
    );
    if let Some(p) = &r.plan {
        add(
            &format!("plan failover of {}", p.machines),
            format!("{:.1} s, {}", p.seconds, p.state),
            "< 30 s, Succeeded".into(),
            p.seconds < 30.0 && p.state == "Succeeded",
        );
    }
    t
}

pub fn print(r: &ScaleReport, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!("{}", serde_json::to_string_pretty(&json!(r))?);
        return Ok(());
    }
    let s = &r.steady;
    println!(
        "scale benchmark: {} machines on {} hosts, {} MiB disks, {} MB/s each ({:.1} MB/s in \
         all), verification {}, a point every {} s",
        r.machines,
        r.hosts,
        r.disk_size_bytes >> 20,
        r.rate_mb_s_each,
        r.rate_mb_s_each * r.machines as f64,
        r.verification,
        r.crash_interval_s
    );
    println!("  registered (lab up)          {:>8.1} s", r.register_s);
    println!("  all Protected after enabling {:>8.1} s", r.protected_s);
    println!("  steady window                {:>8.1} s", s.seconds);
    println!("    control-stream drops       {:>8}", s.drops);
    let total: f64 = s.cs_messages_per_s.iter().map(|(_, r)| r).sum();
    let parts: Vec<String> = s
        .cs_messages_per_s
        .iter()
        .map(|(k, r)| format!("{k} {r:.0}"))
        .collect();
    println!(
        "    CS messages a second       {total:>8.0}   {}",
        parts.join(", ")
    );
    println!(
        "    items Protected / Healthy  {:>8}   {} / {}",
        "", s.items_protected, s.items_healthy
    );
    for e in &s.health_errors {
        println!("      {e}");
    }
    println!(
        "    RPO p50 / p99              {:>8.1} s / {:.1} s",
        s.rpo_p50_s, s.rpo_p99_s
    );
    println!(
        "    lag p99 median / worst     {:>8.0} ms / {:.0} ms",
        s.lag_p99_ms_median, s.lag_p99_ms_worst
    );
    println!(
        "    received / delivered       {:>8.1} MB/s / {:.1} MB/s (cached, compressed)",
        s.received_mb_s, s.delivered_mb_s
    );
    println!(
        "    item list / infra list     {:>8.2} s / {:.2} s (slowest)",
        s.item_list_max_s, s.infra_list_max_s
    );
    println!(
        "    {:<24} {:>8} {:>8} {:>10}",
        "process", "cpu s", "cores", "peak RSS"
    );
    let mut procs = s.processes.clone();
    procs.sort_by(|a, b| b.cpu_seconds.total_cmp(&a.cpu_seconds));
    for p in &procs {
        println!(
            "    {:<24} {:>8.1} {:>8.2} {:>7} MiB",
            p.name,
            p.cpu_seconds,
            p.cores,
            p.peak_rss_bytes >> 20
        );
    }
    if let Some(one) = &r.single {
        println!(
            "  process-server CPU per MB     {:>8.4} s at {} machines, {:.4} s for one machine at \
             {:.1} MB/s: overhead {:.2}",
            s.ps_cpu_s_per_mb,
            r.machines,
            one.ps_cpu_s_per_mb,
            one.rate_mb_s,
            r.overhead_ratio.unwrap_or(0.0)
        );
    }
    let x = &r.restart;
    println!(
        "  CS restart: all {} components connected and every item Healthy in {:.1} s; \
         {} connection attempts in all, at most {} by {}; {} drops in the {} s after",
        x.components,
        x.healthy_again_s,
        x.total_attempts,
        x.max_attempts,
        x.max_attempts_component,
        x.drops_after,
        AFTER_RESTART.as_secs()
    );
    if let Some(p) = &r.plan {
        println!(
            "  plan failover (latest-processed) of {} machines in {} groups: {} in {:.1} s {}",
            p.machines, p.groups, p.state, p.seconds, p.error
        );
    }
    println!("targets:");
    for t in &r.targets {
        println!(
            "  {:<4} {:<44} {:>20}   target {}",
            if t.met { "met" } else { "MISS" },
            t.what,
            t.value,
            t.target
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_read_by_name_and_labels() {
        let text = "# HELP x\n\
                    flab_control_connects_total{component=\"vm1\",outcome=\"attempted\"} 3\n\
                    flab_control_connects_total{component=\"vm1\",outcome=\"welcomed\"} 2\n\
                    flab_control_connects_total{component=\"vm2\",outcome=\"attempted\"} 4\n\
                    flab_control_connects_totalx 9\n\
                    flab_cs_control_stream_drops_total 7\n";
        assert_eq!(
            metric(
                text,
                "flab_control_connects_total",
                &[("outcome", "attempted")]
            ),
            7.0
        );
        assert_eq!(
            metric(
                text,
                "flab_control_connects_total",
                &[("component", "vm1"), ("outcome", "welcomed")]
            ),
            2.0
        );
        assert_eq!(metric(text, "flab_cs_control_stream_drops_total", &[]), 7.0);
        assert_eq!(metric(text, "flab_missing", &[]), 0.0);
    }

    #[test]
    fn options_that_cannot_run_are_refused_by_name() {
        let ok = ScaleOptions {
            machines: 10,
            hosts: 2,
            rate_mb_s: 0.1,
            duration: Duration::from_secs(60),
            disk_size: 16 << 20,
            plan: true,
        };
        assert!(ok.check().is_ok());
        let e = |o: ScaleOptions| o.check().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            e(ScaleOptions {
                machines: 0,
                ..ok.clone()
            })
            .contains("--machines must be at least 1")
        );
        assert!(
            e(ScaleOptions {
                hosts: 0,
                ..ok.clone()
            })
            .contains("--hosts")
        );
        assert!(
            e(ScaleOptions {
                rate_mb_s: -1.0,
                ..ok.clone()
            })
            .contains("--rate")
        );
        assert!(
            e(ScaleOptions {
                duration: Duration::from_secs(1),
                ..ok.clone()
            })
            .contains("--duration")
        );
    }
}
