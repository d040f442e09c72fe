//! [`Pacer`]: spreads a congestion window's worth of packets over a round trip.
//!
//! RFC 9002 §7.7: "A sender SHOULD pace sending of all in-flight packets based on input from
//! the congestion controller", at a rate of `N * congestion_window / smoothed_rtt` where
//! "using a value for N that is small, but at least 1 (for example, 1.25) ensures that
//! variations in RTT do not result in underutilization of the congestion window". This pacer
//! uses N = 1.25.
//!
//! It is a token bucket, as in quinn: tokens are bytes, refilled continuously at the pacing
//! rate up to a *burst capacity*, and spent by sending.
//!
//! # Burst capacity
//!
//! ```text
//! capacity = clamp(rate × 2 ms, initial_window(mtu), 256 × mtu), then at most the window
//!            (but never below one mtu)
//! ```
//!
//! - **2 ms of the pacing rate.** Timers in the runtime fire with about a millisecond of
//!   granularity; a bucket holding two milliseconds of sending lets one wake-up send
//!   everything that accrued, so timer granularity does not cap throughput.
//! - **At least the initial window** (`min(10 × mtu, max(14720, 2 × mtu))`): RFC 9002 §7.7
//!   says senders "SHOULD limit bursts to the initial congestion window", so a burst of that
//!   size is within what the RFC expects the network to absorb, and a connection's first
//!   flight leaves at once instead of being spread over the (still guessed) initial RTT.
//! - **At most 256 datagrams** (quinn's bound): fast paths still see bounded bursts
//!   (≈ 300 kB at 1200-byte datagrams).
//! - **At most the window**: a bucket larger than the window could never be spent.
//!
//! # Call order
//!
//! Before sending a packet of `bytes` bytes, call [`delay`](Pacer::delay) with the current
//! window, MTU and smoothed RTT. `None` means send now, then call
//! [`on_sent`](Pacer::on_sent); `Some(t)` means wait until `t` (arm a timer) and ask again.
//! `now` must never go backwards. The pacer keeps no record of packets, only a token count,
//! and it does not replace the congestion window check: pace *and* respect the window.

use core::time::Duration;

use super::cc::initial_window;
use crate::Instant;
use crate::snapshot::{BlockReader, BlockWriter, SnapshotError};

/// The pacing gain N of RFC 9002 §7.7, as numerator / denominator: 5/4 = 1.25.
const GAIN: (u128, u128) = (5, 4);

/// How much sending time the bucket holds (see the [module docs](self)).
pub const BURST_INTERVAL: Duration = Duration::from_millis(2);

/// Most datagrams in one burst (see the [module docs](self)).
pub const MAX_BURST_PACKETS: u64 = 256;

/// Token-bucket pacer (RFC 9002 §7.7). Plain data; see the [module docs](self).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pacer {
    /// Bytes that may be sent right now.
    tokens: u64,
    /// Bucket size computed at the last [`delay`](Pacer::delay).
    capacity: u64,
    /// When tokens were last added.
    last_refill: Instant,
    /// Remainder of the last refill, in units of `1 / (4 * srtt_ns)` bytes, so that frequent
    /// small refills do not lose fractions of a byte. (Below `4 * srtt_ns`, so 64 bits hold it
    /// for any RTT under a century; beyond, it saturates, costing a fraction of a byte.)
    fraction: u64,
}

impl Pacer {
    /// A pacer whose bucket starts full (its size is fixed at the first
    /// [`delay`](Self::delay)).
    pub fn new(now: Instant) -> Pacer {
        Pacer {
            tokens: u64::MAX,
            capacity: u64::MAX,
            last_refill: now,
            fraction: 0,
        }
    }

    /// Bytes that could be sent immediately as of the last call.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Bucket size as of the last [`delay`](Self::delay) call.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The burst capacity for a window of `window` bytes over `srtt` with `mtu`-byte
    /// datagrams (see the [module docs](self)).
    pub fn burst_capacity(window: u64, mtu: u16, srtt: Duration) -> u64 {
        let mtu64 = u64::from(mtu.max(1));
        let interval = rate_bytes(window, srtt, BURST_INTERVAL);
        let floor = initial_window(mtu.max(1));
        let ceiling = MAX_BURST_PACKETS * mtu64;
        interval
            .clamp(floor, ceiling.max(floor))
            .min(window)
            .max(mtu64)
    }

