//! A stream by name survives the client losing its network link mid-transfer: two hosts in
//! their own network namespaces, joined by two veth links, and the client moves its end of a
//! live echo stream from the first link to the second after that first link went down.
//!
//! ```text
//!   client ns                                    server ns
//!   10.78.1.1/24  vm1c<pid> ==== link 1 ==== vm1s<pid>  10.78.1.2/24
//!   10.78.2.1/24  vm2c<pid> ==== link 2 ==== vm2s<pid>  10.78.2.2/24
//!                                                      lo: 10.78.0.1/32 (the service's address)
//! ```
//!
//! The client routes by source address (`ip rule from 10.78.N.1 table 10N`), as a multihomed
//! host does: what its link-1 socket sends goes over link 1 only, so once link 1 is down every
//! packet on the old path is really lost (the kernel has no route for it any more) rather than
//! quietly taking link 2. The server's address sits on its loopback, reachable over either link.
//!
//! The server and the client run in this process, each on its own thread that first enters its
//! namespace with `setns(2)` and then builds a current-thread tokio runtime there, so every socket
//! the endpoint opens lives in that namespace. The client connects by name and streams 32 MiB of
//! a seeded pattern while reading the echo; once a third has come back it takes link 1 down,
//! goes on using it for [`DETECTION_DELAY`] (a host rarely learns of a lost link at once), and
//! then migrates to its link-2 address. The test checks that packets were really lost on link 1
//! (the server veth's drop counter, the client kernel's `OutNoRoutes`), that the server received,
//! and the client got back, every byte exactly once and in order, that the client's stream uses
//! the new locator, that the server saw its peer move to it, and that the flow closed cleanly.
//! It prints how long the transfer took and how long the flow stalled around the migration.
//!
//! A second test sends over IPv6 on link 1 (1500-byte MTU) and checks path-MTU discovery
//! settles without a lost probe: the runtime caps IPv6 probes at 1452 bytes of UDP payload, and
//! a probe the kernel refuses no longer takes the datagrams batched with it down too.
//!
//! Needs root and `ip` (iproute2), as CI has. Elsewhere (or with `SERVAL_SKIP_NETNS` set) each
//! test skips with one line (`serval_testkit::require_netns`); under `CI=true` it fails instead. The namespaces (`svm<c|s><pid>`) are deleted when the test ends,
//! pass or fail, and every wait is bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use serval::{CloseReason, Endpoint, FollowHost, ServiceId, ServicePrefix, Stream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::timeout;

use support::{Hosts, first_difference, in_netns, ip, pattern, tx_dropped};

/// Bytes the client sends (and gets back).
const TOTAL: usize = 32 << 20;
/// Bounds the whole transfer, migration included, so a hang fails instead of stalling CI.
const LIMIT: Duration = Duration::from_secs(60);
/// How long the client goes on using the dead link before it migrates, as a host that learns
/// late of its link's loss: long enough for both ends to lose data and probes on the old path.
const DETECTION_DELAY: Duration = Duration::from_millis(200);
/// Bounds the FIN exchange after the transfer.
const CLOSE_LIMIT: Duration = Duration::from_secs(15);
const SERVICE: &str = "migrate.test";
const SERVER_ADDR: &str = "10.78.0.1:54324";
const CLIENT_LINK1: &str = "10.78.1.1";
const CLIENT_LINK2: &str = "10.78.2.1";

