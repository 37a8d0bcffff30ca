//! The configuration server (CS): the lab's certificate authority and enrollment point, its
//! inventory database, the endpoint of every component's control stream, and the operator API.
//!
//! # Layout
//! Layered one way, each layer using only those below it:
//! - gRPC adapters: [`enroll`], [`control`] (control streams), [`operator`] (the operator
//!   API: thin, it hands long operations to `jobs`).
//! - `jobs`: the job runner and one module per kind of job (enable, disable, failover,
//!   commit, cleanup, reprotect, resync, plan): checks that change nothing, then a body the CS
//!   runs and tracks; what a restart resumes or fails.
//! - `placement` (the least loaded process server when none is named), `health` (item and
//!   component views), `groups` (multi-VM points), `reports` (what
//!   components report; what is re-sent when one reconnects), `commands` (the commands
//!   built from an item's rows).
//! - `metrics` (the `flab_cs_*` and `flab_item_*` series of the `/metrics` endpoint, read
//!   through `health` and the store).
//! - `state` (shared state, notifications), `sessions` (control streams, commands and
//!   their results), `ca`, [`config`].
//! - [`admin`]: what runs on the CS host beside the server (operator credentials,
//!   passphrase rotation), on the same database.
//! - `store`: the SQLite database on its own thread, with its schema versions.
//! - `item`: the leaf types, among them the one item state machine.
//!
//! # Ports
//! Two listeners: the enrollment port (server-authenticated TLS, only `Enroll`: a component
//! has no certificate yet) and the API port (mutual TLS, client certificate required: control
//! streams and the operator API). The CS never dials anyone. With `metrics_listen`, a third
//! serves Prometheus metrics (plain HTTP, loopback in the local lab).

mod admin;
mod ca;
mod commands;
pub mod config;
mod control;
mod enroll;
mod groups;
mod health;
mod item;
mod jobs;
mod metrics;
mod operator;
mod placement;
mod reports;
mod sessions;
mod state;
mod store;

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use failback_common::identity::CS_NAME;
use failback_common::identity::{Identity, Role, Site};
use failback_common::renewal::CredentialsCell;
use failback_common::server::Secured;
use failback_common::tls::write_private;
use failback_proto::pb::control::control_server::ControlServer;
use failback_proto::pb::enroll::enrollment_server::EnrollmentServer;
use failback_proto::pb::operator::operator_server::OperatorServer;
use rand::distr::{Alphanumeric, SampleString};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use admin::{add_operator, rotate_passphrase};
pub use config::CsConfig;
use jobs::Jobs;
use state::State;
pub use store::SCHEMA_VERSION;

/// Names of the files the CS writes in its data directory for operators and the lab.
pub const CA_FILE: &str = "ca.pem";
pub const PASSPHRASE_FILE: &str = "passphrase";
/// The settings key of the component passphrase in the database.
pub(crate) const PASSPHRASE_SETTING: &str = "passphrase";

fn new_passphrase() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 24)
}

/// An opened configuration server, ready to serve.
pub struct ConfigServer {
    state: Arc<State>,
    jobs: Arc<Jobs>,
}

impl ConfigServer {
    /// Opens (or creates) the database, the CA and the passphrase; writes `ca.pem` and
    /// `passphrase` into the data directory.
    pub fn open(config: CsConfig) -> anyhow::Result<ConfigServer> {
        failback_common::tls::private_dir(&config.data_dir).with_context(|| {
            format!("cannot create data directory {}", config.data_dir.display())
        })?;
        let store = store::Store::open(&config.db_path())
            .with_context(|| format!("cannot open {}", config.db_path().display()))?;
        let ca = ca::Ca::load_or_create(&store)?;
        let fresh = new_passphrase();
        let (passphrase, revoked) = store.call_blocking(move |db| {
            if db.policy("default")?.is_none() {
                db.put_policy_with_twin(&item::default_policy())?;
            }
            let passphrase = match db.setting(PASSPHRASE_SETTING)? {
                Some(p) => p,
                None => {
                    db.put_setting(PASSPHRASE_SETTING, &fresh)?;
                    tracing::info!("generated the registration passphrase");
                    fresh
                }
            };
            Ok((passphrase, db.revoked()?))
        })?;
        write_public_files(&config.data_dir, ca.cert_pem(), &passphrase)?;
        let trust = failback_common::trust::Trust::new();
        trust.revoke(revoked);
        let state = Arc::new(State::new(config, store, ca, trust));
        Ok(ConfigServer {
            jobs: Jobs::new(state.clone()),
            state,
        })
    }

    pub fn ca_pem(&self) -> &str {
        self.state.ca.cert_pem()
    }

    /// The current component passphrase.
    pub fn passphrase(&self) -> anyhow::Result<String> {
        Ok(self
            .state
            .store
            .call_blocking(|db| db.setting(PASSPHRASE_SETTING))?
            .unwrap_or_default())
    }