    /// When a packet of `bytes_to_send` bytes may leave: `None` for now, otherwise the
    /// instant at which enough tokens will have accrued.
    ///
    /// The pacing rate is `1.25 * window / srtt`. A zero `srtt` or `window` disables pacing
    /// (there is no meaningful rate), as does a packet larger than the bucket once the bucket
    /// is full (it could otherwise never leave).
    pub fn delay(
        &mut self,
        now: Instant,
        bytes_to_send: u64,
        mtu: u16,
        window: u64,
        srtt: Duration,
    ) -> Option<Instant> {
        if srtt.is_zero() || window == 0 {
            return None;
        }
        self.capacity = Pacer::burst_capacity(window, mtu, srtt);
        self.tokens = self.tokens.min(self.capacity);
        self.refill(now, window, srtt);
        let needed = bytes_to_send.min(self.capacity);
        if self.tokens >= needed {
            return None;
        }
        // Time for `needed - tokens` more bytes at `GAIN * window / srtt` bytes per second:
        // solve (elapsed * GAIN.0 * window + fraction) / (GAIN.1 * srtt) >= deficit.
        let deficit = u128::from(needed - self.tokens);
        let denominator = GAIN.1 * srtt.as_nanos();
        let numerator_needed = (deficit * denominator).saturating_sub(u128::from(self.fraction));
        let per_ns = GAIN.0 * u128::from(window);
        let wait_ns = numerator_needed.div_ceil(per_ns);
        let wait = u64::try_from(wait_ns).map_or(Duration::MAX, Duration::from_nanos);
        Some(now + wait)
    }

    /// Spends tokens for a packet of `bytes` bytes that was just sent.
    pub fn on_sent(&mut self, bytes: u64) {
        self.tokens = self.tokens.saturating_sub(bytes);
    }

    /// Adds the tokens accrued since the last refill, up to the capacity.
    fn refill(&mut self, now: Instant, window: u64, srtt: Duration) {
        let elapsed = (now - self.last_refill).as_nanos();
        self.last_refill = self.last_refill.max(now);
        if self.tokens >= self.capacity {
            self.fraction = 0;
            return;
        }
        let denominator = GAIN.1 * srtt.as_nanos();
        // elapsed * 5 * window exceeds u128 only for absurd inputs (both near 2^64); saturate
        // rather than overflow: a saturated refill fills the bucket anyway.
        let numerator = elapsed
            .saturating_mul(GAIN.0 * u128::from(window))
            .saturating_add(u128::from(self.fraction));
        let new = numerator / denominator;
        let room = u128::from(self.capacity - self.tokens);
        if new >= room {
            self.tokens = self.capacity;
            self.fraction = 0;
        } else {
            // `new < room <= u64::MAX`.
            self.tokens += new as u64;
            self.fraction = u64::try_from(numerator % denominator).unwrap_or(u64::MAX);
        }
    }
}

/// Snapshot encoding (docs/snapshot.md, PATH block, "Pacer").
impl Pacer {
    /// Writes tokens, capacity, the last refill (relative) and the refill remainder.
    pub(crate) fn encode(&self, w: &mut BlockWriter) {
        w.u64(self.tokens);
        w.u64(self.capacity);
        w.instant(self.last_refill);
        w.u64(self.fraction);
    }

    /// Reads what [`encode`](Self::encode) wrote; more tokens than capacity is refused.
    pub(crate) fn decode(r: &mut BlockReader<'_>) -> Result<Pacer, SnapshotError> {
        let p = Pacer {
            tokens: r.u64()?,
            capacity: r.u64()?,
            last_refill: r.instant()?,
            fraction: r.u64()?,
        };
        r.check(p.tokens <= p.capacity, "pacer tokens above capacity")?;
        Ok(p)
    }
}

