//! Throughput and latency of warren against RabbitMQ itself.
//!
//! Run it with `scripts/bench.sh`, which starts the RabbitMQ node(s), builds this benchmark in the
//! release (bench) profile and passes the node addresses in; see `docs/benchmarks.md` for the
//! figures and how to read them. By hand:
//!
//! ```text
//! cargo bench --bench throughput -- --nodes 127.0.0.1:5701 [--topology single|sharded] [...]
//! ```
//!
//! # What is measured
//!
//! For each message size, four phases, each run once directly against a RabbitMQ node and once
//! through a warren process in front of that same node:
//!
//! * **publish**: one connection pipelines `count` basic.publish (no confirms) in large writes;
//!   the clock stops when passive queue.declares on the same channel report every message in
//!   the queue. (Writing the last byte is not the end: the proxy and the kernel buffer megabytes,
//!   and RabbitMQ may answer a declare before its queue process has taken in every routed
//!   message, so the count is polled until it is complete.)
//! * **confirm**: the same with publisher confirms and a window of `confirm-window` messages in
//!   flight; the clock stops at the last confirm.
//! * **consume**: drains the queue the publish phase filled, prefetch `prefetch`, one
//!   `multiple` ack every `ack-every` deliveries.
//! * **latency**: a consumer on one connection, a publisher on another sending `latency-rate`
//!   messages per second (slow enough that the queue stays empty); each body starts with the send
//!   time, so publish-to-deliver latency is measured in one process with one monotonic clock.
//!
//! # Keeping the comparison fair
//!
//! * Direct and proxied runs alternate phase by phase, and which goes first alternates round by
//!   round, so the noise of a shared machine (other builds, other RabbitMQ nodes) hits both
//!   sides alike. The report gives medians over the rounds and compares the two sides round by
//!   round (median of the per-round ratios), since only a round's two runs saw the same load.
//! * The client is written on `warren::codec` and tokio's current-thread runtime: it sends
//!   prebuilt frames and only decodes the few fields it needs (delivery tags, confirm tags, body
//!   size, a timestamp), so it is cheap next to the broker. Its own CPU time is reported so that
//!   can be checked. It is the same client for both sides.
//! * The proxy runs as its own process (the `warren` binary of this same build, with a generated
//!   config), so its CPU time can be read from `/proc` around each phase.
//!
//! # Topologies
//!
//! `--topology single` puts one shard cluster (the first node) behind the proxy; `sharded` puts
//! two (the first two nodes). The direct baseline is always the first node alone: the question
//! is what a client gets through warren compared to talking to one RabbitMQ node.
//!
//! Options can also be given as environment variables: `--latency-rate 500` is
//! `WARREN_BENCH_LATENCY_RATE=500`; arguments win. `--help` lists them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::error::Error;
use std::fmt::Write as _;
use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Semaphore;

use warren::codec::{
    self, BasicConsume, BasicProperties, BasicPublish, BasicQos, ConfirmSelect, ContentHeader,
    FieldTable, FieldValue, FrameKind, LongStr, Method, QueueDeclare, QueueDelete, RawFrame,
    ShortStr,
};

type BoxError = Box<dyn Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

