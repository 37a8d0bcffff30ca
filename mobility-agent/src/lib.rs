//! The mobility-agent host: a hypervisor host (or Azure compute host) running machines.
//!
//! A machine is an agent identity + disks (raw sparse files in a datastore) + a power state.
//! The host process registers itself (role `host`, reporting its datastores and machines)
//! and, for each machine, enrolls and registers the machine's own agent (role `agent`,
//! reporting its disks), each with its own certificate and control stream, as every VM in
//! ASR runs its own mobility service.
//!
//! # Layout
//! - [`config`]: host, datastores, machines and disks.
//! - [`machine`]: a machine's disks on its datastore.
//! - [`capture`]: the write path: activity log, replication log, tags.
//! - [`budget`]: the replication memory all machines of the host share.
//! - [`sender`]: replication to the process server (initial copy, delta, resync of hot regions).
//! - [`workload`]: the workload generator standing in for the guest OS.
//! - [`export`]: the machine's disks over NBD, for real guest software.
//! - [`export_tls`]: the host's NBD exports over TCP, TLS required, for operators.
//! - [`scripts`]: pre and post scripts around app-consistent points.
//! - [`metrics`]: the per-item series of the host's `/metrics` endpoint.

pub mod budget;
pub mod capture;
pub mod config;
pub mod export;
pub mod export_tls;
pub mod machine;
pub mod metrics;
pub mod scripts;
pub mod sender;
pub mod workload;

use std::sync::Arc;

use failback_common::component::{DatastoreConfig, advertised, hello, register};
use failback_common::control::Refusal;
use failback_common::identity::{Identity, Role};
use failback_proto::pb::control::{ComponentMessage, Hello, MachineInfo, command};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::AgentConfig;

/// Registers the host and its machines, then serves the host's health port until `shutdown`.
pub async fn run(
    config: AgentConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let identity = Identity::new(Role::Host, config.site, &config.name);
    for ds in &config.datastore {
        std::fs::create_dir_all(&ds.path)
            .map_err(|e| anyhow::anyhow!("datastore {} at {}: {e}", ds.name, ds.path.display()))?;
    }
    std::fs::create_dir_all(&config.data_dir)?;
    let saved = HostState::load(&config.data_dir)?;
    let mut machines = Vec::new();
    for m in &config.machine {
        if !saved.deleted.contains(&m.name) {
            machines.push(machine::Machine::open(m, &config)?);
        }
    }

    let addresses = advertised(&config.advertise, config.site, listener.local_addr().ok());
    let base = hello(&identity);
    let datastores = config.datastore.clone();
    let state_dir = config.data_dir.clone();
    let statics: Vec<String> = config.machine.iter().map(|m| m.name.clone()).collect();
    let hello_fn = Arc::new(move || {
        // Every VM on this host, running or powered off (read now: it changes at runtime).
        let saved = HostState::load(&state_dir).unwrap_or_default();
        let mut names: Vec<String> = statics
            .iter()
            .filter(|n| !saved.deleted.contains(*n))
            .cloned()
            .chain(saved.booted.iter().map(|b| b.name.clone()))
            .collect();
        names.sort();
        names.dedup();
        Hello {
            addresses: addresses.clone(),
            datastores: datastores.iter().map(DatastoreConfig::describe).collect(),
            machines: names,
            ..base.clone()
        }
    });
    let host = register(&identity, &config.data_dir, &config.cs, hello_fn, &shutdown).await?;
    let secured = host.secured(config.listener)?;
    let registry = failback_common::metrics::Metrics::new();
    let host_metrics = metrics::HostMetrics::register(&registry);
    failback_common::metrics::start(Some(&config.metrics_listen), &registry, &shutdown).await?;
    let exports = Arc::new(export::HostExports::default());
    if let Some(addr) = config.nbd_listen().map_err(anyhow::Error::msg)? {
        export_tls::start(addr, &config.data_dir, &host, exports.clone(), &shutdown).await?;
    }
    let budget = Arc::new(budget::HostBudget::new(config.replication_budget.as_u64()));
    host_metrics.budget.set(budget.cap() as f64);
    {
        // The budget's use, as of the last second.
        let (budget, used, stop) = (
            budget.clone(),
            host_metrics.budget_used.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => used.set(budget.used() as f64),
                    _ = stop.cancelled() => return,
                }
            }
        });
    }
    let host_metrics = Arc::new(HostShared {
        metrics: host_metrics,
        exports,
        budget,
    });

    let mut running = Running::default();
    let mut count = 0;
    for (index, m) in machines.into_iter().enumerate() {
        if saved.off.contains(&m.name) || saved.booted.iter().any(|b| b.name == m.name) {
            continue;
        }
        let stop = shutdown.child_token();
        let disks = m.disks.iter().map(|d| d.path.clone()).collect();
        running.insert(m.name.clone(), (stop.clone(), disks));
        start_machine(m, &config, index as u64 + 1, stop, &host_metrics).await?;
        count += 1;
    }
    // VMs booted here before a restart (failed-over machines) come back up.
    for b in &saved.booted {
        if let Err(e) = start_booted(&config, &mut running, b, &shutdown, &host_metrics) {
            tracing::error!(machine = %b.name, "cannot restart the booted machine: {e}");
        }
    }
    tracing::info!(machines = count, booted = saved.booted.len(), "host ready");
    tokio::spawn(host_commands(
        config.clone(),
        running,
        host.control.commands,
        host.control.outbox,
        shutdown.clone(),
        host_metrics,
    ));

    let router =
        failback_common::server::builder().add_service(failback_common::server::health_service());
    failback_common::server::serve(router, listener, secured, shutdown).await?;
    Ok(())
}

