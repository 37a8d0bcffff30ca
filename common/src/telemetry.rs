//! Tracing setup shared by every binary: plain text to stderr (the lab redirects it to one
//! log file per component), filter from `RUST_LOG`, default `info`.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber once; later calls are no-ops (tests start many servers).
pub fn init(component: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
    tracing::debug!(component, "telemetry initialised");
}
