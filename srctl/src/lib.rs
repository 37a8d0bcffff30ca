//! `srctl`: the operator's command line and the local lab runner.
//!
//! # Layout
//! - [`lab`]: `lab up|down|status`: the default two-site topology as OS processes on
//!   loopback, its directory layout (`lab.json`, one config, data dir and log per component).
//! - [`bench`]: benchmarks with a baseline measured in the same run.
//! - [`client`]: finding a lab (`--lab DIR` or `FAILBACK_LAB`) and dialing its CS as the
//!   enrolled operator, or its vpn-link control API.
//! - [`infra`]: `infra list|remove`.
//! - [`link`]: `link status|up|down`.

pub mod bench;
pub mod client;
pub mod infra;
pub mod item;
pub mod lab;
pub mod link;