/// What every machine of the host shares: the per-item metrics, the NBD exports over TCP.
struct HostShared {
    metrics: Arc<metrics::HostMetrics>,
    exports: Arc<export::HostExports>,
    /// The replication memory all machines share.
    budget: Arc<budget::HostBudget>,
}

/// Opens a machine's capture path, registers its agent and serves its commands until `stop`.
async fn start_machine(
    m: machine::Machine,
    config: &AgentConfig,
    seed: u64,
    stop: CancellationToken,
    shared: &Arc<HostShared>,
) -> anyhow::Result<()> {
    let id = Identity::new(Role::Agent, config.site, &m.name);
    let base = hello(&id);
    let info = MachineInfo {
        host: config.name.clone(),
        power_state: "running".into(),
        disks: m.disks.iter().map(|d| d.describe()).collect(),
    };
    let os = m.os.to_pb() as i32;
    let hello_fn = Arc::new(move || Hello {
        machine: Some(info.clone()),
        os,
        ..base.clone()
    });
    let data_dir = config.data_dir.join("machines").join(&m.name);
    let capture = capture::Capture::open(
        &m,
        &data_dir,
        config.replication_buffer.as_u64(),
        shared.budget.clone(),
    )?;
    if m.resized {
        std::fs::write(
            data_dir.join(sender::RESYNC_REQUIRED_FILE),
            b"disk resized\n",
        )?;
    }
    // A machine runs without exports rather than not at all (the error names the fix).
    match export::start(
        &config.data_dir,
        &m.name,
        capture.clone(),
        &shared.exports,
        &stop,
    ) {
        Ok(socket) => {
            tracing::info!(machine = %m.name, socket = %socket.display(), "disks exported over NBD")
        }
        Err(e) => tracing::error!(machine = %m.name, "no NBD exports: {e:#}"),
    }
    let registered = register(&id, &data_dir, &config.cs, hello_fn, &stop).await?;
    let agent = Agent {
        name: m.name.clone(),
        capture,
        credentials: registered.credentials.clone(),
        outbox: registered.control.outbox.clone(),
        state_dir: data_dir,
        seed,
        shutdown: stop,
        replication: None,
        workload: None,
        metrics: shared.metrics.clone(),
        scripts: config.app_scripts.get(&m.name).cloned(),
    };
    tokio::spawn(agent.run(registered.control.commands));
    Ok(())
}

