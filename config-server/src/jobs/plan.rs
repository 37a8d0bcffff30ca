//! Recovery plans: up to 100 machines in up to 7 groups. Groups fail over in order, the
//! machines of a group in parallel; each machine's failover is its own job, started by the
//! plan's job (its parent), which has one step per group. Manual actions and scripts run
//! between groups. Multi-VM point options pick, for the members of a replication group, the
//! newest point they all share; a custom point is refused for a plan (ASR).
//!
//! Every member must have a recovery point of the asked kind before anything moves. A member
//! already where the action takes it (failed over, committed, cleaned up) is skipped, so a
//! plan cut short (a restart, a failed group) completes when run again.
//!
//! Reprotect through a plan ([`start_reprotect`]) is how replication groups are reprotected:
//! every member in the plan with the same options, every precondition of every machine (and
//! the room on the master targets for all their disks) checked before any of them changes.
//! With no master target named, each replication group goes through one, and master targets
//! fill up in order (at most 60 disks each). Members already reprotected are skipped, so a
//! plan reprotect cut short completes when run again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use failback_proto::pb::operator::{
    FailoverKind, FailoverRequest, Job, Plan, PlanAction, PlanFailoverRequest, PlanMember,
    PlanReprotectRequest, PlanReprotectResponse, ReprotectRequest, plan_action,
};
use serde::{Deserialize, Serialize};
use tonic::Status;

use super::{CancelRule, Ctx, JobError, Jobs, Spec};
use crate::item::{ItemRow, ItemState, JobKind};
use crate::state::State;

pub const MAX_MACHINES: usize = 100;
pub const MAX_GROUPS: u32 = 7;
/// A script has this long to finish.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(600);

fn no_plan(name: &str) -> Status {
    Status::not_found(format!(
        "no recovery plan `{name}`; create it with `srctl plan create {name}` (see `srctl plan list`)"
    ))
}

/// A plan with its members' states and its actions.
pub async fn show(state: &State, name: &str) -> Result<Plan, Status> {
    let plan = name.to_string();
    let found = state
        .store
        .call(move |db| {
            if !db.plan_exists(&plan)? {
                return Ok(None);
            }
            let members = db
                .plan_members(&plan)?
                .into_iter()
                .map(|(machine, group)| {
                    let item = db.item_of_machine(&machine)?;
                    Ok(PlanMember {
                        plan: plan.clone(),
                        state: item
                            .as_ref()
                            .map(|i| i.state.to_string())
                            .unwrap_or_else(|| "not protected".into()),
                        replication_group: item.map(|i| i.replication_group).unwrap_or_default(),
                        machine,
                        group,
                    })
                })
                .collect::<Result<Vec<_>, crate::store::DbError>>()?;
            Ok(Some(Plan {
                name: plan.clone(),
                members,
                actions: db.plan_actions(&plan)?,
            }))
        })
        .await?;
    found.ok_or_else(|| no_plan(name))
}

/// Every plan.
pub async fn list(state: &State) -> Result<Vec<Plan>, Status> {
    let names = state.store.call(|db| db.plan_names()).await?;
    let mut plans = Vec::with_capacity(names.len());
    for n in names {
        plans.push(show(state, &n).await?);
    }
    Ok(plans)
}

pub async fn create(state: &State, name: &str) -> Result<Plan, Status> {
    failback_common::identity::validate_name(name).map_err(Status::invalid_argument)?;
    let n = name.to_string();
    if !state.store.call(move |db| db.create_plan(&n)).await? {
        return Err(Status::already_exists(format!(
            "recovery plan `{name}` exists"
        )));
    }
    show(state, name).await
}

pub async fn add(state: &State, m: PlanMember) -> Result<Plan, Status> {
    if !(1..=MAX_GROUPS).contains(&m.group) {
        return Err(Status::invalid_argument(format!(
            "group {} is out of range: a recovery plan has groups 1 to {MAX_GROUPS}",
            m.group
        )));
    }
    let plan = m.plan.clone();
    let refused = state
        .store
        .call(move |db| {
            if !db.plan_exists(&m.plan)? {
                return Ok(Some(no_plan(&m.plan)));
            }
            if db.item_of_machine(&m.machine)?.is_none() {
                return Ok(Some(Status::failed_precondition(format!(
                    "`{}` is not replicated: only replicated items can join a recovery plan",
                    m.machine
                ))));
            }
            let members = db.plan_members(&m.plan)?;
            if members.len() >= MAX_MACHINES && !members.iter().any(|(x, _)| x == &m.machine) {
                return Ok(Some(Status::failed_precondition(format!(
                    "recovery plan `{}` already has {MAX_MACHINES} machines, the most a plan can hold",
                    m.plan
                ))));
            }
            db.add_plan_member(&m.plan, &m.machine, m.group)?;
            Ok(None)
        })
        .await?;
    if let Some(s) = refused {
        return Err(s);
    }
    show(state, &plan).await
}

