//! Stream transfer benchmark: Serval against kernel TCP (tokio) and QUIC (quinn), run in the
//! same invocation on the same topology.
//!
//! * **bulk** — one flow: the client sends `--bytes` (a seeded byte pattern), half-closes, and
//!   waits for the server's 16-byte reply (the byte count it read, then the offset of the first
//!   byte that differed from the pattern, or `u64::MAX`; the server compares only with
//!   `--verify`). The client times from just before connecting until the reply arrives.
//! * **echo** — connect-by-name plus one 64-byte request/response: per iteration a fresh
//!   connection, 64 bytes written and the write side shut down, the 64-byte echo read to the
//!   server's end of stream, the connection dropped. p50/p99 of the whole iteration.
//! * **bidir** (`run --bidir`) — both directions at once over one connection: the server
//!   writes back each chunk as it reads it while the client writes `--bytes` and reads the
//!   echo; Gbit/s each way. With `--iperf3`, `iperf3 --bidir` (two flows, one each way) is the
//!   kernel's row beside the tokio TCP echo.
//!
//! The pieces are separate subcommands so that the server and the client can run in different
//! network namespaces (`ip netns exec`); `run` orchestrates them (loopback, and two namespaces
//! joined by a veth pair with MTU 1500) and prints markdown tables:
//!
//! ```sh
//! cargo build --release -p serval-bench --bins
//! target/release/transfer-bench run --topology loopback,veth --reps 3
//! ```
//!
//! Memory per idle connection is the separate `conn-mem-bench` binary (it needs a counting
//! global allocator, which would tax every allocation measured here).

use std::io::{self, BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};

#[path = "../quinn_setup.rs"]
mod quinn_setup;
use quinn_setup::{quinn_client, quinn_server};

#[path = "../engine_pair.rs"]
#[allow(dead_code)]
mod engine_pair;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Stream transfer benchmark: Serval vs kernel TCP vs quinn.
#[derive(Debug, Parser)]
#[command(name = "transfer-bench")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve one stack and mode; prints `READY <stack> <mode> <addr>` once bound, then serves
    /// until killed or until its standard input reaches end of file.
    Server(ServerArgs),
    /// Run one measurement against a server; prints a `RESULT ...` line.
    Client(ClientArgs),
    /// Orchestrate servers and clients on the chosen topologies and print markdown tables.
    Run(RunArgs),
    /// Profiling aid: a bulk transfer between two sans-IO Serval engines in one thread, no
    /// sockets and no runtime — the engine's own cost per byte and per packet.
    EngineLoop(EngineLoopArgs),
    /// Profiling aid: ring's AES-256-GCM on one packet's payload, as the engine uses it —
    /// encrypt in place, authenticate only (the payload as associated data, which is what
    /// `Protection::Plaintext` does), and a plain copy of the same bytes — ns per packet.
    Aead(AeadArgs),
}

#[derive(Debug, Args)]
struct AeadArgs {
    /// Payload bytes per packet.
    #[arg(long, value_delimiter = ',', default_value = "1400,16384,65000")]
    sizes: Vec<usize>,
    /// Packets per measurement.
    #[arg(long, default_value_t = 200_000)]
    packets: usize,
}

#[derive(Debug, Args)]
struct EngineLoopArgs {
    /// Bytes to transfer (suffixes K, M, G are binary).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    bytes: u64,
    /// Ceiling of the path-MTU search (the runtime uses 65000 on loopback; 1472 is Ethernet).
    #[arg(long, default_value_t = 1472)]
    max_udp_payload: u16,
    /// Write and read size.
    #[arg(long, default_value_t = 128 << 10)]
    chunk: usize,
}

/// Which transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Stack {
    /// Serval (the `serval` crate), connected by service name; encrypted (the default).
    Serval,
    /// Serval with `Protection::Plaintext` on both ends: authenticated (GMAC), not encrypted.
    ServalPlaintext,
    /// Kernel TCP through `tokio::net::TcpStream`.
    Tcp,
    /// Kernel TCP with TLS 1.3 through tokio-rustls (ring), a full handshake per connection
    /// (self-signed ECDSA P-256 certificate, no session resumption).
    TcpTls,
    /// As `tcp-tls`, but the client keeps rustls's session cache, so every connection after
    /// the first resumes (PSK with a fresh X25519 exchange, no certificate).
    TcpTlsResume,
    /// QUIC through quinn 0.11 (rustls with ring), one bidirectional stream.
    Quinn,
}

impl Stack {
    fn name(self) -> &'static str {
        match self {
            Stack::Serval => "serval",
            Stack::ServalPlaintext => "serval-plaintext",
            Stack::Tcp => "tcp",
            Stack::TcpTls => "tcp-tls",
            Stack::TcpTlsResume => "tcp-tls-resume",
            Stack::Quinn => "quinn",
        }
    }

    fn is_serval(self) -> bool {
        matches!(self, Stack::Serval | Stack::ServalPlaintext)
    }

    fn is_tls(self) -> bool {
        matches!(self, Stack::TcpTls | Stack::TcpTlsResume)
    }

    /// Whether the server writes, and the client needs, a self-signed certificate.
    fn needs_cert(self) -> bool {
        self == Stack::Quinn || self.is_tls()
    }
}

/// What the server does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Read to end of stream, reply with the count.
    Bulk,
    /// Read to end of stream, write it back, end the stream.
    Echo,
    /// Both directions at once over one connection: the server writes back every chunk as it
    /// reads it; the client writes `--bytes` while it reads the echo.
    Bidir,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Bulk => "bulk",
            Mode::Echo => "echo",
            Mode::Bidir => "bidir",
        }
    }

    /// The Serval service a server of this mode listens on.
    fn service(self) -> &'static str {
        match self {
            Mode::Bulk => "bulk.bench",
            Mode::Echo => "echo.bench",
            Mode::Bidir => "bidir.bench",
        }
    }
}

#[derive(Debug, Args)]
struct ServerArgs {
    #[arg(long, value_enum)]
    stack: Stack,
    #[arg(long, value_enum, default_value = "bulk")]
    mode: Mode,
    /// Address to bind (port 0 picks one; the READY line tells which).
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: SocketAddr,
    /// Compare received bytes with the pattern of this seed (bulk mode).
    #[arg(long)]
    verify_seed: Option<u64>,
    /// quinn, tcp-tls: where to write the self-signed certificate (DER) the client must trust.
    #[arg(long)]
    cert_file: Option<PathBuf>,
    /// Read buffer size.
    #[arg(long, default_value_t = 128 << 10)]
    chunk: usize,
    /// Runtime worker threads (1 = tokio current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Diagnostic: Serval's `ack_eliciting_threshold` (default: the engine's, 2).
    #[arg(long)]
    serval_ack_threshold: Option<u32>,
    /// Diagnostic: Serval's send buffer in bytes (default: the engine's, 4 MiB; the runtime
    /// uses 512 KiB on loopback).
    #[arg(long)]
    serval_send_buffer: Option<usize>,
}

