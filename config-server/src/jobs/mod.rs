//! Jobs owned by the configuration server. An operator request is checked by its handler,
//! recorded as a job (with what it changes in the same transaction) and its id returned at
//! once; the job then runs in a task the CS tracks, whether or not anyone watches. A client
//! that goes away changes nothing.
//!
//! # Lifecycle
//! - Steps are recorded as they start and end ([`Ctx::step`]); a step that moves data reports
//!   a progress fraction. A cancelled job stops at the next step boundary, or inside a
//!   data-moving step between batches, and ends with [`JobError::Cancelled`] (a variant, never
//!   a compared message).
//! - A job's task runs in a span with the job and item; a panic is caught, logged, and fails
//!   the job with the kind's compensation (never a job "In progress" forever).
//! - After a restart, [`Jobs::recover`] resumes every job whose kind is safe to run again
//!   (each step of those is idempotent, and the commands they send keep their ids, so a
//!   component that already carried one out answers without doing it again), and fails the
//!   others with a reason, leaving the item where running the operation again completes it.
//! - Test hooks (`hold_at_step`, `panic_at_step` in the CS config) stop a job at a named step
//!   (state Waiting until `srctl job resume`) or panic there.
//!
//! # Layout
//! One module per kind of job, each with its checks (run by the operator handler, changing
//! nothing) and its body: [`enable`], [`disable`], [`failover`] (every kind, change point
//! included), [`commit`], [`cleanup`], [`reprotect`], [`resync`], [`plan`], [`deploy`],
//! [`switch_ps`].

pub mod cleanup;
pub mod commit;
pub mod deploy;
pub mod disable;
pub mod enable;
pub mod failover;
pub mod plan;
pub mod reprotect;
pub mod resync;
pub mod switch_ps;

use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use failback_proto::pb::control::{CommandResult, command};
use failback_proto::pb::operator::Job;
use futures::FutureExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;
use tracing::Instrument;

use crate::item::{JobKind, JobState, StepState};
use crate::state::State;
use crate::store::{Db, DbError, JobRow, StateError};

/// How a job ended other than by succeeding.
#[derive(Debug)]
pub enum JobError {
    /// `job cancel`: the message says what it leaves behind.
    Cancelled(String),
    /// A step failed.
    Failed(Status),
}

impl JobError {
    pub fn message(&self) -> String {
        match self {
            JobError::Cancelled(m) => m.clone(),
            JobError::Failed(s) => s.message().to_string(),
        }
    }
}

impl From<Status> for JobError {
    fn from(s: Status) -> Self {
        JobError::Failed(s)
    }
}

impl From<DbError> for JobError {
    fn from(e: DbError) -> Self {
        JobError::Failed(e.into())
    }
}

impl From<StateError> for JobError {
    fn from(e: StateError) -> Self {
        JobError::Failed(e.into())
    }
}

/// A job's body.
pub type Body = Pin<Box<dyn Future<Output = Result<(), JobError>> + Send>>;

/// Whether `job cancel` may stop a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelRule {
    /// At the next step boundary.
    Anytime,
    /// ASR: don't cancel a running failover; only with `--force`.
    OnlyForced,
}

/// What a new job is.
pub struct Spec {
    pub name: String,
    pub kind: JobKind,
    pub item: String,
    /// The request, as JSON, to resume the job with after a restart.
    pub params: String,
    pub parent: i64,
    pub cancel: CancelRule,
}

/// A running job's controls.
struct Handle {
    cancel: CancellationToken,
    rule: CancelRule,
    resume: Arc<Notify>,
}

/// The job runner.
pub struct Jobs {
    pub state: Arc<State>,
    tracker: TaskTracker,
    running: Mutex<HashMap<i64, Handle>>,
    /// Cancelled when the CS stops: job tasks end where they are, recording nothing, so the
    /// next start finds them running and recovers them.
    stop: CancellationToken,
    /// Held while a reprotect checks its preconditions and records its item: two reprotects
    /// started together must not both count the same room on a master target.
    pub reprotecting: tokio::sync::Mutex<()>,
}

