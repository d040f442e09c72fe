//! `serval bench`: throughput and latency by name.
//!
//! The instance side is any echo (`serval listen --echo`). Throughput mode writes a
//! deterministic byte pattern as fast as the stream takes it and reads the echo back at the
//! same time, checking every byte; latency mode sends requests of `--size` bytes one at a time
//! and times each echo. Both sample the echoed bytes every `--interval-ms` into a time series
//! that records the instance each stream is connected to and marks the intervals where nothing
//! came back, so a migration or a failover shows as a dip in `--json` and `--plot`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use serval::{Endpoint, Locator, ServiceId, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::net::NextHop;

/// Bytes per write in throughput mode, and the read buffer.
const CHUNK: usize = 64 * 1024;
/// The period of the byte pattern (a prime, so that it does not line up with chunk sizes).
const PERIOD: usize = 251;
/// How long connecting by name may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections.
const MAX_CONNECTIONS: usize = 1024;
/// Largest latency request.
const MAX_SIZE: usize = 16 * 1024 * 1024;
/// The font that draws the text of `--plot` charts (DejaVu Sans, ASCII only; see
/// assets/DejaVuSans-LICENSE.txt).
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans-ASCII.ttf");

/// What `serval bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Bulk transfer: write as fast as possible, read the echo back concurrently.
    Throughput,
    /// Request/response round trips of `--size` bytes, one at a time per connection.
    Latency,
}

/// Flags of `serval bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The service name or hex ID (its instances must echo: `serval listen --echo`).
    pub service: String,
    #[command(flatten)]
    pub hop: crate::net::HopArgs,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Mode::Throughput)]
    pub mode: Mode,
    /// How long to send, in seconds (a fraction is fine).
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 5.0,
        allow_negative_numbers = true
    )]
    pub duration: f64,
    /// Send this many bytes in all (split among the connections) instead of for --duration.
    #[arg(long, value_name = "N", conflicts_with = "duration")]
    pub bytes: Option<u64>,
    /// Parallel connections, each resolved by name.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub connections: usize,
    /// Bytes per request in latency mode.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub size: usize,
    /// Print one JSON object (the summary and the time series) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Draw throughput over time (x seconds, y Mbit/s) to FILE.svg or FILE.png.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Length of one sample of the time series, in milliseconds.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub interval_ms: u64,
    /// When a stream fails mid-run (reset, instance gone, stalled), connect again by name
    /// and go on, for failover experiments: the gap and the new instance show in the time
    /// series. Without it, a failure ends the run with exit status 1.
    #[arg(long)]
    pub reconnect: bool,
    /// Seconds a stream may echo nothing while bytes are outstanding (or one round trip may
    /// take) before it counts as failed. With --reconnect, new streams are tried until the
    /// run's end (with --bytes, for this long or 10 s, whichever is longer).
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 10.0,
        allow_negative_numbers = true
    )]
    pub stall: f64,
}

/// When a connection stops sending.
#[derive(Debug, Clone, Copy)]
enum Limit {
    /// After this much time from the start.
    Time(Duration),
    /// After this many bytes (in all, or for one connection).
    Bytes(u64),
}

/// The picture format of `--plot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PlotFormat {
    Svg,
    Png,
}

/// What `serval bench` was asked to do, checked.
struct Plan {
    name: String,
    service: ServiceId,
    mode: Mode,
    limit: Limit,
    connections: usize,
    size: usize,
    json: bool,
    plot: Option<(PathBuf, PlotFormat)>,
    interval: Duration,
    locals: crate::net::Locals,
    endpoint: serval::EndpointConfig,
    follow: serval::FollowHost,
    reconnect: bool,
    stall: Duration,
}

/// Runs `serval bench`: exit status 0 after a complete, verified run; 1 if the service
/// cannot be reached, the instance does not echo, or a stream fails; 2 for bad input.
pub fn run(args: BenchArgs) -> ExitCode {
    let plan = match check(&args) {
        Ok(p) => p,
        Err(e) => return crate::usage(&e),
    };
    let hop = args.hop.next_hop();
    crate::run(async move {
        let report = bench(&plan, hop).await?;
        if plan.json {
            let text = serde_json::to_string(&report)
                .map_err(|e| format!("cannot write the JSON summary: {e}"))?;
            println!("{text}");
        } else {
            print_text(&report);
        }
        if let Some((path, format)) = &plan.plot {
            plot(&report, path, *format)
                .map_err(|e| format!("cannot draw {}: {e}", path.display()))?;
            note!("serval: wrote the throughput chart to {}", path.display());
        }
        Ok(())
    })
}

