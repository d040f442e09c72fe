//! The receiving side's silence probe (issue 11): an end that only receives notices when the
//! peer's data stops arriving over a dead path.
//!
//! Silent-path failover (`endpoint/failover.rs`) moves a connection once its probe timeout
//! fired [`STALE_PTOS`](crate::endpoint::STALE_PTOS) times with nothing acknowledged. Only an
//! end with something ack-eliciting in flight has a probe timeout, so an end that only
//! receives (the peer streams to it; it sends nothing but ACKs) never had one: when its path
//! went silent it waited for the idle timeout. With
//! [`TransportConfig::silence_probe`](super::TransportConfig::silence_probe) it sends a PING
//! when the peer's data, which was flowing, stops; then:
//!
//! - the path is alive (the peer merely stopped writing): the PING is acknowledged at once,
//!   the episode ends, and no further probe is sent until another burst;
//! - the path is dead: nothing comes back. After a probe timeout the PING is sent again, and
//!   after [`SILENT_PROBE_TIMEOUTS`] probe timeouts with nothing received
//!   [`is_path_silent`](Transport::is_path_silent) tells the endpoint, which moves the flow
//!   (RSYN from its next address) as it does after `STALE_PTOS` of the transport's own.
//!
//! # When a probe is due
//!
//! - The peer was streaming: the current *burst* — stream data arriving with no gap as long
//!   as the silence threshold, since the last probe or path change — brought at least
//!   [`ARM_BYTES`] (64 KiB). A connection that was not receiving never probes (no keepalive
//!   traffic on idle connections), and neither does one that receives messages or responses
//!   with pauses between (a feed, requests on a persistent connection): the end of a short
//!   burst is the peer having nothing more to say far more often than a dead path, and a
//!   probe per message would add a PING and its ACK to every exchange. Bulk transfers cross
//!   it within a few round trips.
//! - The receive side still expects data: the peer's FIN has not arrived (or bytes before it
//!   are missing), and the flow-control window is open (a reader that stopped reading makes
//!   the peer stop, and that silence is expected).
//! - Nothing at all was received for the silence threshold
//!   `max(SILENCE_RTTS × smoothed RTT, MIN_SILENCE) × 2^backoff`.
//!
//! Three round trips: a sender that is still sending, limited by its congestion window or
//! its pacer, sends at least once per round trip, so three round trips without a packet mean
//! it stopped or cannot reach us; one would fire on ordinary ACK-clock jitter. The floor
//! keeps a sub-millisecond path (a LAN, veth) from probing on a scheduler hiccup of the
//! sending host. `backoff` counts the probes that began an episode on the current path
//! (capped at [`MAX_SILENCE_BACKOFF`]): a peer that writes in bursts with pauses costs one
//! PING per pause, and each pause doubles the threshold, so after a few pauses a probe goes
//! out only after silences long against the peer's habit. A path change resets it.
//!
//! # The probe's timeout
//!
//! `max(srtt + max(4 × rttvar, 1 ms), MIN_SILENCE)`, doubled after each timeout: the
//! transport's probe timeout without the peer's ACK delay, because a packet carrying a PING
//! is acknowledged at once (RFC 9002 drops the ACK delay for the handshake spaces on the
//! same ground). With the ACK delay (25 ms by default) a sub-millisecond path would take
//! about 90 ms to be declared silent instead of about 40. Each wait runs from when the
//! latest packet left (normally the probe), not from the last one received: when this host
//! was busy its timers fire late, and what arrived meanwhile still waits in its socket; a
//! deadline anchored in the past would run the probe, its retry and the verdict back to
//! back before that backlog is read.
//!
//! # Round-trip time
//!
//! Both need an RTT estimate, and an end that only sends ACKs (which are not acknowledged)
//! never takes a sample: its estimate stays at the 333 ms initial guess. So the first burst
//! to reach [`ARM_BYTES`] on a path without an RTT sample also asks for one PING, whose
//! immediate acknowledgement is that sample: one ack-eliciting frame per path and bulk
//! receiver.
//!
//! A receive-only flow too slow to make a burst (a message now and then) is not covered: it
//! cannot tell a dead path from a quiet peer without traffic of its own, which is what
//! [`keepalive`](super::TransportConfig::keepalive) is for.
//!
//! The state is eight bytes and is not part of a snapshot: an imported connection starts
//! unarmed and re-arms on its next burst.

