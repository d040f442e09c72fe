//! An on-path attacker against Serval flows, and the instrumented endpoints it attacks: the tool
//! of `crates/cli/tests/attack_netns.rs` (issue 12's first test; docs/testing.md).
//!
//! * `sniff-and-forge --iface IF` captures (AF_PACKET) the IPv4 UDP packets to or from the given
//!   ports that cross `IF` — on a bridge made to flood every frame, the flows of other hosts —
//!   learns their flowID pairs and locators, and then sends, for the duration, a mix of forged
//!   and replayed packets for those live flows through a raw socket with its own IPv4 headers
//!   (so it can spoof the real sender's address):
//!   - `rsyn_own` / `rsyn_spoofed`: an RSYN (migration) for the flow from the attacker's own
//!     address, and spoofed from the real sender's locator;
//!   - `rst`, `fin`: a reset and a close, spoofed or from its own address (half each);
//!   - `data`: a stream packet with the flow's IDs, a packet number just ahead of the largest
//!     seen (so that it is no replay and reaches the tag check) and random payload and tag;
//!   - `bitflip`: a captured packet with one bit flipped, spoofed from its real sender;
//!   - `replay_spoofed` / `replay_own`: a captured packet, exactly, to its real destination,
//!     from its real sender's locator or from the attacker's own address;
//!   - `synack`: a SYN-ACK from a "second instance" (another flowID, a key share of its own)
//!     to an established flow, spoofed from its peer;
//!   - `nack`: a router's NACK (unprotected: it echoes the SYN's nonce, here a random one) for
//!     the flow, spoofed from its peer.
//!
//!   Every control packet it forges has a well-formed SAL header (built with `serval-wire`), a
//!   packet number and a random 16-byte tag, so that a receiver gets as far as opening it. On
//!   exit it prints one JSON line on stdout: packets sent per kind, what it captured, the flows
//!   it learned, and how often each `--marker` appeared in a captured UDP payload (the bytes a
//!   victim sends: 0 means the attacker never read them in clear). Forging starts only once it
//!   has captured a packet between two other hosts (that proves the bridge floods); if none
//!   comes within `--learn-timeout` it exits with status 2.
//! * `victim-server` serves one stream (the service by name, like `serval listen`), reads it to
//!   its end while hashing it (SHA-256), answers with the digest and the byte count, and prints
//!   one JSON line: what it received, how the connection closed, and its endpoint's drop
//!   counters (`auth_failures`, `replays`, …) read while the connection is still open, and
//!   again (`stats_after`) once it has closed and left TIME-WAIT.
//! * `victim-client` connects once (it never reconnects), sends `--bytes` of a pseudo-random
//!   pattern with `--marker` every 4 KiB, spread over at least `--seconds` (with `--hold`, goes
//!   on at that pace until its standard input closes), half-closes, reads
//!   the server's digest and prints one JSON line: whether the digests match, how long it took,
//!   how the connection closed, and its endpoint's counters. Exit status 1 if anything failed.
//!
//! * `syn-flood --target ADDR --service NAME --rate N --duration SECS [--spoof CIDR]` sends
//!   well-formed SYNs for the service (CONTROL{SYN}, SERVICE, NONCE, KEYSHARE with 32 random
//!   bytes, SOURCE), each with a fresh random flowID, verno, nonce and key share — each would be
//!   a new handshake — at `--rate` SYNs/s (0: as fast as it can) for `--duration`. With
//!   `--spoof` every SYN comes from a random address (and port) of the IPv4 CIDR, through the
//!   raw socket with its own IPv4 headers; without it, from the tool's own address through an
//!   ordinary UDP socket (what comes back is never read). On exit it prints one JSON line: SYNs
//!   sent, send errors, the seconds and the rate achieved. It is the flooder of
//!   `crates/cli/tests/synflood_netns.rs` (issue 12's SYN-flood test).
//! * `echo-server` serves a service by name, any number of streams, each echoed back (as
//!   `serval listen --echo`), registered with `--router` (printing `REGISTERED` once the router
//!   acknowledged), with the engine's default SYN cookies (past 256 half-open handshakes). On
//!   each `STATS` line read from its standard input it prints one JSON line of its endpoint's
//!   counters (`cookies_sent`, `cookies_accepted`, …) and its resident memory; it exits when its
//!   standard input ends.
//! * `legit-clients --count N --via ADDR --service NAME` opens N connections by name through
//!   `--via` (a router), one endpoint for all, at most `--concurrency` at once and one started
//!   every `--interval-ms`; each must connect and echo 64 bytes within `--timeout-ms`. It
//!   prints one JSON line: attempts, successes, failures by reason, the success percentage
//!   and connect-time percentiles (p50, p90, p99, max), and its endpoint's `cookie_retries`.
//!
//! Linux only, and needs CAP_NET_RAW (root in the test's namespaces). The forged packets carry
//! IPv4 TTL [`MARK_TTL`], which is how the capture tells them from the victims' own packets.

use std::collections::HashMap;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use serval::{
    Endpoint, EndpointConfig, EndpointStats, Protection, RegistrarEvent, ServiceId, ServicePrefix,
};
use serval_wire::ext::{ControlFlags, ControlRepr, ExtType, KeyShareRepr, ServiceRepr, field};
use serval_wire::{FlowId, Nonce, Protocol, SalRepr};
use sha2::{Digest, Sha256};
use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// The IPv4 TTL of every packet this tool sends: the capture skips packets that carry it, so
/// it never learns from (or replays) its own forgeries. The victims' kernels send 64.
const MARK_TTL: u8 = 0xa5;
/// Bytes of a SAL base header.
const BASE: usize = 20;
/// Bytes of a packet number and of an AEAD tag (docs/wire.md §12).
const PN_LEN: usize = 8;
const TAG_LEN: usize = 16;
/// Captured packets kept for replays and bit flips (the most recent).
const RING: usize = 4096;
/// Largest UDP payload forged or replayed (fits a 1500-byte MTU with IPv4 and UDP headers).
const MAX_FORGED: usize = 1472;

#[derive(Parser)]
#[command(
    name = "attack",
    about = "An on-path attacker against Serval flows (issue 12's test)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Capture the flows on an interface and flood them with forged and replayed packets.
    SniffAndForge(ForgeArgs),
    /// Serve one stream, hash it, answer with the digest; print the endpoint's counters.
    VictimServer(ServerArgs),
    /// Send one stream with a marker pattern, check the digest; print the endpoint's counters.
    VictimClient(ClientArgs),
    /// Flood a server or router with well-formed SYNs, spoofed or from this host.
    SynFlood(SynFloodArgs),
    /// Serve echo streams by name, registered with a router; `STATS` on stdin prints counters.
    EchoServer(EchoServerArgs),
    /// Legitimate clients: connections by name with a 64-byte echo each; success and timing.
    LegitClients(LegitArgs),
}