/// Checks the flags; an error is one line for [`crate::usage`].
fn check(args: &BenchArgs) -> Result<Plan, String> {
    let service = ServiceId::parse(&args.service).map_err(|e| e.to_string())?;
    let limit = match args.bytes {
        Some(0) => return Err("--bytes N must be at least 1".into()),
        Some(n) => Limit::Bytes(n),
        None => {
            let d = args.duration;
            if !(d.is_finite() && (0.01..=1e7).contains(&d)) {
                return Err(format!(
                    "--duration SECONDS must be between 0.01 and 10000000 (got {d})"
                ));
            }
            Limit::Time(Duration::from_secs_f64(d))
        }
    };
    if !(1..=MAX_CONNECTIONS).contains(&args.connections) {
        return Err(format!(
            "--connections N must be between 1 and {MAX_CONNECTIONS} (got {})",
            args.connections
        ));
    }
    if !(1..=MAX_SIZE).contains(&args.size) {
        return Err(format!(
            "--size N must be between 1 and {MAX_SIZE} (got {})",
            args.size
        ));
    }
    if !(1..=3_600_000).contains(&args.interval_ms) {
        return Err(format!(
            "--interval-ms N must be between 1 and 3600000 (got {})",
            args.interval_ms
        ));
    }
    if !(args.stall.is_finite() && (0.01..=1e6).contains(&args.stall)) {
        return Err(format!(
            "--stall SECONDS must be between 0.01 and 1000000 (got {})",
            args.stall
        ));
    }
    let plot = match &args.plot {
        None => None,
        Some(path) => Some((path.clone(), plot_format(path)?)),
    };
    Ok(Plan {
        name: args.service.clone(),
        service,
        mode: args.mode,
        limit,
        connections: args.connections,
        size: args.size,
        json: args.json,
        plot,
        interval: Duration::from_millis(args.interval_ms),
        locals: args.hop.locals()?,
        endpoint: args.hop.endpoint_config(),
        follow: args.hop.follow(),
        reconnect: args.reconnect,
        stall: Duration::from_secs_f64(args.stall),
    })
}

/// The chart format `path` asks for by its extension, and a directory it can be written in.
fn plot_format(path: &Path) -> Result<PlotFormat, String> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let format = match ext.as_deref() {
        Some("svg") => PlotFormat::Svg,
        Some("png") => PlotFormat::Png,
        _ => {
            return Err(format!(
                "--plot FILE must end in .svg or .png (got {})",
                path.display()
            ));
        }
    };
    // Say so now rather than after the run.
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(format!(
            "--plot FILE: directory {} does not exist",
            dir.display()
        ));
    }
    Ok(format)
}

/// Counters the streams update and the sampler reads.
struct Shared {
    /// Bytes echoed back and verified, all connections.
    echoed: AtomicU64,
    /// Round trips completed (latency mode), all connections.
    round_trips: AtomicU64,
    /// The instance each connection is connected to right now.
    instances: Mutex<Vec<Option<Locator>>>,
}

impl Shared {
    fn set_instance(&self, idx: usize, l: Locator) {
        let mut v = self
            .instances
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = v.get_mut(idx) {
            *slot = Some(l);
        }
    }

    /// The distinct instances the connections are connected to, in connection order.
    fn instances(&self) -> Vec<Locator> {
        let v = self
            .instances
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<Locator> = Vec::new();
        for l in v.iter().flatten() {
            if !out.contains(l) {
                out.push(*l);
            }
        }
        out
    }
}

/// What one connection did.
struct ConnDone {
    sent: u64,
    echoed: u64,
    /// Round-trip times in milliseconds (latency mode).
    rtts: Vec<f64>,
    /// When the last echoed byte came.
    last_byte: Option<Instant>,
    /// Streams that failed and were replaced (`--reconnect`).
    reconnects: u64,
}

/// The run's results: what `--json` prints and `--plot` draws.
#[derive(Debug, Serialize)]
struct Report {
    service: String,
    mode: Mode,
    connections: usize,
    /// Every instance a stream was connected to, in order of appearance.
    instances: Vec<String>,
    /// Time to connect by name, per connection (SYN to established), in ms.
    connect_ms: Vec<f64>,
    bytes_sent: u64,
    bytes_echoed: u64,
    /// Every echoed byte was compared with the byte sent (a run with a difference fails).
    verified: bool,
    /// From the first byte sent to the last byte echoed.
    seconds: f64,
    mbit_per_s: f64,
    interval_ms: u64,
    /// Spread of the per-interval throughput (full-length intervals).
    interval_mbit_per_s: Option<Spread>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_bytes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    round_trips: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_ms: Option<Latency>,
    /// Runs of intervals in which nothing was echoed.
    gaps: Vec<Gap>,
    /// When the set of instances the streams are connected to changed.
    instance_changes: Vec<Change>,
    /// Streams that failed and were replaced by new ones by name (`--reconnect`).
    reconnects: u64,
    /// SIGINT/SIGTERM stopped the run early.
    interrupted: bool,
    series: Vec<Sample>,
}

/// Minimum, median and maximum.
#[derive(Debug, Clone, Copy, Serialize)]
struct Spread {
    min: f64,
    median: f64,
    max: f64,
}

/// Round-trip time percentiles, in ms.
#[derive(Debug, Clone, Copy, Serialize)]
struct Latency {
    min: f64,
    mean: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

/// An interval of the time series.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    /// Start and end, in seconds from the first byte sent.
    start_s: f64,
    end_s: f64,
    /// Bytes echoed in the interval.
    bytes: u64,
    mbit_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    round_trips: Option<u64>,
    /// The instances the streams were connected to at the end of the interval.
    instances: Vec<String>,
    /// Nothing was echoed in the interval.
    gap: bool,
}

/// Consecutive intervals with nothing echoed.
#[derive(Debug, Clone, Copy, Serialize)]
struct Gap {
    start_s: f64,
    end_s: f64,
}

/// A change of instance, at the end of the interval where it was first seen.
#[derive(Debug, Clone, Serialize)]
struct Change {
    at_s: f64,
    from: Vec<String>,
    to: Vec<String>,
}

