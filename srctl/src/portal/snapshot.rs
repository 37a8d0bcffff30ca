//! What the portal shows, read through the operator API (and the link's control API) with the
//! operator's credentials: one JSON document of items, jobs, components and the link, plus a
//! short history per item (RPO, lag, throughput) that the portal keeps for its plots. No second
//! source of truth: everything comes from the CS or vpn-link at the moment it is read.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;

use serde_json::{Value, json};

/// How many samples of history each item keeps (one per poll).
pub const HISTORY: usize = 600;

/// Per item: (Unix ms, RPO s, lag p99 ms, bytes/s) samples, oldest first.
#[derive(Default)]
pub struct History {
    items: BTreeMap<String, VecDeque<(i64, f64, f64, f64)>>,
    /// (Unix ms, bytes/s onprem to azure, azure to onprem).
    link: VecDeque<(i64, f64, f64)>,
}

/// Reads everything once; `history` gains a sample per item and for the link.
pub async fn read(dir: &Path, history: &mut History) -> Value {
    let now = failback_common::control::now_ms();
    let items = crate::item::list(dir, "").await;
    let jobs = crate::item::jobs(dir, 0).await;
    let infra = crate::infra::list(dir).await;
    let link = crate::link::status(dir).await;
    let mut errors = Vec::new();
    let items = match items {
        Ok(items) => items,
        Err(e) => {
            errors.push(format!("items: {e:#}"));
            Vec::new()
        }
    };
    for i in &items {
        let h = history.items.entry(i.id.clone()).or_default();
        h.push_back((now, i.rpo_seconds, i.lag_p99_ms, i.bytes_per_second));
        while h.len() > HISTORY {
            h.pop_front();
        }
    }
    history
        .items
        .retain(|id, _| items.iter().any(|i| &i.id == id));
    let items: Vec<Value> = items
        .iter()
        .map(|i| {
            let h: Vec<Value> = history.items[&i.id]
                .iter()
                .map(|(t, rpo, lag, bps)| json!([t, rpo, lag, bps]))
                .collect();
            json!({
                "id": i.id, "machine": i.machine, "direction": i.direction, "state": i.state,
                "health": i.health, "health_errors": i.health_errors,
                "process_server": i.process_server, "target": i.target, "policy": i.policy,
                "replication_group": i.replication_group, "rpo_seconds": i.rpo_seconds,
                "initial_percent": i.initial_percent, "bytes_replicated": i.bytes_replicated,
                "bytes_per_second": i.bytes_per_second, "lag_p50_ms": i.lag_p50_ms,
                "lag_p99_ms": i.lag_p99_ms,
                "disks": i.disks.iter().map(|d| json!({
                    "id": d.id, "size_bytes": d.size_bytes, "state": d.state, "percent": d.percent,
                })).collect::<Vec<_>>(),
                "points": i.points.iter().map(|p| json!({
                    "id": p.id, "time_ms": p.time_ms, "kind": p.kind,
                })).collect::<Vec<_>>(),
                "history": h,
            })
        })
        .collect();
    let jobs: Vec<Value> = match jobs {
        Ok(mut jobs) => {
            jobs.sort_by_key(|j| std::cmp::Reverse(j.id));
            jobs.truncate(50);
            jobs.iter()
                .map(|j| {
                    json!({
                        "id": j.id, "name": j.name, "item": j.item, "state": j.state,
                        "started_ms": j.started_ms, "ended_ms": j.ended_ms, "error": j.error,
                        "steps": j.steps.iter().map(|s| json!({
                            "name": s.name, "state": s.state, "progress": s.progress,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect()
        }
        Err(e) => {
            errors.push(format!("jobs: {e:#}"));
            Vec::new()
        }
    };
    let components: Vec<Value> = match infra {
        Ok(rows) => rows
            .iter()
            .filter(|c| c.role != "operator")
            .map(|c| {
                json!({
                    "name": c.name, "role": c.role, "site": c.site, "status": c.status,
                    "health": c.health, "health_errors": c.health_errors, "host": c.host,
                    "machines": c.machines, "power_state": c.power_state,
                    "cache_used_bytes": c.cache_used_bytes,
                    "cache_capacity_bytes": c.cache_capacity_bytes,
                })
            })
            .collect(),
        Err(e) => {
            errors.push(format!("components: {e:#}"));
            Vec::new()
        }
    };
    let link = match link {
        Ok(s) => {
            history.link.push_back((
                now,
                s.rate_onprem_to_azure as f64,
                s.rate_azure_to_onprem as f64,
            ));
            while history.link.len() > HISTORY {
                history.link.pop_front();
            }
            let settings = s.settings.unwrap_or_default();
            json!({
                "up": s.up,
                "rate_onprem_to_azure": s.rate_onprem_to_azure,
                "rate_azure_to_onprem": s.rate_azure_to_onprem,
                "bytes_onprem_to_azure": s.bytes_onprem_to_azure,
                "bytes_azure_to_onprem": s.bytes_azure_to_onprem,
                "latency_ms": settings.latency_ms.unwrap_or(0),
                "jitter_ms": settings.jitter_ms.unwrap_or(0),
                "bandwidth_bytes_per_sec": settings.bandwidth_bytes_per_sec.unwrap_or(0),
                "flap_period_ms": settings.flap_period_ms.unwrap_or(0),
                "history": history.link.iter().map(|(t, a, b)| json!([t, a, b])).collect::<Vec<_>>(),
            })
        }
        Err(e) => {
            errors.push(format!("link: {e:#}"));
            Value::Null
        }
    };
    json!({
        "time_ms": now,
        "items": items,
        "jobs": jobs,
        "components": components,
        "link": link,
        "errors": errors,
    })
}