/// Machines running on this host: name -> (stop token, disk files).
type Running = std::collections::HashMap<String, (CancellationToken, Vec<std::path::PathBuf>)>;

/// A machine booted on this host from disks in one of its datastores (a failover or a
/// failback); kept in `host.json` so that it comes back after a host restart.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Booted {
    name: String,
    datastore: String,
    disks: Vec<(String, String, u64)>,
    network: String,
    boot_delay_ms: u64,
    /// The machine's OS (older host.json files: Windows).
    #[serde(default)]
    os: failback_common::os::Os,
}

/// What the host changed at runtime, persisted in DATA_DIR/host.json: configured machines
/// powered off (during a reprotect) or deleted (before an alternate-location failback), and
/// machines booted here.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct HostState {
    off: Vec<String>,
    deleted: Vec<String>,
    booted: Vec<Booted>,
}

impl HostState {
    fn path(dir: &std::path::Path) -> std::path::PathBuf {
        dir.join("host.json")
    }

    fn load(dir: &std::path::Path) -> anyhow::Result<HostState> {
        match std::fs::read(Self::path(dir)) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| anyhow::anyhow!("{}: {e}", Self::path(dir).display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HostState::default()),
            Err(e) => Err(anyhow::anyhow!("{}: {e}", Self::path(dir).display())),
        }
    }

    fn save(&self, dir: &std::path::Path) -> Result<(), String> {
        let path = Self::path(dir);
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(&tmp, bytes)
            .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| format!("cannot save {}: {e}", path.display()))
    }
}

/// The host's own commands: boot a machine from disks in a datastore (failover, failback),
/// power one off or delete it.
async fn host_commands(
    config: AgentConfig,
    mut running: Running,
    mut commands: tokio::sync::mpsc::Receiver<failback_proto::pb::control::CsMessage>,
    outbox: tokio::sync::mpsc::Sender<ComponentMessage>,
    shutdown: CancellationToken,
    metrics: Arc<HostShared>,
) {
    let mut answered = failback_common::control::Answered::default();
    while let Some(cmd) = failback_common::control::next_command(&mut commands).await {
        let run = || async {
            match cmd.kind {
                Some(command::Kind::Boot(b)) => boot(&config, &mut running, b, &shutdown, &metrics)
                    .await
                    .map(|_| ())
                    .map_err(Refusal::from),
                Some(command::Kind::RemoveMachine(r)) => remove(&config, &mut running, &r),
                _ => Err(Refusal::from(format!(
                    "`{}` is a host: it doesn't take this command",
                    config.name
                ))),
            }
            .map(|_| None)
        };
        if !failback_common::control::answer(&outbox, &mut answered, cmd.id, run).await {
            return;
        }
    }
}