/// Connects, runs the streams, samples them, and gathers the report.
async fn bench(plan: &Plan, hop: NextHop) -> Result<Report, String> {
    let ep = crate::net::client(&hop, &plan.locals, plan.endpoint.clone(), plan.follow).await?;
    let hop = Arc::new(hop);
    let name: Arc<str> = plan.name.as_str().into();

    // Connect every stream by name first, so that connection setup is not in the numbers.
    let mut connecting = JoinSet::new();
    for idx in 0..plan.connections {
        let (ep, hop, name, service) = (ep.clone(), hop.clone(), name.clone(), plan.service);
        connecting.spawn(async move {
            let start = Instant::now();
            let r = tokio::time::timeout(
                CONNECT_TIMEOUT,
                crate::net::connect(&ep, &name, service, &hop),
            )
            .await
            .unwrap_or_else(|_| Err(format!("connect to service {name} timed out")));
            (idx, r, start.elapsed())
        });
    }
    let mut streams: Vec<Option<(Stream, Duration)>> =
        (0..plan.connections).map(|_| None).collect();
    while let Some(joined) = connecting.join_next().await {
        let (idx, r, took) = joined.map_err(|e| format!("connect task failed: {e}"))?;
        let stream = r?;
        if let Some(slot) = streams.get_mut(idx) {
            *slot = Some((stream, took));
        }
    }
    let streams: Vec<(Stream, Duration)> = streams.into_iter().flatten().collect();
    let connect_ms: Vec<f64> = streams.iter().map(|(_, d)| ms(*d)).collect();
    let mut first: Vec<Locator> = Vec::new();
    for l in streams.iter().filter_map(|(s, _)| s.peer_locator().ok()) {
        if !first.contains(&l) {
            first.push(l);
        }
    }

    let shared = Arc::new(Shared {
        echoed: AtomicU64::new(0),
        round_trips: AtomicU64::new(0),
        instances: Mutex::new(streams.iter().map(|(s, _)| s.peer_locator().ok()).collect()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let t0 = Instant::now();
    let mut tasks = JoinSet::new();
    let n = plan.connections as u64;
    for (idx, (stream, _)) in streams.into_iter().enumerate() {
        let limit = match plan.limit {
            Limit::Time(d) => Limit::Time(d),
            // Split the total; the first connections take the remainder.
            Limit::Bytes(b) => Limit::Bytes(b / n + u64::from((idx as u64) < b % n)),
        };
        let job = Job {
            idx,
            mode: plan.mode,
            size: plan.size,
            cap: match limit {
                Limit::Bytes(b) => b,
                Limit::Time(_) => u64::MAX,
            },
            deadline: match limit {
                Limit::Time(d) => Some(tokio::time::Instant::from_std(t0 + d)),
                Limit::Bytes(_) => None,
            },
            stop: stop_rx.clone(),
            shared: shared.clone(),
            stall: plan.stall,
        };
        let redial = plan.reconnect.then(|| Redial {
            ep: ep.clone(),
            name: name.clone(),
            service: plan.service,
            hop: hop.clone(),
        });
        tasks.spawn(drive(job, stream, redial));
    }

    let bar = progress_bar(plan);
    let mut ticks = tokio::time::interval_at(
        tokio::time::Instant::from_std(t0 + plan.interval),
        plan.interval,
    );
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = crate::router::wait_for_stop();
    tokio::pin!(stop);
    let mut interrupted = false;
    let mut series: Vec<Sample> = Vec::new();
    let mut last = (0.0f64, 0u64, 0u64); // end of the last sample: seconds, bytes, round trips
    let mut done: Vec<ConnDone> = Vec::new();
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                let now = t0.elapsed().as_secs_f64();
                let bytes = shared.echoed.load(Ordering::Relaxed);
                let rts = shared.round_trips.load(Ordering::Relaxed);
                let s = sample(plan.mode, (last.0, now), bytes - last.1, rts - last.2, &shared.instances());
                if let Some(bar) = &bar {
                    let now_rate = rate(s.mbit_per_s);
                    match plan.limit {
                        Limit::Time(d) => {
                            bar.set_position(t0.elapsed().as_millis() as u64);
                            bar.set_message(format!(
                                "{now:.1}/{} s, {now_rate} now, {bytes} bytes echoed",
                                trim(d.as_secs_f64())
                            ));
                        }
                        Limit::Bytes(_) => {
                            bar.set_position(bytes);
                            bar.set_message(format!("echoed, {now_rate} now"));
                        }
                    }
                }
                series.push(s);
                last = (now, bytes, rts);
            }
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Ok(Ok(d))) => done.push(d),
                Some(Ok(Err(e))) => {
                    tasks.abort_all();
                    if let Some(bar) = &bar { bar.finish_and_clear(); }
                    return Err(e);
                }
                Some(Err(e)) => {
                    tasks.abort_all();
                    if let Some(bar) = &bar { bar.finish_and_clear(); }
                    return Err(format!("stream task failed: {e}"));
                }
            },
            () = &mut stop, if !interrupted => {
                interrupted = true;
                let _ = stop_tx.send(true);
            }
        }
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }

    // The run ends with the last echoed byte; later ticks saw nothing and are dropped.
    let end = done
        .iter()
        .filter_map(|d| d.last_byte)
        .max()
        .unwrap_or(t0)
        .saturating_duration_since(t0)
        .as_secs_f64();
    let total = shared.echoed.load(Ordering::Relaxed);
    let total_rts = shared.round_trips.load(Ordering::Relaxed);
    series.retain(|s| s.start_s < end);
    if let Some(s) = series.last_mut().filter(|s| s.end_s > end) {
        s.end_s = end;
    }
    let (seen, seen_rts) = series.iter().fold((0, 0), |(b, r), s| {
        (b + s.bytes, r + s.round_trips.unwrap_or(0))
    });
    let tail_start = series.last().map_or(0.0, |s| s.end_s);
    if end > tail_start || total > seen {
        let s = sample(
            plan.mode,
            (tail_start, end.max(tail_start)),
            total - seen,
            total_rts - seen_rts,
            &shared.instances(),
        );
        series.push(s);
    }

    let mut rtts: Vec<f64> = done.iter().flat_map(|d| d.rtts.iter().copied()).collect();
    let bytes_sent = done.iter().map(|d| d.sent).sum();
    let bytes_echoed: u64 = done.iter().map(|d| d.echoed).sum();
    if bytes_echoed == 0 && !interrupted {
        return Err(format!(
            "nothing came back from service {} (is it an echo, such as `serval listen --echo`?)",
            plan.name
        ));
    }
    let mut instances: Vec<String> = first.iter().map(ToString::to_string).collect();
    for s in &series {
        for i in &s.instances {
            if !instances.contains(i) {
                instances.push(i.clone());
            }
        }
    }
    let full = plan.interval.as_secs_f64() * 0.5;
    let mut rates: Vec<f64> = series
        .iter()
        .filter(|s| s.end_s - s.start_s >= full)
        .map(|s| s.mbit_per_s)
        .collect();
    if rates.is_empty() {
        rates = series.iter().map(|s| s.mbit_per_s).collect();
    }
    Ok(Report {
        service: plan.name.clone(),
        mode: plan.mode,
        connections: plan.connections,
        instances,
        connect_ms,
        bytes_sent,
        bytes_echoed,
        verified: true,
        seconds: round(end, 6),
        mbit_per_s: mbit_per_s(bytes_echoed, end),
        interval_ms: plan.interval.as_millis() as u64,
        interval_mbit_per_s: spread(&mut rates),
        request_bytes: (plan.mode == Mode::Latency).then_some(plan.size),
        round_trips: (plan.mode == Mode::Latency).then_some(rtts.len() as u64),
        latency_ms: latency(&mut rtts),
        gaps: gaps(&series),
        instance_changes: changes(&first, &series),
        reconnects: done.iter().map(|d| d.reconnects).sum(),
        interrupted,
        series,
    })
}

