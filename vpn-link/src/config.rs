//! vpn-link configuration: the TOML form ([`LinkConfig`], [`RouteConfig`]) and the validated
//! runtime form ([`Config`], [`Route`]).
//!
//! Validation happens once, in [`LinkConfig::validate`]: every failure names its key
//! (`route[2].from_site`) and the file. Addresses are `host:port`; hostnames (`cs:443`) are
//! accepted because containers use DNS names, and are resolved only when a connection is
//! dialled, so a peer that starts later is not a config error.
//!
//! ```toml
//! name = "vpn"                  # its identity in the lab (role vpn-link)
//! data_dir = "vpn-data"         # its credentials
//! control_listen = "127.0.0.1:7000"
//! [cs]                          # as every component: where the CS is, the CA, the passphrase
//! address = "127.0.0.1:7002"
//! enroll_address = "127.0.0.1:7001"
//! ca_cert = "cs-data/ca.pem"
//! passphrase_file = "cs-data/passphrase"
//! [[route]]
//! name = "cs-enroll"
//! from_site = "azure"
//! listen = "127.0.0.1:7101"
//! connect = "127.0.0.1:7001"
//!
//! # Optional: shaping and faults at start (each key optional; see `shaping`).
//! [shaping]
//! latency = "100ms"             # added one-way delay per direction
//! jitter = "20ms"               # ± per chunk
//! bandwidth = "10Mbit"          # per direction, whole tunnel; "1MB" = bytes/s; "off"
//! down_mode = "stall"           # or "reset" (the default)
//! flap = "2s"                   # down/up alternating; "off"
//! blackhole = "onprem-to-azure" # or "azure-to-onprem", "off"
//! ```

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use failback_common::config::{self, ConfigError};
use failback_common::enroll::CsSettings;
use failback_common::identity::{Identity, Role};
use failback_common::listener::ConnLimits;
use serde::Deserialize;

use crate::shaping::{self, Settings};
pub use failback_common::identity::Site;

/// Environment prefix for overrides, e.g. `FBL_LINK__CONTROL_LISTEN`.
pub const ENV_PREFIX: &str = "FBL_LINK";

/// The configuration as written in the TOML file, before validation.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinkConfig {
    /// The link's name in the lab: it enrolls as a component of role `vpn-link`.
    pub name: String,
    /// Where its credentials live.
    pub data_dir: PathBuf,
    /// The configuration server (as for every component).
    pub cs: CsSettings,
    /// Bounds of the control port's connections (`[listener]`).
    pub listener: ConnLimits,
    /// Where the operator-facing control gRPC API listens: mutual TLS, operator
    /// certificates only.
    pub control_listen: String,
    /// The relayed routes, one `[[route]]` table each.
    pub route: Vec<RouteConfig>,
    /// Shaping and faults in effect from the start (the optional `[shaping]` table).
    pub shaping: ShapingConfig,
    /// Prometheus metrics at `http://ADDRESS/metrics` (empty: none).
    pub metrics_listen: String,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            name: "vpn".to_string(),
            data_dir: PathBuf::from("vpn-data"),
            cs: CsSettings::default(),
            listener: ConnLimits::default(),
            control_listen: "127.0.0.1:7000".to_string(),
            route: Vec::new(),
            shaping: ShapingConfig::default(),
            metrics_listen: String::new(),
        }
    }
}

/// The `[shaping]` table as written; every key optional (absent: no shaping of that kind).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShapingConfig {
    /// e.g. `100ms`.
    pub latency: Option<String>,
    /// e.g. `20ms`.
    pub jitter: Option<String>,
    /// e.g. `10Mbit`, `1MB`, `off`.
    pub bandwidth: Option<String>,
    /// `reset` or `stall`.
    pub down_mode: Option<String>,
    /// e.g. `2s`, `off`.
    pub flap: Option<String>,
    /// `onprem-to-azure`, `azure-to-onprem` or `off`.
    pub blackhole: Option<String>,
}

