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
//! for [`AFTER`], the longest time between two reads (from the moment of the link-down), and
//! when it began. It also reports the longest gap over as long a window before the failure
//! (from [`BASE_FROM`]): the paced stream's own jitter on this machine, the floor under the
//! figure after. Each repetition builds the namespaces afresh. MPTCP: `IPPROTO_MPTCP`
//! sockets, `ip mptcp limits set subflows 2 add_addr_accepted 2` on both hosts, and `ip mptcp
//! endpoint add 10.78.2.1 dev vm2c subflow` on the client, so the second subflow exists before
//! the link goes down.
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
//! Serval runs twice: `serval`, one path that moves (the runtime follows the host; the server
//! on 10.78.0.1), and `serval-mp`, **multipath** (issue 11 item 3): both ends bound to an
//! address on each link (the server to 10.78.1.2 and 10.78.2.2) with
//! `EndpointConfig::multipath`, the client connected over link 1 and its path over link 2
//! joined (and checked up) before the measurement starts, as MPTCP's second subflow is. When
//! link 1 dies the stream carries on over the path that is already there. The client tables
//! route strictly by source (`from 10.78.N.1`: a default via link N, then `unreachable`), so
//! a path from the link-2 address never takes link 1 even to the server's link-1 address.
//!
//! `stripe` measures striping (issue 11): both links shaped to `--rate` (100 Mbit/s) each way
//! with `tc qdisc ... tbf` on all four veth ends, the server sending as fast as it can, the
//! client counting what arrives over [`STRIPE_MEASURE`] after [`STRIPE_WARMUP`]; one path
//! (`serval`: the client bound to link 1 only; `mptcp-1`: no second endpoint) against both
//! (`serval-mp`; `mptcp-2`: `ip mptcp endpoint add 10.78.2.1 dev vm2c subflow`), with the
//! bytes each client link received (its `rx_bytes`) over the same window.
//!
//! ```sh
//! cargo build --release -p serval-bench --bin failover-bench
//! sudo target/release/failover-bench run --reps 5
//! sudo target/release/failover-bench run --reps 5 --silent
//! sudo target/release/failover-bench stripe --reps 5
//! sudo target/release/failover-bench lossy --reps 5
//! ```
//!
//! `lossy` (`failover_lossy.rs`) times small request/response messages over both paths while
//! link 1 drops a share of its packets at random: Serval's lowest-RTT and redundant
//! schedulers against MPTCP.
//!
//! Diagnosis: `FAILOVER_TRACE=1` prints, on one clock (Unix microseconds), when the client
//! broke link 1, each of its reads that came more than 2 ms after the previous one, and every
//! change of the Serval server's paths (locators, failed, probe timeouts) with its lost and
//! retransmitted counts; `FAILOVER_PLAINTEXT=1` runs `serval-mp` unencrypted (authenticated
//! only) so that the Wireshark dissector (contrib/wireshark) can read its frames.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

