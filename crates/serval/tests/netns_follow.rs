//! Flows follow the host's links and addresses by themselves (issue 11 item 1): no
//! application call, one stream from start to end, every byte echoed exactly once and in order.
//!
//! The hosts are [`support::Hosts`]: a client and a server namespace joined by two veth links.
//! Each test streams [`TOTAL`] bytes of a seeded pattern and reads the echo on the same stream;
//! once a third has come back it changes the network under the flow from outside (`ip`), as an
//! operator or a DHCP client would, and only watches:
//!
//! * `link_down_moves_flows_to_the_other_link`: the client is bound to both links' addresses;
//!   link 1 is set down. The flow moves to link 2.
//! * `silent_loss_on_link_1_moves_flows_to_the_other_link`: the same with everything on
//!   link 1 dropped (nftables) while it stays up: the echoing client's probe timeout notices.
//! * `silent_loss_on_link_1_moves_a_receive_only_client`: the server streams, the client only
//!   reads (nothing of its own in flight); link 1 goes silent. The client's silence probe
//!   notices and the flow moves to link 2.
//! * `wildcard_client_follows_its_renumbering`: the client is bound to `0.0.0.0`; its only
//!   address on link 1 is deleted and another one added (`ip addr del` + `ip addr add`). The
//!   flow moves to the new address.
//! * `wildcard_server_follows_its_renumbering`: the same on the server's side, while the
//!   client's address stays.
//! * `both_ends_move_at_once`: the client and the server, each on the wildcard address, move
//!   their ends to their link-2 addresses in the same instant (make before break), then both
//!   old addresses are deleted.
//!
//! Each checks the bytes on both sides, that the server accepted one stream and saw its
//! client (or the client its server) move, the client's path events, and a clean close. It
//! prints the longest gap between two echoed reads at the client after the change (the
//! failover gap of BENCHMARKS.md). Needs root and `ip`; skips in one line elsewhere (fails
//! under `CI=true`); namespaces are deleted at the end, pass or fail; every wait is bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serval::{
    CloseReason, Endpoint, EndpointConfig, FollowHost, PathEvent, ServiceId, ServicePrefix, Stream,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

use support::{Hosts, first_difference, in_netns, ip, pattern, usable};

/// Bytes the client sends (and gets back).
const TOTAL: usize = 24 << 20;
/// Bounds the transfer, the change included, so a hang fails instead of stalling CI.
const LIMIT: Duration = Duration::from_secs(60);
/// Bounds the FIN exchange after the transfer.
const CLOSE_LIMIT: Duration = Duration::from_secs(15);
const SERVICE: &str = "follow.test";

/// What the server saw.
#[derive(Debug)]
struct ServerReport {
    received: usize,
    /// The client's locator as the server knew it, each change appended.
    peers: Vec<SocketAddr>,
    /// Its own locator for the flow, each change appended.
    locals: Vec<SocketAddr>,
    closed: CloseReason,
}

/// Where the server of [`both_ends_move_at_once`] moves its end.
const SERVER_MOVES_TO: &str = "10.78.2.2:54324";

