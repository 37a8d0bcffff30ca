//! `process-server --config FILE`: thin main around [`process_server::run`].

use std::path::PathBuf;

use clap::Parser;
use process_server::PsConfig;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about = "Failback Lab process server")]
struct Cli {
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() {
    failback_common::telemetry::init("process-server");
    failback_common::tls::install_crypto_provider();
    let cli = Cli::parse();
    let config = PsConfig::load(cli.config.as_deref()).unwrap_or_else(|e| {
        eprintln!("process-server: {e}");
        std::process::exit(2)
    });
    let shutdown = CancellationToken::new();
    tokio::spawn(failback_common::server::shutdown_on_signal(
        shutdown.clone(),
    ));
    let result = async {
        let (listener, _) = failback_common::server::bind(&config.listen, "listen").await?;
        process_server::run(config, listener, shutdown).await
    };
    if let Err(e) = result.await {
        eprintln!("process-server: {e:#}");
        tracing::error!("{e:#}");
        std::process::exit(1);
    }
}
