//! Heap memory per registration held by a service router (issue: routers, item 9d).
//!
//! Three measurements, each the growth of live heap bytes (counted by a wrapping global
//! allocator, `stats_alloc`, as in `conn-mem-bench`) divided by the number of registrations:
//!
//! * **router**: a real `serval_router::Router` (in-memory registry, default workers and
//!   queues) on loopback. REGISTER packets built with `serval_wire` are sent to it over UDP
//!   from one socket, each for a distinct service prefix (shaped like a two-label name's, see `prefix`) with its own instance
//!   token, at most `--window` unanswered at a time (lost ones are sent again). The count is
//!   taken once every request was ACKed, `router.stats()` reports all of them created, and
//!   `--settle-ms` passed. This is everything the router keeps: service table, registry
//!   replica, the router's own bookkeeping (installed set, instance map) and the endpoint's.
//! * **table**: a `ServiceTable` alone, given the same prefixes with one FORWARD target each,
//!   one `add_target` per registration (as the router does).
//! * **registry**: a `Registry::memory()` alone, given the same registrations with `put`.
//!
//! Before the baseline of the router measurement, `--warmup` registrations (other prefixes)
//! are made so lazily built state exists; they are not counted. Kernel memory (socket
//! buffers) is not counted.
//!
//! ```sh
//! cargo run --release -p serval-bench --bin reg-mem-bench -- --regs 100000,1000000
//! ```

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use serval_registry::{Registration, Registry};
use serval_router::{Policy, Router, RouterConfig};
use serval_table::{Action, ServiceTable, Target};
use serval_wire::{Cookie, MessageType, RegistrationRepr, SalPacket, ServiceId, ServicePrefix};

#[path = "../heap.rs"]
mod heap;
use heap::live_heap;

/// Heap bytes per registration: whole router, service table alone, registry alone.
#[derive(Debug, Parser)]
struct Args {
    /// Registration counts to measure (each in a fresh router).
    #[arg(long, value_delimiter = ',', default_value = "100000")]
    regs: Vec<usize>,
    /// What to measure.
    #[arg(long, value_delimiter = ',', default_value = "router,table,registry")]
    parts: Vec<Part>,
    /// REGISTERs sent and not yet answered, at most.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Registrations made before the baseline (not counted).
    #[arg(long, default_value_t = 1000)]
    warmup: usize,
    /// Wait after the last registration before counting, in milliseconds.
    #[arg(long, default_value_t = 500)]
    settle_ms: u64,
    /// Repetitions per count and part.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// The table part uses `ServiceTable::with_anchor_index` (issue 14's opt-in anchor index).
    #[arg(long)]
    anchor_index: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    Router,
    Table,
    Registry,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

/// The prefix of registration `i` under `suffix`: shaped like the prefix of a two-label name
/// `LABEL.SUFFIX` (`ServicePrefix::from_domain`: 32 bits per label, length 64), with the
/// first label's 32 bits a bijective mix of `i`, so no two registrations share a prefix
/// (hashed names of a million services would collide ~100 times in 32 bits).
fn prefix(suffix: u32, i: usize) -> ServicePrefix {
    ServicePrefix::new(
        ServiceId::from_words([
            u64::from(suffix) << 32 | u64::from(mix32(i as u32 + 1)),
            0,
            0,
            0,
        ]),
        64,
    )
}

/// murmur3's finaliser: a bijection of `u32` that spreads consecutive numbers.
fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Suffixes of the measured registrations and of the warm-up's.
const BENCH: u32 = 0x6265_6e63;
const WARM: u32 = 0x7761_726d;

/// Long enough that nothing expires during a run.
const TTL: Duration = Duration::from_secs(24 * 3600);

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("reg-mem-bench: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    println!(
        "| part | registrations | heap bytes/registration (median) | min–max | time to register (median) |"
    );
    println!("|---|---:|---:|---:|---:|");
    for &n in &args.regs {
        for &part in &args.parts {
            let mut per = Vec::new();
            let mut took = Vec::new();
            for rep in 0..args.reps {
                let (bytes, t) = match part {
                    Part::Router => router(n, args)?,
                    Part::Table => table(n, args.anchor_index),
                    Part::Registry => registry(n)?,
                };
                let b = bytes as f64 / n as f64;
                eprintln!(
                    "{part:?} n={n} rep {}: {b:.1} B/registration, {:.2} s",
                    rep + 1,
                    t.as_secs_f64()
                );
                per.push(b);
                took.push(t);
            }
            per.sort_by(f64::total_cmp);
            took.sort();
            println!(
                "| {part:?} | {n} | {:.0} | {:.0}–{:.0} | {:.2} s |",
                per[per.len() / 2],
                per[0],
                per[per.len() - 1],
                took[took.len() / 2].as_secs_f64()
            );
        }
    }
    Ok(())
}

/// The service table alone: one FORWARD target per prefix, added one at a time.
fn table(n: usize, anchor_index: bool) -> (i64, Duration) {
    let locator = SocketAddr::from(([127, 0, 0, 1], 40000));
    let before = live_heap();
    let t0 = Instant::now();
    let table = if anchor_index {
        ServiceTable::with_anchor_index()
    } else {
        ServiceTable::new()
    };
    for i in 0..n {
        table
            .add_target(
                prefix(BENCH, i),
                Target::new(Action::Forward(locator), 0, 1),
            )
            .expect("valid target");
    }
    let took = t0.elapsed();
    assert_eq!(table.snapshot().len(), n);
    let grown = live_heap() - before;
    drop(table);
    (grown, took)
}

