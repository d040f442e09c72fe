//! Where a connection with several paths sends what it sends (issue 11;
//! docs/moving-flows.md §2, "Schedulers").
//!
//! Every call of [`Transport::poll_transmit`] with several paths builds one packet on one
//! path. Which path is the scheduler's choice:
//!
//! 1. A path that owes something now (an acknowledgement due, a probe, a PING) goes first:
//!    a path that always has data to send must not starve another's acknowledgements, whose
//!    sender would take the silence for a failure.
//! 2. Under [`Scheduler::Redundant`], the copies of the last data packet, one per other path
//!    that may carry data and has room for it now.
//! 3. The paths that may carry data, lowest smoothed RTT first (a backup only while no other
//!    usable path works), then the rest for what they owe themselves.
//!
//! The scheduler is each end's own policy: the peer neither knows nor needs to. A copy is an
//! ordinary packet of its path (its own packet number, acknowledged and declared lost there);
//! the receiver keeps the first copy of each byte and counts the others as duplicates.

use super::{Emit, Instant, MAX_PATHS, SentPayload, State, Transport};
use core::time::Duration;

/// How a connection with several paths spreads its stream data over them
/// ([`TransportConfig::scheduler`](super::TransportConfig::scheduler),
/// [`Transport::set_scheduler`]). With one path there is nothing to choose: both send the
/// same packets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Scheduler {
    /// Each packet of data goes on the usable path with the lowest smoothed RTT whose
    /// congestion window and pacer allow it, then on the next: a bulk transfer fills every
    /// path. The default.
    #[default]
    LowestRtt,
    /// Each packet of stream data goes on the path [`LowestRtt`](Self::LowestRtt) picks,
    /// and a copy of it on every other path that may carry data and has room in its window
    /// and pacer at that moment. For small, latency-sensitive writes (requests, key
    /// strokes, game state): a loss on one path, or a path going silent, costs no
    /// retransmission timeout as long as another path delivers. The price is every such
    /// byte sent once per path. A path with no room skips the copy (copies never queue), so
    /// a bulk transfer still moves, at about the rate of its fastest path rather than the
    /// sum. Datagrams are not copied: their receiver could not tell a copy from a new one.
    Redundant,
}

impl Scheduler {
    /// Its name on command lines and in configuration: `lowest-rtt` or `redundant`.
    pub fn name(self) -> &'static str {
        match self {
            Scheduler::LowestRtt => "lowest-rtt",
            Scheduler::Redundant => "redundant",
        }
    }
}

impl core::fmt::Display for Scheduler {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is no [`Scheduler`]'s.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown scheduler {0:?} (expected lowest-rtt or redundant)")]
pub struct UnknownScheduler(pub String);

impl core::str::FromStr for Scheduler {
    type Err = UnknownScheduler;
    fn from_str(s: &str) -> Result<Scheduler, UnknownScheduler> {
        match s {
            "lowest-rtt" => Ok(Scheduler::LowestRtt),
            "redundant" => Ok(Scheduler::Redundant),
            _ => Err(UnknownScheduler(s.to_string())),
        }
    }
}

/// The copies of one data packet still to send ([`Scheduler::Redundant`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Copies {
    /// What the packet carried (only its stream chunks are copied).
    of: SentPayload,
    /// The paths still to get a copy.
    to: [u32; MAX_PATHS],
    n: u8,
}

impl Transport {
    /// The scheduler in force.
    pub fn scheduler(&self) -> Scheduler {
        self.config.scheduler
    }

    /// Changes the scheduler from the next packet on (copies already due are still sent).
    pub fn set_scheduler(&mut self, scheduler: Scheduler) {
        self.config.scheduler = scheduler;
    }

