//! [`Transport`]: one connection's reliable byte stream (one stream each way) plus unreliable
//! datagrams, assembled from the building blocks of this module's siblings.
//!
//! The SAL runs one `Transport` per established flow. Whatever follows the SAL header of a
//! protocol-STREAM packet (a packet number, then [frames](crate::frame)) belongs to it:
//!
//! - [`handle_packet`](Transport::handle_packet) takes a received transport payload;
//! - [`poll_transmit`](Transport::poll_transmit) appends the next payload to send (after the
//!   SAL header the caller has already written);
//! - [`poll_timeout`](Transport::poll_timeout) / [`handle_timeout`](Transport::handle_timeout)
//!   drive the timers;
//! - [`poll_event`](Transport::poll_event) reports what the application should react to.
//!
//! Like quinn-proto it contains no networking code and reads no clock: every input carries
//! `now`, which **must never go backwards** between calls. The state is plain data
//! (`Clone + Debug + PartialEq`, no trait objects) so that a connection can be exported and
//! resumed on another host.
//!
//! # Driving a transport
//!
//! After any input (`handle_packet`, `handle_timeout`, `write`, `read`, `finish`,
//! `send_datagram`, `close`, `set_frozen(false)`, `on_path_change`):
//!
//! 1. call `poll_transmit` until it returns 0, sending each packet;
//! 2. drain `poll_event`;
//! 3. arm one timer for `poll_timeout`; when it fires call `handle_timeout`, then go to 1.
//!
//! # What goes into a packet
//!
//! In this order: an ACK if one is due (or can ride along), MAX_DATA if the receive window
//! must be advertised, STREAM frames (retransmissions first, then new data, at most
//! [`MAX_STREAM_FRAMES`] per packet), then DATAGRAMs. Packets carrying stream data or
//! datagrams are gated by the congestion window and the pacer; ACK, MAX_DATA, keepalive PING
//! and CLOSE packets are not (they are small and withholding them can stall the peer). PMTU
//! probes are separate packets: a PING padded to the probe size, sent only when the congestion
//! window has room for the whole probe without holding back data (see `poll_transmit`); the
//! receiver acknowledges any packet with a PING at once. After a probe timeout two
//! probe packets are sent regardless of the window (RFC 9002 §7.5): new data if there is
//! some, else the oldest unacknowledged data again, else a PING.
//!
//! # Sizes
//!
//! The path MTU is counted as a **UDP payload** (a whole SAL packet): it starts at
//! [`TransportConfig::base_udp_payload`] and DPLPMTUD searches up to
//! [`TransportConfig::max_udp_payload`]. A transport payload is at most the path MTU minus
//! [`TransportConfig::sal_overhead`]. The congestion window, bytes in flight and the byte
//! counters of [`TransportStats`] count whole SAL packets (transport payload + SAL overhead).
//!
//! # Memory
//!
//! A transport is kept small because a host holds one per connection, most of them idle. The
//! state is packed (compact timestamps, counters and configuration; rare state such as a
//! pending CLOSE, datagram queues and the range sets boxed), nothing is allocated until data
//! flows, and once nothing has been sent, received, written or read for [`IDLE_RELEASE`] a
//! timer gives back the memory of empty buffers and queues: the stream buffers, the
//! sent-packet ring (forgetting pure ACKs that are still tracked: their acknowledgement is
//! advisory), spare room in the range sets, the datagram queues. An idle transport then owns
//! about fifty bytes of heap (the received packet-number range).
//!
//! # Peer input
//!
//! Nothing a peer sends makes this code panic. A payload that does not parse is rejected
//! whole with [`TransportError::Malformed`] and changes nothing (the caller counts and drops
//! it). A payload that parses but breaks the protocol (data beyond the advertised window, a
//! changed final size, an ACK of a packet never sent) is a [fatal](TransportError::is_fatal)
//! error: the transport closes itself, sending a CLOSE with one of the transport error codes
//! ([`FLOW_CONTROL_ERROR`], [`FINAL_SIZE_ERROR`], [`PROTOCOL_VIOLATION`]). Every structure the
//! peer can grow is bounded.
//!
//! # Flow control
//!
//! Each end advertises how far into its receive stream the peer may send. A receive window
//! is never below [`MIN_RECEIVE_WINDOW`], and that is all either end assumes of the other's
//! at first: each announces its own [`TransportConfig::receive_window`] in a MAX_DATA frame
//! on the first packet it sends for any reason (it sends none only for that), again after
//! every import of a snapshot, and again if that packet is lost. The minimum is above the
//! initial congestion window, so the assumption costs nothing before the first
//! acknowledgement, which carries the announcement. A SAL that learns the peer's window
//! otherwise may pass it with [`set_peer_receive_window`](Transport::set_peer_receive_window).
//! Later raises travel in MAX_DATA frames, sent once the application has read half a
//! window.
//!
//! # Migration
//!
//! While the SAL migrates the flow (RSYN), [`set_frozen(true)`](Transport::set_frozen) stops
//! all sending; received packets are still processed, losses they reveal are retransmitted
//! without a congestion response, and the loss-detection timer is suspended (so the probe
//! timeout neither fires nor backs off). When the new path is in place,
//! [`on_path_change`](Transport::on_path_change) treats everything in flight as lost *without*
//! congestion response, resets the congestion controller, RTT estimator and pacer, and
//! restarts the path MTU search; then `set_frozen(false)` resumes sending.

use core::ops::Range;
use core::time::Duration;
use std::collections::VecDeque;

use super::OptInstant;
use super::cc::{CongestionAlgorithm, CongestionController};
use super::loss::{LossReport, SentInfo, SentPackets, Timeout};
use super::mtu::{MtuConfig, PathMtu};
use super::pacing::Pacer;
use super::ranges::RangeSet;
use super::rtt::{MAX_MAX_ACK_DELAY, RttEstimator};
use super::stream_buf::{MAX_STREAM_OFFSET, RecvBuffer, RecvError, SendBuffer};
use crate::Instant;
use crate::frame::{
    self, AckFrame, Frame, FrameError, Frames, PN_LEN, PathFrame, VARINT_MAX, varint_len,
};

/// Transport error codes sent in CLOSE frames are `TRANSPORT_ERROR_BASE | n`, with `n` the
/// matching QUIC transport error code (RFC 9000 §20.1). Applications should use codes below
/// this value for their own closes.
pub const TRANSPORT_ERROR_BASE: u64 = 1 << 32;

/// CLOSE code after the peer sent stream data beyond the advertised limit (QUIC's
/// FLOW_CONTROL_ERROR, 0x03).
pub const FLOW_CONTROL_ERROR: u64 = TRANSPORT_ERROR_BASE | 0x03;

/// CLOSE code after the peer sent data beyond its final size or changed it (QUIC's
/// FINAL_SIZE_ERROR, 0x06).
pub const FINAL_SIZE_ERROR: u64 = TRANSPORT_ERROR_BASE | 0x06;

/// CLOSE code after another protocol violation, such as an ACK of a packet never sent
/// (QUIC's PROTOCOL_VIOLATION, 0x0a).
pub const PROTOCOL_VIOLATION: u64 = TRANSPORT_ERROR_BASE | 0x0a;

/// Most STREAM frames in one packet (a retransmitted range or two, then new data). Bounds the
/// per-packet record kept for loss recovery.
pub const MAX_STREAM_FRAMES: usize = 4;

/// Most ACK ranges written in one ACK frame (the highest ones). Lower ranges the peer has
/// not learnt about are eventually declared lost by it and their data resent: harmless.
pub const MAX_ACK_FRAME_RANGES: usize = 32;

/// Most separate ranges of received packet numbers remembered for duplicate detection.
/// Beyond it the lowest range is forgotten and every packet number below what is still
/// remembered is treated as a duplicate (such a packet is long overdue: its sender declared
/// it lost and resent its data).
pub const MAX_RECEIVED_RANGES: usize = 128;

/// Probe packets sent when the probe timeout fires (RFC 9002 §6.2.4: "one or two").
pub const PTO_PROBE_PACKETS: u8 = 2;

/// Smallest transport payload the configuration may leave room for: base UDP payloads below
/// `sal_overhead + MIN_TRANSPORT_PAYLOAD` are raised to it.
pub const MIN_TRANSPORT_PAYLOAD: u16 = 128;

/// A PMTU probe may hold back application data (by its own size, until it is sent) only
/// when the congestion window is at least this many probes large.
const PROBE_WINDOW_FACTOR: u64 = 4;

/// The smallest receive window an end may have, and what each end assumes of the other's
/// until it is announced (see [Flow control](self#flow-control)). Above the initial
/// congestion window of a 1472-byte path (14 720 bytes). A smaller
/// [`TransportConfig::receive_window`] is raised to it.
pub const MIN_RECEIVE_WINDOW: u64 = 16 << 10;

/// Most path-validation frames kept for the SAL between two of its polls (one packet's worth:
/// a peer has no reason to send more than a challenge and a response at once).
pub const MAX_PATH_FRAMES: usize = 4;

/// How long a transport must be idle (nothing sent, received, written or read) before it gives
/// back the memory of its empty buffers and queues: the stream buffers, the sent-packet ring
/// (forgetting pure ACKs still tracked), spare room in its range sets, the event and datagram
/// queues. A timer in [`Transport::poll_timeout`] fires once per idle period for it. They
/// regrow on the next activity, so reallocation churn is bounded to one regrowth per idle
/// period of at least this length.
pub const IDLE_RELEASE: Duration = Duration::from_millis(250);

/// Worst-case bytes of an ACK frame before its second range: type and four varints.
const ACK_HEADER_MAX: usize = 1 + 4 * 8;

/// Worst-case bytes of each further ACK range: two varints.
const ACK_RANGE_MAX: usize = 2 * 8;

