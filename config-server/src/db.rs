//! The configuration server's embedded database (SQLite, WAL): the lab CA, the passphrase,
//! and the inventory (components, hosts and their machines, disks, datastores, versions,
//! last heartbeats). ASR keeps the same in its CS MySQL database (`hosts` table), and
//! failback needs the machine to be there, so this file is what `config-server backup`
//! copies: a CS restored from it keeps the CA, the passphrase and every registration.
//!
//! All access goes through [`Store`]; statements are short, so a mutex around one
//! connection is enough at lab scale.

use std::path::Path;
use std::sync::Mutex;

use failback_common::identity::Identity;
use failback_proto::pb::control::Hello;
use rusqlite::{Connection, OptionalExtension, params};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS components (
    name              TEXT PRIMARY KEY,
    role              TEXT NOT NULL,
    site              TEXT NOT NULL,
    cert_fingerprint  TEXT NOT NULL,
    enrolled_at_ms    INTEGER NOT NULL,
    version           TEXT NOT NULL DEFAULT '',
    addresses         TEXT NOT NULL DEFAULT '{}',
    host              TEXT NOT NULL DEFAULT '',
    power_state       TEXT NOT NULL DEFAULT '',
    last_heartbeat_ms INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS datastores (
    component TEXT NOT NULL REFERENCES components(name) ON DELETE CASCADE,
    name      TEXT NOT NULL,
    path      TEXT NOT NULL,
    capacity  INTEGER NOT NULL,
    free      INTEGER NOT NULL,
    PRIMARY KEY (component, name)
);
CREATE TABLE IF NOT EXISTS host_machines (
    host    TEXT NOT NULL REFERENCES components(name) ON DELETE CASCADE,
    machine TEXT NOT NULL,
    PRIMARY KEY (host, machine)
);
CREATE TABLE IF NOT EXISTS policies (
    name             TEXT PRIMARY KEY,
    rpo_threshold_s  INTEGER NOT NULL,
    retention_s      INTEGER NOT NULL,
    crash_interval_s INTEGER NOT NULL,
    app_interval_s   INTEGER NOT NULL,
    failback_of      TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS items (
    id                TEXT PRIMARY KEY,
    machine           TEXT NOT NULL,
    direction         TEXT NOT NULL,
    state             TEXT NOT NULL,
    process_server    TEXT NOT NULL,
    target            TEXT NOT NULL,
    datastore         TEXT NOT NULL,
    policy            TEXT NOT NULL,
    replication_group TEXT NOT NULL DEFAULT '',
    created_ms        INTEGER NOT NULL,
    active            INTEGER NOT NULL DEFAULT 1,
    progress          TEXT NOT NULL DEFAULT '{}',
    -- The point the item failed over to, and the source digests recorded with it.
    failover_point    TEXT NOT NULL DEFAULT '',
    failover_digests  TEXT NOT NULL DEFAULT '[]',
    -- The running test-failover VM, if any.
    test_vm           TEXT NOT NULL DEFAULT '',
    -- Where the machine lives on-premises and how the replica was seeded (items::Placement).
    placement         TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS recovery_points (
    item    TEXT NOT NULL REFERENCES items(id) ON DELETE CASCADE,
    id      TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    time_ms INTEGER NOT NULL,
    kind    TEXT NOT NULL,
    PRIMARY KEY (item, id)
);
CREATE TABLE IF NOT EXISTS plans (
    name       TEXT PRIMARY KEY,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS plan_members (
    plan    TEXT NOT NULL REFERENCES plans(name) ON DELETE CASCADE,
    machine TEXT NOT NULL,
    grp     INTEGER NOT NULL,
    PRIMARY KEY (plan, machine)
);
CREATE TABLE IF NOT EXISTS jobs (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT NOT NULL,
    item       TEXT NOT NULL,
    state      TEXT NOT NULL,
    steps      TEXT NOT NULL DEFAULT '[]',
    started_ms INTEGER NOT NULL,
    ended_ms   INTEGER NOT NULL DEFAULT 0,
    error      TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS disks (
    machine   TEXT NOT NULL REFERENCES components(name) ON DELETE CASCADE,
    disk_id   TEXT NOT NULL,
    datastore TEXT NOT NULL,
    path      TEXT NOT NULL,
    size      INTEGER NOT NULL,
    PRIMARY KEY (machine, disk_id)
);
"#;

/// A database failure; shown to callers as an internal error.
#[derive(Debug, thiserror::Error)]
#[error("configuration server database: {0}")]
pub struct DbError(#[from] rusqlite::Error);

impl From<DbError> for tonic::Status {
    fn from(e: DbError) -> Self {
        tracing::error!("{e}");
        tonic::Status::internal(e.to_string())
    }
}

/// One inventory row, with what hangs off it.
#[derive(Debug, Clone, Default)]
pub struct ComponentRow {
    pub name: String,
    pub role: String,
    pub site: String,
    pub cert_fingerprint: String,
    pub enrolled_at_ms: i64,
    pub version: String,
    pub addresses: std::collections::BTreeMap<String, String>,
    pub host: String,
    pub power_state: String,
    pub last_heartbeat_ms: i64,
    pub datastores: Vec<DatastoreRow>,
    pub machines: Vec<String>,
    pub disks: Vec<DiskRow>,
}

#[derive(Debug, Clone)]
pub struct DatastoreRow {
    pub name: String,
    pub path: String,
    pub capacity: u64,
    pub free: u64,
}

#[derive(Debug, Clone)]
pub struct DiskRow {
    pub id: String,
    pub datastore: String,
    pub path: String,
    pub size: u64,
}

pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, DbError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        // Databases from before a column existed (a restored backup) get it added.
        let has_placement: bool = conn
            .prepare("SELECT 1 FROM pragma_table_info('items') WHERE name = 'placement'")?
            .exists([])?;
        if !has_placement {
            conn.execute_batch(
                "ALTER TABLE items ADD COLUMN placement TEXT NOT NULL DEFAULT '{}'",
            )?;
        }
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    pub(crate) fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (statements are
        // atomic), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn setting(&self, key: &str) -> Result<Option<String>, DbError> {
        Ok(self
            .conn()
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    pub fn put_setting(&self, key: &str, value: &str) -> Result<(), DbError> {
        self.conn().execute(
            "INSERT INTO settings(key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    /// Records a newly enrolled component. Fails if the name is taken (checked by the caller
    /// first, so that the error can name the holder).
    pub fn insert_enrolled(
        &self,
        id: &Identity,
        fingerprint: &str,
        now_ms: i64,
    ) -> Result<(), DbError> {
        self.conn().execute(
            "INSERT INTO components(name, role, site, cert_fingerprint, enrolled_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                id.name,
                id.role.as_str(),
                id.site.as_str(),
                fingerprint,
                now_ms
            ],
        )?;
        Ok(())
    }

    /// Forgets that `host` runs `machine` (the VM was deleted there).
    pub fn remove_host_machine(&self, host: &str, machine: &str) -> Result<(), DbError> {
        self.conn().execute(
            "DELETE FROM host_machines WHERE host = ?1 AND machine = ?2",
            params![host, machine],
        )?;
        Ok(())
    }

    pub fn remove(&self, name: &str) -> Result<bool, DbError> {
        let n = self
            .conn()
            .execute("DELETE FROM components WHERE name = ?1", [name])?;
        Ok(n > 0)
    }

    /// Stores what a component says about itself on registration, in one transaction.
    pub fn register(&self, hello: &Hello, now_ms: i64) -> Result<(), DbError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let addresses = serde_json::to_string(&hello.addresses).unwrap_or_else(|_| "{}".into());
        let (host, power) = hello
            .machine
            .as_ref()
            .map(|m| (m.host.clone(), m.power_state.clone()))
            .unwrap_or_default();
        tx.execute(
            "UPDATE components SET version = ?2, addresses = ?3, host = ?4, power_state = ?5,
                 last_heartbeat_ms = ?6 WHERE name = ?1",
            params![hello.name, hello.version, addresses, host, power, now_ms],
        )?;
        tx.execute("DELETE FROM datastores WHERE component = ?1", [&hello.name])?;
        for ds in &hello.datastores {
            tx.execute(
                "INSERT INTO datastores(component, name, path, capacity, free) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![hello.name, ds.name, ds.path, ds.capacity_bytes as i64, ds.free_bytes as i64],
            )?;
        }
        tx.execute("DELETE FROM host_machines WHERE host = ?1", [&hello.name])?;
        for m in &hello.machines {
            tx.execute(
                "INSERT INTO host_machines(host, machine) VALUES (?1, ?2)",
                params![hello.name, m],
            )?;
        }
        if let Some(machine) = &hello.machine {
            tx.execute("DELETE FROM disks WHERE machine = ?1", [&hello.name])?;
            for d in &machine.disks {
                tx.execute(
                    "INSERT INTO disks(machine, disk_id, datastore, path, size) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![hello.name, d.id, d.datastore, d.path, d.size_bytes as i64],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn heartbeat(&self, name: &str, now_ms: i64) -> Result<(), DbError> {
        self.conn().execute(
            "UPDATE components SET last_heartbeat_ms = ?2 WHERE name = ?1",
            params![name, now_ms],
        )?;
        Ok(())
    }

    pub fn component(&self, name: &str) -> Result<Option<ComponentRow>, DbError> {
        Ok(self.list()?.into_iter().find(|c| c.name == name))
    }

    /// Every component with its datastores, machines and disks, ordered by site, role, name.
    pub fn list(&self) -> Result<Vec<ComponentRow>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, role, site, cert_fingerprint, enrolled_at_ms, version, addresses, host,
                    power_state, last_heartbeat_ms
             FROM components ORDER BY site DESC, role, name",
        )?;
        let mut rows: Vec<ComponentRow> = stmt
            .query_map([], |r| {
                let addresses: String = r.get(6)?;
                Ok(ComponentRow {
                    name: r.get(0)?,
                    role: r.get(1)?,
                    site: r.get(2)?,
                    cert_fingerprint: r.get(3)?,
                    enrolled_at_ms: r.get(4)?,
                    version: r.get(5)?,
                    addresses: serde_json::from_str(&addresses).unwrap_or_default(),
                    host: r.get(7)?,
                    power_state: r.get(8)?,
                    last_heartbeat_ms: r.get(9)?,
                    ..Default::default()
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut ds_stmt = conn.prepare(
            "SELECT name, path, capacity, free FROM datastores WHERE component = ?1 ORDER BY name",
        )?;
        let mut m_stmt =
            conn.prepare("SELECT machine FROM host_machines WHERE host = ?1 ORDER BY machine")?;
        let mut d_stmt = conn.prepare(
            "SELECT disk_id, datastore, path, size FROM disks WHERE machine = ?1 ORDER BY disk_id",
        )?;
        for row in &mut rows {
            row.datastores = ds_stmt
                .query_map([&row.name], |r| {
                    Ok(DatastoreRow {
                        name: r.get(0)?,
                        path: r.get(1)?,
                        capacity: r.get::<_, i64>(2)? as u64,
                        free: r.get::<_, i64>(3)? as u64,
                    })
                })?
                .collect::<Result<_, _>>()?;
            row.machines = m_stmt
                .query_map([&row.name], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            row.disks = d_stmt
                .query_map([&row.name], |r| {
                    Ok(DiskRow {
                        id: r.get(0)?,
                        datastore: r.get(1)?,
                        path: r.get(2)?,
                        size: r.get::<_, i64>(3)? as u64,
                    })
                })?
                .collect::<Result<_, _>>()?;
        }
        Ok(rows)
    }
}

/// Copies the database at `db` to `to` while a CS may be writing it (SQLite online backup:
/// a consistent snapshot, the server keeps running).
pub fn backup(db: &Path, to: &Path) -> Result<(), DbError> {
    let src = Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    src.busy_timeout(std::time::Duration::from_secs(5))?;
    let mut dst = Connection::open(to)?;
    let backup = rusqlite::backup::Backup::new(&src, &mut dst)?;
    backup.run_to_completion(256, std::time::Duration::from_millis(5), None)?;
    Ok(())
}
