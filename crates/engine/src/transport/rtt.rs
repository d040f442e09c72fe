//! [`RttEstimator`]: round-trip time estimation per RFC 9002 §5.
//!
//! The estimator keeps the four quantities RFC 9002 §5 defines — `latest_rtt`, `min_rtt`,
//! `smoothed_rtt` and `rttvar` — and derives the probe timeout period (§6.2.1) from them.
//!
//! # Call order
//!
//! 1. Build it with [`RttEstimator::new`] (or [`Default`]: a 333 ms initial RTT and a 25 ms
//!    peer `max_ack_delay`, the RFC defaults).
//! 2. For every ACK that yields an RTT sample (RFC 9002 §5.1: the largest acknowledged packet
//!    is newly acknowledged and at least one newly acknowledged packet was ack-eliciting —
//!    [`SentPackets::on_ack`](super::loss::SentPackets::on_ack) applies that rule), call
//!    [`update`](RttEstimator::update) with the sample and the peer's reported ACK delay.
//! 3. Read [`smoothed`](RttEstimator::smoothed), [`pto_base`](RttEstimator::pto_base) or
//!    [`pto_period`](RttEstimator::pto_period) whenever a timer is armed.
//! 4. After persistent congestion call
//!    [`on_persistent_congestion`](RttEstimator::on_persistent_congestion); when the flow moves
//!    to a new path (RFC 9000 §9.4) call [`reset`](RttEstimator::reset).
//!
//! # Hostile input
//!
//! The ACK delay comes from the peer. It is clamped to `max_ack_delay` before use (RFC 9002
//! §5.3), and every computation saturates, so no input makes the estimator panic.

use core::time::Duration;

use super::Nanos;
use crate::snapshot::{BlockReader, BlockWriter, SnapshotError};

/// Timer granularity, `kGranularity` in RFC 9002 §6.1.2: 1 ms.
pub const GRANULARITY: Duration = Duration::from_millis(1);

/// Default initial RTT, `kInitialRtt` in RFC 9002 §6.2.2: 333 ms.
pub const INITIAL_RTT: Duration = Duration::from_millis(333);

/// Default peer `max_ack_delay`: 25 ms, the default of RFC 9000 §18.2.
pub const DEFAULT_MAX_ACK_DELAY: Duration = Duration::from_millis(25);

/// Largest `max_ack_delay` accepted: 2^14 ms. RFC 9000 §18.2 makes larger values invalid; a
/// larger value given here is clamped to it.
pub const MAX_MAX_ACK_DELAY: Duration = Duration::from_millis(1 << 14);

/// Round-trip time estimator (RFC 9002 §5). Plain data; see the [module docs](self).
///
/// Durations are kept in 64-bit nanoseconds (a connection keeps one estimator, so it is kept
/// small); any of 584 years or more reads back as `Duration::MAX`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RttEstimator {
    /// RTT assumed before the first sample (`kInitialRtt`).
    initial: Nanos,
    /// The peer's `max_ack_delay`, already clamped to [`MAX_MAX_ACK_DELAY`].
    max_ack_delay: Nanos,
    /// Most recent sample, not adjusted for ACK delay (§5.2).
    latest: Nanos,
    /// Exponentially weighted moving average of adjusted samples (§5.3).
    smoothed: Nanos,
    /// Mean deviation of the samples (§5.3).
    var: Nanos,
    /// Minimum sample seen, not adjusted for ACK delay (§5.2).
    min: Nanos,
    /// What the estimate rests on.
    sample: Sample,
}

/// What an estimate rests on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sample {
    /// Nothing: the initial RTT.
    None,
    /// One round trip measured outside the transport (the handshake's, which includes the
    /// peer's key exchange; or another path's, for a path just joined): used until the first
    /// sample of the transport's own, which then starts the estimate afresh.
    Provisional,
    /// The transport's own samples.
    Measured,
}

impl Default for RttEstimator {
    fn default() -> Self {
        RttEstimator::new(INITIAL_RTT, DEFAULT_MAX_ACK_DELAY)
    }
}