/// Accepts one stream on `bind`, checks what arrives against the pattern, echoes it back.
/// With a `cue`, moves its end of the stream to [`SERVER_MOVES_TO`] when the client says so.
async fn serve(
    bind: SocketAddr,
    ready: std::sync::mpsc::Sender<()>,
    data: Arc<Vec<u8>>,
    cue: Option<ServerCue>,
) -> Result<ServerReport, String> {
    let ep = Endpoint::bind(&[bind])
        .await
        .map_err(|e| format!("server bind: {e}"))?;
    let mut listener = ep
        .listen(ServicePrefix::exact(ServiceId::from_name(SERVICE).unwrap()))
        .map_err(|e| format!("listen: {e}"))?;
    let move_to: SocketAddr = SERVER_MOVES_TO.parse().unwrap();
    if bind.ip().is_unspecified() {
        // A link's carrier (IFF_RUNNING) can follow its set-up by a moment: wait for the
        // address the client will reach (and the one the server moves to) to be usable, so
        // that the server's flow names it.
        let mut want = vec![SocketAddr::from(([10, 78, 1, 2], bind.port()))];
        if cue.is_some() {
            want.push(move_to);
        }
        usable(&ep, &want, Duration::from_secs(10)).await?;
    }
    let _ = ready.send(());
    let mut received = 0usize;
    let mut peers = Vec::new();
    let mut locals = Vec::new();
    let echo = async {
        let mut s = listener
            .accept()
            .await
            .map_err(|e| format!("accept: {e}"))?;
        let mut buf = vec![0u8; 64 << 10];
        let mut cue = cue.as_ref();
        loop {
            let p = s.peer_locator().map_err(|e| e.to_string())?;
            if peers.last() != Some(&p) {
                peers.push(p);
            }
            let l = s.local_locator().map_err(|e| e.to_string())?;
            if locals.last() != Some(&l) {
                locals.push(l);
            }
            let read = match cue {
                None => s.read(&mut buf).await,
                Some(c) => tokio::select! {
                    r = s.read(&mut buf) => r,
                    () = c.wake.notified() => {
                        let _ = c.arrived.send(());
                        c.go.recv_timeout(CUE_LIMIT)
                            .map_err(|_| "server: no go from the client".to_string())?;
                        s.migrate(move_to).map_err(|e| format!("server migrate: {e}"))?;
                        cue = None;
                        continue;
                    }
                },
            };
            let n = read.map_err(|e| format!("server read: {e}"))?;
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
            s.write_all(&buf[..n])
                .await
                .map_err(|e| format!("server write: {e}"))?;
        }
        s.shutdown()
            .await
            .map_err(|e| format!("server shutdown: {e}"))?;
        Ok::<_, String>(s)
    };
    let s = timeout(LIMIT, echo).await.map_err(|_| {
        format!("server timed out: received {received}, peers {peers:?}, locals {locals:?}")
    })??;
    let closed = timeout(CLOSE_LIMIT, s.closed())
        .await
        .map_err(|_| "server: the flow did not close".to_string())?;
    // A second stream would mean the client reconnected: there is none.
    let again = timeout(Duration::from_millis(50), listener.accept()).await;
    if let Ok(Ok(_)) = again {
        return Err("server accepted a second stream".into());
    }
    Ok(ServerReport {
        received,
        peers,
        locals,
        closed,
    })
}

/// What the client saw.
#[derive(Debug)]
struct ClientReport {
    /// The client endpoint's sockets once bound (with those bound for the host's addresses).
    sockets_at_start: Vec<SocketAddr>,
    local_before: SocketAddr,
    local_after: SocketAddr,
    peer_after: SocketAddr,
    echoed: usize,
    /// Bytes echoed when the network changed.
    echoed_at_change: usize,
    /// The longest gap between two echoed reads after the change.
    gap: Duration,
    events: Vec<PathEvent>,
    closed: CloseReason,
    elapsed: Duration,
}

/// Writes `data` and reads its echo on one stream at once, checking every byte; calls
/// `change` once a third has come back, and measures the longest receive gap after it.
async fn pump(
    stream: &mut Stream,
    data: &[u8],
    change: &dyn Fn(),
) -> Result<(usize, usize, Duration), String> {
    let (mut r, mut w) = stream.split();
    let send = async {
        w.write_all(data)
            .await
            .map_err(|e| format!("client write: {e}"))?;
        w.shutdown()
            .await
            .map_err(|e| format!("client shutdown: {e}"))
    };
    let recv = async {
        let mut buf = vec![0u8; 64 << 10];
        let mut echoed = 0usize;
        let mut changed: Option<(Instant, usize)> = None;
        let mut last = Instant::now();
        let mut gap = Duration::ZERO;
        loop {
            let n = r
                .read(&mut buf)
                .await
                .map_err(|e| format!("client read after {echoed} bytes: {e}"))?;
            let now = Instant::now();
            if n == 0 {
                break;
            }
            if changed.is_some() {
                gap = gap.max(now - last);
            }
            last = now;
            let want = data
                .get(echoed..echoed + n)
                .ok_or("more bytes echoed than sent")?;
            if let Some(i) = first_difference(&buf[..n], want) {
                return Err(format!("echoed byte {} differs", echoed + i));
            }
            echoed += n;
            if changed.is_none() && echoed >= data.len() / 3 {
                change();
                let at = Instant::now();
                last = at;
                changed = Some((at, echoed));
            }
        }
        let at_change = changed.map_or(0, |c| c.1);
        Ok::<_, String>((echoed, at_change, gap))
    };
    let (sent, got) = tokio::join!(send, recv);
    sent?;
    got
}

