//! How fast one Serval router forwards SYNs by name, beside the kernel's own connection-accept
//! rate on the same machine.
//!
//! * `engine`: the sans-IO engine alone, in one thread: pre-built SYNs for random services of a
//!   table with `--services` entries (three weighted targets each) are fed to a router endpoint
//!   and the forwarded datagrams drained into one reused buffer. No system calls: the protocol's
//!   own cost per SYN.
//! * `udp`: a real router (`serval::Endpoint`, tokio current-thread runtime, batched UDP with
//!   GSO/GRO) on loopback, fed by a blaster thread sending the same SYNs in GSO batches;
//!   forwarded SYNs are counted at three sink sockets. The router thread's CPU time is read
//!   from `/proc/thread-self/stat`, so the rate is reported both per wall-clock second and per
//!   second of router CPU (SYN/s per core).
//! * `tcp-accept`: the reference: a tokio `TcpListener` on loopback accepting connections that a
//!   client thread opens and resets (linger 0, so no TIME-WAIT exhausts the ports), with the
//!   accepting thread's CPU time read the same way.
//!
//! `syn-bench all` runs the three and prints a markdown table.

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant as StdInstant};

use clap::{Parser, Subcommand};
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use serval_engine::Instant;
use serval_engine::endpoint::{Datagram, Endpoint, EndpointConfig};
use serval_table::{Action, ServiceTable, Target};
use serval_wire::ext::{ControlFlags, ControlRepr, ServiceRepr};
use serval_wire::{FlowId, Locator, Nonce, Protocol, SalRepr, ServiceId, ServicePrefix};

#[derive(Parser)]
#[command(about = "SYN forwarding rate of one Serval router vs the kernel's TCP accept rate")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The sans-IO engine alone.
    Engine(Common),
    /// A real router on loopback.
    Udp(Common),
    /// The kernel's TCP accept rate on loopback.
    TcpAccept(Common),
    /// All three, with a markdown table.
    All(Common),
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Services in the router's table.
    #[arg(long, default_value_t = 10_000)]
    services: u32,
    /// Distinct SYNs generated (cycled through).
    #[arg(long, default_value_t = 8192)]
    syns: usize,
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Repetitions (median and range are reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Client threads opening TCP connections (tcp-accept).
    #[arg(long, default_value_t = 2)]
    clients: usize,
    /// The engine's table keeps the opt-in anchor index (`ServiceTable::with_anchor_index`).
    #[arg(long)]
    anchor_index: bool,
    /// SYNs handed to the engine per call of `handle_datagrams_mut` (engine): 16 is what the
    /// runtime takes per `recvmmsg`; 1 hands them over one by one (`handle_datagram`).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    batch: u16,
}

/// One measurement: events per wall-clock second, and per second of the measured thread's CPU.
#[derive(Clone, Copy, Debug)]
struct Rate {
    per_sec: f64,
    per_cpu_sec: f64,
    cpu_share: f64,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Engine(c) => repeat(&c, "engine", || engine(&c)),
        Cmd::Udp(c) => repeat(&c, "udp", || udp(&c)),
        Cmd::TcpAccept(c) => repeat(&c, "tcp-accept", || tcp_accept(&c)),
        Cmd::All(c) => all(&c),
    };
    if let Err(e) = result {
        eprintln!("syn-bench: {e}");
        std::process::exit(1);
    }
}

fn repeat(
    c: &Common,
    name: &str,
    mut f: impl FnMut() -> Result<Rate, String>,
) -> Result<Vec<Rate>, String> {
    let mut v = Vec::new();
    for rep in 0..c.reps {
        let r = f()?;
        println!(
            "RESULT {name} rep={} per_sec={:.0} per_cpu_sec={:.0} cpu_share={:.2}",
            rep + 1,
            r.per_sec,
            r.per_cpu_sec,
            r.cpu_share
        );
        v.push(r);
    }
    Ok(v)
}

