//! The local lab: a topology ([`crate::topology`]; the default two-site shape of DESIGN.md
//! unless a file says otherwise) as separate OS processes on loopback, all state under one
//! directory.
//!
//! # Directory layout
//! ```text
//! DIR/lab.json            what runs where (ports, pids, configs, logs); read by every srctl command
//! DIR/config/NAME.toml    each component's config
//! DIR/data/NAME/          each component's data directory (identity, state); cs: CA, passphrase, cs.db
//! DIR/topology.toml      the topology the lab was made from (`lab graph --lab DIR` draws it)
//! DIR/datastores/NAME/    each datastore of the topology
//! DIR/logs/NAME.log       one log per component
//! DIR/operator/           the operator credentials srctl uses
//! ```
//! Azure-side components reach the CS, and onprem components reach azure-side data ports,
//! only through vpn-link routes. `lab up` on a directory that holds a stopped lab starts the
//! same lab again (same ports, same data, no new enrollment).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use failback_proto::pb::operator::ListInfraRequest;

use serde_json::json;

use crate::client::{OPERATOR_NAME, operator_credentials};

pub use crate::labfile::{LabState, Proc};
use crate::topology::{Topology, datastore_dir, settings_json};
use failback_common::identity::Site;

/// Options of `lab up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// What to start (a file of `-t`, or the generated default).
    pub topology: Topology,
    pub timeout: Duration,
    /// Environment for every component process (config overrides such as
    /// `FBL_PS__CACHE_CAPACITY=32MiB`).
    pub env: BTreeMap<String, String>,
    /// Also start a Prometheus server scraping every process ([`crate::prom`]).
    pub prometheus: bool,
}

impl Default for UpOptions {
    fn default() -> Self {
        UpOptions {
            topology: Topology::generated(2, 1, 64 << 20).expect("the default shape is valid"),
            timeout: Duration::from_secs(60),
            env: BTreeMap::new(),
            prometheus: false,
        }
    }
}

/// A free port below the kernel's ephemeral range (which starts at 32768 by default), so that
/// no outgoing connection of another process can take it between now and the component's bind,
/// and claimed for the lab in `dir` (see [`claim_port`]), so that two labs started at once
/// never pick the same one.
pub(crate) fn free_port(taken: &BTreeMap<&str, u16>, dir: &Path) -> anyhow::Result<u16> {
    let (low, _) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|x| x.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    let top = low.saturating_sub(1).max(12000);
    for _ in 0..1000 {
        let port = 10000 + (rand_u16() % (top - 10000));
        if taken.values().any(|p| *p == port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() && claim_port(port, dir)? {
            return Ok(port);
        }
    }
    bail!("no free port found on 127.0.0.1 between 10000 and {top}")
}

/// Claims `port` for the lab in `dir` with a file `TMP/failback-lab-ports/PORT` created
/// exclusively and naming the lab: a lab being planned at the same moment sees the claim and
/// picks another port. A claim whose lab directory is gone (a test's lab, deleted) is stale and
/// taken over; a lab's own claim is its own.
fn claim_port(port: u16, dir: &Path) -> anyhow::Result<bool> {
    use std::io::Write;
    let claims = std::env::temp_dir().join("failback-lab-ports");
    std::fs::create_dir_all(&claims)
        .with_context(|| format!("cannot create {}", claims.display()))?;
    let claim = claims.join(port.to_string());
    let me = dir.display().to_string();
    for _ in 0..2 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&claim)
        {
            Ok(mut f) => {
                f.write_all(me.as_bytes())?;
                return Ok(true);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let holder = std::fs::read_to_string(&claim).unwrap_or_default();
                if holder == me {
                    return Ok(true);
                }
                if holder.is_empty() || Path::new(&holder).exists() {
                    // Claimed by a lab that exists (or is writing its claim right now).
                    return Ok(false);
                }
                // Stale: move it aside atomically (only one taker wins), then claim.
                let aside = claims.join(format!("{port}.stale.{}", std::process::id()));
                if std::fs::rename(&claim, &aside).is_ok() {
                    let _ = std::fs::remove_file(&aside);
                }
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot claim {}", claim.display()));
            }
        }
    }
    Ok(false)
}

fn rand_u16() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish() as u16
}

fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// Where the component binaries are: `FAILBACK_BIN_DIR`, else next to this executable.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("FAILBACK_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe()?;
    exe.parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow!("cannot locate the directory of {}", exe.display()))
}

