//! The versioned schema of the CS database and its migrations.
//!
//! `PRAGMA user_version` holds the version. A database from before versions existed reads as
//! 0 and gets version 1 (the schema it already has, plus columns added since); each later
//! version is one migration, run in order in one transaction, so a CS started on an old
//! database or on a backup made by older code upgrades it and keeps its inventory. A database
//! newer than this code is refused rather than misread.

use rusqlite::Connection;

use super::DbError;

/// The schema version this code writes.
pub const SCHEMA_VERSION: i64 = 6;

/// Version 1: the schema of the first releases (created `IF NOT EXISTS`, so it is also how an
/// unversioned database is brought to version 1).
const V1: &str = r#"
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

/// Version 2: jobs owned by the CS (their kind, the request to resume them with, the plan job
/// that started them) and recovery plans' manual actions and scripts.
const V2: &str = r#"
ALTER TABLE jobs ADD COLUMN kind   TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN params TEXT NOT NULL DEFAULT '{}';
ALTER TABLE jobs ADD COLUMN parent INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS jobs_by_item ON jobs(item, state);
CREATE TABLE IF NOT EXISTS plan_actions (
    plan        TEXT NOT NULL REFERENCES plans(name) ON DELETE CASCADE,
    after_group INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    manual      TEXT NOT NULL DEFAULT '',
    script      TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (plan, after_group, seq)
);
"#;

/// Version 3: revoked certificates (removed components), which every server of the lab
/// refuses; and component names unique whatever their case (they become DNS names).
const V3: &str = r#"
CREATE TABLE IF NOT EXISTS revoked (
    fingerprint   TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    role          TEXT NOT NULL,
    revoked_at_ms INTEGER NOT NULL
);
"#;

/// Version 4: the operating system machines and master targets report (reprotect pairs them).
const V4: &str = r#"
ALTER TABLE components ADD COLUMN os TEXT NOT NULL DEFAULT '';
"#;

/// Version 5: routes a process server still holds for items switched away from it while it
/// was down ("Switch process server"), removed when it connects again.
const V5: &str = r#"
CREATE TABLE IF NOT EXISTS stale_routes (
    process_server TEXT NOT NULL,
    item           TEXT NOT NULL,
    PRIMARY KEY (process_server, item)
);
"#;

/// Version 6: a policy's verification mode (`digests` or `off`); existing policies keep
/// recording digests, as they did.
const V6: &str = r#"
ALTER TABLE policies ADD COLUMN verification TEXT NOT NULL DEFAULT 'digests';
"#;

/// Brings the database to [`SCHEMA_VERSION`].
pub fn migrate(conn: &mut Connection) -> Result<(), DbError> {
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(DbError::TooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    let tx = conn.transaction()?;
    if found < 1 {
        tx.execute_batch(V1)?;
        // Databases from before the column existed (a restored backup) get it added.
        let has_placement = tx
            .prepare("SELECT 1 FROM pragma_table_info('items') WHERE name = 'placement'")?
            .exists([])?;
        if !has_placement {
            tx.execute_batch("ALTER TABLE items ADD COLUMN placement TEXT NOT NULL DEFAULT '{}'")?;
        }
    }
    if found < 2 {
        tx.execute_batch(V2)?;
    }
    if found < 3 {
        tx.execute_batch(V3)?;
    }
    if found < 4 {
        tx.execute_batch(V4)?;
    }
    if found < 5 {
        tx.execute_batch(V5)?;
    }
    if found < 6 {
        tx.execute_batch(V6)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    if found < SCHEMA_VERSION {
        tracing::info!(
            from = found,
            to = SCHEMA_VERSION,
            "database schema upgraded"
        );
    }
    Ok(())
}