/// The in-memory registry alone: `n` puts.
fn registry(n: usize) -> Result<(i64, Duration)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let locator = SocketAddr::from(([127, 0, 0, 1], 40000));
    rt.block_on(async {
        let before = live_heap();
        let t0 = Instant::now();
        let reg = Registry::memory();
        for i in 0..n {
            reg.put(
                Registration {
                    prefix: prefix(BENCH, i),
                    locator,
                    weight: 1,
                    priority: 0,
                },
                TTL,
            )
            .await?;
        }
        let took = t0.elapsed();
        assert_eq!(reg.snapshot().len(), n);
        let grown = live_heap() - before;
        drop(reg);
        Ok((grown, took))
    })
}

/// A whole router, registered with over UDP.
fn router(n: usize, args: &Args) -> Result<(i64, Duration)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut config = RouterConfig::new(vec!["127.0.0.1:0".parse()?]);
    config.policy = Policy {
        max_ttl: TTL,
        max_registrations: 4 * (n + args.warmup),
        ..Policy::default()
    };
    let router = rt.block_on(Router::bind(config))?;
    let to = router.locators()[0];
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.connect(to)?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    // Everything the sender needs is allocated before the baseline.
    let mut acked = vec![false; n.max(args.warmup)];
    register(&sock, WARM, args.warmup, 1 << 40, args.window, &mut acked)?;
    wait_for(&router, args.warmup as u64)?;
    acked.iter_mut().for_each(|a| *a = false);
    std::thread::sleep(Duration::from_millis(args.settle_ms));
    let before = live_heap();
    let t0 = Instant::now();
    register(&sock, BENCH, n, 1 << 41, args.window, &mut acked)?;
    wait_for(&router, (args.warmup + n) as u64)?;
    let took = t0.elapsed();
    std::thread::sleep(Duration::from_millis(args.settle_ms));
    let grown = live_heap() - before;
    let stats = router.stats();
    if stats.registrations_rejected() != 0 || stats.requests_dropped != 0 {
        eprintln!(
            "  warning: {} rejected, {} requests dropped (resent)",
            stats.registrations_rejected(),
            stats.requests_dropped
        );
    }
    if router.table().len() < n + args.warmup {
        return Err(format!("table holds {} entries", router.table().len()).into());
    }
    drop(router);
    drop(rt);
    Ok((grown, took))
}

/// Waits until the router holds `total` registrations.
fn wait_for(router: &Router, total: u64) -> Result<()> {
    let t0 = Instant::now();
    while router.stats().registrations < total || router.stats().registrations_created < total {
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "router holds {} of {total} registrations",
                router.stats().registrations
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Sends REGISTERs `0..n` for prefixes `prefix(suffix, i)` (instance tokens `instance_base + i`),
/// keeping at most `window` unanswered, until each was ACKed.
fn register(
    sock: &UdpSocket,
    suffix: u32,
    n: usize,
    instance_base: u64,
    window: usize,
    acked: &mut [bool],
) -> Result<()> {
    // The router hands each (locator, instance, prefix) a cookie before it stores anything:
    // the first request goes with an empty one, the COOKIE answer's goes with the next.
    let mut cookies = vec![Cookie::EMPTY; n];
    let request = |i: usize, cookie: Cookie| {
        RegistrationRepr::register(
            i as u32,
            instance_base + i as u64,
            prefix(suffix, i),
            1,
            0,
            TTL.as_millis() as u32,
        )
        .with_cookie(cookie)
    };
    let (mut next, mut low, mut done) = (0usize, 0usize, 0usize);
    let mut buf = [0u8; 2048];
    let mut last_progress = Instant::now();
    while done < n {
        while next < n && next - done < window {
            sock.send(&request(next, cookies[next]).to_packet())?;
            next += 1;
        }
        match sock.recv(&mut buf) {
            Ok(len) => {
                let Ok(packet) = SalPacket::new_checked(&buf[..len]) else {
                    continue;
                };
                let Ok(answer) = RegistrationRepr::parse_packet(&packet) else {
                    continue;
                };
                let i = answer.request_id as usize;
                if i < n && answer.instance == instance_base + i as u64 && !acked[i] {
                    if answer.ty == MessageType::Cookie {
                        cookies[i] = answer.cookie.unwrap_or(Cookie::EMPTY);
                        sock.send(&request(i, cookies[i]).to_packet())?;
                        continue;
                    }
                    if answer.ty != MessageType::Ack {
                        return Err(format!("request {i} answered {}", answer.ty).into());
                    }
                    acked[i] = true;
                    done += 1;
                    last_progress = Instant::now();
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if last_progress.elapsed() > Duration::from_secs(30) {
                    return Err(format!("stalled at {done} of {n}").into());
                }
                // Send the unanswered ones again.
                while low < next && acked[low] {
                    low += 1;
                }
                for (i, a) in acked.iter().enumerate().take(next).skip(low) {
                    if !a {
                        sock.send(&request(i, cookies[i]).to_packet())?;
                    }
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
