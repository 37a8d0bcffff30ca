//! Components: the inventory rows (role, site, certificate fingerprint, addresses, power
//! state), what hangs off them (datastores, a host's machines, a machine's disks), and the
//! settings table (CA, passphrase, counters).

use failback_common::identity::Identity;
use failback_common::os::Os;
use failback_proto::pb::control::Hello;
use rusqlite::{OptionalExtension, params};

use super::{Db, DbError};

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
    /// What a machine or a master target reported (`None`: nothing, or another role).
    pub os: Option<Os>,
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

impl Db<'_> {
    pub fn setting(&self, key: &str) -> Result<Option<String>, DbError> {
        Ok(self
            .c
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    pub fn put_setting(&self, key: &str, value: &str) -> Result<(), DbError> {
        self.c.execute(
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
        self.c.execute(
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
        self.c.execute(
            "DELETE FROM host_machines WHERE host = ?1 AND machine = ?2",
            params![host, machine],
        )?;
        Ok(())
    }

    /// Removes the component `name` and revokes its certificate; returns the revoked
    /// fingerprint, or `None` if no such component is registered.
    pub fn remove(&self, name: &str, now_ms: i64) -> Result<Option<String>, DbError> {
        let Some((fingerprint, role)) = self
            .c
            .query_row(
                "SELECT cert_fingerprint, role FROM components WHERE name = ?1",
                [name],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
            )
            .optional()?
        else {
            return Ok(None);
        };
        self.c.execute(
            "INSERT OR IGNORE INTO revoked(fingerprint, name, role, revoked_at_ms)
             VALUES (?1, ?2, ?3, ?4)",
            params![fingerprint, name, role, now_ms],
        )?;
        self.c
            .execute("DELETE FROM components WHERE name = ?1", [name])?;
        Ok(Some(fingerprint))
    }

    /// Fingerprints of every revoked certificate.
    pub fn revoked(&self) -> Result<Vec<String>, DbError> {
        let mut stmt = self
            .c
            .prepare_cached("SELECT fingerprint FROM revoked ORDER BY revoked_at_ms")?;
        let rows = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// The component whose name equals `name` ignoring case (names are DNS labels: `PS1`
    /// and `ps1` are one name).
    pub fn component_any_case(&self, name: &str) -> Result<Option<ComponentRow>, DbError> {
        let found: Option<String> = self
            .c
            .query_row(
                "SELECT name FROM components WHERE name = ?1 COLLATE NOCASE LIMIT 1",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        match found {
            Some(n) => self.component(&n),
            None => Ok(None),
        }
    }

    /// Stores what a component says about itself on registration, in one transaction.
    /// How many components are registered or expected: machines a host reported whose agent
    /// has not connected yet count too (a lab coming up registers its hosts first).
    pub fn component_count(&self) -> Result<usize, DbError> {
        Ok(self
            .c
            .prepare_cached(
                "SELECT (SELECT COUNT(*) FROM components)
                      + (SELECT COUNT(*) FROM host_machines
                         WHERE machine NOT IN (SELECT name FROM components))",
            )?
            .query_row([], |r| r.get::<_, i64>(0))? as usize)
    }

    pub fn register(&self, hello: &Hello, now_ms: i64) -> Result<(), DbError> {
        let tx = self.c;
        let addresses = serde_json::to_string(&hello.addresses).unwrap_or_else(|_| "{}".into());
        let (host, power) = hello
            .machine
            .as_ref()
            .map(|m| (m.host.clone(), m.power_state.clone()))
            .unwrap_or_default();
        let os = Os::from_pb(hello.os()).map(Os::as_str).unwrap_or("");
        tx.execute(
            "UPDATE components SET version = ?2, addresses = ?3, host = ?4, power_state = ?5,
                 last_heartbeat_ms = ?6, os = ?7 WHERE name = ?1",
            params![
                hello.name,
                hello.version,
                addresses,
                host,
                power,
                now_ms,
                os
            ],
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
        Ok(())
    }

    pub fn heartbeat(&self, name: &str, now_ms: i64) -> Result<(), DbError> {
        self.c.execute(
            "UPDATE components SET last_heartbeat_ms = ?2 WHERE name = ?1",
            params![name, now_ms],
        )?;
        Ok(())
    }

    pub fn component(&self, name: &str) -> Result<Option<ComponentRow>, DbError> {
        let mut rows = self.components(Some(name))?;
        Ok(rows.pop())
    }

    /// Every machine's disks, by machine, in one query (the operator's views of all items).
    pub fn disks_by_machine(
        &self,
    ) -> Result<std::collections::HashMap<String, Vec<DiskRow>>, DbError> {
        let mut stmt = self.c.prepare_cached(
            "SELECT machine, disk_id, datastore, path, size FROM disks ORDER BY machine, disk_id",
        )?;
        super::grouped(stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                DiskRow {
                    id: r.get(1)?,
                    datastore: r.get(2)?,
                    path: r.get(3)?,
                    size: r.get::<_, i64>(4)? as u64,
                },
            ))
        })?)
    }

    /// Every component with its datastores, machines and disks, ordered by site, role, name.
    pub fn list(&self) -> Result<Vec<ComponentRow>, DbError> {
        self.components(None)
    }

    fn components(&self, only: Option<&str>) -> Result<Vec<ComponentRow>, DbError> {
        let conn = self.c;
        // Two statements, not `?1 IS NULL OR name = ?1`: SQLite plans that one as a scan of
        // every component, and a single lookup (one per item in `item list`) must use the key.
        const COLUMNS: &str = "SELECT name, role, site, cert_fingerprint, enrolled_at_ms, version,
                    addresses, host, power_state, last_heartbeat_ms, os FROM components";
        let mut stmt = match only {
            Some(_) => conn.prepare_cached(&format!("{COLUMNS} WHERE name = ?1"))?,
            None => conn.prepare_cached(&format!("{COLUMNS} ORDER BY site DESC, role, name"))?,
        };
        let params: Vec<&str> = only.into_iter().collect();
        let mut rows: Vec<ComponentRow> = stmt
            .query_map(rusqlite::params_from_iter(params), |r| {
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
                    os: Os::parse(&r.get::<_, String>(10)?),
                    ..Default::default()
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut ds_stmt = conn.prepare_cached(
            "SELECT name, path, capacity, free FROM datastores WHERE component = ?1 ORDER BY name",
        )?;
        let mut m_stmt = conn
            .prepare_cached("SELECT machine FROM host_machines WHERE host = ?1 ORDER BY machine")?;
        let mut d_stmt = conn.prepare_cached(
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

    /// Records that the component `name` now runs as `identity` with a certificate the CS
    /// issued (a failed-over VM): inserted, or moved to its new site and host. The certificate
    /// of its previous incarnation is revoked; its fingerprint is returned.
    pub fn upsert_issued(
        &self,
        identity: &Identity,
        fingerprint: &str,
        host: &str,
        now_ms: i64,
    ) -> Result<Option<String>, DbError> {
        let previous: Option<(String, String)> = self
            .c
            .query_row(
                "SELECT cert_fingerprint, role FROM components WHERE name = ?1",
                [&identity.name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let revoked = match previous {
            Some((old, role)) if old != fingerprint && !old.is_empty() => {
                self.c.execute(
                    "INSERT OR IGNORE INTO revoked(fingerprint, name, role, revoked_at_ms)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![old, identity.name, role, now_ms],
                )?;
                Some(old)
            }
            _ => None,
        };
        self.c.execute(
            "INSERT INTO components(name, role, site, cert_fingerprint, enrolled_at_ms, host, power_state)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'starting')
             ON CONFLICT(name) DO UPDATE SET role = excluded.role, site = excluded.site,
               cert_fingerprint = excluded.cert_fingerprint, host = excluded.host, power_state = 'starting'",
            params![identity.name, identity.role.as_str(), identity.site.as_str(), fingerprint, now_ms, host],
        )?;
        Ok(revoked)
    }

    /// Records the renewed certificate of `name` (the old one stays valid until it expires).
    pub fn set_fingerprint(&self, name: &str, fingerprint: &str) -> Result<(), DbError> {
        self.c.execute(
            "UPDATE components SET cert_fingerprint = ?2 WHERE name = ?1",
            params![name, fingerprint],
        )?;
        Ok(())
    }

    pub fn set_power_state(&self, name: &str, power: &str) -> Result<(), DbError> {
        self.c.execute(
            "UPDATE components SET power_state = ?2 WHERE name = ?1",
            params![name, power],
        )?;
        Ok(())
    }
}
