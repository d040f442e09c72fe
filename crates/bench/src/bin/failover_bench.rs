//! Link-down failover gap (issue 11): the longest receive gap at a client when the link its
//! flow uses goes down, Serval (automatic migration, `FollowHost::Flows`) against Linux MPTCP
//! with a second subflow already established and quinn with `Endpoint::rebind`, in the same
//! run on the same topology.
//!
//! ```text
//!   client ns                                  server ns
//!   10.78.1.1/24  vm1c ==== link 1 ==== vm1s  10.78.1.2/24
//!   10.78.2.1/24  vm2c ==== link 2 ==== vm2s  10.78.2.2/24
//!                                             lo: 10.78.0.1/32 (the server's address)
//! ```
//!
//! The client routes by source address (`ip rule from 10.78.N.1 table 10N`), so what leaves
//! from 10.78.1.1 can only take link 1. The server sends a counting byte pattern at a steady
//! rate ([`CHUNK`] bytes every millisecond, ~65 Mbit/s); the client reads and checks every
//! byte, and after [`WARMUP`] sets link 1 down itself (`ip link set vm1c down`) and measures,
//! for [`AFTER`], the longest time between two reads (from the moment of the link-down). Each
//! repetition builds the namespaces afresh. MPTCP: `IPPROTO_MPTCP` sockets, `ip mptcp limits
//! set subflows 2 add_addr_accepted 2` on both hosts, and `ip mptcp endpoint add 10.78.2.1
//! dev vm2c subflow` on the client, so the second subflow exists before the link goes down.
//!
//! quinn has no failover of its own: its client application moves the connection to link 2
//! with `Endpoint::rebind` (a new UDP socket on 10.78.2.1), and the server follows after
//! validating the new path. On a link-down the application rebinds at once, as one told by
//! the host the instant the link went (the best case: no detection time); on silent loss it
//! rebinds after [`quinn_silence`] without data, its own watchdog (what Serval's silence
//! probe does inside the transport).
//!
//! `--silent` drops everything on link 1 with nftables, both ways, instead of setting it down:
//! the link and its addresses stay up, so no host event tells anyone (issue 11's silent loss).
//!
//! ```sh
//! cargo build --release -p serval-bench --bin failover-bench
//! sudo target/release/failover-bench run --reps 5
//! sudo target/release/failover-bench run --reps 5 --silent
//! ```
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

#[path = "../quinn_setup.rs"]
mod quinn_setup;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes the server writes per millisecond.
const CHUNK: usize = 8 << 10;
/// Steady transfer before the link goes down.
const WARMUP: Duration = Duration::from_secs(1);
/// How long the client keeps reading after the link went down.
const AFTER: Duration = Duration::from_secs(3);
const SERVICE: &str = "failover.bench";
const SERVER: &str = "10.78.0.1";
const IPPROTO_MPTCP: i32 = 262;

#[derive(Parser)]
#[command(about = "Link-down failover gap: Serval against MPTCP and quinn")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the topology and run every repetition (needs root and iproute2).
    Run {
        /// Repetitions of each stack.
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Silent loss instead of a link down: nftables drops everything on link 1, both
        /// ways, while the link and its addresses stay up.
        #[arg(long)]
        silent: bool,
    },
    /// Serve one Serval stream (inside the server namespace).
    ServeServal,
    /// Serve one MPTCP connection (inside the server namespace).
    ServeMptcp,
    /// Serve one quinn connection (inside the server namespace); its certificate goes to
    /// CERT.
    ServeQuinn {
        /// Where to write the server's certificate.
        cert: std::path::PathBuf,
    },
    /// Receive, take link 1 down, print the gap (inside the client namespace).
    Client {
        /// `serval`, `mptcp` or `quinn`.
        stack: String,
        /// The client's end of link 1.
        link1: String,
        /// Drop everything on link 1 (nftables) instead of setting it down.
        #[arg(long)]
        silent: bool,
        /// quinn: the server's certificate.
        #[arg(long)]
        cert: Option<std::path::PathBuf>,
    },
}