/// Powers a machine off (`delete_disks` false: it stays on the host, its disks kept) or
/// deletes it with its disks. Idempotent for a machine already off.
fn remove(
    config: &AgentConfig,
    running: &mut Running,
    r: &failback_proto::pb::control::RemoveMachine,
) -> Result<(), Refusal> {
    let mut saved = HostState::load(&config.data_dir).map_err(|e| e.to_string())?;
    let is_static = config.machine.iter().any(|m| m.name == r.name);
    let booted = saved.booted.iter().position(|b| b.name == r.name);
    if !is_static && booted.is_none() && !running.contains_key(&r.name)
        || saved.deleted.contains(&r.name)
    {
        return Err(Refusal::not_found(format!(
            "no machine `{}` on {}",
            r.name, config.name
        )));
    }
    let disks: Vec<std::path::PathBuf> = match running.remove(&r.name) {
        Some((stop, disks)) => {
            stop.cancel();
            disks
        }
        None => match booted {
            Some(i) => saved.booted[i]
                .disks
                .iter()
                .map(|(_, p, _)| p.into())
                .collect(),
            None => Vec::new(),
        },
    };
    if let Some(i) = booted {
        saved.booted.remove(i);
    }
    if r.delete_disks {
        let _ = std::fs::remove_dir_all(config.data_dir.join("machines").join(&r.name));
        let disks = if disks.is_empty() && is_static {
            config
                .machine
                .iter()
                .find(|m| m.name == r.name)
                .and_then(|m| config.datastore(&m.datastore).map(|d| (m, d)))
                .map(|(m, d)| {
                    m.disk
                        .iter()
                        .map(|disk| d.path.join(&m.name).join(format!("{}.img", disk.id)))
                        .collect()
                })
                .unwrap_or_default()
        } else {
            disks
        };
        for d in &disks {
            if let Err(e) = failback_common::vdisk::VDisk::remove(d) {
                tracing::warn!(machine = %r.name, "cannot delete a disk: {e}");
            }
        }
        if let Some(dir) = disks.first().and_then(|d| d.parent()) {
            let _ = std::fs::remove_dir(dir);
        }
        saved.off.retain(|n| n != &r.name);
        if is_static && !saved.deleted.contains(&r.name) {
            saved.deleted.push(r.name.clone());
        }
        tracing::info!(machine = %r.name, "machine deleted with its disks");
    } else {
        if is_static && !saved.off.contains(&r.name) {
            saved.off.push(r.name.clone());
        }
        tracing::info!(machine = %r.name, "machine powered off");
    }
    saved.save(&config.data_dir)?;
    Ok(())
}

/// Boots a machine from disks in a datastore of this host: a failed-over VM, or at failback
/// the original VM from its own (brought up to date) disks. Its agent uses the certificate the
/// CS issued and registers after the boot delay.
async fn boot(
    config: &AgentConfig,
    running: &mut Running,
    b: failback_proto::pb::control::BootMachine,
    shutdown: &CancellationToken,
    metrics: &Arc<HostShared>,
) -> Result<String, String> {
    failback_common::identity::validate_name(&b.name)?;
    if running.contains_key(&b.name) {
        return Err(format!(
            "78052: a VM named `{}` is already running on {}",
            b.name, config.name
        ));
    }
    let Some(ds) = config.datastore(&b.datastore) else {
        return Err(format!(
            "8061: datastore `{}` is not accessible from {}",
            b.datastore, config.name
        ));
    };
    for d in &b.disks {
        // The disks must be files of that datastore, whatever the command says.
        failback_common::paths::absolute_inside(&ds.path, &d.path)
            .map_err(|e| format!("disk {}: {e}", d.id))?;
        let len = failback_common::vdisk::VDisk::open_read(std::path::Path::new(&d.path))
            .map_err(|e| format!("disk {}: {e}", d.path))?
            .len();
        if len != d.size_bytes {
            return Err(format!(
                "disk {} is {len} bytes, expected {}",
                d.path, d.size_bytes
            ));
        }
    }
    let os = failback_common::os::Os::from_pb(b.os()).unwrap_or_default();
    let identity = Identity::new(Role::Agent, config.site, &b.name);
    let data_dir = config.data_dir.join("machines").join(&b.name);
    let _ = std::fs::remove_dir_all(&data_dir);
    failback_common::tls::Credentials {
        identity,
        cert_pem: b.certificate_pem,
        key_pem: b.key_pem,
        ca_pem: b.ca_pem,
    }
    .save(&data_dir)
    .map_err(|e| e.to_string())?;
    let booted = Booted {
        name: b.name.clone(),
        datastore: b.datastore.clone(),
        disks: b
            .disks
            .iter()
            .map(|d| (d.id.clone(), d.path.clone(), d.size_bytes))
            .collect(),
        network: b.network.clone(),
        boot_delay_ms: b.boot_delay_ms,
        os,
    };
    let mut saved = HostState::load(&config.data_dir).map_err(|e| e.to_string())?;
    saved.booted.retain(|x| x.name != b.name);
    saved.booted.push(booted.clone());
    saved.deleted.retain(|n| n != &b.name);
    saved.off.retain(|n| n != &b.name);
    saved.save(&config.data_dir)?;
    start_booted(config, running, &booted, shutdown, metrics)?;
    Ok(String::new())
}

