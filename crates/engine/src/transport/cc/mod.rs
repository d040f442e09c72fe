//! Congestion control: how many bytes may be in flight.
//!
//! [`CongestionController`] is a plain-data enum over the implemented algorithms, selected by
//! [`CongestionAlgorithm`], so that the controller's state can be cloned, inspected and
//! exported with the rest of a connection (no trait objects):
//!
//! - [`NewReno`]: RFC 9002 §7 and Appendix B, the reference controller for QUIC-style
//!   transports.
//! - [`Cubic`]: RFC 9438, the default of most TCP stacks; better on paths with a large
//!   bandwidth-delay product.
//!
//! Both share the window rules of RFC 9002 §7.2 (initial window
//! `min(10 * mss, max(14720, 2 * mss))`, minimum window `2 * mss`) and the recovery period of
//! RFC 9002 §7.3.2, and count the window in bytes: the same bytes the caller counts in flight
//! ([`SentInfo::size`](super::loss::SentInfo::size)), and the same unit as the maximum
//! datagram size (the transport's payload per packet, [`PathMtu::current`](super::mtu::PathMtu::current)).
//!
//! # Call order
//!
//! The controller does not see packets; the caller (the loss detector's user) feeds it:
//!
//! 1. [`on_packet_sent`](CongestionController::on_packet_sent) for every in-flight packet
//!    sent, and never send while bytes in flight ≥ [`window`](CongestionController::window),
//!    except PTO probes (RFC 9002 §7.5: "probe packets MUST NOT be blocked by the congestion
//!    controller").
//! 2. For each processed ACK, *first* report losses, *then* acknowledgements (the order of
//!    RFC 9002 Appendix A.7 `OnAckReceived`, so that packets sent before a recovery period starts do not grow
//!    the window):
//!    - if any in-flight packet was declared lost, call
//!      [`on_congestion_event`](CongestionController::on_congestion_event) **once** with the
//!      send time of the most recently sent lost packet, and `persistent` set if the loss
//!      detector established persistent congestion (RFC 9002 §7.6);
//!    - call [`on_ack`](CongestionController::on_ack) for every newly acknowledged in-flight
//!      packet, with its send time and size.
//! 3. [`on_mtu_update`](CongestionController::on_mtu_update) when path MTU discovery changes
//!    the packet size, and [`on_path_change`](CongestionController::on_path_change) when the
//!    flow moves to a new path.
//!
//! # Multipath
//!
//! A connection sending over several paths at once keeps one controller per path and, to be
//! no more aggressive than one single-path flow on a shared bottleneck, couples their
//! increases with RFC 6356's Linked Increases Algorithm ([`Coupling`]): on each
//! acknowledgement for a path it builds a [`Coupling`] from every path carrying data
//! ([`Coupling::lia`]) and calls
//! [`on_ack_coupled`](CongestionController::on_ack_coupled) instead of `on_ack`. Everything
//! else (losses, MTU updates, path changes) stays per path.
//!
//! # What must not be reported as congestion
//!
//! - Loss of a path-MTU probe (RFC 9000 §14.4: it "is therefore not a reliable indication of
//!   congestion and SHOULD NOT trigger a congestion control reaction").
//! - Packets lost while a flow is frozen for migration (RSYN, DESIGN §4) or that were in
//!   flight on the old path: the design requires the transport to resume "retransmitting what
//!   was lost without treating it as congestion". The controller cannot tell such losses
//!   apart; the caller must simply not call `on_congestion_event` for them (and typically
//!   calls `on_path_change` instead).

mod coupled;
mod cubic;
mod new_reno;

pub use coupled::Coupling;
pub use cubic::Cubic;
pub use new_reno::NewReno;

use super::rtt::RttEstimator;
use crate::Instant;
use crate::snapshot::{BlockReader, BlockWriter, SnapshotError};
use crate::transport::OptInstant;

/// Largest congestion window either controller grows to: 2^48 bytes (256 TiB). Unreachable on
/// real paths; it keeps the window exactly representable as an `f64` and every sum in range.
pub const MAX_WINDOW: u64 = 1 << 48;

/// Smallest datagram size the controllers accept; smaller values given to them are raised to
/// it. A window counted in units smaller than this would be meaningless.
pub const MIN_DATAGRAM_SIZE: u16 = 64;

/// The initial window for a maximum datagram size of `mss` bytes (RFC 9002 §7.2):
/// `min(10 * mss, max(14720, 2 * mss))`.
pub const fn initial_window(mss: u16) -> u64 {
    let mss = mss as u64;
    let floor = if 14_720 > 2 * mss { 14_720 } else { 2 * mss };
    if 10 * mss < floor { 10 * mss } else { floor }
}

