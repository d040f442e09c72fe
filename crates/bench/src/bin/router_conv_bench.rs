//! Register→routable convergence across three routers sharing one etcd, end to end (issue:
//! routers, item 9b), and the router's own share of a cold start (item 9c).
//!
//! **Convergence.** Starts an `etcd` (the binary on `PATH`, or `--etcd`) on free loopback
//! ports with a temporary data directory, and three `serval_router::Router`s (one process,
//! one tokio runtime with two worker threads) whose registry is that etcd. For each sample a
//! REGISTER for a new prefix (`c{i}.conv`) is sent over UDP to router A; the clock starts at
//! the send. The main thread then polls (every `--poll-us`) router B's and C's service tables
//! until both resolve the prefix to the sender's locator, and also notes when A's ACK
//! arrived. Reported: p50/p99/max of "routable at B and C" (the later of the two), of each
//! router alone, and of A's ACK.
//!
//! **Router share of a cold start** (`--cold N`): `N` registrations (distinct prefixes) are put into an
//! in-memory registry, then a router is bound on it and the time until its service table
//! holds all `N` entries is measured. This is what the router adds to the registry's own
//! connect (listing etcd), which `bench_convergence_and_cold_start` in
//! `crates/registry/tests/etcd.rs` measures.
//!
//! **Whole cold start from etcd** (`--cold-etcd N`): `N` registrations are written straight
//! into a fresh etcd (128 per transaction, 4 writers, one lease, keys as the registry writes
//! them), then `--cold-reps` times: `Registry::connect` (lists and decodes every page) and
//! `Router::bind` on it, timed until the router's service table holds all `N` entries.
//!
//! ```sh
//! cargo run --release -p serval-bench --bin router-conv-bench -- --samples 300 --cold 1000000
//! ```

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use serval_registry::{Registration, Registry};
use serval_router::{Policy, Router, RouterConfig};
use serval_table::Action;
use serval_wire::{Cookie, MessageType, RegistrationRepr, SalPacket, ServiceId, ServicePrefix};