#[derive(Debug, Args)]
struct ClientArgs {
    #[arg(long, value_enum)]
    stack: Stack,
    #[arg(long, value_enum, default_value = "bulk")]
    mode: Mode,
    /// The server's address (for Serval: the next hop the SYN for the service is sent to).
    #[arg(long)]
    connect: SocketAddr,
    /// Local address to bind (default: 127.0.0.1:0 towards a loopback server, else 0.0.0.0:0).
    #[arg(long)]
    bind: Option<SocketAddr>,
    /// Bytes to send in bulk mode (suffixes K, M, G are binary).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    bytes: u64,
    /// Seed of the byte pattern sent.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Expect the server to have verified the pattern (it must run with `--verify-seed`).
    #[arg(long)]
    verify: bool,
    /// Echo iterations measured.
    #[arg(long, default_value_t = 1000)]
    iters: usize,
    /// Echo iterations run first and not measured.
    #[arg(long, default_value_t = 50)]
    warmup: usize,
    /// quinn, tcp-tls: the server's certificate (DER) to trust.
    #[arg(long)]
    cert_file: Option<PathBuf>,
    /// Write size.
    #[arg(long, default_value_t = 128 << 10)]
    chunk: usize,
    /// Runtime worker threads (1 = tokio current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Echo: also print, per iteration, when each phase ended (µs since the iteration began).
    #[arg(long)]
    phases: bool,
    /// Diagnostic: Serval's `ack_eliciting_threshold` (default: the engine's, 2).
    #[arg(long)]
    serval_ack_threshold: Option<u32>,
    /// Diagnostic: Serval's send buffer in bytes (default: the engine's, 4 MiB; the runtime
    /// uses 512 KiB on loopback).
    #[arg(long)]
    serval_send_buffer: Option<usize>,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Topologies: `loopback` (both ends on 127.0.0.1) and/or `veth` (two network namespaces
    /// joined by a veth pair, MTU 1500, 10.88.0.1/24 and 10.88.0.2/24).
    #[arg(long, value_delimiter = ',', default_value = "loopback,veth")]
    topology: Vec<Topology>,
    /// Stacks to measure (`serval` is encrypted; `serval-plaintext` authenticates only).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "serval,serval-plaintext,tcp,tcp-tls,quinn"
    )]
    stacks: Vec<Stack>,
    /// Bytes per bulk transfer (suffixes K, M, G are binary).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    bytes: u64,
    /// Repetitions of every measurement (median and spread are reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Echo iterations per repetition.
    #[arg(long, default_value_t = 1000)]
    iters: usize,
    /// Echo warm-up iterations per repetition.
    #[arg(long, default_value_t = 50)]
    warmup: usize,
    /// Servers compare every received byte with the pattern.
    #[arg(long)]
    verify: bool,
    /// Also run iperf3 (if installed) for the bulk table.
    #[arg(long)]
    iperf3: bool,
    /// Skip the bulk measurement.
    #[arg(long)]
    no_bulk: bool,
    /// Skip the echo measurement.
    #[arg(long)]
    no_echo: bool,
    /// Also measure both directions at once (an echo streaming `--bytes` over one
    /// connection; with `--iperf3`, also `iperf3 --bidir`).
    #[arg(long)]
    bidir: bool,
    /// Longest one client run may take, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Runtime worker threads of servers and clients.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Write/read size of servers and clients.
    #[arg(long, default_value_t = 128 << 10)]
    chunk: usize,
    /// Diagnostic: Serval's `ack_eliciting_threshold` on both ends (default: the engine's, 2).
    #[arg(long)]
    serval_ack_threshold: Option<u32>,
    /// Diagnostic: Serval's send buffer in bytes (default: the engine's, 4 MiB; the runtime
    /// uses 512 KiB on loopback).
    #[arg(long)]
    serval_send_buffer: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Topology {
    Loopback,
    Veth,
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

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Server(a) => runtime(a.threads).and_then(|rt| rt.block_on(server(a))),
        Cmd::Client(a) => runtime(a.threads).and_then(|rt| rt.block_on(client(a))),
        Cmd::Run(a) => run(a),
        Cmd::EngineLoop(a) => engine_loop(&a),
        Cmd::Aead(a) => aead_micro(&a),
    };
    if let Err(e) = res {
        eprintln!("transfer-bench: {e}");
        std::process::exit(1);
    }
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    Ok(rt)
}

// ---------------------------------------------------------------------------------------------
// The byte pattern.

/// Period of the pattern: odd, so it lines up with no power-of-two buffer size, and longer
/// than [`MAX_CHUNK`].
const PATTERN_PERIOD: usize = 3_000_017;
/// Largest write: the pattern buffer is this much longer than the period so that any offset
/// has this many contiguous bytes.
const MAX_CHUNK: usize = 1 << 20;

/// A seeded pseudo-random byte pattern: byte `o` of the stream is `buf[o % PATTERN_PERIOD]`.
struct Pattern {
    buf: Vec<u8>,
}

impl Pattern {
    fn new(seed: u64) -> Pattern {
        let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
        let mut buf = Vec::with_capacity(PATTERN_PERIOD + MAX_CHUNK);
        while buf.len() < PATTERN_PERIOD {
            // splitmix64
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            buf.extend_from_slice(&z.to_le_bytes());
        }
        buf.truncate(PATTERN_PERIOD);
        let head = buf[..MAX_CHUNK].to_vec();
        buf.extend_from_slice(&head);
        Pattern { buf }
    }

    /// `len` (≤ [`MAX_CHUNK`]) pattern bytes starting at stream offset `off`.
    fn slice(&self, off: u64, len: usize) -> &[u8] {
        let start = (off % PATTERN_PERIOD as u64) as usize;
        &self.buf[start..start + len.min(MAX_CHUNK)]
    }

    /// Index in `data` of the first byte that differs from the pattern at stream offset `off`.
    fn first_mismatch(&self, mut off: u64, data: &[u8]) -> Option<usize> {
        let mut done = 0;
        while done < data.len() {
            let n = (data.len() - done).min(MAX_CHUNK);
            let want = self.slice(off, n);
            let got = &data[done..done + n];
            if want != got {
                let i = want.iter().zip(got).position(|(a, b)| a != b).unwrap_or(0);
                return Some(done + i);
            }
            done += n;
            off += n as u64;
        }
        None
    }
}

// ---------------------------------------------------------------------------------------------
// Servers.