#[derive(Args)]
struct SynFloodArgs {
    /// Where the SYNs go (a server or a router).
    #[arg(long)]
    target: SocketAddrV4,
    /// The service name the SYNs ask for.
    #[arg(long)]
    service: String,
    /// SYNs per second (0: as fast as the socket takes them).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Flood for this many seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Forge every SYN from a random address of this IPv4 CIDR (e.g. 198.18.0.0/15) and a
    /// random port (raw socket). Without it, the SYNs come from this host's own address.
    #[arg(long, value_parser = parse_cidr)]
    spoof: Option<Cidr>,
    /// Local address of the UDP socket without `--spoof`.
    #[arg(long, default_value = "0.0.0.0:0")]
    bind: SocketAddrV4,
    /// Seed of the pseudo-random choices (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Args)]
struct EchoServerArgs {
    /// Local UDP address to bind.
    #[arg(long)]
    bind: SocketAddr,
    /// The service name to serve.
    #[arg(long)]
    service: String,
    /// Register with this service router (kept alive while serving).
    #[arg(long)]
    router: Option<SocketAddr>,
    /// Exit after this many seconds even if standard input stays open.
    #[arg(long, default_value_t = 600.0)]
    timeout: f64,
}

#[derive(Args)]
struct LegitArgs {
    /// The router (or instance) to send the SYNs to.
    #[arg(long)]
    via: SocketAddr,
    /// Local UDP address to bind.
    #[arg(long, default_value = "0.0.0.0:0")]
    bind: SocketAddr,
    /// The service name.
    #[arg(long)]
    service: String,
    /// Connections to open.
    #[arg(long, default_value_t = 100)]
    count: u64,
    /// Most connections in progress at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Start a connection at most every this many milliseconds.
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// A connection that has not connected and echoed its 64 bytes by then failed.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

/// An IPv4 network: address and prefix length.
#[derive(Clone, Copy)]
struct Cidr {
    base: u32,
    len: u8,
}

impl Cidr {
    /// A random address of the network (any, network and broadcast addresses included: a
    /// forger does not care).
    fn random(&self, rng: &mut Rng) -> Ipv4Addr {
        let host_bits = 32 - u32::from(self.len);
        let mask = if host_bits == 32 {
            u32::MAX
        } else {
            (1u32 << host_bits) - 1
        };
        Ipv4Addr::from((self.base & !mask) | (rng.next() as u32 & mask))
    }
}

fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (a, l) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: ADDRESS/LENGTH"))?;
    let a: Ipv4Addr = a.parse().map_err(|e| format!("{s:?}: {e}"))?;
    let len: u8 = l.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if len > 32 {
        return Err(format!("{s:?}: a length of at most 32"));
    }
    Ok(Cidr {
        base: u32::from(a),
        len,
    })
}

#[derive(Args)]
struct ForgeArgs {
    /// The interface to capture on (the attacker's port on the bridge).
    #[arg(long)]
    iface: String,
    /// Forge for at most this many seconds once a flow is learned.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Packets per second to send (0: as fast as the socket takes them).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Stop after this many packets (0: only the duration stops it).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// UDP ports of the flows to attack (a packet to or from any of them); repeatable.
    #[arg(long = "port", value_delimiter = ',', default_value = "54324")]
    ports: Vec<u16>,
    /// Bytes (hex) to look for in every captured payload; repeatable.
    #[arg(long = "marker", value_parser = parse_hex)]
    markers: Vec<Hex>,
    /// Give up (exit 2) if no flow between two other hosts is seen within this many seconds.
    #[arg(long, default_value_t = 30.0)]
    learn_timeout: f64,
    /// Keep capturing (and counting markers) this long after forging ends.
    #[arg(long, default_value_t = 0.0)]
    linger: f64,
    /// Seed of the pseudo-random choices (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Args)]
struct ServerArgs {
    /// Local UDP address to bind.
    #[arg(long)]
    bind: SocketAddr,
    /// The service name to serve.
    #[arg(long)]
    service: String,
    /// Grant plaintext to a client that asks for it (still authenticated).
    #[arg(long)]
    plaintext: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
}

#[derive(Args)]
struct ClientArgs {
    /// The instance (or a router) to send the SYN to.
    #[arg(long)]
    via: SocketAddr,
    /// Local UDP address to bind.
    #[arg(long, default_value = "0.0.0.0:0")]
    bind: SocketAddr,
    /// The service name.
    #[arg(long)]
    service: String,
    /// Bytes to send.
    #[arg(long, default_value_t = 32 << 20)]
    bytes: u64,
    /// Marker (hex) written every 4 KiB of the pattern.
    #[arg(long, value_parser = parse_hex)]
    marker: Hex,
    /// Spread the sending over at least this many seconds.
    #[arg(long, default_value_t = 0.0)]
    seconds: f64,
    /// After `--bytes`, keep sending at the same pace until standard input reaches its end
    /// (so that the flow stays busy exactly as long as its caller wants).
    #[arg(long)]
    hold: bool,
    /// Ask for plaintext (the server must allow it).
    #[arg(long)]
    plaintext: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
}

/// Bytes given in hex on the command line.
#[derive(Clone)]
struct Hex(Vec<u8>);

fn parse_hex(s: &str) -> Result<Hex, String> {
    if !s.len().is_multiple_of(2) || s.is_empty() {
        return Err(format!("{s:?}: an even number of hex digits"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{s:?}: not hex"))
        })
        .collect::<Result<Vec<u8>, String>>()
        .map(Hex)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::SniffAndForge(a) => sniff_and_forge(&a),
        Cmd::VictimServer(a) => runtime().block_on(victim_server(a)),
        Cmd::VictimClient(a) => runtime().block_on(victim_client(a)),
        Cmd::SynFlood(a) => syn_flood(&a),
        Cmd::EchoServer(a) => runtime().block_on(echo_server(a)),
        Cmd::LegitClients(a) => runtime().block_on(legit_clients(a)),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("attack: cannot start a runtime: {e}");
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pseudo-random numbers (xorshift64*: fast, and no cryptographic strength is needed).

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn fill(&mut self, out: &mut [u8]) {
        for c in out.chunks_mut(8) {
            let r = self.next().to_le_bytes();
            c.copy_from_slice(&r[..c.len()]);
        }
    }
}

fn clock_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ u64::from(std::process::id()).rotate_left(32)
}

// ---------------------------------------------------------------------------------------------
// sniff-and-forge

/// One direction of a live flow, as learned from the packets captured.
#[derive(Clone)]
struct Direction {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    src_flow: u64,
    dst_flow: u64,
    /// The largest stream packet number seen.
    max_pn: u64,
    /// The key phase bit last seen.
    phase: u8,
    last_seen: Instant,
}

/// A captured SAL packet (one GSO segment).
struct Captured {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    sal: Vec<u8>,
}

#[derive(Default)]
struct Learned {
    dirs: Vec<Direction>,
    index: HashMap<(SocketAddrV4, SocketAddrV4, u64, u64), usize>,
    ring: Vec<Captured>,
    ring_next: usize,
    /// UDP packets captured on the ports (GSO batches counted once).
    captured: u64,
    /// Of which neither from nor to this host: proof that the bridge floods.
    captured_foreign: u64,
    /// SAL packets (GSO segments) captured.
    segments: u64,
    first_foreign: Option<Instant>,
    /// Per marker: payloads it appeared in.
    marker_hits: Vec<u64>,
    /// Captured payload bytes searched for markers.
    searched_bytes: u64,
}

#[derive(Default, Clone, Copy)]
struct Sent {
    rsyn_own: u64,
    rsyn_spoofed: u64,
    rst: u64,
    fin: u64,
    data: u64,
    bitflip: u64,
    replay_spoofed: u64,
    replay_own: u64,
    synack: u64,
    nack: u64,
    errors: u64,
}

impl Sent {
    fn total(&self) -> u64 {
        self.rsyn_own
            + self.rsyn_spoofed
            + self.rst
            + self.fin
            + self.data
            + self.bitflip
            + self.replay_spoofed
            + self.replay_own
            + self.synack
            + self.nack
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    RsynOwn,
    RsynSpoofed,
    Rst,
    Fin,
    Data,
    Bitflip,
    ReplaySpoofed,
    ReplayOwn,
    SynAck,
    Nack,
}

const KINDS: [Kind; 10] = [
    Kind::RsynOwn,
    Kind::RsynSpoofed,
    Kind::Rst,
    Kind::Fin,
    Kind::Data,
    Kind::Bitflip,
    Kind::ReplaySpoofed,
    Kind::ReplayOwn,
    Kind::SynAck,
    Kind::Nack,
];

impl Sent {
    fn count(&mut self, k: Kind) {
        let c = match k {
            Kind::RsynOwn => &mut self.rsyn_own,
            Kind::RsynSpoofed => &mut self.rsyn_spoofed,
            Kind::Rst => &mut self.rst,
            Kind::Fin => &mut self.fin,
            Kind::Data => &mut self.data,
            Kind::Bitflip => &mut self.bitflip,
            Kind::ReplaySpoofed => &mut self.replay_spoofed,
            Kind::ReplayOwn => &mut self.replay_own,
            Kind::SynAck => &mut self.synack,
            Kind::Nack => &mut self.nack,
        };
        *c += 1;
    }
}

/// The first IPv4 address of `iface` (`ip -4 -o addr show dev IF`).
fn iface_addr(iface: &str) -> Result<Ipv4Addr, String> {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", iface])
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("no IPv4 address on {iface}"))
}

fn sniff_and_forge(args: &ForgeArgs) -> ExitCode {
    match forge(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("attack: {e}");
            ExitCode::from(1)
        }
    }
}

fn forge(args: &ForgeArgs) -> Result<ExitCode, String> {
    let own = iface_addr(&args.iface)?;
    // Capture: every IPv4 packet on the interface, from the IP header on (SOCK_DGRAM).
    let eth_p_ip = i32::from(0x0800u16.to_be());
    let cap = Socket::new(Domain::PACKET, Type::DGRAM, Some(eth_p_ip.into()))
        .map_err(|e| format!("cannot open a packet socket (root needed): {e}"))?;
    cap.bind_device(Some(args.iface.as_bytes()))
        .map_err(|e| format!("cannot bind the capture to {}: {e}", args.iface))?;
    let _ = cap.set_recv_buffer_size(8 << 20);
    cap.set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| format!("capture timeout: {e}"))?;
    // Send: a raw IPv4 socket with our own headers (IPPROTO_RAW implies IP_HDRINCL).
    let tx = Socket::new(Domain::IPV4, Type::RAW, Some(255.into()))
        .map_err(|e| format!("cannot open a raw socket (root needed): {e}"))?;
    tx.set_header_included_v4(true)
        .map_err(|e| format!("IP_HDRINCL: {e}"))?;
    let _ = tx.set_send_buffer_size(4 << 20);