/// Datagrams the kernel of the calling thread's namespace could not route (`OutNoRoutes`): what
/// the client still sends from its link-1 address once link 1 and its route are gone.
fn out_no_routes() -> u64 {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").expect("read snmp");
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (ip.next().expect("Ip names"), ip.next().expect("Ip values"));
    let i = names
        .split_whitespace()
        .position(|n| n == "OutNoRoutes")
        .expect("OutNoRoutes");
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// What the server saw.
#[derive(Debug)]
struct ServerReport {
    received: usize,
    /// The client's locator as the server knew it, each change appended.
    peers: Vec<SocketAddr>,
    closed: CloseReason,
}

/// Accepts one stream, checks what arrives against the pattern as it comes, echoes it back.
async fn serve(
    ready: std::sync::mpsc::Sender<()>,
    data: Arc<Vec<u8>>,
) -> Result<ServerReport, String> {
    let ep = Endpoint::bind(&[SERVER_ADDR.parse().unwrap()])
        .await
        .map_err(|e| format!("server bind: {e}"))?;
    let mut listener = ep
        .listen(ServicePrefix::exact(ServiceId::from_name(SERVICE).unwrap()))
        .map_err(|e| format!("listen: {e}"))?;
    let _ = ready.send(());
    let mut received = 0usize;
    let mut peers = Vec::new();
    let echo = async {
        let mut s = listener
            .accept()
            .await
            .map_err(|e| format!("accept: {e}"))?;
        peers.push(s.peer_locator().map_err(|e| e.to_string())?);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = s
                .read(&mut buf)
                .await
                .map_err(|e| format!("server read: {e}"))?;
            if n == 0 {
                break;
            }
            let want = data
                .get(received..received + n)
                .ok_or_else(|| format!("server got {} bytes, more than sent", received + n))?;
            if let Some(i) = first_difference(&buf[..n], want) {
                return Err(format!("server: byte {} differs", received + i));
            }
            received += n;
            let p = s.peer_locator().map_err(|e| e.to_string())?;
            if peers.last() != Some(&p) {
                peers.push(p);
            }
            s.write_all(&buf[..n])
                .await
                .map_err(|e| format!("server write: {e}"))?;
        }
        s.shutdown()
            .await
            .map_err(|e| format!("server shutdown: {e}"))?;
        Ok::<_, String>(s)
    };
    let s = timeout(LIMIT, echo)
        .await
        .map_err(|_| format!("server timed out: received {received}, peers {peers:?}"))??;
    let closed = timeout(CLOSE_LIMIT, s.closed())
        .await
        .map_err(|_| "server: the flow did not close".to_string())?;
    Ok(ServerReport {
        received,
        peers,
        closed,
    })
}

/// What the client saw.
#[derive(Debug, Default)]
struct ClientProgress {
    sent: usize,
    echoed: usize,
    /// When link 1 went down.
    link_down_at: Option<Instant>,
    /// When the client migrated ([`DETECTION_DELAY`] later).
    migrated_at: Option<Instant>,
    /// How long after the migration the stream reported the new local locator.
    switched_after: Option<Duration>,
    /// Bytes written and echoed when link 1 went down.
    sent_at_link_down: usize,
    echoed_at_link_down: usize,
    /// Bytes echoed when the client migrated.
    echoed_at_migration: usize,
    /// When the first echoed byte after the migration arrived.
    resumed_after: Option<Duration>,
    /// Datagrams the client sent into the dead link, between link down and the migration.
    unroutable: u64,
}

#[derive(Debug)]
struct ClientReport {
    old: SocketAddr,
    new: SocketAddr,
    local_after: SocketAddr,
    progress: ClientProgress,
    closed: CloseReason,
    elapsed: Duration,
}

/// Writes `data` and reads its echo on one stream at once, checking every echoed byte. Once a
/// third has come back (both directions busy, the window wide open) it calls `link_down`, goes
/// on pumping into the dead path for [`DETECTION_DELAY`], then migrates to `new`.
async fn pump(
    stream: &mut Stream,
    data: &[u8],
    new: SocketAddr,
    link_down: &dyn Fn(),
    p: &mut ClientProgress,
) -> Result<(), String> {
    let mut buf = vec![0u8; 64 << 10];
    let mut shut = false;
    let mut detect: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut no_routes_before = 0;
    std::future::poll_fn(|cx| {
        loop {
            let mut progress = false;
            if p.sent < data.len() {
                let end = (p.sent + (64 << 10)).min(data.len());
                match Pin::new(&mut *stream).poll_write(cx, &data[p.sent..end]) {
                    Poll::Ready(Ok(n)) => {
                        p.sent += n;
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(format!("client write: {e}"))),
                    Poll::Pending => {}
                }
            } else if !shut {
                if let Poll::Ready(Err(e)) = Pin::new(&mut *stream).poll_shutdown(cx) {
                    return Poll::Ready(Err(format!("client shutdown: {e}")));
                }
                shut = true;
            }
            let mut rb = ReadBuf::new(&mut buf);
            match Pin::new(&mut *stream).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    return Poll::Ready(if p.echoed == data.len() {
                        Ok(())
                    } else {
                        Err(format!("echo ended after {} bytes", p.echoed))
                    });
                }
                Poll::Ready(Ok(())) => {
                    let got = rb.filled();
                    let Some(want) = data.get(p.echoed..p.echoed + got.len()) else {
                        return Poll::Ready(Err("more bytes echoed than sent".into()));
                    };
                    if let Some(i) = first_difference(got, want) {
                        return Poll::Ready(Err(format!("echoed byte {} differs", p.echoed + i)));
                    }
                    p.echoed += got.len();
                    progress = true;
                    if let Some(at) = p.migrated_at
                        && p.resumed_after.is_none()
                        && p.echoed > p.echoed_at_migration
                    {
                        p.resumed_after = Some(at.elapsed());
                    }
                    if p.link_down_at.is_none() && p.echoed >= data.len() / 3 {
                        link_down();
                        no_routes_before = out_no_routes();
                        p.link_down_at = Some(Instant::now());
                        p.sent_at_link_down = p.sent;
                        p.echoed_at_link_down = p.echoed;
                        detect = Some(Box::pin(tokio::time::sleep(DETECTION_DELAY)));
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(format!("client read: {e}"))),
                Poll::Pending => {}
            }
            if let Some(d) = detect.as_mut()
                && d.as_mut().poll(cx).is_ready()
            {
                detect = None;
                p.unroutable = out_no_routes() - no_routes_before;
                if let Err(e) = stream.migrate(new) {
                    return Poll::Ready(Err(format!("migrate: {e}")));
                }
                p.migrated_at = Some(Instant::now());
                p.echoed_at_migration = p.echoed;
                progress = true;
            }
            if let Some(at) = p.migrated_at
                && p.switched_after.is_none()
                && stream.local_locator().is_ok_and(|l| l == new)
            {
                p.switched_after = Some(at.elapsed());
            }
            if !progress {
                return Poll::Pending;
            }
        }
    })
    .await
}

