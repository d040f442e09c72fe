//! The etcd backend against a real etcd: each test starts its own members on free loopback
//! ports with a temporary data dir, and removes them when it ends, pass or fail.
//!
//! They need the `etcd` binary (Debian's `etcd-server`; CI installs it). Without it, or with
//! `SERVAL_SKIP_ETCD` set, each skips with one line saying so and how to install it; under
//! `CI=true` both fail instead (serval-testkit's policy). `SERVAL_ETCD_BIN` names another
//! binary.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, RandomState};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serval_etcd::{Client, Options, pb};
use serval_registry::{
    Authorization, Change, EtcdConfig, Health, Registration, RegistrationKey, Registry,
    RegistryError, Subscription,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tokio::time::timeout;

/// Shows the registry's logs with `RUST_LOG=serval_registry=debug … -- --nocapture`.
fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

// ---------------------------------------------------------------------------------------
// etcd processes

/// The etcd binary, or `None` after announcing the skip (only outside CI: see
/// `serval_testkit::require_etcd`). Called from the test's own thread, which libtest names
/// after the test.
fn etcd_binary() -> Option<PathBuf> {
    let thread = std::thread::current();
    serval_testkit::require_etcd(thread.name().unwrap_or("an etcd test"))
}

/// A loopback port nothing listens on, outside the ephemeral range (so that a client
/// connection cannot take it while a member is down and about to restart on it), and never
/// handed out twice in this process (tests run in parallel).
fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    static N: AtomicU32 = AtomicU32::new(0);
    loop {
        let r =
            RandomState::new().hash_one((std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let port = 20_000 + (r % 12_000) as u16;
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
}

/// One etcd member.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A cluster of members in a temporary directory, killed and removed on drop.
struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    token: String,
    initial: String,
    members: Vec<Member>,
}

impl Cluster {
    /// Starts `n` members and waits until they have a leader; `None` if skipping.
    async fn start(n: usize) -> Option<Cluster> {
        logs();
        let bin = etcd_binary()?;
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("serval-etcd-{}-{seq}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                data_dir: dir.join(format!("m{i}.etcd")),
                log: dir.join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster {
            bin,
            dir,
            token: format!("serval-test-{}-{seq}", std::process::id()),
            initial,
            members,
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        for i in 0..n {
            cluster.wait_ready(i).await;
        }
        Some(cluster)
    }

    /// Starts member `i` (again, on the same data dir and ports, if it ran before).
    fn spawn(&mut self, i: usize) {
        let m = &mut self.members[i];
        assert!(m.child.is_none(), "member {} already running", m.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .unwrap();
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let child = Command::new(&self.bin)
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        m.child = Some(child);
    }

    /// Kills member `i` (SIGKILL: no goodbye to its peers or clients).
    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn port(&self, i: usize) -> u16 {
        self.members[i].client_port
    }

    fn ports(&self) -> Vec<u16> {
        self.members.iter().map(|m| m.client_port).collect()
    }

    async fn client(&self, i: usize) -> Client {
        direct_client(self.port(i))
    }

    /// Waits (at most 30 s) until member `i` answers a linearizable read.
    async fn wait_ready(&mut self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(status) = self.members[i]
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "etcd member {i} exited ({status}); log:\n{}",
                    self.log_tail(i)
                );
            }
            {
                let c = direct_client(self.port(i));
                match timeout(Duration::from_secs(2), c.get("/readiness-probe")).await {
                    Ok(Ok(_)) => return,
                    Ok(Err(e)) => last = e.to_string(),
                    Err(_) => last = "timed out".into(),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "etcd member {i} not ready within 30 s ({last}); log:\n{}",
            self.log_tail(i)
        );
    }

    fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(&self.members[i].log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The index of the member that is the raft leader, as the members report it.
    async fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            for i in 0..self.members.len() {
                if self.members[i].child.is_none() {
                    continue;
                }
                let c = self.client(i).await;
                if let Ok(Ok(st)) = timeout(Duration::from_secs(2), c.status()).await
                    && st.leader != 0
                    && st.header.map(|h| h.member_id) == Some(st.leader)
                {
                    return i;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no member reports itself leader within 15 s");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------
// A TCP proxy that can hold traffic and cut connections

#[derive(Clone, Copy, PartialEq, Eq)]
struct ProxyState {
    forward: bool,
    /// Connections of an older generation are closed.
    generation: u64,
}

struct Proxy {
    port: u16,
    state: watch::Sender<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = watch::Sender::new(ProxyState {
            forward: true,
            generation: 0,
        });
        let rx = state.subscribe();
        let task = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let generation = rx.borrow().generation;
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                tokio::spawn(pipe(dr, uw, rx.clone(), generation));
                tokio::spawn(pipe(ur, dw, rx.clone(), generation));
            }
        });
        Proxy { port, state, task }
    }

    /// Holds every byte (both ways, existing and new connections) until `reset`.
    fn pause(&self) {
        self.state.send_modify(|s| s.forward = false);
    }

    /// Closes every connection, then forwards again.
    fn reset(&self) {
        self.state.send_modify(|s| {
            s.forward = true;
            s.generation += 1;
        });
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        // Close the connections too.
        self.reset();
    }
}

/// Copies one direction while the proxy forwards; ends when its generation is closed.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut rx: watch::Receiver<ProxyState>,
    generation: u64,
) {
    async fn wait_forward(rx: &mut watch::Receiver<ProxyState>, generation: u64) -> bool {
        loop {
            let st = *rx.borrow_and_update();
            if st.generation != generation {
                return false;
            }
            if st.forward {
                return true;
            }
            if rx.changed().await.is_err() {
                return false;
            }
        }
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !wait_forward(&mut rx, generation).await {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = rx.changed() => continue,
        };
        if !wait_forward(&mut rx, generation).await {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Helpers

fn reg(i: u32) -> Registration {
    Registration {
        prefix: format!("svc{i}.test").parse().unwrap(),
        locator: SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16)),
        weight: 1,
        priority: 0,
    }
}

/// A configuration with quick retries, so that the tests do not wait on backoff.
fn config(ports: &[u16], prefix: &str) -> EtcdConfig {
    let mut c = EtcdConfig::new(ports.iter().map(|p| format!("127.0.0.1:{p}")).collect());
    c.prefix = prefix.to_owned();
    c.request_timeout = Duration::from_secs(2);
    c.keepalive = Duration::from_secs(2);
    c.retry_min = Duration::from_millis(50);
    c.retry_max = Duration::from_millis(500);
    c
}

async fn open(ports: &[u16], prefix: &str) -> Registry {
    Registry::etcd(config(ports, prefix)).await.unwrap()
}

async fn next_change(sub: &mut Subscription, within: Duration, what: &str) -> Change {
    timeout(within, sub.next())
        .await
        .unwrap_or_else(|_| panic!("no change within {within:?} while waiting for {what}"))
        .expect("subscription ended")
}

/// Nothing arrives on `sub` for `quiet`.
async fn assert_quiet(sub: &mut Subscription, quiet: Duration, what: &str) {
    if let Ok(c) = timeout(quiet, sub.next()).await {
        panic!("unexpected change {c:?} ({what})");
    }
}

type Set = BTreeMap<RegistrationKey, Registration>;

fn apply(set: &mut Set, change: Change) {
    match change {
        Change::Reset(all) => *set = all.into_iter().map(|r| (r.key(), r)).collect(),
        Change::Put(r) => {
            set.insert(r.key(), r);
        }
        Change::Delete(k) => {
            set.remove(&k);
        }
    }
}

/// Applies changes to `set` until `done(set)`; panics after `within`.
async fn follow_until(
    sub: &mut Subscription,
    set: &mut Set,
    within: Duration,
    what: &str,
    done: impl Fn(&Set) -> bool,
) {
    let deadline = tokio::time::Instant::now() + within;
    while !done(set) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let c = next_change(sub, left, what).await;
        apply(set, c);
    }
}

fn snapshot_set(r: &Registry) -> Set {
    r.snapshot()
        .into_iter()
        .map(|l| (l.registration.key(), l.registration))
        .collect()
}

/// Polls `cond` every 20 ms for at most `within`.
async fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The lease and mod revision of a registration's key, straight from etcd.
async fn stored(c: &Client, prefix: &str, r: &Registration) -> Option<(i64, i64, String)> {
    let key = format!("{prefix}/v1/reg/{}/{}", r.prefix, r.locator);
    let got = c.get(key).await.unwrap();
    got.kvs.first().map(|kv| {
        (
            kv.lease,
            kv.mod_revision,
            String::from_utf8_lossy(&kv.value).into_owned(),
        )
    })
}

async fn lease_ttl(c: &Client, lease: i64) -> i64 {
    c.lease_time_to_live(lease, false).await.unwrap().ttl
}

/// A client straight to the member on `port`, bypassing the registry.
fn direct_client(port: u16) -> Client {
    Client::connect_lazy(
        &format!("127.0.0.1:{port}"),
        &Options::default().with_max_message(1 << 30),
    )
    .unwrap()
}

/// Writes `key` = `value` straight into etcd, with no lease.
async fn put_raw(c: &Client, key: &str, value: &str) {
    let req = pb::PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    };
    c.put(req).await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_refresh_delete_and_expiry_reach_another_router() {
    let Some(etcd) = Cluster::start(1).await else {
        return;
    };
    let ports = etcd.ports();
    let (a, b) = (open(&ports, "/t").await, open(&ports, "/t").await);
    let direct = etcd.client(0).await;
    let mut sub = b.subscribe();
    assert_eq!(
        next_change(&mut sub, Duration::from_secs(1), "first reset").await,
        Change::Reset(vec![])
    );
    assert_eq!(a.health(), Health::Synced);

    // A put through router A reaches router B's replica, with a documented value.
    let r1 = reg(1);
    a.put(r1, Duration::from_millis(2500)).await.unwrap();
    assert_eq!(
        next_change(&mut sub, Duration::from_secs(5), "put").await,
        Change::Put(r1)
    );
    let (lease1, rev1, value) = stored(&direct, "/t", &r1).await.unwrap();
    assert_ne!(lease1, 0);
    assert_eq!(value, "v1 w=1 p=0 ttl=3", "TTLs round up to whole seconds");
    // A handle reads its own writes; with etcd, expires_in is the TTL.
    let snap = a.snapshot();
    assert_eq!(snap.len(), 1);
    assert_eq!(
        (snap[0].registration, snap[0].expires_in),
        (r1, Duration::from_secs(3))
    );

    // Router B refreshes what router A wrote, for longer than the TTL: the lease is kept
    // alive (same lease, no new revision) and nobody sees a change.
    let until = Instant::now() + Duration::from_millis(4500);
    while Instant::now() < until {
        b.put(r1, Duration::from_secs(3)).await.unwrap();
        assert_quiet(
            &mut sub,
            Duration::from_millis(400),
            "a refresh is not a change",
        )
        .await;
    }
    let (lease, rev, _) = stored(&direct, "/t", &r1).await.unwrap();
    assert_eq!((lease, rev), (lease1, rev1), "a refresh rewrote the key");
    assert!(lease_ttl(&direct, lease1).await >= 1);

    // A new weight is a new write with a new lease; the old lease is revoked.
    let r1w = Registration { weight: 5, ..r1 };
    b.put(r1w, Duration::from_secs(3)).await.unwrap();
    assert_eq!(
        next_change(&mut sub, Duration::from_secs(5), "reweight").await,
        Change::Put(r1w)
    );
    let (lease2, _, value) = stored(&direct, "/t", &r1).await.unwrap();
    assert_ne!(lease2, lease1);
    assert_eq!(value, "v1 w=5 p=0 ttl=3");
    assert_eq!(
        lease_ttl(&direct, lease1).await,
        -1,
        "old lease not revoked"
    );
    // A new TTL alone is a new lease too, but not a change to subscribers.
    a.put(r1w, Duration::from_secs(20)).await.unwrap();
    let (lease3, _, value) = stored(&direct, "/t", &r1).await.unwrap();
    assert_ne!(lease3, lease2);
    assert_eq!(value, "v1 w=5 p=0 ttl=20");
    assert!(lease_ttl(&direct, lease3).await > 10);

    // Delete through A: gone from B, lease revoked.
    a.delete(&r1.key()).await.unwrap();
    assert_eq!(
        next_change(&mut sub, Duration::from_secs(5), "delete").await,
        Change::Delete(r1.key())
    );
    assert_eq!(lease_ttl(&direct, lease3).await, -1);
    assert!(b.snapshot().is_empty() && a.snapshot().is_empty());
    a.delete(&r1.key()).await.unwrap(); // absent: a no-op

    // Expiry is etcd's: no refresh, and the watch delivers the delete.
    let r2 = reg(2);
    let t0 = Instant::now();
    a.put(r2, Duration::from_secs(1)).await.unwrap();
    assert_eq!(
        next_change(&mut sub, Duration::from_secs(5), "put r2").await,
        Change::Put(r2)
    );
    assert_eq!(
        next_change(&mut sub, Duration::from_secs(10), "expiry").await,
        Change::Delete(r2.key())
    );
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "expired early: {:?}",
        t0.elapsed()
    );
    // Router A's replica hears of it on its own watch.
    eventually(Duration::from_secs(5), "expiry at router A", || {
        a.snapshot().is_empty()
    })
    .await;
    eprintln!("expiry of a 1 s registration seen after {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_then_watch_loses_nothing_while_another_router_writes() {
    let Some(etcd) = Cluster::start(1).await else {
        return;
    };
    let ports = etcd.ports();
    let writer = open(&ports, "/lw").await;
    // The writer puts and deletes without pause until told to stop; `ops` counts its writes.
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicUsize::new(0));
    let writing = tokio::spawn({
        let (stop, ops, w) = (stop.clone(), ops.clone(), writer.clone());
        async move {
            let mut expected = Set::new();
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) && i < 3000 {
                let r = reg(i);
                w.put(r, Duration::from_secs(60)).await.unwrap();
                expected.insert(r.key(), r);
                if i % 3 == 2 {
                    let gone = reg(i / 2);
                    w.delete(&gone.key()).await.unwrap();
                    expected.remove(&gone.key());
                }
                ops.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            expected
        }
    });
    // Routers start while it writes; tiny pages make each list take many requests, so
    // writes land between the pages and between the list and the watch.
    let mut readers = Vec::new();
    let mut overlapped = 0;
    eventually(Duration::from_secs(10), "writer started", || {
        ops.load(Ordering::Relaxed) >= 20
    })
    .await;
    for _ in 0..6 {
        let mut c = config(&ports, "/lw");
        c.page_size = 3;
        let before = ops.load(Ordering::Relaxed);
        let r = Registry::etcd(c).await.unwrap();
        let sub = r.subscribe();
        if ops.load(Ordering::Relaxed) > before {
            overlapped += 1;
        }
        readers.push((r, sub));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let expected = writing.await.unwrap();
    assert!(overlapped >= 1, "no list overlapped a write");
    for (n, (r, sub)) in readers.iter_mut().enumerate() {
        // The stream starts with a Reset, and applied in order it ends at the writer's set.
        let first = next_change(sub, Duration::from_secs(1), "first reset").await;
        assert!(
            matches!(first, Change::Reset(_)),
            "reader {n} began with {first:?}"
        );
        let mut set = Set::new();
        apply(&mut set, first);
        follow_until(
            sub,
            &mut set,
            Duration::from_secs(10),
            "the writer's set",
            |s| *s == expected,
        )
        .await;
        assert_eq!(snapshot_set(r), expected, "reader {n}'s replica");
        assert_eq!(r.stats().relists, 0);
    }
    eprintln!(
        "{} writes, {} registrations at the end, {overlapped}/6 lists overlapped writes",
        ops.load(Ordering::Relaxed),
        expected.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_started_later_sees_every_registration_in_its_first_reset() {
    let Some(etcd) = Cluster::start(1).await else {
        return;
    };
    let port = etcd.port(0);
    let url = format!("etcd://127.0.0.1:{port}/restart");
    let first = Registry::connect(&url).await.unwrap();
    let all: Vec<Registration> = (0..50).map(reg).collect();
    for r in &all {
        first.put(*r, Duration::from_secs(60)).await.unwrap();
    }
    // The router that wrote them dies; their leases live on in etcd.
    drop(first);
    let later = Registry::connect(&url).await.unwrap();
    // connect() returns with the replica listed.
    assert_eq!(later.snapshot().len(), 50);
    let mut sub = later.subscribe();
    let mut sorted = all.clone();
    sorted.sort_by_key(Registration::key);
    assert_eq!(
        next_change(&mut sub, Duration::from_secs(1), "reset").await,
        Change::Reset(sorted)
    );
    // Another prefix is another registry.
    let other = Registry::connect(&format!("etcd://127.0.0.1:{port}/other"))
        .await
        .unwrap();
    assert!(other.snapshot().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_behind_compaction_lists_again() {
    let Some(etcd) = Cluster::start(1).await else {
        return;
    };
    let port = etcd.port(0);
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], port))).await;
    // Router A reaches etcd through the proxy (with pings rare enough not to notice a
    // pause); router B directly.
    let mut c = config(&[proxy.port], "/c");
    c.keepalive = Duration::from_secs(60);
    let a = Registry::etcd(c).await.unwrap();
    let b = open(&[port], "/c").await;
    let mut sub = a.subscribe();
    assert_eq!(
        next_change(&mut sub, Duration::from_secs(1), "reset").await,
        Change::Reset(vec![])
    );
    let (r1, r2) = (reg(1), reg(2));
    b.put(r1, Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        next_change(&mut sub, Duration::from_secs(5), "put").await,
        Change::Put(r1)
    );
    // A's watch is held back while B writes and etcd compacts its history past A.
    proxy.pause();
    // Meanwhile A's etcd is silent (no reset, no answer): its writes still end, in about
    // the request timeout (2 s), and write nothing.
    let t0 = Instant::now();
    let err = a.put(reg(3), Duration::from_secs(60)).await.unwrap_err();
    assert!(matches!(err, RegistryError::Unavailable(_)), "{err:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t0.elapsed()
    );
    b.put(r2, Duration::from_secs(60)).await.unwrap();
    b.delete(&r1.key()).await.unwrap();
    let direct = etcd.client(0).await;
    let rev = direct.get("x").await.unwrap().header.unwrap().revision;
    direct.compact(rev, true).await.unwrap();
    // Cut A's connection: it resumes from its last revision, finds it compacted, and lists.
    proxy.reset();
    assert_eq!(
        next_change(&mut sub, Duration::from_secs(10), "reset after compaction").await,
        Change::Reset(vec![r2])
    );
    // Usually the resumed watch is refused as compacted (`compactions`); on a loaded machine
    // the resumed watch may instead fail to open within the request timeout, and the
    // replica lists at once. Either way it listed again: the Reset above is a list made
    // after B's writes (a watch resumed from before them would have delivered r2's put and
    // r1's deletion as events, which the compaction has removed from etcd's history).
    let stats = a.stats();
    assert!(stats.relists >= 1, "{stats:?}");
    assert_eq!(a.health(), Health::Synced);
    // And it keeps following.
    b.delete(&r2.key()).await.unwrap();
    assert_eq!(
        next_change(&mut sub, Duration::from_secs(5), "delete").await,
        Change::Delete(r2.key())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_degrades_and_restarting_it_resyncs() {
    let Some(mut etcd) = Cluster::start(1).await else {
        return;
    };
    let ports = etcd.ports();
    let a = open(&ports, "/d").await;
    let mut sub = a.subscribe();
    assert_eq!(
        next_change(&mut sub, Duration::from_secs(1), "reset").await,
        Change::Reset(vec![])
    );
    let (r1, r2) = (reg(1), reg(2));
    a.put(r1, Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        next_change(&mut sub, Duration::from_secs(5), "put").await,
        Change::Put(r1)
    );

    etcd.kill(0);
    eventually(Duration::from_secs(10), "health degraded", || {
        matches!(a.health(), Health::Degraded { .. })
    })
    .await;
    // The replica keeps serving what it had; writes fail fast instead of hanging.
    assert_eq!(snapshot_set(&a).into_values().collect::<Vec<_>>(), vec![r1]);
    let t0 = Instant::now();
    let err = a.put(r2, Duration::from_secs(60)).await.unwrap_err();
    assert!(matches!(err, RegistryError::Unavailable(_)), "{err:?}");
    let err = a.delete(&r1.key()).await.unwrap_err();
    assert!(matches!(err, RegistryError::Unavailable(_)), "{err:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "writes took {:?}",
        t0.elapsed()
    );
    if let Health::Degraded { error } = a.health() {
        assert!(!error.is_empty());
    }
    assert_quiet(
        &mut sub,
        Duration::from_millis(500),
        "nothing changes while etcd is away",
    )
    .await;

    // etcd comes back on its data: a fresh list, a Reset with what is there, Synced.
    etcd.spawn(0);
    etcd.wait_ready(0).await;
    assert_eq!(
        next_change(&mut sub, Duration::from_secs(15), "reset after restart").await,
        Change::Reset(vec![r1])
    );
    assert_eq!(a.health(), Health::Synced);
    assert!(a.stats().relists >= 1);
    a.put(r2, Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        next_change(&mut sub, Duration::from_secs(5), "put after").await,
        Change::Put(r2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_cluster_survives_losing_its_leader() {
    let Some(mut etcd) = Cluster::start(3).await else {
        return;
    };
    let ports = etcd.ports();
    // Both routers start on the leader: A writes through it, B watches through it, so its
    // death forces A's requests and B's watch over to the other members.
    let leader = etcd.leader().await;
    let mut leader_first = vec![ports[leader]];
    leader_first.extend(ports.iter().filter(|p| **p != ports[leader]));
    let a = open(&leader_first, "/k").await;
    let b = open(&leader_first, "/k").await;
    let mut sub = b.subscribe();
    let mut seen = Set::new();
    apply(
        &mut seen,
        next_change(&mut sub, Duration::from_secs(1), "reset").await,
    );
    let (r1, r2) = (reg(1), reg(2));
    a.put(r1, Duration::from_secs(60)).await.unwrap();
    follow_until(&mut sub, &mut seen, Duration::from_secs(5), "r1", |s| {
        s.contains_key(&r1.key())
    })
    .await;

    etcd.kill(leader);
    let t0 = Instant::now();
    // Writes work again once the other two have elected a leader.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match a.put(r2, Duration::from_secs(60)).await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => eprintln!("put during election: {e}"),
            Err(e) => panic!("no write within 20 s of losing the leader: {e}"),
        }
    }
    eprintln!(
        "killed leader m{leader}; first write succeeded after {:?}",
        t0.elapsed()
    );
    follow_until(
        &mut sub,
        &mut seen,
        Duration::from_secs(10),
        "r2 at router B",
        |s| s.contains_key(&r2.key()),
    )
    .await;
    // Refresh and delete through either router.
    a.put(r1, Duration::from_secs(60)).await.unwrap();
    b.delete(&r1.key()).await.unwrap();
    follow_until(
        &mut sub,
        &mut seen,
        Duration::from_secs(10),
        "r1 deleted",
        |s| !s.contains_key(&r1.key()),
    )
    .await;
    eventually(Duration::from_secs(10), "router A follows", || {
        snapshot_set(&a).keys().copied().collect::<Vec<_>>() == vec![r2.key()]
    })
    .await;
    // B's watch moved to another member (resumed, or listed again after an election).
    let st = b.stats();
    assert!(st.watch_resumes + st.relists >= 1, "{st:?}");
    eprintln!("router B after losing its member: {st:?}");
    // A router starting now, with the dead member first in its list, gets everything.
    let c = open(&leader_first, "/k").await;
    assert_eq!(
        snapshot_set(&c).keys().copied().collect::<Vec<_>>(),
        vec![r2.key()]
    );
    for r in [&a, &b, &c] {
        eventually(Duration::from_secs(10), "synced", || {
            r.health() == Health::Synced
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_in_etcd_are_skipped_and_counted() {
    let Some(etcd) = Cluster::start(1).await else {
        return;
    };
    let ports = etcd.ports();
    let a = open(&ports, "/m").await;
    let (good, victim) = (reg(1), reg(2));
    a.put(good, Duration::from_secs(60)).await.unwrap();
    a.put(victim, Duration::from_secs(60)).await.unwrap();
    let direct = etcd.client(0).await;
    let key = |r: &Registration| format!("/m/v1/reg/{}/{}", r.prefix, r.locator);
    let hex = good.prefix.id().to_string();
    let stray = [
        (
            "/m/v1/reg/garbage".to_owned(),
            "v1 w=1 p=0 ttl=5".to_owned(),
        ),
        (key(&reg(3)), "nonsense".to_owned()),
        (
            key(&reg(4)).replace(&hex[..8], &hex[..8].to_uppercase()),
            "v1 w=1 p=0 ttl=5".to_owned(),
        ),
        (key(&reg(5)), "v2 w=1 p=0 ttl=5".to_owned()),
    ];
    for (k, v) in &stray {
        put_raw(&direct, k, v).await;
    }
    // A new router lists them: only the valid ones, the others counted.
    let c = open(&ports, "/m").await;
    let mut want = vec![good, victim];
    want.sort_by_key(Registration::key);
    let mut sub = c.subscribe();
    assert_eq!(
        next_change(&mut sub, Duration::from_secs(1), "reset").await,
        Change::Reset(want)
    );
    assert_eq!(c.stats().malformed, 4);
    // Watched: garbage over a valid registration removes it; a stray key changes nothing.
    put_raw(&direct, &key(&victim), "v1 w=0 p=0 ttl=5").await;
    assert_eq!(
        next_change(&mut sub, Duration::from_secs(5), "victim gone").await,
        Change::Delete(victim.key())
    );
    put_raw(&direct, "/m/v1/reg/more/garbage", "\u{0}\u{1}").await;
    let r6 = reg(6);
    a.put(r6, Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        next_change(&mut sub, Duration::from_secs(5), "valid put").await,
        Change::Put(r6)
    );
    assert_eq!(c.stats().malformed, 6);
    assert_eq!(c.health(), Health::Synced);
    // Keys outside the layout's prefix are not looked at at all.
    put_raw(&direct, "/m/v2/other", "x").await;
    put_raw(&direct, "/mx/v1/reg/x", "x").await;
    let r7 = reg(7);
    a.put(r7, Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        next_change(&mut sub, Duration::from_secs(5), "valid put").await,
        Change::Put(r7)
    );
    assert_eq!(c.stats().malformed, 6);
}

#[tokio::test]
async fn connecting_to_an_unreachable_etcd_fails_fast_when_asked_to() {
    // Needs no etcd: nothing listens on the port.
    logs();
    let port = free_port();
    let t0 = Instant::now();
    let mut c = config(&[port], "/f");
    c.start_degraded = false;
    let err = Registry::etcd(c).await.unwrap_err();
    assert!(matches!(err, RegistryError::Unavailable(_)), "{err:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    assert!(matches!(
        Registry::connect("etcd://nohost").await,
        Err(RegistryError::BadUrl(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_opened_while_etcd_is_down_serves_degraded_and_converges_when_it_starts() {
    let Some(mut etcd) = Cluster::start(1).await else {
        return;
    };
    let ports = etcd.ports();
    // Something is already stored; then etcd goes away before the router starts.
    let r1 = reg(1);
    open(&ports, "/s")
        .await
        .put(r1, Duration::from_secs(60))
        .await
        .unwrap();
    etcd.kill(0);

    let t0 = Instant::now();
    let a = Registry::etcd(config(&ports, "/s")).await.unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    assert!(
        matches!(a.health(), Health::Degraded { .. }),
        "{:?}",
        a.health()
    );
    assert!(a.snapshot().is_empty());
    let mut sub = a.subscribe();
    assert_eq!(
        next_change(&mut sub, Duration::from_secs(1), "first").await,
        Change::Reset(vec![])
    );
    // Writes fail fast while etcd is away (the router rejects them as UNAVAILABLE).
    let err = a.put(reg(2), Duration::from_secs(60)).await.unwrap_err();
    assert!(matches!(err, RegistryError::Unavailable(_)), "{err:?}");

    // etcd starts: the handle lists what is stored, without being reopened, and writes work.
    etcd.spawn(0);
    etcd.wait_ready(0).await;
    assert_eq!(
        next_change(&mut sub, Duration::from_secs(15), "reset once etcd is up").await,
        Change::Reset(vec![r1])
    );
    assert_eq!(a.health(), Health::Synced);
    let r2 = reg(2);
    a.put(r2, Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        next_change(&mut sub, Duration::from_secs(5), "put after").await,
        Change::Put(r2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_from_its_cache_catches_up_by_watching_not_listing() {
    let Some(etcd) = Cluster::start(1).await else {
        return;
    };
    let ports = etcd.ports();
    let dir = std::env::temp_dir().join(format!("serval-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cache = dir.join("replica.cache");
    let cached = |prefix: &str| {
        let mut c = config(&ports, prefix);
        c.cache = Some(cache.clone());
        c.cache_every = Duration::from_millis(100);
        c
    };
    // A router with a cache: it lists (nothing to start from) and saves what it holds.
    let (r1, r2, r3) = (reg(1), reg(2), reg(3));
    let a = Registry::etcd(cached("/c")).await.unwrap();
    assert_eq!(a.stats().lists, 1);
    a.put(r1, Duration::from_secs(60)).await.unwrap();
    a.put(r2, Duration::from_secs(60)).await.unwrap();
    // Saved after the list, and again as the revision moves. Whichever revision the last
    // save holds, the restart below must end in the same place: that is the point.
    eventually(Duration::from_secs(5), "the cache saved", || cache.exists()).await;
    drop(a);

    // While it is down, the registry changes: one deleted, one added.
    let b = open(&ports, "/c").await;
    b.delete(&r1.key()).await.unwrap();
    b.put(r3, Duration::from_secs(60)).await.unwrap();

    // Restarted from the cache: it serves at once what it had, and catches up by watching
    // from the saved revision (the deletion and the addition replayed), with no list.
    let c = Registry::etcd(cached("/c")).await.unwrap();
    eventually(Duration::from_secs(10), "caught up from the cache", || {
        let mut have: Vec<Registration> =
            c.snapshot().into_iter().map(|l| l.registration).collect();
        have.sort_by_key(Registration::key);
        have == [r2, r3] && c.health() == Health::Synced
    })
    .await;
    let stats = c.stats();
    assert_eq!(stats.lists, 0, "{stats:?}");

    // A corrupt cache is not used: the next start lists, and is right all the same.
    drop(c);
    std::fs::write(&cache, b"SVRC garbage").unwrap();
    let d = Registry::etcd(cached("/c")).await.unwrap();
    assert_eq!(d.stats().lists, 1);
    let mut have: Vec<Registration> = d.snapshot().into_iter().map(|l| l.registration).collect();
    have.sort_by_key(Registration::key);
    assert_eq!(have, [r2, r3]);
    drop(d);
    // The dropped replica's task may still be writing its cache file for a moment: retry
    // the clean-up (bounded) rather than fail the test on it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::fs::remove_dir_all(&dir).is_err() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Measurements (not run by default)

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Register→visible latency across three routers sharing one etcd, and a router's cold
/// start with many registrations. Run in release:
///
/// ```sh
/// SERVAL_BENCH_REGS=100000 cargo test --release -p serval-registry --test etcd \
///     -- --ignored --nocapture bench_
/// ```
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn bench_convergence_and_cold_start() {
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (regs, samples) = (
        env("SERVAL_BENCH_REGS", 100_000),
        env("SERVAL_BENCH_SAMPLES", 500),
    );
    let Some(etcd) = Cluster::start(1).await else {
        return;
    };
    let ports = etcd.ports();

    // (1) Three routers: a put through one, timed until both others' replicas have it.
    let routers = [
        open(&ports, "/b").await,
        open(&ports, "/b").await,
        open(&ports, "/b").await,
    ];
    let mut subs: Vec<Subscription> = routers[1..].iter().map(Registry::subscribe).collect();
    for s in &mut subs {
        next_change(s, Duration::from_secs(1), "reset").await;
    }
    let (mut visible, mut acked) = (Vec::new(), Vec::new());
    for i in 0..samples as u32 {
        let r = reg(i % 50_000);
        let r = Registration {
            weight: 1 + i / 50_000,
            ..r
        };
        let t0 = Instant::now();
        routers[0].put(r, Duration::from_secs(60)).await.unwrap();
        acked.push(t0.elapsed());
        for s in &mut subs {
            loop {
                if next_change(s, Duration::from_secs(5), "put").await == Change::Put(r) {
                    break;
                }
            }
        }
        visible.push(t0.elapsed());
    }
    visible.sort();
    acked.sort();
    eprintln!(
        "register→visible in 2 other replicas, {samples} puts: p50 {:?} p99 {:?} max {:?} \
         (put returned: p50 {:?} p99 {:?})",
        percentile(&visible, 0.5),
        percentile(&visible, 0.99),
        visible.last().unwrap(),
        percentile(&acked, 0.5),
        percentile(&acked, 0.99),
    );

    // (1b) Refreshes (one LeaseKeepAlive each) of those registrations through another
    // router: one at a time, then 64 at a time.
    let written: Vec<Registration> = routers[1]
        .snapshot()
        .iter()
        .map(|l| l.registration)
        .collect();
    let mut lat = Vec::new();
    for r in &written {
        let t0 = Instant::now();
        routers[1].put(*r, Duration::from_secs(60)).await.unwrap();
        lat.push(t0.elapsed());
    }
    lat.sort();
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in written.chunks(written.len().div_ceil(64)) {
        let (router, chunk) = (routers[2].clone(), chunk.to_vec());
        tasks.spawn(async move {
            for r in chunk {
                router.put(r, Duration::from_secs(60)).await.unwrap();
            }
        });
    }
    while let Some(t) = tasks.join_next().await {
        t.unwrap();
    }
    eprintln!(
        "refresh through another router: p50 {:?} p99 {:?} one at a time; \
         {:.0}/s with 64 in flight",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        written.len() as f64 / t0.elapsed().as_secs_f64()
    );

    // (2) Cold start: preload `regs` registrations straight into etcd (128 per transaction,
    // all on one long lease to load quickly), then time a new router's connect, which
    // returns with the full replica.
    let direct = etcd.client(0).await;
    let lease = direct.lease_grant(3600).await.unwrap().id;
    let t0 = Instant::now();
    let mut loaders = Vec::new();
    let per = regs.div_ceil(4);
    for part in 0..4 {
        let c = etcd.client(0).await;
        loaders.push(tokio::spawn(async move {
            let (lo, hi) = (part * per, ((part + 1) * per).min(regs));
            for chunk in (lo..hi).collect::<Vec<_>>().chunks(128) {
                let ops: Vec<pb::RequestOp> = chunk
                    .iter()
                    .map(|&i| {
                        let i = i as u32;
                        let r = Registration {
                            prefix: format!("cold{i}.test").parse().unwrap(),
                            locator: SocketAddr::from((
                                [10, (i >> 16) as u8, (i >> 8) as u8, i as u8],
                                5000,
                            )),
                            weight: 1,
                            priority: 0,
                        };
                        pb::RequestOp::put(
                            format!("/cold/v1/reg/{}/{}", r.prefix, r.locator),
                            "v1 w=1 p=0 ttl=3600",
                            lease,
                        )
                    })
                    .collect();
                let txn = pb::TxnRequest {
                    success: ops,
                    ..Default::default()
                };
                c.txn(txn).await.unwrap();
            }
        }));
    }
    for l in loaders {
        l.await.unwrap();
    }
    eprintln!("preloaded {regs} registrations in {:?}", t0.elapsed());
    // Twice: the first connect also pays for etcd's cold caches.
    let mut c = config(&ports, "/cold");
    c.page_size = env("SERVAL_BENCH_PAGE", c.page_size as usize) as u32;
    let page_size = c.page_size;
    for round in 1..=2 {
        let t0 = Instant::now();
        let cold = Registry::etcd(c.clone()).await.unwrap();
        let took = t0.elapsed();
        assert_eq!(cold.snapshot().len(), regs);
        eprintln!(
            "cold start #{round} with {regs} registrations: connect (list + decode, pages of \
             {page_size}) took {took:?}"
        );
    }
    // For comparison, paged reads of the same keys with nothing decoded: what etcd and gRPC
    // cost, for each page size in SERVAL_BENCH_PAGES (default: the configured one).
    let pages = std::env::var("SERVAL_BENCH_PAGES").unwrap_or_else(|_| page_size.to_string());
    for page_size in pages
        .split(',')
        .filter_map(|p| p.trim().parse::<i64>().ok())
    {
        let t0 = Instant::now();
        let (mut start, mut n, mut requests) = (b"/cold/v1/reg/".to_vec(), 0, 0);
        let (end, mut rev) = (b"/cold/v1/reg0".to_vec(), 0);
        loop {
            let req = pb::RangeRequest {
                key: start.clone(),
                range_end: end.clone(),
                limit: page_size,
                revision: rev,
                ..Default::default()
            };
            let page = direct.range(req).await.unwrap();
            requests += 1;
            rev = page.header.unwrap().revision;
            n += page.kvs.len();
            let Some(last) = page.kvs.last() else { break };
            start = last.key.clone();
            start.push(0);
            if !page.more {
                break;
            }
        }
        assert_eq!(n, regs);
        eprintln!(
            "  etcd + gRPC alone, pages of {page_size} ({requests} requests, no decoding): {:?}",
            t0.elapsed()
        );
    }
}

/// Waits (at most `within`) until `rx` holds `want`.
async fn wait_auths(
    rx: &mut watch::Receiver<Vec<Authorization>>,
    want: &[Authorization],
    within: Duration,
) {
    let ok = matches!(
        timeout(within, rx.wait_for(|v| v.as_slice() == want)).await,
        Ok(Ok(_))
    );
    assert!(ok, "authorisations {:?}, expected {want:?}", *rx.borrow());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorization_written_through_one_handle_is_seen_by_every_other() {
    let Some(etcd) = Cluster::start(1).await else {
        return;
    };
    let port = etcd.port(0);
    let (a, b) = (open(&[port], "/auth").await, open(&[port], "/auth").await);
    let other_prefix = open(&[port], "/elsewhere").await;
    let mut seen_b = b.authorizations();
    let mut seen_elsewhere = other_prefix.authorizations();
    let web = Authorization {
        prefix: "web.test".parse().unwrap(),
        key: format!("ed25519:{}", "A".repeat(43)),
    };
    let domain = Authorization {
        prefix: "example.test/*".parse().unwrap(),
        key: format!("ed25519:{}", "B".repeat(42) + "A"),
    };
    a.authorize(web.clone()).await.unwrap();
    a.authorize(domain.clone()).await.unwrap();
    let mut both = vec![web.clone(), domain.clone()];
    both.sort();
    wait_auths(&mut seen_b, &both, Duration::from_secs(10)).await;
    // Writing it again changes nothing; a handle opened later lists it.
    a.authorize(web.clone()).await.unwrap();
    let c = open(&[port], "/auth").await;
    wait_auths(&mut c.authorizations(), &both, Duration::from_secs(10)).await;
    // Removed from etcd by hand (how an authorisation is revoked): every handle follows.
    let direct = etcd.client(0).await;
    let key = format!(
        "/auth/v1/auth/{}/{}",
        web.prefix,
        web.key.strip_prefix("ed25519:").unwrap()
    );
    direct
        .delete_range(pb::DeleteRangeRequest {
            key: key.into_bytes(),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_auths(
        &mut seen_b,
        std::slice::from_ref(&domain),
        Duration::from_secs(10),
    )
    .await;
    // Another key prefix is another name space.
    assert!(seen_elsewhere.borrow_and_update().is_empty());
}