/// Tunables of a [`Transport`]. [`Default`] gives the values listed on each field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportConfig {
    /// Congestion controller. Default [`CongestionAlgorithm::Cubic`].
    pub congestion: CongestionAlgorithm,
    /// Bytes of application data accepted by [`Transport::write`] and not yet acknowledged
    /// (sent or not): beyond it `write` returns `Ok(0)` (backpressure). Default 4 MiB.
    pub send_buffer: usize,
    /// Flow-control window: how far beyond what the application has read the peer may send
    /// (announced to it in the first packet; see the [module docs](self#flow-control)). At
    /// least [`MIN_RECEIVE_WINDOW`]. Default 8 MiB.
    pub receive_window: u64,
    /// RTT assumed before the first sample. Default 333 ms (RFC 9002 §6.2.2).
    pub initial_rtt: Duration,
    /// Longest this end delays an acknowledgement, and the delay assumed for the peer's
    /// (RFC 9000 §18.2 `max_ack_delay`). Default 25 ms.
    pub max_ack_delay: Duration,
    /// Acknowledge at once after this many ack-eliciting packets since the last ACK
    /// (RFC 9000 §13.2.2 recommends 2). Out-of-order packets and packets carrying a PING
    /// (keepalives, probes) are acknowledged at once regardless. Default 2; 0 is treated as
    /// 1.
    pub ack_eliciting_threshold: u32,
    /// Size of a whole SAL packet (UDP payload) every path is assumed to carry; the path MTU
    /// starts here. Default 1200 (RFC 8899 `BASE_PLPMTU`, as QUIC).
    pub base_udp_payload: u16,
    /// Ceiling of the path MTU search (DPLPMTUD probes never exceed it), for IPv4: the
    /// endpoint gives connections over non-loopback IPv6 20 bytes less. Default 1472
    /// (1500-byte Ethernet); the runtime raises it to 65 000 on loopback. Values below
    /// `base_udp_payload` disable the search.
    pub max_udp_payload: u16,
    /// Bytes of SAL header in front of the transport payload of a data packet. Default 20.
    pub sal_overhead: u16,
    /// Send a PING when nothing was sent for this long, so that the peer's idle timer (and
    /// middleboxes) see traffic. Default `None` (no keepalive).
    pub keepalive: Option<Duration>,
    /// Close the connection (with [`TransportEvent::IdleTimeout`], sending nothing) when
    /// nothing was received for this long. Default 30 s.
    pub idle_timeout: Duration,
    /// Send a PING when the peer's stream data, which was arriving in bulk (a burst of at
    /// least [`ARM_BYTES`]), stops for a few round trips while more is expected, so that an
    /// end that only receives notices a dead path: unanswered, the probe is retried, and
    /// [`Transport::is_path_silent`] then says so (docs/protocol.md §4, "A receive-only end").
    /// Host policy, like `keepalive`. Default `false`; an endpoint with
    /// [`path_failover`](crate::endpoint::EndpointConfig::path_failover) turns it on.
    pub silence_probe: bool,
    /// Most datagrams queued each way: sent but not yet transmitted, and received but not
    /// yet read (more received are dropped). Default 256.
    pub datagram_queue: usize,
    /// How a connection with several paths spreads its data over them. Host policy, like
    /// `keepalive` (each end schedules what it sends). Default [`Scheduler::LowestRtt`].
    pub scheduler: Scheduler,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            congestion: CongestionAlgorithm::Cubic,
            send_buffer: 4 << 20,
            receive_window: 8 << 20,
            initial_rtt: super::rtt::INITIAL_RTT,
            max_ack_delay: super::rtt::DEFAULT_MAX_ACK_DELAY,
            ack_eliciting_threshold: 2,
            base_udp_payload: super::mtu::BASE_PLPMTU,
            max_udp_payload: 1472,
            sal_overhead: 20,
            keepalive: None,
            idle_timeout: Duration::from_secs(30),
            silence_probe: false,
            datagram_queue: 256,
            scheduler: Scheduler::LowestRtt,
        }
    }
}

impl TransportConfig {
    /// The configuration with out-of-range values brought into range.
    fn normalized(&self) -> TransportConfig {
        let mut c = self.clone();
        let floor = c.sal_overhead.saturating_add(MIN_TRANSPORT_PAYLOAD);
        c.base_udp_payload = c.base_udp_payload.max(floor);
        c.max_udp_payload = c.max_udp_payload.max(c.base_udp_payload);
        c.ack_eliciting_threshold = c.ack_eliciting_threshold.max(1);
        c.receive_window = c
            .receive_window
            .clamp(MIN_RECEIVE_WINDOW, MAX_STREAM_OFFSET);
        c.max_ack_delay = c.max_ack_delay.min(MAX_MAX_ACK_DELAY);
        // Durations are kept in 64-bit nanoseconds (584 years): longer ones saturate, and
        // a keepalive that long is none.
        c.idle_timeout = Duration::from_nanos(nanos(c.idle_timeout));
        c.keepalive = c.keepalive.filter(|&k| nanos(k) < u64::MAX);
        c.datagram_queue = c.datagram_queue.min(u32::MAX as usize);
        c
    }
}

/// `d` in nanoseconds, saturating.
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// What a running transport needs of its [`TransportConfig`] beyond what the parts it
/// configured keep (see [`Transport::config`]), compactly.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Settings {
    /// [`TransportConfig::idle_timeout`], nanoseconds.
    idle_timeout: u64,
    /// [`TransportConfig::keepalive`], nanoseconds; `u64::MAX` for none.
    keepalive: u64,
    /// [`TransportConfig::max_ack_delay`], nanoseconds.
    max_ack_delay: u64,
    /// [`TransportConfig::datagram_queue`].
    datagram_queue: u32,
    /// [`TransportConfig::ack_eliciting_threshold`].
    ack_eliciting_threshold: u32,
    /// [`TransportConfig::sal_overhead`].
    sal_overhead: u16,
    /// [`TransportConfig::silence_probe`].
    silence_probe: bool,
    /// [`TransportConfig::scheduler`] (or as [`Transport::set_scheduler`] changed it).
    scheduler: Scheduler,
}

impl Settings {
    /// Of a normalized configuration.
    fn new(c: &TransportConfig) -> Settings {
        Settings {
            idle_timeout: nanos(c.idle_timeout),
            keepalive: c.keepalive.map_or(u64::MAX, nanos),
            max_ack_delay: nanos(c.max_ack_delay),
            datagram_queue: u32::try_from(c.datagram_queue).unwrap_or(u32::MAX),
            ack_eliciting_threshold: c.ack_eliciting_threshold,
            sal_overhead: c.sal_overhead,
            silence_probe: c.silence_probe,
            scheduler: c.scheduler,
        }
    }

    fn idle_timeout(&self) -> Duration {
        Duration::from_nanos(self.idle_timeout)
    }

    fn keepalive(&self) -> Option<Duration> {
        (self.keepalive != u64::MAX).then(|| Duration::from_nanos(self.keepalive))
    }

    fn max_ack_delay(&self) -> Duration {
        Duration::from_nanos(self.max_ack_delay)
    }

    fn datagram_queue(&self) -> usize {
        self.datagram_queue as usize
    }
}

/// Why [`Transport::handle_packet`] rejected a payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The payload does not parse (or is shorter than a packet number). It was dropped and
    /// changed nothing; not fatal.
    #[error("malformed transport payload: {0}")]
    Malformed(#[from] FrameError),
    /// A packet number at or beyond 2^62. Dropped, changed nothing; not fatal.
    #[error("packet number out of range")]
    InvalidPacketNumber,
    /// Stream data beyond the advertised flow-control limit. Fatal: the transport closed
    /// with [`FLOW_CONTROL_ERROR`].
    #[error("peer exceeded the flow-control limit")]
    FlowControl,
    /// Stream data beyond the final size, or a changed final size. Fatal: the transport
    /// closed with [`FINAL_SIZE_ERROR`].
    #[error("peer violated the stream's final size")]
    FinalSize,
    /// An ACK of a packet number never sent (RFC 9000 §13.1). Fatal: the transport closed
    /// with [`PROTOCOL_VIOLATION`].
    #[error("peer acknowledged a packet never sent")]
    AckOfUnsentPacket,
}

impl TransportError {
    /// Whether the error closed the transport (a protocol violation by the peer), as opposed
    /// to a dropped malformed payload.
    pub fn is_fatal(&self) -> bool {
        self.close_code().is_some()
    }

    /// The CLOSE code sent for a fatal error.
    pub fn close_code(&self) -> Option<u64> {
        match self {
            TransportError::Malformed(_) | TransportError::InvalidPacketNumber => None,
            TransportError::FlowControl => Some(FLOW_CONTROL_ERROR),
            TransportError::FinalSize => Some(FINAL_SIZE_ERROR),
            TransportError::AckOfUnsentPacket => Some(PROTOCOL_VIOLATION),
        }
    }
}

/// Why [`Transport::write`] or [`Transport::finish`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// [`Transport::finish`] was called: nothing more may be written.
    #[error("stream finished")]
    Finished,
    /// The connection is closed (by either end, on error or idle timeout).
    #[error("connection closed")]
    Closed,
}

/// Why [`Transport::read`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The connection was closed locally or timed out before the peer finished its stream.
    #[error("connection closed")]
    Closed,
    /// The peer closed the connection with `code` before finishing its stream.
    #[error("connection reset by peer (code {code})")]
    Reset {
        /// The code of the peer's CLOSE.
        code: u64,
    },
}

/// Why [`Transport::send_datagram`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    /// The datagram does not fit in one packet on the current path; `max` is the largest
    /// that does ([`Transport::max_datagram_size`]).
    #[error("datagram too large (at most {max} bytes on this path)")]
    TooLarge {
        /// Largest datagram that currently fits.
        max: usize,
    },
    /// [`TransportConfig::datagram_queue`] datagrams are already waiting.
    #[error("datagram queue full")]
    QueueFull,
    /// The connection is closed.
    #[error("connection closed")]
    Closed,
}

/// Something the application may want to react to; see [`Transport::poll_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransportEvent {
    /// Stream bytes are ready to [`read`](Transport::read). Edge-triggered: raised again
    /// only after a read found nothing more to return (`read` returned `Ok(None)` or
    /// emptied what was ready).
    Readable,
    /// [`write`](Transport::write) returned `Ok(0)` earlier and the send buffer has room
    /// again.
    Writable,
    /// The peer's FIN arrived and every byte before it has been received (it may not all
    /// have been read yet). Raised once.
    Finished,
    /// Our stream is finished and every byte of it and the FIN were acknowledged. Raised
    /// once.
    AllAcked,
    /// Datagrams are ready to [`recv_datagram`](Transport::recv_datagram). Edge-triggered:
    /// raised again only after `recv_datagram` emptied the queue.
    DatagramReceived,
    /// The connection closed, by the peer's CLOSE (`by_peer`) or by ours (an explicit
    /// [`close`](Transport::close) or a protocol violation by the peer).
    Closed {
        /// Whether the peer closed it.
        by_peer: bool,
        /// The CLOSE code (0 is a normal close; see [`TRANSPORT_ERROR_BASE`]).
        code: u64,
        /// The CLOSE reason.
        reason: String,
    },
    /// Nothing was received for [`TransportConfig::idle_timeout`]; the connection is
    /// closed and sends nothing more.
    IdleTimeout,
}

