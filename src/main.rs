//! The `meshwatch` command line: parses arguments, starts logging, calls the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meshwatch::config::{self, ENV_LOG};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

#[derive(Parser)]
#[command(
    name = "meshwatch",
    version,
    about = "Learns what normal Envoy traffic looks like for every pair of services and flags what is not."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the collector and detector: Envoy access logs in, metrics and API out.
    Serve {
        /// A TOML configuration file; without one, defaults apply (see README).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file (with the environment overrides) and print every problem.
    CheckConfig {
        /// The TOML configuration file.
        file: PathBuf,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env(ENV_LOG)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match config::load(Some(&file), std::env::vars()) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {} problem(s)", file.display(), e.problems.len());
                for p in &e.problems {
                    eprintln!("  {p}");
                }
                ExitCode::from(2)
            }
        },
        Command::Serve { config } => {
            init_tracing();
            match serve(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn serve(path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = config::load(path.as_deref(), std::env::vars()).context("invalid configuration")?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(signal_shutdown(shutdown.clone()));
        meshwatch::serve::run(config, shutdown, |_| {}).await.context("meshwatch serve failed")
    })
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn signal_shutdown(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "cannot listen for SIGTERM");
                let _ = ctrl_c.await;
                shutdown.cancel();
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => info!("SIGINT received"),
            _ = term.recv() => info!("SIGTERM received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    shutdown.cancel();
}