    let learned = Arc::new(Mutex::new(Learned {
        marker_hits: vec![0; args.markers.len()],
        ..Learned::default()
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let capture = {
        let learned = learned.clone();
        let stop = stop.clone();
        let ports = args.ports.clone();
        let markers: Vec<Vec<u8>> = args.markers.iter().map(|m| m.0.clone()).collect();
        std::thread::spawn(move || capture_loop(cap, own, &ports, &markers, &learned, &stop))
    };

    let started = Instant::now();
    let lock = |l: &Arc<Mutex<Learned>>| {
        l.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .first_foreign
    };
    // Wait for a flow between two other hosts.
    let learn_deadline = started + Duration::from_secs_f64(args.learn_timeout);
    let flooding = loop {
        if lock(&learned).is_some() {
            break true;
        }
        if Instant::now() >= learn_deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut sent = Sent::default();
    let mut rng = Rng::new(args.seed.unwrap_or_else(clock_seed));
    let forge_start = Instant::now();
    if flooding {
        let end = forge_start + Duration::from_secs_f64(args.duration);
        let mut batch: Vec<(Kind, SocketAddrV4, Vec<u8>)> = Vec::with_capacity(64);
        loop {
            let now = Instant::now();
            if now >= end || (args.count > 0 && sent.total() >= args.count) {
                break;
            }
            if args.rate > 0 {
                let due = (now - forge_start).as_secs_f64() * args.rate as f64;
                if sent.total() as f64 >= due {
                    std::thread::sleep(Duration::from_micros(500));
                    continue;
                }
            }
            batch.clear();
            {
                let l = learned.lock().unwrap_or_else(PoisonError::into_inner);
                // Prefer directions seen in the last two seconds: live flows.
                let live: Vec<&Direction> = l
                    .dirs
                    .iter()
                    .filter(|d| now.duration_since(d.last_seen) < Duration::from_secs(2))
                    .collect();
                let dirs: Vec<&Direction> = if live.is_empty() {
                    l.dirs.iter().collect()
                } else {
                    live
                };
                for _ in 0..64 {
                    let kind = KINDS[rng.below(KINDS.len() as u64) as usize];
                    if let Some((from, to, pkt)) = build(kind, &dirs, &l.ring, own, &mut rng) {
                        batch.push((kind, to, ip_udp(from, to, &pkt, &mut rng)));
                    }
                }
            }
            for (kind, to, pkt) in &batch {
                match tx.send_to(pkt, &SocketAddr::V4(*to).into()) {
                    Ok(_) => sent.count(*kind),
                    Err(_) => {
                        sent.errors += 1;
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            }
        }
    }
    let forged_for = forge_start.elapsed();
    if args.linger > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(args.linger));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = capture.join();
    let l = learned.lock().unwrap_or_else(PoisonError::into_inner);
    let markers: Vec<String> = args
        .markers
        .iter()
        .zip(&l.marker_hits)
        .map(|(m, n)| format!("\"{}\":{n}", hex(&m.0)))
        .collect();
    let flows: Vec<String> = l
        .dirs
        .iter()
        .map(|d| {
            format!(
                "{{\"src\":\"{}\",\"dst\":\"{}\",\"src_flow\":\"{:016x}\",\"dst_flow\":\"{:016x}\",\"max_pn\":{}}}",
                d.src, d.dst, d.src_flow, d.dst_flow, d.max_pn
            )
        })
        .collect();
    println!(
        "{{\"own\":\"{own}\",\"flooding\":{flooding},\"first_foreign_ms\":{},\"forge_secs\":{:.3},\
         \"sent\":{{\"rsyn_own\":{},\"rsyn_spoofed\":{},\"rst\":{},\"fin\":{},\"data\":{},\
         \"bitflip\":{},\"replay_spoofed\":{},\"replay_own\":{},\"synack\":{},\"nack\":{}}},\"total\":{},\"send_errors\":{},\
         \"captured\":{},\"captured_foreign\":{},\"segments\":{},\"searched_bytes\":{},\
         \"markers\":{{{}}},\"flows\":[{}]}}",
        l.first_foreign
            .map_or(-1, |t| t.duration_since(started).as_millis() as i64),
        forged_for.as_secs_f64(),
        sent.rsyn_own,
        sent.rsyn_spoofed,
        sent.rst,
        sent.fin,
        sent.data,
        sent.bitflip,
        sent.replay_spoofed,
        sent.replay_own,
        sent.synack,
        sent.nack,
        sent.total(),
        sent.errors,
        l.captured,
        l.captured_foreign,
        l.segments,
        l.searched_bytes,
        markers.join(","),
        flows.join(",")
    );
    Ok(if flooding {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "attack: captured no packet between two other hosts within {} s: the bridge does \
             not flood (or no flow ran)",
            args.learn_timeout
        );
        ExitCode::from(2)
    })
}

/// Builds one packet of `kind`: (source, destination, SAL packet). `None` if nothing is known
/// yet to build it from.
fn build(
    kind: Kind,
    dirs: &[&Direction],
    ring: &[Captured],
    own: Ipv4Addr,
    rng: &mut Rng,
) -> Option<(SocketAddrV4, SocketAddrV4, Vec<u8>)> {
    let own_from = |real: SocketAddrV4| SocketAddrV4::new(own, real.port());
    match kind {
        Kind::ReplaySpoofed | Kind::ReplayOwn | Kind::Bitflip => {
            if ring.is_empty() {
                return None;
            }
            let c = &ring[rng.below(ring.len() as u64) as usize];
            let mut sal = c.sal.clone();
            let from = match kind {
                Kind::ReplayOwn => own_from(c.src),
                Kind::Bitflip => {
                    let bit = rng.below(sal.len() as u64 * 8) as usize;
                    sal[bit / 8] ^= 1 << (bit % 8);
                    c.src
                }
                _ => c.src,
            };
            Some((from, c.dst, sal))
        }
        _ => {
            if dirs.is_empty() {
                return None;
            }
            let d = dirs[rng.below(dirs.len() as u64) as usize];
            let (flags, spoof) = match kind {
                Kind::RsynOwn => (ControlFlags::RSYN, false),
                Kind::RsynSpoofed => (ControlFlags::RSYN, true),
                Kind::Rst => (ControlFlags::RST, rng.below(2) == 0),
                Kind::Fin => (ControlFlags::FIN, rng.below(2) == 0),
                Kind::SynAck => (ControlFlags::SYN | ControlFlags::ACK, true),
                Kind::Nack => (ControlFlags::NACK, true),
                _ => (ControlFlags::EMPTY, true),
            };
            let from = if spoof { d.src } else { own_from(d.src) };
            let mut sal = if kind == Kind::SynAck {
                // A second "instance" answering the client's SYN: another flowID, a key share
                // of its own. The client, established, must only count it.
                let mut repr =
                    SalRepr::new(Protocol::NONE, FlowId(rng.next() | 1), FlowId(d.dst_flow));
                repr.control = Some(ControlRepr {
                    flags,
                    verno: rng.next() as u32,
                    ackno: rng.next() as u32,
                });
                let mut nonce = [0u8; 16];
                rng.fill(&mut nonce);
                repr.nonce = Some(Nonce(nonce));
                let mut key = [0u8; 32];
                rng.fill(&mut key);
                repr.keyshare = Some(KeyShareRepr {
                    group: KeyShareRepr::X25519,
                    flags: 0,
                    key,
                });
                let mut p = repr.to_bytes(&[]).ok()?;
                p.extend_from_slice(&0u64.to_be_bytes());
                let at = p.len();
                p.resize(at + TAG_LEN, 0);
                rng.fill(&mut p[at..]);
                p
            } else if kind == Kind::Nack {
                // A router's NACK (unprotected: it proves itself by echoing the SYN's nonce,
                // which an established flow no longer listens for).
                let mut repr = SalRepr::new(Protocol::NONE, FlowId(d.src_flow), FlowId(d.dst_flow));
                repr.control = Some(ControlRepr {
                    flags,
                    verno: rng.next() as u32,
                    ackno: rng.next() as u32,
                });
                let mut nonce = [0u8; 16];
                rng.fill(&mut nonce);
                repr.nonce = Some(Nonce(nonce));
                repr.to_bytes(&[]).ok()?
            } else if flags == ControlFlags::EMPTY {
                // Stream data: base header, a packet number a little ahead of the largest seen
                // (no replay: it reaches the tag check), random "ciphertext" and tag.
                let mut p = SalRepr::new(Protocol::STREAM, FlowId(d.src_flow), FlowId(d.dst_flow))
                    .to_bytes(&[])
                    .ok()?;
                let pn = d.max_pn + 1 + rng.below(64);
                p.extend_from_slice(&pn.to_be_bytes());
                // Mostly short (cheap to make), now and then full-size.
                let len = if rng.below(8) == 0 {
                    1200
                } else {
                    16 + rng.below(240) as usize
                };
                let at = p.len();
                p.resize(at + len + TAG_LEN, 0);
                rng.fill(&mut p[at..]);
                p
            } else {
                let mut repr = SalRepr::new(Protocol::NONE, FlowId(d.src_flow), FlowId(d.dst_flow));
                repr.control = Some(ControlRepr {
                    flags,
                    verno: rng.next() as u32,
                    ackno: rng.next() as u32,
                });
                let mut p = repr.to_bytes(&[]).ok()?;
                // A control packet number (its own space, counted from 0: small numbers).
                p.extend_from_slice(&rng.below(1 << 16).to_be_bytes());
                let at = p.len();
                p.resize(at + TAG_LEN, 0);
                rng.fill(&mut p[at..]);
                p
            };
            sal[0] = (sal[0] & !1) | d.phase;
            Some((from, d.dst, sal))
        }
    }
}

/// An IPv4 + UDP datagram from `from` to `to` carrying `payload`, with [`MARK_TTL`].
fn ip_udp(from: SocketAddrV4, to: SocketAddrV4, payload: &[u8], rng: &mut Rng) -> Vec<u8> {
    let payload = &payload[..payload.len().min(MAX_FORGED)];
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&(rng.next() as u16).to_be_bytes()); // identification
    p.extend_from_slice(&[0x40, 0]); // don't fragment
    p.extend_from_slice(&[MARK_TTL, 17, 0, 0]);
    p.extend_from_slice(&from.ip().octets());
    p.extend_from_slice(&to.ip().octets());
    let ip_sum = checksum(0, &p[..20]);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    p.extend_from_slice(&from.port().to_be_bytes());
    p.extend_from_slice(&to.port().to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    // The UDP checksum over the pseudo-header, the UDP header and the payload.
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&from.ip().octets());
    pseudo[4..8].copy_from_slice(&to.ip().octets());
    pseudo[9] = 17;
    pseudo[10..].copy_from_slice(&(udp_len as u16).to_be_bytes());
    let sum = sum_words(sum_words(0, &pseudo), &p[20..]);
    let mut udp_sum = fold(sum);
    if udp_sum == 0 {
        udp_sum = 0xffff;
    }
    p[26..28].copy_from_slice(&udp_sum.to_be_bytes());
    p
}

/// One's-complement sum of `data` as big-endian 16-bit words, not folded. Read 8 bytes at a
/// time (the one's-complement sum does not depend on the word size, once folded), so that even
/// an unoptimised build checksums at line rate.
fn sum_words(acc: u64, data: &[u8]) -> u64 {
    let mut wide = u128::from(acc);
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        wide += u128::from(u64::from_be_bytes(w));
    }
    let mut pairs = chunks.remainder().chunks_exact(2);
    for c in &mut pairs {
        wide += u128::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = pairs.remainder() {
        wide += u128::from(*last) << 8;
    }
    // Fold to 64 bits with end-around carries (as the 16-bit fold does).
    while wide >> 64 != 0 {
        wide = (wide & u128::from(u64::MAX)) + (wide >> 64);
    }
    let mut acc = wide as u64;
    // And to 32, so that further sums cannot overflow.
    while acc >> 32 != 0 {
        acc = (acc & 0xffff_ffff) + (acc >> 32);
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

fn checksum(acc: u64, data: &[u8]) -> u16 {
    fold(sum_words(acc, data))
}

fn capture_loop(
    cap: Socket,
    own: Ipv4Addr,
    ports: &[u16],
    markers: &[Vec<u8>],
    learned: &Mutex<Learned>,
    stop: &AtomicBool,
) {
    let mut buf = vec![0u8; 1 << 17];
    let mut cap = cap;
    while !stop.load(Ordering::Relaxed) {
        let n = match cap.read(&mut buf) {
            Ok(n) => n,
            Err(_) => continue, // the timeout, to look at `stop`
        };
        let pkt = &buf[..n];
        let Some((ttl, src, dst, payload)) = parse_ip_udp(pkt) else {
            continue;
        };
        if ttl == MARK_TTL || !(ports.contains(&src.port()) || ports.contains(&dst.port())) {
            continue;
        }
        let foreign = *src.ip() != own && *dst.ip() != own;
        let hits: Vec<bool> = markers.iter().map(|m| contains(payload, m)).collect();
        let now = Instant::now();
        let mut l = learned.lock().unwrap_or_else(PoisonError::into_inner);
        l.captured += 1;
        l.searched_bytes += payload.len() as u64;
        for (h, hit) in l.marker_hits.iter_mut().zip(&hits) {
            *h += u64::from(*hit);
        }
        if !foreign {
            continue;
        }
        l.captured_foreign += 1;
        for seg in segments(payload) {
            learn(&mut l, src, dst, seg, now);
        }
    }
}

/// (TTL, source, destination, UDP payload) of an IPv4 UDP packet.
fn parse_ip_udp(p: &[u8]) -> Option<(u8, SocketAddrV4, SocketAddrV4, &[u8])> {
    let (&v, _) = p.split_first()?;
    if v >> 4 != 4 || p.len() < 20 || p[9] != 17 {
        return None;
    }
    let ihl = usize::from(v & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    // A GSO batch captured before segmentation may carry a total length of 0 or a truncated
    // one: trust the captured length then.
    let end = if total >= ihl + 8 && total <= p.len() {
        total
    } else {
        p.len()
    };
    let udp = p.get(ihl..end)?;
    if udp.len() < 8 {
        return None;
    }
    let ip = |o: usize| Ipv4Addr::new(p[o], p[o + 1], p[o + 2], p[o + 3]);
    let port = |o: usize| u16::from_be_bytes([udp[o], udp[o + 1]]);
    Some((
        p[8],
        SocketAddrV4::new(ip(12), port(0)),
        SocketAddrV4::new(ip(16), port(2)),
        &udp[8..],
    ))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    let Some((&first, _)) = needle.split_first() else {
        return false;
    };
    hay.len() >= needle.len()
        && (0..=hay.len() - needle.len())
            .any(|i| hay[i] == first && &hay[i..i + needle.len()] == needle)
}

/// The SAL packets of a UDP payload: one, or the segments of a GSO batch captured before
/// segmentation (segments of one size, each starting with a version-1 byte and the same 16
/// bytes of flowIDs; the last may be shorter), as contrib/wireshark/serval.lua splits them.
fn segments(p: &[u8]) -> Vec<&[u8]> {
    if p.len() < 2 * BASE || p[0] >> 4 != 1 {
        return vec![p];
    }
    let flows = &p[4..BASE];
    let starts = |k: usize| p.len() - k >= BASE && p[k] >> 4 == 1 && &p[k + 4..k + BASE] == flows;
    let first = usize::from(u16::from_be_bytes([p[2], p[3]])).max(BASE);
    let mut from = first;
    while from + BASE <= p.len() {
        let Some(m) = (from..=p.len() - BASE).find(|&k| starts(k)) else {
            break;
        };
        let size = m;
        if (2 * size..p.len()).step_by(size).all(starts) {
            return p.chunks(size).collect();
        }
        from = m + 1;
    }
    vec![p]
}

fn learn(l: &mut Learned, src: SocketAddrV4, dst: SocketAddrV4, sal: &[u8], now: Instant) {
    if sal.len() < BASE || sal[0] >> 4 != 1 {
        return;
    }
    l.segments += 1;
    let flow = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&sal[o..o + 8]);
        u64::from_be_bytes(b)
    };
    let (src_flow, dst_flow) = (flow(4), flow(12));
    // A SYN (no destination flow yet) names no live flow; a router's NACK neither.
    if src_flow == 0 || dst_flow == 0 {
        return;
    }
    if l.first_foreign.is_none() {
        l.first_foreign = Some(now);
    }
    let header_len = usize::from(u16::from_be_bytes([sal[2], sal[3]]));
    let pn = (sal[1] == Protocol::STREAM.0 && header_len == BASE && sal.len() >= BASE + PN_LEN)
        .then(|| flow(BASE));
    let key = (src, dst, src_flow, dst_flow);
    let i = match l.index.get(&key) {
        Some(&i) => i,
        None => {
            l.dirs.push(Direction {
                src,
                dst,
                src_flow,
                dst_flow,
                max_pn: 0,
                phase: 0,
                last_seen: now,
            });
            l.index.insert(key, l.dirs.len() - 1);
            l.dirs.len() - 1
        }
    };
    let d = &mut l.dirs[i];
    d.last_seen = now;
    d.phase = sal[0] & 1;
    if let Some(pn) = pn {
        d.max_pn = d.max_pn.max(pn);
    }
    let c = Captured {
        src,
        dst,
        sal: sal[..sal.len().min(MAX_FORGED)].to_vec(),
    };
    if l.ring.len() < RING {
        l.ring.push(c);
    } else {
        let at = l.ring_next;
        l.ring[at] = c;
        l.ring_next = (at + 1) % RING;
    }
}

// ---------------------------------------------------------------------------------------------
// The victims: one stream each, with their endpoint's counters.

fn config(plaintext: bool) -> EndpointConfig {
    EndpointConfig {
        protection: if plaintext {
            Protection::Plaintext
        } else {
            Protection::Encrypted
        },
        ..EndpointConfig::default()
    }
}

fn stats_json(s: &EndpointStats) -> String {
    format!(
        "{{\"received\":{},\"auth_failures\":{},\"replays\":{},\"malformed\":{},\
         \"unknown_flow\":{},\"duplicate_syn_acks\":{},\"stray_resets\":{},\"accepted\":{},\
         \"bad_key_shares\":{}}}",
        s.received,
        s.auth_failures,
        s.replays,
        s.malformed,
        s.unknown_flow,
        s.duplicate_syn_acks,
        s.stray_resets,
        s.accepted,
        s.bad_key_shares
    )
}

async fn victim_server(a: ServerArgs) -> ExitCode {
    let limit = Duration::from_secs_f64(a.timeout);
    match tokio::time::timeout(limit, serve_one(&a)).await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("victim-server: {e}");
            ExitCode::from(1)
        }
        Err(_) => {
            eprintln!("victim-server: no complete stream within {limit:?}");
            ExitCode::from(1)
        }
    }
}

async fn serve_one(a: &ServerArgs) -> Result<(), String> {
    let ep = Endpoint::bind_with(&[a.bind], config(a.plaintext))
        .await
        .map_err(|e| format!("cannot bind {}: {e}", a.bind))?;
    let prefix = ServicePrefix::parse(&a.service).map_err(|e| format!("{}: {e}", a.service))?;
    let mut listener = ep
        .listen(prefix)
        .map_err(|e| format!("cannot listen: {e}"))?;
    println!("READY {}", a.bind);
    let mut stream = listener
        .accept()
        .await
        .map_err(|e| format!("accept: {e}"))?;
    let started = Instant::now();
    let mut hash = Sha256::new();
    let mut total: u64 = 0;
    let mut buf = vec![0u8; 64 << 10];
    let read_error = loop {
        match stream.read(&mut buf).await {
            Ok(0) => break None,
            Ok(n) => {
                hash.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) => break Some(e.to_string()),
        }
    };
    let digest: [u8; 32] = hash.finalize().into();
    // The counters while the connection is still open (a closed one's replays leave them).
    let stats = ep.stats();
    let transport = stream.stats().ok();
    let mut reply = digest.to_vec();
    reply.extend_from_slice(&total.to_be_bytes());
    let write = async {
        stream.write_all(&reply).await?;
        stream.shutdown().await
    };
    let write_error = write.await.err().map(|e| e.to_string());
    let close = tokio::time::timeout(Duration::from_secs(10), stream.closed())
        .await
        .map_or_else(|_| "close timed out".to_owned(), |r| r.to_string());
    // And once the closed connection is forgotten, after its TIME-WAIT (3 s): its counters
    // should have been folded into the endpoint's.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = ep.stats();
    println!(
        "{{\"role\":\"server\",\"bytes\":{total},\"sha256\":\"{}\",\"secs\":{:.3},\
         \"read_error\":{},\"write_error\":{},\"close\":\"{close}\",\"stats\":{},\
         \"stats_after\":{},\"packets_received\":{},\"duplicate_packets\":{}}}",
        hex(&digest),
        started.elapsed().as_secs_f64(),
        json_opt(read_error.as_deref()),
        json_opt(write_error.as_deref()),
        stats_json(&stats),
        stats_json(&after),
        transport.map_or(0, |t| t.packets_received),
        transport.map_or(0, |t| t.duplicate_packets),
    );
    Ok(())
}

fn json_opt(s: Option<&str>) -> String {
    s.map_or_else(|| "null".to_owned(), |s| format!("{s:?}"))
}

/// The client's bytes: a pseudo-random pattern with `marker` at the start of every 4 KiB.
fn pattern(rng: &mut Rng, marker: &[u8], offset: u64, out: &mut [u8]) {
    rng.fill(out);
    let mut i = (4096 - offset % 4096) % 4096;
    while (i as usize) < out.len() {
        let at = i as usize;
        let n = marker.len().min(out.len() - at);
        out[at..at + n].copy_from_slice(&marker[..n]);
        i += 4096;
    }
}

async fn victim_client(a: ClientArgs) -> ExitCode {
    let limit = Duration::from_secs_f64(a.timeout);
    match tokio::time::timeout(limit, send_one(&a)).await {
        Ok(Ok(true)) => ExitCode::SUCCESS,
        Ok(Ok(false)) => ExitCode::from(1),
        Ok(Err(e)) => {
            eprintln!("victim-client: {e}");
            ExitCode::from(1)
        }
        Err(_) => {
            eprintln!("victim-client: not done within {limit:?}");
            ExitCode::from(1)
        }
    }
}

async fn send_one(a: &ClientArgs) -> Result<bool, String> {
    let ep = Endpoint::bind_with(&[a.bind], config(a.plaintext))
        .await
        .map_err(|e| format!("cannot bind {}: {e}", a.bind))?;
    let service = ServiceId::from_name(&a.service).map_err(|e| format!("{}: {e}", a.service))?;
    let started = Instant::now();
    let mut stream = ep
        .connect_via(service, a.via)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let connected = started.elapsed();
    let mut rng = Rng::new(0x5e12_a1a7);
    let mut hash = Sha256::new();
    let mut sent: u64 = 0;
    let mut buf = vec![0u8; 64 << 10];
    let spread = Duration::from_secs_f64(a.seconds);
    let per_byte = spread.as_secs_f64() / a.bytes.max(1) as f64;
    let released = Arc::new(AtomicBool::new(!a.hold));
    if a.hold {
        let released = released.clone();
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut sink = [0u8; 256];
            while matches!(stdin.read(&mut sink).await, Ok(n) if n > 0) {}
            released.store(true, Ordering::Relaxed);
        });
    }
    let send_start = Instant::now();
    let mut write_error = None;
    while sent < a.bytes || !released.load(Ordering::Relaxed) {
        let n = if sent < a.bytes {
            buf.len().min((a.bytes - sent) as usize)
        } else {
            buf.len()
        };
        pattern(&mut rng, &a.marker.0, sent, &mut buf[..n]);
        hash.update(&buf[..n]);
        if let Err(e) = stream.write_all(&buf[..n]).await {
            write_error = Some(e.to_string());
            break;
        }
        sent += n as u64;
        // Pace: the first `sent` bytes are due `per_byte * sent` seconds after the start.
        let due = Duration::from_secs_f64(per_byte * sent as f64);
        let ahead = due.saturating_sub(send_start.elapsed());
        if !ahead.is_zero() {
            tokio::time::sleep(ahead).await;
        }
    }
    if write_error.is_none()
        && let Err(e) = stream.shutdown().await
    {
        write_error = Some(e.to_string());
    }
    let digest: [u8; 32] = hash.finalize().into();
    let mut reply = Vec::new();
    let read_error = stream
        .read_to_end(&mut reply)
        .await
        .err()
        .map(|e| e.to_string());
    let secs = started.elapsed().as_secs_f64();
    let stats = ep.stats();
    let transport = stream.stats().ok();
    let close = tokio::time::timeout(Duration::from_secs(10), stream.closed())
        .await
        .map_or_else(|_| "close timed out".to_owned(), |r| r.to_string());
    let (peer_digest, peer_bytes) = match reply.len() {
        40 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&reply[32..]);
            (hex(&reply[..32]), u64::from_be_bytes(n))
        }
        _ => (String::new(), 0),
    };
    let ok = write_error.is_none()
        && read_error.is_none()
        && peer_digest == hex(&digest)
        && peer_bytes == sent
        && close == serval::CloseReason::Finished.to_string();
    println!(
        "{{\"role\":\"client\",\"ok\":{ok},\"bytes\":{sent},\"sha256\":\"{}\",\
         \"server_sha256\":\"{peer_digest}\",\"server_bytes\":{peer_bytes},\"secs\":{secs:.3},\
         \"connect_ms\":{},\"write_error\":{},\"read_error\":{},\"close\":\"{close}\",\
         \"stats\":{},\"packets_received\":{},\"packets_lost\":{}}}",
        hex(&digest),
        connected.as_millis(),
        json_opt(write_error.as_deref()),
        json_opt(read_error.as_deref()),
        stats_json(&stats),
        transport.map_or(0, |t| t.packets_received),
        transport.map_or(0, |t| t.packets_lost),
    );
    Ok(ok)
}

