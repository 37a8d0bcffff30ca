//! Failure scenarios for `srctl drill --scenario FILE`: faults injected at a stage of the drill.
//!
//! A scenario is a TOML file:
//!
//! ```toml
//! description = "ps-azure killed while reprotect synchronises"
//! [drill]                      # optional: machines, disk_size, rate (MB/s per machine)
//! disk_size = "32MiB"
//! [env]                        # optional: environment of every lab process (config overrides)
//! FBL_PS__CACHE_CAPACITY = "48MiB"
//! [[fault]]
//! stage = "reprotect-to-onprem" # a drill stage
//! at_progress = 0.0            # 0..1 of the stage's job (or `after = "2s"` from the stage's start)
//! action = "kill"              # kill | restart | pause | resume (target = COMPONENT),
//! target = "ps-azure"          # link-down | link-up | link-set (latency, jitter, bandwidth)
//! duration = "3s"              # undone after this long; "stage": when the stage ends
//! ```
//!
//! Everything is checked before the drill starts: an unknown stage, component or action, a
//! missing target or trigger, or link settings on another action are refused with a clear
//! error. Undoing: kill -> restart, pause -> resume, link-down -> link-up, link-set -> clear.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::stages::STAGES;

/// Components of the default lab a fault can target.
pub const COMPONENTS: [&str; 8] = [
    "cs",
    "vpn",
    "ps-onprem",
    "mt-onprem",
    "esx-1",
    "azure-target",
    "ps-azure",
    "azure-compute",
];

/// Whether `name` is one of [`COMPONENTS`] or a further on-premises master target of the
/// default shape (`mt-onprem-2`, ... : a lab of more than 60 disks has them).
fn known_component(name: &str) -> bool {
    COMPONENTS.contains(&name)
        || name
            .strip_prefix("mt-onprem-")
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| n >= 2)
}

