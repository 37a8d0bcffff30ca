//! Where an item goes when the operator does not say: among the process servers of the
//! machine's site, the connected one (not in critical health) that carries the fewest active
//! items (`items` holds the active ones), as ASR's scale-out process servers share the load;
//! ties go to the first name. And the master target a reprotect writes to: one of the
//! target site and the machine's OS that sees the machine's original datastore and has room
//! for its disks, connected ones first.

use failback_proto::pb::control::Health;

use crate::item::ItemRow;
use crate::state::State;
use crate::store::ComponentRow;

/// The least loaded usable process server of `site`, if any.
pub fn least_loaded_ps<'a>(
    state: &State,
    components: &'a [ComponentRow],
    items: &[ItemRow],
    site: &str,
) -> Option<&'a ComponentRow> {
    components
        .iter()
        .filter(|c| c.role == "process-server" && c.site == site)
        .filter(|c| state.connected(&c.name))
        .filter(|c| {
            state
                .ps_health(&c.name)
                .is_none_or(|h| h.cache_health() != Health::Critical)
        })
        .min_by_key(|c| {
            let load = items.iter().filter(|i| i.process_server == c.name).count();
            (load, c.name.clone())
        })
}

/// What a reprotect asks of the master target it writes to when none is named.
pub struct MasterTargetNeed<'a> {
    /// The site the machine replicates to.
    pub site: &'a str,
    /// The machine's original datastore (its location when failing back).
    pub datastore: &'a str,
    pub os: Option<failback_common::os::Os>,
    /// The machine's disks.
    pub disks: usize,
    /// The item the reprotect replaces (its disks are not counted as in use).
    pub replacing: &'a str,
    /// Most disks one master target may serve.
    pub limit: usize,
}

/// The disks master target `mt` serves now: those of the machines of the active items
/// (`items`) written to it, but for item `except`.
pub fn disks_in_use(
    components: &[ComponentRow],
    items: &[ItemRow],
    mt: &str,
    except: &str,
) -> usize {
    items
        .iter()
        .filter(|i| i.target == mt && i.id != except)
        .filter_map(|i| components.iter().find(|c| c.name == i.machine))
        .map(|c| c.disks.len())
        .sum()
}

/// The master target of `need.site` a reprotect writes to when none is named: one of the
/// machine's OS, then one that sees the original datastore, then one with room for the
/// machine's disks (ASR: at most 60 a master target), connected ones first, then by name
/// (so master targets fill up in order).
pub fn default_master_target<'a>(
    state: &State,
    components: &'a [ComponentRow],
    items: &[ItemRow],
    need: &MasterTargetNeed,
) -> Option<&'a ComponentRow> {
    components
        .iter()
        .filter(|c| c.role == "master-target" && c.site == need.site)
        .min_by_key(|c| {
            let room =
                disks_in_use(components, items, &c.name, need.replacing) + need.disks <= need.limit;
            (
                need.os.is_some() && c.os.is_some() && c.os != need.os,
                !c.datastores.iter().any(|d| d.name == need.datastore),
                !room,
                !state.connected(&c.name),
                c.name.clone(),
            )
        })
}