/// Bytes sent in `interval` at `GAIN * window / srtt`, saturating.
fn rate_bytes(window: u64, srtt: Duration, interval: Duration) -> u64 {
    let n = GAIN.0 * u128::from(window) * interval.as_nanos();
    let d = GAIN.1 * srtt.as_nanos().max(1);
    u64::try_from(n / d).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MTU: u16 = 1200;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Sends `MTU`-byte packets as fast as the pacer allows for `span`; returns the bytes
    /// sent and how many of them left at `start` without waiting.
    fn drive(
        p: &mut Pacer,
        start: Instant,
        span: Duration,
        window: u64,
        srtt: Duration,
    ) -> (u64, u64) {
        let mut now = start;
        let end = start + span;
        let (mut sent, mut immediate) = (0, 0);
        while now < end {
            match p.delay(now, u64::from(MTU), MTU, window, srtt) {
                Some(t) => {
                    assert!(t > now, "a delay must be in the future");
                    now = t;
                }
                None => {
                    p.on_sent(u64::from(MTU));
                    sent += u64::from(MTU);
                    if now == start {
                        immediate += u64::from(MTU);
                    }
                }
            }
        }
        (sent, immediate)
    }

    #[test]
    fn capacity_choice() {
        // Small window, long RTT: the initial-window floor.
        assert_eq!(Pacer::burst_capacity(100_000, MTU, ms(100)), 12_000);
        // Never more than the window, never less than one packet.
        assert_eq!(Pacer::burst_capacity(5_000, MTU, ms(100)), 5_000);
        assert_eq!(Pacer::burst_capacity(10, MTU, ms(100)), 1_200);
        // 2 ms worth: 1.25 * 10 MB / 10 ms * 2 ms = 2.5 MB, capped at 256 packets.
        assert_eq!(Pacer::burst_capacity(10_000_000, MTU, ms(10)), 256 * 1200);
        // In between: 1.25 * 4 MB / 100 ms * 2 ms = 100 kB.
        assert_eq!(Pacer::burst_capacity(4_000_000, MTU, ms(100)), 100_000);
    }

    #[test]
    fn a_burst_up_to_capacity_leaves_immediately() {
        let window = 4_000_000;
        let srtt = ms(100);
        let mut p = Pacer::new(Instant::ZERO);
        let (_, immediate) = drive(&mut p, Instant::ZERO, ms(50), window, srtt);
        let capacity = Pacer::burst_capacity(window, MTU, srtt);
        assert_eq!(immediate, capacity / u64::from(MTU) * u64::from(MTU));
    }

    #[test]
    fn sustained_sending_converges_to_the_pacing_rate() {
        for (window, srtt) in [
            (50_000u64, ms(20)),
            (1_000_000, ms(100)),
            (123_457, ms(7)),
            (20_000_000, ms(1)),
        ] {
            let mut p = Pacer::new(Instant::ZERO);
            let span = srtt * 50;
            let (sent, _) = drive(&mut p, Instant::ZERO, span, window, srtt);
            let capacity = Pacer::burst_capacity(window, MTU, srtt);
            let expected = 1.25 * window as f64 * 50.0;
            let paced = (sent - capacity) as f64;
            let err = (paced - expected).abs() / expected;
            assert!(
                err < 0.01,
                "window {window}, srtt {srtt:?}: {paced} vs {expected}"
            );
        }
    }

    #[test]
    fn delay_is_exactly_when_tokens_suffice() {
        let (window, srtt) = (1_000_000u64, ms(100)); // 12.5 bytes per µs
        let mut p = Pacer::new(Instant::ZERO);
        while p.delay(Instant::ZERO, 1200, MTU, window, srtt).is_none() {
            p.on_sent(1200);
        }
        assert!(p.tokens() < 1200);
        let t = p.delay(Instant::ZERO, 1200, MTU, window, srtt).unwrap();
        let just_before = Instant::from_nanos(t.as_nanos() - 1);
        let mut q = p.clone();
        assert!(q.delay(just_before, 1200, MTU, window, srtt).is_some());
        assert_eq!(p.delay(t, 1200, MTU, window, srtt), None);
    }

    #[test]
    fn idle_time_refills_only_up_to_capacity() {
        let (window, srtt) = (1_000_000u64, ms(100));
        let mut p = Pacer::new(Instant::ZERO);
        drive(&mut p, Instant::ZERO, ms(10), window, srtt);
        let later = Instant::ZERO + Duration::from_secs(3600);
        let (_, immediate) = drive(&mut p, later, ms(1), window, srtt);
        assert_eq!(
            immediate,
            Pacer::burst_capacity(window, MTU, srtt) / 1200 * 1200
        );
    }

    #[test]
    fn a_smaller_window_shrinks_the_bucket() {
        let mut p = Pacer::new(Instant::ZERO);
        assert_eq!(p.delay(Instant::ZERO, 1200, MTU, 4_000_000, ms(100)), None);
        assert_eq!(p.tokens(), 100_000);
        assert_eq!(p.delay(Instant::ZERO, 1200, MTU, 20_000, ms(100)), None);
        assert_eq!(p.tokens(), 12_000);
    }

    #[test]
    fn degenerate_inputs_do_not_pace_or_panic() {
        let mut p = Pacer::new(Instant::ZERO);
        assert_eq!(
            p.delay(Instant::ZERO, 1200, MTU, 10_000, Duration::ZERO),
            None
        );
        assert_eq!(p.delay(Instant::ZERO, 1200, MTU, 0, ms(10)), None);
        // A packet larger than the bucket leaves once the bucket is full.
        assert_eq!(p.delay(Instant::ZERO, 1 << 40, MTU, 5_000, ms(10)), None);
        p.on_sent(u64::MAX);
        let t = p
            .delay(Instant::ZERO, u64::MAX, u16::MAX, u64::MAX, Duration::MAX)
            .unwrap();
        assert!(t > Instant::ZERO);
        let far = Instant::from_nanos(u64::MAX);
        assert_eq!(p.delay(far, 1, 0, u64::MAX, Duration::from_nanos(1)), None);
        // Time going backwards is treated as no time passing.
        let _ = p.delay(Instant::ZERO, 1200, MTU, 10_000, ms(10));
    }
}