async fn client(
    binds: Vec<SocketAddr>,
    follow: FollowHost,
    server: SocketAddr,
    data: Arc<Vec<u8>>,
    change: Box<dyn Fn() + Send>,
) -> ClientReport {
    let service = ServiceId::from_name(SERVICE).unwrap();
    let ep = Endpoint::bind_following(&binds, EndpointConfig::default(), follow)
        .await
        .expect("client bind");
    let sockets_at_start = ep.local_locators();
    let mut events = ep.path_events();
    let start = Instant::now();
    let mut stream = timeout(Duration::from_secs(20), ep.connect_via(service, server))
        .await
        .expect("connect timed out")
        .expect("connect by name");
    let local_before = stream.local_locator().unwrap();
    let (echoed, echoed_at_change, gap) =
        match timeout(LIMIT, pump(&mut stream, &data, &*change)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("{e} (local {:?})", stream.local_locator()),
            Err(_) => panic!(
                "transfer timed out after {LIMIT:?} (local {:?}, peer {:?})",
                stream.local_locator(),
                stream.peer_locator()
            ),
        };
    let elapsed = start.elapsed();
    let local_after = stream.local_locator().unwrap();
    let peer_after = stream.peer_locator().unwrap();
    let closed = timeout(CLOSE_LIMIT, stream.closed())
        .await
        .expect("client: the flow did not close");
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e);
    }
    ClientReport {
        sockets_at_start,
        local_before,
        local_after,
        peer_after,
        echoed,
        echoed_at_change,
        gap,
        events: seen,
        closed,
        elapsed,
    }
}

/// Runs a server on `server_bind` and a client on `client_binds` connecting to `connect_to`,
/// with `change` run (in the client's thread) once a third of the echo is back.
fn run(
    hosts: &Hosts,
    server_bind: &str,
    client_binds: &[&str],
    follow: FollowHost,
    connect_to: &str,
    change: Box<dyn Fn() + Send>,
) -> (ServerReport, ClientReport) {
    let data = Arc::new(pattern(TOTAL, 0xf011_0c0d));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = {
        let (data, bind) = (data.clone(), server_bind.parse().unwrap());
        in_netns(&hosts.server, move || serve(bind, ready_tx, data, None))
    };
    match ready_rx.recv_timeout(Duration::from_secs(10)) {
        Ok(()) => {}
        Err(_) => panic!("server did not start: {:?}", server.join()),
    }
    let client = {
        let binds = client_binds.iter().map(|b| b.parse().unwrap()).collect();
        let to = connect_to.parse().unwrap();
        in_netns(&hosts.client, move || {
            client(binds, follow, to, data, change)
        })
    };
    let c = client
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    let s = server
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "{} MiB echoed in {:.2?}; changed at {} MiB echoed; longest receive gap after: {:.1?}; \
         client {} -> {}; server saw client {:?} from {:?}; client events {:?}",
        TOTAL >> 20,
        c.elapsed,
        c.echoed_at_change >> 20,
        c.gap,
        c.local_before,
        c.local_after,
        s.peers,
        s.locals,
        c.events,
    );
    assert_eq!(s.received, TOTAL, "server received every byte once");
    assert_eq!(c.echoed, TOTAL, "client got every byte back once");
    assert!(
        c.echoed_at_change > 0 && c.echoed_at_change < TOTAL,
        "the change happened mid-transfer"
    );
    assert_eq!(c.closed, CloseReason::Finished, "client closed cleanly");
    assert_eq!(s.closed, CloseReason::Finished, "server closed cleanly");
    (s, c)
}