impl ShapingConfig {
    /// Parses every key present; the error is `(key, message)`.
    /// The settings these keys describe; the first bad key and why otherwise.
    pub fn validate(&self) -> Result<Settings, (&'static str, String)> {
        fn field<T>(
            key: &'static str,
            value: &Option<String>,
            parse: impl FnOnce(&str) -> Result<T, String>,
        ) -> Result<Option<T>, (&'static str, String)> {
            value
                .as_deref()
                .map(parse)
                .transpose()
                .map_err(|m| (key, m))
        }
        let delay = |s: &str| shaping::parse_duration(s).and_then(shaping::check_delay);
        let mut out = Settings::default();
        if let Some(v) = field("latency", &self.latency, delay)? {
            out.latency = v;
        }
        if let Some(v) = field("jitter", &self.jitter, delay)? {
            out.jitter = v;
        }
        if let Some(v) = field("bandwidth", &self.bandwidth, shaping::parse_bandwidth)? {
            out.bandwidth = v;
        }
        if let Some(v) = field("down_mode", &self.down_mode, shaping::DownMode::parse)? {
            out.down_mode = v;
        }
        if let Some(v) = field("flap", &self.flap, shaping::parse_flap)? {
            out.flap = v;
        }
        if let Some(v) = field("blackhole", &self.blackhole, shaping::parse_blackhole)? {
            out.blackhole = v;
        }
        Ok(out)
    }
}

/// One `[[route]]` table as written; every field is required (checked by validation so the
/// error names the key).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    pub from_site: String,
    pub listen: String,
    pub connect: String,
}

/// A validated route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Free text, unique within a link.
    pub name: String,
    /// The site the dialer is on. Bytes from the dialer (forward) cross from this site to
    /// the other one; the replies (backward) cross the other way.
    pub from_site: Site,
    /// Where the relay accepts (`host:port`; port 0 binds an ephemeral port).
    pub listen: String,
    /// The real server on the other site (`host:port`), resolved at each dial.
    pub connect: String,
}

impl Route {
    pub fn new(
        name: impl Into<String>,
        from_site: Site,
        listen: impl Into<String>,
        connect: impl Into<String>,
    ) -> Self {
        Route {
            name: name.into(),
            from_site,
            listen: listen.into(),
            connect: connect.into(),
        }
    }
}

/// The validated configuration the binary runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Who the link is (role vpn-link, site onprem: it is run from on-premises).
    pub identity: Identity,
    pub data_dir: PathBuf,
    pub cs: CsSettings,
    pub listener: ConnLimits,
    pub control_listen: String,
    pub routes: Vec<Route>,
    /// The settings to start with.
    pub shaping: Settings,
    /// Where Prometheus metrics are served (empty: nowhere).
    pub metrics_listen: String,
}

/// Loads defaults, `file` and `FBL_LINK__*` environment overrides, then validates.
pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
    config::load::<LinkConfig>(file, ENV_PREFIX)?.validate(file)
}

impl LinkConfig {
    /// Checks every key and converts to the runtime form; `file` only names the source in
    /// errors.
    pub fn validate(self, file: Option<&Path>) -> Result<Config, ConfigError> {
        let err = |key: String, message: String| ConfigError::key(file, key, message);
        check_addr(&self.control_listen).map_err(|m| err("control_listen".into(), m))?;
        if !self.metrics_listen.is_empty() {
            check_addr(&self.metrics_listen).map_err(|m| err("metrics_listen".into(), m))?;
        }
        let shaping = self
            .shaping
            .validate()
            .map_err(|(key, m)| err(format!("shaping.{key}"), m))?;
        let mut names = HashSet::new();
        let mut routes = Vec::with_capacity(self.route.len());
        for (i, r) in self.route.into_iter().enumerate() {
            let key = |field: &str| format!("route[{i}].{field}");
            if r.name.trim().is_empty() {
                return Err(err(key("name"), "must be set".into()));
            }
            if !names.insert(r.name.clone()) {
                return Err(err(
                    key("name"),
                    format!("duplicate route name {:?}", r.name),
                ));
            }
            let from_site = match r.from_site.as_str() {
                "onprem" => Site::Onprem,
                "azure" => Site::Azure,
                other => {
                    return Err(err(
                        key("from_site"),
                        format!("must be \"onprem\" or \"azure\", got {other:?}"),
                    ));
                }
            };
            check_addr(&r.listen).map_err(|m| err(key("listen"), m))?;
            check_addr(&r.connect).map_err(|m| err(key("connect"), m))?;
            routes.push(Route {
                name: r.name,
                from_site,
                listen: r.listen,
                connect: r.connect,
            });
        }
        failback_common::component::validate_common(file, &self.name, &self.cs, &self.listener)?;
        Ok(Config {
            identity: Identity::new(Role::VpnLink, Site::Onprem, self.name),
            data_dir: self.data_dir,
            cs: self.cs,
            listener: self.listener,
            control_listen: self.control_listen,
            routes,
            shaping,
            metrics_listen: self.metrics_listen,
        })
    }
}

