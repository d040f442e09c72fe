//! NewReno congestion control (RFC 9002 §7, pseudocode in Appendix B).

use super::coupled::growth_divisor;
use super::{Coupling, MAX_WINDOW, Recovery, clamp_mss, initial_window, minimum_window};
use crate::Instant;
use crate::snapshot::{BlockReader, BlockWriter, SnapshotError};
use crate::transport::OptInstant;
use crate::transport::rtt::RttEstimator;

/// NewReno: slow start, then additive increase of one datagram per window acknowledged,
/// halving on loss (RFC 9002 §7.3). Plain data; use it through
/// [`CongestionController`](super::CongestionController), whose methods document the call
/// order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewReno {
    /// `max_datagram_size`.
    mss: u16,
    /// `congestion_window`, bytes.
    window: u64,
    /// `ssthresh`, bytes; `u64::MAX` is "infinite".
    ssthresh: u64,
    recovery: Recovery,
    /// Bytes acknowledged in congestion avoidance not yet turned into window growth.
    bytes_acked: u64,
}

/// `kLossReductionFactor` (RFC 9002 §7.3.2 / Appendix B.2), as numerator / denominator.
const LOSS_REDUCTION: (u64, u64) = (1, 2);

impl NewReno {
    /// A controller for datagrams of at most `max_datagram_size` bytes, at the initial window.
    pub fn new(max_datagram_size: u16) -> NewReno {
        let mss = clamp_mss(max_datagram_size);
        NewReno {
            mss,
            window: initial_window(mss),
            ssthresh: u64::MAX,
            recovery: Recovery::default(),
            bytes_acked: 0,
        }
    }

    /// See [`CongestionController::window`](super::CongestionController::window).
    pub fn window(&self) -> u64 {
        self.window
    }

    /// See [`CongestionController::ssthresh`](super::CongestionController::ssthresh).
    pub fn ssthresh(&self) -> u64 {
        self.ssthresh
    }

    /// See
    /// [`CongestionController::max_datagram_size`](super::CongestionController::max_datagram_size).
    pub fn max_datagram_size(&self) -> u16 {
        self.mss
    }

    /// See [`CongestionController::on_packet_sent`](super::CongestionController::on_packet_sent).
    pub fn on_packet_sent(&mut self, _now: Instant, _bytes: u64) {}

    /// See [`CongestionController::on_ack`](super::CongestionController::on_ack).
    pub fn on_ack(
        &mut self,
        now: Instant,
        sent_time: Instant,
        bytes: u64,
        rtt: &RttEstimator,
        app_limited: bool,
    ) {
        self.on_ack_coupled(now, sent_time, bytes, rtt, app_limited, None);
    }

    /// See
    /// [`CongestionController::on_ack_coupled`](super::CongestionController::on_ack_coupled).
    pub fn on_ack_coupled(
        &mut self,
        _now: Instant,
        sent_time: Instant,
        bytes: u64,
        _rtt: &RttEstimator,
        app_limited: bool,
        coupling: Option<Coupling>,
    ) {
        // Appendix B.5: "Do not increase congestion_window in recovery period"; §7.8: nor when
        // the window is not fully used.
        if self.recovery.contains(sent_time) || app_limited {
            return;
        }
        if self.window < self.ssthresh {
            // §7.3.1: slow start grows the window by the number of bytes acknowledged.
            self.window = self.window.saturating_add(bytes).min(MAX_WINDOW);
        } else {
            // §7.3.3: "increase the congestion window by one maximum datagram size for each
            // congestion window acknowledged". Counting acknowledged bytes (rather than adding
            // mss * bytes / window per ACK) avoids losing the fractions to rounding.
            // RFC 6356 §3, when coupled: one datagram per max(window, cwnd_total / alpha)
            // bytes, i.e. min(alpha * bytes * mss / cwnd_total, bytes * mss / window).
            let per_datagram = growth_divisor(self.window, coupling);
            self.bytes_acked = self.bytes_acked.saturating_add(bytes);
            if self.bytes_acked >= per_datagram {
                let windows = self.bytes_acked / per_datagram;
                self.bytes_acked %= per_datagram;
                let growth = windows.saturating_mul(u64::from(self.mss));
                self.window = self.window.saturating_add(growth).min(MAX_WINDOW);
            }
        }
    }

    /// See
    /// [`CongestionController::on_congestion_event`](super::CongestionController::on_congestion_event).
    pub fn on_congestion_event(&mut self, now: Instant, sent_time: Instant, persistent: bool) {
        // Appendix B.6 OnCongestionEvent.
        if !self.recovery.contains(sent_time) {
            self.recovery.start = now.into();
            self.ssthresh = self.window * LOSS_REDUCTION.0 / LOSS_REDUCTION.1;
            self.window = self.ssthresh.max(minimum_window(self.mss));
            self.bytes_acked = 0;
        }
        // Appendix B.8: persistent congestion collapses the window and ends recovery.
        if persistent {
            self.window = minimum_window(self.mss);
            self.recovery.start = OptInstant::NONE;
            self.bytes_acked = 0;
        }
    }

    /// See [`CongestionController::on_mtu_update`](super::CongestionController::on_mtu_update).
    pub fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mss = clamp_mss(new_mtu);
        self.window = self.window.max(minimum_window(self.mss));
    }

    /// See [`CongestionController::in_recovery`](super::CongestionController::in_recovery).
    pub fn in_recovery(&self, sent_time: Instant) -> bool {
        self.recovery.contains(sent_time)
    }

    /// See [`CongestionController::on_path_change`](super::CongestionController::on_path_change).
    pub fn on_path_change(&mut self) {
        *self = NewReno::new(self.mss);
    }
}

/// Snapshot encoding: `mss u16 | window u64 | ssthresh u64 | recovery start (instant) |
/// bytes_acked u64`.
impl NewReno {
    /// Writes the state.
    pub(crate) fn encode(&self, w: &mut BlockWriter) {
        w.u16(self.mss);
        w.u64(self.window);
        w.u64(self.ssthresh);
        w.opt_instant(self.recovery.start.get());
        w.u64(self.bytes_acked);
    }

    /// Reads what [`encode`](Self::encode) wrote; a window beyond [`MAX_WINDOW`] is refused.
    pub(crate) fn decode(r: &mut BlockReader<'_>) -> Result<NewReno, SnapshotError> {
        let cc = NewReno {
            mss: super::decode_mss(r)?,
            window: r.u64()?,
            ssthresh: r.u64()?,
            recovery: Recovery {
                start: r.opt_instant()?.into(),
            },
            bytes_acked: r.u64()?,
        };
        // Never below the minimum window: the window is a divisor in congestion avoidance.
        r.check(
            (minimum_window(cc.mss)..=MAX_WINDOW).contains(&cc.window),
            "congestion window",
        )?;
        Ok(cc)
    }
}