fn moved(events: &[PathEvent], to: SocketAddr) -> bool {
    events
        .iter()
        .any(|e| matches!(e, PathEvent::Moved { to: t, .. } if *t == to))
}

#[test]
fn link_down_moves_flows_to_the_other_link() {
    if !serval_testkit::require_netns("link_down_moves_flows_to_the_other_link") {
        return;
    }
    let hosts = Hosts::new("f");
    let (ns, link1) = (hosts.client.clone(), hosts.link1.clone());
    let (s, c) = run(
        &hosts,
        "10.78.0.1:54324",
        &["10.78.1.1:0", "10.78.2.1:0"],
        FollowHost::Flows,
        "10.78.0.1:54324",
        Box::new(move || ip(&["-n", &ns, "link", "set", &link1, "down"])),
    );
    assert_eq!(c.local_before.ip().to_string(), "10.78.1.1");
    assert_eq!(
        c.local_after.ip().to_string(),
        "10.78.2.1",
        "moved to link 2"
    );
    assert_eq!(
        s.peers,
        vec![c.local_before, c.local_after],
        "server saw one move"
    );
    assert!(
        c.events
            .contains(&PathEvent::AddressRemoved(c.local_before)),
        "the client heard link 1's address go: {:?}",
        c.events
    );
    assert!(moved(&c.events, c.local_after), "{:?}", c.events);
    drop(hosts);
}

#[test]
fn silent_loss_on_link_1_moves_flows_to_the_other_link() {
    let test = "silent_loss_on_link_1_moves_flows_to_the_other_link";
    if !serval_testkit::require_netns(test)
        || serval_testkit::require_program(test, "nft").is_none()
    {
        return;
    }
    let hosts = Hosts::new("q");
    let (ns, link1) = (hosts.client.clone(), hosts.link1.clone());
    // Everything on link 1 is dropped, both ways, while the link and its address stay up: no
    // event tells the runtime; only the transport's silence does.
    let (s, c) = run(
        &hosts,
        "10.78.0.1:54324",
        &["10.78.1.1:0", "10.78.2.1:0"],
        FollowHost::Flows,
        "10.78.0.1:54324",
        Box::new(move || {
            serval_testkit::nft(
                &ns,
                &format!(
                    "table inet silent {{\n chain out {{ type filter hook output priority 0; \
                     oifname \"{link1}\" drop; }}\n chain in {{ type filter hook input priority \
                     0; iifname \"{link1}\" drop; }}\n}}\n"
                ),
            );
        }),
    );
    assert_eq!(c.local_before.ip().to_string(), "10.78.1.1");
    assert_eq!(
        c.local_after.ip().to_string(),
        "10.78.2.1",
        "moved to link 2"
    );
    assert_eq!(
        s.peers,
        vec![c.local_before, c.local_after],
        "server saw one move"
    );
    assert!(
        !c.events
            .contains(&PathEvent::AddressRemoved(c.local_before)),
        "no address went: {:?}",
        c.events
    );
    drop(hosts);
}

/// Accepts one stream on `bind` and writes `data` on it, reading nothing; then finishes.
/// Returns the client's locators as the server saw them and how the flow closed.
async fn stream_out(
    bind: SocketAddr,
    ready: std::sync::mpsc::Sender<()>,
    data: Arc<Vec<u8>>,
) -> Result<(Vec<SocketAddr>, CloseReason), String> {
    let ep = Endpoint::bind(&[bind])
        .await
        .map_err(|e| format!("server bind: {e}"))?;
    let mut listener = ep
        .listen(ServicePrefix::exact(ServiceId::from_name(SERVICE).unwrap()))
        .map_err(|e| format!("listen: {e}"))?;
    let _ = ready.send(());
    let mut s = timeout(LIMIT, listener.accept())
        .await
        .map_err(|_| "no client".to_string())?
        .map_err(|e| format!("accept: {e}"))?;
    let mut peers = vec![s.peer_locator().map_err(|e| e.to_string())?];
    let write = async {
        for chunk in data.chunks(256 << 10) {
            s.write_all(chunk)
                .await
                .map_err(|e| format!("server write: {e}"))?;
            let p = s.peer_locator().map_err(|e| e.to_string())?;
            if peers.last() != Some(&p) {
                peers.push(p);
            }
        }
        s.shutdown()
            .await
            .map_err(|e| format!("server shutdown: {e}"))
    };
    timeout(LIMIT, write)
        .await
        .map_err(|_| format!("server timed out writing; peers {peers:?}"))??;
    let closed = timeout(CLOSE_LIMIT, s.closed())
        .await
        .map_err(|_| "server: the flow did not close".to_string())?;
    if let Ok(p) = s.peer_locator()
        && peers.last() != Some(&p)
    {
        peers.push(p);
    }
    Ok((peers, closed))
}