/// Accepts `ip:port`, `[v6]:port` and `hostname:port`.
fn check_addr(addr: &str) -> Result<(), String> {
    if addr.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let bad = || format!("expected host:port, got {addr:?}");
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
    if !host_ok || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, site: &str, listen: &str, connect: &str) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            from_site: site.into(),
            listen: listen.into(),
            connect: connect.into(),
        }
    }

    /// The defaults plus the `[cs]` table every component needs.
    fn with_cs() -> LinkConfig {
        LinkConfig {
            cs: CsSettings {
                address: "127.0.0.1:7002".into(),
                enroll_address: "127.0.0.1:7001".into(),
                ca_cert: "ca.pem".into(),
                ..CsSettings::default()
            },
            ..LinkConfig::default()
        }
    }

    fn validate(routes: Vec<RouteConfig>) -> Result<Config, String> {
        LinkConfig {
            route: routes,
            ..with_cs()
        }
        .validate(None)
        .map_err(|e| e.to_string())
    }

    #[test]
    fn accepts_ips_and_hostnames() {
        let c = validate(vec![
            route("a", "onprem", "0.0.0.0:7101", "cs:443"),
            route("b", "azure", "[::1]:0", "mt-onprem.lab:7003"),
        ])
        .expect("valid");
        assert_eq!(c.routes[0].from_site, Site::Onprem);
        assert_eq!(c.routes[1].connect, "mt-onprem.lab:7003");
    }

    #[test]
    fn parses_and_checks_shaping() {
        let ok = LinkConfig {
            shaping: ShapingConfig {
                latency: Some("100ms".into()),
                bandwidth: Some("10Mbit".into()),
                down_mode: Some("stall".into()),
                flap: Some("off".into()),
                blackhole: Some("azure-to-onprem".into()),
                ..ShapingConfig::default()
            },
            ..with_cs()
        }
        .validate(None)
        .expect("valid shaping")
        .shaping;
        assert_eq!(ok.latency, std::time::Duration::from_millis(100));
        assert_eq!(ok.bandwidth, 1_250_000);
        assert_eq!(ok.down_mode, shaping::DownMode::Stall);
        assert_eq!(ok.flap, None);
        assert_eq!(ok.blackhole, Some(Site::Azure));

        let bad = |s: ShapingConfig| {
            LinkConfig {
                shaping: s,
                ..with_cs()
            }
            .validate(None)
            .expect_err("must fail")
            .to_string()
        };
        let cases = [
            (
                ShapingConfig {
                    latency: Some("soon".into()),
                    ..ShapingConfig::default()
                },
                "shaping.latency",
            ),
            (
                ShapingConfig {
                    bandwidth: Some("10Mfoo".into()),
                    ..ShapingConfig::default()
                },
                "shaping.bandwidth",
            ),
            (
                ShapingConfig {
                    down_mode: Some("freeze".into()),
                    ..ShapingConfig::default()
                },
                "shaping.down_mode",
            ),
            (
                ShapingConfig {
                    flap: Some("1ms".into()),
                    ..ShapingConfig::default()
                },
                "shaping.flap",
            ),
            (
                ShapingConfig {
                    blackhole: Some("both".into()),
                    ..ShapingConfig::default()
                },
                "shaping.blackhole",
            ),
        ];
        for (s, key) in cases {
            let msg = bad(s);
            assert!(msg.contains(&format!("`{key}`")), "{key}: {msg}");
        }
    }

    #[test]
    fn names_the_bad_key() {
        let cases = [
            (
                vec![
                    route("a", "onprem", "x:1", "y:2"),
                    route("a", "azure", "x:3", "y:4"),
                ],
                "route[1].name",
            ),
            (vec![route("", "onprem", "x:1", "y:2")], "route[0].name"),
            (vec![route("a", "onprem", "x", "y:2")], "route[0].listen"),
            (
                vec![route("a", "onprem", "x:1", "y:99999")],
                "route[0].connect",
            ),
            (
                vec![route("a", "Onprem", "x:1", "y:2")],
                "route[0].from_site",
            ),
        ];
        for (routes, key) in cases {
            let msg = validate(routes).expect_err("must fail");
            assert!(msg.contains(&format!("`{key}`")), "{key}: {msg}");
        }
    }
}
