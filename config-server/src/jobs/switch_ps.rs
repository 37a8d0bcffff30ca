//! "Switch process server" (`item switch-ps`): a protected item moves to another process
//! server of its site without starting over, as ASR's scale-out process servers allow.
//!
//! With the old process server up, nothing is resent or compared: it stops taking the item's
//! batches and forwards what its cache holds ("Drain"); the target then holds every batch the
//! agent was told is safe, so the new process server continues after the last one and the agent
//! resends only what was in flight. With the old one down (or going down while it drains),
//! what it acknowledged but never forwarded is lost with it: the agent resynchronises every
//! block by checksums (only blocks that differ cross the link), the item shows "Resync
//! required" meanwhile, and the job says so. A route the old one still holds is removed when it
//! comes back ([`crate::reports::resume`]).
//!
//! Checks come first and change nothing. Every step is idempotent, so a restart of the CS runs
//! the job again; a job that fails or is cancelled before the switch lets the old process server
//! take the batches again.

use std::sync::Arc;
use std::time::Duration;

use failback_proto::pb::control::{
    CommandResult, DrainRoute, RemoveRoute, command, command_result,
};
use failback_proto::pb::operator::{Job, SwitchPsRequest};
use serde::{Deserialize, Serialize};
use tonic::Status;

use super::{CancelRule, Ctx, JobError, Jobs, Spec, enable::wait_protected};
use crate::commands::{self, address_for};
use crate::item::{ItemRow, ItemState, JobKind, StepState, default_policy};

/// The request a restart resumes the job with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Params {
    pub item: String,
    pub from: String,
    pub to: String,
}

/// How often the drain is asked how far it got.
const DRAIN_POLL: Duration = Duration::from_millis(300);

/// `SwitchProcessServer`: checks, then the "Switch process server" job.
pub async fn start(jobs: &Arc<Jobs>, req: SwitchPsRequest) -> Result<Job, Status> {
    let state = &jobs.state;
    failback_common::identity::validate_name(&req.machine).map_err(Status::invalid_argument)?;
    if req.process_server.is_empty() {
        return Err(Status::invalid_argument(
            "name the process server to switch to (--process-server NAME); see `srctl infra list`",
        ));
    }
    let (machine, to) = (req.machine.clone(), req.process_server.clone());
    let (item, running, ps) = state
        .store
        .call(move |db| {
            let item = db.item_of_machine(&machine)?;
            let running = match &item {
                Some(i) => db.running_job(&i.id)?,
                None => None,
            };
            Ok((item, running, db.component(&to)?))
        })
        .await?;
    let item = item.ok_or_else(|| {
        Status::not_found(format!(
            "`{}` has no replicated item; enable replication first (`srctl item enable {}`)",
            req.machine, req.machine
        ))
    })?;
    if let Some((id, name)) = running {
        return Err(Status::failed_precondition(format!(
            "job {id} ({name}) is running on `{}`; wait for it (`srctl job show {id}`)",
            req.machine
        )));
    }
    if item.state != ItemState::Protected {
        return Err(Status::failed_precondition(format!(
            "`{}` is {}: switch the process server of a Protected item (wait for its initial \
             replication or resynchronization to complete)",
            req.machine, item.state
        )));
    }
    let ps = ps.filter(|c| c.role == "process-server").ok_or_else(|| {
        Status::not_found(format!(
            "no process server named `{}` is registered; see `srctl infra list`",
            req.process_server
        ))
    })?;
    if ps.name == item.process_server {
        return Err(Status::failed_precondition(format!(
            "`{}` already replicates through `{}`",
            req.machine, ps.name
        )));
    }
    let from_site = state
        .store
        .call({
            let from = item.process_server.clone();
            move |db| Ok(db.component(&from)?.map(|c| c.site))
        })
        .await?
        .unwrap_or_default();
    if !from_site.is_empty() && ps.site != from_site {
        return Err(Status::failed_precondition(format!(
            "`{}` is a process server of {}, but `{}` replicates from {} through `{}`: switch to \
             a process server of the same site",
            ps.name, ps.site, req.machine, from_site, item.process_server
        )));
    }
    if !state.connected(&ps.name) {
        return Err(Status::failed_precondition(format!(
            "process server `{}` is not connected (ASR 806: no heartbeat from the process server); \
             start it or choose another",
            ps.name
        )));
    }
    if let Some(h) = state.ps_health(&ps.name)
        && h.cache_health() == failback_proto::pb::control::Health::Critical
    {
        return Err(Status::failed_precondition(format!(
            "process server `{}` is in critical health (cache {} of {} bytes used); choose another",
            ps.name, h.cache_used_bytes, h.cache_capacity_bytes
        )));
    }
    let params = Params {
        item: item.id.clone(),
        from: item.process_server.clone(),
        to: ps.name.clone(),
    };
    let body = params.clone();
    jobs.start(
        Spec {
            name: "Switch process server".into(),
            kind: JobKind::SwitchPs,
            item: item.id.clone(),
            params: serde_json::to_string(&params).unwrap_or_default(),
            parent: 0,
            cancel: CancelRule::Anytime,
        },
        move |db, job| {
            db.set_step(job, "Check prerequisites", StepState::Succeeded, None)?;
            Ok(())
        },
        move |ctx| Box::pin(run(ctx, body)),
    )
    .await
}

