//! The process server's Prometheus series (`flab_ps_*`), read from the cache and the data
//! plane at scrape time: cache use and capacity, whether agents are throttled, the compression
//! ratio of what agents sent, the estimate of how long the backlog takes to upload, and per
//! item the bytes not yet acknowledged by the target.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use failback_common::metrics::Metrics;
use failback_common::metrics::prometheus::{Gauge, GaugeVec, IntCounter, Opts};

use crate::data::DataPlane;

fn gauge(m: &Metrics, name: &str, help: &str) -> Gauge {
    m.register(Gauge::new(name, help).unwrap_or_else(|e| panic!("{name}: {e}")))
}

/// Registers the series of `dp` on `m`.
pub fn register(m: &Metrics, dp: Arc<DataPlane>) {
    let used = gauge(
        m,
        "flab_ps_cache_used_bytes",
        "Bytes the disk cache holds (batches not yet acknowledged by their targets).",
    );
    let capacity = gauge(
        m,
        "flab_ps_cache_capacity_bytes",
        "Capacity of the disk cache.",
    );
    let ratio = gauge(
        m,
        "flab_ps_compression_ratio",
        "Bytes agents sent divided by the bytes the cache stored of them (LZ4); 1 before any.",
    );
    let throttled = gauge(
        m,
        "flab_ps_throttled",
        "1 while agents are throttled (less than 20 % of the cache free), else 0.",
    );
    let estimate = gauge(
        m,
        "flab_ps_upload_estimate_seconds",
        "Seconds the backlog needs to upload at the rate of the last minute (1e12: nothing moves).",
    );
    let received = m.register(
        IntCounter::new(
            "flab_ps_received_bytes_total",
            "Payload bytes of batches agents sent that the cache took.",
        )
        .unwrap_or_else(|e| panic!("{e}")),
    );
    let uploaded = m.register(
        IntCounter::new(
            "flab_ps_uploaded_bytes_total",
            "Cached bytes the targets acknowledged.",
        )
        .unwrap_or_else(|e| panic!("{e}")),
    );
    let pending = m.register(
        GaugeVec::new(
            Opts::new(
                "flab_ps_item_pending_bytes",
                "Per item: cached bytes its target has not acknowledged yet.",
            ),
            &["item"],
        )
        .unwrap_or_else(|e| panic!("{e}")),
    );
    m.on_scrape(move || {
        used.set(dp.cache.used_bytes() as f64);
        capacity.set(dp.cache.capacity() as f64);
        let (raw, stored) = (
            dp.received_bytes.load(Relaxed),
            dp.stored_bytes.load(Relaxed),
        );
        ratio.set(if stored == 0 {
            1.0
        } else {
            raw as f64 / stored as f64
        });
        throttled.set(if dp.cache.health().1 { 1.0 } else { 0.0 });
        estimate.set(f64::from_bits(dp.upload_estimate_s.load(Relaxed)));
        received.inc_by(raw.saturating_sub(received.get()));
        let up = dp.uploaded_bytes.load(Relaxed);
        uploaded.inc_by(up.saturating_sub(uploaded.get()));
        pending.reset();
        for item in dp.cache.items() {
            pending
                .with_label_values(&[item.as_str()])
                .set(dp.cache.pending_bytes(&item) as f64);
        }
    });
}
