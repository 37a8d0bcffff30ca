//! The `vpn-link` binary: loads the config (exit 2 if invalid), binds the control API and
//! every route (exit 1 on failure), enrolls with the configuration server (first start) and
//! opens its control session, then relays and serves its control API over mutual TLS until
//! SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use failback_common::component::{advertised, hello, register};
use failback_proto::pb::control::Hello;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;
use vpn_link::{Config, Link};

/// The simulated site-to-site VPN between onprem and azure.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML config file (overridable with FBL_LINK__* environment variables).
    #[arg(long)]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    failback_common::telemetry::init("vpn-link");
    let config = match vpn_link::config::load(Some(&args.config)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vpn-link: {e}");
            return ExitCode::from(2);
        }
    };
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vpn-link: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    failback_common::tls::install_crypto_provider();
    failback_common::listener::raise_fd_limit();
    let control = TcpListener::bind(config.control_listen.as_str())
        .await
        .with_context(|| format!("control_listen: cannot listen on {}", config.control_listen))?;
    let control_addr = control.local_addr()?;
    let link = Link::bind(config.routes.clone()).await?;
    link.handle().set_settings(config.shaping);

    let stop = CancellationToken::new();
    tokio::spawn(failback_common::server::shutdown_on_signal(stop.clone()));

    // A component like the others: enrolled once, a control session to the CS (over which
    // it learns revocations), and its control API served over mutual TLS to operators.
    let identity = config.identity.clone();
    let addresses = advertised(&BTreeMap::new(), identity.site, Some(control_addr));
    let base = hello(&identity);
    let hello_fn = Arc::new(move || Hello {
        addresses: addresses.clone(),
        ..base.clone()
    });
    let registered = register(&identity, &config.data_dir, &config.cs, hello_fn, &stop).await?;
    let secured = registered.secured(config.listener)?;
    let mut commands = registered.control.commands;
    tokio::spawn(async move {
        while let Some(message) = commands.recv().await {
            tracing::warn!(
                ?message,
                "vpn-link takes no commands from the configuration server"
            );
        }
    });

    let routes: Vec<String> = config
        .routes
        .iter()
        .map(|r| {
            let listen = link
                .route_addr(&r.name)
                .map_or_else(|| r.listen.clone(), |a| a.to_string());
            format!(
                "{} ({} -> {}): {listen} -> {}",
                r.name,
                r.from_site,
                r.from_site.other(),
                r.connect
            )
        })
        .collect();
    let registry = failback_common::metrics::Metrics::new();
    vpn_link::metrics::register(&registry, link.handle());
    failback_common::metrics::start(Some(&config.metrics_listen), &registry, &stop).await?;
    info!(control = %control_addr, routes = ?routes, "vpn-link ready");

    link.serve(control, Some(secured), stop.cancelled_owned())
        .await?;
    Ok(())
}
