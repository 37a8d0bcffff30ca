//! The process server (PS): the data relay between mobility agents and a master target.
//!
//! An on-premises PS (`ps-onprem`) carries forward replication; a temporary one in Azure
//! (`ps-azure`) carries failback replication across the VPN link. It registers with the CS,
//! keeps its control stream, and serves its data port (mutual TLS, agents only) with a gRPC
//! health service for readiness.
//!
//! # Layout
//! - [`cache`]: the durable segmented disk cache.
//! - [`data`]: the agents' replication streams in, forwarding to targets out.
//! - [`metrics`]: the `flab_ps_*` series of the `/metrics` endpoint.

pub mod cache;
pub mod data;
pub mod metrics;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use failback_common::component::{advertised, hello, register, validate_common};
use failback_common::config::ConfigError;
use failback_common::enroll::CsSettings;
use failback_common::identity::{Identity, Role, Site};
use failback_proto::pb::control::{
    ComponentMessage, CsMessage, DrainResult, Hello, PsStatus, Report, command, command_result,
    component_message, report,
};
use failback_proto::pb::data::process_server_data_server::ProcessServerDataServer;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// `process-server --config FILE` (env `FBL_PS__*`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PsConfig {
    pub name: String,
    pub site: Site,
    /// Identity and cache live here.
    pub data_dir: PathBuf,
    /// Data port (ASR: 9443).
    pub listen: String,
    /// Address per site the data port is reached from (e.g. through the VPN link).
    pub advertise: BTreeMap<String, String>,
    pub cs: CsSettings,
    /// Bounds of the data port's connections (`[listener]`: handshake timeout, caps).
    pub listener: failback_common::listener::ConnLimits,
    /// Disk cache capacity (ASR recommends 600 GB; the lab default is small).
    pub cache_capacity: bytesize::ByteSize,
    /// Prometheus metrics at `http://ADDRESS/metrics` (empty: none).
    pub metrics_listen: String,
}

impl Default for PsConfig {
    fn default() -> Self {
        PsConfig {
            name: "ps-onprem".into(),
            site: Site::Onprem,
            data_dir: PathBuf::from("ps-data"),
            listen: "127.0.0.1:9443".into(),
            advertise: BTreeMap::new(),
            cs: CsSettings::default(),
            listener: Default::default(),
            cache_capacity: bytesize::ByteSize::gib(2),
            metrics_listen: String::new(),
        }
    }
}

impl PsConfig {
    pub fn load(file: Option<&Path>) -> Result<PsConfig, ConfigError> {
        let cfg: PsConfig = failback_common::config::load(file, "FBL_PS")?;
        validate_common(file, &cfg.name, &cfg.cs, &cfg.listener)?;
        Ok(cfg)
    }
}

/// Registers with the CS and serves the data port on `listener` until `shutdown`.
pub async fn run(
    config: PsConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let identity = Identity::new(Role::ProcessServer, config.site, &config.name);
    let addresses = advertised(&config.advertise, config.site, listener.local_addr().ok());
    let base = hello(&identity);
    let hello_fn = Arc::new(move || Hello {
        addresses: addresses.clone(),
        ..base.clone()
    });
    let registered = register(&identity, &config.data_dir, &config.cs, hello_fn, &shutdown).await?;
    let secured = registered.secured(config.listener)?;
    let cache_dir = config.data_dir.join("cache");
    let capacity = config.cache_capacity.as_u64();
    let cache =
        tokio::task::spawn_blocking(move || cache::Cache::open(&cache_dir, capacity)).await??;
    let cache = std::sync::Arc::new(cache);
    tokio::spawn(record_released(cache.clone(), shutdown.clone()));
    let dp = data::DataPlane::new(
        cache,
        registered.credentials.clone(),
        &config.data_dir,
        shutdown.clone(),
    );
    let registry = failback_common::metrics::Metrics::new();
    metrics::register(&registry, dp.clone());
    failback_common::metrics::start(Some(&config.metrics_listen), &registry, &shutdown).await?;
    tokio::spawn(handle_commands(
        dp.clone(),
        registered.control.commands,
        registered.control.outbox.clone(),
    ));
    tokio::spawn(report_status(
        dp.clone(),
        registered.control.outbox,
        shutdown.clone(),
    ));
    let router = failback_common::server::builder()
        .add_service(failback_common::server::health_service())
        .add_service(
            ProcessServerDataServer::new(data::DataService { dp })
                .max_decoding_message_size(failback_common::server::MAX_MESSAGE)
                .max_encoding_message_size(failback_common::server::MAX_MESSAGE),
        );
    tracing::info!(address = %listener.local_addr()?, "process server ready");
    failback_common::server::serve(router, listener, secured, shutdown).await?;
    Ok(())
}