/// One interval of the time series.
fn sample(mode: Mode, (start, end): (f64, f64), bytes: u64, rts: u64, now: &[Locator]) -> Sample {
    Sample {
        start_s: round(start, 6),
        end_s: round(end, 6),
        bytes,
        mbit_per_s: mbit_per_s(bytes, end - start),
        round_trips: (mode == Mode::Latency).then_some(rts),
        instances: now.iter().map(ToString::to_string).collect(),
        gap: bytes == 0,
    }
}

/// A progress bar on stderr, for runs of a second or more shown on a terminal.
fn progress_bar(plan: &Plan) -> Option<indicatif::ProgressBar> {
    if plan.json || !std::io::stdout().is_terminal() || !std::io::stderr().is_terminal() {
        return None;
    }
    let (len, template) = match plan.limit {
        Limit::Time(d) if d < Duration::from_secs(1) => return None,
        Limit::Time(d) => (d.as_millis() as u64, "{spinner} [{bar:30}] {msg}"),
        Limit::Bytes(b) => (b, "{spinner} [{bar:30}] {bytes}/{total_bytes} {msg}"),
    };
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    Some(bar)
}

/// The byte pattern: byte `k` of a stream is `k % PERIOD`. `pattern(n)` holds `n` bytes
/// starting at any offset below `PERIOD`.
fn pattern(n: usize) -> Vec<u8> {
    (0..n + PERIOD).map(|k| (k % PERIOD) as u8).collect()
}

/// Where `got` (bytes `at..` of the echo) first differs from the pattern, if anywhere.
fn mismatch(pat: &[u8], at: u64, got: &[u8]) -> Option<u64> {
    let off = (at % PERIOD as u64) as usize;
    let want = pat.get(off..off + got.len())?;
    got.iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .map(|i| at + i as u64)
}

/// A stream failure as one line.
fn broken(e: &std::io::Error, instance: Option<Locator>, echoed: u64) -> String {
    let who = instance.map_or_else(|| "the instance".to_owned(), |l| format!("instance {l}"));
    match e.kind() {
        std::io::ErrorKind::ConnectionReset => {
            format!("the stream to {who} was reset after {echoed} bytes echoed")
        }
        _ => format!("the stream to {who} failed after {echoed} bytes echoed: {e}"),
    }
}

/// What one stream task is to do.
struct Job {
    idx: usize,
    mode: Mode,
    size: usize,
    /// Bytes to have echoed, for this stream (`u64::MAX`: until the deadline).
    cap: u64,
    deadline: Option<tokio::time::Instant>,
    stop: watch::Receiver<bool>,
    shared: Arc<Shared>,
    /// How long a stream may echo nothing while bytes are outstanding.
    stall: Duration,
}

impl Job {
    /// The run is over: its time is up or it was interrupted.
    fn over(&self) -> bool {
        *self.stop.borrow()
            || self
                .deadline
                .is_some_and(|d| tokio::time::Instant::now() >= d)
    }

    fn set_instance(&self, l: Locator) {
        self.shared.set_instance(self.idx, l);
    }
}

/// How to connect again by name after a stream fails (`--reconnect`).
struct Redial {
    ep: Endpoint,
    name: Arc<str>,
    service: ServiceId,
    hop: Arc<NextHop>,
}

