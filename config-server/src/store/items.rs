//! Policies, replicated items and their recovery points.
//!
//! An item's state changes only through [`Db::transition`], which reads the current state
//! and applies [`ItemState::transition`] in the same transaction.

use failback_common::identity::Role;
use failback_proto::pb::control::PointAdded;
use failback_proto::pb::operator::{Point, Policy, Verification};
use rusqlite::{OptionalExtension, params};

use super::{Db, DbError};
use crate::item::{
    ItemParties, ItemRow, ItemState, Placement, Progress, TransitionError, failback_twin,
};

/// Why an item's state could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Refused(#[from] TransitionError),
    #[error("no replicated item `{0}`")]
    NoItem(String),
}

impl From<rusqlite::Error> for StateError {
    fn from(e: rusqlite::Error) -> Self {
        StateError::Db(e.into())
    }
}

impl From<StateError> for tonic::Status {
    fn from(e: StateError) -> Self {
        match e {
            StateError::Db(e) => e.into(),
            StateError::Refused(e) => e.into(),
            StateError::NoItem(id) => {
                tonic::Status::not_found(format!("no replicated item `{id}`"))
            }
        }
    }
}

fn policy_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Policy> {
    Ok(Policy {
        name: r.get(0)?,
        rpo_threshold_s: r.get::<_, i64>(1)? as u64,
        retention_s: r.get::<_, i64>(2)? as u64,
        crash_interval_s: r.get::<_, i64>(3)? as u64,
        app_interval_s: r.get::<_, i64>(4)? as u64,
        failback_of: r.get(5)?,
        verification: verification_from_label(&r.get::<_, String>(6)?)
            .ok_or_else(|| bad_label(6, "unknown verification mode".into()))?
            as i32,
    })
}

/// How a verification mode is stored.
fn verification_label(v: i32) -> &'static str {
    match Verification::try_from(v) {
        Ok(Verification::Off) => "off",
        _ => "digests",
    }
}

fn verification_from_label(s: &str) -> Option<Verification> {
    match s {
        "digests" => Some(Verification::Digests),
        "off" => Some(Verification::Off),
        _ => None,
    }
}

const ITEM_COLUMNS: &str = "id, machine, direction, state, process_server, target, datastore, policy, \
                            replication_group, created_ms, progress, failover_point, failover_digests, test_vm, \
                            placement";

/// A stored text that is not one of the enum's labels (a database edited by hand).
fn bad_label(col: usize, e: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(col, rusqlite::types::Type::Text, e.into())
}

