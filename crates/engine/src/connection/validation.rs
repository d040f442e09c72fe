//! Path validation: a flow keeps working when its peer's address changes under it.
//!
//! A packet that opens under the flow's keys but comes from a source other than the flow's
//! peer locator (a NAT rebinding, a renumbered peer) is accepted — it authenticated — but the
//! flow does not follow it blindly: anyone on the path can copy a genuine packet and send it
//! from elsewhere. Instead this end *validates* the new source (RFC 9000 §8.2 and §9 do the
//! same for QUIC; docs/protocol.md §4.2):
//!
//! 1. It sends a sealed PATH_CHALLENGE (8 bytes nobody without the flow's keys can predict)
//!    to the new source, and keeps sending everything else to the old locator (make before
//!    break: the old path may still work).
//! 2. The peer echoes the data in a PATH_RESPONSE, sent to the source it saw the challenge
//!    come from.
//! 3. A response that arrives *from the new source* with the data of one of the challenges
//!    proves that the peer sends and receives there: the peer locator switches to it.
//!
//! Until then, the bytes sent to the new source stay within three times the bytes received
//! from it (no amplification towards an address nobody has shown to want them). Only the
//! newest packet of the peer starts a validation, so a packet reordered from an old address
//! cannot pull the flow back; a replayed packet does not open at all. A challenge unanswered
//! is sent again (a new one, after the path's probe timeout, doubling) up to
//! [`MAX_CHALLENGES`] times; then the validation fails and the flow stays where it was.
//!
//! The state here is the *path* concern of the connection, kept out of `connection.rs`. A
//! later multipath join (docs/moving-flows.md §2) reuses the exchange: the joiner's first
//! packet on a new path carries a PATH_CHALLENGE, and `PathValidator` validates it as it
//! validates a rebinding here.

use std::collections::VecDeque;
use std::time::Duration;

use serval_wire::Locator;
use serval_wire::header::BASE_HEADER_LEN;

use super::protect::TAG_LEN;
use crate::Instant;
use crate::frame::{PATH_DATA_LEN, PATH_FRAME_LEN, PN_LEN};

/// Challenges sent to one address before its validation fails.
pub const MAX_CHALLENGES: usize = 5;

/// Bytes sent to an address being validated may reach this many times the bytes received
/// from it (RFC 9000 §8's factor).
pub const AMPLIFICATION_FACTOR: u64 = 3;

/// Responses owed at once; a peer that challenges faster than they go out loses the extras
/// (it retries).
const MAX_RESPONSES: usize = 4;

/// The size of a packet carrying one path frame: header, packet number, frame, tag.
pub const PATH_PACKET_LEN: usize = BASE_HEADER_LEN + PN_LEN + PATH_FRAME_LEN + TAG_LEN;

/// Counters of a connection's path validations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathStats {
    /// Validations started: an authentic packet, the newest, came from a new source.
    pub started: u64,
    /// Validations that succeeded: the peer locator moved to the new source.
    pub validated: u64,
    /// Validations that failed: every challenge went unanswered (the flow stayed).
    pub failed: u64,
    /// Validations abandoned for a newer source before they completed.
    pub abandoned: u64,
    /// PATH_CHALLENGE frames sent.
    pub challenges_sent: u64,
    /// PATH_RESPONSE frames sent.
    pub responses_sent: u64,
    /// PATH_RESPONSE frames that matched no challenge, or came from another source: ignored.
    pub responses_ignored: u64,
    /// Times a challenge was due but waited because the new source had not sent enough yet
    /// (the amplification limit).
    pub amplification_limited: u64,
    /// Bytes sent to addresses while they were being validated (challenges).
    pub unvalidated_bytes_sent: u64,
    /// Client: packets dropped unopened because they came from the locator its server left by
    /// RSYN, and were not an RSYN (a host that let the flow go must be silent; one that did
    /// not hear it lost the flow — a partitioned primary after its standby took over — is
    /// fenced off: docs/protocol.md §4.3).
    pub from_left_locator: u64,
}