fn main() {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run { reps, silent } => run(reps, silent),
        Cmd::ServeServal => rt().block_on(serve_serval()),
        Cmd::ServeMptcp => serve_mptcp(),
        Cmd::ServeQuinn { cert } => rt().block_on(serve_quinn(&cert)),
        Cmd::Client {
            stack,
            link1,
            silent,
            cert,
        } => {
            let r = match (stack.as_str(), cert) {
                ("serval", _) => rt().block_on(client_serval(&link1, silent)),
                ("quinn", Some(cert)) => rt().block_on(client_quinn(&link1, silent, &cert)),
                ("quinn", None) => Err("quinn needs --cert".into()),
                _ => client_mptcp(&link1, silent),
            };
            match r {
                Ok((gap, bytes)) => println!("gap_us={} bytes={bytes}", gap.as_micros()),
                Err(e) => {
                    eprintln!("client: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Checks received bytes against the counting pattern and keeps the longest gap after the
/// link went down.
struct Meter {
    start: Instant,
    down_at: Option<Instant>,
    last: Instant,
    gap: Duration,
    bytes: u64,
    link1: String,
    silent: bool,
}

impl Meter {
    fn new(link1: &str, silent: bool) -> Meter {
        let now = Instant::now();
        Meter {
            start: now,
            down_at: None,
            last: now,
            gap: Duration::ZERO,
            bytes: 0,
            link1: link1.to_string(),
            silent,
        }
    }

    /// Accounts for `data`; returns whether the measurement is over.
    fn got(&mut self, data: &[u8]) -> Result<bool, String> {
        let now = Instant::now();
        for (i, b) in data.iter().enumerate() {
            if *b != (self.bytes + i as u64) as u8 {
                return Err(format!("byte {} differs", self.bytes + i as u64));
            }
        }
        self.bytes += data.len() as u64;
        if self.down_at.is_some() {
            self.gap = self.gap.max(now - self.last);
        }
        self.last = now;
        if self.down_at.is_none() && now - self.start >= WARMUP {
            if self.silent {
                silence(&self.link1)?;
            } else {
                let ok = Command::new("ip")
                    .args(["link", "set", &self.link1, "down"])
                    .status()
                    .map_err(|e| e.to_string())?;
                if !ok.success() {
                    return Err("ip link set down failed".into());
                }
            }
            let t = Instant::now();
            self.down_at = Some(t);
            self.last = t;
        }
        Ok(self.down_at.is_some_and(|d| now - d >= AFTER))
    }
}

/// Drops everything on `link` both ways (nftables, in this namespace); the link stays up.
fn silence(link: &str) -> Result<(), String> {
    use std::io::Write as _;
    let script = format!(
        "table inet silent {{\n chain out {{ type filter hook output priority 0; oifname \
         \"{link}\" drop; }}\n chain in {{ type filter hook input priority 0; iifname \
         \"{link}\" drop; }}\n}}\n"
    );
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft: {e}"))?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(script.as_bytes()).map_err(|e| e.to_string())?;
    }
    let st = child.wait().map_err(|e| e.to_string())?;
    if st.success() {
        Ok(())
    } else {
        Err("nft failed".into())
    }
}

async fn serve_serval() {
    let ep = serval::Endpoint::bind(&[format!("{SERVER}:54324").parse().unwrap()])
        .await
        .unwrap();
    let service = serval::ServiceId::from_name(SERVICE).unwrap();
    let mut l = ep.listen(serval::ServicePrefix::exact(service)).unwrap();
    println!("ready");
    let mut s = l.accept().await.unwrap();
    send_pattern(&mut s).await;
}

/// Writes the counting pattern, [`CHUNK`] bytes every millisecond, until the write fails.
async fn send_pattern(s: &mut (impl tokio::io::AsyncWrite + Unpin)) {
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut n: u64 = 0;
    let mut chunk = vec![0u8; CHUNK];
    loop {
        tick.tick().await;
        for b in chunk.iter_mut() {
            *b = n as u8;
            n += 1;
        }
        if s.write_all(&chunk).await.is_err() {
            return;
        }
    }
}

async fn client_serval(link1: &str, silent: bool) -> Result<(Duration, u64), String> {
    let ep = serval::Endpoint::bind(&[
        "10.78.1.1:0".parse().unwrap(),
        "10.78.2.1:0".parse().unwrap(),
    ])
    .await
    .map_err(|e| e.to_string())?;
    let service = serval::ServiceId::from_name(SERVICE).unwrap();
    let mut s = ep
        .connect_via(service, format!("{SERVER}:54324").parse().unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let mut m = Meter::new(link1, silent);
    let mut buf = vec![0u8; 64 << 10];
    // When the move started and ended, relative to the link-down (stderr, for diagnosis).
    let mut events = ep.path_events();
    let mut moves = Vec::new();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
            .await
            .map_err(|_| "stalled 20 s".to_string())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("server ended".into());
        }
        while let Ok(e) = events.try_recv() {
            if let Some(d) = m.down_at {
                moves.push((d.elapsed(), e));
            }
        }
        if m.got(&buf[..n])? {
            eprintln!("serval path events after the link-down (as seen by the reader): {moves:?}");
            return Ok((m.gap, m.bytes));
        }
    }
}

/// quinn's server: one connection, one unidirectional stream of the pattern at the same rate
/// as the others.
async fn serve_quinn(cert: &std::path::Path) {
    let ep = quinn_setup::quinn_server(format!("{SERVER}:4433").parse().unwrap(), cert).unwrap();
    println!("ready");
    let conn = ep.accept().await.unwrap().await.unwrap();
    let mut s = conn.open_uni().await.unwrap();
    send_pattern(&mut s).await;
}

/// How long quinn's client goes without data before its watchdog moves the connection to
/// link 2 on silent loss: max(3 × RTT, 10 ms), the rule Serval's silence probe uses.
fn quinn_silence(conn: &quinn::Connection) -> Duration {
    (conn.rtt() * 3).max(Duration::from_millis(10))
}

async fn client_quinn(
    link1: &str,
    silent: bool,
    cert: &std::path::Path,
) -> Result<(Duration, u64), String> {
    let ep = quinn_setup::quinn_client("10.78.1.1:0".parse().unwrap(), cert)
        .map_err(|e| e.to_string())?;
    let conn = ep
        .connect(format!("{SERVER}:4433").parse().unwrap(), "bench.invalid")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let mut s = conn.accept_uni().await.map_err(|e| e.to_string())?;
    let mut m = Meter::new(link1, silent);
    let mut buf = vec![0u8; 64 << 10];
    let mut rebound = false;
    let rebind = |ep: &quinn::Endpoint| -> Result<(), String> {
        let socket = std::net::UdpSocket::bind("10.78.2.1:0").map_err(|e| e.to_string())?;
        ep.rebind(socket).map_err(|e| e.to_string())
    };
    loop {
        let read = tokio::time::timeout(quinn_silence(&conn), s.read(&mut buf)).await;
        let n = match read {
            Ok(r) => r
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "server ended".to_string())?,
            Err(_) if m.down_at.is_some() && !rebound => {
                rebind(&ep)?;
                rebound = true;
                continue;
            }
            Err(_) => continue,
        };
        let was_down = m.down_at.is_some();
        if m.got(&buf[..n])? {
            return Ok((m.gap, m.bytes));
        }
        // A link-down the application is told of at once: it moves right away.
        if !was_down && m.down_at.is_some() && !silent && !rebound {
            rebind(&ep)?;
            rebound = true;
        }
    }
}

fn mptcp_socket() -> std::io::Result<Socket> {
    Socket::new(
        Domain::IPV4,
        Type::STREAM,
        Some(Protocol::from(IPPROTO_MPTCP)),
    )
}

fn serve_mptcp() {
    let s = mptcp_socket().unwrap();
    s.set_reuse_address(true).unwrap();
    let at: SocketAddr = format!("{SERVER}:5201").parse().unwrap();
    s.bind(&at.into()).unwrap();
    s.listen(1).unwrap();
    println!("ready");
    let (c, _) = s.accept().unwrap();
    let mut c = std::net::TcpStream::from(c);
    let mut n: u64 = 0;
    let mut chunk = vec![0u8; CHUNK];
    let start = Instant::now();
    let mut k = 0u32;
    loop {
        k += 1;
        let due = start + Duration::from_millis(u64::from(k));
        if let Some(w) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(w);
        }
        for b in chunk.iter_mut() {
            *b = n as u8;
            n += 1;
        }
        if c.write_all(&chunk).is_err() {
            return;
        }
    }
}

fn client_mptcp(link1: &str, silent: bool) -> Result<(Duration, u64), String> {
    let s = mptcp_socket().map_err(|e| format!("MPTCP socket: {e}"))?;
    let from: SocketAddr = "10.78.1.1:0".parse().unwrap();
    s.bind(&from.into()).map_err(|e| e.to_string())?;
    let to: SocketAddr = format!("{SERVER}:5201").parse().unwrap();
    s.connect(&to.into()).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    let mut c = std::net::TcpStream::from(s);
    let mut m = Meter::new(link1, silent);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = c.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("server ended".into());
        }
        if m.got(&buf[..n])? {
            return Ok((m.gap, m.bytes));
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The two namespaces and links; deleted on drop.
struct Topology {
    client: String,
    server: String,
    link1: String,
}

impl Topology {
    fn new() -> Topology {
        let id = std::process::id();
        let t = Topology {
            client: format!("fbc{id}"),
            server: format!("fbs{id}"),
            link1: "vm1c".into(),
        };
        let (c, s) = (t.client.as_str(), t.server.as_str());
        ip(&["netns", "add", c]);
        ip(&["netns", "add", s]);
        for ns in [c, s] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            let _ = Command::new("ip")
                .args(["-n", ns, "mptcp", "limits", "set", "subflows", "2"])
                .args(["add_addr_accepted", "2"])
                .status();
        }
        ip(&["-n", s, "addr", "add", &format!("{SERVER}/32"), "dev", "lo"]);
        for link in 1..=2 {
            let (vc, vs) = (format!("vm{link}c"), format!("vm{link}s"));
            ip(&[
                "link", "add", &vc, "netns", c, "type", "veth", "peer", "name", &vs, "netns", s,
            ]);
            let (ac, as_) = (format!("10.78.{link}.1"), format!("10.78.{link}.2"));
            ip(&["-n", c, "addr", "add", &format!("{ac}/24"), "dev", &vc]);
            ip(&["-n", s, "addr", "add", &format!("{as_}/24"), "dev", &vs]);
            ip(&["-n", c, "link", "set", &vc, "up"]);
            ip(&["-n", s, "link", "set", &vs, "up"]);
            let table = format!("10{link}");
            ip(&["-n", c, "rule", "add", "from", &ac, "table", &table]);
            ip(&[
                "-n",
                c,
                "route",
                "add",
                &format!("{SERVER}/32"),
                "via",
                &as_,
                "dev",
                &vc,
                "table",
                &table,
            ]);
        }
        let _ = Command::new("ip")
            .args([
                "-n",
                c,
                "mptcp",
                "endpoint",
                "add",
                "10.78.2.1",
                "dev",
                "vm2c",
                "subflow",
            ])
            .status();
        // Both links' carrier up before anything runs.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let out = Command::new("ip")
                .args(["-n", c, "-br", "link", "show"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            if text.lines().filter(|l| l.contains(" UP ")).count() >= 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        t
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.client, &self.server] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// One repetition: returns the client's gap.
fn once(stack: &str, silent: bool) -> Result<Duration, String> {
    let t = Topology::new();
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let me = me.to_string_lossy().to_string();
    let cert = std::env::temp_dir().join(format!("failover-bench-{}.der", std::process::id()));
    let cert_s = cert.to_string_lossy().to_string();
    let mut serve = vec![match stack {
        "serval" => "serve-serval",
        "quinn" => "serve-quinn",
        _ => "serve-mptcp",
    }];
    if stack == "quinn" {
        serve.push(&cert_s);
    }
    let mut server: Child = Command::new("ip")
        .args(["netns", "exec", &t.server, &me])
        .args(&serve)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut ready = [0u8; 6];
    let mut out = server.stdout.take().unwrap();
    out.read_exact(&mut ready).map_err(|e| e.to_string())?;
    let mut args = vec!["netns", "exec", &t.client, &me, "client", stack, &t.link1];
    if silent {
        args.push("--silent");
    }
    if stack == "quinn" {
        args.extend(["--cert", &cert_s]);
    }
    let client = Command::new("ip")
        .args(&args)
        .output()
        .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&cert);
    let _ = server.kill();
    let _ = server.wait();
    let text = String::from_utf8_lossy(&client.stdout).to_string();
    let diag = String::from_utf8_lossy(&client.stderr);
    if client.status.success() && !diag.is_empty() {
        eprint!("  {diag}");
    }
    if !client.status.success() {
        return Err(format!(
            "{stack} client failed: {}{}",
            text,
            String::from_utf8_lossy(&client.stderr)
        ));
    }
    let us: u64 = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("gap_us="))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no gap in {text:?}"))?;
    Ok(Duration::from_micros(us))
}

fn run(reps: usize, silent: bool) {
    let mut gaps: Vec<(&str, Vec<Duration>)> = vec![
        ("serval", Vec::new()),
        ("mptcp", Vec::new()),
        ("quinn", Vec::new()),
    ];
    for rep in 0..reps {
        for (stack, v) in gaps.iter_mut() {
            match once(stack, silent) {
                Ok(g) => {
                    eprintln!("rep {rep} {stack}: {g:.1?}");
                    v.push(g);
                }
                Err(e) => eprintln!("rep {rep} {stack}: {e}"),
            }
        }
    }
    println!("| stack | reps | median gap | min | max |");
    println!("|---|---|---|---|---|");
    for (stack, mut v) in gaps {
        if v.is_empty() {
            println!("| {stack} | 0 | – | – | – |");
            continue;
        }
        v.sort();
        println!(
            "| {stack} | {} | {:.1} ms | {:.1} ms | {:.1} ms |",
            v.len(),
            v[v.len() / 2].as_secs_f64() * 1e3,
            v[0].as_secs_f64() * 1e3,
            v[v.len() - 1].as_secs_f64() * 1e3
        );
    }
}