use core::time::Duration;

use super::{Instant, RttEstimator, Transport};

/// Silence, in smoothed round-trip times, after which a receiving end probes its path.
pub const SILENCE_RTTS: u32 = 3;

/// The least silence after which a receiving end probes its path, however short its RTT;
/// also the least time it waits for the probe's answer.
pub const MIN_SILENCE: Duration = Duration::from_millis(10);

/// Most doublings of the silence threshold: each episode (a first probe) on a path doubles
/// it, up to `2^MAX_SILENCE_BACKOFF` times the base.
pub const MAX_SILENCE_BACKOFF: u8 = 3;

/// Unanswered probe timeouts of the silence probe after which the path counts as silent:
/// the transport's own rule ([`STALE_PTOS`](crate::endpoint::STALE_PTOS)), on the probe's
/// shorter timeout.
pub const SILENT_PROBE_TIMEOUTS: u8 = 2;

/// Stream bytes a burst must bring before its end is worth a probe (and before a
/// receive-only end spends a PING on measuring its RTT). A burst is data arriving with no
/// gap as long as the silence threshold.
pub const ARM_BYTES: u32 = 64 << 10;

/// A receiving end's silence-probe state (see the [module documentation](self)): eight
/// bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Liveness {
    /// Stream bytes received in the current burst (saturating); zeroed by a silence as long
    /// as the threshold, a probe and a path change.
    burst: u32,
    /// An RTT-measuring PING was asked for on this path.
    measured: bool,
    /// Episodes begun on this path, capped at [`MAX_SILENCE_BACKOFF`]: the threshold's
    /// exponent.
    backoff: u8,
    /// 0: no episode. `k + 1`: a probe went out, nothing was received since (anything
    /// received ends it: [`on_received`](Self::on_received)), and `k` probe timeouts passed.
    episode: u8,
}

impl Liveness {
    /// Whether an episode is under way.
    fn probing(&self) -> bool {
        self.episode > 0
    }

    /// Probe timeouts in the current episode.
    fn timeouts(&self) -> u8 {
        self.episode.saturating_sub(1)
    }

    /// Something arrived from the peer, `gap` after the previous sign of life: the path
    /// works, an episode ends; a gap as long as the threshold also ends the burst.
    fn on_received(&mut self, gap: Duration, rtt: &RttEstimator) {
        self.episode = 0;
        if gap >= threshold(rtt, self.backoff) {
            self.burst = 0;
        }
    }

    /// `bytes` new stream bytes arrived. Returns whether a PING should measure the path's
    /// RTT (`has_sample`: the estimator already has a sample).
    fn on_stream_data(&mut self, bytes: usize, has_sample: bool) -> bool {
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        self.burst = self.burst.saturating_add(bytes);
        let measure = self.burst >= ARM_BYTES && !has_sample && !self.measured;
        self.measured |= measure;
        measure
    }

    /// When something is due, if anything may be. `last` holds the peer's last sign of life
    /// and this end's last packet sent (during an episode, the latest probe: each probe
    /// waits from when it actually left, so a timer that fires late — this host was busy,
    /// and what arrived meanwhile still waits in its socket — sends a probe rather than
    /// condemning the path); `expects_more` whether the receive side awaits data the peer
    /// may send.
    fn deadline(&self, last: Last, rtt: &RttEstimator, expects_more: bool) -> Option<Instant> {
        if self.probing() {
            if self.timeouts() >= SILENT_PROBE_TIMEOUTS {
                return None; // settled: silent
            }
            let wait = probe_timeout(rtt).saturating_mul(1 << self.timeouts());
            return Some(last.sent + wait);
        }
        (self.burst >= ARM_BYTES && expects_more)
            .then(|| last.received + threshold(rtt, self.backoff))
    }

