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
//!   the episode ends, and no further probe is sent until stream data arrives again;
//! - the path is dead: nothing comes back. After a probe timeout the PING is sent again, and
//!   after [`SILENT_PROBE_TIMEOUTS`] probe timeouts with nothing received
//!   [`is_path_silent`](Transport::is_path_silent) tells the endpoint, which moves the flow
//!   (RSYN from its next address) as it does after `STALE_PTOS` of the transport's own.
//!
//! # When a probe is due
//!
//! - New stream data arrived since the last probe (or since the path changed): the peer was
//!   sending, so silence now means something. A connection that was not receiving never
//!   probes: no keepalive traffic on idle connections.
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
//! about 90 ms to be declared silent instead of about 40.
//!
//! # Round-trip time
//!
//! Both need an RTT estimate, and an end that only sends ACKs (which are not acknowledged)
//! never takes a sample: its estimate stays at the 333 ms initial guess. So the first stream
//! data that arrives on a path without an RTT sample also asks for one PING, whose immediate
//! acknowledgement is that sample: one ack-eliciting frame per path and connection that
//! receives data.
//!
//! The state is four bytes and is not part of a snapshot: an imported connection starts
//! unarmed and re-arms on the next data it receives.

use core::time::Duration;

use super::{Instant, RttEstimator, Transport};

/// Silence, in smoothed round-trip times, after which a receiving end probes its path.
pub const SILENCE_RTTS: u32 = 3;

/// The least silence after which a receiving end probes its path, however short its RTT;
/// also the least time it waits for the probe's answer.
pub const MIN_SILENCE: Duration = Duration::from_millis(10);

/// Most doublings of the silence threshold: each probe sent on a path doubles it, up to
/// `2^MAX_SILENCE_BACKOFF` times the base.
pub const MAX_SILENCE_BACKOFF: u8 = 3;

/// Unanswered probe timeouts of the silence probe after which the path counts as silent:
/// the transport's own rule ([`STALE_PTOS`](crate::endpoint::STALE_PTOS)), on the probe's
/// shorter timeout.
pub const SILENT_PROBE_TIMEOUTS: u8 = 2;

/// A receiving end's silence-probe state (see the [module documentation](self)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Liveness {
    /// New stream data arrived since the last probe or path change.
    armed: bool,
    /// An RTT-measuring PING was asked for on this path.
    measured: bool,
    /// Probes sent on this path, capped at [`MAX_SILENCE_BACKOFF`]: the threshold's exponent.
    backoff: u8,
    /// An episode is under way: a probe went out and nothing was received since (anything
    /// received ends it: [`on_received`](Self::on_received)).
    probing: bool,
    /// The threshold's exponent when the episode began (it began at `last_received` plus
    /// that threshold: nothing was received since, so neither has moved).
    episode_backoff: u8,
    /// Probe timeouts so far in the episode (up to [`SILENT_PROBE_TIMEOUTS`]).
    timeouts: u8,
}

impl Liveness {
    /// New stream data arrived. Returns whether a PING should measure the path's RTT
    /// (`has_sample`: the estimator already has a sample).
    fn on_stream_data(&mut self, has_sample: bool) -> bool {
        self.armed = true;
        let measure = !has_sample && !self.measured;
        self.measured |= measure;
        measure
    }

    /// Something arrived from the peer: the path works; an episode ends.
    fn on_received(&mut self) {
        self.probing = false;
        self.timeouts = 0;
    }

    /// When something is due, if anything may be: `last_received` is the peer's last sign
    /// of life, `expects_more` whether the receive side awaits data the peer may send.
    fn deadline(
        &self,
        last_received: Instant,
        rtt: &RttEstimator,
        expects_more: bool,
    ) -> Option<Instant> {
        if self.probing {
            if self.timeouts >= SILENT_PROBE_TIMEOUTS {
                return None; // settled: silent
            }
            // The episode began at `last_received + threshold`; probe `k` went out
            // `2^k - 1` probe timeouts into it and waits `2^k` of them.
            let began = last_received + threshold(rtt, self.episode_backoff);
            let waits = (2u32 << self.timeouts) - 1;
            return Some(began + probe_timeout(rtt).saturating_mul(waits));
        }
        (self.armed && expects_more).then(|| last_received + threshold(rtt, self.backoff))
    }

    /// Runs what is due at `now`; returns whether to send a PING (a silence probe).
    fn on_timeout(
        &mut self,
        now: Instant,
        last_received: Instant,
        rtt: &RttEstimator,
        expects_more: bool,
    ) -> bool {
        if self
            .deadline(last_received, rtt, expects_more)
            .is_none_or(|t| t > now)
        {
            return false;
        }
        if self.probing {
            // The probe went unanswered for a probe timeout: again, and back off.
            self.timeouts += 1;
            if self.timeouts >= SILENT_PROBE_TIMEOUTS {
                return false;
            }
        } else {
            // Silence after data: a new episode.
            self.armed = false;
            self.probing = true;
            self.episode_backoff = self.backoff;
            self.backoff = (self.backoff + 1).min(MAX_SILENCE_BACKOFF);
            self.timeouts = 0;
        }
        true
    }