async fn server(a: ServerArgs) -> Result<()> {
    let chunk = a.chunk.clamp(1, MAX_CHUNK);
    let verify = a.verify_seed.map(|s| Arc::new(Pattern::new(s)));
    // End with the orchestrator: its end of our stdin pipe closes when it exits, however it
    // exits.
    tokio::spawn(async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
        std::process::exit(0);
    });
    let mode = a.mode;
    match a.stack {
        Stack::Serval | Stack::ServalPlaintext => {
            let ep = serval::Endpoint::bind_with(
                &[a.bind],
                serval_config(a.stack, a.serval_ack_threshold, a.serval_send_buffer),
            )
            .await?;
            let id = serval::ServiceId::from_name(mode.service())
                .map_err(|e| format!("service name: {e:?}"))?;
            let mut listener = ep.listen(serval::ServicePrefix::exact(id))?;
            ready(a.stack, mode, ep.local_locators()[0]);
            loop {
                let s = listener.accept().await?;
                let verify = verify.clone();
                tokio::spawn(async move {
                    let mut s = s;
                    if let Err(e) = serve(&mut s, mode, verify.as_deref(), chunk).await {
                        eprintln!("serval server: {e}");
                    }
                    // Let the FIN exchange complete before the handle goes.
                    let _ = tokio::time::timeout(Duration::from_secs(5), s.closed()).await;
                });
            }
        }
        Stack::Tcp => {
            let l = tokio::net::TcpListener::bind(a.bind).await?;
            ready(a.stack, mode, l.local_addr()?);
            loop {
                let (s, _) = l.accept().await?;
                s.set_nodelay(true)?;
                let verify = verify.clone();
                tokio::spawn(async move {
                    let mut s = s;
                    if let Err(e) = serve(&mut s, mode, verify.as_deref(), chunk).await {
                        eprintln!("tcp server: {e}");
                    }
                });
            }
        }
        Stack::TcpTls | Stack::TcpTlsResume => {
            let path = a
                .cert_file
                .ok_or("tcp-tls server needs --cert-file to write its certificate to")?;
            let acceptor = tls_server(&path)?;
            let l = tokio::net::TcpListener::bind(a.bind).await?;
            ready(a.stack, mode, l.local_addr()?);
            loop {
                let (s, _) = l.accept().await?;
                s.set_nodelay(true)?;
                let verify = verify.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let r: Result<()> = async {
                        let mut s = acceptor.accept(s).await?;
                        serve(&mut s, mode, verify.as_deref(), chunk).await?;
                        Ok(())
                    }
                    .await;
                    if let Err(e) = r {
                        eprintln!("tcp-tls server: {e}");
                    }
                });
            }
        }
        Stack::Quinn => {
            let path = a
                .cert_file
                .ok_or("quinn server needs --cert-file to write its certificate to")?;
            let ep = quinn_server(a.bind, &path)?;
            ready(a.stack, mode, ep.local_addr()?);
            while let Some(incoming) = ep.accept().await {
                let verify = verify.clone();
                tokio::spawn(async move {
                    let r: Result<()> = async {
                        let conn = incoming.await?;
                        let (send, recv) = conn.accept_bi().await?;
                        let mut s = tokio::io::join(recv, send);
                        serve(&mut s, mode, verify.as_deref(), chunk).await?;
                        // The client closes once it has the reply; until then keep the
                        // connection (dropping it would abandon unacknowledged data).
                        let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
                        Ok(())
                    }
                    .await;
                    if let Err(e) = r {
                        eprintln!("quinn server: {e}");
                    }
                });
            }
            Ok(())
        }
    }
}

/// The Serval endpoint configuration: the defaults (encrypted), plaintext for
/// `serval-plaintext`, with the diagnostic overrides.
fn serval_config(
    stack: Stack,
    ack_threshold: Option<u32>,
    send_buffer: Option<usize>,
) -> serval::EndpointConfig {
    let mut c = serval::EndpointConfig::default();
    if stack == Stack::ServalPlaintext {
        c.protection = serval::Protection::Plaintext;
    }
    if let Some(t) = ack_threshold {
        c.transport.ack_eliciting_threshold = t;
    }
    if let Some(b) = send_buffer {
        c.transport.send_buffer = b;
    }
    c
}

fn ready(stack: Stack, mode: Mode, addr: SocketAddr) {
    println!("READY {} {} {addr}", stack.name(), mode.name());
    let _ = io::stdout().flush();
}

/// Serves one connection: bulk (count, verify, reply) or echo.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    mode: Mode,
    verify: Option<&Pattern>,
    chunk: usize,
) -> io::Result<()> {
    match mode {
        Mode::Bulk => {
            let mut buf = vec![0u8; chunk];
            let mut count = 0u64;
            let mut bad = u64::MAX;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                if let Some(p) = verify
                    && bad == u64::MAX
                    && let Some(i) = p.first_mismatch(count, &buf[..n])
                {
                    bad = count + i as u64;
                }
                count += n as u64;
            }
            let mut reply = [0u8; 16];
            reply[..8].copy_from_slice(&count.to_be_bytes());
            reply[8..].copy_from_slice(&bad.to_be_bytes());
            s.write_all(&reply).await?;
            s.shutdown().await
        }
        Mode::Echo => {
            let mut buf = Vec::with_capacity(64);
            s.read_to_end(&mut buf).await?;
            s.write_all(&buf).await?;
            s.shutdown().await
        }
        Mode::Bidir => {
            let mut buf = vec![0u8; chunk];
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                s.write_all(&buf[..n]).await?;
            }
            s.shutdown().await
        }
    }
}

// ---------------------------------------------------------------------------------------------
// quinn set-up: `quinn_setup.rs`, shared with failover-bench.

// ---------------------------------------------------------------------------------------------
// TLS over TCP (tokio-rustls) set-up: TLS 1.3 only, ring, the same kind of self-signed
// certificate as quinn's (rcgen: ECDSA P-256).

fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_server(cert_path: &Path) -> Result<tokio_rustls::TlsAcceptor> {
    let ck = rcgen::generate_simple_self_signed(vec!["bench.invalid".to_string()])?;
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
    std::fs::write(cert_path, cert.as_ref())?;
    let config = rustls::ServerConfig::builder_with_provider(ring_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

fn tls_client(cert_path: &Path, resume: bool) -> Result<tokio_rustls::TlsConnector> {
    let der = std::fs::read(cert_path)?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(der))?;
    let mut config = rustls::ClientConfig::builder_with_provider(ring_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// A connected stream of any stack, plus what must outlive it.
enum Conn {
    Serval(serval::Stream),
    Tcp(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
    Quinn(
        quinn::Connection,
        tokio::io::Join<quinn::RecvStream, quinn::SendStream>,
    ),
}

/// One client endpoint of any stack.
enum Dialer {
    Serval(serval::Endpoint, serval::ServiceId),
    Tcp,
    Tls(tokio_rustls::TlsConnector),
    Quinn(quinn::Endpoint),
}

impl Dialer {
    async fn new(
        stack: Stack,
        mode: Mode,
        bind: SocketAddr,
        cert: Option<&Path>,
        config: serval::EndpointConfig,
    ) -> Result<Self> {
        Ok(match stack {
            Stack::Serval | Stack::ServalPlaintext => Dialer::Serval(
                serval::Endpoint::bind_with(&[bind], config).await?,
                serval::ServiceId::from_name(mode.service())
                    .map_err(|e| format!("service name: {e:?}"))?,
            ),
            Stack::Tcp => Dialer::Tcp,
            Stack::TcpTls | Stack::TcpTlsResume => Dialer::Tls(tls_client(
                cert.ok_or("tcp-tls client needs --cert-file")?,
                stack == Stack::TcpTlsResume,
            )?),
            Stack::Quinn => Dialer::Quinn(quinn_client(
                bind,
                cert.ok_or("quinn client needs --cert-file")?,
            )?),
        })
    }

    async fn connect(&self, to: SocketAddr) -> Result<Conn> {
        Ok(match self {
            Dialer::Serval(ep, id) => Conn::Serval(ep.connect_via(*id, to).await?),
            Dialer::Tcp => {
                let s = tokio::net::TcpStream::connect(to).await?;
                s.set_nodelay(true)?;
                Conn::Tcp(s)
            }
            Dialer::Tls(tls) => {
                let s = tokio::net::TcpStream::connect(to).await?;
                s.set_nodelay(true)?;
                let name = rustls::pki_types::ServerName::try_from("bench.invalid")?;
                Conn::Tls(Box::new(tls.connect(name, s).await?))
            }
            Dialer::Quinn(ep) => {
                let conn = ep.connect(to, "bench.invalid")?.await?;
                let (send, recv) = conn.open_bi().await?;
                Conn::Quinn(conn, tokio::io::join(recv, send))
            }
        })
    }
}

impl Conn {
    /// Runs `f` on the byte stream.
    async fn with<T>(
        &mut self,
        f: impl AsyncFnOnce(&mut (dyn ReadWrite + '_)) -> io::Result<T>,
    ) -> io::Result<T> {
        match self {
            Conn::Serval(s) => f(s).await,
            Conn::Tcp(s) => f(s).await,
            Conn::Tls(s) => f(s.as_mut()).await,
            Conn::Quinn(_, s) => f(s).await,
        }
    }

    /// Waits (briefly) for a clean close, outside the timed part.
    async fn close(self) {
        let wait = Duration::from_secs(3);
        match self {
            Conn::Serval(s) => {
                let _ = tokio::time::timeout(wait, s.closed()).await;
            }
            Conn::Tcp(_) | Conn::Tls(_) => {}
            Conn::Quinn(c, _) => {
                c.close(0u32.into(), b"done");
            }
        }
    }
}

/// An async byte stream, object-safe.
trait ReadWrite: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> ReadWrite for T {}

async fn client(a: ClientArgs) -> Result<()> {
    let bind = a.bind.unwrap_or_else(|| {
        let ip = if a.connect.ip().is_loopback() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        };
        SocketAddr::new(ip, 0)
    });
    let dialer = Dialer::new(
        a.stack,
        a.mode,
        bind,
        a.cert_file.as_deref(),
        serval_config(a.stack, a.serval_ack_threshold, a.serval_send_buffer),
    )
    .await?;
    match a.mode {
        Mode::Bulk => bulk_client(&a, &dialer).await,
        Mode::Echo => echo_client(&a, &dialer).await,
        Mode::Bidir => bidir_client(&a, &dialer).await,
    }?;
    if let Dialer::Quinn(ep) = dialer {
        let _ = tokio::time::timeout(Duration::from_secs(3), ep.wait_idle()).await;
    }
    Ok(())
}

async fn bulk_client(a: &ClientArgs, dialer: &Dialer) -> Result<()> {
    let pattern = Pattern::new(a.seed);
    let chunk = a.chunk.clamp(1, MAX_CHUNK);
    let bytes = a.bytes;
    let t0 = Instant::now();
    let mut conn = dialer.connect(a.connect).await?;
    let connected = t0.elapsed();
    let reply = conn
        .with(async |s| {
            let mut off = 0u64;
            while off < bytes {
                let n = ((bytes - off) as usize).min(chunk);
                s.write_all(pattern.slice(off, n)).await?;
                off += n as u64;
            }
            s.shutdown().await?;
            let mut reply = [0u8; 16];
            s.read_exact(&mut reply).await?;
            Ok(reply)
        })
        .await?;
    let secs = t0.elapsed().as_secs_f64();
    conn.close().await;
    let mut c = [0u8; 8];
    c.copy_from_slice(&reply[..8]);
    let count = u64::from_be_bytes(c);
    c.copy_from_slice(&reply[8..]);
    let bad = u64::from_be_bytes(c);
    if count != bytes {
        return Err(format!("server counted {count} bytes, {bytes} were sent").into());
    }
    if bad != u64::MAX {
        return Err(format!("byte {bad} differs from the pattern").into());
    }
    println!(
        "RESULT bulk {} bytes={bytes} secs={secs:.6} gbps={:.4} connect_us={} verified={}",
        a.stack.name(),
        bytes as f64 * 8.0 / secs / 1e9,
        connected.as_micros(),
        a.verify,
    );
    Ok(())
}

/// Writes `--bytes` of the pattern while reading the echo, over one connection, each side in
/// its own future on the one task (split halves, as an application would); checks the count
/// and (with `--verify`) every echoed byte.
async fn bidir_client(a: &ClientArgs, dialer: &Dialer) -> Result<()> {
    let pattern = Pattern::new(a.seed);
    let chunk = a.chunk.clamp(1, MAX_CHUNK);
    let bytes = a.bytes;
    let t0 = Instant::now();
    let mut conn = dialer.connect(a.connect).await?;
    let verify = a.verify;
    let (got, bad) = match &mut conn {
        Conn::Serval(s) => {
            let (r, w) = s.split();
            bidir_halves(r, w, &pattern, bytes, chunk, verify).await?
        }
        Conn::Tcp(s) => {
            let (r, w) = s.split();
            bidir_halves(r, w, &pattern, bytes, chunk, verify).await?
        }
        Conn::Tls(s) => {
            let (r, w) = tokio::io::split(s.as_mut());
            bidir_halves(r, w, &pattern, bytes, chunk, verify).await?
        }
        Conn::Quinn(_, s) => {
            let (r, w) = tokio::io::split(s);
            bidir_halves(r, w, &pattern, bytes, chunk, verify).await?
        }
    };
    let secs = t0.elapsed().as_secs_f64();
    if let Conn::Serval(s) = &conn
        && let Ok(st) = s.stats()
    {
        // For diagnosis: losses, probe timeouts, retransmissions of the client's direction.
        eprintln!("STATS {st:?}");
    }
    conn.close().await;
    if got != bytes {
        return Err(format!("{got} bytes echoed, {bytes} were sent").into());
    }
    if let Some(at) = bad {
        return Err(format!("echoed byte {at} differs from the pattern").into());
    }
    println!(
        "RESULT bidir {} bytes={bytes} secs={secs:.6} gbps={:.4} verified={verify}",
        a.stack.name(),
        bytes as f64 * 8.0 / secs / 1e9,
    );
    Ok(())
}

/// The two directions of [`bidir_client`]: the count read and the first differing offset.
async fn bidir_halves<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut r: R,
    mut w: W,
    pattern: &Pattern,
    bytes: u64,
    chunk: usize,
    verify: bool,
) -> io::Result<(u64, Option<u64>)> {
    let write = async {
        let mut off = 0u64;
        while off < bytes {
            let n = ((bytes - off) as usize).min(chunk);
            w.write_all(pattern.slice(off, n)).await?;
            off += n as u64;
        }
        w.shutdown().await
    };
    let read = async {
        let mut buf = vec![0u8; chunk];
        let mut got = 0u64;
        let mut bad = None;
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            if verify
                && bad.is_none()
                && let Some(i) = pattern.first_mismatch(got, &buf[..n])
            {
                bad = Some(got + i as u64);
            }
            got += n as u64;
        }
        Ok::<_, io::Error>((got, bad))
    };
    let ((), out) = tokio::try_join!(write, read)?;
    Ok(out)
}

async fn echo_client(a: &ClientArgs, dialer: &Dialer) -> Result<()> {
    let mut req = [0u8; 64];
    for (i, b) in req.iter_mut().enumerate() {
        *b = i as u8 ^ 0x5a;
    }
    let mut samples = Vec::with_capacity(a.iters);
    for i in 0..a.warmup + a.iters {
        let t0 = Instant::now();
        let mut conn = dialer.connect(a.connect).await?;
        let t_conn = t0.elapsed();
        let (got, t_first) = conn
            .with(async |s| {
                s.write_all(&req).await?;
                s.shutdown().await?;
                let mut got = vec![0u8; 64];
                let mut n = s.read(&mut got).await?;
                let t_first = t0.elapsed();
                while n < 64 {
                    let k = s.read(&mut got[n..]).await?;
                    if k == 0 {
                        break;
                    }
                    n += k;
                }
                got.truncate(n);
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).await?;
                got.extend_from_slice(&rest);
                Ok((got, t_first))
            })
            .await?;
        let t_eof = t0.elapsed();
        // Quinn: closing is part of the iteration (like dropping the others).
        if let Conn::Quinn(c, _) = &conn {
            c.close(0u32.into(), b"done");
        }
        drop(conn);
        let dt = t0.elapsed();
        if a.phases {
            println!(
                "PHASES connect={} first_byte={} eof={} closed={}",
                t_conn.as_micros(),
                t_first.as_micros(),
                t_eof.as_micros(),
                dt.as_micros()
            );
        }
        if got != req {
            return Err(format!("echo returned {} bytes, not the request", got.len()).into());
        }
        if i >= a.warmup {
            samples.push(dt);
        }
    }
    samples.sort();
    let us = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i.min(samples.len() - 1)].as_secs_f64() * 1e6
    };
    let mean = samples.iter().map(Duration::as_secs_f64).sum::<f64>() / samples.len() as f64;
    println!(
        "RESULT echo {} iters={} p50_us={:.1} p99_us={:.1} mean_us={:.1} min_us={:.1} max_us={:.1}",
        a.stack.name(),
        samples.len(),
        us(0.5),
        us(0.99),
        mean * 1e6,
        us(0.0),
        us(1.0),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Orchestration.

/// Pids of the children started here, killed on a signal.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
/// Namespaces created here, deleted on a signal.
static NAMESPACES: Mutex<Vec<String>> = Mutex::new(Vec::new());

const NS_SERVER: &str = "sbench-srv";
const NS_CLIENT: &str = "sbench-cli";
const VETH_SERVER: &str = "sbv-srv";
const VETH_CLIENT: &str = "sbv-cli";
const SERVER_IP: &str = "10.88.0.1";
const CLIENT_IP: &str = "10.88.0.2";

/// Runs a command to completion within `limit`; kills it and fails beyond.
fn run_cmd(argv: &[&str], limit: Duration) -> Result<String> {
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", argv[0]))?;
    let out = child.stdout.take().ok_or("no stdout pipe")?;
    let err = child.stderr.take().ok_or("no stderr pipe")?;
    let read_all = |mut r: Box<dyn io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let (out, err) = (read_all(Box::new(out)), read_all(Box::new(err)));
    CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(child.id());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    forget_child(child.id());
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    match status {
        None => Err(format!("{} timed out after {limit:?}", argv.join(" ")).into()),
        Some(st) if !st.success() => {
            Err(format!("{} failed ({st}): {}{}", argv.join(" "), out, err.trim()).into())
        }
        Some(_) => Ok(out),
    }
}

fn forget_child(pid: u32) {
    CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|&p| p != pid);
}

/// A long-running server process, killed on drop.
struct ServerProc {
    child: Child,
    addr: SocketAddr,
}

impl ServerProc {
    fn start(argv: &[String], limit: Duration) -> Result<ServerProc> {
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("{}: {e}", argv[0]))?;
        CHILDREN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        let out = child.stdout.take().ok_or("no stdout pipe")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut proc = ServerProc {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("READY ") {
                        let addr = rest.split_whitespace().last().ok_or("bad READY line")?;
                        proc.addr = addr.parse()?;
                        return Ok(proc);
                    }
                }
                Err(_) => {
                    return Err(
                        format!("server {} not ready within {limit:?}", argv.join(" ")).into(),
                    );
                }
            }
        }
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        forget_child(self.child.id());
    }
}