/// Counters and current values of a [`Transport`]; see [`Transport::stats`]. Byte counts of
/// packets include the SAL overhead (they count whole SAL packets).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Packets sent.
    pub packets_sent: u64,
    /// Bytes of packets sent.
    pub bytes_sent: u64,
    /// Packets received and accepted (duplicates included, malformed ones excluded).
    pub packets_received: u64,
    /// Bytes of packets received and accepted.
    pub bytes_received: u64,
    /// In-flight packets declared lost (PMTU probes and migration casualties excluded).
    pub packets_lost: u64,
    /// Bytes of those packets.
    pub bytes_lost: u64,
    /// Stream bytes sent, first transmissions and retransmissions.
    pub stream_bytes_sent: u64,
    /// Stream bytes sent that had been sent before.
    pub retransmitted_bytes: u64,
    /// Distinct stream bytes received.
    pub stream_bytes_received: u64,
    /// Packets received whose number had already been received.
    pub duplicate_packets: u64,
    /// Stream bytes received again (the peer's spurious retransmissions and network
    /// duplicates of packets the duplicate filter no longer remembers).
    pub duplicate_stream_bytes: u64,
    /// Packets declared lost and acknowledged afterwards (spurious loss detections).
    pub spurious_losses: u64,
    /// Congestion events: recovery periods entered (RFC 9002 §7.3.2), each one window
    /// reduction however many packets were lost in it.
    pub congestion_events: u64,
    /// Of those, the ones that established persistent congestion.
    pub persistent_congestion: u64,
    /// Probe timeouts.
    pub probe_timeouts: u64,
    /// Silence probes sent: PINGs after the peer's data stopped arriving
    /// ([`TransportConfig::silence_probe`]). Not part of a snapshot.
    pub silence_probes: u64,
    /// PMTU probes sent.
    pub mtu_probes_sent: u64,
    /// PMTU probes lost.
    pub mtu_probes_lost: u64,
    /// PMTU black holes detected (fallbacks to the base size).
    pub black_holes: u64,
    /// Datagrams transmitted.
    pub datagrams_sent: u64,
    /// Datagrams received (queued for the application).
    pub datagrams_received: u64,
    /// Datagrams dropped: received with the queue full, or queued for sending and no
    /// longer fitting the path.
    pub datagrams_dropped: u64,
    /// Payloads rejected as malformed.
    pub malformed_packets: u64,
    /// Protocol violations by the peer (each closed the transport).
    pub protocol_violations: u64,
    /// Packets received whose stream data could not be buffered without fragmenting the
    /// receive buffer beyond its bound; they were not acknowledged.
    pub fragmented_drops: u64,
    /// Paths found failing (their probe timer fired while another path worked; multipath).
    pub path_failures: u64,
    /// Failing paths that answered again.
    pub path_recoveries: u64,
    /// Copies of data packets sent on other paths ([`Scheduler::Redundant`]) while the
    /// connection had several paths; counted in `packets_sent` too.
    pub redundant_packets: u64,
    /// The congestion window of the primary path, bytes. Per-path values:
    /// [`Transport::paths`].
    pub cwnd: u64,
    /// Bytes in flight.
    pub bytes_in_flight: u64,
    /// Smoothed RTT.
    pub srtt: Duration,
    /// Minimum RTT.
    pub min_rtt: Duration,
    /// The current path MTU (UDP payload bytes).
    pub pmtu: u16,
}

/// The counters of [`TransportStats`] (its other fields are read from the live state). Those
/// of rare events (at most one per round trip or probe) are 32-bit and saturate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counters {
    packets_sent: u64,
    bytes_sent: u64,
    packets_received: u64,
    bytes_received: u64,
    packets_lost: u64,
    bytes_lost: u64,
    stream_bytes_sent: u64,
    retransmitted_bytes: u64,
    stream_bytes_received: u64,
    duplicate_packets: u64,
    duplicate_stream_bytes: u64,
    spurious_losses: u64,
    datagrams_sent: u64,
    datagrams_received: u64,
    datagrams_dropped: u64,
    malformed_packets: u64,
    fragmented_drops: u64,
    congestion_events: u32,
    persistent_congestion: u32,
    probe_timeouts: u32,
    /// Not part of a snapshot (`TransportStats::silence_probes`).
    silence_probes: u32,
    mtu_probes_sent: u32,
    mtu_probes_lost: u32,
    black_holes: u32,
    protocol_violations: u32,
    /// Not part of a snapshot (only a one-path transport is exported).
    path_failures: u32,
    path_recoveries: u32,
}

/// A stream range carried by a sent packet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Chunk {
    start: u64,
    end: u64,
    fin: bool,
}

/// What a sent packet carried that matters if it is acknowledged or lost. One is kept per
/// packet in flight, so it is packed: 56 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SentPayload {
    /// Start offsets of the stream chunks carried.
    starts: [u64; MAX_STREAM_FRAMES],
    /// Their lengths (a chunk fits in a packet, whose size is a `u16`).
    lens: [u16; MAX_STREAM_FRAMES],
    /// Bit `i`: chunk `i` carries the FIN.
    fins: u8,
    n_chunks: u8,
    /// A MAX_DATA frame (resent, with the current limit, if lost).
    max_data: bool,
    /// Whether it carried an ACK frame, whose largest packet number is `ack_largest`
    /// (RFC 9000 §13.2.4: once this packet is acknowledged, lower ranges need not be
    /// acknowledged again).
    has_ack: bool,
    ack_largest: u64,
}

impl SentPayload {
    fn chunks(&self) -> impl Iterator<Item = Chunk> + '_ {
        (0..usize::from(self.n_chunks)).map(|i| Chunk {
            start: self.starts[i],
            end: self.starts[i] + u64::from(self.lens[i]),
            fin: self.fins & (1 << i) != 0,
        })
    }

    /// Records a chunk (at most [`MAX_STREAM_FRAMES`]; `range` is at most a packet long).
    fn push_chunk(&mut self, range: Range<u64>, fin: bool) {
        let i = usize::from(self.n_chunks);
        self.starts[i] = range.start;
        self.lens[i] = u16::try_from(range.end - range.start).unwrap_or(u16::MAX);
        self.fins |= u8::from(fin) << i;
        self.n_chunks += 1;
    }

    fn set_ack(&mut self, largest: Option<u64>) {
        self.has_ack = largest.is_some();
        self.ack_largest = largest.unwrap_or(0);
    }

    fn ack_largest(&self) -> Option<u64> {
        self.has_ack.then_some(self.ack_largest)
    }
}

/// How the connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// We closed it with this code (the CLOSE has been sent or abandoned).
    Local,
    /// The peer's CLOSE, with its code.
    Peer(u64),
    /// Nothing received for the idle timeout.
    Idle,
}

/// A local close whose CLOSE frame is still to be sent (it is abandoned at `deadline` if the
/// transport stays frozen).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Closing {
    code: u64,
    reason: String,
    deadline: Instant,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Open,
    /// Closed locally; the CLOSE frame is still to be sent.
    Closing(Box<Closing>),
    Closed(Ended),
}

/// Acknowledgement state of the receive side.
#[derive(Clone, Debug, PartialEq, Eq)]
struct AckState {
    /// Received packet numbers (at most [`MAX_RECEIVED_RANGES`] ranges).
    received: RangeSet,
    /// Packet numbers below this are treated as duplicates (their ranges were forgotten).
    dedup_floor: u64,
    /// Ranges entirely below this need not be acknowledged again (§13.2.4).
    ack_floor: u64,
    /// When the largest received packet arrived (for the ACK delay).
    largest_at: Instant,
    /// Something ack-eliciting arrived since the last ACK was sent.
    pending: bool,
    /// Ack-eliciting packets since the last ACK was sent.
    eliciting_since: u32,
    /// Send the ACK without waiting.
    immediate: bool,
    /// When the delayed ACK is due.
    deadline: OptInstant,
    /// Reused for building ACK frames' ranges.
    ranges: Vec<(u64, u64)>,
}

/// One connection's stream and datagram transport. Plain data; see the
/// [module documentation](self) for the call order and behaviour.
#[derive(Clone, Debug, PartialEq)]
pub struct Transport {
    config: Settings,
    state: State,
    frozen: bool,

    /// The state of the path being worked on: packet numbers and what they carried,
    /// acknowledgements, RTT, congestion control, pacing, MTU search, probe timer. With one
    /// path (the common case) it is the only one; with several ([`multipath`]) the others wait
    /// in `others` and the one a packet, timer or transmission concerns is swapped in first.
    path: path::Path,
    /// The connection's other paths (multipath), in no particular order.
    others: path::OtherPaths,

    // Sending.
    send: SendBuffer,
    /// MAX_DATA must be (re)sent.
    max_data_pending: bool,
    /// MAX_DATA goes on the next packet sent for another reason: the announcement of this
    /// end's window (not kept in snapshots: an imported transport announces it again).
    window_unannounced: bool,
    /// Highest stream offset ever sent (to count retransmitted bytes).
    sent_high: u64,
    /// Datagram queues, allocated on first use and freed when idle and empty.
    dgrams: Option<Box<Datagrams>>,

    // Receiving.
    recv: RecvBuffer,
    /// The silence probe of an end that receives ([`liveness`]).
    liveness: liveness::Liveness,

    // Events.
    events: EventQueue,
    readable_armed: bool,
    dgram_armed: bool,
    write_blocked: bool,
    finished_reported: bool,
    all_acked_reported: bool,
    /// The memory of empty buffers and queues was given back since the last activity (see
    /// [`IDLE_RELEASE`]).
    memory_released: bool,
    /// PATH_CHALLENGE and PATH_RESPONSE frames received, waiting for the SAL (at most
    /// [`MAX_PATH_FRAMES`]; not part of a snapshot: the SAL takes them after every packet).
    path_frames: Vec<PathFrame>,

    stats: Counters,
}

/// The kinds of [`TransportEvent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventKind {
    Readable,
    Writable,
    Finished,
    AllAcked,
    DatagramReceived,
    Closed,
    IdleTimeout,
}

/// The contents of a [`TransportEvent::Closed`].
#[derive(Clone, Debug, PartialEq, Eq)]
struct ClosedEvent {
    by_peer: bool,
    code: u64,
    reason: String,
}

/// Events not yet polled, in order, coalesced: an event equal to one still queued is not
/// queued again. Every kind but `Closed` carries nothing, and a transport closes once, so the
/// queue never holds more than one event of each kind: it fits in a fixed array, plus the
/// `Closed` event's contents (boxed: rare, and it carries a string).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct EventQueue {
    kinds: [Option<EventKind>; 7],
    closed: Option<Box<ClosedEvent>>,
}

impl EventQueue {
    fn push(&mut self, event: TransportEvent) {
        let kind = match event {
            TransportEvent::Readable => EventKind::Readable,
            TransportEvent::Writable => EventKind::Writable,
            TransportEvent::Finished => EventKind::Finished,
            TransportEvent::AllAcked => EventKind::AllAcked,
            TransportEvent::DatagramReceived => EventKind::DatagramReceived,
            TransportEvent::IdleTimeout => EventKind::IdleTimeout,
            TransportEvent::Closed {
                by_peer,
                code,
                reason,
            } => {
                if self.closed.is_some() {
                    // Cannot happen (a transport closes once); keep the first.
                    return;
                }
                self.closed = Some(Box::new(ClosedEvent {
                    by_peer,
                    code,
                    reason,
                }));
                EventKind::Closed
            }
        };
        if self.kinds.contains(&Some(kind)) {
            return;
        }
        if let Some(free) = self.kinds.iter_mut().find(|k| k.is_none()) {
            *free = Some(kind);
        }
    }

