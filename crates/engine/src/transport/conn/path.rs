//! One path's state (issue 11; docs/moving-flows.md §2): what a connection keeps per path —
//! the packets sent on it and what they carried, the acknowledgements it owes, its RTT
//! estimate, congestion controller, pacer, path-MTU search and probe timer. A transport has
//! one path today; multipath gives a connection several, each keyed by its path ID, and a
//! migration becomes "add a path, move the traffic, drop the old one". The snapshot's PATH
//! block carries exactly this (`conn/snapshot.rs`).

use super::{
    AckState, CongestionController, Instant, MAX_RECEIVED_RANGES, MtuConfig, OptInstant, Pacer,
    PathMtu, RangeSet, RttEstimator, SentPackets, SentPayload, TransportConfig,
};

/// One path of a transport.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Path {
    pub(super) sent: SentPackets<SentPayload>,
    pub(super) rtt: RttEstimator,
    pub(super) cc: CongestionController,
    pub(super) pacer: Pacer,
    pub(super) mtu: PathMtu,
    /// When the pacer will next allow a packet that is waiting for it.
    pub(super) pacing_until: OptInstant,
    /// Probe packets still to send after a probe timeout.
    pub(super) pto_probes: u8,
    /// A keepalive PING is due.
    pub(super) ping_pending: bool,
    /// More than one packet's worth of data waited at once at some point: the flow moves
    /// enough for a path-MTU search to pay off. A short exchange (a request and a response
    /// that each fit in one packet) never probes: on a 1500-byte path the probes and their
    /// immediate acknowledgements would double its packets.
    pub(super) bulk: bool,
    /// Packet numbers declared lost recently (for spurious-loss counting).
    pub(super) lost_pns: RangeSet,
    /// What was received on the path's packet-number space, and the acknowledgement owed.
    pub(super) ack: AckState,
    pub(super) last_sent: Instant,
    pub(super) last_received: Instant,
}

impl Path {
    /// A path nothing was sent or received on yet, at `now`, for a normalized `config`:
    /// packet numbers from 0, the MTU at the base size with a search pending.
    pub(super) fn new(config: &TransportConfig, now: Instant) -> Path {
        let mut sent = SentPackets::new();
        // At least 8 probes per idle period, however long the run of losses.
        sent.set_max_pto_interval(config.idle_timeout / 8);
        Path {
            sent,
            rtt: RttEstimator::new(config.initial_rtt, config.max_ack_delay),
            cc: CongestionController::new(config.congestion, config.base_udp_payload),
            pacer: Pacer::new(now),
            mtu: PathMtu::new(MtuConfig {
                base: config.base_udp_payload,
                ..MtuConfig::new(config.max_udp_payload)
            }),
            pacing_until: OptInstant::NONE,
            pto_probes: 0,
            ping_pending: false,
            bulk: false,
            lost_pns: RangeSet::with_max_ranges(64),
            ack: AckState {
                received: RangeSet::with_max_ranges(MAX_RECEIVED_RANGES + 1),
                dedup_floor: 0,
                ack_floor: 0,
                largest_at: now,
                pending: false,
                eliciting_since: 0,
                immediate: false,
                deadline: OptInstant::NONE,
                ranges: Vec::new(),
            },
            last_sent: now,
            last_received: now,
        }
    }
}
