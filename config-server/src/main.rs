//! `config-server`: run the configuration server, or back up / restore its database.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use config_server::{ConfigServer, CsConfig};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about = "Failback Lab configuration server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the configuration server.
    Run {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Copy the database (CA, passphrase, inventory) while the server runs.
    Backup {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        to: PathBuf,
    },
    /// Operators: credentials are issued here, on the CS host, never with the passphrase.
    Operator {
        #[command(subcommand)]
        command: OperatorCommand,
    },
    /// The component passphrase (what new process servers, targets and hosts enroll with).
    Passphrase {
        #[command(subcommand)]
        command: PassphraseCommand,
    },
    /// Restore a backup into an empty data directory.
    Restore {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        from: PathBuf,
        /// Restore a backup that others can read (it holds the CA key and the passphrase).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum OperatorCommand {
    /// Issue credentials for operator NAME into DIR/identity/ (revoke them with
    /// `srctl infra remove NAME`).
    Add {
        name: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PassphraseCommand {
    /// Replace the passphrase; enrolled components stay enrolled and connected.
    Rotate {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() {
    failback_common::telemetry::init("config-server");
    failback_common::tls::install_crypto_provider();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run(config).await,
        Command::Backup { config, to } => load(config).and_then(|c| {
            config_server::backup(&c, &to)?;
            println!("backed up to {}", to.display());
            Ok(())
        }),
        Command::Operator {
            command: OperatorCommand::Add { name, out, config },
        } => load(config).and_then(|c| {
            let dir = config_server::add_operator(&c, &name, &out)?;
            println!("operator `{name}`: credentials in {}", dir.display());
            Ok(())
        }),
        Command::Passphrase {
            command: PassphraseCommand::Rotate { config },
        } => load(config).and_then(|c| {
            let file = config_server::rotate_passphrase(&c)?;
            println!(
                "passphrase rotated: the new one is in {} (enrolled components are not affected)",
                file.display()
            );
            Ok(())
        }),
        Command::Restore {
            config,
            from,
            force,
        } => load(config).and_then(|c| {
            config_server::restore(&c, &from, force)?;
            println!("restored {} into {}", from.display(), c.data_dir.display());
            Ok(())
        }),
    };
    if let Err(e) = result {
        eprintln!("config-server: {e:#}");
        std::process::exit(1);
    }
}

fn load(path: Option<PathBuf>) -> anyhow::Result<CsConfig> {
    match CsConfig::load(path.as_deref()) {
        Ok(c) => Ok(c),
        Err(e) => {
            eprintln!("config-server: {e}");
            std::process::exit(2);
        }
    }
}

async fn run(path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = load(path)?;
    let (enroll, _) = failback_common::server::bind(&config.enroll_listen, "enroll_listen").await?;
    let (api, _) = failback_common::server::bind(&config.api_listen, "api_listen").await?;
    let server = ConfigServer::open(config)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(failback_common::server::shutdown_on_signal(
        shutdown.clone(),
    ));
    server.serve(enroll, api, shutdown).await
}
