//! Issue 10's migration pause: the client's longest receive gap while the server end of a live
//! bulk stream moves to another host, with at least 1 MiB in flight, for Serval and for its
//! peer, a live TCP connection moved with the kernel's `TCP_REPAIR` (what CRIU's libsoccr does).
//!
//! Three network namespaces on one bridge (MTU 1500): the client C (10.93.0.1), the old server
//! host A (10.93.0.2) and the new one B (10.93.0.3). Every host runs in a thread of this
//! process that entered its namespace (`setns`), so one clock times every event.
//!
//! * **Serval**: A serves `pause.bench` and streams a counter pattern to the client; a
//!   [`Migrator`] runs at A and at B. Once the client has read `--warmup` bytes and at least
//!   `--min-in-flight` bytes are written at A and not yet read by the client, A's migrator
//!   moves the flow to B (`Migrator::move_flows`, over the agent stream A opened to B with
//!   `Migrator::prepare` when it started; `--cold-agent` opens it at the move): the
//!   application at A hands the stream over with its position as the app state, and the
//!   application at B continues from it.
//! * **TCP_REPAIR**: A's server listens on the service address 10.93.0.100 (a /32 on A's
//!   eth0). At the same point A's application stops, lets its socket send what it holds,
//!   deletes the service address (rtnetlink), freezes its socket (`TCP_REPAIR`), reads the socket's state (sequence numbers, send and
//!   receive queues, MSS, window scale, SACK, timestamps, window) and sends it to B over a TCP
//!   connection opened beforehand; B adds the address, recreates the socket in repair mode,
//!   restores everything, turns repair off, then announces the address by gratuitous ARP (the
//!   client's neighbour cache still names A's MAC) and continues from the same position.
//!
//! The client timestamps every read and checks every byte against the pattern (a wrong or
//! lost byte fails the run). Reported per repetition (the two alternate): bytes in flight when
//! the move started, the longest gap between consecutive reads from the move's start to 50 ms
//! after its end, the longest gap across the freeze itself (from A's freeze to the move's end:
//! the move's own pause, without the jitter around it), the same for an equally long window
//! just before (the jitter with no move), and each move's phases; then medians and spread, and
//! the ratio Serval / TCP_REPAIR. `--pcap DIR` captures each Serval repetition's packets on the
//! bridge (`contrib/pause-pcap.py DIR` reads where the move's time went).
//!
//! With `--serval-drain`, Serval's application at A, once asked to move, stops writing and
//! waits until everything it wrote was sent once before it hands over, so that the snapshot
//! carries at most a window of unacknowledged bytes instead of the never-sent tail of its send
//! buffer (a diagnostic of what a leaner snapshot would gain; the stream flows during the wait).
//!
//! ```sh
//! cargo build --release -p serval-bench --bin pause-bench
//! target/release/pause-bench --reps 7
//! target/release/pause-bench --reps 7 --serval-drain
//! target/release/pause-bench --reps 7 --cold-agent   # A connects to B's agent at the move
//! target/release/pause-bench --reps 7 --pin-client   # the client on a CPU of its own
//! ```
//!
//! Needs root (namespaces, `TCP_REPAIR`); everything it creates is removed when it ends.

use serval_sys::repair;

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Parser;
use serval::{
    Endpoint, EndpointConfig, Locator, MigrationConfig, Migrator, Phases, PrivateKey, PublicKey,
    ServiceId, ServicePrefix,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

const SERVICE: &str = "pause.bench";
const SUBNET: &str = "10.93.0";
const CLIENT: usize = 0;
const HOST_A: usize = 1;
const HOST_B: usize = 2;
const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 93, 0, 100);
const SERVAL_PORT: u16 = 7400;
/// The TCP service's port, plus the repetition: B keeps the last repetition's connection in
/// TIME-WAIT, and a client reusing its port would make the same four-tuple, which a repaired
/// connect() refuses.
const TCP_PORT: u16 = 7500;
const STATE_PORT: u16 = 7402;
const CHUNK: usize = 64 << 10;
/// Any single wait of a repetition (connect, accept, a read, the move).
const LIMIT: Duration = Duration::from_secs(30);
/// How long after a move's end its window goes on.
const AFTER_MOVE: Duration = Duration::from_millis(50);