// ---------------------------------------------------------------------------------------------
// syn-flood, echo-server and legit-clients: issue 12's SYN-flood test.

/// A SYN for one service, encoded once, with the offsets of the fields every forged copy
/// changes: forging one costs a copy and a few random words, not an encoding.
struct SynTemplate {
    pkt: Vec<u8>,
    verno: usize,
    nonce: usize,
    key: usize,
    /// The SOURCE extension's one locator (family, port, IPv4 address).
    locator: usize,
}

impl SynTemplate {
    fn new(service: ServiceId, hop_limit: u8) -> Result<SynTemplate, String> {
        let mut r = SalRepr::new(Protocol::STREAM, FlowId(1), FlowId::NONE);
        r.control = Some(ControlRepr {
            flags: ControlFlags::SYN,
            verno: 0,
            ackno: 0,
        });
        r.service = Some(ServiceRepr {
            hop_limit,
            id: service,
        });
        r.nonce = Some(Nonce([0; 16]));
        r.keyshare = Some(KeyShareRepr {
            group: KeyShareRepr::X25519,
            flags: 0,
            key: [0; 32],
        });
        r.source = vec![SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::new(192, 0, 2, 1),
            1,
        ))];
        let pkt = r
            .to_bytes(&[])
            .map_err(|e| format!("cannot encode a SYN: {e:?}"))?;
        let header_len = usize::from(u16::from_be_bytes([pkt[2], pkt[3]])).min(pkt.len());
        let (mut verno, mut nonce, mut key, mut locator) = (None, None, None, None);
        let mut at = BASE;
        while at + 2 <= header_len {
            let (t, len) = (ExtType(pkt[at]), usize::from(pkt[at + 1]));
            if t == ExtType::CONTROL {
                verno = Some(at + field::CONTROL_VERNO.start);
            } else if t == ExtType::NONCE {
                nonce = Some(at + field::NONCE.start);
            } else if t == ExtType::KEYSHARE {
                key = Some(at + field::KEYSHARE_KEY.start);
            } else if t == ExtType::SOURCE {
                locator = Some(at + field::BODY);
            }
            if len < 2 {
                break;
            }
            at += len;
        }
        match (verno, nonce, key, locator) {
            (Some(verno), Some(nonce), Some(key), Some(locator)) => Ok(SynTemplate {
                pkt,
                verno,
                nonce,
                key,
                locator,
            }),
            _ => Err("the encoded SYN lacks an extension".to_owned()),
        }
    }

    /// A new SYN from `from` into `out`: random flowID, verno, nonce and key share.
    fn forge(&self, rng: &mut Rng, from: SocketAddrV4, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.pkt);
        out[4..12].copy_from_slice(&(rng.next() | 1).to_be_bytes());
        out[self.verno..self.verno + 4].copy_from_slice(&(rng.next() as u32).to_be_bytes());
        rng.fill(&mut out[self.nonce..self.nonce + 16]);
        rng.fill(&mut out[self.key..self.key + 32]);
        let l = self.locator;
        out[l + 1..l + 3].copy_from_slice(&from.port().to_be_bytes());
        out[l + 3..l + 7].copy_from_slice(&from.ip().octets());
    }
}