impl PathStats {
    /// Adds `o`'s counts to these (an endpoint's totals over its connections).
    pub fn add(&mut self, o: &PathStats) {
        self.started += o.started;
        self.validated += o.validated;
        self.failed += o.failed;
        self.abandoned += o.abandoned;
        self.challenges_sent += o.challenges_sent;
        self.responses_sent += o.responses_sent;
        self.responses_ignored += o.responses_ignored;
        self.amplification_limited += o.amplification_limited;
        self.unvalidated_bytes_sent += o.unvalidated_bytes_sent;
    }
}

/// One address being validated.
#[derive(Debug, Clone)]
struct Validation {
    /// The new source: where challenges go, and where the response must come from.
    target: Locator,
    /// The data of every challenge sent so far, with when it was sent.
    sent: Vec<([u8; PATH_DATA_LEN], Instant)>,
    /// When the next challenge is due (none: the first goes now).
    due: Option<Instant>,
    /// The interval before the next challenge, doubling.
    interval: Duration,
    /// Bytes received from `target` (authenticated packets) and sent to it.
    received: u64,
    sent_bytes: u64,
    /// The amplification limit held the current challenge back (counted once per wait).
    limited: bool,
}

/// A packet the validator wants sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PathTransmit {
    /// Where it goes from (the local locator a challenge arrived on; none: the flow's own).
    pub local: Option<Locator>,
    /// Where it goes.
    pub remote: Locator,
    /// What it carries.
    pub frame: crate::frame::PathFrame,
}

/// What a PATH_RESPONSE did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Validated {
    /// The address now validated.
    pub target: Locator,
    /// The round trip of the challenge answered, if it was the only one sent (Karn's rule).
    pub rtt: Option<Duration>,
}

/// The path-validation state of one connection; boxed in the connection and created only when
/// first needed, so that a flow whose peer never moves pays one pointer for it.
/// How many of the peer's locators before its RSYN moves a flow remembers.
pub(crate) const LEFT_KEPT: usize = 4;

/// Least time between two RSYN-ACKs sent again because the peer's old path still speaks
/// ([`PathValidator::reanswer`]).
pub(crate) const REANSWER_INTERVAL: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Default)]
pub(crate) struct PathValidator {
    current: Option<Validation>,
    /// PATH_RESPONSEs owed: the data, the local locator the challenge arrived on, its source.
    responses: VecDeque<([u8; PATH_DATA_LEN], Locator, Locator)>,
    /// Challenges generated so far (the context of the next one's data).
    generated: u64,
    /// The peer's locators before its last RSYNs moved it, newest first: packets still in
    /// flight from there (a make-before-break move keeps the old path going until it is
    /// confirmed) are the old path's, not a rebinding, and start no validation.
    rsyn_old: [Option<Locator>; LEFT_KEPT],
    /// The verno of the RSYN that last moved the peer, and when a packet from a locator the
    /// peer left last drew its RSYN-ACK again ([`reanswer`](Self::reanswer)).
    followed: Option<u32>,
    reanswered: Option<Instant>,
    pub(crate) stats: PathStats,
}

impl PathValidator {
    /// A packet came from a locator the peer left (and was dropped unopened): a peer moving
    /// make-before-break keeps sending there until our RSYN-ACK reaches it, so it may have
    /// lost it, and with nothing else from us reaching it (we drop its old path's packets) it
    /// would back its RSYN off for ever longer. Returns the verno to answer again, at most
    /// once per [`REANSWER_INTERVAL`] (a forged packet from there draws one RSYN-ACK, to the
    /// peer, no more often).
    pub(crate) fn reanswer(&mut self, now: Instant) -> Option<u32> {
        let verno = self.followed?;
        if self
            .reanswered
            .is_some_and(|t| now.saturating_duration_since(t) < REANSWER_INTERVAL)
        {
            return None;
        }
        self.reanswered = Some(now);
        Some(verno)
    }

