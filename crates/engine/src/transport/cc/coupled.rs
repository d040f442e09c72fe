//! Coupled congestion control for multipath: RFC 6356's Linked Increases Algorithm (LIA).
//!
//! See [`Coupling`].

use core::time::Duration;

#[cfg(doc)]
use super::CongestionController;
use super::MAX_WINDOW;

/// Largest RTT [`Coupling::lia`] distinguishes, in microseconds (2^39 µs, about 6.4 days):
/// with windows up to 2^48, `cwnd * rtt^2` stays below 2^128.
const MAX_RTT_MICROS: u64 = 1 << 39;

/// Fractional bits of `sum_i cwnd_i / rtt_i` (bytes per microsecond).
const RATE_FRAC: u32 = 64;

/// Fractional bits of `s = sum_i cwnd_i * rtt_j / rtt_i` (bytes).
const SUM_FRAC: u32 = 16;

/// RFC 6356's coupling, computed from every path carrying data.
///
/// A connection that sends over several paths runs one [`CongestionController`] per path.
/// Left alone, `n` paths through one bottleneck would take `n` times the share of a
/// single-path flow. LIA couples only the *increase* of congestion avoidance: on each ACK for
/// path `i`, the caller computes a [`Coupling`] from every path currently carrying data
/// ([`Coupling::lia`]) and passes it to
/// [`on_ack_coupled`](CongestionController::on_ack_coupled), which grows path `i`'s window by
///
/// ```text
/// min(alpha * bytes_acked * mss_i / cwnd_total, bytes_acked * mss_i / cwnd_i)   (RFC 6356 §3)
///
/// alpha = cwnd_total * max_i(cwnd_i / rtt_i^2) / (sum_i cwnd_i / rtt_i)^2
/// ```
///
/// instead of Reno's `bytes_acked * mss_i / cwnd_i`. Slow start and the response to loss stay
/// per path, as the RFC requires.
///
/// What this achieves (RFC 6356 §2–§4): the second term of the `min` keeps every path at most
/// as aggressive as a single-path flow on that path; `alpha` makes the *total* window grow by
/// about `alpha` segments per round trip (for equal RTTs), chosen so that, at equilibrium, the
/// connection takes what one single-path flow would on its best path. With `n` identical paths
/// `alpha = 1/n`: two paths together grow by half a segment per RTT, not by one. That is not
/// less than a single flow gets: a loss halves only the path that saw it, so the total window
/// loses a quarter rather than half, and the equilibrium under a common loss rate is the same
/// as one Reno flow's. Because every path gets the same increase per acknowledged byte while
/// its decrease grows with its own loss rate, traffic moves to the less congested paths.
///
/// # Arithmetic
///
/// The controllers only need `cwnd_total / alpha`, which is the same for every path:
///
/// ```text
/// cwnd_total / alpha = (sum_i cwnd_i / rtt_i)^2 / max_i(cwnd_i / rtt_i^2)
///                    = (sum_i cwnd_i * rtt_j / rtt_i)^2 / cwnd_j      (j: the path of the max)
/// ```
///
/// so that a path grows by one segment per `max(cwnd_i, cwnd_total / alpha)` bytes
/// acknowledged. [`Coupling`] keeps `cwnd_total` and this *coupled window* in bytes. They are
/// computed in 128-bit integers, with fixed-point fractions and rounding to nearest, so the
/// result is reproducible and exact whenever the true value is an integer (identical paths
/// give exactly `alpha = 1/n`). Windows are clamped to `1..=`[`MAX_WINDOW`], RTTs are counted
/// in whole microseconds and clamped to `1 µs..=2^39 µs` (a zero RTT counts as 1 µs, anything
/// beyond six days as six days); within those bounds no step overflows, and every step
/// saturates besides, so no input panics. Each term `cwnd_i * rtt_j / rtt_i` is at most
/// `sqrt(cwnd_i * cwnd_j)` (because `j` maximises `cwnd / rtt^2`), which is what keeps the sums
/// within range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Coupling {
    /// `cwnd_total`: the sum of the (clamped) windows, bytes.
    total: u64,
    /// `cwnd_total / alpha`, bytes, at least 1.
    coupled_window: u64,
}