    fn pop(&mut self) -> Option<TransportEvent> {
        let kind = self.kinds[0].take()?;
        self.kinds.rotate_left(1);
        Some(match kind {
            EventKind::Readable => TransportEvent::Readable,
            EventKind::Writable => TransportEvent::Writable,
            EventKind::Finished => TransportEvent::Finished,
            EventKind::AllAcked => TransportEvent::AllAcked,
            EventKind::DatagramReceived => TransportEvent::DatagramReceived,
            EventKind::IdleTimeout => TransportEvent::IdleTimeout,
            EventKind::Closed => {
                let c = self.closed.take().map_or_else(
                    || ClosedEvent {
                        by_peer: false,
                        code: 0,
                        reason: String::new(),
                    },
                    |b| *b,
                );
                TransportEvent::Closed {
                    by_peer: c.by_peer,
                    code: c.code,
                    reason: c.reason,
                }
            }
        })
    }
}

/// Unreliable datagrams waiting each way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Datagrams {
    /// Queued by the application, not yet transmitted.
    out: VecDeque<Vec<u8>>,
    /// Received, not yet taken by the application.
    inbound: VecDeque<Vec<u8>>,
}

/// What [`Transport::emit`] may put in a packet.
#[derive(Clone, Copy, Debug, Default)]
struct Emit {
    /// Largest transport payload.
    max_payload: usize,
    stream: bool,
    datagrams: bool,
    /// Add a PING if nothing else ack-eliciting was written.
    force_eliciting: bool,
    /// Pad to exactly this payload size and mark as a PMTU probe of `mtu_probe` bytes.
    mtu_probe: Option<u16>,
    /// Copy what is still unacknowledged of this packet's stream chunks
    /// ([`Scheduler::Redundant`]).
    copy: Option<SentPayload>,
}

impl Transport {
    /// A transport for a flow whose handshake completed at `now`: nothing sent or received,
    /// packet numbers from 0, the path MTU at the base size with a search pending.
    pub fn new(config: &TransportConfig, now: Instant) -> Transport {
        let config = config.normalized();
        let mut send = SendBuffer::new(config.send_buffer);
        send.set_initial_flow_limit(MIN_RECEIVE_WINDOW);
        Transport {
            state: State::Open,
            frozen: false,
            path: path::Path::new(&config, now),
            others: path::OtherPaths::default(),
            send,
            max_data_pending: false,
            window_unannounced: true,
            sent_high: 0,
            dgrams: None,
            recv: RecvBuffer::new(config.receive_window),
            liveness: liveness::Liveness::default(),
            events: EventQueue::default(),
            readable_armed: true,
            dgram_armed: true,
            write_blocked: false,
            finished_reported: false,
            all_acked_reported: false,
            memory_released: true,
            path_frames: Vec::new(),
            stats: Counters::default(),
            config: Settings::new(&config),
        }
    }

    /// The configuration in force (after out-of-range values were adjusted).
    pub fn config(&self) -> TransportConfig {
        let mtu = self.path.mtu.config();
        TransportConfig {
            congestion: self.path.cc.algorithm(),
            send_buffer: self.send.capacity(),
            receive_window: self.recv.window(),
            initial_rtt: self.path.rtt.initial(),
            max_ack_delay: self.config.max_ack_delay(),
            ack_eliciting_threshold: self.config.ack_eliciting_threshold,
            base_udp_payload: mtu.base,
            max_udp_payload: mtu.max,
            sal_overhead: self.config.sal_overhead,
            keepalive: self.config.keepalive(),
            idle_timeout: self.config.idle_timeout(),
            silence_probe: self.config.silence_probe,
            datagram_queue: self.config.datagram_queue(),
            scheduler: self.config.scheduler,
        }
    }

    /// Sets the peer's initial flow-control limit exactly (for example from the SAL
    /// handshake) instead of assuming it equals our own receive window. Call before sending
    /// anything.
    pub fn set_peer_receive_window(&mut self, window: u64) {
        self.send.set_initial_flow_limit(window);
    }

    // ------------------------------------------------------------------------------------
    // Receiving.

    /// Processes a received transport payload: the packet number and frames, everything
    /// after the SAL header of a protocol-STREAM packet.
    ///
    /// Ignored (`Ok`) once the transport is closing or closed. A duplicate packet number is
    /// acknowledged but its frames are not processed again. See [`TransportError`] for
    /// which errors are fatal.
    pub fn handle_packet(&mut self, now: Instant, payload: &[u8]) -> Result<(), TransportError> {
        self.handle_packet_on(now, 0, payload)
    }

    /// [`handle_packet`](Self::handle_packet) for a packet that arrived on path `path` (its
    /// packet number and any ACK frame are of that path's space). A packet of a path the
    /// transport does not have is dropped, changing nothing.
    pub fn handle_packet_on(
        &mut self,
        now: Instant,
        path: u32,
        payload: &[u8],
    ) -> Result<(), TransportError> {
        if !self.focus(path) {
            self.stats.malformed_packets += 1;
            return Ok(());
        }
        if self.state != State::Open {
            return Ok(());
        }
        let Some((pn_bytes, body)) = payload.split_first_chunk::<PN_LEN>() else {
            self.stats.malformed_packets += 1;
            return Err(FrameError::Truncated.into());
        };
        let pn = u64::from_be_bytes(*pn_bytes);
        if pn > VARINT_MAX {
            self.stats.malformed_packets += 1;
            return Err(TransportError::InvalidPacketNumber);
        }
        // Validate the whole payload before acting on any of it.
        let mut eliciting = false;
        // A PING (keepalive, PTO or PMTU probe) asks for an acknowledgement at once, so that
        // a probe never waits for the delayed-ACK timer.
        let mut ping = false;
        for frame in Frames::new(body) {
            match frame {
                Err(e) => {
                    self.stats.malformed_packets += 1;
                    return Err(e.into());
                }
                // Path-validation frames are answered by the SAL, not acknowledged for
                // themselves: they never elicit an ACK (nor are they tracked in flight).
                Ok(
                    Frame::Ack(_)
                    | Frame::Padding(_)
                    | Frame::PathChallenge(_)
                    | Frame::PathResponse(_),
                ) => {}
                Ok(Frame::Ping) => {
                    eliciting = true;
                    ping = true;
                }
                Ok(_) => eliciting = true,
            }
        }
        self.stats.packets_received += 1;
        self.stats.bytes_received += (payload.len() + usize::from(self.config.sal_overhead)) as u64;
        self.liveness_on_received(now);
        self.path.last_received = now;
        self.memory_released = false;

        if pn < self.path.ack.dedup_floor || self.path.ack.received.contains(pn) {
            self.stats.duplicate_packets += 1;
            if eliciting {
                self.on_eliciting_received(now, ping);
            }
            return Ok(());
        }

        let mut fragmented = false;
        for frame in Frames::new(body).flatten() {
            match frame {
                Frame::Padding(_) | Frame::Ping => {}
                Frame::Ack(ack) => self.on_ack_frame(now, &ack)?,
                Frame::Stream { offset, data, fin } => match self.recv.write(offset, data, fin) {
                    Ok(new) => {
                        if new > 0 {
                            self.liveness_on_stream_data(new);
                        }
                        self.stats.stream_bytes_received += new as u64;
                        self.stats.duplicate_stream_bytes += (data.len() - new) as u64;
                    }
                    Err(RecvError::TooFragmented) => fragmented = true,
                    Err(RecvError::FlowControl) => {
                        return Err(self.violation(now, TransportError::FlowControl));
                    }
                    Err(RecvError::FinalSize) => {
                        return Err(self.violation(now, TransportError::FinalSize));
                    }
                },
                Frame::MaxData(max) => self.send.set_flow_limit(max),
                Frame::PathChallenge(d) => self.push_path_frame(PathFrame::Challenge(d)),
                Frame::PathResponse(d) => self.push_path_frame(PathFrame::Response(d)),
                Frame::MoveRequest(to) => self.push_path_frame(PathFrame::MoveRequest(to)),
                Frame::MoveRefused(to, why) => {
                    self.push_path_frame(PathFrame::MoveRefused(to, why));
                }
                Frame::Datagram(data) => {
                    let queue = &mut self.dgrams.get_or_insert_default().inbound;
                    if queue.len() < self.config.datagram_queue() {
                        queue.push_back(data.to_vec());
                        self.stats.datagrams_received += 1;
                        if self.dgram_armed {
                            self.dgram_armed = false;
                            self.push_event(TransportEvent::DatagramReceived);
                        }
                    } else {
                        self.stats.datagrams_dropped += 1;
                    }
                }
                Frame::Close { code, reason } => {
                    self.state = State::Closed(Ended::Peer(code));
                    self.push_event(TransportEvent::Closed {
                        by_peer: true,
                        code,
                        reason: reason.to_owned(),
                    });
                    self.update_stream_events();
                    return Ok(());
                }
            }
        }
        self.update_stream_events();
        if fragmented {
            // The stream data was dropped: leave the packet unacknowledged so that the peer
            // resends it.
            self.stats.fragmented_drops += 1;
            return Ok(());
        }

        let in_order = match self.path.ack.received.max() {
            None => pn == 0,
            Some(max) => pn == max + 1,
        };
        if self.path.ack.received.max().is_none_or(|max| pn > max) {
            self.path.ack.largest_at = now;
        }
        self.path.ack.received.insert(pn..pn + 1);
        while self.path.ack.received.len() > MAX_RECEIVED_RANGES {
            if let Some(r) = self.path.ack.received.pop_min() {
                self.path.ack.dedup_floor = self.path.ack.dedup_floor.max(r.end);
            }
        }
        if eliciting {
            self.on_eliciting_received(now, !in_order || ping);
        }
        Ok(())
    }

    /// Keeps a received path-validation frame for the SAL
    /// ([`poll_path_frame`](Self::poll_path_frame)); beyond [`MAX_PATH_FRAMES`] waiting, more
    /// are dropped (the peer's validation retries).
    fn push_path_frame(&mut self, f: PathFrame) {
        if self.path_frames.len() < MAX_PATH_FRAMES {
            self.path_frames.push(f);
        }
    }

    /// The next path-validation frame received (PATH_CHALLENGE or PATH_RESPONSE), for the
    /// SAL to act on; call after [`handle_packet`](Self::handle_packet).
    pub fn poll_path_frame(&mut self) -> Option<PathFrame> {
        let f = self.path_frames.pop();
        if self.path_frames.is_empty() && self.path_frames.capacity() > 0 {
            self.path_frames = Vec::new();
        }
        f
    }

