//! The `warren` binary: command-line parsing, logging setup, signals and exit codes.
//!
//! Exit codes: 0 success, 1 the proxy failed to start or to stop, 2 invalid configuration or
//! command line. `check-queues` uses the monitoring-plugin codes instead: 0 OK, 1 WARNING,
//! 2 CRITICAL, 3 UNKNOWN (bad arguments included).
//!
//! While running, the configuration file is re-read on SIGHUP, when the file changes on disk
//! (polled every second, applied once it has been stable for 500 ms) and on `POST /reload` of the
//! admin endpoint. An invalid file is rejected and the running configuration stays in force.
//!
//! Adding a subcommand: add a variant to [`Command`] (its doc comment becomes the help text),
//! a function `fn name(cli: &Cli, ...) -> ExitCode`, and an arm in [`main`]. The global
//! options (`--config`, `--log-format`) are available to every subcommand through [`Cli`].

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

use warren::admin::check::{self, AdminUrl, Thresholds};
use warren::config::Config;
use warren::state::Shared;

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
timeouts.shutdown_grace_ms. A second signal during shutdown exits at once. SIGHUP, a change of \
the configuration file and POST /reload on the admin endpoint reload the configuration; an \
invalid file is rejected and the running configuration stays in force.",
    after_help = "Examples:\n  warren --config proxy.toml          run the proxy\n  \
warren check --config proxy.toml    validate a configuration file\n  \
warren check-queues -c proxy.toml -w 500 -C 1000   queue depths, as a Nagios/Sensu check\n\n\
Logging goes to stdout; set the filter with RUST_LOG (default: info), e.g. \
RUST_LOG=warren=debug.\n\
Exit codes: 0 ok, 1 start-up or shutdown failure, 2 invalid configuration or usage \
(check-queues: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN)."
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

#[derive(Subcommand, Debug, Clone)]
enum Command {
    /// Run the proxy (the default when no subcommand is given)
    Run,
    /// Validate the configuration file and exit: 0 if valid, 2 if not
    Check,
    /// Check the depths of the sharded queues (a Nagios/Sensu plugin: one line, exit 0 OK,
    /// 1 WARNING, 2 CRITICAL, 3 UNKNOWN)
    CheckQueues(CheckQueuesArgs),
}

