//! Transport building blocks: the pieces the stream and datagram transport is assembled from.
//!
//! Each module is a self-contained, sans-IO piece of plain data (every type is `Clone` and
//! `Debug`, holds no trait objects, reads no clock and draws no randomness), so connection
//! state built from them can be exported to bytes and imported on another host. Time comes in
//! as [`Instant`](crate::Instant) arguments that must never go backwards. Values that can come
//! from the peer (packet numbers, ACK ranges, offsets, lengths, delays) are checked, clamped
//! or rejected, never trusted to be in range, and every structure they can grow is bounded.
//!
//! | module | what | specification |
//! | --- | --- | --- |
//! | [`ranges`] | bounded sets of disjoint `u64` ranges (packet numbers, ACK ranges, stream offsets) | RFC 9000 §13.2.3, §19.3.1 |
//! | [`rtt`] | round-trip time estimation, probe timeout period | RFC 9002 §5, §6.2.1 |
//! | [`loss`] | sent-packet tracking, loss detection, PTO, persistent congestion | RFC 9002 §6, §7.6 |
//! | [`cc`] | congestion control: NewReno and CUBIC behind one plain-data enum | RFC 9002 §7, RFC 9438 |
//! | [`pacing`] | token-bucket pacing at 1.25 × window / RTT | RFC 9002 §7.7 |
//! | [`stream_buf`] | send and receive stream buffers: retransmission, reassembly, flow control, FIN | RFC 9000 §2.2, §4 |
//! | [`mtu`] | path MTU discovery (DPLPMTUD) with black-hole detection | RFC 8899 |
//!
//! How they fit together for one flow, per received ACK: [`loss::SentPackets::on_ack`]
//! updates the [`rtt::RttEstimator`] and returns acknowledged and lost packets; losses go to
//! [`cc::CongestionController::on_congestion_event`] (unless they are MTU probes or migration
//! casualties), then acknowledgements to [`cc::CongestionController::on_ack`]; their payloads
//! go to [`stream_buf::SendBuffer::on_acked`] / [`on_lost`](stream_buf::SendBuffer::on_lost)
//! and, for probes, to [`mtu::PathMtu`]. Sending is gated by the congestion window and the
//! [`pacing::Pacer`].

pub mod cc;
pub mod conn;
pub mod loss;
pub mod mtu;
pub mod pacing;
pub mod ranges;
pub mod rtt;
pub mod stream_buf;

/// An `Option<Instant>` in 8 bytes instead of 16 (per-connection state is kept small): the
/// last representable instant, 584 years after the origin, stands for `None`. Instant
/// arithmetic saturates at that instant, so a deadline that far away reads back as none: a
/// timer that never fires either way.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct OptInstant(crate::Instant);

impl OptInstant {
    /// No instant.
    pub(crate) const NONE: OptInstant = OptInstant(crate::Instant::from_nanos(u64::MAX));

    /// `t` as an optional instant.
    pub(crate) fn new(t: Option<crate::Instant>) -> OptInstant {
        t.map_or(OptInstant::NONE, OptInstant)
    }

    /// The instant, if any.
    pub(crate) fn get(self) -> Option<crate::Instant> {
        (self != OptInstant::NONE).then_some(self.0)
    }

    /// Whether there is none.
    pub(crate) fn is_none(self) -> bool {
        self == OptInstant::NONE
    }
}

impl Default for OptInstant {
    fn default() -> Self {
        OptInstant::NONE
    }
}

impl core::fmt::Debug for OptInstant {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.get().fmt(f)
    }
}

impl From<Option<crate::Instant>> for OptInstant {
    fn from(t: Option<crate::Instant>) -> OptInstant {
        OptInstant::new(t)
    }
}

impl From<crate::Instant> for OptInstant {
    fn from(t: crate::Instant) -> OptInstant {
        OptInstant::new(Some(t))
    }
}

/// An `Option<u64>` in 8 bytes instead of 16, for stream offsets and packet numbers (both
/// below 2^62): `u64::MAX` stands for `None`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct OptU64(u64);

impl OptU64 {
    /// No value.
    pub(crate) const NONE: OptU64 = OptU64(u64::MAX);

    /// `v` as an optional value (`u64::MAX` reads back as none).
    pub(crate) fn new(v: Option<u64>) -> OptU64 {
        v.map_or(OptU64::NONE, OptU64)
    }

    /// The value, if any.
    pub(crate) fn get(self) -> Option<u64> {
        (self != OptU64::NONE).then_some(self.0)
    }
}

impl Default for OptU64 {
    fn default() -> Self {
        OptU64::NONE
    }
}

impl core::fmt::Debug for OptU64 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.get().fmt(f)
    }
}

/// A [`Duration`](core::time::Duration) in 8 bytes instead of 16: whole nanoseconds up to
/// about 584 years; longer ones saturate and read back as `Duration::MAX`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Nanos(u64);

impl Nanos {
    /// `d`, saturated.
    pub(crate) fn of(d: core::time::Duration) -> Nanos {
        Nanos(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }

    /// The duration.
    pub(crate) fn get(self) -> core::time::Duration {
        if self.0 == u64::MAX {
            core::time::Duration::MAX
        } else {
            core::time::Duration::from_nanos(self.0)
        }
    }
}

impl core::fmt::Debug for Nanos {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.get().fmt(f)
    }
}
