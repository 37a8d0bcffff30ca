//! `process-server --config FILE`: thin main around [`mobility_agent::run`].

use std::path::PathBuf;

use clap::Parser;
use mobility_agent::AgentConfig;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about = "Failback Lab mobility agent host")]
struct Cli {
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() {
    failback_common::telemetry::init("mobility-agent");
    failback_common::tls::install_crypto_provider();
    let cli = Cli::parse();
    let config = AgentConfig::load(cli.config.as_deref()).unwrap_or_else(|e| {
        eprintln!("mobility-agent: {e}");
        std::process::exit(2)
    });
    let shutdown = CancellationToken::new();
    tokio::spawn(failback_common::server::shutdown_on_signal(
        shutdown.clone(),
    ));
    let result = async {
        let (listener, _) = failback_common::server::bind(&config.listen, "listen").await?;
        mobility_agent::run(config, listener, shutdown).await
    };
    if let Err(e) = result.await {
        eprintln!("mobility-agent: {e:#}");
        tracing::error!("{e:#}");
        std::process::exit(1);
    }
}
