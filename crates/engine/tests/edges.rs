//! Decisions of the protocol that only show on an unlucky path: a forged NACK, a client behind
//! address translation, a retransmitted SYN that takes another router, a full accept queue, a
//! lost ACK of a FIN, a lost RSYN-ACK, a move whose new path stays silent (with and without the
//! old locator), a client's request to move the server's end, and control sequence numbers wrapping around. Each test
//! drives real endpoints with explicit (virtual) time and decides exactly which datagram is
//! lost, so each one pins one rule of docs/protocol.md.
#![allow(clippy::unwrap_used)] // test harness

mod support;

use std::time::Duration;

use serval_engine::Instant;
use serval_engine::connection::protect::{
    DEFAULT_KEY_UPDATE_INTERVAL, FlowSecrets, KeyExchange, Protection, Protector, Space, Transcript,
};
use serval_engine::connection::{CloseReason, FIN_WAITS_FOR_RSYN};
use serval_engine::endpoint::{ConnectionHandle, Endpoint, EndpointConfig, Event, Transmit};
use serval_table::{Action, Target};
use serval_wire::ext::{ControlFlags, ControlRepr};
use serval_wire::{FlowId, Nonce, Protocol, SalPacket, SalRepr, ServicePrefix};
use support::{A, B, R, at, drain, endpoint, endpoint_with, events, loc, svc};

/// The client's second address (after a move).
const A2: &str = "10.0.1.1:54324";
/// The client's third address.
const A3: &str = "10.0.2.1:54324";
/// A second router.
const R2: &str = "10.0.0.4:54324";
/// A second instance.
const B2: &str = "10.0.0.5:54324";
/// The client's address as a NAT in front of it rewrites it.
const NAT: &str = "192.0.2.7:40000";

fn parse(bytes: &[u8]) -> SalRepr {
    SalRepr::parse(&SalPacket::new_checked(bytes).unwrap()).unwrap()
}

fn flags(t: &Transmit) -> Option<ControlFlags> {
    SalPacket::new_checked(&t.payload[..])
        .ok()
        .and_then(|p| SalRepr::parse(&p).ok())
        .and_then(|r| r.control)
        .map(|c| c.flags)
}

/// Endpoints on a lossless network with virtual time, where `lose` may drop any datagram.
struct Net {
    eps: Vec<Endpoint>,
    now: Instant,
    /// Every datagram sent, with the time, in order (lost ones included).
    log: Vec<(Instant, Transmit)>,
}

impl Net {
    fn new(eps: Vec<Endpoint>) -> Net {
        Net {
            eps,
            now: Instant::ZERO,
            log: Vec::new(),
        }
    }

    /// Delivers datagrams (those `lose` keeps) until every endpoint is quiet at `now`.
    fn settle(&mut self, lose: &mut impl FnMut(&Transmit) -> bool) {
        for _ in 0..10_000 {
            let mut sent = Vec::new();
            for ep in &mut self.eps {
                sent.extend(drain(ep, self.now));
            }
            if sent.is_empty() {
                return;
            }
            for t in sent {
                self.log.push((self.now, t.clone()));
                if lose(&t) {
                    continue;
                }
                if let Some(ep) = self.eps.iter_mut().find(|e| e.locals().contains(&t.dst)) {
                    ep.handle_datagram(self.now, t.dst, t.src, &t.payload);
                }
            }
        }
        panic!("the network never went quiet");
    }

    /// Moves time to the earliest deadline (at most `until`) and runs the timers due.
    fn step(&mut self, until: Instant) -> bool {
        let Some(next) = self.eps.iter().filter_map(Endpoint::poll_timeout).min() else {
            return false;
        };
        if next > until {
            return false;
        }
        self.now = self.now.max(next);
        for ep in &mut self.eps {
            if ep.poll_timeout().is_some_and(|t| t <= self.now) {
                ep.handle_timeout(self.now);
            }
        }
        true
    }

    /// Settles, steps and settles again until `until` (virtual time).
    fn run_until(&mut self, until: Instant, lose: &mut impl FnMut(&Transmit) -> bool) {
        self.settle(lose);
        while self.step(until) {
            self.settle(lose);
        }
    }

    /// Datagrams sent from `src` after `since` whose control flags are exactly `f`.
    fn sent(&self, src: &str, f: ControlFlags, since: Instant) -> usize {
        self.log
            .iter()
            .filter(|(t, x)| *t >= since && x.src == loc(src) && flags(x) == Some(f))
            .count()
    }
}

/// Connects a client at `A` to `echo.test` served at `B`: the network and both handles.
fn connected() -> (Net, ConnectionHandle, ConnectionHandle) {
    let (mut a, mut b) = (endpoint(A, 1), endpoint(B, 2));
    let l = b.listen(ServicePrefix::exact(svc("echo.test")), 0, 1);
    let h = a
        .connect_via(Instant::ZERO, svc("echo.test"), loc(B))
        .unwrap();
    let mut net = Net::new(vec![a, b]);
    net.settle(&mut |_| false);
    assert!(events(&mut net.eps[0]).contains(&Event::Connected(h)));
    let sh = net.eps[1].accept(l).expect("accepted");
    events(&mut net.eps[1]);
    (net, h, sh)
}

