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

pub mod config;
pub mod machine;

use std::sync::Arc;

use failback_common::component::{DatastoreConfig, advertised, hello, register};
use failback_common::identity::{Identity, Role};
use failback_proto::pb::control::{Hello, MachineInfo};
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
    let mut machines = Vec::new();
    for m in &config.machine {
        machines.push(machine::Machine::open(m, &config)?);
    }

    let addresses = advertised(&config.advertise, config.site, listener.local_addr().ok());
    let base = hello(&identity);
    let datastores = config.datastore.clone();
    let names: Vec<String> = machines.iter().map(|m| m.name.clone()).collect();
    let hello_fn = Arc::new(move || Hello {
        addresses: addresses.clone(),
        datastores: datastores.iter().map(DatastoreConfig::describe).collect(),
        machines: names.clone(),
        ..base.clone()
    });
    let host = register(&identity, &config.data_dir, &config.cs, hello_fn, &shutdown).await?;

    let mut agents = Vec::new();
    for m in machines {
        let id = Identity::new(Role::Agent, config.site, &m.name);
        let base = hello(&id);
        let info = MachineInfo {
            host: config.name.clone(),
            power_state: "running".into(),
            disks: m.disks.iter().map(|d| d.describe()).collect(),
        };
        let hello_fn = Arc::new(move || Hello {
            machine: Some(info.clone()),
            ..base.clone()
        });
        let data_dir = config.data_dir.join("machines").join(&m.name);
        agents.push(register(&id, &data_dir, &config.cs, hello_fn, &shutdown).await?);
    }
    tracing::info!(machines = agents.len(), "host ready");

    let router = failback_common::server::builder(host.credentials.server_tls())?
        .add_service(failback_common::server::health_service());
    failback_common::server::serve(router, listener, shutdown).await?;
    Ok(())
}
