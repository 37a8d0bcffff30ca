//! "Deploy process server" (or master target): a component added at runtime, as ASR deploys
//! the Azure process server for failback. Whoever runs it (srctl in the local lab) starts the
//! process; the job ends when the component has enrolled and registered, or fails after
//! [`DEPLOY_TIMEOUT`] naming what to check. Waiting is idempotent, so a restart resumes it.

use std::sync::Arc;
use std::time::Duration;

use failback_common::identity::{CS_NAME, Role, Site, validate_name};
use failback_proto::pb::operator::{DeployComponentRequest, DeployRole, Job};
use serde::{Deserialize, Serialize};
use tonic::Status;

use super::{CancelRule, Ctx, JobError, Jobs, Spec};
use crate::item::JobKind;

/// How long a deployed component has to register (ASR: 10-15 minutes; the lab's start fast).
pub const DEPLOY_TIMEOUT: Duration = Duration::from_secs(90);

/// What the job waits for: also what a restart resumes it with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Params {
    pub name: String,
    pub role: Role,
    pub site: Site,
}

/// `infra add ROLE NAME --site SITE`: checks, then the job.
pub async fn start(jobs: &Arc<Jobs>, req: DeployComponentRequest) -> Result<Job, Status> {
    let (role, what) = match req.role() {
        DeployRole::ProcessServer => (Role::ProcessServer, "process server"),
        DeployRole::MasterTarget => (Role::MasterTarget, "master target"),
        DeployRole::Unspecified => {
            return Err(Status::invalid_argument(
                "deploy what? a process server or a master target",
            ));
        }
    };
    let site: Site = req.site.parse().map_err(Status::invalid_argument)?;
    validate_name(&req.name).map_err(Status::invalid_argument)?;
    if req.name.eq_ignore_ascii_case(CS_NAME) {
        return Err(Status::already_exists(
            "`cs` is the configuration server's name",
        ));
    }
    let name = req.name.clone();
    if let Some(existing) = jobs
        .state
        .store
        .call(move |db| db.component_any_case(&name))
        .await?
    {
        return Err(Status::already_exists(format!(
            "a component named `{}` is already registered ({} at {}); choose another name",
            existing.name, existing.role, existing.site
        )));
    }
    let params = Params {
        name: req.name.clone(),
        role,
        site,
    };
    let encoded = serde_json::to_string(&params).map_err(|e| Status::internal(e.to_string()))?;
    jobs.start(
        Spec {
            name: format!("Deploy {what} {}", req.name),
            kind: JobKind::Deploy,
            item: req.name.clone(),
            params: encoded,
            parent: 0,
            cancel: CancelRule::Anytime,
        },
        |_, _| Ok(()),
        move |ctx| Box::pin(run(ctx, params)),
    )
    .await
}

/// The job's body.
pub async fn run(ctx: Arc<Ctx>, p: Params) -> Result<(), JobError> {
    let step = format!("Wait for {} to enroll and register", p.name);
    ctx.step(&step, async {
        let state = &ctx.state;
        let registered = state
            .wait_for(DEPLOY_TIMEOUT, || {
                let name = p.name.clone();
                async move {
                    if !state.connected(&name) {
                        return None;
                    }
                    let row = state
                        .store
                        .call(move |db| db.component(&name))
                        .await
                        .ok()??;
                    Some(row.role == p.role.as_str() && row.site == p.site.as_str())
                }
            })
            .await;
        match registered {
            Some(true) => Ok(()),
            Some(false) => Err(Status::failed_precondition(format!(
                "`{}` registered, but not as a {} in {}: check its config",
                p.name, p.role, p.site
            ))),
            None => Err(Status::deadline_exceeded(format!(
                "`{}` did not register within {DEPLOY_TIMEOUT:?}: check that it runs, that it \
                 can reach the configuration server, and its log",
                p.name
            ))),
        }
    })
    .await
}
