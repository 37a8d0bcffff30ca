//! `process-server --config FILE`: thin main around [`process_server::run`].

use std::path::PathBuf;

use clap::Parser;
use process_server::PsConfig;

#[derive(Parser)]
#[command(version, about = "Failback Lab process server")]
struct Cli {
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    failback_common::server::component_main(
        "process-server",
        PsConfig::load(cli.config.as_deref()),
        |c| c.listen.clone(),
        process_server::run,
    )
    .await;
}