/// Register→routable latency across 3 routers sharing etcd; router share of a cold start.
#[derive(Debug, Parser)]
struct Args {
    /// Registrations timed (one at a time).
    #[arg(long, default_value_t = 300)]
    samples: usize,
    /// Poll interval of the other routers' tables, in microseconds.
    #[arg(long, default_value_t = 100)]
    poll_us: u64,
    /// The etcd binary.
    #[arg(long, default_value = "etcd")]
    etcd: PathBuf,
    /// Registrations for the router's cold start from an in-memory registry (0: skip).
    #[arg(long, default_value_t = 0)]
    cold: usize,
    /// Repetitions of the cold start.
    #[arg(long, default_value_t = 3)]
    cold_reps: usize,
    /// Registrations preloaded into etcd for a whole router cold start from etcd (0: skip).
    #[arg(long, default_value_t = 0)]
    cold_etcd: usize,
    /// Skip the convergence measurement.
    #[arg(long)]
    no_convergence: bool,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("router-conv-bench: {e}");
        std::process::exit(1);
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// An etcd child process, killed (and its data removed) on drop.
struct Etcd {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Etcd {
    fn start(bin: &PathBuf) -> Result<Etcd> {
        let (port, peer) = (free_port()?, free_port()?);
        let dir = std::env::temp_dir().join(format!("router-conv-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let client = format!("http://127.0.0.1:{port}");
        let peer = format!("http://127.0.0.1:{peer}");
        let child = Command::new(bin)
            .args(["--name", "bench", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("bench={peer}")])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log"))?)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        Ok(Etcd { child, dir, port })
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "| {name} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
        v.len(),
        ms(v[0]),
        ms(percentile(&v, 0.5)),
        ms(percentile(&v, 0.99)),
        ms(v[v.len() - 1]),
    );
}

fn run(args: &Args) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if !args.no_convergence {
        convergence(&rt, args)?;
    }
    if args.cold > 0 {
        cold(&rt, args)?;
    }
    if args.cold_etcd > 0 {
        cold_etcd(&rt, args)?;
    }
    Ok(())
}

fn convergence(rt: &tokio::runtime::Runtime, args: &Args) -> Result<()> {
    let etcd = Etcd::start(&args.etcd)?;
    let url = format!("etcd://127.0.0.1:{}/conv", etcd.port);
    let t0 = Instant::now();
    let mut routers = Vec::new();
    for _ in 0..3 {
        let registry = loop {
            match rt.block_on(Registry::connect(&url)) {
                Ok(r) => break r,
                Err(e) if t0.elapsed() < Duration::from_secs(30) => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(format!("etcd not ready: {e}").into()),
            }
        };
        let mut config = RouterConfig::new(vec!["127.0.0.1:0".parse()?]);
        config.registry = registry;
        config.policy = Policy {
            max_ttl: Duration::from_secs(3600),
            ..Policy::default()
        };
        routers.push(rt.block_on(Router::bind(config))?);
    }
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    let me: SocketAddr = sock.local_addr()?;
    sock.connect(routers[0].locators()[0])?;
    sock.set_nonblocking(true)?;
    let poll = Duration::from_micros(args.poll_us);
    let (mut both, mut at_b, mut at_c, mut acked) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut buf = [0u8; 2048];
    // A few unmeasured ones first (connections to etcd warm, lazily built state exists).
    for i in 0..args.samples + 10 {
        let prefix = ServicePrefix::from_domain(&format!("c{i}.conv"))?;
        let request =
            RegistrationRepr::register(i as u32, 1000 + i as u64, prefix, 1, 0, 3_600_000);
        // The router's cookie first (a round trip that stores nothing), outside the timing.
        let request = request.with_cookie(cookie_for(&sock, &request, &mut buf)?);
        let routable = |r: &Router| {
            r.table()
                .get(&prefix)
                .is_some_and(|t| t.iter().any(|t| t.action == Action::Forward(me)))
        };
        let t0 = Instant::now();
        sock.send(&request.to_packet())?;
        let (mut b, mut c, mut a) = (None, None, None);
        while b.is_none() || c.is_none() || a.is_none() {
            if t0.elapsed() > Duration::from_secs(10) {
                return Err(format!("sample {i}: not routable after 10 s").into());
            }
            if let (None, Ok(len)) = (a, sock.recv(&mut buf)) {
                let answer = SalPacket::new_checked(&buf[..len])
                    .ok()
                    .and_then(|p| RegistrationRepr::parse_packet(&p).ok());
                if let Some(answer) = answer.filter(|x| request.is_answered_by(x)) {
                    if answer.ty != MessageType::Ack {
                        return Err(format!("sample {i}: answered {}", answer.ty).into());
                    }
                    a = Some(t0.elapsed());
                }
            }
            if b.is_none() && routable(&routers[1]) {
                b = Some(t0.elapsed());
            }
            if c.is_none() && routable(&routers[2]) {
                c = Some(t0.elapsed());
            }
            std::thread::sleep(poll);
        }
        if let (true, Some(b), Some(c), Some(a)) = (i >= 10, b, c, a) {
            both.push(b.max(c));
            at_b.push(b);
            at_c.push(c);
            acked.push(a);
        }
    }
    println!(
        "| register→routable (REGISTER to router A, etcd {}) | samples | min | p50 | p99 | max |",
        etcd_version(&args.etcd)
    );
    println!("|---|---:|---:|---:|---:|---:|");
    summary("routable at both B and C", both);
    summary("routable at B", at_b);
    summary("routable at C", at_c);
    summary("ACK from A received", acked);
    for r in &routers {
        let s = r.stats();
        if s.registrations_rejected() != 0 || s.requests_dropped != 0 {
            eprintln!(
                "warning: {} rejected, {} dropped",
                s.registrations_rejected(),
                s.requests_dropped
            );
        }
    }
    drop(routers);
    drop(etcd);
    Ok(())
}

fn etcd_version(bin: &PathBuf) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.trim_start_matches("etcd Version: ").to_owned())
        })
        .unwrap_or_default()
}