/// Starts a booted machine's agent after its boot delay (its credentials are in its state
/// directory).
fn start_booted(
    config: &AgentConfig,
    running: &mut Running,
    b: &Booted,
    shutdown: &CancellationToken,
    metrics: &Arc<HostShared>,
) -> Result<(), String> {
    let disks: Vec<machine::Disk> = b
        .disks
        .iter()
        .map(|(id, path, size)| machine::Disk {
            id: id.clone(),
            datastore: b.datastore.clone(),
            path: path.into(),
            size: *size,
        })
        .collect();
    let stop = shutdown.child_token();
    running.insert(
        b.name.clone(),
        (stop.clone(), disks.iter().map(|d| d.path.clone()).collect()),
    );
    let m = machine::Machine {
        name: b.name.clone(),
        os: b.os,
        disks,
        resized: false,
    };
    let config = config.clone();
    let metrics = metrics.clone();
    let delay = std::time::Duration::from_millis(b.boot_delay_ms);
    tracing::info!(machine = %b.name, network = %b.network, "booting; agent registers in {delay:?}");
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
        if let Err(e) = start_machine(m, &config, 7, stop, &metrics).await {
            tracing::error!("cannot start the booted machine: {e:#}");
        }
    });
    Ok(())
}

/// One machine's agent: answers the CS's commands for it.
struct Agent {
    name: String,
    capture: Arc<capture::Capture>,
    credentials: failback_common::renewal::CredentialsCell,
    outbox: tokio::sync::mpsc::Sender<ComponentMessage>,
    state_dir: std::path::PathBuf,
    seed: u64,
    shutdown: CancellationToken,
    replication: Option<sender::Replication>,
    workload: Option<workload::Workload>,
    metrics: Arc<metrics::HostMetrics>,
    /// Pre and post scripts around app-consistent points (the host's `[app_scripts.NAME]`).
    scripts: Option<scripts::AppScripts>,
}

impl Agent {
    async fn run(
        mut self,
        mut commands: tokio::sync::mpsc::Receiver<failback_proto::pb::control::CsMessage>,
    ) {
        let mut answered = failback_common::control::Answered::default();
        while let Some(cmd) = failback_common::control::next_command(&mut commands).await {
            let outbox = self.outbox.clone();
            let run = || async {
                match cmd.kind {
                    Some(kind) => self.handle(kind).await,
                    None => Err("empty command".to_string()),
                }
                .map(|_| None)
                .map_err(Refusal::from)
            };
            if !failback_common::control::answer(&outbox, &mut answered, cmd.id, run).await {
                return;
            }
        }
    }