/// The job's body: also what a restart resumes.
pub async fn run(ctx: Arc<Ctx>, p: Params) -> Result<(), JobError> {
    let item = load(&ctx, &p.item).await?;
    if item.process_server == p.to {
        // A restart after the switch: what is left is releasing the old one (and the resync,
        // if the old one was lost).
        let drained = item.state == ItemState::Protected;
        return finish(&ctx, &p, &item, drained).await;
    }
    let drained = if ctx.state.connected(&p.from) {
        match drain(&ctx, &p).await {
            Ok(last) => last,
            Err(e) => {
                // The old process server takes the batches again; nothing else changed.
                let _ = ctx
                    .command(
                        &p.from,
                        command::Kind::DrainRoute(DrainRoute {
                            item: p.item.clone(),
                            resume: true,
                        }),
                    )
                    .await;
                return Err(e);
            }
        }
    } else {
        None
    };
    let step = format!("Switch to {}", p.to);
    if let Err(e) = ctx.step(&step, switch(&ctx, &p, &item, drained)).await {
        if drained.is_some() {
            let _ = ctx
                .command(
                    &p.from,
                    command::Kind::DrainRoute(DrainRoute {
                        item: p.item.clone(),
                        resume: true,
                    }),
                )
                .await;
        }
        return Err(e);
    }
    let item = load(&ctx, &p.item).await?;
    finish(&ctx, &p, &item, drained.is_some()).await
}

async fn load(ctx: &Ctx, id: &str) -> Result<ItemRow, JobError> {
    let lookup = id.to_string();
    Ok(ctx
        .state
        .store
        .call(move |db| db.item(&lookup))
        .await?
        .ok_or_else(|| Status::not_found(format!("item {id} is gone")))?)
}