    /// Whether `remote` is a locator the peer left by one of its last [`LEFT_KEPT`] RSYNs.
    pub(crate) fn is_left(&self, remote: Locator) -> bool {
        self.rsyn_old.contains(&Some(remote))
    }

    /// The peer moved by RSYN (`verno`) from `old`: its packets from there are the old path's.
    pub(crate) fn on_rsyn_move(&mut self, old: Locator, verno: u32) {
        self.followed = Some(verno);
        self.rsyn_old.rotate_right(1);
        self.rsyn_old[0] = Some(old);
        if self.current.take().is_some() {
            self.stats.abandoned += 1;
        }
    }

    /// An authentic packet of `len` bytes arrived from `remote`, which is not the flow's peer
    /// locator; `newest` says whether it was the newest the peer has sent in its space.
    /// Credits the amplification budget of a validation of `remote` in progress, or starts
    /// one (abandoning a validation of another address) if the packet is the newest.
    pub(crate) fn on_packet_from_new_source(
        &mut self,
        remote: Locator,
        len: usize,
        newest: bool,
        interval: Duration,
    ) {
        if self.is_left(remote) {
            return;
        }
        if let Some(v) = self.current.as_mut().filter(|v| v.target == remote) {
            v.received = v.received.saturating_add(len as u64);
            return;
        }
        if !newest {
            return;
        }
        if self.current.is_some() {
            self.stats.abandoned += 1;
        }
        self.stats.started += 1;
        self.current = Some(Validation {
            target: remote,
            sent: Vec::with_capacity(MAX_CHALLENGES),
            due: None,
            interval,
            received: len as u64,
            sent_bytes: 0,
            limited: false,
        });
    }

    /// The peer challenged us: answer to the source it saw (`remote`) from the locator the
    /// challenge arrived on.
    pub(crate) fn on_challenge(
        &mut self,
        data: [u8; PATH_DATA_LEN],
        local: Locator,
        remote: Locator,
    ) {
        if self.responses.len() < MAX_RESPONSES {
            self.responses.push_back((data, local, remote));
        }
    }

    /// A PATH_RESPONSE arrived from `from`. It validates the address being validated if it
    /// echoes one of its challenges and comes from that address (so the peer both receives
    /// and sends there).
    pub(crate) fn on_response(
        &mut self,
        now: Instant,
        data: [u8; PATH_DATA_LEN],
        from: Locator,
    ) -> Option<Validated> {
        let matched = self.current.as_ref().and_then(|v| {
            let sent_at = v.sent.iter().find(|(d, _)| *d == data)?.1;
            (v.target == from).then_some((v.target, sent_at, v.sent.len()))
        });
        let Some((target, sent_at, n)) = matched else {
            self.stats.responses_ignored += 1;
            return None;
        };
        self.current = None;
        self.rsyn_old = [None; LEFT_KEPT];
        self.stats.validated += 1;
        Some(Validated {
            target,
            rtt: (n == 1 && now >= sent_at).then(|| now - sent_at),
        })
    }

    /// Whether an address is being validated.
    #[cfg(test)]
    pub(crate) fn validating(&self) -> Option<Locator> {
        self.current.as_ref().map(|v| v.target)
    }

    /// The next path packet to send at `now`, if any: a response owed, then a challenge that
    /// is due and that the amplification limit allows. `challenge_data(n)` derives the data
    /// of the `n`th challenge of this connection.
    pub(crate) fn poll_transmit(
        &mut self,
        now: Instant,
        challenge_data: impl FnOnce(u64) -> [u8; PATH_DATA_LEN],
    ) -> Option<PathTransmit> {
        if let Some((data, local, remote)) = self.responses.pop_front() {
            self.stats.responses_sent += 1;
            return Some(PathTransmit {
                local: Some(local),
                remote,
                frame: crate::frame::PathFrame::Response(data),
            });
        }
        let v = self.current.as_mut()?;
        if v.sent.len() >= MAX_CHALLENGES || v.due.is_some_and(|d| d > now) {
            return None;
        }
        let len = PATH_PACKET_LEN as u64;
        if v.sent_bytes + len > AMPLIFICATION_FACTOR.saturating_mul(v.received) {
            if !v.limited {
                v.limited = true;
                self.stats.amplification_limited += 1;
            }
            return None;
        }
        v.limited = false;
        let data = challenge_data(self.generated);
        self.generated += 1;
        v.sent.push((data, now));
        v.sent_bytes += len;
        if v.due.is_some() {
            v.interval = v.interval.saturating_mul(2);
        }
        v.due = Some(now + v.interval);
        self.stats.challenges_sent += 1;
        self.stats.unvalidated_bytes_sent += len;
        Some(PathTransmit {
            local: None,
            remote: v.target,
            frame: crate::frame::PathFrame::Challenge(data),
        })
    }

