//! The tokio API over real UDP sockets on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

use std::time::Duration;

use serval::{Endpoint, PathEvent, Registration, ServiceId, ServicePrefix};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

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

async fn bind(addr: &str) -> Endpoint {
    Endpoint::bind(&[addr.parse().unwrap()]).await.unwrap()
}

/// Bounds every test so a hang fails instead of stalling CI.
const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_by_name_with_half_close() {
    timeout(LIMIT, async {
        let server = bind("127.0.0.1:0").await;
        let mut listener = server
            .listen(ServicePrefix::exact(svc("echo.test")))
            .unwrap();
        let server_loc = server.local_locators()[0];
        tokio::spawn(async move {
            let mut s = listener.accept().await.unwrap();
            let (mut r, mut w) = s.split();
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
            s.closed().await;
        });
        let client = bind("127.0.0.1:0").await;
        let stream = client
            .connect_via(svc("echo.test"), server_loc)
            .await
            .unwrap();
        assert_eq!(stream.peer_locator().unwrap(), server_loc);
        let data = pattern(4 << 20, 7);
        let (mut r, mut w) = stream.into_split();
        let to_send = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&to_send).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut echo = Vec::new();
        r.read_to_end(&mut echo).await.unwrap();
        writer.await.unwrap();
        assert_eq!(echo.len(), data.len());
        assert!(echo == data);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_service_fails_fast() {
    timeout(LIMIT, async {
        let server = bind("127.0.0.1:0").await;
        let _listener = server
            .listen(ServicePrefix::exact(svc("echo.test")))
            .unwrap();
        let client = bind("127.0.0.1:0").await;
        let start = std::time::Instant::now();
        let err = client
            .connect_via(svc("nobody.test"), server.local_locators()[0])
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::HostUnreachable);
        assert!(err.to_string().contains("no route to service"), "{err}");
        // A NACK, not a timeout (the first retransmission would come after 1 s).
        assert!(start.elapsed() < Duration::from_secs(1));
        // No rule at all in the client's own table: refused without sending anything.
        let err = client.connect(svc("nobody.test")).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::HostUnreachable);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_survives_a_client_address_change() {
    timeout(LIMIT, async {
        let server = bind("127.0.0.1:0").await;
        let server_loc = server.local_locators()[0];
        let mut listener = server
            .listen(ServicePrefix::exact(svc("sink.test")))
            .unwrap();
        let accepted = tokio::spawn(async move {
            let mut s = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = vec![0u8; 65536];
            let mut peers = vec![s.peer_locator().unwrap()];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                let p = s.peer_locator().unwrap();
                if peers.last() != Some(&p) {
                    peers.push(p);
                }
            }
            s.shutdown().await.unwrap();
            (got, peers)
        });
        let client = Endpoint::bind(&[
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.2:0".parse().unwrap(),
        ])
        .await
        .unwrap();
        let new_loc = client.local_locators()[1];
        let mut stream = client
            .connect_via(svc("sink.test"), server_loc)
            .await
            .unwrap();
        let data = pattern(8 << 20, 3);
        let (first, rest) = data.split_at(data.len() / 3);
        stream.write_all(first).await.unwrap();
        stream.migrate(new_loc).unwrap();
        stream.write_all(rest).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut tail = Vec::new();
        stream.read_to_end(&mut tail).await.unwrap();
        assert_eq!(stream.local_locator().unwrap(), new_loc);
        let (got, peers) = accepted.await.unwrap();
        assert!(got == data, "bytes differ after migration");
        assert_eq!(
            peers.last(),
            Some(&new_loc),
            "server never saw the new locator"
        );
    })
    .await
    .expect("test timed out");
}

/// A move given up for another before it completed (the application changed its mind) is
/// reported as abandoned, and the second completes: the stream ends up at the second
/// address with every byte. (The two `migrate` calls follow each other at once; should the
/// driver complete the first move in between, on a preempted test thread, that connection
/// shows two moves instead, and the test tries again, up to five times.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_redirected_before_it_completed_is_reported_abandoned() {
    timeout(LIMIT, async {
        let server = bind("127.0.0.1:0").await;
        let server_loc = server.local_locators()[0];
        let mut listener = server
            .listen(ServicePrefix::exact(svc("sink.test")))
            .unwrap();
        tokio::spawn(async move {
            loop {
                let mut s = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    s.read_to_end(&mut got).await.unwrap();
                    s.write_all(&got).await.unwrap();
                    s.shutdown().await.unwrap();
                });
            }
        });
        let client = Endpoint::bind(&[
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.2:0".parse().unwrap(),
            "127.0.0.3:0".parse().unwrap(),
        ])
        .await
        .unwrap();
        let (second, third) = (client.local_locators()[1], client.local_locators()[2]);
        let mut events = client.path_events();
        let data = pattern(200_000, 5);
        for attempt in 0..5 {
            let mut stream = client
                .connect_via(svc("sink.test"), server_loc)
                .await
                .unwrap();
            stream.write_all(&data[..1000]).await.unwrap();
            stream.migrate(second).unwrap();
            stream.migrate(third).unwrap();
            let id = stream.id();
            // The move to `third` completes (its RSYN may have to be sent again, a second
            // later, if a burst filled the server's socket).
            let (mut abandoned, mut moved_to) = (None, Vec::new());
            while !moved_to.contains(&third) {
                match events.recv().await.unwrap() {
                    PathEvent::MoveAbandoned { stream: s, to } if s == id => abandoned = Some(to),
                    PathEvent::Moved { stream: s, to } if s == id => moved_to.push(to),
                    _ => {}
                }
            }
            stream.write_all(&data[1000..]).await.unwrap();
            stream.shutdown().await.unwrap();
            let mut echo = Vec::new();
            stream.read_to_end(&mut echo).await.unwrap();
            assert!(echo == data, "bytes differ");
            assert_eq!(stream.local_locator().unwrap(), third);
            match abandoned {
                Some(to) => {
                    assert_eq!(to, second);
                    assert_eq!(moved_to, [third], "an abandoned move completed");
                    return;
                }
                None => assert_eq!(moved_to, [second, third], "attempt {attempt}"),
            }
        }
        panic!("the first move was never reported abandoned");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_by_name_carry_the_sender_service() {
    timeout(LIMIT, async {
        let a = bind("127.0.0.1:0").await;
        let b = bind("127.0.0.1:0").await;
        let sock_b = b
            .bind_datagram(ServicePrefix::exact(svc("b.test")))
            .unwrap();
        let sock_a = a
            .bind_datagram(ServicePrefix::exact(svc("a.test")))
            .unwrap();
        sock_a
            .send_to_via(svc("b.test"), b.local_locators()[0], b"ping")
            .unwrap();
        let d = sock_b.recv_from().await.unwrap();
        assert_eq!(d.data, b"ping");
        assert_eq!(d.from, Some(svc("a.test")));
        assert_eq!(d.from_locator, a.local_locators()[0]);
        // Answer by name and locator.
        sock_b
            .send_to_via(d.from.unwrap(), d.from_locator, b"pong")
            .unwrap();
        assert_eq!(sock_a.recv_from().await.unwrap().data, b"pong");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listening_registers_and_dropping_unregisters() {
    timeout(LIMIT, async {
        let ep = bind("127.0.0.1:0").await;
        let mut reg = ep.registrations();
        let prefix = ServicePrefix::from_domain("web.test").unwrap();
        let listener = ep.listen(prefix).unwrap();
        let locators = ep.local_locators();
        assert_eq!(
            reg.recv().await.unwrap(),
            Registration::Registered {
                prefix,
                locators: locators.clone()
            }
        );
        assert!(ep.table().snapshot().get(&prefix).is_some());
        drop(listener);
        assert_eq!(
            reg.recv().await.unwrap(),
            Registration::Unregistered { prefix, locators }
        );
        assert!(ep.table().snapshot().get(&prefix).is_none());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_and_ipv4_on_one_endpoint() {
    timeout(LIMIT, async {
        let server = Endpoint::bind(&["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()])
            .await
            .unwrap();
        let locs = server.local_locators();
        let mut listener = server
            .listen(ServicePrefix::exact(svc("dual.test")))
            .unwrap();
        tokio::spawn(async move {
            loop {
                let mut s = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    tokio::io::copy(&mut r, &mut w).await.unwrap();
                    w.shutdown().await.unwrap();
                    s.closed().await;
                });
            }
        });
        for (client_addr, server_loc) in [("127.0.0.1:0", locs[0]), ("[::1]:0", locs[1])] {
            let client = bind(client_addr).await;
            let mut s = client
                .connect_via(svc("dual.test"), server_loc)
                .await
                .unwrap();
            assert_eq!(s.peer_locator().unwrap(), server_loc);
            s.write_all(b"over both families").await.unwrap();
            s.shutdown().await.unwrap();
            let mut back = Vec::new();
            s.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"over both families");
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_with_unread_data_resets_the_peer() {
    timeout(LIMIT, async {
        let server = bind("127.0.0.1:0").await;
        let mut listener = server
            .listen(ServicePrefix::exact(svc("rude.test")))
            .unwrap();
        let server_loc = server.local_locators()[0];
        tokio::spawn(async move {
            let s = listener.accept().await.unwrap();
            // Never reads the client's bytes: like closing a TCP socket with unread data.
            drop(s);
        });
        let client = bind("127.0.0.1:0").await;
        let mut s = client
            .connect_via(svc("rude.test"), server_loc)
            .await
            .unwrap();
        // The reset may arrive before or after the write: either call reports it.
        let err = match s.write_all(b"nobody will read this").await {
            Err(e) => e,
            Ok(()) => {
                let mut buf = [0u8; 16];
                s.read(&mut buf).await.unwrap_err()
            }
        };
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    })
    .await
    .expect("test timed out");
}

/// Datagrams beside the stream, both ways, through `Stream::send_datagram` and
/// `Stream::recv_datagram`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_on_a_stream() {
    timeout(LIMIT, async {
        let server = bind("127.0.0.1:0").await;
        let mut listener = server
            .listen(ServicePrefix::exact(svc("dgram.test")))
            .unwrap();
        let server_loc = server.local_locators()[0];
        tokio::spawn(async move {
            let s = listener.accept().await.unwrap();
            // Echo each datagram back, reversed, until the client closes.
            while let Ok(mut d) = s.recv_datagram().await {
                d.reverse();
                s.send_datagram(&d).unwrap();
            }
        });
        let client = bind("127.0.0.1:0").await;
        let stream = client
            .connect_via(svc("dgram.test"), server_loc)
            .await
            .unwrap();
        assert!(stream.max_datagram_size().unwrap() >= 1000);
        // Loopback loses nothing unless a queue overflows: one at a time, each answered.
        for i in 0u8..20 {
            let msg = [i, 1, 2, 3];
            stream.send_datagram(&msg).unwrap();
            let back = stream.recv_datagram().await.unwrap();
            assert_eq!(back, [3, 2, 1, i]);
        }
        let too_big = vec![0; stream.max_datagram_size().unwrap() + 1];
        assert_eq!(
            stream.send_datagram(&too_big).unwrap_err().kind(),
            std::io::ErrorKind::InvalidInput
        );
    })
    .await
    .expect("test timed out");
}
