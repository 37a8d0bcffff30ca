//! `srctl link status|up|down`: the simulated VPN between the sites.

use failback_proto::pb::link::{LinkStatus, LinkStatusRequest, SetUpRequest};

use crate::client::status_message;

pub async fn status(dir: &std::path::Path) -> anyhow::Result<LinkStatus> {
    let mut c = crate::client::link(dir).await?;
    Ok(c.status(LinkStatusRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", status_message(&s)))?
        .into_inner())
}

pub async fn set_up(dir: &std::path::Path, up: bool) -> anyhow::Result<LinkStatus> {
    let mut c = crate::client::link(dir).await?;
    Ok(c.set_up(SetUpRequest { up })
        .await
        .map_err(|s| anyhow::anyhow!("{}", status_message(&s)))?
        .into_inner())
}

pub fn print(s: &LinkStatus, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        let routes: Vec<_> = s
            .routes
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name, "listen": r.listen, "connect": r.connect, "from_site": r.from_site,
                    "bytes_forward": r.bytes_forward, "bytes_backward": r.bytes_backward,
                    "active_connections": r.active_connections,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "up": s.up,
                "bytes_onprem_to_azure": s.bytes_onprem_to_azure,
                "bytes_azure_to_onprem": s.bytes_azure_to_onprem,
                "active_connections": s.active_connections,
                "total_connections": s.total_connections,
                "routes": routes,
            }))?
        );
        return Ok(());
    }
    println!(
        "link {}: onprem->azure {} B, azure->onprem {} B, {} active / {} total connections",
        if s.up { "up" } else { "DOWN" },
        s.bytes_onprem_to_azure,
        s.bytes_azure_to_onprem,
        s.active_connections,
        s.total_connections
    );
    println!(
        "{:<14} {:<7} {:<22} {:<22} {:>12} {:>12} {:>6}",
        "ROUTE", "FROM", "LISTEN", "CONNECT", "FORWARD B", "BACK B", "ACTIVE"
    );
    for r in &s.routes {
        println!(
            "{:<14} {:<7} {:<22} {:<22} {:>12} {:>12} {:>6}",
            r.name,
            r.from_site,
            r.listen,
            r.connect,
            r.bytes_forward,
            r.bytes_backward,
            r.active_connections
        );
    }
    Ok(())
}