    /// Runs what is due at `now`; returns whether to send a PING (a silence probe).
    fn on_timeout(
        &mut self,
        now: Instant,
        last: Last,
        rtt: &RttEstimator,
        expects_more: bool,
    ) -> bool {
        if self
            .deadline(last, rtt, expects_more)
            .is_none_or(|t| t > now)
        {
            return false;
        }
        if self.probing() {
            // The probe went unanswered for a probe timeout: again (until the last).
            self.episode += 1;
            return self.timeouts() < SILENT_PROBE_TIMEOUTS;
        }
        // Silence after a burst: a new episode.
        self.burst = 0;
        self.episode = 1;
        self.backoff = (self.backoff + 1).min(MAX_SILENCE_BACKOFF);
        true
    }

    /// Whether the path counts as silent: an episode's probe went unanswered through
    /// [`SILENT_PROBE_TIMEOUTS`] probe timeouts.
    fn is_silent(&self) -> bool {
        self.probing() && self.timeouts() >= SILENT_PROBE_TIMEOUTS
    }

    /// The threshold's exponent.
    #[cfg(test)]
    pub(super) fn backoff(&self) -> u8 {
        self.backoff
    }

    /// The path changed: its RTT and the peer's habits on it are unknown again.
    fn on_path_change(&mut self) {
        *self = Liveness::default();
    }
}

/// The transport's clocks the silence probe runs from.
#[derive(Clone, Copy, Debug)]
struct Last {
    /// The peer's last sign of life.
    received: Instant,
    /// This end's last packet sent.
    sent: Instant,
}

/// The silence threshold: `max(SILENCE_RTTS × srtt, MIN_SILENCE) × 2^backoff`.
fn threshold(rtt: &RttEstimator, backoff: u8) -> Duration {
    let base = rtt.smoothed().saturating_mul(SILENCE_RTTS).max(MIN_SILENCE);
    base.saturating_mul(1 << backoff.min(MAX_SILENCE_BACKOFF))
}

/// How long the silence probe waits for its answer before the first backoff:
/// `max(srtt + max(4 × rttvar, granularity), MIN_SILENCE)`, without the peer's ACK delay
/// (a packet with a PING is acknowledged at once, as RFC 9002 reasons for the handshake
/// spaces).
fn probe_timeout(rtt: &RttEstimator) -> Duration {
    rtt.pto_base().max(MIN_SILENCE)
}

/// The hooks [`Transport`] calls.
impl Transport {
    /// `bytes` new stream bytes arrived: they count towards arming the silence probe (and
    /// measuring the RTT if there is no sample yet).
    pub(super) fn liveness_on_stream_data(&mut self, bytes: usize) {
        // The probe is the primary path's (with several paths, silence of the whole peer is
        // what it watches; the other paths have their own probe timers).
        if self.config.silence_probe
            && self
                .liveness
                .on_stream_data(bytes, self.primary().rtt.has_sample())
        {
            self.primary_mut().ping_pending = true;
        }
    }

    /// When the silence probe needs [`handle_timeout`](Transport::handle_timeout), if it
    /// does (the callers check that the transport is open and not frozen). Nothing while a
    /// PING waits to be sent: a probe's wait starts when it leaves.
    pub(super) fn silence_deadline(&self) -> Option<Instant> {
        let p = self.primary();
        if !self.config.silence_probe || (p.ping_pending && self.liveness.probing()) {
            return None;
        }
        let last = Last {
            received: self.last_received(),
            sent: p.last_sent,
        };
        self.liveness
            .deadline(last, &p.rtt, self.recv.expects_more())
    }

    /// Runs the silence probe's timer at `now`: a PING when one is due.
    pub(super) fn liveness_on_timeout(&mut self, now: Instant) {
        if self.silence_deadline().is_none() {
            return;
        }
        self.focus_primary();
        let last = Last {
            received: self.last_received(),
            sent: self.path.last_sent,
        };
        if self
            .liveness
            .on_timeout(now, last, &self.path.rtt, self.recv.expects_more())
        {
            self.path.ping_pending = true;
            self.stats.silence_probes = self.stats.silence_probes.saturating_add(1);
        }
    }

