//! The `warren` binary: command-line parsing, logging setup, signals and exit codes.
//!
//! Exit codes: 0 success, 1 the proxy failed to start or to stop, 2 invalid configuration or
//! command line. `check-queues` uses the monitoring-plugin codes instead: 0 OK, 1 WARNING,
//! 2 CRITICAL, 3 UNKNOWN (bad arguments included).
//!
//! An error that stops the proxy before it serves (invalid configuration, a listen address
//! already taken) is reported once: one plain line on stderr, or with `--log-format json` one
//! JSON log line on stdout, like every other log line ([`startup_error`]).
//!
//! While running, the configuration file is re-read on SIGHUP, when the file changes on disk
//! (polled every second, applied once it has been stable for 500 ms) and on `POST /reload` of the
//! admin endpoint. An invalid file is rejected and the running configuration stays in force.
//!
//! Adding a subcommand: add a variant to [`Command`] (its doc comment becomes the help text),
//! a function `fn name(cli: &Cli, ...) -> ExitCode`, and an arm in [`main`]. The global
//! options (`--config`, `--log-format`) are available to every subcommand through [`Cli`].
//! `check-queues` declares its own `--config` (short `-f`, same id, so the value is shared): there
//! `-c` is `--critical`, as in every Nagios plugin; clap does not hand a global option to a
//! subcommand that has one of the same id.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, error, info, warn};
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
warren check-queues --config proxy.toml -q celery -w 500 -c 1000\n\
                                      depth of a queue, as a Nagios/Sensu check\n\n\
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
    #[command(after_help = CHECK_QUEUES_HELP)]
    CheckQueues(CheckQueuesArgs),
}

/// `warren check-queues --help`, after the options.
const CHECK_QUEUES_HELP: &str = "\
Queues:
  -q NAME (no `*`) is asked on every shard cluster of --config with a passive queue.declare, so
  every warren instance, even one started a second ago, answers the same; a named queue that no
  shard cluster has is CRITICAL. Without --config, names are looked up on --admin, which knows
  only the queues declared through that warren (UNKNOWN if it does not list one).
  -q PATTERN (with `*`) and no -q at all cover only the queues declared through the warren of
  the admin endpoint since it started; the OK line says so.

Output: one status line, then performance data: each queue's total (with the thresholds) and
its share on each shard cluster:
  QUEUES CRITICAL - celery=1869 (>= 1000) | 'celery'=1869;500;1000;0; 'celery@shard-a'=935;;;0; 'celery@shard-b'=934;;;0;
Exit codes: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (cannot ask, partial depths, bad arguments).
The configuration file is --config FILE or -f FILE here: -c is --critical.

Sensu Go check (YAML):
  type: CheckConfig
  api_version: core/v2
  metadata:
    name: warren-queue-celery
  spec:
    command: warren check-queues --config /etc/warren/proxy.toml -q celery -w 500 -c 1000
    interval: 60
    subscriptions: [warren]
    output_metric_format: nagios_perfdata

Nagios (run on the warren host, e.g. through NRPE):
  define command {
    command_name  check_warren_queue
    command_line  /usr/bin/warren check-queues --config /etc/warren/proxy.toml -q '$ARG1$' -w $ARG2$ -c $ARG3$
  }
  define service {
    use                  generic-service
    host_name            warren-1
    service_description  queue celery
    check_command        check_warren_queue!celery!500!1000
  }";

/// A message count of `--warning` / `--critical`.
fn threshold(s: &str) -> Result<u64, String> {
    s.trim().parse::<u64>().map_err(|_| {
        format!(
            "expected a number of messages, got {s:?} (-c is --critical, as in every Nagios \
             plugin; the configuration file is --config FILE or -f FILE)"
        )
    })
}

