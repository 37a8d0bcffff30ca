//! Configuration of the configuration server (`config-server run --config FILE`, env `FBL_CS__*`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use failback_common::config::{ConfigError, load};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CsConfig {
    /// Directory holding `cs.db`, `ca.pem` and `passphrase`.
    pub data_dir: PathBuf,
    /// Enrollment port: server-authenticated TLS, serves only `Enroll`.
    pub enroll_listen: String,
    /// Mutual-TLS port: control streams and the operator API.
    pub api_listen: String,
    /// The API address as the lab's components dial it, shown in `infra list` (e.g.
    /// `cs:7002` in containers, where the CS binds 0.0.0.0); empty: the bound address.
    pub advertise: String,
    /// How often components heartbeat (sent to them in `Welcome`).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A control stream silent this long is dropped and its component shown "not connected".
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    /// Failed enrollments allowed per source address per minute before that address waits.
    pub enroll_failures_per_minute: u32,
    /// Failed enrollments allowed per component name per minute before that name waits.
    pub enroll_failures_per_name: u32,
    /// Bounds of both listeners' connections (`[listener]`: handshake timeout, caps).
    pub listener: failback_common::listener::ConnLimits,
    /// How long the certificates of components (and the CS's own) are valid; each renews
    /// over its control stream once less than a third remains.
    #[serde(with = "humantime_serde")]
    pub cert_lifetime: Duration,
    /// How long an operator's certificate (`config-server operator add`) is valid: operators
    /// don't renew theirs; remove and add again.
    #[serde(with = "humantime_serde")]
    pub operator_cert_lifetime: Duration,
    /// How long a failed-over VM takes to boot before its agent registers (ASR: up to 15
    /// minutes; lab default a few seconds).
    #[serde(with = "humantime_serde")]
    pub boot_delay: Duration,
    /// Most disks one master target may serve (ASR: 60); reprotect refuses to exceed it.
    pub master_target_disk_limit: usize,
    /// Test hook: a job reaching a step whose name starts with this waits there (state
    /// Waiting) until `srctl job resume`. Empty: off.
    pub hold_at_step: String,
    /// Test hook: a job's task panics at a step whose name starts with this. Empty: off.
    pub panic_at_step: String,
    /// Prometheus metrics at `http://ADDRESS/metrics` (empty: none).
    pub metrics_listen: String,
}

impl Default for CsConfig {
    fn default() -> Self {
        CsConfig {
            data_dir: PathBuf::from("cs-data"),
            enroll_listen: "127.0.0.1:9442".into(),
            api_listen: "127.0.0.1:9443".into(),
            advertise: String::new(),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(4),
            enroll_failures_per_minute: 5,
            enroll_failures_per_name: 5,
            listener: Default::default(),
            cert_lifetime: Duration::from_secs(365 * 86_400),
            operator_cert_lifetime: Duration::from_secs(365 * 86_400),
            boot_delay: Duration::from_secs(2),
            master_target_disk_limit: 60,
            hold_at_step: String::new(),
            metrics_listen: String::new(),
            panic_at_step: String::new(),
        }
    }
}

impl CsConfig {
    /// Loads and validates the config: defaults, then `file`, then `FBL_CS__*`.
    pub fn load(file: Option<&Path>) -> Result<CsConfig, ConfigError> {
        let cfg: CsConfig = load(file, "FBL_CS")?;
        if cfg.heartbeat_interval < Duration::from_millis(50) {
            return Err(ConfigError::key(
                file,
                "heartbeat_interval",
                "must be at least 50ms",
            ));
        }
        if cfg.heartbeat_timeout < cfg.heartbeat_interval * 2 {
            return Err(ConfigError::key(
                file,
                "heartbeat_timeout",
                "must be at least twice heartbeat_interval",
            ));
        }
        cfg.listener
            .validate()
            .map_err(|(k, m)| ConfigError::key(file, format!("listener.{k}"), m))?;
        for (key, value) in [
            ("cert_lifetime", cfg.cert_lifetime),
            ("operator_cert_lifetime", cfg.operator_cert_lifetime),
        ] {
            if value < Duration::from_secs(10) || value > Duration::from_secs(10 * 365 * 86_400) {
                return Err(ConfigError::key(
                    file,
                    key,
                    "must be between 10s and 10 years",
                ));
            }
        }
        if cfg.enroll_failures_per_name == 0 {
            return Err(ConfigError::key(
                file,
                "enroll_failures_per_name",
                "must be at least 1",
            ));
        }
        if cfg.enroll_failures_per_minute == 0 {
            return Err(ConfigError::key(
                file,
                "enroll_failures_per_minute",
                "must be at least 1",
            ));
        }
        Ok(cfg)
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("cs.db")
    }
}