/// Two network namespaces joined by a veth pair; deleted on drop.
struct Netns;

impl Netns {
    fn create() -> Result<Netns> {
        let t = Duration::from_secs(10);
        // Leftovers of a run that was killed hard.
        for ns in [NS_SERVER, NS_CLIENT] {
            let _ = run_cmd(&["ip", "netns", "del", ns], t);
        }
        let guard = Netns;
        for ns in [NS_SERVER, NS_CLIENT] {
            NAMESPACES
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(ns.to_string());
            run_cmd(&["ip", "netns", "add", ns], t)?;
        }
        run_cmd(
            &[
                "ip",
                "link",
                "add",
                VETH_SERVER,
                "netns",
                NS_SERVER,
                "mtu",
                "1500",
                "type",
                "veth",
                "peer",
                "name",
                VETH_CLIENT,
                "netns",
                NS_CLIENT,
                "mtu",
                "1500",
            ],
            t,
        )?;
        for (ns, dev, ip) in [
            (NS_SERVER, VETH_SERVER, SERVER_IP),
            (NS_CLIENT, VETH_CLIENT, CLIENT_IP),
        ] {
            let cidr = format!("{ip}/24");
            run_cmd(&["ip", "-n", ns, "addr", "add", &cidr, "dev", dev], t)?;
            run_cmd(&["ip", "-n", ns, "link", "set", dev, "up"], t)?;
            run_cmd(&["ip", "-n", ns, "link", "set", "lo", "up"], t)?;
        }
        Ok(guard)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_namespaces();
    }
}

fn delete_namespaces() {
    // Hold the lock throughout, so that a signal arriving while the main thread cleans up
    // (or the reverse) waits for the deletion instead of exiting half-way through it.
    let mut names = NAMESPACES.lock().unwrap_or_else(|e| e.into_inner());
    for ns in names.iter() {
        let _ = run_cmd(&["ip", "netns", "del", ns], Duration::from_secs(10));
    }
    names.clear();
}

/// On SIGINT/SIGTERM/SIGHUP: kill our children, delete our namespaces, exit.
fn install_signal_cleanup() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
                signal(SignalKind::hangup()),
            ) else {
                return;
            };
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
            let pids = CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for pid in pids {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
            delete_namespaces();
            eprintln!("transfer-bench: interrupted; children killed, namespaces deleted");
            std::process::exit(130);
        });
    });
    Ok(())
}

/// Where and how the two sides of a topology run.
struct Placement {
    topology: Topology,
    server_prefix: Vec<String>,
    client_prefix: Vec<String>,
    server_bind: String,
    client_bind: String,
}