impl Coupling {
    /// From each path's (congestion window in bytes, smoothed RTT). `None` if fewer than two
    /// paths (no coupling then).
    ///
    /// Pass every path that currently carries data, including the one the ACK is for, with
    /// its [`window`](CongestionController::window) and
    /// [`smoothed`](super::super::rtt::RttEstimator::smoothed) RTT. A window of 0 counts as
    /// 1 byte and one above [`MAX_WINDOW`] as `MAX_WINDOW`; an RTT counts in whole
    /// microseconds, a zero one as 1 µs and one above about 6.4 days (2^39 µs) as that.
    pub fn lia(paths: impl IntoIterator<Item = (u64, Duration)>) -> Option<Coupling> {
        let mut count = 0usize;
        let mut total = 0u64;
        // sum_i cwnd_i / rtt_i, in bytes per microsecond with RATE_FRAC fractional bits. Each
        // term is below 2^(48 + 64); the sum saturates only past 2^16 paths.
        let mut rate = 0u128;
        // (cwnd_j, rtt_j) of the path maximising cwnd / rtt^2.
        let mut best = (0u64, 1u64);
        for (window, rtt) in paths {
            let window = window.clamp(1, MAX_WINDOW);
            let rtt = micros(rtt);
            count += 1;
            total = total.saturating_add(window);
            rate = rate.saturating_add(div_round(u128::from(window) << RATE_FRAC, rtt.into()));
            // cwnd / rtt^2 > cwnd_j / rtt_j^2, cross-multiplied: below 2^48 * 2^78.
            let square = |r: u64| u128::from(r) * u128::from(r);
            if count == 1 || u128::from(window) * square(best.1) > u128::from(best.0) * square(rtt)
            {
                best = (window, rtt);
            }
        }
        if count < 2 {
            return None;
        }
        let (window_j, rtt_j) = best;
        // s = rtt_j * rate = sum_i cwnd_i * rtt_j / rtt_i, with SUM_FRAC fractional bits. Each
        // term is at most sqrt(cwnd_i * cwnd_j) <= 2^48, so s < count * 2^64.
        let s = mul_shift_round(rate, rtt_j, RATE_FRAC - SUM_FRAC);
        // cwnd_total / alpha = s^2 / cwnd_j.
        let coupled = match s.checked_mul(s) {
            Some(square) => div_round(square, u128::from(window_j) << (2 * SUM_FRAC)),
            // s >= 2^64: only with windows near MAX_WINDOW; whole bytes are precise enough.
            None => {
                let s = s >> SUM_FRAC;
                s.saturating_mul(s) / u128::from(window_j)
            }
        };
        Some(Coupling {
            total,
            coupled_window: u64::try_from(coupled).unwrap_or(u64::MAX).max(1),
        })
    }

    /// `cwnd_total`: the sum of the paths' windows in bytes (each clamped as described in
    /// [`lia`](Self::lia)), saturating at `u64::MAX`.
    pub fn total_window(&self) -> u64 {
        self.total
    }

    /// `cwnd_total / alpha` in bytes: in congestion avoidance a coupled path grows by one
    /// maximum datagram size per `max(its window, this)` bytes acknowledged. It lies between
    /// the window of the path maximising `cwnd / rtt^2` and `n * cwnd_total` (`alpha >= 1/n`).
    pub fn coupled_window(&self) -> u64 {
        self.coupled_window
    }

    /// LIA's `alpha`, as a float for diagnostics (`total_window / coupled_window`); the
    /// controllers use the integers. `1/n` for `n` identical paths.
    pub fn alpha(&self) -> f64 {
        self.total as f64 / self.coupled_window as f64
    }
}

/// The bytes a path with window `window` must have acknowledged in congestion avoidance per
/// maximum datagram size of growth: `window` alone, or `max(window, cwnd_total / alpha)` when
/// coupled.
pub(super) fn growth_divisor(window: u64, coupling: Option<Coupling>) -> u64 {
    match coupling {
        Some(c) => window.max(c.coupled_window),
        None => window,
    }
}

/// `rtt` in whole microseconds, within `1..=MAX_RTT_MICROS`.
fn micros(rtt: Duration) -> u64 {
    u64::try_from(rtt.as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_RTT_MICROS)
}

/// `a / b` rounded to nearest (halves up), for `b > 0`, without overflow.
fn div_round(a: u128, b: u128) -> u128 {
    let (q, r) = (a / b, a % b);
    if r >= b - r { q + 1 } else { q }
}

/// `a * b / 2^shift` rounded to nearest, for `0 < shift < 128`, saturating.
fn mul_shift_round(a: u128, b: u64, shift: u32) -> u128 {
    let b = u128::from(b);
    let (hi, lo) = (a >> shift, a & ((1 << shift) - 1));
    // lo < 2^shift and b <= 2^39 (an RTT in microseconds): lo * b cannot overflow.
    let low = (lo * b + (1 << (shift - 1))) >> shift;
    hi.saturating_mul(b).saturating_add(low)
}
