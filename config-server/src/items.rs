//! Replicated items, policies, recovery points and jobs: their tables and the orchestration
//! the CS runs for them ("Enable protection").
//!
//! An item is one machine replicating in one direction (`forward`: onprem -> azure,
//! `reverse`: azure -> onprem) through one process server to one target. Its id is
//! `MACHINE-N`. States use ASR's words (see DESIGN.md). The CS drives components with
//! commands on their control streams and learns progress and recovery points from reports.

use std::collections::BTreeMap;

use failback_common::control::now_ms;
use failback_proto::pb::control::{
    DiskInfo, ItemProgress, PointAdded, PrepareReplica, SetRoute, StartReplication, command,
};
use failback_proto::pb::operator::{EnableItemRequest, Item, ItemDisk, Point, Policy};
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::db::{ComponentRow, DbError, Store};
use crate::state::State;

pub const ENABLING: &str = "Enabling protection";
pub const INITIAL: &str = "Initial replication in progress";
pub const PROTECTED: &str = "Protected";
pub const RESYNCING: &str = "Resynchronization in progress";
pub const RESYNC_REQUIRED: &str = "Resync required";
pub const REPROTECTING: &str = "Reprotect in progress";
/// A replication stream down this long while both ends talk to the CS: ASR 78186.
const PS_UNREACHABLE_AFTER_MS: i64 = 10_000;

/// One disk at its place in a datastore: (disk id, path relative to the datastore, size).
pub type PlacedDisk = (String, String, u64);

/// Where a machine lives on-premises (its original location, where failback goes back to)
/// and how this item's replica started (kept as JSON in `items.placement`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Placement {
    /// The on-premises host and datastore of the machine and its disks.
    #[serde(default)]
    pub home_host: String,
    #[serde(default)]
    pub home_datastore: String,
    #[serde(default)]
    pub home_disks: Vec<PlacedDisk>,
    /// The host the source VM of this item runs on (the Azure VM's host for a reverse item:
    /// commit after failback deletes the VM there).
    #[serde(default)]
    pub source_host: String,
    /// The target replica was seeded with an older copy: the initial sync compares checksums.
    #[serde(default)]
    pub seeded: bool,
    /// Failback goes to a new VM in `datastore` on the master target's host.
    #[serde(default)]
    pub alternate: bool,
    /// The item whose replica seeded this one (removed once this one is Protected).
    #[serde(default)]
    pub seed_item: String,
}

impl Placement {
    /// The disks of the original on-premises location, as the master target names them
    /// (paths relative to the home datastore).
    pub fn home_disk_infos(&self) -> Vec<DiskInfo> {
        self.home_disks
            .iter()
            .map(|(id, path, size)| DiskInfo {
                id: id.clone(),
                datastore: self.home_datastore.clone(),
                path: path.clone(),
                size_bytes: *size,
            })
            .collect()
    }
}

/// The lab's default policy: ASR's shape, lab timers (points within a minute).
pub fn default_policy() -> Policy {
    Policy {
        name: "default".into(),
        rpo_threshold_s: 60,
        retention_s: 600,
        crash_interval_s: 5,
        app_interval_s: 30,
        failback_of: String::new(),
    }
}

/// ASR's failback twin of `p`: RPO threshold 15 min, retention 24 h, app-consistent 60 min.
pub fn failback_twin(p: &Policy) -> Policy {
    Policy {
        name: format!("{}-failback", p.name),
        rpo_threshold_s: 15 * 60,
        retention_s: 24 * 3600,
        crash_interval_s: p.crash_interval_s,
        app_interval_s: 60 * 60,
        failback_of: p.name.clone(),
    }
}

/// What the agent last reported about an item (kept as JSON in `items.progress`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    pub phase: String,
    pub disks: BTreeMap<String, (String, f64)>,
    pub bytes_sent: u64,
    pub bytes_per_second: f64,
    pub acked_seq: u64,
    #[serde(default)]
    pub resync_bytes: u64,
    #[serde(default)]
    pub resync_blocks_compared: u64,
    #[serde(default)]
    pub target_seq: u64,
    #[serde(default)]
    pub lag_p50_ms: f64,
    #[serde(default)]
    pub lag_p99_ms: f64,
    #[serde(default)]
    pub ps_down_since_ms: i64,
}

#[derive(Debug, Clone)]
pub struct ItemRow {
    pub id: String,
    pub machine: String,
    pub direction: String,
    pub state: String,
    pub process_server: String,
    pub target: String,
    pub datastore: String,
    pub policy: String,
    pub replication_group: String,
    pub created_ms: i64,
    pub progress: Progress,
    pub failover_point: String,
    /// (disk, blake3) the source recorded with the failover point.
    pub failover_digests: Vec<(String, String)>,
    pub test_vm: String,
    pub placement: Placement,
}