    /// Whether the path counts as silent: an episode's probe went unanswered through
    /// [`SILENT_PROBE_TIMEOUTS`] probe timeouts.
    fn is_silent(&self) -> bool {
        self.probing && self.timeouts >= SILENT_PROBE_TIMEOUTS
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
    /// New stream bytes arrived: arm the silence probe (and measure the RTT if there is no
    /// sample yet).
    pub(super) fn liveness_on_stream_data(&mut self) {
        if self.config.silence_probe && self.liveness.on_stream_data(self.rtt.has_sample()) {
            self.ping_pending = true;
        }
    }

    /// When the silence probe needs [`handle_timeout`](Transport::handle_timeout), if it
    /// does (the callers check that the transport is open and not frozen).
    pub(super) fn silence_deadline(&self) -> Option<Instant> {
        if !self.config.silence_probe {
            return None;
        }
        self.liveness
            .deadline(self.last_received, &self.rtt, self.recv.expects_more())
    }

    /// Runs the silence probe's timer at `now`: a PING when one is due.
    pub(super) fn liveness_on_timeout(&mut self, now: Instant) {
        if self.config.silence_probe
            && self.liveness.on_timeout(
                now,
                self.last_received,
                &self.rtt,
                self.recv.expects_more(),
            )
        {
            self.ping_pending = true;
            self.stats.silence_probes = self.stats.silence_probes.saturating_add(1);
        }
    }

    /// A valid packet, or other sign of life, arrived from the peer.
    pub(super) fn liveness_on_received(&mut self) {
        self.liveness.on_received();
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

    #[test]
    fn the_rule_is_the_endpoints() {
        assert_eq!(
            u32::from(SILENT_PROBE_TIMEOUTS),
            crate::endpoint::STALE_PTOS
        );
    }

    #[test]
    fn unarmed_until_data_arrives_and_disarmed_by_an_answered_probe() {
        let mut l = Liveness::default();
        let r = rtt(20);
        assert_eq!(l.deadline(t(0), &r, true), None, "never received data");
        l.on_stream_data(true);
        assert_eq!(l.deadline(t(100), &r, true), Some(t(160)), "3 × 20 ms");
        assert_eq!(l.deadline(t(100), &r, false), None, "nothing more expected");
        assert!(!l.on_timeout(t(159), t(100), &r, true), "not yet");
        assert!(l.on_timeout(t(160), t(100), &r, true), "a probe");
        // Its timeout: srtt + 4 × rttvar (20 + 40 ms), no ACK delay.
        assert_eq!(l.deadline(t(100), &r, true), Some(t(220)));
        // Answered (something arrived): nothing more until new data arrives.
        l.on_received();
        assert_eq!(l.deadline(t(170), &r, true), None);
        assert!(!l.on_timeout(t(1000), t(170), &r, true));
        assert!(!l.is_silent());
    }

    #[test]
    fn an_unanswered_probe_is_sent_again_and_then_the_path_is_silent() {
        let mut l = Liveness::default();
        let r = rtt(1);
        l.on_stream_data(true);
        let last = t(0);
        assert!(l.on_timeout(t(10), last, &r, true), "MIN_SILENCE");
        // pto_base is 3 ms here; the floor makes it 10 ms, then 20 ms.
        assert_eq!(l.deadline(last, &r, true), Some(t(20)));
        assert!(!l.on_timeout(t(19), last, &r, true));
        assert!(l.on_timeout(t(20), last, &r, true), "again");
        assert!(!l.is_silent());
        assert_eq!(l.deadline(last, &r, true), Some(t(40)));
        assert!(!l.on_timeout(t(40), last, &r, true), "no third probe");
        assert!(l.is_silent());
        assert_eq!(l.deadline(last, &r, true), None, "settled");
        // A late answer ends it; a path change too.
        let mut answered = l;
        answered.on_received();
        assert!(!answered.is_silent());
        l.on_path_change();
        assert!(!l.is_silent());
    }

    #[test]
    fn the_threshold_has_a_floor_and_backs_off_per_episode_up_to_a_cap() {
        let mut l = Liveness::default();
        let fast = rtt(1);
        let mut want = 10;
        let mut now = 0;
        for _ in 0..6 {
            l.on_stream_data(true);
            assert_eq!(l.deadline(t(now), &fast, true), Some(t(now + want)));
            assert!(l.on_timeout(t(now + want), t(now), &fast, true));
            // Answered at once.
            l.on_received();
            now += want + 1;
            want = (want * 2).min(10 << MAX_SILENCE_BACKOFF);
        }
        assert_eq!(want, 80);
        l.on_path_change();
        assert_eq!(
            l.deadline(t(0), &fast, true),
            None,
            "a new path starts unarmed"
        );
        l.on_stream_data(true);
        assert_eq!(
            l.deadline(t(0), &fast, true),
            Some(t(10)),
            "and without backoff"
        );
    }

    #[test]
    fn one_measuring_ping_per_path_without_an_rtt_sample() {
        let mut l = Liveness::default();
        assert!(l.on_stream_data(false));
        assert!(!l.on_stream_data(false), "asked once");
        l.on_path_change();
        assert!(!l.on_stream_data(true), "a sample is there already");
        l.on_path_change();
        assert!(l.on_stream_data(false), "again on a new path");
    }
}