/// Writes the cache's released-sequence records once a second (see the cache's
/// "Durability"), until shutdown.
async fn record_released(cache: std::sync::Arc<cache::Cache>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let c = cache.clone();
        match tokio::task::spawn_blocking(move || c.record_released()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("recording released batches: {e}"),
            Err(e) => tracing::warn!("recording released batches: {e}"),
        }
    }
}

async fn handle_commands(
    dp: std::sync::Arc<data::DataPlane>,
    mut commands: mpsc::Receiver<CsMessage>,
    outbox: mpsc::Sender<ComponentMessage>,
) {
    let mut answered = failback_common::control::Answered::default();
    while let Some(cmd) = failback_common::control::next_command(&mut commands).await {
        let run = || async {
            match cmd.kind {
                Some(command::Kind::SetRoute(r)) => {
                    tracing::info!(item = %r.item, target = %r.target, "route set");
                    dp.set_route(
                        &r.item,
                        data::Route {
                            target: r.target,
                            address: r.target_address,
                            source: r.source.map(Into::into).unwrap_or_default(),
                            draining: false,
                        },
                        r.start_after,
                    )
                    .map(|()| None)
                }
                Some(command::Kind::RemoveRoute(r)) => {
                    tracing::info!(item = %r.item, "route removed");
                    dp.remove_route(&r.item).map(|()| None)
                }
                Some(command::Kind::DrainRoute(r)) => {
                    dp.drain(&r.item, r.resume)
                        .await
                        .map(|(last_seq, forwarded_seq)| {
                            Some(command_result::Detail::Drain(DrainResult {
                                last_seq,
                                forwarded_seq,
                            }))
                        })
                }
                _ => Err("a process server doesn't take this command".to_string()),
            }
            .map_err(Into::into)
        };
        if !failback_common::control::answer(&outbox, &mut answered, cmd.id, run).await {
            return;
        }
    }
}

async fn report_status(
    dp: std::sync::Arc<data::DataPlane>,
    outbox: mpsc::Sender<ComponentMessage>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut cpu = CpuSampler::default();
    // (when, bytes uploaded so far) over the last minute: the upload rate.
    let mut uploads: std::collections::VecDeque<(std::time::Instant, u64)> = Default::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let now = std::time::Instant::now();
        uploads.push_back((
            now,
            dp.uploaded_bytes.load(std::sync::atomic::Ordering::Relaxed),
        ));
        while uploads
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t).as_secs() > 60)
        {
            uploads.pop_front();
        }
        let upload_estimate_s = upload_estimate(&uploads, dp.backlog_bytes());
        dp.upload_estimate_s.store(
            upload_estimate_s.to_bits(),
            std::sync::atomic::Ordering::Relaxed,
        );
        let (health, throttled) = dp.cache.health();
        let _ = outbox.try_send(ComponentMessage {
            kind: Some(component_message::Kind::Report(Report {
                kind: Some(report::Kind::PsStatus(PsStatus {
                    cache_used_bytes: dp.cache.used_bytes(),
                    cache_capacity_bytes: dp.cache.capacity(),
                    cache_health: health.to_proto() as i32,
                    throttled,
                    cpu_percent: cpu.sample(),
                    memory_percent: memory_percent(),
                    upload_estimate_s,
                    backlog_bytes: dp.backlog_bytes(),
                })),
            })),
        });
    }
}