/// What a job's body works with.
pub struct Ctx {
    pub state: Arc<State>,
    pub jobs: Arc<Jobs>,
    pub id: i64,
    cancel: CancellationToken,
    resume: Arc<Notify>,
    /// How often each (step, component, command) was sent in this run: part of the id.
    sent: Mutex<HashMap<(String, String, &'static str), u32>>,
    /// The step running now.
    step: Mutex<String>,
    /// Resumed after a restart: components may still be reconnecting.
    resumed: bool,
}

impl Jobs {
    pub fn new(state: Arc<State>) -> Arc<Jobs> {
        Arc::new(Jobs {
            state,
            tracker: TaskTracker::new(),
            running: Mutex::default(),
            stop: CancellationToken::new(),
            reprotecting: tokio::sync::Mutex::new(()),
        })
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Handle>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a job (running `prepare` in the same transaction: what the job changes
    /// before it runs, e.g. the item it creates) and starts it; returns it as recorded.
    pub async fn start<P, B>(
        self: &Arc<Self>,
        spec: Spec,
        prepare: P,
        body: B,
    ) -> Result<Job, Status>
    where
        P: FnOnce(&Db<'_>, i64) -> Result<(), StateError> + Send + 'static,
        B: FnOnce(Arc<Ctx>) -> Body + Send + 'static,
    {
        let Spec {
            name,
            kind,
            item,
            params,
            parent,
            cancel,
        } = spec;
        let row = self
            .state
            .store
            .call(move |db| {
                let id = db.insert_job(&name, kind, &item, &params, parent)?;
                match prepare(db, id) {
                    Ok(()) => {}
                    Err(StateError::Db(e)) => return Err(e),
                    Err(e) => return Ok(Err(e)),
                }
                Ok(Ok(db.job(id)?))
            })
            .await?
            .map_err(Status::from)?
            .ok_or_else(|| Status::internal("job vanished"))?;
        self.spawn(row.id, kind, &row.item, cancel, false, body);
        self.state.notify();
        Ok(row.to_pb())
    }

    /// Runs `body` as job `id` in a tracked task.
    fn spawn<B>(
        self: &Arc<Self>,
        id: i64,
        kind: JobKind,
        item: &str,
        rule: CancelRule,
        resumed: bool,
        body: B,
    ) where
        B: FnOnce(Arc<Ctx>) -> Body + Send + 'static,
    {
        let cancel = CancellationToken::new();
        let resume = Arc::new(Notify::new());
        self.running().insert(
            id,
            Handle {
                cancel: cancel.clone(),
                rule,
                resume: resume.clone(),
            },
        );
        let ctx = Arc::new(Ctx {
            state: self.state.clone(),
            jobs: self.clone(),
            id,
            cancel,
            resume,
            sent: Mutex::default(),
            step: Mutex::default(),
            resumed,
        });
        let jobs = self.clone();
        let span = tracing::info_span!("job", job = id, kind = %kind, item = %item);
        let stop = self.stop.clone();
        self.tracker.spawn(
            async move {
                let result = tokio::select! {
                    r = std::panic::AssertUnwindSafe(body(ctx.clone())).catch_unwind() => r,
                    _ = stop.cancelled() => return,
                };
                let error = match result {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.message()),
                    Err(panic) => {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        tracing::error!("the job's task panicked: {what}");
                        let reason = format!(
                            "internal error: the job's task panicked ({what}); run it again"
                        );
                        if let Err(e) = abandon(&jobs.state, id, kind, &reason).await {
                            tracing::error!("after the panic: {e}");
                        }
                        Some(reason)
                    }
                };
                jobs.running().remove(&id);
                if let Some(e) = &error {
                    tracing::warn!("job failed: {e}");
                }
                let step = ctx.current_step();
                let failed_step = error.is_some() && !step.is_empty();
                let end = jobs
                    .state
                    .store
                    .call(move |db| {
                        if failed_step {
                            let still = db.job(id)?.and_then(|j| {
                                j.steps
                                    .iter()
                                    .find(|s| s.name == step)
                                    .map(|s| s.state() != Some(StepState::Failed))
                            });
                            if still == Some(true) {
                                db.set_step(id, &step, StepState::Failed, None)?;
                            }
                        }
                        db.end_job(id, error.as_deref())
                    })
                    .await;
                if let Err(e) = end {
                    tracing::error!("recording the job's end: {e}");
                }
                jobs.state.notify();
            }
            .instrument(span),
        );
    }

    /// `job cancel`: stops a running job at its next step boundary (or between batches).
    pub async fn cancel(&self, id: i64, force: bool) -> Result<Job, Status> {
        let job = self.job(id).await?;
        if !job.state.is_running() {
            return Err(Status::failed_precondition(format!(
                "job {id} is not running ({})",
                job.state
            )));
        }
        let token = {
            let running = self.running();
            running.get(&id).map(|h| (h.cancel.clone(), h.rule))
        };
        let Some((token, rule)) = token else {
            return Err(Status::failed_precondition(format!(
                "job {id} ({}) can't be cancelled",
                job.name
            )));
        };
        if rule == CancelRule::OnlyForced && !force {
            return Err(Status::failed_precondition(format!(
                "don't cancel a running failover: replication is stopped and won't resume, and the item \
                 needs the failover run again; to cancel anyway: `srctl job cancel {id} --force`"
            )));
        }
        token.cancel();
        Ok(job.to_pb())
    }

    /// `job resume`: lets a job waiting at a manual action (or a test hold) go on.
    pub async fn resume(&self, id: i64) -> Result<Job, Status> {
        let job = self.job(id).await?;
        if job.state != JobState::Waiting {
            return Err(Status::failed_precondition(format!(
                "job {id} is not waiting ({}); only a job held at a manual action can be resumed",
                job.state
            )));
        }
        let notify = self.running().get(&id).map(|h| h.resume.clone());
        match notify {
            Some(n) => {
                n.notify_one();
                Ok(job.to_pb())
            }
            None => Err(Status::failed_precondition(format!(
                "job {id} is not running on this configuration server"
            ))),
        }
    }

    async fn job(&self, id: i64) -> Result<JobRow, Status> {
        self.state
            .store
            .call(move |db| db.job(id))
            .await?
            .ok_or_else(|| Status::not_found(format!("no job {id}; see `srctl job list`")))
    }

    /// Waits until job `id` ended; returns it.
    pub async fn wait(&self, id: i64) -> Result<JobRow, Status> {
        let state = &self.state;
        state
            .wait_for(Duration::MAX, || async move {
                match state.store.call(move |db| db.job(id)).await {
                    Ok(Some(j)) if !j.state.is_running() => Some(Ok(j)),
                    Ok(Some(_)) => None,
                    Ok(None) => Some(Err(Status::not_found(format!("no job {id}")))),
                    Err(e) => Some(Err(e.into())),
                }
            })
            .await
            .unwrap_or_else(|| Err(Status::cancelled("the configuration server is stopping")))
    }

    /// After a restart: resumes the jobs that are safe to run again, fails the others with a
    /// reason (and puts their items where a re-run completes).
    pub async fn recover(self: &Arc<Self>) -> Result<(), DbError> {
        let jobs = self.state.store.call(|db| db.running_jobs()).await?;
        for job in jobs {
            let resumed = match job.kind {
                Some(kind) => resume_body(&self.state, kind, &job)
                    .await
                    .map(|b| (kind, b)),
                None => None,
            };
            match resumed {
                Some((kind, (rule, body))) => {
                    tracing::info!(job = job.id, name = %job.name, item = %job.item, "resuming the job after a restart");
                    let id = job.id;
                    self.state
                        .store
                        .call(move |db| db.set_job_state(id, JobState::InProgress))
                        .await?;
                    self.spawn(job.id, kind, &job.item, rule, true, body);
                }
                None => {
                    let reason = format!(
                        "the configuration server restarted while `{}` ran; run it again",
                        job.name
                    );
                    tracing::warn!(job = job.id, name = %job.name, item = %job.item, "{reason}");
                    if let Some(kind) = job.kind {
                        abandon(&self.state, job.id, kind, &reason).await?;
                    }
                    let id = job.id;
                    self.state
                        .store
                        .call(move |db| db.end_job(id, Some(&reason)))
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Stops every job task where it is (shutdown): their jobs stay running in the database,
    /// for the next start to resume or fail.
    pub async fn close(&self) {
        self.tracker.close();
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tracker.wait()).await;
    }
}

type Resumed = (CancelRule, Box<dyn FnOnce(Arc<Ctx>) -> Body + Send>);

/// The body that resumes `job`, if its kind is safe to run again.
async fn resume_body(state: &Arc<State>, kind: JobKind, job: &JobRow) -> Option<Resumed> {
    let params = job.params.clone();
    let item = job.item.clone();
    let body: Box<dyn FnOnce(Arc<Ctx>) -> Body + Send> = match kind {
        JobKind::Enable => Box::new(move |ctx| Box::pin(enable::run(ctx, item))),
        JobKind::Reprotect => {
            let p: reprotect::Params = serde_json::from_str(&params).ok()?;
            Box::new(move |ctx| Box::pin(reprotect::run(ctx, p)))
        }
        JobKind::Resync => Box::new(move |ctx| Box::pin(resync::run(ctx, item))),
        JobKind::Commit => Box::new(move |ctx| Box::pin(commit::run(ctx, item))),
        JobKind::CleanupTest => Box::new(move |ctx| Box::pin(cleanup::run(ctx, item))),
        JobKind::Disable => Box::new(move |ctx| Box::pin(disable::run(ctx, item))),
        JobKind::PlanReprotect => {
            let p: plan::ReprotectParams = serde_json::from_str(&params).ok()?;
            Box::new(move |ctx| Box::pin(plan::run_reprotect(ctx, p)))
        }
        JobKind::Deploy => {
            let p: deploy::Params = serde_json::from_str(&params).ok()?;
            Box::new(move |ctx| Box::pin(deploy::run(ctx, p)))
        }
        JobKind::SwitchPs => {
            let p: switch_ps::Params = serde_json::from_str(&params).ok()?;
            Box::new(move |ctx| Box::pin(switch_ps::run(ctx, p)))
        }
        JobKind::Failover | JobKind::Plan => return None,
    };
    let _ = state;
    Some((CancelRule::Anytime, body))
}

/// Puts a job's item where running the operation again completes it, after the job was cut
/// short (a restart, a panic).
async fn abandon(state: &Arc<State>, id: i64, kind: JobKind, reason: &str) -> Result<(), DbError> {
    let reason = reason.to_string();
    let job = state.store.call(move |db| db.job(id)).await?;
    let Some(job) = job else {
        return Ok(());
    };
    tracing::warn!(job = id, item = %job.item, "{reason}");
    match kind {
        JobKind::Failover => failover::abandon(state, &job).await,
        JobKind::Enable => enable::abandon(state, &job.item).await,
        JobKind::Reprotect => match serde_json::from_str::<reprotect::Params>(&job.params) {
            Ok(p) => reprotect::abandon(state, &p).await,
            Err(_) => Ok(()),
        },
        // Idempotent kinds: running them again completes them; a plan's members are jobs
        // of their own.
        JobKind::Disable
        | JobKind::Deploy
        | JobKind::Resync
        | JobKind::Commit
        | JobKind::CleanupTest
        | JobKind::Plan
        | JobKind::PlanReprotect
        | JobKind::SwitchPs => Ok(()),
    }
}

impl Ctx {
    /// The step running now ("" between steps).
    fn current_step(&self) -> String {
        self.step.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn set_current(&self, name: &str) {
        if let Ok(mut s) = self.step.lock() {
            *s = name.to_string();
        }
    }

    /// Whether `job cancel` asked this job to stop.
    pub fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Records step `name` with `state` (no body: e.g. "Check prerequisites" done).
    pub async fn mark(&self, name: &str, state: StepState) -> Result<(), JobError> {
        let (id, name) = (self.id, name.to_string());
        self.state
            .store
            .call(move |db| db.set_step(id, &name, state, None))
            .await?;
        self.state.notify();
        Ok(())
    }

    /// Records a data-moving step's progress (0..1).
    pub async fn progress(&self, name: &str, fraction: f64) {
        let (id, name) = (self.id, name.to_string());
        let fraction = fraction.clamp(0.0, 1.0);
        if self
            .state
            .store
            .call(move |db| db.set_step(id, &name, StepState::InProgress, Some(fraction)))
            .await
            .is_ok()
        {
            self.state.notify();
        }
    }

    /// Runs step `name`: recorded In progress, then Succeeded or Failed. Cancellation stops
    /// it (before it starts, or by dropping `f` at its next await); `cancelled` is the error
    /// a cancel leaves.
    pub async fn step_or<T>(
        &self,
        name: &str,
        cancelled: &str,
        f: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, JobError> {
        if self.cancelled() {
            return Err(JobError::Cancelled(cancelled.to_string()));
        }
        self.set_current(name);
        self.mark(name, StepState::InProgress).await?;
        self.hooks(name).await?;
        let r = tokio::select! {
            r = f => r.map_err(JobError::Failed),
            _ = self.cancel.cancelled() => Err(JobError::Cancelled(cancelled.to_string())),
        };
        self.mark(
            name,
            if r.is_ok() {
                StepState::Succeeded
            } else {
                StepState::Failed
            },
        )
        .await?;
        self.set_current("");
        r
    }

    /// [`Ctx::step_or`] with the plain cancel message.
    pub async fn step<T>(
        &self,
        name: &str,
        f: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, JobError> {
        self.step_or(name, "cancelled by the operator", f).await
    }

    /// The test hooks of the CS config: hold (Waiting until resumed) or panic at a step.
    async fn hooks(&self, name: &str) -> Result<(), JobError> {
        let config = &self.state.config;
        if !config.panic_at_step.is_empty() && name.starts_with(&config.panic_at_step) {
            panic!("test hook panic_at_step `{}`", config.panic_at_step);
        }
        if !config.hold_at_step.is_empty() && name.starts_with(&config.hold_at_step) {
            tracing::warn!(
                step = name,
                "test hook hold_at_step: waiting for `srctl job resume`"
            );
            self.wait_resumed(name).await?;
        }
        Ok(())
    }

    /// Holds the job (state Waiting, the step Waiting) until `job resume` or a cancel.
    pub async fn wait_resumed(&self, name: &str) -> Result<(), JobError> {
        let (id, step) = (self.id, name.to_string());
        self.state
            .store
            .call(move |db| {
                db.set_job_state(id, JobState::Waiting)?;
                db.set_step(id, &step, StepState::Waiting, None)
            })
            .await?;
        self.state.notify();
        tokio::select! {
            _ = self.resume.notified() => {}
            _ = self.cancel.cancelled() => {
                return Err(JobError::Cancelled("cancelled by the operator while waiting".into()));
            }
        }
        let (id, step) = (self.id, name.to_string());
        self.state
            .store
            .call(move |db| {
                db.set_job_state(id, JobState::InProgress)?;
                db.set_step(id, &step, StepState::InProgress, None)
            })
            .await?;
        self.state.notify();
        Ok(())
    }

    /// Sends a command for this job: its id derives from the job, the step, the component and
    /// the command (and how often this run sent it), so a resumed job re-sends the same id.
    /// In a resumed job, a component that is not connected yet (after a restart, components
    /// come back in any order) gets a few seconds.
    pub async fn command(
        &self,
        component: &str,
        kind: command::Kind,
    ) -> Result<CommandResult, Status> {
        let what = command_name(&kind);
        let step = self.current_step();
        let n = {
            let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
            let n = sent
                .entry((step.clone(), component.to_string(), what))
                .or_default();
            *n += 1;
            *n
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (self.id, &step, component, what, n).hash(&mut h);
        // The top bit marks job commands apart from the session counter's ids.
        let id = h.finish() | (1 << 63);
        if self.resumed
            && !self
                .state
                .sessions
                .wait_connected(component, Duration::from_secs(30))
                .await
        {
            return Err(Status::unavailable(format!(
                "`{component}` is not connected"
            )));
        }
        self.state.sessions.command_id(component, id, kind).await
    }
}

fn command_name(kind: &command::Kind) -> &'static str {
    use command::Kind::*;
    match kind {
        PrepareReplica(_) => "prepare",
        SetRoute(_) => "route",
        StartReplication(_) => "start",
        StopReplication(_) => "stop",
        MakeTag(_) => "tag",
        VerifyPoint(_) => "verify",
        Workload(_) => "workload",
        Resync(_) => "resync",
        Shutdown(_) => "shutdown",
        Materialize(_) => "materialize",
        Boot(_) => "boot",
        RemoveMachine(_) => "remove-machine",
        DropPoints(_) => "drop-points",
        RemoveReplica(_) => "remove-replica",
        HoldWrites(_) => "hold",
        ReleaseWrites(_) => "release",
        RemoveRoute(_) => "remove-route",
        DrainRoute(_) => "drain",
    }
}
