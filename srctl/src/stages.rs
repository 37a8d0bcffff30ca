//! The drill's stages, in order: what `srctl drill` runs and what a scenario's faults name.

pub const STAGES: [&str; 7] = [
    "enable-replication",
    "failover-to-azure",
    "commit-azure",
    "reprotect-to-onprem",
    "failback",
    "commit-onprem",
    "reprotect-to-azure",
];
