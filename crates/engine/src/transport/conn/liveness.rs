//! The receiving side's silence probe (issue 11): an end that only receives notices when the
//! peer's data stops arriving on a dead path.
//!
//! Silent-path failover (`endpoint/failover.rs`) moves a connection once its probe timeout
//! fired [`STALE_PTOS`](crate::endpoint::STALE_PTOS) times with nothing acknowledged. Only an
//! end with something ack-eliciting in flight has a probe timeout, so an end that only
//! receives (the peer streams to it; it sends nothing but ACKs) never had one: when its path
//! went silent it waited for the idle timeout. With
//! [`TransportConfig::silence_probe`](super::TransportConfig::silence_probe) it sends a PING
//! when the peer's data, which was flowing, stops; the PING arms the probe timeout, and the
//! usual rule settles it:
//!
//! - the path is alive (the peer merely stopped writing): the PING is acknowledged at once,
//!   nothing moves, and no further probe is sent until stream data arrives again;
//! - the path is dead: the PING and the two probes of each probe timeout go unanswered, the
//!   probe timeout fires twice, and the endpoint moves the flow (RSYN from its next address).
//!
//! # The rule
//!
//! A probe is due when all of these hold:
//!
//! - new stream data arrived since the last probe (or since the path changed): the peer was
//!   sending, so silence now means something. A connection that was not receiving never
//!   probes: no keepalive traffic on idle connections;
//! - the receive side still expects data: the peer's FIN has not arrived (or bytes before it
//!   are missing), and the flow-control window is open (the peer is not blocked by us: a
//!   reader that stopped reading makes the peer stop, and that silence is expected);
//! - nothing at all was received for the silence threshold
//!   `max(SILENCE_RTTS × smoothed RTT, MIN_SILENCE) × 2^backoff`.
//!
//! Three round trips: a sender that is still sending, limited by its congestion window or
//! its pacer, sends at least once per round trip, so three round trips without a packet mean
//! it has stopped or cannot reach us; one round trip would fire on ordinary ACK-clocking
//! jitter. The floor keeps a sub-millisecond path (a LAN, veth) from probing on a scheduler
//! hiccup of the sending host. `backoff` counts the probes sent on the current path (capped
//! at [`MAX_SILENCE_BACKOFF`]): a peer that writes in bursts with pauses (an application
//! that streams at its own pace) costs at most one PING per pause, and each pause raises the
//! threshold, so after a few pauses the probe fires only on silences long compared with the
//! peer's habit. A path change resets it.
//!
//! # Round-trip time
//!
//! The threshold and the PING's probe timeout need an RTT estimate, and an end that only
//! sends ACKs (which are not acknowledged) never takes an RTT sample: its estimate stays at
//! the 333 ms initial guess, a probe timeout of about a second. So the first stream data that
//! arrives on a path without an RTT sample also asks for one PING, whose immediate
//! acknowledgement is that sample: one ack-eliciting frame per path and connection that
//! receives data.
//!
//! The state is three flags and a counter, and is not part of a snapshot: an imported
//! connection starts unarmed and re-arms on the next data it receives.

use core::time::Duration;

use super::{Instant, RttEstimator, Transport};

/// Silence, in smoothed round-trip times, after which a receiving end probes its path.
pub const SILENCE_RTTS: u32 = 3;

/// The least silence after which a receiving end probes its path, however short its RTT.
pub const MIN_SILENCE: Duration = Duration::from_millis(10);

/// Most doublings of the silence threshold: each probe sent on a path doubles it, up to
/// `2^MAX_SILENCE_BACKOFF` times the base.
pub const MAX_SILENCE_BACKOFF: u8 = 3;

