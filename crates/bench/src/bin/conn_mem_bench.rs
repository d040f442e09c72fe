//! Heap memory per idle established connection: Serval against tokio `TcpStream` pairs and
//! quinn connections, all in one process on loopback.
//!
//! For each stack it binds a server and a client endpoint, opens one connection that is not
//! counted (so lazily built shared state exists before the baseline), then opens `--conns`
//! more, exchanges one byte each way on every one (so they are established and have carried
//! data), lets them sit idle for `--settle-ms` (delayed ACKs and MTU probes finish), and
//! reports the growth of live heap bytes divided by the number of connection *ends* (a
//! connection has two: the client's and the server's). Allocations are counted by a wrapping
//! global allocator (`stats_alloc`), the same way for every stack. Kernel memory (TCP socket
//! buffers, UDP socket buffers) is not counted: these are user-space bytes only.
//!
//! ```sh
//! cargo run --release -p serval-bench --bin conn-mem-bench -- --conns 2000
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

#[path = "../engine_pair.rs"]
#[allow(dead_code)]
mod engine_pair;

#[path = "../heap.rs"]
mod heap;
use heap::live_heap;

/// Heap bytes per idle established connection end: Serval vs tokio TCP vs quinn.
#[derive(Debug, Parser)]
struct Args {
    /// Connections opened per stack (each has two ends in this process).
    #[arg(long, default_value_t = 2000)]
    conns: usize,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 64)]
    parallel: usize,
    /// Idle time before the measurement, in milliseconds.
    #[arg(long, default_value_t = 500)]
    settle_ms: u64,
    /// Stacks to measure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "serval,serval-engine,tcp,quinn"
    )]
    stacks: Vec<Stack>,
    /// serval-engine: the path-MTU search ceiling (the runtime uses 65 000 on loopback, the
    /// engine's default is 1472).
    #[arg(long, default_value_t = 65_000)]
    engine_max_udp_payload: u16,
    /// Repetitions per stack (each in a fresh runtime); median and spread are reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Stack {
    Serval,
    /// The sans-IO engine alone (two `serval_engine::endpoint::Endpoint`s in memory, no
    /// sockets or runtime): the engine's share of Serval's figure.
    ServalEngine,
    Tcp,
    Quinn,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

/// Result of one measurement.
struct Sample {
    /// Heap growth per connection end, right after the last connection was set up.
    at_setup: f64,
    /// Heap growth per connection end after the idle period.
    idle: f64,
    /// Wall time to set up all connections.
    setup: Duration,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("conn-mem-bench: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    let mut rows = Vec::new();
    for &stack in &args.stacks {
        let mut samples = Vec::new();
        for rep in 0..args.reps {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let s = rt.block_on(measure(stack, args))?;
            eprintln!(
                "{stack:?} rep {}: {:.0} B/end at set-up, {:.0} B/end idle, set-up {:.2} s",
                rep + 1,
                s.at_setup,
                s.idle,
                s.setup.as_secs_f64()
            );
            samples.push(s);
            drop(rt);
        }
        rows.push((stack, samples));
    }
    println!(
        "\nHeap bytes per idle established connection end ({} connections = {} ends per stack, one byte exchanged each way, {} ms idle; user-space heap only, kernel socket memory not counted; median of {}, min–max):\n",
        args.conns,
        2 * args.conns,
        args.settle_ms,
        args.reps
    );
    println!(
        "| stack | bytes/end idle | min–max | bytes/end right after set-up | Serval ÷ this (idle) |"
    );
    println!("|---|---:|---:|---:|---:|");
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let serval_idle = rows
        .iter()
        .find(|(s, _)| *s == Stack::Serval)
        .map(|(_, v)| med(&mut v.iter().map(|s| s.idle).collect()).0);
    for (stack, v) in &rows {
        let (idle, lo, hi) = med(&mut v.iter().map(|s| s.idle).collect());
        let (setup, _, _) = med(&mut v.iter().map(|s| s.at_setup).collect());
        let ratio = match serval_idle {
            Some(s) if *stack != Stack::Serval => format!("{:.2}×", s / idle),
            _ => "—".into(),
        };
        let name = match stack {
            Stack::Serval => "serval",
            Stack::ServalEngine => "serval engine alone (sans-IO, no runtime)",
            Stack::Tcp => "tokio TcpStream (user space only)",
            Stack::Quinn => "quinn (connection + one bidi stream)",
        };
        println!("| {name} | {idle:.0} | {lo:.0}–{hi:.0} | {setup:.0} | {ratio} |");
    }
    Ok(())
}

async fn measure(stack: Stack, args: &Args) -> Result<Sample> {
    match stack {
        Stack::Serval => measure_serval(args).await,
        Stack::ServalEngine => measure_engine(args),
        Stack::Tcp => measure_tcp(args).await,
        Stack::Quinn => measure_quinn(args).await,
    }
}

/// Runs `n` connection set-ups, `parallel` at a time; every one returns what must be kept.
async fn open_all<T, F, Fut>(n: usize, parallel: usize, open: F) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T>> + Send + 'static,
{
    let sem = Arc::new(Semaphore::new(parallel.max(1)));
    let mut set = JoinSet::new();
    for _ in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        let fut = open();
        set.spawn(async move {
            let r = fut.await;
            drop(permit);
            r
        });
    }
    let mut kept = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        kept.push(r??);
    }
    Ok(kept)
}