fn main() {
    // `cargo test --all-targets` runs bench targets as tests, without `--bench` and without
    // RabbitMQ nodes: there is nothing to measure then, and that is not a failure.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--relay") {
        return relay_main(&args[1..]);
    }
    if !args
        .iter()
        .any(|a| a == "--bench" || a.starts_with("--nodes") || a == "--help" || a == "-h")
        && std::env::var_os("WARREN_BENCH_NODES").is_none()
    {
        eprintln!(
            "throughput: not run as a benchmark (use scripts/bench.sh or cargo bench); skipping"
        );
        return;
    }
    let opts = match Options::parse() {
        Ok(Some(opts)) => opts,
        Ok(None) => return, // --help
        Err(e) => {
            eprintln!("throughput: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    // One thread: the client must stay lean, the proxy and RabbitMQ need the cores.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(run(&opts)) {
        eprintln!("throughput: {e}");
        std::process::exit(1);
    }
}

async fn run(opts: &Options) -> Res<()> {
    let proxy = ProxyProcess::start(opts)?;
    let relay = RelayProcess::start(opts.nodes[0])?;
    let brokers = opts.broker_pids.clone();
    let endpoints = [
        Endpoint {
            target: Target::Direct,
            addr: opts.nodes[0],
            meter: Meter::new(None, brokers.clone()),
        },
        Endpoint {
            target: Target::Relay,
            addr: relay.addr,
            meter: Meter::new(Some(relay.child.id()), brokers.clone()),
        },
        Endpoint {
            target: Target::Proxy,
            addr: proxy.addr,
            meter: Meter::new(Some(proxy.pid()), brokers),
        },
    ];
    let endpoints: Vec<&Endpoint> = endpoints
        .iter()
        .filter(|e| opts.targets.contains(&e.target))
        .collect();
    let version = Conn::open(opts.nodes[0])
        .await?
        .close_returning_version()
        .await?;
    let header = report_header(opts, &version, &proxy);
    println!("{header}");

    let mut results = Results::default();
    for &size in &opts.sizes {
        let count = opts.count.unwrap_or_else(|| default_count(size));
        for ep in &endpoints {
            eprintln!("  size {size:>5} warming up {}", ep.target.name());
            tokio::time::timeout(PHASE_TIMEOUT, warm_up(ep, size, count))
                .await
                .map_err(|_| {
                    format!(
                        "warm-up via {} took more than {PHASE_TIMEOUT:?}",
                        ep.target.name()
                    )
                })??;
        }
        for round in 0..opts.rounds {
            // Alternate who goes first, so neither side always runs right after the other.
            let mut order = endpoints.clone();
            if round % 2 == 1 {
                order.reverse();
            }
            for &phase in &opts.phases {
                for ep in &order {
                    let queue = queue_name(size, round, ep.target);
                    let sample = run_phase(opts, phase, ep, &queue, size, count).await?;
                    eprintln!(
                        "  size {size:>5} round {} {:<8} {:<6} {}",
                        round + 1,
                        phase.name(),
                        ep.target.name(),
                        sample.describe(phase)
                    );
                    results.add(size, phase, ep.target, sample);
                    // Let the broker finish what the phase left behind (queue deletion, GC).
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
        println!("{}", report_size(opts, &results, size, count));
    }
    println!("{}", report_targets(opts, &results));
    drop(proxy);
    drop(relay);
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Options

const USAGE: &str = "\
usage: cargo bench --bench throughput -- --nodes HOST:PORT[,HOST:PORT] [options]

  --nodes A[,B]           RabbitMQ node(s): the first is the direct baseline and shard cluster
                          'shard-a'; with --topology sharded the second is 'shard-b'
  --topology T            single (one shard cluster behind the proxy) | sharded (two); default single
  --broker-pids P[,P]     beam.smp pids of the nodes, to report their CPU time per message
  --sizes S[,S]           message body sizes in bytes (>= 8); default 100
  --count N               messages per throughput phase; default depends on the size (a few
                          seconds per phase on a 2-core machine)
  --rounds N              direct/proxy rounds; the report shows medians; default 5
  --phases P[,P]          publish,confirm,consume,latency (default: all, in that order)
  --targets T[,T]         direct,relay,proxy (default all three; relay is a plain TCP relay
                          process in front of the first node, the cost of any user-space hop;
                          one side alone is handy for profiling)
  --confirm-window N      publishes in flight in the confirm phase; default 256
  --prefetch N            basic.qos prefetch of the consumers; default 500
  --ack-every N           consumers ack with multiple=true every N deliveries; default 100
  --latency-rate R        messages per second in the latency phase; default 2000
  --latency-secs S        length of the latency phase in seconds; default 3
  --work-dir DIR          where the proxy config and log go; default $TMPDIR/warren-bench-<pid>

Every option can also be set as WARREN_BENCH_<NAME> (e.g. WARREN_BENCH_SIZES=100,4096).
WARREN_BENCH_PROXY_LOG sets the proxy's RUST_LOG (default warn); its log is in the work dir.
WARREN_BENCH_SOURCE, if set, is printed in the report header (scripts/bench.sh: the git commit).
WARREN_BENCH_PROXY_BIN runs that warren binary instead of the one built with the benchmark.
WARREN_BENCH_WRAP, if set, is a command (words split on spaces) that warren and the relay are
started under, e.g. a profiler (scripts/bench_instructions.sh runs them under callgrind).";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topology {
    Single,
    Sharded,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Publish,
    Confirm,
    Consume,
    Latency,
}

impl Phase {
    const ALL: [Phase; 4] = [
        Phase::Publish,
        Phase::Confirm,
        Phase::Consume,
        Phase::Latency,
    ];

    fn name(self) -> &'static str {
        match self {
            Phase::Publish => "publish",
            Phase::Confirm => "confirm",
            Phase::Consume => "consume",
            Phase::Latency => "latency",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Direct,
    /// A plain TCP relay process (no AMQP): what one more user-space hop costs on this machine.
    Relay,
    Proxy,
}

impl Target {
    const ALL: [Target; 3] = [Target::Direct, Target::Relay, Target::Proxy];

    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Relay => "relay",
            Target::Proxy => "proxy",
        }
    }
}

#[derive(Debug)]
struct Options {
    topology: Topology,
    nodes: Vec<SocketAddr>,
    broker_pids: Vec<u32>,
    sizes: Vec<usize>,
    count: Option<u64>,
    rounds: usize,
    phases: Vec<Phase>,
    targets: Vec<Target>,
    confirm_window: usize,
    prefetch: u16,
    ack_every: u64,
    latency_rate: f64,
    latency_secs: f64,
    work_dir: PathBuf,
}

const OPTION_NAMES: [&str; 14] = [
    "nodes",
    "topology",
    "broker-pids",
    "sizes",
    "count",
    "rounds",
    "phases",
    "targets",
    "confirm-window",
    "prefetch",
    "ack-every",
    "latency-rate",
    "latency-secs",
    "work-dir",
];

impl Options {
    /// Parses `--name value` / `--name=value` arguments over `WARREN_BENCH_*` variables.
    /// `Ok(None)` means `--help` was printed.
    fn parse() -> Res<Option<Options>> {
        let mut given: HashMap<String, String> = HashMap::new();
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            // cargo bench passes --bench to harness = false targets.
            if arg == "--bench" {
                continue;
            }
            if arg == "--help" || arg == "-h" {
                println!("{USAGE}");
                return Ok(None);
            }
            let Some(flag) = arg.strip_prefix("--") else {
                return Err(format!("unexpected argument '{arg}'").into());
            };
            let (name, value) = match flag.split_once('=') {
                Some((n, v)) => (n.to_owned(), v.to_owned()),
                None => (
                    flag.to_owned(),
                    args.next()
                        .ok_or_else(|| format!("--{flag} needs a value"))?,
                ),
            };
            if !OPTION_NAMES.contains(&name.as_str()) {
                return Err(format!("unknown option --{name}").into());
            }
            given.insert(name, value);
        }
        let get = |name: &str| -> Option<String> {
            given.get(name).cloned().or_else(|| {
                std::env::var(format!(
                    "WARREN_BENCH_{}",
                    name.to_uppercase().replace('-', "_")
                ))
                .ok()
            })
        };

        let topology = match get("topology").as_deref() {
            None | Some("single") => Topology::Single,
            Some("sharded") => Topology::Sharded,
            Some(other) => {
                return Err(format!("--topology must be single or sharded, not '{other}'").into());
            }
        };
        let nodes: Vec<SocketAddr> = list(get("nodes"), "nodes")?
            .ok_or("--nodes is required (scripts/bench.sh starts RabbitMQ and passes it)")?;
        let needed = if topology == Topology::Sharded { 2 } else { 1 };
        if nodes.len() < needed {
            return Err(
                format!("--topology {topology:?} needs {needed} node(s) in --nodes").into(),
            );
        }
        let sizes: Vec<usize> = list(get("sizes"), "sizes")?.unwrap_or_else(|| vec![100]);
        if let Some(s) = sizes.iter().find(|&&s| s < 8) {
            return Err(
                format!("size {s} is too small: a body carries an 8-byte timestamp").into(),
            );
        }
        let phases = match get("phases") {
            None => Phase::ALL.to_vec(),
            Some(s) => {
                let mut v = Vec::new();
                for name in s.split(',') {
                    let phase = Phase::ALL.into_iter().find(|p| p.name() == name.trim());
                    v.push(phase.ok_or_else(|| format!("unknown phase '{name}'"))?);
                }
                // Always in the canonical order: consume drains what publish filled.
                v.sort();
                v.dedup();
                v
            }
        };
        let targets = match get("targets") {
            None => Target::ALL.to_vec(),
            Some(s) => {
                let mut v = Vec::new();
                for name in s.split(',') {
                    let t = Target::ALL.into_iter().find(|t| t.name() == name.trim());
                    v.push(t.ok_or_else(|| format!("unknown target '{name}'"))?);
                }
                v
            }
        };
        let work_dir = get("work-dir").map(PathBuf::from).unwrap_or_else(|| {
            std::env::temp_dir().join(format!("warren-bench-{}", std::process::id()))
        });
        Ok(Some(Options {
            topology,
            nodes,
            broker_pids: list(get("broker-pids"), "broker-pids")?.unwrap_or_default(),
            sizes,
            count: one(get("count"), "count")?,
            rounds: one(get("rounds"), "rounds")?.unwrap_or(5).max(1),
            phases,
            targets,
            confirm_window: one(get("confirm-window"), "confirm-window")?
                .unwrap_or(256)
                .max(1),
            prefetch: one(get("prefetch"), "prefetch")?.unwrap_or(500),
            ack_every: one(get("ack-every"), "ack-every")?.unwrap_or(100).max(1),
            latency_rate: one(get("latency-rate"), "latency-rate")?.unwrap_or(2000.0),
            latency_secs: one(get("latency-secs"), "latency-secs")?.unwrap_or(3.0),
            work_dir,
        }))
    }
}

fn one<T: std::str::FromStr>(value: Option<String>, name: &str) -> Res<Option<T>> {
    value
        .map(|v| {
            v.trim()
                .parse()
                .map_err(|_| format!("bad value '{v}' for --{name}").into())
        })
        .transpose()
}

fn list<T: std::str::FromStr>(value: Option<String>, name: &str) -> Res<Option<Vec<T>>> {
    value
        .map(|v| {
            v.split(',')
                .map(|x| one(Some(x.to_owned()), name).map(Option::unwrap))
                .collect()
        })
        .transpose()
}

/// Messages per throughput phase: 400 MB of bodies, between 20k and 200k messages. Against
/// RabbitMQ 3.10 on the 2-core development machine that is 3 to 8 seconds per phase (100-byte
/// messages go at 30-60k msg/s, 4 KiB ones at 25-45k msg/s).
fn default_count(size: usize) -> u64 {
    (400_000_000 / size as u64).clamp(20_000, 200_000)
}

fn queue_name(size: usize, round: usize, target: Target) -> String {
    format!(
        "warren-bench-{}-{size}-{round}-{}",
        std::process::id(),
        target.name()
    )
}

// ------------------------------------------------------------------------------------------------
// Phases

/// Where a phase connects, and how its CPU time is accounted.
struct Endpoint {
    target: Target,
    addr: SocketAddr,
    meter: Meter,
}

/// What one phase measured.
#[derive(Debug, Clone, Default)]
struct Sample {
    messages: u64,
    secs: f64,
    /// Publish-to-deliver latencies, microseconds (latency phase only).
    p50_us: f64,
    p99_us: f64,
    cpu: CpuUse,
}

impl Sample {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.secs
    }

    fn describe(&self, phase: Phase) -> String {
        let mut s = match phase {
            Phase::Latency => format!("p50 {:>7.0} µs  p99 {:>7.0} µs", self.p50_us, self.p99_us),
            _ => format!(
                "{:>9.0} msg/s ({} msgs in {:.2} s)",
                self.rate(),
                self.messages,
                self.secs
            ),
        };
        if let Some(p) = self.cpu.proxy {
            let _ = write!(s, "  proxy CPU {:.1} µs/msg", per_msg_us(p, self.messages));
        }
        s
    }
}

async fn run_phase(
    opts: &Options,
    phase: Phase,
    ep: &Endpoint,
    queue: &str,
    size: usize,
    count: u64,
) -> Res<Sample> {
    let work = async {
        match phase {
            Phase::Publish => publish_phase(ep, queue, size, count).await,
            Phase::Confirm => {
                confirm_phase(
                    ep,
                    &format!("{queue}-confirm"),
                    size,
                    count,
                    opts.confirm_window,
                )
                .await
            }
            Phase::Consume => {
                if !opts.phases.contains(&Phase::Publish) {
                    // Nothing filled the queue: do it now, untimed.
                    publish_phase(ep, queue, size, count).await?;
                }
                consume_phase(ep, queue, count, opts).await
            }
            Phase::Latency => latency_phase(ep, &format!("{queue}-latency"), size, opts).await,
        }
    };
    tokio::time::timeout(PHASE_TIMEOUT, work)
        .await
        .map_err(|_| {
            format!(
                "{} via {} took more than {PHASE_TIMEOUT:?}",
                phase.name(),
                ep.target.name()
            )
        })?
        .map_err(|e| {
            format!(
                "{} via {} ({}): {e}",
                phase.name(),
                ep.target.name(),
                ep.addr
            )
            .into()
        })
}

/// A queue length that has not moved for this long will not reach the count (lost messages).
const STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A phase that has not finished by then is stuck (a lost message, a dead broker, a deadlocked
/// proxy). Phases take 3 to 15 seconds even on a loaded machine.
const PHASE_TIMEOUT: Duration = Duration::from_secs(120);

/// A short unrecorded publish + consume, so the first measured round does not pay for the
/// broker's and the proxy's first allocations and connections.
async fn warm_up(ep: &Endpoint, size: usize, count: u64) -> Res<()> {
    let queue = format!(
        "warren-bench-{}-warmup-{}",
        std::process::id(),
        ep.target.name()
    );
    let n = (count / 10).max(1000);
    publish_phase(ep, &queue, size, n).await?;
    let mut conn = Conn::open(ep.addr).await?;
    conn.rpc(qos(500)).await?;
    conn.rpc(consume(&queue)).await?;
    conn.consume(n, 100, |_| {}).await?;
    conn.rpc(delete(&queue)).await?;
    conn.close().await
}

/// Pipelined publishes without confirms; done when the queue holds them all.
async fn publish_phase(ep: &Endpoint, queue: &str, size: usize, count: u64) -> Res<Sample> {
    let mut conn = Conn::open(ep.addr).await?;
    conn.rpc(declare(queue)).await?;
    let message = publish_frames(queue, &vec![b'x'; size], conn.frame_max());
    let span = ep.meter.start();
    conn.publish_copies(&message, count).await?;
    conn.await_queue_length(queue, count).await?;
    let cpu = ep.meter.stop(&span);
    conn.close().await?;
    Ok(Sample {
        messages: count,
        secs: span.secs(),
        cpu,
        ..Sample::default()
    })
}

/// Publishes with confirms, at most `window` unconfirmed at any time.
async fn confirm_phase(
    ep: &Endpoint,
    queue: &str,
    size: usize,
    count: u64,
    window: usize,
) -> Res<Sample> {
    let mut conn = Conn::open(ep.addr).await?;
    conn.rpc(declare(queue)).await?;
    conn.rpc(Method::ConfirmSelect(ConfirmSelect { nowait: false }))
        .await?;
    let message = publish_frames(queue, &vec![b'x'; size], conn.frame_max());
    let window = Semaphore::new(window);
    let span = ep.meter.start();
    // Writer and reader run side by side on this task: the writer takes a window slot per
    // message, the reader gives slots back as confirms arrive.
    let (written, confirmed) = tokio::join!(
        publish_windowed(&mut conn.wr, &message, count, &window),
        await_confirms(&mut conn.reader, count, &window),
    );
    written?;
    confirmed?;
    let cpu = ep.meter.stop(&span);
    conn.rpc(delete(queue)).await?;
    conn.close().await?;
    Ok(Sample {
        messages: count,
        secs: span.secs(),
        cpu,
        ..Sample::default()
    })
}

/// Drains `count` messages from `queue` (filled by the publish phase), then deletes it.
async fn consume_phase(ep: &Endpoint, queue: &str, count: u64, opts: &Options) -> Res<Sample> {
    let mut conn = Conn::open(ep.addr).await?;
    conn.rpc(qos(opts.prefetch)).await?;
    let span = ep.meter.start();
    conn.rpc(consume(queue)).await?;
    conn.consume(count, opts.ack_every, |_| {}).await?;
    let cpu = ep.meter.stop(&span);
    conn.rpc(delete(queue)).await?;
    conn.close().await?;
    Ok(Sample {
        messages: count,
        secs: span.secs(),
        cpu,
        ..Sample::default()
    })
}

/// A paced publisher and a consumer on separate connections; latency from the body timestamp.
async fn latency_phase(ep: &Endpoint, queue: &str, size: usize, opts: &Options) -> Res<Sample> {
    let count = ((opts.latency_rate * opts.latency_secs) as u64).max(1);
    let mut consumer = Conn::open(ep.addr).await?;
    consumer.rpc(declare(queue)).await?;
    consumer.rpc(qos(opts.prefetch)).await?;
    consumer.rpc(consume(queue)).await?;
    let mut publisher = Conn::open(ep.addr).await?;
    let mut latencies_ns = Vec::with_capacity(count as usize);
    let span = ep.meter.start();
    let (published, consumed) = tokio::join!(
        publisher.publish_paced(queue, size, count, opts.latency_rate),
        consumer.consume(count, opts.ack_every, |body| {
            let sent = u64::from_be_bytes(body[..8].try_into().expect("8 bytes"));
            latencies_ns.push(now_ns().saturating_sub(sent));
        }),
    );
    published?;
    consumed?;
    let cpu = ep.meter.stop(&span);
    publisher.close().await?;
    consumer.rpc(delete(queue)).await?;
    consumer.close().await?;
    latencies_ns.sort_unstable();
    Ok(Sample {
        messages: count,
        secs: span.secs(),
        p50_us: percentile(&latencies_ns, 0.50) / 1000.0,
        p99_us: percentile(&latencies_ns, 0.99) / 1000.0,
        cpu,
    })
}

/// Nanoseconds since the first call: the timestamp the latency phase puts in each body. Sender
/// and receiver are this one process, so one monotonic clock serves both.
fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64
}

// ------------------------------------------------------------------------------------------------
// A minimal AMQP 0-9-1 client on warren::codec: one channel, guest/guest on vhost "/".

/// The only channel the client uses.
const CH: u16 = 1;
/// frame_max the client asks for (RabbitMQ's and warren's default).
const CLIENT_FRAME_MAX: u32 = 131_072;
/// Target size of one write of pipelined publishes: large writes keep syscalls off the profile.
const WRITE_BATCH: usize = 128 * 1024;
/// Read buffer headroom: one read can take many small deliveries.
const READ_CHUNK: usize = 128 * 1024;

fn declare(queue: &str) -> Method {
    Method::QueueDeclare(QueueDeclare {
        queue: short(queue),
        ..QueueDeclare::default()
    })
}

fn delete(queue: &str) -> Method {
    Method::QueueDelete(QueueDelete {
        queue: short(queue),
        ..QueueDelete::default()
    })
}

fn qos(prefetch: u16) -> Method {
    Method::BasicQos(BasicQos {
        prefetch_size: 0,
        prefetch_count: prefetch,
        global: false,
    })
}

fn consume(queue: &str) -> Method {
    Method::BasicConsume(BasicConsume {
        queue: short(queue),
        ..BasicConsume::default()
    })
}

fn short(s: &str) -> ShortStr {
    ShortStr::try_from(s.to_owned()).expect("names are short")
}

/// The frames of one basic.publish of `body` to `queue` through the default exchange:
/// method, content header (no properties: a transient message) and body.
fn publish_frames(queue: &str, body: &[u8], frame_max: usize) -> BytesMut {
    let mut out = BytesMut::with_capacity(body.len() + 128);
    encode_publish(&mut out, &short(queue), body, frame_max);
    out
}

fn encode_publish(out: &mut BytesMut, queue: &ShortStr, body: &[u8], frame_max: usize) {
    let publish = BasicPublish {
        routing_key: queue.clone(),
        ..BasicPublish::default()
    };
    codec::write_method(out, CH, &Method::BasicPublish(publish));
    let header = ContentHeader {
        class_id: 60,
        body_size: body.len() as u64,
        properties: BasicProperties::default(),
    };
    codec::write_header(out, CH, &header);
    codec::write_body(out, CH, body, frame_max);
}

/// The read half of a connection, splitting frames off a buffer without copying.
struct FrameReader {
    rd: OwnedReadHalf,
    buf: BytesMut,
    frame_max: usize,
}

impl FrameReader {
    /// The next frame already in the buffer, if there is a whole one.
    fn buffered(&mut self) -> Res<Option<RawFrame>> {
        Ok(codec::decode_frame(&mut self.buf, self.frame_max)?)
    }

    /// Reads whatever the socket has (at least one byte); end of stream is an error.
    async fn fill(&mut self) -> Res<()> {
        self.buf.reserve(READ_CHUNK);
        if self.rd.read_buf(&mut self.buf).await? == 0 {
            return Err("the server closed the connection".into());
        }
        Ok(())
    }

    async fn frame(&mut self) -> Res<RawFrame> {
        loop {
            if let Some(frame) = self.buffered()? {
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    /// The next method, skipping heartbeats and content frames; a close is an error.
    async fn method(&mut self) -> Res<Method> {
        loop {
            let frame = self.frame().await?;
            if frame.kind != FrameKind::Method {
                continue;
            }
            let method = Method::decode(frame.payload)?;
            check_not_closed(&method)?;
            return Ok(method);
        }
    }
}

/// Turns a connection.close or channel.close from the server into an error.
fn check_not_closed(method: &Method) -> Res<()> {
    match method {
        Method::ConnectionClose(c) => Err(format!(
            "server closed the connection: {} {}",
            c.reply_code, c.reply_text
        )
        .into()),
        Method::ChannelClose(c) => Err(format!(
            "server closed the channel: {} {}",
            c.reply_code, c.reply_text
        )
        .into()),
        _ => Ok(()),
    }
}

/// One AMQP connection with channel 1 open.
struct Conn {
    reader: FrameReader,
    wr: OwnedWriteHalf,
    /// Scratch buffer for outgoing frames.
    out: BytesMut,
    /// The server's `version` property (RabbitMQ's own, also through warren).
    server_version: String,
}

impl Conn {
    /// Connects, authenticates as guest/guest (PLAIN), opens vhost "/" and channel 1.
    /// Heartbeats are turned off: phases are short and nothing here would answer them.
    async fn open(addr: SocketAddr) -> Res<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        let mut conn = Conn {
            reader: FrameReader {
                rd,
                buf: BytesMut::with_capacity(READ_CHUNK),
                frame_max: CLIENT_FRAME_MAX as usize,
            },
            wr,
            out: BytesMut::with_capacity(WRITE_BATCH),
            server_version: String::new(),
        };
        conn.wr.write_all(codec::PROTOCOL_HEADER).await?;
        let Method::ConnectionStart(start) = conn.reader.method().await? else {
            return Err("expected connection.start".into());
        };
        if let Some(FieldValue::LongStr(v)) = start.server_properties.get("version") {
            conn.server_version = v.as_str().into_owned();
        }
        let product = FieldValue::LongStr(LongStr::from_static("warren-bench"));
        let start_ok = codec::ConnectionStartOk {
            client_properties: FieldTable(vec![(ShortStr::from_static("product"), product)]),
            mechanism: ShortStr::from_static("PLAIN"),
            response: LongStr::from("\0guest\0guest"),
            locale: ShortStr::from_static("en_US"),
        };
        conn.send(0, &Method::ConnectionStartOk(start_ok)).await?;
        let Method::ConnectionTune(tune) = conn.reader.method().await? else {
            return Err("expected connection.tune".into());
        };
        let frame_max = match tune.frame_max {
            0 => CLIENT_FRAME_MAX,
            server => server.min(CLIENT_FRAME_MAX),
        };
        conn.reader.frame_max = frame_max as usize;
        let tune_ok = codec::ConnectionTuneOk {
            channel_max: tune.channel_max,
            frame_max,
            heartbeat: 0,
        };
        conn.send(0, &Method::ConnectionTuneOk(tune_ok)).await?;
        let open = codec::ConnectionOpen {
            virtual_host: ShortStr::from_static("/"),
            ..Default::default()
        };
        conn.send(0, &Method::ConnectionOpen(open)).await?;
        let Method::ConnectionOpenOk(_) = conn.reader.method().await? else {
            return Err("expected connection.open-ok".into());
        };
        conn.rpc(Method::ChannelOpen(Default::default())).await?;
        Ok(conn)
    }

    fn frame_max(&self) -> usize {
        self.reader.frame_max
    }

    async fn send(&mut self, channel: u16, method: &Method) -> Res<()> {
        self.out.clear();
        codec::write_method(&mut self.out, channel, method);
        self.wr.write_all(&self.out).await?;
        Ok(())
    }

    /// Sends a synchronous method on channel 1 and returns the reply. Only used when nothing
    /// else is in flight, so the next method is the reply.
    async fn rpc(&mut self, method: Method) -> Res<Method> {
        self.send(CH, &method).await?;
        self.reader.method().await
    }

    /// Polls the queue's message count until it reaches `expected`.
    ///
    /// One passive declare is not enough: RabbitMQ may answer it before its queue process has
    /// taken in every delivery the channel already routed (seen: 1840 of 2000 right after the
    /// last publish).
    async fn await_queue_length(&mut self, queue: &str, expected: u64) -> Res<()> {
        let mut last = (0, Instant::now());
        loop {
            let n = self.message_count(queue).await?;
            if n >= expected {
                return Ok(());
            }
            if n != last.0 {
                last = (n, Instant::now());
            } else if last.1.elapsed() > STALL_TIMEOUT {
                return Err(format!("queue {queue} stuck at {n} of {expected} messages").into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn message_count(&mut self, queue: &str) -> Res<u64> {
        let passive = QueueDeclare {
            queue: short(queue),
            passive: true,
            ..QueueDeclare::default()
        };
        match self.rpc(Method::QueueDeclare(passive)).await? {
            Method::QueueDeclareOk(ok) => Ok(u64::from(ok.message_count)),
            other => Err(format!("expected queue.declare-ok, got {}", other.name()).into()),
        }
    }

    /// Sends `count` copies of the prebuilt publish `message`, many per write.
    async fn publish_copies(&mut self, message: &[u8], count: u64) -> Res<()> {
        let per_write = (WRITE_BATCH / message.len()).max(1) as u64;
        // Every message is identical, so one batch buffer serves every write.
        let batch = message.repeat(per_write as usize);
        let mut left = count;
        while left > 0 {
            let n = left.min(per_write);
            self.wr
                .write_all(&batch[..n as usize * message.len()])
                .await?;
            left -= n;
        }
        Ok(())
    }

    /// Publishes `count` messages of `size` bytes at `rate` per second, each stamped with its
    /// send time. (Tokio's timer has millisecond resolution, so at rates above 1000/s a few
    /// messages leave together; each still carries its own time.)
    async fn publish_paced(&mut self, queue: &str, size: usize, count: u64, rate: f64) -> Res<()> {
        let queue = short(queue);
        let mut body = vec![b'x'; size];
        let start = tokio::time::Instant::now();
        for i in 0..count {
            tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
            body[..8].copy_from_slice(&now_ns().to_be_bytes());
            self.out.clear();
            encode_publish(&mut self.out, &queue, &body, self.reader.frame_max);
            self.wr.write_all(&self.out).await?;
        }
        Ok(())
    }

    /// Receives `count` deliveries (the consumer must already be registered), acking with
    /// `multiple` every `ack_every` of them and after the last; `on_body` sees the first body
    /// frame of each message.
    async fn consume(
        &mut self,
        count: u64,
        ack_every: u64,
        mut on_body: impl FnMut(&[u8]),
    ) -> Res<()> {
        let mut state = Deliveries {
            ack_every,
            ..Deliveries::default()
        };
        while state.received < count {
            while let Some(frame) = self.reader.buffered()? {
                state.on_frame(frame, &mut on_body)?;
            }
            // One write for all the acks this read produced.
            if state.received == count && state.acked < state.last_tag {
                state.ack(state.last_tag);
            }
            if !state.acks.is_empty() {
                self.wr.write_all(&state.acks).await?;
                state.acks.clear();
            }
            if state.received < count {
                self.reader.fill().await?;
            }
        }
        Ok(())
    }

    /// Closes the connection cleanly (the server then has nothing to log as an error).
    async fn close(mut self) -> Res<()> {
        let close = codec::ConnectionClose {
            reply_code: 200,
            reply_text: ShortStr::from_static("bye"),
            class_id: 0,
            method_id: 0,
        };
        self.send(0, &Method::ConnectionClose(close)).await?;
        let close_ok = async {
            loop {
                let frame = self.reader.frame().await?;
                if frame.kind == FrameKind::Method
                    && let Method::ConnectionCloseOk(_) = Method::decode(frame.payload)?
                {
                    return Ok::<(), BoxError>(());
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), close_ok)
            .await
            .map_err(|_| "no connection.close-ok")?
    }

    async fn close_returning_version(self) -> Res<String> {
        let version = self.server_version.clone();
        self.close().await?;
        Ok(version)
    }
}

/// Consumer bookkeeping: where we are in the current delivery, and which tags to ack.
#[derive(Default)]
struct Deliveries {
    received: u64,
    last_tag: u64,
    acked: u64,
    /// Body bytes still expected for the delivery in progress.
    body_left: u64,
    /// The next body frame is the message's first.
    first_body: bool,
    ack_every: u64,
    acks: BytesMut,
}

impl Deliveries {
    fn on_frame(&mut self, frame: RawFrame, on_body: &mut impl FnMut(&[u8])) -> Res<()> {
        match frame.kind {
            FrameKind::Method => match Method::decode(frame.payload)? {
                Method::BasicDeliver(d) => self.last_tag = d.delivery_tag,
                other => check_not_closed(&other)?, // consume-ok and the like
            },
            FrameKind::Header => {
                let (_, size) = codec::peek_content_header(&frame.payload)?;
                self.body_left = size;
                self.first_body = true;
                if size == 0 {
                    on_body(&[]);
                    self.message_done();
                }
            }
            FrameKind::Body => {
                if std::mem::take(&mut self.first_body) {
                    on_body(&frame.payload);
                }
                self.body_left = self.body_left.saturating_sub(frame.payload.len() as u64);
                if self.body_left == 0 {
                    self.message_done();
                }
            }
            FrameKind::Heartbeat => {}
        }
        Ok(())
    }

    fn message_done(&mut self) {
        self.received += 1;
        if self.received.is_multiple_of(self.ack_every) {
            self.ack(self.last_tag);
        }
    }

    fn ack(&mut self, tag: u64) {
        let ack = codec::BasicAck {
            delivery_tag: tag,
            multiple: true,
        };
        codec::write_method(&mut self.acks, CH, &Method::BasicAck(ack));
        self.acked = tag;
    }
}

/// Writes copies of `message`, one window slot each; slots that are free together are taken
/// together so their messages go out in one write.
async fn publish_windowed(
    wr: &mut OwnedWriteHalf,
    message: &[u8],
    count: u64,
    window: &Semaphore,
) -> Res<()> {
    let mut batch = BytesMut::new();
    let mut sent = 0;
    while sent < count {
        window.acquire().await?.forget();
        let extra = (window.available_permits() as u64).min(count - sent - 1);
        if extra > 0 {
            window.try_acquire_many(extra as u32)?.forget();
        }
        batch.clear();
        for _ in 0..=extra {
            batch.put_slice(message);
        }
        wr.write_all(&batch).await?;
        sent += 1 + extra;
    }
    Ok(())
}

/// Reads publisher confirms until all `count` publishes are confirmed, freeing window slots.
async fn await_confirms(reader: &mut FrameReader, count: u64, window: &Semaphore) -> Res<()> {
    let mut confirms = Confirms::default();
    while confirms.upto < count {
        match reader.method().await? {
            Method::BasicAck(a) => {
                window.add_permits(confirms.settle(a.delivery_tag, a.multiple) as usize)
            }
            Method::BasicNack(n) => {
                return Err(format!("publish {} was nacked", n.delivery_tag).into());
            }
            _ => {}
        }
    }
    Ok(())
}

/// Which publish sequence numbers are confirmed: all up to `upto`, plus single confirms that
/// arrived out of order above it.
#[derive(Default)]
struct Confirms {
    upto: u64,
    above: BTreeSet<u64>,
}

impl Confirms {
    /// Records a confirm and returns how many publishes it newly settles.
    fn settle(&mut self, tag: u64, multiple: bool) -> u64 {
        let before = self.upto + self.above.len() as u64;
        if multiple {
            if tag > self.upto {
                self.above = self.above.split_off(&(tag + 1));
                self.upto = tag;
            }
        } else if tag > self.upto {
            self.above.insert(tag);
        }
        while self.above.remove(&(self.upto + 1)) {
            self.upto += 1;
        }
        self.upto + self.above.len() as u64 - before
    }
}

// ------------------------------------------------------------------------------------------------
// The proxy process and CPU accounting

/// warren running as a child process with a generated configuration.
struct ProxyProcess {
    child: Child,
    addr: SocketAddr,
    config_path: PathBuf,
    log_path: PathBuf,
}

impl ProxyProcess {
    fn start(opts: &Options) -> Res<ProxyProcess> {
        std::fs::create_dir_all(&opts.work_dir)?;
        let addr = free_local_port()?;
        let config_path = opts.work_dir.join("proxy.toml");
        let log_path = opts.work_dir.join("proxy.log");
        std::fs::write(&config_path, proxy_config(addr, opts.topology, &opts.nodes))?;
        let log = File::create(&log_path)?;
        let child = wrapped(proxy_binary())
            .arg("--config")
            .arg(&config_path)
            // Quiet by default; WARREN_BENCH_PROXY_LOG=debug helps when a phase hangs.
            .env(
                "RUST_LOG",
                std::env::var("WARREN_BENCH_PROXY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut proxy = ProxyProcess {
            child,
            addr,
            config_path,
            log_path,
        };
        proxy.wait_listening(Duration::from_secs(20))?;
        Ok(proxy)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_listening(&mut self, timeout: Duration) -> Res<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
                return Err(format!("warren exited with {status} at start-up:\n{log}").into());
            }
            if std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(
                    format!("warren is not listening on {} after {timeout:?}", self.addr).into(),
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ProxyProcess {
    /// SIGTERM (a clean shutdown, config says no grace period), SIGKILL if it lingers.
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// The warren built together with this benchmark (same profile), unless
/// WARREN_BENCH_PROXY_BIN names another one: an older build for an A/B comparison, or a build
/// with debug info for profiling.
fn proxy_binary() -> PathBuf {
    std::env::var_os("WARREN_BENCH_PROXY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_warren")))
}

/// A command for `program`, started under WARREN_BENCH_WRAP when that is set (a profiler such
/// as callgrind, which counts the instructions each message costs).
fn wrapped(program: PathBuf) -> Command {
    let wrap = std::env::var("WARREN_BENCH_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace();
    match words.next() {
        Some(first) => {
            let mut command = Command::new(first);
            command.args(words).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// A plain TCP relay in front of one node, run as a child process (this same executable with
/// `--relay`): the reference for what one more user-space hop costs, so that warren's own cost
/// can be told apart from the hop's.
struct RelayProcess {
    child: Child,
    addr: SocketAddr,
}

impl RelayProcess {
    fn start(upstream: SocketAddr) -> Res<RelayProcess> {
        let addr = free_local_port()?;
        let child = wrapped(std::env::current_exe()?)
            .arg("--relay")
            .arg(addr.to_string())
            .arg(upstream.to_string())
            .stdin(Stdio::null())
            .spawn()?;
        let mut relay = RelayProcess { child, addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if relay.child.try_wait()?.is_some() || Instant::now() > deadline {
                return Err(format!("the TCP relay is not listening on {addr}").into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The probe connections above are relayed and dropped at once; that is harmless.
        Ok(relay)
    }
}

impl Drop for RelayProcess {
    /// SIGTERM first (a profiler it runs under writes its output then), SIGKILL if it lingers.
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// Stops a child process still running: SIGTERM, then SIGKILL if it has not exited within 5 s.
fn terminate(child: &mut Child) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Ok(None) = child.try_wait() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `--relay LISTEN UPSTREAM`: copies bytes both ways between each accepted connection and a
/// connection to UPSTREAM, nothing else. Same runtime as warren (a tokio runtime per
/// connection thread, one thread per core),
/// TCP_NODELAY on both legs, 64 KiB buffers.
fn relay_main(args: &[String]) {
    let (Some(listen), Some(upstream)) = (args.first(), args.get(1)) else {
        eprintln!("usage: throughput --relay LISTEN UPSTREAM");
        std::process::exit(2);
    };
    let (listen, upstream): (SocketAddr, SocketAddr) = match (listen.parse(), upstream.parse()) {
        (Ok(l), Ok(u)) => (l, u),
        _ => {
            eprintln!("throughput --relay: bad address");
            std::process::exit(2);
        }
    };
    // Accepts on one runtime and serves each connection on a connection thread, as warren does.
    let workers = warren::io::Workers::start(0, std::time::Duration::ZERO).expect("relay threads");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .expect("relay listen");
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let Ok(client) = client.into_std() else {
                continue;
            };
            workers.spawn(async move {
                let Ok(mut client) = TcpStream::from_std(client) else {
                    return;
                };
                let Ok(mut server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional_with_sizes(
                    &mut client,
                    &mut server,
                    64 * 1024,
                    64 * 1024,
                )
                .await;
            });
        }
    });
}

/// A loopback address with a port nobody listens on right now (the OS picks it).
fn free_local_port() -> Res<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

fn proxy_config(listen: SocketAddr, topology: Topology, nodes: &[SocketAddr]) -> String {
    let shards = match topology {
        Topology::Single => &nodes[..1],
        Topology::Sharded => &nodes[..2],
    };
    let mut toml = format!(
        "# Generated by benches/throughput.rs ({topology:?} topology).\n\
         listen = \"{listen}\"\n\n[timeouts]\nshutdown_grace_ms = 0\n"
    );
    for (i, node) in shards.iter().enumerate() {
        let name = format!("shard-{}", char::from(b'a' + i as u8));
        let _ = write!(
            toml,
            "\n[[clusters]]\nname = \"{name}\"\nrole = \"shard\"\nnodes = [\"{node}\"]\n"
        );
    }
    // Extra settings for experiments (e.g. "[limits]\nhold_publishes = false").
    if let Ok(extra) = std::env::var("WARREN_BENCH_PROXY_TOML") {
        let at = toml.find("\n[[clusters]]").unwrap_or(toml.len());
        toml.insert_str(at, &format!("\n{}\n", extra.replace("\\n", "\n")));
    }
    toml
}

/// CPU seconds used during a phase, per process kind.
#[derive(Debug, Clone, Copy, Default)]
struct CpuUse {
    /// The warren process (proxied runs only).
    proxy: Option<f64>,
    /// All RabbitMQ nodes given with --broker-pids.
    broker: Option<f64>,
    /// This benchmark's client.
    client: f64,
}

/// Reads process CPU times around a phase.
struct Meter {
    proxy: Option<u32>,
    brokers: Vec<u32>,
}

/// The start of a measured span.
struct Span {
    at: Instant,
    cpu: CpuUse,
}

impl Span {
    fn secs(&self) -> f64 {
        self.at.elapsed().as_secs_f64()
    }
}

impl Meter {
    fn new(proxy: Option<u32>, brokers: Vec<u32>) -> Meter {
        Meter { proxy, brokers }
    }

    fn read(&self) -> CpuUse {
        CpuUse {
            proxy: self.proxy.and_then(cpu_secs),
            broker: (!self.brokers.is_empty())
                .then(|| self.brokers.iter().filter_map(|&p| cpu_secs(p)).sum()),
            client: cpu_secs(std::process::id()).unwrap_or(0.0),
        }
    }

    fn start(&self) -> Span {
        Span {
            at: Instant::now(),
            cpu: self.read(),
        }
    }

    /// CPU used since `span` started. (The elapsed time is read from the span itself.)
    fn stop(&self, span: &Span) -> CpuUse {
        let now = self.read();
        let diff = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
        CpuUse {
            proxy: diff(now.proxy, span.cpu.proxy),
            broker: diff(now.broker, span.cpu.broker),
            client: now.client - span.cpu.client,
        }
    }
}

/// CPU time of a process (all its threads), in seconds.
///
/// Why not `/proc/<pid>/stat` alone: its utime and stime count whole clock ticks (10 ms), so a
/// latency phase of 6,000 messages that costs a proxy about 0.1 s of CPU is read to within 10%,
/// too coarse to compare two proxies. The scheduler's own account,
/// `/proc/<pid>/task/<tid>/schedstat` (nanoseconds on a CPU, per thread), is exact; threads that
/// end during a phase take theirs with them, which the processes measured here (long-lived worker
/// threads) do not do. `stat` is the fallback where schedstat is missing.
fn cpu_secs(pid: u32) -> Option<f64> {
    schedstat_secs(pid).or_else(|| stat_secs(pid))
}

fn schedstat_secs(pid: u32) -> Option<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        // A thread that ended between the listing and the read counts nothing.
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        ns += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e9)
}

/// utime + stime of a process (all its threads), in seconds, from `/proc/<pid>/stat`.
fn stat_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it are plain numbers.
    // utime and stime are fields 14 and 15, i.e. the 12th and 13th after the name.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks_per_sec())
}

fn clock_ticks_per_sec() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

fn per_msg_us(cpu_secs: f64, messages: u64) -> f64 {
    cpu_secs * 1e6 / messages as f64
}

// ------------------------------------------------------------------------------------------------
// Results and report

#[derive(Default)]
struct Results {
    samples: BTreeMap<(usize, Phase, Target), Vec<Sample>>,
}

impl Results {
    fn add(&mut self, size: usize, phase: Phase, target: Target, sample: Sample) {
        self.samples
            .entry((size, phase, target))
            .or_default()
            .push(sample);
    }

    fn rounds(&self, size: usize, phase: Phase, target: Target) -> &[Sample] {
        self.samples
            .get(&(size, phase, target))
            .map_or(&[], Vec::as_slice)
    }

    /// Median over the rounds of `f` of each sample.
    fn median(
        &self,
        size: usize,
        phase: Phase,
        target: Target,
        f: impl Fn(&Sample) -> Option<f64>,
    ) -> Option<f64> {
        median(
            self.rounds(size, phase, target)
                .iter()
                .filter_map(f)
                .collect(),
        )
    }

    /// The proxy against direct, round by round: `cmp(proxy, direct)` of `f` for the two runs
    /// of each round, which ran back to back and so saw about the same machine load. On a busy
    /// machine this is far steadier than comparing the two medians.
    fn paired(
        &self,
        size: usize,
        phase: Phase,
        f: impl Fn(&Sample) -> f64,
        cmp: impl Fn(f64, f64) -> f64,
    ) -> Option<Spread> {
        self.paired_with(size, phase, Target::Proxy, f, cmp)
    }

    /// warren's CPU per message over the relay's, round by round.
    fn cpu_vs_relay(&self, size: usize, phase: Phase) -> Option<Spread> {
        let cpu = |x: &Sample| x.cpu.proxy.map(|c| per_msg_us(c, x.messages));
        self.compare(size, phase, Target::Proxy, Target::Relay, cpu, ratio)
    }

    /// [`paired`](Self::paired) for any side against direct.
    fn paired_with(
        &self,
        size: usize,
        phase: Phase,
        side: Target,
        f: impl Fn(&Sample) -> f64,
        cmp: impl Fn(f64, f64) -> f64,
    ) -> Option<Spread> {
        self.compare(size, phase, side, Target::Direct, |x| Some(f(x)), cmp)
    }

    /// `cmp(side, base)` of `f` for the two runs of each round; rounds where `f` has no value
    /// for either side are left out.
    fn compare(
        &self,
        size: usize,
        phase: Phase,
        side: Target,
        base: Target,
        f: impl Fn(&Sample) -> Option<f64>,
        cmp: impl Fn(f64, f64) -> f64,
    ) -> Option<Spread> {
        let side = self.rounds(size, phase, side);
        let base = self.rounds(size, phase, base);
        Spread::of(
            side.iter()
                .zip(base)
                .filter_map(|(s, b)| Some(cmp(f(s)?, f(b)?)))
                .collect(),
        )
    }
}

/// Median, minimum and maximum of per-round values.
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(values: Vec<f64>) -> Option<Spread> {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Spread {
            median: median(values)?,
            min,
            max,
        })
    }
}

fn ratio(proxy: f64, direct: f64) -> f64 {
    proxy / direct
}

fn difference(proxy: f64, direct: f64) -> f64 {
    proxy - direct
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

fn report_header(opts: &Options, rabbit_version: &str, proxy: &ProxyProcess) -> String {
    // The proxy is built with the benchmark's profile, unless another binary was named.
    let build = if std::env::var_os("WARREN_BENCH_PROXY_BIN").is_some() {
        "given by WARREN_BENCH_PROXY_BIN"
    } else if cfg!(debug_assertions) {
        "debug (unoptimized!)"
    } else {
        "release"
    };
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let mut s = String::new();
    let _ = writeln!(s, "# warren throughput benchmark\n");
    let _ = writeln!(
        s,
        "- topology: {:?}; shard cluster(s) behind the proxy: {}",
        opts.topology,
        match opts.topology {
            Topology::Single => opts.nodes[0].to_string(),
            Topology::Sharded => format!("{}, {}", opts.nodes[0], opts.nodes[1]),
        }
    );
    let _ = writeln!(
        s,
        "- direct baseline: RabbitMQ {rabbit_version} at {}",
        opts.nodes[0]
    );
    let _ = writeln!(
        s,
        "- warren build: {build} ({}); config {}; log {}",
        proxy_binary().display(),
        proxy.config_path.display(),
        proxy.log_path.display()
    );
    if let Ok(source) = std::env::var("WARREN_BENCH_SOURCE") {
        let _ = writeln!(s, "- source: {source}");
    }
    let _ = writeln!(
        s,
        "- machine: {cpus} CPUs visible; {} rounds, direct and proxy alternating",
        opts.rounds
    );
    let _ = writeln!(
        s,
        "- confirm window {}, prefetch {}, ack every {} (multiple), latency phase {} msg/s for {} s",
        opts.confirm_window, opts.prefetch, opts.ack_every, opts.latency_rate, opts.latency_secs
    );
    s
}

/// One Markdown table per message size: medians per side, the per-round comparison, and CPU
/// time per message.
fn report_size(opts: &Options, results: &Results, size: usize, count: u64) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## {size}-byte messages ({count} per throughput phase)\n"
    );
    let _ = writeln!(
        s,
        "Medians over the rounds; \"proxy vs direct\" is the median of the per-round \
         comparisons (each round's runs were back to back), with their range. \"relay\" is a \
         plain TCP relay process in front of the same node: the floor any proxy pays for one \
         more user-space hop on this machine.\n"
    );
    let _ = writeln!(
        s,
        "| phase | direct | relay | proxy | proxy vs direct | range over rounds | relay vs direct |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|");
    for &phase in &opts.phases {
        if phase == Phase::Latency {
            let p50 = |x: &Sample| x.p50_us;
            let p99 = |x: &Sample| x.p99_us;
            for (label, pick) in [("p50", &p50 as &dyn Fn(&Sample) -> f64), ("p99", &p99)] {
                let d = results.median(size, phase, Target::Direct, |x| Some(pick(x)));
                let r = results.median(size, phase, Target::Relay, |x| Some(pick(x)));
                let p = results.median(size, phase, Target::Proxy, |x| Some(pick(x)));
                let (cmp, range) = match results.paired(size, phase, pick, difference) {
                    Some(c) => (
                        format!("{:+.0} µs", c.median),
                        format!("{:+.0} to {:+.0} µs", c.min, c.max),
                    ),
                    None => ("-".into(), "-".into()),
                };
                let relay = results
                    .paired_with(size, phase, Target::Relay, pick, difference)
                    .map_or("-".into(), |c| format!("{:+.0} µs", c.median));
                let _ = writeln!(
                    s,
                    "| latency {label} (µs) | {} | {} | {} | {cmp} | {range} | {relay} |",
                    num(d),
                    num(r),
                    num(p)
                );
            }
            continue;
        }
        let d = results.median(size, phase, Target::Direct, |x| Some(x.rate()));
        let r = results.median(size, phase, Target::Relay, |x| Some(x.rate()));
        let p = results.median(size, phase, Target::Proxy, |x| Some(x.rate()));
        let (cmp, range) = match results.paired(size, phase, Sample::rate, ratio) {
            Some(c) => (
                format!("{:.2}x", c.median),
                format!("{:.2}x - {:.2}x", c.min, c.max),
            ),
            None => ("-".into(), "-".into()),
        };
        let relay = results
            .paired_with(size, phase, Target::Relay, Sample::rate, ratio)
            .map_or("-".into(), |c| format!("{:.2}x", c.median));
        let _ = writeln!(
            s,
            "| {} (msg/s) | {} | {} | {} | {cmp} | {range} | {relay} |",
            phase.name(),
            num(d),
            num(r),
            num(p)
        );
    }

    let _ = writeln!(s, "\nCPU time per message, µs (medians over the rounds):\n");
    let _ = writeln!(
        s,
        "| phase | warren | relay | RabbitMQ, direct | RabbitMQ, via proxy | client, direct | client, via proxy |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|");
    for &phase in &opts.phases {
        let cpu = |target, f: fn(&CpuUse) -> Option<f64>| {
            results.median(size, phase, target, |x| {
                f(&x.cpu).map(|c| per_msg_us(c, x.messages))
            })
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            phase.name(),
            num1(cpu(Target::Proxy, |c| c.proxy)),
            num1(cpu(Target::Relay, |c| c.proxy)),
            num1(cpu(Target::Direct, |c| c.broker)),
            num1(cpu(Target::Proxy, |c| c.broker)),
            num1(cpu(Target::Direct, |c| Some(c.client))),
            num1(cpu(Target::Proxy, |c| Some(c.client))),
        );
    }
    s
}

/// The project's targets: proxied throughput >= 0.9x direct, added p50 latency < 100 µs, and at
/// 2,000 msg/s (the latency phase) warren's CPU per message at most 1.1x the relay's, judged on
/// the per-round comparisons.
fn report_targets(opts: &Options, results: &Results) -> String {
    let mut s = String::from("\n## Targets\n\n");
    for &size in &opts.sizes {
        for &phase in &opts.phases {
            let line = if phase == Phase::Latency {
                if let Some(r) = results.cpu_vs_relay(size, phase) {
                    let _ = writeln!(
                        s,
                        "- {size} B, CPU per message at {} msg/s {:.2}x the relay's, median of \
                         the rounds ({:.2}x-{:.2}x; target <= 1.10x): {}",
                        opts.latency_rate,
                        r.median,
                        r.min,
                        r.max,
                        verdict(r.median <= 1.1)
                    );
                }
                let Some(added) = results.paired(size, phase, |x| x.p50_us, difference) else {
                    continue;
                };
                let relay = results
                    .paired_with(size, phase, Target::Relay, |x| x.p50_us, difference)
                    .map_or(String::new(), |r| {
                        format!(" (a plain TCP relay adds {:+.0} µs)", r.median)
                    });
                format!(
                    "added p50 latency {:+.0} µs (target < 100 µs): {}{relay}",
                    added.median,
                    verdict(added.median < 100.0)
                )
            } else {
                let Some(r) = results.paired(size, phase, Sample::rate, ratio) else {
                    continue;
                };
                format!(
                    "{} throughput {:.3}x direct (target >= 0.90x): {}",
                    phase.name(),
                    r.median,
                    verdict(r.median >= 0.9)
                )
            };
            let _ = writeln!(s, "- {size} B, {line}");
        }
    }
    s
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// A whole number with thousands separators, or "-".
fn num(v: Option<f64>) -> String {
    let Some(v) = v else { return "-".into() };
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 { format!("-{out}") } else { out }
}

fn num1(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}