fn policy_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Policy> {
    Ok(Policy {
        name: r.get(0)?,
        rpo_threshold_s: r.get::<_, i64>(1)? as u64,
        retention_s: r.get::<_, i64>(2)? as u64,
        crash_interval_s: r.get::<_, i64>(3)? as u64,
        app_interval_s: r.get::<_, i64>(4)? as u64,
        failback_of: r.get(5)?,
    })
}

const ITEM_COLUMNS: &str = "id, machine, direction, state, process_server, target, datastore, policy, \
                            replication_group, created_ms, progress, failover_point, failover_digests, test_vm, \
                            placement";

fn item_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ItemRow> {
    let progress: String = r.get(10)?;
    Ok(ItemRow {
        id: r.get(0)?,
        machine: r.get(1)?,
        direction: r.get(2)?,
        state: r.get(3)?,
        process_server: r.get(4)?,
        target: r.get(5)?,
        datastore: r.get(6)?,
        policy: r.get(7)?,
        replication_group: r.get(8)?,
        created_ms: r.get(9)?,
        progress: serde_json::from_str(&progress).unwrap_or_default(),
        failover_point: r.get(11)?,
        failover_digests: serde_json::from_str(&r.get::<_, String>(12)?).unwrap_or_default(),
        test_vm: r.get(13)?,
        placement: serde_json::from_str(&r.get::<_, String>(14)?).unwrap_or_default(),
    })
}