    /// Appends a packet carrying only `frames` (path validation: the SAL sends it to an
    /// address other than the flow's peer) and returns its length. It takes the next packet
    /// number, so the peer's acknowledgements stay unambiguous, but it is neither
    /// ack-eliciting nor in flight: congestion control and loss recovery ignore it (the SAL
    /// retries a challenge itself). Sent even when frozen; 0 (nothing appended) once closed.
    pub fn emit_path_frames(
        &mut self,
        now: Instant,
        out: &mut Vec<u8>,
        frames: &[PathFrame],
    ) -> usize {
        if self.state != State::Open || frames.is_empty() {
            return 0;
        }
        // Path validation is the primary path's.
        self.focus_primary();
        let start = out.len();
        let pn = self.path.sent.next_packet_number();
        out.extend_from_slice(&pn.to_be_bytes());
        for f in frames {
            f.write(out);
        }
        let len = out.len() - start;
        let wire = len + usize::from(self.config.sal_overhead);
        let info = SentInfo {
            time_sent: now,
            size: u16::try_from(wire).unwrap_or(u16::MAX),
            ack_eliciting: false,
            in_flight: false,
            mtu_probe: false,
        };
        self.path.sent.on_sent(info, SentPayload::default());
        self.stats.packets_sent += 1;
        self.stats.bytes_sent += wire as u64;
        self.path.last_sent = now;
        len
    }

    /// Acknowledgement bookkeeping for an ack-eliciting packet (RFC 9000 §13.2.1–§13.2.2).
    /// `at_once`: the packet was out of order or carried a PING.
    fn on_eliciting_received(&mut self, now: Instant, at_once: bool) {
        let ack = &mut self.path.ack;
        ack.pending = true;
        ack.eliciting_since = ack.eliciting_since.saturating_add(1);
        if at_once || ack.eliciting_since >= self.config.ack_eliciting_threshold {
            ack.immediate = true;
        }
        if ack.deadline.is_none() {
            ack.deadline = (now + self.config.max_ack_delay()).into();
        }
    }

    /// Processes one ACK frame (RFC 9002 Appendix A.7).
    fn on_ack_frame(&mut self, now: Instant, ack: &AckFrame) -> Result<(), TransportError> {
        // Ranges are inclusive and below 2^62 (varints), so `hi + 1` cannot overflow.
        let ranges = ack.ranges.iter().map(|&(lo, hi)| lo..hi.saturating_add(1));
        let delay = Duration::from_micros(ack.delay_micros);
        let in_flight_before = self.path.sent.bytes_in_flight();
        let outcome = self
            .path
            .sent
            .on_ack(ranges.clone(), delay, now, &mut self.path.rtt);
        if outcome.acked_unsent {
            return Err(self.violation(now, TransportError::AckOfUnsentPacket));
        }
        if !self.path.lost_pns.is_empty() {
            for r in ranges {
                let missing: u64 = self
                    .path
                    .lost_pns
                    .gaps(r.clone())
                    .map(|g| g.end - g.start)
                    .sum();
                let overlap = (r.end - r.start) - missing;
                if overlap > 0 {
                    self.stats.spurious_losses += overlap;
                    self.path.lost_pns.remove(r);
                }
            }
        }
        self.on_lost(now, outcome.lost, !self.frozen);

        // RFC 9002 §7.8: the window was not the limit if it was not full and there was
        // nothing more to send.
        let app_limited = in_flight_before.saturating_add(u64::from(self.path.mtu.current()))
            < self.path.cc.window()
            && !self.has_sendable();
        let coupling = self.coupling();
        if !outcome.newly_acked.is_empty() {
            self.on_path_acked();
        }
        for p in outcome.newly_acked {
            if p.info.in_flight {
                self.path.cc.on_ack_coupled(
                    now,
                    p.info.time_sent,
                    u64::from(p.info.size),
                    &self.path.rtt,
                    app_limited,
                    coupling,
                );
            }
            if p.info.mtu_probe {
                let before = self.path.mtu.current();
                self.path.mtu.on_probe_acked(p.number);
                if self.path.mtu.current() != before {
                    self.path.cc.on_mtu_update(self.path.mtu.current());
                }
            } else {
                self.path.mtu.on_packet_acked(p.number, p.info.size);
            }
            for c in p.payload.chunks() {
                self.send.on_acked(c.start..c.end, c.fin);
            }
            if let Some(largest) = p.payload.ack_largest() {
                self.path.ack.ack_floor = self.path.ack.ack_floor.max(largest);
            }
        }
        if self.write_blocked && self.send.free() > 0 {
            self.write_blocked = false;
            self.push_event(TransportEvent::Writable);
        }
        if !self.all_acked_reported && self.send.is_fully_acked() {
            self.all_acked_reported = true;
            self.push_event(TransportEvent::AllAcked);
        }
        Ok(())
    }

    /// Handles packets declared lost: requeues what they carried and, if `congestion`,
    /// reports the congestion event.
    fn on_lost(&mut self, now: Instant, report: LossReport<SentPayload>, congestion: bool) {
        if report.is_empty() {
            return;
        }
        let mut black_hole = false;
        for p in &report.packets {
            if p.info.mtu_probe {
                self.path.mtu.on_probe_lost(p.number);
                self.stats.mtu_probes_lost = self.stats.mtu_probes_lost.saturating_add(1);
                continue;
            }
            if p.info.in_flight {
                self.stats.packets_lost += 1;
                self.stats.bytes_lost += u64::from(p.info.size);
                self.path.lost_pns.insert(p.number..p.number + 1);
                black_hole |= self.path.mtu.on_packet_lost(p.number, p.info.size);
            }
            self.requeue(&p.payload);
        }
        if black_hole {
            self.stats.black_holes = self.stats.black_holes.saturating_add(1);
            self.path.cc.on_mtu_update(self.path.mtu.current());
        }
        if let Some(sent_time) = report.congestion_event.filter(|_| congestion) {
            // Losses of packets sent before the current recovery period began do not start
            // a new one (RFC 9002 §7.3.2); only new periods are counted.
            if !self.path.cc.in_recovery(sent_time) || report.persistent_congestion {
                self.stats.congestion_events = self.stats.congestion_events.saturating_add(1);
            }
            self.path
                .cc
                .on_congestion_event(now, sent_time, report.persistent_congestion);
            if report.persistent_congestion {
                self.stats.persistent_congestion =
                    self.stats.persistent_congestion.saturating_add(1);
                self.path.rtt.on_persistent_congestion();
            }
        }
    }

    /// Queues again what a lost packet carried.
    fn requeue(&mut self, payload: &SentPayload) {
        for c in payload.chunks() {
            self.send.on_lost(c.start..c.end, c.fin);
        }
        if payload.max_data && self.recv.fin_offset().is_none() {
            self.max_data_pending = true;
        }
    }

    /// Closes the transport after a protocol violation by the peer.
    fn violation(&mut self, now: Instant, err: TransportError) -> TransportError {
        self.stats.protocol_violations = self.stats.protocol_violations.saturating_add(1);
        let code = err.close_code().unwrap_or(PROTOCOL_VIOLATION);
        self.close(now, code, &err.to_string());
        err
    }

    /// Raises `Readable` and `Finished` as the receive buffer warrants.
    fn update_stream_events(&mut self) {
        let readable = self.recv.readable();
        if readable > 0 && self.readable_armed {
            self.readable_armed = false;
            self.push_event(TransportEvent::Readable);
        }
        if !self.finished_reported
            && self.recv.fin_offset() == Some(self.recv.read_offset() + readable)
        {
            self.finished_reported = true;
            self.push_event(TransportEvent::Finished);
        }
    }

    // ------------------------------------------------------------------------------------
    // Sending.

    /// Whether stream data or datagrams wait to be sent (flow control permitting).
    fn has_sendable(&self) -> bool {
        self.dgrams.as_ref().is_some_and(|d| !d.out.is_empty()) || self.send.has_pending()
    }

