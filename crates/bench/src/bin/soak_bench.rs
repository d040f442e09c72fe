//! Churn soak (issue 13, item 4): many short connections, and every serving process's
//! memory sampled as they go. A process whose resident set keeps growing with the number of
//! connections it has served (maps keyed by old flows, TIME-WAIT entries never freed, slabs
//! that never shrink, allocator fragmentation) shows up here long before it hurts.
//!
//! Starts a `serval router`, a `serval listen --echo` registered with it, and the translator
//! pair (`serval expose` in front of a TCP echo server inside this process, `serval proxy` in
//! front of that), then runs two phases of `--count` connections each, started at a steady
//! `--rate` per second, at most `--concurrency` at a time:
//!
//! * **router**: a Serval client endpoint in this process connects by name through the router
//!   to the echo listener, writes `--payload` bytes, half-closes, reads them back to the
//!   listener's FIN, and drops the stream;
//! * **translator**: a TCP client connects to the proxy (→ expose → echo server), the same
//!   exchange over TCP.
//!
//! Every `--count / --samples` connections the `VmRSS` of every serval process is read from
//! `/proc/PID/status`. After the first `--warmup` share of each phase (and at least
//! `--warmup-secs`), the RSS is expected to stay within `--tolerance` (5%) of its value at
//! that point; the report says, per process,
//! the RSS at warm-up, at the end and the largest in between, and whether it held. Then
//! everything idles for `--idle` seconds and is sampled once more.
//!
//! ```sh
//! cargo build --release -p serval-cli -p serval-bench --bins
//! target/release/soak-bench --serval target/release/serval --count 1000000
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use serval::{Endpoint, ServiceId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[path = "../procs.rs"]
mod procs;
use procs::{Proc, Result, serval_ready};

/// Short connections through a router and through the translator, with every process's RSS.
#[derive(Debug, Parser)]
struct Args {
    /// The serval binary (build it with `cargo build --release -p serval-cli`).
    #[arg(long, default_value = "target/release/serval")]
    serval: PathBuf,
    /// Connections per phase.
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Connections open at once (at most).
    #[arg(long, default_value_t = 16)]
    concurrency: u64,
    /// New connections per second, at most (0: as fast as they complete). A steady rate keeps
    /// the number of flows in TIME-WAIT steady, so what remains is growth; after a stall the
    /// rate does not burst to catch up.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Bytes each connection sends and reads back.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// RSS samples per phase.
    #[arg(long, default_value_t = 20)]
    samples: u64,
    /// Share of each phase before the RSS is expected to level off.
    #[arg(long, default_value_t = 0.1)]
    warmup: f64,
    /// And at least this many seconds of it: the flows in TIME-WAIT (3 s) and the registrar's
    /// refreshes reach their steady number only after a few seconds at full rate.
    #[arg(long, default_value_t = 10.0)]
    warmup_secs: f64,
    /// Allowed growth after warm-up, as a fraction (0.05: 5%).
    #[arg(long, default_value_t = 0.05)]
    tolerance: f64,
    /// Seconds to idle after both phases before the last sample.
    #[arg(long, default_value_t = 30)]
    idle: u64,
    /// Only this phase (`router` or `translator`); both by default.
    #[arg(long)]
    only: Option<String>,
}

fn main() {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("soak-bench: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(&args)) {
        eprintln!("soak-bench: {e}");
        std::process::exit(1);
    }
}

/// One RSS reading of every watched process, after `done` connections of a phase.
#[derive(Debug, Clone)]
struct Sample {
    done: u64,
    secs: f64,
    rss: Vec<u64>,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// A UDP port free right now on 127.0.0.1.
fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn run(args: &Args) -> Result<()> {
    procs::require_serval(&args.serval)?;
    let root = procs::Scratch::new("soak-bench")?;
    run_in(args, root.path()).await
}

async fn run_in(args: &Args, root: &std::path::Path) -> Result<()> {
    let s = &args.serval;
    let (router, raddr) = serval_ready(
        s,
        "router",
        &["router", "--listen", "127.0.0.1:0"],
        &root.join("router.log"),
    )?;
    let router_loc: SocketAddr = raddr
        .split_whitespace()
        .next()
        .ok_or("router: empty READY line")?
        .parse()?;

    // The echo listener prints no READY line: give it a port, then wait until it answers.
    // Its service is given as the hex ID this process connects to, so that a serval binary
    // of another version (another name mapping) can be measured too.
    let echo_id = ServiceId::from_name("soak.echo")?;
    let echo_hex = echo_id.to_string();
    let lport = free_udp_port()?;
    let listener = Proc::spawn(
        "listener",
        Command::new(s)
            .args(["listen", &echo_hex, "--echo", "--router", &raddr])
            .arg("--bind")
            .arg(format!("127.0.0.1:{lport}"))
            .stdout(Stdio::null()),
        &root.join("listener.log"),
    )?;

    // The translator: a TCP echo server here, an expose in front of it, a proxy in front.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let echo_addr = echo.local_addr()?;
    tokio::spawn(tcp_echo(echo));
    let (expose, _) = serval_ready(
        s,
        "expose",
        &[
            "expose",
            "soak.tcp",
            "--to",
            &echo_addr.to_string(),
            "--router",
            &raddr,
            "--bind",
            "127.0.0.1:0",
        ],
        &root.join("expose.log"),
    )?;
    let (proxy, paddr) = serval_ready(
        s,
        "proxy",
        &[
            "proxy",
            "soak.tcp",
            "--listen",
            "127.0.0.1:0",
            "--router",
            &raddr,
            "--bind",
            "127.0.0.1:0",
        ],
        &root.join("proxy.log"),
    )?;
    let proxy_addr: SocketAddr = paddr.parse()?;

    let procs = [&router, &listener, &expose, &proxy];
    let client = Endpoint::bind(&["127.0.0.1:0".parse()?]).await?;
    // Wait for both registrations (each a connection that must succeed).
    let ready_by = Instant::now() + Duration::from_secs(20);
    loop {
        let a = serval_once(&client, echo_id, router_loc, args.payload).await;
        let b = tcp_once(proxy_addr, args.payload).await;
        if a.is_ok() && b.is_ok() {
            break;
        }
        if Instant::now() > ready_by {
            return Err(format!("services not reachable within 20 s: {a:?} {b:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    println!(
        "# soak-bench: {} connections per phase, {} at a time, {}, {} B each way; RSS (MiB) of {}",
        args.count,
        args.concurrency,
        if args.rate > 0 {
            format!("{} new per second", args.rate)
        } else {
            "as fast as they complete".to_owned()
        },
        args.payload,
        procs
            .iter()
            .map(|p| format!("{} (pid {})", p.name, p.pid()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let start_rss: Vec<u64> = procs.iter().map(|p| p.rss().unwrap_or(0)).collect();
    println!(
        "start: {}",
        start_rss
            .iter()
            .zip(&procs)
            .map(|(r, p)| format!("{} {:.1}", p.name, mib(*r)))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let mut verdicts = Vec::new();
    for phase in ["router", "translator"] {
        if args.only.as_deref().is_some_and(|o| o != phase) {
            continue;
        }
        let samples = run_phase(
            args, phase, &procs, &client, echo_id, router_loc, proxy_addr,
        )
        .await?;
        verdicts.push((phase, samples));
    }

    println!();
    println!(
        "| phase | process | RSS at start (MiB) | at warm-up | at end | largest after warm-up | growth after warm-up | within {:.0}% |",
        args.tolerance * 100.0
    );
    println!("|---|---|---:|---:|---:|---:|---:|---|");
    let mut all_held = true;
    for (phase, samples) in &verdicts {
        let warm_at = ((args.count as f64 * args.warmup) as u64).max(1);
        let Some(warm) = samples
            .iter()
            .find(|s| s.done >= warm_at && s.secs >= args.warmup_secs)
        else {
            println!("| {phase} | (all) | | | | | | phase shorter than the warm-up: no verdict |");
            all_held = false;
            continue;
        };
        let Some(end) = samples.last() else { continue };
        for (i, p) in procs.iter().enumerate() {
            let largest = samples
                .iter()
                .filter(|s| s.done >= warm.done)
                .map(|s| s.rss[i])
                .max()
                .unwrap_or(0);
            let growth = largest as f64 / warm.rss[i].max(1) as f64 - 1.0;
            let held = growth <= args.tolerance;
            all_held &= held;
            println!(
                "| {phase} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:+.1}% | {} |",
                p.name,
                mib(samples[0].rss[i]),
                mib(warm.rss[i]),
                mib(end.rss[i]),
                mib(largest),
                growth * 100.0,
                if held { "yes" } else { "NO" }
            );
        }
    }
    if args.idle > 0 {
        tokio::time::sleep(Duration::from_secs(args.idle)).await;
        println!(
            "after {} s idle: {}",
            args.idle,
            procs
                .iter()
                .map(|p| format!("{} {:.1}", p.name, mib(p.rss().unwrap_or(0))))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!(
        "verdict: {}",
        if all_held {
            "every process stayed within the tolerance after warm-up"
        } else {
            "some process grew beyond the tolerance after warm-up"
        }
    );
    Ok(())
}

/// Runs one phase, sampling RSS as it goes; prints each sample.
async fn run_phase(
    args: &Args,
    phase: &str,
    procs: &[&Proc],
    client: &Endpoint,
    echo_id: ServiceId,
    router: SocketAddr,
    proxy: SocketAddr,
) -> Result<Vec<Sample>> {
    let started = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    let next_start = Arc::new(std::sync::Mutex::new(tokio::time::Instant::now()));
    for _ in 0..args.concurrency {
        let (started, done, failed) = (started.clone(), done.clone(), failed.clone());
        let (client, count, payload) = (client.clone(), args.count, args.payload);
        let translator = phase == "translator";
        let (rate, next) = (args.rate, next_start.clone());
        workers.spawn(async move {
            loop {
                let n = started.fetch_add(1, Ordering::Relaxed);
                if n >= count {
                    break;
                }
                if rate > 0 {
                    // Each start takes the next slot of the schedule, but never one in the
                    // past: after a stall (a busy machine) the rate does not burst to catch
                    // up, so the number of flows in TIME-WAIT never exceeds `rate × 3 s`.
                    let at = {
                        let mut next = next.lock().unwrap_or_else(|e| e.into_inner());
                        let at = (*next).max(tokio::time::Instant::now());
                        *next = at + Duration::from_secs_f64(1.0 / rate as f64);
                        at
                    };
                    tokio::time::sleep_until(at).await;
                }
                let r = if translator {
                    tcp_once(proxy, payload).await
                } else {
                    serval_once(&client, echo_id, router, payload).await
                };
                if r.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let step = (args.count / args.samples.max(1)).max(1);
    let t = Instant::now();
    let mut samples = Vec::new();
    let mut next = 0u64;
    let mut last_print = (0u64, 0.0f64);
    loop {
        let d = done.load(Ordering::Relaxed);
        if d >= next || d >= args.count {
            let secs = t.elapsed().as_secs_f64();
            let rss: Vec<u64> = procs.iter().map(|p| p.rss().unwrap_or(0)).collect();
            let rate = (d - last_print.0) as f64 / (secs - last_print.1).max(1e-9);
            println!(
                "{phase:10} {d:>9} conns {secs:>7.1} s {rate:>7.0}/s failed {:>5}  RSS MiB: {}",
                failed.load(Ordering::Relaxed),
                rss.iter()
                    .zip(procs)
                    .map(|(r, p)| format!("{} {:.1}", p.name, mib(*r)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            last_print = (d, secs);
            samples.push(Sample { done: d, secs, rss });
            next = (d / step + 1) * step;
            if d >= args.count {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while workers.join_next().await.is_some() {}
    let f = failed.load(Ordering::Relaxed);
    let secs = samples.last().map_or(0.0, |s| s.secs);
    println!(
        "{phase}: {} connections in {secs:.1} s ({:.0}/s), {f} failed",
        args.count,
        args.count as f64 / secs.max(1e-9)
    );
    Ok(samples)
}

/// One connection by name through the router: payload out, echo back, both FINs.
async fn serval_once(
    ep: &Endpoint,
    id: ServiceId,
    router: SocketAddr,
    payload: usize,
) -> std::io::Result<()> {
    within_10s(async { echo_exchange(ep.connect_via(id, router).await?, payload).await }).await
}

/// One TCP connection through the translator: the same exchange.
async fn tcp_once(proxy: SocketAddr, payload: usize) -> std::io::Result<()> {
    within_10s(async { echo_exchange(tokio::net::TcpStream::connect(proxy).await?, payload).await })
        .await
}

/// Writes `payload` bytes, half-closes, and checks that exactly they come back.
async fn echo_exchange(
    mut s: impl AsyncRead + AsyncWrite + Unpin,
    payload: usize,
) -> std::io::Result<()> {
    let data = vec![0x5a; payload];
    s.write_all(&data).await?;
    s.shutdown().await?;
    let mut back = Vec::with_capacity(payload);
    s.read_to_end(&mut back).await?;
    if back != data {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}

/// `exchange`, failed as timed out if it takes over 10 s.
async fn within_10s(
    exchange: impl std::future::Future<Output = std::io::Result<()>>,
) -> std::io::Result<()> {
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// The translator's TCP backend: echoes each connection until its FIN, then closes.
async fn tcp_echo(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}
