//! `srctl link status|up|down|set|reset`: the simulated VPN between the sites.

use failback_proto::pb::link::{
    Blackhole, DownMode, LinkSettings, LinkStatus, LinkStatusRequest, ResetConnectionsRequest,
    SetRequest, SetUpRequest,
};

use crate::client::status_message;

/// `srctl link set`: shapes the link at runtime. Flags not given keep their current value
/// (with `--clear`, every setting first returns to its default).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SetArgs {
    /// Added one-way delay per direction, e.g. 100ms (0 for none).
    #[arg(long, value_parser = parse_ms)]
    pub latency: Option<u32>,
    /// Random ± added to each chunk's delay, e.g. 20ms; bytes are never reordered.
    #[arg(long, value_parser = parse_ms)]
    pub jitter: Option<u32>,
    /// Cap per direction shared by every connection of the link: 10Mbit, 500kbit, 1MB
    /// (= bytes/s), 1MiB; 0 or off for unlimited.
    #[arg(long, value_parser = parse_bandwidth)]
    pub bandwidth: Option<u64>,
    /// What `link down` does to existing connections: reset (RST) or stall (kept, frozen
    /// until up).
    #[arg(long, value_parser = parse_down_mode)]
    pub down_mode: Option<DownMode>,
    /// Take the link down and up alternating every PERIOD (e.g. 2s); off to stop (leaves
    /// the link up). `link up`/`link down` also stop flapping.
    #[arg(long, value_name = "PERIOD", value_parser = parse_flap)]
    pub flap: Option<u32>,
    /// Silently drop the bytes crossing one way (connections stay up): onprem-to-azure,
    /// azure-to-onprem, or off.
    #[arg(long, value_parser = parse_blackhole)]
    pub blackhole: Option<Blackhole>,
    /// Restore every setting to its default (no shaping, down mode reset) before applying
    /// the flags given.
    #[arg(long)]
    pub clear: bool,
}

impl SetArgs {
    pub fn request(&self) -> SetRequest {
        SetRequest {
            settings: Some(LinkSettings {
                latency_ms: self.latency,
                jitter_ms: self.jitter,
                bandwidth_bytes_per_sec: self.bandwidth,
                down_mode: self.down_mode.map(|m| m as i32),
                flap_period_ms: self.flap,
                blackhole: self.blackhole.map(|b| b as i32),
            }),
            clear: self.clear,
        }
    }
}

/// A duration in whole milliseconds: `100ms`, `2s`, `0`.
pub fn parse_ms(s: &str) -> Result<u32, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("expected a duration like 100ms or 2s: {e}"))?;
    u32::try_from(d.as_millis()).map_err(|_| format!("duration too long: {s}"))
}

/// A flap period in milliseconds; `off` (or `0`) is 0.
pub fn parse_flap(s: &str) -> Result<u32, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(0);
    }
    parse_ms(s)
}

/// A rate in bytes per second (`10Mbit`, `500kbit`, `1MB`, `off`...): vpn-link's own parser,
/// so the CLI accepts exactly what the link does.
pub use vpn_link::shaping::parse_bandwidth;

pub fn parse_down_mode(s: &str) -> Result<DownMode, String> {
    match s.trim() {
        "reset" => Ok(DownMode::Reset),
        "stall" => Ok(DownMode::Stall),
        other => Err(format!("expected reset or stall, got {other:?}")),
    }
}

pub fn parse_blackhole(s: &str) -> Result<Blackhole, String> {
    match s.trim() {
        "onprem-to-azure" => Ok(Blackhole::OnpremToAzure),
        "azure-to-onprem" => Ok(Blackhole::AzureToOnprem),
        "off" => Ok(Blackhole::Off),
        other => Err(format!(
            "expected onprem-to-azure, azure-to-onprem or off, got {other:?}"
        )),
    }
}

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

/// Applies `args` (merge; see [`SetArgs`]).
pub async fn set(dir: &std::path::Path, args: &SetArgs) -> anyhow::Result<LinkStatus> {
    let mut c = crate::client::link(dir).await?;
    Ok(c.set(args.request())
        .await
        .map_err(|s| anyhow::anyhow!("{}", status_message(&s)))?
        .into_inner())
}

