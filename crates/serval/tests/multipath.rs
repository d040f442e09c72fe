//! Multipath over real UDP sockets on loopback: a client bound to two local addresses
//! (127.0.0.1 and 127.0.0.2, both loopback on Linux) joins a second path to its stream
//! ([`Stream::add_path`]), moves bytes both ways over both paths, and removes the second path
//! in the middle of a transfer.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serval::{
    AddPathError, ConnectionHandle, Endpoint, Locator, PathEvent, ServiceId, ServicePrefix, Stream,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast;
use tokio::time::{Instant, timeout};

fn svc(name: &str) -> ServiceId {
    ServiceId::from_name(name).unwrap()
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Bounds every test so a hang fails instead of stalling CI.
const LIMIT: Duration = Duration::from_secs(120);

/// How long a join on loopback may take to be validated both ways.
const JOIN_LIMIT: Duration = Duration::from_secs(10);

/// Bytes each way.
const LEN: usize = 8 << 20;

/// A server listening on 127.0.0.1, a client bound to 127.0.0.1 and 127.0.0.2 connected to
/// it (on path 0, from 127.0.0.1), and both ends of the stream. The endpoints are returned
/// to keep them alive.
struct Pair {
    server: Endpoint,
    client: Endpoint,
    server_loc: Locator,
    /// The client's second local locator, on 127.0.0.2.
    second: Locator,
    client_stream: Stream,
    server_stream: Stream,
}

async fn pair(name: &str) -> Pair {
    let server = Endpoint::bind(&["127.0.0.1:0".parse().unwrap()])
        .await
        .unwrap();
    let server_loc = server.local_locators()[0];
    let mut listener = server.listen(ServicePrefix::exact(svc(name))).unwrap();
    let client = Endpoint::bind(&[
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.2:0".parse().unwrap(),
    ])
    .await
    .unwrap();
    let first = client.local_locators()[0];
    let second = client.local_locators()[1];
    assert_eq!(
        second.ip(),
        "127.0.0.2".parse::<std::net::IpAddr>().unwrap()
    );
    let client_stream = client.connect_via(svc(name), server_loc).await.unwrap();
    let server_stream = listener.accept().await.unwrap();
    assert_eq!(client_stream.local_locator().unwrap(), first);
    assert_eq!(server_stream.peer_locator().unwrap(), first);
    Pair {
        server,
        client,
        server_loc,
        second,
        client_stream,
        server_stream,
    }
}

/// Waits, until `deadline`, for `PathUp` of path `path` of flow `stream` on `events`.
async fn path_up(
    events: &mut broadcast::Receiver<PathEvent>,
    stream: ConnectionHandle,
    path: Option<u32>,
    deadline: Instant,
) -> u32 {
    loop {
        let ev = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("no PathUp before the deadline")
            .expect("path events closed");
        match ev {
            PathEvent::PathUp { stream: s, path: p }
                if s == stream && path.is_none_or(|id| id == p) =>
            {
                return p;
            }
            PathEvent::PathDown { stream: s, path: p } if s == stream => {
                panic!("path {p} went down while joining")
            }
            _ => {}
        }
    }
}

/// Joins the client's second locator to the stream and waits until both ends show two
/// active paths. Returns the path's ID.
async fn join_second_path(p: &Pair) -> u32 {
    let mut client_events = p.client.path_events();
    let mut server_events = p.server.path_events();
    let id = p
        .client_stream
        .add_path(p.second, p.server_loc, false)
        .unwrap();
    assert_ne!(id, 0);
    // Joining the same pair of locators again is refused.
    let again = p
        .client_stream
        .add_path(p.second, p.server_loc, false)
        .unwrap_err();
    assert_eq!(again.kind(), std::io::ErrorKind::AlreadyExists);
    assert_eq!(
        again
            .get_ref()
            .and_then(|e| e.downcast_ref::<AddPathError>()),
        Some(&AddPathError::Exists)
    );
    let deadline = Instant::now() + JOIN_LIMIT;
    assert_eq!(
        path_up(&mut client_events, p.client_stream.id(), Some(id), deadline).await,
        id
    );
    // The server learns the path's ID from the JOIN: the same.
    assert_eq!(
        path_up(&mut server_events, p.server_stream.id(), None, deadline).await,
        id
    );

    let paths = p.client_stream.paths();
    assert_eq!(paths.len(), 2, "{paths:?}");
    assert!(paths.iter().all(|s| s.active), "{paths:?}");
    assert_eq!(paths[0].id, 0);
    assert_eq!(paths[1].id, id);
    assert_eq!(paths[1].local, p.second);
    assert_eq!(paths[1].remote, p.server_loc);
    assert!(
        paths[1].transport.is_some_and(|t| t.usable && !t.backup),
        "{paths:?}"
    );

    let paths = p.server_stream.paths();
    assert_eq!(paths.len(), 2, "{paths:?}");
    assert!(paths.iter().all(|s| s.active), "{paths:?}");
    assert_eq!(paths[1].id, id);
    assert_eq!(paths[1].local, p.server_loc);
    assert_eq!(paths[1].remote, p.second);
    id
}

/// Sends `LEN` bytes of pattern `seed` and reads the peer's to its end, on one end of the
/// stream; returns what it read.
async fn exchange(stream: &Stream, seed: u32) -> Vec<u8> {
    let data = pattern(LEN, seed);
    let mut reader = stream;
    let mut writer = stream;
    let write = async {
        writer.write_all(&data).await.unwrap();
        writer.shutdown().await.unwrap();
    };
    let read = async {
        let mut got = Vec::with_capacity(LEN);
        reader.read_to_end(&mut got).await.unwrap();
        got
    };
    let ((), got) = tokio::join!(write, read);
    got
}

/// The most bytes seen in flight on path `id` of a stream, sampled until `stop`.
async fn watch_in_flight(stream: &Stream, id: u32, stop: &AtomicBool, most: &AtomicU64) {
    while !stop.load(Ordering::Relaxed) {
        if let Some(t) = stream
            .paths()
            .iter()
            .find(|s| s.id == id)
            .and_then(|s| s.transport)
        {
            most.fetch_max(t.bytes_in_flight, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_path_carries_bytes_both_ways() {
    timeout(LIMIT, async {
        let p = pair("multipath.test").await;
        let id = join_second_path(&p).await;

        let stop = AtomicBool::new(false);
        let client_most = AtomicU64::new(0);
        let server_most = AtomicU64::new(0);
        let transfer = async {
            let r = tokio::join!(
                exchange(&p.client_stream, 11),
                exchange(&p.server_stream, 22)
            );
            stop.store(true, Ordering::Relaxed);
            r
        };
        let (got, (), ()) = tokio::join!(
            transfer,
            watch_in_flight(&p.client_stream, id, &stop, &client_most),
            watch_in_flight(&p.server_stream, id, &stop, &server_most),
        );
        let (at_client, at_server) = got;
        assert!(at_client == pattern(LEN, 22), "bytes differ at the client");
        assert!(at_server == pattern(LEN, 11), "bytes differ at the server");

        // Both paths survived the transfer.
        for paths in [p.client_stream.paths(), p.server_stream.paths()] {
            assert_eq!(paths.len(), 2, "{paths:?}");
            assert!(paths.iter().all(|s| s.active), "{paths:?}");
        }
        let (client_most, server_most) = (
            client_most.load(Ordering::Relaxed),
            server_most.load(Ordering::Relaxed),
        );
        // The second path carried stream data, not only the join, PINGs (a few dozen bytes in
        // flight) and acknowledgements (never in flight). Which path takes how much is the
        // scheduler's (lowest round trip first, then the next whose window has room): on
        // loopback one direction may leave the second path nearly idle, so this asks it of
        // either direction.
        assert!(
            client_most.max(server_most) >= 1200,
            "path {id} carried no data: at most {client_most} B in flight on it from the client, \
             {server_most} B from the server"
        );
        p.client_stream.closed().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removing_the_second_path_mid_transfer_loses_nothing() {
    timeout(LIMIT, async {
        let p = pair("multipath-remove.test").await;
        let id = join_second_path(&p).await;
        let mut client_events = p.client.path_events();

        let client = Arc::new(p.client_stream);
        let server = Arc::new(p.server_stream);
        let transfer = {
            let (client, server) = (client.clone(), server.clone());
            tokio::spawn(async move { tokio::join!(exchange(&client, 33), exchange(&server, 44)) })
        };
        // Remove the path once a third of the bytes arrived both ways, when it has bytes in
        // flight at either end (which must then arrive over path 0: the client's resent at
        // once, the server's once its probe timer finds the path silent); should neither end
        // use it for a while, once two thirds arrived in either direction.
        let deadline = Instant::now() + Duration::from_secs(60);
        let in_flight = |s: &Stream| {
            s.paths()
                .iter()
                .find(|s| s.id == id)
                .and_then(|s| s.transport)
                .map_or(0, |t| t.bytes_in_flight)
        };
        let received = |s: &Stream| s.stats().unwrap().stream_bytes_received;
        loop {
            let (c, s) = (received(&client), received(&server));
            let third = LEN as u64 / 3;
            if c >= third
                && s >= third
                && (in_flight(&client) > 0 || in_flight(&server) > 0 || c.max(s) >= 2 * third)
            {
                break;
            }
            assert!(
                !transfer.is_finished(),
                "the transfer ended before the removal"
            );
            assert!(Instant::now() < deadline, "a third never arrived");
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        assert!(client.remove_path(id));
        // Removed while bytes were still to arrive (one direction may finish well before the
        // other: the scheduler shares the paths unevenly).
        assert!(
            received(&client) < LEN as u64 || received(&server) < LEN as u64,
            "the removal came after the transfer"
        );
        assert!(!client.remove_path(id), "removed twice");
        assert!(!client.remove_path(0), "path 0 is the stream's own");
        let paths = client.paths();
        assert_eq!(paths.len(), 1, "{paths:?}");
        assert_eq!(paths[0].id, 0);

        let (at_client, at_server) = transfer.await.unwrap();
        assert!(at_client == pattern(LEN, 44), "bytes differ at the client");
        assert!(at_server == pattern(LEN, 33), "bytes differ at the server");

        // The client reported the removal.
        let down = timeout(JOIN_LIMIT, async {
            loop {
                match client_events.recv().await.unwrap() {
                    PathEvent::PathDown { stream, path } if stream == client.id() => {
                        break path;
                    }
                    _ => {}
                }
            }
        })
        .await
        .expect("no PathDown at the client");
        assert_eq!(down, id);
        assert_eq!(client.paths().len(), 1);
        client.closed().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_path_refuses_a_foreign_locator_and_marks_backups() {
    timeout(LIMIT, async {
        let p = pair("multipath-refuse.test").await;
        let foreign: Locator = "127.0.0.3:9".parse().unwrap();
        let e = p
            .client_stream
            .add_path(foreign, p.server_loc, false)
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrNotAvailable);
        assert_eq!(
            e.get_ref().and_then(|e| e.downcast_ref::<AddPathError>()),
            Some(&AddPathError::NotLocal(foreign))
        );
        assert_eq!(p.client_stream.paths().len(), 1);
        assert!(!p.client_stream.set_path_backup(1, true), "no path 1 yet");

        let id = join_second_path(&p).await;
        assert!(p.client_stream.set_path_backup(id, true));
        let backup = p.client_stream.paths()[1].transport.unwrap();
        assert!(backup.backup && backup.usable, "{backup:?}");
        assert!(p.client_stream.set_path_backup(id, false));
        assert!(!p.client_stream.paths()[1].transport.unwrap().backup);
    })
    .await
    .expect("test timed out");
}
