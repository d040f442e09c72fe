//! Multipath across real links (issue 11 item 3): a client and a server, each bound to an
//! address on each of two veth links, both with `EndpointConfig::multipath`, run one stream
//! that stripes over both links; then link 1 dies under a bidirectional transfer and the
//! stream carries on over link 2 without losing, repeating or reordering a byte.
//!
//! ```text
//!   client ns (smp<t>c<pid>)                          server ns (smp<t>s<pid>)
//!   10.79.1.1/24  mp<t>1c<pid> ==== link 1 ==== mp<t>1s<pid>  10.79.1.2/24
//!   10.79.2.1/24  mp<t>2c<pid> ==== link 2 ==== mp<t>2s<pid>  10.79.2.2/24
//! ```
//!
//! The client routes strictly by source address (`ip rule from 10.79.N.1 table 10N`, whose
//! only routes are a default via link N and, behind it, `unreachable`): whatever it sends
//! from 10.79.N.1 takes link N or nothing, even to the server's address on the other link
//! and even once link N is down. The server answers each client address over that address's
//! own link (its connected routes). So a path's link is its client address's.
//!
//! The server is bound to 10.79.1.2 and 10.79.2.2 and announces the one it was not reached
//! at; the client, bound to 10.79.1.1 and 10.79.2.1, connects to 10.79.1.2 (path 0, link 1)
//! and joins a path from 10.79.2.1 by itself (link 2; first to 10.79.1.2, the only server
//! address it knows, then to 10.79.2.2 once announced). The test waits for that path to be
//! up, then both ends write [`TOTAL`] bytes of their own seeded pattern and read the other's,
//! checking every byte as it comes. Once either direction has a third through and each end
//! has sent [`MIN_PER_LINK`] over each link (`Stream::paths`, `bytes_sent`, on the
//! sending side: the server's are sampled every millisecond), the client records those
//! counts, breaks link 1 from its reading loop, and only watches:
//!
//! * `link_down_mid_transfer_carries_on_over_link_2`: link 1 set down (`ip link set down` on
//!   the client's end; the server's end loses its carrier, so both runtimes hear of it).
//! * `silent_loss_on_link_1_carries_on_over_link_2`: everything on link 1 dropped both ways
//!   by nftables in the client's namespace while both links stay up: no host event, only the
//!   transports' probe timers find it.
//!
//! Each checks every byte both ways, that link 1 broke while both directions were still
//! under way, that both links had carried stream data in both directions before (the stream
//! really striped; a stream that never does fails), a clean close at both ends within
//! [`CLOSE_LIMIT`], and prints the longest receive gap at the client after the failure, the
//! bytes each end had sent per link, the paths and the client's path events.
//!
//! Needs root and `ip` (and `nft` for the silent case). Elsewhere (or with `SERVAL_SKIP_NETNS`
//! set) each test skips with one printed line (`serval_testkit::require_netns`); under
//! `CI=true` it fails instead. The namespaces are deleted when the test ends, pass or fail (a
//! guard's `Drop`, also while a panic unwinds), and every wait has a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

mod support;

use std::cell::{Cell, RefCell};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serval::{
    CloseReason, Endpoint, EndpointConfig, PathEvent, PathSummary, ServiceId, ServicePrefix, Stream,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

use support::{delete_netns, first_difference, in_netns, ip, pattern, usable};

/// Bytes each end sends (and the other receives).
const TOTAL: usize = 8 << 20;
/// Bounds the transfer, the failure included, so a hang fails instead of stalling CI.
const LIMIT: Duration = Duration::from_secs(90);
/// Bounds set-up steps: links coming up, the endpoints seeing their addresses, the join.
const SETUP_LIMIT: Duration = Duration::from_secs(10);
/// Bounds the FIN exchange after the transfer.
const CLOSE_LIMIT: Duration = Duration::from_secs(15);
/// Least a sender must have put on each link when link 1 broke for the stream to count as
/// striped: some 45 full packets, far more than the join, PINGs and the acknowledgements of
/// what the path received would make (what each link carried is printed; which path takes
/// how much is the lowest-RTT-first scheduler's, so the split varies from run to run).
const MIN_PER_LINK: u64 = 64 << 10;
const SERVICE: &str = "multipath-netns.test";
const PORT: u16 = 54331;
const CLIENT_SEED: u32 = 0xc11e_0001;
const SERVER_SEED: u32 = 0x5e7e_0002;

/// `10.79.<link>.<host>`: host 1 is the client, 2 the server.
fn addr(link: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 79, link, host))
}

