//! The workload generator: the stand-in for a guest OS writing to its disks. Every write goes
//! through the capture path. Rate in MB/s, write size, random or sequential offsets, and the
//! share of each write that compresses (the rest is random bytes). Deterministic per seed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tokio_util::sync::CancellationToken;

use crate::capture::Capture;

#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadSpec {
    pub rate_mb_s: f64,
    pub write_size: u64,
    pub sequential: bool,
    pub compressible: f64,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        WorkloadSpec {
            rate_mb_s: 1.0,
            write_size: 64 << 10,
            sequential: false,
            compressible: 0.5,
        }
    }
}

impl WorkloadSpec {
    /// Checks the values an operator gave.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.rate_mb_s > 0.0 && self.rate_mb_s <= 1000.0) {
            return Err(format!("rate {} MB/s must be in (0, 1000]", self.rate_mb_s));
        }
        if self.write_size == 0
            || !self.write_size.is_multiple_of(512)
            || self.write_size > (4 << 20)
        {
            return Err(format!(
                "write size {} must be a multiple of 512 bytes, at most 4 MiB",
                self.write_size
            ));
        }
        if !(0.0..=1.0).contains(&self.compressible) {
            return Err(format!(
                "compressible share {} must be within 0..1",
                self.compressible
            ));
        }
        Ok(())
    }
}

/// A running workload.
pub struct Workload {
    pub spec: WorkloadSpec,
    cancel: CancellationToken,
    /// Bytes written so far.
    pub written: Arc<std::sync::atomic::AtomicU64>,
}

impl Workload {
    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

/// Starts writing to every disk of `capture` per `spec`.
pub fn start(
    capture: Arc<Capture>,
    spec: WorkloadSpec,
    seed: u64,
    shutdown: &CancellationToken,
) -> Workload {
    let cancel = shutdown.child_token();
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let task_cancel = cancel.clone();
    let task_spec = spec.clone();
    let task_written = written.clone();
    tokio::spawn(async move {
        if let Err(e) = run(capture, task_spec, seed, task_cancel, task_written).await {
            tracing::error!("workload stopped: {e}");
        }
    });
    Workload {
        spec,
        cancel,
        written,
    }
}

async fn run(
    capture: Arc<Capture>,
    spec: WorkloadSpec,
    seed: u64,
    cancel: CancellationToken,
    written: Arc<std::sync::atomic::AtomicU64>,
) -> std::io::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let disks = capture.disk_ids();
    if disks.is_empty() {
        return Ok(());
    }
    let mut seq_pos = vec![0u64; disks.len()];
    // Paced by the clock: each write is due when the bytes before it have taken their time at
    // the rate. (A 10 ms tick that added a tick's worth of budget lost rate whenever a busy
    // host delayed ticks: 200 machines at 0.12 MB/s delivered 18 of 24 MB/s, and cost 20,000
    // timer wakeups a second for about 370 writes.) After a stall (writes throttled) at most
    // CATCH_UP of writes is made up, not all that was missed.
    const CATCH_UP: Duration = Duration::from_secs(1);
    let bytes_per_s = spec.rate_mb_s * 1e6;
    let mut start = tokio::time::Instant::now();
    let mut sent = 0f64;
    loop {
        let mut due = start + Duration::from_secs_f64(sent / bytes_per_s);
        let now = tokio::time::Instant::now();
        if now > due + CATCH_UP {
            (start, sent) = (now - CATCH_UP, 0.0);
            due = start;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = cancel.cancelled() => return Ok(()),
        }
        {
            sent += spec.write_size as f64;
            let disk = rng.random_range(0..disks.len());
            let size = disks[disk].1;
            let len = spec.write_size.min(size);
            let blocks = (size - len) / 512 + 1;
            let offset = if spec.sequential {
                let o = seq_pos[disk];
                seq_pos[disk] = if o + 2 * len > size { 0 } else { o + len };
                o
            } else {
                rng.random_range(0..blocks) * 512
            };
            let mut data = vec![0u8; len as usize];
            let compressible = (len as f64 * spec.compressible) as usize;
            // The compressible part: a repeating text; the rest random.
            for (i, b) in data[..compressible].iter_mut().enumerate() {
                *b = b"failback lab workload "[i % 22];
            }
            rng.fill_bytes(&mut data[compressible..]);
            capture.write(disk, offset, Bytes::from(data)).await?;
            written.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
            if cancel.is_cancelled() {
                return Ok(());
            }
        }
    }
}