fn all(c: &Common) -> Result<Vec<Rate>, String> {
    let mut rows = Vec::new();
    // Interleave so a slow phase of the machine hits every measurement.
    let mut results: [Vec<Rate>; 3] = Default::default();
    for rep in 0..c.reps {
        eprintln!("repetition {}/{}", rep + 1, c.reps);
        let one = Common {
            reps: 1,
            ..c.clone()
        };
        results[0].extend(repeat(&one, "engine", || engine(c))?);
        results[1].extend(repeat(&one, "udp", || udp(c))?);
        results[2].extend(repeat(&one, "tcp-accept", || tcp_accept(c))?);
    }
    println!();
    println!(
        "SYN forwarding vs TCP accept, {} services, {} repetitions of {} s (median, min–max):",
        c.services, c.reps, c.secs
    );
    println!();
    println!(
        "| measurement | per second | min–max | per CPU-second of the measured thread | min–max | CPU share |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let names = [
        "Serval engine alone (sans-IO, SYN in → forwarded SYN out)",
        "Serval router over loopback UDP (recvmmsg/GRO in, GSO out)",
        "kernel TCP accept (tokio TcpListener, loopback)",
    ];
    for (name, rs) in names.iter().zip(&results) {
        let (m, lo, hi) = stats(rs.iter().map(|r| r.per_sec));
        let (mc, loc, hic) = stats(rs.iter().map(|r| r.per_cpu_sec));
        let (share, _, _) = stats(rs.iter().map(|r| r.cpu_share));
        println!(
            "| {name} | {} | {}–{} | {} | {}–{} | {share:.2} |",
            fmt(m),
            fmt(lo),
            fmt(hi),
            fmt(mc),
            fmt(loc),
            fmt(hic)
        );
        rows.extend(rs.iter().copied());
    }
    Ok(rows)
}

fn stats(it: impl Iterator<Item = f64>) -> (f64, f64, f64) {
    let mut v: Vec<f64> = it.collect();
    v.sort_by(f64::total_cmp);
    let lo = v.first().copied().unwrap_or(0.0);
    let hi = v.last().copied().unwrap_or(0.0);
    (v.get(v.len() / 2).copied().unwrap_or(0.0), lo, hi)
}

fn fmt(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else {
        format!("{:.0} k", x / 1e3)
    }
}

fn service(i: u32) -> ServiceId {
    let mut id = [0u8; 32];
    id[..4].copy_from_slice(&0x5e57_0000u32.to_be_bytes());
    id[4..8].copy_from_slice(&i.to_be_bytes());
    ServiceId(id)
}

/// A table with `n` services, each served by three weighted instances at `sinks`.
fn table(n: u32, sinks: &[Locator; 3], anchor_index: bool) -> Result<Arc<ServiceTable>, String> {
    let t = Arc::new(if anchor_index {
        ServiceTable::with_anchor_index()
    } else {
        ServiceTable::new()
    });
    fill(&t, n, sinks)?;
    Ok(t)
}