#[path = "../failover_lossy.rs"]
mod lossy;
#[path = "../quinn_setup.rs"]
mod quinn_setup;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes the server writes per millisecond.
const CHUNK: usize = 8 << 10;
/// Steady transfer before the link goes down: long enough for the baseline gap (from
/// [`BASE_FROM`]) to be measured over as long a window as the gap after ([`AFTER`]).
const WARMUP: Duration = Duration::from_millis(3200);
/// How long the client keeps reading after the link went down.
const AFTER: Duration = Duration::from_secs(3);
/// The baseline gap is measured from this long after the start until the link goes down.
const BASE_FROM: Duration = Duration::from_millis(200);
const SERVICE: &str = "failover.bench";
const SERVER: &str = "10.78.0.1";
const IPPROTO_MPTCP: i32 = 262;
/// Striping: bulk transfer before the measurement window opens (slow start, the join).
const STRIPE_WARMUP: Duration = Duration::from_secs(1);
/// Striping: the measurement window.
const STRIPE_MEASURE: Duration = Duration::from_secs(3);
/// Bytes a bulk sender writes per call.
const BULK_CHUNK: usize = 64 << 10;
/// The Serval multipath server's addresses, one on each link.
const SERVER_LINKS: [&str; 2] = ["10.78.1.2", "10.78.2.2"];
/// Failover stacks, in the order they run in each repetition.
const FAILOVER_STACKS: &str = "serval,serval-mp,mptcp,quinn";
/// Striping stacks: one path, then both, for each.
const STRIPE_STACKS: &str = "serval,serval-mp,mptcp-1,mptcp-2";

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
        /// Stacks to run, comma-separated: `serval` (one path that moves), `serval-mp`
        /// (multipath, both paths up before the failure), `mptcp`, `quinn`.
        #[arg(long, value_delimiter = ',', default_value = FAILOVER_STACKS)]
        stacks: Vec<String>,
    },
    /// Striping: bulk throughput over one path and over both, each link shaped (tc tbf).
    Stripe {
        /// Repetitions of each stack.
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Each link's rate, each way (a tc rate).
        #[arg(long, default_value = "100mbit")]
        rate: String,
        /// Stacks to run, comma-separated: `serval` (one path), `serval-mp` (both),
        /// `mptcp-1` (one subflow), `mptcp-2` (two).
        #[arg(long, value_delimiter = ',', default_value = STRIPE_STACKS)]
        stacks: Vec<String>,
    },
    /// Small writes over two paths, one of them lossy: each message's echo delay,
    /// Serval's schedulers against MPTCP (see `failover_lossy.rs`).
    Lossy {
        /// Repetitions of each stack.
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Percent of packets dropped on link 1, each way.
        #[arg(long, default_value_t = 20)]
        loss: u32,
        /// Stacks to run, comma-separated: `serval-mp` (lowest-RTT), `serval-red`
        /// (redundant), `mptcp`.
        #[arg(long, value_delimiter = ',', default_value = lossy::STACKS)]
        stacks: Vec<String>,
    },
    /// Echo one stream (inside the server namespace): `serval` or `mptcp`.
    LossyServe {
        stack: String,
        /// Serval: the redundant scheduler.
        #[arg(long)]
        redundant: bool,
    },
    /// Send the messages, time their echoes (inside the client namespace).
    LossyClient {
        /// `serval-mp`, `serval-red` or `mptcp`.
        stack: String,
        /// The client's end of link 1.
        link1: String,
        /// Percent of packets dropped on link 1, each way.
        #[arg(long)]
        loss: u32,
    },
    /// Serve one Serval stream (inside the server namespace).
    ServeServal {
        /// Bound to an address on each link, multipath on (else on 10.78.0.1, one path).
        #[arg(long)]
        multipath: bool,
        /// Send as fast as possible instead of at the paced rate.
        #[arg(long)]
        bulk: bool,
    },
    /// Serve one MPTCP connection (inside the server namespace).
    ServeMptcp {
        /// Send as fast as possible instead of at the paced rate.
        #[arg(long)]
        bulk: bool,
    },
    /// Serve one quinn connection (inside the server namespace); its certificate goes to
    /// CERT.
    ServeQuinn {
        /// Where to write the server's certificate.
        cert: std::path::PathBuf,
    },
    /// Receive, take link 1 down, print the gap (inside the client namespace).
    Client {
        /// `serval`, `serval-mp`, `mptcp` or `quinn`.
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
    /// Receive a bulk transfer, print its rate over the window (inside the client namespace).
    StripeClient {
        /// `serval`, `serval-mp`, `mptcp-1` or `mptcp-2`.
        stack: String,
    },
}

