//! What an administrator does on the configuration server's host, with the CS running or not:
//! issue an operator's credentials (`config-server operator add`) and rotate the component
//! passphrase (`config-server passphrase rotate`).
//!
//! Both open the CS database directly (SQLite in WAL mode: a running CS and these commands
//! share it), so they need the service user's access to the data directory, which is what
//! makes them the operator's trust anchor: the component passphrase never yields an operator.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use failback_common::control::now_ms;
use failback_common::identity::{CS_NAME, Identity, Role, Site, validate_name};
use failback_common::tls::Credentials;

use crate::config::CsConfig;
use crate::store::Store;

fn open_store(config: &CsConfig) -> anyhow::Result<Store> {
    let db = config.db_path();
    if !db.exists() {
        bail!(
            "no configuration server database at {}: start the configuration server once (or \
             check `data_dir` in its config)",
            db.display()
        );
    }
    Store::open(&db).with_context(|| format!("cannot open {}", db.display()))
}

/// Issues credentials for the operator `name` into `out/identity/` (key 0600, directory
/// 0700) and registers them, so that `srctl infra remove NAME` revokes them like any
/// certificate. Refuses a name taken by any component, whatever its case.
pub fn add_operator(config: &CsConfig, name: &str, out: &Path) -> anyhow::Result<PathBuf> {
    validate_name(name).map_err(anyhow::Error::msg)?;
    if name.eq_ignore_ascii_case(CS_NAME) {
        bail!("the name `{name}` belongs to the configuration server; choose another name");
    }
    let dir = Credentials::dir(out);
    if dir.join("cert.pem").exists() {
        bail!(
            "{} already holds credentials; choose another directory, or remove it first",
            dir.display()
        );
    }
    let store = open_store(config)?;
    let ca = crate::ca::Ca::load_or_create(&store)?;
    let identity = Identity::new(Role::Operator, Site::Onprem, name);
    let creds = ca.issue(&identity, config.operator_cert_lifetime)?;
    let fingerprint =
        failback_common::tls::fingerprint(&creds.cert_pem).map_err(anyhow::Error::msg)?;
    let enrolled = identity.clone();
    let taken = store.call_blocking(move |db| match db.component_any_case(&enrolled.name)? {
        Some(row) => Ok(Some(format!("{} ({} at {})", row.name, row.role, row.site))),
        None => db
            .insert_enrolled(&enrolled, &fingerprint, now_ms())
            .map(|()| None),
    })?;
    if let Some(holder) = taken {
        bail!(
            "a component named {holder} is already registered; names are unique whatever their \
             case: choose another name, or remove the old one with `srctl infra remove {name}`"
        );
    }
    creds.save(out)?;
    tracing::info!(%identity, "operator credentials issued");
    Ok(dir)
}

/// Replaces the component passphrase (database and the `passphrase` file). Enrolled
/// components keep their certificates; only new enrollments need the new passphrase.
pub fn rotate_passphrase(config: &CsConfig) -> anyhow::Result<PathBuf> {
    let store = open_store(config)?;
    let fresh = crate::new_passphrase();
    let value = fresh.clone();
    store.call_blocking(move |db| db.put_setting(crate::PASSPHRASE_SETTING, &value))?;
    let file = config.data_dir.join(crate::PASSPHRASE_FILE);
    failback_common::tls::write_private(&file, &format!("{fresh}\n"))?;
    tracing::info!("component passphrase rotated");
    Ok(file)
}
