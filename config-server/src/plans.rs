//! Recovery plans: up to 100 machines in up to 7 groups. Groups fail over in order, the
//! machines of a group in parallel; each machine's failover is its own job, and the plan's job
//! has one step per group. Multi-VM point options pick, for the members of a replication
//! group, the newest point they all share; a custom point is refused for a plan (ASR).
//! Reprotect through a plan ([`reprotect`]) is how replication groups are reprotected: every
//! member in the plan, all with the same options and master target, every precondition of
//! every machine checked before any of them changes.

use std::collections::BTreeMap;
use std::sync::Arc;

use failback_common::control::now_ms;
use failback_proto::pb::operator::{
    FailoverRequest, Job, Plan, PlanFailoverRequest, PlanMember, PlanReprotectRequest,
    PlanReprotectResponse, ReprotectRequest,
};
use rusqlite::{OptionalExtension, params};
use tonic::Status;

use crate::db::{DbError, Store};
use crate::state::State;

pub const MAX_MACHINES: usize = 100;
pub const MAX_GROUPS: u32 = 7;

impl Store {
    pub fn create_plan(&self, name: &str) -> Result<bool, DbError> {
        let n = self.conn().execute(
            "INSERT OR IGNORE INTO plans(name, created_ms) VALUES (?1, ?2)",
            params![name, now_ms()],
        )?;
        Ok(n > 0)
    }

    pub fn plan_exists(&self, name: &str) -> Result<bool, DbError> {
        Ok(self
            .conn()
            .query_row("SELECT 1 FROM plans WHERE name = ?1", [name], |_| Ok(()))
            .optional()?
            .is_some())
    }

    pub fn add_plan_member(&self, plan: &str, machine: &str, group: u32) -> Result<(), DbError> {
        self.conn().execute(
            "INSERT INTO plan_members(plan, machine, grp) VALUES (?1, ?2, ?3)
             ON CONFLICT(plan, machine) DO UPDATE SET grp = excluded.grp",
            params![plan, machine, group],
        )?;
        Ok(())
    }

    /// (machine, group), by group then machine.
    pub fn plan_members(&self, plan: &str) -> Result<Vec<(String, u32)>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT machine, grp FROM plan_members WHERE plan = ?1 ORDER BY grp, machine",
        )?;
        let rows = stmt
            .query_map([plan], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }
}

pub fn show(state: &State, name: &str) -> Result<Plan, Status> {
    if !state.store.plan_exists(name)? {
        return Err(Status::not_found(format!(
            "no recovery plan `{name}`; create it with `srctl plan create {name}`"
        )));
    }
    let members = state
        .store
        .plan_members(name)?
        .into_iter()
        .map(|(machine, group)| {
            let item = state.store.item_of_machine(&machine).ok().flatten();
            PlanMember {
                plan: name.to_string(),
                state: item
                    .as_ref()
                    .map(|i| i.state.clone())
                    .unwrap_or_else(|| "not protected".into()),
                replication_group: item.map(|i| i.replication_group).unwrap_or_default(),
                machine,
                group,
            }
        })
        .collect();
    Ok(Plan {
        name: name.to_string(),
        members,
    })
}

pub fn add(state: &State, m: &PlanMember) -> Result<Plan, Status> {
    if !state.store.plan_exists(&m.plan)? {
        return Err(Status::not_found(format!("no recovery plan `{}`", m.plan)));
    }
    if !(1..=MAX_GROUPS).contains(&m.group) {
        return Err(Status::invalid_argument(format!(
            "group {} is out of range: a recovery plan has groups 1 to {MAX_GROUPS}",
            m.group
        )));
    }
    if state.store.item_of_machine(&m.machine)?.is_none() {
        return Err(Status::failed_precondition(format!(
            "`{}` is not replicated: only replicated items can join a recovery plan",
            m.machine
        )));
    }
    let members = state.store.plan_members(&m.plan)?;
    if members.len() >= MAX_MACHINES && !members.iter().any(|(x, _)| x == &m.machine) {
        return Err(Status::failed_precondition(format!(
            "recovery plan `{}` already has {MAX_MACHINES} machines, the most a plan can hold",
            m.plan
        )));
    }
    state.store.add_plan_member(&m.plan, &m.machine, m.group)?;
    show(state, &m.plan)
}