#[test]
fn silent_loss_on_link_1_moves_a_receive_only_client() {
    let test = "silent_loss_on_link_1_moves_a_receive_only_client";
    if !serval_testkit::require_netns(test)
        || serval_testkit::require_program(test, "nft").is_none()
    {
        return;
    }
    let hosts = Hosts::new("r");
    let (ns, link1) = (hosts.client.clone(), hosts.link1.clone());
    let data = Arc::new(pattern(TOTAL, 0x5e1e_0c0d));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = {
        let data = data.clone();
        in_netns(&hosts.server, move || {
            stream_out("10.78.0.1:54324".parse().unwrap(), ready_tx, data)
        })
    };
    if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
        panic!("server did not start: {:?}", server.join());
    }
    // The client only reads: it has nothing in flight when link 1 goes silent, so only its
    // silence probe can start the probe timeouts that move it.
    let client = in_netns(&hosts.client, move || async move {
        let binds: Vec<SocketAddr> = vec![
            "10.78.1.1:0".parse().unwrap(),
            "10.78.2.1:0".parse().unwrap(),
        ];
        let ep = Endpoint::bind_following(&binds, EndpointConfig::default(), FollowHost::Flows)
            .await
            .expect("client bind");
        let mut events = ep.path_events();
        let service = ServiceId::from_name(SERVICE).unwrap();
        let mut s = timeout(
            Duration::from_secs(20),
            ep.connect_via(service, "10.78.0.1:54324".parse().unwrap()),
        )
        .await
        .expect("connect timed out")
        .expect("connect by name");
        let before = s.local_locator().unwrap();
        let read = async {
            let mut buf = vec![0u8; 64 << 10];
            let (mut got, mut gap) = (0usize, Duration::ZERO);
            let mut silenced: Option<Instant> = None;
            let mut last = Instant::now();
            loop {
                let n = s
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("client read after {got} bytes: {e}"))?;
                if n == 0 {
                    break;
                }
                let now = Instant::now();
                if silenced.is_some() {
                    gap = gap.max(now - last);
                }
                last = now;
                let want = data.get(got..got + n).ok_or("more bytes than sent")?;
                if let Some(i) = first_difference(&buf[..n], want) {
                    return Err(format!("byte {} differs", got + i));
                }
                got += n;
                if silenced.is_none() && got >= TOTAL / 3 {
                    serval_testkit::nft(
                        &ns,
                        &format!(
                            "table inet silent {{\n chain out {{ type filter hook output \
                             priority 0; oifname \"{link1}\" drop; }}\n chain in {{ type \
                             filter hook input priority 0; iifname \"{link1}\" drop; }}\n}}\n"
                        ),
                    );
                    silenced = Some(Instant::now());
                    last = Instant::now();
                }
            }
            Ok::<_, String>((got, gap))
        };
        let (got, gap) = match timeout(LIMIT, read).await {
            Ok(r) => r.unwrap_or_else(|e| panic!("{e}")),
            Err(_) => panic!(
                "transfer timed out after {LIMIT:?} (local {:?})",
                s.local_locator()
            ),
        };
        s.shutdown().await.expect("client shutdown");
        let closed = match timeout(CLOSE_LIMIT, s.closed()).await {
            Ok(c) => c,
            Err(_) => {
                let mut seen = Vec::new();
                while let Ok(e) = events.try_recv() {
                    seen.push(e);
                }
                panic!(
                    "client: the flow did not close: {:?} {:?} {seen:?}",
                    s.stats(),
                    ep.stats().path_failovers,
                )
            }
        };
        let after = s.local_locator().unwrap();
        let mut seen = Vec::new();
        while let Ok(e) = events.try_recv() {
            seen.push(e);
        }
        let failovers = ep.stats().path_failovers;
        (got, gap, before, after, closed, seen, failovers)
    });
    let (got, gap, before, after, closed, events, failovers) = client
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    let (peers, server_closed) = server
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "{} MiB received; longest receive gap after the silence: {gap:.1?}; client {before} -> \
         {after}; server saw client {peers:?}; client events {events:?}",
        TOTAL >> 20
    );
    assert_eq!(got, TOTAL, "every byte once, in order");
    assert_eq!(before.ip().to_string(), "10.78.1.1");
    assert_eq!(after.ip().to_string(), "10.78.2.1", "moved to link 2");
    assert_eq!(peers, vec![before, after], "server saw one move");
    assert!(moved(&events, after), "{events:?}");
    assert_eq!(
        failovers, 1,
        "one move, by the silence: none on a live path"
    );
    assert_eq!(closed, CloseReason::Finished, "client closed cleanly");
    assert_eq!(
        server_closed,
        CloseReason::Finished,
        "server closed cleanly"
    );
    drop(hosts);
}

