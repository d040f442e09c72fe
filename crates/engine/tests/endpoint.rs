//! Endpoint behaviour on crafted and hostile input, with a minimal in-memory pump (the seeded
//! simulator in `serval-sim` covers lossy networks; these tests pin single decisions).
#![allow(clippy::unwrap_used)] // test harness

mod support;

use std::time::Duration;

use proptest::prelude::*;
use serval_engine::Instant;
use serval_engine::connection::ConnectError;
use serval_engine::endpoint::{Endpoint, Event};
use serval_table::{Action, Target};
use serval_wire::ext::ControlFlags;
use serval_wire::{FlowId, SalPacket, SalRepr, ServicePrefix};
use support::{A, B, R, drain, endpoint, events, loc, svc};

/// Delivers every datagram between the endpoints until both are quiet (no loss, no delay).
fn pump(eps: &mut [(&str, &mut Endpoint)], now: Instant) {
    for _ in 0..1000 {
        let mut moved = false;
        for i in 0..eps.len() {
            for t in drain(eps[i].1, now) {
                moved = true;
                if let Some(j) = eps.iter().position(|(a, _)| loc(a) == t.dst) {
                    eps[j].1.handle_datagram(now, t.dst, t.src, &t.payload);
                }
            }
        }
        if !moved {
            return;
        }
    }
    panic!("pump did not settle");
}

#[test]
fn connect_by_name_and_exchange_bytes() {
    let now = Instant::ZERO;
    let (mut a, mut b) = (endpoint(A, 1), endpoint(B, 2));
    let l = b.listen(ServicePrefix::exact(svc("echo.test")), 0, 1);
    let h = a.connect_via(now, svc("echo.test"), loc(B)).unwrap();
    pump(&mut [(A, &mut a), (B, &mut b)], now);
    assert!(events(&mut a).contains(&Event::Connected(h)));
    let sh = b.accept(l).expect("accepted");
    assert_eq!(a.write(h, b"ping").unwrap(), 4);
    a.finish(h).unwrap();
    pump(&mut [(A, &mut a), (B, &mut b)], now);
    let mut buf = [0u8; 16];
    assert_eq!(b.read(sh, &mut buf).unwrap(), Some(4));
    assert_eq!(&buf[..4], b"ping");
    // The instance answered the client directly: its locator is the client's peer.
    assert_eq!(a.locators(h).unwrap().1, loc(B));
}

/// A handle kept after its connection was forgotten must never reach the connection that
/// took the same slot: the runtime keeps handles in streams that may act late (an abort on
/// drop reset the wrong connection when slots were reused without a generation).
#[test]
fn a_stale_handle_never_reaches_the_next_connection_in_its_slot() {
    let now = Instant::ZERO;
    let (mut a, mut b) = (endpoint(A, 1), endpoint(B, 2));
    let l = b.listen(ServicePrefix::exact(svc("echo.test")), 0, 1);
    let old = a.connect_via(now, svc("echo.test"), loc(B)).unwrap();
    pump(&mut [(A, &mut a), (B, &mut b)], now);
    assert!(b.accept(l).is_some());
    // Reset and forgotten on both sides.
    a.abort(old);
    pump(&mut [(A, &mut a), (B, &mut b)], now);
    assert!(a.locators(old).is_none(), "the old connection is gone");
    // The next connection reuses the slot, under a new handle.
    let new = a.connect_via(now, svc("echo.test"), loc(B)).unwrap();
    pump(&mut [(A, &mut a), (B, &mut b)], now);
    assert!(events(&mut a).contains(&Event::Connected(new)));
    assert_ne!(new, old);
    assert!(b.accept(l).is_some());
    // Everything done through the stale handle finds nothing and changes nothing.
    a.abort(old);
    assert!(a.write(old, b"x").is_err());
    assert!(a.finish(old).is_err());
    assert!(a.locators(old).is_none());
    pump(&mut [(A, &mut a), (B, &mut b)], now);
    assert!(a.locators(new).is_some(), "the new connection survived");
    assert_eq!(a.write(new, b"still here").unwrap(), 10);
}

#[test]
fn unknown_service_gets_a_small_nack_and_fails_fast() {
    let now = Instant::ZERO;
    let (mut a, mut b) = (endpoint(A, 1), endpoint(B, 2));
    b.listen(ServicePrefix::exact(svc("echo.test")), 0, 1);
    let h = a.connect_via(now, svc("other.test"), loc(B)).unwrap();
    let syn = drain(&mut a, now);
    assert_eq!(syn.len(), 1);
    b.handle_datagram(now, loc(B), loc(A), &syn[0].payload);
    let nack = drain(&mut b, now);
    assert_eq!(nack.len(), 1);
    assert!(
        nack[0].payload.len() <= syn[0].payload.len(),
        "NACK amplifies"
    );
    assert_eq!(b.stats().nacks_sent, 1);
    a.handle_datagram(now, loc(A), loc(B), &nack[0].payload);
    assert_eq!(
        events(&mut a),
        vec![Event::ConnectFailed(
            h,
            ConnectError::NoRoute(svc("other.test"))
        )]
    );
}