/// Pause between attempts to connect again.
const REDIAL_PAUSE: Duration = Duration::from_millis(100);
/// How long to try to connect again in a run of `--bytes`, if `--stall` is shorter.
const REDIAL_FOR: Duration = Duration::from_secs(10);

impl Redial {
    /// A new stream by name, trying until the end of the run (at most `REDIAL_FOR` or
    /// `job.stall` if longer, for a run of `--bytes`); `None` if the run ended meanwhile.
    async fn again(&self, job: &Job, why: &str) -> Result<Option<Stream>, String> {
        let give_up = match job.deadline {
            Some(d) => d.into_std(),
            None => Instant::now() + job.stall.max(REDIAL_FOR),
        };
        loop {
            if job.over() {
                return Ok(None);
            }
            let left = give_up.saturating_duration_since(Instant::now());
            let attempt = tokio::time::timeout(
                left.min(CONNECT_TIMEOUT),
                crate::net::connect(&self.ep, &self.name, self.service, &self.hop),
            )
            .await;
            let last = match attempt {
                Ok(Ok(s)) => return Ok(Some(s)),
                Ok(Err(e)) => e,
                Err(_) => format!("connect to service {} timed out", self.name),
            };
            if Instant::now() >= give_up {
                return Err(format!("{why}; then no new stream ({last})"));
            }
            tokio::time::sleep(REDIAL_PAUSE).await;
        }
    }
}

/// A stream that failed, with what it did before.
struct Failure {
    error: String,
    done: ConnDone,
    /// Another stream could do better (not so after an echo that differs from what was sent).
    retry: bool,
}

impl ConnDone {
    fn new() -> ConnDone {
        ConnDone {
            sent: 0,
            echoed: 0,
            rtts: Vec::new(),
            last_byte: None,
            reconnects: 0,
        }
    }

    fn add(&mut self, d: ConnDone) {
        self.sent += d.sent;
        self.echoed += d.echoed;
        self.rtts.extend(d.rtts);
        self.last_byte = self.last_byte.max(d.last_byte);
        self.reconnects += d.reconnects;
    }