/// `plan remove P MACHINE`: takes a machine out of a plan (its replication is untouched).
pub async fn remove(state: &State, m: PlanMember) -> Result<Plan, Status> {
    let (plan, machine) = (m.plan.clone(), m.machine.clone());
    let found = state
        .store
        .call(move |db| {
            if !db.plan_exists(&plan)? {
                return Ok(None);
            }
            Ok(Some(db.remove_plan_member(&plan, &machine)?))
        })
        .await?;
    match found {
        None => Err(no_plan(&m.plan)),
        Some(false) => Err(Status::not_found(format!(
            "`{}` is not in recovery plan `{}`; see `srctl plan show {}`",
            m.machine, m.plan, m.plan
        ))),
        Some(true) => show(state, &m.plan).await,
    }
}

/// `plan delete P`: the plan goes; its machines stay protected.
pub async fn delete(state: &State, name: &str) -> Result<(), Status> {
    let n = name.to_string();
    let running = state
        .store
        .call(move |db| db.running_job(&format!("plan:{n}")))
        .await?;
    if let Some((id, job)) = running {
        return Err(Status::failed_precondition(format!(
            "job {id} ({job}) runs plan `{name}`; wait for it or cancel it first"
        )));
    }
    let n = name.to_string();
    if !state.store.call(move |db| db.delete_plan(&n)).await? {
        return Err(no_plan(name));
    }
    Ok(())
}

/// `plan add-action`: a manual action or a script after a group.
pub async fn add_action(state: &State, a: PlanAction) -> Result<Plan, Status> {
    if !(1..=MAX_GROUPS).contains(&a.after_group) {
        return Err(Status::invalid_argument(format!(
            "--after-group {} is out of range: a recovery plan has groups 1 to {MAX_GROUPS}",
            a.after_group
        )));
    }
    match &a.action {
        Some(plan_action::Action::Manual(m)) if !m.trim().is_empty() => {}
        Some(plan_action::Action::Script(s)) => {
            let path = std::path::Path::new(s);
            if !path.is_absolute() {
                return Err(Status::invalid_argument(format!(
                    "--script `{s}` must be an absolute path on the configuration server's host"
                )));
            }
            if !path.is_file() {
                return Err(Status::invalid_argument(format!(
                    "--script `{s}`: no such file on the configuration server's host"
                )));
            }
        }
        _ => {
            return Err(Status::invalid_argument(
                "an action is --manual \"what to do\" or --script PATH",
            ));
        }
    }
    let plan = a.plan.clone();
    let added = state
        .store
        .call(move |db| {
            if !db.plan_exists(&a.plan)? {
                return Ok(false);
            }
            db.add_plan_action(&a)?;
            Ok(true)
        })
        .await?;
    if !added {
        return Err(no_plan(&plan));
    }
    show(state, &plan).await
}

/// The newest point id shared by every item of `machines` (multi-VM points), `app` for
/// app-consistent ones only.
async fn shared_point(
    state: &State,
    machines: &[String],
    app: bool,
) -> Result<Option<String>, Status> {
    let machines = machines.to_vec();
    Ok(state
        .store
        .call(move |db| {
            let mut common: Option<Vec<(String, u64)>> = None;
            for m in &machines {
                let Some(item) = db.item_of_machine(m)? else {
                    return Ok(None);
                };
                let pts: Vec<(String, u64)> = db
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
        })
        .await?)
}

/// The plan's machines by plan group, groups in order.
fn machines_by_group(plan: &Plan) -> BTreeMap<u32, Vec<String>> {
    let mut by_group: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for m in &plan.members {
        by_group.entry(m.group).or_default().push(m.machine.clone());
    }
    by_group
}

/// What a plan job does to each member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Action {
    Failover,
    TestFailover,
    Commit,
    Cleanup,
}

impl Action {
    /// The member is already where this action takes it.
    fn done(self, item: &ItemRow) -> bool {
        match self {
            Action::Failover => item.state == ItemState::FailoverCompleted,
            Action::TestFailover => item.state == ItemState::TestFailoverCompleted,
            Action::Commit => item.state == ItemState::FailoverCommitted,
            Action::Cleanup => item.test_vm.is_empty(),
        }
    }
}