/// Measures around `open` (which sets up and keeps every connection).
async fn around<T, Fut>(args: &Args, open: impl FnOnce() -> Fut) -> Result<Sample>
where
    Fut: std::future::Future<Output = Result<Vec<T>>>,
{
    let base = live_heap();
    let t = Instant::now();
    let kept = open().await?;
    let setup = t.elapsed();
    let ends = (2 * args.conns) as f64;
    let at_setup = (live_heap() - base) as f64 / ends;
    tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
    let idle = (live_heap() - base) as f64 / ends;
    drop(kept);
    Ok(Sample {
        at_setup,
        idle,
        setup,
    })
}

async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    first: bool,
) -> std::io::Result<()> {
    let mut b = [0u8; 1];
    if first {
        s.write_all(b"x").await?;
        s.read_exact(&mut b).await?;
    } else {
        s.read_exact(&mut b).await?;
        s.write_all(&b).await?;
    }
    Ok(())
}

async fn measure_serval(args: &Args) -> Result<Sample> {
    let lo: SocketAddr = "127.0.0.1:0".parse()?;
    let server = serval::Endpoint::bind(&[lo]).await?;
    let client = serval::Endpoint::bind(&[lo]).await?;
    let id = serval::ServiceId::from_name("idle.bench").map_err(|e| format!("{e:?}"))?;
    let mut listener = server.listen(serval::ServicePrefix::exact(id))?;
    let to = server.local_locators()[0];
    // The server side: accept, answer the byte, hand the stream back to be kept.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let acceptor = tokio::spawn(async move {
        loop {
            let Ok(mut s) = listener.accept().await else {
                break;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                if exchange(&mut s, false).await.is_ok() {
                    let _ = tx.send(s);
                }
            });
        }
    });
    let one = |client: serval::Endpoint| async move {
        let mut s = client.connect_via(id, to).await?;
        exchange(&mut s, true).await?;
        Ok::<_, BoxError>(s)
    };
    // Not counted: the first connection builds the endpoints' shared state.
    let warm = one(client.clone()).await?;
    let warm_server = rx.recv().await.ok_or("acceptor ended")?;
    let n = args.conns;
    let sample = around(args, || async {
        let clients = open_all(n, args.parallel, || one(client.clone())).await?;
        let mut servers = Vec::with_capacity(n);
        while servers.len() < n {
            servers.push(rx.recv().await.ok_or("acceptor ended")?);
        }
        Ok(vec![(clients, servers)])
    })
    .await?;
    drop((warm, warm_server));
    acceptor.abort();
    Ok(sample)
}