enum FloodSocket {
    /// Spoofed: IPv4 headers of our own.
    Raw(Socket),
    /// From our own address, connected to the target.
    Udp(std::net::UdpSocket),
}

fn syn_flood(a: &SynFloodArgs) -> ExitCode {
    match flood_syns(a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("attack: {e}");
            ExitCode::from(1)
        }
    }
}

fn flood_syns(a: &SynFloodArgs) -> Result<(), String> {
    let service = ServiceId::from_name(&a.service).map_err(|e| format!("{}: {e}", a.service))?;
    let template = SynTemplate::new(service, EndpointConfig::default().hop_limit)?;
    let mut rng = Rng::new(a.seed.unwrap_or_else(clock_seed));
    let (sock, own) = match a.spoof {
        Some(_) => {
            let tx = Socket::new(Domain::IPV4, Type::RAW, Some(255.into()))
                .map_err(|e| format!("cannot open a raw socket (root needed): {e}"))?;
            tx.set_header_included_v4(true)
                .map_err(|e| format!("IP_HDRINCL: {e}"))?;
            let _ = tx.set_send_buffer_size(4 << 20);
            (FloodSocket::Raw(tx), None)
        }
        None => {
            let u = std::net::UdpSocket::bind(a.bind)
                .map_err(|e| format!("cannot bind {}: {e}", a.bind))?;
            u.connect(a.target)
                .map_err(|e| format!("cannot connect to {}: {e}", a.target))?;
            let own = match u.local_addr() {
                Ok(SocketAddr::V4(v4)) => v4,
                other => return Err(format!("local address {other:?}")),
            };
            (FloodSocket::Udp(u), Some(own))
        }
    };
    let target: socket2::SockAddr = SocketAddr::V4(a.target).into();
    let (mut sent, mut errors, mut attempted) = (0u64, 0u64, 0u64);
    let mut last_error: Option<String> = None;
    let mut syn = Vec::with_capacity(template.pkt.len());
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(a.duration);
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let mut n = 64;
        if a.rate > 0 {
            let due = ((now - start).as_secs_f64() * a.rate as f64) as u64;
            let owe = due.saturating_sub(attempted);
            if owe == 0 {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            n = owe.min(64);
        }
        for _ in 0..n {
            let from = match (&a.spoof, own) {
                (Some(cidr), _) => {
                    SocketAddrV4::new(cidr.random(&mut rng), 1024 + rng.below(64_512) as u16)
                }
                (None, Some(own)) => own,
                (None, None) => unreachable!("a socket of our own has an address"),
            };
            template.forge(&mut rng, from, &mut syn);
            attempted += 1;
            let r = match &sock {
                FloodSocket::Raw(s) => s.send_to(&ip_udp(from, a.target, &syn, &mut rng), &target),
                FloodSocket::Udp(u) => u.send(&syn),
            };
            match r {
                Ok(_) => sent += 1,
                Err(e) => {
                    errors += 1;
                    last_error = Some(e.to_string());
                    // A full socket buffer (ENOBUFS): let the queue drain.
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let from = match (&a.spoof, own) {
        (Some(c), _) => format!("{}/{}", Ipv4Addr::from(c.base), c.len),
        (None, Some(own)) => own.to_string(),
        (None, None) => String::new(),
    };
    println!(
        "{{\"role\":\"syn-flood\",\"target\":\"{}\",\"spoofed\":{},\"from\":\"{from}\",\
         \"sent\":{sent},\"send_errors\":{errors},\"last_error\":{},\"secs\":{secs:.3},\
         \"rate\":{:.0},\"syn_bytes\":{}}}",
        a.target,
        a.spoof.is_some(),
        json_opt(last_error.as_deref()),
        sent as f64 / secs.max(1e-9),
        template.pkt.len(),
    );
    Ok(())
}

/// This process's resident memory in KiB (`VmRSS` of /proc/self/status).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system, all threads) of this process so far (/proc/self/stat).
fn cpu_secs() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // The fields after the command name (in parentheses, may hold spaces) start at field 3.
    let Some(rest) = s.rfind(')').and_then(|i| s.get(i + 2..)) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i - 3).and_then(|v| v.parse::<f64>().ok());
    match (ticks(14), ticks(15)) {
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => 0.0,
    }
}

/// What `echo-server` counts of its streams.
#[derive(Default)]
struct Served {
    ok: AtomicU64,
    failed: AtomicU64,
    open: AtomicU64,
}

async fn echo_server(a: EchoServerArgs) -> ExitCode {
    match serve_echo(&a).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("echo-server: {e}");
            ExitCode::from(1)
        }
    }
}