/// Reads everything `h` has; whether its end was reached.
fn read_all(ep: &mut Endpoint, h: ConnectionHandle, into: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match ep.read(h, &mut buf) {
            Ok(Some(0)) => return true,
            Ok(Some(n)) => into.extend_from_slice(&buf[..n]),
            Ok(None) | Err(_) => return false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// NACK
// ---------------------------------------------------------------------------------------------

/// A NACK proves itself only by echoing the client's nonce: one with any other nonce, from
/// anywhere, is counted and ignored, and the connect goes on; and once connected, even a NACK
/// with the right nonce changes nothing.
#[test]
fn a_nack_with_the_wrong_nonce_is_ignored() {
    let now = Instant::ZERO;
    let (mut a, mut b) = (endpoint(A, 1), endpoint(B, 2));
    let l = b.listen(ServicePrefix::exact(svc("echo.test")), 0, 1);
    let h = a.connect_via(now, svc("echo.test"), loc(B)).unwrap();
    let syn = drain(&mut a, now);
    assert_eq!(syn.len(), 1);
    let s = parse(&syn[0].payload);
    let (nonce, verno) = (s.nonce.unwrap(), s.control.unwrap().verno);
    let nack = |nonce: Nonce| {
        let mut r = SalRepr::new(Protocol::NONE, FlowId::NONE, s.src_flow);
        r.control = Some(ControlRepr {
            flags: ControlFlags::NACK,
            verno: 0,
            ackno: verno.wrapping_add(1),
        });
        r.nonce = Some(nonce);
        r.to_bytes(&[]).unwrap()
    };
    let mut wrong = nonce;
    wrong.0[0] ^= 1;
    // Off-path, guessing: every byte right but one.
    a.handle_datagram(now, loc(A), loc(R), &nack(wrong));
    assert_eq!(events(&mut a), vec![]);
    assert_eq!(a.stats().auth_failures, 1);
    assert!(a.locators(h).is_some(), "the connect was abandoned");
    // The real SYN-ACK still completes it.
    b.handle_datagram(now, loc(B), loc(A), &syn[0].payload);
    for t in drain(&mut b, now) {
        a.handle_datagram(now, t.dst, t.src, &t.payload);
    }
    assert_eq!(events(&mut a), vec![Event::Connected(h)]);
    // Connected: a NACK, even with the right nonce (replayed from the wire), is ignored.
    a.handle_datagram(now, loc(A), loc(R), &nack(nonce));
    assert_eq!(a.stats().auth_failures, 2);
    assert_eq!(events(&mut a), vec![]);
    assert_eq!(a.write(h, b"still connected").unwrap(), 15);
    for t in drain(&mut a, now) {
        b.handle_datagram(now, t.dst, t.src, &t.payload);
    }
    assert!(b.accept(l).is_some());
}

// ---------------------------------------------------------------------------------------------
// The first hop and the routers
// ---------------------------------------------------------------------------------------------

/// A client behind a NAT claims an address nobody can reach: the first hop puts the address it
/// observed in SOURCE[0] (for a router) or answers it (for an instance), and only the first
/// hop does; so the SYN-ACK reaches the NAT, which hands it to the client.
#[test]
fn the_first_hop_replaces_source_by_the_address_it_observed() {
    let now = Instant::ZERO;
    // Through a router, then a second router (which must not replace it again).
    let (mut a, mut r, mut r2, mut b) = (
        endpoint(A, 1),
        endpoint(R, 3),
        endpoint(R2, 4),
        endpoint(B, 2),
    );
    let prefix = ServicePrefix::exact(svc("echo.test"));
    r.table()
        .add_target(prefix, Target::new(Action::Forward(loc(R2)), 0, 1))
        .unwrap();
    r2.table()
        .add_target(prefix, Target::new(Action::Forward(loc(B)), 0, 1))
        .unwrap();
    b.listen(prefix, 0, 1);
    let h = a.connect_via(now, svc("echo.test"), loc(R)).unwrap();
    let syn = drain(&mut a, now);
    assert_eq!(parse(&syn[0].payload).source, vec![loc(A)]);
    r.handle_datagram(now, loc(R), loc(NAT), &syn[0].payload);
    let fwd = drain(&mut r, now);
    assert_eq!(parse(&fwd[0].payload).source, vec![loc(NAT), loc(R)]);
    r2.handle_datagram(now, loc(R2), loc(R), &fwd[0].payload);
    let fwd2 = drain(&mut r2, now);
    assert_eq!(
        parse(&fwd2[0].payload).source,
        vec![loc(NAT), loc(R), loc(R2)]
    );
    b.handle_datagram(now, loc(B), loc(R2), &fwd2[0].payload);
    let synack = drain(&mut b, now);
    assert_eq!(synack.len(), 1);
    assert_eq!(synack[0].dst, loc(NAT), "the SYN-ACK goes to the NAT");
    // The NAT translates back.
    a.handle_datagram(now, loc(A), loc(B), &synack[0].payload);
    assert_eq!(events(&mut a), vec![Event::Connected(h)]);
    for t in drain(&mut a, now) {
        b.handle_datagram(now, loc(B), loc(NAT), &t.payload);
    }
    assert_eq!(b.stats().accepted, 1);

    // Straight to the instance: the same, and its connection's peer is the NAT.
    let mut c = endpoint(A, 5);
    let h = c.connect_via(now, svc("echo.test"), loc(B)).unwrap();
    let syn = drain(&mut c, now);
    b.handle_datagram(now, loc(B), loc(NAT), &syn[0].payload);
    let synack = drain(&mut b, now);
    assert_eq!(synack[0].dst, loc(NAT));
    c.handle_datagram(now, loc(A), loc(B), &synack[0].payload);
    assert_eq!(events(&mut c), vec![Event::Connected(h)]);
    for t in drain(&mut c, now) {
        b.handle_datagram(now, loc(B), loc(NAT), &t.payload);
    }
    assert_eq!(b.stats().accepted, 2);

    // A NACK takes the same way back: to the observed address.
    let h = c.connect_via(now, svc("nobody.test"), loc(R)).unwrap();
    let syn = drain(&mut c, now);
    r.handle_datagram(now, loc(R), loc(NAT), &syn[0].payload);
    let nack = drain(&mut r, now);
    assert_eq!(nack.len(), 1);
    assert_eq!(nack[0].dst, loc(NAT));
    assert_eq!(flags(&nack[0]), Some(ControlFlags::NACK));
    c.handle_datagram(now, loc(A), loc(R), &nack[0].payload);
    assert!(matches!(
        events(&mut c)[..],
        [Event::ConnectFailed(x, _)] if x == h
    ));
}

/// Two routers with the same rules choose the same instance for the same flow: a SYN whose
/// first copy went through one router and whose retransmission went through the other (the
/// client's next hop changed, or the first router died) lands on the same instance, which
/// answers the retransmission from the half-open flow it already has.
#[test]
fn a_retransmitted_syn_through_another_router_reaches_the_same_instance() {
    let prefix = ServicePrefix::exact(svc("web.test"));
    let router = |addr: &str, seed: u8| {
        let r = endpoint(addr, seed);
        for (b, w) in [(B, 1), (B2, 1)] {
            r.table()
                .add_target(prefix, Target::new(Action::Forward(loc(b)), 0, w))
                .unwrap();
        }
        r
    };
    let (mut r1, mut r2) = (router(R, 3), router(R2, 4));
    let mut to_b = 0;
    for seed in 10..42u8 {
        let mut a = endpoint(A, seed);
        a.connect_via(Instant::ZERO, svc("web.test"), loc(R))
            .unwrap();
        let first = drain(&mut a, Instant::ZERO);
        let again_at = a.poll_timeout().unwrap();
        assert_eq!(again_at, at(1000), "the SYN's first RTO");
        a.handle_timeout(again_at);
        let again = drain(&mut a, again_at);
        assert_eq!(again.len(), 1);
        assert_eq!(flags(&again[0]), Some(ControlFlags::SYN));
        r1.handle_datagram(Instant::ZERO, loc(R), loc(A), &first[0].payload);
        r2.handle_datagram(again_at, loc(R2), loc(A), &again[0].payload);
        let (f1, f2) = (drain(&mut r1, Instant::ZERO), drain(&mut r2, again_at));
        assert_eq!(
            f1[0].dst, f2[0].dst,
            "seed {seed}: the routers chose differently"
        );
        to_b += usize::from(f1[0].dst == loc(B));
    }
    // Not one instance for everything: the choice depends on the flow (32 flows, weights 1:1).
    assert!((4..=28).contains(&to_b), "{to_b} of 32 to B");

    // At the instance: the retransmission (SOURCE [A, R2]) finds the half-open flow of the
    // first copy (SOURCE [A, R]) and gets the same SYN-ACK again; one connection results.
    let mut a = endpoint(A, 50);
    let mut b = endpoint(B, 2);
    let mut b2 = endpoint(B2, 6);
    let lb = b.listen(prefix, 0, 1);
    let lb2 = b2.listen(prefix, 0, 1);
    let h = a
        .connect_via(Instant::ZERO, svc("web.test"), loc(R))
        .unwrap();
    let first = drain(&mut a, Instant::ZERO);
    a.handle_timeout(at(1000));
    let again = drain(&mut a, at(1000));
    r1.handle_datagram(Instant::ZERO, loc(R), loc(A), &first[0].payload);
    r2.handle_datagram(at(1000), loc(R2), loc(A), &again[0].payload);
    let (f1, f2) = (drain(&mut r1, Instant::ZERO), drain(&mut r2, at(1000)));
    assert_eq!(parse(&f1[0].payload).source, vec![loc(A), loc(R)]);
    assert_eq!(parse(&f2[0].payload).source, vec![loc(A), loc(R2)]);
    let (inst, l, addr) = if f1[0].dst == loc(B) {
        (&mut b, lb, B)
    } else {
        (&mut b2, lb2, B2)
    };
    inst.handle_datagram(Instant::ZERO, loc(addr), loc(R), &f1[0].payload);
    let synack1 = drain(inst, Instant::ZERO);
    // The first SYN-ACK is lost; the retransmitted SYN arrives through R2.
    inst.handle_datagram(at(1000), loc(addr), loc(R2), &f2[0].payload);
    let synack2 = drain(inst, at(1000));
    assert_eq!((synack1.len(), synack2.len()), (1, 1));
    let (s1, s2) = (parse(&synack1[0].payload), parse(&synack2[0].payload));
    assert_eq!(
        s1.src_flow, s2.src_flow,
        "one half-open flow, answered twice"
    );
    assert_eq!(s1.nonce, s2.nonce);
    a.handle_datagram(at(1000), loc(A), loc(addr), &synack2[0].payload);
    assert_eq!(events(&mut a), vec![Event::Connected(h)]);
    for t in drain(&mut a, at(1000)) {
        inst.handle_datagram(at(1000), t.dst, t.src, &t.payload);
    }
    assert!(inst.accept(l).is_some());
    assert!(inst.accept(l).is_none(), "a second connection for one SYN");
    assert_eq!(inst.stats().accepted, 1);
}

// ---------------------------------------------------------------------------------------------
// Accept queue
// ---------------------------------------------------------------------------------------------

/// SYNs for a listener whose accept queue is full are ignored (no SYN-ACK, no NACK, no state):
/// the client retransmits, and once the application accepted, the retransmission gets in.
#[test]
fn a_full_accept_queue_ignores_syns_until_the_application_accepts() {
    let config = EndpointConfig {
        accept_backlog: 1,
        ..EndpointConfig::default()
    };
    let mut b = endpoint_with(B, 2, config);
    let l = b.listen(ServicePrefix::exact(svc("echo.test")), 0, 1);
    let (mut c1, mut c2) = (endpoint(A, 1), endpoint(A2, 7));
    let now = Instant::ZERO;
    let h1 = c1.connect_via(now, svc("echo.test"), loc(B)).unwrap();
    let h2 = c2.connect_via(now, svc("echo.test"), loc(B)).unwrap();
    // c1 connects and waits in the queue (the application has not accepted it).
    let syn1 = drain(&mut c1, now);
    b.handle_datagram(now, loc(B), loc(A), &syn1[0].payload);
    for t in drain(&mut b, now) {
        c1.handle_datagram(now, t.dst, t.src, &t.payload);
    }
    for t in drain(&mut c1, now) {
        b.handle_datagram(now, t.dst, t.src, &t.payload);
    }
    assert_eq!(events(&mut c1), vec![Event::Connected(h1)]);
    assert!(events(&mut b).contains(&Event::Incoming(l)));
    // c2's SYN finds the queue full: nothing is sent back.
    let syn2 = drain(&mut c2, now);
    b.handle_datagram(now, loc(B), loc(A2), &syn2[0].payload);
    assert!(
        drain(&mut b, now).is_empty(),
        "answered a SYN with a full queue"
    );
    assert_eq!(b.stats().backlog_drops, 1);
    assert_eq!(events(&mut c2), vec![]);
    // The application accepts; c2's retransmission (1 s later) now gets in.
    assert!(b.accept(l).is_some());
    let t1 = c2.poll_timeout().unwrap();
    assert_eq!(t1, at(1000));
    c2.handle_timeout(t1);
    let again = drain(&mut c2, t1);
    assert_eq!(flags(&again[0]), Some(ControlFlags::SYN));
    b.handle_datagram(t1, loc(B), loc(A2), &again[0].payload);
    let synack = drain(&mut b, t1);
    assert_eq!(synack.len(), 1);
    c2.handle_datagram(t1, loc(A2), loc(B), &synack[0].payload);
    assert_eq!(events(&mut c2), vec![Event::Connected(h2)]);
    for t in drain(&mut c2, t1) {
        b.handle_datagram(t1, t.dst, t.src, &t.payload);
    }
    assert!(b.accept(l).is_some());
    assert_eq!(b.stats().backlog_drops, 1);
}

// ---------------------------------------------------------------------------------------------
// Close
// ---------------------------------------------------------------------------------------------

/// Both ends finish; the client's ACK of the server's FIN is lost. The client, closed for its
/// application and lingering in TIME-WAIT, re-acknowledges the server's retransmitted FIN, so
/// the server closes cleanly one RTO later (not after exhausting its retransmissions). After
/// TIME-WAIT the flow is forgotten.
#[test]
fn time_wait_re_acknowledges_a_retransmitted_fin() {
    let (mut net, h, sh) = connected();
    net.eps[0].write(h, b"request").unwrap();
    net.eps[0].finish(h).unwrap();
    net.settle(&mut |_| false);
    let mut got = Vec::new();
    assert!(read_all(&mut net.eps[1], sh, &mut got));
    assert_eq!(got, b"request");
    net.eps[1].write(sh, b"response").unwrap();
    net.eps[1].finish(sh).unwrap();
    // From now on the client's first SAL ACK (the one for the server's FIN) is lost.
    let mut lost = 0;
    let mut lose = |t: &Transmit| {
        let drop = lost == 0 && t.src == loc(A) && flags(t) == Some(ControlFlags::ACK);
        lost += usize::from(drop);
        drop
    };
    let mut got = Vec::new();
    let mut a_closed = None;
    let mut b_closed = None;
    let start = net.now;
    while b_closed.is_none() {
        assert!(net.now < start + Duration::from_secs(60), "never closed");
        net.settle(&mut lose);
        read_all(&mut net.eps[0], h, &mut got);
        net.settle(&mut lose);
        for e in events(&mut net.eps[0]) {
            if let Event::Closed(x, r) = e {
                assert_eq!((x, r), (h, CloseReason::Finished));
                a_closed.get_or_insert(net.now);
            }
        }
        for e in events(&mut net.eps[1]) {
            if let Event::Closed(x, r) = e {
                assert_eq!((x, r), (sh, CloseReason::Finished));
                b_closed = Some(net.now);
            }
        }
        if b_closed.is_none() {
            assert!(net.step(start + Duration::from_secs(60)), "nothing due");
        }
    }
    assert_eq!(got, b"response");
    assert_eq!(lost, 1, "the ACK to lose was never sent");
    let a_closed = a_closed.expect("the client never closed");
    assert!(a_closed < b_closed.unwrap());
    // The server sent its FIN twice (the first may also answer the client's: FIN|ACK), and
    // the second was answered by a client already closed.
    let is_fin = |t: &Transmit| flags(t).is_some_and(|f| f.contains(ControlFlags::FIN));
    let fins: Vec<Instant> = net
        .log
        .iter()
        .filter(|(at, t)| *at >= start && t.src == loc(B) && is_fin(t))
        .map(|(at, _)| *at)
        .collect();
    assert_eq!(fins.len(), 2);
    let fins: Vec<Instant> = net
        .log
        .iter()
        .filter(|(_, t)| t.src == loc(B) && is_fin(t))
        .map(|(at, _)| *at)
        .collect();
    assert!(
        fins[1] > a_closed,
        "the FIN was retransmitted after the client closed"
    );
    assert_eq!(
        net.sent(A, ControlFlags::ACK, fins[1]),
        1,
        "re-acknowledged"
    );
    // One RTO after the first FIN, not the 127 s of every retransmission.
    assert!(b_closed.unwrap() - fins[0] < Duration::from_secs(2));

    // TIME-WAIT (3 s) ends: the client forgets the flow, and a FIN now is an unknown flow's.
    let fin = net
        .log
        .iter()
        .rfind(|(_, t)| t.src == loc(B) && is_fin(t))
        .unwrap()
        .1
        .clone();
    net.run_until(a_closed + Duration::from_secs(4), &mut |_| false);
    let before = net.eps[0].stats().unknown_flow;
    let now = net.now;
    net.eps[0].handle_datagram(now, loc(A), loc(B), &fin.payload);
    assert_eq!(net.eps[0].stats().unknown_flow, before + 1);
    assert!(drain(&mut net.eps[0], now).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Migration
// ---------------------------------------------------------------------------------------------

/// The client moves; the server's RSYN-ACK is lost. The server sends to the new locator only
/// after verifying the RSYN, so its data arriving there completes the move at once: no RSYN
/// retransmission is needed, and none is sent.
#[test]
fn a_lost_rsyn_ack_is_completed_by_data_from_the_peer() {
    let (mut net, h, sh) = connected();
    net.eps[0].add_local(loc(A2));
    assert!(net.eps[0].migrate(h, loc(A2)));
    let moved = net.now;
    let mut lose = |t: &Transmit| flags(t) == Some(ControlFlags::RSYN | ControlFlags::ACK);
    net.settle(&mut lose);
    assert_eq!(net.sent(A, ControlFlags::RSYN, moved), 0);
    assert_eq!(net.sent(A2, ControlFlags::RSYN, moved), 1);
    assert_eq!(
        events(&mut net.eps[1]),
        vec![Event::PeerMigrated(sh, loc(A2))]
    );
    // The client has not moved yet: its RSYN is unanswered.
    assert_eq!(events(&mut net.eps[0]), vec![]);
    assert_eq!(net.eps[0].locators(h).unwrap().0, loc(A));

    // The server's data, sent to the new locator, completes the move (same instant).
    net.eps[1].write(sh, b"to the new place").unwrap();
    net.settle(&mut lose);
    assert!(
        events(&mut net.eps[0]).contains(&Event::Migrated(h, loc(A2))),
        "the data did not complete the move"
    );
    assert_eq!(net.now, moved);
    assert_eq!(net.eps[0].locators(h).unwrap(), (loc(A2), loc(B)));
    let mut got = Vec::new();
    read_all(&mut net.eps[0], h, &mut got);
    assert_eq!(got, b"to the new place");
    // The RSYN is no longer outstanding: it is never sent again, and the flow works both ways.
    net.eps[0].write(h, b"from the new place").unwrap();
    net.run_until(moved + Duration::from_secs(5), &mut lose);
    assert_eq!(net.sent(A2, ControlFlags::RSYN, moved), 1);
    let mut got = Vec::new();
    read_all(&mut net.eps[1], sh, &mut got);
    assert_eq!(got, b"from the new place");
}

/// A client's MOVE_REQUEST (docs/protocol.md §4.5) reaches the server as one
/// `Event::MoveAsked` naming the agent, and the server's MOVE_REFUSED the client as one
/// `Event::MoveRefused`; neither end can send the other's frame; and a request altered on the
/// way (or sealed under other keys) does not open, so it is never reported.
#[test]
fn a_move_request_is_reported_only_when_it_opens_under_the_flow_keys() {
    let (mut net, h, sh) = connected();
    let agent = loc(B2);
    net.eps[0].ask_move(h, agent).unwrap();
    net.settle(&mut |_| false);
    assert_eq!(events(&mut net.eps[1]), vec![Event::MoveAsked(sh, agent)]);
    // It is a request, not a move: nothing else changed at either end.
    assert_eq!(events(&mut net.eps[0]), vec![]);
    assert_eq!(net.eps[1].locators(sh).unwrap(), (loc(B), loc(A)));
    assert!(net.eps[1].ask_move(sh, agent).is_err());

    // The server says why it will not: the client hears it as one event.
    let why = serval_engine::frame::MoveRefusal::Unreachable;
    net.eps[1].refuse_move(sh, agent, why).unwrap();
    net.settle(&mut |_| false);
    assert_eq!(
        events(&mut net.eps[0]),
        vec![Event::MoveRefused(h, agent, why)]
    );
    assert!(net.eps[0].refuse_move(h, agent, why).is_err());

    // One byte flipped in the sealed request: dropped as a forgery.
    net.eps[0].ask_move(h, agent).unwrap();
    let mut sent = drain(&mut net.eps[0], net.now);
    assert_eq!(sent.len(), 1, "one packet carries the request");
    let last = sent[0].payload.len() - 1;
    sent[0].payload[last] ^= 1;
    let t = &sent[0];
    net.eps[1].handle_datagram(net.now, t.dst, t.src, &t.payload);
    assert_eq!(events(&mut net.eps[1]), vec![]);
    // The flow carries on.
    net.eps[0].write(h, b"still here").unwrap();
    net.settle(&mut |_| false);
    let mut got = Vec::new();
    read_all(&mut net.eps[1], sh, &mut got);
    assert_eq!(got, b"still here");
}

/// Split brain (docs/protocol.md §4.3): the server end moved to a new host by export, import
/// and RSYN, but the old host never heard that it lost the flow (it was thawed, as a primary
/// cut off from its standby carries on) and keeps sending. Its packets reach the client
/// first, yet the client takes only the new host's bytes: everything from the locator its
/// server left, other than an RSYN, is dropped unopened and counted.
#[test]
fn a_client_takes_nothing_from_the_host_its_server_left() {
    let (mut net, h, sh) = connected();
    net.eps.push(endpoint(B2, 3));
    net.eps[2].listen(ServicePrefix::exact(svc("echo.test")), 0, 1);
    net.eps[1].write(sh, b"before; ").unwrap();
    net.settle(&mut |_| false);
    let mut got = Vec::new();
    read_all(&mut net.eps[0], h, &mut got);
    assert_eq!(got, b"before; ");

    let now = net.now;
    let snapshot = net.eps[1].export(sh, now).unwrap();
    let moved = net.eps[2].import(&snapshot, now).unwrap();
    net.settle(&mut |_| false);
    assert!(events(&mut net.eps[0]).contains(&Event::PeerMigrated(h, loc(B2))));

    // The old host carries on, unaware, and its bytes arrive first (the new host's first
    // packet numbers are taken by what it re-sent behind its RSYN, the old host's later ones
    // are not); then the new host writes the same stretch of the stream.
    assert!(net.eps[1].thaw(sh));
    net.eps[1].write(sh, &[b'O'; 4000]).unwrap();
    net.settle(&mut |_| false);
    net.eps[2].write(moved, &[b'N'; 4000]).unwrap();
    net.run_until(now + Duration::from_secs(2), &mut |_| false);
    let mut got = Vec::new();
    read_all(&mut net.eps[0], h, &mut got);
    assert_eq!(got.len(), 4000);
    assert!(
        got.iter().all(|&b| b == b'N'),
        "the old host's bytes got in"
    );
    let fenced = net.eps[0].path_stats(h).unwrap().from_left_locator;
    assert!(fenced > 0, "nothing came from the old host?");
    assert_eq!(net.eps[0].locators(h).unwrap().1, loc(B2));

    // An RSYN from the old locator is still taken: a move back is a move like any other.
    let back = net.eps[2].export(moved, net.now).unwrap();
    net.eps[1].abort(sh);
    net.settle(&mut |_| false);
    let mut b = endpoint(B, 4);
    b.listen(ServicePrefix::exact(svc("echo.test")), 0, 1);
    net.eps[1] = b;
    let again = net.eps[1].import(&back, net.now).unwrap();
    net.settle(&mut |_| false);
    assert_eq!(net.eps[0].locators(h).unwrap().1, loc(B));
    net.eps[1].write(again, b"; back").unwrap();
    net.settle(&mut |_| false);
    let mut got = Vec::new();
    read_all(&mut net.eps[0], h, &mut got);
    assert_eq!(got, b"; back");
}

/// Whether `t` is a stream packet (transport payload, no SAL control).
fn is_stream(t: &Transmit) -> bool {
    SalPacket::new_checked(&t.payload[..]).is_ok_and(|p| p.protocol() == Protocol::STREAM)
}

/// Times at which `src` sent an RSYN, in order.
fn rsyn_times(net: &Net, src: &str) -> Vec<Instant> {
    net.log
        .iter()
        .filter(|(_, x)| x.src == loc(src) && flags(x) == Some(ControlFlags::RSYN))
        .map(|(t, _)| *t)
        .collect()
}

/// Make-before-break (issue 11, migrate-loss20 seed 5809): the client moves while its old
/// locator is still its own, and the new path loses everything for a minute. The stream keeps
/// flowing both ways on the old path; the old path's answers keep the RSYN's retransmissions
/// one second apart (never backed off to 32 s) and the flow alive well past the 30 s idle
/// timeout and the six retransmissions of the control channel. When the new path heals, the
/// next RSYN moves the flow.
#[test]
fn a_move_keeps_the_old_path_until_the_new_one_answers() {
    let (mut net, h, sh) = connected();
    net.eps[0].add_local(loc(A2));
    assert!(net.eps[0].migrate(h, loc(A2)));
    let moved = net.now;
    let mut new_path_dead = |t: &Transmit| t.src == loc(A2) || t.dst == loc(A2);
    // Each end writes a little every 5 s for a minute; the rest of the time the flow is quiet.
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    for i in 0u8..12 {
        net.eps[0].write(h, &[i]).unwrap();
        net.eps[1].write(sh, &[100 + i]).unwrap();
        let until = net.now + Duration::from_secs(5);
        net.run_until(until, &mut new_path_dead);
        read_all(&mut net.eps[0], h, &mut got_a);
        read_all(&mut net.eps[1], sh, &mut got_b);
    }
    assert_eq!(got_b, (0u8..12).collect::<Vec<_>>(), "client to server");
    assert_eq!(got_a, (100u8..112).collect::<Vec<_>>(), "server to client");
    assert!(
        net.log
            .iter()
            .any(|(t, x)| *t > moved && x.src == loc(A) && is_stream(x)),
        "the client used the old path"
    );
    assert_eq!(net.eps[0].locators(h).unwrap(), (loc(A), loc(B)));
    assert!(
        !events(&mut net.eps[0])
            .iter()
            .any(|e| matches!(e, Event::Closed(..)))
    );
    assert!(
        !events(&mut net.eps[1])
            .iter()
            .any(|e| matches!(e, Event::Closed(..)))
    );
    // Bounded backoff: one RSYN a second (the cap is the control RTO here, the path being
    // fast), however many were lost.
    let rsyns = rsyn_times(&net, A2);
    assert!(rsyns.len() >= 55, "{} RSYNs in a minute", rsyns.len());
    for w in rsyns.windows(2) {
        assert!(
            w[1] - w[0] <= Duration::from_secs(1),
            "gap {:?}",
            w[1] - w[0]
        );
    }

    // The new path heals: the next RSYN moves the flow, and data flows from the new locator.
    let healed = net.now;
    net.run_until(healed + Duration::from_secs(2), &mut |_| false);
    assert!(events(&mut net.eps[0]).contains(&Event::Migrated(h, loc(A2))));
    assert_eq!(net.eps[0].locators(h).unwrap(), (loc(A2), loc(B)));
    net.eps[0].write(h, b"from A2").unwrap();
    net.run_until(net.now + Duration::from_secs(1), &mut |_| false);
    let mut got = Vec::new();
    read_all(&mut net.eps[1], sh, &mut got);
    assert_eq!(got, b"from A2");
    assert!(
        net.log
            .iter()
            .any(|(t, x)| *t > healed && x.src == loc(A2) && is_stream(x))
    );
}

/// Even with nothing to send, the old path shows life: each retransmitted RSYN carries a PING
/// on the old path, whose acknowledgement keeps the backoff bounded and the flow alive. The
/// application may give the dead target up for another: the new move replaces it.
#[test]
fn a_quiet_flow_keeps_probing_the_old_path_while_it_moves() {
    let (mut net, h, _sh) = connected();
    net.eps[0].add_local(loc(A2));
    assert!(net.eps[0].migrate(h, loc(A2)));
    let mut new_path_dead = |t: &Transmit| t.src == loc(A2) || t.dst == loc(A2);
    net.run_until(net.now + Duration::from_secs(45), &mut new_path_dead);
    let rsyns = rsyn_times(&net, A2);
    assert!(rsyns.len() >= 40, "{} RSYNs", rsyns.len());
    for w in rsyns.windows(2) {
        assert!(
            w[1] - w[0] <= Duration::from_secs(1),
            "gap {:?}",
            w[1] - w[0]
        );
    }
    assert!(
        !events(&mut net.eps[0])
            .iter()
            .any(|e| matches!(e, Event::Closed(..)))
    );
    // Redirected: the RSYNs to A2 stop, and the move to A3 completes.
    assert!(!net.eps[0].migrate(h, loc(A2)), "already going there");
    net.eps[0].add_local(loc(A3));
    assert!(net.eps[0].migrate(h, loc(A3)));
    let redirected = net.now;
    net.run_until(net.now + Duration::from_secs(3), &mut new_path_dead);
    let client = events(&mut net.eps[0]);
    assert!(
        client.contains(&Event::MoveAbandoned(h, loc(A2))),
        "{client:?}"
    );
    assert!(client.contains(&Event::Migrated(h, loc(A3))), "{client:?}");
    assert_eq!(net.eps[0].locators(h).unwrap().0, loc(A3));
    assert!(rsyn_times(&net, A2).iter().all(|t| *t <= redirected));
    assert!(
        !events(&mut net.eps[1])
            .iter()
            .any(|e| matches!(e, Event::Closed(..)))
    );
}

/// A flow that finishes while it moves toward a dead new path closes: its FIN waits behind the
/// RSYN only `FIN_WAITS_FOR_RSYN` timeouts of it (with the old path alive the RSYN would be
/// retransmitted for as long as the old path lives: before, the close never came). Then the
/// move is given up and the FIN goes on the old path.
#[test]
fn a_flow_that_finishes_mid_move_closes_on_its_old_path() {
    let (mut net, h, sh) = connected();
    net.eps[0].write(h, b"request").unwrap();
    net.eps[0].add_local(loc(A2));
    assert!(net.eps[0].migrate(h, loc(A2)));
    let started = net.now;
    let mut new_path_dead = |t: &Transmit| t.src == loc(A2) || t.dst == loc(A2);
    net.run_until(net.now + Duration::from_millis(200), &mut new_path_dead);
    let mut got = Vec::new();
    read_all(&mut net.eps[1], sh, &mut got);
    assert_eq!(got, b"request");
    net.eps[1].write(sh, b"answer").unwrap();
    net.eps[1].finish(sh).unwrap();
    net.eps[0].finish(h).unwrap();
    let mut got = Vec::new();
    let mut ended = false;
    for _ in 0..30 {
        net.run_until(net.now + Duration::from_secs(1), &mut new_path_dead);
        ended |= read_all(&mut net.eps[0], h, &mut got);
    }
    assert!(ended);
    assert_eq!(got, b"answer");
    let client = events(&mut net.eps[0]);
    assert!(
        client.contains(&Event::MoveAbandoned(h, loc(A2))),
        "{client:?}"
    );
    assert!(
        client.contains(&Event::Closed(h, CloseReason::Finished)),
        "{client:?}"
    );
    // The FIN left from the old locator once the RSYN had timed out 12 times, a second or so
    // apart.
    let fin = net
        .log
        .iter()
        .find(|(_, x)| x.src == loc(A) && flags(x) == Some(ControlFlags::FIN))
        .map(|(t, _)| *t - started)
        .expect("the client sent its FIN");
    let rsyns = rsyn_times(&net, A2);
    assert_eq!(rsyns.len() as u32, FIN_WAITS_FOR_RSYN, "{rsyns:?}");
    assert!(
        fin > Duration::from_secs(10) && fin < Duration::from_secs(16),
        "FIN {fin:?} after the move began"
    );
}

/// Break-before-make, as before issue 11: the old locator is removed from the endpoint
/// mid-move, so the client stops sending from it, and with the new path dead the RSYN backs
/// off exponentially (1, 2, 4, 8, 16 s) until the flow dies.
#[test]
fn a_move_whose_old_locator_is_gone_backs_off_and_fails() {
    let (mut net, h, sh) = connected();
    net.eps[0].add_local(loc(A2));
    assert!(net.eps[0].migrate(h, loc(A2)));
    net.eps[0].remove_local(&loc(A));
    let moved = net.now;
    // The server still sends to A (its packets are lost: no endpoint holds A any more).
    net.eps[1].write(sh, b"to nowhere").unwrap();
    let mut new_path_dead = |t: &Transmit| t.src == loc(A2) || t.dst == loc(A2);
    net.run_until(moved + Duration::from_secs(200), &mut new_path_dead);
    assert!(
        !net.log
            .iter()
            .any(|(t, x)| *t > moved && x.src == loc(A) && is_stream(x)),
        "the client sent from its removed locator"
    );
    let rsyns = rsyn_times(&net, A2);
    let gaps: Vec<_> = rsyns.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() >= 4, "{gaps:?}");
    for (i, g) in gaps.iter().take(4).enumerate() {
        assert_eq!(*g, Duration::from_secs(1 << i), "{gaps:?}");
    }
    assert!(events(&mut net.eps[0]).iter().any(|e| matches!(
        e,
        Event::Closed(c, CloseReason::IdleTimeout | CloseReason::TimedOut) if *c == h
    )));
}

// ---------------------------------------------------------------------------------------------
// Control sequence numbers
// ---------------------------------------------------------------------------------------------

/// A hand-made client (its packets built and sealed here, with its own ephemeral key) whose
/// control vernos start just below 2^32, so they wrap during the flow. The server compares them
/// as serial numbers (RFC 1982): 0 comes after 0xffff_ffff; its answers' acknos wrap too; a
/// stale RSYN from before the wrap, delayed from an old locator, is answered but moves nothing;
/// and a byte-for-byte replay of an RSYN is dropped unanswered.
#[test]
fn control_vernos_wrap_around() {
    let now = Instant::ZERO;
    let service = svc("echo.test");
    let mut b = endpoint(B, 2);
    let l = b.listen(ServicePrefix::exact(service), 0, 1);
    // A real client's SYN, with its verno set to 2^32 - 2 (a SYN carries no AUTH).
    let mut a = endpoint(A, 1);
    a.connect_via(now, service, loc(B)).unwrap();
    let mut syn = parse(&drain(&mut a, now)[0].payload);
    syn.control.as_mut().unwrap().verno = u32::MAX - 1;
    let kx = KeyExchange::new([9; 32]);
    syn.keyshare = Some(kx.share(0));
    let (cflow, cnonce) = (syn.src_flow, syn.nonce.unwrap());
    b.handle_datagram(now, loc(B), loc(A), &syn.to_bytes(&[]).unwrap());
    let mut out = drain(&mut b, now);
    assert_eq!(out.len(), 1);
    let synack = parse(&out[0].payload);
    assert_eq!(synack.control.unwrap().ackno, u32::MAX);
    let sflow = synack.src_flow;
    let server_share = synack.keyshare.unwrap();
    let dh = kx.agree(&server_share).unwrap();
    let transcript = Transcript {
        service: &service,
        client_flow: cflow,
        client_nonce: &cnonce,
        client_share: &syn.keyshare.unwrap(),
        server_flow: sflow,
        server_nonce: &synack.nonce.unwrap(),
        server_share: &server_share,
    };
    let secrets = FlowSecrets::derive(true, Protection::Encrypted, &dh, &transcript);
    let mut keys = Protector::new(secrets, DEFAULT_KEY_UPDATE_INTERVAL);
    let header_len = usize::from(
        SalPacket::new_checked(&out[0].payload[..])
            .unwrap()
            .header_len(),
    );
    keys.open(&mut out[0].payload, header_len, Space::Control)
        .expect("the SYN-ACK opens with the keys of our share and the server's");
    let mut sealed = |flags: ControlFlags, verno: u32, ackno: u32| {
        let mut r = SalRepr::new(Protocol::NONE, cflow, sflow);
        r.control = Some(ControlRepr {
            flags,
            verno,
            ackno,
        });
        let mut bytes = r.to_bytes(&[]).unwrap();
        keys.seal_control(&mut bytes, 0, r.buffer_len());
        bytes
    };
    let answer = |b: &mut Endpoint, to: &str| {
        let out = drain(b, now);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].dst, loc(to));
        let r = parse(&out[0].payload);
        assert_eq!(
            r.control.unwrap().flags,
            ControlFlags::RSYN | ControlFlags::ACK
        );
        r.control.unwrap().ackno
    };
    b.handle_datagram(
        now,
        loc(B),
        loc(A),
        &sealed(
            ControlFlags::ACK,
            0,
            synack.control.unwrap().verno.wrapping_add(1),
        ),
    );
    let sh = b.accept(l).expect("the ACK completed the handshake");
    events(&mut b);

    // RSYN 2^32 - 1 from A2: a move, answered with ackno 0.
    let rsyn_max = sealed(ControlFlags::RSYN, u32::MAX, 0);
    b.handle_datagram(now, loc(B), loc(A2), &rsyn_max);
    assert_eq!(events(&mut b), vec![Event::PeerMigrated(sh, loc(A2))]);
    assert_eq!(answer(&mut b, A2), 0);
    // RSYN 0 from A3: after the wrap, still new.
    b.handle_datagram(now, loc(B), loc(A3), &sealed(ControlFlags::RSYN, 0, 0));
    assert_eq!(events(&mut b), vec![Event::PeerMigrated(sh, loc(A3))]);
    assert_eq!(answer(&mut b, A3), 1);
    assert_eq!(b.locators(sh).unwrap().1, loc(A3));
    // The RSYN from before the wrap, delayed from A2: old, so it moves nothing.
    b.handle_datagram(
        now,
        loc(B),
        loc(A2),
        &sealed(ControlFlags::RSYN, u32::MAX, 0),
    );
    assert_eq!(events(&mut b), vec![], "a stale RSYN moved the peer back");
    assert_eq!(b.locators(sh).unwrap().1, loc(A3));
    assert_eq!(
        answer(&mut b, A3),
        0,
        "answered again, to where the client is"
    );
    // The very same packet again (a replay): dropped before the control channel sees it.
    let replays = b.stats().replays;
    b.handle_datagram(now, loc(B), loc(A2), &rsyn_max);
    assert_eq!(events(&mut b), vec![]);
    assert!(drain(&mut b, now).is_empty(), "a replay was answered");
    assert_eq!(b.stats().replays, replays + 1);
    // A repeat of the latest RSYN from a new address (a NAT rebinding its retransmission)
    // still moves it.
    b.handle_datagram(now, loc(B), loc(NAT), &sealed(ControlFlags::RSYN, 0, 0));
    assert_eq!(events(&mut b), vec![Event::PeerMigrated(sh, loc(NAT))]);
    assert_eq!(answer(&mut b, NAT), 1);
    // And the flow still carries data, to where the client is now.
    b.write(sh, b"after the wrap").unwrap();
    let data = drain(&mut b, now);
    assert!(!data.is_empty());
    assert!(data.iter().all(|t| t.dst == loc(NAT)));
}

/// A client that moves at once: its RSYN from the new path reaches the server before the
/// ACK (or data) that completes the handshake on the old one. The RSYN, sealed under the
/// flow's keys and naming both flowIDs, completes it itself: the server accepts the
/// connection and answers at once. (It was ignored, and the move waited for the RSYN's
/// retransmission a second later; the runtime's loopback tests saw it one run in two.)
#[test]
fn an_rsyn_that_overtakes_the_handshake_ack_completes_it() {
    let now = Instant::ZERO;
    let (mut a, mut b) = (endpoint(A, 1), endpoint(B, 2));
    let l = b.listen(ServicePrefix::exact(svc("echo.test")), 0, 1);
    let h = a.connect_via(now, svc("echo.test"), loc(B)).unwrap();
    for t in drain(&mut a, now) {
        b.handle_datagram(now, t.dst, t.src, &t.payload);
    }
    for t in drain(&mut b, now) {
        a.handle_datagram(now, t.dst, t.src, &t.payload);
    }
    assert!(events(&mut a).contains(&Event::Connected(h)));
    a.add_local(loc(A2));
    assert!(a.migrate(h, loc(A2)));
    // Only the RSYN reaches the server: the handshake ACK, on the old path, is late.
    let out = drain(&mut a, now);
    let rsyn: Vec<_> = out
        .iter()
        .filter(|t| flags(t) == Some(ControlFlags::RSYN))
        .collect();
    assert_eq!(rsyn.len(), 1, "{out:?}");
    b.handle_datagram(now, rsyn[0].dst, rsyn[0].src, &rsyn[0].payload);
    let sh = b.accept(l).expect("the RSYN completed the handshake");
    assert_eq!(b.locators(sh).unwrap().1, loc(A2));
    let answers = drain(&mut b, now);
    let rsyn_ack = answers
        .iter()
        .find(|t| flags(t) == Some(ControlFlags::RSYN | ControlFlags::ACK))
        .expect("answered at once");
    assert_eq!(rsyn_ack.dst, loc(A2));
    a.handle_datagram(now, rsyn_ack.dst, rsyn_ack.src, &rsyn_ack.payload);
    assert!(events(&mut a).contains(&Event::Migrated(h, loc(A2))));
}