async fn client(link1: String, client_ns: String, data: Arc<Vec<u8>>) -> ClientReport {
    let service = ServiceId::from_name(SERVICE).unwrap();
    let server: SocketAddr = SERVER_ADDR.parse().unwrap();
    // This test moves the flow itself, late (as a host that learns late of its link's
    // loss): the endpoint must not follow the host by itself (tests/netns_follow.rs does).
    let ep = Endpoint::bind_following(
        &[
            format!("{CLIENT_LINK1}:0").parse().unwrap(),
            format!("{CLIENT_LINK2}:0").parse().unwrap(),
        ],
        serval::EndpointConfig::default(),
        FollowHost::Off,
    )
    .await
    .expect("client bind");
    let (old, new) = (ep.local_locators()[0], ep.local_locators()[1]);
    let start = Instant::now();
    let mut stream = timeout(Duration::from_secs(20), ep.connect_via(service, server))
        .await
        .expect("connect timed out")
        .expect("connect by name");
    assert_eq!(
        stream.local_locator().unwrap(),
        old,
        "connected over link 1"
    );
    assert_eq!(stream.peer_locator().unwrap(), server);
    let link_down = || {
        // The old path dies first: whatever is in flight on it, or still sent on it, is lost.
        ip(&["-n", &client_ns, "link", "set", &link1, "down"]);
    };
    let mut progress = ClientProgress::default();
    match timeout(
        LIMIT,
        pump(&mut stream, &data, new, &link_down, &mut progress),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{e} ({progress:?})"),
        Err(_) => panic!(
            "transfer timed out after {LIMIT:?} ({progress:?}, local locator {:?})",
            stream.local_locator()
        ),
    }
    let elapsed = start.elapsed();
    let local_after = stream.local_locator().unwrap();
    let closed = timeout(CLOSE_LIMIT, stream.closed())
        .await
        .expect("client: the flow did not close");
    ClientReport {
        old,
        new,
        local_after,
        progress,
        closed,
        elapsed,
    }
}

