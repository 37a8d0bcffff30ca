//! Health in ASR's terms: the operator's view of an item (state, RPO, health with error
//! codes, disks, points) and of a component (heartbeat; a process server's cache, CPU,
//! memory and upload estimate). Computed when asked, from the rows and the live sessions.

use std::collections::HashMap;

use failback_common::control::now_ms;
use failback_common::identity::Role;
use failback_proto::pb::control::{Health as PsHealth, PsStatus};
use failback_proto::pb::operator::{Item, ItemDisk, Point, Policy};

use crate::item::{ItemRow, ItemState, Throttle, default_policy};
use crate::state::State;
use crate::store::{DbError, DiskRow};

/// A replication stream down this long while both ends talk to the CS: ASR 78186.
const PS_UNREACHABLE_AFTER_MS: i64 = 10_000;

/// Everything the views of some items need, read in one database call.
struct Rows {
    items: Vec<ItemRow>,
    points: HashMap<String, Vec<Point>>,
    policies: Vec<Policy>,
    disks: HashMap<String, Vec<DiskRow>>,
}

/// The operator's views of every active item (of `machine` only, if given).
pub async fn views(state: &State, machine: Option<&str>) -> Result<Vec<Item>, DbError> {
    let machine = machine.map(str::to_string);
    let rows = state
        .store
        .call(move |db| {
            let items: Vec<ItemRow> = db
                .items()?
                .into_iter()
                .filter(|i| machine.as_ref().is_none_or(|m| &i.machine == m))
                .collect();
            // All items: a few queries in all, not a few per item (the metrics refresh reads
            // every item each second; at 1,000 items per-item queries kept the CS busy).
            let (points, disks) = match &machine {
                None => (db.points_by_item()?, db.disks_by_machine()?),
                Some(m) => {
                    let mut points = HashMap::new();
                    for i in &items {
                        points.insert(i.id.clone(), db.points(&i.id)?);
                    }
                    let disks = db.component(m)?.map(|c| c.disks).unwrap_or_default();
                    (points, HashMap::from([(m.clone(), disks)]))
                }
            };
            Ok(Rows {
                items,
                points,
                policies: db.policies()?,
                disks,
            })
        })
        .await?;
    Ok(rows
        .items
        .iter()
        .map(|i| {
            let policy = rows
                .policies
                .iter()
                .find(|p| p.name == i.policy)
                .cloned()
                .unwrap_or_else(default_policy);
            view(
                state,
                i,
                rows.points.get(&i.id).cloned().unwrap_or_default(),
                &policy,
                rows.disks.get(&i.machine).map(Vec::as_slice).unwrap_or(&[]),
            )
        })
        .collect())
}

/// The operator's view of an item, with RPO and health computed now.
fn view(
    state: &State,
    item: &ItemRow,
    points: Vec<Point>,
    policy: &Policy,
    disks: &[DiskRow],
) -> Item {
    let progress = state
        .live_progress(&item.id)
        .unwrap_or_else(|| item.progress.clone());
    let now = now_ms();
    let rpo_ms = now - points.last().map(|p| p.time_ms).unwrap_or(item.created_ms);
    let mut health = Health::default();
    if !state.connected(&item.machine) {
        health.raise(
            Level::Critical,
            format!("78174: no heartbeat from source machine {}", item.machine),
        );
    }
    if !state.connected(&item.process_server) {
        health.raise(
            Level::Critical,
            format!(
                "806: no heartbeat from process server {}",
                item.process_server
            ),
        );
    } else if state.connected(&item.machine)
        && progress.ps_down_since_ms > 0
        && now - progress.ps_down_since_ms > PS_UNREACHABLE_AFTER_MS
    {
        // Both talk to the CS, but the machine's data can't reach its process server.
        health.raise(
            Level::Critical,
            format!(
                "78186: process server {} is unreachable from {} for {:.0} s",
                item.process_server,
                item.machine,
                (now - progress.ps_down_since_ms) as f64 / 1000.0
            ),
        );
    } else if let Some(ps) = state.ps_health(&item.process_server) {
        // The process server's own trouble (cache filling, throttling, not uploading).
        let own = component_health("process-server", &item.process_server, true, Some(&ps));
        for e in own.errors {
            health.raise(
                if own.level == Level::Critical {
                    Level::Critical
                } else {
                    Level::Warning
                },
                format!("process server {}: {e}", item.process_server),
            );
        }
    }
    if !state.connected(&item.target) {
        health.raise(
            Level::Critical,
            format!("78022: no heartbeat from master target {}", item.target),
        );
    }
    if !progress.app_consistency_error.is_empty() {
        // ASR: a failing pre script makes the point crash-consistent and raises a warning.
        health.raise(
            Level::Warning,
            format!(
                "78144: the last app-consistent point of {} is crash-consistent: {}",
                item.machine, progress.app_consistency_error
            ),
        );
    }
    if let Some((why, limit)) = progress.write_throttle {
        // ASR's high-churn warning: the source writes faster than replication takes them.
        let mib = limit as f64 / (1 << 20) as f64;
        let what = match why {
            Throttle::MachineBuffer => {
                format!("its replication buffer ({mib:.0} MiB, `replication_buffer`) is full")
            }
            Throttle::HostBudget => format!(
                "its host's replication memory for all machines ({mib:.0} MiB, \
                 `replication_budget`) is used up"
            ),
        };
        health.raise(
            Level::Warning,
            format!(
                "78188: writes of {} are throttled: {what}; the source changes data faster than \
                 it is replicated",
                item.machine
            ),
        );
    }
    if item.state == ItemState::Protected && rpo_ms as u64 > policy.rpo_threshold_s * 1000 {
        health.raise(
            // Twice over the threshold is critical.
            if rpo_ms as u64 > 2 * policy.rpo_threshold_s * 1000 {
                Level::Critical
            } else {
                Level::Warning
            },
            format!(
                "RPO {:.0} s is over the policy threshold of {} s",
                rpo_ms as f64 / 1000.0,
                policy.rpo_threshold_s
            ),
        );
    }
    let disks = disks
        .iter()
        .cloned()
        .map(|d| {
            let (st, pct) = progress
                .disks
                .get(&d.id)
                .cloned()
                .unwrap_or_else(|| ("In queue".into(), 0.0));
            ItemDisk {
                id: d.id,
                size_bytes: d.size,
                state: st,
                percent: pct,
            }
        })
        .collect::<Vec<_>>();
    let initial_percent = if disks.is_empty() {
        0.0
    } else {
        disks.iter().map(|d| d.percent).sum::<f64>() / disks.len() as f64
    };
    Item {
        id: item.id.clone(),
        machine: item.machine.clone(),
        direction: item.direction.to_string(),
        state: item.state.to_string(),
        health: health.level.to_string(),
        health_errors: health.errors,
        process_server: item.process_server.clone(),
        target: item.target.clone(),
        policy: item.policy.clone(),
        replication_group: item.replication_group.clone(),
        rpo_seconds: rpo_ms.max(0) as f64 / 1000.0,
        disks,
        points,
        bytes_replicated: progress.bytes_sent,
        bytes_per_second: progress.bytes_per_second,
        initial_percent,
        created_ms: item.created_ms,
        acked_seq: progress.acked_seq,
        resync_bytes: progress.resync_bytes,
        resync_blocks_compared: progress.resync_blocks_compared,
        target_seq: progress.target_seq,
        target_seq_at_ms: progress.target_seq_at_ms,
        lag_p50_ms: progress.lag_p50_ms,
        lag_p99_ms: progress.lag_p99_ms,
    }
}

