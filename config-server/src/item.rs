//! The leaf types of the control plane: a replicated item and its one state machine, jobs and
//! their steps, policies. Nothing here touches the database or the network.
//!
//! # The item state machine
//! Every change of an item's state goes through [`ItemState::transition`], which refuses an
//! edge that is not in [`ItemState::can_become`] (the diagram is in docs/ARCHITECTURE.md).
//! States are stored as ASR's labels (their `Display`), so databases written before the enum
//! existed read back unchanged.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use failback_proto::pb::control::{DiskInfo, DiskState, ReplicationPhase};
use failback_proto::pb::operator::{FailoverKind, Policy, SyncMode, Verification};
use serde::{Deserialize, Serialize};

/// Defines a closed set of labels: `Display` and `FromStr` over the exact text, and `ALL`.
macro_rules! labels {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $v),+ }
        impl $name {
            #[allow(dead_code)]
            pub const ALL: &'static [$name] = &[$($name::$v),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$v => $text),+ }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$v),)+
                    other => Err(format!(
                        "`{other}` is not a {}; one of: {}",
                        stringify!($name),
                        [$($text),+].join(", ")
                    )),
                }
            }
        }
    };
}

labels! {
    /// A replicated item's state, in ASR's words.
    ItemState {
        Enabling => "Enabling protection",
        InitialReplication => "Initial replication in progress",
        Protected => "Protected",
        Resyncing => "Resynchronization in progress",
        ResyncRequired => "Resync required",
        Reprotecting => "Reprotect in progress",
        FailoverInProgress => "Failover in progress",
        FailoverCompleted => "Failover completed",
        FailoverCommitted => "Failover committed",
        TestFailoverInProgress => "Test failover in progress",
        TestFailoverCompleted => "Test failover completed",
        /// A failover cancelled by force: replication is stopped; the failover must run again.
        FailoverCancelled => "Failover cancelled: run the failover again",
        /// A failback interrupted while it wrote the on-premises disks (ASR: the target VM is
        /// corrupted); running the failover again completes it.
        FailbackInconsistent =>
            "Failover cancelled: the on-premises VM is inconsistent; run the failover again",
        /// "Disable replication" runs: the item is being removed from every component.
        Disabling => "Disabling replication",
    }
}

/// An item state change that the state machine does not allow.
#[derive(Debug, thiserror::Error)]
#[error("`{item}` is {from}: it can't become {to}")]
pub struct TransitionError {
    pub item: String,
    pub from: ItemState,
    pub to: ItemState,
}

impl From<TransitionError> for tonic::Status {
    fn from(e: TransitionError) -> Self {
        tonic::Status::failed_precondition(e.to_string())
    }
}

impl ItemState {
    /// The edges of the state machine.
    pub fn can_become(self, to: ItemState) -> bool {
        use ItemState::*;
        if to == Disabling {
            // Replication can be disabled from anywhere but the middle of a failover.
            return !matches!(
                self,
                FailoverInProgress | TestFailoverInProgress | TestFailoverCompleted
            );
        }
        match self {
            Enabling => matches!(to, InitialReplication | Protected | ResyncRequired),
            InitialReplication => matches!(to, Protected | ResyncRequired),
            Protected => matches!(
                to,
                Resyncing | ResyncRequired | FailoverInProgress | TestFailoverInProgress
            ),
            Resyncing => matches!(to, Protected | ResyncRequired),
            ResyncRequired => matches!(to, Resyncing | Protected),
            Reprotecting => matches!(to, Protected | ResyncRequired),
            FailoverInProgress => matches!(
                to,
                FailoverCompleted | Protected | FailoverCancelled | FailbackInconsistent
            ),
            FailoverCompleted => {
                matches!(
                    to,
                    FailoverInProgress | FailoverCommitted | FailbackInconsistent
                )
            }
            FailoverCommitted => false,
            TestFailoverInProgress => matches!(to, TestFailoverCompleted | Protected),
            TestFailoverCompleted => matches!(to, Protected),
            FailoverCancelled => matches!(to, FailoverInProgress),
            FailbackInconsistent => matches!(to, FailoverInProgress),
            Disabling => false,
        }
    }