    /// Appends the next packet's transport payload (packet number and frames) to `out`,
    /// after the SAL header the caller has already written there, and returns how many
    /// bytes were appended: 0 if nothing may be sent now (nothing pending, congestion window
    /// full, pacing delay, frozen, closed), in which case `out` is left as it was. Call
    /// repeatedly until it returns 0; if it returned 0 because of pacing,
    /// [`poll_timeout`](Self::poll_timeout) includes the pacing release.
    ///
    /// The payload never exceeds the current path MTU minus
    /// [`TransportConfig::sal_overhead`] (a PMTU probe is exactly its probe size minus the
    /// overhead).
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Vec<u8>) -> usize {
        if self.others.is_empty() {
            return self.poll_transmit_path(now, out, true);
        }
        self.poll_transmit_multipath(now, out)
    }

    /// [`poll_transmit`](Self::poll_transmit) on the path being worked on (`self.path`), with
    /// stream data and datagrams only if `data` (else only what the path itself needs:
    /// probes, acknowledgements, PINGs, window updates).
    fn poll_transmit_path(&mut self, now: Instant, out: &mut Vec<u8>, data: bool) -> usize {
        self.path.pacing_until = OptInstant::NONE;
        if self.frozen {
            return 0;
        }
        match &self.state {
            State::Open => {}
            State::Closing(_) => {
                self.focus_primary();
                return self.emit_close(now, out);
            }
            State::Closed(_) => return 0,
        }
        let sal = usize::from(self.config.sal_overhead);
        let mtu = self.path.mtu.current();
        let max_payload = usize::from(mtu) - sal;

        if self.path.pto_probes > 0 {
            self.path.pto_probes -= 1;
            // RFC 8899 black-hole hint (see `PathMtu::on_packet_lost`): from the second
            // consecutive timeout on, probe with base-size packets.
            let limit = if self.path.sent.pto_count() >= 2 {
                usize::from(self.path.mtu.config().base) - sal
            } else {
                max_payload
            };
            if data && !self.send.has_pending() {
                self.requeue_oldest_for_probe();
            }
            return self.emit(
                now,
                out,
                Emit {
                    max_payload: limit,
                    stream: data,
                    datagrams: false,
                    force_eliciting: true,
                    mtu_probe: None,
                    copy: None,
                },
            );
        }

        let window = self.path.cc.window();
        let in_flight = self.path.sent.bytes_in_flight();
        let srtt = self.path.rtt.smoothed();
        let wants = data && self.has_sendable();
        let active = data && (wants || self.send.acked_offset() < self.send.unsent_offset());

        // Probe only while data moves (not for keepalives on an idle connection). A probe
        // never takes window room that application data could use: it goes out only when the
        // window holds the whole probe on top of what is in flight, and either nothing waits
        // to be sent, or the window also has room for a data packet after it, or the window is
        // so large (at least `PROBE_WINDOW_FACTOR` probes) that setting the probe's share aside
        // for it costs data little: then data stops short of that share until the probe is
        // out, so that a window-limited bulk transfer still probes.
        if !self.path.bulk {
            let waiting = self.send.end() - self.send.acked_offset();
            let dgrams = self.dgrams.as_ref().map_or(0, |d| d.out.len());
            self.path.bulk = waiting > max_payload as u64 || dgrams > 1;
        }
        let probe = if active && self.path.bulk {
            self.path.mtu.next_probe_size(now).filter(|&s| s > mtu)
        } else {
            None
        };
        let mut reserve = 0;
        if let Some(size) = probe {
            let size64 = u64::from(size);
            let large = window >= PROBE_WINDOW_FACTOR * size64;
            let room = in_flight + size64 <= window;
            let data_fits_too = in_flight + size64 + u64::from(mtu) <= window;
            if room && (!wants || large || data_fits_too) {
                match self.path.pacer.delay(now, size64, mtu, window, srtt) {
                    None => {
                        return self.emit(
                            now,
                            out,
                            Emit {
                                max_payload: usize::from(size) - sal,
                                mtu_probe: Some(size),
                                ..Emit::default()
                            },
                        );
                    }
                    Some(t) => self.path.pacing_until = t.into(),
                }
            }
            if large {
                reserve = size64;
            }
        }

        if wants && in_flight + reserve + u64::from(mtu) <= window {
            match self
                .path
                .pacer
                .delay(now, u64::from(mtu), mtu, window, srtt)
            {
                None => {
                    let n = self.emit(
                        now,
                        out,
                        Emit {
                            max_payload,
                            stream: true,
                            datagrams: true,
                            ..Emit::default()
                        },
                    );
                    if n > 0 {
                        self.path.pacing_until = OptInstant::NONE;
                        return n;
                    }
                }
                Some(t) => {
                    self.path.pacing_until =
                        self.path.pacing_until.get().map_or(t, |p| p.min(t)).into();
                }
            }
        }

        let ack_due = self.path.ack.pending
            && (self.path.ack.immediate || self.path.ack.deadline.get().is_some_and(|d| d <= now));
        if ack_due || self.path.ping_pending || self.max_data_pending {
            let n = self.emit(
                now,
                out,
                Emit {
                    max_payload,
                    ..Emit::default()
                },
            );
            if n > 0 {
                return n;
            }
        }
        0
    }

    /// For a PTO probe with no new data: queue the data of the oldest outstanding packet
    /// that carried some for retransmission (RFC 9002 §6.2.4).
    fn requeue_oldest_for_probe(&mut self) {
        let oldest = self
            .path
            .sent
            .outstanding()
            .find(|(_, _, p)| p.n_chunks > 0)
            .map(|(_, _, p)| *p);
        if let Some(payload) = oldest {
            for c in payload.chunks() {
                self.send.on_lost(c.start..c.end, c.fin);
            }
        }
    }

    /// Skips `n` packet numbers (see [`SentPackets::skip_packet_numbers`]): a primary that
    /// lost its standby moves past every number the standby may seal with (D9).
    pub fn skip_packet_numbers(&mut self, n: u64) {
        self.focus_primary();
        self.path.sent.skip_packet_numbers(n);
    }

    /// Queues everything in flight for sending again at once, with no congestion response
    /// and nothing else reset: for packets that never left this host (a primary's held
    /// output, dropped when it lost its standby), which would otherwise wait for a probe
    /// timeout backed off through the hold.
    pub fn resend_in_flight(&mut self) {
        for i in 0..=self.others.len() {
            let path = match i.checked_sub(1) {
                None => &mut self.path,
                Some(j) => &mut self.others[j],
            };
            for p in path.sent.drain() {
                for c in p.payload.chunks() {
                    self.send.on_lost(c.start..c.end, c.fin);
                }
                if p.payload.max_data && self.recv.fin_offset().is_none() {
                    self.max_data_pending = true;
                }
            }
            path.pto_probes = 0;
            if path.ack.pending {
                path.ack.immediate = true;
            }
        }
    }

    /// The largest of our packet numbers the peer has acknowledged.
    pub fn largest_acked(&self) -> Option<u64> {
        self.primary().sent.largest_acked()
    }

    /// Builds one packet into `out` per `opts` (plus whatever is pending: ACK, MAX_DATA,
    /// keepalive PING) and records it. Returns its length, 0 if it would have been empty.
    fn emit(&mut self, now: Instant, out: &mut Vec<u8>, opts: Emit) -> usize {
        let start = out.len();
        let end = start + opts.max_payload;
        let pn = self.path.sent.next_packet_number();
        out.extend_from_slice(&pn.to_be_bytes());
        let mut payload = SentPayload::default();
        let mut eliciting = false;

        let probe = opts.mtu_probe.is_some();
        if !probe && self.path.ack.pending {
            payload.set_ack(self.write_ack(now, out, end.saturating_sub(out.len())));
        }
        if !probe
            && (self.max_data_pending || self.window_unannounced)
            && end.saturating_sub(out.len()) > 8
        {
            frame::write_max_data(out, self.recv.max_offset());
            self.max_data_pending = false;
            self.window_unannounced = false;
            payload.max_data = true;
            eliciting = true;
        }
        if self.path.ping_pending || probe {
            frame::write_ping(out);
            self.path.ping_pending = false;
            eliciting = true;
        }
        if let Some(of) = &opts.copy {
            eliciting |= self.write_copy(out, end, of, &mut payload);
        }
        if opts.stream {
            eliciting |= self.write_stream_frames(out, end, &mut payload, opts.datagrams);
        }
        if opts.datagrams {
            eliciting |= self.write_datagrams(out, end, opts.max_payload);
        }
        if opts.force_eliciting && !eliciting {
            frame::write_ping(out);
            eliciting = true;
        }
        if let Some(size) = opts.mtu_probe {
            let target = start + usize::from(size) - usize::from(self.config.sal_overhead);
            frame::write_padding(out, target.saturating_sub(out.len()));
        }
        let len = out.len() - start;
        if len == PN_LEN {
            out.truncate(start);
            return 0;
        }
        let wire = len + usize::from(self.config.sal_overhead);
        let size = u16::try_from(wire).unwrap_or(u16::MAX);
        let info = SentInfo {
            time_sent: now,
            size,
            ack_eliciting: eliciting,
            in_flight: eliciting,
            mtu_probe: opts.mtu_probe.is_some(),
        };
        if info.in_flight {
            self.path.cc.on_packet_sent(now, u64::from(size));
            self.path.pacer.on_sent(u64::from(size));
        }
        self.path.sent.on_sent(info, payload);
        if let Some(probe) = opts.mtu_probe {
            self.path.mtu.on_probe_sent(pn, probe);
            self.stats.mtu_probes_sent = self.stats.mtu_probes_sent.saturating_add(1);
        }
        self.stats.packets_sent += 1;
        self.stats.bytes_sent += wire as u64;
        self.path.bytes_sent += wire as u64;
        self.path.last_sent = now;
        self.memory_released = false;
        len
    }

    /// Writes an ACK frame of the received packet numbers, fitting in `room` bytes, and
    /// resets the acknowledgement state. Returns the largest acknowledged packet number.
    fn write_ack(&mut self, now: Instant, out: &mut Vec<u8>, room: usize) -> Option<u64> {
        let ack = &mut self.path.ack;
        let largest = ack.received.max()?;
        if room < ACK_HEADER_MAX {
            return None;
        }
        let max_ranges = MAX_ACK_FRAME_RANGES.min(1 + (room - ACK_HEADER_MAX) / ACK_RANGE_MAX);
        let mut frame = AckFrame {
            ranges: core::mem::take(&mut ack.ranges),
            delay_micros: u64::try_from((now - ack.largest_at).as_micros()).unwrap_or(0),
        };
        frame.ranges.clear();
        for r in ack.received.iter().rev() {
            if frame.ranges.len() >= max_ranges
                || (!frame.ranges.is_empty() && r.end <= ack.ack_floor)
            {
                break;
            }
            frame.ranges.push((r.start, r.end - 1));
        }
        frame.write(out);
        ack.ranges = frame.ranges;
        ack.pending = false;
        ack.immediate = false;
        ack.eliciting_since = 0;
        ack.deadline = OptInstant::NONE;
        Some(largest)
    }

    /// Writes STREAM frames up to `end`; returns whether any was written.
    fn write_stream_frames(
        &mut self,
        out: &mut Vec<u8>,
        end: usize,
        payload: &mut SentPayload,
        leave_room_for_datagram: bool,
    ) -> bool {
        // Keep room for the first queued datagram so that bulk data cannot starve them.
        let reserve = match self.dgrams.as_ref().and_then(|d| d.out.front()) {
            Some(d) if leave_room_for_datagram => datagram_frame_len(d.len()),
            _ => 0,
        };
        let end = if end.saturating_sub(out.len()) > reserve + 64 {
            end - reserve
        } else {
            end
        };
        let mut wrote = false;
        while usize::from(payload.n_chunks) < MAX_STREAM_FRAMES {
            let room = end.saturating_sub(out.len());
            // Any chunk starts below `send.end()`, so this bounds the offset varint.
            let overhead = 1 + varint_len(self.send.end()) + varint_len(room as u64);
            if room < overhead {
                break;
            }
            let Some(chunk) = self.send.poll_transmit(room - overhead) else {
                break;
            };
            let range = chunk.range.clone();
            let Some((a, b)) = self.send.get(range.clone()) else {
                // Cannot happen (the buffer holds what it returns); requeue rather than lose.
                self.send.on_lost(range, chunk.fin);
                break;
            };
            // A range spanning the end of the ring (once per trip around it) is two slices.
            frame::write_stream_parts(out, range.start, a, b, chunk.fin);
            let len = range.end - range.start;
            self.stats.stream_bytes_sent += len;
            self.stats.retransmitted_bytes +=
                self.sent_high.min(range.end).saturating_sub(range.start);
            self.sent_high = self.sent_high.max(range.end);
            payload.push_chunk(range, chunk.fin);
            wrote = true;
            if len == 0 {
                break;
            }
        }
        wrote
    }

    /// Writes queued datagrams up to `end`; returns whether any was written. Datagrams that
    /// no longer fit in any packet of `max_payload` bytes are dropped.
    fn write_datagrams(&mut self, out: &mut Vec<u8>, end: usize, max_payload: usize) -> bool {
        let mut wrote = false;
        let Some(dgrams) = &mut self.dgrams else {
            return false;
        };
        while let Some(d) = dgrams.out.front() {
            let need = datagram_frame_len(d.len());
            if need > end.saturating_sub(out.len()) {
                if need > max_payload.saturating_sub(PN_LEN) {
                    dgrams.out.pop_front();
                    self.stats.datagrams_dropped += 1;
                    continue;
                }
                break;
            }
            frame::write_datagram(out, d);
            dgrams.out.pop_front();
            self.stats.datagrams_sent += 1;
            wrote = true;
        }
        wrote
    }

    /// Sends the CLOSE frame of a local close (with an ACK if one is pending) and enters the
    /// closed state.
    fn emit_close(&mut self, now: Instant, out: &mut Vec<u8>) -> usize {
        let State::Closing(closing) =
            core::mem::replace(&mut self.state, State::Closed(Ended::Local))
        else {
            return 0;
        };
        let Closing { code, reason, .. } = *closing;
        let start = out.len();
        let end =
            start + usize::from(self.path.mtu.current()) - usize::from(self.config.sal_overhead);
        let pn = self.path.sent.next_packet_number();
        out.extend_from_slice(&pn.to_be_bytes());
        let mut payload = SentPayload::default();
        if self.path.ack.pending {
            payload.set_ack(self.write_ack(now, out, end.saturating_sub(out.len()) / 2));
        }
        // Type, code and length take at most 1 + 8 + 8 bytes.
        let room = end.saturating_sub(out.len() + 17);
        let mut cut = reason.len().min(room);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        frame::write_close(out, code, &reason[..cut]);
        let len = out.len() - start;
        let wire = len + usize::from(self.config.sal_overhead);
        let size = u16::try_from(wire).unwrap_or(u16::MAX);
        self.path
            .sent
            .on_sent(SentInfo::ack_only(now, size), payload);
        self.stats.packets_sent += 1;
        self.stats.bytes_sent += wire as u64;
        self.path.last_sent = now;
        self.memory_released = false;
        len
    }

    // ------------------------------------------------------------------------------------
    // Timers.

    /// The idle deadline.
    fn idle_deadline(&self) -> Instant {
        self.last_received() + self.config.idle_timeout()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called: the earliest of
    /// the loss-detection (loss or probe) timer, the delayed-ACK timer, the pacing release,
    /// the keepalive, the idle timeout, the PMTU raise timer and the silence probe. `None` once closed. While
    /// frozen only the idle timeout runs.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let idle = self.idle_deadline();
        match &self.state {
            State::Open => {}
            State::Closing(c) => return Some(idle.min(c.deadline)),
            State::Closed(_) => return None,
        }
        if self.frozen {
            return Some(idle);
        }
        let mut t = idle;
        let mut consider = |x: Option<Instant>| {
            if let Some(x) = x {
                t = t.min(x);
            }
        };
        consider(self.path_timeout(&self.path));
        for p in self.others.iter() {
            consider(self.path_timeout(p));
        }
        consider(self.memory_release_deadline());
        consider(self.silence_deadline());
        Some(t)
    }

    /// The earliest of path `p`'s own timers: loss detection or probe, delayed ACK, pacing
    /// release, keepalive, PMTU raise.
    fn path_timeout(&self, p: &path::Path) -> Option<Instant> {
        let mut t = p.sent.next_timeout(&p.rtt);
        let mut consider = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        if p.ack.pending && !p.ack.immediate {
            consider(p.ack.deadline.get());
        }
        consider(p.pacing_until.get());
        if !p.ping_pending {
            consider(self.config.keepalive().map(|k| p.last_sent + k));
        }
        consider(p.mtu.next_timeout());
        consider(self.stall_deadline(p));
        t
    }

    /// When to give back the memory of empty buffers and queues (see [`IDLE_RELEASE`]), if
    /// there is any to give back.
    fn memory_release_deadline(&self) -> Option<Instant> {
        if self.memory_released || !self.has_spare_capacity() {
            return None;
        }
        Some(self.last_activity() + IDLE_RELEASE)
    }

    /// Whether [`release_memory`](Self::release_memory) would give back anything.
    fn has_spare_capacity(&self) -> bool {
        let spare = |p: &path::Path| {
            p.sent.has_spare_capacity()
                || p.ack.received.has_spare_capacity()
                || p.ack.ranges.capacity() > 0
                || p.lost_pns.has_spare_capacity()
        };
        self.send.has_spare_capacity()
            || self.recv.has_spare_capacity()
            || spare(&self.path)
            || self.others.iter().any(spare)
            || self
                .dgrams
                .as_ref()
                .is_some_and(|d| d.out.is_empty() && d.inbound.is_empty())
    }

    /// Gives back the memory of empty buffers and queues (idle for [`IDLE_RELEASE`], or at
    /// once when the connection enters TIME-WAIT). Keeps any data still to be read.
    pub(crate) fn release_memory(&mut self) {
        self.send.shrink_to_fit();
        self.recv.shrink_to_fit();
        for p in core::iter::once(&mut self.path).chain(self.others.iter_mut()) {
            p.sent.release_memory();
            p.ack.received.shrink_to_fit();
            p.ack.ranges = Vec::new();
            p.lost_pns.shrink_to_fit();
        }
        if self
            .dgrams
            .as_ref()
            .is_some_and(|d| d.out.is_empty() && d.inbound.is_empty())
        {
            self.dgrams = None;
        }
        self.memory_released = true;
    }

    /// When the transport last sent or received a packet.
    pub fn last_activity(&self) -> Instant {
        if self.others.is_empty() {
            return self.path.last_sent.max(self.path.last_received);
        }
        core::iter::once(&self.path)
            .chain(self.others.iter())
            .map(|p| p.last_sent.max(p.last_received))
            .max()
            .unwrap_or(self.path.last_received)
    }

    /// When the transport last received a valid packet, or the SAL reported the peer's
    /// activity ([`on_peer_activity`](Self::on_peer_activity)): the peer's last sign of life.
    pub fn last_received(&self) -> Instant {
        if self.others.is_empty() {
            return self.path.last_received;
        }
        core::iter::once(&self.path)
            .chain(self.others.iter())
            .map(|p| p.last_received)
            .max()
            .unwrap_or(self.path.last_received)
    }

    /// Sends a PING with the next packet: the peer acknowledges it at once, so its answer
    /// shows the path and the peer alive (the SAL probes the old path so while it migrates).
    /// Ignored unless the transport is open.
    pub fn ping(&mut self) {
        if self.state == State::Open {
            self.focus_primary();
            self.path.ping_pending = true;
        }
    }

    /// The current probe timeout period of the path, before backoff (RFC 9002 §6.2.1):
    /// the SAL scales its own retransmission timers from it.
    pub fn pto_period(&self) -> Duration {
        self.primary().rtt.pto_period()
    }

    /// Handles whatever timers expired at `now` (calling it early or twice is harmless).
    /// Then call [`poll_transmit`](Self::poll_transmit).
    pub fn handle_timeout(&mut self, now: Instant) {
        match &self.state {
            State::Open => {}
            State::Closing(c) => {
                if now >= c.deadline || now >= self.idle_deadline() {
                    // The CLOSE could not be sent in time (frozen): give it up.
                    self.state = State::Closed(Ended::Local);
                }
                return;
            }
            State::Closed(_) => return,
        }
        if now >= self.idle_deadline() {
            self.state = State::Closed(Ended::Idle);
            self.push_event(TransportEvent::IdleTimeout);
            return;
        }
        if self.frozen {
            return;
        }
        if self.others.is_empty() {
            self.handle_path_timeout(now);
        } else {
            self.handle_timeout_multipath(now);
        }
        self.liveness_on_timeout(now);
        if self.memory_release_deadline().is_some_and(|t| t <= now) {
            self.release_memory();
        }
    }

    /// The timers of the path being worked on (`self.path`) that expired at `now`.
    fn handle_path_timeout(&mut self, now: Instant) {
        if self.stall_deadline(&self.path).is_some_and(|t| t <= now) {
            self.on_path_probe_timeout();
        }
        // The pacer's release is re-armed by the next transmission attempt on the path. With
        // one path that attempt comes at once; with several, the path may not be tried soon
        // (it carries no data), and a release left in the past would fire for ever.
        if self.path.pacing_until.get().is_some_and(|t| t <= now) {
            self.path.pacing_until = OptInstant::NONE;
        }
        if self
            .path
            .sent
            .next_timeout(&self.path.rtt)
            .is_some_and(|t| t <= now)
        {
            match self.path.sent.on_timeout(now, &self.path.rtt) {
                Some(Timeout::Lost(report)) => self.on_lost(now, report, true),
                Some(Timeout::Probe) => {
                    self.stats.probe_timeouts = self.stats.probe_timeouts.saturating_add(1);
                    self.path.pto_probes = PTO_PROBE_PACKETS;
                    self.on_path_probe_timeout();
                }
                None => {}
            }
        }
        if self.path.ack.pending && self.path.ack.deadline.get().is_some_and(|d| d <= now) {
            self.path.ack.immediate = true;
        }
        if self
            .config
            .keepalive()
            .is_some_and(|k| self.path.last_sent + k <= now)
        {
            self.path.ping_pending = true;
        }
        if self.path.mtu.next_timeout().is_some_and(|t| t <= now) {
            // Leaves `SearchComplete` (disarming the raise timer); the probe goes out with
            // the next packet that may be sent.
            let _ = self.path.mtu.next_probe_size(now);
        }
    }

    // ------------------------------------------------------------------------------------
    // Application interface.

    /// Whether the transport no longer sends nor accepts anything (closed by either end,
    /// timed out, or closing with the CLOSE still to send).
    pub fn is_closed(&self) -> bool {
        self.state != State::Open
    }

    /// Offers stream bytes; returns how many were taken: fewer than offered (`Ok(0)` at
    /// worst) when the send buffer is full, and then [`TransportEvent::Writable`] follows
    /// when it has room again. A writer may therefore wait for that event after any short
    /// write, not only after one that took nothing.
    pub fn write(&mut self, data: &[u8]) -> Result<usize, WriteError> {
        if self.is_closed() {
            return Err(WriteError::Closed);
        }
        let n = self.send.write(data).map_err(|_| WriteError::Finished)?;
        if n < data.len() {
            self.write_blocked = true;
        }
        self.memory_released = false;
        Ok(n)
    }

    /// Ends our direction of the stream after the bytes written so far (a FIN follows them).
    /// Idempotent.
    pub fn finish(&mut self) -> Result<(), WriteError> {
        if self.is_closed() {
            return Err(WriteError::Closed);
        }
        self.send.finish();
        Ok(())
    }

    /// Reads received stream bytes in order into `buf`.
    ///
    /// `Ok(Some(n))` with `n > 0`: bytes read. `Ok(Some(0))`: the peer finished and everything
    /// was read (also returned for an empty `buf`). `Ok(None)`: nothing ready yet (wait for
    /// [`TransportEvent::Readable`]). Bytes received before the connection closed remain
    /// readable; after them, `Err(Reset)` if the peer closed it, `Err(Closed)` otherwise.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, ReadError> {
        if buf.is_empty() {
            return Ok(Some(0));
        }
        let n = self.recv.read(buf);
        if self.recv.readable() == 0 {
            self.readable_armed = true;
        }
        // Reading may have emptied the buffer: give it back once idle.
        self.memory_released &= n == 0;
        if n > 0 {
            if self.recv.poll_window_update().is_some() {
                self.max_data_pending = true;
            }
            return Ok(Some(n));
        }
        if self.recv.is_finished() {
            return Ok(Some(0));
        }
        match self.state {
            State::Open => Ok(None),
            State::Closed(Ended::Peer(code)) => Err(ReadError::Reset { code }),
            State::Closing(_) | State::Closed(_) => Err(ReadError::Closed),
        }
    }

    /// Whether the peer's direction has ended and every byte of it was read.
    pub fn read_finished(&self) -> bool {
        self.recv.is_finished()
    }

    /// Largest datagram [`send_datagram`](Self::send_datagram) accepts on the current path.
    pub fn max_datagram_size(&self) -> usize {
        // With several paths a datagram may go on any: the smallest MTU.
        let mtu = core::iter::once(&self.path)
            .chain(self.others.iter())
            .filter(|p| p.usable)
            .map(|p| p.mtu.current())
            .min()
            .unwrap_or(self.path.mtu.current());
        let room = usize::from(mtu) - usize::from(self.config.sal_overhead) - PN_LEN - 1;
        // Largest `n` with `n + varint_len(n) <= room`.
        let mut n = room.saturating_sub(varint_len(room as u64));
        while n + 1 + varint_len(n as u64 + 1) <= room {
            n += 1;
        }
        n
    }

    /// Queues an unreliable datagram. It is sent once, when the congestion window allows, and
    /// never retransmitted.
    pub fn send_datagram(&mut self, data: &[u8]) -> Result<(), DatagramError> {
        if self.is_closed() {
            return Err(DatagramError::Closed);
        }
        let max = self.max_datagram_size();
        if data.len() > max {
            return Err(DatagramError::TooLarge { max });
        }
        let queue = &mut self.dgrams.get_or_insert_default().out;
        if queue.len() >= self.config.datagram_queue() {
            return Err(DatagramError::QueueFull);
        }
        queue.push_back(data.to_vec());
        self.memory_released = false;
        Ok(())
    }

    /// The next received datagram, if any.
    pub fn recv_datagram(&mut self) -> Option<Vec<u8>> {
        let d = self.dgrams.as_mut().and_then(|d| d.inbound.pop_front());
        if self.dgrams.as_ref().is_none_or(|d| d.inbound.is_empty()) {
            self.dgram_armed = true;
        }
        d
    }

    /// Closes the connection: the next [`poll_transmit`](Self::poll_transmit) sends a CLOSE
    /// frame with `code` and `reason` (with an ACK if one is due; the reason is cut to fit),
    /// and nothing is sent after it. Received packets are ignored from now on. If the
    /// transport is frozen, the CLOSE waits for it to thaw, for at most three probe timeout
    /// periods from `now`. Does nothing if already closed.
    pub fn close(&mut self, now: Instant, code: u64, reason: &str) {
        if self.state != State::Open {
            return;
        }
        let deadline = now + self.primary().rtt.pto_period().saturating_mul(3);
        self.state = State::Closing(Box::new(Closing {
            code,
            reason: reason.to_owned(),
            deadline,
        }));
        self.push_event(TransportEvent::Closed {
            by_peer: false,
            code,
            reason: reason.to_owned(),
        });
    }

    /// The next event, if any. Events are coalesced: an event equal to one still queued is
    /// not queued again, so the queue stays a handful of entries long however long the
    /// application leaves it.
    pub fn poll_event(&mut self) -> Option<TransportEvent> {
        self.events.pop()
    }

    fn push_event(&mut self, event: TransportEvent) {
        self.events.push(event);
    }

    /// Whether both directions are complete: our FIN and every byte were acknowledged, and
    /// the peer's FIN arrived and everything was read. The SAL may then close the flow.
    pub fn is_drained(&self) -> bool {
        self.send.is_fully_acked() && self.recv.is_finished()
    }

    /// The peer said, out of band, that it has everything we sent: the SAL received its FIN,
    /// which an end sends only once its own transport is drained (our stream end and every
    /// byte before it received). Every packet in flight stops being tracked — no more probe
    /// timeouts or retransmissions for data that arrived — and the send side counts as fully
    /// acknowledged, as if one ACK had covered it all (without an RTT sample or a congestion
    /// window change: the flow is closing). Ignored unless our stream end and every byte were
    /// sent at least once.
    pub fn on_peer_drained(&mut self) {
        if self.state != State::Open || !self.send.on_all_delivered() {
            return;
        }
        for p in core::iter::once(&mut self.path).chain(self.others.iter_mut()) {
            drop(p.sent.drain());
            p.pto_probes = 0;
            p.lost_pns.clear();
        }
        if !self.all_acked_reported {
            self.all_acked_reported = true;
            self.push_event(TransportEvent::AllAcked);
        }
    }

    /// Whether stream data (or the stream's end) waits to be sent, congestion and flow
    /// control permitting.
    pub fn has_stream_to_send(&self) -> bool {
        self.send.has_pending()
    }

    /// The SAL is about to send its FIN, which tells the peer that everything it sent
    /// arrived: an acknowledgement still waiting for its delay would say nothing more, so it
    /// is not sent (a retransmission arriving later is acknowledged as usual).
    pub fn cancel_pending_ack(&mut self) {
        for path in core::iter::once(&mut self.path).chain(self.others.iter_mut()) {
            let ack = &mut path.ack;
            ack.pending = false;
            ack.immediate = false;
            ack.eliciting_since = 0;
            ack.deadline = OptInstant::NONE;
        }
    }

    /// Whether the transport is frozen (see [`set_frozen`](Self::set_frozen)).
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// The SAL received an authenticated control packet on this flow: the peer is alive, so the
    /// idle timer restarts (control exchanges such as the closing FINs carry no transport
    /// payload but are activity all the same).
    pub fn on_peer_activity(&mut self, now: Instant) {
        self.liveness_on_received(now);
        self.path.last_received = self.path.last_received.max(now);
    }

    /// Freezes (or thaws) the transport while the SAL migrates the flow: nothing is sent;
    /// received packets are still processed (losses they reveal are requeued without a
    /// congestion response); the loss-detection timer is suspended, so the probe timeout
    /// neither fires nor backs off. The idle timeout keeps running.
    pub fn set_frozen(&mut self, frozen: bool) {
        self.frozen = frozen;
    }

    /// The flow now runs over a new path (migration completed): every packet in flight is
    /// declared lost *without* congestion response and its data queued for retransmission;
    /// the congestion controller restarts from the initial window, the RTT estimator from
    /// the initial RTT, the pacer from a full bucket; the path MTU search restarts at the base
    /// size. A pending ACK is sent at once.
    pub fn on_path_change(&mut self, now: Instant) {
        self.on_path_change_with_rtt(now, None);
    }

    /// The peer moved to a new path (its RSYN) and this end has no sample of it: as
    /// [`on_path_change`](Self::on_path_change), but the new path's RTT starts from the old
    /// path's smoothed RTT, when there is one, instead of the 333 ms initial guess. The
    /// peer's new host is most likely about as far as its old one (RFC 9002 §6.2.2 lets
    /// prior knowledge stand for the initial RTT), and with the initial guess a packet lost
    /// right after the move waited a probe timeout of about a second.
    pub fn on_peer_moved(&mut self, now: Instant) {
        self.focus_primary();
        let prior = self.path.rtt.has_sample().then(|| self.path.rtt.smoothed());
        self.on_path_change_with_rtt(now, prior);
    }

    /// The SAL's handshake took `rtt` (its SYN or SYN-ACK, sent once, to the answer): path
    /// 0's provisional RTT, if it has no sample yet, until its first own sample replaces it
    /// (the handshake's round trip includes the peer's key exchange). Without it a second
    /// path, whose join gives it a sample at once, would look faster to the scheduler than a
    /// path 0 that has carried nothing yet (and still counts the 333 ms initial guess).
    pub fn on_handshake_rtt(&mut self, rtt: Duration) {
        self.primary_mut().rtt.provisional(rtt);
    }

    /// [`on_path_change`](Self::on_path_change), with an RTT sample of the new path taken by
    /// the layer below (the SAL times its RSYN until the RSYN-ACK). Starting from it instead
    /// of the 333 ms initial guess keeps the pacer and the probe timeout at the new path's
    /// pace from the first packet.
    pub fn on_path_change_with_rtt(&mut self, now: Instant, rtt_sample: Option<Duration>) {
        // A migration moves the primary path; the flow's other paths stay as they are.
        self.focus_primary();
        for p in self.path.sent.drain() {
            self.requeue(&p.payload);
        }
        self.path.pto_probes = 0;
        if self.path.ack.pending {
            self.path.ack.immediate = true;
        }
        self.path.lost_pns.clear();
        self.path.mtu = PathMtu::new(*self.path.mtu.config());
        self.path.cc.on_mtu_update(self.path.mtu.current());
        self.path.cc.on_path_change();
        self.path.rtt.reset();
        if let Some(sample) = rtt_sample {
            self.path.rtt.update(sample, Duration::ZERO);
        }
        self.path.pacer = Pacer::new(now);
        self.path.pacing_until = OptInstant::NONE;
        self.liveness_on_path_change();
    }

    /// Stream bytes this end holds: to send (written, not yet acknowledged) and received
    /// (not yet read, with out-of-order ranges between) — what a snapshot carries of the
    /// stream.
    pub fn buffered(&self) -> (usize, usize) {
        (self.send.len(), self.recv.held())
    }

    /// Probe timeouts fired in a row with nothing acknowledged since (RFC 9002's
    /// `pto_count`): a path that stays silent counts up.
    pub fn pto_count(&self) -> u32 {
        self.primary().sent.pto_count()
    }

    /// Counters and current values.
    pub fn stats(&self) -> TransportStats {
        let c = &self.stats;
        TransportStats {
            packets_sent: c.packets_sent,
            bytes_sent: c.bytes_sent,
            packets_received: c.packets_received,
            bytes_received: c.bytes_received,
            packets_lost: c.packets_lost,
            bytes_lost: c.bytes_lost,
            stream_bytes_sent: c.stream_bytes_sent,
            retransmitted_bytes: c.retransmitted_bytes,
            stream_bytes_received: c.stream_bytes_received,
            duplicate_packets: c.duplicate_packets,
            duplicate_stream_bytes: c.duplicate_stream_bytes,
            spurious_losses: c.spurious_losses,
            datagrams_sent: c.datagrams_sent,
            datagrams_received: c.datagrams_received,
            datagrams_dropped: c.datagrams_dropped,
            malformed_packets: c.malformed_packets,
            fragmented_drops: c.fragmented_drops,
            congestion_events: u64::from(c.congestion_events),
            persistent_congestion: u64::from(c.persistent_congestion),
            probe_timeouts: u64::from(c.probe_timeouts),
            silence_probes: u64::from(c.silence_probes),
            mtu_probes_sent: u64::from(c.mtu_probes_sent),
            mtu_probes_lost: u64::from(c.mtu_probes_lost),
            black_holes: u64::from(c.black_holes),
            protocol_violations: u64::from(c.protocol_violations),
            path_failures: u64::from(c.path_failures),
            path_recoveries: u64::from(c.path_recoveries),
            redundant_packets: self.others.copies_sent_total(),
            cwnd: self.primary().cc.window(),
            bytes_in_flight: self.primary().sent.bytes_in_flight(),
            srtt: self.primary().rtt.smoothed(),
            min_rtt: self.primary().rtt.min(),
            pmtu: self.primary().mtu.current(),
        }
    }
}

/// Bytes of a DATAGRAM frame carrying `len` bytes.
fn datagram_frame_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

mod liveness;
mod multipath;
pub use multipath::{MAX_PATHS, PathInfo};
mod path;
mod scheduler;
pub use scheduler::{Scheduler, UnknownScheduler};
mod snapshot;

pub use liveness::{
    ARM_BYTES, MAX_SILENCE_BACKOFF, MIN_SILENCE, SILENCE_RTTS, SILENT_PROBE_TIMEOUTS,
};

#[cfg(test)]
mod tests;
