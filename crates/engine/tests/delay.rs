//! DELAY rules: SYNs held for a controller's verdict, with explicit time. A router R holds
//! SYNs from client A for names under a DELAY-ed domain; instance B serves them once a rule for
//! it exists.
#![allow(clippy::unwrap_used)] // test harness

mod support;

use std::time::Duration;

use serval_engine::Instant;
use serval_engine::connection::ConnectError;
use serval_engine::endpoint::{
    Endpoint, EndpointConfig, Event, HeldSyn, ReleaseError, Transmit, Verdict,
};
use serval_table::{Action, Target};
use serval_wire::ServicePrefix;
use support::{A, B, R, at, drain, endpoint, endpoint_with, loc, svc};

/// A router holding every SYN for `*.example.test`.
fn delaying_router(config: EndpointConfig) -> Endpoint {
    let r = endpoint_with(R, 3, config);
    r.table()
        .add_target(
            ServicePrefix::from_domain("example.test").unwrap(),
            Target::new(Action::Delay, 0, 1),
        )
        .unwrap();
    r
}

fn held(ep: &mut Endpoint) -> Vec<HeldSyn> {
    std::iter::from_fn(|| ep.poll_event())
        .filter_map(|e| match e {
            Event::SynHeld(h) => Some(h),
            _ => None,
        })
        .collect()
}

fn connect_failed(ep: &mut Endpoint) -> Vec<ConnectError> {
    std::iter::from_fn(|| ep.poll_event())
        .filter_map(|e| match e {
            Event::ConnectFailed(_, e) => Some(e),
            _ => None,
        })
        .collect()
}

/// A's SYN for `name` reaches R at `now`; returns it.
fn syn(a: &mut Endpoint, r: &mut Endpoint, name: &str, now: Instant) -> Transmit {
    a.connect_via(now, svc(name), loc(R)).unwrap();
    let mut s = drain(a, now);
    assert_eq!(s.len(), 1);
    let s = s.remove(0);
    r.handle_datagram(now, loc(R), loc(A), &s.payload);
    s
}

#[test]
fn a_held_syn_resolved_after_a_rule_appears_reaches_the_instance() {
    let (mut a, mut b) = (endpoint(A, 1), endpoint(B, 2));
    let mut r = delaying_router(EndpointConfig::default());
    b.listen(ServicePrefix::exact(svc("web.example.test")), 0, 1);
    let first = syn(&mut a, &mut r, "web.example.test", at(0));
    // Held: nothing sent, one event with the client and the serviceID.
    assert!(drain(&mut r, at(0)).is_empty());
    let h = held(&mut r);
    assert_eq!(h.len(), 1);
    assert_eq!(
        (h[0].service, h[0].client),
        (svc("web.example.test"), loc(A))
    );
    assert_eq!(h[0].deadline, at(5000));
    assert_eq!(r.held_syns().copied().collect::<Vec<_>>(), h);
    assert_eq!(r.poll_timeout(), Some(at(5000)));
    // The client's retransmission is recognised: still one held SYN, no second event.
    r.handle_datagram(at(1000), loc(R), loc(A), &first.payload);
    assert!(held(&mut r).is_empty());
    assert_eq!((r.held_count(), r.stats().delay_retransmits), (1, 1));

    // The controller adds a rule for the instance, then resolves: the SYN goes on to B.
    r.table()
        .add_target(
            ServicePrefix::exact(svc("web.example.test")),
            Target::new(Action::Forward(loc(B)), 0, 1),
        )
        .unwrap();
    r.release(at(2000), h[0].id, Verdict::Resolve).unwrap();
    let fwd = drain(&mut r, at(2000));
    assert_eq!(fwd.len(), 1);
    assert_eq!(fwd[0].dst, loc(B));
    assert_eq!(r.held_count(), 0);
    let st = r.stats();
    assert_eq!((st.delayed, st.delay_resolved, st.forwarded), (1, 1, 1));
    // B answers A directly.
    b.handle_datagram(at(2000), loc(B), loc(R), &fwd[0].payload);
    let synack = drain(&mut b, at(2000));
    assert_eq!(synack[0].dst, loc(A));
    // Released means gone: a second verdict is refused, and no timeout fires later.
    assert_eq!(
        r.release(at(2001), h[0].id, Verdict::Drop),
        Err(ReleaseError::Unknown)
    );
    r.handle_timeout(at(6000));
    assert!(drain(&mut r, at(6000)).is_empty());
    assert_eq!(r.stats().delay_timeouts, 0);
}