    /// [`poll_transmit`](Self::poll_transmit) with several paths: see the [module
    /// docs](self).
    pub(super) fn poll_transmit_multipath(&mut self, now: Instant, out: &mut Vec<u8>) -> usize {
        let mut order = [(0u32, false, false, Duration::ZERO); MAX_PATHS];
        let mut n = 0;
        let primary_works = self.primary_works();
        for p in core::iter::once(&self.path).chain(self.others.iter()) {
            if !p.usable || n == MAX_PATHS {
                continue;
            }
            let data = p.carries_data() && (!p.backup || !primary_works);
            let owes = p.pto_probes > 0
                || p.ping_pending
                || (p.ack.pending
                    && (p.ack.immediate || p.ack.deadline.get().is_some_and(|d| d <= now)));
            order[n] = (p.id, data, owes, p.rtt.smoothed());
            n += 1;
        }
        let order = &mut order[..n];
        order.sort_by_key(|&(id, data, owes, srtt)| (!owes, !data, srtt, id));
        let owed = order.iter().take_while(|&&(_, _, owes, _)| owes).count();
        let (owing, rest) = order.split_at(owed);
        let len = self.transmit_first_of(now, out, owing);
        if len > 0 {
            return len;
        }
        let len = self.send_copy(now, out);
        if len > 0 {
            return len;
        }
        self.transmit_first_of(now, out, rest)
    }

    /// Tries `paths` in order; returns the length of the first packet one of them builds
    /// (0: none did). Under [`Scheduler::Redundant`], a packet with stream data leaves
    /// copies due for the other paths.
    fn transmit_first_of(
        &mut self,
        now: Instant,
        out: &mut Vec<u8>,
        paths: &[(u32, bool, bool, Duration)],
    ) -> usize {
        for &(id, data, _, _) in paths {
            if self.focus(id) {
                let len = self.poll_transmit_path(now, out, data);
                if len > 0 {
                    if data && self.config.scheduler == Scheduler::Redundant {
                        self.queue_copies();
                    }
                    return len;
                }
            }
        }
        0
    }

    /// Whether a usable, working path other than a backup carries data.
    fn primary_works(&self) -> bool {
        core::iter::once(&self.path)
            .chain(self.others.iter())
            .any(|p| p.carries_data() && !p.backup)
    }

    /// The packet just built on the path worked on carried stream data: a copy of it is due
    /// on every other path that may carry data.
    fn queue_copies(&mut self) {
        let next = self.path.sent.next_packet_number();
        let Some(of) = self
            .path
            .sent
            .outstanding()
            .next_back()
            .filter(|&(pn, _, p)| pn + 1 == next && p.n_chunks > 0)
            .map(|(_, _, p)| *p)
        else {
            return;
        };
        let primary_works = self.primary_works();
        let mut copies = Copies {
            of,
            to: [0; MAX_PATHS],
            n: 0,
        };
        for p in self.others.iter() {
            if p.carries_data() && (!p.backup || !primary_works) {
                copies.to[usize::from(copies.n)] = p.id;
                copies.n += 1;
            }
        }
        if copies.n > 0
            && let Some(extra) = self.others.extra()
        {
            extra.copies = Some(copies);
        }
    }

    /// Sends the next copy due, on a path that still may carry data and has room in its
    /// window and pacer now; a path without room skips its copy. Returns the packet's length
    /// (0: no copy went out).
    fn send_copy(&mut self, now: Instant, out: &mut Vec<u8>) -> usize {
        let open = matches!(self.state, State::Open) && !self.frozen;
        loop {
            let Some(extra) = self.others.extra() else {
                return 0;
            };
            let Some(copies) = extra.copies.as_mut().filter(|c| open && c.n > 0) else {
                extra.copies = None;
                return 0;
            };
            copies.n -= 1;
            let id = copies.to[usize::from(copies.n)];
            let of = copies.of;
            if !self.copy_has_data(&of) {
                // Acknowledged since (by the path that carried it): no copy for anyone.
                if let Some(extra) = self.others.extra() {
                    extra.copies = None;
                }
                return 0;
            }
            if !self.focus(id) || !self.path.carries_data() {
                continue;
            }
            let mtu = self.path.mtu.current();
            let window = self.path.cc.window();
            let srtt = self.path.rtt.smoothed();
            if self.path.sent.bytes_in_flight() + u64::from(mtu) > window
                || self
                    .path
                    .pacer
                    .delay(now, u64::from(mtu), mtu, window, srtt)
                    .is_some()
            {
                continue;
            }
            let len = self.emit(
                now,
                out,
                Emit {
                    max_payload: usize::from(mtu - self.config.sal_overhead),
                    copy: Some(of),
                    ..Emit::default()
                },
            );
            if len > 0 {
                if let Some(extra) = self.others.extra() {
                    extra.count_copy(id);
                }
                return len;
            }
        }
    }