#[test]
fn wildcard_client_follows_its_renumbering() {
    if !serval_testkit::require_netns("wildcard_client_follows_its_renumbering") {
        return;
    }
    let hosts = Hosts::new("w");
    let (ns, link1) = (hosts.client.clone(), hosts.link1.clone());
    let (s, c) = run(
        &hosts,
        "0.0.0.0:54324",
        &["0.0.0.0:0"],
        FollowHost::Flows,
        "10.78.1.2:54324",
        Box::new(move || {
            ip(&["-n", &ns, "addr", "del", "10.78.1.1/24", "dev", &link1]);
            ip(&["-n", &ns, "addr", "add", "10.78.1.7/24", "dev", &link1]);
        }),
    );
    assert!(c.local_before.ip().is_unspecified(), "a wildcard client");
    assert_eq!(
        c.local_after.ip().to_string(),
        "10.78.1.7",
        "the flow now names its new address"
    );
    assert_eq!(
        s.peers
            .iter()
            .map(|p| p.ip().to_string())
            .collect::<Vec<_>>(),
        ["10.78.1.1", "10.78.1.7"],
        "server saw the client move once"
    );
    assert_eq!(
        s.locals.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        ["10.78.1.2:54324"],
        "a wildcard server knows the address its client reached"
    );
    assert!(moved(&c.events, c.local_after), "{:?}", c.events);
    drop(hosts);
}

#[test]
fn wildcard_server_follows_its_renumbering() {
    if !serval_testkit::require_netns("wildcard_server_follows_its_renumbering") {
        return;
    }
    let hosts = Hosts::new("v");
    let ns = hosts.server.clone();
    let dev = hosts.server_link1.clone();
    let (s, c) = run(
        &hosts,
        "0.0.0.0:54324",
        &["0.0.0.0:0"],
        FollowHost::Flows,
        "10.78.1.2:54324",
        Box::new(move || {
            ip(&["-n", &ns, "addr", "del", "10.78.1.2/24", "dev", &dev]);
            ip(&["-n", &ns, "addr", "add", "10.78.1.9/24", "dev", &dev]);
        }),
    );
    assert_eq!(
        s.locals.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        ["10.78.1.2:54324", "10.78.1.9:54324"],
        "the server's flow moved to its new address"
    );
    assert_eq!(
        c.peer_after.to_string(),
        "10.78.1.9:54324",
        "the client follows its server"
    );
    assert_eq!(s.peers.len(), 1, "the client's address stayed");
    drop(hosts);
}