    /// Counts `n` bytes echoed and checked.
    fn echo(&mut self, job: &Job, n: usize) {
        self.echoed += n as u64;
        self.last_byte = Some(Instant::now());
        job.shared.echoed.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn fail(self, error: String, retry: bool) -> Failure {
        Failure {
            error,
            done: self,
            retry,
        }
    }
}

/// Runs one stream of the benchmark; with `redial`, a stream that fails is replaced by a new
/// one by name until the run is over.
async fn drive(
    mut job: Job,
    mut stream: Stream,
    redial: Option<Redial>,
) -> Result<ConnDone, String> {
    let mut total = ConnDone::new();
    let cap = job.cap;
    loop {
        job.cap = cap.saturating_sub(total.echoed);
        let r = match job.mode {
            Mode::Throughput => pump(&mut stream, &mut job).await,
            Mode::Latency => round_trips(&mut stream, &mut job).await,
        };
        let f = match r {
            Ok(d) => {
                total.add(d);
                return Ok(total);
            }
            Err(f) => f,
        };
        total.add(f.done);
        let Some(redial) = redial.as_ref().filter(|_| f.retry) else {
            return Err(f.error);
        };
        if total.echoed >= cap {
            return Ok(total);
        }
        match redial.again(&job, &f.error).await? {
            Some(s) => {
                stream = s;
                total.reconnects += 1;
                if let Ok(l) = stream.peer_locator() {
                    job.set_instance(l);
                }
            }
            None => return Ok(total),
        }
    }
}

/// Throughput: writes the pattern until `job.cap` bytes or the deadline (or a stop), reading
/// the echo back at the same time and checking it; then ends our direction and reads the rest.
async fn pump(stream: &mut Stream, job: &mut Job) -> Result<ConnDone, Failure> {
    let pat = pattern(CHUNK);
    let mut buf = vec![0u8; CHUNK];
    let mut d = ConnDone::new();
    let mut writing = true;
    let mut finish = false;
    let mut instance = stream.peer_locator().ok();
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    let until = tokio::time::sleep_until(job.deadline.unwrap_or(far));
    tokio::pin!(until);
    let stall = tokio::time::sleep(job.stall);
    tokio::pin!(stall);
    loop {
        if let Ok(l) = stream.peer_locator()
            && instance != Some(l)
        {
            instance = Some(l);
            job.set_instance(l);
        }
        if writing && (finish || d.sent >= job.cap) {
            if let Err(e) = stream.shutdown().await {
                let msg = broken(&e, instance, d.echoed);
                return Err(d.fail(msg, true));
            }
            writing = false;
        }
        let off = (d.sent % PERIOD as u64) as usize;
        let want = usize::try_from(job.cap - d.sent).map_or(CHUNK, |left| left.min(CHUNK));
        let outstanding = d.sent > d.echoed;
        let (mut r, mut w) = stream.split();
        tokio::select! {
            got = r.read(&mut buf) => {
                let n = match got {
                    Ok(n) => n,
                    Err(e) => {
                        let msg = broken(&e, instance, d.echoed);
                        return Err(d.fail(msg, true));
                    }
                };
                if n == 0 {
                    if writing || d.echoed < d.sent {
                        let msg = format!(
                            "instance {} closed the stream after echoing {} of {} bytes \
                             (is it an echo, such as `serval listen --echo`?)",
                            show(instance),
                            d.echoed,
                            d.sent
                        );
                        return Err(d.fail(msg, true));
                    }
                    break;
                }
                let got = buf.get(..n).unwrap_or_default();
                if d.echoed + n as u64 > d.sent {
                    let msg = format!(
                        "instance {} echoed more bytes than were sent ({} of {})",
                        show(instance),
                        d.echoed + n as u64,
                        d.sent
                    );
                    return Err(d.fail(msg, false));
                }
                if let Some(at) = mismatch(&pat, d.echoed, got) {
                    let msg = format!(
                        "instance {} echoed a byte that differs from the one sent, at offset {at}",
                        show(instance)
                    );
                    return Err(d.fail(msg, false));
                }
                d.echo(job, n);
                stall.as_mut().reset(tokio::time::Instant::now() + job.stall);
            }
            put = w.write(pat.get(off..off + want).unwrap_or_default()), if writing => {
                match put {
                    Ok(n) => {
                        if !outstanding {
                            stall.as_mut().reset(tokio::time::Instant::now() + job.stall);
                        }
                        d.sent += n as u64;
                    }
                    Err(e) => {
                        let msg = broken(&e, instance, d.echoed);
                        return Err(d.fail(msg, true));
                    }
                }
            }
            // At least one write, however late the task started.
            () = &mut until, if writing && d.sent > 0 => finish = true,
            _ = job.stop.changed(), if writing => finish = true,
            () = &mut stall, if outstanding => {
                let msg = if d.echoed == 0 {
                    format!(
                        "instance {} echoed none of the {} bytes sent in {} s \
                         (is it an echo, such as `serval listen --echo`?)",
                        show(instance),
                        d.sent,
                        secs(job.stall)
                    )
                } else {
                    format!(
                        "instance {} stopped echoing: {} of {} bytes came back, none in the last {} s",
                        show(instance),
                        d.echoed,
                        d.sent,
                        secs(job.stall)
                    )
                };
                return Err(d.fail(msg, true));
            }
        }
    }
    Ok(d)
}

/// Latency: sends requests of `job.size` bytes one at a time and times each echo, until
/// `job.cap` bytes or the deadline (or a stop); then ends our direction and expects the clean
/// end.
async fn round_trips(stream: &mut Stream, job: &mut Job) -> Result<ConnDone, Failure> {
    let size = job.size;
    let pat = pattern(size);
    let mut buf = vec![0u8; size];
    let mut d = ConnDone::new();
    let mut instance = stream.peer_locator().ok();
    loop {
        if let Ok(l) = stream.peer_locator()
            && instance != Some(l)
        {
            instance = Some(l);
            job.set_instance(l);
        }
        // At least one round trip, however late the task started.
        if d.sent >= job.cap || (job.over() && d.sent > 0) {
            break;
        }
        let off = (d.sent % PERIOD as u64) as usize;
        let n = usize::try_from(job.cap - d.sent).map_or(size, |left| left.min(size));
        let request = pat.get(off..off + n).unwrap_or_default();
        let reply = buf.get_mut(..n).unwrap_or_default();
        let start = Instant::now();
        let (mut r, mut w) = stream.split();
        let deadline = job.deadline;
        let stop = &mut job.stop;
        let send = async {
            w.write_all(request).await?;
            // If the run ends before the echo comes, end our direction: an echo still
            // answers, and a peer that is not echoing closes instead of leaving us waiting.
            match deadline {
                Some(d) => tokio::select! {
                    () = tokio::time::sleep_until(d) => {}
                    _ = stop.changed() => {}
                },
                None => {
                    let _ = stop.changed().await;
                }
            }
            w.shutdown().await?;
            std::future::pending::<std::io::Result<()>>().await
        };
        let trip = async {
            tokio::select! {
                got = r.read_exact(reply) => got.map(|_| ()),
                sent = send => sent,
            }
        };
        match tokio::time::timeout(job.stall, trip).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                let msg = format!(
                    "instance {} closed the stream instead of echoing {n} bytes \
                     (is it an echo, such as `serval listen --echo`?)",
                    show(instance)
                );
                return Err(d.fail(msg, true));
            }
            Ok(Err(e)) => {
                let msg = broken(&e, instance, d.echoed);
                return Err(d.fail(msg, true));
            }
            Err(_) => {
                let msg = format!(
                    "instance {} did not echo a {n}-byte request within {} s",
                    show(instance),
                    secs(job.stall)
                );
                return Err(d.fail(msg, true));
            }
        }
        d.rtts.push(ms(start.elapsed()));
        let reply = buf.get(..n).unwrap_or_default();
        if let Some(at) = mismatch(&pat, d.sent, reply) {
            let msg = format!(
                "instance {} echoed a byte that differs from the one sent, at offset {at}",
                show(instance)
            );
            return Err(d.fail(msg, false));
        }
        d.sent += n as u64;
        d.echo(job, n);
        job.shared.round_trips.fetch_add(1, Ordering::Relaxed);
    }
    // End our direction; the echo must end too, with nothing more.
    if let Err(e) = stream.shutdown().await {
        let msg = broken(&e, instance, d.echoed);
        return Err(d.fail(msg, true));
    }
    let mut extra = Vec::new();
    let (msg, retry) = match tokio::time::timeout(job.stall, stream.read_to_end(&mut extra)).await {
        Ok(Ok(0)) => return Ok(d),
        Ok(Ok(k)) => (
            format!(
                "instance {} sent {k} bytes more than it was sent",
                show(instance)
            ),
            false,
        ),
        Ok(Err(e)) => (broken(&e, instance, d.echoed), true),
        Err(_) => (
            format!(
                "instance {} did not close the stream within {} s of our end",
                show(instance),
                secs(job.stall)
            ),
            true,
        ),
    };
    Err(d.fail(msg, retry))
}

