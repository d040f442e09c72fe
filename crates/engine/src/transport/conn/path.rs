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
    /// The path's ID: 0 for the flow's first path, then as the SAL numbers the paths it
    /// joins (docs/moving-flows.md §2). Not in a snapshot (only path 0 is exported).
    pub(super) id: u32,
    /// The SAL validated the path in both directions: data may be scheduled on it.
    pub(super) usable: bool,
    /// Used for data only when no other usable path works.
    pub(super) backup: bool,
    /// Its probe timer fired with another path working: what it carried was sent again on
    /// the others, and it carries no data until an acknowledgement arrives on it.
    pub(super) failed: bool,
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
    /// Bytes sent on the path (UDP payload). Not in a snapshot.
    pub(super) bytes_sent: u64,
}

impl Path {
    /// A path nothing was sent or received on yet, at `now`, for a normalized `config`:
    /// packet numbers from 0, the MTU at the base size with a search pending.
    pub(super) fn new(config: &TransportConfig, now: Instant) -> Path {
        Path::with_id(0, config, now)
    }

    /// [`new`](Self::new) for path `id`, usable at once only if it is path 0.
    pub(super) fn with_id(id: u32, config: &TransportConfig, now: Instant) -> Path {
        let mut sent = SentPackets::new();
        // At least 8 probes per idle period, however long the run of losses.
        sent.set_max_pto_interval(config.idle_timeout / 8);
        Path {
            id,
            usable: id == 0,
            backup: false,
            failed: false,
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
            bytes_sent: 0,
        }
    }

    /// Whether new data may be scheduled on the path at all.
    pub(super) fn carries_data(&self) -> bool {
        self.usable && !self.failed
    }
}

/// A transport's paths other than the one worked on: nothing but a null pointer for the
/// one-path connections that are nearly all of them.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct OtherPaths(Option<Box<Others>>);

/// What a transport with several paths keeps beside the one worked on.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Others {
    /// The other paths, in no particular order.
    paths: Vec<Path>,
    /// Copies still to send of the last data packet (the redundant scheduler).
    pub(super) copies: Option<super::scheduler::Copies>,
    /// Copies each path still there sent, by path ID (kept here rather than in every path:
    /// a path's state has no byte to spare, and copies need two paths).
    copies_sent: Vec<(u32, u64)>,
    /// Copies sent by every path, gone ones included.
    copies_total: u64,
}

impl OtherPaths {
    pub(super) fn push(&mut self, p: Path) {
        self.0.get_or_insert_default().paths.push(p);
    }

    /// Removes the `i`th path (the last takes its place), if there is one; frees the list
    /// when it empties.
    pub(super) fn swap_remove(&mut self, i: usize) -> Option<Path> {
        let o = self.0.as_mut().filter(|o| i < o.paths.len())?;
        let p = o.paths.swap_remove(i);
        if o.paths.is_empty() {
            self.0 = None;
        }
        Some(p)
    }

    /// What the scheduler keeps beside the paths (`None` with one path).
    pub(super) fn extra(&mut self) -> Option<&mut Others> {
        self.0.as_deref_mut()
    }

    /// How many copies all paths sent while the transport had several paths.
    pub(super) fn copies_sent_total(&self) -> u64 {
        self.0.as_deref().map_or(0, |o| o.copies_total)
    }

    /// How many copies path `id` sent while the transport had several paths.
    pub(super) fn copies_sent(&self, id: u32) -> u64 {
        self.0.as_deref().map_or(0, |o| {
            o.copies_sent
                .iter()
                .find(|&&(p, _)| p == id)
                .map_or(0, |&(_, n)| n)
        })
    }
}

impl Others {
    /// Path `id` sent a copy.
    pub(super) fn count_copy(&mut self, id: u32) {
        self.copies_total += 1;
        match self.copies_sent.iter_mut().find(|(p, _)| *p == id) {
            Some((_, n)) => *n += 1,
            None => self.copies_sent.push((id, 1)),
        }
    }

    /// Path `id` is gone: its own count goes (the total keeps its copies).
    pub(super) fn forget(&mut self, id: u32) {
        self.copies_sent.retain(|&(p, _)| p != id);
    }
}

impl core::ops::Deref for OtherPaths {
    type Target = [Path];
    fn deref(&self) -> &[Path] {
        self.0.as_deref().map_or(&[], |o| o.paths.as_slice())
    }
}

impl core::ops::DerefMut for OtherPaths {
    fn deref_mut(&mut self) -> &mut [Path] {
        self.0
            .as_deref_mut()
            .map_or(&mut [], |o| o.paths.as_mut_slice())
    }
}