/// Adds `n` services to `t`, each served by three weighted instances at `sinks`, in one update
/// (one published version: building 1M services one change at a time would publish 3M).
fn fill(t: &ServiceTable, n: u32, sinks: &[Locator; 3]) -> Result<(), String> {
    t.update(|tx| {
        for i in 0..n {
            for (w, sink) in sinks.iter().enumerate() {
                tx.add_target(
                    ServicePrefix::exact(service(i)),
                    Target::new(Action::Forward(*sink), 0, w as u32 + 1),
                )
                .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    })
}

/// `count` SYNs from `client` for random services below `services`, all of one size (so they
/// can go out as GSO batches).
fn syns(count: usize, services: u32, client: Locator) -> Result<Vec<Vec<u8>>, String> {
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..count)
        .map(|_| {
            let mut r = SalRepr::new(Protocol::STREAM, FlowId(next() | 1), FlowId::NONE);
            r.control = Some(ControlRepr {
                flags: ControlFlags::SYN,
                verno: next() as u32,
                ackno: 0,
            });
            r.service = Some(ServiceRepr {
                hop_limit: 16,
                id: service((next() % u64::from(services)) as u32),
            });
            let mut nonce = [0u8; 16];
            nonce[..8].copy_from_slice(&next().to_be_bytes());
            nonce[8..].copy_from_slice(&next().to_be_bytes());
            r.nonce = Some(Nonce(nonce));
            r.source = vec![client];
            r.to_bytes(&[]).map_err(|e| e.to_string())
        })
        .collect()
}

fn engine(c: &Common) -> Result<Rate, String> {
    let router_loc: Locator = ([127, 0, 0, 1], 50_000).into();
    let client: Locator = ([127, 0, 0, 1], 50_001).into();
    let sinks: [Locator; 3] = [
        ([127, 0, 0, 1], 50_010).into(),
        ([127, 0, 0, 1], 50_011).into(),
        ([127, 0, 0, 1], 50_012).into(),
    ];
    let mut router = Endpoint::new(
        EndpointConfig::default(),
        [7; 32],
        table(c.services, &sinks, c.anchor_index)?,
        vec![router_loc],
    );
    let syns = syns(c.syns, c.services, client)?;
    let mut out = Vec::with_capacity(65_536);
    let now = Instant::ZERO;
    let cpu0 = thread_cpu()?;
    let start = StdInstant::now();
    let mut forwarded = 0u64;
    // Each batch is copied into one buffer first, as a receive copies it from the kernel
    // (`handle_datagram` copies too).
    let mut arena = Vec::new();
    while start.elapsed().as_secs_f64() < c.secs {
        for chunk in syns.chunks(usize::from(c.batch)) {
            if let [s] = chunk {
                router.handle_datagram(now, router_loc, client, s);
            } else {
                arena.clear();
                chunk.iter().for_each(|s| arena.extend_from_slice(s));
                let mut rest = &mut arena[..];
                let mut batch: Vec<Datagram<'_>> = chunk
                    .iter()
                    .map(|s| {
                        let (data, tail) = std::mem::take(&mut rest).split_at_mut(s.len());
                        rest = tail;
                        Datagram {
                            local: router_loc,
                            remote: client,
                            data,
                        }
                    })
                    .collect();
                router.handle_datagrams_mut(now, &mut batch);
            }
            while router.poll_transmit_into(now, &mut out).is_some() {
                forwarded += 1;
                out.clear();
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = thread_cpu()? - cpu0;
    let stats = router.stats();
    if stats.forwarded != forwarded {
        return Err(format!(
            "engine counted {} forwarded, drained {forwarded}",
            stats.forwarded
        ));
    }
    Ok(rate(forwarded, secs, cpu))
}

fn rate(events: u64, secs: f64, cpu: f64) -> Rate {
    Rate {
        per_sec: events as f64 / secs,
        per_cpu_sec: if cpu > 0.0 { events as f64 / cpu } else { 0.0 },
        cpu_share: cpu / secs,
    }
}

/// CPU seconds (user + system) the calling thread has used, from `/proc/thread-self/stat`.
fn thread_cpu() -> Result<f64, String> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").map_err(|e| e.to_string())?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or("unexpected /proc/thread-self/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64, String> {
        f.get(i)
            .and_then(|s| s.parse::<f64>().ok())
            .ok_or_else(|| "unexpected /proc/thread-self/stat".to_string())
    };
    // `rest` starts at field 3 (state), so field n is at index n - 3.
    Ok((ticks(14 - 3)? + ticks(15 - 3)?) / 100.0)
}

fn udp(c: &Common) -> Result<Rate, String> {
    let sinks: Vec<UdpSocket> = (0..3)
        .map(|_| UdpSocket::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let sink_locs: [Locator; 3] = [
        sinks[0].local_addr().map_err(|e| e.to_string())?,
        sinks[1].local_addr().map_err(|e| e.to_string())?,
        sinks[2].local_addr().map_err(|e| e.to_string())?,
    ];
    let blaster = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let client = blaster.local_addr().map_err(|e| e.to_string())?;
    let syns = syns(c.syns, c.services, client)?;
    let services = c.services;

    let stop = Arc::new(AtomicBool::new(false));
    let (addr_tx, addr_rx) = std::sync::mpsc::channel::<Result<SocketAddr, String>>();
    let (cpu_tx, cpu_rx) = std::sync::mpsc::channel::<f64>();
    let router = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let Some(rt) = runtime(&addr_tx) else { return };
            rt.block_on(async move {
                let ep = match serval::Endpoint::bind(&[([127, 0, 0, 1], 0).into()]).await {
                    Ok(ep) => ep,
                    Err(e) => {
                        let _ = addr_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                if let Err(e) = fill(ep.table(), services, &sink_locs) {
                    let _ = addr_tx.send(Err(e));
                    return;
                }
                let _ = addr_tx.send(Ok(ep.local_locators()[0]));
                let cpu0 = thread_cpu().unwrap_or(0.0);
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let _ = cpu_tx.send(thread_cpu().unwrap_or(0.0) - cpu0);
            });
        })
    };
    let router_addr = addr_rx
        .recv()
        .map_err(|_| "router thread died".to_string())??;

    // Sinks: count forwarded SYNs (GRO may coalesce several into one read).
    let received = Arc::new(AtomicU64::new(0));
    let sink_thread = {
        let stop = stop.clone();
        let received = received.clone();
        std::thread::spawn(move || sink(sinks, &stop, &received))
    };
    let blast_thread = {
        let stop = stop.clone();
        std::thread::spawn(move || blast(blaster, router_addr, &syns, &stop))
    };
    // Warm up, then measure a window.
    std::thread::sleep(Duration::from_millis(300));
    let r0 = received.load(Ordering::Relaxed);
    let start = StdInstant::now();
    std::thread::sleep(Duration::from_secs_f64(c.secs));
    let r1 = received.load(Ordering::Relaxed);
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let router_cpu = cpu_rx
        .recv()
        .map_err(|_| "router thread died".to_string())?;
    let _ = router.join();
    let sent = blast_thread
        .join()
        .map_err(|_| "blaster panicked".to_string())??;
    sink_thread
        .join()
        .map_err(|_| "sink panicked".to_string())??;
    if r1 == r0 {
        return Err(format!("no SYN was forwarded (blaster sent {sent})"));
    }
    // The router's CPU was measured over its whole life (warm-up included): scale to the
    // window by its share over the whole run.
    let life = secs + 0.3;
    let share = router_cpu / life;
    Ok(Rate {
        per_sec: (r1 - r0) as f64 / secs,
        per_cpu_sec: if share > 0.0 {
            (r1 - r0) as f64 / (share * secs)
        } else {
            0.0
        },
        cpu_share: share,
    })
}

/// Sends the SYNs to `router` in GSO batches until `stop`; returns how many were sent.
fn blast(
    sock: UdpSocket,
    router: SocketAddr,
    syns: &[Vec<u8>],
    stop: &AtomicBool,
) -> Result<u64, String> {
    let state = UdpSocketState::new((&sock).into()).map_err(|e| e.to_string())?;
    let seg = syns[0].len();
    if syns.iter().any(|s| s.len() != seg) {
        return Err("SYNs of different sizes".into());
    }
    let per_batch = state.max_gso_segments().clamp(1, 64);
    let batches: Vec<Vec<u8>> = syns.chunks(per_batch).map(|c| c.concat()).collect();
    let mut sent = 0u64;
    'outer: loop {
        for b in &batches {
            if stop.load(Ordering::Relaxed) {
                break 'outer;
            }
            let t = Transmit {
                destination: router,
                ecn: None,
                contents: b,
                segment_size: (b.len() > seg).then_some(seg),
                src_ip: None,
            };
            // The socket is blocking: a full buffer waits, which is the back-pressure we want.
            if state.try_send((&sock).into(), &t).is_ok() {
                sent += (b.len() / seg) as u64;
            }
        }
    }
    Ok(sent)
}

/// Reads the sink sockets until `stop`, adding every datagram to `received`.
fn sink(socks: Vec<UdpSocket>, stop: &AtomicBool, received: &AtomicU64) -> Result<(), String> {
    let states: Vec<UdpSocketState> = socks
        .iter()
        .map(|s| {
            s.set_nonblocking(true)?;
            UdpSocketState::new(s.into())
        })
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let mut bufs: Vec<Vec<u8>> = (0..16).map(|_| vec![0u8; 65_536]).collect();
    let mut meta = vec![RecvMeta::default(); 16];
    while !stop.load(Ordering::Relaxed) {
        let mut got = false;
        for (s, st) in socks.iter().zip(&states) {
            let mut slices: Vec<std::io::IoSliceMut<'_>> = bufs
                .iter_mut()
                .map(|b| std::io::IoSliceMut::new(&mut b[..]))
                .collect();
            if let Ok(n) = st.recv(s.into(), &mut slices, &mut meta) {
                got = true;
                let d: usize = meta[..n].iter().map(|m| m.len / m.stride.max(1)).sum();
                received.fetch_add(d as u64, Ordering::Relaxed);
            }
        }
        if !got {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    Ok(())
}

/// A tokio current-thread runtime for a measured thread; on failure the reason goes to `tx`.
fn runtime(
    tx: &std::sync::mpsc::Sender<Result<SocketAddr, String>>,
) -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            let _ = tx.send(Err(e.to_string()));
            None
        }
    }
}

fn tcp_accept(c: &Common) -> Result<Rate, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let (addr_tx, addr_rx) = std::sync::mpsc::channel::<Result<SocketAddr, String>>();
    let (cpu_tx, cpu_rx) = std::sync::mpsc::channel::<f64>();
    let server = {
        let (stop, accepted) = (stop.clone(), accepted.clone());
        std::thread::spawn(move || {
            let Some(rt) = runtime(&addr_tx) else { return };
            rt.block_on(async move {
                let l = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = addr_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = addr_tx.send(l.local_addr().map_err(|e| e.to_string()));
                let cpu0 = thread_cpu().unwrap_or(0.0);
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(Ok((s, _))) =
                        tokio::time::timeout(Duration::from_millis(20), l.accept()).await
                    {
                        drop(s);
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let _ = cpu_tx.send(thread_cpu().unwrap_or(0.0) - cpu0);
            });
        })
    };
    let addr = addr_rx
        .recv()
        .map_err(|_| "server thread died".to_string())??;
    let clients: Vec<_> = (0..c.clients)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    match TcpStream::connect(addr) {
                        Ok(s) => {
                            ok += 1;
                            // Reset instead of FIN: no TIME-WAIT, so the ports do not run out.
                            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                        }
                        Err(_) => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let a0 = accepted.load(Ordering::Relaxed);
    let start = StdInstant::now();
    std::thread::sleep(Duration::from_secs_f64(c.secs));
    let a1 = accepted.load(Ordering::Relaxed);
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let cpu = cpu_rx
        .recv()
        .map_err(|_| "server thread died".to_string())?;
    let _ = server.join();
    let (mut ok, mut failed) = (0, 0);
    for c in clients {
        let (o, f) = c.join().map_err(|_| "client panicked".to_string())?;
        ok += o;
        failed += f;
    }
    if failed > 0 {
        eprintln!("tcp-accept: {failed} of {} connects failed", ok + failed);
    }
    let share = cpu / (secs + 0.3);
    Ok(Rate {
        per_sec: (a1 - a0) as f64 / secs,
        per_cpu_sec: if share > 0.0 {
            (a1 - a0) as f64 / (share * secs)
        } else {
            0.0
        },
        cpu_share: share,
    })
}