/// ASR's health levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Level {
    #[default]
    Healthy,
    Warning,
    Critical,
}

impl Level {
    pub const ALL: [Level; 3] = [Level::Healthy, Level::Warning, Level::Critical];
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Level::Healthy => "Healthy",
            Level::Warning => "Warning",
            Level::Critical => "Critical",
        })
    }
}

/// A health level with the errors that set it.
#[derive(Debug, Default)]
pub struct Health {
    pub level: Level,
    pub errors: Vec<String>,
}

impl Health {
    fn raise(&mut self, level: Level, error: String) {
        self.level = self.level.max_level(level);
        self.errors.push(error);
    }
}

impl Level {
    fn max_level(self, other: Level) -> Level {
        let rank = |l: Level| match l {
            Level::Healthy => 0,
            Level::Warning => 1,
            Level::Critical => 2,
        };
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

/// ASR-like health of a component: heartbeats for all; cache, CPU and memory for process
/// servers (warning > 80 % CPU/memory, > 70 % cache used; critical > 95 %, > 75 %).
pub fn component_health(role: &str, name: &str, connected: bool, ps: Option<&PsStatus>) -> Health {
    let mut health = Health::default();
    if role == Role::Operator.as_str() {
        return health;
    }
    if !connected {
        let code = match role {
            "process-server" => "806: no heartbeat from the process server",
            "master-target" => "78022: no heartbeat from the master target",
            "agent" => "78174: no heartbeat from the source machine",
            _ => "no heartbeat",
        };
        health.raise(Level::Critical, format!("{code} {name}"));
    }
    if let Some(ps) = ps.filter(|_| connected) {
        match ps.cache_health() {
            PsHealth::Warning => health.raise(Level::Warning, "cache free space below 30 %".into()),
            PsHealth::Critical if ps.throttled => health.raise(
                Level::Critical,
                "cache free space below 20 %: agents throttled".into(),
            ),
            PsHealth::Critical => {
                health.raise(Level::Critical, "cache free space below 25 %".into())
            }
            PsHealth::Healthy | PsHealth::Unspecified => {}
        }
        let minutes = ps.upload_estimate_s / 60.0;
        let can_not = |m: f64| {
            if minutes >= 1e9 / 60.0 {
                format!("the cache isn't uploading at all: it can't upload within {m} minutes")
            } else {
                format!("the cache can't upload within {m} minutes (estimate {minutes:.0} min)")
            }
        };
        if minutes > 45.0 {
            health.raise(Level::Critical, can_not(45.0));
        } else if minutes > 30.0 {
            health.raise(Level::Warning, can_not(30.0));
        }
        for (what, v) in [("CPU", ps.cpu_percent), ("memory", ps.memory_percent)] {
            if v > 95.0 {
                health.raise(Level::Critical, format!("{what} use {v:.0} % (over 95 %)"));
            } else if v > 80.0 {
                health.raise(Level::Warning, format!("{what} use {v:.0} % (over 80 %)"));
            }
        }
    }
    health
}