    /// A valid packet, or another sign of life, arrived from the peer at `now`. Call before
    /// updating `last_received`.
    pub(super) fn liveness_on_received(&mut self, now: Instant) {
        if !self.config.silence_probe {
            return;
        }
        let gap = now.saturating_duration_since(self.last_received());
        let rtt = match self.primary_index() {
            None => &self.path.rtt,
            Some(i) => &self.others[i].rtt,
        };
        self.liveness.on_received(gap, rtt);
    }

    /// The path changed ([`on_path_change`](Transport::on_path_change)).
    pub(super) fn liveness_on_path_change(&mut self) {
        self.liveness.on_path_change();
    }

    /// Whether this end's silence probe found the path silent: stream data was arriving,
    /// stopped, and the probe went unanswered through [`SILENT_PROBE_TIMEOUTS`] probe
    /// timeouts of its own (nothing at all received since it was first sent). The endpoint
    /// then fails over as after [`STALE_PTOS`](crate::endpoint::STALE_PTOS) probe timeouts.
    pub fn is_path_silent(&self) -> bool {
        self.config.silence_probe && self.liveness.is_silent()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rtt(sample_ms: u64) -> RttEstimator {
        let mut r = RttEstimator::new(Duration::from_millis(333), Duration::from_millis(25));
        r.update(Duration::from_millis(sample_ms), Duration::ZERO);
        r
    }

    fn t(ms: u64) -> Instant {
        Instant::from_nanos(ms * 1_000_000)
    }

    /// Last received at `rx` ms, last sent at `tx` ms.
    fn last(rx: u64, tx: u64) -> Last {
        Last {
            received: t(rx),
            sent: t(tx),
        }
    }

    const BULK: usize = ARM_BYTES as usize;

    #[test]
    fn the_rule_is_the_endpoints() {
        assert_eq!(
            u32::from(SILENT_PROBE_TIMEOUTS),
            crate::endpoint::STALE_PTOS
        );
    }

    #[test]
    fn armed_by_a_burst_and_disarmed_by_an_answered_probe() {
        let mut l = Liveness::default();
        let r = rtt(20);
        assert_eq!(
            l.deadline(last(0, 0), &r, true),
            None,
            "never received data"
        );
        l.on_stream_data(BULK - 1, true);
        assert_eq!(
            l.deadline(last(100, 90), &r, true),
            None,
            "a message, not a burst"
        );
        l.on_stream_data(1, true);
        assert_eq!(
            l.deadline(last(100, 90), &r, true),
            Some(t(160)),
            "3 × 20 ms"
        );
        assert_eq!(
            l.deadline(last(100, 90), &r, false),
            None,
            "nothing more expected"
        );
        assert!(!l.on_timeout(t(159), last(100, 90), &r, true), "not yet");
        assert!(l.on_timeout(t(160), last(100, 90), &r, true), "a probe");
        // Sent at 160 ms, it waits srtt + 4 × rttvar (20 + 40 ms), no ACK delay.
        assert_eq!(l.deadline(last(100, 160), &r, true), Some(t(220)));
        // Answered (something arrived): nothing more until a new burst.
        l.on_received(Duration::from_millis(70), &r);
        assert_eq!(l.deadline(last(170, 160), &r, true), None);
        assert!(!l.on_timeout(t(1000), last(170, 160), &r, true));
        assert!(!l.is_silent());
        l.on_stream_data(BULK, true);
        assert_eq!(
            l.deadline(last(170, 160), &r, true),
            Some(t(290)),
            "backed off: 120 ms"
        );
    }

    #[test]
    fn small_bursts_with_silences_between_never_arm() {
        let mut l = Liveness::default();
        let r = rtt(1);
        for _ in 0..100 {
            // 10 kB, then 10 ms (the threshold) of nothing: each a burst of its own.
            l.on_received(Duration::from_millis(10), &r);
            l.on_stream_data(10_000, false);
            assert_eq!(l.deadline(last(0, 0), &r, true), None);
        }
        assert!(!l.measured, "no RTT measurement either");
        // The same bytes with shorter gaps are one burst, and arm.
        for _ in 0..7 {
            l.on_received(Duration::from_millis(9), &r);
            assert!(!l.on_stream_data(10_000, true));
        }
        assert_eq!(l.deadline(last(0, 0), &r, true), Some(t(10)));
    }

    #[test]
    fn an_unanswered_probe_is_sent_again_and_then_the_path_is_silent() {
        let mut l = Liveness::default();
        let r = rtt(1);
        l.on_stream_data(BULK, true);
        assert!(l.on_timeout(t(10), last(0, 0), &r, true), "MIN_SILENCE");
        // pto_base is 3 ms here; the floor makes it 10 ms, then 20 ms, from each send.
        assert_eq!(l.deadline(last(0, 10), &r, true), Some(t(20)));
        assert!(!l.on_timeout(t(19), last(0, 10), &r, true));
        assert!(l.on_timeout(t(20), last(0, 10), &r, true), "again");
        assert!(!l.is_silent());
        assert_eq!(l.deadline(last(0, 20), &r, true), Some(t(40)));
        assert!(
            !l.on_timeout(t(40), last(0, 20), &r, true),
            "no third probe"
        );
        assert!(l.is_silent());
        assert_eq!(l.deadline(last(0, 40), &r, true), None, "settled");
        // A late answer ends it; a path change too.
        let mut answered = l;
        answered.on_received(Duration::from_millis(41), &r);
        assert!(!answered.is_silent());
        l.on_path_change();
        assert!(!l.is_silent());
    }

    #[test]
    fn a_late_timer_sends_a_probe_and_waits_instead_of_condemning_the_path() {
        // The host was busy for 100 ms: nothing processed, the timer fires late, and the
        // packets that arrived meanwhile still wait in the socket. One probe, sent now, and
        // a full wait from now: the backlog answers it.
        let mut l = Liveness::default();
        let r = rtt(1);
        l.on_stream_data(BULK, true);
        assert!(l.on_timeout(t(110), last(0, 0), &r, true));
        assert_eq!(l.deadline(last(0, 110), &r, true), Some(t(120)));
        assert!(!l.on_timeout(t(110), last(0, 110), &r, true));
        assert!(!l.is_silent());
    }

    #[test]
    fn the_threshold_has_a_floor_and_backs_off_per_episode_up_to_a_cap() {
        let mut l = Liveness::default();
        let fast = rtt(1);
        let mut want = 10;
        let mut now = 0;
        for _ in 0..6 {
            l.on_stream_data(BULK, true);
            let at = last(now, now);
            assert_eq!(l.deadline(at, &fast, true), Some(t(now + want)));
            assert!(l.on_timeout(t(now + want), at, &fast, true));
            // Answered at once.
            l.on_received(Duration::from_millis(want), &fast);
            now += want + 1;
            want = (want * 2).min(10 << MAX_SILENCE_BACKOFF);
        }
        assert_eq!(want, 80);
        l.on_path_change();
        assert_eq!(
            l.deadline(last(0, 0), &fast, true),
            None,
            "a new path starts unarmed"
        );
        l.on_stream_data(BULK, true);
        assert_eq!(
            l.deadline(last(0, 0), &fast, true),
            Some(t(10)),
            "and without backoff"
        );
    }

    #[test]
    fn one_measuring_ping_per_path_without_an_rtt_sample_once_a_burst_is_bulk() {
        let mut l = Liveness::default();
        assert!(!l.on_stream_data(BULK - 1, false), "not yet bulk");
        assert!(l.on_stream_data(1, false));
        assert!(!l.on_stream_data(BULK, false), "asked once");
        l.on_path_change();
        assert!(!l.on_stream_data(BULK, true), "a sample is there already");
        l.on_path_change();
        assert!(l.on_stream_data(BULK, false), "again on a new path");
    }
}