    async fn handle(&mut self, kind: command::Kind) -> Result<String, String> {
        match kind {
            command::Kind::StartReplication(s) => {
                let params = sender::Params {
                    item: s.item,
                    process_server: s.process_server,
                    ps_address: s.ps_address,
                    crash_interval: (s.crash_interval_ms > 0)
                        .then(|| std::time::Duration::from_millis(s.crash_interval_ms.max(100))),
                    app_interval: (s.app_interval_ms > 0)
                        .then(|| std::time::Duration::from_millis(s.app_interval_ms)),
                    verify_tags: s.verify_tags,
                    compare_initial: s.compare_initial,
                    machine: self.name.clone(),
                    scripts: self.scripts.clone(),
                };
                if self
                    .replication
                    .as_ref()
                    .is_some_and(|r| r.params == params)
                {
                    return Ok(String::new());
                }
                if let Some(r) = self
                    .replication
                    .as_mut()
                    .filter(|r| r.only_ps_differs(&params))
                {
                    tracing::info!(machine = %self.name, item = %params.item, from = %r.params.process_server, to = %params.process_server, "switching process server");
                    r.switch_ps(params.process_server, params.ps_address, s.batches_lost);
                    return Ok(String::new());
                }
                if let Some(old) = self.replication.take() {
                    old.stop();
                }
                tracing::info!(machine = %self.name, item = %params.item, ps = %params.process_server, "replicating");
                let item_metrics = self.metrics.item(&params.item, &self.name);
                self.replication = Some(
                    sender::start(
                        params,
                        item_metrics,
                        self.capture.clone(),
                        self.credentials.clone(),
                        &self.state_dir,
                        self.outbox.clone(),
                        &self.shutdown,
                    )
                    .map_err(|e| format!("cannot start replication: {e}"))?,
                );
                Ok(String::new())
            }
            command::Kind::StopReplication(_) => {
                if let Some(old) = self.replication.take() {
                    old.stop();
                }
                self.capture.set_logging(false);
                Ok(String::new())
            }
            command::Kind::Workload(w) => {
                if let Some(old) = self.workload.take() {
                    old.stop();
                }
                match w.action.as_str() {
                    "stop" => Ok(String::new()),
                    "start" | "set" => {
                        let d = workload::WorkloadSpec::default();
                        let spec = workload::WorkloadSpec {
                            rate_mb_s: if w.rate_mb_s > 0.0 {
                                w.rate_mb_s
                            } else {
                                d.rate_mb_s
                            },
                            write_size: if w.write_size > 0 {
                                w.write_size
                            } else {
                                d.write_size
                            },
                            sequential: w.pattern == "sequential",
                            compressible: if w.compressible >= 0.0 {
                                w.compressible
                            } else {
                                d.compressible
                            },
                        };
                        spec.validate()?;
                        self.seed += 1000;
                        self.workload = Some(workload::start(
                            self.capture.clone(),
                            spec,
                            self.seed,
                            &self.shutdown,
                        ));
                        Ok(String::new())
                    }
                    other => Err(format!(
                        "unknown workload action `{other}` (start, set or stop)"
                    )),
                }
            }
            command::Kind::Shutdown(sd) => {
                // The guest stops writing; with replication, a final tag carries every
                // write before it to the target; then the machine is off.
                if let Some(w) = self.workload.take() {
                    w.stop();
                }
                if let Some(rep) = self
                    .replication
                    .as_ref()
                    .filter(|r| r.params.item == sd.item)
                {
                    rep.tag(sd.final_tag.clone(), "crash").await?;
                }
                self.capture.power_off();
                tracing::info!(machine = %self.name, "shut down");
                Ok(String::new())
            }
            command::Kind::Resync(r) => match &self.replication {
                Some(rep) if rep.params.item == r.item => rep.resync().map(|_| String::new()),
                _ => Err(format!(
                    "`{}` is not replicating item {}",
                    self.name, r.item
                )),
            },
            command::Kind::HoldWrites(h) => match &self.replication {
                Some(rep) if rep.params.item == h.item => {
                    let max = std::time::Duration::from_millis(u64::from(h.max_ms));
                    if h.app_consistent {
                        // The application quiesces before its writes are held.
                        rep.prepare_app_point(&h.id, max).await;
                    }
                    self.capture
                        .hold(&h.id, max)
                        .map(|()| String::new())
                        .map_err(|e| format!("cannot hold the writes of `{}`: {e}", self.name))
                }
                _ => Err(format!(
                    "`{}` is not replicating item {}",
                    self.name, h.item
                )),
            },
            command::Kind::ReleaseWrites(r) => {
                self.capture.release(&r.id);
                if let Some(rep) = &self.replication {
                    rep.abandon_app_point(&r.id).await;
                }
                Ok(String::new())
            }
            command::Kind::MakeTag(t) => match &self.replication {
                Some(rep) if rep.params.item == t.item => {
                    rep.tag(t.id, &t.kind).await.map(|_| String::new())
                }
                _ => Err(format!(
                    "`{}` is not replicating item {}",
                    self.name, t.item
                )),
            },
            _ => Err(format!(
                "`{}` is an agent: it doesn't take this command",
                self.name
            )),
        }
    }
}
