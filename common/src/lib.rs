//! Plumbing shared by every Failback Lab binary.
//!
//! # Layout
//! - [`component`]: start-up shared by all components: enroll, control stream, Hello.
//! - [`config`]: layered config (defaults, TOML file, environment) with errors naming file and key.
//! - [`identity`]: roles, sites, the identity in a lab certificate, per-RPC authorization.
//! - [`certs`]: PEM/DER and certificate fingerprints.
//! - [`tls`]: credentials on disk, mutual-TLS server and client settings.
//! - [`trust`]: revoked certificates and the client verifier that refuses them.
//! - [`renewal`]: credentials that are renewed while the component runs.
//! - [`listener`]: accepting TLS connections under a cap and a handshake deadline.
//! - [`metrics`]: the process's Prometheus registry and its bounded `/metrics` endpoint.
//! - [`blocks`]: block digests for comparing two copies of a disk.
//! - [`direct`]: page-cache-free (`O_DIRECT`) writes of aligned spans.
//! - [`durable`]: state files written whole and durably (fsync, rename, directory fsync).
//! - [`vdisk`]: a disk as stored: a raw sparse file or an overlay over a frozen, shared base.
//! - [`fence`]: one live replication stream per item at a receiver.
//! - [`os`]: a machine's or master target's operating system.
//! - [`paths`]: paths built from what peers send stay inside their datastore or directory.
//! - [`enroll`]: one-time enrollment with the configuration server (passphrase + CSR).
//! - [`control`]: the self-reconnecting control stream to the configuration server.
//! - [`server`]: serving a tonic router on an already bound listener until shutdown;
//!   [`limits`]: the transport limits servers and clients share.
//! - [`telemetry`]: tracing setup.
pub mod blocks;
pub mod certs;
pub mod coalesce;
pub mod component;
pub mod config;
pub mod control;
pub mod direct;
pub mod durable;
pub mod enroll;
pub mod fence;
pub mod identity;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod os;
pub mod paths;
pub mod procstat;
pub mod renewal;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod trust;
pub mod vdisk;

/// The version every component reports at registration.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
