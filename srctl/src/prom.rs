//! The lab's own Prometheus server (`lab up --prometheus`): Debian's `prometheus` binary,
//! started as one more process of the lab, scraping every component's `/metrics` every
//! second, its data in the lab directory.
//!
//! ```text
//! DIR/prometheus/prometheus.yml   scrape settings (file-based discovery of the targets)
//! DIR/prometheus/targets.json     one target per process, labelled component=NAME, binary=...;
//!                                 rewritten when components come and go (`infra add|remove`)
//! DIR/prometheus/data/            the TSDB
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use crate::labfile::{LabState, Proc};

/// The process's name in `lab.json` (and `lab status`).
pub const NAME: &str = "prometheus";

/// Prometheus's own binary, from `PATH`, or an error naming the package to install.
pub fn binary() -> anyhow::Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "`prometheus` is not installed: install Debian's `prometheus` package \
                 (`sudo apt-get install prometheus`), or start the lab without --prometheus"
            )
        })
}

fn dir_of(state: &LabState) -> PathBuf {
    state.dir.join("prometheus")
}

/// The process of the lab's Prometheus listening on `listen` (config written, not started).
pub fn plan(state: &LabState, listen: &str) -> anyhow::Result<Proc> {
    let bin = binary()?;
    let dir = dir_of(state);
    std::fs::create_dir_all(dir.join("data"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let config = dir.join("prometheus.yml");
    let targets = dir.join("targets.json");
    // YAML is a superset of JSON: the config is written as JSON.
    let body = json!({
        "global": { "scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s" },
        "scrape_configs": [{
            "job_name": "failback-lab",
            "file_sd_configs": [{ "files": [targets], "refresh_interval": "5s" }],
        }],
    });
    std::fs::write(&config, serde_json::to_vec_pretty(&body)?)
        .with_context(|| format!("cannot write {}", config.display()))?;
    write_targets_in(state, &dir)?;
    Ok(Proc {
        name: NAME.to_string(),
        binary: bin.display().to_string(),
        site: "onprem".into(),
        args: vec![
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address={listen}"),
            // Its own data in the lab directory, kept as long as the lab's logs would be.
            "--storage.tsdb.retention.time=7d".into(),
        ],
        config,
        log: state.dir.join(format!("logs/{NAME}.log")),
        listen: listen.to_string(),
        pid: None,
        env: Default::default(),
        metrics: listen.to_string(),
        system: true,
        deferred: false,
    })
}

/// Rewrites the targets from `lab.json`'s processes, if the lab has a Prometheus.
pub fn write_targets(state: &LabState) -> anyhow::Result<()> {
    let dir = dir_of(state);
    if !dir.join("prometheus.yml").exists() {
        return Ok(());
    }
    write_targets_in(state, &dir)
}

fn write_targets_in(state: &LabState, dir: &Path) -> anyhow::Result<()> {
    let targets: Vec<serde_json::Value> = state
        .procs
        .iter()
        .filter(|p| !p.metrics.is_empty() && !p.deferred)
        .map(|p| {
            json!({
                "targets": [p.metrics],
                "labels": { "component": p.name, "binary": binary_label(p), "site": p.site },
            })
        })
        .collect();
    let path = dir.join("targets.json");
    let tmp = dir.join("targets.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&targets)?)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("cannot write {}", path.display()))
}

fn binary_label(p: &Proc) -> String {
    Path::new(&p.binary)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Waits until the server at `listen` answers `/-/ready`.
pub async fn wait_ready(listen: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if get(listen, "/-/ready")
            .await
            .is_ok_and(|(status, _)| status == 200)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("Prometheus at {listen} was not ready within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A plain HTTP/1.0 GET on loopback (HTTP/1.0: the body comes whole, never chunked, and
/// the server closes the connection): (status, body).
pub async fn get(address: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(address).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
        .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await??;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("not an HTTP response from {address}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status from {address}"))?;
    Ok((status, body.to_string()))
}