/// The prefix of cold-start registration `i`: shaped like a two-label name's (32 bits per
/// label, length 64), the first label's bits a bijective mix of `i` (murmur3's finaliser).
/// Hashed names would do, but a million of them collide ~100 times in 32 bits, and colliding
/// prefixes share one table entry, so the table would never reach `N` entries.
fn cold_prefix(i: u32) -> ServicePrefix {
    let mut h = i.wrapping_add(1);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    ServicePrefix::new(
        ServiceId::from_words([0x636f_6c64_u64 << 32 | u64::from(h), 0, 0, 0]),
        64,
    )
}

fn cold(rt: &tokio::runtime::Runtime, args: &Args) -> Result<()> {
    let n = args.cold;
    let mut took = Vec::new();
    for rep in 0..args.cold_reps {
        let registry = Registry::memory();
        let t0 = Instant::now();
        rt.block_on(async {
            for i in 0..n as u32 {
                registry
                    .put(
                        Registration {
                            prefix: cold_prefix(i),
                            locator: SocketAddr::from((
                                [10, (i >> 16) as u8, (i >> 8) as u8, i as u8],
                                5000,
                            )),
                            weight: 1,
                            priority: 0,
                        },
                        Duration::from_secs(3600),
                    )
                    .await?;
            }
            Ok::<_, BoxError>(())
        })?;
        let loaded = t0.elapsed();
        let mut config = RouterConfig::new(vec!["127.0.0.1:0".parse()?]);
        config.registry = registry;
        config.policy = Policy {
            max_ttl: Duration::from_secs(3600),
            max_registrations: 2 * n,
            ..Policy::default()
        };
        let t0 = Instant::now();
        let router = rt.block_on(Router::bind(config))?;
        let bound = t0.elapsed();
        while router.table().len() < n {
            if t0.elapsed() > Duration::from_secs(120) {
                return Err("cold start: table not filled after 120 s".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let filled = t0.elapsed();
        eprintln!(
            "cold rep {}: {n} registrations loaded in {:.2} s; bind {:.3} s; table full after {:.3} s",
            rep + 1,
            loaded.as_secs_f64(),
            bound.as_secs_f64(),
            filled.as_secs_f64()
        );
        took.push(filled);
        drop(router);
    }
    took.sort();
    println!(
        "router cold start from a {n}-registration replica (bind → table full): median {:.3} s, \
         min–max {:.3}–{:.3} s",
        took[took.len() / 2].as_secs_f64(),
        took[0].as_secs_f64(),
        took[took.len() - 1].as_secs_f64()
    );
    Ok(())
}

/// A router's whole cold start: registry connect to an etcd holding `n` registrations, then
/// bind, until its table is full.
fn cold_etcd(rt: &tokio::runtime::Runtime, args: &Args) -> Result<()> {
    let n = args.cold_etcd;
    let etcd = Etcd::start(&args.etcd)?;
    let endpoint = format!("http://127.0.0.1:{}", etcd.port);
    let url = format!("etcd://127.0.0.1:{}/cold", etcd.port);
    let t0 = Instant::now();
    rt.block_on(async {
        let client = loop {
            let c = serval_etcd::Client::connect_lazy(&endpoint, &Default::default())?;
            if c.status().await.is_ok() {
                break c;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                return Err::<(), BoxError>("etcd not ready".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let lease = client.lease_grant(24 * 3600).await?.id;
        let per = n.div_ceil(4);
        let mut writers = Vec::new();
        for part in 0..4 {
            let c = client.clone();
            writers.push(tokio::spawn(async move {
                let (lo, hi) = (part * per, ((part + 1) * per).min(n));
                for chunk in (lo..hi).collect::<Vec<_>>().chunks(128) {
                    let ops: Vec<serval_etcd::pb::RequestOp> = chunk
                        .iter()
                        .map(|&i| {
                            let i = i as u32;
                            let locator = SocketAddr::from((
                                [10, (i >> 16) as u8, (i >> 8) as u8, i as u8],
                                5000,
                            ));
                            serval_etcd::pb::RequestOp::put(
                                format!("/cold/v1/reg/{}/{locator}", cold_prefix(i)),
                                "v1 w=1 p=0 ttl=86400",
                                lease,
                            )
                        })
                        .collect();
                    let txn = serval_etcd::pb::TxnRequest {
                        success: ops,
                        ..Default::default()
                    };
                    c.txn(txn).await?;
                }
                Ok::<(), serval_etcd::Error>(())
            }));
        }
        for w in writers {
            w.await??;
        }
        Ok(())
    })?;
    eprintln!(
        "preloaded {n} registrations into etcd in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    cold_starts(rt, n, args.cold_reps, "from etcd", &|| {
        Ok(rt.block_on(Registry::connect(&url))?)
    })?;
    // With a cache file: one start lists and saves it, then each start loads it and catches
    // up by watching etcd from its revision (nothing changed meanwhile here: the best case
    // for the watch, the same list-free path as after a restart in a quiet cluster).
    let dir = std::env::temp_dir().join(format!("serval-cold-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut config = serval_registry::EtcdConfig::from_url(&url)?;
    config.cache = Some(dir.join("replica.cache"));
    {
        let priming = rt.block_on(Registry::etcd(config.clone()))?;
        let t0 = Instant::now();
        while !dir.join("replica.cache").exists() {
            if t0.elapsed() > Duration::from_secs(120) {
                return Err("the registry cache was not saved within 120 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(priming);
    }
    cold_starts(rt, n, args.cold_reps, "from the cache file", &|| {
        Ok(rt.block_on(Registry::etcd(config.clone()))?)
    })?;
    let _ = std::fs::remove_dir_all(&dir);
    drop(etcd);
    Ok(())
}

/// Times `reps` cold starts of a router on the registry `connect` opens (connect → table holds
/// `n`), printing each and the median.
fn cold_starts(
    rt: &tokio::runtime::Runtime,
    n: usize,
    reps: usize,
    what: &str,
    connect: &dyn Fn() -> Result<Registry>,
) -> Result<()> {
    let mut totals = Vec::new();
    for rep in 0..reps {
        let t0 = Instant::now();
        let registry = connect()?;
        let connected = t0.elapsed();
        let mut config = RouterConfig::new(vec!["127.0.0.1:0".parse()?]);
        config.registry = registry;
        config.policy = Policy {
            max_ttl: Duration::from_secs(3600),
            max_registrations: 2 * n,
            ..Policy::default()
        };
        let router = rt.block_on(Router::bind(config))?;
        while router.table().len() < n {
            if t0.elapsed() > Duration::from_secs(300) {
                return Err(format!("cold start {what}: table not filled after 300 s").into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let total = t0.elapsed();
        eprintln!(
            "cold start {what} #{}: registry connect {:.2} s, then table full after {:.2} s, \
             total {:.2} s",
            rep + 1,
            connected.as_secs_f64(),
            (total - connected).as_secs_f64(),
            total.as_secs_f64()
        );
        totals.push(total);
        drop(router);
    }
    totals.sort();
    println!(
        "router cold start {what} with {n} registrations (connect → table full): median \
         {:.2} s, min–max {:.2}–{:.2} s",
        totals[totals.len() / 2].as_secs_f64(),
        totals[0].as_secs_f64(),
        totals[totals.len() - 1].as_secs_f64()
    );
    Ok(())
}

/// Asks the router for the cookie of `request` (sent with an empty one) and returns it.
fn cookie_for(
    sock: &std::net::UdpSocket,
    request: &RegistrationRepr,
    buf: &mut [u8],
) -> Result<Cookie> {
    let first = request.with_cookie(Cookie::EMPTY);
    let t0 = Instant::now();
    sock.send(&first.to_packet())?;
    while t0.elapsed() < Duration::from_secs(10) {
        if let Ok(len) = sock.recv(buf) {
            let answer = SalPacket::new_checked(&buf[..len])
                .ok()
                .and_then(|p| RegistrationRepr::parse_packet(&p).ok());
            if let Some(a) = answer.filter(|x| first.is_answered_by(x)) {
                return match (a.ty, a.cookie) {
                    (MessageType::Cookie, Some(c)) => Ok(c),
                    (ty, _) => Err(format!("the cookie request was answered {ty}").into()),
                };
            }
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    Err("no cookie from the router within 10 s".into())
}