    /// Whether a copy of `of` would carry anything ([`write_copy`](Self::write_copy)): bytes
    /// of its chunks still unacknowledged, or a lone FIN still unacknowledged.
    fn copy_has_data(&self, of: &SentPayload) -> bool {
        of.chunks().any(|c| {
            if c.start == c.end {
                c.fin && !self.send.fin_acked()
            } else {
                self.send.unacked(c.start..c.end).next().is_some()
            }
        })
    }

    /// Writes into `out`, up to `end`, the parts of `of`'s stream chunks not yet
    /// acknowledged (and its FIN, if not acknowledged either), recording them in `payload`
    /// as any chunk sent; returns whether it wrote any.
    pub(super) fn write_copy(
        &self,
        out: &mut Vec<u8>,
        end: usize,
        of: &SentPayload,
        payload: &mut SentPayload,
    ) -> bool {
        let mut wrote = false;
        for c in of.chunks() {
            let fin = c.fin && !self.send.fin_acked();
            let mut parts = self.send.unacked(c.start..c.end).peekable();
            if c.start == c.end {
                // A lone FIN.
                wrote |= fin && self.write_copy_part(out, end, c.start..c.end, true, payload);
                continue;
            }
            while let Some(r) = parts.next() {
                let last = parts.peek().is_none() && r.end == c.end;
                if !self.write_copy_part(out, end, r, fin && last, payload) {
                    return wrote;
                }
                wrote = true;
            }
        }
        wrote
    }

