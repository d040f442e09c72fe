//! A SYN flood at a Serval server while legitimate clients connect (issue 12, "Floods").
//!
//! * `server` — a `serval::Endpoint` (tokio current-thread runtime) serving a 64-byte echo on
//!   `echo.bench`, with `--cookies default` (stateless cookies once 256 handshakes are half
//!   open) or `--cookies never` (every SYN with a key share creates a half-open flow). Prints
//!   `READY <addr>`; on each `STATS` line read from its standard input it prints its own CPU
//!   time (utime + stime of `/proc/self/stat`, all threads) and its endpoint counters.
//! * `flood` — forged SYNs for `echo.bench`, each with a fresh random flowID, nonce, initial
//!   sequence number and X25519 key share (so that each would be a new handshake), from the
//!   flooder's own address, at `--rate` SYNs/s (paced every millisecond, GSO batches of up to
//!   64). It never reads what comes back.
//! * `legit` — open-loop legitimate clients: a new connection every `--interval-ms`, each
//!   connect + 64-byte request/response + end of stream within `--timeout-ms`, or it failed.
//! * `run` — two network namespaces joined by a veth pair (`sflood-srv` 10.89.0.1,
//!   `sflood-cli` 10.89.0.2, MTU 1500); per repetition, for each cookie policy and each rate
//!   (interleaved), a fresh server, the legitimate clients and the flooder for `--secs`; the
//!   server's CPU and counters are read just before and just after the flood. Markdown table.
//!
//! ```sh
//! cargo build --release -p serval-bench --bins
//! target/release/syn-flood-bench run --rates 0,10000,50000,200000 --reps 5
//! ```

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use quinn_udp::{Transmit, UdpSocketState};
use serval_engine::endpoint::SynCookies;
use serval_wire::ext::{ControlFlags, ControlRepr, KeyShareRepr, ServiceRepr};
use serval_wire::{FlowId, Nonce, Protocol, SalRepr, ServiceId};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

const SERVICE: &str = "echo.bench";

#[derive(Debug, Parser)]
#[command(name = "syn-flood-bench")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The server under attack (echo.bench); `STATS` on stdin prints its CPU and counters.
    Server(ServerArgs),
    /// Forged SYNs at a fixed rate.
    Flood(FloodArgs),
    /// Legitimate clients, open loop; prints a `LEGIT ...` line.
    Legit(LegitArgs),
    /// Orchestrate everything over veth between two namespaces; prints a markdown table.
    Run(RunArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Cookies {
    /// The engine's default: cookies once 256 handshakes are half open.
    Default,
    /// `SynCookies::Never`: state for every SYN.
    Never,
}

impl Cookies {
    fn name(self) -> &'static str {
        match self {
            Cookies::Default => "default",
            Cookies::Never => "never",
        }
    }
}

#[derive(Debug, Args)]
struct ServerArgs {
    #[arg(long)]
    bind: SocketAddr,
    #[arg(long, value_enum, default_value = "default")]
    cookies: Cookies,
}

#[derive(Debug, Args)]
struct FloodArgs {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:0")]
    bind: SocketAddr,
    /// SYNs per second.
    #[arg(long)]
    rate: u64,
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
}