fn item_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ItemRow> {
    let progress: String = r.get(10)?;
    let direction: String = r.get(2)?;
    let state: String = r.get(3)?;
    Ok(ItemRow {
        id: r.get(0)?,
        machine: r.get(1)?,
        direction: direction.parse().map_err(|e| bad_label(2, e))?,
        state: state.parse().map_err(|e| bad_label(3, e))?,
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

impl Db<'_> {
    pub fn policies(&self) -> Result<Vec<Policy>, DbError> {
        let mut stmt = self.c.prepare_cached(
            "SELECT name, rpo_threshold_s, retention_s, crash_interval_s, app_interval_s, failback_of,
                    verification
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

    /// Inserts (or replaces) a policy together with its failback twin.
    pub fn put_policy_with_twin(&self, p: &Policy) -> Result<(), DbError> {
        for p in [p.clone(), failback_twin(p)] {
            self.c.execute(
                "INSERT INTO policies(name, rpo_threshold_s, retention_s, crash_interval_s, app_interval_s, failback_of,
                                      verification)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT(name) DO UPDATE SET rpo_threshold_s = excluded.rpo_threshold_s,
                   retention_s = excluded.retention_s, crash_interval_s = excluded.crash_interval_s,
                   app_interval_s = excluded.app_interval_s, failback_of = excluded.failback_of,
                   verification = excluded.verification",
                params![
                    p.name,
                    p.rpo_threshold_s as i64,
                    p.retention_s as i64,
                    p.crash_interval_s as i64,
                    p.app_interval_s as i64,
                    p.failback_of,
                    verification_label(p.verification)
                ],
            )?;
        }
        Ok(())
    }

    /// Every active item, by machine.
    pub fn items(&self) -> Result<Vec<ItemRow>, DbError> {
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {ITEM_COLUMNS} FROM items WHERE active = 1 ORDER BY machine, created_ms"
        ))?;
        let rows = stmt
            .query_map([], item_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// The active items a component of `role` named `name` takes part in (as their machine,
    /// process server or target), by machine: what it is re-sent when it connects. After a CS
    /// restart every component connects at once, and all items read and parsed for each of
    /// them was a million rows for 1,000 machines.
    pub fn items_of_party(&self, role: Role, name: &str) -> Result<Vec<ItemRow>, DbError> {
        let column = match role {
            Role::Agent => "machine",
            Role::ProcessServer => "process_server",
            Role::MasterTarget => "target",
            _ => return Ok(Vec::new()),
        };
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {ITEM_COLUMNS} FROM items WHERE active = 1 AND {column} = ?1
             ORDER BY machine, created_ms"
        ))?;
        let rows = stmt
            .query_map([name], item_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// The active items in a replication group (what the group tagger reads 4 times a second:
    /// all items would be a thousand rows parsed each time).
    pub fn grouped_items(&self) -> Result<Vec<ItemRow>, DbError> {
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {ITEM_COLUMNS} FROM items WHERE active = 1 AND replication_group != ''
             ORDER BY machine, created_ms"
        ))?;
        let rows = stmt
            .query_map([], item_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    pub fn item(&self, id: &str) -> Result<Option<ItemRow>, DbError> {
        Ok(self
            .c
            .prepare_cached(&format!("SELECT {ITEM_COLUMNS} FROM items WHERE id = ?1"))?
            .query_row([id], item_from_row)
            .optional()?)
    }

    /// Who takes part in item `id` and its state (one keyed read, nothing parsed but those).
    pub fn item_parties(&self, id: &str) -> Result<Option<ItemParties>, DbError> {
        Ok(self
            .c
            .prepare_cached(
                "SELECT id, machine, direction, state, process_server, target FROM items WHERE id = ?1",
            )?
            .query_row([id], |r| {
                Ok(ItemParties {
                    id: r.get(0)?,
                    machine: r.get(1)?,
                    direction: r.get::<_, String>(2)?.parse().map_err(|e| bad_label(2, e))?,
                    state: r.get::<_, String>(3)?.parse().map_err(|e| bad_label(3, e))?,
                    process_server: r.get(4)?,
                    target: r.get(5)?,
                })
            })
            .optional()?)
    }

    /// The active item of a machine, if it has one.
    pub fn item_of_machine(&self, machine: &str) -> Result<Option<ItemRow>, DbError> {
        Ok(self
            .c
            .query_row(
                &format!(
                    "SELECT {ITEM_COLUMNS} FROM items WHERE machine = ?1 AND active = 1
                     ORDER BY created_ms DESC LIMIT 1"
                ),
                [machine],
                item_from_row,
            )
            .optional()?)
    }

    /// Every item of `machine`, newest first, active or not.
    pub fn items_of_machine(&self, machine: &str) -> Result<Vec<ItemRow>, DbError> {
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {ITEM_COLUMNS} FROM items WHERE machine = ?1 ORDER BY created_ms DESC"
        ))?;
        let rows = stmt
            .query_map([machine], item_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    pub fn insert_item(&self, item: &ItemRow) -> Result<(), DbError> {
        self.c.execute(
            "INSERT INTO items(id, machine, direction, state, process_server, target, datastore, policy,
                               replication_group, created_ms, placement)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                item.id,
                item.machine,
                item.direction.as_str(),
                item.state.as_str(),
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

    /// Deletes an item and its points (they cascade).
    pub fn delete_item(&self, id: &str) -> Result<(), DbError> {
        self.c.execute("DELETE FROM items WHERE id = ?1", [id])?;
        Ok(())
    }

    pub fn set_item_active(&self, id: &str, active: bool) -> Result<(), DbError> {
        self.c.execute(
            "UPDATE items SET active = ?2 WHERE id = ?1",
            params![id, active as i64],
        )?;
        Ok(())
    }

    /// Moves an item to another process server ("Switch process server").
    pub fn set_item_process_server(&self, id: &str, ps: &str) -> Result<(), DbError> {
        self.c.execute(
            "UPDATE items SET process_server = ?2 WHERE id = ?1",
            params![id, ps],
        )?;
        Ok(())
    }

    /// Records that `ps` still holds a route for `item` it no longer serves (it was down when
    /// the item was switched away from it).
    pub fn add_stale_route(&self, ps: &str, item: &str) -> Result<(), DbError> {
        self.c.execute(
            "INSERT OR IGNORE INTO stale_routes(process_server, item) VALUES (?1, ?2)",
            params![ps, item],
        )?;
        Ok(())
    }

    /// The items `ps` holds stale routes for.
    pub fn stale_routes(&self, ps: &str) -> Result<Vec<String>, DbError> {
        let mut stmt = self
            .c
            .prepare("SELECT item FROM stale_routes WHERE process_server = ?1 ORDER BY item")?;
        let rows = stmt.query_map([ps], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn remove_stale_route(&self, ps: &str, item: &str) -> Result<(), DbError> {
        self.c.execute(
            "DELETE FROM stale_routes WHERE process_server = ?1 AND item = ?2",
            params![ps, item],
        )?;
        Ok(())
    }

    pub fn set_placement(&self, id: &str, placement: &Placement) -> Result<(), DbError> {
        self.c.execute(
            "UPDATE items SET placement = ?2 WHERE id = ?1",
            params![
                id,
                serde_json::to_string(placement).unwrap_or_else(|_| "{}".into())
            ],
        )?;
        Ok(())
    }

    /// The one way an item's state changes: refused (nothing written) unless the state
    /// machine allows it from the state the item is in now. Returns the state it left.
    pub fn transition(&self, id: &str, to: ItemState) -> Result<ItemState, StateError> {
        let from: String = self
            .c
            .prepare_cached("SELECT state FROM items WHERE id = ?1")?
            .query_row([id], |r| r.get(0))
            .optional()?
            .ok_or_else(|| StateError::NoItem(id.to_string()))?;
        let from: ItemState = from.parse().map_err(|e| bad_label(3, e))?;
        from.transition(id, to)?;
        self.c
            .prepare_cached("UPDATE items SET state = ?2 WHERE id = ?1")?
            .execute(params![id, to.as_str()])?;
        Ok(from)
    }

    pub fn set_item_progress(&self, id: &str, progress: &Progress) -> Result<(), DbError> {
        let json = serde_json::to_string(progress).unwrap_or_else(|_| "{}".into());
        self.c
            .prepare_cached("UPDATE items SET progress = ?2 WHERE id = ?1")?
            .execute(params![id, json])?;
        Ok(())
    }

    pub fn set_failover(
        &self,
        id: &str,
        point: &str,
        digests: &[(String, String)],
    ) -> Result<(), DbError> {
        self.c.execute(
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
        self.c.execute(
            "UPDATE items SET test_vm = ?2 WHERE id = ?1",
            params![id, vm],
        )?;
        Ok(())
    }

    /// The next item id of `machine` (`MACHINE-N`). Never reused, not even after a failed
    /// attempt was rolled back: process servers, targets and agents key state by item id.
    pub fn next_item_id(&self, machine: &str) -> Result<String, DbError> {
        let key = format!("item-counter:{machine}");
        let stored: Option<i64> = self
            .c
            .query_row("SELECT value FROM settings WHERE key = ?1", [&key], |r| {
                r.get::<_, String>(0)
            })
            .optional()?
            .and_then(|v| v.parse().ok());
        let rows: i64 = self.c.query_row(
            "SELECT COUNT(*) FROM items WHERE machine = ?1",
            [machine],
            |r| r.get(0),
        )?;
        let n = stored.unwrap_or(0).max(rows) + 1;
        self.put_setting(&key, &n.to_string())?;
        Ok(format!("{machine}-{n}"))
    }

    pub fn clear_points(&self, item: &str) -> Result<(), DbError> {
        self.c
            .execute("DELETE FROM recovery_points WHERE item = ?1", [item])?;
        Ok(())
    }

    pub fn add_point(&self, p: &PointAdded) -> Result<(), DbError> {
        self.c
            .prepare_cached(
                "INSERT OR IGNORE INTO recovery_points(item, id, seq, time_ms, kind) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![p.item, p.id, p.seq as i64, p.time_ms, p.kind])?;
        Ok(())
    }

    pub fn remove_points(&self, item: &str, ids: &[String]) -> Result<(), DbError> {
        let mut stmt = self
            .c
            .prepare_cached("DELETE FROM recovery_points WHERE item = ?1 AND id = ?2")?;
        for id in ids {
            stmt.execute(params![item, id])?;
        }
        Ok(())
    }

    /// Every item's recovery points, oldest first, by item, in one query.
    pub fn points_by_item(&self) -> Result<std::collections::HashMap<String, Vec<Point>>, DbError> {
        let mut stmt = self.c.prepare_cached(
            "SELECT item, id, time_ms, kind, seq FROM recovery_points ORDER BY item, seq",
        )?;
        super::grouped(stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                Point {
                    id: r.get(1)?,
                    time_ms: r.get(2)?,
                    kind: r.get(3)?,
                    seq: r.get::<_, i64>(4)? as u64,
                },
            ))
        })?)
    }

    /// The item's recovery points, oldest first.
    pub fn points(&self, item: &str) -> Result<Vec<Point>, DbError> {
        let mut stmt = self.c.prepare_cached(
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
}

#[cfg(test)]
mod tests {
    use crate::item::{ItemRow, ItemState};
    use crate::store::{StateError, Store};

    fn item(id: &str, state: ItemState) -> ItemRow {
        ItemRow::sample(id, state)
    }

    #[test]
    fn an_impossible_transition_is_refused_and_the_item_is_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("cs.db")).expect("open");
        store
            .call_blocking(|db| db.insert_item(&item("vm1-1", ItemState::Protected)))
            .expect("insert");
        let refused = store
            .call_blocking(|db| Ok(db.transition("vm1-1", ItemState::FailoverCommitted)))
            .expect("db");
        match refused {
            Err(StateError::Refused(e)) => assert_eq!(
                e.to_string(),
                "`vm1-1` is Protected: it can't become Failover committed"
            ),
            other => panic!("expected a refusal, got {other:?}"),
        }
        let state = store
            .call_blocking(|db| Ok(db.item("vm1-1")?.map(|i| i.state)))
            .expect("read");
        assert_eq!(state, Some(ItemState::Protected));
        // An allowed one is written, and returns the state it left.
        let from = store
            .call_blocking(|db| Ok(db.transition("vm1-1", ItemState::FailoverInProgress)))
            .expect("db")
            .expect("allowed");
        assert_eq!(from, ItemState::Protected);
        let missing = store
            .call_blocking(|db| Ok(db.transition("vm9-1", ItemState::Protected)))
            .expect("db");
        assert!(matches!(missing, Err(StateError::NoItem(_))));
    }

    #[test]
    fn a_component_is_re_sent_only_the_items_it_takes_part_in() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("cs.db")).expect("open");
        let mut other = item("vm2-1", ItemState::Protected);
        other.machine = "vm2".into();
        other.process_server = "ps-azure".into();
        store
            .call_blocking(move |db| {
                db.insert_item(&item("vm1-1", ItemState::Protected))?;
                db.insert_item(&other)
            })
            .expect("insert");
        let ids = |role, name: &'static str| {
            store
                .call_blocking(move |db| db.items_of_party(role, name))
                .expect("read")
                .into_iter()
                .map(|i| i.id)
                .collect::<Vec<_>>()
        };
        use failback_common::identity::Role;
        assert_eq!(ids(Role::Agent, "vm1"), ["vm1-1"]);
        assert_eq!(ids(Role::ProcessServer, "ps-azure"), ["vm2-1"]);
        assert_eq!(ids(Role::MasterTarget, "azure-target"), ["vm1-1", "vm2-1"]);
        assert!(
            ids(Role::Host, "vm1").is_empty(),
            "a host takes part in no item"
        );
    }

    #[test]
    fn a_failing_call_rolls_back_alone_in_a_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = std::sync::Arc::new(Store::open(&dir.path().join("cs.db")).expect("open"));
        // Many callers at once: their closures share transactions; one that fails after
        // writing leaves nothing, the others commit.
        let handles: Vec<_> = (0..40)
            .map(|n| {
                let store = store.clone();
                std::thread::spawn(move || {
                    store.call_blocking(move |db| {
                        db.insert_item(&item(&format!("vm1-{n}"), ItemState::Protected))?;
                        if n % 10 == 3 {
                            // Fails after its insert: the insert must be rolled back.
                            db.insert_item(&item(&format!("vm1-{n}"), ItemState::Protected))?;
                        }
                        Ok(())
                    })
                })
            })
            .collect();
        let failed = handles
            .into_iter()
            .map(|h| h.join().expect("join"))
            .filter(Result::is_err)
            .count();
        assert_eq!(failed, 4);
        let ids: Vec<String> = store
            .call_blocking(|db| Ok(db.items()?.into_iter().map(|i| i.id).collect()))
            .expect("items");
        assert_eq!(ids.len(), 36, "{ids:?}");
        assert!(!ids.iter().any(|i| i.ends_with("-3") || i.ends_with("-13")));
    }
}