#[test]
fn drop_nacks_the_client_which_fails_fast() {
    let mut a = endpoint(A, 1);
    let mut r = delaying_router(EndpointConfig::default());
    syn(&mut a, &mut r, "web.example.test", at(0));
    let h = held(&mut r);
    r.release(at(10), h[0].id, Verdict::Drop).unwrap();
    let nack = drain(&mut r, at(10));
    assert_eq!(nack.len(), 1);
    assert_eq!(nack[0].dst, loc(A));
    a.handle_datagram(at(10), loc(A), loc(R), &nack[0].payload);
    assert_eq!(
        connect_failed(&mut a),
        [ConnectError::NoRoute(svc("web.example.test"))]
    );
    assert_eq!((r.stats().delay_dropped, r.stats().nacks_sent), (1, 1));
}

#[test]
fn resolving_onto_the_delay_rule_again_nacks_instead_of_holding_twice() {
    let mut a = endpoint(A, 1);
    let mut r = delaying_router(EndpointConfig::default());
    syn(&mut a, &mut r, "web.example.test", at(0));
    let h = held(&mut r);
    r.release(at(10), h[0].id, Verdict::Resolve).unwrap();
    assert_eq!(drain(&mut r, at(10)).len(), 1);
    assert!(held(&mut r).is_empty());
    assert_eq!((r.held_count(), r.stats().nacks_sent), (0, 1));
}

#[test]
fn a_syn_without_a_verdict_times_out_nacked_and_counted() {
    let mut a = endpoint(A, 1);
    let config = EndpointConfig {
        delay_timeout: Duration::from_millis(300),
        ..EndpointConfig::default()
    };
    let mut r = delaying_router(config);
    syn(&mut a, &mut r, "web.example.test", at(0));
    assert_eq!(held(&mut r).len(), 1);
    assert_eq!(r.poll_timeout(), Some(at(300)));
    r.handle_timeout(at(299));
    assert_eq!(r.held_count(), 1);
    r.handle_timeout(at(300));
    assert_eq!(r.held_count(), 0);
    let nack = drain(&mut r, at(300));
    assert_eq!(nack.len(), 1);
    a.handle_datagram(at(300), loc(A), loc(R), &nack[0].payload);
    assert_eq!(connect_failed(&mut a).len(), 1);
    assert_eq!(r.stats().delay_timeouts, 1);
    assert_eq!(r.poll_timeout(), None);
}

#[test]
fn a_full_queue_drops_and_counts_new_syns_and_stays_bounded_under_a_flood() {
    let config = EndpointConfig {
        delay_queue: 4,
        delay_timeout: Duration::from_millis(100),
        ..EndpointConfig::default()
    };
    let mut r = delaying_router(config);
    let mut a = endpoint(A, 1);
    for i in 0..1000u64 {
        let now = at(i / 100);
        syn(&mut a, &mut r, &format!("x{i}.example.test"), now);
        drain(&mut a, now);
    }
    assert_eq!(r.held_count(), 4);
    assert_eq!((r.stats().delayed, r.stats().delay_overflows), (4, 996));
    // Nothing was sent for the overflow; the held ones time out and make room again.
    assert!(drain(&mut r, at(10)).is_empty());
    r.handle_timeout(at(200));
    assert_eq!((r.held_count(), r.stats().delay_timeouts), (0, 4));
    syn(&mut a, &mut r, "late.example.test", at(200));
    assert_eq!(r.held_count(), 1);
}
