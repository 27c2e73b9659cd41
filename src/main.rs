//! The `warren` binary: command-line parsing, logging setup, signals and exit codes.
//!
//! Exit codes: 0 success, 1 the proxy failed to start or to stop, 2 invalid configuration or
//! command line.
//!
//! Adding a subcommand: add a variant to [`Command`] (its doc comment becomes the help text),
//! a function `fn name(cli: &Cli, ...) -> ExitCode`, and an arm in [`main`]. The global
//! options (`--config`, `--log-format`) are available to every subcommand through [`Cli`].

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

use warren::config::Config;

/// Configuration is invalid, or the command line is.
const EXIT_CONFIG: u8 = 2;
/// The proxy could not start, or did not stop cleanly.
const EXIT_FAILURE: u8 = 1;

/// Extra time `shutdown` gets beyond the configured grace period before warren gives up on it.
/// (`ProxyHandle::shutdown` bounds itself at grace + 10 s; this is only a backstop.)
const SHUTDOWN_SLACK: Duration = Duration::from_secs(15);

/// warren: an AMQP 0-9-1 proxy that makes several RabbitMQ clusters look like one broker.
#[derive(Parser, Debug)]
#[command(
    name = "warren",
    version,
    about,
    long_about = "warren accepts AMQP 0-9-1 clients (Celery, pika, ...) and forwards them to \
several RabbitMQ clusters: published messages are spread over the `shard` clusters, management \
traffic goes to the `control` cluster.\n\n\
Without a subcommand, warren runs the proxy until SIGTERM or SIGINT, then shuts down \
gracefully: it stops accepting, and closes the remaining clients after \
timeouts.shutdown_grace_ms. A second signal during shutdown exits at once.",
    after_help = "Examples:\n  warren --config proxy.toml          run the proxy\n  \
warren check --config proxy.toml    validate a configuration file\n\n\
Logging goes to stdout; set the filter with RUST_LOG (default: info), e.g. \
RUST_LOG=warren=debug.\n\
Exit codes: 0 ok, 1 start-up or shutdown failure, 2 invalid configuration or usage."
)]
struct Cli {
    /// Configuration file (TOML), see proxy.toml for a documented example
    #[arg(short, long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,

    /// Log output format
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug, Clone, Copy)]
enum Command {
    /// Run the proxy (the default when no subcommand is given)
    Run,
    /// Validate the configuration file and exit: 0 if valid, 2 if not
    Check,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum LogFormat {
    /// Human-readable lines
    Text,
    /// One JSON object per line
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(&cli),
        Command::Check => check(&cli),
    }
}

/// The `--config` path; exits with a usage error (code 2) when it was not given.
fn config_path(cli: &Cli) -> &Path {
    match &cli.config {
        Some(path) => path,
        None => Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "a configuration file is required: pass --config <FILE> (see proxy.toml for an \
                 example)",
            )
            .exit(),
    }
}

/// Loads and validates the configuration, printing the error to stderr on failure.
fn load_config(cli: &Cli) -> Result<Config, ExitCode> {
    Config::load(config_path(cli)).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// `warren check`: validate the file and summarize it.
fn check(cli: &Cli) -> ExitCode {
    let config = match load_config(cli) {
        Ok(config) => config,
        Err(code) => return code,
    };
    println!("{}: ok ({})", config_path(cli).display(), summary(&config));
    ExitCode::SUCCESS
}

/// `2 shard clusters, control: control` (or where control traffic goes when there is no
/// control cluster).
fn summary(config: &Config) -> String {
    let shards = config.shard_clusters().count();
    let plural = if shards == 1 { "" } else { "s" };
    let control = match (config.control_cluster(), config.shard_clusters().next()) {
        (Some(control), _) => control.name.clone(),
        (None, Some(first)) => format!("none, using shard cluster {}", first.name),
        (None, None) => "none".to_owned(),
    };
    format!("{shards} shard cluster{plural}, control: {control}")
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env_lossy();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_ansi(std::io::stdout().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// `warren [run]`: run the proxy until a shutdown signal.
fn run(cli: &Cli) -> ExitCode {
    let config = match load_config(cli) {
        Ok(config) => config,
        Err(code) => return code,
    };
    init_logging(cli.log_format);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("warren")
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("warren: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let code = runtime.block_on(serve(config, config_path(cli)));
    // Do not let a stuck task hold the process after shutdown.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

async fn serve(config: Config, path: &Path) -> ExitCode {
    // Install the handlers before starting, so a signal during start-up is not lost.
    let mut signals = match Signals::new() {
        Ok(signals) => signals,
        Err(e) => {
            error!(error = %e, "cannot install signal handlers");
            eprintln!("warren: cannot install signal handlers: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };

    let config = Arc::new(config);
    let grace = config.timeouts.shutdown_grace();
    let handle = match warren::start(Arc::clone(&config)).await {
        Ok(handle) => handle,
        Err(e) => {
            error!(error = %e, "warren failed to start");
            eprintln!("warren: failed to start: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %path.display(),
        amqp = %handle.amqp_addr(),
        admin = %config.admin.listen.map_or("disabled".to_owned(), |a| a.to_string()),
        clusters = summary(&config).as_str(),
        "warren started"
    );

    let name = signals.recv().await;
    info!(
        signal = name,
        grace_ms = config.timeouts.shutdown_grace_ms,
        "shutting down: no longer accepting connections"
    );

    tokio::select! {
        finished = tokio::time::timeout(grace + SHUTDOWN_SLACK, handle.shutdown()) => {
            match finished {
                Ok(()) => {
                    info!("shutdown complete");
                    ExitCode::SUCCESS
                }
                Err(_) => {
                    error!(waited_ms = (grace + SHUTDOWN_SLACK).as_millis() as u64,
                        "shutdown did not finish in time, exiting anyway");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        name = signals.recv() => {
            warn!(signal = name, "second signal during shutdown, exiting immediately");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// The process signals warren reacts to. (SIGHUP for reloading belongs here too.)
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for SIGTERM or SIGINT and returns its name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn config_option_works_before_and_after_subcommand() {
        for args in [
            &["warren", "check", "--config", "x.toml"][..],
            &["warren", "--config", "x.toml", "check"],
            &["warren", "check", "-c", "x.toml"],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            assert!(matches!(cli.command, Some(Command::Check)));
            assert_eq!(cli.config.as_deref(), Some(Path::new("x.toml")));
        }
        let cli = Cli::try_parse_from(["warren", "-c", "p.toml", "--log-format", "json"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.log_format, LogFormat::Json);
    }
}