    /// A path packet from [`poll_transmit`](Self::poll_transmit) could not be built (the
    /// flow closed meanwhile): nothing is owed any more.
    pub(crate) fn clear(&mut self) {
        self.current = None;
        self.responses.clear();
    }

    /// When [`handle_timeout`](Self::handle_timeout) or the next challenge must run.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.current.as_ref().and_then(|v| v.due)
    }

    /// Timers at `now`: a validation whose last challenge went unanswered for its interval
    /// fails if no other challenge may follow — all [`MAX_CHALLENGES`] were sent, or the
    /// amplification limit holds the next one (the address sent too little to pay for it) —
    /// and the flow stays on its path. Returns the address that failed, if one did.
    pub(crate) fn handle_timeout(&mut self, now: Instant) -> Option<Locator> {
        let v = self.current.as_ref()?;
        let allowed = v.sent_bytes + PATH_PACKET_LEN as u64
            <= AMPLIFICATION_FACTOR.saturating_mul(v.received);
        if v.due.is_some_and(|d| d <= now) && (v.sent.len() >= MAX_CHALLENGES || !allowed) {
            if v.sent.len() < MAX_CHALLENGES && !v.limited {
                self.stats.amplification_limited += 1;
            }
            let target = v.target;
            self.current = None;
            self.stats.failed += 1;
            return Some(target);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::PathFrame;

    fn loc(s: &str) -> Locator {
        s.parse().unwrap_or_else(|_| unreachable!())
    }

    fn ms(n: u64) -> Instant {
        Instant::from_nanos(n * 1_000_000)
    }

    fn data(n: u64) -> [u8; PATH_DATA_LEN] {
        n.to_be_bytes()
    }

    #[test]
    fn a_new_source_is_challenged_within_the_amplification_limit_and_validated_by_its_echo() {
        let mut v = PathValidator::default();
        let new = loc("10.0.0.9:1000");
        // A small packet buys fewer than one challenge: nothing goes until more arrives.
        v.on_packet_from_new_source(new, 17, true, Duration::from_millis(100));
        assert_eq!(v.poll_transmit(ms(0), data), None);
        assert_eq!(v.stats.amplification_limited, 1);
        v.on_packet_from_new_source(new, 100, false, Duration::from_millis(100));
        let t = v.poll_transmit(ms(0), data).unwrap();
        assert_eq!(t.remote, new);
        assert_eq!(t.frame, PathFrame::Challenge(data(0)));
        assert!(v.stats.unvalidated_bytes_sent <= 3 * 117);
        // Not due again before the interval.
        assert_eq!(v.poll_transmit(ms(50), data), None);
        // A response with other data, or from elsewhere, validates nothing.
        assert_eq!(v.on_response(ms(60), data(7), new), None);
        assert_eq!(v.on_response(ms(60), data(0), loc("10.0.0.8:1")), None);
        assert_eq!(v.stats.responses_ignored, 2);
        let ok = v.on_response(ms(60), data(0), new).unwrap();
        assert_eq!(ok.target, new);
        assert_eq!(ok.rtt, Some(Duration::from_millis(60)));
        assert_eq!(v.validating(), None);
        assert_eq!(v.stats.validated, 1);
    }

    #[test]
    fn unanswered_challenges_back_off_then_fail() {
        let mut v = PathValidator::default();
        let new = loc("10.0.0.9:1000");
        v.on_packet_from_new_source(new, 10_000, true, Duration::from_millis(100));
        let mut times = Vec::new();
        let mut now = ms(0);
        while let Some(t) = v.poll_timeout().or(Some(now)) {
            now = t;
            if let Some(failed) = v.handle_timeout(now) {
                assert_eq!(failed, new);
                break;
            }
            if v.poll_transmit(now, data).is_some() {
                times.push(now);
            }
            assert!(times.len() <= MAX_CHALLENGES);
        }
        assert_eq!(times, vec![ms(0), ms(100), ms(300), ms(700), ms(1500)]);
        assert_eq!(now, ms(3100));
        assert_eq!(v.stats.failed, 1);
        // A late answer to the first challenge changes nothing now.
        assert_eq!(v.on_response(now, data(0), new), None);
    }

    #[test]
    fn a_validation_held_by_the_amplification_limit_fails_after_its_last_wait() {
        let mut v = PathValidator::default();
        let new = loc("10.0.0.9:1000");
        // Enough for two challenges, not three.
        v.on_packet_from_new_source(new, PATH_PACKET_LEN - 1, true, Duration::from_millis(100));
        assert!(v.poll_transmit(ms(0), data).is_some());
        assert_eq!(v.handle_timeout(ms(100)), None, "the second may go");
        assert!(v.poll_transmit(ms(100), data).is_some());
        assert_eq!(v.poll_timeout(), Some(ms(300)));
        assert_eq!(v.handle_timeout(ms(299)), None);
        assert_eq!(v.handle_timeout(ms(300)), Some(new));
        assert_eq!(v.stats.amplification_limited, 1);
        assert_eq!((v.stats.challenges_sent, v.stats.failed), (2, 1));
        assert_eq!(v.stats.unvalidated_bytes_sent, 2 * PATH_PACKET_LEN as u64);
        assert_eq!(v.poll_timeout(), None);
    }

    #[test]
    fn only_the_newest_packet_starts_a_validation_and_the_rsyn_s_old_path_none() {
        let mut v = PathValidator::default();
        let (a, b) = (loc("10.0.0.9:1000"), loc("10.0.0.9:2000"));
        v.on_packet_from_new_source(a, 1000, false, Duration::from_millis(100));
        assert_eq!(
            v.validating(),
            None,
            "a reordered older packet moved nothing"
        );
        v.on_rsyn_move(a, 7);
        v.on_packet_from_new_source(a, 1000, true, Duration::from_millis(100));
        assert_eq!(v.validating(), None, "the RSYN's old path is no rebinding");
        v.on_packet_from_new_source(b, 1000, true, Duration::from_millis(100));
        assert_eq!(v.validating(), Some(b));
        // A newer source replaces it; the answer to the old one's challenge is refused.
        let c = v.poll_transmit(ms(0), data).unwrap();
        v.on_packet_from_new_source(loc("10.0.0.7:1"), 1000, true, Duration::from_millis(1));
        assert_eq!(v.stats.abandoned, 1);
        let PathFrame::Challenge(d) = c.frame else {
            unreachable!()
        };
        assert_eq!(v.on_response(ms(1), d, b), None);
    }

    #[test]
    fn responses_go_back_where_the_challenge_came_from_and_are_bounded() {
        let mut v = PathValidator::default();
        let (l, r) = (loc("10.0.0.1:1"), loc("10.0.0.2:2"));
        for i in 0..10 {
            v.on_challenge(data(i), l, r);
        }
        let mut n = 0;
        while let Some(t) = v.poll_transmit(ms(0), data) {
            assert_eq!((t.local, t.remote), (Some(l), r));
            assert_eq!(t.frame, PathFrame::Response(data(n)));
            n += 1;
        }
        assert_eq!(n, MAX_RESPONSES as u64);
    }
}