    /// The one way an item's state changes: `to` if the machine allows it from `self`.
    pub fn transition(self, item: &str, to: ItemState) -> Result<ItemState, TransitionError> {
        if self == to {
            return Ok(to);
        }
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(TransitionError {
                item: item.to_string(),
                from: self,
                to,
            })
        }
    }

    /// A failover of this item may start (or run again).
    pub fn can_fail_over(self) -> bool {
        matches!(
            self,
            ItemState::Protected | ItemState::FailoverCancelled | ItemState::FailbackInconsistent
        )
    }

    /// The item no longer replicates: its machine runs at the target site now.
    pub fn failed_over(self) -> bool {
        matches!(
            self,
            ItemState::FailoverInProgress
                | ItemState::FailoverCompleted
                | ItemState::FailoverCommitted
        )
    }
}

labels! {
    /// Which way an item replicates.
    Direction {
        /// onprem -> azure
        Forward => "forward",
        /// azure -> onprem (after a failover: reprotect, then failback)
        Reverse => "reverse",
    }
}

impl Direction {
    /// The direction of a machine replicating from `site`.
    pub fn from_site(site: &str) -> Direction {
        if site == "azure" {
            Direction::Reverse
        } else {
            Direction::Forward
        }
    }
}

labels! {
    /// A job's state.
    JobState {
        InProgress => "In progress",
        /// Held at a manual action (or a test hook) until `srctl job resume`.
        Waiting => "Waiting",
        Succeeded => "Succeeded",
        Failed => "Failed",
    }
}

impl JobState {
    pub fn is_running(self) -> bool {
        matches!(self, JobState::InProgress | JobState::Waiting)
    }
}

labels! {
    /// A job step's state.
    StepState {
        InProgress => "In progress",
        Waiting => "Waiting",
        Succeeded => "Succeeded",
        Failed => "Failed",
        Skipped => "Skipped",
    }
}

labels! {
    /// What a job does: decides how it is resumed after a restart.
    JobKind {
        Enable => "enable",
        Disable => "disable",
        Failover => "failover",
        Commit => "commit",
        CleanupTest => "cleanup-test",
        Reprotect => "reprotect",
        Resync => "resync",
        Plan => "plan",
        PlanReprotect => "plan-reprotect",
        Deploy => "deploy",
        SwitchPs => "switch-ps",
    }
}

/// The failover kinds, with their job names.
pub fn failover_job_name(kind: FailoverKind) -> &'static str {
    match kind {
        FailoverKind::Unspecified | FailoverKind::Unplanned => "Failover",
        FailoverKind::Planned => "Planned failover",
        FailoverKind::Test => "Test failover",
        FailoverKind::ChangePoint => "Change recovery point",
    }
}

/// `--sync` as the user types it.
pub fn sync_label(s: SyncMode) -> &'static str {
    match s {
        SyncMode::Unspecified | SyncMode::BeforeFailover => "before-failover",
        SyncMode::FullDownload => "full-download",
    }
}

/// The agent's phase as stored in `Progress::phase`.
pub fn phase_label(p: ReplicationPhase) -> &'static str {
    match p {
        ReplicationPhase::Unspecified => "",
        ReplicationPhase::Initial => "initial",
        ReplicationPhase::Delta => "delta",
        ReplicationPhase::Resync => "resync",
        ReplicationPhase::ResyncRequired => "resync-required",
    }
}

/// ASR's disk state words.
pub fn disk_state_label(s: DiskState) -> &'static str {
    match s {
        DiskState::Unspecified | DiskState::InQueue => "In queue",
        DiskState::InProgress => "In progress",
        DiskState::Complete => "Complete",
    }
}