/// Everything a plan job runs with.
struct PlanRun {
    plan: Plan,
    action: Action,
    point: String,
    point_of: BTreeMap<String, String>,
    shutdown: bool,
}

/// `plan failover|test-failover|commit|test-failover-cleanup`: checks (every member has what
/// the action needs, before any group moves), then the plan's job.
pub async fn start(jobs: &Arc<Jobs>, req: PlanFailoverRequest) -> Result<Job, Status> {
    let state = &jobs.state;
    let plan = show(state, &req.plan).await?;
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
    let (job_name, action) = match req.action.as_str() {
        "" | "failover" => ("Plan failover", Action::Failover),
        "test-failover" => ("Plan test failover", Action::TestFailover),
        "commit" => ("Plan commit", Action::Commit),
        "test-failover-cleanup" => ("Plan test failover cleanup", Action::Cleanup),
        other => {
            return Err(Status::invalid_argument(format!(
                "unknown plan action `{other}`"
            )));
        }
    };
    // Every member that still has to move must have a point of the asked kind.
    if matches!(action, Action::Failover | Action::TestFailover) {
        let machines: Vec<String> = plan.members.iter().map(|m| m.machine.clone()).collect();
        let app = point == "latest-app-consistent";
        let missing = state
            .store
            .call(move |db| {
                let mut missing = Vec::new();
                for m in machines {
                    let Some(item) = db.item_of_machine(&m)? else {
                        missing.push(format!("{m} (not replicated)"));
                        continue;
                    };
                    if action.done(&item) {
                        continue;
                    }
                    let points = db.points(&item.id)?;
                    if !points.iter().any(|p| !app || p.kind.ends_with("app")) {
                        missing.push(format!(
                            "{m} (no {}recovery point)",
                            if app { "app-consistent " } else { "" }
                        ));
                    }
                }
                Ok(missing)
            })
            .await?;
        if !missing.is_empty() {
            return Err(Status::failed_precondition(format!(
                "recovery plan `{}` can't fail over; nothing was changed: every machine needs a \
                 recovery point of the kind asked ({point}): {}",
                req.plan,
                missing.join(", ")
            )));
        }
    }
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
            let id = shared_point(state, &machines, app).await?.ok_or_else(|| {
                Status::failed_precondition(format!(
                    "replication group `{group}` has no shared multi-VM point yet"
                ))
            })?;
            for m in machines {
                point_of.insert(m, id.clone());
            }
        }
    }
    let run = PlanRun {
        plan,
        action,
        point,
        point_of,
        shutdown: req.shutdown,
    };
    jobs.start(
        Spec {
            name: format!("{job_name} {}", req.plan),
            kind: JobKind::Plan,
            item: format!("plan:{}", req.plan),
            params: String::new(),
            parent: 0,
            cancel: CancelRule::Anytime,
        },
        |_, _| Ok(()),
        move |ctx| Box::pin(run_plan(ctx, run)),
    )
    .await
}

async fn run_plan(ctx: Arc<Ctx>, run: PlanRun) -> Result<(), JobError> {
    let PlanRun {
        plan,
        action,
        point,
        point_of,
        shutdown,
    } = run;
    let by_group = machines_by_group(&plan);
    for (group, machines) in by_group {
        let step = format!("Group {group}: {}", machines.join(", "));
        ctx.step(&step, async {
            let runs = machines.iter().map(|m| {
                let ctx = ctx.clone();
                let point = point_of.get(m).cloned().unwrap_or_else(|| point.clone());
                async move {
                    member(&ctx, m, action, point, shutdown)
                        .await
                        .map_err(|e| format!("{m}: {e}"))
                }
            });
            let errors: Vec<String> = futures::future::join_all(runs)
                .await
                .into_iter()
                .filter_map(Result::err)
                .collect();
            if errors.is_empty() {
                Ok(())
            } else {
                Err(Status::failed_precondition(format!(
                    "group {group} failed, later groups not started: {}",
                    errors.join("; ")
                )))
            }
        })
        .await?;
        // Actions belong to failing over (as ASR's are); commit and cleanup skip them.
        if matches!(action, Action::Failover | Action::TestFailover) {
            for a in plan.actions.iter().filter(|a| a.after_group == group) {
                after_group(&ctx, &plan, group, a).await?;
            }
        }
    }
    Ok(())
}

