//! The `vpn-link` binary: loads the config (exit 2 if invalid), binds the control API and
//! every route (exit 1 on failure), and relays until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
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
    let control = TcpListener::bind(config.control_listen.as_str())
        .await
        .with_context(|| format!("control_listen: cannot listen on {}", config.control_listen))?;
    let control_addr = control.local_addr()?;
    let link = Link::bind(config.routes.clone()).await?;
    link.handle().set_settings(config.shaping);

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM received"),
            _ = sigint.recv() => info!("SIGINT received"),
        }
    };

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
    info!(control = %control_addr, routes = ?routes, "vpn-link ready");

    link.serve(control, shutdown).await?;
    Ok(())
}