/// Has the old process server stop taking the item's batches and forward what it holds.
/// Returns the last batch it held (the target has everything up to it), or None if it went
/// down meanwhile (what it held is lost).
async fn drain(ctx: &Ctx, p: &Params) -> Result<Option<u64>, JobError> {
    let step = format!("Drain {}", p.from);
    ctx.step(&step, async {
        let mut first_gap = None;
        loop {
            let answer = ctx
                .command(
                    &p.from,
                    command::Kind::DrainRoute(DrainRoute {
                        item: p.item.clone(),
                        resume: false,
                    }),
                )
                .await;
            let (last, forwarded) = match answer {
                Ok(CommandResult {
                    detail: Some(command_result::Detail::Drain(d)),
                    ..
                }) => (d.last_seq, d.forwarded_seq),
                Ok(_) => {
                    return Err(Status::internal(format!(
                        "`{}` answered the drain without saying how far it got",
                        p.from
                    )));
                }
                Err(e) if !ctx.state.connected(&p.from) => {
                    tracing::warn!(item = %p.item, "{} went down while draining ({}): what it had not forwarded is lost; the item resynchronizes", p.from, e.message());
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            if forwarded >= last {
                tracing::info!(item = %p.item, "{} drained: the target holds every batch up to {last}", p.from);
                return Ok(Some(last));
            }
            let gap = *first_gap.get_or_insert(last - forwarded);
            ctx.progress(&step, 1.0 - (last - forwarded) as f64 / gap.max(1) as f64)
                .await;
            tokio::time::sleep(DRAIN_POLL).await;
        }
    })
    .await
}

/// The target takes the new process server's batches, the new process server gets the route
/// (continuing after `drained`), the CS records the switch, and the agent is told.
async fn switch(ctx: &Ctx, p: &Params, item: &ItemRow, drained: Option<u64>) -> Result<(), Status> {
    let (policy_name, machine_name, to, target_name) = (
        item.policy.clone(),
        item.machine.clone(),
        p.to.clone(),
        item.target.clone(),
    );
    let (policy, machine, ps, target) = ctx
        .state
        .store
        .call(move |db| {
            Ok((
                db.policy(&policy_name)?.unwrap_or_else(default_policy),
                db.component(&machine_name)?,
                db.component(&to)?,
                db.component(&target_name)?,
            ))
        })
        .await?;
    let gone = |what: &str| Status::not_found(format!("{what} is no longer registered"));
    let machine = machine.ok_or_else(|| gone(&item.machine))?;
    let ps = ps.ok_or_else(|| gone(&p.to))?;
    let target = target.ok_or_else(|| gone(&item.target))?;
    ctx.command(
        &target.name,
        commands::prepare(item, &machine, &ps, &policy),
    )
    .await?;
    // Whatever an earlier stint of the item left in the new one's cache goes first: the
    // numbering continues from the old one's.
    ctx.command(
        &ps.name,
        command::Kind::RemoveRoute(RemoveRoute {
            item: item.id.clone(),
        }),
    )
    .await?;
    let address = address_for(&target, ps.site.as_str()).unwrap_or_default();
    let mut route = commands::route(item, &target.name, &address, &machine);
    if let command::Kind::SetRoute(r) = &mut route {
        r.start_after = drained.unwrap_or(0);
    }
    ctx.command(&ps.name, route).await?;
    let (id, to, from, lost) = (
        item.id.clone(),
        p.to.clone(),
        p.from.clone(),
        drained.is_none(),
    );
    ctx.state
        .store
        .call(move |db| {
            db.set_item_process_server(&id, &to)?;
            if lost {
                // Until it is told to forget the item, the old one may still hold a route.
                db.add_stale_route(&from, &id)?;
            }
            Ok(())
        })
        .await?;
    ctx.state.notify();
    let ps_address = address_for(&ps, &machine.site).unwrap_or_default();
    let mut start = commands::start(item, &ps.name, &ps_address, &policy);
    if let command::Kind::StartReplication(s) = &mut start {
        s.batches_lost = lost;
    }
    match ctx.command(&machine.name, start).await {
        Ok(_) => {}
        // The agent gets its settings (the new process server) when it connects again.
        Err(_) if !ctx.state.connected(&machine.name) => {
            tracing::warn!(item = %item.id, "{} is not connected: it replicates to {} once it is", machine.name, ps.name);
        }
        Err(e) => return Err(e),
    }
    if lost {
        let id = item.id.clone();
        match ctx
            .state
            .store
            .call(move |db| Ok(db.transition(&id, ItemState::ResyncRequired)))
            .await?
        {
            Ok(_) | Err(crate::store::StateError::Refused(_)) => {}
            Err(e) => return Err(e.into()),
        }
        ctx.state.notify();
    }
    Ok(())
}

/// After the switch: the old process server forgets the item (now, or when it is back), and
/// an item whose old process server was lost waits for its resync.
async fn finish(ctx: &Ctx, p: &Params, item: &ItemRow, drained: bool) -> Result<(), JobError> {
    ctx.step(&format!("Release {}", p.from), async {
        let remove = command::Kind::RemoveRoute(RemoveRoute {
            item: item.id.clone(),
        });
        let removed = ctx.state.connected(&p.from) && ctx.command(&p.from, remove).await.is_ok();
        let (from, id) = (p.from.clone(), item.id.clone());
        ctx.state
            .store
            .call(move |db| {
                if removed {
                    db.remove_stale_route(&from, &id)
                } else {
                    db.add_stale_route(&from, &id)
                }
            })
            .await?;
        if !removed {
            tracing::warn!(item = %item.id, "{} is not connected: it forgets the item when it is back", p.from);
        }
        Ok(())
    })
    .await?;
    if !drained {
        ctx.step(
            "Resynchronization (batches the old process server had not forwarded are lost)",
            wait_protected(
                ctx,
                "Resynchronization (batches the old process server had not forwarded are lost)",
                &item.id,
            ),
        )
        .await?;
    }
    Ok(())
}