/// Seconds the cache needs to upload its backlog at the rate of the last minute (ASR: a
/// warning when it can't within 30 minutes, critical beyond 45). No backlog: 0; a backlog
/// and nothing uploaded for the whole window (a cut link): `f64::INFINITY` is reported as
/// `u64::MAX`-like 1e12 seconds.
fn upload_estimate(
    samples: &std::collections::VecDeque<(std::time::Instant, u64)>,
    backlog: u64,
) -> f64 {
    if backlog == 0 {
        return 0.0;
    }
    let (Some((t0, b0)), Some((t1, b1))) = (samples.front(), samples.back()) else {
        return 0.0;
    };
    let secs = t1.duration_since(*t0).as_secs_f64();
    if secs < 5.0 {
        // Too early to tell.
        return 0.0;
    }
    let rate = (b1 - b0) as f64 / secs;
    if rate <= 0.0 {
        1e12
    } else {
        backlog as f64 / rate
    }
}

/// The process server's own CPU use, 0..100 of the cores it may use, between two samples.
///
/// A lab runs every component of both sites on one machine, and each process stands for a
/// machine of its own: the host's /proc/stat would charge the process server with the
/// agents', targets' and configuration server's work (a 200-machine lab showed "CPU use 95 %"
/// on every item while the process server itself used a quarter of the cores). What ASR's
/// health rule watches is the process server machine's CPU: here, this process's CPU time
/// over the cores available to it (`available_parallelism` follows cgroup quotas, so a
/// container limited to one CPU counts one).
struct CpuSampler {
    /// Whose CPU: `/proc/self/stat` (this process); a test reads its own thread's.
    stat: &'static str,
    last: Option<(f64, std::time::Instant)>,
}

impl Default for CpuSampler {
    fn default() -> Self {
        CpuSampler {
            stat: "/proc/self/stat",
            last: None,
        }
    }
}

impl CpuSampler {
    fn sample(&mut self) -> f64 {
        let Some(cpu_s) = failback_common::procstat::cpu_seconds(self.stat) else {
            return 0.0;
        };
        let now = std::time::Instant::now();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let pct = match self.last {
            Some((c0, t0)) if now > t0 => {
                let wall = now.duration_since(t0).as_secs_f64();
                ((cpu_s - c0) / wall / cores * 100.0).clamp(0.0, 100.0)
            }
            _ => 0.0,
        };
        self.last = Some((cpu_s, now));
        pct
    }
}

/// Host memory in use, from /proc/meminfo.
fn memory_percent() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/meminfo") else {
        return 0.0;
    };
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
    };
    match (field("MemTotal:"), field("MemAvailable:")) {
        (Some(t), Some(a)) if t > 0.0 => (t - a) / t * 100.0,
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Busy for `d` on this thread.
    fn spin(d: std::time::Duration) {
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < d {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
    }

    #[test]
    fn cpu_use_is_the_process_servers_own_not_the_hosts() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Other processes keep every core busy; this one idles: the process server's CPU
        // use stays low (the host's /proc/stat would say about 100 %).
        let mut hogs: Vec<_> = (0..cores)
            .map(|_| {
                std::process::Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .spawn()
                    .expect("sh")
            })
            .collect();
        // This thread's CPU (the same computation as the process's, which other tests of
        // this binary, running in parallel, would add to).
        let mut s = CpuSampler {
            stat: "/proc/thread-self/stat",
            last: None,
        };
        s.sample();
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let idle = s.sample();
        for h in &mut hogs {
            let _ = h.kill();
            let _ = h.wait();
        }
        assert!(
            idle < 20.0,
            "an idle process server beside busy others: {idle:.1} %"
        );
        // This process busy on one core: about 100 / cores percent.
        spin(std::time::Duration::from_millis(1500));
        let busy = s.sample();
        let one_core = 100.0 / cores as f64;
        assert!(
            busy > one_core * 0.5 && busy <= 100.0,
            "one busy thread of {cores} cores: {busy:.1} %"
        );
    }
}
