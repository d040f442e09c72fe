//! Registration through the endpoint: requests surfaced to a router application, answers fed
//! to the instance's registrar, listeners and locators driving what is registered, and bad
//! registration messages dropped and counted. Time is explicit; no network.
#![allow(clippy::unwrap_used)] // test harness

mod support;

use std::time::Duration;

use serval_engine::Instant;
use serval_engine::endpoint::{Endpoint, Event, RegistrationRequest, Transmit};
use serval_engine::registrar::{LeaseConfig, RegistrarEvent, RegistrationState};
use serval_table::{Action, Target};
use serval_wire::registration::{REGISTRATION_PACKET_LEN, RegistrationRepr};
use serval_wire::{
    FlowId, MessageType, Protocol, RejectReason, SalPacket, SalRepr, ServiceId, ServicePrefix,
};
use support::{A, B, R, at, drain, endpoint, events, loc};

const A2: &str = "10.0.5.1:54324";
fn router() -> Endpoint {
    let mut r = endpoint(R, 9);
    r.set_serve_registrations(true);
    r
}

fn prefix(name: &str) -> ServicePrefix {
    ServicePrefix::exact(ServiceId::from_name(name).unwrap())
}

fn requests(ep: &mut Endpoint) -> Vec<RegistrationRequest> {
    events(ep)
        .into_iter()
        .filter_map(|e| match e {
            Event::RegistrationRequest(r) => Some(r),
            _ => None,
        })
        .collect()
}

fn registration(t: &Transmit) -> RegistrationRepr {
    RegistrationRepr::parse_packet(&SalPacket::new_checked(&t.payload[..]).unwrap()).unwrap()
}

/// Delivers every transmit to its destination among `eps`.
fn deliver(ts: Vec<Transmit>, to: &mut Endpoint, now: Instant) {
    for t in ts {
        to.handle_datagram(now, t.dst, t.src, &t.payload);
    }
}

#[test]
fn a_listener_registers_and_the_router_sees_the_observed_source() {
    let now = at(0);
    let mut b = endpoint(B, 2);
    let mut r = router();
    b.set_router(Some(loc(R)), LeaseConfig::default());
    let l = b.listen(prefix("web.test"), 4, 3);
    let sent = drain(&mut b, now);
    assert_eq!(sent.len(), 1);
    assert_eq!((sent[0].src, sent[0].dst), (loc(B), loc(R)));
    assert_eq!(sent[0].payload.len(), REGISTRATION_PACKET_LEN + 16);
    let reg = registration(&sent[0]);
    assert_eq!(reg.ty, MessageType::Register);
    assert_eq!(
        (reg.prefix, reg.weight, reg.priority),
        (prefix("web.test"), 3, 4)
    );

    // Behind a NAT the router sees another source: that is what it is told.
    let nat = loc("192.0.2.77:40000");
    r.handle_datagram(now, loc(R), nat, &sent[0].payload);
    let reqs = requests(&mut r);
    assert_eq!(
        reqs,
        [RegistrationRequest {
            local: loc(R),
            from: nat,
            request: reg
        }]
    );
    assert_eq!(r.stats().registration_requests, 1);

    // The router's answer goes back where the request came from, no larger than it.
    assert!(!r.answer_registration(&reqs[0], &reg));
    assert!(r.answer_registration(&reqs[0], &reg.ack(2000)));
    let answer = drain(&mut r, now);
    assert_eq!(answer.len(), 1);
    assert_eq!((answer[0].src, answer[0].dst), (loc(R), nat));
    assert!(answer[0].payload.len() <= sent[0].payload.len());

    // The instance accepts it from the router.
    b.handle_datagram(at(3), loc(B), loc(R), &answer[0].payload);
    assert!(
        events(&mut b).contains(&Event::Registrar(RegistrarEvent::Registered {
            prefix: prefix("web.test"),
            router: loc(R),
            ttl: Duration::from_millis(2000),
        }))
    );
    assert!(matches!(
        b.registrar().unwrap().state(&prefix("web.test")),
        Some(RegistrationState::Registered { .. })
    ));
    // The endpoint's timer now includes the refresh (2000 / 3 ms later).
    assert_eq!(
        b.poll_timeout(),
        Some(at(3) + Duration::from_nanos(666_666_666))
    );

    // Closing the listener unregisters at once.
    b.close_listener(l);
    let sent = drain(&mut b, at(4));
    assert_eq!(sent.len(), 1);
    assert_eq!(registration(&sent[0]).ty, MessageType::Unregister);
}