#[test]
fn stream_survives_client_link_loss_across_namespaces() {
    if !serval_testkit::require_netns("stream_survives_client_link_loss_across_namespaces") {
        return;
    }
    let hosts = Hosts::new("");
    let data = Arc::new(pattern(TOTAL, 0x5e12_7a1d));

    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = {
        let data = data.clone();
        in_netns(&hosts.server, move || serve(ready_tx, data))
    };
    match ready_rx.recv_timeout(Duration::from_secs(10)) {
        Ok(()) => {}
        Err(_) => panic!("server did not start: {:?}", server.join()),
    }
    let client = {
        let (link1, ns, data) = (hosts.link1.clone(), hosts.client.clone(), data.clone());
        in_netns(&hosts.client, move || client(link1, ns, data))
    };
    // A thread's panic is re-raised here with its own message; `hosts` is dropped either way.
    let c = client
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    // What the server sent towards the client's old address after link 1 went down.
    let lost = tx_dropped(&hosts.server, &hosts.server_link1);
    let s = server
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
        .unwrap_or_else(|e| panic!("{e}"));
    let pr = &c.progress;
    eprintln!(
        "{} MiB echoed in {:.2?}; link 1 down at {} MiB sent / {} MiB echoed; migrated {:?} \
         later; new locator in use {:?} and echo flowing again {:?} after the migration; \
         lost on the dead link: {lost} packets from the server, {} from the client",
        TOTAL >> 20,
        c.elapsed,
        pr.sent_at_link_down >> 20,
        pr.echoed_at_link_down >> 20,
        pr.link_down_at.zip(pr.migrated_at).map(|(d, m)| m - d),
        pr.switched_after,
        pr.resumed_after,
        pr.unroutable,
    );

    assert!(
        lost + pr.unroutable > 0,
        "nothing was lost on link 1: the test did not cut a live path"
    );
    assert_eq!(s.received, TOTAL, "server received every byte once");
    assert_eq!(pr.echoed, TOTAL, "client got every byte back once");
    assert!(
        pr.echoed_at_migration < TOTAL,
        "the migration happened mid-transfer"
    );
    assert_eq!(c.local_after, c.new, "client stream moved to link 2");
    assert!(
        pr.switched_after.is_some(),
        "client never saw its new locator in use"
    );
    assert_eq!(
        s.peers,
        vec![c.old, c.new],
        "server saw the client move once"
    );
    assert_eq!(c.closed, CloseReason::Finished, "client closed cleanly");
    assert_eq!(s.closed, CloseReason::Finished, "server closed cleanly");
    drop(hosts);
}

/// Over IPv6 the largest UDP payload of a 1500-byte link is 1452, 20 bytes less than over IPv4.
/// Path-MTU discovery must settle there without a lost probe: a probe sized for IPv4 is
/// refused by the sending kernel (EMSGSIZE), and it used to take the FIN batched behind it
/// down too, so every IPv6 close waited a second for a retransmission.
#[test]
fn ipv6_paths_settle_their_mtu_without_a_lost_probe() {
    if !serval_testkit::require_netns("ipv6_paths_settle_their_mtu_without_a_lost_probe") {
        return;
    }
    let hosts = Hosts::new("6");
    const SIX: usize = 4 << 20;
    let data = Arc::new(pattern(SIX, 0x6606));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = in_netns(&hosts.server, move || async move {
        let ep = Endpoint::bind(&["[fd78:1::2]:54324".parse().unwrap()])
            .await
            .unwrap();
        let mut l = ep
            .listen(ServicePrefix::exact(ServiceId::from_name(SERVICE).unwrap()))
            .unwrap();
        ready_tx.send(()).unwrap();
        let mut s = timeout(LIMIT, l.accept()).await.unwrap().unwrap();
        let (mut r, mut w) = s.split();
        timeout(LIMIT, tokio::io::copy(&mut r, &mut w))
            .await
            .unwrap()
            .unwrap();
        w.shutdown().await.unwrap();
        let closed = timeout(CLOSE_LIMIT, s.closed()).await.unwrap();
        (closed, s.stats())
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let client = in_netns(&hosts.client, move || async move {
        let ep = Endpoint::bind(&["[fd78:1::1]:0".parse().unwrap()])
            .await
            .unwrap();
        let id = ServiceId::from_name(SERVICE).unwrap();
        let mut s = timeout(
            LIMIT,
            ep.connect_via(id, "[fd78:1::2]:54324".parse().unwrap()),
        )
        .await
        .unwrap()
        .unwrap();
        let mut back = Vec::with_capacity(SIX);
        {
            let (mut r, mut w) = s.split();
            let send = async {
                w.write_all(&data).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let recv = async { r.read_to_end(&mut back).await.unwrap() };
            timeout(LIMIT, async { tokio::join!(send, recv) })
                .await
                .unwrap();
        }
        let stats = s.stats().unwrap();
        let closed = timeout(CLOSE_LIMIT, s.closed()).await.unwrap();
        (back == *data, stats, closed)
    });
    let (echoed, c, c_closed) = client
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    let (s_closed, s_stats) = server
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    eprintln!("IPv6 client transport: {c:?}");
    assert!(echoed, "every byte came back in order");
    assert_eq!(c_closed, CloseReason::Finished);
    assert_eq!(s_closed, CloseReason::Finished);
    assert!(c.mtu_probes_sent >= 1, "the client searched the path MTU");
    assert_eq!(c.mtu_probes_lost, 0, "a probe was lost: {c:?}");
    if let Ok(s) = s_stats {
        assert_eq!(s.mtu_probes_lost, 0, "a server probe was lost: {s:?}");
    }
}
