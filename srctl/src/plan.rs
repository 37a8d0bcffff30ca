//! `srctl plan ...`: recovery plans (groups in order, machines of a group in parallel),
//! their members, manual actions and scripts, and the plan jobs.

use std::path::Path;

use failback_proto::pb::operator::{
    ListPlansRequest, Plan, PlanAction, PlanMember, PlanRequest, plan_action,
};
use serde_json::json;

use crate::client::{operator, status_message};

fn err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", status_message(&s))
}

pub async fn list(dir: &Path) -> anyhow::Result<Vec<Plan>> {
    Ok(operator(dir)
        .await?
        .list_plans(ListPlansRequest {})
        .await
        .map_err(err)?
        .into_inner()
        .plans)
}

/// Takes `machine` out of `plan`.
pub async fn remove(dir: &Path, plan: &str, machine: &str) -> anyhow::Result<Plan> {
    Ok(operator(dir)
        .await?
        .remove_from_plan(PlanMember {
            plan: plan.into(),
            machine: machine.into(),
            ..Default::default()
        })
        .await
        .map_err(err)?
        .into_inner())
}

pub async fn delete(dir: &Path, plan: &str) -> anyhow::Result<()> {
    operator(dir)
        .await?
        .delete_plan(PlanRequest { name: plan.into() })
        .await
        .map_err(err)?;
    Ok(())
}

/// A manual action or a script after `group`.
pub async fn add_action(
    dir: &Path,
    plan: &str,
    group: u32,
    action: plan_action::Action,
) -> anyhow::Result<Plan> {
    Ok(operator(dir)
        .await?
        .add_plan_action(PlanAction {
            plan: plan.into(),
            after_group: group,
            action: Some(action),
        })
        .await
        .map_err(err)?
        .into_inner())
}

/// Reprotects every machine of `plan` with `options` (its `machine` is ignored).
pub async fn reprotect(
    dir: &Path,
    plan: &str,
    options: failback_proto::pb::operator::ReprotectRequest,
) -> anyhow::Result<failback_proto::pb::operator::PlanReprotectResponse> {
    Ok(operator(dir)
        .await?
        .plan_reprotect(failback_proto::pb::operator::PlanReprotectRequest {
            plan: plan.into(),
            options: Some(options),
        })
        .await
        .map_err(err)?
        .into_inner())
}

pub async fn create(dir: &Path, name: &str) -> anyhow::Result<Plan> {
    Ok(operator(dir)
        .await?
        .create_plan(failback_proto::pb::operator::PlanRequest { name: name.into() })
        .await
        .map_err(err)?
        .into_inner())
}

pub async fn add(dir: &Path, plan: &str, machine: &str, group: u32) -> anyhow::Result<Plan> {
    Ok(operator(dir)
        .await?
        .add_to_plan(failback_proto::pb::operator::PlanMember {
            plan: plan.into(),
            machine: machine.into(),
            group,
            ..Default::default()
        })
        .await
        .map_err(err)?
        .into_inner())
}

/// Machines a recovery plan holds (ASR).
pub const MAX_MACHINES: usize = 100;

/// Groups of a plan of `machines` that [`create_spread`] makes: ASR's 7 at most.
pub const GROUPS: usize = 7;

/// Creates plan `name` with `machines` spread round robin over [`GROUPS`] groups (vm1 in
/// group 1, vm2 in group 2, ...); returns how many groups it has.
pub async fn create_spread(dir: &Path, name: &str, machines: &[String]) -> anyhow::Result<usize> {
    create(dir, name).await?;
    for (i, m) in machines.iter().enumerate() {
        add(dir, name, m, (i % GROUPS) as u32 + 1)
            .await
            .map_err(|e| e.context(format!("adding {m} to plan `{name}`")))?;
    }
    Ok(GROUPS.min(machines.len()))
}

pub async fn show(dir: &Path, name: &str) -> anyhow::Result<Plan> {
    Ok(operator(dir)
        .await?
        .show_plan(failback_proto::pb::operator::PlanRequest { name: name.into() })
        .await
        .map_err(err)?
        .into_inner())
}

pub async fn start(
    dir: &Path,
    plan: &str,
    action: &str,
    point: &str,
    shutdown: bool,
) -> anyhow::Result<failback_proto::pb::operator::Job> {
    Ok(operator(dir)
        .await?
        .plan_failover(failback_proto::pb::operator::PlanFailoverRequest {
            plan: plan.into(),
            point: point.into(),
            action: action.into(),
            shutdown,
        })
        .await
        .map_err(err)?
        .into_inner())
}

pub fn print(p: &Plan, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        let v = json!({
            "name": p.name,
            "members": p.members.iter().map(|m| json!({
                "machine": m.machine, "group": m.group, "state": m.state, "replication_group": m.replication_group,
            })).collect::<Vec<_>>(),
            "actions": p.actions.iter().map(|a| match &a.action {
                Some(plan_action::Action::Manual(t)) => json!({"after_group": a.after_group, "manual": t}),
                Some(plan_action::Action::Script(s)) => json!({"after_group": a.after_group, "script": s}),
                None => json!({"after_group": a.after_group}),
            }).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("recovery plan {} ({} machines)", p.name, p.members.len());
    for g in 1..=7 {
        for m in p.members.iter().filter(|m| m.group == g) {
            println!(
                "  group {}  {:<10} {:<30} {}",
                m.group, m.machine, m.state, m.replication_group
            );
        }
        for a in p.actions.iter().filter(|a| a.after_group == g) {
            match &a.action {
                Some(plan_action::Action::Manual(t)) => {
                    println!("  after group {g}: manual action: {t}")
                }
                Some(plan_action::Action::Script(s)) => println!("  after group {g}: script {s}"),
                None => {}
            }
        }
    }
    Ok(())
}
