//! What the compose and the Swarm renderings of a topology share: the fixed ports inside the
//! containers, the user the image runs the lab as, and a component as a container places it.

use failback_common::identity::Site;

/// The user the image runs the lab's processes as (`deploy/build-images`).
pub const LAB_UID: u32 = 10001;

/// The CS's enrollment and API ports, and vpn-link's control port, in every container.
pub const CS_ENROLL_PORT: u16 = 7001;
pub const CS_API_PORT: u16 = 7002;
pub const LINK_CONTROL_PORT: u16 = 7000;

/// A component as a container: its name, binary, site, port, datastores, and whether it is
/// declared for later (defined, not started).
pub struct Component {
    pub name: String,
    pub binary: &'static str,
    pub site: Site,
    pub port: u16,
    pub datastores: Vec<String>,
    pub later: bool,
}
