//! `master-target --config FILE`: thin main around [`master_target::run`].

use std::path::PathBuf;

use clap::Parser;
use master_target::MtConfig;

#[derive(Parser)]
#[command(version, about = "Failback Lab master target")]
struct Cli {
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    failback_common::server::component_main(
        "master-target",
        MtConfig::load(cli.config.as_deref()),
        |c| c.listen.clone(),
        master_target::run,
    )
    .await;
}
