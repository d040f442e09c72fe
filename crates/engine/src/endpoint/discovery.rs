//! Routerless mode: SYNs multicast to every endpoint on the local network.
//!
//! With no router, a client's default rule forwards SYNs to a link-local multicast group
//! (DESIGN.md §4, "ad-hoc mode"). Every endpoint listening on that group receives each such
//! SYN; the runtime hands them to [`Endpoint::handle_discovery_datagram`]. Only an endpoint
//! with a local stream listener for the service answers (the normal SYN-ACK, from its own
//! unicast locator, so the client learns where the instance is); every other endpoint stays
//! silent: a NACK from each host of the LAN would both flood the client and race the real
//! answer, and forwarding a multicast SYN could loop it back into the group.

use serval_wire::ext::ControlFlags;
use serval_wire::{Locator, Protocol, SalPacket, SalRepr};

use super::Endpoint;
use crate::Instant;

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

    fn endpoint(addr: &str, seed: u8) -> Endpoint {
        Endpoint::new(
            EndpointConfig::default(),
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