/// Resets every relayed connection once; the link stays up.
pub async fn reset_connections(dir: &std::path::Path) -> anyhow::Result<LinkStatus> {
    let mut c = crate::client::link(dir).await?;
    Ok(c.reset_connections(ResetConnectionsRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", status_message(&s)))?
        .into_inner())
}

/// The settings in the words of the CLI flags.
struct Shown {
    latency_ms: u32,
    jitter_ms: u32,
    bandwidth: String,
    bandwidth_bytes_per_sec: u64,
    down_mode: &'static str,
    flap: String,
    flap_period_ms: u32,
    blackhole: &'static str,
}

fn shown(s: &LinkStatus) -> Shown {
    let set = s.settings.unwrap_or_default();
    let bw = set.bandwidth_bytes_per_sec.unwrap_or(0);
    let flap = set.flap_period_ms.unwrap_or(0);
    Shown {
        latency_ms: set.latency_ms.unwrap_or(0),
        jitter_ms: set.jitter_ms.unwrap_or(0),
        bandwidth: if bw == 0 {
            "unlimited".into()
        } else {
            format!("{} ({bw} B/s)", bits(bw))
        },
        bandwidth_bytes_per_sec: bw,
        down_mode: match set.down_mode.map(DownMode::try_from) {
            Some(Ok(DownMode::Stall)) => "stall",
            _ => "reset",
        },
        flap: if flap == 0 {
            "off".into()
        } else {
            format!("{flap}ms")
        },
        flap_period_ms: flap,
        blackhole: match set.blackhole.map(Blackhole::try_from) {
            Some(Ok(Blackhole::OnpremToAzure)) => "onprem-to-azure",
            Some(Ok(Blackhole::AzureToOnprem)) => "azure-to-onprem",
            _ => "off",
        },
    }
}

/// Bytes per second as a bit rate: `10Mbit`, `4.5Mbit`, `500kbit`.
fn bits(bytes_per_sec: u64) -> String {
    let b = bytes_per_sec as f64 * 8.0;
    let (v, unit) = if b >= 1e9 {
        (b / 1e9, "Gbit")
    } else if b >= 1e6 {
        (b / 1e6, "Mbit")
    } else if b >= 1e3 {
        (b / 1e3, "kbit")
    } else {
        (b, "bit")
    };
    let v = format!("{v:.2}");
    let v = v.trim_end_matches('0').trim_end_matches('.');
    format!("{v}{unit}")
}

pub fn print(s: &LinkStatus, as_json: bool) -> anyhow::Result<()> {
    let set = shown(s);
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
                "rate_onprem_to_azure": s.rate_onprem_to_azure,
                "rate_azure_to_onprem": s.rate_azure_to_onprem,
                "dropped_onprem_to_azure": s.dropped_onprem_to_azure,
                "dropped_azure_to_onprem": s.dropped_azure_to_onprem,
                "active_connections": s.active_connections,
                "total_connections": s.total_connections,
                "settings": {
                    "latency_ms": set.latency_ms,
                    "jitter_ms": set.jitter_ms,
                    "bandwidth_bytes_per_sec": set.bandwidth_bytes_per_sec,
                    "down_mode": set.down_mode,
                    "flap_period_ms": set.flap_period_ms,
                    "blackhole": set.blackhole,
                },
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
        "rate: onprem->azure {} B/s ({}), azure->onprem {} B/s ({})",
        s.rate_onprem_to_azure,
        bits(s.rate_onprem_to_azure),
        s.rate_azure_to_onprem,
        bits(s.rate_azure_to_onprem)
    );
    println!(
        "settings: latency {}ms ± {}ms, bandwidth {}, down-mode {}, flap {}, blackhole {}",
        set.latency_ms, set.jitter_ms, set.bandwidth, set.down_mode, set.flap, set.blackhole
    );
    if s.dropped_onprem_to_azure + s.dropped_azure_to_onprem > 0 {
        println!(
            "blackholed: onprem->azure {} B, azure->onprem {} B",
            s.dropped_onprem_to_azure, s.dropped_azure_to_onprem
        );
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flags() {
        assert_eq!(parse_bandwidth("10Mbit"), Ok(1_250_000));
        assert_eq!(parse_bandwidth("1MB"), Ok(1_000_000));
        assert_eq!(parse_bandwidth("500kbit"), Ok(62_500));
        assert_eq!(parse_bandwidth("off"), Ok(0));
        assert_eq!(parse_bandwidth("0"), Ok(0));
        assert!(parse_bandwidth("quick").is_err());
        assert_eq!(parse_ms("100ms"), Ok(100));
        assert_eq!(parse_flap("2s"), Ok(2000));
        assert_eq!(parse_flap("off"), Ok(0));
        assert_eq!(parse_blackhole("off"), Ok(Blackhole::Off));
        assert_eq!(parse_down_mode("stall"), Ok(DownMode::Stall));
        assert_eq!(bits(1_250_000), "10Mbit");
        assert_eq!(bits(62_500), "500kbit");
    }
}