async fn measure_tcp(args: &Args) -> Result<Sample> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let to = listener.local_addr()?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let acceptor = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                break;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                if exchange(&mut s, false).await.is_ok() {
                    let _ = tx.send(s);
                }
            });
        }
    });
    let one = || async move {
        let mut s = tokio::net::TcpStream::connect(to).await?;
        s.set_nodelay(true)?;
        exchange(&mut s, true).await?;
        Ok::<_, BoxError>(s)
    };
    let warm = one().await?;
    let warm_server = rx.recv().await.ok_or("acceptor ended")?;
    let n = args.conns;
    let sample = around(args, || async {
        let clients = open_all(n, args.parallel, one).await?;
        let mut servers = Vec::with_capacity(n);
        while servers.len() < n {
            servers.push(rx.recv().await.ok_or("acceptor ended")?);
        }
        Ok(vec![(clients, servers)])
    })
    .await?;
    drop((warm, warm_server));
    acceptor.abort();
    Ok(sample)
}

/// What is kept of one end of a quinn connection.
type QuinnEnd = (quinn::Connection, quinn::SendStream, quinn::RecvStream);

async fn measure_quinn(args: &Args) -> Result<Sample> {
    let ck = rcgen::generate_simple_self_signed(vec!["bench.invalid".to_string()])?;
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
    let mut server_config = quinn::ServerConfig::with_single_cert(vec![cert.clone()], key)?;
    // Room for every connection at once.
    server_config.max_incoming(args.conns + 16);
    let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse()?)?;
    let to = server.local_addr()?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    client.set_default_client_config(quinn::ClientConfig::with_root_certificates(Arc::new(
        roots,
    ))?);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<QuinnEnd>();
    let srv = server.clone();
    let acceptor = tokio::spawn(async move {
        while let Some(incoming) = srv.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let r: Result<QuinnEnd> = async {
                    let conn = incoming.await?;
                    let (send, recv) = conn.accept_bi().await?;
                    let mut s = tokio::io::join(recv, send);
                    exchange(&mut s, false).await?;
                    let (recv, send) = s.into_inner();
                    Ok((conn, send, recv))
                }
                .await;
                if let Ok(end) = r {
                    let _ = tx.send(end);
                }
            });
        }
    });
    let one = |client: quinn::Endpoint| async move {
        let conn = client.connect(to, "bench.invalid")?.await?;
        let (send, recv) = conn.open_bi().await?;
        let mut s = tokio::io::join(recv, send);
        exchange(&mut s, true).await?;
        let (recv, send) = s.into_inner();
        Ok::<QuinnEnd, BoxError>((conn, send, recv))
    };
    let warm = one(client.clone()).await?;
    let warm_server = rx.recv().await.ok_or("acceptor ended")?;
    let n = args.conns;
    let sample = around(args, || async {
        let clients = open_all(n, args.parallel, || one(client.clone())).await?;
        let mut servers = Vec::with_capacity(n);
        while servers.len() < n {
            servers.push(rx.recv().await.ok_or("acceptor ended")?);
        }
        Ok(vec![(clients, servers)])
    })
    .await?;
    drop((warm, warm_server));
    acceptor.abort();
    client.close(0u32.into(), b"done");
    server.close(0u32.into(), b"done");
    Ok(sample)
}

