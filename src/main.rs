//! The `meshwatch` command line: parses arguments, starts logging, calls the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use meshwatch::config;
use meshwatch::sim::generate::{Generator, mesh_config, mesh_config_toml};
use meshwatch::sim::play::{Pace, PlayOptions, Stamp, play};
use meshwatch::sim::scenario::{Scenario, parse_offset_ms};
use meshwatch::telemetry;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// The scenario `meshwatch demo` plays unless given another.
const DEMO_SCENARIO: &str = include_str!("../scenarios/demo.toml");

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
    /// Play a scenario's simulated Envoys into a running meshwatch over gRPC.
    Simulate {
        /// The scenario file (see scenarios/README.md).
        scenario: PathBuf,
        /// meshwatch's gRPC address.
        #[arg(long, default_value = "127.0.0.1:9977")]
        target: SocketAddr,
        /// `max` (as fast as meshwatch takes it), `realtime`, or a speed-up such as `60x`.
        #[arg(long, default_value = "max")]
        rate: String,
        /// Timestamps: `simulated` (the scenario's time; meshwatch needs window.clock =
        /// "watermark") or `wall` (now, for a meshwatch on its live clock). Default: `wall`
        /// at realtime, `simulated` otherwise.
        #[arg(long)]
        clock: Option<String>,
        /// Seed of the random draws (default: the scenario's).
        #[arg(long)]
        seed: Option<u64>,
        /// Play only this much of the scenario, such as `2h` or `3d`.
        #[arg(long)]
        duration: Option<String>,
        /// Write the labelled incidents here, one JSON object a line.
        #[arg(long)]
        truth: Option<PathBuf>,
        /// gRPC connections the simulated Envoys share.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Print the [mesh] configuration meshwatch needs for this scenario, and exit.
        #[arg(long)]
        print_mesh_config: bool,
    },
    /// Run a scenario through an in-process meshwatch in fast-forward and report detection
    /// quality per incident kind.
    Eval {
        scenario: PathBuf,
        #[arg(long)]
        seed: Option<u64>,
        /// Evaluate only this much of the scenario, such as `1d`.
        #[arg(long)]
        duration: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// A meshwatch configuration whose [detector] and [zero_trust] settings to evaluate
        /// (clock, listeners, data directory and [mesh] come from the scenario).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Score a univariate series (`timestamp,value` rows) causally with the detector's
    /// baselines; writes `timestamp,value,anomaly_score` (−log10 p; 6 is the detector's
    /// threshold) to standard output.
    Score {
        /// The CSV file.
        #[arg(long)]
        input: PathBuf,
        /// `auto`, `rate` (counts or amounts per interval), `ratio` (a share, increases only)
        /// or `latency` (durations, increases only).
        #[arg(long, default_value = "auto")]
        model: String,
    },
    /// Score every series (`.csv`) under a folder and measure the alarms against labelled
    /// windows, beside a rolling Gaussian and "never alarm".
    Backtest {
        /// The folder of series (searched recursively).
        series: PathBuf,
        /// JSON: `{"folder/name.csv": [["start", "end"], …]}`, names relative to the folder.
        #[arg(long)]
        windows: PathBuf,
        /// The model for every series (see `score`).
        #[arg(long, default_value = "auto")]
        model: String,
        /// Print every figure as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve and play a small mesh in real time, with an incident every few minutes.
    Demo {
        /// Another scenario to play (default: scenarios/demo.toml, built in).
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// meshwatch's HTTP address (/metrics, the API).
        #[arg(long, default_value = "127.0.0.1:9978")]
        http: SocketAddr,
        /// meshwatch's gRPC address.
        #[arg(long, default_value = "127.0.0.1:9977")]
        grpc: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Score { input, model } = &cli.command {
        return match score_file(input, model) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("meshwatch score: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    if let Command::Backtest { series, windows, model, json } = &cli.command {
        return match backtest(series, windows, model, *json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("meshwatch backtest: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    if let Command::CheckConfig { file } = &cli.command {
        return match config::load(Some(file), std::env::vars()) {
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
        };
    }
    // The configuration of the commands that serve, loaded once: it says where meshwatch's
    // own traces go, before anything logs (its problems are reported by `run`).
    let loaded = match &cli.command {
        Command::Serve { config } => Some(config::load(config.as_deref(), std::env::vars())),
        Command::Demo { .. } => Some(config::load(None, std::env::vars())),
        _ => None,
    };
    let traces = loaded.as_ref().and_then(|r| r.as_ref().ok()).and_then(|c| c.traces.clone());
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshwatch: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = match rt.block_on(async { telemetry::init(traces.as_ref()) }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("meshwatch: cannot set up traces: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(cli.command, loaded));
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a command; `loaded` is the configuration of `serve` and `demo`.
async fn run(command: Command, loaded: Option<Result<config::Config, config::ConfigError>>) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_shutdown(shutdown.clone()));
    match command {
        Command::CheckConfig { .. } | Command::Score { .. } | Command::Backtest { .. } => Ok(()),
        Command::Serve { .. } => {
            let config = loaded.context("no configuration")?.context("invalid configuration")?;
            meshwatch::serve::run(config, shutdown, |_| {}).await.context("meshwatch serve failed")
        }
        Command::Simulate { scenario, target, rate, clock, seed, duration, truth, connections, print_mesh_config } => {
            let scenario = Scenario::load(&scenario)?;
            if print_mesh_config {
                print!("{}", mesh_config_toml(&scenario));
                return Ok(());
            }
            let pace = parse_rate(&rate)?;
            let stamp = match clock.as_deref() {
                Some("wall") => Stamp::Wall,
                Some("simulated") => Stamp::Simulated,
                None if pace == Pace::Speed(1.0) => Stamp::Wall,
                None => Stamp::Simulated,
                Some(other) => bail!("--clock {other}: simulated or wall"),
            };
            let seed = seed.unwrap_or(scenario.seed);
            let mut generator = Generator::new(scenario, seed, if pace == Pace::Speed(1.0) { 1_000 } else { 10_000 });
            if let Some(d) = duration {
                generator.limit(parse_offset_ms(&d).map_err(anyhow::Error::msg)?);
            }
            if let Some(path) = &truth {
                std::fs::write(path, meshwatch::eval::truth_jsonl(&generator.truth()))
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            let opts = PlayOptions { target, pace, stamp, connections };
            let (_, report) = play(generator, &opts, shutdown).await?;
            println!(
                "sent {} entries in {} messages: {:.2} simulated hours in {:.1} s ({:.0} entries/s){}",
                report.entries,
                report.messages,
                report.simulated_ms as f64 / 3_600_000.0,
                report.wall.as_secs_f64(),
                report.entries as f64 / report.wall.as_secs_f64().max(1e-9),
                if report.stream_errors > 0 {
                    format!(", {} streams ended with an error", report.stream_errors)
                } else {
                    String::new()
                }
            );
            Ok(())
        }
        Command::Eval { scenario, seed, duration, json, config } => {
            let scenario = Scenario::load(&scenario)?;
            let seed = seed.unwrap_or(scenario.seed);
            let duration_ms = duration.map(|d| parse_offset_ms(&d)).transpose().map_err(anyhow::Error::msg)?;
            let data = std::env::temp_dir().join(format!("meshwatch-eval-{}", std::process::id()));
            let config = meshwatch::eval::eval_config(&scenario, config.as_deref(), data.clone())?;
            // SIGTERM or SIGINT ends it without a report (and without its data directory).
            let report = tokio::select! {
                r = meshwatch::eval::run(scenario, config, seed, duration_ms) => Some(r),
                () = shutdown.cancelled() => None,
            };
            let _ = std::fs::remove_dir_all(&data);
            let Some(report) = report else { bail!("eval interrupted: no report") };
            let report = report?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.table());
            }
            Ok(())
        }
        Command::Demo { scenario, http, grpc } => {
            let config = loaded.context("no configuration")?.context("invalid configuration")?;
            demo(config, scenario, http, grpc, shutdown).await
        }
    }
}

fn parse_model(model: &str) -> anyhow::Result<meshwatch::univariate::Model> {
    match meshwatch::univariate::Model::parse(model) {
        Some(m) => Ok(m),
        None => bail!("--model {model}: auto, rate, ratio or latency"),
    }
}

fn backtest(series: &std::path::Path, windows: &std::path::Path, model: &str, json: bool) -> anyhow::Result<()> {
    let model = parse_model(model)?;
    let windows = meshwatch::backtest::read_windows(windows)?;
    let report = meshwatch::backtest::run(series, &windows, model, |name| tracing::debug!(name, "series scored"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", meshwatch::backtest::table(&report, 20.0));
    }
    Ok(())
}

fn score_file(input: &std::path::Path, model: &str) -> anyhow::Result<()> {
    let model = parse_model(model)?;
    let file = std::fs::File::open(input).with_context(|| format!("cannot open {}", input.display()))?;
    let stdout = std::io::stdout();
    let out = std::io::BufWriter::new(stdout.lock());
    match meshwatch::univariate::score(std::io::BufReader::new(file), out, model) {
        // The reader stopped reading (`| head`): not a failure of ours.
        Err(meshwatch::univariate::ScoreError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other.map(drop)?),
    }
}

fn parse_rate(rate: &str) -> anyhow::Result<Pace> {
    Ok(match rate {
        "max" => Pace::Max,
        "realtime" => Pace::Speed(1.0),
        other => match other.strip_suffix('x').and_then(|n| n.parse::<f64>().ok()) {
            Some(x) if x > 0.0 && x.is_finite() => Pace::Speed(x),
            _ => bail!("--rate {other}: max, realtime, or a speed-up such as 60x"),
        },
    })
}

/// `serve` on its live clock, with the demo mesh configured, and the demo scenario played
/// into it in real time.
async fn demo(
    mut config: config::Config,
    scenario: Option<PathBuf>,
    http: SocketAddr,
    grpc: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let scenario = match scenario {
        Some(path) => Scenario::load(&path)?,
        None => Scenario::parse(DEMO_SCENARIO)?,
    };
    config.grpc_listen = grpc;
    config.http_listen = http;
    config.mesh = mesh_config(&scenario);
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(meshwatch::serve::run(config, shutdown.clone(), move |b| {
        let _ = bound_tx.send(b);
    }));
    let Ok(bound) = bound_rx.await else {
        return server.await?.context("meshwatch serve failed");
    };
    info!(
        metrics = %format!("http://{}/metrics", bound.http),
        pairs = %format!("http://{}/api/v1/pairs", bound.http),
        scenario = %scenario.name,
        "demo running; Ctrl-C to stop"
    );
    let seed = scenario.seed;
    let generator = Generator::new(scenario, seed, 1_000);
    let opts = PlayOptions { target: bound.grpc, pace: Pace::Speed(1.0), stamp: Stamp::Wall, connections: 2 };
    let played = play(generator, &opts, shutdown.clone()).await;
    shutdown.cancel();
    server.await?.context("meshwatch serve failed")?;
    played?;
    Ok(())
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
