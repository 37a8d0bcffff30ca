//! The link's Prometheus series (`flab_link_*`): bytes that crossed each way, whether the
//! link is up, and its current shaping (latency, bandwidth cap), read at scrape time.

use failback_common::metrics::Metrics;
use failback_common::metrics::prometheus::{Gauge, IntCounterVec, Opts};

use crate::LinkHandle;

/// Registers the link's series on `m`.
pub fn register(m: &Metrics, link: LinkHandle) {
    let gauge = |name: &str, help: &str| {
        m.register(Gauge::new(name, help).unwrap_or_else(|e| panic!("{name}: {e}")))
    };
    let up = gauge(
        "flab_link_up",
        "1 while the link is up, 0 while it is down.",
    );
    let latency = gauge(
        "flab_link_latency_seconds",
        "One-way delay added to each chunk, each direction.",
    );
    let bandwidth = gauge(
        "flab_link_bandwidth_bytes_per_second",
        "Bandwidth cap each way for the whole tunnel; 0 is unlimited.",
    );
    let bytes = m.register(
        IntCounterVec::new(
            Opts::new(
                "flab_link_bytes_total",
                "Bytes that crossed the tunnel, by direction (onprem_to_azure, azure_to_onprem).",
            ),
            &["direction"],
        )
        .unwrap_or_else(|e| panic!("{e}")),
    );
    m.on_scrape(move || {
        let s = link.status();
        up.set(if s.up { 1.0 } else { 0.0 });
        let settings = link.settings();
        latency.set(settings.latency.as_secs_f64());
        bandwidth.set(settings.bandwidth as f64);
        for (direction, total) in [
            ("onprem_to_azure", s.bytes_onprem_to_azure),
            ("azure_to_onprem", s.bytes_azure_to_onprem),
        ] {
            let c = bytes.with_label_values(&[direction]);
            c.inc_by(total.saturating_sub(c.get()));
        }
    });
}