fn write_toml(path: &Path, value: serde_json::Value) -> anyhow::Result<()> {
    let v: toml::Value = toml::Value::try_from(value)?;
    std::fs::write(path, toml::to_string_pretty(&v)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes the configs of `topology` and returns the lab state (nothing started).
fn plan(dir: &Path, topology: &Topology, opts: &UpOptions) -> anyhow::Result<LabState> {
    for sub in ["config", "data", "logs"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    for ds in topology.datastores() {
        std::fs::create_dir_all(datastore_dir(dir, &ds))?;
    }
    let dir = std::fs::canonicalize(dir)?;
    let p = |s: &str| dir.join(s);
    let (onprem, azure) = match (topology.site(Site::Onprem), topology.site(Site::Azure)) {
        (Some(o), Some(a)) => (o, a),
        _ => bail!("the topology needs both sites"),
    };
    let cs_name = topology.config_server().to_string();
    // Ports: the CS's two, the link's control port, one per component, and one per route of
    // the link (named `link-NAME`): the CS and onprem's process servers and master targets
    // are reached from Azure through it, Azure's targets from onprem.
    let mut wanted: Vec<String> = vec!["cs-enroll".into(), "cs-api".into(), "vpn".into()];
    let mut from_azure: Vec<String> = Vec::new();
    let mut from_onprem: Vec<String> = Vec::new();
    for site in [onprem, azure] {
        wanted.extend(site.process_servers.iter().map(|ps| ps.name().to_string()));
        wanted.extend(site.master_targets.iter().map(|m| m.name.clone()));
        wanted.extend(site.hosts.iter().map(|h| h.name.clone()));
    }
    from_azure.extend(
        onprem
            .process_servers
            .iter()
            .map(|ps| ps.name().to_string()),
    );
    from_azure.extend(onprem.master_targets.iter().map(|m| m.name.clone()));
    from_onprem.extend(azure.master_targets.iter().map(|m| m.name.clone()));
    for name in ["cs-enroll", "cs-api"]
        .iter()
        .map(|s| s.to_string())
        .chain(from_azure.iter().cloned())
        .chain(from_onprem.iter().cloned())
    {
        wanted.push(format!("link-{name}"));
    }
    // Every process serves its metrics on a port of its own.
    let processes: Vec<String> = [cs_name.clone(), "vpn".to_string()]
        .into_iter()
        .chain(
            wanted
                .iter()
                .filter(|n| !n.starts_with("cs-") && !n.starts_with("link-") && *n != "vpn")
                .cloned(),
        )
        .collect();
    wanted.extend(processes.iter().map(|n| format!("metrics-{n}")));
    let mut port: BTreeMap<&str, u16> = BTreeMap::new();
    for name in &wanted {
        let free = free_port(&port, &dir)?;
        port.insert(name.as_str(), free);
    }
    let cs_for = |site: Site| {
        let (api, enroll) = match site {
            Site::Onprem => (port["cs-api"], port["cs-enroll"]),
            Site::Azure => (port["link-cs-api"], port["link-cs-enroll"]),
        };
        json!({
            "address": addr(api),
            "enroll_address": addr(enroll),
            "ca_cert": p(&format!("data/{cs_name}/ca.pem")),
            "passphrase_file": p(&format!("data/{cs_name}/passphrase")),
        })
    };
    let datastores = |names: &[String]| -> serde_json::Value {
        names
            .iter()
            .map(|n| json!({"name": n, "path": datastore_dir(&dir, n)}))
            .collect()
    };

    let mut procs = Vec::new();
    let mut add = |name: &str,
                   binary: &str,
                   site: &str,
                   listen: String,
                   cfg: serde_json::Value,
                   run: bool|
     -> anyhow::Result<()> {
        let config = p(&format!("config/{name}.toml"));
        let metrics = addr(port[format!("metrics-{name}").as_str()]);
        let mut cfg = cfg;
        cfg["metrics_listen"] = json!(metrics);
        write_toml(&config, cfg)?;
        let mut args = Vec::new();
        if run {
            args.push("run".to_string());
        }
        args.push("--config".to_string());
        args.push(config.display().to_string());
        procs.push(Proc {
            name: name.to_string(),
            binary: binary.to_string(),
            site: site.to_string(),
            args,
            config,
            log: p(&format!("logs/{name}.log")),
            listen,
            pid: None,
            env: opts.env.clone(),
            metrics,
            system: false,
            deferred: false,
        });
        Ok(())
    };

    add(
        &cs_name,
        "config-server",
        "onprem",
        addr(port["cs-api"]),
        json!({
            "data_dir": p(&format!("data/{cs_name}")),
            "enroll_listen": addr(port["cs-enroll"]),
            "api_listen": addr(port["cs-api"]),
        }),
        true,
    )?;
    let route = |name: &str, from: Site, listen: &str, connect: &str| json!({"name": name, "from_site": from.as_str(), "listen": addr(port[listen]), "connect": addr(port[connect])});
    let mut routes = vec![
        route("cs-enroll", Site::Azure, "link-cs-enroll", "cs-enroll"),
        route("cs-api", Site::Azure, "link-cs-api", "cs-api"),
    ];
    for name in &from_azure {
        routes.push(route(name, Site::Azure, &format!("link-{name}"), name));
    }
    for name in &from_onprem {
        routes.push(route(name, Site::Onprem, &format!("link-{name}"), name));
    }
    let mut vpn = json!({
        "name": crate::labfile::LINK_NAME,
        "data_dir": p("data/vpn"),
        "cs": cs_for(Site::Onprem),
        "control_listen": addr(port["vpn"]),
        "route": routes,
    });
    if !topology.link.is_empty() {
        vpn["shaping"] = serde_json::to_value(&topology.link)?;
    }
    add("vpn", "vpn-link", "link", addr(port["vpn"]), vpn, false)?;
    // A component's config: identity, data, port, the addresses it is dialed at (its own
    // site's, and the link's for the other site where there is a route), its settings.
    let component = |name: &str, site: Site, settings: &toml::Table| -> serde_json::Value {
        let mut advertise = serde_json::Map::new();
        advertise.insert(site.as_str().into(), json!(addr(port[name])));
        let link = format!("link-{name}");
        if let Some(via) = port.get(link.as_str()) {
            advertise.insert(site.other().as_str().into(), json!(addr(*via)));
        }
        let mut cfg = json!({
            "name": name,
            "site": site.as_str(),
            "data_dir": p(&format!("data/{name}")),
            "listen": addr(port[name]),
            "advertise": advertise,
            "cs": cs_for(site),
        });
        for (k, v) in settings_json(settings) {
            cfg[k] = v;
        }
        cfg
    };
    let mut expected = vec![crate::labfile::LINK_NAME.to_string()];
    let mut deferred: Vec<String> = Vec::new();
    for site in [onprem, azure] {
        for ps in &site.process_servers {
            let cfg = component(ps.name(), site.name, &ps.settings());
            add(
                ps.name(),
                "process-server",
                site.name.as_str(),
                addr(port[ps.name()]),
                cfg,
                false,
            )?;
            if ps.starts() {
                expected.push(ps.name().to_string());
            } else {
                deferred.push(ps.name().to_string());
            }
        }
        for mt in &site.master_targets {
            let mut cfg = component(&mt.name, site.name, &mt.settings);
            cfg["datastore"] = datastores(&mt.datastores);
            if mt.role == crate::topology::TargetRole::MasterTarget {
                cfg["os"] = json!(mt.os.as_str());
            }
            add(
                &mt.name,
                "master-target",
                site.name.as_str(),
                addr(port[mt.name.as_str()]),
                cfg,
                false,
            )?;
            expected.push(mt.name.clone());
        }
        for host in &site.hosts {
            let mut cfg = component(&host.name, site.name, &host.settings);
            if let Some(o) = cfg["advertise"].as_object_mut() {
                o.retain(|k, _| k == site.name.as_str());
            }
            cfg["datastore"] = datastores(&host.datastores);
            cfg["machine"] = host
                .machines
                .iter()
                .map(|m| {
                    let mut machine = json!({
                        "name": m.name,
                        "os": m.os.as_str(),
                        "datastore": host.datastores[0],
                        "disk": m.disks.iter().enumerate()
                            .map(|(i, size)| json!({"id": format!("disk{i}"), "size": size.as_u64()}))
                            .collect::<Vec<_>>(),
                    });
                    for (k, v) in settings_json(&m.settings) {
                        machine[k] = v;
                    }
                    machine
                })
                .collect();
            add(
                &host.name,
                "mobility-agent",
                site.name.as_str(),
                addr(port[host.name.as_str()]),
                cfg,
                false,
            )?;
            expected.push(host.name.clone());
        }
    }
    expected.extend(topology.machines());
    std::fs::write(p("topology.toml"), toml::to_string_pretty(topology)?)
        .with_context(|| format!("cannot write {}", p("topology.toml").display()))?;
    for p in procs.iter_mut().filter(|p| deferred.contains(&p.name)) {
        p.deferred = true;
    }
    Ok(LabState {
        dir: dir.clone(),
        cs_api: addr(port["cs-api"]),
        cs_enroll: addr(port["cs-enroll"]),
        link_control: addr(port["vpn"]),
        link_name: crate::labfile::LINK_NAME.to_string(),
        expected,
        procs,
        containers: String::new(),
        start_command: String::new(),
    })
}

/// Whether `pid` is a live process: some thread of it is neither a zombie nor dead.
pub fn alive(pid: u32) -> bool {
    // A killed process's main thread can be a zombie while another thread still finishes an
    // uninterruptible write: its files (its listening port) stay open until the last thread
    // is gone. So any live thread counts.
    match std::fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(tasks) => tasks
            .filter_map(Result::ok)
            .any(|t| running_state(&t.path().join("stat"))),
        Err(_) => running_state(std::path::Path::new(&format!("/proc/{pid}/stat"))),
    }
}

/// Whether the `stat` file at `path` shows a task that is neither a zombie nor dead.
fn running_state(path: &Path) -> bool {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return false;
    };
    // Field 3, after the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

/// Runs `config-server operator add` on the lab's CS data: the operator's credentials into
/// `out/identity/`.
fn add_operator(bin_dir: &Path, cs_config: &Path, out: &Path) -> anyhow::Result<()> {
    let bin = bin_dir.join("config-server");
    let output = Command::new(&bin)
        .args(["operator", "add", OPERATOR_NAME, "--out"])
        .arg(out)
        .arg("--config")
        .arg(cs_config)
        .env("RUST_LOG", "warn")
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !output.status.success() {
        bail!(
            "issuing the operator's credentials failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn spawn(bin_dir: &Path, proc: &Proc) -> anyhow::Result<u32> {
    use std::os::unix::process::CommandExt;
    let bin = if proc.system {
        PathBuf::from(&proc.binary)
    } else {
        bin_dir.join(&proc.binary)
    };
    if !bin.exists() {
        bail!(
            "component binary `{}` not found in {}; build the workspace first (`cargo build --release`) \
             or set FAILBACK_BIN_DIR",
            proc.binary,
            bin_dir.display()
        );
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&proc.log)
        .with_context(|| format!("cannot open {}", proc.log.display()))?;
    let child = Command::new(&bin)
        .args(&proc.args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .envs(&proc.env)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    Ok(child.id())
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Polls `check` every 50 ms until it is true, `deadline` passes, or `proc` dies.
async fn wait_for<F, Fut>(
    what: &str,
    proc: Option<&Proc>,
    deadline: Instant,
    mut check: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    loop {
        if check().await {
            return Ok(());
        }
        if let Some(p) = proc
            && p.pid.is_some_and(|pid| !alive(pid))
        {
            bail!(
                "{} exited while starting; last lines of {}:\n{}",
                p.name,
                p.log.display(),
                log_tail(&p.log, 15)
            );
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts the lab in `dir` (a new one, or the stopped one already there) and waits until
/// every component and machine has registered.
/// Refuses, before anything starts, a lab whose disks and their replicas would not fit on the
/// filesystem `dir` is on (every datastore of a local lab is a directory of it): each source
/// disk is provisioned in full, and its replica as much again.
fn check_capacity(dir: &Path, topology: &Topology) -> anyhow::Result<()> {
    let disks: Vec<u64> = topology
        .site
        .iter()
        .flat_map(|s| &s.hosts)
        .flat_map(|h| &h.machines)
        .flat_map(|m| m.disks.iter().map(|d| d.as_u64()))
        .collect();
    let provisioned: u64 = disks.iter().sum();
    let needed = provisioned.saturating_mul(2);
    // The nearest existing ancestor: the lab directory itself is created later.
    let existing = dir
        .ancestors()
        .find(|a| a.exists())
        .unwrap_or_else(|| Path::new("."));
    let st = nix::sys::statvfs::statvfs(existing)
        .with_context(|| format!("cannot read the free space of {}", existing.display()))?;
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    if needed > free {
        bail!(
            "{} disks of {} in all need {} with their replicas, and the filesystem of {} has {} \
             free: use fewer machines (--machines), disks (--disks-per-machine) or smaller ones \
             (--disk-size), or another --dir",
            disks.len(),
            bytesize::ByteSize::b(provisioned),
            bytesize::ByteSize::b(needed),
            existing.display(),
            bytesize::ByteSize::b(free)
        );
    }
    Ok(())
}

pub async fn up(dir: &Path, opts: &UpOptions) -> anyhow::Result<LabState> {
    let mut state = match LabState::load(dir) {
        Ok(existing) => {
            if existing.procs.is_empty() {
                bail!(
                    "{} describes a lab whose components run elsewhere (e.g. the container lab of \
                     deploy/); start it there (`deploy/lab up {}`), not with `srctl lab up`",
                    dir.display(),
                    dir.display()
                );
            }
            if let Some(p) = existing.procs.iter().find(|p| p.pid.is_some_and(alive)) {
                bail!(
                    "a lab is already running in {} ({} is pid {}); stop it with `srctl lab down --dir {}`",
                    dir.display(),
                    p.name,
                    p.pid.unwrap_or_default(),
                    dir.display()
                );
            }
            existing
        }
        Err(_) => {
            check_capacity(dir, &opts.topology)?;
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            plan(dir, &opts.topology, opts)?
        }
    };
    // The lab's Prometheus: asked for now, or part of this lab since an earlier start.
    if opts.prometheus && !state.procs.iter().any(|p| p.name == crate::prom::NAME) {
        let port = free_port(&BTreeMap::new(), &state.dir)?;
        let proc = crate::prom::plan(&state, &addr(port))?;
        state.procs.push(proc);
        state.save()?;
    }
    let bins = bin_dir()?;
    let result = start_all(&mut state, &bins, opts.timeout).await;
    if let Err(e) = result {
        let _ = stop_all(&mut state, Duration::from_secs(5)).await;
        return Err(e);
    }
    Ok(state)
}

async fn start_all(state: &mut LabState, bins: &Path, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let dir = state.dir.clone();
    // 1. The configuration server, then wait for its CA, passphrase and enrollment port.
    let cs_index = 0;
    state.procs[cs_index].pid = Some(spawn(bins, &state.procs[cs_index])?);
    state.save()?;
    let ca = dir.join("data/cs/ca.pem");
    let enroll = state.cs_enroll.clone();
    wait_for(
        "the configuration server",
        Some(&state.procs[cs_index]),
        deadline,
        || {
            let ca = ca.clone();
            let enroll = enroll.clone();
            async move { ca.exists() && tokio::net::TcpStream::connect(&enroll).await.is_ok() }
        },
    )
    .await?;
    // 2. The VPN link.
    let vpn = state
        .procs
        .iter()
        .position(|p| p.binary == "vpn-link")
        .ok_or_else(|| anyhow!("lab has no vpn-link"))?;
    state.procs[vpn].pid = Some(spawn(bins, &state.procs[vpn])?);
    state.save()?;
    let link = state.link_control.clone();
    wait_for("vpn-link", Some(&state.procs[vpn]), deadline, || {
        let link = link.clone();
        async move { tokio::net::TcpStream::connect(&link).await.is_ok() }
    })
    .await?;
    // 3. The operator identity (first start only): issued on the CS host, as an operator's
    // is (the component passphrase enrolls no operator).
    if operator_credentials(&dir).is_err() {
        let cs = state
            .procs
            .iter()
            .find(|p| p.binary == "config-server")
            .ok_or_else(|| anyhow!("lab has no config-server"))?;
        add_operator(bins, &cs.config, &dir.join("operator"))?;
    }
    // 4. Everything else, all at once (the lab's Prometheus once they are up).
    for i in 0..state.procs.len() {
        if state.procs[i].pid.is_none() && !state.procs[i].system && !state.procs[i].deferred {
            state.procs[i].pid = Some(spawn(bins, &state.procs[i])?);
        }
    }
    state.save()?;
    // 5. Wait until everything has registered and is connected.
    let mut client = crate::client::operator(&dir).await?;
    let expected = state.expected.clone();
    let mut missing: Vec<String> = expected.clone();
    loop {
        if let Ok(resp) = client.list_infra(ListInfraRequest {}).await {
            let rows = resp.into_inner().components;
            missing = expected
                .iter()
                .filter(|n| {
                    !rows
                        .iter()
                        .any(|c| &c.name == *n && c.status == "connected")
                })
                .cloned()
                .collect();
            if missing.is_empty() {
                return start_system(state, bins, deadline).await;
            }
        }
        if let Some(dead) = state
            .procs
            .iter()
            .find(|p| p.pid.is_some_and(|pid| !alive(pid)))
        {
            bail!(
                "{} exited while the lab was starting; last lines of {}:\n{}",
                dead.name,
                dead.log.display(),
                log_tail(&dead.log, 15)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "timed out after {timeout:?} waiting for {} to register; see the logs in {}",
                missing.join(", "),
                dir.join("logs").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts the lab's system processes (its Prometheus) and waits until they are ready.
async fn start_system(state: &mut LabState, bins: &Path, deadline: Instant) -> anyhow::Result<()> {
    for i in 0..state.procs.len() {
        if !state.procs[i].system || state.procs[i].pid.is_some() {
            continue;
        }
        crate::prom::write_targets(state)?;
        state.procs[i].pid = Some(spawn(bins, &state.procs[i])?);
        state.save()?;
        let listen = state.procs[i].listen.clone();
        let within = deadline.saturating_duration_since(Instant::now());
        if let Err(e) = crate::prom::wait_ready(&listen, within.max(Duration::from_secs(10))).await
        {
            let p = &state.procs[i];
            bail!(
                "{e}; last lines of {}:\n{}",
                p.log.display(),
                log_tail(&p.log, 15)
            );
        }
    }
    Ok(())
}

/// Stops every process of the lab: SIGTERM, then SIGKILL after `grace`. Returns how many ran.
pub async fn stop_all(state: &mut LabState, grace: Duration) -> anyhow::Result<usize> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let running: Vec<u32> = state
        .procs
        .iter()
        .filter_map(|p| p.pid)
        .filter(|pid| alive(*pid))
        .collect();
    for pid in running.iter().rev() {
        let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while running.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for pid in running.iter().filter(|p| alive(**p)) {
        tracing::warn!(pid, "did not stop within the grace period; killing");
        let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while running.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for p in &mut state.procs {
        p.pid = None;
    }
    state.save()?;
    if let Some(p) = running.iter().find(|p| alive(**p)) {
        bail!("process {p} is still running after SIGKILL");
    }
    Ok(running.len())
}

/// `lab down`.
pub async fn down(dir: &Path) -> anyhow::Result<usize> {
    let mut state = LabState::load(dir)?;
    stop_all(&mut state, Duration::from_secs(10)).await
}

/// Prints what runs where.
pub fn print_procs(state: &LabState) {
    println!(
        "{:<14} {:<15} {:<7} {:<22} {:<22} {:>8}  LOG",
        "NAME", "BINARY", "SITE", "LISTEN", "METRICS", "PID"
    );
    for p in &state.procs {
        let pid = match p.pid {
            Some(pid) if alive(pid) => pid.to_string(),
            Some(_) => "exited".into(),
            None => "stopped".into(),
        };
        println!(
            "{:<14} {:<15} {:<7} {:<22} {:<22} {:>8}  {}",
            p.name,
            p.binary,
            p.site,
            p.listen,
            if p.metrics.is_empty() {
                "-"
            } else {
                &p.metrics
            },
            pid,
            p.log.display()
        );
    }
    if let Some(p) = state.procs.iter().find(|p| p.name == crate::prom::NAME) {
        println!(
            "\nprometheus: http://{} (scrapes every process each second; data in {})",
            p.listen,
            state.dir.join("prometheus/data").display()
        );
    }
}

/// What `lab kill|restart|pause|resume` does to one component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcAction {
    /// SIGKILL, no grace: a crash.
    Kill,
    /// Stop (SIGTERM, grace, SIGKILL) if running, then start again on the same data directory.
    Restart,
    /// SIGSTOP: the process hangs, its sockets stay open.
    Pause,
    /// SIGCONT.
    Resume,
}

/// Applies `action` to the component `name` of the lab in `dir`.
pub async fn control_proc(dir: &Path, name: &str, action: ProcAction) -> anyhow::Result<()> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let mut state = LabState::load(dir)?;
    let idx = state
        .procs
        .iter()
        .position(|p| p.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = state.procs.iter().map(|p| p.name.as_str()).collect();
            anyhow!(
                "no component `{name}` in this lab (components: {})",
                names.join(", ")
            )
        })?;
    let running = state.procs[idx].pid.filter(|p| alive(*p));
    let signal = |sig: Signal| -> anyhow::Result<()> {
        let pid = running.ok_or_else(|| {
            anyhow!("{name} is not running; start it with `srctl lab restart {name}`")
        })?;
        kill(Pid::from_raw(pid as i32), sig)
            .map_err(|e| anyhow!("cannot signal {name} (pid {pid}): {e}"))
    };
    match action {
        ProcAction::Kill => {
            signal(Signal::SIGKILL)?;
            // A process in uninterruptible I/O (an fsync on a busy disk) dies only when it
            // leaves it: until then it still holds its port, and a restart would fail to bind.
            if !wait_dead(running, KILL_WAIT).await {
                bail!(
                    "{name} was sent SIGKILL but is still running after {KILL_WAIT:?} (stuck in I/O?)"
                );
            }
        }
        ProcAction::Pause => signal(Signal::SIGSTOP)?,
        ProcAction::Resume => signal(Signal::SIGCONT)?,
        ProcAction::Restart => {
            if let Some(pid) = running {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGCONT);
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
                if !wait_dead(Some(pid), Duration::from_secs(10)).await {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                    if !wait_dead(Some(pid), KILL_WAIT).await {
                        bail!(
                            "{name} (pid {pid}) is still running {KILL_WAIT:?} after SIGKILL: not \
                             starting a second one"
                        );
                    }
                }
            }
            let pid = spawn(&bin_dir()?, &state.procs[idx])?;
            state.procs[idx].pid = Some(pid);
            state.save()?;
            // One that cannot start (its port taken, a bad config) exits at once: say so here.
            tokio::time::sleep(Duration::from_millis(300)).await;
            if !alive(pid) {
                let p = &state.procs[idx];
                bail!(
                    "{name} exited right after it was started; last lines of {}:\n{}",
                    p.log.display(),
                    log_tail(&p.log, 10)
                );
            }
        }
    }
    if action == ProcAction::Kill {
        state.procs[idx].pid = None;
    }
    state.save()
}

/// How long a SIGKILLed component may take to die.
const KILL_WAIT: Duration = Duration::from_secs(30);

async fn wait_dead(pid: Option<u32>, within: Duration) -> bool {
    let Some(pid) = pid else { return true };
    let deadline = Instant::now() + within;
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Adds a process server `name` in `site` to the local lab in `dir` and starts it: its config
/// (the CS as its site reaches it, copied from a component of that site), a port, its place
/// in `lab.json` and `topology.toml`. For a lab whose components run elsewhere (containers),
/// nothing is started here: say so.
/// Returns, for a lab whose components run in containers, how to start it there (the deploy
/// job waits until it has registered).
pub async fn add_process_server(
    dir: &Path,
    name: &str,
    site: &str,
) -> anyhow::Result<Option<String>> {
    let mut state = LabState::load(dir)?;
    if state.procs.is_empty() {
        let how = if state.start_command.is_empty() {
            "start it where the lab's components run".to_string()
        } else {
            format!("start it with `{} {name}`", state.start_command)
        };
        return Ok(Some(format!(
            "the components of this lab run in containers ({}): {how}; the Deploy job waits \
             until it has registered",
            if state.containers.is_empty() {
                "not started by srctl"
            } else {
                &state.containers
            }
        )));
    }
    // One the topology declared for later: started now, as it was planned.
    if let Some(i) = state
        .procs
        .iter()
        .position(|p| p.name == name && p.deferred)
    {
        if state.procs[i].site != site {
            bail!(
                "the topology declares `{name}` in {}, not {site}",
                state.procs[i].site
            );
        }
        state.procs[i].deferred = false;
        state.procs[i].pid = Some(spawn(&bin_dir()?, &state.procs[i])?);
        state.expected.push(name.to_string());
        state.save()?;
        crate::prom::write_targets(&state)?;
        return Ok(None);
    }
    if state.procs.iter().any(|p| p.name == name) {
        bail!("the lab already runs a component named `{name}`");
    }
    let site_enum: Site = site.parse().map_err(|e: String| anyhow!(e))?;
    // The CS as this site reaches it: what another component of the site is configured with.
    let peer = state
        .procs
        .iter()
        .find(|p| p.site == site && p.binary != "config-server")
        .ok_or_else(|| anyhow!("the lab has no component in {site} to take the CS address from"))?;
    let peer_config: toml::Table = toml::from_str(
        &std::fs::read_to_string(&peer.config)
            .with_context(|| format!("cannot read {}", peer.config.display()))?,
    )?;
    let cs = peer_config
        .get("cs")
        .cloned()
        .ok_or_else(|| anyhow!("{} has no [cs] table", peer.config.display()))?;
    let dir = state.dir.clone();
    let taken: BTreeMap<&str, u16> = BTreeMap::new();
    let port = free_port(&taken, &dir)?;
    let metrics_port = free_port(&BTreeMap::from([("listen", port)]), &dir)?;
    let config = dir.join(format!("config/{name}.toml"));
    write_toml(
        &config,
        json!({
            "name": name,
            "site": site,
            "data_dir": dir.join(format!("data/{name}")),
            "listen": addr(port),
            "advertise": { site: addr(port) },
            "cs": serde_json::to_value(&cs)?,
            "metrics_listen": addr(metrics_port),
        }),
    )?;
    let env = state
        .procs
        .first()
        .map(|p| p.env.clone())
        .unwrap_or_default();
    let proc = Proc {
        name: name.to_string(),
        binary: "process-server".into(),
        site: site.to_string(),
        args: vec!["--config".into(), config.display().to_string()],
        config,
        log: dir.join(format!("logs/{name}.log")),
        listen: addr(port),
        pid: None,
        env,
        metrics: addr(metrics_port),
        system: false,
        deferred: false,
    };
    let pid = spawn(&bin_dir()?, &proc)?;
    state.procs.push(Proc {
        pid: Some(pid),
        ..proc
    });
    state.expected.push(name.to_string());
    state.save()?;
    crate::prom::write_targets(&state)?;
    // The topology the lab was made from gains it (lab graph, and a later `lab up`).
    let topology_file = dir.join("topology.toml");
    if let Ok(mut topology) = Topology::load(&topology_file) {
        if let Some(s) = topology.site.iter_mut().find(|s| s.name == site_enum) {
            s.process_servers
                .push(crate::topology::ProcessServer::Name(name.to_string()));
        }
        std::fs::write(&topology_file, toml::to_string_pretty(&topology)?)?;
    }
    Ok(None)
}

/// After `infra remove NAME`: stops its process if the local lab runs it and forgets it
/// (`lab.json`, `topology.toml`). Whether there was one.
pub async fn forget_component(dir: &Path, name: &str) -> anyhow::Result<bool> {
    let Ok(mut state) = LabState::load(dir) else {
        return Ok(false);
    };
    let Some(idx) = state.procs.iter().position(|p| p.name == name) else {
        return Ok(false);
    };
    if state.procs[idx].pid.is_some_and(alive) {
        control_proc(dir, name, ProcAction::Kill).await?;
        state = LabState::load(dir)?;
    }
    state.procs.retain(|p| p.name != name);
    state.expected.retain(|n| n != name);
    state.save()?;
    crate::prom::write_targets(&state)?;
    let topology_file = state.dir.join("topology.toml");
    if let Ok(mut topology) = Topology::load(&topology_file) {
        for s in &mut topology.site {
            s.process_servers.retain(|p| p.name() != name);
            s.master_targets.retain(|m| m.name != name);
            s.hosts.retain(|h| h.name != name);
        }
        std::fs::write(&topology_file, toml::to_string_pretty(&topology)?)?;
    }
    Ok(true)
}

#[cfg(test)]
mod port_claims {
    use super::*;

    #[test]
    fn a_port_claimed_by_a_living_lab_is_refused_and_a_stale_claim_is_taken_over() {
        // A port outside the range labs pick from, so no real lab is disturbed.
        let port = 9_999;
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let _ = std::fs::remove_file(std::env::temp_dir().join("failback-lab-ports/9999"));
        assert!(claim_port(port, a.path()).expect("claim"), "free: claimed");
        assert!(
            claim_port(port, a.path()).expect("claim"),
            "a lab's own claim"
        );
        assert!(
            !claim_port(port, b.path()).expect("claim"),
            "another living lab's claim is respected"
        );
        drop(a);
        assert!(
            claim_port(port, b.path()).expect("claim"),
            "the claim of a deleted lab is stale"
        );
        let _ = std::fs::remove_file(std::env::temp_dir().join("failback-lab-ports/9999"));
    }
}