impl Store {
    pub fn policies(&self) -> Result<Vec<Policy>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, rpo_threshold_s, retention_s, crash_interval_s, app_interval_s, failback_of
             FROM policies ORDER BY name",
        )?;
        let rows = stmt
            .query_map([], policy_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    pub fn policy(&self, name: &str) -> Result<Option<Policy>, DbError> {
        Ok(self.policies()?.into_iter().find(|p| p.name == name))
    }

    /// Inserts (or replaces) a policy together with its failback twin, in one transaction.
    pub fn put_policy_with_twin(&self, p: &Policy) -> Result<(), DbError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for p in [p.clone(), failback_twin(p)] {
            tx.execute(
                "INSERT INTO policies(name, rpo_threshold_s, retention_s, crash_interval_s, app_interval_s, failback_of)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(name) DO UPDATE SET rpo_threshold_s = excluded.rpo_threshold_s,
                   retention_s = excluded.retention_s, crash_interval_s = excluded.crash_interval_s,
                   app_interval_s = excluded.app_interval_s, failback_of = excluded.failback_of",
                params![
                    p.name,
                    p.rpo_threshold_s as i64,
                    p.retention_s as i64,
                    p.crash_interval_s as i64,
                    p.app_interval_s as i64,
                    p.failback_of
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn items(&self) -> Result<Vec<ItemRow>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {ITEM_COLUMNS} FROM items WHERE active = 1 ORDER BY machine, created_ms"
        ))?;
        let rows = stmt
            .query_map([], item_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    pub fn item(&self, id: &str) -> Result<Option<ItemRow>, DbError> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                &format!("SELECT {ITEM_COLUMNS} FROM items WHERE id = ?1"),
                [id],
                item_from_row,
            )
            .optional()?)
    }

    /// The active item of a machine, if it has one.
    pub fn item_of_machine(&self, machine: &str) -> Result<Option<ItemRow>, DbError> {
        Ok(self.items()?.into_iter().find(|i| i.machine == machine))
    }

    pub fn insert_item(&self, item: &ItemRow) -> Result<(), DbError> {
        self.conn().execute(
            "INSERT INTO items(id, machine, direction, state, process_server, target, datastore, policy,
                               replication_group, created_ms, placement)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                item.id,
                item.machine,
                item.direction,
                item.state,
                item.process_server,
                item.target,
                item.datastore,
                item.policy,
                item.replication_group,
                item.created_ms,
                serde_json::to_string(&item.placement).unwrap_or_else(|_| "{}".into())
            ],
        )?;
        Ok(())
    }

    pub fn delete_item(&self, id: &str) -> Result<(), DbError> {
        self.conn()
            .execute("DELETE FROM items WHERE id = ?1", [id])?;
        Ok(())
    }

    pub fn set_item_active(&self, id: &str, active: bool) -> Result<(), DbError> {
        self.conn().execute(
            "UPDATE items SET active = ?2 WHERE id = ?1",
            params![id, active as i64],
        )?;
        Ok(())
    }

    pub fn set_placement(&self, id: &str, placement: &Placement) -> Result<(), DbError> {
        self.conn().execute(
            "UPDATE items SET placement = ?2 WHERE id = ?1",
            params![
                id,
                serde_json::to_string(placement).unwrap_or_else(|_| "{}".into())
            ],
        )?;
        Ok(())
    }

    /// Every item of `machine`, newest first, active or not.
    pub fn items_of_machine(&self, machine: &str) -> Result<Vec<ItemRow>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {ITEM_COLUMNS} FROM items WHERE machine = ?1 ORDER BY created_ms DESC"
        ))?;
        let rows = stmt
            .query_map([machine], item_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    pub fn set_item_state(&self, id: &str, state: &str) -> Result<(), DbError> {
        self.conn().execute(
            "UPDATE items SET state = ?2 WHERE id = ?1",
            params![id, state],
        )?;
        Ok(())
    }

    pub fn set_item_progress(&self, id: &str, progress: &Progress) -> Result<(), DbError> {
        let json = serde_json::to_string(progress).unwrap_or_else(|_| "{}".into());
        self.conn().execute(
            "UPDATE items SET progress = ?2 WHERE id = ?1",
            params![id, json],
        )?;
        Ok(())
    }

    pub fn set_failover(
        &self,
        id: &str,
        point: &str,
        digests: &[(String, String)],
    ) -> Result<(), DbError> {
        self.conn().execute(
            "UPDATE items SET failover_point = ?2, failover_digests = ?3 WHERE id = ?1",
            params![
                id,
                point,
                serde_json::to_string(digests).unwrap_or_default()
            ],
        )?;
        Ok(())
    }

    pub fn set_test_vm(&self, id: &str, vm: &str) -> Result<(), DbError> {
        self.conn().execute(
            "UPDATE items SET test_vm = ?2 WHERE id = ?1",
            params![id, vm],
        )?;
        Ok(())
    }

    pub fn clear_points(&self, item: &str) -> Result<(), DbError> {
        self.conn()
            .execute("DELETE FROM recovery_points WHERE item = ?1", [item])?;
        Ok(())
    }

    /// After a restart: every job left "In progress" failed with a reason, and items left in a
    /// transient failover state go back to where a re-run starts. Returns the jobs failed.
    pub fn fail_interrupted_jobs(&self) -> Result<Vec<(i64, String, String)>, DbError> {
        let conn = self.conn();
        // Enabling and reprotecting go on by themselves once the components reconnect (the
        // CS re-sends routes and replication settings): those jobs stay and complete.
        let mut stmt = conn.prepare(
            "SELECT j.id, j.name, j.item FROM jobs j WHERE j.state = 'In progress'
             AND NOT (j.name IN ('Enable protection', 'Reprotect') AND EXISTS (
                 SELECT 1 FROM items i WHERE i.id = j.item AND i.active = 1
                 AND i.state IN ('Enabling protection', 'Initial replication in progress', 'Reprotect in progress')))",
        )?;
        let jobs: Vec<(i64, String, String)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        drop(stmt);
        for (id, name, _) in &jobs {
            conn.execute(
                "UPDATE jobs SET state = 'Failed', ended_ms = ?2, error = ?3 WHERE id = ?1",
                params![
                    id,
                    now_ms(),
                    format!("the configuration server restarted while `{name}` ran; run it again")
                ],
            )?;
        }
        conn.execute(
            "UPDATE items SET state = 'Protected' WHERE state IN ('Failover in progress', 'Test failover in progress')",
            [],
        )?;
        Ok(jobs)
    }

    /// The job running on `item`, if any: (id, name).
    pub fn running_job(&self, item: &str) -> Result<Option<(i64, String)>, DbError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id, name FROM jobs WHERE item = ?1 AND state = 'In progress' ORDER BY id DESC LIMIT 1",
                [item],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    pub fn jobs(&self, id: i64) -> Result<Vec<failback_proto::pb::operator::Job>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, name, item, state, steps, started_ms, ended_ms, error FROM jobs
             WHERE ?1 = 0 OR id = ?1 ORDER BY id",
        )?;
        let rows = stmt
            .query_map([id], |r| {
                let steps: String = r.get(4)?;
                let steps: Vec<(String, String, i64)> =
                    serde_json::from_str(&steps).unwrap_or_default();
                Ok(failback_proto::pb::operator::Job {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    item: r.get(2)?,
                    state: r.get(3)?,
                    steps: steps
                        .into_iter()
                        .map(
                            |(name, state, time_ms)| failback_proto::pb::operator::JobStep {
                                name,
                                state,
                                time_ms,
                            },
                        )
                        .collect(),
                    started_ms: r.get(5)?,
                    ended_ms: r.get(6)?,
                    error: r.get(7)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Records that the component `name` now runs as `identity` with a certificate the CS
    /// issued (a failed-over VM): inserted, or moved to its new site and host.
    pub fn upsert_issued(
        &self,
        identity: &failback_common::identity::Identity,
        fingerprint: &str,
        host: &str,
        now_ms: i64,
    ) -> Result<(), DbError> {
        self.conn().execute(
            "INSERT INTO components(name, role, site, cert_fingerprint, enrolled_at_ms, host, power_state)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'starting')
             ON CONFLICT(name) DO UPDATE SET role = excluded.role, site = excluded.site,
               cert_fingerprint = excluded.cert_fingerprint, host = excluded.host, power_state = 'starting'",
            params![identity.name, identity.role.as_str(), identity.site.as_str(), fingerprint, now_ms, host],
        )?;
        Ok(())
    }

    pub fn set_power_state(&self, name: &str, power: &str) -> Result<(), DbError> {
        self.conn().execute(
            "UPDATE components SET power_state = ?2 WHERE name = ?1",
            params![name, power],
        )?;
        Ok(())
    }

    /// The next item id of `machine` (`MACHINE-N`). Never reused, not even after a failed
    /// attempt was rolled back: process servers, targets and agents key state by item id.
    pub fn next_item_id(&self, machine: &str) -> Result<String, DbError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let key = format!("item-counter:{machine}");
        let stored: Option<i64> = tx
            .query_row("SELECT value FROM settings WHERE key = ?1", [&key], |r| {
                r.get::<_, String>(0)
            })
            .optional()?
            .and_then(|v| v.parse().ok());
        let rows: i64 = tx.query_row(
            "SELECT COUNT(*) FROM items WHERE machine = ?1",
            [machine],
            |r| r.get(0),
        )?;
        let n = stored.unwrap_or(0).max(rows) + 1;
        tx.execute(
            "INSERT INTO settings(key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, n.to_string()],
        )?;
        tx.commit()?;
        Ok(format!("{machine}-{n}"))
    }

    pub fn add_point(&self, p: &PointAdded) -> Result<(), DbError> {
        self.conn().execute(
            "INSERT OR IGNORE INTO recovery_points(item, id, seq, time_ms, kind) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![p.item, p.id, p.seq as i64, p.time_ms, p.kind],
        )?;
        Ok(())
    }

    pub fn remove_points(&self, item: &str, ids: &[String]) -> Result<(), DbError> {
        let conn = self.conn();
        for id in ids {
            conn.execute(
                "DELETE FROM recovery_points WHERE item = ?1 AND id = ?2",
                params![item, id],
            )?;
        }
        Ok(())
    }

    pub fn points(&self, item: &str) -> Result<Vec<Point>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, time_ms, kind, seq FROM recovery_points WHERE item = ?1 ORDER BY seq",
        )?;
        let rows = stmt
            .query_map([item], |r| {
                Ok(Point {
                    id: r.get(0)?,
                    time_ms: r.get(1)?,
                    kind: r.get(2)?,
                    seq: r.get::<_, i64>(3)? as u64,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Records a job and returns its id.
    pub fn start_job(&self, name: &str, item: &str) -> Result<i64, DbError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO jobs(name, item, state, started_ms) VALUES (?1, ?2, 'In progress', ?3)",
            params![name, item, now_ms()],
        )?;
        Ok(conn.last_insert_rowid())
    }

    pub fn job_step(&self, job: i64, step: &str, state: &str) -> Result<(), DbError> {
        let conn = self.conn();
        let steps: String =
            conn.query_row("SELECT steps FROM jobs WHERE id = ?1", [job], |r| r.get(0))?;
        let mut steps: Vec<(String, String, i64)> =
            serde_json::from_str(&steps).unwrap_or_default();
        match steps.iter_mut().find(|s| s.0 == step) {
            Some(s) => {
                s.1 = state.to_string();
                s.2 = now_ms();
            }
            None => steps.push((step.to_string(), state.to_string(), now_ms())),
        }
        conn.execute(
            "UPDATE jobs SET steps = ?2 WHERE id = ?1",
            params![job, serde_json::to_string(&steps).unwrap_or_default()],
        )?;
        Ok(())
    }

    pub fn end_job(&self, job: i64, error: Option<&str>) -> Result<(), DbError> {
        self.conn().execute(
            "UPDATE jobs SET state = ?2, ended_ms = ?3, error = ?4 WHERE id = ?1",
            params![
                job,
                if error.is_some() {
                    "Failed"
                } else {
                    "Succeeded"
                },
                now_ms(),
                error.unwrap_or("")
            ],
        )?;
        Ok(())
    }

    /// Ends the open "Enable protection" or "Reprotect" job of `item` successfully: its last
    /// step (the initial synchronisation) is done.
    pub fn finish_enable_job(&self, item: &str) -> Result<(), DbError> {
        let job: Option<i64> = self
            .conn()
            .query_row(
                "SELECT id FROM jobs WHERE item = ?1 AND name IN ('Enable protection', 'Reprotect')
                 AND state = 'In progress'",
                [item],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(job) = job {
            let last = self
                .jobs(job)?
                .into_iter()
                .next()
                .and_then(|j| j.steps.last().map(|s| s.name.clone()));
            if let Some(step) = last {
                self.job_step(job, &step, "Succeeded")?;
            }
            self.end_job(job, None)?;
        }
        Ok(())
    }
}

/// The address of `component` as reachable from `site`.
pub fn address_for(row: &ComponentRow, site: &str) -> Option<String> {
    row.addresses.get(site).cloned()
}

/// `EnableItem`: checks, then the "Enable protection" job. A failed check changes nothing; a
/// failed step rolls the item back.
pub async fn enable(state: &State, req: EnableItemRequest) -> Result<ItemRow, Status> {
    let store = &state.store;
    let machine = store
        .component(&req.machine)?
        .filter(|c| c.role == "agent")
        .ok_or_else(|| {
            Status::not_found(format!(
                "no machine named `{}` is registered; see `srctl infra list`",
                req.machine
            ))
        })?;
    if !state.connected(&machine.name) {
        return Err(Status::failed_precondition(format!(
            "the agent isn't installed on `{}` (it is not connected to the configuration server); \
             wait until it registers (ASR: up to 15 minutes after boot) and try again",
            machine.name
        )));
    }
    if let Some(existing) = store.item_of_machine(&machine.name)? {
        let group_hint = if req.replication_group.is_empty() {
            String::new()
        } else {
            "; a machine joins a replication group only when its replication is enabled".into()
        };
        return Err(Status::already_exists(format!(
            "`{}` is already protected (item {}, state {}){group_hint}",
            machine.name, existing.id, existing.state
        )));
    }
    let policy_name = if req.policy.is_empty() {
        "default".to_string()
    } else {
        req.policy.clone()
    };
    let policy = store.policy(&policy_name)?.ok_or_else(|| {
        Status::not_found(format!(
            "no policy named `{policy_name}`; see `srctl policy list`"
        ))
    })?;
    let site = machine.site.clone();
    let ps_name = if req.process_server.is_empty() {
        if site == "onprem" {
            "ps-onprem"
        } else {
            "ps-azure"
        }
        .to_string()
    } else {
        req.process_server.clone()
    };
    let ps = store
        .component(&ps_name)?
        .filter(|c| c.role == "process-server")
        .ok_or_else(|| {
            Status::not_found(format!(
                "no process server named `{ps_name}`; see `srctl infra list`"
            ))
        })?;
    if !state.connected(&ps.name) {
        return Err(Status::failed_precondition(format!(
            "process server `{}` is not connected (ASR 806: no heartbeat from the process server); \
             start it or choose another with --process-server",
            ps.name
        )));
    }
    if let Some(h) = state.ps_health(&ps.name)
        && h.cache_health == "Critical"
    {
        return Err(Status::failed_precondition(format!(
            "process server `{}` is in critical health (cache {} of {} bytes used); choose another \
             with --process-server or let it drain",
            ps.name, h.cache_used_bytes, h.cache_capacity_bytes
        )));
    }
    let target_site = if site == "onprem" { "azure" } else { "onprem" };
    let target = store
        .list()?
        .into_iter()
        .filter(|c| c.role == "master-target" && c.site == target_site && !c.datastores.is_empty())
        .min_by_key(|c| {
            (
                c.name != "azure-target" && c.name != "mt-onprem",
                c.name.clone(),
            )
        })
        .ok_or_else(|| {
            Status::failed_precondition(format!(
                "no master target with a datastore in {target_site}"
            ))
        })?;
    if !state.connected(&target.name) {
        return Err(Status::failed_precondition(format!(
            "target `{}` is not connected (ASR 78022: no heartbeat from the master target)",
            target.name
        )));
    }
    let target_address = address_for(&target, &ps.site).ok_or_else(|| {
        Status::failed_precondition(format!(
            "target `{}` advertises no address reachable from {} (check its `advertise` config)",
            target.name, ps.site
        ))
    })?;
    let ps_address = address_for(&ps, &site).ok_or_else(|| {
        Status::failed_precondition(format!(
            "process server `{}` advertises no address reachable from {site}",
            ps.name
        ))
    })?;
    if !req.replication_group.is_empty() {
        failback_common::identity::validate_name(&req.replication_group)
            .map_err(Status::invalid_argument)?;
    }

    let item = ItemRow {
        id: store.next_item_id(&machine.name)?,
        machine: machine.name.clone(),
        direction: if site == "onprem" {
            "forward"
        } else {
            "reverse"
        }
        .into(),
        state: ENABLING.into(),
        process_server: ps.name.clone(),
        target: target.name.clone(),
        datastore: target.datastores[0].name.clone(),
        policy: policy.name.clone(),
        replication_group: req.replication_group.clone(),
        created_ms: now_ms(),
        progress: Progress::default(),
        failover_point: String::new(),
        failover_digests: Vec::new(),
        test_vm: String::new(),
        placement: Placement {
            source_host: machine.host.clone(),
            ..home_of(store, &machine)?
        },
    };
    store.insert_item(&item)?;
    let job = store.start_job("Enable protection", &item.id)?;
    let result = async {
        store.job_step(job, "Prepare the target", "In progress")?;
        state
            .command(&target.name, prepare_command(&item, &machine, &policy))
            .await?;
        store.job_step(job, "Prepare the target", "Succeeded")?;
        store.job_step(job, "Assign the process server", "In progress")?;
        state
            .command(
                &ps.name,
                command::Kind::SetRoute(SetRoute {
                    item: item.id.clone(),
                    target: target.name.clone(),
                    target_address,
                }),
            )
            .await?;
        store.job_step(job, "Assign the process server", "Succeeded")?;
        store.job_step(job, "Start replication", "In progress")?;
        state
            .command(
                &machine.name,
                start_command(&item, &ps.name, &ps_address, &policy),
            )
            .await?;
        store.job_step(job, "Start replication", "Succeeded")?;
        store.job_step(job, "Initial replication", "In progress")?;
        Ok::<(), Status>(())
    }
    .await;
    match result {
        Ok(()) => {
            store.set_item_state(&item.id, INITIAL)?;
            tracing::info!(item = %item.id, ps = %ps.name, target = %target.name, "protection enabled");
            Ok(ItemRow {
                state: INITIAL.into(),
                ..item
            })
        }
        Err(status) => {
            store.end_job(job, Some(status.message()))?;
            store.delete_item(&item.id)?;
            Err(status)
        }
    }
}

/// The on-premises location of `machine` (empty for a machine outside onprem): its host, its
/// datastore and its disks' paths relative to that datastore, as the host reported them.
pub fn home_of(store: &Store, machine: &ComponentRow) -> Result<Placement, DbError> {
    if machine.site != "onprem" || machine.host.is_empty() {
        return Ok(Placement::default());
    }
    let Some(host) = store.component(&machine.host)? else {
        return Ok(Placement::default());
    };
    let mut home = Placement {
        home_host: host.name.clone(),
        ..Placement::default()
    };
    for d in &machine.disks {
        let Some(ds) = host.datastores.iter().find(|ds| ds.name == d.datastore) else {
            return Ok(Placement::default());
        };
        let Ok(rel) = std::path::Path::new(&d.path).strip_prefix(&ds.path) else {
            return Ok(Placement::default());
        };
        home.home_datastore = ds.name.clone();
        home.home_disks
            .push((d.id.clone(), rel.display().to_string(), d.size));
    }
    Ok(home)
}

pub fn prepare_command(item: &ItemRow, machine: &ComponentRow, policy: &Policy) -> command::Kind {
    command::Kind::PrepareReplica(PrepareReplica {
        item: item.id.clone(),
        datastore: item.datastore.clone(),
        disks: machine
            .disks
            .iter()
            .map(|d| DiskInfo {
                id: d.id.clone(),
                datastore: d.datastore.clone(),
                path: d.path.clone(),
                size_bytes: d.size,
            })
            .collect(),
        retention_ms: policy.retention_s * 1000,
        seed: crate::reprotect::seed_of(item, machine),
        retention_drive: String::new(),
    })
}

pub fn start_command(item: &ItemRow, ps: &str, ps_address: &str, policy: &Policy) -> command::Kind {
    // Members of a replication group take only the tags the CS coordinates.
    let grouped = !item.replication_group.is_empty();
    command::Kind::StartReplication(StartReplication {
        item: item.id.clone(),
        process_server: ps.to_string(),
        ps_address: ps_address.to_string(),
        crash_interval_ms: if grouped {
            0
        } else {
            policy.crash_interval_s * 1000
        },
        app_interval_ms: if grouped {
            0
        } else {
            policy.app_interval_s * 1000
        },
        verify_tags: true,
        compare_initial: item.placement.seeded,
    })
}

/// An agent's progress report: stored; the first delta phase completes initial replication.
pub fn on_progress(state: &std::sync::Arc<State>, p: ItemProgress) -> Result<(), DbError> {
    let Some(item) = state.store.item(&p.item)? else {
        return Ok(());
    };
    let progress = Progress {
        phase: p.phase.clone(),
        disks: p
            .disks
            .iter()
            .map(|d| (d.id.clone(), (d.state.clone(), d.percent)))
            .collect(),
        bytes_sent: p.bytes_sent,
        bytes_per_second: p.bytes_per_second,
        acked_seq: p.acked_seq,
        resync_bytes: p.resync_bytes,
        resync_blocks_compared: p.resync_blocks_compared,
        target_seq: p.target_seq,
        lag_p50_ms: p.lag_p50_ms,
        lag_p99_ms: p.lag_p99_ms,
        ps_down_since_ms: p.ps_down_since_ms,
    };
    state.store.set_item_progress(&item.id, &progress)?;
    match (p.phase.as_str(), item.state.as_str()) {
        ("delta", INITIAL | ENABLING | REPROTECTING) => {
            state.store.set_item_state(&item.id, PROTECTED)?;
            state.store.finish_enable_job(&item.id)?;
            tracing::info!(item = %item.id, direction = %item.direction, "initial replication complete: Protected");
            if item.state == REPROTECTING {
                crate::reprotect::remove_old_replicas(state, &item);
            }
        }
        ("delta", RESYNCING | RESYNC_REQUIRED) => {
            state.store.set_item_state(&item.id, PROTECTED)?;
            tracing::info!(item = %item.id, bytes = p.resync_bytes, "resynchronization complete: Protected");
        }
        ("resync", PROTECTED | RESYNC_REQUIRED) => {
            state.store.set_item_state(&item.id, RESYNCING)?
        }
        ("resync-required", _) if item.state != RESYNC_REQUIRED => {
            tracing::warn!(item = %item.id, "tracking lost: resync required");
            state.store.set_item_state(&item.id, RESYNC_REQUIRED)?
        }
        _ => {}
    }
    Ok(())
}

/// The operator's view of an item, with RPO and health computed now.
pub fn view(state: &State, item: &ItemRow) -> Result<Item, DbError> {
    let store = &state.store;
    let points = store.points(&item.id)?;
    let policy = store.policy(&item.policy)?.unwrap_or_else(default_policy);
    let now = now_ms();
    let rpo_ms = now - points.last().map(|p| p.time_ms).unwrap_or(item.created_ms);
    let mut errors = Vec::new();
    let mut health = "Healthy";
    let mut worse = |h: &'static str, e: String| {
        if h == "Critical" || health == "Healthy" {
            health = h;
        }
        errors.push(e);
    };
    if !state.connected(&item.machine) {
        worse(
            "Critical",
            format!("78174: no heartbeat from source machine {}", item.machine),
        );
    }
    if !state.connected(&item.process_server) {
        worse(
            "Critical",
            format!(
                "806: no heartbeat from process server {}",
                item.process_server
            ),
        );
    } else if state.connected(&item.machine)
        && item.progress.ps_down_since_ms > 0
        && now - item.progress.ps_down_since_ms > PS_UNREACHABLE_AFTER_MS
    {
        // Both talk to the CS, but the machine's data can't reach its process server.
        worse(
            "Critical",
            format!(
                "78186: process server {} is unreachable from {} for {:.0} s",
                item.process_server,
                item.machine,
                (now - item.progress.ps_down_since_ms) as f64 / 1000.0
            ),
        );
    } else if let Some(ps) = state.ps_health(&item.process_server) {
        // The process server's own trouble (cache filling, throttling, not uploading).
        let (h, errors) = crate::operator::component_health(
            "process-server",
            &item.process_server,
            true,
            Some(&ps),
        );
        for e in errors {
            worse(
                if h == "Critical" {
                    "Critical"
                } else {
                    "Warning"
                },
                format!("process server {}: {e}", item.process_server),
            );
        }
    }
    if !state.connected(&item.target) {
        worse(
            "Critical",
            format!("78022: no heartbeat from master target {}", item.target),
        );
    }
    if item.state == PROTECTED && rpo_ms as u64 > policy.rpo_threshold_s * 1000 {
        worse(
            // Twice over the threshold is critical.
            if rpo_ms as u64 > 2 * policy.rpo_threshold_s * 1000 {
                "Critical"
            } else {
                "Warning"
            },
            format!(
                "RPO {:.0} s is over the policy threshold of {} s",
                rpo_ms as f64 / 1000.0,
                policy.rpo_threshold_s
            ),
        );
    }
    let machine = store.component(&item.machine)?;
    let disks = machine
        .map(|m| m.disks)
        .unwrap_or_default()
        .into_iter()
        .map(|d| {
            let (st, pct) = item
                .progress
                .disks
                .get(&d.id)
                .cloned()
                .unwrap_or_else(|| ("In queue".into(), 0.0));
            ItemDisk {
                id: d.id,
                size_bytes: d.size,
                state: st,
                percent: pct,
            }
        })
        .collect::<Vec<_>>();
    let initial_percent = if disks.is_empty() {
        0.0
    } else {
        disks.iter().map(|d| d.percent).sum::<f64>() / disks.len() as f64
    };
    Ok(Item {
        id: item.id.clone(),
        machine: item.machine.clone(),
        direction: item.direction.clone(),
        state: item.state.clone(),
        health: health.into(),
        health_errors: errors,
        process_server: item.process_server.clone(),
        target: item.target.clone(),
        policy: item.policy.clone(),
        replication_group: item.replication_group.clone(),
        rpo_seconds: rpo_ms.max(0) as f64 / 1000.0,
        disks,
        points,
        bytes_replicated: item.progress.bytes_sent,
        bytes_per_second: item.progress.bytes_per_second,
        initial_percent,
        created_ms: item.created_ms,
        acked_seq: item.progress.acked_seq,
        resync_bytes: item.progress.resync_bytes,
        resync_blocks_compared: item.progress.resync_blocks_compared,
        target_seq: item.progress.target_seq,
        lag_p50_ms: item.progress.lag_p50_ms,
        lag_p99_ms: item.progress.lag_p99_ms,
    })
}

/// Coordinates the tags of replication groups: every member gets the same tag id at the
/// policy's intervals (multi-VM crash- and app-consistent points), so they share points.
/// How long members of a replication group may hold their writes for a multi-VM point: the
/// barrier must complete within it, or the point is abandoned.
const GROUP_HOLD: std::time::Duration = std::time::Duration::from_secs(3);

/// One multi-VM point, ASR's distributed consistency as a two-phase barrier: every member
/// holds its writes (phase one); only when all hold does each take the tag `id`, which ends
/// its hold (phase two). No write of any member completes between the first tag and the last,
/// so the members' points form one consistent cut. If a member cannot hold in time, the others
/// are released and no member gets the point (a partial multi-VM point would claim a
/// consistency it does not have).
async fn group_point(state: &State, group: &str, members: &[ItemRow], id: &str, kind: &str) {
    use failback_proto::pb::control::{HoldWrites, MakeTag, ReleaseWrites};
    let holds = members.iter().map(|m| {
        let hold = state.command(
            &m.machine,
            command::Kind::HoldWrites(HoldWrites {
                item: m.id.clone(),
                id: id.to_string(),
                max_ms: GROUP_HOLD.as_millis() as u32,
            }),
        );
        async move {
            match tokio::time::timeout(GROUP_HOLD, hold).await {
                Ok(r) => r.map(|_| ()).map_err(|e| e.message().to_string()),
                Err(_) => Err(format!(
                    "`{}` did not hold its writes within {GROUP_HOLD:?}",
                    m.machine
                )),
            }
        }
    });
    let held = futures::future::join_all(holds).await;
    if let Some(e) = held.iter().find_map(|r| r.as_ref().err()) {
        tracing::warn!(%group, "{kind} point {id} abandoned: {e}");
        let releases = members
            .iter()
            .zip(&held)
            .filter(|(_, r)| r.is_ok())
            .map(|(m, _)| {
                state.command(
                    &m.machine,
                    command::Kind::ReleaseWrites(ReleaseWrites {
                        item: m.id.clone(),
                        id: id.to_string(),
                    }),
                )
            });
        futures::future::join_all(releases).await;
        return;
    }
    let tags = members.iter().map(|m| {
        state.command(
            &m.machine,
            command::Kind::MakeTag(MakeTag {
                item: m.id.clone(),
                id: id.to_string(),
                kind: kind.to_string(),
            }),
        )
    });
    for (m, r) in members.iter().zip(futures::future::join_all(tags).await) {
        if let Err(e) = r {
            tracing::warn!(%group, machine = %m.machine, "{kind} tag {id}: {}", e.message());
        }
    }
}

pub async fn group_tagger(state: std::sync::Arc<State>, stop: tokio_util::sync::CancellationToken) {
    let mut last: std::collections::HashMap<(String, &'static str), i64> = Default::default();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let Ok(items) = state.store.items() else {
            continue;
        };
        let mut groups: BTreeMap<String, Vec<ItemRow>> = BTreeMap::new();
        for i in items
            .into_iter()
            .filter(|i| !i.replication_group.is_empty() && i.state == PROTECTED)
        {
            groups
                .entry(i.replication_group.clone())
                .or_default()
                .push(i);
        }
        let now = now_ms();
        for (group, members) in groups {
            let policy = state
                .store
                .policy(&members[0].policy)
                .ok()
                .flatten()
                .unwrap_or_else(default_policy);
            for (kind, every_s) in [
                ("multi-vm-crash", policy.crash_interval_s),
                ("multi-vm-app", policy.app_interval_s),
            ] {
                if every_s == 0 {
                    continue;
                }
                let key = (group.clone(), kind);
                if last
                    .get(&key)
                    .is_some_and(|t| now - t < every_s as i64 * 1000)
                {
                    continue;
                }
                last.insert(key, now);
                let id = format!(
                    "{}-{group}-{now}",
                    if kind == "multi-vm-app" { "mva" } else { "mvc" }
                );
                group_point(&state, &group, &members, &id, kind).await;
            }
        }
    }
}