#[test]
fn connect_through_the_local_table() {
    let now = Instant::ZERO;
    let mut a = endpoint(A, 1);
    // No rule: immediate error, nothing sent.
    assert_eq!(
        a.connect(now, svc("x.test")),
        Err(ConnectError::NoRoute(svc("x.test")))
    );
    assert!(drain(&mut a, now).is_empty());
    // A DROP rule: the same.
    a.table()
        .add_target(ServicePrefix::DEFAULT, Target::new(Action::Drop, 0, 1))
        .unwrap();
    assert!(a.connect(now, svc("x.test")).is_err());
    // A FORWARD rule sends the SYN to the next hop.
    a.table()
        .add_target(
            ServicePrefix::from_domain("test").unwrap(),
            Target::new(Action::Forward(loc(R)), 0, 1),
        )
        .unwrap();
    a.connect(now, svc("x.test")).unwrap();
    let t = drain(&mut a, now);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].dst, loc(R));
}

#[test]
fn a_router_with_no_route_nacks_the_client_not_the_previous_hop() {
    let now = Instant::ZERO;
    let (mut a, mut r, mut b) = (endpoint(A, 1), endpoint(R, 3), endpoint(B, 2));
    // R climbs to B (its parent), which has no rule at all.
    r.table()
        .add_target(
            ServicePrefix::DEFAULT,
            Target::new(Action::Forward(loc(B)), 0, 1),
        )
        .unwrap();
    let h = a.connect_via(now, svc("nobody.test"), loc(R)).unwrap();
    let syn = drain(&mut a, now);
    r.handle_datagram(now, loc(R), loc(A), &syn[0].payload);
    let fwd = drain(&mut r, now);
    b.handle_datagram(now, loc(B), loc(R), &fwd[0].payload);
    let nack = drain(&mut b, now);
    assert_eq!(nack.len(), 1);
    // To SOURCE[0]: R keeps no state for the SYN and could not relay it.
    assert_eq!((nack[0].src, nack[0].dst), (loc(B), loc(A)));
    assert!(nack[0].payload.len() <= fwd[0].payload.len());
    a.handle_datagram(now, loc(A), loc(B), &nack[0].payload);
    assert_eq!(
        events(&mut a),
        vec![Event::ConnectFailed(
            h,
            ConnectError::NoRoute(svc("nobody.test"))
        )]
    );
}

#[test]
fn a_router_endpoint_forwards_the_syn_and_steps_off_the_path() {
    let now = Instant::ZERO;
    let (mut a, mut r, mut b) = (endpoint(A, 1), endpoint(R, 3), endpoint(B, 2));
    r.table()
        .add_target(
            ServicePrefix::from_domain("svc.test").unwrap(),
            Target::new(Action::Forward(loc(B)), 0, 1),
        )
        .unwrap();
    b.listen(ServicePrefix::from_domain("svc.test").unwrap(), 0, 1);
    let h = a.connect_via(now, svc("api.svc.test"), loc(R)).unwrap();
    let syn = drain(&mut a, now);
    r.handle_datagram(now, loc(R), loc(A), &syn[0].payload);
    let fwd = drain(&mut r, now);
    assert_eq!(fwd.len(), 1);
    assert_eq!(fwd[0].dst, loc(B));
    let p = SalPacket::new_checked(&fwd[0].payload[..]).unwrap();
    let repr = SalRepr::parse(&p).unwrap();
    assert_eq!(repr.source, vec![loc(A), loc(R)]);
    assert_eq!(repr.service.unwrap().hop_limit, 15);
    assert_eq!(r.stats().forwarded, 1);
    // The instance answers the client directly, and the router sees nothing more.
    b.handle_datagram(now, loc(B), loc(R), &fwd[0].payload);
    pump(&mut [(A, &mut a), (B, &mut b)], now);
    assert!(events(&mut a).contains(&Event::Connected(h)));
    assert!(drain(&mut r, now).is_empty());
    assert_eq!(r.stats().received, 1);
}

