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
