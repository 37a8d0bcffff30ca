//! A machine's app-consistency scripts, as ASR's custom pre and post scripts on Linux: the
//! pre script quiesces the application (e.g. `sqlite3 DB 'PRAGMA wal_checkpoint(TRUNCATE)'`
//! and a filesystem sync) before an app-consistent tag, the post script lets it go on after.
//! Configured per machine in the host's config:
//!
//! ```toml
//! [app_scripts.vm1]
//! pre = "sqlite3 /mnt/vm1/app.db 'PRAGMA wal_checkpoint(TRUNCATE)' && sync -f /mnt/vm1"
//! post = "logger thawed"
//! timeout = "30s"
//! ```
//!
//! Each runs as `sh -c COMMAND` with `FBL_MACHINE`, `FBL_POINT` (the tag's id) and
//! `FBL_STAGE` (`pre` or `post`) set. A pre script that fails or outlasts its timeout (it is
//! killed then) makes the point crash-consistent, and the item shows why (ASR raises a
//! warning); a failing post script is logged and reported the same way, the point stays.

use std::time::Duration;

use serde::Deserialize;

/// One machine's scripts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppScripts {
    #[serde(default)]
    pub pre: Option<String>,
    #[serde(default)]
    pub post: Option<String>,
    /// How long each may run (default 30 s).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

/// Which script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Pre,
    Post,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Pre => "pre",
            Stage::Post => "post",
        }
    }
}

impl AppScripts {
    /// Runs the script of `stage` (if configured) for point `point` of `machine`, within
    /// `limit` (at most the configured timeout). The error says what failed and how.
    pub async fn run(
        &self,
        stage: Stage,
        machine: &str,
        point: &str,
        limit: Option<Duration>,
    ) -> Result<(), String> {
        let command = match stage {
            Stage::Pre => &self.pre,
            Stage::Post => &self.post,
        };
        let Some(command) = command else {
            return Ok(());
        };
        let timeout = limit.map_or(self.timeout, |l| l.min(self.timeout));
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .env("FBL_MACHINE", machine)
            .env("FBL_POINT", point)
            .env("FBL_STAGE", stage.as_str())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("the {} script could not start: {e}", stage.as_str()))?;
        match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Err(_) => Err(format!(
                "the {} script did not finish within {timeout:?} and was killed",
                stage.as_str()
            )),
            Ok(Err(e)) => Err(format!("the {} script: {e}", stage.as_str())),
            Ok(Ok(out)) if out.status.success() => Ok(()),
            Ok(Ok(out)) => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let last = stderr.lines().last().unwrap_or("").trim();
                Err(format!(
                    "the {} script failed ({}){}",
                    stage.as_str(),
                    out.status,
                    if last.is_empty() {
                        String::new()
                    } else {
                        format!(": {last}")
                    }
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scripts(pre: &str, timeout_ms: u64) -> AppScripts {
        AppScripts {
            pre: Some(pre.into()),
            post: None,
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    #[tokio::test]
    async fn a_script_sees_its_point_and_its_failure_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("marker");
        let ok = scripts(
            &format!(
                "echo \"$FBL_MACHINE $FBL_POINT $FBL_STAGE\" > {}",
                marker.display()
            ),
            5000,
        );
        ok.run(Stage::Pre, "vm1", "app-1", None)
            .await
            .expect("runs");
        assert_eq!(
            std::fs::read_to_string(&marker).expect("marker"),
            "vm1 app-1 pre\n"
        );
        assert_eq!(ok.run(Stage::Post, "vm1", "app-1", None).await, Ok(()));

        let failing = scripts("echo 'database is locked' >&2; exit 3", 5000);
        let e = failing
            .run(Stage::Pre, "vm1", "app-2", None)
            .await
            .expect_err("fails");
        assert!(
            e.contains("the pre script failed") && e.contains("database is locked"),
            "{e}"
        );

        let slow = scripts("sleep 30", 200);
        let t0 = std::time::Instant::now();
        let e = slow
            .run(Stage::Pre, "vm1", "app-3", None)
            .await
            .expect_err("times out");
        assert!(e.contains("did not finish within"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
}
