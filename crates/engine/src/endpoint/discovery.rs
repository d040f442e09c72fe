//! Routerless mode: SYNs multicast to every endpoint on the local network.
//!
//! With no router, a client's default rule forwards SYNs to a link-local multicast group
//! (DESIGN.md §4, "ad-hoc mode"). Every endpoint listening on that group receives each such
//! SYN; the runtime hands them to [`Endpoint::handle_discovery_datagram`]. Only an endpoint
//! with a local stream listener for the service answers (the normal SYN-ACK, from its own
//! unicast locator, so the client learns where the instance is); every other endpoint stays
//! silent: a NACK from each host of the LAN would both flood the client and race the real
//! answer, and forwarding a multicast SYN could loop it back into the group.

use std::collections::{BTreeMap, HashSet};

use rand_chacha::rand_core::Rng;
use serval_wire::ext::ControlFlags;
use serval_wire::{FlowId, Locator, Nonce, Protocol, SalPacket, SalRepr};

use super::Endpoint;
use crate::Instant;

/// Most discovery SYNs waiting for their answer time; beyond it they are answered at once.
const ANSWER_LATER_MAX: usize = 1024;

/// Discovery SYNs this endpoint will answer, each at its weighted random time.
///
/// Every instance on the LAN that serves the name answers a multicast SYN, and the client
/// keeps the first SYN-ACK. Each waits an exponential time of mean `scale / weight` first:
/// the minimum of such waits falls to instance *i* with probability `wᵢ / Σw` (an exponential
/// race), so routerless connections spread by weight as routed ones do, at the cost of that
/// minimum (mean `scale / Σw`) added to the connect.
#[derive(Debug, Default)]
pub(crate) struct AnswerLater {
    /// (answer time, sequence) → the SYN as received.
    due: BTreeMap<(Instant, u64), Waiting>,
    /// The SYNs waiting, so a retransmission is not queued twice.
    keys: HashSet<(FlowId, Nonce)>,
    seq: u64,
}

#[derive(Debug)]
struct Waiting {
    local: Locator,
    remote: Locator,
    data: Vec<u8>,
    repr: SalRepr,
    key: (FlowId, Nonce),
}

impl AnswerLater {
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.due.keys().next().map(|(t, _)| *t)
    }
}

impl Endpoint {
    /// Handles one datagram received on the discovery group. `local` is this endpoint's own
    /// unicast locator of the datagram's family (answers leave from there), `remote` its UDP
    /// source.
    ///
    /// A SYN for a service a local stream listener serves (a DEMUX rule) is answered exactly as
    /// [`Endpoint::handle_datagram`] would, retransmissions included. Anything else — not a SYN,
    /// no rule, a FORWARD, DELAY or DROP rule — is dropped without a reply and counted in
    /// [`EndpointStats::discovery_ignored`](super::EndpointStats::discovery_ignored) (or
    /// `malformed`).
    pub fn handle_discovery_datagram(
        &mut self,
        now: Instant,
        local: Locator,
        remote: Locator,
        data: &[u8],
    ) {
        self.stats.received += 1;
        self.stats.discovery_received += 1;
        let Ok(pkt) = SalPacket::new_checked(data) else {
            self.stats.malformed += 1;
            return;
        };
        if pkt.protocol() == Protocol::REGISTRATION
            || pkt.protocol() == Protocol::DATAGRAM
            || !pkt.dst_flow().is_none()
        {
            self.stats.discovery_ignored += 1;
            return;
        }
        let Ok(repr) = SalRepr::parse(&pkt) else {
            self.stats.malformed += 1;
            return;
        };
        let (Some(ctl), Some(_), Some(_)) = (repr.control, repr.service, repr.nonce) else {
            self.stats.discovery_ignored += 1;
            return;
        };
        if ctl.flags != ControlFlags::SYN || repr.source.is_empty() || repr.src_flow.is_none() {
            self.stats.discovery_ignored += 1;
            return;
        }
        // Resolved (once, so a table edit in between cannot make it a FORWARD) and answered
        // only for a local stream listener; a retransmission of a SYN we answered finds its
        // half-open flow and gets the SYN-ACK again.
        self.handle_syn(now, local, remote, data, repr, true);
    }