/// Heap of one bare `Transport` (the stream/ACK/congestion state of a flow, without the SAL
/// connection around it): (right after `new`, after one byte each way, once idle for
/// `IDLE_RELEASE`), per transport.
fn transport_heap() -> Result<(f64, f64, f64)> {
    use serval_engine::transport::conn::{IDLE_RELEASE, Transport, TransportConfig};
    let cfg = TransportConfig::default();
    let t0 = Instant::now();
    let now = || serval_engine::Instant::from_nanos(t0.elapsed().as_nanos() as u64);
    const N: usize = 100;
    let h0 = live_heap();
    let mut ends: Vec<(Transport, Transport)> = Vec::with_capacity(N);
    let h1 = live_heap();
    for _ in 0..N {
        ends.push((Transport::new(&cfg, now()), Transport::new(&cfg, now())));
    }
    let fresh = (live_heap() - h1) as f64 / (2 * N) as f64;
    let mut out = Vec::with_capacity(2048);
    for (a, b) in &mut ends {
        a.write(b"x")?;
        for _ in 0..8 {
            let mut shuttle = |from: &mut Transport, to: &mut Transport| -> Result<()> {
                loop {
                    out.clear();
                    if from.poll_transmit(now(), &mut out) == 0 {
                        return Ok(());
                    }
                    to.handle_packet(now(), &out)?;
                }
            };
            shuttle(a, b)?;
            shuttle(b, a)?;
            let mut x = [0u8; 1];
            if b.read(&mut x)? == Some(1) {
                b.write(&x)?;
            }
            let _ = a.read(&mut x)?;
            while a.poll_event().is_some() {}
            while b.poll_event().is_some() {}
        }
    }
    let used = (live_heap() - h1) as f64 / (2 * N) as f64;
    // The transports give back the memory of empty buffers once idle for `IDLE_RELEASE`.
    let later = now() + IDLE_RELEASE + Duration::from_millis(1);
    for (a, b) in &mut ends {
        a.handle_timeout(later);
        b.handle_timeout(later);
    }
    let idle = (live_heap() - h1) as f64 / (2 * N) as f64;
    drop(ends);
    let _ = h0;
    Ok((fresh, used, idle))
}

/// The engine alone: `--conns` connections between two in-memory endpoints, one byte each way.
fn measure_engine(args: &Args) -> Result<Sample> {
    let id = serval::ServiceId::from_name("idle.bench").map_err(|e| format!("{e:?}"))?;
    let mut config = serval::EndpointConfig::default();
    config.transport.max_udp_payload = args.engine_max_udp_payload;
    let mut pair = engine_pair::Pair::new(config, id);
    let mut handles = Vec::with_capacity(args.conns + 1);
    let mut open = |pair: &mut engine_pair::Pair| -> Result<()> {
        let (c, s) = pair.connect(id)?;
        pair.client.write(c, b"x")?;
        pair.pump();
        let mut b = [0u8; 1];
        pair.server.read(s, &mut b)?;
        pair.server.write(s, &b)?;
        pair.pump();
        pair.client.read(c, &mut b)?;
        pair.drain_events();
        handles.push((c, s));
        Ok(())
    };
    open(&mut pair)?;
    let base = live_heap();
    let t = Instant::now();
    for _ in 0..args.conns {
        open(&mut pair)?;
    }
    let setup = t.elapsed();
    let ends = (2 * args.conns) as f64;
    let at_setup = (live_heap() - base) as f64 / ends;
    // Idle: let delayed ACKs and probe timers run.
    let until = Instant::now() + Duration::from_millis(args.settle_ms);
    while Instant::now() < until {
        pair.pump();
        pair.drain_events();
        std::thread::sleep(Duration::from_millis(5));
    }
    let idle = (live_heap() - base) as f64 / ends;
    let (fresh, used, released) = transport_heap()?;
    eprintln!(
        "  engine: size_of::<Transport>() = {} B inline; a bare Transport owns {fresh:.0} B of \
         heap when new, {used:.0} B after one byte each way and {released:.0} B once idle (heap \
         only, excluding its inline size); PMTU of the last connection {:?}",
        std::mem::size_of::<serval_engine::transport::conn::Transport>(),
        handles
            .last()
            .and_then(|&(c, _)| pair.client.connection_stats(c))
            .map(|s| s.pmtu),
    );
    Ok(Sample {
        at_setup,
        idle,
        setup,
    })
}