#[test]
fn a_whole_exchange_with_a_router_that_acks() {
    let mut b = endpoint(B, 2);
    let mut r = router();
    b.listen(prefix("web.test"), 0, 1);
    // Listeners bound before the router is set are registered too.
    b.set_router(Some(loc(R)), LeaseConfig::default());
    let mut now = at(0);
    let mut registered = 0;
    for _ in 0..10 {
        deliver(drain(&mut b, now), &mut r, now);
        for req in requests(&mut r) {
            assert!(r.answer_registration(&req, &req.request.ack(3000)));
        }
        deliver(drain(&mut r, now), &mut b, now);
        registered += events(&mut b)
            .iter()
            .filter(|e| matches!(e, Event::Registrar(RegistrarEvent::Registered { .. })))
            .count();
        now = b.poll_timeout().unwrap();
        b.handle_timeout(now);
    }
    // Ten rounds of refresh, one Registered event, every refresh answered.
    assert_eq!(registered, 1);
    assert_eq!(r.stats().registration_requests, 10);
    assert_eq!(b.stats().registrations_unexpected, 0);
    assert!(now >= at(9000), "{now:?}");
}

#[test]
fn datagram_listeners_register_and_weights_of_one_prefix_add_up() {
    let mut b = endpoint(B, 2);
    b.set_router(Some(loc(R)), LeaseConfig::default());
    let p = prefix("web.test");
    let l1 = b.listen(p, 1, 2);
    let _l2 = b.listen(p, 5, 3);
    let _d = b.listen_datagrams(prefix("dg.test"), 0, 1);
    let regs: Vec<RegistrationRepr> = drain(&mut b, at(0)).iter().map(registration).collect();
    assert_eq!(regs.len(), 2, "{regs:?}");
    let web = regs.iter().find(|r| r.prefix == p).unwrap();
    assert_eq!((web.weight, web.priority), (5, 5));
    assert!(regs.iter().any(|r| r.prefix == prefix("dg.test")));
    // One of the two listeners closes: the prefix stays, with the other's weight.
    b.close_listener(l1);
    let regs: Vec<RegistrationRepr> = drain(&mut b, at(1)).iter().map(registration).collect();
    assert_eq!(regs.len(), 1);
    assert_eq!(
        (regs[0].ty, regs[0].weight, regs[0].priority),
        (MessageType::Register, 3, 5)
    );
}

#[test]
fn a_locator_change_registers_again_from_the_new_one() {
    let mut b = endpoint(A, 2);
    let mut r = router();
    b.set_router(Some(loc(R)), LeaseConfig::default());
    b.listen(prefix("web.test"), 0, 1);
    deliver(drain(&mut b, at(0)), &mut r, at(0));
    let first = requests(&mut r).remove(0);
    r.answer_registration(&first, &first.request.ack(3000));
    deliver(drain(&mut r, at(0)), &mut b, at(0));
    // The old address goes away, a new one arrives.
    b.add_local(loc(A2));
    b.remove_local(&loc(A));
    let sent = drain(&mut b, at(100));
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].src, loc(A2));
    deliver(sent, &mut r, at(100));
    let second = requests(&mut r).remove(0);
    assert_eq!(second.from, loc(A2));
    // Same instance: the router can replace the old locator with the new one.
    assert_eq!(second.request.instance, first.request.instance);
}

#[test]
fn rejection_and_unreachable_router_are_events() {
    let mut b = endpoint(B, 2);
    let mut r = router();
    b.set_router(Some(loc(R)), LeaseConfig::default());
    b.listen(prefix("web.test"), 0, 1);
    deliver(drain(&mut b, at(0)), &mut r, at(0));
    let req = requests(&mut r).remove(0);
    r.answer_registration(&req, &req.request.reject(RejectReason::NOT_ACCEPTED));
    deliver(drain(&mut r, at(0)), &mut b, at(0));
    assert!(
        events(&mut b).contains(&Event::Registrar(RegistrarEvent::Rejected {
            prefix: prefix("web.test"),
            router: loc(R),
            reason: RejectReason::NOT_ACCEPTED,
        }))
    );

    // Another instance whose router never answers.
    let mut c = endpoint(A, 3);
    c.set_router(Some(loc(R)), LeaseConfig::default());
    c.listen(prefix("web.test"), 0, 1);
    let mut now = at(0);
    let mut sent = 0;
    while now < at(3500) {
        c.handle_timeout(now);
        sent += drain(&mut c, now).len();
        now = c.poll_timeout().unwrap();
    }
    assert!(sent >= 4, "{sent}");
    assert!(
        events(&mut c).contains(&Event::Registrar(RegistrarEvent::Unreachable {
            prefix: prefix("web.test"),
            router: loc(R),
        }))
    );
}