async fn serve_echo(a: &EchoServerArgs) -> Result<(), String> {
    // The engine's defaults: SYN cookies once 256 handshakes are half open, no rate limit.
    let ep = Endpoint::bind_with(&[a.bind], EndpointConfig::default())
        .await
        .map_err(|e| format!("cannot bind {}: {e}", a.bind))?;
    let prefix = ServicePrefix::parse(&a.service).map_err(|e| format!("{}: {e}", a.service))?;
    let mut events = ep.registrar_events();
    let mut listener = ep
        .listen(prefix)
        .map_err(|e| format!("cannot listen: {e}"))?;
    if let Some(router) = a.router {
        ep.set_router(router);
    }
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(RegistrarEvent::Registered { router, .. }) => println!("REGISTERED {router}"),
                Ok(other) => eprintln!("echo-server: {other:?}"),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    });
    let served = Arc::new(Served::default());
    {
        let served = served.clone();
        tokio::spawn(async move {
            loop {
                let mut stream = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("echo-server: accept: {e}");
                        break;
                    }
                };
                let served = served.clone();
                served.open.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let echo = async {
                        let mut buf = vec![0u8; 16 << 10];
                        loop {
                            let n = stream.read(&mut buf).await?;
                            if n == 0 {
                                break;
                            }
                            stream.write_all(&buf[..n]).await?;
                        }
                        stream.shutdown().await
                    };
                    let ok = matches!(
                        tokio::time::timeout(Duration::from_secs(30), echo).await,
                        Ok(Ok(()))
                    );
                    let counter = if ok { &served.ok } else { &served.failed };
                    counter.fetch_add(1, Ordering::Relaxed);
                    served.open.fetch_sub(1, Ordering::Relaxed);
                    let _ = tokio::time::timeout(Duration::from_secs(5), stream.closed()).await;
                });
            }
        });
    }
    println!("READY {}", a.bind);
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let deadline = tokio::time::sleep(Duration::from_secs_f64(a.timeout));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(l)) if l.trim() == "STATS" => {
                    let s = ep.stats();
                    println!(
                        "{{\"role\":\"echo-server\",\"received\":{},\"accepted\":{},\
                         \"cookies_sent\":{},\"cookies_accepted\":{},\"cookies_refused\":{},\
                         \"backlog_drops\":{},\"bad_key_shares\":{},\"malformed\":{},\
                         \"unknown_flow\":{},\"transmit_queue_drops\":{},\"served\":{},\
                         \"echo_failures\":{},\"open\":{},\"rss_kib\":{},\"cpu_secs\":{:.2}}}",
                        s.received,
                        s.accepted,
                        s.cookies_sent,
                        s.cookies_accepted,
                        s.cookies_refused,
                        s.backlog_drops,
                        s.bad_key_shares,
                        s.malformed,
                        s.unknown_flow,
                        s.transmit_queue_drops,
                        served.ok.load(Ordering::Relaxed),
                        served.failed.load(Ordering::Relaxed),
                        served.open.load(Ordering::Relaxed),
                        rss_kib(),
                        cpu_secs(),
                    );
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            },
            () = &mut deadline => break,
        }
    }
    Ok(())
}

