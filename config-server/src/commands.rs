//! The commands the CS sends components for an item, built from its rows: what a target
//! needs to hold the replica, what an agent needs to replicate. Used by the jobs that start
//! replication and by `reports::resume`, which re-sends them when a component reconnects.

use failback_proto::pb::control::{
    DiskInfo, Peer, PrepareReplica, SetRoute, StartReplication, command,
};
use failback_proto::pb::operator::{Policy, Verification};

use crate::item::{Direction, ItemRow, Placement};
use crate::store::ComponentRow;

/// The address of `component` as reachable from `site`.
pub fn address_for(row: &ComponentRow, site: &str) -> Option<String> {
    row.addresses.get(site).cloned()
}

/// The on-premises location of `machine` on `host` (empty for a machine outside onprem): the
/// host, its datastore and the disks' paths relative to that datastore, as the host reported.
pub fn home_of(machine: &ComponentRow, host: Option<&ComponentRow>) -> Placement {
    let Some(host) = host.filter(|_| machine.site == "onprem" && !machine.host.is_empty()) else {
        return Placement::default();
    };
    let mut home = Placement {
        home_host: host.name.clone(),
        ..Placement::default()
    };
    for d in &machine.disks {
        let Some(ds) = host.datastores.iter().find(|ds| ds.name == d.datastore) else {
            return Placement::default();
        };
        let Ok(rel) = std::path::Path::new(&d.path).strip_prefix(&ds.path) else {
            return Placement::default();
        };
        home.home_datastore = ds.name.clone();
        home.home_disks
            .push((d.id.clone(), rel.display().to_string(), d.size));
    }
    home
}

/// The certificate of `row` as a receiver checks it.
pub fn peer(row: &ComponentRow) -> Peer {
    Peer {
        name: row.name.clone(),
        fingerprint: row.cert_fingerprint.clone(),
    }
}

/// To the item's process server: forward to `target` at `address`, accepting batches from
/// the machine's agent only.
pub fn route(item: &ItemRow, target: &str, address: &str, machine: &ComponentRow) -> command::Kind {
    command::Kind::SetRoute(SetRoute {
        item: item.id.clone(),
        target: target.to_string(),
        target_address: address.to_string(),
        source: Some(peer(machine)),
        start_after: 0,
    })
}

/// To the target: create (or open) the item's replica, accepting batches from the process
/// server `ps` only.
pub fn prepare(
    item: &ItemRow,
    machine: &ComponentRow,
    ps: &ComponentRow,
    policy: &Policy,
) -> command::Kind {
    command::Kind::PrepareReplica(PrepareReplica {
        item: item.id.clone(),
        datastore: item.datastore.clone(),
        disks: machine
            .disks
            .iter()
            .map(|d| DiskInfo {
                id: d.id.clone(),
                datastore: d.datastore.clone(),
                path: d.path.clone(),
                size_bytes: d.size,
            })
            .collect(),
        retention_ms: policy.retention_s * 1000,
        seed: seed_of(item, machine),
        retention_drive: String::new(),
        sender: Some(peer(ps)),
        // Before its first copy completes, an item's replica may not exist yet.
        existing: !matches!(
            item.state,
            crate::item::ItemState::Enabling
                | crate::item::ItemState::InitialReplication
                | crate::item::ItemState::Reprotecting
        ),
    })
}

/// To the agent: replicate to `ps` at `ps_address` with the policy's tag intervals.
pub fn start(item: &ItemRow, ps: &str, ps_address: &str, policy: &Policy) -> command::Kind {
    // Members of a replication group take only the tags the CS coordinates.
    let grouped = !item.replication_group.is_empty();
    command::Kind::StartReplication(StartReplication {
        item: item.id.clone(),
        process_server: ps.to_string(),
        ps_address: ps_address.to_string(),
        crash_interval_ms: if grouped {
            0
        } else {
            policy.crash_interval_s * 1000
        },
        app_interval_ms: if grouped {
            0
        } else {
            policy.app_interval_s * 1000
        },
        verify_tags: policy.verification != Verification::Off as i32,
        compare_initial: item.placement.seeded,
        batches_lost: false,
    })
}

/// The seed of a reprotected item's replica (empty if it was not seeded): the original
/// on-premises disks, or the previous Azure replica. Re-sent when the master target
/// reconnects, so a replica lost before it was created is seeded again.
pub fn seed_of(item: &ItemRow, machine: &ComponentRow) -> Vec<DiskInfo> {
    let p = &item.placement;
    if !p.seeded {
        return Vec::new();
    }
    if item.direction == Direction::Reverse {
        p.home_disk_infos()
    } else {
        machine
            .disks
            .iter()
            .map(|d| DiskInfo {
                id: d.id.clone(),
                datastore: item.datastore.clone(),
                path: format!("replicas/{}/disks/{}.img", p.seed_item, d.id),
                size_bytes: d.size,
            })
            .collect()
    }
}