/// The server's side of starting both moves of [`both_ends_move_at_once`] together: the
/// client wakes it (`wake`); it says it is there (`arrived`) and blocks, its runtime with it,
/// until the client says go (`go`); each then calls `migrate` before its runtime can receive
/// the other's RSYN. Every wait is bounded.
struct ServerCue {
    wake: Arc<tokio::sync::Notify>,
    arrived: std::sync::mpsc::Sender<()>,
    go: std::sync::mpsc::Receiver<()>,
}

/// How long either end waits for the other at the start of the moves.
const CUE_LIMIT: Duration = Duration::from_secs(5);

/// Both ends move in the same instant, each to its link-2 address (issue 11: "both ends change
/// address at the same time"): the client and the server, each bound to the wildcard address,
/// start their moves together once a third of an echo has come back (each RSYN goes toward the
/// other's locator of the moment, both still there: make before break), and once both moves
/// completed both old addresses are deleted at once. Every byte is echoed once, in order; the
/// flow ends between the two new addresses and closes cleanly. (Both ends *losing* their
/// addresses at the same instant is not survived: neither RSYN can reach the other; see
/// docs/protocol.md §4.)
#[test]
fn both_ends_move_at_once() {
    if !serval_testkit::require_netns("both_ends_move_at_once") {
        return;
    }
    let hosts = Hosts::new("b");
    let data = Arc::new(pattern(TOTAL / 4, 0xb07e_0b07));
    let wake = Arc::new(tokio::sync::Notify::new());
    let (arrived_tx, arrived) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel();
    let cue = ServerCue {
        wake: wake.clone(),
        arrived: arrived_tx,
        go: go_rx,
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = {
        let data = data.clone();
        let bind = "0.0.0.0:54324".parse().unwrap();
        in_netns(&hosts.server, move || {
            serve(bind, ready_tx, data, Some(cue))
        })
    };
    if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
        panic!("server did not start: {:?}", server.join());
    }
    let (cns, clink) = (hosts.client.clone(), hosts.link1.clone());
    let (sns, sdev) = (hosts.server.clone(), hosts.server_link1.clone());
    let total = data.len();
    let client = in_netns(&hosts.client, move || async move {
        let ep = Endpoint::bind(&["0.0.0.0:0".parse().unwrap()])
            .await
            .expect("client bind");
        let port = ep.local_locators()[0].port();
        let (old, new): (SocketAddr, SocketAddr) =
            (([10, 78, 1, 1], port).into(), ([10, 78, 2, 1], port).into());
        usable(&ep, &[old, new], Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let service = ServiceId::from_name(SERVICE).unwrap();
        let mut s = timeout(
            Duration::from_secs(20),
            ep.connect_via(service, "10.78.1.2:54324".parse().unwrap()),
        )
        .await
        .expect("connect timed out")
        .expect("connect by name");
        let before = (s.local_locator().unwrap(), s.peer_locator().unwrap());
        // Blocks of 64 KiB, each echoed before the next is written.
        let (mut echoed, mut moved_at, mut deleted_at) = (0usize, None, None);
        let mut buf = vec![0u8; 64 << 10];
        let transfer = async {
            for block in data.chunks(64 << 10) {
                s.write_all(block)
                    .await
                    .map_err(|e| format!("write: {e}"))?;
                let end = echoed + block.len();
                while echoed < end {
                    let n = s.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
                    let want = data.get(echoed..echoed + n).ok_or("more than sent")?;
                    if n == 0 || first_difference(&buf[..n], want).is_some() {
                        return Err(format!("echo wrong after {echoed} bytes"));
                    }
                    echoed += n;
                }
                if moved_at.is_none() && echoed >= data.len() / 3 {
                    // Both moves start in the same instant.
                    wake.notify_one();
                    arrived
                        .recv_timeout(CUE_LIMIT)
                        .map_err(|_| "the server never got ready to move".to_string())?;
                    let _ = go.send(());
                    s.migrate(new).map_err(|e| format!("client migrate: {e}"))?;
                    moved_at = Some(echoed);
                }
                let both_moved = s.local_locator().is_ok_and(|l| l == new)
                    && s.peer_locator()
                        .is_ok_and(|p| p.ip().to_string() == "10.78.2.2");
                if deleted_at.is_none() && both_moved {
                    ip(&["-n", &cns, "addr", "del", "10.78.1.1/24", "dev", &clink]);
                    ip(&["-n", &sns, "addr", "del", "10.78.1.2/24", "dev", &sdev]);
                    deleted_at = Some(echoed);
                }
            }
            s.shutdown().await.map_err(|e| format!("shutdown: {e}"))
        };
        match timeout(LIMIT, transfer).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!(
                "{e} (local {:?}, peer {:?})",
                s.local_locator(),
                s.peer_locator()
            ),
            Err(_) => panic!(
                "timed out after {echoed} bytes (local {:?}, peer {:?})",
                s.local_locator(),
                s.peer_locator()
            ),
        }
        let after = (s.local_locator().unwrap(), s.peer_locator().unwrap());
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.expect("read to the end");
        let closed = timeout(CLOSE_LIMIT, s.closed())
            .await
            .expect("client: the flow did not close");
        (
            before,
            after,
            echoed,
            moved_at,
            deleted_at,
            rest.len(),
            closed,
        )
    });
    let (before, after, echoed, moved_at, deleted_at, extra, closed) = client
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    let s = server
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "client {before:?} -> {after:?}; moved at {moved_at:?} bytes echoed, old addresses \
         deleted at {deleted_at:?}; server saw client {:?} from {:?}",
        s.peers, s.locals
    );
    assert_eq!(echoed, total, "every byte echoed once, in order");
    assert_eq!(extra, 0, "nothing after the echo");
    assert_eq!(s.received, total, "the server got every byte once");
    assert!(
        before.0.ip().is_unspecified(),
        "a wildcard client: {before:?}"
    );
    assert_eq!(before.1.ip().to_string(), "10.78.1.2");
    assert_eq!(after.0.ip().to_string(), "10.78.2.1", "the client moved");
    assert_eq!(
        after.1.ip().to_string(),
        "10.78.2.2",
        "it follows its server's move"
    );
    assert!(
        deleted_at.is_some_and(|d| d < total),
        "both moves completed and the old addresses went mid-transfer ({deleted_at:?})"
    );
    assert_eq!(
        s.peers
            .iter()
            .map(|p| p.ip().to_string())
            .collect::<Vec<_>>(),
        ["10.78.1.1", "10.78.2.1"],
        "the server saw its client move once"
    );
    assert_eq!(
        s.locals.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        ["10.78.1.2:54324", SERVER_MOVES_TO],
        "the server's end moved once"
    );
    assert_eq!(closed, CloseReason::Finished, "client closed cleanly");
    assert_eq!(s.closed, CloseReason::Finished, "server closed cleanly");
    drop(hosts);
}