#[derive(Debug, Parser)]
#[command(name = "pause-bench")]
struct Args {
    /// Repetitions of each peer (they alternate).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Bytes the client reads before the move may start.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    warmup: u64,
    /// Bytes the client reads after the move (about).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    after: u64,
    /// The move starts only with at least this much written by A and not yet read.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    min_in_flight: u64,
    /// The servers' send buffer: Serval's `send_buffer`, TCP's `SO_SNDBUF`.
    #[arg(long, default_value = "2M", value_parser = parse_size)]
    send_buffer: u64,
    /// The client's receive window: Serval's `receive_window`, TCP's `SO_RCVBUF`. Small, so
    /// that the queue builds at A (and moves with the connection) rather than in the client's
    /// buffer, where it would hide the pause from the client's reads.
    #[arg(long, default_value = "256K", value_parser = parse_size)]
    client_window: u64,
    /// Serval's application at A, asked to move, first stops writing and waits until its
    /// kernel-less send buffer has sent everything once (`Stream::stats`), and only then hands
    /// over: the snapshot then holds the unacknowledged bytes (at most a window), not the
    /// never-sent tail. A diagnostic of what carrying less would gain; the client keeps
    /// receiving during the wait.
    #[arg(long)]
    serval_drain: bool,
    /// Serval's A opens its agent stream to B only when the move starts (as before kept agent
    /// streams), instead of with `Migrator::prepare` when it starts serving: the handshake
    /// and key proofs then run during the move.
    #[arg(long)]
    cold_agent: bool,
    /// Gives the client's thread the machine's last CPU and the servers' threads the others
    /// (both peers alike), as when the client runs on a host of its own: on a 2-core machine
    /// the three otherwise wait for each other's cores, and the client's wake-up joins the
    /// pause.
    #[arg(long)]
    pin_client: bool,
    /// One small repetition of each (for the test): 1 rep, 4 MiB each side, 256 KiB in flight.
    #[arg(long)]
    quick: bool,
    /// Diagnostic: capture the bridge's traffic of every Serval repetition (`dumpcap`, the
    /// first 96 bytes of each packet) into `DIR/serval-rep<N>.pcapng`, and print on stderr
    /// when (Unix time) each move started and its longest gap began and ended, to line the
    /// capture up with the client's reads. The capture costs CPU: no numbers from such a run.
    #[arg(long, value_name = "DIR")]
    pcap: Option<std::path::PathBuf>,
    /// Diagnostic: run only Serval's repetitions (no ratio).
    #[arg(long)]
    serval_only: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map_err(|e| format!("bad size {s:?}: {e}"))?
        .checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

fn main() {
    let mut a = Args::parse();
    if a.quick {
        a.reps = 1;
        a.warmup = 4 << 20;
        a.after = 4 << 20;
        a.min_in_flight = 256 << 10;
    }
    PIN_CLIENT.store(a.pin_client, Ordering::Relaxed);
    if let Err(e) = run(&a) {
        eprintln!("pause-bench: {e}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------
// The LAN

/// A bridge (in a namespace of its own) and three hosts, each a namespace with a veth to it;
/// deleted on drop.
struct Lan {
    bridge: String,
    hosts: Vec<String>,
    /// Each host's eth0: interface index and MAC.
    eth0: Vec<(u32, [u8; 6])>,
}

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Lan {
    fn new() -> Result<Lan> {
        let id = std::process::id();
        let mut lan = Lan {
            bridge: format!("svpz{id}br"),
            hosts: (0..3).map(|i| format!("svpz{id}h{i}")).collect(),
            eth0: Vec::new(),
        };
        let br = lan.bridge.clone();
        ip(&["netns", "add", &br])?;
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        for (i, h) in lan.hosts.clone().iter().enumerate() {
            ip(&["netns", "add", h])?;
            let port = format!("p{i}");
            ip(&[
                "link", "add", &port, "netns", &br, "type", "veth", "peer", "name", "eth0",
                "netns", h,
            ])?;
            ip(&["-n", &br, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &br, "link", "set", &port, "up"])?;
            ip(&[
                "-n",
                h,
                "addr",
                "add",
                &format!("{SUBNET}.{}/24", i + 1),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", h, "link", "set", "eth0", "up"])?;
            ip(&["-n", h, "link", "set", "lo", "up"])?;
            lan.eth0.push(link_of(h)?);
        }
        Ok(lan)
    }

    fn addr(&self, host: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 93, 0, host as u8 + 1)
    }
}

/// Index and MAC of `eth0` in namespace `ns` (from `ip -o link`).
fn link_of(ns: &str) -> Result<(u32, [u8; 6])> {
    let out = ip(&["-n", ns, "-o", "link", "show", "eth0"])?;
    let index = out
        .split(':')
        .next()
        .and_then(|i| i.trim().parse().ok())
        .ok_or("no ifindex")?;
    let mac = out
        .split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .ok_or("no MAC")?;
    let mut m = [0u8; 6];
    for (b, h) in m.iter_mut().zip(mac.split(':')) {
        *b = u8::from_str_radix(h, 16)?;
    }
    Ok((index, m))
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain([&self.bridge]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

// ---------------------------------------------------------------------------------------
// What both peers share: the pattern, the client's reads, the gaps

/// Byte `i` of the stream: the little-endian bytes of the 64-bit word counter `i / 8`, so a
/// byte lost, repeated or misplaced anywhere is seen.
fn pattern(i: u64) -> u8 {
    ((i >> 3) >> ((i & 7) * 8)) as u8
}

/// Writes the pattern of offsets `pos..pos + buf.len()` into `buf`: whole 8-byte words at a
/// time where aligned (the application must outrun kernel TCP over veth, or nothing queues
/// at A and the move never has 1 MiB in flight).
fn fill(pos: u64, buf: &mut [u8]) {
    let head = (((8 - pos % 8) % 8) as usize).min(buf.len());
    let (first, rest) = buf.split_at_mut(head);
    for (k, b) in first.iter_mut().enumerate() {
        *b = pattern(pos + k as u64);
    }
    let at = pos + head as u64;
    let tail_at = at + (rest.len() / 8 * 8) as u64;
    let mut words = rest.chunks_exact_mut(8);
    for (k, w) in (&mut words).enumerate() {
        w.copy_from_slice(&((at >> 3) + k as u64).to_le_bytes());
    }
    let tail = words.into_remainder();
    for (k, b) in tail.iter_mut().enumerate() {
        *b = pattern(tail_at + k as u64);
    }
}

fn check(pos: u64, data: &[u8]) -> Result<()> {
    let mut want = vec![0u8; data.len()];
    fill(pos, &mut want);
    if want == data {
        return Ok(());
    }
    let k = want.iter().zip(data).position(|(a, b)| a != b).unwrap_or(0);
    Err(format!("byte {} of the stream is wrong", pos + k as u64).into())
}

/// Bytes written by the server application (A, then B from A's position) and read by the
/// client, as they go.
#[derive(Default)]
struct Progress {
    written: AtomicU64,
    received: AtomicU64,
    /// `--quick` only: the client stops reading once it has this many bytes (0: never) until
    /// the move starts, so that the move point is reached however loaded the machine is (a
    /// short stream could otherwise end between two looks at it). No timing is kept then.
    hold_at: AtomicU64,
    moving: std::sync::atomic::AtomicBool,
    /// When A's application stopped for the move (Serval: called `hand_over`, which drains
    /// and then freezes; TCP: its socket had drained, and it froze it).
    stopped: std::sync::Mutex<Option<Instant>>,
}

impl Progress {
    fn new(a: &Args) -> Progress {
        let p = Progress::default();
        if a.quick {
            p.hold_at.store(a.warmup, Ordering::Relaxed);
        }
        p
    }
}

/// What the client saw: the time of every read, and how many bytes (all checked).
struct Received {
    reads: Vec<Instant>,
    bytes: u64,
}

impl Received {
    /// The longest gap between reads that overlaps the freeze (from `frozen`, A stops
    /// sending, to `end`, the move's end): the move's own pause, without the jitter of the
    /// drain before it and of the 50 ms after it, which the longest gap around the move also
    /// covers.
    fn gap_during(&self, frozen: Option<Instant>, end: Instant) -> Duration {
        let Some(from) = frozen else {
            return Duration::ZERO;
        };
        self.reads
            .windows(2)
            .filter(|w| w[1] >= from && w[0] <= end)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(Duration::ZERO)
    }
}

/// Records one read of `data` at offset `*off`.
fn on_read(off: &mut u64, data: &[u8], reads: &mut Vec<Instant>, p: &Progress) -> Result<()> {
    reads.push(Instant::now());
    check(*off, data)?;
    *off += data.len() as u64;
    p.received.store(*off, Ordering::Relaxed);
    let hold = p.hold_at.load(Ordering::Relaxed);
    let start = Instant::now();
    while hold != 0 && *off >= hold && !p.moving.load(Ordering::Relaxed) {
        if start.elapsed() > LIMIT {
            return Err("the move never started".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Waits until the client has read `warmup` bytes and `min` are in flight; the bytes then in
/// flight.
fn wait_for_move_point(p: &Progress, warmup: u64, min: u64) -> Result<u64> {
    let start = Instant::now();
    loop {
        let r = p.received.load(Ordering::Relaxed);
        let w = p.written.load(Ordering::Relaxed);
        if r >= warmup && w.saturating_sub(r) >= min {
            p.moving.store(true, Ordering::Relaxed);
            return Ok(w - r);
        }
        if start.elapsed() > LIMIT {
            return Err(format!(
                "no move point in {LIMIT:?}: read {r}, in flight {} (need {warmup}, {min})",
                w.saturating_sub(r)
            )
            .into());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// One repetition's result.
struct Rep {
    in_flight: u64,
    /// Longest gap between reads from the move's start to [`AFTER_MOVE`] after its end.
    gap: Duration,
    /// Where that gap began, in ms from the move's start.
    gap_at: f64,
    /// Longest gap in a window as long, just before the move.
    before: Duration,
    /// The longest gap across the freeze ([`Received::gap_during`]).
    handoff: Duration,
    /// Named phases.
    phases: Vec<(&'static str, Duration)>,
    /// Bytes of state moved (Serval's snapshot, the TCP socket's encoded state).
    snapshot: Option<usize>,
}

/// The longest gap between consecutive reads that overlaps `[from, to]`, and the longest in
/// the window of the same length just before `from`.
/// Also where the longest gap around the move began, from `from` (negative: before it).
fn gaps(reads: &[Instant], from: Instant, to: Instant) -> (Duration, Duration, f64) {
    let len = to - from;
    let mut around = Duration::ZERO;
    let mut at = 0.0;
    let mut before = Duration::ZERO;
    for w in reads.windows(2) {
        let g = w[1] - w[0];
        if w[1] >= from && w[0] <= to {
            if g > around {
                around = g;
                at = if w[0] >= from {
                    ms(w[0] - from)
                } else {
                    -ms(from - w[0])
                };
            }
        } else if w[1] < from && w[0] + len >= from {
            before = before.max(g);
        }
    }
    (around, before, at)
}

/// `--pin-client`.
static PIN_CLIENT: AtomicBool = AtomicBool::new(false);

fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<std::thread::JoinHandle<Result<T>>> {
    let client = name.ends_with("client");
    Ok(std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if PIN_CLIENT.load(Ordering::Relaxed) {
                pin(client)?;
            }
            f()
        })?)
}

/// Pins the calling thread: the client to the last CPU, a server to the others.
fn pin(client: bool) -> Result<()> {
    use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
    use nix::unistd::Pid;
    let all = sched_getaffinity(Pid::from_raw(0))?;
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| all.is_set(c).unwrap_or(false))
        .collect();
    let Some((&last, rest)) = cpus.split_last().filter(|(_, r)| !r.is_empty()) else {
        return Err("--pin-client needs at least two CPUs".into());
    };
    let mut set = CpuSet::new();
    if client {
        set.set(last)?;
    } else {
        for &c in rest {
            set.set(c)?;
        }
    }
    sched_setaffinity(Pid::from_raw(0), &set)?;
    Ok(())
}

fn join<T>(h: std::thread::JoinHandle<Result<T>>, what: &str) -> Result<T> {
    h.join()
        .map_err(|_| format!("the {what} thread panicked"))?
        .map_err(|e| format!("{what}: {e}").into())
}

fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

async fn within<T, E: Into<BoxError>>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(LIMIT, f).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(format!("{what}: nothing in {LIMIT:?}").into()),
    }
}

// ---------------------------------------------------------------------------------------
// Serval

/// The servers' and the client's endpoint configuration. Both ends get the client's window:
/// the engine assumes the peer's initial window equals its own (docs in
/// `engine/src/transport/conn.rs`, "Flow control"), so a server with the default 8 MiB would
/// overrun a client that allows 256 KiB.
fn serval_config(s: Setup) -> EndpointConfig {
    let mut c = EndpointConfig::default();
    c.transport.send_buffer = s.send_buffer as usize;
    c.transport.receive_window = s.client_window;
    c
}

fn service() -> Result<ServiceId> {
    ServiceId::from_name(SERVICE).map_err(|e| format!("service name: {e:?}").into())
}

/// Instance A: serves the stream from position 0 until it is asked to hand it over.
#[allow(clippy::too_many_arguments)]
fn serval_a(
    ns: String,
    bind: SocketAddr,
    key: PrivateKey,
    a: Setup,
    p: Arc<Progress>,
    ready: mpsc::Sender<Locator>,
    (to, to_key): (Locator, PublicKey),
    go: tokio::sync::oneshot::Receiver<()>,
    moved: mpsc::Sender<(Result<Phases, String>, Instant)>,
    done: tokio::sync::oneshot::Receiver<()>,
) -> Result<()> {
    repair::enter_netns(&ns)?;
    runtime()?.block_on(async move {
        let ep = Endpoint::bind_with(&[bind], serval_config(a)).await?;
        let mut listener = ep.listen(ServicePrefix::exact(service()?))?;
        let migrator = Migrator::start(
            &ep,
            MigrationConfig {
                key,
                allowed: Vec::new(),
                bind: (bind.ip(), 0).into(),
                refuse_moves_in: None,
            },
        )
        .await?;
        if !a.cold_agent {
            within("A's agent stream to B", migrator.prepare(to, to_key)).await?;
        }
        ready.send(ep.local_locators()[0])?;
        let mut s = within("A's accept", listener.accept()).await?;
        let mover = tokio::spawn(async move {
            if go.await.is_err() {
                return;
            }
            let r = match migrator.move_flows(&[], to, to_key).await {
                Ok(mut v) if v.len() == 1 => v.remove(0).result,
                Ok(v) => Err(format!("{} flows moved, not 1", v.len())),
                Err(e) => Err(e.to_string()),
            };
            let _ = moved.send((r, Instant::now()));
        });
        let mut buf = vec![0u8; CHUNK];
        let mut pos = 0u64;
        loop {
            if s.is_move_requested() {
                if a.drain {
                    drain(&s, pos).await?;
                }
                // The position is everything the application did: B continues from it.
                if let Ok(mut t) = p.stopped.lock() {
                    *t = Some(Instant::now());
                }
                s.hand_over(&pos.to_be_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                break;
            }
            let n = CHUNK.min((a.total - pos) as usize);
            if n == 0 {
                return Err::<(), BoxError>("A wrote everything before the move".into());
            }
            fill(pos, &mut buf[..n]);
            let w = within("A's write", s.write(&buf[..n])).await?;
            pos += w as u64;
            p.written.store(pos, Ordering::Relaxed);
        }
        let _ = mover.await;
        let _ = done.await;
        Ok(())
    })
}

/// Waits until every byte up to `pos` was sent at least once (the stream keeps flowing).
async fn drain(s: &serval::Stream, pos: u64) -> Result<()> {
    let start = Instant::now();
    loop {
        let st = s.stats()?;
        if st.stream_bytes_sent.saturating_sub(st.retransmitted_bytes) >= pos {
            return Ok(());
        }
        // Within the migrator's HANDOVER_LIMIT (5 s), which would call the move off.
        if start.elapsed() > Duration::from_secs(4) {
            return Err("the send buffer did not drain in 4 s".into());
        }
        // Not a busy loop: the cores are shared with the client's and B's threads. The wait
        // comes before the freeze, so its granularity (tokio's timer: 1 ms) is no pause.
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// Instance B: takes the moved stream and continues it from the position it carries.
fn serval_b(
    ns: String,
    bind: SocketAddr,
    key: PrivateKey,
    a: Setup,
    p: Arc<Progress>,
    ready: mpsc::Sender<Locator>,
    done: tokio::sync::oneshot::Receiver<()>,
) -> Result<()> {
    repair::enter_netns(&ns)?;
    runtime()?.block_on(async move {
        let ep = Endpoint::bind_with(&[bind], serval_config(a)).await?;
        let mut listener = ep.listen(ServicePrefix::exact(service()?))?;
        let migrator = Migrator::start(
            &ep,
            MigrationConfig {
                key,
                allowed: Vec::new(),
                bind: (bind.ip(), 0).into(),
                refuse_moves_in: None,
            },
        )
        .await?;
        ready.send(migrator.locator())?;
        let mut s = within("B's accept of the moved stream", listener.accept()).await?;
        let state = s
            .take_app_state()
            .ok_or("the moved stream carried no state")?;
        let mut pos = u64::from_be_bytes(
            state
                .as_slice()
                .try_into()
                .map_err(|_| "the state is not a position")?,
        );
        let mut buf = vec![0u8; CHUNK];
        while pos < a.total {
            let n = CHUNK.min((a.total - pos) as usize);
            fill(pos, &mut buf[..n]);
            within("B's write", s.write_all(&buf[..n])).await?;
            pos += n as u64;
            p.written.store(pos, Ordering::Relaxed);
        }
        within("B's end of stream", s.shutdown()).await?;
        let _ = done.await;
        drop(migrator);
        Ok(())
    })
}

fn serval_client(
    ns: String,
    bind: Ipv4Addr,
    to: Locator,
    s: Setup,
    p: Arc<Progress>,
) -> Result<Received> {
    repair::enter_netns(&ns)?;
    runtime()?.block_on(async move {
        let ep = Endpoint::bind_with(&[(bind, 0).into()], serval_config(s)).await?;
        let mut s = within("the client's connect", ep.connect_via(service()?, to)).await?;
        let mut buf = vec![0u8; CHUNK];
        let (mut off, mut reads) = (0u64, Vec::with_capacity(1 << 16));
        loop {
            let n = within("a client read", s.read(&mut buf)).await?;
            if n == 0 {
                break;
            }
            on_read(&mut off, &buf[..n], &mut reads, &p)?;
        }
        Ok(Received { reads, bytes: off })
    })
}

/// The bench's sizes, copied into each thread.
#[derive(Clone, Copy)]
struct Setup {
    total: u64,
    /// This repetition's TCP service port.
    tcp_port: u16,
    send_buffer: u64,
    client_window: u64,
    /// `--serval-drain`.
    drain: bool,
    /// `--cold-agent`.
    cold_agent: bool,
}

fn serval_rep(lan: &Lan, a: &Args, s: Setup, rep: usize) -> Result<Rep> {
    let _capture = match &a.pcap {
        Some(dir) => Some(Capture::start(
            lan,
            &dir.join(format!("serval-rep{rep}.pcapng")),
        )?),
        None => None,
    };
    let key = PrivateKey::generate(&ring::rand::SystemRandom::new())
        .map_err(|e| format!("key: {e:?}"))?;
    let p = Arc::new(Progress::new(a));
    let (ready_b, ready_rx) = mpsc::channel();
    let (done_b, done_b_rx) = tokio::sync::oneshot::channel();
    let b = {
        let (ns, bind, key, p) = (
            lan.hosts[HOST_B].clone(),
            SocketAddr::from((lan.addr(HOST_B), SERVAL_PORT)),
            key.clone(),
            p.clone(),
        );
        spawn("serval-b", move || {
            serval_b(ns, bind, key, s, p, ready_b, done_b_rx)
        })?
    };
    let b_agent = ready_rx.recv_timeout(LIMIT)?;
    let (ready_a, ready_rx) = mpsc::channel();
    let (go, go_rx) = tokio::sync::oneshot::channel();
    let (moved, moved_rx) = mpsc::channel();
    let (done_a, done_a_rx) = tokio::sync::oneshot::channel();
    let a_thread = {
        let (ns, bind, key, p) = (
            lan.hosts[HOST_A].clone(),
            SocketAddr::from((lan.addr(HOST_A), SERVAL_PORT)),
            key.clone(),
            p.clone(),
        );
        spawn("serval-a", move || {
            let to = (b_agent, key.public_key());
            serval_a(ns, bind, key, s, p, ready_a, to, go_rx, moved, done_a_rx)
        })?
    };
    let a_loc = ready_rx.recv_timeout(LIMIT)?;
    let client = {
        let (ns, bind, p) = (lan.hosts[CLIENT].clone(), lan.addr(CLIENT), p.clone());
        spawn("serval-client", move || {
            serval_client(ns, bind, a_loc, s, p)
        })?
    };
    let in_flight = wait_for_move_point(&p, a.warmup, a.min_in_flight)?;
    let start = Instant::now();
    go.send(()).map_err(|_| "A stopped before the move")?;
    let (phases, end) = match moved_rx.recv_timeout(LIMIT * 2) {
        Ok(m) => m,
        Err(e) => {
            join(a_thread, "Serval A")?;
            return Err(format!("A's migrator did not report: {e}").into());
        }
    };
    let phases = phases.map_err(|e| format!("the move failed: {e}"))?;
    let got = join(client, "Serval client")?;
    let _ = done_a.send(());
    let _ = done_b.send(());
    join(a_thread, "Serval A")?;
    join(b, "Serval B")?;
    if got.bytes != s.total {
        return Err(format!("the client read {} bytes of {}", got.bytes, s.total).into());
    }
    let (gap, before, gap_at) = gaps(&got.reads, start, end + AFTER_MOVE);
    if a.pcap.is_some() {
        let begin = unix(start) + gap_at / 1e3;
        eprintln!(
            "serval rep {rep}: move started at {:.6}, longest gap {:.6} .. {:.6}",
            unix(start),
            begin,
            begin + gap.as_secs_f64()
        );
    }
    Ok(Rep {
        in_flight,
        gap,
        gap_at,
        before,
        handoff: got.gap_during(
            p.stopped
                .lock()
                .ok()
                .and_then(|t| *t)
                .map(|t| t + phases.drain),
            end,
        ),
        phases: vec![
            ("handover", phases.handover),
            ("drain", phases.drain),
            ("export", phases.export),
            ("transfer", phases.transfer),
            ("import", phases.import),
            ("rebind", phases.rebind),
            ("frozen", phases.frozen),
        ],
        snapshot: Some(phases.snapshot_bytes),
    })
}

// ---------------------------------------------------------------------------------------
// TCP_REPAIR

/// When each step of the TCP hand-off ended (one clock: all threads of this process).
struct TcpTimes {
    stopped: Instant,
    dumped: Instant,
    received: Instant,
    state_bytes: usize,
    added: Instant,
    announced: Instant,
    restored: Instant,
}

fn accept_within(l: &TcpListener, what: &str) -> Result<TcpStream> {
    l.set_nonblocking(true)?;
    let start = Instant::now();
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && start.elapsed() < LIMIT => {
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(format!("{what}: nothing in {LIMIT:?}").into());
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Host A: streams from position 0 until told to stop, then freezes its socket, gives up
/// the service address, and sends the socket's state and its position to B.
#[allow(clippy::too_many_arguments)]
fn tcp_a(
    ns: String,
    ifindex: u32,
    b_state: SocketAddr,
    s: Setup,
    p: Arc<Progress>,
    ready: mpsc::Sender<()>,
    stop: Arc<AtomicBool>,
) -> Result<(Instant, Instant, usize)> {
    repair::enter_netns(&ns)?;
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    l.set_reuse_address(true)?;
    l.set_send_buffer_size(s.send_buffer as usize)?;
    l.bind(&SocketAddr::from((SERVICE_IP, s.tcp_port)).into())?;
    l.listen(8)?;
    let l: TcpListener = l.into();
    let mut to_b = TcpStream::connect_timeout(&b_state, LIMIT)?;
    to_b.set_nodelay(true)?;
    ready.send(())?;
    let mut c = accept_within(&l, "A's accept")?;
    c.set_write_timeout(Some(LIMIT))?;
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let n = CHUNK.min((s.total - pos) as usize);
        if n == 0 {
            return Err("A wrote everything before the move".into());
        }
        fill(pos, &mut buf[..n]);
        pos += c.write(&buf[..n])? as u64;
        p.written.store(pos, Ordering::Relaxed);
    }
    // Like Serval's hand-over, let the socket send what it holds first (the client still
    // receives meanwhile). Then nothing new can leave it: repair mode alone does not stop a
    // socket, and data it sent once the address is gone would be dropped by the routing yet
    // count as sent, or (an ACK processed while the dump selects the send queue) be marked
    // sent without leaving; either way B would resend it only after an RTO (gaps of 0.2–3 s
    // seen without this wait).
    let drained = Instant::now();
    while repair::unsent(&c)? > 0 {
        if drained.elapsed() > Duration::from_secs(4) {
            return Err("A's socket did not send its queue in 4 s".into());
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    let stopped = Instant::now();
    if let Ok(mut t) = p.stopped.lock() {
        *t = Some(stopped);
    }
    // The address goes first (CRIU's "network lock"): what the client sends from now on is
    // dropped here, never reaches the socket, and is sent again to B.
    repair::set_address(ifindex, SERVICE_IP, false)?;
    repair::freeze(&c)?;
    let frozen = repair::dump(&c)?;
    // Closed in repair mode: nothing is sent.
    drop(c);
    let dumped = Instant::now();
    let state = frozen.encode();
    let mut msg = Vec::with_capacity(12 + state.len());
    msg.extend_from_slice(&pos.to_be_bytes());
    msg.extend_from_slice(&(state.len() as u32).to_be_bytes());
    msg.extend_from_slice(&state);
    to_b.write_all(&msg)?;
    Ok((stopped, dumped, state.len()))
}

/// Host B: takes the state, the address, and the connection, and continues the stream.
#[allow(clippy::too_many_arguments)]
fn tcp_b(
    ns: String,
    bind: SocketAddr,
    link: (u32, [u8; 6]),
    s: Setup,
    p: Arc<Progress>,
    ready: mpsc::Sender<()>,
    restored: mpsc::Sender<(Instant, Instant, Instant, Instant)>,
) -> Result<()> {
    repair::enter_netns(&ns)?;
    let l = TcpListener::bind(bind)?;
    let announcer = repair::Announcer::new(link.0, link.1)?;
    ready.send(())?;
    let mut from_a = accept_within(&l, "B's accept of A's state connection")?;
    from_a.set_read_timeout(Some(LIMIT * 2))?;
    let mut head = [0u8; 12];
    from_a.read_exact(&mut head)?;
    let mut pos = u64::from_be_bytes(head[..8].try_into()?);
    let mut state = vec![0u8; u32::from_be_bytes(head[8..].try_into()?) as usize];
    from_a.read_exact(&mut state)?;
    let received = Instant::now();
    let frozen = repair::Frozen::decode(&state).ok_or("A's state does not decode")?;
    repair::set_address(link.0, SERVICE_IP, true)?;
    let added = Instant::now();
    // The socket before the announcement: a client packet that reached B before its socket
    // existed would be answered with a RST (seen in CI).
    let mut c = repair::restore(&frozen, Some(s.send_buffer as usize))?;
    let restored_at = Instant::now();
    announcer.announce(SERVICE_IP)?;
    restored.send((received, added, restored_at, Instant::now()))?;
    c.set_write_timeout(Some(LIMIT))?;
    // The part A's application had written and its kernel never sent, then the rest.
    c.write_all(&frozen.unsent)?;
    drop(announcer);
    let mut buf = vec![0u8; CHUNK];
    while pos < s.total {
        let n = CHUNK.min((s.total - pos) as usize);
        fill(pos, &mut buf[..n]);
        c.write_all(&buf[..n])?;
        pos += n as u64;
        p.written.store(pos, Ordering::Relaxed);
    }
    c.shutdown(std::net::Shutdown::Write)?;
    // Until the client has read everything and closed.
    c.set_read_timeout(Some(LIMIT))?;
    let _ = c.read(&mut buf)?;
    Ok(())
}

fn tcp_client(ns: String, s: Setup, p: Arc<Progress>) -> Result<Received> {
    repair::enter_netns(&ns)?;
    let c = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    // Before connecting, so that the window scale matches.
    c.set_recv_buffer_size(s.client_window as usize)?;
    c.connect_timeout(&SocketAddr::from((SERVICE_IP, s.tcp_port)).into(), LIMIT)?;
    let mut c: TcpStream = c.into();
    c.set_read_timeout(Some(LIMIT))?;
    let mut buf = vec![0u8; CHUNK];
    let (mut off, mut reads) = (0u64, Vec::with_capacity(1 << 16));
    loop {
        let n = c.read(&mut buf)?;
        if n == 0 {
            break;
        }
        on_read(&mut off, &buf[..n], &mut reads, &p)?;
    }
    Ok(Received { reads, bytes: off })
}

fn tcp_rep(lan: &Lan, a: &Args, s: Setup) -> Result<Rep> {
    // The service address starts at A, and the client has no stale idea of where it is.
    let svc = format!("{SERVICE_IP}/32");
    let _ = ip(&["-n", &lan.hosts[HOST_B], "addr", "del", &svc, "dev", "eth0"]);
    let _ = ip(&["-n", &lan.hosts[HOST_A], "addr", "add", &svc, "dev", "eth0"]);
    let _ = ip(&[
        "-n",
        &lan.hosts[CLIENT],
        "neigh",
        "del",
        &SERVICE_IP.to_string(),
        "dev",
        "eth0",
    ]);
    let p = Arc::new(Progress::new(a));
    let b_state = SocketAddr::from((lan.addr(HOST_B), STATE_PORT));
    let (ready_b, ready_rx) = mpsc::channel();
    let (restored, restored_rx) = mpsc::channel();
    let b = {
        let (ns, link, p) = (lan.hosts[HOST_B].clone(), lan.eth0[HOST_B], p.clone());
        spawn("tcp-b", move || {
            tcp_b(ns, b_state, link, s, p, ready_b, restored)
        })?
    };
    ready_rx.recv_timeout(LIMIT)?;
    let (ready_a, ready_rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let a_thread = {
        let (ns, ifindex, p, stop) = (
            lan.hosts[HOST_A].clone(),
            lan.eth0[HOST_A].0,
            p.clone(),
            stop.clone(),
        );
        spawn("tcp-a", move || {
            tcp_a(ns, ifindex, b_state, s, p, ready_a, stop)
        })?
    };
    ready_rx.recv_timeout(LIMIT)?;
    let client = {
        let (ns, p) = (lan.hosts[CLIENT].clone(), p.clone());
        spawn("tcp-client", move || tcp_client(ns, s, p))?
    };
    let in_flight = wait_for_move_point(&p, a.warmup, a.min_in_flight)?;
    let start = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let (stopped, dumped, state_bytes) = join(a_thread, "TCP A")?;
    let (received, added, restored, end) = match restored_rx.recv_timeout(LIMIT * 2) {
        Ok(t) => t,
        Err(e) => {
            join(b, "TCP B")?;
            return Err(format!("B did not restore the connection: {e}").into());
        }
    };
    let got = join(client, "TCP client")?;
    join(b, "TCP B")?;
    if got.bytes != s.total {
        return Err(format!("the client read {} bytes of {}", got.bytes, s.total).into());
    }
    // The client's neighbour cache must name B's MAC now (the gratuitous ARP did it).
    let neigh = ip(&[
        "-n",
        &lan.hosts[CLIENT],
        "neigh",
        "show",
        &SERVICE_IP.to_string(),
    ])?;
    let mac_b = lan.eth0[HOST_B]
        .1
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    if !neigh.contains(&mac_b) {
        eprintln!("note: the client's neighbour entry is not B's MAC after the move: {neigh}");
    }
    let t = TcpTimes {
        stopped,
        dumped,
        received,
        state_bytes,
        added,
        restored,
        announced: end,
    };
    let (gap, before, gap_at) = gaps(&got.reads, start, end + AFTER_MOVE);
    Ok(Rep {
        in_flight,
        gap,
        gap_at,
        before,
        handoff: got.gap_during(p.stopped.lock().ok().and_then(|t| *t), end),
        phases: vec![
            ("stop+drain", t.stopped - start),
            ("freeze+dump", t.dumped - t.stopped),
            ("transfer", t.received - t.dumped),
            ("address", t.added - t.received),
            ("restore", t.restored - t.added),
            ("arp", t.announced - t.restored),
            ("frozen", t.announced - t.stopped),
        ],
        snapshot: Some(t.state_bytes),
    })
}

// ---------------------------------------------------------------------------------------
// The run

/// `i` as Unix time in seconds (the process's clocks are paired once, at the first call).
fn unix(i: Instant) -> f64 {
    static ANCHOR: std::sync::OnceLock<(Instant, f64)> = std::sync::OnceLock::new();
    let (at, wall) = *ANCHOR.get_or_init(|| {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        (Instant::now(), wall)
    });
    if i >= at {
        wall + (i - at).as_secs_f64()
    } else {
        wall - (at - i).as_secs_f64()
    }
}

/// A `dumpcap` on the bridge (`--pcap`), stopped (SIGINT, so that it flushes) on drop.
struct Capture(std::process::Child);

impl Capture {
    fn start(lan: &Lan, file: &std::path::Path) -> Result<Capture> {
        let _ = std::fs::remove_file(file);
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lan.bridge,
                "dumpcap",
                "-q",
                "-i",
                "br0",
                "-s",
                "96",
            ])
            .arg("-w")
            .arg(file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        // dumpcap creates the file once it captures.
        let start = Instant::now();
        while !file.exists() {
            if start.elapsed() > Duration::from_secs(10) {
                return Err("dumpcap did not start".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Capture(child))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Median, minimum and maximum.
fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let med = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    (med, s[0], s[s.len() - 1])
}

fn phases_text(r: &Rep) -> String {
    let mut t = r
        .phases
        .iter()
        .map(|(n, d)| format!("{n} {:.3}", ms(*d)))
        .collect::<Vec<_>>()
        .join(", ");
    if let Some(b) = r.snapshot {
        t += &format!("; state moved {} KiB", b >> 10);
    }
    t
}

fn run(a: &Args) -> Result<()> {
    let lan = Lan::new()?;
    let mut s = Setup {
        total: a.warmup + a.after + 4 * a.send_buffer,
        tcp_port: TCP_PORT,
        send_buffer: a.send_buffer,
        client_window: a.client_window,
        drain: a.serval_drain,
        cold_agent: a.cold_agent,
    };
    println!(
        "pause-bench: {} reps each, alternating; move after {} MiB read with >= {} KiB in \
         flight; send buffers {} KiB, client windows {} KiB; {} MiB per stream; bytes checked \
         against the pattern{}",
        a.reps,
        a.warmup >> 20,
        a.min_in_flight >> 10,
        a.send_buffer >> 10,
        a.client_window >> 10,
        s.total >> 20,
        if a.serval_drain {
            "; Serval's application drains its send buffer before handing over"
        } else {
            ""
        }
    );
    println!();
    println!(
        "| rep | peer | in flight at move (KiB) | longest gap around the move (ms; from when) | gap during \
         the move (ms) | longest gap before it (ms) | phases (ms) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let (mut sv, mut tcp): (Vec<Rep>, Vec<Rep>) = (Vec::new(), Vec::new());
    for rep in 0..a.reps {
        s.tcp_port = TCP_PORT + rep as u16;
        // Alternate which goes first.
        let order: [bool; 2] = if rep % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for serval in order {
            if a.serval_only && !serval {
                continue;
            }
            let r = if serval {
                serval_rep(&lan, a, s, rep).map_err(|e| format!("Serval, rep {rep}: {e}"))?
            } else {
                tcp_rep(&lan, a, s).map_err(|e| format!("TCP_REPAIR, rep {rep}: {e}"))?
            };
            println!(
                "| {rep} | {} | {} | {:.3} (from {:.3}) | {:.3} | {:.3} | {} |",
                if serval { "Serval" } else { "TCP_REPAIR" },
                r.in_flight >> 10,
                ms(r.gap),
                r.gap_at,
                ms(r.handoff),
                ms(r.before),
                phases_text(&r)
            );
            if serval { &mut sv } else { &mut tcp }.push(r);
        }
    }
    println!();
    println!(
        "| peer | longest gap, median (min–max) ms | gap during the move, median (min–max) ms | \
         jitter before, median ms | in flight, median KiB |"
    );
    println!("|---|---|---|---|---|");
    for (name, v) in [("Serval", &sv), ("TCP_REPAIR", &tcp)] {
        let (m, lo, hi) = stats(&v.iter().map(|r| ms(r.gap)).collect::<Vec<_>>());
        let (h, hlo, hhi) = stats(&v.iter().map(|r| ms(r.handoff)).collect::<Vec<_>>());
        let (b, _, _) = stats(&v.iter().map(|r| ms(r.before)).collect::<Vec<_>>());
        let (f, _, _) = stats(&v.iter().map(|r| r.in_flight as f64).collect::<Vec<_>>());
        println!(
            "| {name} | {m:.3} ({lo:.3}–{hi:.3}) | {h:.3} ({hlo:.3}–{hhi:.3}) | {b:.3} | {:.0} |",
            f / 1024.0
        );
    }
    let (m_sv, _, _) = stats(&sv.iter().map(|r| ms(r.gap)).collect::<Vec<_>>());
    let (m_tcp, _, _) = stats(&tcp.iter().map(|r| ms(r.gap)).collect::<Vec<_>>());
    println!();
    let (h_sv, _, _) = stats(&sv.iter().map(|r| ms(r.handoff)).collect::<Vec<_>>());
    let (h_tcp, _, _) = stats(&tcp.iter().map(|r| ms(r.handoff)).collect::<Vec<_>>());
    println!(
        "ratio Serval / TCP_REPAIR (median longest gap): {:.2}; (median gap during the move): {:.2}",
        m_sv / m_tcp,
        h_sv / h_tcp
    );
    for (name, v) in [("Serval", &sv), ("TCP_REPAIR", &tcp)] {
        let Some(first) = v.first() else { continue };
        let medians: Vec<String> = (0..first.phases.len())
            .map(|i| {
                let (m, _, _) = stats(&v.iter().map(|r| ms(r.phases[i].1)).collect::<Vec<_>>());
                format!("{} {m:.3}", first.phases[i].0)
            })
            .collect();
        println!("{name} phase medians (ms): {}", medians.join(", "));
    }
    println!("bytes exact: every byte of every stream checked");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_matches_the_pattern_at_any_offset_and_length() {
        for pos in 0..20u64 {
            for len in 0..40usize {
                let mut b = vec![0u8; len];
                fill(pos, &mut b);
                let want: Vec<u8> = (0..len as u64).map(|k| pattern(pos + k)).collect();
                assert_eq!(b, want, "pos {pos} len {len}");
                assert!(check(pos, &b).is_ok());
                if len > 0 {
                    b[len / 2] ^= 1;
                    assert!(check(pos, &b).is_err());
                }
            }
        }
    }
}