/// Arguments of `warren check-queues`.
#[derive(Args, Debug, Clone)]
struct CheckQueuesArgs {
    /// WARNING when a queue holds at least N messages (summed over the shard clusters)
    #[arg(short, long, value_name = "N")]
    warning: u64,
    /// CRITICAL when a queue holds at least M messages
    #[arg(short = 'C', long, value_name = "M")]
    critical: u64,
    /// Only queues whose name matches PATTERN (`*` matches any run of characters)
    #[arg(short, long, value_name = "PATTERN")]
    queue: Option<String>,
    /// Admin endpoint, e.g. http://127.0.0.1:15673 (default: `[admin] listen` of --config)
    #[arg(short, long, value_name = "URL")]
    admin: Option<String>,
    /// Give up (UNKNOWN) after this many seconds
    #[arg(short, long, value_name = "SECS", default_value_t = 10.0)]
    timeout: f64,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum LogFormat {
    /// Human-readable lines
    Text,
    /// One JSON object per line
    Json,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // A monitoring plugin must answer UNKNOWN (3) in one line, even to bad arguments.
            let help = matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            );
            if !help && std::env::args().any(|a| a == "check-queues") {
                let text = e.render().to_string();
                let message: Vec<&str> = text
                    .lines()
                    .map(str::trim)
                    .take_while(|l| {
                        !l.starts_with("Usage:") && !l.starts_with("For more information")
                    })
                    .filter(|l| !l.is_empty())
                    .collect();
                let message = message.join(" ");
                println!(
                    "{}",
                    check::Outcome::unknown(message.trim_start_matches("error: ")).line
                );
                return ExitCode::from(check::Status::Unknown.exit_code());
            }
            e.exit()
        }
    };
    match cli.command.clone().unwrap_or(Command::Run) {
        Command::Run => run(&cli),
        Command::Check => check(&cli),
        Command::CheckQueues(args) => check_queues(&cli, &args),
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

/// `warren check-queues`: one plugin line on stdout, the plugin exit code.
fn check_queues(cli: &Cli, args: &CheckQueuesArgs) -> ExitCode {
    let outcome = check_queues_outcome(cli, args);
    println!("{}", outcome.line);
    ExitCode::from(outcome.status.exit_code())
}

fn check_queues_outcome(cli: &Cli, args: &CheckQueuesArgs) -> check::Outcome {
    let admin = match (&args.admin, &cli.config) {
        (Some(url), _) => match AdminUrl::parse(url) {
            Ok(a) => a,
            Err(e) => return check::Outcome::unknown(e),
        },
        (None, Some(path)) => match admin_listen_of(path) {
            Ok(Some(listen)) => AdminUrl::from_listen(listen),
            Ok(None) => {
                return check::Outcome::unknown(format!(
                    "{} has no [admin] listen address; pass --admin URL",
                    path.display()
                ));
            }
            Err(e) => {
                return check::Outcome::unknown(format!("cannot read the configuration: {e}"));
            }
        },
        (None, None) => return check::Outcome::unknown("pass --admin URL or --config FILE"),
    };
    if !(args.timeout.is_finite() && args.timeout > 0.0 && args.timeout <= 3600.0) {
        return check::Outcome::unknown("--timeout must be between 0 and 3600 seconds");
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return check::Outcome::unknown(format!("cannot start the async runtime: {e}")),
    };
    let thresholds = Thresholds {
        warning: args.warning,
        critical: args.critical,
    };
    runtime.block_on(check::check_queues(
        &admin,
        args.queue.as_deref(),
        thresholds,
        Duration::from_secs_f64(args.timeout),
    ))
}

/// `[admin] listen` of a configuration file. A file the proxy would reject (it keeps running
/// with its last valid configuration then) still yields its admin address if that part reads.
fn admin_listen_of(path: &Path) -> Result<Option<std::net::SocketAddr>, String> {
    match Config::load(path) {
        Ok(config) => Ok(config.admin.listen),
        Err(e) => {
            let text = std::fs::read_to_string(path).map_err(|_| e.to_string())?;
            let table: toml::Table = toml::from_str(&text).map_err(|_| e.to_string())?;
            table
                .get("admin")
                .and_then(|a| a.get("listen"))
                .and_then(|l| l.as_str())
                .and_then(|l| l.parse().ok())
                .map(Some)
                .ok_or_else(|| e.to_string())
        }
    }
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

    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("warren");
    if config.runtime.worker_threads > 0 {
        builder.worker_threads(config.runtime.worker_threads);
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("warren: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let busy_poll = config.runtime.busy_poll();
    if !busy_poll.is_zero() {
        let workers = runtime.metrics().num_workers();
        runtime.block_on(async { warren::io::busy_poll::start(busy_poll, workers) });
        tracing::info!(
            window_us = busy_poll.as_micros() as u64,
            workers,
            "busy polling on: workers spin after traffic instead of sleeping"
        );
    }
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
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    handle.shared().set_config_path(&path);
    info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %path.display(),
        amqp = %handle.amqp_addr(),
        admin = %handle.admin_addr().map_or("disabled".to_owned(), |a| a.to_string()),
        clusters = summary(&config).as_str(),
        "warren started"
    );

    let stop_watching = tokio_util::sync::CancellationToken::new();
    let watcher = tokio::spawn(watch_config_file(
        Arc::clone(handle.shared()),
        path.clone(),
        stop_watching.clone(),
    ));
    let name = loop {
        match signals.next().await {
            Some(name) => break name,
            None => {
                info!(signal = "SIGHUP", config = %path.display(), "reloading the configuration");
                reload(handle.shared(), "SIGHUP").await;
            }
        }
    };
    stop_watching.cancel();
    let _ = watcher.await;
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

/// Re-reads the configuration file and logs the outcome (the rejection reason is
/// `file:line:col: reason`); the running configuration stays in force when the file is invalid.
async fn reload(shared: &Arc<Shared>, trigger: &'static str) {
    let shared = Arc::clone(shared);
    // Reading and parsing the file is blocking work.
    match tokio::task::spawn_blocking(move || shared.reload()).await {
        Ok(Ok(status)) => {
            info!(trigger, change = %status.message, generation = status.generation, "configuration reloaded")
        }
        Ok(Err(status)) => error!(
            trigger,
            error = %status.message,
            "configuration reload rejected; the running configuration stays in force"
        ),
        Err(e) => error!(trigger, error = %e, "configuration reload failed"),
    }
}

/// How often the configuration file is looked at.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// How long a changed file must stay unchanged before it is reloaded (editors write in steps).
const WATCH_SETTLE: Duration = Duration::from_millis(500);

/// What identifies one version of the file: modification time, length and inode (an editor that
/// saves by renaming a new file over the old one changes the inode). `None` while it is missing.
type FileSignature = (std::time::SystemTime, u64, u64);

fn file_signature(path: &Path) -> Option<FileSignature> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Reloads the configuration when the file changes on disk, once it has been stable for
/// [`WATCH_SETTLE`]. A missing file (in the middle of an editor's save) is waited for.
async fn watch_config_file(
    shared: Arc<Shared>,
    path: PathBuf,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut applied = file_signature(&path);
    // A change seen but not yet stable: its signature and since when it has not changed.
    let mut pending: Option<(Option<FileSignature>, tokio::time::Instant)> = None;
    loop {
        let wait = if pending.is_some() {
            WATCH_SETTLE / 2
        } else {
            WATCH_INTERVAL
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let path2 = path.clone();
        let current = tokio::task::spawn_blocking(move || file_signature(&path2))
            .await
            .unwrap_or(None);
        if current == applied {
            pending = None;
            continue;
        }
        match &pending {
            Some((sig, since)) if *sig == current => {
                if since.elapsed() >= WATCH_SETTLE && current.is_some() {
                    info!(config = %path.display(), "configuration file changed on disk, reloading");
                    reload(&shared, "file change").await;
                    applied = current;
                    pending = None;
                }
            }
            _ => pending = Some((current, tokio::time::Instant::now())),
        }
    }
}

/// The process signals warren reacts to.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    /// SIGHUP: reload the configuration.
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for SIGTERM or SIGINT (returns its name) or SIGHUP (returns `None`).
    async fn next(&mut self) -> Option<&'static str> {
        tokio::select! {
            _ = self.terminate.recv() => Some("SIGTERM"),
            _ = self.interrupt.recv() => Some("SIGINT"),
            _ = self.hangup.recv() => None,
        }
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
