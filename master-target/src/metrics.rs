//! The master target's Prometheus series, per item (label `item`): journal and undo bytes,
//! recovery points held, and the apply lag (how long the oldest journaled batch not yet in
//! the replica disks has waited). Read at scrape time; a replica whose store is busy (an apply
//! or a materialize holding it) keeps its last values rather than stalling the scrape (only
//! one never read before is waited for).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use failback_common::metrics::Metrics;
use failback_common::metrics::prometheus::{GaugeVec, Opts};

use crate::data::Replicas;

/// Registers the series of `replicas` on `m`.
pub fn register(m: &Metrics, replicas: Arc<Replicas>) {
    let vec = |name: &str, help: &str| {
        m.register(
            GaugeVec::new(Opts::new(name, help), &["item"]).unwrap_or_else(|e| panic!("{e}")),
        )
    };
    let journal = vec(
        "flab_mt_journal_bytes",
        "Bytes of the item's redo journal (batches kept for its recovery points).",
    );
    let undo = vec(
        "flab_mt_undo_bytes",
        "Bytes of the item's undo log (before-images back to its points).",
    );
    let points = vec(
        "flab_mt_recovery_points",
        "Recovery points the item's replica holds.",
    );
    let lag = vec(
        "flab_mt_apply_lag_seconds",
        "How long the oldest journaled batch not yet applied to the replica disks has waited.",
    );
    // The last values read per item, for replicas busy at scrape time.
    let last: std::sync::Mutex<HashMap<String, [f64; 4]>> = Default::default();
    m.on_scrape(move || {
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        let open = replicas.all();
        last.retain(|item, _| open.iter().any(|r| &r.item == item));
        for r in open {
            // Busy (an apply or a materialize holds it): the last values stand; a replica
            // never read yet is waited for, so that its series exist from the first scrape.
            let store = match r.store.try_lock() {
                Ok(s) => s,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) if !last.contains_key(&r.item) => {
                    r.store.lock().unwrap_or_else(|p| p.into_inner())
                }
                Err(std::sync::TryLockError::WouldBlock) => continue,
            };
            let values = [
                store.redo_bytes() as f64,
                store.undo_bytes() as f64,
                store.points().len() as f64,
                0.0,
            ];
            let applied = store.applied_seq();
            drop(store);
            let waited = r.journaled_at.lock().ok().and_then(|mut j| {
                while j.front().is_some_and(|(seq, _)| *seq <= applied) {
                    j.pop_front();
                }
                j.front().map(|(_, at)| Instant::now().duration_since(*at))
            });
            let mut values = values;
            values[3] = waited.map_or(0.0, |d| d.as_secs_f64());
            last.insert(r.item.clone(), values);
        }
        for series in [&journal, &undo, &points, &lag] {
            series.reset();
        }
        for (item, v) in last.iter() {
            let key = [item.as_str()];
            journal.with_label_values(&key).set(v[0]);
            undo.with_label_values(&key).set(v[1]);
            points.with_label_values(&key).set(v[2]);
            lag.with_label_values(&key).set(v[3]);
        }
    });
}