/// The minimum window for a maximum datagram size of `mss` bytes (RFC 9002 §7.2:
/// `kMinimumWindow = 2 * max_datagram_size`).
pub const fn minimum_window(mss: u16) -> u64 {
    2 * mss as u64
}

/// Which congestion controller a connection uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CongestionAlgorithm {
    /// NewReno (RFC 9002 §7).
    NewReno,
    /// CUBIC (RFC 9438), the default.
    #[default]
    Cubic,
}

/// A congestion controller: one of the [`CongestionAlgorithm`]s, as plain data.
///
/// See the [module documentation](self) for the call order and for what must not be reported
/// as congestion.
#[derive(Clone, Debug, PartialEq)]
pub enum CongestionController {
    /// NewReno state.
    NewReno(NewReno),
    /// CUBIC state.
    Cubic(Cubic),
}

macro_rules! dispatch {
    ($self:expr, $cc:ident => $e:expr) => {
        match $self {
            CongestionController::NewReno($cc) => $e,
            CongestionController::Cubic($cc) => $e,
        }
    };
}

impl CongestionController {
    /// A controller running `algorithm` for packets of at most `max_datagram_size` bytes,
    /// starting from the initial window.
    pub fn new(algorithm: CongestionAlgorithm, max_datagram_size: u16) -> CongestionController {
        match algorithm {
            CongestionAlgorithm::NewReno => {
                CongestionController::NewReno(NewReno::new(max_datagram_size))
            }
            CongestionAlgorithm::Cubic => {
                CongestionController::Cubic(Cubic::new(max_datagram_size))
            }
        }
    }

    /// Which algorithm this is.
    pub fn algorithm(&self) -> CongestionAlgorithm {
        match self {
            CongestionController::NewReno(_) => CongestionAlgorithm::NewReno,
            CongestionController::Cubic(_) => CongestionAlgorithm::Cubic,
        }
    }

    /// The congestion window: how many bytes may be in flight.
    pub fn window(&self) -> u64 {
        dispatch!(self, cc => cc.window())
    }

    /// The slow-start threshold in bytes (`u64::MAX` until the first congestion event).
    pub fn ssthresh(&self) -> u64 {
        dispatch!(self, cc => cc.ssthresh())
    }

    /// Whether the controller is in slow start (window below the slow-start threshold).
    pub fn in_slow_start(&self) -> bool {
        self.window() < self.ssthresh()
    }

    /// The maximum datagram size the windows are computed for.
    pub fn max_datagram_size(&self) -> u16 {
        dispatch!(self, cc => cc.max_datagram_size())
    }

    /// Records that an in-flight packet of `bytes` bytes was sent at `now`.
    ///
    /// NewReno ignores it; CUBIC uses it to keep idle periods out of its clock (RFC 9438
    /// §5.8, see [`Cubic::on_packet_sent`]).
    pub fn on_packet_sent(&mut self, now: Instant, bytes: u64) {
        dispatch!(self, cc => cc.on_packet_sent(now, bytes))
    }

    /// Processes the acknowledgement of one in-flight packet of `bytes` bytes sent at
    /// `sent_time`.
    ///
    /// `app_limited` must be true when the window was not fully used: bytes in flight were
    /// below the window and the sender had nothing more to send (RFC 9002 §7.8: the window
    /// "SHOULD NOT be increased in either slow start or congestion avoidance" then). Pacing
    /// delays do not make a sender application-limited. Acknowledgements of packets sent
    /// during a recovery period do not grow the window (RFC 9002 §7.3.2).
    pub fn on_ack(
        &mut self,
        now: Instant,
        sent_time: Instant,
        bytes: u64,
        rtt: &RttEstimator,
        app_limited: bool,
    ) {
        dispatch!(self, cc => cc.on_ack(now, sent_time, bytes, rtt, app_limited))
    }

