//! Datagrams on a connection (DATAGRAM frames), through the endpoint's API: they arrive and
//! can be read, and a peer that sends faster than the application reads cannot grow the
//! receive queue past its bound (the excess is dropped and counted).
#![allow(clippy::unwrap_used)] // test harness

mod support;

use serval_engine::Instant;
use serval_engine::endpoint::{
    ConnDatagramError, ConnectionHandle, Endpoint, EndpointConfig, Event,
};
use serval_wire::ServicePrefix;
use support::{A, B, drain, endpoint_with, events, loc, svc};

/// Delivers datagrams between `a` (at A) and `b` (at B) at `now` until both are quiet.
fn settle(a: &mut Endpoint, b: &mut Endpoint, now: Instant) {
    for _ in 0..1000 {
        let (from_a, from_b) = (drain(a, now), drain(b, now));
        if from_a.is_empty() && from_b.is_empty() {
            return;
        }
        for t in from_a {
            b.handle_datagram(now, t.dst, t.src, &t.payload);
        }
        for t in from_b {
            a.handle_datagram(now, t.dst, t.src, &t.payload);
        }
    }
    panic!("never quiet");
}

/// A client at A connected to a server at B with `server` as the server's configuration.
fn connected(server: EndpointConfig) -> (Endpoint, Endpoint, ConnectionHandle, ConnectionHandle) {
    let now = Instant::ZERO;
    let mut a = endpoint_with(A, 1, EndpointConfig::default());
    let mut b = endpoint_with(B, 2, server);
    let l = b.listen(ServicePrefix::exact(svc("dgram.test")), 0, 1);
    let h = a.connect_via(now, svc("dgram.test"), loc(B)).unwrap();
    settle(&mut a, &mut b, now);
    assert!(events(&mut a).contains(&Event::Connected(h)));
    let sh = b.accept(l).unwrap();
    events(&mut b);
    (a, b, h, sh)
}

#[test]
fn datagrams_arrive_and_are_read_through_the_endpoint() {
    let (mut a, mut b, h, sh) = connected(EndpointConfig::default());
    let now = Instant::ZERO;
    a.write_datagram(h, b"ping one").unwrap();
    a.write_datagram(h, b"ping two").unwrap();
    settle(&mut a, &mut b, now);
    assert!(events(&mut b).contains(&Event::Datagram(sh)));
    assert_eq!(b.read_datagram(sh).as_deref(), Some(&b"ping one"[..]));
    assert_eq!(b.read_datagram(sh).as_deref(), Some(&b"ping two"[..]));
    assert_eq!(b.read_datagram(sh), None);

    // And back.
    b.write_datagram(sh, b"pong").unwrap();
    settle(&mut a, &mut b, now);
    assert!(events(&mut a).contains(&Event::Datagram(h)));
    assert_eq!(a.read_datagram(h).as_deref(), Some(&b"pong"[..]));
    assert_eq!(a.read_datagram(h), None);

    // One too large for the path is refused with the size that fits.
    let max = a.max_datagram_size(h).unwrap();
    assert!(a.write_datagram(h, &vec![0; max]).is_ok());
    assert_eq!(
        a.write_datagram(h, &vec![0; max + 1]),
        Err(ConnDatagramError::TooLarge { max })
    );
    // A handle that is not a connection.
    assert_eq!(b.read_datagram(ConnectionHandle(99)), None);
    assert_eq!(
        b.write_datagram(ConnectionHandle(99), b"x"),
        Err(ConnDatagramError::Closed)
    );
}

#[test]
fn a_flooding_peer_cannot_grow_the_receive_queue_past_its_bound() {
    let mut config = EndpointConfig::default();
    config.transport.datagram_queue = 8;
    let (mut a, mut b, h, sh) = connected(config);
    let mut now = Instant::ZERO;
    // The client sends 200 datagrams in rounds of 40 (its own queue holds 256); the server's
    // application reads none of them.
    let mut sent = 0u32;
    for round in 0..5u32 {
        for i in 0..40u32 {
            a.write_datagram(h, &(round * 40 + i).to_be_bytes())
                .unwrap();
            sent += 1;
        }
        settle(&mut a, &mut b, now);
        now += std::time::Duration::from_millis(50);
        a.handle_timeout(now);
        b.handle_timeout(now);
        settle(&mut a, &mut b, now);
    }
    let out = a.connection_stats(h).unwrap();
    assert_eq!(out.datagrams_sent, u64::from(sent), "every datagram left");
    let stats = b.connection_stats(sh).unwrap();
    assert_eq!(stats.datagrams_received, 8, "queued up to the bound");
    assert_eq!(
        stats.datagrams_dropped,
        u64::from(sent) - 8,
        "the rest counted"
    );
    // The first eight are there, in order; then nothing.
    let got: Vec<_> = std::iter::from_fn(|| b.read_datagram(sh)).collect();
    let want: Vec<Vec<u8>> = (0u32..8).map(|i| i.to_be_bytes().to_vec()).collect();
    assert_eq!(got, want);
    // Read, the queue takes datagrams again.
    a.write_datagram(h, b"after").unwrap();
    settle(&mut a, &mut b, now);
    assert_eq!(b.read_datagram(sh).as_deref(), Some(&b"after"[..]));
}