/// The newest point id shared by every item of `machines` (multi-VM points), `app` for
/// app-consistent ones only.
fn shared_point(state: &State, machines: &[String], app: bool) -> Result<Option<String>, Status> {
    let mut common: Option<Vec<(String, u64)>> = None;
    for m in machines {
        let item = state
            .store
            .item_of_machine(m)?
            .ok_or_else(|| Status::failed_precondition(format!("`{m}` is not replicated")))?;
        let pts: Vec<(String, u64)> = state
            .store
            .points(&item.id)?
            .into_iter()
            .filter(|p| p.kind.starts_with("multi-vm") && (!app || p.kind.ends_with("app")))
            .map(|p| (p.id, p.seq))
            .collect();
        common = Some(match common {
            None => pts,
            Some(c) => c
                .into_iter()
                .filter(|(id, _)| pts.iter().any(|(x, _)| x == id))
                .collect(),
        });
    }
    Ok(common
        .and_then(|c| c.into_iter().max_by_key(|(_, s)| *s))
        .map(|(id, _)| id))
}

/// The plan's machines by plan group, groups in order.
fn machines_by_group(plan: &Plan) -> BTreeMap<u32, Vec<String>> {
    let mut by_group: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for m in &plan.members {
        by_group.entry(m.group).or_default().push(m.machine.clone());
    }
    by_group
}

/// Runs an action over the plan, group after group; machines of a group in parallel.
pub async fn run(state: &Arc<State>, req: PlanFailoverRequest) -> Result<Job, Status> {
    let plan = show(state, &req.plan)?;
    if plan.members.is_empty() {
        return Err(Status::failed_precondition(format!(
            "recovery plan `{}` has no machines",
            req.plan
        )));
    }
    let point = if req.point.is_empty() {
        "latest".to_string()
    } else {
        req.point.clone()
    };
    let multi = match point.as_str() {
        "latest" | "latest-processed" | "latest-app-consistent" => None,
        "latest-multi-vm-processed" => Some(false),
        "latest-multi-vm-app-consistent" => Some(true),
        other => {
            return Err(Status::invalid_argument(format!(
                "a custom recovery point (`{other}`) can't be used for a recovery plan; choose latest, \
                 latest-processed, latest-app-consistent, latest-multi-vm-processed or \
                 latest-multi-vm-app-consistent"
            )));
        }
    };
    let action = if req.action.is_empty() {
        "failover"
    } else {
        req.action.as_str()
    };
    let (job_name, kind) = match action {
        "failover" => ("Plan failover", "unplanned"),
        "test-failover" => ("Plan test failover", "test"),
        "commit" => ("Plan commit", "commit"),
        "test-failover-cleanup" => ("Plan test failover cleanup", "cleanup"),
        other => {
            return Err(Status::invalid_argument(format!(
                "unknown plan action `{other}`"
            )));
        }
    };
    // Multi-VM options: each replication group's newest shared point, resolved up front.
    let mut point_of: BTreeMap<String, String> = BTreeMap::new();
    if let Some(app) = multi {
        let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for m in &plan.members {
            if m.replication_group.is_empty() {
                point_of.insert(
                    m.machine.clone(),
                    if app {
                        "latest-app-consistent"
                    } else {
                        "latest-processed"
                    }
                    .into(),
                );
            } else {
                groups
                    .entry(m.replication_group.clone())
                    .or_default()
                    .push(m.machine.clone());
            }
        }
        for (group, machines) in groups {
            let id = shared_point(state, &machines, app)?.ok_or_else(|| {
                Status::failed_precondition(format!(
                    "replication group `{group}` has no shared multi-VM point yet"
                ))
            })?;
            for m in machines {
                point_of.insert(m, id.clone());
            }
        }
    }

    let store = &state.store;
    let job = store.start_job(
        &format!("{job_name} {}", req.plan),
        &format!("plan:{}", req.plan),
    )?;
    let by_group = machines_by_group(&plan);
    for (group, machines) in by_group {
        let step = format!("Group {group}: {}", machines.join(", "));
        store.job_step(job, &step, "In progress")?;
        let runs = machines.iter().map(|m| {
            let state = state.clone();
            let m = m.clone();
            let point = point_of.get(&m).cloned().unwrap_or_else(|| point.clone());
            let shutdown = req.shutdown;
            async move {
                match kind {
                    "commit" => crate::failover::commit(&state, &m).await.map(|_| ()),
                    "cleanup" => crate::failover::cleanup_test(&state, &m).await.map(|_| ()),
                    _ => crate::failover::failover(
                        &state,
                        FailoverRequest {
                            machine: m.clone(),
                            point,
                            shutdown,
                            kind: kind.to_string(),
                            sync: String::new(),
                        },
                    )
                    .await
                    .map(|_| ()),
                }
                .map_err(|e| format!("{m}: {}", e.message()))
            }
        });
        let errors: Vec<String> = futures::future::join_all(runs)
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect();
        if !errors.is_empty() {
            store.job_step(job, &step, "Failed")?;
            let msg = format!(
                "group {group} failed, later groups not started: {}",
                errors.join("; ")
            );
            store.end_job(job, Some(&msg))?;
            return Err(Status::failed_precondition(msg));
        }
        store.job_step(job, &step, "Succeeded")?;
    }
    store.end_job(job, None)?;
    store
        .jobs(job)?
        .into_iter()
        .next()
        .ok_or_else(|| Status::internal("job vanished"))
}