/// An endpoint that follows the host's addresses binds a socket on each address it was not
/// given: bound to link 1's address only, the client gains one on link 2's at start, and its
/// flow moves there when link 1 goes down.
#[test]
fn endpoint_following_addresses_binds_the_hosts_other_address_and_moves_there() {
    if !serval_testkit::require_netns(
        "endpoint_following_addresses_binds_the_hosts_other_address_and_moves_there",
    ) {
        return;
    }
    let hosts = Hosts::new("a");
    let (ns, link1) = (hosts.client.clone(), hosts.link1.clone());
    let (s, c) = run(
        &hosts,
        "10.78.0.1:54324",
        &["10.78.1.1:0"],
        FollowHost::Addresses,
        "10.78.0.1:54324",
        Box::new(move || ip(&["-n", &ns, "link", "set", &link1, "down"])),
    );
    let link2 = c
        .sockets_at_start
        .iter()
        .find(|l| l.ip().to_string() == "10.78.2.1")
        .copied();
    assert!(
        link2.is_some(),
        "a socket was bound on link 2's address: {:?}",
        c.sockets_at_start
    );
    assert_eq!(
        Some(c.local_after),
        link2,
        "moved to the socket bound for it"
    );
    assert_eq!(s.peers, vec![c.local_before, c.local_after]);
    drop(hosts);
}