impl RttEstimator {
    /// An estimator that assumes `initial_rtt` until the first sample (RFC 9002 §5.3:
    /// `smoothed_rtt = kInitialRtt`, `rttvar = kInitialRtt / 2`), for a peer that promises to
    /// delay acknowledgements by at most `max_ack_delay` (clamped to [`MAX_MAX_ACK_DELAY`]).
    pub fn new(initial_rtt: Duration, max_ack_delay: Duration) -> RttEstimator {
        RttEstimator {
            initial: Nanos::of(initial_rtt),
            max_ack_delay: Nanos::of(max_ack_delay.min(MAX_MAX_ACK_DELAY)),
            latest: Nanos::of(initial_rtt),
            smoothed: Nanos::of(initial_rtt),
            var: Nanos::of(initial_rtt / 2),
            min: Nanos::of(initial_rtt),
            sample: Sample::None,
        }
    }

    /// Forgets every sample, returning to the initial RTT; `max_ack_delay` is kept.
    ///
    /// RFC 9000 §9.4: on a new path "the endpoint MUST reset ... the RTT estimate" unless it
    /// knows the path's characteristics are unchanged.
    pub fn reset(&mut self) {
        *self = RttEstimator::new(self.initial.get(), self.max_ack_delay.get());
    }

    /// Records the peer's `max_ack_delay` (for example from its handshake parameters), clamped
    /// to [`MAX_MAX_ACK_DELAY`].
    pub fn set_max_ack_delay(&mut self, max_ack_delay: Duration) {
        self.max_ack_delay = Nanos::of(max_ack_delay.min(MAX_MAX_ACK_DELAY));
    }

    /// The RTT assumed before the first sample.
    pub fn initial(&self) -> Duration {
        self.initial.get()
    }

    /// The peer's `max_ack_delay`.
    pub fn max_ack_delay(&self) -> Duration {
        self.max_ack_delay.get()
    }

    /// Whether at least one sample has been taken.
    pub fn has_sample(&self) -> bool {
        self.sample != Sample::None
    }

    /// Whether the estimate rests on the transport's own samples (not only on a
    /// [`provisional`](Self::provisional) one).
    pub fn is_measured(&self) -> bool {
        self.sample == Sample::Measured
    }

    /// Starts the estimate from a round trip measured outside the transport, if it has no
    /// sample yet (RFC 9002 §5.3's first-sample rule). The transport's first own sample then
    /// replaces it rather than being averaged with it: a handshake's round trip includes the
    /// peer's key exchange, and a path's differs from another path's.
    pub fn provisional(&mut self, rtt: Duration) {
        if self.sample == Sample::None {
            self.update(rtt, Duration::ZERO);
            self.sample = Sample::Provisional;
        }
    }

    /// `latest_rtt`: the most recent sample (the initial RTT before any).
    pub fn latest(&self) -> Duration {
        self.latest.get()
    }

    /// `smoothed_rtt` (the initial RTT before any sample).
    pub fn smoothed(&self) -> Duration {
        self.smoothed.get()
    }

    /// `rttvar` (half the initial RTT before any sample).
    pub fn var(&self) -> Duration {
        self.var.get()
    }

    /// `min_rtt` (the initial RTT before any sample).
    pub fn min(&self) -> Duration {
        self.min.get()
    }

    /// Feeds one RTT sample (RFC 9002 §5.1–§5.3).
    ///
    /// `latest_rtt` is `now − time sent` of the largest newly acknowledged packet;
    /// `ack_delay` is the delay the peer reported in that ACK. The first sample initialises
    /// every estimate from itself. Later samples:
    ///
    /// - update `min_rtt` from the raw sample (§5.2: ACK delay is not subtracted);
    /// - clamp `ack_delay` to `max_ack_delay` (§5.3: "MUST use the lesser of the acknowledgment
    ///   delay and the peer's max_ack_delay after the handshake is confirmed"; the SAL
    ///   handshake completes before the transport runs, so the clamp always applies. Pass
    ///   [`Duration::ZERO`] to ignore the peer's delay altogether);
    /// - subtract the delay only if the result stays at or above `min_rtt` (§5.3);
    /// - `rttvar = 3/4 rttvar + 1/4 |smoothed_rtt − adjusted_rtt|`, then
    ///   `smoothed_rtt = 7/8 smoothed_rtt + 1/8 adjusted_rtt`.
    pub fn update(&mut self, latest_rtt: Duration, ack_delay: Duration) {
        self.latest = Nanos::of(latest_rtt);
        if self.sample != Sample::Measured {
            // §5.3: "min_rtt = latest_rtt; smoothed_rtt = latest_rtt; rttvar = latest_rtt / 2".
            self.sample = Sample::Measured;
            self.min = Nanos::of(latest_rtt);
            self.smoothed = Nanos::of(latest_rtt);
            self.var = Nanos::of(latest_rtt / 2);
            return;
        }
        let min = self.min().min(latest_rtt);
        self.min = Nanos::of(min);
        let ack_delay = ack_delay.min(self.max_ack_delay());
        let adjusted = if latest_rtt >= min.saturating_add(ack_delay) {
            latest_rtt - ack_delay
        } else {
            latest_rtt
        };
        let smoothed = self.smoothed();
        let deviation = smoothed.abs_diff(adjusted);
        self.var = Nanos::of(weighted(self.var(), 3, deviation, 1, 4));
        self.smoothed = Nanos::of(weighted(smoothed, 7, adjusted, 1, 8));
    }