/// Seconds without trailing zeros.
fn secs(d: Duration) -> String {
    trim(d.as_secs_f64())
}

fn show(l: Option<Locator>) -> String {
    l.map_or_else(|| "?".to_owned(), |l| l.to_string())
}

/// Milliseconds, to the microsecond.
fn ms(d: Duration) -> f64 {
    round(d.as_secs_f64() * 1e3, 3)
}

/// `x` with at most `digits` decimals (for readable JSON).
fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Megabits per second, to the kilobit.
fn mbit_per_s(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        round(bytes as f64 * 8.0 / seconds / 1e6, 3)
    } else {
        0.0
    }
}

/// A rate for people: Gbit/s from 1000 Mbit/s on.
fn rate(mbit: f64) -> String {
    if mbit >= 1000.0 {
        format!("{:.2} Gbit/s", mbit / 1000.0)
    } else {
        format!("{mbit:.2} Mbit/s")
    }
}

/// The `p`th percentile (nearest rank) of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.clamp(1, sorted.len()) - 1)
        .copied()
        .unwrap_or(0.0)
}

fn spread(v: &mut [f64]) -> Option<Spread> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(Spread {
        min: percentile(v, 0.0),
        median: percentile(v, 50.0),
        max: percentile(v, 100.0),
    })
}

fn latency(v: &mut [f64]) -> Option<Latency> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(Latency {
        min: percentile(v, 0.0),
        mean: round(v.iter().sum::<f64>() / v.len() as f64, 3),
        p50: percentile(v, 50.0),
        p90: percentile(v, 90.0),
        p99: percentile(v, 99.0),
        max: percentile(v, 100.0),
    })
}

/// Runs of consecutive gap samples.
fn gaps(series: &[Sample]) -> Vec<Gap> {
    let mut out: Vec<Gap> = Vec::new();
    let mut prev_gap = false;
    for s in series {
        if s.gap {
            match out.last_mut() {
                Some(g) if prev_gap => g.end_s = s.end_s,
                _ => out.push(Gap {
                    start_s: s.start_s,
                    end_s: s.end_s,
                }),
            }
        }
        prev_gap = s.gap;
    }
    out
}

/// Where the instances of a sample differ from those before it.
fn changes(first: &[Locator], series: &[Sample]) -> Vec<Change> {
    let mut out = Vec::new();
    let mut prev: Vec<String> = first.iter().map(ToString::to_string).collect();
    for s in series {
        if s.instances != prev && !s.instances.is_empty() {
            out.push(Change {
                at_s: s.end_s,
                from: prev.clone(),
                to: s.instances.clone(),
            });
            prev = s.instances.clone();
        }
    }
    out
}

/// Prints the summary as text.
fn print_text(r: &Report) {
    let conns = if r.connections == 1 {
        "1 connection".to_owned()
    } else {
        format!("{} connections", r.connections)
    };
    let mode = match r.mode {
        Mode::Throughput => "throughput",
        Mode::Latency => "latency",
    };
    println!(
        "serval bench {}: {mode} over {conns} to {}{}",
        r.service,
        r.instances.join(", "),
        if r.interrupted { " (interrupted)" } else { "" }
    );
    let mut connect = r.connect_ms.clone();
    if let Some(c) = spread(&mut connect) {
        if r.connections == 1 {
            println!("connect by name: {:.3} ms", c.median);
        } else {
            println!(
                "connect by name: min {:.3} ms, median {:.3} ms, max {:.3} ms",
                c.min, c.median, c.max
            );
        }
    }
    println!(
        "{} bytes sent, {} echoed back and verified, in {:.3} s: {}",
        r.bytes_sent,
        r.bytes_echoed,
        r.seconds,
        rate(r.mbit_per_s)
    );
    if let Some(s) = r.interval_mbit_per_s {
        println!(
            "per {} ms: min {}, median {}, max {}",
            r.interval_ms,
            rate(s.min),
            rate(s.median),
            rate(s.max)
        );
    }
    if let (Some(l), Some(n), Some(size)) = (r.latency_ms, r.round_trips, r.request_bytes) {
        println!(
            "latency over {n} round trips of {size} bytes: p50 {:.3} ms, p90 {:.3} ms, \
             p99 {:.3} ms, max {:.3} ms",
            l.p50, l.p90, l.p99, l.max
        );
    }
    for g in &r.gaps {
        println!("gap {:.3}-{:.3} s: nothing echoed", g.start_s, g.end_s);
    }
    if r.reconnects > 0 {
        println!(
            "{} failed stream(s) replaced by new ones by name; {} bytes sent were lost with them",
            r.reconnects,
            r.bytes_sent.saturating_sub(r.bytes_echoed)
        );
    }
    for c in &r.instance_changes {
        println!(
            "instance changed by {:.3} s: {} -> {}",
            c.at_s,
            c.from.join(", "),
            c.to.join(", ")
        );
    }
}

