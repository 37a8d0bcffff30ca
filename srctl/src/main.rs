//! `srctl`: operator CLI of Failback Lab (mirrors the portal and `az site-recovery` verbs).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use srctl::{infra, lab, link};

#[derive(Parser)]
#[command(version, about = "Failback Lab operator CLI")]
struct Cli {
    /// The lab directory (default: $FAILBACK_LAB).
    #[arg(long, global = true)]
    lab: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The local multi-process lab.
    #[command(subcommand)]
    Lab(LabCmd),
    /// Registered components, hosts, machines and datastores.
    #[command(subcommand)]
    Infra(InfraCmd),
    /// The simulated site-to-site VPN.
    #[command(subcommand)]
    Link(LinkCmd),
}

#[derive(Subcommand)]
enum LabCmd {
    /// Start the default two-site lab as processes on loopback and wait until all registered.
    Up {
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Machines on esx-1 (vm1..vmN).
        #[arg(long, default_value_t = 2)]
        machines: usize,
        /// Size of each machine's disk, e.g. 64MiB.
        #[arg(long, default_value = "64MiB")]
        disk_size: String,
        /// How long to wait for every component to register.
        #[arg(long, default_value = "60s")]
        timeout: humantime::Duration,
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
    /// Remove a component from the CS: its certificate is no longer accepted.
    Remove { name: String },
}

#[derive(Subcommand)]
enum LinkCmd {
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Bring the link up.
    Up,
    /// Take the link down: every relayed connection is reset, new ones refused.
    Down,
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("bad size `{s}`: use e.g. 64MiB or 1GiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        _ => anyhow::bail!("bad size `{s}`: use e.g. 64MiB or 1GiB"),
    };
    Ok(n * mult)
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
    match cli.command {
        Cmd::Lab(LabCmd::Up {
            dir,
            machines,
            disk_size,
            timeout,
        }) => {
            let dir = srctl::client::lab_dir(dir.or(lab_flag))?;
            let opts = lab::UpOptions {
                machines,
                disk_size: parse_size(&disk_size)?,
                timeout: timeout.into(),
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
            println!("removed {name}; it must enroll again to reconnect");
        }
        Cmd::Link(cmd) => {
            let dir = srctl::client::lab_dir(lab_flag)?;
            match cmd {
                LinkCmd::Status { json } => link::print(&link::status(&dir).await?, json)?,
                LinkCmd::Up => link::print(&link::set_up(&dir, true).await?, false)?,
                LinkCmd::Down => link::print(&link::set_up(&dir, false).await?, false)?,
            }
        }
    }
    Ok(())
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