#[test]
fn bad_and_out_of_place_registration_messages_are_dropped_and_counted() {
    let mut r = router();
    let good = RegistrationRepr::register(1, 2, prefix("web.test"), 1, 0, 3000).to_packet();

    // Malformed: weight 0, unknown type, non-zero flow, short payload.
    let mut zero_weight = good.clone();
    zero_weight[36..40].fill(0);
    let mut bad_type = good.clone();
    bad_type[20] = 77;
    let mut flow = good.clone();
    flow[19] = 1;
    for bad in [&zero_weight[..], &bad_type[..], &flow[..], &good[..70]] {
        r.handle_datagram(at(0), loc(R), loc(A), bad);
    }
    let st = r.stats();
    assert_eq!((st.registrations_malformed, st.malformed), (4, 4));
    assert!(events(&mut r).is_empty());
    assert!(
        drain(&mut r, at(0)).is_empty(),
        "malformed input is never answered"
    );

    // A request at an endpoint that serves none, an answer nobody asked for.
    let mut b = endpoint(B, 2);
    b.handle_datagram(at(0), loc(B), loc(A), &good);
    let ack = RegistrationRepr::register(1, 2, prefix("web.test"), 1, 0, 0)
        .ack(3000)
        .to_packet();
    b.handle_datagram(at(0), loc(B), loc(R), &ack);
    assert_eq!(b.stats().registrations_unexpected, 2);
    assert!(events(&mut b).is_empty());
    assert!(drain(&mut b, at(0)).is_empty());

    // A registration packet with extensions is still one (a future AUTH, say).
    let mut header = SalRepr::new(Protocol::REGISTRATION, FlowId::NONE, FlowId::NONE);
    header.auth = Some([0; 16]);
    let with_ext = header.to_bytes(&good[20..]).unwrap();
    r.handle_datagram(at(0), loc(R), loc(A), &with_ext);
    assert_eq!(requests(&mut r).len(), 1);
}

#[test]
fn a_registration_flood_costs_events_not_state() {
    // The router application drains events as it likes; the engine keeps no per-request state.
    let mut r = router();
    for i in 0..10_000u32 {
        let p = RegistrationRepr::register(i, u64::from(i), prefix("web.test"), 1, 0, 3000);
        r.handle_datagram(at(0), loc(R), loc(A), &p.to_packet());
    }
    assert_eq!(requests(&mut r).len(), 10_000);
    assert!(drain(&mut r, at(0)).is_empty());
    assert_eq!(r.poll_timeout(), None);
}

#[test]
fn endpoints_without_a_router_send_no_registrations() {
    let mut b = endpoint(B, 2);
    b.listen(prefix("web.test"), 0, 1);
    assert!(drain(&mut b, at(0)).is_empty());
    assert_eq!(b.poll_timeout(), None);
    assert!(b.registrar().is_none());
    // Setting and clearing a router: the registration is withdrawn.
    b.set_router(Some(loc(R)), LeaseConfig::default());
    assert_eq!(drain(&mut b, at(0)).len(), 1);
    b.set_router(None, LeaseConfig::default());
    let sent = drain(&mut b, at(1));
    assert_eq!(sent.len(), 1);
    assert_eq!(registration(&sent[0]).ty, MessageType::Unregister);
    // A table rule forwarding elsewhere is untouched by any of this.
    b.table()
        .add_target(
            ServicePrefix::DEFAULT,
            Target::new(Action::Forward(loc(R)), 0, 1),
        )
        .unwrap();
    assert_eq!(b.table().snapshot().len(), 2);
}