/// One member's part of a plan job: its own job, started with the plan job as parent and
/// waited for; nothing if it is already done.
async fn member(
    ctx: &Arc<Ctx>,
    machine: &str,
    action: Action,
    point: String,
    shutdown: bool,
) -> Result<(), String> {
    let m = machine.to_string();
    let item = ctx
        .state
        .store
        .call(move |db| db.item_of_machine(&m))
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "not replicated".to_string())?;
    if action.done(&item) {
        return Ok(());
    }
    let jobs = &ctx.jobs;
    let started = match action {
        Action::Commit => super::commit::start(jobs, machine, ctx.id).await,
        Action::Cleanup => super::cleanup::start(jobs, machine, ctx.id).await,
        Action::Failover | Action::TestFailover => {
            super::failover::start(
                jobs,
                FailoverRequest {
                    machine: machine.to_string(),
                    point,
                    shutdown,
                    kind: if action == Action::TestFailover {
                        FailoverKind::Test
                    } else {
                        FailoverKind::Unplanned
                    } as i32,
                    sync: 0,
                },
                ctx.id,
            )
            .await
        }
    }
    .map_err(|e| e.message().to_string())?;
    let job = jobs
        .wait(started.id)
        .await
        .map_err(|e| e.message().to_string())?;
    if job.state == crate::item::JobState::Succeeded {
        Ok(())
    } else {
        Err(job.error)
    }
}

/// A manual action (the job waits until `job resume`) or a script (the job fails with its exit
/// status and last lines).
async fn after_group(ctx: &Ctx, plan: &Plan, group: u32, a: &PlanAction) -> Result<(), JobError> {
    match &a.action {
        Some(plan_action::Action::Manual(text)) => {
            let step = format!("Manual action after group {group}: {text}");
            ctx.mark(&step, crate::item::StepState::InProgress).await?;
            ctx.wait_resumed(&step).await?;
            ctx.mark(&step, crate::item::StepState::Succeeded).await
        }
        Some(plan_action::Action::Script(path)) => {
            let direction = direction_of(ctx, plan).await;
            ctx.step(
                &format!("Script after group {group}: {path}"),
                run_script(path, &plan.name, group, &direction),
            )
            .await
        }
        None => Ok(()),
    }
}

/// `forward` or `reverse`: which way the plan's machines replicate(d).
async fn direction_of(ctx: &Ctx, plan: &Plan) -> String {
    let Some(first) = plan.members.first().map(|m| m.machine.clone()) else {
        return String::new();
    };
    ctx.state
        .store
        .call(move |db| db.item_of_machine(&first))
        .await
        .ok()
        .flatten()
        .map(|i| i.direction.to_string())
        .unwrap_or_default()
}