/// Arguments of `warren check-queues`.
#[derive(Args, Debug, Clone)]
struct CheckQueuesArgs {
    /// WARNING when a queue holds at least N messages (summed over the shard clusters)
    #[arg(short, long, value_name = "N", value_parser = threshold)]
    warning: u64,
    /// CRITICAL when a queue holds at least M messages, or a named queue is missing
    #[arg(short, long, value_name = "M", value_parser = threshold, short_alias = 'C')]
    critical: u64,
    /// A queue NAME, asked on the clusters (repeatable); with `*`, a PATTERN over the queues
    /// declared through the admin endpoint's warren. Default: all of those
    #[arg(short, long, value_name = "NAME|PATTERN")]
    queue: Vec<String>,
    /// Vhost of the named queues
    #[arg(long, value_name = "VHOST", default_value = "/")]
    vhost: String,
    /// Configuration file: its shard clusters are asked about named queues, and its
    /// `[admin] listen` is the default --admin (-f, not -c: -c is --critical)
    #[arg(short = 'f', long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
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
    // `--config` after `check-queues` is its own option (the value is shared with the global
    // one, also when given before the subcommand).
    let path = args.config.as_deref().or(cli.config.as_deref());
    let admin = match (&args.admin, path) {
        (Some(url), _) => match AdminUrl::parse(url) {
            Ok(a) => Ok(a),
            Err(e) => return check::Outcome::unknown(e),
        },
        (None, Some(path)) => match admin_listen_of(path) {
            Ok(Some(listen)) => Ok(AdminUrl::from_listen(listen)),
            Ok(None) => Err(format!(
                "{} has no [admin] listen address; pass --admin URL",
                path.display()
            )),
            Err(e) => Err(format!("cannot read the configuration: {e}")),
        },
        (None, None) => {
            Err("pass --config FILE (named queues are asked on its clusters) or --admin URL".into())
        }
    };
    let clusters = path
        .map(|path| Config::load(path).map_err(|e| format!("cannot read the configuration: {e}")));
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
    let request = check::Request {
        thresholds: Thresholds {
            warning: args.warning,
            critical: args.critical,
        },
        queues: args.queue.clone(),
        vhost: args.vhost.clone(),
        timeout: Duration::from_secs_f64(args.timeout),
    };
    runtime.block_on(check::check_queues(
        &request,
        &check::Sources { admin, clusters },
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

/// Reports an error that stops `warren [run]` before it serves, exactly once, in the log format:
/// with `--log-format json`, one ERROR event on the log stream (stdout), shaped like every other
/// log line, so that whatever parses the logs (`journalctl -o cat | jq`) reads it too; with
/// `text`, one plain line on stderr, `warren: WHAT: ERROR`.
fn startup_error(
    format: LogFormat,
    what: &str,
    error: &dyn std::fmt::Display,
    config: Option<&Path>,
) {
    match (format, config) {
        (LogFormat::Text, _) => eprintln!("warren: {what}: {error}"),
        (LogFormat::Json, Some(path)) => {
            error!(error = %error, config = %path.display(), "{what}")
        }
        (LogFormat::Json, None) => error!(error = %error, "{what}"),
    }
}

/// `warren [run]`: run the proxy until a shutdown signal.
fn run(cli: &Cli) -> ExitCode {
    // Logging first, so that a configuration error comes out in the chosen log format.
    init_logging(cli.log_format);
    let path = config_path(cli);
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            startup_error(cli.log_format, "invalid configuration", &e, Some(path));
            return ExitCode::from(EXIT_CONFIG);
        }
    };

    // This runtime runs the listeners, the admin endpoint, the health probes and the
    // evacuation: client connections are served by threads of their own
    // (`warren::io::Workers`, `[runtime] worker_threads` of them), started by the proxy.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            startup_error(cli.log_format, "cannot start the async runtime", &e, None);
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let code = runtime.block_on(serve(config, path, cli.log_format));
    // Do not let a stuck task hold the process after shutdown.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

async fn serve(config: Config, path: &Path, format: LogFormat) -> ExitCode {
    // Install the handlers before starting, so a signal during start-up is not lost.
    let mut signals = match Signals::new() {
        Ok(signals) => signals,
        Err(e) => {
            startup_error(format, "cannot install signal handlers", &e, None);
            return ExitCode::from(EXIT_FAILURE);
        }
    };

    let config = Arc::new(config);
    let grace = config.timeouts.shutdown_grace();
    let handle = match warren::start(Arc::clone(&config)).await {
        Ok(handle) => handle,
        Err(e) => {
            // The listener's error names the address (`cannot listen on ADDR: ...`).
            startup_error(format, "failed to start", &e, None);
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    handle.shared().set_config_path(&path);
    // At once, rather than at the evacuator's first look a second later: a cluster being
    // evacuated must not take publishes meanwhile.
    for cluster in handle.shared().resume_evacuations() {
        info!(%cluster, "resuming the evacuation a previous run started");
    }
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
        // One line per reload; one that changed nothing is not news.
        Ok(Ok(status)) if status.message == "no change" => {
            debug!(trigger, "configuration reloaded: no change")
        }
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
                    debug!(config = %path.display(), "configuration file changed on disk, reloading");
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

    fn check_queues_args(args: &[&str]) -> Result<(Cli, CheckQueuesArgs), clap::Error> {
        let cli = Cli::try_parse_from(args)?;
        match cli.command.clone() {
            Some(Command::CheckQueues(a)) => Ok((cli, a)),
            other => panic!("not check-queues: {other:?}"),
        }
    }

    #[test]
    fn check_queues_takes_nagios_options() {
        let (_, a) = check_queues_args(&[
            "warren",
            "check-queues",
            "-f",
            "p.toml",
            "-q",
            "ux-w",
            "-q",
            "celery*",
            "-w",
            "10",
            "-c",
            "100",
        ])
        .unwrap();
        assert_eq!((a.warning, a.critical), (10, 100));
        assert_eq!(a.queue, ["ux-w", "celery*"]);
        assert_eq!(a.config.as_deref(), Some(Path::new("p.toml")));
        assert_eq!(a.vhost, "/");
        // --config after the subcommand, or before it.
        for args in [
            &[
                "warren",
                "check-queues",
                "--config",
                "p.toml",
                "-w",
                "1",
                "-c",
                "2",
            ][..],
            &[
                "warren",
                "--config",
                "p.toml",
                "check-queues",
                "-w",
                "1",
                "-c",
                "2",
            ],
            &[
                "warren",
                "-c",
                "p.toml",
                "check-queues",
                "-w",
                "1",
                "--critical",
                "2",
            ],
        ] {
            let (cli, a) = check_queues_args(args).unwrap();
            assert_eq!(a.critical, 2, "{args:?}");
            let path = a.config.as_deref().or(cli.config.as_deref());
            assert_eq!(path, Some(Path::new("p.toml")), "{args:?}");
        }
        // The old -C still works; -c with a file name says what -c is now.
        let (_, a) = check_queues_args(&["warren", "check-queues", "-w", "1", "-C", "5"]).unwrap();
        assert_eq!(a.critical, 5);
        let e = check_queues_args(&["warren", "check-queues", "-c", "p.toml", "-w", "1"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("-c is --critical"), "{e}");
    }
}