/// One disk at its place in a datastore: (disk id, path relative to the datastore, size).
pub type PlacedDisk = (String, String, u64);

/// Where a machine lives on-premises (its original location, where failback goes back to)
/// and how this item's replica started (kept as JSON in `items.placement`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Placement {
    /// The on-premises host and datastore of the machine and its disks.
    #[serde(default)]
    pub home_host: String,
    #[serde(default)]
    pub home_datastore: String,
    #[serde(default)]
    pub home_disks: Vec<PlacedDisk>,
    /// The host the source VM of this item runs on (the Azure VM's host for a reverse item:
    /// commit after failback deletes the VM there).
    #[serde(default)]
    pub source_host: String,
    /// The target replica was seeded with an older copy: the initial sync compares checksums.
    #[serde(default)]
    pub seeded: bool,
    /// Failback goes to a new VM in `datastore` on the master target's host.
    #[serde(default)]
    pub alternate: bool,
    /// The item whose replica seeded this one (removed once this one is Protected).
    #[serde(default)]
    pub seed_item: String,
}

impl Placement {
    /// The disks of the original on-premises location, as the master target names them
    /// (paths relative to the home datastore).
    pub fn home_disk_infos(&self) -> Vec<DiskInfo> {
        self.home_disks
            .iter()
            .map(|(id, path, size)| DiskInfo {
                id: id.clone(),
                datastore: self.home_datastore.clone(),
                path: path.clone(),
                size_bytes: *size,
            })
            .collect()
    }
}

/// What the agent last reported about an item (kept as JSON in `items.progress`, persisted
/// coalesced: on state changes and at most every few seconds).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    pub phase: String,
    pub disks: BTreeMap<String, (String, f64)>,
    pub bytes_sent: u64,
    pub bytes_per_second: f64,
    pub acked_seq: u64,
    #[serde(default)]
    pub resync_bytes: u64,
    #[serde(default)]
    pub resync_blocks_compared: u64,
    #[serde(default)]
    pub target_seq: u64,
    /// When (Unix ms) the agent learned that the target holds `target_seq`.
    #[serde(default)]
    pub target_seq_at_ms: i64,
    #[serde(default)]
    pub lag_p50_ms: f64,
    #[serde(default)]
    pub lag_p99_ms: f64,
    #[serde(default)]
    pub ps_down_since_ms: i64,
    /// Why the last app-consistent point became crash-consistent; empty when it did not.
    #[serde(default)]
    pub app_consistency_error: String,
    /// What held the machine's writes back within the last 10 s, and that limit (bytes).
    #[serde(default)]
    pub write_throttle: Option<(Throttle, u64)>,
}

/// Why a machine's writes wait for replication memory (its guest is throttled).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Throttle {
    /// The machine's own replication buffer is full.
    MachineBuffer,
    /// Its host's budget for all machines is used up.
    HostBudget,
}

impl Throttle {
    /// From an agent's report; `None` when nothing held the writes back.
    pub fn from_pb(t: failback_proto::pb::control::WriteThrottle) -> Option<Throttle> {
        use failback_proto::pb::control::WriteThrottle as W;
        match t {
            W::Unspecified => None,
            W::MachineBuffer => Some(Throttle::MachineBuffer),
            W::HostBudget => Some(Throttle::HostBudget),
        }
    }
}

impl Progress {
    /// Average initial-replication percentage over the item's disks.
    pub fn percent(&self) -> f64 {
        if self.disks.is_empty() {
            0.0
        } else {
            self.disks.values().map(|(_, p)| p).sum::<f64>() / self.disks.len() as f64
        }
    }
}