fn main() {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run {
            reps,
            silent,
            stacks,
        } => run(reps, silent, &stacks),
        Cmd::Stripe { reps, rate, stacks } => stripe(reps, &rate, &stacks),
        Cmd::Lossy { reps, loss, stacks } => lossy::run(reps, loss, &stacks),
        Cmd::LossyServe { stack, redundant } => match stack.as_str() {
            "serval" => rt().block_on(lossy::serve_serval(redundant)),
            _ => lossy::serve_mptcp(),
        },
        Cmd::LossyClient { stack, link1, loss } => {
            let r = match stack.as_str() {
                "serval-mp" => rt().block_on(lossy::client_serval(&link1, loss, false)),
                "serval-red" => rt().block_on(lossy::client_serval(&link1, loss, true)),
                _ => lossy::client_mptcp(&link1, loss),
            };
            match r {
                Ok(line) => println!("{line}"),
                Err(e) => {
                    eprintln!("lossy client: {e}");
                    std::process::exit(1);
                }
            }
        }
        Cmd::ServeServal { multipath, bulk } => rt().block_on(serve_serval(multipath, bulk)),
        Cmd::ServeMptcp { bulk } => serve_mptcp(bulk),
        Cmd::ServeQuinn { cert } => rt().block_on(serve_quinn(&cert)),
        Cmd::Client {
            stack,
            link1,
            silent,
            cert,
        } => {
            let r = match (stack.as_str(), cert) {
                ("serval", _) => rt().block_on(client_serval(&link1, silent, false)),
                ("serval-mp", _) => rt().block_on(client_serval(&link1, silent, true)),
                ("quinn", Some(cert)) => rt().block_on(client_quinn(&link1, silent, &cert)),
                ("quinn", None) => Err("quinn needs --cert".into()),
                _ => client_mptcp(&link1, silent),
            };
            match r {
                Ok(g) => println!(
                    "gap_us={} gap_at_us={} base_us={} bytes={}",
                    g.gap.as_micros(),
                    g.gap_at.as_micros(),
                    g.base.as_micros(),
                    g.bytes
                ),
                Err(e) => {
                    eprintln!("client: {e}");
                    std::process::exit(1);
                }
            }
        }
        Cmd::StripeClient { stack } => {
            let r = match stack.as_str() {
                "serval" => rt().block_on(stripe_client_serval(false)),
                "serval-mp" => rt().block_on(stripe_client_serval(true)),
                _ => stripe_client_mptcp(),
            };
            match r {
                Ok(w) => println!(
                    "bytes={} secs={} link1={} link2={}",
                    w.bytes, w.secs, w.link_rx[0], w.link_rx[1]
                ),
                Err(e) => {
                    eprintln!("stripe client: {e}");
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

/// Checks received bytes against the counting pattern and keeps the longest gaps between two
/// reads: over [`AFTER`] after the link went down (`gap`, the figure of the tables, with when
/// it began: `gap_at` after the failure), and before it (`base`, from [`BASE_FROM`] to the
/// failure: the stream's own jitter, the floor under `gap`). A `gap` that began long after
/// the failure and is no longer than `base` is the machine's, not the failover's.
struct Meter {
    start: Instant,
    down_at: Option<Instant>,
    last: Instant,
    gap: Duration,
    gap_at: Duration,
    base: Duration,
    bytes: u64,
    link1: String,
    silent: bool,
}

/// What a failover client measured.
struct Gaps {
    gap: Duration,
    gap_at: Duration,
    base: Duration,
    bytes: u64,
}

impl Meter {
    fn new(link1: &str, silent: bool) -> Meter {
        let now = Instant::now();
        Meter {
            start: now,
            down_at: None,
            last: now,
            gap: Duration::ZERO,
            gap_at: Duration::ZERO,
            base: Duration::ZERO,
            bytes: 0,
            link1: link1.to_string(),
            silent,
        }
    }

    fn gaps(&self) -> Gaps {
        Gaps {
            gap: self.gap,
            gap_at: self.gap_at,
            base: self.base,
            bytes: self.bytes,
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
        let since = now - self.last;
        match self.down_at {
            Some(d) => {
                if since > self.gap {
                    self.gap = since;
                    self.gap_at = self.last - d;
                }
                if since > Duration::from_millis(2) && std::env::var_os("FAILOVER_TRACE").is_some()
                {
                    eprintln!(
                        "  client t={} read {} bytes after {since:?} without, {:?} after the \
                         failure",
                        unix_us(),
                        data.len(),
                        now - d
                    );
                }
            }
            None if self.last - self.start >= BASE_FROM => self.base = self.base.max(since),
            None => {}
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
            if std::env::var_os("FAILOVER_TRACE").is_some() {
                eprintln!("  client t={} link 1 broken", unix_us());
            }
        }
        Ok(self.down_at.is_some_and(|d| now - d >= AFTER))
    }
}

/// Drops everything on `link` both ways (nftables, in this namespace); the link stays up.
fn silence(link: &str) -> Result<(), String> {
    nft(&format!(
        "table inet silent {{\n chain out {{ type filter hook output priority 0; oifname \
         \"{link}\" drop; }}\n chain in {{ type filter hook input priority 0; iifname \
         \"{link}\" drop; }}\n}}\n"
    ))
}

/// Loads an nftables `script` in this namespace.
fn nft(script: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft: {e}"))?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(script.as_bytes()).map_err(|e| e.to_string())?;
    }
    match child.wait() {
        Ok(st) if st.success() => Ok(()),
        _ => Err("nft failed".into()),
    }
}

/// Multipath on (both ends of `serval-mp`). Diagnosis: `FAILOVER_PLAINTEXT=1` leaves the
/// stream unencrypted (authenticated only), for the Wireshark dissector to read its frames.
fn multipath_config() -> serval::EndpointConfig {
    let mut c = serval::EndpointConfig {
        multipath: true,
        ..serval::EndpointConfig::default()
    };
    if std::env::var_os("FAILOVER_PLAINTEXT").is_some() {
        c.protection = serval_engine::endpoint::Protection::Plaintext;
    }
    c
}

async fn serve_serval(multipath: bool, bulk: bool) {
    let ep = if multipath {
        let binds: Vec<SocketAddr> = SERVER_LINKS
            .iter()
            .map(|a| format!("{a}:54324").parse().unwrap())
            .collect();
        serval::Endpoint::bind_with(&binds, multipath_config()).await
    } else {
        serval::Endpoint::bind(&[format!("{SERVER}:54324").parse().unwrap()]).await
    }
    .unwrap();
    let service = serval::ServiceId::from_name(SERVICE).unwrap();
    let mut l = ep.listen(serval::ServicePrefix::exact(service)).unwrap();
    println!("ready");
    let mut s = l.accept().await.unwrap();
    if bulk {
        send_bulk(&mut s).await;
    } else if std::env::var_os("FAILOVER_TRACE").is_some() {
        let mut w = &s;
        tokio::select! {
            () = send_pattern(&mut w) => {}
            () = trace_paths(&s) => {}
        }
    } else {
        send_pattern(&mut s).await;
    }
}

/// Microseconds since the Unix epoch: a clock both processes share, for the traces.
fn unix_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

/// Diagnosis (`FAILOVER_TRACE=1`): prints, on stderr, every change of the sender's paths
/// (locators, usable, failed, probe timeouts in a row), sampled every millisecond.
async fn trace_paths(s: &serval::Stream) {
    let mut last = String::new();
    loop {
        let now: Vec<String> = s
            .paths()
            .iter()
            .map(|p| {
                let t = p.transport;
                format!(
                    "{}:{}->{} usable={} failed={} ptos={}",
                    p.id,
                    p.local,
                    p.remote,
                    t.is_some_and(|t| t.usable),
                    t.is_some_and(|t| t.failed),
                    t.map_or(0, |t| t.pto_count),
                )
            })
            .collect();
        let st = s.stats().ok();
        let now = format!(
            "{} || lost={:?} retransmitted={:?} ptos={:?}",
            now.join(" | "),
            st.as_ref().map(|t| t.packets_lost),
            st.as_ref().map(|t| t.retransmitted_bytes),
            st.as_ref().map(|t| t.probe_timeouts)
        );
        if now != last {
            eprintln!("  server t={} {now}", unix_us());
            last = now;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Writes the counting pattern as fast as the stream takes it, until the write fails.
async fn send_bulk(s: &mut (impl tokio::io::AsyncWrite + Unpin)) {
    let mut n: u64 = 0;
    let mut chunk = vec![0u8; BULK_CHUNK];
    loop {
        for b in chunk.iter_mut() {
            *b = n as u8;
            n += 1;
        }
        if s.write_all(&chunk).await.is_err() {
            return;
        }
    }
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

async fn client_serval(link1: &str, silent: bool, multipath: bool) -> Result<Gaps, String> {
    let (ep, mut s) = connect_serval(&[1, 2], multipath).await?;
    let mut m = Meter::new(link1, silent);
    let mut buf = vec![0u8; 64 << 10];
    // When the move started and ended, relative to the link-down (stderr, for diagnosis).
    let mut events = ep.path_events();
    let mut moves = Vec::new();
    let mut paths_before = Vec::new();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
            .await
            .map_err(|_| format!("stalled 20 s; paths {:?}", s.paths()))?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("server ended".into());
        }
        while let Ok(e) = events.try_recv() {
            if let Some(d) = m.down_at {
                moves.push((d.elapsed(), e));
            }
        }
        if m.down_at.is_none() {
            paths_before = s.paths();
            if multipath && paths_before.iter().filter(|p| p.active).count() < 2 {
                return Err(format!(
                    "one path left before the failure: {paths_before:?}"
                ));
            }
        }
        if m.got(&buf[..n])? {
            eprintln!("serval path events after the link-down (as seen by the reader): {moves:?}");
            if multipath {
                let brief = |v: &[serval::PathSummary]| {
                    v.iter()
                        .map(|p| {
                            let t = p.transport;
                            format!(
                                "{}:{}->{} sent={} srtt={:?} failed={}",
                                p.id,
                                p.local,
                                p.remote,
                                t.map_or(0, |t| t.bytes_sent),
                                t.map(|t| t.srtt),
                                t.is_some_and(|t| t.failed)
                            )
                        })
                        .collect::<Vec<_>>()
                };
                eprintln!(
                    "  paths before the failure {:?}; after {:?}",
                    brief(&paths_before),
                    brief(&s.paths())
                );
            }
            return Ok(m.gaps());
        }
    }
}

/// A Serval client bound to 10.78.N.1 for each N of `links`, connected to the server: one
/// path to 10.78.0.1, or with `multipath` as [`connect_serval_with`].
async fn connect_serval(
    links: &[u8],
    multipath: bool,
) -> Result<(serval::Endpoint, serval::Stream), String> {
    if multipath {
        return connect_serval_with(links, multipath_config()).await;
    }
    let ep = serval::Endpoint::bind_with(&client_binds(links), serval::EndpointConfig::default())
        .await
        .map_err(|e| e.to_string())?;
    let service = serval::ServiceId::from_name(SERVICE).unwrap();
    let s = ep
        .connect_via(service, format!("{SERVER}:54324").parse().unwrap())
        .await
        .map_err(|e| e.to_string())?;
    Ok((ep, s))
}

/// 10.78.N.1, port 0, for each N of `links`.
fn client_binds(links: &[u8]) -> Vec<SocketAddr> {
    links
        .iter()
        .map(|n| format!("10.78.{n}.1:0").parse().unwrap())
        .collect()
}

/// A multipath Serval client (`config`) bound to 10.78.N.1 for each N of `links`, connected
/// to the server's link-1 address, with a path over link 2 joined too (waited for, at most
/// 5 s).
async fn connect_serval_with(
    links: &[u8],
    config: serval::EndpointConfig,
) -> Result<(serval::Endpoint, serval::Stream), String> {
    let ep = serval::Endpoint::bind_with(&client_binds(links), config)
        .await
        .map_err(|e| e.to_string())?;
    let service = serval::ServiceId::from_name(SERVICE).unwrap();
    let to = format!("{}:54324", SERVER_LINKS[0]);
    let s = ep
        .connect_via(service, to.parse().unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let link2: std::net::IpAddr = "10.78.2.1".parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s
        .paths()
        .iter()
        .any(|p| p.active && p.local.ip() == link2 && p.transport.is_some_and(|t| t.usable))
    {
        if Instant::now() > deadline {
            return Err(format!("no path over link 2 after 5 s: {:?}", s.paths()));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok((ep, s))
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

async fn client_quinn(link1: &str, silent: bool, cert: &std::path::Path) -> Result<Gaps, String> {
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
            return Ok(m.gaps());
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

/// The MPTCP server's one connection (inside the server namespace): listens on the
/// server's address, prints "ready", accepts. Returns the listener too, which must live as
/// long as the connection: the client's further subflows join through it.
fn accept_mptcp() -> (Socket, std::net::TcpStream) {
    let s = mptcp_socket().unwrap();
    s.set_reuse_address(true).unwrap();
    let at: SocketAddr = format!("{SERVER}:5201").parse().unwrap();
    s.bind(&at.into()).unwrap();
    s.listen(1).unwrap();
    println!("ready");
    let (c, _) = s.accept().unwrap();
    (s, std::net::TcpStream::from(c))
}

/// An MPTCP client connection from 10.78.1.1 to the server, reads bounded by `read_timeout`
/// (whether a second subflow joins is the topology's: `ip mptcp endpoint`).
fn connect_mptcp(read_timeout: Duration) -> Result<std::net::TcpStream, String> {
    let s = mptcp_socket().map_err(|e| format!("MPTCP socket: {e}"))?;
    let from: SocketAddr = "10.78.1.1:0".parse().unwrap();
    s.bind(&from.into()).map_err(|e| e.to_string())?;
    let to: SocketAddr = format!("{SERVER}:5201").parse().unwrap();
    s.connect(&to.into()).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(read_timeout))
        .map_err(|e| e.to_string())?;
    Ok(std::net::TcpStream::from(s))
}

fn serve_mptcp(bulk: bool) {
    let (_listener, mut c) = accept_mptcp();
    let mut n: u64 = 0;
    if bulk {
        let mut chunk = vec![0u8; BULK_CHUNK];
        loop {
            for b in chunk.iter_mut() {
                *b = n as u8;
                n += 1;
            }
            if c.write_all(&chunk).is_err() {
                return;
            }
        }
    }
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

fn client_mptcp(link1: &str, silent: bool) -> Result<Gaps, String> {
    let mut c = connect_mptcp(Duration::from_secs(20))?;
    let mut m = Meter::new(link1, silent);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = c.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("server ended".into());
        }
        if m.got(&buf[..n])? {
            return Ok(m.gaps());
        }
    }
}

/// What a striping client measured over its window.
struct Window {
    /// Stream bytes received in the window.
    bytes: u64,
    secs: f64,
    /// Bytes each client link received in the window (all of it: headers, ACKs of nothing).
    link_rx: [u64; 2],
}

/// Bytes link `n`'s client end has received (its kernel counter).
fn link_rx(n: u8) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/vm{n}c/statistics/rx_bytes"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

/// Checks bulk bytes against the counting pattern and counts those of the window
/// ([`STRIPE_MEASURE`] after [`STRIPE_WARMUP`]).
struct BulkMeter {
    start: Instant,
    bytes: u64,
    /// When the window opened: the bytes and link counters then.
    opened: Option<(Instant, u64, [u64; 2])>,
}

impl BulkMeter {
    fn new() -> BulkMeter {
        BulkMeter {
            start: Instant::now(),
            bytes: 0,
            opened: None,
        }
    }

    /// Accounts for `data`; returns the window once it is over.
    fn got(&mut self, data: &[u8]) -> Result<Option<Window>, String> {
        for (i, b) in data.iter().enumerate() {
            if *b != (self.bytes + i as u64) as u8 {
                return Err(format!("byte {} differs", self.bytes + i as u64));
            }
        }
        self.bytes += data.len() as u64;
        let now = Instant::now();
        match self.opened {
            None if now - self.start >= STRIPE_WARMUP => {
                self.opened = Some((now, self.bytes, [link_rx(1), link_rx(2)]));
            }
            Some((at, bytes, rx)) if now - at >= STRIPE_MEASURE => {
                return Ok(Some(Window {
                    bytes: self.bytes - bytes,
                    secs: (now - at).as_secs_f64(),
                    link_rx: [link_rx(1) - rx[0], link_rx(2) - rx[1]],
                }));
            }
            _ => {}
        }
        Ok(None)
    }
}

/// Serval striping client: one path over link 1 (bound there only), or multipath over both.
async fn stripe_client_serval(multipath: bool) -> Result<Window, String> {
    let links: &[u8] = if multipath { &[1, 2] } else { &[1] };
    let (_ep, mut s) = connect_serval(links, multipath).await?;
    let mut m = BulkMeter::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .map_err(|_| format!("stalled 10 s; paths {:?}", s.paths()))?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("server ended".into());
        }
        if let Some(w) = m.got(&buf[..n])? {
            if multipath {
                eprintln!(
                    "  paths at the end: {:?}",
                    s.paths()
                        .iter()
                        .map(|p| format!(
                            "{}:{}->{} srtt={:?} cwnd={:?}",
                            p.id,
                            p.local,
                            p.remote,
                            p.transport.map(|t| t.srtt),
                            p.transport.map(|t| t.cwnd)
                        ))
                        .collect::<Vec<_>>()
                );
            }
            return Ok(w);
        }
    }
}

/// MPTCP striping client, from 10.78.1.1; whether a second subflow joins is the topology's
/// (`ip mptcp endpoint`).
fn stripe_client_mptcp() -> Result<Window, String> {
    let mut c = connect_mptcp(Duration::from_secs(10))?;
    let mut m = BulkMeter::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = c.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("server ended".into());
        }
        if let Some(w) = m.got(&buf[..n])? {
            return Ok(w);
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
    /// The namespaces and links; with `subflow`, the client's MPTCP endpoint on link 2;
    /// with `rate`, a tbf qdisc of that rate on each of the four veth ends.
    fn new(subflow: bool, rate: Option<&str>) -> Topology {
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
            // Strictly by source: anything else from 10.78.N.1 (a Serval path to the server's
            // address on either link) takes link N, or nothing once link N is down.
            ip(&[
                "-n", c, "route", "add", "default", "via", &as_, "dev", &vc, "table", &table,
            ]);
            ip(&[
                "-n",
                c,
                "route",
                "add",
                "unreachable",
                "default",
                "metric",
                "4096",
                "table",
                &table,
            ]);
            if let Some(rate) = rate {
                for (ns, dev) in [(c, &vc), (s, &vs)] {
                    let out = Command::new("tc")
                        .args(["-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate"])
                        .args([rate, "burst", "64kb", "latency", "20ms"])
                        .output()
                        .unwrap();
                    assert!(
                        out.status.success(),
                        "tc on {dev}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
        if subflow {
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
        }
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

/// Runs `serve` (this program's arguments) in the server namespace until it prints
/// "ready", then `client` in the client namespace, and kills the server. Returns the client's
/// stdout; its stderr is printed (diagnosis) when it succeeds and part of the error when not.
fn run_pair(t: &Topology, serve: &[&str], client: &[&str]) -> Result<String, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut server: Child = Command::new("ip")
        .args(["netns", "exec", &t.server])
        .arg(&me)
        .args(serve)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut ready = [0u8; 6];
    let mut out = server.stdout.take().unwrap();
    let started = out.read_exact(&mut ready).map_err(|e| e.to_string());
    let run = started.and_then(|()| {
        Command::new("ip")
            .args(["netns", "exec", &t.client])
            .arg(&me)
            .args(client)
            .output()
            .map_err(|e| e.to_string())
    });
    let _ = server.kill();
    let _ = server.wait();
    let run = run?;
    let text = String::from_utf8_lossy(&run.stdout).to_string();
    let diag = String::from_utf8_lossy(&run.stderr);
    if !run.status.success() {
        return Err(format!("{} failed: {text}{diag}", client.join(" ")));
    }
    if !diag.is_empty() {
        eprint!("  {diag}");
    }
    Ok(text)
}

/// The number after `key` (`key` ends with `=`) in a client's output line.
fn field(text: &str, key: &str) -> Result<f64, String> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no {key} in {text:?}"))
}

/// One repetition: returns the client's gap.
fn once(stack: &str, silent: bool) -> Result<Gaps, String> {
    let t = Topology::new(true, None);
    let cert = std::env::temp_dir().join(format!("failover-bench-{}.der", std::process::id()));
    let cert_s = cert.to_string_lossy().to_string();
    let mut serve = match stack {
        "serval" => vec!["serve-serval"],
        "serval-mp" => vec!["serve-serval", "--multipath"],
        "quinn" => vec!["serve-quinn"],
        _ => vec!["serve-mptcp"],
    };
    let mut client = vec!["client", stack, &t.link1];
    if silent {
        client.push("--silent");
    }
    if stack == "quinn" {
        serve.push(&cert_s);
        client.extend(["--cert", &cert_s]);
    }
    let text = run_pair(&t, &serve, &client);
    let _ = std::fs::remove_file(&cert);
    let text = text?;
    let us = |k: &str| field(&text, k).map(|v| Duration::from_micros(v as u64));
    Ok(Gaps {
        gap: us("gap_us=")?,
        gap_at: us("gap_at_us=")?,
        base: us("base_us=")?,
        bytes: field(&text, "bytes=")? as u64,
    })
}

/// The median of `v` (sorted here; the upper one of an even count).
fn median<T: Copy + PartialOrd>(v: &mut [T]) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn run(reps: usize, silent: bool, stacks: &[String]) {
    let mut runs: Vec<(&str, Vec<Gaps>)> =
        stacks.iter().map(|s| (s.as_str(), Vec::new())).collect();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for rep in 0..reps {
        for (stack, v) in runs.iter_mut() {
            match once(stack, silent) {
                Ok(g) => {
                    eprintln!(
                        "rep {rep} {stack}: gap {:.1} ms (began {:.1} ms after the failure), \
                         before {:.1} ms",
                        ms(g.gap),
                        ms(g.gap_at),
                        ms(g.base)
                    );
                    v.push(g);
                }
                Err(e) => eprintln!("rep {rep} {stack}: {e}"),
            }
        }
    }
    let column = |v: &[Gaps], f: fn(&Gaps) -> Duration| {
        let mut c: Vec<f64> = v.iter().map(|g| ms(f(g))).collect();
        let m = median(&mut c);
        (m, c[0], c[c.len() - 1])
    };
    let mptcp = runs
        .iter()
        .find(|(s, v)| *s == "mptcp" && !v.is_empty())
        .map(|(_, v)| column(v, |g| g.gap).0);
    println!(
        "| stack | reps | median gap (3 s after) | min–max | ÷ MPTCP's median | when each began \
         (ms after the failure) | median gap before the failure | min–max |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (stack, v) in &runs {
        if v.is_empty() {
            println!("| {stack} | 0 | – | – | – | – | – | – |");
            continue;
        }
        let (g, g0, g1) = column(v, |g| g.gap);
        let at: Vec<String> = v.iter().map(|g| format!("{:.0}", ms(g.gap_at))).collect();
        let (b, b0, b1) = column(v, |g| g.base);
        let ratio = mptcp.map_or("–".to_string(), |p| format!("{:.3}×", g / p));
        println!(
            "| {stack} | {} | {g:.1} ms | {g0:.1}–{g1:.1} | {ratio} | {} | {b:.1} ms | \
             {b0:.1}–{b1:.1} |",
            v.len(),
            at.join(", ")
        );
    }
}

/// One striping repetition of `stack` on links shaped to `rate`: what the client measured.
fn stripe_once(stack: &str, rate: &str) -> Result<Window, String> {
    let t = Topology::new(stack == "mptcp-2", Some(rate));
    let serve: &[&str] = match stack {
        "serval" => &["serve-serval", "--bulk"],
        "serval-mp" => &["serve-serval", "--multipath", "--bulk"],
        _ => &["serve-mptcp", "--bulk"],
    };
    let text = run_pair(&t, serve, &["stripe-client", stack])?;
    Ok(Window {
        bytes: field(&text, "bytes=")? as u64,
        secs: field(&text, "secs=")?,
        link_rx: [
            field(&text, "link1=")? as u64,
            field(&text, "link2=")? as u64,
        ],
    })
}

fn stripe(reps: usize, rate: &str, stacks: &[String]) {
    let mbps = |w: &Window| w.bytes as f64 * 8.0 / w.secs / 1e6;
    let mut runs: Vec<(&str, Vec<Window>)> =
        stacks.iter().map(|s| (s.as_str(), Vec::new())).collect();
    for rep in 0..reps {
        for (stack, v) in runs.iter_mut() {
            match stripe_once(stack, rate) {
                Ok(w) => {
                    let total = (w.link_rx[0] + w.link_rx[1]).max(1) as f64;
                    eprintln!(
                        "rep {rep} {stack}: {:.1} Mbit/s, link 1 / link 2 {:.0}% / {:.0}%",
                        mbps(&w),
                        w.link_rx[0] as f64 * 100.0 / total,
                        w.link_rx[1] as f64 * 100.0 / total
                    );
                    v.push(w);
                }
                Err(e) => eprintln!("rep {rep} {stack}: {e}"),
            }
        }
    }
    // One path's median, per stack family, for the ratio.
    let one_path = |family: &str, runs: &[(&str, Vec<Window>)]| {
        let one = if family == "serval" {
            "serval"
        } else {
            "mptcp-1"
        };
        runs.iter()
            .find(|(s, v)| *s == one && !v.is_empty())
            .map(|(_, v)| median(&mut v.iter().map(mbps).collect::<Vec<_>>()))
    };
    println!(
        "| stack | reps | median Mbit/s | min | max | median ÷ one path's | link 1 / link 2 share \
         (median) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (stack, v) in &runs {
        if v.is_empty() {
            println!("| {stack} | 0 | – | – | – | – | – |");
            continue;
        }
        let mut rates: Vec<f64> = v.iter().map(mbps).collect();
        let m = median(&mut rates);
        let family = if stack.starts_with("serval") {
            "serval"
        } else {
            "mptcp"
        };
        let ratio = one_path(family, &runs).map_or("–".into(), |o| format!("{:.2}×", m / o));
        let mut share: Vec<f64> = v
            .iter()
            .map(|w| w.link_rx[0] as f64 * 100.0 / (w.link_rx[0] + w.link_rx[1]).max(1) as f64)
            .collect();
        let share = median(&mut share);
        println!(
            "| {stack} | {} | {m:.1} | {:.1} | {:.1} | {ratio} | {share:.0}% / {:.0}% |",
            v.len(),
            rates[0],
            rates[rates.len() - 1],
            100.0 - share
        );
    }
}
