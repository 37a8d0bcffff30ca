//! `srctl`: operator CLI of Failback Lab (mirrors the portal and `az site-recovery` verbs).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use failback_proto::pb::operator::{
    EnableItemRequest, FailoverKind, Policy, SyncMode, Verification, WorkloadRequest,
};
use srctl::{infra, item, lab, link, parse_size, plan};

#[derive(Parser)]
#[command(version, about = "Failback Lab operator CLI")]
struct Cli {
    /// The lab directory (default: $FAILBACK_LAB).
    #[arg(long, global = true)]
    lab: Option<PathBuf>,
    /// Don't wait for the job a command starts: print its id and return (follow it later with
    /// `srctl job watch ID`). The job runs on the configuration server either way.
    #[arg(long, global = true)]
    no_wait: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The whole four-stage cycle on a lab (a new one in a temporary directory unless --lab):
    /// enable, failover to Azure, commit, reprotect to on-premises, failback, commit,
    /// reprotect to Azure, with a workload and byte-exact checks; exit status 0 only if all pass.
    Drill(DrillArgs),
    /// The local multi-process lab.
    #[command(subcommand)]
    Lab(LabCmd),
    /// A read-only web portal of the lab (items, jobs, infrastructure, topology, the link),
    /// live, on loopback; prints its URL with a token (also in DIR/operator/portal.url).
    Portal {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Allow a non-loopback --listen address (anyone with the URL can read the lab).
        #[arg(long)]
        allow_remote: bool,
    },
    /// Registered components, hosts, machines and datastores.
    #[command(subcommand)]
    Infra(InfraCmd),
    /// The simulated site-to-site VPN.
    #[command(subcommand)]
    Link(LinkCmd),
    /// Replicated items.
    #[command(subcommand)]
    Item(ItemCmd),
    /// Replication policies.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// A machine's workload generator (the guest OS writing to its disks).
    #[command(subcommand)]
    Workload(WorkloadCmd),
    /// Fail a machine over to the other site ("Failover" job).
    Failover(FailoverArgs),
    /// Planned failover: shut the source down and sync everything first (no data loss).
    PlannedFailover { machine: String },
    /// Start MACHINE-Test from a point in an isolated network; replication goes on.
    TestFailover {
        machine: String,
        #[arg(long, default_value = "latest-processed")]
        point: String,
    },
    /// Remove the test failover VM and its disks.
    TestFailoverCleanup { machine: String },
    /// Before commit: re-create the failed-over VM from another recovery point.
    ChangePoint {
        machine: String,
        #[arg(long)]
        point: String,
    },
    /// Commit a failover: recovery points are deleted, the point can't change any more.
    Commit { machine: String },
    /// Replicate a failed-over machine back (Azure VM -> on-premises, or after failback to
    /// Azure again): the "Reprotect" job.
    Reprotect(ReprotectArgs),
    /// VMs on hosts.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Jobs with their steps.
    #[command(subcommand)]
    Job(JobCmd),
    /// Recovery plans: groups fail over in order, machines in a group in parallel.
    #[command(subcommand)]
    Plan(PlanCmd),
    /// Write the lab's protocol as a protobuf descriptor set, for clients that are not
    /// srctl (`grpcurl -protoset FILE`, Python's grpcio with protobuf's descriptor pool).
    Protoset {
        #[arg(long)]
        out: PathBuf,
    },
    /// Benchmarks, each against a baseline measured in the same run.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(clap::Args)]
struct FailoverArgs {
    machine: String,
    /// latest | latest-processed | latest-app-consistent | <point id>
    #[arg(long, default_value = "latest")]
    point: String,
    /// Shut the source down first (failover goes on if that fails).
    #[arg(long)]
    shutdown: bool,
    /// Failback only: before-failover (synchronise while the Azure VM runs, then only the last
    /// changes) or full-download (write the whole disks, no comparison).
    #[arg(long)]
    sync: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct DrillArgs {
    /// Machines of the lab the drill starts (vm1..vmN; default 2). With --lab every
    /// on-premises machine of that lab is drilled, or those --only names.
    #[arg(long)]
    machines: Option<usize>,
    /// With --lab: drill only these machines (comma-separated, e.g. sql1,web2).
    #[arg(long, value_delimiter = ',', value_name = "MACHINES")]
    only: Vec<String>,
    /// Disk size of each machine in a new lab.
    #[arg(long, default_value = "64MiB")]
    disk_size: String,
    /// Workload write rate per machine, MB/s.
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
    /// Inject the faults of this scenario (TOML; see deploy/scenarios/).
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Also write a self-contained HTML report with plots over the run (RPO, lag, link,
    /// caches; stages and faults as bands).
    #[arg(long, value_name = "FILE.html")]
    report: Option<PathBuf>,
    /// Real software on the machines' disks (through their NBD exports) instead of the
    /// workload generator, checked by its own tools after every failover: `fio` (blocks with
    /// verification headers) or `fs` (ext4 with a SQLite database, via nbdfuse + fuse2fs).
    #[arg(long, value_enum)]
    guest: Option<srctl::guest::GuestKind>,
    /// Run every failover, commit and reprotect through one recovery plan of the machines
    /// (`drill`, at most 100 machines in up to 7 groups; failovers at latest-processed, as
    /// ASR recommends for plans), as a DR team fails over a site.
    #[arg(long)]
    plan: bool,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ReprotectArgs {
    machine: String,
    #[command(flatten)]
    opts: ReprotectOpts,
}

/// The options of a reprotect, for one machine or a recovery plan.
#[derive(clap::Args)]
struct ReprotectOpts {
    /// Default: ps-azure for an Azure VM, ps-onprem for an on-premises one.
    #[arg(long)]
    process_server: Option<String>,
    /// Default: mt-onprem (to on-premises) or azure-target (to Azure).
    #[arg(long)]
    master_target: Option<String>,
    /// Default: the original location's datastore.
    #[arg(long)]
    datastore: Option<String>,
    /// A directory on the master target for the failback points' journal.
    #[arg(long)]
    retention_drive: Option<String>,
    /// Fail back to a new VM (full copy) instead of the original VM's disks.
    #[arg(long)]
    alternate_location: bool,
    /// Kept for scripts: waiting until the item is Protected is the default now.
    #[arg(long, hide = true)]
    wait: bool,
    #[arg(long)]
    json: bool,
}

impl ReprotectOpts {
    fn request(&self, machine: &str) -> failback_proto::pb::operator::ReprotectRequest {
        failback_proto::pb::operator::ReprotectRequest {
            machine: machine.to_string(),
            process_server: self.process_server.clone().unwrap_or_default(),
            master_target: self.master_target.clone().unwrap_or_default(),
            datastore: self.datastore.clone().unwrap_or_default(),
            retention_drive: self.retention_drive.clone().unwrap_or_default(),
            alternate_location: self.alternate_location,
        }
    }
}

#[derive(Subcommand)]
enum PlanCmd {
    Create {
        name: String,
    },
    /// Add a replicated machine to group 1..7 (up to 100 machines).
    Add {
        plan: String,
        machine: String,
        #[arg(long, default_value_t = 1)]
        group: u32,
    },
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Every recovery plan.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Take a machine out of a plan (its replication is untouched).
    Remove {
        plan: String,
        machine: String,
    },
    /// Delete a plan (its machines stay protected).
    Delete {
        name: String,
    },
    /// A manual action (the plan job waits until `srctl job resume ID`) or a script (run on
    /// the configuration server's host with FBL_PLAN, FBL_GROUP, FBL_DIRECTION) after a group.
    AddAction {
        plan: String,
        #[arg(long)]
        after_group: u32,
        /// What the operator must do before the plan goes on.
        #[arg(long, conflicts_with = "script", required_unless_present = "script")]
        manual: Option<String>,
        /// An absolute path on the configuration server's host.
        #[arg(long)]
        script: Option<String>,
    },
    /// latest | latest-processed | latest-app-consistent | latest-multi-vm-processed | latest-multi-vm-app-consistent
    Failover {
        name: String,
        #[arg(long, default_value = "latest")]
        point: String,
        #[arg(long)]
        shutdown: bool,
    },
    TestFailover {
        name: String,
        #[arg(long, default_value = "latest-processed")]
        point: String,
    },
    TestFailoverCleanup {
        name: String,
    },
    Commit {
        name: String,
    },
    /// Reprotect every machine of the plan with the same options and master target (how
    /// replication groups are reprotected).
    Reprotect {
        name: String,
        #[command(flatten)]
        opts: ReprotectOpts,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    /// Delete a VM and its disks from a host (e.g. the old on-premises VM before an
    /// alternate-location failback).
    Delete {
        machine: String,
        #[arg(long)]
        host: String,
    },
    /// Where a running machine's disks are served over NBD: one URI per disk, for nbdinfo,
    /// nbdcopy, nbdfuse, qemu-img or fio's nbd engine. Writes through them are replicated
    /// like any guest write.
    Export {
        machine: String,
        /// Only this disk.
        #[arg(long)]
        disk: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Makes a running machine's disk the file DIR/disk (nbdfuse, from Debian's libnbd-bin),
    /// e.g. to mkfs it and mount it with fuse2fs. Detach with `fusermount3 -u DIR`.
    Attach {
        machine: String,
        #[arg(long)]
        disk: String,
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum JobCmd {
    List {
        #[arg(long)]
        json: bool,
    },
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Follow a job until it ends: its steps as they change, and how long each took.
    Watch { id: i64 },
    /// Cancel a running job (a failover only with --force: replication won't resume).
    Cancel {
        id: i64,
        #[arg(long)]
        force: bool,
    },
    /// Let a job waiting at a manual action of its recovery plan go on.
    Resume { id: i64 },
}

/// The values of the master targets' `failover_disks` setting.
const FAILOVER_DISKS: [&str; 3] = ["auto", "copy", "overlay"];

#[derive(Subcommand)]
enum BenchCmd {
    /// Failover time (latest-processed, latest) vs a full copy of the disk.
    Failover {
        #[arg(long, default_value = "1GiB")]
        size: String,
        /// How the master targets make the VM's disks.
        #[arg(long, default_value = "auto", value_parser = FAILOVER_DISKS)]
        failover_disks: String,
        #[arg(long)]
        json: bool,
    },
    /// fio through a machine's NBD export (unprotected, and protected while it replicates)
    /// against nbdkit serving a file on the same disk: throughput, IOPS, p99 and ratios.
    Nbd {
        #[arg(long, default_value = "256MiB")]
        size: String,
        /// Runs of each job per export (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Seconds each run writes.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long)]
        json: bool,
    },
    /// LZ4 vs zstd on the same data (why the process server uses LZ4).
    Compression {
        #[arg(long, default_value = "256MiB")]
        size: String,
        #[arg(long, default_value_t = 0.5)]
        compressible: f64,
        #[arg(long)]
        json: bool,
    },
    /// Reprotect of a full disk over a link capped at B: link use and effective data rate
    /// against B, for incompressible and 2:1 data.
    Link {
        /// The cap B: 64Mbit, 8MB (bytes/s), ...
        #[arg(long, default_value = "64Mbit", value_parser = link::parse_bandwidth)]
        bandwidth: u64,
        #[arg(long, default_value = "128MiB")]
        size: String,
        #[arg(long)]
        json: bool,
    },
    /// An original-location reprotect (bytes across the link, time) vs rsync of the same
    /// two disk images.
    Resync {
        #[arg(long, default_value = "256MiB")]
        size: String,
        /// Share of the disk changed in Azure before the reprotect, 0..1.
        #[arg(long, default_value_t = 0.05)]
        changed: f64,
        #[arg(long)]
        json: bool,
    },
    /// Full replication path vs one mutual-TLS gRPC stream; lag at 20 MB/s of writes.
    /// ASR's scale: N machines on H hosts registering, all enabled, steady writes, a CS
    /// restart, a recovery-plan failover of min(N, 100); drops, RPO, lag, CPU and memory per
    /// process, and the process server's CPU per MB against one machine alone.
    Scale {
        #[arg(long, default_value_t = 200)]
        machines: usize,
        #[arg(long, default_value_t = 2)]
        hosts: usize,
        /// MB/s each machine writes (0: idle).
        #[arg(long, default_value_t = 0.12)]
        rate: f64,
        /// The steady window.
        #[arg(long, default_value = "10m")]
        duration: humantime::Duration,
        #[arg(long, default_value = "16MiB")]
        disk_size: String,
        /// Skip the recovery-plan failover.
        #[arg(long)]
        no_plan: bool,
        #[arg(long)]
        json: bool,
    },
    Replication {
        #[arg(long, default_value = "512MiB")]
        size: String,
        /// Share of the data that compresses, 0..1.
        #[arg(long, default_value_t = 0.5)]
        compressible: f64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ItemCmd {
    /// Enable replication of a machine ("Enable protection").
    Enable {
        machine: String,
        #[arg(long, default_value = "default")]
        policy: String,
        #[arg(long, default_value = "")]
        process_server: String,
        #[arg(long, default_value = "")]
        replication_group: String,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    Show {
        machine: String,
        #[arg(long)]
        json: bool,
    },
    /// Resynchronize: compare block checksums with the replica, send only what differs.
    Resync { machine: String },
    /// Switch process server: move a protected item to another process server of its site.
    /// The old one forwards what it holds first, so nothing is resent; if it is down, what it
    /// had not forwarded is lost and the item resynchronizes by checksums (and says so).
    SwitchPs {
        machine: String,
        #[arg(long = "process-server", value_name = "NAME")]
        process_server: String,
    },
    /// Disable replication: the item is removed from the agent, the process server and the
    /// target, then from the configuration server.
    Disable { machine: String },
    /// Prove the replica at a point equals what the source held then (BLAKE3 per disk).
    Verify {
        machine: String,
        #[arg(long, default_value = "latest")]
        point: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    List {
        #[arg(long)]
        json: bool,
    },
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Create a policy (its NAME-failback twin is created with it).
    Create(PolicyArgs),
    /// Change a policy (failback twins can't be edited).
    Update(PolicyArgs),
}

#[derive(clap::Args)]
struct PolicyArgs {
    name: String,
    #[arg(long, default_value = "60s")]
    rpo_threshold: humantime::Duration,
    #[arg(long, default_value = "10m")]
    retention: humantime::Duration,
    #[arg(long, default_value = "5s")]
    crash_interval: humantime::Duration,
    /// 0s = no app-consistent points.
    #[arg(long, default_value = "30s")]
    app_interval: humantime::Duration,
    /// digests: every point records the source disks' BLAKE3 (`item verify` proves it; the
    /// machine's writes wait while its disks are hashed). off: no digests, for scale. Takes
    /// effect when an item's replication (re)starts.
    #[arg(long, value_enum, default_value_t = VerificationArg::Digests)]
    verification: VerificationArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum VerificationArg {
    Digests,
    Off,
}

#[derive(Subcommand)]
enum WorkloadCmd {
    Start(WorkloadArgs),
    Set(WorkloadArgs),
    Stop { machine: String },
}

#[derive(clap::Args)]
struct WorkloadArgs {
    machine: String,
    /// MB/s written.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    #[arg(long, default_value = "64KiB")]
    write_size: String,
    /// random | sequential
    #[arg(long, default_value = "random")]
    pattern: String,
    /// Share of each write that compresses, 0..1.
    #[arg(long, default_value_t = 0.5)]
    compressible: f64,
}

#[derive(Subcommand)]
enum LabCmd {
    /// Start the default two-site lab as processes on loopback and wait until all registered.
    Up {
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Start the topology this TOML file describes (see deploy/topologies/); without it,
        /// the default shape with --machines and --hosts.
        #[arg(short = 't', long = "topology", conflicts_with_all = ["machines", "hosts", "disks_per_machine", "disk_size"])]
        topology: Option<PathBuf>,
        /// Machines vm1..vmN, spread over the hosts (default shape only).
        #[arg(long, default_value_t = 2)]
        machines: usize,
        /// ESX hosts esx-1..esx-H on-premises (default shape only).
        #[arg(long, default_value_t = 1)]
        hosts: usize,
        /// Disks of each machine, disk0..diskD-1 (default shape only).
        #[arg(long, default_value_t = 1)]
        disks_per_machine: usize,
        /// Size of each machine's disk, e.g. 64MiB (default shape only).
        #[arg(long, default_value = "64MiB")]
        disk_size: String,
        /// On-premises master targets mt-onprem, mt-onprem-2, ... (default shape only;
        /// default: as many as failing back every machine takes, 60 disks each).
        #[arg(long, conflicts_with = "topology")]
        master_targets: Option<usize>,
        /// How master targets make failover disks: a copy where the filesystem reflinks and an
        /// overlay over the frozen replica elsewhere (auto), always a copy, always an overlay.
        #[arg(long, default_value = "auto", value_parser = FAILOVER_DISKS)]
        failover_disks: String,
        /// How long to wait for every component to register.
        #[arg(long, default_value = "60s")]
        timeout: humantime::Duration,
        /// Also start a Prometheus server (Debian's `prometheus`) scraping every process of
        /// the lab every second, its data in DIR/prometheus.
        #[arg(long)]
        prometheus: bool,
    },
    /// Print a topology as a Mermaid diagram: sites, components, machines, the link, who
    /// sends to whom (the running lab's, or a file's with -t).
    Graph {
        #[arg(short = 't', long = "topology")]
        topology: Option<PathBuf>,
    },
    /// Write a topology (the default one without -t) as containers: DIR/compose.yaml, one
    /// config per component in DIR/config/, and DIR/services.env (names for deploy/'s scripts).
    Render {
        #[arg(short = 't', long = "topology")]
        topology: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "compose")]
        to: srctl::render::Target,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Show the lab's processes and their registration status.
    Status {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Stop every process of the lab (data stays; `lab up` starts it again).
    Down {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// SIGKILL one component (a crash).
    Kill { component: String },
    /// Stop one component and start it again on the same data directory.
    Restart { component: String },
    /// SIGSTOP one component (it hangs with its connections open).
    Pause { component: String },
    /// SIGCONT a paused component.
    Resume { component: String },
}

#[derive(Subcommand)]
enum InfraCmd {
    /// List every component (and, per host, its machines and datastores).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a component from the CS: its certificate is revoked everywhere (refused while
    /// items use it); in the local lab its process is stopped too.
    Remove { name: String },
    /// Deploy a component at runtime ("Deploy process server" job): in the local lab srctl
    /// starts it; the job ends when it has enrolled and registered.
    Add {
        #[command(subcommand)]
        what: AddCmd,
    },
}

#[derive(Subcommand)]
enum AddCmd {
    /// A process server, e.g. a second one in Azure for failback.
    ProcessServer {
        name: String,
        #[arg(long, value_parser = ["onprem", "azure"])]
        site: String,
    },
}

#[derive(Subcommand)]
enum LinkCmd {
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Bring the link up (also stops flapping).
    Up,
    /// Take the link down: every relayed connection is reset (down mode reset) or frozen
    /// until up (stall), new ones refused. Also stops flapping.
    Down,
    /// Shape the link at runtime (latency, jitter, bandwidth, down mode, flap, blackhole);
    /// flags not given keep their value.
    Set {
        #[command(flatten)]
        args: link::SetArgs,
        #[arg(long)]
        json: bool,
    },
    /// Reset every relayed connection once; the link stays up.
    Reset,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    failback_common::tls::install_crypto_provider();
    if std::env::var_os("RUST_LOG").is_some() {
        failback_common::telemetry::init("srctl");
    }
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("srctl: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let lab_flag = cli.lab;
    let no_wait = cli.no_wait;
    match cli.command {
        Cmd::Portal {
            listen,
            allow_remote,
        } => {
            let dir = srctl::client::lab_dir(lab_flag)?;
            let stop = tokio_util::sync::CancellationToken::new();
            tokio::spawn(failback_common::server::shutdown_on_signal(stop.clone()));
            let portal = srctl::portal::start(&dir, &listen, allow_remote, stop.clone()).await?;
            // The portal serves on whether or not anyone still reads its output (`| head -1`).
            use std::io::Write as _;
            let mut out = std::io::stdout();
            let _ = writeln!(out, "portal: {}", portal.url);
            let _ = writeln!(
                out,
                "(the URL is also in {}; Ctrl-C stops the portal)",
                portal.url_file.display()
            );
            let _ = out.flush();
            stop.cancelled().await;
        }
        Cmd::Drill(a) => {
            use std::io::IsTerminal;
            // A scenario is checked before anything starts; its [drill] settings win.
            let scenario = a
                .scenario
                .as_deref()
                .map(srctl::scenario::load)
                .transpose()?;
            let settings = scenario
                .as_ref()
                .map(|s| s.drill.clone())
                .unwrap_or_default();
            if lab_flag.is_some() && a.machines.is_some() {
                anyhow::bail!(
                    "--machines sizes the lab a drill starts; with --lab (or FAILBACK_LAB) every \
                     on-premises machine of that lab is drilled: pick some with --only a,b"
                );
            }
            if lab_flag.is_none() && !a.only.is_empty() {
                anyhow::bail!(
                    "--only picks machines of a running lab (--lab DIR); the lab a drill starts \
                     has vm1..vmN (--machines N)"
                );
            }
            let report = srctl::drill::run(srctl::drill::DrillOptions {
                machines: a.machines.or(settings.machines).unwrap_or(2),
                only: a.only,
                disk_size: parse_size(settings.disk_size.as_deref().unwrap_or(&a.disk_size))?,
                lab: lab_flag,
                rate_mb_s: settings.rate.unwrap_or(a.rate),
                progress: !a.json && std::io::stdout().is_terminal(),
                scenario,
                report: a.report.clone(),
                guest: a.guest,
                plan: a.plan || settings.plan.unwrap_or(false),
            })
            .await?;
            if let Some(path) = &a.report
                && let Err(e) =
                    std::fs::write(path, srctl::report_html::render(&report, &report.timeline))
            {
                eprintln!("srctl: cannot write the report to {}: {e}", path.display());
            }
            srctl::drill::print(&report, a.json)?;
            if !report.ok {
                std::process::exit(1);
            }
        }
        Cmd::Lab(LabCmd::Render { topology, to, out }) => {
            let topology = match topology {
                Some(file) => srctl::topology::Topology::load(&file)?,
                None => srctl::topology::Topology::generated(2, 1, 64 << 20)
                    .expect("the default shape is valid"),
            };
            let rendered = srctl::render::render(&topology, to)?;
            srctl::render::write(&rendered, &out)?;
            println!(
                "rendered `{}` into {}: {}, {} configs, services.env",
                topology.name,
                out.display(),
                match to {
                    srctl::render::Target::Compose => "compose.yaml",
                    srctl::render::Target::Stack => "stack-cs.yaml and stack.yaml",
                },
                rendered.configs.len()
            );
        }
        Cmd::Lab(LabCmd::Graph { topology }) => {
            let topology = match topology {
                Some(file) => srctl::topology::Topology::load(&file)?,
                None => {
                    let dir = srctl::client::lab_dir(lab_flag)?;
                    srctl::topology::Topology::load(&dir.join("topology.toml"))?
                }
            };
            print!("{}", topology.mermaid());
        }
        Cmd::Lab(LabCmd::Up {
            dir,
            topology,
            machines,
            hosts,
            disks_per_machine,
            disk_size,
            master_targets,
            failover_disks,
            timeout,
            prometheus,
        }) => {
            let dir = srctl::client::lab_dir(dir.or(lab_flag))?;
            let topology = match topology {
                Some(file) => srctl::topology::Topology::load(&file)?,
                None => {
                    let t = srctl::topology::Topology::sized(
                        machines,
                        hosts,
                        disks_per_machine,
                        parse_size(&disk_size)?,
                    )
                    .map_err(anyhow::Error::msg)?;
                    match master_targets {
                        Some(n) => t.with_master_targets(n).map_err(anyhow::Error::msg)?,
                        None => t,
                    }
                }
            };
            let opts = lab::UpOptions {
                topology,
                timeout: timeout.into(),
                env: [("FBL_MT__FAILOVER_DISKS".to_string(), failover_disks)].into(),
                prometheus,
            };
            let state = lab::up(&dir, &opts).await?;
            println!(
                "lab is up in {}: every component and machine registered\n",
                state.dir.display()
            );
            lab::print_procs(&state);
            println!();
            infra::print(&infra::list(&dir).await?, false)?;
            println!("\nuse it with: export FAILBACK_LAB={}", state.dir.display());
        }
        Cmd::Lab(LabCmd::Status { dir }) => {
            let dir = srctl::client::lab_dir(dir.or(lab_flag))?;
            let state = lab::LabState::load(&dir)?;
            lab::print_procs(&state);
            println!();
            match infra::list(&dir).await {
                Ok(rows) => infra::print(&rows, false)?,
                Err(e) => println!("configuration server: {e:#}"),
            }
        }
        Cmd::Lab(LabCmd::Down { dir }) => {
            let dir = srctl::client::lab_dir(dir.or(lab_flag))?;
            let n = lab::down(&dir).await?;
            println!("stopped {n} processes; data kept in {}", dir.display());
        }
        Cmd::Lab(LabCmd::Kill { component }) => {
            proc_action(lab_flag, &component, lab::ProcAction::Kill).await?
        }
        Cmd::Lab(LabCmd::Restart { component }) => {
            proc_action(lab_flag, &component, lab::ProcAction::Restart).await?
        }
        Cmd::Lab(LabCmd::Pause { component }) => {
            proc_action(lab_flag, &component, lab::ProcAction::Pause).await?
        }
        Cmd::Lab(LabCmd::Resume { component }) => {
            proc_action(lab_flag, &component, lab::ProcAction::Resume).await?
        }
        Cmd::Infra(InfraCmd::List { json }) => {
            let dir = srctl::client::lab_dir(lab_flag)?;
            infra::print(&infra::list(&dir).await?, json)?;
        }
        Cmd::Infra(InfraCmd::Remove { name }) => {
            let dir = srctl::client::lab_dir(lab_flag)?;
            infra::remove(&dir, &name).await?;
            if lab::forget_component(&dir, &name).await? {
                println!("removed {name}: its certificate is revoked, its process stopped");
            } else {
                println!(
                    "removed {name}: its certificate is revoked; it must enroll again to reconnect"
                );
            }
        }
        Cmd::Infra(InfraCmd::Add {
            what: AddCmd::ProcessServer { name, site },
        }) => {
            let dir = srctl::client::lab_dir(lab_flag)?;
            let job = infra::deploy(&dir, &name, &site).await?;
            if let Some(how) = lab::add_process_server(&dir, &name, &site).await? {
                eprintln!("{how}");
            }
            follow(&dir, job, no_wait, false).await?;
        }
        Cmd::Item(cmd) => {
            let dir = srctl::client::lab_dir(lab_flag)?;
            match cmd {
                ItemCmd::Enable {
                    machine,
                    policy,
                    process_server,
                    replication_group,
                } => {
                    let job = item::enable(
                        &dir,
                        EnableItemRequest {
                            machine: machine.clone(),
                            policy,
                            process_server,
                            replication_group,
                        },
                    )
                    .await?;
                    follow_item(&dir, job, &machine, no_wait).await?;
                }
                ItemCmd::Resync { machine } => {
                    let job = item::resync(&dir, &machine).await?;
                    follow_item(&dir, job, &machine, no_wait).await?;
                }
                ItemCmd::SwitchPs {
                    machine,
                    process_server,
                } => {
                    let job = item::switch_ps(&dir, &machine, &process_server).await?;
                    follow_item(&dir, job, &machine, no_wait).await?;
                }
                ItemCmd::Disable { machine } => {
                    let job = item::disable(&dir, &machine).await?;
                    if follow(&dir, job, no_wait, false).await? {
                        println!("{machine}: replication disabled");
                    }
                }
                ItemCmd::List { json } => item::print_list(&item::list(&dir, "").await?, json)?,
                ItemCmd::Show { machine, json } => {
                    let items = item::list(&dir, &machine).await?;
                    for i in &items {
                        item::print_show(i, json)?;
                    }
                }
                ItemCmd::Verify {
                    machine,
                    point,
                    json,
                } => {
                    let v = item::verify(&dir, &machine, &point).await?;
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&serde_json::json!({
                                "equal": v.equal, "point": v.point,
                                "disks": v.disks.iter().map(|d| serde_json::json!({"disk": d.disk, "source": d.source_blake3, "replica": d.replica_blake3})).collect::<Vec<_>>(),
                            }))?
                        );
                    } else {
                        for d in &v.disks {
                            println!(
                                "{:<8} source {}  replica {}",
                                d.disk, &d.source_blake3, &d.replica_blake3
                            );
                        }
                        println!(
                            "point {}: {}",
                            v.point,
                            if v.equal {
                                "replica equals the source"
                            } else {
                                "MISMATCH"
                            }
                        );
                    }
                    if !v.equal {
                        anyhow::bail!(
                            "replica of {machine} at {} differs from the source",
                            v.point
                        );
                    }
                }
            }
        }
        Cmd::Policy(cmd) => {
            let dir = srctl::client::lab_dir(lab_flag)?;
            match cmd {
                PolicyCmd::List { json } => {
                    item::print_policies(&item::policies(&dir).await?, json)?
                }
                PolicyCmd::Show { name, json } => {
                    let all = item::policies(&dir).await?;
                    let p: Vec<_> = all.into_iter().filter(|p| p.name == name).collect();
                    if p.is_empty() {
                        anyhow::bail!("no policy named `{name}`; see `srctl policy list`");
                    }
                    item::print_policies(&p, json)?;
                }
                PolicyCmd::Create(a) => {
                    let p = item::create_policy(&dir, policy_of(a), false).await?;
                    println!(
                        "created policy {} and its failback twin {}-failback",
                        p.name, p.name
                    );
                }
                PolicyCmd::Update(a) => {
                    let p = item::create_policy(&dir, policy_of(a), true).await?;
                    println!("updated policy {}", p.name);
                }
            }
        }
        Cmd::Workload(cmd) => {
            let dir = srctl::client::lab_dir(lab_flag)?;
            let (action, req) = match cmd {
                WorkloadCmd::Start(a) => ("start", workload_of(a)?),
                WorkloadCmd::Set(a) => ("set", workload_of(a)?),
                WorkloadCmd::Stop { machine } => (
                    "stop",
                    WorkloadRequest {
                        machine,
                        ..Default::default()
                    },
                ),
            };
            let machine = req.machine.clone();
            item::workload(
                &dir,
                WorkloadRequest {
                    action: action.into(),
                    ..req
                },
            )
            .await?;
            println!("{machine}: workload {action}");
        }
        Cmd::Protoset { out } => {
            std::fs::write(&out, failback_proto::PROTOSET)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
            println!("wrote the lab's descriptor set to {}", out.display());
        }
        Cmd::Bench(BenchCmd::Link {
            bandwidth,
            size,
            json,
        }) => {
            let r = srctl::bench_link::run(bandwidth, parse_size(&size)?, !json).await?;
            srctl::bench_link::print(&r, json)?;
        }
        Cmd::Bench(BenchCmd::Nbd {
            size,
            runs,
            seconds,
            json,
        }) => {
            let r = srctl::bench_nbd::run(parse_size(&size)?, runs, seconds, !json).await?;
            srctl::bench_nbd::print(&r, json)?;
        }
        Cmd::Bench(BenchCmd::Resync {
            size,
            changed,
            json,
        }) => {
            let r = srctl::bench::resync(parse_size(&size)?, changed, !json).await?;
            srctl::bench::print_resync(&r, json)?;
        }
        Cmd::Bench(BenchCmd::Failover {
            size,
            failover_disks,
            json,
        }) => {
            let r = srctl::bench::failover(parse_size(&size)?, &failover_disks, !json).await?;
            srctl::bench::print_failover(&r, json)?;
        }
        Cmd::Bench(BenchCmd::Compression {
            size,
            compressible,
            json,
        }) => {
            let r = srctl::bench::compression(parse_size(&size)?, compressible)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{:<8} {:>14} {:>16} {:>7}",
                    "CODEC", "COMPRESS MB/s", "DECOMPRESS MB/s", "RATIO"
                );
                for c in &r {
                    println!(
                        "{:<8} {:>14.0} {:>16.0} {:>7.3}",
                        c.codec, c.compress_mb_s, c.decompress_mb_s, c.ratio
                    );
                }
            }
        }
        Cmd::Bench(BenchCmd::Scale {
            machines,
            hosts,
            rate,
            duration,
            disk_size,
            no_plan,
            json,
        }) => {
            let opts = srctl::bench_scale::ScaleOptions {
                machines,
                hosts,
                rate_mb_s: rate,
                duration: duration.into(),
                disk_size: parse_size(&disk_size)?,
                plan: !no_plan,
            };
            let r = srctl::bench_scale::run(opts, !json).await?;
            srctl::bench_scale::print(&r, json)?;
        }
        Cmd::Bench(BenchCmd::Replication {
            size,
            compressible,
            json,
        }) => {
            let r = srctl::bench::replication(parse_size(&size)?, compressible, !json).await?;
            srctl::bench::print_replication(&r, json)?;
        }
        Cmd::Failover(a) => {
            let dir = srctl::client::lab_dir(lab_flag)?;
            let sync = parse_sync(a.sync.as_deref())?;
            let job = item::start_failover(
                &dir,
                failover_request(
                    &a.machine,
                    &a.point,
                    a.shutdown,
                    FailoverKind::Unplanned,
                    sync,
                ),
            )
            .await?;
            follow(&dir, job, no_wait, a.json).await?;
        }
        Cmd::Reprotect(a) => {
            let dir = srctl::client::lab_dir(lab_flag)?;
            let job = item::reprotect(&dir, a.opts.request(&a.machine)).await?;
            follow(&dir, job, no_wait, a.opts.json).await?;
        }
        Cmd::Vm(VmCmd::Export {
            machine,
            disk,
            json,
        }) => {
            let dir = srctl::client::lab_dir(lab_flag)?;
            let exports = srctl::vm::exports(&dir, &machine, disk.as_deref()).await?;
            srctl::vm::print(&exports, json)?;
        }
        Cmd::Vm(VmCmd::Attach {
            machine,
            disk,
            dir: mount,
        }) => {
            let dir = srctl::client::lab_dir(lab_flag)?;
            let exports = srctl::vm::exports(&dir, &machine, Some(&disk)).await?;
            let (file, pid) = srctl::vm::attach(&exports[0], &mount)?;
            println!(
                "{machine}'s disk {disk} is {} (nbdfuse, pid {pid}); detach with `fusermount3 -u {}`",
                file.display(),
                mount.display()
            );
        }
        Cmd::Vm(VmCmd::Delete { machine, host }) => {
            let dir = srctl::client::lab_dir(lab_flag)?;
            item::delete_vm(&dir, &machine, &host).await?;
            println!("{machine} deleted from {host} with its disks");
        }
        Cmd::PlannedFailover { machine } => {
            let dir = srctl::client::lab_dir(lab_flag)?;
            let req = failover_request(
                &machine,
                "latest",
                true,
                FailoverKind::Planned,
                SyncMode::Unspecified,
            );
            follow(&dir, item::start_failover(&dir, req).await?, no_wait, false).await?;
        }
        Cmd::TestFailover { machine, point } => {
            let dir = srctl::client::lab_dir(lab_flag)?;
            let req = failover_request(
                &machine,
                &point,
                false,
                FailoverKind::Test,
                SyncMode::Unspecified,
            );
            follow(&dir, item::start_failover(&dir, req).await?, no_wait, false).await?;
        }
        Cmd::TestFailoverCleanup { machine } => {
            let dir = srctl::client::lab_dir(lab_flag)?;
            let job = item::start_cleanup_test(&dir, &machine).await?;
            follow(&dir, job, no_wait, false).await?;
        }
        Cmd::ChangePoint { machine, point } => {
            let dir = srctl::client::lab_dir(lab_flag)?;
            let req = failover_request(
                &machine,
                &point,
                false,
                FailoverKind::ChangePoint,
                SyncMode::Unspecified,
            );
            follow(&dir, item::start_failover(&dir, req).await?, no_wait, false).await?;
        }
        Cmd::Commit { machine } => {
            let dir = srctl::client::lab_dir(lab_flag)?;
            let job = item::start_commit(&dir, &machine).await?;
            if follow(&dir, job, no_wait, false).await? {
                for i in item::list(&dir, &machine).await? {
                    println!("{}: {}", i.machine, i.state);
                }
            }
        }
        Cmd::Plan(cmd) => {
            let dir = srctl::client::lab_dir(lab_flag)?;
            match cmd {
                PlanCmd::Create { name } => plan::print(&plan::create(&dir, &name).await?, false)?,
                PlanCmd::Add {
                    plan: p,
                    machine,
                    group,
                } => plan::print(&plan::add(&dir, &p, &machine, group).await?, false)?,
                PlanCmd::Show { name, json } => plan::print(&plan::show(&dir, &name).await?, json)?,
                PlanCmd::List { json } => {
                    let plans = plan::list(&dir).await?;
                    if json {
                        println!("[");
                        for (i, p) in plans.iter().enumerate() {
                            plan::print(p, true)?;
                            if i + 1 < plans.len() {
                                println!(",");
                            }
                        }
                        println!("]");
                    } else if plans.is_empty() {
                        println!("no recovery plans; create one with `srctl plan create NAME`");
                    } else {
                        for p in &plans {
                            plan::print(p, false)?;
                        }
                    }
                }
                PlanCmd::Remove { plan: p, machine } => {
                    plan::print(&plan::remove(&dir, &p, &machine).await?, false)?
                }
                PlanCmd::Delete { name } => {
                    plan::delete(&dir, &name).await?;
                    println!("recovery plan {name} deleted; its machines stay protected");
                }
                PlanCmd::AddAction {
                    plan: p,
                    after_group,
                    manual,
                    script,
                } => {
                    use failback_proto::pb::operator::plan_action::Action;
                    let action = match (manual, script) {
                        (Some(m), _) => Action::Manual(m),
                        (None, Some(s)) => Action::Script(s),
                        (None, None) => anyhow::bail!("give --manual \"TEXT\" or --script PATH"),
                    };
                    plan::print(
                        &plan::add_action(&dir, &p, after_group, action).await?,
                        false,
                    )?
                }
                PlanCmd::Failover {
                    name,
                    point,
                    shutdown,
                } => {
                    let job = plan::start(&dir, &name, "failover", &point, shutdown).await?;
                    follow(&dir, job, no_wait, false).await?;
                }
                PlanCmd::TestFailover { name, point } => {
                    let job = plan::start(&dir, &name, "test-failover", &point, false).await?;
                    follow(&dir, job, no_wait, false).await?;
                }
                PlanCmd::TestFailoverCleanup { name } => {
                    let job =
                        plan::start(&dir, &name, "test-failover-cleanup", "latest", false).await?;
                    follow(&dir, job, no_wait, false).await?;
                }
                PlanCmd::Commit { name } => {
                    let job = plan::start(&dir, &name, "commit", "latest", false).await?;
                    follow(&dir, job, no_wait, false).await?;
                }
                PlanCmd::Reprotect { name, opts } => {
                    let r = plan::reprotect(&dir, &name, opts.request("")).await?;
                    let plan_job = r.plan_job.unwrap_or_default();
                    if no_wait {
                        follow(&dir, plan_job, true, opts.json).await?;
                        return Ok(());
                    }
                    let plan_job = item::watch(&dir, plan_job.id, !opts.json).await?;
                    let mut jobs = Vec::new();
                    for job in item::child_jobs(&dir, plan_job.id).await? {
                        jobs.push(item::watch(&dir, job.id, !opts.json).await?);
                    }
                    if opts.json {
                        let v = serde_json::json!({
                            "plan_job": item::job_json(&plan_job),
                            "jobs": jobs.iter().map(item::job_json).collect::<Vec<_>>(),
                        });
                        println!("{}", serde_json::to_string_pretty(&v)?);
                    }
                    let failed: Vec<String> = std::iter::once(&plan_job)
                        .chain(jobs.iter())
                        .filter(|j| j.state == "Failed")
                        .map(|j| format!("{}: {}", j.item, j.error))
                        .collect();
                    if !failed.is_empty() {
                        anyhow::bail!("plan reprotect failed: {}", failed.join("; "));
                    }
                }
            }
        }
        Cmd::Job(cmd) => {
            let dir = srctl::client::lab_dir(lab_flag)?;
            match cmd {
                JobCmd::List { json } => {
                    let jobs = item::jobs(&dir, 0).await?;
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(
                                &jobs.iter().map(item::job_json).collect::<Vec<_>>()
                            )?
                        );
                    } else {
                        for j in &jobs {
                            println!(
                                "{:>4}  {:<24} {:<8} {:<12} {}",
                                j.id, j.name, j.item, j.state, j.error
                            );
                        }
                    }
                }
                JobCmd::Cancel { id, force } => {
                    let job = srctl::client::operator(&dir)
                        .await?
                        .cancel_job(failback_proto::pb::operator::CancelJobRequest { id, force })
                        .await
                        .map_err(|s| anyhow::anyhow!("{}", srctl::client::status_message(&s)))?
                        .into_inner();
                    println!("job {} ({}) cancelled", job.id, job.name);
                }
                JobCmd::Watch { id } => {
                    let job = item::watch(&dir, id, true).await?;
                    if job.state != "Succeeded" {
                        anyhow::bail!("job {id} {}: {}", job.state, job.error);
                    }
                }
                JobCmd::Resume { id } => {
                    let job = item::resume_job(&dir, id).await?;
                    println!("job {} ({}) goes on", job.id, job.name);
                }
                JobCmd::Show { id, json } => {
                    for j in item::jobs(&dir, id).await? {
                        if json {
                            println!("{}", serde_json::to_string_pretty(&item::job_json(&j))?);
                        } else {
                            item::print_job(&j);
                        }
                    }
                }
            }
        }
        Cmd::Link(cmd) => {
            let dir = srctl::client::lab_dir(lab_flag)?;
            match cmd {
                LinkCmd::Status { json } => link::print(&link::status(&dir).await?, json)?,
                LinkCmd::Up => link::print(&link::set_up(&dir, true).await?, false)?,
                LinkCmd::Down => link::print(&link::set_up(&dir, false).await?, false)?,
                LinkCmd::Set { args, json } => link::print(&link::set(&dir, &args).await?, json)?,
                LinkCmd::Reset => link::print(&link::reset_connections(&dir).await?, false)?,
            }
        }
    }
    Ok(())
}

/// Follows a job the command started, unless `--no-wait`; exits non-zero with its error if
/// it failed. Returns whether it ran to success here.
async fn follow(
    dir: &std::path::Path,
    job: failback_proto::pb::operator::Job,
    no_wait: bool,
    json: bool,
) -> anyhow::Result<bool> {
    if no_wait {
        if json {
            println!("{}", serde_json::to_string_pretty(&item::job_json(&job))?);
        } else {
            println!(
                "job {} ({}, {}) started: follow it with `srctl job watch {}`",
                job.id, job.name, job.item, job.id
            );
        }
        return Ok(false);
    }
    let job = item::watch(dir, job.id, !json).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&item::job_json(&job))?);
    }
    item::succeeded(job)?;
    Ok(true)
}

/// [`follow`] for a job that moves an item through states (enable, resync): the item's
/// state is printed as the job reaches the step that waits in it, and at the end.
async fn follow_item(
    dir: &std::path::Path,
    job: failback_proto::pb::operator::Job,
    machine: &str,
    no_wait: bool,
) -> anyhow::Result<()> {
    if no_wait {
        follow(dir, job, true, false).await?;
        return Ok(());
    }
    let route = item::list(dir, machine)
        .await?
        .into_iter()
        .next()
        .map(|i| {
            format!(
                "item {}, {} -> {} -> {}",
                i.id, i.machine, i.process_server, i.target
            )
        })
        .unwrap_or_default();
    let mut said = false;
    let job = item::watch_with(dir, job.id, true, |j| {
        let waiting = j.steps.iter().find_map(|s| match s.name.as_str() {
            "Initial replication" => Some("Initial replication in progress"),
            "Resynchronization" => Some("Resynchronization in progress"),
            _ => None,
        });
        if let Some(state) = waiting.filter(|_| !said) {
            println!("{machine}: {state} ({route})");
            said = true;
        }
    })
    .await?;
    item::succeeded(job)?;
    for i in item::list(dir, machine).await? {
        println!(
            "{}: {} (item {}, {} -> {} -> {})",
            i.machine, i.state, i.id, i.machine, i.process_server, i.target
        );
    }
    Ok(())
}

/// `--sync` as the CS takes it.
fn parse_sync(sync: Option<&str>) -> anyhow::Result<SyncMode> {
    Ok(match sync {
        None => SyncMode::Unspecified,
        Some("before-failover") => SyncMode::BeforeFailover,
        Some("full-download") => SyncMode::FullDownload,
        Some(other) => anyhow::bail!(
            "unknown --sync `{other}`: before-failover (synchronise while the VM runs, then only \
             the last changes) or full-download (no checksums, the whole disks)"
        ),
    })
}

fn failover_request(
    machine: &str,
    point: &str,
    shutdown: bool,
    kind: FailoverKind,
    sync: SyncMode,
) -> failback_proto::pb::operator::FailoverRequest {
    failback_proto::pb::operator::FailoverRequest {
        machine: machine.into(),
        point: point.into(),
        shutdown,
        kind: kind as i32,
        sync: sync as i32,
    }
}

async fn proc_action(
    lab_flag: Option<PathBuf>,
    name: &str,
    action: lab::ProcAction,
) -> anyhow::Result<()> {
    let dir = srctl::client::lab_dir(lab_flag)?;
    lab::control_proc(&dir, name, action).await?;
    println!("{name}: {action:?} done");
    Ok(())
}

fn policy_of(a: PolicyArgs) -> Policy {
    let secs = |d: humantime::Duration| std::time::Duration::from(d).as_secs();
    Policy {
        name: a.name,
        rpo_threshold_s: secs(a.rpo_threshold),
        retention_s: secs(a.retention),
        crash_interval_s: secs(a.crash_interval),
        app_interval_s: secs(a.app_interval),
        failback_of: String::new(),
        verification: match a.verification {
            VerificationArg::Digests => Verification::Digests,
            VerificationArg::Off => Verification::Off,
        } as i32,
    }
}

fn workload_of(a: WorkloadArgs) -> anyhow::Result<WorkloadRequest> {
    if a.pattern != "random" && a.pattern != "sequential" {
        anyhow::bail!(
            "--pattern must be random or sequential, not `{}`",
            a.pattern
        );
    }
    Ok(WorkloadRequest {
        machine: a.machine,
        action: String::new(),
        rate_mb_s: a.rate,
        write_size: parse_size(&a.write_size)?,
        pattern: a.pattern,
        compressible: a.compressible,
    })
}
