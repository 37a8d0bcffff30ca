//! Jobs and their steps. A job row carries its kind and the request it was started with, so
//! that a restarted CS can resume it or fail it with a reason (see `jobs::recover`).

use failback_common::control::now_ms;
use failback_proto::pb::operator::{Job, JobStep};
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::{Db, DbError};
use crate::item::{JobKind, JobState, StepState};

/// One step of a job, as stored (JSON in `jobs.steps`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRow {
    pub name: String,
    pub state: String,
    pub started_ms: i64,
    pub ended_ms: i64,
    /// When the state last changed.
    pub time_ms: i64,
    /// 0..1 for a step that moves data.
    #[serde(default)]
    pub progress: Option<f64>,
}

impl StepRow {
    pub fn state(&self) -> Option<StepState> {
        self.state.parse().ok()
    }
}

/// Steps as older databases stored them: (name, state, time).
#[derive(Deserialize)]
#[serde(untagged)]
enum StoredStep {
    Now(StepRow),
    V1(String, String, i64),
}

fn steps_from_json(text: &str) -> Vec<StepRow> {
    serde_json::from_str::<Vec<StoredStep>>(text)
        .unwrap_or_default()
        .into_iter()
        .map(|s| match s {
            StoredStep::Now(s) => s,
            StoredStep::V1(name, state, time_ms) => StepRow {
                name,
                state,
                started_ms: time_ms,
                ended_ms: time_ms,
                time_ms,
                progress: None,
            },
        })
        .collect()
}

/// A stored job.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: i64,
    pub name: String,
    /// Empty for jobs written before kinds were stored.
    pub kind: Option<JobKind>,
    pub item: String,
    pub state: JobState,
    pub steps: Vec<StepRow>,
    pub started_ms: i64,
    pub ended_ms: i64,
    pub error: String,
    /// The request the job was started with (JSON), to resume it after a restart.
    pub params: String,
    pub parent: i64,
}

impl JobRow {
    pub fn to_pb(&self) -> Job {
        Job {
            id: self.id,
            name: self.name.clone(),
            item: self.item.clone(),
            state: self.state.to_string(),
            steps: self
                .steps
                .iter()
                .map(|s| JobStep {
                    name: s.name.clone(),
                    state: s.state.clone(),
                    time_ms: s.time_ms,
                    started_ms: s.started_ms,
                    ended_ms: s.ended_ms,
                    progress: s.progress,
                })
                .collect(),
            started_ms: self.started_ms,
            ended_ms: self.ended_ms,
            error: self.error.clone(),
            parent: self.parent,
        }
    }

    /// The step running now, if any.
    pub fn running_step(&self) -> Option<&StepRow> {
        self.steps.iter().rev().find(|s| {
            matches!(
                s.state(),
                Some(StepState::InProgress) | Some(StepState::Waiting)
            )
        })
    }
}

fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    let state: String = r.get(3)?;
    let kind: String = r.get(8)?;
    Ok(JobRow {
        id: r.get(0)?,
        name: r.get(1)?,
        item: r.get(2)?,
        state: state.parse().map_err(|e: String| {
            rusqlite::Error::FromSqlConversionFailure(3, rusqlite::types::Type::Text, e.into())
        })?,
        steps: steps_from_json(&r.get::<_, String>(4)?),
        started_ms: r.get(5)?,
        ended_ms: r.get(6)?,
        error: r.get(7)?,
        kind: kind.parse().ok(),
        params: r.get(9)?,
        parent: r.get(10)?,
    })
}

const JOB_COLUMNS: &str =
    "id, name, item, state, steps, started_ms, ended_ms, error, kind, params, parent";

