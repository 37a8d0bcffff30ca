//! Where an item goes when the operator does not say: among the process servers of the
//! machine's site, the connected one (not in critical health) that carries the fewest active
//! items (`items` holds the active ones), as ASR's scale-out process servers share the load;
//! ties go to the first name. And the master target a reprotect writes to: one of the
//! target site and the machine's OS that sees the machine's original datastore, connected
//! ones first.

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

/// The master target of `site` a reprotect writes to when none is named: one of the
/// machine's OS, then one that sees `datastore` (the original location), connected ones
/// first, then by name.
pub fn default_master_target<'a>(
    state: &State,
    components: &'a [ComponentRow],
    site: &str,
    datastore: &str,
    os: Option<failback_common::os::Os>,
) -> Option<&'a ComponentRow> {
    components
        .iter()
        .filter(|c| c.role == "master-target" && c.site == site)
        .min_by_key(|c| {
            (
                os.is_some() && c.os.is_some() && c.os != os,
                !c.datastores.iter().any(|d| d.name == datastore),
                !state.connected(&c.name),
                c.name.clone(),
            )
        })
}