    /// Serves enrollment on `enroll` and the mutual-TLS API on `api` until `shutdown`.
    pub async fn serve(
        self,
        enroll: TcpListener,
        api: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let (state, jobs) = (self.state, self.jobs);
        // Jobs left running by the previous run: resumed, or failed with a reason.
        jobs.recover()
            .await
            .context("recovering the jobs of the previous run")?;
        // The CS's own certificate, renewed in place a third before it expires.
        let identity = Identity::new(Role::ConfigServer, Site::Onprem, CS_NAME);
        let lifetime = state.config.cert_lifetime;
        let me = CredentialsCell::new(state.ca.issue(&identity, lifetime)?, None)?;
        tokio::spawn(renew_own_certificate(
            state.clone(),
            me.clone(),
            shutdown.clone(),
        ));
        if let Ok(mut a) = state.api_address.lock() {
            *a = if state.config.advertise.is_empty() {
                api.local_addr()?.to_string()
            } else {
                state.config.advertise.clone()
            };
        }
        let limits = state.config.listener;
        let enroll_secured = Secured::new(
            me.server_config_without_client_auth()?,
            state.trust.clone(),
            limits,
        );
        let api_secured = Secured::new(
            me.server_config(state.trust.clone())?,
            state.trust.clone(),
            limits,
        );
        let enroll_router = failback_common::server::builder()
            .timeout(std::time::Duration::from_secs(30))
            .add_service(failback_common::server::health_service())
            .add_service(EnrollmentServer::new(enroll::EnrollmentService {
                state: state.clone(),
            }));
        let api_router = failback_common::server::builder()
            .add_service(failback_common::server::health_service())
            .add_service(ControlServer::new(control::ControlService {
                state: state.clone(),
                jobs: jobs.clone(),
            }))
            .add_service(OperatorServer::new(operator::OperatorService {
                state: state.clone(),
                jobs: jobs.clone(),
            }));
        tracing::info!(
            enroll = %enroll.local_addr()?,
            api = %api.local_addr()?,
            "configuration server ready"
        );
        tokio::spawn(groups::tagger(state.clone(), shutdown.clone()));
        let registry = failback_common::metrics::Metrics::new();
        metrics::register(&registry, state.clone());
        metrics::register_sessions(&registry, state.clone());
        failback_common::metrics::start(Some(&state.config.metrics_listen), &registry, &shutdown)
            .await?;
        let stopping = state.stopping.clone();
        let watch = shutdown.clone();
        tokio::spawn(async move {
            watch.cancelled().await;
            stopping.cancel();
        });
        let (a, b) = tokio::join!(
            failback_common::server::serve(enroll_router, enroll, enroll_secured, shutdown.clone()),
            failback_common::server::serve(api_router, api, api_secured, shutdown.clone()),
        );
        jobs.close().await;
        a.context("enrollment server")?;
        b.context("API server")?;
        Ok(())
    }
}

/// Re-issues the CS's own certificate whenever less than a third of its lifetime remains.
async fn renew_own_certificate(state: Arc<State>, me: CredentialsCell, stop: CancellationToken) {
    let lifetime = state.config.cert_lifetime;
    loop {
        let left_ms = me.not_after_ms() - failback_common::control::now_ms();
        let wait_ms = (left_ms - (lifetime.as_millis() / 3) as i64).max(100);
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(wait_ms as u64)) => {}
            _ = stop.cancelled() => return,
        }
        let identity = me.identity();
        match state
            .ca
            .issue(&identity, lifetime)
            .map_err(|e| e.to_string())
            .and_then(|c| me.replace(c).map_err(|e| e.to_string()))
        {
            Ok(()) => tracing::info!("renewed the configuration server's own certificate"),
            Err(e) => {
                tracing::error!("cannot renew the configuration server's certificate: {e}");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
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
    store::backup(&db, to)
        .with_context(|| format!("backup of {} to {}", db.display(), to.display()))
}

/// Restores a backup into the (empty) data directory of `config`. A backup that others than
/// its owner can read is refused unless `force`: it holds the CA key and the passphrase, and
/// anyone who read it can mint certificates.
pub fn restore(config: &CsConfig, from: &Path, force: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let db = config.db_path();
    if db.exists() {
        anyhow::bail!(
            "{} already exists; restore into an empty data directory (or move the old database away)",
            db.display()
        );
    }
    let mode = std::fs::metadata(from)
        .with_context(|| format!("cannot read {}", from.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 && !force {
        anyhow::bail!(
            "{} is readable by others (mode {:o}): it holds the lab's CA key and passphrase, so \
             whoever read it can mint certificates; make it private (`chmod 600 {}`) and consider \
             rotating the lab's credentials, or restore it anyway with --force",
            from.display(),
            mode & 0o777,
            from.display()
        );
    }
    failback_common::tls::private_dir(&config.data_dir)?;
    store::backup(from, &db)
        .with_context(|| format!("restore of {} into {}", from.display(), db.display()))?;
    // Re-open to check the copy and to write ca.pem and the passphrase file.
    ConfigServer::open(config.clone())?;
    Ok(())
}