    /// Queues the answer to a discovery SYN a listener of weight `weight` serves, to be sent
    /// at its weighted random time ([`AnswerLater`]); `false` if it must be answered now (the
    /// wait is over for this SYN, the scale is zero, or the queue is full).
    pub(super) fn answer_discovery_later(
        &mut self,
        now: Instant,
        local: Locator,
        remote: Locator,
        data: &[u8],
        repr: &SalRepr,
        weight: u32,
    ) -> bool {
        let scale = self.config.discovery_answer_scale;
        let Some(nonce) = repr.nonce else {
            return false;
        };
        if self.answering_discovery || scale.is_zero() {
            return false;
        }
        let key = (repr.src_flow, nonce);
        let q = &mut self.answer_later;
        if q.keys.contains(&key) {
            // A retransmission of a SYN already waiting: it will be answered once.
            return true;
        }
        if q.due.len() >= ANSWER_LATER_MAX {
            return false;
        }
        // Exponential with mean scale / weight: -ln(U) with U uniform in (0, 1].
        let u = ((self.rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let wait = scale.mul_f64(-u.ln() / f64::from(weight.max(1)));
        let at = now.checked_add(wait).unwrap_or(now);
        q.seq += 1;
        q.keys.insert(key);
        q.due.insert(
            (at, q.seq),
            Waiting {
                local,
                remote,
                data: data.to_vec(),
                repr: repr.clone(),
                key,
            },
        );
        true
    }

    /// Answers the discovery SYNs whose time has come (as if they arrived now).
    pub(super) fn answer_discovery_due(&mut self, now: Instant) {
        while let Some(entry) = self.answer_later.due.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let w = entry.remove();
            self.answer_later.keys.remove(&w.key);
            self.answering_discovery = true;
            self.handle_syn(now, w.local, w.remote, &w.data, w.repr, true);
            self.answering_discovery = false;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;
    use std::time::Duration;

    use serval_table::{Action, ServiceTable, Target};
    use serval_wire::{ServiceId, ServicePrefix};

    use super::*;
    use crate::endpoint::{EndpointConfig, Event};

    const GROUP: &str = "239.255.86.76:54323";

    fn loc(s: &str) -> Locator {
        s.parse().unwrap()
    }

    /// An endpoint that answers discovery SYNs at once (most tests here are about who
    /// answers, not when).
    fn endpoint(addr: &str, seed: u8) -> Endpoint {
        weighed_endpoint(addr, seed, Duration::ZERO)
    }

    /// An endpoint answering discovery SYNs after a wait of mean `scale / weight`.
    fn weighed_endpoint(addr: &str, seed: u8, scale: Duration) -> Endpoint {
        Endpoint::new(
            EndpointConfig {
                discovery_answer_scale: scale,
                ..EndpointConfig::default()
            },
            [seed; 32],
            Arc::new(ServiceTable::new()),
            vec![loc(addr)],
        )
    }

    fn svc() -> ServiceId {
        ServiceId::from_name("web.test").unwrap()
    }

    /// A client whose default rule forwards to the group, and its SYN.
    fn client_syn(now: Instant) -> (Endpoint, Vec<u8>) {
        let mut c = endpoint("10.0.0.1:5000", 1);
        c.table()
            .add_target(
                ServicePrefix::DEFAULT,
                Target::new(Action::Forward(loc(GROUP)), 0, 1),
            )
            .unwrap();
        c.connect(now, svc()).unwrap();
        let t = c.poll_transmit(now).unwrap();
        assert_eq!(t.dst, loc(GROUP));
        (c, t.payload)
    }

    #[test]
    fn only_an_endpoint_with_a_local_listener_answers() {
        let now = Instant::ZERO;
        let (_client, syn) = client_syn(now);
        let from = loc("10.0.0.1:5000");
        // The instance.
        let mut inst = endpoint("10.0.0.2:6000", 2);
        inst.listen(ServicePrefix::exact(svc()), 0, 1);
        inst.handle_discovery_datagram(now, loc("10.0.0.2:6000"), from, &syn);
        let t = inst.poll_transmit(now).unwrap();
        assert_eq!((t.src, t.dst), (loc("10.0.0.2:6000"), from));
        assert_eq!(inst.stats().discovery_answered, 1);
        // Its retransmission is answered again, not counted twice.
        inst.handle_discovery_datagram(now, loc("10.0.0.2:6000"), from, &syn);
        assert!(inst.poll_transmit(now).is_some());
        assert_eq!(inst.stats().discovery_answered, 1);

        // No rule, a FORWARD rule (even the group itself), a DROP rule, a datagram-only
        // listener: silence.
        let mut none = endpoint("10.0.0.3:6000", 3);
        let mut fwd = endpoint("10.0.0.4:6000", 4);
        fwd.table()
            .add_target(
                ServicePrefix::DEFAULT,
                Target::new(Action::Forward(loc(GROUP)), 0, 1),
            )
            .unwrap();
        let mut drop = endpoint("10.0.0.5:6000", 5);
        drop.table()
            .add_target(ServicePrefix::exact(svc()), Target::new(Action::Drop, 0, 1))
            .unwrap();
        let mut dgram = endpoint("10.0.0.6:6000", 6);
        dgram.listen_datagrams(ServicePrefix::exact(svc()), 0, 1);
        let mut delay = endpoint("10.0.0.7:6000", 7);
        delay
            .table()
            .add_target(
                ServicePrefix::exact(svc()),
                Target::new(Action::Delay, 0, 1),
            )
            .unwrap();
        for ep in [&mut none, &mut fwd, &mut drop, &mut dgram, &mut delay] {
            let local = ep.locals()[0];
            ep.handle_discovery_datagram(now, local, from, &syn);
            assert_eq!(ep.poll_transmit(now), None);
            let st = ep.stats();
            assert_eq!(
                (st.discovery_ignored, st.nacks_sent, st.forwarded),
                (1, 0, 0)
            );
            assert_eq!((st.delayed, st.discovery_answered), (0, 0));
        }
    }

    #[test]
    fn answers_race_by_weight_so_the_first_to_arrive_follows_the_weights() {
        let scale = Duration::from_millis(10);
        let now = Instant::ZERO;
        let from = loc("10.0.0.1:5000");
        let (la, lb) = (loc("10.0.0.2:6000"), loc("10.0.0.3:6000"));
        let mut a = weighed_endpoint("10.0.0.2:6000", 2, scale);
        let mut b = weighed_endpoint("10.0.0.3:6000", 3, scale);
        a.listen(ServicePrefix::exact(svc()), 0, 3);
        b.listen(ServicePrefix::exact(svc()), 0, 1);
        let mut client = endpoint("10.0.0.1:5000", 1);
        client
            .table()
            .add_target(
                ServicePrefix::DEFAULT,
                Target::new(Action::Forward(loc(GROUP)), 0, 1),
            )
            .unwrap();
        let (n, mut a_first, mut first_total) = (2000u32, 0u32, Duration::ZERO);
        for _ in 0..n {
            client.connect(now, svc()).unwrap();
            let syn = client.poll_transmit(now).unwrap().payload;
            a.handle_discovery_datagram(now, la, from, &syn);
            b.handle_discovery_datagram(now, lb, from, &syn);
            // Nothing goes out at once; each answers at its own time, a retransmission of the
            // SYN while waiting changes nothing.
            assert_eq!(a.poll_transmit(now), None);
            a.handle_discovery_datagram(now, la, from, &syn);
            let (ta, tb) = (a.poll_timeout().unwrap(), b.poll_timeout().unwrap());
            if ta <= tb {
                a_first += 1;
            }
            first_total += ta.min(tb).saturating_duration_since(now);
            for (ep, t) in [(&mut a, ta), (&mut b, tb)] {
                ep.handle_timeout(t);
                let answer = ep.poll_transmit(t).unwrap();
                assert_eq!(answer.dst, from);
                assert_eq!(ep.poll_transmit(t), None, "answered once");
            }
        }
        assert_eq!(a.stats().discovery_answered, u64::from(n));
        // P(A first) = 3/4: Binomial(2000, 3/4) has sd 19.4; accept ±4 sd.
        assert!((1423..=1577).contains(&a_first), "A first {a_first} of {n}");
        // The first answer waits scale / Σw = 2.5 ms on average.
        let mean = first_total / n;
        assert!(
            mean > Duration::from_millis(2) && mean < Duration::from_millis(3),
            "{mean:?}"
        );
    }

    #[test]
    fn non_syns_and_garbage_are_dropped_and_counted() {
        let now = Instant::ZERO;
        let mut inst = endpoint("10.0.0.2:6000", 2);
        inst.listen(ServicePrefix::exact(svc()), 0, 1);
        let local = loc("10.0.0.2:6000");
        let from = loc("10.0.0.1:5000");
        inst.handle_discovery_datagram(now, local, from, b"");
        inst.handle_discovery_datagram(now, local, from, &[0xff; 40]);
        // A datagram by name sent to the group.
        let mut c = endpoint("10.0.0.1:5000", 1);
        c.send_datagram_via(None, svc(), loc(GROUP), b"hi").unwrap();
        let t = c.poll_transmit(now).unwrap();
        inst.handle_discovery_datagram(now, local, from, &t.payload);
        // A truncated SYN.
        let (_c, syn) = client_syn(now);
        for n in 0..syn.len() {
            inst.handle_discovery_datagram(now, local, from, &syn[..n]);
        }
        assert_eq!(inst.poll_transmit(now), None);
        let st = inst.stats();
        assert_eq!(st.discovery_received, 3 + syn.len() as u64);
        assert_eq!(st.discovery_answered, 0);
        assert_eq!(st.malformed + st.discovery_ignored, st.discovery_received);
    }

    #[test]
    fn the_first_syn_ack_wins_and_a_second_instance_does_not_break_the_stream() {
        let mut now = Instant::ZERO;
        let (mut client, syn) = client_syn(now);
        let from = loc("10.0.0.1:5000");
        let (la, lb) = (loc("10.0.0.2:6000"), loc("10.0.0.3:6000"));
        let mut a = endpoint("10.0.0.2:6000", 2);
        let mut b = endpoint("10.0.0.3:6000", 3);
        a.listen(ServicePrefix::exact(svc()), 0, 1);
        b.listen(ServicePrefix::exact(svc()), 0, 1);
        a.handle_discovery_datagram(now, la, from, &syn);
        b.handle_discovery_datagram(now, lb, from, &syn);
        let sa = a.poll_transmit(now).unwrap();
        let sb = b.poll_transmit(now).unwrap();
        client.handle_datagram(now, from, sa.src, &sa.payload);
        let h = match std::iter::from_fn(|| client.poll_event()).last() {
            Some(Event::Connected(h)) => h,
            e => panic!("{e:?}"),
        };
        assert_eq!(client.locators(h).unwrap().1, la);
        // B's SYN-ACK arrives second: dropped and counted, the stream is A's; B gets an RST
        // it accepts, and frees its half-open flow.
        client.handle_datagram(now, from, sb.src, &sb.payload);
        assert_eq!(client.stats().duplicate_syn_acks, 1);
        assert_eq!(client.stats().stray_resets, 1);
        assert_eq!(client.locators(h).unwrap().1, la);
        let rst = client.poll_transmit(now).unwrap();
        assert_eq!((rst.src, rst.dst), (from, lb));
        assert_eq!(b.half_open.len(), 1);
        b.handle_datagram(now, rst.dst, rst.src, &rst.payload);
        assert_eq!(b.stats().auth_failures, 0);
        assert!(b.half_open.is_empty());
        assert_eq!(b.conns.iter().flatten().count(), 0);
        while b.poll_transmit(now).is_some() {}
        // A forged SYN-ACK (bad tag) gets no RST.
        let mut forged = sb.payload.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        client.handle_datagram(now, from, sb.src, &forged);
        assert_eq!(client.stats().duplicate_syn_acks, 2);
        assert_eq!(client.stats().stray_resets, 1);
        // Data still flows to A and back.
        while let Some(t) = client.poll_transmit(now) {
            assert_eq!(t.dst, la);
            a.handle_datagram(now, t.dst, t.src, &t.payload);
        }
        assert_eq!(client.write(h, b"ping").unwrap(), 4);
        now += Duration::from_millis(1);
        let mut got = false;
        while let Some(t) = client.poll_transmit(now) {
            assert_eq!(t.dst, la);
            a.handle_datagram(now, t.dst, t.src, &t.payload);
            got = true;
        }
        assert!(got);
        let accepted = std::iter::from_fn(|| a.poll_event())
            .filter(|e| matches!(e, Event::Incoming(_)))
            .count();
        assert_eq!(accepted, 1);
        assert!(
            std::iter::from_fn(|| client.poll_event()).all(|e| !matches!(e, Event::Closed(..)))
        );
    }
}