/// The link a locator of this topology belongs to (its third octet), 0 if none.
fn link_of(l: SocketAddr) -> usize {
    match l.ip() {
        IpAddr::V4(a) if a.octets()[..2] == [10, 79] => usize::from(a.octets()[2]),
        _ => 0,
    }
}

/// The two hosts and the two links between them; deleted on drop.
struct Net {
    client: String,
    server: String,
    /// The client's end of link 1 and of link 2.
    client_links: [String; 2],
}

impl Net {
    /// The hosts, named with `tag` and this process's ID so tests can run side by side.
    fn new(tag: &str) -> Net {
        let id = std::process::id();
        let net = Net {
            client: format!("smp{tag}c{id}"),
            server: format!("smp{tag}s{id}"),
            client_links: [format!("mp{tag}1c{id}"), format!("mp{tag}2c{id}")],
        };
        // `net` exists before the first `ip` call: a step that fails part-way panics, which
        // drops it and deletes whatever was made.
        ip(&["netns", "add", &net.client]);
        ip(&["netns", "add", &net.server]);
        let (c, s) = (net.client.as_str(), net.server.as_str());
        for ns in [c, s] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let mut ends = Vec::new();
        for link in 1..=2u8 {
            let (vc, vs) = (format!("mp{tag}{link}c{id}"), format!("mp{tag}{link}s{id}"));
            // Both ends born inside the namespaces: nothing is left in the root namespace.
            ip(&[
                "link", "add", &vc, "netns", c, "type", "veth", "peer", "name", &vs, "netns", s,
            ]);
            let (ac, as_) = (addr(link, 1).to_string(), addr(link, 2).to_string());
            ip(&["-n", c, "addr", "add", &format!("{ac}/24"), "dev", &vc]);
            ip(&["-n", s, "addr", "add", &format!("{as_}/24"), "dev", &vs]);
            ip(&["-n", c, "link", "set", &vc, "up"]);
            ip(&["-n", s, "link", "set", &vs, "up"]);
            // Strict source routing on the client: from 10.79.N.1 only link N, or nothing.
            let table = format!("10{link}");
            ip(&["-n", c, "rule", "add", "from", &ac, "table", &table]);
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
            ends.push((c.to_string(), vc));
            ends.push((s.to_string(), vs));
        }
        // Every end's carrier up before an endpoint looks at the host's links.
        let deadline = Instant::now() + SETUP_LIMIT;
        for (ns, dev) in ends {
            while !link_up(&ns, &dev) {
                assert!(Instant::now() < deadline, "{dev} in {ns} never came up");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        net
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        delete_netns(&[&self.client, &self.server]);
    }
}

/// Whether `dev` in namespace `ns` is operationally up (carrier included).
fn link_up(ns: &str, dev: &str) -> bool {
    let out = Command::new("ip")
        .args(["-n", ns, "-j", "link", "show", "dev", dev])
        .output()
        .expect("run ip");
    String::from_utf8_lossy(&out.stdout).contains("\"operstate\":\"UP\"")
}

/// Both ends' configuration: multipath on (the runtime follows the host, the default).
fn config() -> EndpointConfig {
    EndpointConfig {
        multipath: true,
        ..EndpointConfig::default()
    }
}

/// What both threads share.
struct Shared {
    /// What the client sends, and what the server sends: made before either end starts
    /// (making 8 MiB of pattern in a debug build blocks a runtime long enough for its peer's
    /// probe timers to find the path silent).
    client_data: Vec<u8>,
    server_data: Vec<u8>,
    /// Stream bytes the server has received, checked.
    server_received: AtomicUsize,
    /// The server stream's paths, refreshed every millisecond during the transfer.
    server_paths: Mutex<Vec<PathSummary>>,
    /// Set by the client once it broke link 1.
    failed: AtomicBool,
}

/// Stream bytes sent per link so far: `[link 1, link 2]`, a path's link being that of its
/// client-side locator (`client_side` picks the local or the remote one).
fn per_link(paths: &[PathSummary], client_side: impl Fn(&PathSummary) -> SocketAddr) -> [u64; 2] {
    let mut v = [0u64; 2];
    for p in paths {
        if let (l @ 1..=2, Some(t)) = (link_of(client_side(p)), p.transport) {
            v[l - 1] += t.bytes_sent;
        }
    }
    v
}

/// Writes `out` (then finishes) and reads the peer's bytes to their end, checking them
/// against `want` as they come and counting them in `got`. With `failure`, its first part is
/// called after every read until it returns true (it broke the link), and the longest time
/// between two reads after that is kept in its second. If it never returned true, the
/// transfer fails.
async fn exchange(
    s: &Stream,
    out: &[u8],
    want: &[u8],
    got: &AtomicUsize,
    failure: Option<(&dyn Fn() -> bool, &Cell<Duration>)>,
) -> Result<(), String> {
    let (mut reader, mut writer) = (s, s);
    let write = async {
        writer
            .write_all(out)
            .await
            .map_err(|e| format!("write: {e}"))?;
        writer
            .shutdown()
            .await
            .map_err(|e| format!("shutdown: {e}"))
    };
    let read = async {
        let mut buf = vec![0u8; 64 << 10];
        let mut n_got = 0usize;
        let mut last = Instant::now();
        let mut failed = false;
        loop {
            let n = reader
                .read(&mut buf)
                .await
                .map_err(|e| format!("read after {n_got} bytes: {e}"))?;
            let now = Instant::now();
            if let Some((_, longest)) = failure
                && failed
            {
                longest.set(longest.get().max(now - last));
            }
            last = now;
            if n == 0 {
                break;
            }
            let w = want
                .get(n_got..n_got + n)
                .ok_or_else(|| format!("{} bytes received, more than sent", n_got + n))?;
            if let Some(i) = first_difference(&buf[..n], w) {
                return Err(format!("received byte {} differs", n_got + i));
            }
            n_got += n;
            got.store(n_got, Ordering::Relaxed);
            if let Some((fail, _)) = failure
                && !failed
                && fail()
            {
                failed = true;
                last = Instant::now();
            }
        }
        if failure.is_some() && !failed {
            return Err("the transfer ended before link 1 was broken".into());
        }
        if n_got == want.len() {
            Ok(())
        } else {
            Err(format!(
                "the stream ended after {n_got} of {} bytes",
                want.len()
            ))
        }
    };
    let (w, r) = tokio::join!(write, read);
    w.and(r)
}

/// What the server saw.
#[derive(Debug)]
struct ServerReport {
    received: usize,
    paths_after: Vec<PathSummary>,
    closed: CloseReason,
}

async fn serve(
    ready: std::sync::mpsc::Sender<()>,
    shared: Arc<Shared>,
) -> Result<ServerReport, String> {
    let binds: Vec<SocketAddr> = (1..=2).map(|l| (addr(l, 2), PORT).into()).collect();
    let ep = Endpoint::bind_with(&binds, config())
        .await
        .map_err(|e| format!("server bind: {e}"))?;
    usable(&ep, &binds, SETUP_LIMIT).await?;
    let mut listener = ep
        .listen(ServicePrefix::exact(ServiceId::from_name(SERVICE).unwrap()))
        .map_err(|e| format!("listen: {e}"))?;
    let _ = ready.send(());
    let s = timeout(LIMIT, listener.accept())
        .await
        .map_err(|_| "no client".to_string())?
        .map_err(|e| format!("accept: {e}"))?;
    let (out, want) = (&shared.server_data, &shared.client_data);
    let done = AtomicBool::new(false);
    let transfer = async {
        let r = exchange(&s, out, want, &shared.server_received, None).await;
        done.store(true, Ordering::Relaxed);
        r
    };
    // Until the transfer ends: what each path carried, for the client to read when it breaks
    // link 1 (the paths of link 1 may be gone from the list soon after).
    let sample = async {
        while !done.load(Ordering::Relaxed) {
            if !shared.failed.load(Ordering::Relaxed) {
                *shared.server_paths.lock().unwrap() = s.paths();
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    let (r, ()) = match timeout(LIMIT, async { tokio::join!(transfer, sample) }).await {
        Ok(r) => r,
        Err(_) => {
            return Err(format!(
                "server timed out: received {}, stats {:?}, paths {:?}",
                shared.server_received.load(Ordering::Relaxed),
                s.stats(),
                s.paths()
            ));
        }
    };
    r.map_err(|e| format!("server: {e} (paths {:?})", s.paths()))?;
    let paths_after = s.paths();
    let closed = timeout(CLOSE_LIMIT, s.closed()).await.map_err(|_| {
        format!(
            "server: the flow did not close: stats {:?}, paths {:?}, endpoint {:?}",
            s.stats(),
            s.paths(),
            ep.stats()
        )
    })?;
    Ok(ServerReport {
        received: shared.server_received.load(Ordering::Relaxed),
        paths_after,
        closed,
    })
}

/// How link 1 is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// `ip link set down` on the client's end.
    LinkDown,
    /// nftables drops everything on the client's end, both ways; links stay up.
    Silent,
}

/// Both ends' paths, and the bytes each had received, when link 1 broke.
struct Snapshot {
    client_paths: Vec<PathSummary>,
    server_paths: Vec<PathSummary>,
    /// Stream bytes received by the client and by the server.
    received: (usize, usize),
}

/// What the client saw.
#[derive(Debug)]
struct ClientReport {
    local_before: SocketAddr,
    received: usize,
    /// Stream bytes received, by the client and by the server, when link 1 was broken.
    at_failure: (usize, usize),
    /// What the client and the server had sent over [link 1, link 2] when it was broken.
    client_sent: [u64; 2],
    server_sent: [u64; 2],
    paths_at_failure: Vec<PathSummary>,
    paths_after: Vec<PathSummary>,
    /// The longest time between two reads at the client after the failure.
    gap: Duration,
    elapsed: Duration,
    events: Vec<PathEvent>,
    closed: CloseReason,
}

async fn client(
    net_client: String,
    link1: String,
    failure: Failure,
    shared: Arc<Shared>,
) -> ClientReport {
    let binds: Vec<SocketAddr> = (1..=2).map(|l| (addr(l, 1), 0).into()).collect();
    let ep = Endpoint::bind_with(&binds, config())
        .await
        .expect("client bind");
    let locals = ep.local_locators();
    usable(&ep, &locals, SETUP_LIMIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut events = ep.path_events();
    let service = ServiceId::from_name(SERVICE).unwrap();
    let server: SocketAddr = (addr(1, 2), PORT).into();
    let start = Instant::now();
    let s = timeout(SETUP_LIMIT, ep.connect_via(service, server))
        .await
        .expect("connect timed out")
        .expect("connect by name");
    let local_before = s.local_locator().unwrap();
    assert_eq!(link_of(local_before), 1, "path 0 runs over link 1");

    // The stream joins a path from the client's link-2 address by itself; wait until it is
    // up (the server's announcement may add one to its link-2 address a moment later).
    let deadline = tokio::time::Instant::now() + SETUP_LIMIT;
    let mut seen = Vec::new();
    while !s
        .paths()
        .iter()
        .any(|p| p.active && link_of(p.local) == 2 && p.transport.is_some_and(|t| t.usable))
    {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(e)) => seen.push(e),
            Ok(Err(e)) => panic!("path events: {e}"),
            Err(_) => panic!(
                "no path over link 2 joined within {SETUP_LIMIT:?}: paths {:?}, events {seen:?}",
                s.paths()
            ),
        }
    }

    let (out, want) = (&shared.client_data, &shared.server_data);
    let received = AtomicUsize::new(0);
    // What each end had sent over each link, and the bytes each had received, when link 1
    // broke.
    let at_failure: RefCell<Option<Snapshot>> = RefCell::new(None);
    let gap = Cell::new(Duration::ZERO);
    // Called by the reader after every read until it breaks link 1: once either direction has
    // a third through (one can run well ahead of the other; both are checked to be unfinished
    // after) and both ends have put [`MIN_PER_LINK`] on each link.
    let fail = || {
        let snapshot = Snapshot {
            client_paths: s.paths(),
            server_paths: shared.server_paths.lock().unwrap().clone(),
            received: (
                received.load(Ordering::Relaxed),
                shared.server_received.load(Ordering::Relaxed),
            ),
        };
        if snapshot.received.0.max(snapshot.received.1) < TOTAL / 3 {
            return false;
        }
        let striped = per_link(&snapshot.client_paths, |p| p.local)
            .into_iter()
            .chain(per_link(&snapshot.server_paths, |p| p.remote))
            .all(|b| b >= MIN_PER_LINK);
        if !striped {
            return false;
        }
        *at_failure.borrow_mut() = Some(snapshot);
        shared.failed.store(true, Ordering::Relaxed);
        match failure {
            Failure::LinkDown => ip(&["-n", &net_client, "link", "set", &link1, "down"]),
            Failure::Silent => serval_testkit::nft(
                &net_client,
                &format!(
                    "table inet silent {{\n chain out {{ type filter hook output priority 0; \
                     oifname \"{link1}\" drop; }}\n chain in {{ type filter hook input \
                     priority 0; iifname \"{link1}\" drop; }}\n}}\n"
                ),
            ),
        }
        true
    };
    let transfer = exchange(&s, out, want, &received, Some((&fail, &gap)));
    let r = match timeout(LIMIT, transfer).await {
        Ok(r) => r,
        Err(_) => panic!(
            "transfer timed out after {LIMIT:?}: received {} (server {}), link 1 broken: {}, \
             stats {:?}, paths {:?}",
            received.load(Ordering::Relaxed),
            shared.server_received.load(Ordering::Relaxed),
            at_failure.borrow().is_some(),
            s.stats(),
            s.paths()
        ),
    };
    r.unwrap_or_else(|e| panic!("client: {e} (paths {:?})", s.paths()));
    let snapshot = at_failure
        .into_inner()
        .expect("link 1 broke during the transfer");
    let elapsed = start.elapsed();
    if matches!(failure, Failure::LinkDown) {
        // Link 1's address went: path 0 moves off it by RSYN, which may complete after the
        // transfer did (it finished over link 2 meanwhile). Wait for the move, bounded.
        let deadline = tokio::time::Instant::now() + SETUP_LIMIT;
        while !s.paths().iter().all(|p| link_of(p.local) == 2)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let paths_after = s.paths();
    let closed = timeout(CLOSE_LIMIT, s.closed()).await;
    while let Ok(e) = events.try_recv() {
        seen.push(e);
    }
    let Ok(closed) = closed else {
        panic!(
            "client: the flow did not close: stats {:?}, paths {:?}, endpoint {:?}, events \
             {seen:?}",
            s.stats(),
            s.paths(),
            ep.stats()
        )
    };
    ClientReport {
        local_before,
        received: received.load(Ordering::Relaxed),
        at_failure: snapshot.received,
        client_sent: per_link(&snapshot.client_paths, |p| p.local),
        server_sent: per_link(&snapshot.server_paths, |p| p.remote),
        paths_at_failure: snapshot.client_paths,
        paths_after,
        gap: gap.get(),
        elapsed,
        events: seen,
        closed,
    }
}

/// The message a thread panicked with.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".into())
}

/// Runs the transfer on fresh hosts named with `tag`, breaking link 1 as `failure` says;
/// checks what every case must hold and returns both reports.
fn run(tag: &str, failure: Failure) -> (ServerReport, ClientReport) {
    let net = Net::new(tag);
    let shared = Arc::new(Shared {
        client_data: pattern(TOTAL, CLIENT_SEED),
        server_data: pattern(TOTAL, SERVER_SEED),
        server_received: AtomicUsize::new(0),
        server_paths: Mutex::new(Vec::new()),
        failed: AtomicBool::new(false),
    });
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = {
        let shared = shared.clone();
        in_netns(&net.server, move || serve(ready_tx, shared))
    };
    if ready_rx.recv_timeout(SETUP_LIMIT).is_err() {
        panic!("server did not start: {:?}", server.join());
    }
    let client = {
        let (ns, link1) = (net.client.clone(), net.client_links[0].clone());
        in_netns(&net.client, move || client(ns, link1, failure, shared))
    };
    // Both threads end (every wait in them is bounded); a failure of either is reported
    // with the other's outcome, and `net` is dropped either way.
    let (c, s) = (client.join(), server.join());
    let (c, s) = match (c, s) {
        (Ok(c), Ok(Ok(s))) => (c, s),
        (c, s) => panic!(
            "client: {}\nserver: {}",
            c.map_or_else(|p| panic_message(&*p), |_| "ok".into()),
            match s {
                Ok(Ok(_)) => "ok".into(),
                Ok(Err(e)) => e,
                Err(p) => panic_message(&*p),
            }
        ),
    };
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    eprintln!(
        "{failure:?}: {} MiB each way in {:.2?}; link 1 broken at {:.1} MiB received by the \
         client, {:.1} by the server; sent over [link 1, link 2] before it: client [{:.2}, \
         {:.2}] MiB, server [{:.2}, {:.2}] MiB; longest receive gap at the client after it: \
         {:.1?}\n  client paths at the failure {:?}\n  client paths after {:?}\n  server paths \
         after {:?}\n  client events {:?}",
        TOTAL >> 20,
        c.elapsed,
        mib(c.at_failure.0 as u64),
        mib(c.at_failure.1 as u64),
        mib(c.client_sent[0]),
        mib(c.client_sent[1]),
        mib(c.server_sent[0]),
        mib(c.server_sent[1]),
        c.gap,
        c.paths_at_failure,
        c.paths_after,
        s.paths_after,
        c.events,
    );
    assert_eq!(c.received, TOTAL, "client received every byte once");
    assert_eq!(s.received, TOTAL, "server received every byte once");
    assert!(
        c.at_failure.0 < TOTAL && c.at_failure.1 < TOTAL,
        "link 1 broke mid-transfer both ways: {:?}",
        c.at_failure
    );
    assert_eq!(link_of(c.local_before), 1);
    // Both links carried the stream both ways before the failure: it striped.
    for (who, sent) in [("client", c.client_sent), ("server", c.server_sent)] {
        for (i, b) in sent.iter().enumerate() {
            assert!(
                *b >= MIN_PER_LINK,
                "the {who} had sent only {b} bytes over link {} when link 1 broke ({sent:?} \
                 over links 1 and 2): the stream did not stripe",
                i + 1
            );
        }
    }
    assert_eq!(c.closed, CloseReason::Finished, "client closed cleanly");
    assert_eq!(s.closed, CloseReason::Finished, "server closed cleanly");
    drop(net);
    (s, c)
}

#[test]
fn link_down_mid_transfer_carries_on_over_link_2() {
    if !serval_testkit::require_netns("link_down_mid_transfer_carries_on_over_link_2") {
        return;
    }
    let (_, c) = run("d", Failure::LinkDown);
    // The runtime heard link 1's address go, and the client's paths from it went with it.
    assert!(
        c.events
            .iter()
            .any(|e| matches!(e, PathEvent::AddressRemoved(l) if link_of(*l) == 1)),
        "the client heard link 1's address go: {:?}",
        c.events
    );
    assert!(
        c.paths_after.iter().all(|p| link_of(p.local) == 2),
        "a client path still runs over link 1: {:?}",
        c.paths_after
    );
}

#[test]
fn silent_loss_on_link_1_carries_on_over_link_2() {
    let test = "silent_loss_on_link_1_carries_on_over_link_2";
    if !serval_testkit::require_netns(test)
        || serval_testkit::require_program(test, "nft").is_none()
    {
        return;
    }
    let (_, c) = run("q", Failure::Silent);
    // No address went: only the transports' probe timers found link 1 dead.
    assert!(
        !c.events
            .iter()
            .any(|e| matches!(e, PathEvent::AddressRemoved(_))),
        "no address went: {:?}",
        c.events
    );
}