/// Reprotects every machine of the plan with the same options: each replication group of a
/// member must be wholly in the plan, and every machine's preconditions must hold (else
/// nothing changes). The plan's job has a step per group and ends once every machine's
/// "Reprotect" job started; those end as their items become Protected.
pub async fn reprotect(
    state: &Arc<State>,
    req: PlanReprotectRequest,
) -> Result<PlanReprotectResponse, Status> {
    let plan = show(state, &req.plan)?;
    if plan.members.is_empty() {
        return Err(Status::failed_precondition(format!(
            "recovery plan `{}` has no machines",
            req.plan
        )));
    }
    let options = req.options.unwrap_or_default();
    let in_plan: Vec<&str> = plan.members.iter().map(|m| m.machine.as_str()).collect();
    let mut groups: Vec<&str> = plan
        .members
        .iter()
        .map(|m| m.replication_group.as_str())
        .filter(|g| !g.is_empty())
        .collect();
    groups.sort_unstable();
    groups.dedup();
    for group in groups {
        let missing: Vec<String> = crate::reprotect::group_members(state, group)?
            .into_iter()
            .filter(|m| !in_plan.contains(&m.as_str()))
            .collect();
        if !missing.is_empty() {
            return Err(Status::failed_precondition(format!(
                "replication group `{group}` is reprotected as a whole, but {} of it {} not in \
                 plan `{}`; add {} (`srctl plan add {} MACHINE`)",
                missing.join(", "),
                if missing.len() == 1 { "is" } else { "are" },
                req.plan,
                if missing.len() == 1 { "it" } else { "them" },
                req.plan
            )));
        }
    }
    let request = |machine: &str| ReprotectRequest {
        machine: machine.to_string(),
        ..options.clone()
    };
    let refused: Vec<String> = plan
        .members
        .iter()
        .filter_map(|m| {
            crate::reprotect::precheck(state, &request(&m.machine))
                .err()
                .map(|e| format!("{}: {}", m.machine, e.message()))
        })
        .collect();
    if !refused.is_empty() {
        return Err(Status::failed_precondition(format!(
            "plan `{}` can't be reprotected; nothing was changed: {}",
            req.plan,
            refused.join("; ")
        )));
    }

    let store = &state.store;
    let job = store.start_job(
        &format!("Plan reprotect {}", req.plan),
        &format!("plan:{}", req.plan),
    )?;
    let by_group = machines_by_group(&plan);
    let mut jobs = Vec::new();
    for (group, machines) in by_group {
        let step = format!("Group {group}: start reprotecting {}", machines.join(", "));
        store.job_step(job, &step, "In progress")?;
        let runs = machines.iter().map(|m| {
            let state = state.clone();
            let req = request(m);
            async move {
                crate::reprotect::start(&state, req)
                    .await
                    .map_err(|e| format!("{m}: {}", e.message()))
            }
        });
        let mut errors = Vec::new();
        for result in futures::future::join_all(runs).await {
            match result {
                Ok(j) => jobs.push(j),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            store.job_step(job, &step, "Failed")?;
            let msg = format!(
                "group {group}: {}; the machines already started go on, later groups were not \
                 started",
                errors.join("; ")
            );
            store.end_job(job, Some(&msg))?;
            return Err(Status::failed_precondition(msg));
        }
        store.job_step(job, &step, "Succeeded")?;
    }
    store.end_job(job, None)?;
    let plan_job = store
        .jobs(job)?
        .into_iter()
        .next()
        .ok_or_else(|| Status::internal("job vanished"))?;
    Ok(PlanReprotectResponse {
        plan_job: Some(plan_job),
        jobs,
    })
}