/// One legitimate connection: connect by name through `via`, echo 64 bytes. The connect time
/// and the whole time, or why it failed.
async fn one_legit(
    ep: &Endpoint,
    service: ServiceId,
    via: SocketAddr,
    i: u64,
) -> Result<(Duration, Duration), String> {
    let start = Instant::now();
    let mut stream = ep
        .connect_via(service, via)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let connected = start.elapsed();
    let mut req = [0u8; 64];
    Rng::new(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).fill(&mut req);
    stream
        .write_all(&req)
        .await
        .map_err(|e| format!("write: {e}"))?;
    stream
        .shutdown()
        .await
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut got = Vec::with_capacity(64);
    stream
        .read_to_end(&mut got)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if got != req {
        return Err("wrong echo".to_owned());
    }
    Ok((connected, start.elapsed()))
}

/// The `p`-quantile (nearest rank) of sorted milliseconds, or 0 without any.
fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn legit_clients(a: LegitArgs) -> ExitCode {
    let ep = match Endpoint::bind_with(&[a.bind], EndpointConfig::default()).await {
        Ok(ep) => ep,
        Err(e) => {
            eprintln!("legit-clients: cannot bind {}: {e}", a.bind);
            return ExitCode::from(1);
        }
    };
    let service = match ServiceId::from_name(&a.service) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("legit-clients: {}: {e}", a.service);
            return ExitCode::from(1);
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(a.concurrency.max(1)));
    let timeout = Duration::from_millis(a.timeout_ms);
    let t0 = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(a.count as usize);
    for i in 0..a.count {
        if a.interval_ms > 0 {
            tokio::time::sleep_until(t0 + Duration::from_millis(a.interval_ms * i)).await;
        }
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let ep = ep.clone();
        let via = a.via;
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(timeout, one_legit(&ep, service, via, i)).await {
                Ok(r) => r,
                Err(_) => Err(format!("not done within {} ms", timeout.as_millis())),
            }
        }));
    }
    let (mut connect, mut total) = (Vec::new(), Vec::new());
    let mut failures: std::collections::BTreeMap<String, u64> = Default::default();
    for t in tasks {
        match t.await {
            Ok(Ok((c, d))) => {
                connect.push(c.as_secs_f64() * 1e3);
                total.push(d.as_secs_f64() * 1e3);
            }
            Ok(Err(why)) => *failures.entry(why).or_default() += 1,
            Err(e) => *failures.entry(format!("task: {e}")).or_default() += 1,
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    connect.sort_by(f64::total_cmp);
    total.sort_by(f64::total_cmp);
    let ok = connect.len() as u64;
    let attempts = a.count;
    let s = ep.stats();
    let failures: Vec<String> = failures
        .iter()
        .map(|(why, n)| format!("{why:?}:{n}"))
        .collect();
    println!(
        "{{\"role\":\"legit-clients\",\"via\":\"{}\",\"attempts\":{attempts},\"ok\":{ok},\
         \"failed\":{},\"success_pct\":{:.3},\"secs\":{secs:.3},\
         \"connect_ms\":{{\"p50\":{:.2},\"p90\":{:.2},\"p99\":{:.2},\"max\":{:.2}}},\
         \"echo_ms\":{{\"p50\":{:.2},\"p99\":{:.2}}},\"failures\":{{{}}},\
         \"cookie_retries\":{},\"received\":{}}}",
        a.via,
        attempts - ok,
        100.0 * ok as f64 / attempts.max(1) as f64,
        quantile(&connect, 0.5),
        quantile(&connect, 0.9),
        quantile(&connect, 0.99),
        connect.last().copied().unwrap_or(0.0),
        quantile(&total, 0.5),
        quantile(&total, 0.99),
        failures.join(","),
        s.cookie_retries,
        s.received,
    );
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one's-complement sum 16 bits at a time, as RFC 1071 writes it.
    fn reference(data: &[u8]) -> u16 {
        let mut acc: u64 = 0;
        for c in data.chunks(2) {
            acc += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        fold(acc)
    }

    #[test]
    fn the_wide_checksum_is_the_16_bit_one() {
        let mut rng = Rng::new(7);
        for len in (0..80).chain([1200, 1471, 1472]) {
            let mut data = vec![0u8; len];
            rng.fill(&mut data);
            assert_eq!(checksum(0, &data), reference(&data), "len {len}");
            // All ones: the carries wrap many times.
            let ones = vec![0xffu8; len];
            assert_eq!(checksum(0, &ones), reference(&ones), "ones, len {len}");
        }
    }

    #[test]
    fn a_forged_datagram_checksums_to_zero() {
        let mut rng = Rng::new(9);
        let from = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 54324);
        let to = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 40000);
        let p = ip_udp(from, to, b"hello, serval", &mut rng);
        assert_eq!(checksum(0, &p[..20]), 0, "IPv4 header");
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&from.ip().octets());
        pseudo.extend_from_slice(&to.ip().octets());
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&((p.len() - 20) as u16).to_be_bytes());
        pseudo.extend_from_slice(&p[20..]);
        assert_eq!(checksum(0, &pseudo), 0, "UDP");
        assert_eq!(p[8], MARK_TTL);
        let (ttl, src, dst, payload) = parse_ip_udp(&p).expect("parses");
        assert_eq!(
            (ttl, src, dst, payload),
            (MARK_TTL, from, to, &b"hello, serval"[..])
        );
    }

    #[test]
    fn a_gso_batch_splits_into_its_packets() {
        let mk = |pn: u64, len: usize| {
            let mut p = SalRepr::new(Protocol::STREAM, FlowId(5), FlowId(6))
                .to_bytes(&[])
                .expect("header");
            p.extend_from_slice(&pn.to_be_bytes());
            p.resize(len, 0xab);
            p
        };
        let mut batch = Vec::new();
        for pn in 0..3 {
            batch.extend_from_slice(&mk(pn, 100));
        }
        batch.extend_from_slice(&mk(3, 60));
        let segs = segments(&batch);
        assert_eq!(segs.len(), 4);
        assert_eq!(segs[3], &mk(3, 60)[..]);
        let one = mk(0, 100);
        assert_eq!(segments(&one), vec![&one[..]]);
    }

    #[test]
    fn a_forged_syn_parses_with_its_random_fields_and_spoofed_source() {
        let service = ServiceId::from_name("echo.flood.test").expect("name");
        let t = SynTemplate::new(service, 16).expect("template");
        let mut rng = Rng::new(11);
        let cidr = parse_cidr("198.18.0.0/15").expect("cidr");
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let from = SocketAddrV4::new(cidr.random(&mut rng), 40_000);
        t.forge(&mut rng, from, &mut a);
        t.forge(&mut rng, from, &mut b);
        assert_eq!(a.len(), t.pkt.len());
        let ra = SalRepr::parse(&serval_wire::SalPacket::new_checked(&a[..]).expect("a"))
            .expect("a parses");
        let rb = SalRepr::parse(&serval_wire::SalPacket::new_checked(&b[..]).expect("b"))
            .expect("b parses");
        assert_eq!(ra.control.expect("control").flags, ControlFlags::SYN);
        assert_eq!(ra.service.expect("service").id, service);
        assert_eq!(ra.source, vec![SocketAddr::V4(from)]);
        assert!(from.ip().octets()[..2] == [198, 18] || from.ip().octets()[..2] == [198, 19]);
        assert!(ra.dst_flow.is_none() && !ra.src_flow.is_none());
        assert_ne!(ra.src_flow, rb.src_flow);
        assert_ne!(ra.nonce, rb.nonce);
        let (ka, kb) = (ra.keyshare.expect("share"), rb.keyshare.expect("share"));
        assert_eq!(ka.group, KeyShareRepr::X25519);
        assert_ne!(ka.key, kb.key);
        assert!(parse_cidr("10.0.0.0/33").is_err() && parse_cidr("10.0.0.0").is_err());
        let all = parse_cidr("0.0.0.0/0").expect("all");
        let _ = all.random(&mut rng);
    }

    #[test]
    fn markers_are_found_anywhere() {
        assert!(contains(b"xxSECRETyy", b"SECRET"));
        assert!(contains(b"SECRET", b"SECRET"));
        assert!(!contains(b"SECRE", b"SECRET"));
        assert!(!contains(b"SECRET", b""));
        let mut rng = Rng::new(3);
        let mut buf = vec![0u8; 10_000];
        pattern(&mut rng, b"MARK", 4090, &mut buf);
        assert_eq!(&buf[6..10], b"MARK");
        assert_eq!(&buf[4102..4106], b"MARK");
    }
}
