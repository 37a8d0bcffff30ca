//! What a drill samples once a second while it runs, for its HTML report: per machine its
//! item's RPO and lag (p99), the link's throughput each way, and each process server's cache
//! use. Read through the operator API and the link's control API (so it works on a container
//! lab as on a local one); a sample that can't be read (the CS restarting, the link down) is
//! skipped, which the plots show as a gap.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// One sample of the lab.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Seconds since the drill began.
    pub t: f64,
    /// Per machine: (RPO seconds, lag p99 seconds).
    pub machines: BTreeMap<String, (f64, f64)>,
    /// Link bytes per second (onprem to azure, azure to onprem), if the link answered.
    pub link: Option<(f64, f64)>,
    /// Per process server: cache bytes used.
    pub caches: BTreeMap<String, f64>,
}

/// The samples of a run.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    pub samples: Vec<Sample>,
}

/// Samples the lab in `dir` every second from `started` until `stop`; returns the samples.
pub fn start(
    dir: PathBuf,
    machines: Vec<String>,
    started: Instant,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Timeline> {
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => break,
            }
            let s = tokio::select! {
                s = sample(&dir, &machines, started) => s,
                _ = stop.cancelled() => break,
            };
            samples.lock().unwrap_or_else(|p| p.into_inner()).push(s);
        }
        Timeline {
            samples: std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner())),
        }
    })
}

async fn sample(dir: &std::path::Path, machines: &[String], started: Instant) -> Sample {
    let within = Duration::from_millis(900);
    let mut s = Sample {
        t: started.elapsed().as_secs_f64(),
        ..Default::default()
    };
    if let Ok(Ok(items)) = tokio::time::timeout(within, crate::item::list(dir, "")).await {
        for i in items.iter().filter(|i| machines.contains(&i.machine)) {
            s.machines
                .insert(i.machine.clone(), (i.rpo_seconds, i.lag_p99_ms / 1000.0));
        }
    }
    if let Ok(Ok(link)) = tokio::time::timeout(within, crate::link::status(dir)).await {
        s.link = Some((
            link.rate_onprem_to_azure as f64,
            link.rate_azure_to_onprem as f64,
        ));
    }
    if let Ok(Ok(rows)) = tokio::time::timeout(within, crate::infra::list(dir)).await {
        for c in rows.iter().filter(|c| c.role == "process-server") {
            s.caches.insert(c.name.clone(), c.cache_used_bytes as f64);
        }
    }
    s
}