#[test]
fn forwarding_loops_and_exhausted_hop_limits_are_dropped() {
    let now = Instant::ZERO;
    let mut a = endpoint(A, 1);
    let mut r = endpoint(R, 3);
    // The router forwards everything back to itself.
    r.table()
        .add_target(
            ServicePrefix::DEFAULT,
            Target::new(Action::Forward(loc(R)), 0, 1),
        )
        .unwrap();
    a.connect_via(now, svc("x.test"), loc(R)).unwrap();
    let syn = drain(&mut a, now);
    r.handle_datagram(now, loc(R), loc(A), &syn[0].payload);
    let once = drain(&mut r, now);
    assert_eq!(once.len(), 1);
    // Second pass: the router finds itself in SOURCE.
    r.handle_datagram(now, loc(R), loc(R), &once[0].payload);
    assert!(drain(&mut r, now).is_empty());
    assert_eq!(r.stats().hop_limit_drops, 1);

    // A SYN arriving with hop limit 0 is dropped too.
    let p = SalPacket::new_checked(&syn[0].payload[..]).unwrap();
    let mut repr = SalRepr::parse(&p).unwrap();
    repr.service.as_mut().unwrap().hop_limit = 0;
    let bytes = repr.to_bytes(&[]).unwrap();
    r.handle_datagram(now, loc(R), loc(A), &bytes);
    assert!(drain(&mut r, now).is_empty());
    assert_eq!(r.stats().hop_limit_drops, 2);
}

#[test]
fn malformed_unknown_and_forged_packets_are_counted_and_unanswered() {
    let now = Instant::ZERO;
    let (mut a, mut b) = (endpoint(A, 1), endpoint(B, 2));
    b.listen(ServicePrefix::exact(svc("echo.test")), 0, 1);
    let h = a.connect_via(now, svc("echo.test"), loc(B)).unwrap();
    pump(&mut [(A, &mut a), (B, &mut b)], now);
    events(&mut a);

    b.handle_datagram(now, loc(B), loc(A), b"\x10garbage");
    assert_eq!(b.stats().malformed, 1);
    let unknown = SalRepr::new(serval_wire::Protocol::STREAM, FlowId(7), FlowId(12345))
        .to_bytes(&[0; 40])
        .unwrap();
    b.handle_datagram(now, loc(B), loc(A), &unknown);
    assert_eq!(b.stats().unknown_flow, 1);
    assert!(drain(&mut b, now).is_empty());

    // A forged RST for the live flow, with a wrong tag, changes nothing.
    let a_flow = {
        // Learn the flowIDs from a real packet a sends.
        a.write(h, b"x").unwrap();
        let t = drain(&mut a, now);
        let p = SalPacket::new_checked(&t[0].payload[..]).unwrap();
        (p.src_flow(), p.dst_flow())
    };
    let mut rst = SalRepr::new(serval_wire::Protocol::NONE, a_flow.1, a_flow.0);
    rst.control = Some(serval_wire::ControlRepr {
        flags: ControlFlags::RST,
        verno: 1,
        ackno: 0,
    });
    rst.auth = Some([0xab; 16]);
    a.handle_datagram(now, loc(A), loc(B), &rst.to_bytes(&[]).unwrap());
    assert_eq!(a.stats().auth_failures, 1);
    assert!(
        !events(&mut a)
            .iter()
            .any(|e| matches!(e, Event::Closed(..)))
    );
    assert!(a.write(h, b"still open").is_ok());

    // A stream packet of the live flow that was not sealed with its keys (here: garbage
    // frames, and a tag of zeros): dropped before the transport sees it, counted, flow unharmed.
    let mut body = vec![0, 0, 0, 0, 0, 0, 0, 9, 0x7f, 0x7f];
    body.extend_from_slice(&[0; 16]);
    let garbage = SalRepr::new(serval_wire::Protocol::STREAM, a_flow.1, a_flow.0)
        .to_bytes(&body)
        .unwrap();
    let before = a.stats();
    a.handle_datagram(now, loc(A), loc(B), &garbage);
    assert_eq!(a.stats().auth_failures, before.auth_failures + 1);
    assert_eq!(a.stats().malformed, before.malformed);
    assert!(
        !events(&mut a)
            .iter()
            .any(|e| matches!(e, Event::Closed(..)))
    );
    assert!(a.write(h, b"and still open").is_ok());
}

#[test]
fn handshake_survives_a_lost_ack_through_client_data() {
    let now = Instant::ZERO;
    let (mut a, mut b) = (endpoint(A, 1), endpoint(B, 2));
    let l = b.listen(ServicePrefix::exact(svc("echo.test")), 0, 1);
    let h = a.connect_via(now, svc("echo.test"), loc(B)).unwrap();
    let syn = drain(&mut a, now);
    b.handle_datagram(now, loc(B), loc(A), &syn[0].payload);
    let synack = drain(&mut b, now);
    a.handle_datagram(now, loc(A), loc(B), &synack[0].payload);
    let _lost_ack = drain(&mut a, now);
    assert!(b.accept(l).is_none());
    a.write(h, b"data").unwrap();
    let data = drain(&mut a, now);
    for t in &data {
        b.handle_datagram(now, loc(B), loc(A), &t.payload);
    }
    let sh = b.accept(l).expect("data completed the handshake");
    let mut buf = [0u8; 8];
    assert_eq!(b.read(sh, &mut buf).unwrap(), Some(4));
}

