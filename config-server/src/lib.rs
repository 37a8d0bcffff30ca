//! The configuration server (CS): the lab's certificate authority and enrollment point, its
//! inventory database, the endpoint of every component's control stream, and the operator API.
//!
//! # Layout
//! - [`config`]: `CsConfig`, loaded in layers and validated.
//! - [`db`]: the SQLite store (WAL) and online backup.
//! - [`ca`]: the lab CA (in the database) and certificate issuing.
//! - [`state`]: shared state, live sessions, enrollment rate limiting.
//! - [`items`]: replicated items, policies, recovery points, jobs; "Enable protection".
//! - [`failover`]: failover, planned and test failover, change-point, commit.
//! - [`plans`]: recovery plans (groups in order, machines in a group in parallel).
//! - [`reports`]: reports from components; what is re-sent when one reconnects.
//! - [`enroll`], [`control`], [`operator`]: the gRPC services.
//!
//! # Ports
//! Two listeners: the enrollment port (server-authenticated TLS, only `Enroll`: a component
//! has no certificate yet) and the API port (mutual TLS, client certificate required: control
//! streams and the operator API). The CS never dials anyone.

pub mod ca;
pub mod config;
pub mod control;
pub mod db;
pub mod enroll;
pub mod failover;
pub mod items;
pub mod operator;
pub mod plans;
pub mod reports;
pub mod reprotect;
pub mod state;

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use failback_common::identity::{Identity, Role, Site};
use failback_common::tls::write_private;
use failback_proto::pb::control::control_server::ControlServer;
use failback_proto::pb::enroll::enrollment_server::EnrollmentServer;
use failback_proto::pb::operator::operator_server::OperatorServer;
use rand::distr::{Alphanumeric, SampleString};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Identity as TlsIdentity, ServerTlsConfig};

pub use config::CsConfig;
use state::State;

/// Names of the files the CS writes in its data directory for operators and the lab.
pub const CA_FILE: &str = "ca.pem";
pub const PASSPHRASE_FILE: &str = "passphrase";

/// An opened configuration server, ready to serve.
pub struct ConfigServer {
    state: Arc<State>,
}

impl ConfigServer {
    /// Opens (or creates) the database, the CA and the passphrase; writes `ca.pem` and
    /// `passphrase` into the data directory.
    pub fn open(config: CsConfig) -> anyhow::Result<ConfigServer> {
        std::fs::create_dir_all(&config.data_dir).with_context(|| {
            format!("cannot create data directory {}", config.data_dir.display())
        })?;
        let store = db::Store::open(&config.db_path())
            .with_context(|| format!("cannot open {}", config.db_path().display()))?;
        let ca = ca::Ca::load_or_create(&store)?;
        let passphrase = match store.setting("passphrase")? {
            Some(p) => p,
            None => {
                let p = Alphanumeric.sample_string(&mut rand::rng(), 20);
                store.put_setting("passphrase", &p)?;
                tracing::info!("generated the registration passphrase");
                p
            }
        };
        write_public_files(&config.data_dir, ca.cert_pem(), &passphrase)?;
        for (id, name, item) in store.fail_interrupted_jobs()? {
            tracing::warn!(job = id, %name, %item, "job interrupted by a restart: failed; run it again");
        }
        if store.policy("default")?.is_none() {
            store.put_policy_with_twin(&items::default_policy())?;
        }
        Ok(ConfigServer {
            state: Arc::new(State::new(config, store, ca, passphrase)),
        })
    }

    pub fn ca_pem(&self) -> &str {
        self.state.ca.cert_pem()
    }

    pub fn passphrase(&self) -> &str {
        &self.state.passphrase
    }

    /// Serves enrollment on `enroll` and the mutual-TLS API on `api` until `shutdown`.
    pub async fn serve(
        self,
        enroll: TcpListener,
        api: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let state = self.state;
        let me = state
            .ca
            .issue(&Identity::new(Role::ConfigServer, Site::Onprem, "cs"))?;
        if let Ok(mut a) = state.api_address.lock() {
            *a = if state.config.advertise.is_empty() {
                api.local_addr()?.to_string()
            } else {
                state.config.advertise.clone()
            };
        }
        let enroll_tls =
            ServerTlsConfig::new().identity(TlsIdentity::from_pem(&me.cert_pem, &me.key_pem));
        let enroll_router = failback_common::server::builder(enroll_tls)?
            .add_service(failback_common::server::health_service())
            .add_service(EnrollmentServer::new(enroll::EnrollmentService {
                state: state.clone(),
            }));
        let api_router = failback_common::server::builder(me.server_tls())?
            .add_service(failback_common::server::health_service())
            .add_service(ControlServer::new(control::ControlService {
                state: state.clone(),
            }))
            .add_service(OperatorServer::new(operator::OperatorService {
                state: state.clone(),
            }));
        tracing::info!(
            enroll = %enroll.local_addr()?,
            api = %api.local_addr()?,
            "configuration server ready"
        );
        tokio::spawn(items::group_tagger(state.clone(), shutdown.clone()));
        let stopping = state.stopping.clone();
        let watch = shutdown.clone();
        tokio::spawn(async move {
            watch.cancelled().await;
            stopping.cancel();
        });
        let (a, b) = tokio::join!(
            failback_common::server::serve(enroll_router, enroll, shutdown.clone()),
            failback_common::server::serve(api_router, api, shutdown.clone()),
        );
        a.context("enrollment server")?;
        b.context("API server")?;
        Ok(())
    }
}

fn write_public_files(dir: &Path, ca_pem: &str, passphrase: &str) -> anyhow::Result<()> {
    std::fs::write(dir.join(CA_FILE), ca_pem)
        .with_context(|| format!("cannot write {}", dir.join(CA_FILE).display()))?;
    write_private(&dir.join(PASSPHRASE_FILE), &format!("{passphrase}\n"))?;
    Ok(())
}

/// Online backup of the CS database (CA, passphrase and inventory) to `to`.
pub fn backup(config: &CsConfig, to: &Path) -> anyhow::Result<()> {
    let db = config.db_path();
    if !db.exists() {
        anyhow::bail!(
            "no configuration server database at {}; check `data_dir` in the config",
            db.display()
        );
    }
    if to.exists() {
        anyhow::bail!(
            "{} already exists; choose a new file for the backup",
            to.display()
        );
    }
    db::backup(&db, to).with_context(|| format!("backup of {} to {}", db.display(), to.display()))
}

/// Restores a backup into the (empty) data directory of `config`.
pub fn restore(config: &CsConfig, from: &Path) -> anyhow::Result<()> {
    let db = config.db_path();
    if db.exists() {
        anyhow::bail!(
            "{} already exists; restore into an empty data directory (or move the old database away)",
            db.display()
        );
    }
    std::fs::create_dir_all(&config.data_dir)?;
    db::backup(from, &db)
        .with_context(|| format!("restore of {} into {}", from.display(), db.display()))?;
    // Re-open to check the copy and to write ca.pem and the passphrase file.
    ConfigServer::open(config.clone())?;
    Ok(())
}