    /// After persistent congestion, restarts `min_rtt` from the latest sample (RFC 9002 §5.2:
    /// "Endpoints SHOULD set the min_rtt to the newest RTT sample after persistent congestion
    /// is established").
    pub fn on_persistent_congestion(&mut self) {
        if self.has_sample() {
            self.min = self.latest;
        }
    }

    /// `smoothed_rtt + max(4 * rttvar, kGranularity)`: the probe timeout period **without** the
    /// peer's `max_ack_delay` (RFC 9002 §6.2.1).
    ///
    /// This is the period for packets the peer acknowledges immediately (RFC 9002 sets
    /// `max_ack_delay` to 0 for the Initial and Handshake spaces). Data packets, whose
    /// acknowledgement the peer may delay, use [`pto_period`](Self::pto_period).
    pub fn pto_base(&self) -> Duration {
        self.smoothed()
            .saturating_add(self.var().saturating_mul(4).max(GRANULARITY))
    }

    /// `pto_base() + max_ack_delay`: the full probe timeout period of RFC 9002 §6.2.1, before
    /// exponential backoff. [`SentPackets`](super::loss::SentPackets) uses this one.
    pub fn pto_period(&self) -> Duration {
        self.pto_base().saturating_add(self.max_ack_delay())
    }
}

/// Snapshot encoding (docs/snapshot.md, PATH block, "RTT").
impl RttEstimator {
    /// Writes the estimator: initial RTT, `max_ack_delay`, latest, smoothed, variance,
    /// minimum (nanoseconds) and whether a sample was taken.
    pub(crate) fn encode(&self, w: &mut BlockWriter) {
        for d in [
            self.initial,
            self.max_ack_delay,
            self.latest,
            self.smoothed,
            self.var,
            self.min,
        ] {
            w.duration(d.get());
        }
        // A provisional estimate travels as measured (the snapshot's layout has one bit).
        w.bool(self.has_sample());
    }

    /// Reads what [`encode`](Self::encode) wrote; a `max_ack_delay` beyond
    /// [`MAX_MAX_ACK_DELAY`] is refused.
    pub(crate) fn decode(r: &mut BlockReader<'_>) -> Result<RttEstimator, SnapshotError> {
        let mut d = [Nanos::of(Duration::ZERO); 6];
        for x in &mut d {
            *x = Nanos::of(r.duration()?);
        }
        let [initial, max_ack_delay, latest, smoothed, var, min] = d;
        r.check(max_ack_delay.get() <= MAX_MAX_ACK_DELAY, "max_ack_delay")?;
        Ok(RttEstimator {
            initial,
            max_ack_delay,
            latest,
            smoothed,
            var,
            min,
            sample: if r.bool()? {
                Sample::Measured
            } else {
                Sample::None
            },
        })
    }
}

