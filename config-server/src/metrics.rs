//! The configuration server's Prometheus series: per item (labels `item`, `machine`) its
//! RPO, state and health as the operator API shows them; the components connected, the
//! heartbeat age of each, the control streams that ended, the messages taken from them by
//! kind, and the jobs per state.
//!
//! What needs the database is read when a scrape asks (an asynchronous scrape hook, waited
//! for at most `ASYNC_HOOK_WAIT`): a refresh each second whether or not anyone looked cost a
//! 1,000-item CS a sixth of its CPU (every item's health and points, 17,000 series set).
//! What lives in memory (sessions) is read at scrape time too.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use failback_common::metrics::prometheus::{Gauge, GaugeVec, IntCounter, IntCounterVec, Opts};
use failback_common::metrics::{Metrics, set_state};

use crate::health::Level;
use crate::item::{ItemState, JobState};
use crate::state::State;

fn vec(m: &Metrics, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    m.register(GaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("{e}")))
}

/// `flab_cs_reports_total{kind}`: every report the CS took, alone or in a batch, by kind.
pub static REPORTS: std::sync::LazyLock<IntCounterVec> = std::sync::LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "flab_cs_reports_total",
            "Reports taken from the components' control streams (alone or batched), by kind.",
        ),
        &["kind"],
    )
    .unwrap_or_else(|e| panic!("{e}"))
});

/// `flab_cs_control_messages_total{kind}`: messages the CS took from control streams, by
/// kind (heartbeat, a lone report by its kind: progress, point_added, points_pruned,
/// replica_damaged, ps_status; `reports` for a batch of them; result, renew): what a CS's
/// load is made of.
pub static MESSAGES: std::sync::LazyLock<IntCounterVec> = std::sync::LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "flab_cs_control_messages_total",
            "Messages taken from the components' control streams, by kind.",
        ),
        &["kind"],
    )
    .unwrap_or_else(|e| panic!("{e}"))
});

/// The series refreshed from the database.
pub struct Refresh {
    rpo: GaugeVec,
    state: GaugeVec,
    health: GaugeVec,
    jobs: GaugeVec,
    /// The (item, machine) label pairs set by the last refresh: only those gone are removed,
    /// the rest are set in place (rebuilding every series each second cost a 1,000-item CS
    /// more than the reads).
    shown: std::sync::Mutex<HashSet<(String, String)>>,
}

/// Registers the CS's series on `m`; those from the database are refreshed by each scrape.
pub fn register(m: &Metrics, state: Arc<State>) {
    m.register(MESSAGES.clone());
    m.register(REPORTS.clone());
    let refresh = Arc::new(Refresh {
        rpo: vec(
            m,
            "flab_item_rpo_seconds",
            "Seconds since the item's latest recovery point (its creation before the first).",
            &["item", "machine"],
        ),
        state: vec(
            m,
            "flab_item_state",
            "1 for the item's state, 0 for the others.",
            &["item", "machine", "state"],
        ),
        health: vec(
            m,
            "flab_item_health",
            "1 for the item's replication health (ASR's levels), 0 for the others.",
            &["item", "machine", "health"],
        ),
        jobs: vec(m, "flab_cs_jobs", "Jobs per state.", &["state"]),
        shown: Default::default(),
    });
    m.on_scrape_async(move || {
        let (refresh, state) = (refresh.clone(), state.clone());
        async move {
            if let Err(e) = refresh.refresh(&state).await {
                tracing::warn!("refreshing metrics: {e}");
            }
        }
    });
}

impl Refresh {
    async fn refresh(&self, state: &State) -> Result<(), crate::store::DbError> {
        let items = crate::health::views(state, None).await?;
        let counts = state.store.call(|db| db.job_counts()).await?;
        let states: Vec<&str> = ItemState::ALL.iter().map(|s| s.as_str()).collect();
        let levels: Vec<String> = Level::ALL.iter().map(|l| l.to_string()).collect();
        let levels: Vec<&str> = levels.iter().map(String::as_str).collect();
        let now: HashSet<(String, String)> = items
            .iter()
            .map(|i| (i.id.clone(), i.machine.clone()))
            .collect();
        let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
        for (item, machine) in shown.difference(&now) {
            let key = [item.as_str(), machine.as_str()];
            let _ = self.rpo.remove_label_values(&key);
            for s in &states {
                let _ = self.state.remove_label_values(&[key[0], key[1], s]);
            }
            for l in &levels {
                let _ = self.health.remove_label_values(&[key[0], key[1], l]);
            }
        }
        *shown = now;
        drop(shown);
        for i in &items {
            let key = [i.id.as_str(), i.machine.as_str()];
            self.rpo.with_label_values(&key).set(i.rpo_seconds);
            set_state(&self.state, &key, &states, &i.state);
            set_state(&self.health, &key, &levels, &i.health);
        }
        for s in JobState::ALL {
            let n = counts
                .iter()
                .find(|(label, _)| label == s.as_str())
                .map_or(0, |(_, n)| *n);
            self.jobs.with_label_values(&[s.as_str()]).set(n as f64);
        }
        Ok(())
    }
}

/// The series read from the sessions at scrape time.
pub fn register_sessions(m: &Metrics, state: Arc<State>) {
    let connected = m.register(
        Gauge::new(
            "flab_cs_components_connected",
            "Components (and machines' agents) with a control stream open.",
        )
        .unwrap_or_else(|e| panic!("{e}")),
    );
    let drops = m.register(
        IntCounter::new(
            "flab_cs_control_stream_drops_total",
            "Control streams that ended (closed, or replaced by a reconnect) since the CS started.",
        )
        .unwrap_or_else(|e| panic!("{e}")),
    );
    let age = vec(
        m,
        "flab_cs_heartbeat_age_seconds",
        "Seconds since the last heartbeat of each connected component.",
        &["component"],
    );
    m.on_scrape(move || {
        let beats = state.sessions.heartbeats();
        connected.set(beats.len() as f64);
        let n = state.sessions.drops.load(Relaxed);
        drops.inc_by(n.saturating_sub(drops.get()));
        let now = failback_common::control::now_ms();
        age.reset();
        for (name, at) in beats {
            let secs = if at > 0 {
                (now - at).max(0) as f64 / 1000.0
            } else {
                0.0
            };
            age.with_label_values(&[name.as_str()]).set(secs);
        }
    });
}