/// Runs a plan script with the plan, group and direction in its environment.
async fn run_script(path: &str, plan: &str, group: u32, direction: &str) -> Result<(), Status> {
    let child = tokio::process::Command::new(path)
        .env("FBL_PLAN", plan)
        .env("FBL_GROUP", group.to_string())
        .env("FBL_DIRECTION", direction)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Status::failed_precondition(format!("cannot run script {path}: {e}")))?;
    let out = tokio::time::timeout(SCRIPT_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| {
            Status::deadline_exceeded(format!(
                "script {path} did not finish within {SCRIPT_TIMEOUT:?}"
            ))
        })?
        .map_err(|e| Status::failed_precondition(format!("script {path}: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = lines[lines.len().saturating_sub(5)..].join(" | ");
    Err(Status::failed_precondition(format!(
        "script {path} failed ({}): {last}",
        match out.status.code() {
            Some(c) => format!("exit status {c}"),
            None => "killed by a signal".into(),
        }
    )))
}

/// What a plan reprotect runs with (kept with the job, to resume it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReprotectParams {
    pub plan: String,
    pub process_server: String,
    pub master_target: String,
    pub datastore: String,
    pub retention_drive: String,
    pub alternate_location: bool,
}

impl ReprotectParams {
    fn request(&self, machine: &str) -> ReprotectRequest {
        ReprotectRequest {
            machine: machine.to_string(),
            process_server: self.process_server.clone(),
            master_target: self.master_target.clone(),
            datastore: self.datastore.clone(),
            retention_drive: self.retention_drive.clone(),
            alternate_location: self.alternate_location,
        }
    }
}

/// Reprotects every machine of the plan with the same options: each replication group of a
/// member must be wholly in the plan, and every machine's preconditions must hold (else
/// nothing changes). The plan's job has a step per group and ends once every machine's
/// "Reprotect" job started; those end as their items become Protected.
pub async fn start_reprotect(
    jobs: &Arc<Jobs>,
    req: PlanReprotectRequest,
) -> Result<PlanReprotectResponse, Status> {
    let state = &jobs.state;
    let plan = show(state, &req.plan).await?;
    if plan.members.is_empty() {
        return Err(Status::failed_precondition(format!(
            "recovery plan `{}` has no machines",
            req.plan
        )));
    }
    let options = req.options.unwrap_or_default();
    let params = ReprotectParams {
        plan: req.plan.clone(),
        process_server: options.process_server,
        master_target: options.master_target,
        datastore: options.datastore,
        retention_drive: options.retention_drive,
        alternate_location: options.alternate_location,
    };
    let in_plan: Vec<&str> = plan.members.iter().map(|m| m.machine.as_str()).collect();
    let mut groups: Vec<&str> = plan
        .members
        .iter()
        .map(|m| m.replication_group.as_str())
        .filter(|g| !g.is_empty())
        .collect();
    groups.sort_unstable();
    groups.dedup();
    let all_items = state.store.call(|db| db.items()).await?;
    for group in groups {
        let missing: Vec<String> = all_items
            .iter()
            .filter(|i| i.replication_group == group && !in_plan.contains(&i.machine.as_str()))
            .map(|i| i.machine.clone())
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
    let mut refused = Vec::new();
    // Disks the members need on each target site's master targets.
    let mut needed: BTreeMap<String, usize> = BTreeMap::new();
    for m in &plan.members {
        match super::reprotect::precheck(state, &params.request(&m.machine)).await {
            Ok(super::reprotect::Precheck::Ready { site, disks }) => {
                *needed.entry(site).or_default() += disks;
            }
            Ok(super::reprotect::Precheck::Done) => {}
            Err(e) => refused.push(format!("{}: {}", m.machine, e.message())),
        }
    }
    for (site, disks) in &needed {
        let room = super::reprotect::room(state, site, &params.master_target).await?;
        if *disks > room {
            refused.push(format!(
                "its machines need {disks} disks on the master targets in {site}{}, which have \
                 room for {room} (at most {} each): deploy another master target, or reprotect \
                 the plan in parts",
                if params.master_target.is_empty() {
                    String::new()
                } else {
                    format!(" (`{}`)", params.master_target)
                },
                state.config.master_target_disk_limit
            ));
        }
    }
    if !refused.is_empty() {
        return Err(Status::failed_precondition(format!(
            "plan `{}` can't be reprotected; nothing was changed: {}",
            req.plan,
            refused.join("; ")
        )));
    }
    let body = params.clone();
    let plan_job = jobs
        .start(
            Spec {
                name: format!("Plan reprotect {}", req.plan),
                kind: JobKind::PlanReprotect,
                item: format!("plan:{}", req.plan),
                params: serde_json::to_string(&params).unwrap_or_default(),
                parent: 0,
                cancel: CancelRule::Anytime,
            },
            |_, _| Ok(()),
            move |ctx| Box::pin(run_reprotect(ctx, body)),
        )
        .await?;
    Ok(PlanReprotectResponse {
        plan_job: Some(plan_job),
        jobs: Vec::new(),
    })
}

/// The plan reprotect job's body: also what a restart resumes (members already reprotecting
/// are skipped).
pub async fn run_reprotect(ctx: Arc<Ctx>, p: ReprotectParams) -> Result<(), JobError> {
    let plan = show(&ctx.state, &p.plan).await?;
    for (group, machines) in machines_by_group(&plan) {
        let step = format!("Group {group}: start reprotecting {}", machines.join(", "));
        ctx.step(&step, async {
            let runs = machines.iter().map(|m| {
                let ctx = ctx.clone();
                let req = p.request(m);
                async move {
                    let name = m.clone();
                    let item = ctx
                        .state
                        .store
                        .call(move |db| db.item_of_machine(&name))
                        .await
                        .map_err(|e| format!("{m}: {e}"))?;
                    if item.is_some_and(|i| i.state != ItemState::FailoverCommitted) {
                        return Ok(());
                    }
                    super::reprotect::start_one(&ctx.jobs, &req, ctx.id)
                        .await
                        .map(|_| ())
                        .map_err(|e| format!("{m}: {}", e.message()))
                }
            });
            let errors: Vec<String> = futures::future::join_all(runs)
                .await
                .into_iter()
                .filter_map(Result::err)
                .collect();
            if errors.is_empty() {
                Ok(())
            } else {
                Err(Status::failed_precondition(format!(
                    "group {group}: {}; the machines already started go on, later groups were not \
                     started",
                    errors.join("; ")
                )))
            }
        })
        .await?;
    }
    Ok(())
}