#[derive(Debug, Args)]
struct LegitArgs {
    #[arg(long)]
    connect: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:0")]
    bind: SocketAddr,
    /// How long new connections are started.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// A new connection every this many milliseconds.
    #[arg(long, default_value_t = 10)]
    interval_ms: u64,
    /// A connection that has not finished its echo by then failed.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Flood rates (SYNs/s); 0 is the baseline without a flood.
    #[arg(long, value_delimiter = ',', default_value = "0,10000,50000,200000")]
    rates: Vec<u64>,
    /// Cookie policies of the server.
    #[arg(long, value_delimiter = ',', default_value = "default,never")]
    cookies: Vec<Cookies>,
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Seconds of flood (and of legitimate connections) per measurement.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    #[arg(long, default_value_t = 10)]
    interval_ms: u64,
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

fn main() {
    let cli = Cli::parse();
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let res = match cli.cmd {
        Cmd::Server(a) => rt()
            .map_err(BoxError::from)
            .and_then(|rt| rt.block_on(server(a))),
        Cmd::Flood(a) => flood(&a),
        Cmd::Legit(a) => rt()
            .map_err(BoxError::from)
            .and_then(|rt| rt.block_on(legit(a))),
        Cmd::Run(a) => run(&a),
    };
    if let Err(e) = res {
        eprintln!("syn-flood-bench: {e}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
// Server.

/// utime + stime of this process, in seconds (`/proc/self/stat`, clock ticks of 10 ms).
fn cpu_secs() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some(rest) = s.rfind(')').map(|i| &s[i + 2..]) else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let ticks = |i: usize| f.get(i - 3).and_then(|v| v.parse::<f64>().ok());
    match (ticks(14), ticks(15)) {
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => f64::NAN,
    }
}

async fn server(a: ServerArgs) -> Result<()> {
    let mut config = serval::EndpointConfig::default();
    if a.cookies == Cookies::Never {
        config.syn_cookies = SynCookies::Never;
    }
    let ep = serval::Endpoint::bind_with(&[a.bind], config).await?;
    let id = serval::ServiceId::from_name(SERVICE).map_err(|e| format!("{e:?}"))?;
    let mut listener = ep.listen(serval::ServicePrefix::exact(id))?;
    println!("READY {}", ep.local_locators()[0]);
    io::stdout().flush()?;
    let ep2 = ep.clone();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.trim() == "STATS" {
                let s = ep2.stats();
                println!(
                    "STATS cpu={:.2} received={} accepted={} cookies_sent={} cookies_accepted={} cookies_refused={} backlog_drops={} bad_key_shares={} transmit_queue_drops={} malformed={}",
                    cpu_secs(),
                    s.received,
                    s.accepted,
                    s.cookies_sent,
                    s.cookies_accepted,
                    s.cookies_refused,
                    s.backlog_drops,
                    s.bad_key_shares,
                    s.transmit_queue_drops,
                    s.malformed,
                );
                let _ = io::stdout().flush();
            }
        }
        std::process::exit(0);
    });
    loop {
        let mut s = listener.accept().await?;
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(64);
            let r = async {
                s.read_to_end(&mut buf).await?;
                s.write_all(&buf).await?;
                s.shutdown().await
            }
            .await;
            if r.is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(3), s.closed()).await;
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Flooder.

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One forged SYN for `service` with fresh random identifiers and key share.
fn forged_syn(rng: &mut XorShift, service: ServiceId, from: SocketAddr) -> Result<Vec<u8>> {
    let mut r = SalRepr::new(Protocol::STREAM, FlowId(rng.next() | 1), FlowId::NONE);
    r.control = Some(ControlRepr {
        flags: ControlFlags::SYN,
        verno: rng.next() as u32,
        ackno: 0,
    });
    r.service = Some(ServiceRepr {
        hop_limit: 16,
        id: service,
    });
    let mut nonce = [0u8; 16];
    nonce[..8].copy_from_slice(&rng.next().to_be_bytes());
    nonce[8..].copy_from_slice(&rng.next().to_be_bytes());
    r.nonce = Some(Nonce(nonce));
    let mut key = [0u8; 32];
    for c in key.chunks_mut(8) {
        c.copy_from_slice(&rng.next().to_le_bytes());
    }
    r.keyshare = Some(KeyShareRepr {
        group: KeyShareRepr::X25519,
        flags: 0,
        key,
    });
    r.source = vec![from];
    Ok(r.to_bytes(&[])?)
}

fn flood(a: &FloodArgs) -> Result<()> {
    let sock = UdpSocket::bind(a.bind)?;
    let from = sock.local_addr()?;
    let state = UdpSocketState::new((&sock).into())?;
    let per_batch = state.max_gso_segments().clamp(1, 64);
    let service = ServiceId::from_name(SERVICE).map_err(|e| format!("{e:?}"))?;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    let mut rng = XorShift(seed | 1);
    let seg = forged_syn(&mut rng, service, from)?.len();
    let mut batch = Vec::with_capacity(seg * per_batch);
    let t0 = Instant::now();
    let end = Duration::from_secs_f64(a.secs);
    let mut sent = 0u64;
    let mut errors = 0u64;
    loop {
        let el = t0.elapsed();
        if el >= end {
            break;
        }
        let due = (a.rate as f64 * el.as_secs_f64()) as u64;
        // Never more than 10 ms of SYNs at once after a stall (no bursts beyond pacing).
        let mut owe = due.saturating_sub(sent).min(a.rate / 100 + 1);
        if owe == 0 {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        while owe > 0 {
            let n = (owe as usize).min(per_batch);
            batch.clear();
            for _ in 0..n {
                let s = forged_syn(&mut rng, service, from)?;
                if s.len() != seg {
                    return Err("forged SYNs of different sizes".into());
                }
                batch.extend_from_slice(&s);
            }
            let t = Transmit {
                destination: a.target,
                ecn: None,
                contents: &batch,
                segment_size: (n > 1).then_some(seg),
                src_ip: None,
            };
            match state.try_send((&sock).into(), &t) {
                Ok(()) => {}
                Err(_) => errors += 1,
            }
            // Counted as offered even when the kernel refused: pacing stays on the clock.
            sent += n as u64;
            owe -= n as u64;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "FLOOD sent={sent} secs={secs:.3} rate={:.0} send_errors={errors} syn_bytes={seg}",
        sent as f64 / secs
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Legitimate clients.

async fn legit(a: LegitArgs) -> Result<()> {
    let ep = serval::Endpoint::bind_with(&[a.bind], serval::EndpointConfig::default()).await?;
    let id = serval::ServiceId::from_name(SERVICE).map_err(|e| format!("{e:?}"))?;
    let timeout = Duration::from_millis(a.timeout_ms);
    let mut tick = tokio::time::interval(Duration::from_millis(a.interval_ms.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    let to = a.connect;
    while t0.elapsed().as_secs_f64() < a.secs {
        tick.tick().await;
        let ep = ep.clone();
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let r = tokio::time::timeout(timeout, async {
                let mut s = ep.connect_via(id, to).await?;
                let connected = start.elapsed();
                let req = [0x5au8; 64];
                s.write_all(&req).await?;
                s.shutdown().await?;
                let mut got = Vec::with_capacity(64);
                s.read_to_end(&mut got).await?;
                if got != req {
                    return Err(io::Error::other("wrong echo"));
                }
                Ok::<_, io::Error>((connected, start.elapsed()))
            })
            .await;
            match r {
                Ok(Ok(t)) => Ok(t),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out".to_string()),
            }
        }));
    }
    let (mut conn, mut total, mut failed) = (Vec::new(), Vec::new(), 0usize);
    let mut why = std::collections::BTreeMap::<String, usize>::new();
    let attempts = tasks.len();
    for t in tasks {
        match t.await? {
            Ok((c, d)) => {
                conn.push(c.as_secs_f64() * 1e3);
                total.push(d.as_secs_f64() * 1e3);
            }
            Err(e) => {
                failed += 1;
                *why.entry(e).or_default() += 1;
            }
        }
    }
    let q = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return f64::NAN;
        }
        v[(((v.len() - 1) as f64) * p).round() as usize]
    };
    println!(
        "LEGIT attempts={attempts} ok={} failed={failed} connect_p50_ms={:.3} connect_p99_ms={:.3} echo_p50_ms={:.3} echo_p99_ms={:.3} why={:?}",
        conn.len(),
        q(&mut conn, 0.5),
        q(&mut conn, 0.99),
        q(&mut total, 0.5),
        q(&mut total, 0.99),
        why,
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Orchestration.

const NS_SERVER: &str = "sflood-srv";
const NS_CLIENT: &str = "sflood-cli";
const SERVER_IP: &str = "10.89.0.1";
const CLIENT_IP: &str = "10.89.0.2";

fn sh(argv: &[&str]) -> Result<String> {
    let out = Command::new(argv[0]).args(&argv[1..]).output()?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

struct Netns;

impl Netns {
    fn create() -> Result<Netns> {
        for ns in [NS_SERVER, NS_CLIENT] {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
        let g = Netns;
        for ns in [NS_SERVER, NS_CLIENT] {
            sh(&["ip", "netns", "add", ns])?;
        }
        sh(&[
            "ip", "link", "add", "sfl-srv", "netns", NS_SERVER, "mtu", "1500", "type", "veth",
            "peer", "name", "sfl-cli", "netns", NS_CLIENT, "mtu", "1500",
        ])?;
        for (ns, dev, ip) in [
            (NS_SERVER, "sfl-srv", SERVER_IP),
            (NS_CLIENT, "sfl-cli", CLIENT_IP),
        ] {
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                dev,
            ])?;
            sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(g)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in [NS_SERVER, NS_CLIENT] {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
}

/// The server process: its stdin (for `STATS`) and its stdout lines.
struct ServerProc {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    addr: SocketAddr,
}

impl ServerProc {
    fn start(exe: &str, cookies: Cookies) -> Result<ServerProc> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", NS_SERVER, exe, "server", "--bind"])
            .arg(format!("{SERVER_IP}:0"))
            .args(["--cookies", cookies.name()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = ServerProc {
            child,
            stdin,
            lines: rx,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let line = p.line("READY ")?;
        p.addr = line["READY ".len()..].trim().parse()?;
        Ok(p)
    }

    fn line(&self, prefix: &str) -> Result<String> {
        loop {
            let l = self.lines.recv_timeout(Duration::from_secs(20))?;
            if l.starts_with(prefix) {
                return Ok(l);
            }
        }
    }

    fn stats(&mut self) -> Result<String> {
        self.stdin.write_all(b"STATS\n")?;
        self.stdin.flush()?;
        self.line("STATS ")
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let n = s.len();
    let med = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (med, s[0], s[n - 1])
}

#[derive(Default)]
struct Samples {
    success: Vec<f64>,
    connect_p50: Vec<f64>,
    connect_p99: Vec<f64>,
    received_rate: Vec<f64>,
    cpu_share: Vec<f64>,
    us_per_syn: Vec<f64>,
    cookies_rate: Vec<f64>,
    processed: Vec<f64>,
    rcvbuf_errors: Vec<f64>,
}

/// `Udp: RcvbufErrors` of the server's namespace (datagrams the kernel dropped because a
/// socket's receive buffer was full).
fn rcvbuf_errors() -> f64 {
    let Ok(snmp) = sh(&["ip", "netns", "exec", NS_SERVER, "cat", "/proc/net/snmp"]) else {
        return f64::NAN;
    };
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return f64::NAN;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// One measurement: a fresh server, the legitimate clients and the flood for `secs`.
fn measure(a: &RunArgs, exe: &str, cookies: Cookies, rate: u64, s: &mut Samples) -> Result<()> {
    let mut server = ServerProc::start(exe, cookies)?;
    let addr = server.addr.to_string();
    let secs = a.secs.to_string();
    let legit = Command::new("ip")
        .args(["netns", "exec", NS_CLIENT, exe, "legit", "--connect", &addr])
        .args(["--bind", &format!("{CLIENT_IP}:0"), "--secs", &secs])
        .args(["--interval-ms", &a.interval_ms.to_string()])
        .args(["--timeout-ms", &a.timeout_ms.to_string()])
        .stdout(Stdio::piped())
        .spawn()?;
    let before = server.stats()?;
    let drops0 = rcvbuf_errors();
    let t0 = Instant::now();
    let flood_line = if rate > 0 {
        let out = Command::new("ip")
            .args(["netns", "exec", NS_CLIENT, exe, "flood", "--target", &addr])
            .args(["--bind", &format!("{CLIENT_IP}:0"), "--secs", &secs])
            .args(["--rate", &rate.to_string()])
            .output()?;
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        std::thread::sleep(Duration::from_secs_f64(a.secs));
        String::new()
    };
    let after = server.stats()?;
    let window = t0.elapsed().as_secs_f64();
    let drops = rcvbuf_errors() - drops0;
    let out = legit.wait_with_output()?;
    let legit_line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("LEGIT "))
        .ok_or("no LEGIT line")?
        .to_string();
    let d = |k: &str| field(&after, k).unwrap_or(f64::NAN) - field(&before, k).unwrap_or(f64::NAN);
    let (cpu, received) = (d("cpu"), d("received"));
    let attempts = field(&legit_line, "attempts").unwrap_or(f64::NAN);
    let ok = field(&legit_line, "ok").unwrap_or(f64::NAN);
    eprintln!(
        "  cookies={} rate={rate}: {} | {} | server cpu={cpu:.2}s received={received} cookies_sent={} accepted={} rcvbuf_errors={drops}",
        cookies.name(),
        flood_line.trim(),
        legit_line,
        d("cookies_sent"),
        d("accepted"),
    );
    s.success.push(100.0 * ok / attempts);
    s.connect_p50
        .push(field(&legit_line, "connect_p50_ms").unwrap_or(f64::NAN));
    s.connect_p99
        .push(field(&legit_line, "connect_p99_ms").unwrap_or(f64::NAN));
    s.received_rate.push(received / window);
    s.cpu_share.push(100.0 * cpu / window);
    s.cookies_rate.push(d("cookies_sent") / window);
    s.rcvbuf_errors.push(drops / window);
    if rate > 0 {
        s.us_per_syn.push(cpu * 1e6 / received);
        let sent = field(&flood_line, "sent").unwrap_or(f64::NAN);
        s.processed.push(100.0 * received / sent);
    }
    Ok(())
}

fn run(a: &RunArgs) -> Result<()> {
    let exe = std::env::current_exe()?.to_string_lossy().into_owned();
    let _ns = Netns::create()?;
    let mut cells: Vec<((Cookies, u64), Samples)> = Vec::new();
    for &c in &a.cookies {
        for &r in &a.rates {
            cells.push(((c, r), Samples::default()));
        }
    }
    for rep in 0..a.reps {
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        eprintln!(
            "repetition {}/{} (loadavg {})",
            rep + 1,
            a.reps,
            load.trim()
        );
        for ((c, r), s) in &mut cells {
            measure(a, &exe, *c, *r, s)?;
        }
    }
    println!(
        "\nSYN flood over veth, {} s per measurement, legitimate connections every {} ms (timeout {} ms), {} repetitions (median, min–max):\n",
        a.secs, a.interval_ms, a.timeout_ms, a.reps
    );
    println!(
        "| cookies | flood SYN/s offered | server processed, % of offered | datagrams/s processed (to the last STATS) | kernel drops/s (full socket buffer) | cookies sent/s | legit success % | legit connect p50 ms | legit connect p99 ms | server CPU % of a core | server CPU µs per received datagram |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let f = |v: &[f64], p: usize| {
        let (m, lo, hi) = stats(v);
        if m.is_nan() {
            "—".to_string()
        } else {
            format!("{m:.p$} ({lo:.p$}–{hi:.p$})")
        }
    };
    for ((c, r), s) in &cells {
        println!(
            "| {} | {r} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.name(),
            f(&s.processed, 0),
            f(&s.received_rate, 0),
            f(&s.rcvbuf_errors, 0),
            f(&s.cookies_rate, 0),
            f(&s.success, 1),
            f(&s.connect_p50, 2),
            f(&s.connect_p99, 2),
            f(&s.cpu_share, 0),
            f(&s.us_per_syn, 2),
        );
    }
    Ok(())
}