/// A receiving end's silence-probe state (see the [module documentation](self)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Liveness {
    /// New stream data arrived since the last probe or path change.
    armed: bool,
    /// An RTT-measuring PING was asked for on this path.
    measured: bool,
    /// Probes sent on this path, capped at [`MAX_SILENCE_BACKOFF`]: the threshold's exponent.
    backoff: u8,
    /// Silence probes sent, ever (a statistic).
    probes: u32,
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

    /// When a probe is due, if one may be: `last_received` is the peer's last sign of life,
    /// `expects_more` whether the receive side awaits data the peer may send.
    fn deadline(
        &self,
        last_received: Instant,
        rtt: &RttEstimator,
        expects_more: bool,
    ) -> Option<Instant> {
        (self.armed && expects_more).then(|| last_received + self.threshold(rtt))
    }

    /// The silence threshold: `max(SILENCE_RTTS × srtt, MIN_SILENCE) × 2^backoff`.
    fn threshold(&self, rtt: &RttEstimator) -> Duration {
        let base = rtt.smoothed().saturating_mul(SILENCE_RTTS).max(MIN_SILENCE);
        base.saturating_mul(1 << self.backoff.min(MAX_SILENCE_BACKOFF))
    }

    /// A probe is being sent: disarm until new data arrives, and back off.
    fn on_probe(&mut self) {
        self.armed = false;
        self.backoff = (self.backoff + 1).min(MAX_SILENCE_BACKOFF);
        self.probes = self.probes.saturating_add(1);
    }

    /// The threshold's exponent.
    #[cfg(test)]
    pub(super) fn backoff(&self) -> u8 {
        self.backoff
    }

    /// The path changed: its RTT and the peer's habits on it are unknown again.
    fn on_path_change(&mut self) {
        *self = Liveness {
            probes: self.probes,
            ..Liveness::default()
        };
    }
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

    /// When the silence probe is due, if it is armed (only while open and not frozen: the
    /// callers check).
    pub(super) fn silence_deadline(&self) -> Option<Instant> {
        if !self.config.silence_probe {
            return None;
        }
        self.liveness
            .deadline(self.last_received, &self.rtt, self.recv.expects_more())
    }

    /// Sends the silence probe if it is due at `now`.
    pub(super) fn liveness_on_timeout(&mut self, now: Instant) {
        if self.silence_deadline().is_some_and(|t| t <= now) {
            self.liveness.on_probe();
            self.ping_pending = true;
        }
    }

    /// The path changed ([`on_path_change`](Transport::on_path_change)).
    pub(super) fn liveness_on_path_change(&mut self) {
        self.liveness.on_path_change();
    }

    /// Silence probes sent ([`TransportStats::silence_probes`](super::TransportStats)).
    pub(super) fn silence_probes(&self) -> u64 {
        u64::from(self.liveness.probes)
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
    fn unarmed_until_data_arrives_and_disarmed_by_a_probe() {
        let mut l = Liveness::default();
        let r = rtt(20);
        assert_eq!(l.deadline(t(0), &r, true), None, "never received data");
        l.on_stream_data(true);
        assert_eq!(l.deadline(t(100), &r, true), Some(t(160)), "3 × 20 ms");
        assert_eq!(l.deadline(t(100), &r, false), None, "nothing more expected");
        l.on_probe();
        assert_eq!(l.deadline(t(100), &r, true), None, "until new data arrives");
        assert_eq!(l.probes, 1);
    }

    #[test]
    fn the_threshold_has_a_floor_and_backs_off_per_probe_up_to_a_cap() {
        let mut l = Liveness::default();
        let fast = rtt(1);
        l.on_stream_data(true);
        assert_eq!(l.deadline(t(0), &fast, true), Some(t(10)), "MIN_SILENCE");
        let mut want = 10;
        for _ in 0..6 {
            l.on_probe();
            l.on_stream_data(true);
            want = (want * 2).min(10 << MAX_SILENCE_BACKOFF);
            assert_eq!(l.deadline(t(0), &fast, true), Some(t(want)));
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
        assert_eq!(l.probes, 6, "the statistic survives");
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
