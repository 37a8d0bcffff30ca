//! `srctl infra list|remove|add`: the CS inventory, as a table or JSON; components removed
//! or deployed at runtime.

use failback_proto::pb::operator::{
    Component, DeployComponentRequest, DeployRole, Job, ListInfraRequest, RemoveComponentRequest,
};
use serde_json::json;

use crate::client::status_message;

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The JSON form of one component (`infra list --json`).
pub fn to_json(c: &Component) -> serde_json::Value {
    json!({
        "name": c.name,
        "role": c.role,
        "site": c.site,
        "address": c.address,
        "addresses": c.addresses,
        "version": c.version,
        "status": c.status,
        "last_heartbeat_ms": c.last_heartbeat_ms,
        "enrolled_at_ms": c.enrolled_at_ms,
        "host": c.host,
        "machines": c.machines,
        "power_state": c.power_state,
        "health": c.health,
        "health_errors": c.health_errors,
        "cache_used_bytes": c.cache_used_bytes,
        "cache_capacity_bytes": c.cache_capacity_bytes,
        "datastores": c.datastores.iter().map(|d| json!({
            "name": d.name, "path": d.path, "capacity_bytes": d.capacity_bytes, "free_bytes": d.free_bytes,
        })).collect::<Vec<_>>(),
        "disks": c.disks.iter().map(|d| json!({
            "id": d.id, "datastore": d.datastore, "size_bytes": d.size_bytes,
        })).collect::<Vec<_>>(),
    })
}

fn details(c: &Component) -> String {
    let mut parts = Vec::new();
    if c.health != "Healthy" && c.health != "-" && !c.health.is_empty() {
        parts.push(format!("{}: {}", c.health, c.health_errors.join("; ")));
    }
    if c.cache_capacity_bytes > 0 {
        parts.push(format!(
            "cache {} of {}",
            bytes(c.cache_used_bytes),
            bytes(c.cache_capacity_bytes)
        ));
    }
    if !c.machines.is_empty() {
        parts.push(format!("machines: {}", c.machines.join(", ")));
    }
    if !c.datastores.is_empty() {
        let ds: Vec<String> = c
            .datastores
            .iter()
            .map(|d| format!("{} ({} free)", d.name, bytes(d.free_bytes)))
            .collect();
        parts.push(format!("datastores: {}", ds.join(", ")));
    }
    if !c.host.is_empty() {
        parts.push(format!("on {} ({})", c.host, c.power_state));
    }
    if !c.disks.is_empty() {
        let disks: Vec<String> = c
            .disks
            .iter()
            .map(|d| format!("{} {} in {}", d.id, bytes(d.size_bytes), d.datastore))
            .collect();
        parts.push(format!("disks: {}", disks.join(", ")));
    }
    parts.join("; ")
}

/// Prints the inventory.
pub fn print(components: &[Component], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        let arr: Vec<_> = components.iter().map(to_json).collect();
        println!("{}", serde_json::to_string_pretty(&arr)?);
        return Ok(());
    }
    println!(
        "{:<14} {:<15} {:<7} {:<22} {:<8} {:<14} DETAILS",
        "NAME", "ROLE", "SITE", "ADDRESS", "VERSION", "STATUS"
    );
    for c in components {
        println!(
            "{:<14} {:<15} {:<7} {:<22} {:<8} {:<14} {}",
            c.name,
            c.role,
            c.site,
            if c.address.is_empty() {
                "-"
            } else {
                &c.address
            },
            c.version,
            c.status,
            details(c)
        );
    }
    Ok(())
}

pub async fn list(dir: &std::path::Path) -> anyhow::Result<Vec<Component>> {
    let mut client = crate::client::operator(dir).await?;
    let resp = client
        .list_infra(ListInfraRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", status_message(&s)))?;
    Ok(resp.into_inner().components)
}

pub async fn remove(dir: &std::path::Path, name: &str) -> anyhow::Result<()> {
    let mut client = crate::client::operator(dir).await?;
    client
        .remove_component(RemoveComponentRequest {
            name: name.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", status_message(&s)))?;
    Ok(())
}

/// Starts the "Deploy process server" job for `name` in `site`.
pub async fn deploy(dir: &std::path::Path, name: &str, site: &str) -> anyhow::Result<Job> {
    let mut client = crate::client::operator(dir).await?;
    Ok(client
        .deploy_component(DeployComponentRequest {
            name: name.to_string(),
            role: DeployRole::ProcessServer as i32,
            site: site.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", status_message(&s)))?
        .into_inner())
}