#[test]
fn an_announced_prefix_registers_like_a_listener_and_merges_with_one() {
    let now = at(0);
    let mut b = endpoint(B, 2);
    b.set_router(Some(loc(R)), LeaseConfig::default());
    b.announce(prefix("example.test"), 2, 1);
    let sent = drain(&mut b, now);
    assert_eq!(sent.len(), 1);
    let reg = registration(&sent[0]);
    assert_eq!(reg.ty, MessageType::Register);
    assert_eq!(
        (reg.prefix, reg.weight, reg.priority),
        (prefix("example.test"), 2, 1)
    );
    // A listener on the same prefix adds its weight to the one registration.
    let l = b.listen(prefix("example.test"), 3, 5);
    let reg = registration(&drain(&mut b, now)[0]);
    assert_eq!((reg.weight, reg.priority), (7, 3));
    // Withdrawn while the listener lives: the listener's share stays registered.
    b.withdraw(&prefix("example.test"));
    let reg = registration(&drain(&mut b, now)[0]);
    assert_eq!((reg.ty, reg.weight), (MessageType::Register, 5));
    // The listener goes too: unregistered.
    b.close_listener(l);
    let reg = registration(&drain(&mut b, now)[0]);
    assert_eq!(reg.ty, MessageType::Unregister);
}

/// A fixed key (seed 0x11…): PKCS#8 v2 as ring writes it.
fn test_key() -> serval_keys::PrivateKey {
    use ring::signature::KeyPair as _;
    let seed = [0x11u8; 32];
    let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
    let mut der = vec![
        0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(&seed);
    der.extend_from_slice(&[0x81, 0x21, 0x00]);
    der.extend_from_slice(pair.public_key().as_ref());
    serval_keys::PrivateKey::from_pkcs8(&der).unwrap()
}

#[test]
fn a_signed_registration_follows_the_routers_cookie() {
    let mut b = endpoint(B, 2);
    let mut r = router();
    // The key may come before the router.
    b.set_registration_key(Some(test_key()));
    b.set_router(Some(loc(R)), LeaseConfig::default());
    let _l = b.listen(prefix("web.test"), 0, 1);
    let first = drain(&mut b, at(0));
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].payload.len(), 160, "signed form");
    deliver(first, &mut r, at(0));
    let req = requests(&mut r).pop().unwrap();
    assert_eq!(req.request.cookie, Some(serval_wire::Cookie::EMPTY));
    serval_keys::verify_registration(&test_key().public_key(), &req.request).unwrap();

    // The router wants its cookie echoed; the answer is no longer than the request.
    let cookie = serval_wire::Cookie([0x42; 16]);
    assert!(r.answer_registration(&req, &req.request.cookie_answer(cookie)));
    let answer = drain(&mut r, at(1));
    assert_eq!(answer[0].payload.len(), 160);
    deliver(answer, &mut b, at(1));
    let again = drain(&mut b, at(1));
    assert_eq!(again.len(), 1, "sent again at once");
    deliver(again, &mut r, at(1));
    let req2 = requests(&mut r).pop().unwrap();
    assert_eq!(req2.request.request_id, req.request.request_id);
    assert_eq!(req2.request.cookie, Some(cookie));
    serval_keys::verify_registration(&test_key().public_key(), &req2.request).unwrap();
    assert!(r.answer_registration(&req2, &req2.request.ack(3000)));
    deliver(drain(&mut r, at(2)), &mut b, at(2));
    assert!(
        events(&mut b)
            .iter()
            .any(|e| matches!(e, Event::Registrar(RegistrarEvent::Registered { .. })))
    );

    // A refusal comes out as an event with its reason.
    b.listen(prefix("api.test"), 0, 1);
    let s = drain(&mut b, at(3));
    deliver(s, &mut r, at(3));
    let req3 = requests(&mut r).pop().unwrap();
    assert!(r.answer_registration(&req3, &req3.request.reject(RejectReason::UNAUTHORIZED)));
    deliver(drain(&mut r, at(4)), &mut b, at(4));
    assert!(events(&mut b).iter().any(|e| matches!(
        e,
        Event::Registrar(RegistrarEvent::Rejected {
            reason: RejectReason::UNAUTHORIZED,
            ..
        })
    )));
}

#[test]
fn an_answer_longer_than_its_request_is_never_sent() {
    let mut r = router();
    // An original 60-byte REGISTER: no room for a cookie.
    let legacy = RegistrationRepr::register(1, 2, prefix("web.test"), 1, 0, 3000);
    r.handle_datagram(at(0), loc(R), loc(A), &legacy.to_packet());
    let req = requests(&mut r).pop().unwrap();
    assert!(!r.answer_registration(
        &req,
        &legacy.with_cookie(serval_wire::Cookie([1; 16])).ack(3000)
    ));
    assert!(drain(&mut r, at(0)).is_empty());
    assert!(r.answer_registration(&req, &legacy.reject(RejectReason::COOKIE_REQUIRED)));
    let sent = drain(&mut r, at(0));
    assert_eq!(sent[0].payload.len(), REGISTRATION_PACKET_LEN);
}
