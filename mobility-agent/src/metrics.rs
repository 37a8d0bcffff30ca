//! A host's per-item Prometheus series (labels `item` and `machine`, one set per machine
//! replicating from this host): the capture-to-target lag of every batch (a histogram), the
//! bytes the process server acknowledged, and the bytes out of sync (captured but not
//! acknowledged, plus what a copy or resync still has to compare or send); and the host's
//! replication memory budget, its size and what its machines hold of it.

use std::sync::Arc;

use failback_common::metrics::Metrics;
use failback_common::metrics::prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts,
};

/// Lag buckets (seconds): from a fast local path to a cut link.
const LAG_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The host's series.
pub struct HostMetrics {
    lag: HistogramVec,
    replicated: IntCounterVec,
    outofsync: GaugeVec,
    /// `replication_budget`, and the bytes all machines hold of it.
    pub budget: Gauge,
    pub budget_used: Gauge,
}

/// One item's series.
pub struct ItemMetrics {
    pub lag: Histogram,
    pub replicated: IntCounter,
    pub outofsync: Gauge,
    host: Arc<HostMetrics>,
    key: [String; 2],
}

impl HostMetrics {
    pub fn register(m: &Metrics) -> Arc<HostMetrics> {
        let labels = &["item", "machine"];
        Arc::new(HostMetrics {
            lag: m.register(
                HistogramVec::new(
                    HistogramOpts::new(
                        "flab_item_lag_seconds",
                        "Time from a write's capture until the target journaled its batch.",
                    )
                    .buckets(LAG_BUCKETS.to_vec()),
                    labels,
                )
                .unwrap_or_else(|e| panic!("{e}")),
            ),
            replicated: m.register(
                IntCounterVec::new(
                    Opts::new(
                        "flab_item_replicated_bytes_total",
                        "Bytes of writes (copy, resync and delta) the process server acknowledged.",
                    ),
                    labels,
                )
                .unwrap_or_else(|e| panic!("{e}")),
            ),
            budget: m.register(
                Gauge::new(
                    "flab_host_replication_budget_bytes",
                    "Replication memory all machines of the host may hold together (replication_budget).",
                )
                .unwrap_or_else(|e| panic!("{e}")),
            ),
            budget_used: m.register(
                Gauge::new(
                    "flab_host_replication_budget_used_bytes",
                    "Replication memory the host's machines hold: captured or sent, not yet acknowledged.",
                )
                .unwrap_or_else(|e| panic!("{e}")),
            ),
            outofsync: m.register(
                GaugeVec::new(
                    Opts::new(
                        "flab_item_outofsync_bytes",
                        "Bytes the replica lacks: captured but unacknowledged, plus what a copy or resync has left.",
                    ),
                    labels,
                )
                .unwrap_or_else(|e| panic!("{e}")),
            ),
        })
    }

    /// The series of `item` on `machine`.
    pub fn item(self: &Arc<Self>, item: &str, machine: &str) -> ItemMetrics {
        let key = [item.to_string(), machine.to_string()];
        let k = [item, machine];
        ItemMetrics {
            lag: self.lag.with_label_values(&k),
            replicated: self.replicated.with_label_values(&k),
            outofsync: self.outofsync.with_label_values(&k),
            host: self.clone(),
            key,
        }
    }
}

impl ItemMetrics {
    /// The item no longer replicates from here: its series go.
    pub fn forget(&self) {
        let k = [self.key[0].as_str(), self.key[1].as_str()];
        let _ = self.host.lag.remove_label_values(&k);
        let _ = self.host.replicated.remove_label_values(&k);
        let _ = self.host.outofsync.remove_label_values(&k);
    }
}