    /// `on_ack` with the increase in congestion avoidance limited by LIA's (`coupling` None =
    /// exactly [`on_ack`](Self::on_ack)).
    ///
    /// `coupling` comes from [`Coupling::lia`] over every path carrying data, this one
    /// included. Everything but the increase in congestion avoidance is as in `on_ack`: slow
    /// start, recovery periods, application-limited ACKs, and the response to loss
    /// ([`on_congestion_event`](Self::on_congestion_event)) stay per path (RFC 6356 §3 couples
    /// only the increase).
    ///
    /// - NewReno: one maximum datagram size of growth per `max(cwnd_i, cwnd_total / alpha)`
    ///   bytes acknowledged, with the same byte counting as the uncoupled controller; this is
    ///   RFC 6356's `min(alpha * bytes * mss / cwnd_total, bytes * mss / cwnd_i)` without
    ///   losing fractions to rounding.
    /// - CUBIC: RFC 6356 defines LIA over Reno only. With CUBIC the coupling caps CUBIC's
    ///   increase by LIA's: each ACK grows the window by what CUBIC computes (RFC 9438 §4.2 to
    ///   §4.5), but by at most `bytes * mss / max(cwnd_i, cwnd_total / alpha)`. The
    ///   Reno-friendly estimate `W_est` (§4.3) follows the coupled Reno increase too, so it
    ///   does not run ahead of the window while coupled. A coupled CUBIC path is thus never
    ///   more aggressive than a coupled Reno path with the same window, and is gentler where
    ///   CUBIC's curve is flat (around `W_max`); the price is that, while coupled, CUBIC's
    ///   faster probing of large bandwidth-delay products is given up.
    pub fn on_ack_coupled(
        &mut self,
        now: Instant,
        sent_time: Instant,
        bytes: u64,
        rtt: &RttEstimator,
        app_limited: bool,
        coupling: Option<Coupling>,
    ) {
        dispatch!(self, cc => {
            cc.on_ack_coupled(now, sent_time, bytes, rtt, app_limited, coupling)
        })
    }

    /// Processes a congestion event: one or more in-flight packets declared lost, the most
    /// recently sent of which was sent at `sent_time`.
    ///
    /// If that packet was sent before the current recovery period started, the window is not
    /// reduced again (RFC 9002 §7.3.2: one reduction per round trip). Otherwise a recovery
    /// period starts at `now` and the window shrinks (×0.5 NewReno, ×0.7 CUBIC), never below
    /// the minimum window. If `persistent` is set (RFC 9002 §7.6.2) the window then collapses
    /// to the minimum window and the recovery period ends, as in RFC 9002 Appendix B.8.
    pub fn on_congestion_event(&mut self, now: Instant, sent_time: Instant, persistent: bool) {
        dispatch!(self, cc => cc.on_congestion_event(now, sent_time, persistent))
    }

    /// Adopts a new maximum datagram size (from path MTU discovery). The minimum window
    /// follows it, and the window is raised to the new minimum if it is below it.
    pub fn on_mtu_update(&mut self, new_mtu: u16) {
        dispatch!(self, cc => cc.on_mtu_update(new_mtu))
    }

    /// Whether a packet sent at `sent_time` was sent before the current recovery period began
    /// (RFC 9002 §7.3.2 and Appendix B.5 `InCongestionRecovery`).
    pub fn in_recovery(&self, sent_time: Instant) -> bool {
        dispatch!(self, cc => cc.in_recovery(sent_time))
    }

    /// Resets to the initial window and forgets all congestion history, keeping the algorithm
    /// and the datagram size. Call when the flow moves to a new path (RFC 9000 §9.4: "the
    /// endpoint MUST reset the congestion controller"), together with
    /// [`RttEstimator::reset`].
    pub fn on_path_change(&mut self) {
        dispatch!(self, cc => cc.on_path_change())
    }
}

/// Snapshot encoding (docs/snapshot.md, PATH block, "Congestion controller"): the algorithm
/// (`u8`: 1 NewReno, 2 CUBIC), then that algorithm's state.
impl CongestionController {
    /// Writes the algorithm and its state.
    pub(crate) fn encode(&self, w: &mut BlockWriter) {
        match self {
            CongestionController::NewReno(cc) => {
                w.u8(1);
                cc.encode(w);
            }
            CongestionController::Cubic(cc) => {
                w.u8(2);
                cc.encode(w);
            }
        }
    }

    /// Reads what [`encode`](Self::encode) wrote; an unknown algorithm is refused.
    pub(crate) fn decode(r: &mut BlockReader<'_>) -> Result<CongestionController, SnapshotError> {
        match r.u8()? {
            1 => Ok(CongestionController::NewReno(NewReno::decode(r)?)),
            2 => Ok(CongestionController::Cubic(Cubic::decode(r)?)),
            _ => Err(r.malformed("unknown congestion controller")),
        }
    }
}

/// Reads a maximum datagram size, refusing one below [`MIN_DATAGRAM_SIZE`].
fn decode_mss(r: &mut BlockReader<'_>) -> Result<u16, SnapshotError> {
    let mss = r.u16()?;
    r.check(
        mss >= MIN_DATAGRAM_SIZE,
        "congestion controller datagram size",
    )?;
    Ok(mss)
}

/// The recovery period shared by both controllers (RFC 9002 §7.3.2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Recovery {
    /// `congestion_recovery_start_time`; `None` when no recovery period applies.
    start: OptInstant,
}

impl Recovery {
    fn contains(&self, sent_time: Instant) -> bool {
        self.start.get().is_some_and(|start| sent_time <= start)
    }
}

fn clamp_mss(mss: u16) -> u16 {
    mss.max(MIN_DATAGRAM_SIZE)
}

#[cfg(test)]
mod tests;
