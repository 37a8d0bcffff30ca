//! `mobility-agent --config FILE`: thin main around [`mobility_agent::run`].

use std::path::PathBuf;

use clap::Parser;
use mobility_agent::AgentConfig;

#[derive(Parser)]
#[command(version, about = "Failback Lab mobility agent host")]
struct Cli {
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    failback_common::server::component_main(
        "mobility-agent",
        AgentConfig::load(cli.config.as_deref()),
        |c| c.listen.clone(),
        mobility_agent::run,
    )
    .await;
}