impl Placement {
    fn new(t: Topology) -> Placement {
        let exec = |ns: &str| -> Vec<String> {
            ["ip", "netns", "exec", ns]
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        match t {
            Topology::Loopback => Placement {
                topology: t,
                server_prefix: vec![],
                client_prefix: vec![],
                server_bind: "127.0.0.1".into(),
                client_bind: "127.0.0.1".into(),
            },
            Topology::Veth => Placement {
                topology: t,
                server_prefix: exec(NS_SERVER),
                client_prefix: exec(NS_CLIENT),
                server_bind: SERVER_IP.into(),
                client_bind: CLIENT_IP.into(),
            },
        }
    }

    fn name(&self) -> &'static str {
        match self.topology {
            Topology::Loopback => "loopback",
            Topology::Veth => "veth (MTU 1500, two netns)",
        }
    }
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

/// Value of `key=` in a RESULT line.
fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

fn run(a: RunArgs) -> Result<()> {
    install_signal_cleanup()?;
    let exe = std::env::current_exe()?.to_string_lossy().into_owned();
    let cert_file = std::env::temp_dir().join(format!("transfer-bench-{}.der", std::process::id()));
    let cert = cert_file.to_string_lossy().into_owned();
    let limit = Duration::from_secs(a.timeout);
    let mut report = String::new();
    let mut bulk_all = Vec::new();
    let mut echo_all = Vec::new();
    let mut bidir_all = Vec::new();
    for &t in &a.topology {
        let _netns = match t {
            Topology::Veth => Some(Netns::create()?),
            Topology::Loopback => None,
        };
        let p = Placement::new(t);
        eprintln!("== {}", p.name());
        if !a.no_bulk {
            bulk_all.push((
                p.name().to_string(),
                bulk_topology(&a, &p, &exe, &cert, limit)?,
            ));
        }
        if !a.no_echo {
            echo_all.push((
                p.name().to_string(),
                echo_topology(&a, &p, &exe, &cert, limit)?,
            ));
        }
        if a.bidir {
            bidir_all.push((
                p.name().to_string(),
                bidir_topology(&a, &p, &exe, &cert, limit)?,
            ));
        }
    }
    let _ = std::fs::remove_file(&cert_file);
    for s in [Stack::TcpTls, Stack::TcpTlsResume] {
        let _ = std::fs::remove_file(cert_path(&cert, s));
    }
    let bulk_rows = bulk_all;

    if !bulk_rows.is_empty() {
        report += &format!(
            "\nBulk throughput, one flow, {} per transfer, {} repetitions (Gbit/s: median, min–max):\n\n",
            human_bytes(a.bytes),
            a.reps
        );
        report += "| topology | stack | Gbit/s median | min–max | Serval ÷ this | Serval plaintext ÷ this |\n|---|---|---:|---:|---:|---:|\n";
        for (topo, rows) in &bulk_rows {
            let median_of = |name: &str| {
                rows.iter()
                    .find(|(s, _)| s == name)
                    .map(|(_, v)| stats(v).0)
            };
            let ratio = |of: Option<f64>, name: &str, stack: &str, med: f64| match of {
                Some(s) if stack != name => format!("{:.2}×", s / med),
                _ => "—".into(),
            };
            let (serval, plain) = (median_of("serval"), median_of("serval-plaintext"));
            for (stack, v) in rows {
                let (med, lo, hi) = stats(v);
                let r1 = ratio(serval, "serval", stack, med);
                let r2 = ratio(plain, "serval-plaintext", stack, med);
                report +=
                    &format!("| {topo} | {stack} | {med:.2} | {lo:.2}–{hi:.2} | {r1} | {r2} |\n");
            }
        }
    }
    if !echo_all.is_empty() {
        report += &format!(
            "\nConnect + 64-byte request/response + close, {} iterations after {} warm-up, {} repetitions (µs: median of the repetitions' percentiles, min–max):\n\n",
            a.iters, a.warmup, a.reps
        );
        report += "| topology | stack | p50 µs | p50 min–max | p99 µs | p99 min–max | Serval ÷ this (p50) |\n|---|---|---:|---:|---:|---:|---:|\n";
        for (topo, rows) in &echo_all {
            let serval = rows
                .iter()
                .find(|(s, _, _)| s == "serval")
                .map(|(_, p50, _)| stats(p50).0);
            for (stack, p50, p99) in rows {
                let (m50, l50, h50) = stats(p50);
                let (m99, l99, h99) = stats(p99);
                let ratio = match serval {
                    Some(s) if stack != "serval" => format!("{:.2}×", s / m50),
                    _ => "—".into(),
                };
                report += &format!(
                    "| {topo} | {stack} | {m50:.1} | {l50:.1}–{h50:.1} | {m99:.1} | {l99:.1}–{h99:.1} | {ratio} |\n"
                );
            }
        }
    }
    if !bidir_all.is_empty() {
        report += &format!(
            "\nBoth directions at once over one connection (an echo), {} each way, {} repetitions (Gbit/s each way: median, min–max):\n\n",
            human_bytes(a.bytes),
            a.reps
        );
        report += "| topology | stack | Gbit/s each way | min–max | Serval ÷ this |\n|---|---|---:|---:|---:|\n";
        for (topo, rows) in &bidir_all {
            let serval = rows
                .iter()
                .find(|(s, _)| s == "serval")
                .map(|(_, v)| stats(v).0);
            for (stack, v) in rows {
                let (med, lo, hi) = stats(v);
                let ratio = match serval {
                    Some(s) if stack != "serval" => format!("{:.2}×", s / med),
                    _ => "—".into(),
                };
                report += &format!("| {topo} | {stack} | {med:.2} | {lo:.2}–{hi:.2} | {ratio} |\n");
            }
        }
    }
    println!("{report}");
    Ok(())
}

fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b => format!("{b} bytes"),
    }
}

fn server_argv(
    p: &Placement,
    exe: &str,
    stack: Stack,
    mode: Mode,
    a: &RunArgs,
    cert: &str,
) -> Vec<String> {
    let mut v = p.server_prefix.clone();
    v.extend([
        exe.to_string(),
        "server".into(),
        "--stack".into(),
        stack.name().into(),
        "--mode".into(),
        mode.name().into(),
        "--bind".into(),
        format!("{}:0", p.server_bind),
        "--threads".into(),
        a.threads.to_string(),
        "--chunk".into(),
        a.chunk.to_string(),
    ]);
    if stack.needs_cert() {
        v.extend(["--cert-file".into(), cert_path(cert, stack)]);
    }
    if a.verify && mode == Mode::Bulk {
        v.extend(["--verify-seed".into(), "1".into()]);
    }
    if let (Some(t), true) = (a.serval_ack_threshold, stack.is_serval()) {
        v.extend(["--serval-ack-threshold".into(), t.to_string()]);
    }
    if let (Some(b), true) = (a.serval_send_buffer, stack.is_serval()) {
        v.extend(["--serval-send-buffer".into(), b.to_string()]);
    }
    v
}

fn client_argv(p: &Placement, exe: &str, stack: Stack, mode: Mode, a: &RunArgs) -> Vec<String> {
    let mut v = p.client_prefix.clone();
    v.extend([
        exe.to_string(),
        "client".into(),
        "--stack".into(),
        stack.name().into(),
        "--mode".into(),
        mode.name().into(),
        "--bind".into(),
        format!("{}:0", p.client_bind),
        "--bytes".into(),
        a.bytes.to_string(),
        "--iters".into(),
        a.iters.to_string(),
        "--warmup".into(),
        a.warmup.to_string(),
        "--threads".into(),
        a.threads.to_string(),
        "--chunk".into(),
        a.chunk.to_string(),
        "--seed".into(),
        "1".into(),
    ]);
    if a.verify && matches!(mode, Mode::Bulk | Mode::Bidir) {
        v.push("--verify".into());
    }
    if let (Some(t), true) = (a.serval_ack_threshold, stack.is_serval()) {
        v.extend(["--serval-ack-threshold".into(), t.to_string()]);
    }
    if let (Some(b), true) = (a.serval_send_buffer, stack.is_serval()) {
        v.extend(["--serval-send-buffer".into(), b.to_string()]);
    }
    v
}

/// Each stack's server writes its own certificate: `cert` for quinn, `cert.tls` for TLS.
fn cert_path(cert: &str, stack: Stack) -> String {
    if stack.is_tls() {
        format!("{cert}.{}", stack.name())
    } else {
        cert.to_string()
    }
}

fn run_client(argv: &[String], limit: Duration) -> Result<String> {
    let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = run_cmd(&refs, limit)?;
    let line = out
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .ok_or_else(|| format!("no RESULT line from {}: {out}", argv.join(" ")))?;
    eprintln!("  {line}");
    Ok(line.to_string())
}