/// `(a * wa + b * wb) / d` computed exactly on nanoseconds, saturating at `Duration::MAX`.
fn weighted(a: Duration, wa: u128, b: Duration, wb: u128, d: u128) -> Duration {
    let n = (a.as_nanos() * wa + b.as_nanos() * wb) / d;
    u64::try_from(n).map_or(Duration::MAX, Duration::from_nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A provisional sample (the handshake's) stands until the first own sample, which
    /// replaces it instead of being averaged with it; later provisional ones change nothing.
    #[test]
    fn a_provisional_sample_gives_way_to_the_first_own_one() {
        let mut r = RttEstimator::default();
        r.provisional(ms(100));
        assert!(r.has_sample() && !r.is_measured());
        assert_eq!((r.smoothed(), r.min()), (ms(100), ms(100)));
        r.provisional(ms(5));
        assert_eq!(r.smoothed(), ms(100));
        r.update(ms(10), Duration::ZERO);
        assert!(r.is_measured());
        assert_eq!((r.smoothed(), r.var(), r.min()), (ms(10), ms(5), ms(10)));
        // Measured from then on: averaged, and no provisional sample overrides it.
        r.provisional(ms(100));
        r.update(ms(18), Duration::ZERO);
        assert_eq!(r.smoothed(), ms(11));
    }

    #[test]
    fn initial_values() {
        let r = RttEstimator::default();
        assert_eq!(r.smoothed(), ms(333));
        assert_eq!(r.var(), Duration::from_micros(166_500));
        assert!(!r.has_sample());
        // 333 + 4 * 166.5 = 999 ms, plus 25 ms of max_ack_delay.
        assert_eq!(r.pto_base(), ms(999));
        assert_eq!(r.pto_period(), ms(1024));
        let r = RttEstimator::new(ms(100), ms(0));
        assert_eq!(r.pto_period(), ms(300));
    }

    #[test]
    fn first_sample_initialises() {
        let mut r = RttEstimator::default();
        r.update(ms(100), ms(50));
        assert_eq!(
            (r.latest(), r.min(), r.smoothed(), r.var()),
            (ms(100), ms(100), ms(100), ms(50))
        );
    }

    #[test]
    fn ewma_follows_rfc_9002_5_3() {
        let mut r = RttEstimator::new(ms(333), ms(0));
        r.update(ms(100), ms(0));
        r.update(ms(200), ms(0));
        // rttvar = 3/4 * 50 + 1/4 * |100 - 200| = 62.5; srtt = 7/8 * 100 + 1/8 * 200 = 112.5.
        assert_eq!(r.var(), Duration::from_micros(62_500));
        assert_eq!(r.smoothed(), Duration::from_micros(112_500));
        assert_eq!(r.min(), ms(100));
        assert_eq!(r.latest(), ms(200));
    }

    #[test]
    fn ack_delay_is_subtracted_clamped_and_never_below_min_rtt() {
        let mut r = RttEstimator::new(ms(333), ms(10));
        r.update(ms(100), ms(0));
        // A hostile 1 s ack delay is clamped to max_ack_delay = 10 ms: adjusted = 110.
        r.update(ms(120), ms(1_000));
        assert_eq!(r.smoothed(), Duration::from_micros(101_250)); // 7/8*100 + 1/8*110
        // Subtracting would go below min_rtt (100): the raw 105 is used.
        let before = r.clone();
        r.update(ms(105), ms(10));
        let mut expected = before;
        expected.update(ms(105), ms(0));
        assert_eq!(r, expected);
    }

    #[test]
    fn min_rtt_ignores_ack_delay_and_restarts_after_persistent_congestion() {
        let mut r = RttEstimator::default();
        r.update(ms(50), ms(0));
        r.update(ms(80), ms(20));
        assert_eq!(r.min(), ms(50));
        r.on_persistent_congestion();
        assert_eq!(r.min(), ms(80));
    }

    #[test]
    fn granularity_floors_the_variance_term() {
        let mut r = RttEstimator::new(ms(333), ms(0));
        for _ in 0..100 {
            r.update(ms(10), ms(0));
        }
        assert_eq!(r.var(), Duration::ZERO);
        assert_eq!(r.pto_base(), ms(11));
    }

    #[test]
    fn extreme_inputs_saturate() {
        let mut r = RttEstimator::new(Duration::MAX, Duration::MAX);
        assert_eq!(r.max_ack_delay(), MAX_MAX_ACK_DELAY);
        assert_eq!(r.pto_period(), Duration::MAX);
        r.update(Duration::from_nanos(u64::MAX), Duration::MAX);
        r.update(Duration::from_nanos(u64::MAX), Duration::MAX);
        r.update(Duration::ZERO, Duration::ZERO);
        let _ = r.pto_period();
    }

    #[test]
    fn reset_keeps_configuration() {
        let mut r = RttEstimator::new(ms(200), ms(5));
        r.update(ms(10), ms(0));
        r.reset();
        assert_eq!(r, RttEstimator::new(ms(200), ms(5)));
    }
}