const ACTIONS: [&str; 7] = [
    "kill",
    "restart",
    "pause",
    "resume",
    "link-down",
    "link-up",
    "link-set",
];

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillSettings {
    pub machines: Option<usize>,
    pub disk_size: Option<String>,
    pub rate: Option<f64>,
    /// Run the stages through one recovery plan (`srctl drill --plan`).
    pub plan: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    #[serde(default)]
    description: String,
    #[serde(default)]
    drill: DrillSettings,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    fault: Vec<RawFault>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFault {
    stage: String,
    after: Option<String>,
    at_progress: Option<f64>,
    action: String,
    target: Option<String>,
    duration: Option<String>,
    latency: Option<String>,
    jitter: Option<String>,
    bandwidth: Option<String>,
}

/// When a fault is injected, relative to its stage.
#[derive(Debug, Clone, PartialEq)]
pub enum Trigger {
    After(Duration),
    AtProgress(f64),
}

/// How long a fault lasts.
#[derive(Debug, Clone, PartialEq)]
pub enum Until {
    /// Not undone by the drill (restart, resume, link-up, or a fault left in place).
    Never,
    For(Duration),
    StageEnd,
}

#[derive(Debug, Clone)]
pub struct Fault {
    pub stage: String,
    pub trigger: Trigger,
    pub action: String,
    pub target: String,
    pub until: Until,
    pub link: crate::link::SetArgs,
}

impl Fault {
    /// A short description: "kill ps-azure", "link-set latency 100ms bandwidth 10Mbit".
    pub fn describe(&self) -> String {
        if self.target.is_empty() {
            self.action.clone()
        } else {
            format!("{} {}", self.action, self.target)
        }
    }

    /// The action that undoes this one, if any.
    pub fn undo(&self) -> Option<&'static str> {
        match self.action.as_str() {
            "kill" => Some("restart"),
            "pause" => Some("resume"),
            "link-down" => Some("link-up"),
            "link-set" => Some("link-clear"),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub drill: DrillSettings,
    pub env: BTreeMap<String, String>,
    pub faults: Vec<Fault>,
}

/// What happened to one fault during the drill (part of the report).
#[derive(Debug, Clone, Default, Serialize)]
pub struct FaultReport {
    pub stage: String,
    pub fault: String,
    /// Seconds since the drill began; None if the stage ended before the trigger.
    pub injected_at_s: Option<f64>,
    pub undone_at_s: Option<f64>,
    /// Seconds from the undo (or the injection, for faults that need none) until every
    /// drilled item was healthy again.
    pub healthy_after_s: Option<f64>,
    /// The worst health of the drilled items while the fault lasted, and their errors.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub health_seen: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors_seen: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

fn duration(what: &str, s: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(s)
        .map_err(|e| anyhow::anyhow!("{what} `{s}` is not a duration like 3s or 500ms: {e}"))
}

/// Reads and checks a scenario file; nothing runs if it is wrong.
pub fn load(path: &Path) -> anyhow::Result<Scenario> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read scenario {}: {e}", path.display()))?;
    parse(&text)
        .map(|mut s| {
            s.name = path
                .file_stem()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            s
        })
        .map_err(|e| anyhow::anyhow!("scenario {}: {e:#}", path.display()))
}

pub fn parse(text: &str) -> anyhow::Result<Scenario> {
    let raw: RawScenario = toml::from_str(text)?;
    let mut faults = Vec::new();
    for (i, f) in raw.fault.into_iter().enumerate() {
        let at = |m: String| anyhow::anyhow!("fault {} ({}): {m}", i + 1, f.action);
        if !STAGES.contains(&f.stage.as_str()) {
            return Err(at(format!(
                "unknown stage `{}`; the stages are {}",
                f.stage,
                STAGES.join(", ")
            )));
        }
        if !ACTIONS.contains(&f.action.as_str()) {
            return Err(at(format!(
                "unknown action `{}`; the actions are {}",
                f.action,
                ACTIONS.join(", ")
            )));
        }
        let needs_target = matches!(f.action.as_str(), "kill" | "restart" | "pause" | "resume");
        let target = f.target.clone().unwrap_or_default();
        if needs_target && !known_component(&target) {
            return Err(at(if target.is_empty() {
                format!("needs `target = COMPONENT` ({})", COMPONENTS.join(", "))
            } else {
                format!(
                    "unknown component `{target}`; the components are {} (and mt-onprem-2, ... \
                     in a lab of more than 60 disks)",
                    COMPONENTS.join(", ")
                )
            }));
        }
        if !needs_target && f.target.is_some() {
            return Err(at("takes no target (it acts on the link)".into()));
        }
        let trigger = match (&f.after, f.at_progress) {
            (Some(a), None) => Trigger::After(duration("after", a).map_err(|e| at(e.to_string()))?),
            (None, Some(p)) if (0.0..=1.0).contains(&p) => Trigger::AtProgress(p),
            (None, Some(p)) => return Err(at(format!("at_progress {p} is not within 0..1"))),
            (None, None) => Trigger::After(Duration::ZERO),
            (Some(_), Some(_)) => return Err(at("give `after` or `at_progress`, not both".into())),
        };
        let mut link = crate::link::SetArgs::default();
        if f.action == "link-set" {
            if let Some(l) = &f.latency {
                link.latency = Some(crate::link::parse_ms(l).map_err(at)?);
            }
            if let Some(j) = &f.jitter {
                link.jitter = Some(crate::link::parse_ms(j).map_err(at)?);
            }
            if let Some(b) = &f.bandwidth {
                link.bandwidth = Some(crate::link::parse_bandwidth(b).map_err(at)?);
            }
            if f.latency.is_none() && f.jitter.is_none() && f.bandwidth.is_none() {
                return Err(at("needs latency, jitter or bandwidth".into()));
            }
        } else if f.latency.is_some() || f.jitter.is_some() || f.bandwidth.is_some() {
            return Err(at("latency, jitter and bandwidth belong to link-set".into()));
        }
        let until = match f.duration.as_deref() {
            None => Until::Never,
            Some("stage") => Until::StageEnd,
            Some(d) => Until::For(duration("duration", d).map_err(|e| at(e.to_string()))?),
        };
        let fault = Fault {
            stage: f.stage.clone(),
            trigger,
            action: f.action.clone(),
            target,
            until,
            link,
        };
        if fault.until != Until::Never && fault.undo().is_none() {
            return Err(at(format!(
                "`{}` can't be undone, so it takes no duration",
                fault.action
            )));
        }
        faults.push(fault);
    }
    if let Some(d) = &raw.drill.disk_size {
        crate::parse_size(d).map_err(|e| anyhow::anyhow!("drill.disk_size: {e}"))?;
    }
    Ok(Scenario {
        name: String::new(),
        description: raw.description,
        drill: raw.drill,
        env: raw.env,
        faults,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_scenario_parses() {
        let s = parse(
            r#"
            description = "x"
            [drill]
            disk_size = "16MiB"
            [[fault]]
            stage = "reprotect-to-onprem"
            at_progress = 0.5
            action = "kill"
            target = "ps-azure"
            duration = "3s"
            [[fault]]
            stage = "failback"
            action = "link-set"
            latency = "100ms"
            bandwidth = "10Mbit"
            duration = "stage"
            "#,
        )
        .expect("a valid scenario");
        assert_eq!(s.faults.len(), 2);
        assert_eq!(s.faults[0].trigger, Trigger::AtProgress(0.5));
        assert_eq!(s.faults[0].until, Until::For(Duration::from_secs(3)));
        assert_eq!(s.faults[1].until, Until::StageEnd);
        assert_eq!(s.faults[1].link.bandwidth, Some(1_250_000));
    }

    #[test]
    fn the_shipped_scale_scenarios_parse() {
        for (name, text) in [
            (
                "sixty",
                include_str!(
                    "../../deploy/scenarios-scale/sixty-machines-faults-during-reprotect.toml"
                ),
            ),
            (
                "hundred",
                include_str!(
                    "../../deploy/scenarios-scale/hundred-machines-plan-faults-during-reprotect.toml"
                ),
            ),
        ] {
            let s = parse(text).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            assert_eq!(s.faults.len(), 3, "{name}");
        }
        let s = parse(include_str!(
            "../../deploy/scenarios-scale/hundred-machines-plan-faults-during-reprotect.toml"
        ))
        .expect("valid");
        assert_eq!((s.drill.machines, s.drill.plan), (Some(100), Some(true)));
        let s = parse("[[fault]]\nstage='failback'\naction='kill'\ntarget='mt-onprem-2'")
            .expect("a further master target of the default shape");
        assert_eq!(s.faults[0].target, "mt-onprem-2");
    }

    #[test]
    fn mistakes_are_refused_with_what_is_wrong() {
        for (toml, expect) in [
            (
                "[[fault]]\nstage='reprotect'\naction='kill'\ntarget='cs'",
                "unknown stage `reprotect`",
            ),
            (
                "[[fault]]\nstage='failback'\naction='explode'",
                "unknown action `explode`",
            ),
            (
                "[[fault]]\nstage='failback'\naction='kill'\ntarget='ps-mars'",
                "unknown component `ps-mars`",
            ),
            (
                "[[fault]]\nstage='failback'\naction='kill'\ntarget='mt-onprem-1'",
                "unknown component `mt-onprem-1`",
            ),
            (
                "[[fault]]\nstage='failback'\naction='kill'",
                "needs `target = COMPONENT`",
            ),
            (
                "[[fault]]\nstage='failback'\naction='restart'\ntarget='cs'\nduration='2s'",
                "can't be undone",
            ),
            (
                "[[fault]]\nstage='failback'\naction='link-down'\nat_progress=2.0",
                "not within 0..1",
            ),
            (
                "[[fault]]\nstage='failback'\naction='link-set'",
                "needs latency, jitter or bandwidth",
            ),
            (
                "[[fault]]\nstage='failback'\naction='link-down'\nwhen='now'",
                "unknown field",
            ),
        ] {
            let e = format!("{:#}", parse(toml).expect_err(toml));
            assert!(e.contains(expect), "{toml}: {e}");
        }
    }
}