    /// One STREAM frame of a copy: as much of `r` as fits before `end`. False if nothing
    /// (or no more chunk) fits.
    fn write_copy_part(
        &self,
        out: &mut Vec<u8>,
        end: usize,
        r: core::ops::Range<u64>,
        fin: bool,
        payload: &mut SentPayload,
    ) -> bool {
        if usize::from(payload.n_chunks) >= super::MAX_STREAM_FRAMES {
            return false;
        }
        let room = end.saturating_sub(out.len());
        let overhead = 1 + super::varint_len(r.end) + super::varint_len(room as u64);
        if room < overhead || (room == overhead && r.start < r.end) {
            return false;
        }
        let whole = r.end - r.start;
        let take = whole.min((room - overhead) as u64);
        let fin = fin && take == whole;
        let r = r.start..r.start + take;
        let Some((a, b)) = self.send.get(r.clone()) else {
            return false;
        };
        super::frame::write_stream_parts(out, r.start, a, b, fin);
        payload.push_chunk(r, fin);
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

    use super::*;
    use crate::transport::conn::TransportConfig;

    /// A transport at `now` with paths 0 and 1, both usable, under `scheduler`.
    fn two_paths(scheduler: Scheduler, now: Instant) -> Transport {
        let config = TransportConfig {
            scheduler,
            ..TransportConfig::default()
        };
        let mut t = Transport::new(&config, now);
        assert!(t.add_path(1, now));
        t.set_path_usable(1, true);
        t
    }

    /// Everything `t` sends now: (path, payload) per packet.
    fn drain(t: &mut Transport, now: Instant) -> Vec<(u32, Vec<u8>)> {
        let mut packets = Vec::new();
        loop {
            let mut out = Vec::new();
            if t.poll_transmit(now, &mut out) == 0 {
                return packets;
            }
            packets.push((t.current_path(), out));
        }
    }

    #[test]
    fn names_parse_back() {
        for s in [Scheduler::LowestRtt, Scheduler::Redundant] {
            assert_eq!(s.name().parse::<Scheduler>(), Ok(s));
            assert_eq!(s.to_string(), s.name());
        }
        assert!("fastest".parse::<Scheduler>().is_err());
        assert_eq!(Scheduler::default(), Scheduler::LowestRtt);
    }

    /// A small write goes on both paths under the redundant scheduler, on one under
    /// lowest-RTT; either copy alone delivers it, and the other is then a duplicate.
    #[test]
    fn a_write_goes_on_every_path_and_either_copy_delivers_it() {
        let now = Instant::ZERO;
        let data = [7u8; 300];
        for scheduler in [Scheduler::LowestRtt, Scheduler::Redundant] {
            let mut a = two_paths(scheduler, now);
            let mut b = two_paths(Scheduler::LowestRtt, now);
            assert_eq!(a.write(&data).unwrap(), data.len());
            let sent = drain(&mut a, now);
            // The packets big enough to hold the write (path 1's first PING is not).
            let carrying: Vec<&(u32, Vec<u8>)> =
                sent.iter().filter(|(_, p)| p.len() > data.len()).collect();
            let paths: Vec<u32> = carrying.iter().map(|(id, _)| *id).collect();
            match scheduler {
                Scheduler::LowestRtt => {
                    assert_eq!(carrying.len(), 1, "{paths:?}");
                    assert_eq!(a.stats().redundant_packets, 0);
                }
                Scheduler::Redundant => {
                    assert_eq!(paths.len(), 2, "{paths:?}");
                    assert_ne!(paths[0], paths[1]);
                    assert_eq!(a.stats().redundant_packets, 1);
                    let info = a.paths();
                    assert_eq!(info.iter().map(|p| p.copies_sent).sum::<u64>(), 1);
                }
            }
            // The last copy alone delivers the write; the first, after it, adds nothing.
            for (id, p) in carrying.iter().rev() {
                b.handle_packet_on(now, *id, p).unwrap();
            }
            let mut buf = [0u8; 1024];
            assert_eq!(b.read(&mut buf).unwrap(), Some(data.len()));
            assert_eq!(buf[..data.len()], data);
            assert_eq!(b.read(&mut buf).unwrap(), None);
            let dup = b.stats().duplicate_stream_bytes;
            match scheduler {
                Scheduler::LowestRtt => assert_eq!(dup, 0),
                Scheduler::Redundant => assert_eq!(dup, data.len() as u64),
            }
        }
    }

    /// A copy is of what is still unacknowledged: bytes the peer acknowledged (on the path
    /// that carried them first) are not copied, even while earlier bytes are still missing.
    #[test]
    fn acknowledged_bytes_are_not_copied() {
        let now = Instant::ZERO;
        let mut a = two_paths(Scheduler::Redundant, now);
        let mut b = two_paths(Scheduler::LowestRtt, now);
        let chunk = [1u8; 200];
        // The next packet of `a` holding a whole chunk.
        let next_data = |a: &mut Transport| loop {
            let mut out = Vec::new();
            assert!(a.poll_transmit(now, &mut out) > 0, "no data packet");
            if out.len() > chunk.len() {
                return (a.current_path(), out);
            }
        };
        // The first chunk and its copy (never delivered: bytes 0..200 stay missing at b, so
        // nothing acknowledged can be freed from a's buffer).
        a.write(&chunk).unwrap();
        let (first, _) = next_data(&mut a);
        let (copy, _) = next_data(&mut a);
        assert_ne!(first, copy);
        // The second chunk; its copy is due next.
        a.write(&chunk).unwrap();
        let (on, p2) = next_data(&mut a);
        b.handle_packet_on(now, on, &p2).unwrap();
        // b acknowledges it at once (out of order), on that path.
        for (id, p) in drain(&mut b, now) {
            if id == on {
                a.handle_packet_on(now, id, &p).unwrap();
            }
        }
        // The copy due has nothing left to carry: nothing of a chunk's size goes out.
        let rest = drain(&mut a, now);
        assert!(
            rest.iter().all(|(_, p)| p.len() < chunk.len()),
            "{:?}",
            rest.iter()
                .map(|(id, p)| (*id, p.len()))
                .collect::<Vec<_>>()
        );
    }
}