/// One replicated item: one machine replicating in one direction through one process server
/// to one target. Its id is `MACHINE-N`, never reused.
#[derive(Debug, Clone)]
pub struct ItemRow {
    pub id: String,
    pub machine: String,
    pub direction: Direction,
    pub state: ItemState,
    pub process_server: String,
    pub target: String,
    pub datastore: String,
    pub policy: String,
    pub replication_group: String,
    pub created_ms: i64,
    pub progress: Progress,
    pub failover_point: String,
    /// (disk, blake3) the source recorded with the failover point.
    pub failover_digests: Vec<(String, String)>,
    pub test_vm: String,
    pub placement: Placement,
}

/// Who takes part in an item and where it stands: what each report about it is checked
/// against (read without the item's JSON columns).
#[derive(Debug, Clone)]
pub struct ItemParties {
    pub id: String,
    pub machine: String,
    pub direction: Direction,
    pub state: ItemState,
    pub process_server: String,
    pub target: String,
}

#[cfg(test)]
impl ItemRow {
    /// For tests: item `id` of vm1, forward through ps-onprem to azure-target, in `state`.
    pub fn sample(id: &str, state: ItemState) -> ItemRow {
        ItemRow {
            id: id.into(),
            machine: "vm1".into(),
            direction: Direction::Forward,
            state,
            process_server: "ps-onprem".into(),
            target: "azure-target".into(),
            datastore: "azure-storage".into(),
            policy: "default".into(),
            replication_group: String::new(),
            created_ms: 1,
            progress: Progress::default(),
            failover_point: String::new(),
            failover_digests: Vec::new(),
            test_vm: String::new(),
            placement: Placement::default(),
        }
    }
}

impl ItemRow {
    /// A failback to the original location writes into the on-premises VM's own disks.
    pub fn in_place(&self) -> bool {
        self.direction == Direction::Reverse
            && !self.placement.alternate
            && !self.placement.home_disks.is_empty()
    }
}

/// The lab's default policy: ASR's shape, lab timers (points within a minute).
pub fn default_policy() -> Policy {
    Policy {
        name: "default".into(),
        rpo_threshold_s: 60,
        retention_s: 600,
        crash_interval_s: 5,
        app_interval_s: 30,
        failback_of: String::new(),
        verification: Verification::Digests as i32,
    }
}

/// ASR's failback twin of `p`: RPO threshold 15 min, retention 24 h, app-consistent 60 min.
pub fn failback_twin(p: &Policy) -> Policy {
    Policy {
        name: format!("{}-failback", p.name),
        rpo_threshold_s: 15 * 60,
        retention_s: 24 * 3600,
        crash_interval_s: p.crash_interval_s,
        app_interval_s: 60 * 60,
        failback_of: p.name.clone(),
        verification: p.verification,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_read_back_from_their_labels() {
        for s in ItemState::ALL {
            assert_eq!(s.to_string().parse::<ItemState>(), Ok(*s));
        }
        let e = "Sideways".parse::<ItemState>().expect_err("unknown");
        assert!(
            e.contains("not a ItemState") && e.contains("Protected"),
            "{e}"
        );
    }

    #[test]
    fn impossible_transitions_are_refused_with_both_states() {
        let e = ItemState::Protected
            .transition("vm1-1", ItemState::FailoverCommitted)
            .expect_err("commit of a Protected item");
        assert_eq!(
            e.to_string(),
            "`vm1-1` is Protected: it can't become Failover committed"
        );
        assert!(
            ItemState::FailoverCommitted
                .transition("vm1-1", ItemState::Protected)
                .is_err()
        );
        assert_eq!(
            ItemState::FailoverCompleted
                .transition("vm1-1", ItemState::FailoverCommitted)
                .ok(),
            Some(ItemState::FailoverCommitted)
        );
        // Every state but the terminal ones leads somewhere.
        for s in ItemState::ALL {
            let out = ItemState::ALL.iter().filter(|t| s.can_become(**t)).count();
            assert!(
                out > 0 || matches!(s, ItemState::FailoverCommitted | ItemState::Disabling),
                "{s} is a dead end"
            );
        }
    }
}