/// `x` with at most three decimals and no trailing zeros (`2`, `0.25`).
fn trim(x: f64) -> String {
    let t = format!("{x:.3}");
    t.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// Draws throughput over time to `path`.
fn plot(r: &Report, path: &Path, format: PlotFormat) -> Result<(), String> {
    use plotters::prelude::*;
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| "the embedded font is unreadable".to_owned())?;
    const SIZE: (u32, u32) = (1000, 500);
    match format {
        PlotFormat::Svg => draw(SVGBackend::new(path, SIZE).into_drawing_area(), r),
        PlotFormat::Png => draw(BitMapBackend::new(path, SIZE).into_drawing_area(), r),
    }
}

fn draw<DB: plotters::prelude::DrawingBackend>(
    root: plotters::prelude::DrawingArea<DB, plotters::coord::Shift>,
    r: &Report,
) -> Result<(), String> {
    use plotters::prelude::*;
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let x_max = r.seconds.max(0.001);
    let peak = r.series.iter().map(|s| s.mbit_per_s).fold(0.0, f64::max);
    let y_max = if peak > 0.0 { peak * 1.15 } else { 1.0 };
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "serval bench {}: throughput by name ({} ms samples)",
                r.service, r.interval_ms
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("throughput (Mbit/s)")
        .axis_desc_style(("sans-serif", 15))
        .label_style(("sans-serif", 12))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .x_label_formatter(&|x| trim(*x))
        .draw()
        .map_err(err)?;
    let gap_color = RED.mix(0.2);
    if !r.gaps.is_empty() {
        chart
            .draw_series(
                r.gaps.iter().map(|g| {
                    Rectangle::new([(g.start_s, 0.0), (g.end_s, y_max)], gap_color.filled())
                }),
            )
            .map_err(err)?
            .label("nothing echoed")
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 15, y + 5)], gap_color.filled())
            });
    }
    // A step line: each sample's rate across its interval, so a gap drops to zero.
    let steps = r
        .series
        .iter()
        .flat_map(|s| [(s.start_s, s.mbit_per_s), (s.end_s, s.mbit_per_s)]);
    chart
        .draw_series(LineSeries::new(steps, BLUE.stroke_width(2)))
        .map_err(err)?
        .label("echoed throughput")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], BLUE.stroke_width(2)));
    for c in &r.instance_changes {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(c.at_s, 0.0), (c.at_s, y_max)],
                BLACK.stroke_width(1),
            )))
            .map_err(err)?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!(" -> {}", c.to.join(", ")),
                (c.at_s, y_max * 0.97),
                ("sans-serif", 12).into_font().color(&BLACK),
            )))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 12))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(start: f64, bytes: u64, inst: &str) -> Sample {
        sample(
            Mode::Throughput,
            (start, start + 0.1),
            bytes,
            0,
            &[inst.parse().unwrap_or_else(|_| panic!("{inst}"))],
        )
    }

    #[test]
    fn the_pattern_checks_echoes_at_any_offset() {
        let pat = pattern(CHUNK);
        let stream: Vec<u8> = (0..1000u64).map(|k| (k % PERIOD as u64) as u8).collect();
        assert_eq!(mismatch(&pat, 0, &stream), None);
        assert_eq!(
            mismatch(&pat, 300, stream.get(300..700).unwrap_or_default()),
            None
        );
        let mut bad = stream.get(300..700).unwrap_or_default().to_vec();
        if let Some(b) = bad.get_mut(10) {
            *b ^= 1;
        }
        assert_eq!(mismatch(&pat, 300, &bad), Some(310));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        let l = latency(&mut v).unwrap_or_else(|| panic!("empty"));
        assert_eq!(
            (l.min, l.p50, l.p90, l.p99, l.max),
            (1.0, 50.0, 90.0, 99.0, 100.0)
        );
        assert!(latency(&mut []).is_none());
        let sp = spread(&mut [3.0, 1.0, 2.0]).unwrap_or_else(|| panic!("empty"));
        assert_eq!((sp.min, sp.median, sp.max), (1.0, 2.0, 3.0));
    }

    #[test]
    fn gaps_merge_and_instance_changes_are_found() {
        let a = "127.0.0.1:1";
        let b = "127.0.0.1:2";
        let series = [
            s(0.0, 10, a),
            s(0.1, 0, a),
            s(0.2, 0, b),
            s(0.3, 10, b),
            s(0.4, 0, b),
        ];
        let g = gaps(&series);
        assert_eq!(g.len(), 2);
        assert_eq!((g[0].start_s, g[0].end_s), (0.1, 0.3));
        assert_eq!(g[1].start_s, 0.4);
        let first: Locator = a.parse().unwrap_or_else(|_| panic!("{a}"));
        let c = changes(&[first], &series);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].to, vec![b.to_owned()]);
        assert!((c[0].at_s - 0.3).abs() < 1e-9);
    }

    #[test]
    fn rates_read_well() {
        assert_eq!(rate(12.345), "12.35 Mbit/s");
        assert_eq!(rate(2500.0), "2.50 Gbit/s");
        assert_eq!(mbit_per_s(1_000_000, 1.0), 8.0);
        assert_eq!(mbit_per_s(5, 0.0), 0.0);
    }

    #[test]
    fn plot_formats_by_extension() {
        assert_eq!(plot_format(Path::new("x.svg")), Ok(PlotFormat::Svg));
        assert_eq!(plot_format(Path::new("x.PNG")), Ok(PlotFormat::Png));
        assert!(plot_format(Path::new("x.jpg")).is_err());
        assert!(plot_format(Path::new("x")).is_err());
        assert!(plot_format(Path::new("/no/such/dir/x.svg")).is_err());
    }
}