fn bulk_topology(
    a: &RunArgs,
    p: &Placement,
    exe: &str,
    cert: &str,
    limit: Duration,
) -> Result<Vec<(String, Vec<f64>)>> {
    let mut servers = Vec::new();
    for &stack in &a.stacks {
        let argv = server_argv(p, exe, stack, Mode::Bulk, a, cert);
        let proc = ServerProc::start(&argv, Duration::from_secs(20))?;
        servers.push((stack, proc));
    }
    let iperf = if a.iperf3 {
        let port = 20_000 + std::process::id() % 20_000;
        let mut argv = p.server_prefix.clone();
        argv.extend(
            [
                "iperf3",
                "-s",
                "-B",
                p.server_bind.as_str(),
                "-p",
                &port.to_string(),
                "--forceflush",
            ]
            .map(String::from),
        );
        Some((argv, port))
    } else {
        None
    };
    let iperf_proc = match &iperf {
        Some((argv, _)) => Some(start_iperf(argv)?),
        None => None,
    };
    let mut rows: Vec<(String, Vec<f64>)> = a
        .stacks
        .iter()
        .map(|s| (s.name().to_string(), Vec::new()))
        .collect();
    if iperf_proc.is_some() {
        rows.push(("iperf3 (kernel TCP)".into(), Vec::new()));
    }
    // Interleave the stacks within each repetition so slow drifts of the shared VM hit all.
    for rep in 0..a.reps {
        eprintln!(" bulk repetition {}/{}", rep + 1, a.reps);
        for (i, (stack, proc)) in servers.iter().enumerate() {
            let mut argv = client_argv(p, exe, *stack, Mode::Bulk, a);
            argv.extend(["--connect".into(), proc.addr.to_string()]);
            if stack.needs_cert() {
                argv.extend(["--cert-file".into(), cert_path(cert, *stack)]);
            }
            let line = run_client(&argv, limit)?;
            rows[i]
                .1
                .push(field(&line, "gbps").ok_or("RESULT without gbps")?);
        }
        if let Some((_, port)) = &iperf {
            let mut argv = p.client_prefix.clone();
            argv.extend(
                [
                    "iperf3",
                    "-c",
                    p.server_bind.as_str(),
                    "-p",
                    &port.to_string(),
                    "-n",
                    &a.bytes.to_string(),
                    "-J",
                ]
                .map(String::from),
            );
            let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
            let out = run_cmd(&refs, limit)?;
            let gbps = iperf_receiver_bps(&out).ok_or("no sum_received in iperf3 output")? / 1e9;
            eprintln!("  RESULT bulk iperf3 gbps={gbps:.4}");
            if let Some(r) = rows.last_mut() {
                r.1.push(gbps);
            }
        }
    }
    drop(iperf_proc);
    drop(servers);
    Ok(rows)
}

/// Both directions at once: each stack's echo server streaming back `--bytes` over one
/// connection, and `iperf3 --bidir` (two flows, one each way) for the kernel, interleaved.
fn bidir_topology(
    a: &RunArgs,
    p: &Placement,
    exe: &str,
    cert: &str,
    limit: Duration,
) -> Result<Vec<(String, Vec<f64>)>> {
    let mut servers = Vec::new();
    for &stack in &a.stacks {
        let argv = server_argv(p, exe, stack, Mode::Bidir, a, cert);
        servers.push((stack, ServerProc::start(&argv, Duration::from_secs(20))?));
    }
    let port = 20_000 + (std::process::id() + 1) % 20_000;
    let iperf_proc = if a.iperf3 {
        let mut argv = p.server_prefix.clone();
        argv.extend(
            [
                "iperf3",
                "-s",
                "-B",
                p.server_bind.as_str(),
                "-p",
                &port.to_string(),
            ]
            .map(String::from),
        );
        Some(start_iperf(&argv)?)
    } else {
        None
    };
    let mut rows: Vec<(String, Vec<f64>)> = a
        .stacks
        .iter()
        .map(|s| (s.name().to_string(), Vec::new()))
        .collect();
    if iperf_proc.is_some() {
        rows.push(("iperf3 --bidir (kernel TCP, two flows)".into(), Vec::new()));
    }
    for rep in 0..a.reps {
        eprintln!(" bidir repetition {}/{}", rep + 1, a.reps);
        for (i, (stack, proc)) in servers.iter().enumerate() {
            let mut argv = client_argv(p, exe, *stack, Mode::Bidir, a);
            argv.extend(["--connect".into(), proc.addr.to_string()]);
            if stack.needs_cert() {
                argv.extend(["--cert-file".into(), cert_path(cert, *stack)]);
            }
            let line = run_client(&argv, limit)?;
            rows[i]
                .1
                .push(field(&line, "gbps").ok_or("RESULT without gbps")?);
        }
        if iperf_proc.is_some() {
            let mut argv = p.client_prefix.clone();
            argv.extend(
                [
                    "iperf3",
                    "-c",
                    p.server_bind.as_str(),
                    "-p",
                    &port.to_string(),
                    "-n",
                    &a.bytes.to_string(),
                    "--bidir",
                    "-J",
                ]
                .map(String::from),
            );
            let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
            let out = run_cmd(&refs, limit)?;
            let gbps = iperf_bidir_min_bps(&out).ok_or("no bidir sums in iperf3 output")? / 1e9;
            eprintln!("  RESULT bidir iperf3 gbps={gbps:.4} (slower direction)");
            if let Some(r) = rows.last_mut() {
                r.1.push(gbps);
            }
        }
    }
    drop(iperf_proc);
    drop(servers);
    Ok(rows)
}

/// The slower direction of an `iperf3 --bidir` run, receiver side: the smaller of
/// `end.sum_received.bits_per_second` and `end.sum_received_bidir_reverse.bits_per_second`.
fn iperf_bidir_min_bps(json: &str) -> Option<f64> {
    let get = |key: &str| -> Option<f64> {
        let at = json.find(&format!("\"{key}\""))?;
        let rest = &json[at..];
        let k = rest.find("\"bits_per_second\"")?;
        let v = rest[k + "\"bits_per_second\"".len()..].trim_start_matches([':', ' ', '\t', '\n']);
        let end = v.find([',', '\n', '}'])?;
        v[..end].trim().parse().ok()
    };
    Some(get("sum_received")?.min(get("sum_received_bidir_reverse")?))
}

/// Starts an iperf3 server; killed on drop.
fn start_iperf(argv: &[String]) -> Result<ServerProc> {
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("iperf3: {e}"))?;
    CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(child.id());
    // iperf3 prints nothing reliable before it listens; a local process binds well within this.
    std::thread::sleep(Duration::from_millis(500));
    Ok(ServerProc {
        child,
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
    })
}

/// `end.sum_received.bits_per_second` of iperf3's JSON output.
fn iperf_receiver_bps(json: &str) -> Option<f64> {
    let at = json.find("\"sum_received\"")?;
    let rest = &json[at..];
    let k = rest.find("\"bits_per_second\"")?;
    let v = rest[k + "\"bits_per_second\"".len()..].trim_start_matches([':', ' ', '\t', '\n']);
    let end = v.find([',', '\n', '}'])?;
    v[..end].trim().parse().ok()
}

