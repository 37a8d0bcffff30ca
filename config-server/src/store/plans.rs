//! Recovery plans: their members (machine, group) and the manual actions and scripts that run
//! between groups.

use failback_common::control::now_ms;
use failback_proto::pb::operator::{PlanAction, plan_action};
use rusqlite::{OptionalExtension, params};

use super::{Db, DbError};

impl Db<'_> {
    pub fn create_plan(&self, name: &str) -> Result<bool, DbError> {
        let n = self.c.execute(
            "INSERT OR IGNORE INTO plans(name, created_ms) VALUES (?1, ?2)",
            params![name, now_ms()],
        )?;
        Ok(n > 0)
    }

    pub fn plan_exists(&self, name: &str) -> Result<bool, DbError> {
        Ok(self
            .c
            .query_row("SELECT 1 FROM plans WHERE name = ?1", [name], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Every plan's name.
    pub fn plan_names(&self) -> Result<Vec<String>, DbError> {
        let mut stmt = self
            .c
            .prepare_cached("SELECT name FROM plans ORDER BY name")?;
        let rows = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Deletes a plan with its members and actions; false if there was none.
    pub fn delete_plan(&self, name: &str) -> Result<bool, DbError> {
        Ok(self
            .c
            .execute("DELETE FROM plans WHERE name = ?1", [name])?
            > 0)
    }

    pub fn add_plan_member(&self, plan: &str, machine: &str, group: u32) -> Result<(), DbError> {
        self.c.execute(
            "INSERT INTO plan_members(plan, machine, grp) VALUES (?1, ?2, ?3)
             ON CONFLICT(plan, machine) DO UPDATE SET grp = excluded.grp",
            params![plan, machine, group],
        )?;
        Ok(())
    }

    /// Takes `machine` out of `plan`; false if it was not in it.
    pub fn remove_plan_member(&self, plan: &str, machine: &str) -> Result<bool, DbError> {
        Ok(self.c.execute(
            "DELETE FROM plan_members WHERE plan = ?1 AND machine = ?2",
            params![plan, machine],
        )? > 0)
    }

    /// (machine, group), by group then machine.
    pub fn plan_members(&self, plan: &str) -> Result<Vec<(String, u32)>, DbError> {
        let mut stmt = self.c.prepare_cached(
            "SELECT machine, grp FROM plan_members WHERE plan = ?1 ORDER BY grp, machine",
        )?;
        let rows = stmt
            .query_map([plan], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    pub fn add_plan_action(&self, a: &PlanAction) -> Result<(), DbError> {
        let (manual, script) = match &a.action {
            Some(plan_action::Action::Manual(m)) => (m.as_str(), ""),
            Some(plan_action::Action::Script(s)) => ("", s.as_str()),
            None => ("", ""),
        };
        self.c.execute(
            "INSERT INTO plan_actions(plan, after_group, seq, manual, script)
             VALUES (?1, ?2, (SELECT COUNT(*) FROM plan_actions WHERE plan = ?1 AND after_group = ?2), ?3, ?4)",
            params![a.plan, a.after_group, manual, script],
        )?;
        Ok(())
    }

    /// The plan's actions, by group then in the order they were added.
    pub fn plan_actions(&self, plan: &str) -> Result<Vec<PlanAction>, DbError> {
        let mut stmt = self.c.prepare_cached(
            "SELECT after_group, manual, script FROM plan_actions WHERE plan = ?1
             ORDER BY after_group, seq",
        )?;
        let rows = stmt
            .query_map([plan], |r| {
                let manual: String = r.get(1)?;
                let script: String = r.get(2)?;
                Ok(PlanAction {
                    plan: plan.to_string(),
                    after_group: r.get(0)?,
                    action: Some(if script.is_empty() {
                        plan_action::Action::Manual(manual)
                    } else {
                        plan_action::Action::Script(script)
                    }),
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }
}