#[test]
fn connect_times_out_after_the_retransmissions() {
    let mut a = endpoint(A, 1);
    let h = a.connect_via(Instant::ZERO, svc("x.test"), loc(B)).unwrap();
    let mut now = Instant::ZERO;
    let mut syns = 0;
    for _ in 0..100 {
        syns += drain(&mut a, now).len();
        match a.poll_timeout() {
            Some(t) => {
                now = t;
                a.handle_timeout(now);
            }
            None => break,
        }
    }
    assert_eq!(syns, 7, "one SYN and six retransmissions");
    assert_eq!(
        events(&mut a),
        vec![Event::ConnectFailed(
            h,
            ConnectError::TimedOut(svc("x.test"))
        )]
    );
    // 1 + 2 + 4 + 8 + 16 + 32 + 64 seconds.
    assert_eq!(now - Instant::ZERO, Duration::from_secs(127));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Arbitrary datagrams — random bytes, or a real packet of a live flow with bytes flipped —
    /// never panic, and every reply is no larger than what prompted it.
    #[test]
    fn hostile_datagrams_never_panic_or_amplify(
        junk in proptest::collection::vec(any::<u8>(), 0..1500),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        use_real in any::<bool>(),
    ) {
        let now = Instant::ZERO;
        let (mut a, mut b) = (endpoint(A, 1), endpoint(B, 2));
        b.listen(ServicePrefix::exact(svc("echo.test")), 0, 1);
        let h = a.connect_via(now, svc("echo.test"), loc(B)).unwrap();
        pump(&mut [(A, &mut a), (B, &mut b)], now);
        a.write(h, b"hello").unwrap();
        let real = drain(&mut a, now);
        let mut input = if use_real { real[0].payload.clone() } else { junk };
        if !input.is_empty() {
            for (i, x) in flips {
                let n = input.len();
                input[i % n] ^= x;
            }
        }
        b.handle_datagram(now, loc(B), loc(A), &input);
        for t in drain(&mut b, now) {
            // Replies to a live flow's data (ACKs) are tiny; nothing may exceed the input by
            // more than an ACK's worth unless it is the flow's own retransmission.
            prop_assert!(t.payload.len() <= input.len().max(64));
        }
    }
}

#[test]
fn datagrams_by_name_through_a_router_carry_the_sender() {
    use serval_engine::endpoint::{DatagramError, NamedDatagram};
    let now = Instant::ZERO;
    let (mut a, mut r, mut b) = (endpoint(A, 1), endpoint(R, 3), endpoint(B, 2));
    r.table()
        .add_target(
            ServicePrefix::from_domain("svc.test").unwrap(),
            Target::new(Action::Forward(loc(B)), 0, 1),
        )
        .unwrap();
    let l = b.listen_datagrams(ServicePrefix::exact(svc("dg.svc.test")), 0, 1);
    a.send_datagram_via(Some(svc("me.test")), svc("dg.svc.test"), loc(R), b"hi")
        .unwrap();
    pump(&mut [(A, &mut a), (R, &mut r), (B, &mut b)], now);
    assert!(events(&mut b).contains(&Event::NamedDatagram(l)));
    assert_eq!(
        b.recv_datagram(l),
        Some(NamedDatagram {
            to: svc("dg.svc.test"),
            from: Some(svc("me.test")),
            from_locator: loc(A),
            data: b"hi".to_vec(),
        })
    );
    // Anonymous sender; and a SYN to a datagram-only listener is refused.
    a.send_datagram_via(None, svc("dg.svc.test"), loc(B), b"x")
        .unwrap();
    let h = a.connect_via(now, svc("dg.svc.test"), loc(B)).unwrap();
    pump(&mut [(A, &mut a), (B, &mut b)], now);
    assert_eq!(b.recv_datagram(l).unwrap().from, None);
    assert!(events(&mut a).contains(&Event::ConnectFailed(
        h,
        ConnectError::NoRoute(svc("dg.svc.test"))
    )));
    // Unknown name: dropped and counted; too large: refused before sending.
    a.send_datagram_via(None, svc("nobody.test"), loc(B), b"x")
        .unwrap();
    pump(&mut [(A, &mut a), (B, &mut b)], now);
    assert_eq!(b.stats().datagrams_dropped, 1);
    assert!(matches!(
        a.send_datagram_via(None, svc("dg.svc.test"), loc(B), &[0; 2000]),
        Err(DatagramError::TooLarge { .. })
    ));
    assert!(matches!(
        a.send_datagram(None, svc("dg.svc.test"), b"x"),
        Err(DatagramError::NoRoute(_))
    ));
}