#[allow(clippy::type_complexity)]
fn echo_topology(
    a: &RunArgs,
    p: &Placement,
    exe: &str,
    cert: &str,
    limit: Duration,
) -> Result<Vec<(String, Vec<f64>, Vec<f64>)>> {
    let stacks: Vec<Stack> = a
        .stacks
        .iter()
        .copied()
        .filter(|s| *s != Stack::Quinn)
        .collect();
    let mut servers = Vec::new();
    for &stack in &stacks {
        let argv = server_argv(p, exe, stack, Mode::Echo, a, cert);
        servers.push((stack, ServerProc::start(&argv, Duration::from_secs(20))?));
    }
    let mut rows: Vec<(String, Vec<f64>, Vec<f64>)> = stacks
        .iter()
        .map(|s| (s.name().to_string(), Vec::new(), Vec::new()))
        .collect();
    for rep in 0..a.reps {
        eprintln!(" echo repetition {}/{}", rep + 1, a.reps);
        for (i, (stack, proc)) in servers.iter().enumerate() {
            let mut argv = client_argv(p, exe, *stack, Mode::Echo, a);
            argv.extend(["--connect".into(), proc.addr.to_string()]);
            if stack.needs_cert() {
                argv.extend(["--cert-file".into(), cert_path(cert, *stack)]);
            }
            let line = run_client(&argv, limit)?;
            rows[i].1.push(field(&line, "p50_us").ok_or("no p50")?);
            rows[i].2.push(field(&line, "p99_us").ok_or("no p99")?);
        }
    }
    drop(servers);
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// AEAD cost per packet.

fn aead_micro(a: &AeadArgs) -> Result<()> {
    use ring::aead as ring_aead;
    use std::hint::black_box;
    let alg = &ring_aead::AES_256_GCM;
    let key = ring_aead::LessSafeKey::new(
        ring_aead::UnboundKey::new(alg, &[7u8; 32]).map_err(|_| "AES key")?,
    );
    let chacha = ring_aead::LessSafeKey::new(
        ring_aead::UnboundKey::new(&ring_aead::CHACHA20_POLY1305, &[7u8; 32])
            .map_err(|_| "ChaCha20 key")?,
    );
    // The engine's packet protection (aws-lc): the same AES-256-GCM, another implementation.
    use aws_lc_rs::aead as lc;
    let lc_key = lc::LessSafeKey::new(
        lc::UnboundKey::new(&lc::AES_256_GCM, &[7u8; 32]).map_err(|_| "AES key")?,
    );
    let header = [0x11u8; 28];
    for &size in &a.sizes {
        let src = Pattern::new(3).slice(0, size).to_vec();
        let mut buf = vec![0u8; size];
        let n = a.packets.max(1);
        let time = |f: &mut dyn FnMut(u64)| {
            let t0 = Instant::now();
            for i in 0..n as u64 {
                f(i);
            }
            t0.elapsed().as_secs_f64() * 1e9 / n as f64
        };
        let nonce = |i: u64| {
            let mut b = [0u8; 12];
            b[4..].copy_from_slice(&i.to_be_bytes());
            ring_aead::Nonce::assume_unique_for_key(b)
        };
        let copy = time(&mut |_| {
            buf.copy_from_slice(black_box(&src));
            black_box(&buf);
        });
        let enc = time(&mut |i| {
            let tag = key
                .seal_in_place_separate_tag(nonce(i), ring_aead::Aad::from(&header), &mut buf)
                .ok();
            black_box((&buf, tag));
        });
        let mac = time(&mut |i| {
            let tag = key
                .seal_in_place_separate_tag(nonce(i), ring_aead::Aad::from(&src[..]), &mut [])
                .ok();
            black_box(tag);
        });
        let poly = time(&mut |i| {
            let tag = chacha
                .seal_in_place_separate_tag(nonce(i), ring_aead::Aad::from(&src[..]), &mut [])
                .ok();
            black_box(tag);
        });
        let lc_nonce = |i: u64| {
            let mut b = [0u8; 12];
            b[4..].copy_from_slice(&i.to_be_bytes());
            lc::Nonce::assume_unique_for_key(b)
        };
        let lc_enc = time(&mut |i| {
            let tag = lc_key
                .seal_in_place_separate_tag(lc_nonce(i), lc::Aad::from(&header), &mut buf)
                .ok();
            black_box((&buf, tag));
        });
        let lc_mac = time(&mut |i| {
            let tag = lc_key
                .seal_in_place_separate_tag(lc_nonce(i), lc::Aad::from(&src[..]), &mut [])
                .ok();
            black_box(tag);
        });
        let gbps = |ns: f64| size as f64 * 8.0 / ns;
        println!(
            "RESULT aead size={size} copy_ns={copy:.0} encrypt_ns={enc:.0} gmac_ns={mac:.0} poly1305_ns={poly:.0} awslc_encrypt_ns={lc_enc:.0} awslc_gmac_ns={lc_mac:.0} encrypt_gbps={:.2} gmac_gbps={:.2} poly1305_gbps={:.2} awslc_encrypt_gbps={:.2} awslc_gmac_gbps={:.2} copy_gbps={:.2}",
            gbps(enc),
            gbps(mac),
            gbps(poly),
            gbps(lc_enc),
            gbps(lc_mac),
            gbps(copy),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The engine alone.

fn engine_loop(a: &EngineLoopArgs) -> Result<()> {
    let id = serval::ServiceId::from_name(Mode::Bulk.service())
        .map_err(|e| format!("service name: {e:?}"))?;
    let mut config = serval::EndpointConfig::default();
    config.transport.max_udp_payload = a.max_udp_payload;
    let mut pair = engine_pair::Pair::new(config, id);
    let (c, s) = pair.connect(id)?;
    let pattern = Pattern::new(1);
    let chunk = a.chunk.clamp(1, MAX_CHUNK);
    let mut buf = vec![0u8; chunk];
    let (mut sent, mut received, mut finished) = (0u64, 0u64, false);
    let (d0, b0) = (pair.datagrams, pair.bytes);
    let t0 = Instant::now();
    while received < a.bytes {
        while sent < a.bytes {
            let n = ((a.bytes - sent) as usize).min(chunk);
            let w = pair.client.write(c, pattern.slice(sent, n))?;
            if w == 0 {
                break;
            }
            sent += w as u64;
        }
        if sent == a.bytes && !finished {
            pair.client.finish(c)?;
            finished = true;
        }
        pair.pump();
        while let Some(n) = pair.server.read(s, &mut buf)? {
            if n == 0 {
                break;
            }
            received += n as u64;
        }
        pair.drain_events();
    }
    let secs = t0.elapsed().as_secs_f64();
    let dg = [pair.datagrams[0] - d0[0], pair.datagrams[1] - d0[1]];
    let by = [pair.bytes[0] - b0[0], pair.bytes[1] - b0[1]];
    let st = pair
        .client
        .connection_stats(c)
        .ok_or("client connection gone")?;
    println!(
        "RESULT engine-loop bytes={} secs={secs:.6} gbps={:.4} data_datagrams={} avg_data_datagram={:.0} ack_datagrams={} avg_ack_datagram={:.0} ns_per_data_datagram={:.0} pmtu={} cwnd={} lost={} mtu_probes={} retransmitted={}",
        a.bytes,
        a.bytes as f64 * 8.0 / secs / 1e9,
        dg[0],
        by[0] as f64 / dg[0].max(1) as f64,
        dg[1],
        by[1] as f64 / dg[1].max(1) as f64,
        secs * 1e9 / dg[0].max(1) as f64,
        st.pmtu,
        st.cwnd,
        st.packets_lost,
        st.mtu_probes_sent,
        st.retransmitted_bytes,
    );
    Ok(())
}
