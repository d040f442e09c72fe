//! The packets of a short exchange — connect, one request, one response, close — counted one
//! by one: every packet a peer receives is a wake-up of its process, so the first request's
//! latency and its CPU cost follow this count (BENCHMARKS.md, issue 13).
#![allow(clippy::unwrap_used)] // test harness

mod support;

use std::time::Duration;

use serval_engine::Instant;
use serval_engine::endpoint::{ConnectionHandle, Endpoint, EndpointConfig, Event, Transmit};
use serval_wire::ext::ControlFlags;
use serval_wire::{Protocol, SalPacket, SalRepr, ServicePrefix};
use support::{A, B, drain, endpoint_with, events, loc, svc};

/// What a datagram is, in a word: a control packet's flags or a stream packet.
fn kind(t: &Transmit) -> String {
    let pkt = SalPacket::new_checked(&t.payload[..]).unwrap();
    let repr = SalRepr::parse(&pkt).unwrap();
    match repr.control {
        Some(c) => {
            let names = [
                (ControlFlags::SYN, "SYN"),
                (ControlFlags::RSYN, "RSYN"),
                (ControlFlags::FIN, "FIN"),
                (ControlFlags::RST, "RST"),
                (ControlFlags::NACK, "NACK"),
                (ControlFlags::ACK, "ACK"),
            ];
            let set: Vec<&str> = names
                .iter()
                .filter(|(f, _)| c.flags.contains(*f))
                .map(|(_, n)| *n)
                .collect();
            set.join("|")
        }
        None if pkt.protocol() == Protocol::STREAM => "data".into(),
        None => "other".into(),
    }
}

fn config(hold: Option<Duration>) -> EndpointConfig {
    let mut c = EndpointConfig::default();
    c.control.handshake_ack_delay = hold;
    c
}

/// Moves every datagram between the two endpoints at `now` until both are quiet, and
/// returns what went each way, in order ("A>" from the client, "B>" from the instance).
fn exchange(a: &mut Endpoint, b: &mut Endpoint, now: Instant) -> Vec<String> {
    let mut log = Vec::new();
    for _ in 0..100 {
        let from_a = drain(a, now);
        let from_b = drain(b, now);
        if from_a.is_empty() && from_b.is_empty() {
            return log;
        }
        for t in from_a {
            log.push(format!("A>{}", kind(&t)));
            b.handle_datagram(now, loc(B), loc(A), &t.payload);
        }
        for t in from_b {
            log.push(format!("B>{}", kind(&t)));
            a.handle_datagram(now, loc(A), loc(B), &t.payload);
        }
    }
    panic!("the exchange did not settle");
}

/// A client and an instance serving `echo.test`, with the client's SYN sent and answered.
fn connected(hold: Option<Duration>) -> (Endpoint, Endpoint, ConnectionHandle, Vec<String>) {
    let mut a = endpoint_with(A, 1, config(hold));
    let mut b = endpoint_with(B, 2, config(hold));
    b.listen(ServicePrefix::exact(svc("echo.test")), 0, 1);
    let h = a
        .connect_via(Instant::ZERO, svc("echo.test"), loc(B))
        .unwrap();
    let log = exchange(&mut a, &mut b, Instant::ZERO);
    assert!(events(&mut a).contains(&Event::Connected(h)));
    (a, b, h, log)
}

#[test]
fn a_request_rides_on_the_handshake_ack_and_the_close_takes_three_packets() {
    let now = Instant::ZERO;
    let (mut a, mut b, h, mut log) = connected(Some(Duration::from_millis(1)));
    // The handshake's ACK is held for the request.
    assert_eq!(log, ["A>SYN", "B>SYN|ACK"]);
    a.write(h, &[7; 64]).unwrap();
    a.finish(h).unwrap();
    // Reading for the response before the request went out does not release the ACK.
    let mut buf = [0u8; 128];
    assert_eq!(a.read(h, &mut buf).unwrap(), None);
    log.extend(exchange(&mut a, &mut b, now));
    let l = events(&mut b)
        .into_iter()
        .find_map(|e| match e {
            Event::Incoming(l) => Some(l),
            _ => None,
        })
        .expect("the request completed the handshake");
    let s = b.accept(l).unwrap();
    assert_eq!(b.read(s, &mut buf).unwrap(), Some(64));
    assert_eq!(b.read(s, &mut buf).unwrap(), Some(0));
    b.write(s, &[9; 64]).unwrap();
    b.finish(s).unwrap();
    log.extend(exchange(&mut a, &mut b, now));
    assert_eq!(a.read(h, &mut buf).unwrap(), Some(64));
    assert_eq!(a.read(h, &mut buf).unwrap(), Some(0));
    log.extend(exchange(&mut a, &mut b, now));
    // Request, response (acknowledging the request), then the client's FIN — which tells
    // the instance its response arrived — answered by the instance's own FIN in one packet.
    assert_eq!(
        log,
        [
            "A>SYN",
            "B>SYN|ACK",
            "A>data",
            "B>data",
            "A>FIN",
            "B>FIN|ACK",
            "A>ACK"
        ]
    );
    for (ep, h) in [(&mut a, h), (&mut b, s)] {
        assert!(events(ep).contains(&Event::Closed(
            h,
            serval_engine::endpoint::CloseReason::Finished
        )));
    }
    // No path-MTU probe in an exchange this short, and nothing more later: no delayed ACK,
    // no probe timeout for data the peer already has.
    let later = Instant::ZERO + Duration::from_secs(2);
    a.handle_timeout(later);
    b.handle_timeout(later);
    assert!(exchange(&mut a, &mut b, later).is_empty());
}

#[test]
fn a_held_handshake_ack_goes_when_the_client_reads_first_or_after_the_delay() {
    // The client reads before writing (the server speaks first): the ACK goes at once.
    let (mut a, mut b, h, _) = connected(Some(Duration::from_millis(1)));
    let mut buf = [0u8; 8];
    assert_eq!(a.read(h, &mut buf).unwrap(), None);
    assert_eq!(exchange(&mut a, &mut b, Instant::ZERO), ["A>ACK"]);
    assert!(
        events(&mut b)
            .iter()
            .any(|e| matches!(e, Event::Incoming(_)))
    );

    // The client does nothing: the ACK goes when the delay is over, not before.
    let (mut a, mut b, _, _) = connected(Some(Duration::from_millis(1)));
    let early = Instant::ZERO + Duration::from_micros(999);
    a.handle_timeout(early);
    assert!(exchange(&mut a, &mut b, early).is_empty());
    let due = a.poll_timeout().unwrap();
    assert_eq!(due, Instant::ZERO + Duration::from_millis(1));
    a.handle_timeout(due);
    assert_eq!(exchange(&mut a, &mut b, due), ["A>ACK"]);
    assert!(
        events(&mut b)
            .iter()
            .any(|e| matches!(e, Event::Incoming(_)))
    );
}

#[test]
fn without_a_hold_the_handshake_ack_goes_at_once() {
    let (_, _, _, log) = connected(None);
    assert_eq!(log, ["A>SYN", "B>SYN|ACK", "A>ACK"]);
}
