//! `process-server --config FILE`: thin main around [`master_target::run`].

use std::path::PathBuf;

use clap::Parser;
use master_target::MtConfig;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about = "Failback Lab master target")]
struct Cli {
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() {
    failback_common::telemetry::init("master-target");
    failback_common::tls::install_crypto_provider();
    let cli = Cli::parse();
    let config = MtConfig::load(cli.config.as_deref()).unwrap_or_else(|e| {
        eprintln!("master-target: {e}");
        std::process::exit(2)
    });
    let shutdown = CancellationToken::new();
    tokio::spawn(failback_common::server::shutdown_on_signal(
        shutdown.clone(),
    ));
    let result = async {
        let (listener, _) = failback_common::server::bind(&config.listen, "listen").await?;
        master_target::run(config, listener, shutdown).await
    };
    if let Err(e) = result.await {
        eprintln!("master-target: {e:#}");
        tracing::error!("{e:#}");
        std::process::exit(1);
    }
}