impl Db<'_> {
    /// Records a new job, In progress, and returns its id.
    pub fn insert_job(
        &self,
        name: &str,
        kind: JobKind,
        item: &str,
        params: &str,
        parent: i64,
    ) -> Result<i64, DbError> {
        self.c.execute(
            "INSERT INTO jobs(name, item, state, started_ms, kind, params, parent)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                name,
                item,
                JobState::InProgress.as_str(),
                now_ms(),
                kind.as_str(),
                params,
                parent
            ],
        )?;
        Ok(self.c.last_insert_rowid())
    }

    pub fn job(&self, id: i64) -> Result<Option<JobRow>, DbError> {
        Ok(self
            .c
            .query_row(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
                [id],
                job_from_row,
            )
            .optional()?)
    }

    /// Every job (`parent` 0), or the jobs a plan job started.
    /// How many jobs are in each state (by its label).
    pub fn job_counts(&self) -> Result<Vec<(String, u64)>, DbError> {
        let mut stmt = self
            .c
            .prepare_cached("SELECT state, COUNT(*) FROM jobs GROUP BY state")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    pub fn jobs(&self, parent: i64) -> Result<Vec<JobRow>, DbError> {
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE ?1 = 0 OR parent = ?1 ORDER BY id"
        ))?;
        let rows = stmt
            .query_map([parent], job_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Jobs left running (after a restart: those to resume or fail).
    pub fn running_jobs(&self) -> Result<Vec<JobRow>, DbError> {
        let mut stmt = self.c.prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state IN (?1, ?2) ORDER BY id"
        ))?;
        let rows = stmt
            .query_map(
                [JobState::InProgress.as_str(), JobState::Waiting.as_str()],
                job_from_row,
            )?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// The job running on `item`, if any: (id, name).
    pub fn running_job(&self, item: &str) -> Result<Option<(i64, String)>, DbError> {
        Ok(self
            .c
            .query_row(
                "SELECT id, name FROM jobs WHERE item = ?1 AND state IN (?2, ?3)
                 ORDER BY id DESC LIMIT 1",
                params![
                    item,
                    JobState::InProgress.as_str(),
                    JobState::Waiting.as_str()
                ],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Sets step `name` of `job` to `state` (appending it if new); `progress` for steps that
    /// move data.
    pub fn set_step(
        &self,
        job: i64,
        name: &str,
        state: StepState,
        progress: Option<f64>,
    ) -> Result<(), DbError> {
        let steps: String =
            self.c
                .query_row("SELECT steps FROM jobs WHERE id = ?1", [job], |r| r.get(0))?;
        let mut steps = steps_from_json(&steps);
        let now = now_ms();
        let ended = matches!(
            state,
            StepState::Succeeded | StepState::Failed | StepState::Skipped
        );
        match steps.iter_mut().find(|s| s.name == name) {
            Some(s) => {
                if s.state != state.as_str() {
                    s.time_ms = now;
                }
                s.state = state.to_string();
                if ended {
                    s.ended_ms = now;
                }
                s.progress = if ended { None } else { progress };
            }
            None => steps.push(StepRow {
                name: name.to_string(),
                state: state.to_string(),
                started_ms: now,
                ended_ms: if ended { now } else { 0 },
                time_ms: now,
                progress: if ended { None } else { progress },
            }),
        }
        self.c.execute(
            "UPDATE jobs SET steps = ?2 WHERE id = ?1",
            params![job, serde_json::to_string(&steps).unwrap_or_default()],
        )?;
        Ok(())
    }

    /// In progress <-> Waiting.
    pub fn set_job_state(&self, job: i64, state: JobState) -> Result<(), DbError> {
        self.c.execute(
            "UPDATE jobs SET state = ?2 WHERE id = ?1",
            params![job, state.as_str()],
        )?;
        Ok(())
    }

    /// Ends a job: Succeeded, or Failed with `error`.
    pub fn end_job(&self, job: i64, error: Option<&str>) -> Result<(), DbError> {
        self.c.execute(
            "UPDATE jobs SET state = ?2, ended_ms = ?3, error = ?4 WHERE id = ?1",
            params![
                job,
                if error.is_some() {
                    JobState::Failed
                } else {
                    JobState::Succeeded
                }
                .as_str(),
                now_ms(),
                error.unwrap_or("")
            ],
        )?;
        Ok(())
    }
}
