//! Sent-packet tracking and loss detection (RFC 9002 §6, pseudocode in Appendix A).
//!
//! [`SentPackets<T>`] remembers every packet sent in the one packet-number space of a flow,
//! with a caller-chosen payload `T` describing what the packet carried (the stream ranges to
//! retransmit if it is lost, the ACK ranges it advertised, …). It decides when packets are
//! acknowledged or lost, feeds RTT samples to an [`RttEstimator`], and computes the loss and
//! probe timers.
//!
//! # Rules implemented
//!
//! - **Packet numbers** are assigned here, counting up from 0, never reused (RFC 9002 §2).
//! - **RTT samples** (§5.1): taken from an ACK only if its largest acknowledged packet is
//!   newly acknowledged and at least one newly acknowledged packet is ack-eliciting.
//! - **Packet threshold** (§6.1.1): a packet is lost once a packet at least
//!   [`PACKET_THRESHOLD`] (3) numbers later has been acknowledged.
//! - **Time threshold** (§6.1.2): a packet older than a later acknowledged one is lost once it
//!   was sent more than `max(9/8 × max(smoothed_rtt, latest_rtt), 1 ms)` ago; until then the
//!   *loss timer* ([`loss_time`](SentPackets::loss_time)) is armed for it.
//! - **Probe timeout** (§6.2): with ack-eliciting packets in flight and no loss timer armed,
//!   the PTO fires `pto_period × 2^pto_count` after the last ack-eliciting packet was sent
//!   ([`RttEstimator::pto_period`] includes the peer's `max_ack_delay`). Any ACK that newly
//!   acknowledges something resets `pto_count` (the SAL handshake has validated the peer's
//!   address, so the client exception of §6.2.1 does not apply).
//! - **Persistent congestion** (§7.6): established when two ack-eliciting packets declared
//!   lost in one detection pass were sent more than
//!   `3 × (smoothed_rtt + max(4 × rttvar, 1 ms) + max_ack_delay)` apart, no packet sent
//!   between them was acknowledged, and both were sent after the first RTT sample.
//!
//! # Call order
//!
//! 1. Before building a packet, read [`next_packet_number`](SentPackets::next_packet_number);
//!    after sending it, call [`on_sent`](SentPackets::on_sent) (which returns that number).
//! 2. For each received ACK frame, call [`on_ack`](SentPackets::on_ack) and act on the
//!    [`AckOutcome`]: report the losses to the congestion controller, then the
//!    acknowledgements (see [`cc`](super::cc)), and requeue lost payloads.
//! 3. Arm a timer for [`next_timeout`](SentPackets::next_timeout); when it fires, call
//!    [`on_timeout`](SentPackets::on_timeout).
//!
//! `now` must never go backwards.
//!
//! # Hostile ACKs
//!
//! ACK ranges come from the peer. Empty or inverted ranges are skipped. An ACK that
//! acknowledges a packet number never sent is ignored **entirely** (RFC 9000 §13.1 makes it a
//! PROTOCOL_VIOLATION; acting on the rest of it would let an optimistic-ACK attacker, RFC 9000
//! §21.4, inflate the window): it is reported in [`AckOutcome::acked_unsent`] and counted in
//! [`protocol_violations`](SentPackets::protocol_violations), never a panic. Work per ACK is
//! bounded by the number of ranges plus the number of packets tracked.

use core::ops::Range;
use core::time::Duration;
use std::collections::VecDeque;

use super::rtt::{GRANULARITY, RttEstimator};
use super::{Nanos, OptInstant, OptU64};
use crate::Instant;
use crate::snapshot::{BlockReader, BlockWriter, SnapshotError};

/// `kPacketThreshold` (RFC 9002 §6.1.1).
pub const PACKET_THRESHOLD: u64 = 3;

/// `kTimeThreshold` (RFC 9002 §6.1.2) as numerator / denominator: 9/8.
pub const TIME_THRESHOLD: (u32, u32) = (9, 8);

/// `kPersistentCongestionThreshold` (RFC 9002 §7.6.1).
pub const PERSISTENT_CONGESTION_THRESHOLD: u32 = 3;

/// The PTO backoff stops doubling after this many consecutive timeouts (2^16 × the period
/// is already far beyond any idle timeout); it only keeps the arithmetic bounded.
pub const MAX_PTO_BACKOFF_EXPONENT: u32 = 16;

/// Most packets that are neither ack-eliciting nor in flight (pure ACKs) tracked at once.
///
/// The peer acknowledges such packets only incidentally, so a peer that never acknowledges
/// could otherwise make the tracker grow with every ACK sent to it. Beyond this many, new ones
/// still get packet numbers but are not tracked; nothing but their payload is lost, and ACK-only
/// payloads are advisory (RFC 9000 §13.2.4).
pub const MAX_UNTRACKED_ACK_ONLY: usize = 1024;

/// What the loss detector knows about one sent packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SentInfo {
    /// When it was sent.
    pub time_sent: Instant,
    /// Its size in bytes, counted in bytes in flight.
    pub size: u16,
    /// Whether it elicits an acknowledgement (anything but ACK and PADDING frames).
    pub ack_eliciting: bool,
    /// Whether it counts towards bytes in flight (ack-eliciting or padded; RFC 9002 §2).
    pub in_flight: bool,
    /// Whether it is a path-MTU probe. Its loss says nothing about congestion (RFC 9000
    /// §14.4), so it never starts a congestion event or counts for persistent congestion.
    pub mtu_probe: bool,
}

impl SentInfo {
    /// An ordinary ack-eliciting, in-flight packet of `size` bytes sent at `time_sent`.
    pub fn data(time_sent: Instant, size: u16) -> SentInfo {
        SentInfo {
            time_sent,
            size,
            ack_eliciting: true,
            in_flight: true,
            mtu_probe: false,
        }
    }

    /// A packet carrying only ACK frames: neither ack-eliciting nor in flight.
    pub fn ack_only(time_sent: Instant, size: u16) -> SentInfo {
        SentInfo {
            time_sent,
            size,
            ack_eliciting: false,
            in_flight: false,
            mtu_probe: false,
        }
    }

    /// Whether losing this packet is a congestion signal.
    fn signals_congestion(&self) -> bool {
        self.in_flight && !self.mtu_probe
    }
}

/// A packet handed back by the detector, acknowledged or lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentPacket<T> {
    /// Its packet number.
    pub number: u64,
    /// What was recorded when it was sent.
    pub info: SentInfo,
    /// The caller's payload.
    pub payload: T,
}

/// Packets declared lost in one detection pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LossReport<T> {
    /// The lost packets, by ascending packet number.
    pub packets: Vec<SentPacket<T>>,
    /// If the loss is a congestion event: the send time of the most recently sent lost packet
    /// that was in flight and not an MTU probe. Pass it to
    /// [`CongestionController::on_congestion_event`](super::cc::CongestionController::on_congestion_event)
    /// (RFC 9002 Appendix B.8).
    pub congestion_event: Option<Instant>,
    /// Whether these losses establish persistent congestion (RFC 9002 §7.6).
    pub persistent_congestion: bool,
}

impl<T> LossReport<T> {
    fn empty() -> LossReport<T> {
        LossReport {
            packets: Vec::new(),
            congestion_event: None,
            persistent_congestion: false,
        }
    }

    /// Whether nothing was lost.
    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }
}

/// The result of [`SentPackets::on_ack`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AckOutcome<T> {
    /// Packets acknowledged for the first time, by ascending packet number.
    pub newly_acked: Vec<SentPacket<T>>,
    /// Packets declared lost because of this ACK.
    pub lost: LossReport<T>,
    /// Whether an RTT sample was fed to the estimator.
    pub rtt_sample_taken: bool,
    /// The ACK acknowledged a packet number that was never sent: it was ignored entirely.
    /// The caller should close the connection with a protocol violation (RFC 9000 §13.1).
    pub acked_unsent: bool,
}

impl<T> AckOutcome<T> {
    fn empty() -> AckOutcome<T> {
        AckOutcome {
            newly_acked: Vec::new(),
            lost: LossReport::empty(),
            rtt_sample_taken: false,
            acked_unsent: false,
        }
    }
}

/// What [`SentPackets::on_timeout`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Timeout<T> {
    /// The loss timer fired and these packets are lost (RFC 9002 §6.1.2).
    Lost(LossReport<T>),
    /// The probe timeout fired (RFC 9002 §6.2.4): send one or two ack-eliciting packets now,
    /// regardless of the congestion window (RFC 9002 §7.5) — new data if there is some,
    /// otherwise a retransmission of the oldest outstanding data, otherwise a PING.
    /// `pto_count` has been incremented.
    Probe,
}

/// One entry of [`SentPackets::packets`]: a tracked packet, or the tombstone it leaves once
/// acknowledged or declared lost (until the tombstones before it are gone).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Slot<T> {
    pn: u64,
    packet: Option<(SentInfo, T)>,
}

/// The sent packets of one flow and the loss-detection state derived from them (RFC 9002 §6).
/// Plain data; see the [module documentation](self).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentPackets<T> {
    /// Tracked packets by ascending number (packet numbers are assigned in order, so pushing
    /// at the back keeps them sorted). Outstanding ones hold `Some`; acknowledged or lost
    /// ones leave a `None` until they reach either end, where they are popped, so both ends
    /// are always outstanding. Untracked ack-only packets have no slot, so numbers may skip.
    /// Tombstones stay few: one sits behind an outstanding packet only if nothing more than
    /// [`PACKET_THRESHOLD`] − 1 numbers above that packet was acknowledged, else the packet
    /// would have been declared lost.
    packets: VecDeque<Slot<T>>,
    /// Number of `Some` slots in `packets`.
    outstanding: u32,
    /// The number the next packet gets.
    next_pn: u64,
    /// `largest_acked_packet`: the largest packet number the peer acknowledged.
    largest_acked: OptU64,
    /// `loss_time`: when the earliest outstanding packet becomes lost by the time threshold.
    loss_time: OptInstant,
    /// `time_of_last_ack_eliciting_packet`.
    last_ack_eliciting_sent: OptInstant,
    /// When the first RTT sample was taken (persistent congestion only counts later packets).
    first_rtt_sample: OptInstant,
    /// Number of outstanding ack-eliciting packets.
    ack_eliciting_in_flight: u32,
    /// Number of tracked packets that are neither ack-eliciting nor in flight.
    ack_only_tracked: u32,
    /// Sum of the sizes of outstanding in-flight packets.
    bytes_in_flight: u64,
    /// Consecutive probe timeouts without an acknowledgement.
    pto_count: u32,
    /// Longest wait between probes, however many timed out.
    max_pto_interval: Nanos,
    /// ACKs ignored because they acknowledged packets never sent.
    protocol_violations: u64,
}

impl<T> Default for SentPackets<T> {
    fn default() -> Self {
        SentPackets::new()
    }
}

impl<T> SentPackets<T> {
    /// Nothing sent yet; the first packet number is 0.
    pub fn new() -> SentPackets<T> {
        SentPackets {
            packets: VecDeque::new(),
            outstanding: 0,
            next_pn: 0,
            largest_acked: OptU64::NONE,
            loss_time: OptInstant::NONE,
            last_ack_eliciting_sent: OptInstant::NONE,
            first_rtt_sample: OptInstant::NONE,
            ack_eliciting_in_flight: 0,
            ack_only_tracked: 0,
            bytes_in_flight: 0,
            pto_count: 0,
            max_pto_interval: Nanos::of(Duration::MAX),
            protocol_violations: 0,
        }
    }

    /// Caps the probe timeout's backoff at `interval` (never below the un-backed-off period).
    ///
    /// Without a cap the probes after a run of losses come at 2^n × the period, so a sender
    /// whose acknowledgements are all lost for a while sends only a handful of probes before
    /// the idle timeout ends the connection; with the cap at a fraction of the idle timeout
    /// it keeps probing a few times per idle period.
    pub fn set_max_pto_interval(&mut self, interval: Duration) {
        self.max_pto_interval = Nanos::of(interval);
    }

    /// The number [`on_sent`](Self::on_sent) will assign to the next packet.
    pub fn next_packet_number(&self) -> u64 {
        self.next_pn
    }

    /// Skips `n` packet numbers: the next packet gets one `n` higher than it would have.
    /// Numbers may skip anyway (untracked ACK-only packets), so nothing else changes.
    pub fn skip_packet_numbers(&mut self, n: u64) {
        self.next_pn = self.next_pn.saturating_add(n);
    }

    /// The largest packet number the peer has acknowledged.
    pub fn largest_acked(&self) -> Option<u64> {
        self.largest_acked.get()
    }

    /// Sum of the sizes of in-flight packets neither acknowledged nor declared lost.
    pub fn bytes_in_flight(&self) -> u64 {
        self.bytes_in_flight
    }

    /// Whether any ack-eliciting packet is outstanding.
    pub fn has_ack_eliciting_in_flight(&self) -> bool {
        self.ack_eliciting_in_flight > 0
    }

    /// Consecutive probe timeouts since the last acknowledgement.
    pub fn pto_count(&self) -> u32 {
        self.pto_count
    }

    /// ACK frames ignored because they acknowledged packets never sent.
    pub fn protocol_violations(&self) -> u64 {
        self.protocol_violations
    }

    /// Number of outstanding (tracked) packets.
    pub fn len(&self) -> usize {
        self.outstanding as usize
    }

    /// Whether no packet is outstanding.
    pub fn is_empty(&self) -> bool {
        self.outstanding == 0
    }

    /// Outstanding packets by ascending number, for example to choose what a PTO probe
    /// retransmits.
    pub fn outstanding(&self) -> impl DoubleEndedIterator<Item = (u64, &SentInfo, &T)> + '_ {
        self.packets
            .iter()
            .filter_map(|s| s.packet.as_ref().map(|(info, p)| (s.pn, info, p)))
    }

    /// Records a sent packet and returns its number (the previous
    /// [`next_packet_number`](Self::next_packet_number)).
    ///
    /// Packets that are neither ack-eliciting nor in flight are not tracked beyond
    /// [`MAX_UNTRACKED_ACK_ONLY`] outstanding ones.
    pub fn on_sent(&mut self, info: SentInfo, payload: T) -> u64 {
        let pn = self.next_pn;
        // 2^64 packets cannot be sent; saturating keeps this total anyway.
        self.next_pn = self.next_pn.saturating_add(1);
        if info.ack_eliciting {
            self.ack_eliciting_in_flight += 1;
            self.last_ack_eliciting_sent = info.time_sent.into();
        }
        if info.in_flight {
            self.bytes_in_flight = self.bytes_in_flight.saturating_add(u64::from(info.size));
        }
        if !info.ack_eliciting && !info.in_flight {
            if self.ack_only_tracked as usize >= MAX_UNTRACKED_ACK_ONLY {
                return pn;
            }
            self.ack_only_tracked += 1;
        }
        self.packets.push_back(Slot {
            pn,
            packet: Some((info, payload)),
        });
        self.outstanding += 1;
        pn
    }

    /// Processes an ACK frame (RFC 9002 Appendix A.7 `OnAckReceived`).
    ///
    /// `acked` lists the acknowledged ranges, half-open, in any order (an ACK frame's
    /// inclusive `(smallest, largest)` pairs become `smallest..largest + 1`). `ack_delay` is
    /// the delay the peer reported. See the [module documentation](self) for the rules and
    /// for what happens with hostile input.
    pub fn on_ack<I>(
        &mut self,
        acked: I,
        ack_delay: Duration,
        now: Instant,
        rtt: &mut RttEstimator,
    ) -> AckOutcome<T>
    where
        I: IntoIterator<Item = Range<u64>>,
        I::IntoIter: Clone,
    {
        let mut out = AckOutcome::empty();
        let ranges = acked.into_iter();
        let mut largest: Option<u64> = None;
        for r in ranges.clone().filter(|r| r.start < r.end) {
            if r.end > self.next_pn {
                self.protocol_violations = self.protocol_violations.saturating_add(1);
                out.acked_unsent = true;
                return out;
            }
            largest = largest.max(Some(r.end - 1));
        }
        let Some(largest) = largest else {
            return out;
        };
        self.largest_acked = OptU64::new(self.largest_acked.get().max(Some(largest)));

        for r in ranges.filter(|r| r.start < r.end) {
            let mut i = self.packets.partition_point(|s| s.pn < r.start);
            while self.packets.get(i).is_some_and(|s| s.pn < r.end) {
                if let Some(packet) = self.take(i) {
                    out.newly_acked.push(packet);
                }
                i += 1;
            }
        }
        self.trim();
        // A.7: "if (newly_acked_packets.empty()) return".
        if out.newly_acked.is_empty() {
            return out;
        }
        out.newly_acked.sort_unstable_by_key(|p| p.number);

        // §5.1: sample only if the largest acknowledged is newly acknowledged and something
        // ack-eliciting was newly acknowledged.
        let newest = out.newly_acked.last().filter(|p| p.number == largest);
        if let Some(newest) = newest
            && out.newly_acked.iter().any(|p| p.info.ack_eliciting)
        {
            rtt.update(now - newest.info.time_sent, ack_delay);
            if self.first_rtt_sample.is_none() {
                self.first_rtt_sample = now.into();
            }
            out.rtt_sample_taken = true;
        }

        out.lost = self.detect_lost(now, rtt);
        self.pto_count = 0;
        out
    }

    /// When the loss timer fires, if armed (RFC 9002 §6.1.2).
    pub fn loss_time(&self) -> Option<Instant> {
        self.loss_time.get()
    }

    /// When the probe timeout fires, if armed: `pto_period × 2^pto_count` after the last
    /// ack-eliciting packet was sent, while any is in flight (RFC 9002 §6.2.1).
    pub fn pto_deadline(&self, rtt: &RttEstimator) -> Option<Instant> {
        if self.ack_eliciting_in_flight == 0 {
            return None;
        }
        let sent = self.last_ack_eliciting_sent.get()?;
        let backoff = 1u32 << self.pto_count.min(MAX_PTO_BACKOFF_EXPONENT);
        let period = rtt.pto_period();
        let wait = period
            .saturating_mul(backoff)
            .min(self.max_pto_interval.get().max(period));
        Some(sent + wait)
    }

    /// The deadline of the loss-detection timer: the loss timer if armed, otherwise the probe
    /// timeout (RFC 9002 Appendix A.8 `SetLossDetectionTimer`).
    pub fn next_timeout(&self, rtt: &RttEstimator) -> Option<Instant> {
        self.loss_time().or_else(|| self.pto_deadline(rtt))
    }

    /// Handles the loss-detection timer (RFC 9002 Appendix A.9 `OnLossDetectionTimeout`).
    /// Returns `None` if nothing was due at `now` (a stale or early wake-up).
    pub fn on_timeout(&mut self, now: Instant, rtt: &RttEstimator) -> Option<Timeout<T>> {
        if let Some(loss_time) = self.loss_time.get() {
            if now < loss_time {
                return None;
            }
            return Some(Timeout::Lost(self.detect_lost(now, rtt)));
        }
        let deadline = self.pto_deadline(rtt)?;
        if now < deadline {
            return None;
        }
        self.on_pto();
        Some(Timeout::Probe)
    }

    /// Bookkeeping for a probe timeout: increments `pto_count`, doubling the next PTO
    /// period. [`on_timeout`](Self::on_timeout) calls it; call it directly only when
    /// managing the PTO outside `on_timeout`.
    pub fn on_pto(&mut self) {
        self.pto_count = self.pto_count.saturating_add(1);
    }

    /// Removes every outstanding packet and returns them by ascending number, resetting the
    /// timers and bytes in flight; packet numbering continues.
    ///
    /// For migration (DESIGN §4): after a freeze, whatever was in flight on the old path is
    /// retransmitted on the new one *without* being treated as congestion, so the caller
    /// requeues these payloads and does not report them to the congestion controller. An ACK
    /// arriving later for one of them is simply a duplicate.
    pub fn drain(&mut self) -> Vec<SentPacket<T>> {
        let packets = core::mem::take(&mut self.packets);
        self.outstanding = 0;
        self.loss_time = OptInstant::NONE;
        self.ack_eliciting_in_flight = 0;
        self.ack_only_tracked = 0;
        self.bytes_in_flight = 0;
        self.pto_count = 0;
        packets
            .into_iter()
            .filter_map(|s| {
                s.packet.map(|(info, payload)| SentPacket {
                    number: s.pn,
                    info,
                    payload,
                })
            })
            .collect()
    }

    /// Gives back memory while the flow is idle: if every outstanding packet is an untracked
    /// candidate anyway — neither ack-eliciting nor in flight (pure ACKs, whose own
    /// acknowledgement is advisory, RFC 9000 §13.2.4) — forgets them and frees the ring.
    /// Otherwise (something is in flight) changes nothing. An acknowledgement arriving later
    /// for a forgotten packet is ignored, as for any packet not tracked.
    pub fn release_memory(&mut self) {
        if self.outstanding == self.ack_only_tracked {
            self.packets = VecDeque::new();
            self.outstanding = 0;
            self.ack_only_tracked = 0;
            // Only these packets could have armed it.
            self.loss_time = OptInstant::NONE;
        }
    }

    /// Whether [`release_memory`](Self::release_memory) would give back any memory.
    pub fn has_spare_capacity(&self) -> bool {
        self.packets.capacity() > 0 && self.outstanding == self.ack_only_tracked
    }

    /// `max(kTimeThreshold × max(smoothed_rtt, latest_rtt), kGranularity)` (RFC 9002 §6.1.2).
    pub fn loss_delay(rtt: &RttEstimator) -> Duration {
        let base = rtt.smoothed().max(rtt.latest());
        let (n, d) = TIME_THRESHOLD;
        (base.saturating_mul(n) / d).max(GRANULARITY)
    }

    /// RFC 9002 Appendix A.10 `DetectAndRemoveLostPackets`, plus the persistent-congestion
    /// test of §7.6.2 over the packets it declares lost.
    fn detect_lost(&mut self, now: Instant, rtt: &RttEstimator) -> LossReport<T> {
        let mut report = LossReport::empty();
        self.loss_time = OptInstant::NONE;
        let Some(largest_acked) = self.largest_acked.get() else {
            return report;
        };
        let loss_delay = Self::loss_delay(rtt);
        let congestion_period = rtt
            .pto_period()
            .saturating_mul(PERSISTENT_CONGESTION_THRESHOLD);

        let mut lost_slots = Vec::new();
        // Persistent congestion: the send time of the first ack-eliciting loss in the current
        // run of consecutive packet numbers with no acknowledged packet in between.
        let mut run_start: Option<Instant> = None;
        let mut previous: Option<u64> = None;
        let end = self.packets.partition_point(|s| s.pn <= largest_acked);
        for (i, slot) in self.packets.range(..end).enumerate() {
            let Some((info, _)) = &slot.packet else {
                continue;
            };
            let pn = slot.pn;
            if previous.is_none_or(|p| p.saturating_add(1) != pn) {
                // A gap: the packets in between were acknowledged (or lost earlier, or never
                // tracked); either way the run is broken.
                run_start = None;
            }
            previous = Some(pn);
            let by_time = info
                .time_sent
                .checked_add(loss_delay)
                .is_some_and(|t| t <= now);
            let by_count = largest_acked - pn >= PACKET_THRESHOLD;
            if !(by_time || by_count) {
                let at = info.time_sent + loss_delay;
                self.loss_time = self.loss_time.get().map_or(at, |t| t.min(at)).into();
                continue;
            }
            lost_slots.push(i);
            if info.signals_congestion() {
                report.congestion_event = report.congestion_event.max(Some(info.time_sent));
            }
            let counts = info.ack_eliciting
                && !info.mtu_probe
                && self
                    .first_rtt_sample
                    .get()
                    .is_some_and(|s| info.time_sent > s);
            if counts {
                match run_start {
                    None => run_start = Some(info.time_sent),
                    Some(start) if info.time_sent - start > congestion_period => {
                        report.persistent_congestion = true;
                    }
                    Some(_) => {}
                }
            }
        }
        for i in lost_slots {
            if let Some(packet) = self.take(i) {
                report.packets.push(packet);
            }
        }
        self.trim();
        report
    }

    /// Pops the tombstones at both ends of `packets`. Call after a batch of
    /// [`take`](Self::take)s (it shifts the indices).
    fn trim(&mut self) {
        while self.packets.front().is_some_and(|s| s.packet.is_none()) {
            self.packets.pop_front();
        }
        while self.packets.back().is_some_and(|s| s.packet.is_none()) {
            self.packets.pop_back();
        }
    }

    /// Removes the outstanding packet in slot `i` (leaving a tombstone), keeping the
    /// counters in step.
    fn take(&mut self, i: usize) -> Option<SentPacket<T>> {
        let slot = self.packets.get_mut(i)?;
        let pn = slot.pn;
        let (info, payload) = slot.packet.take()?;
        self.outstanding -= 1;
        if info.ack_eliciting {
            self.ack_eliciting_in_flight -= 1;
        }
        if info.in_flight {
            self.bytes_in_flight = self.bytes_in_flight.saturating_sub(u64::from(info.size));
        }
        if !info.ack_eliciting && !info.in_flight {
            self.ack_only_tracked -= 1;
        }
        Some(SentPacket {
            number: pn,
            info,
            payload,
        })
    }
}

/// Snapshot encoding (docs/snapshot.md, PATH block, "Sent packets").
impl<T> SentPackets<T> {
    /// Writes the detector's state and every tracked packet (tombstones included, so that
    /// the ring comes back as it was), each payload written by `payload`. Counters derived
    /// from the packets (bytes in flight, …) are not written: decoding recomputes them.
    pub(crate) fn encode(&self, w: &mut BlockWriter, payload: impl Fn(&T, &mut BlockWriter)) {
        w.u64(self.next_pn);
        w.opt_u64(self.largest_acked.get());
        w.opt_instant(self.loss_time.get());
        w.opt_instant(self.last_ack_eliciting_sent.get());
        w.opt_instant(self.first_rtt_sample.get());
        w.u32(self.pto_count);
        w.duration(self.max_pto_interval.get());
        w.u64(self.protocol_violations);
        w.u32(u32::try_from(self.packets.len()).unwrap_or(u32::MAX));
        for slot in &self.packets {
            w.u64(slot.pn);
            match &slot.packet {
                None => w.u8(0),
                Some((info, p)) => {
                    w.u8(1
                        | u8::from(info.ack_eliciting) << 1
                        | u8::from(info.in_flight) << 2
                        | u8::from(info.mtu_probe) << 3);
                    w.instant(info.time_sent);
                    w.u16(info.size);
                    payload(p, w);
                }
            }
        }
    }

    /// Reads what [`encode`](Self::encode) wrote, each payload read by `payload`. Refused
    /// unless packet numbers ascend below the next one (itself at most 2^62), the ring ends
    /// with outstanding packets, and the largest acknowledged number was sent.
    pub(crate) fn decode(
        r: &mut BlockReader<'_>,
        mut payload: impl FnMut(&mut BlockReader<'_>) -> Result<T, SnapshotError>,
    ) -> Result<SentPackets<T>, SnapshotError> {
        let mut s = SentPackets::new();
        s.next_pn = r.u64()?;
        r.check(s.next_pn <= 1 << 62, "next packet number")?;
        s.largest_acked = OptU64::new(r.opt_u64()?);
        r.check(
            s.largest_acked.get().is_none_or(|l| l < s.next_pn),
            "largest acknowledged never sent",
        )?;
        s.loss_time = r.opt_instant()?.into();
        s.last_ack_eliciting_sent = r.opt_instant()?.into();
        s.first_rtt_sample = r.opt_instant()?.into();
        s.pto_count = r.u32()?;
        s.max_pto_interval = Nanos::of(r.duration()?);
        s.protocol_violations = r.u64()?;
        let n = r.count(9)?;
        let mut prev: Option<u64> = None;
        for _ in 0..n {
            let pn = r.u64()?;
            r.check(
                pn < s.next_pn && prev.is_none_or(|p| pn > p),
                "sent packet numbers not ascending",
            )?;
            prev = Some(pn);
            let flags = r.u8()?;
            r.check(flags & !0x0f == 0, "sent packet flags")?;
            if flags & 1 == 0 {
                r.check(flags == 0, "sent packet flags")?;
                s.packets.push_back(Slot { pn, packet: None });
                continue;
            }
            let info = SentInfo {
                time_sent: r.instant()?,
                size: r.u16()?,
                ack_eliciting: flags & 2 != 0,
                in_flight: flags & 4 != 0,
                mtu_probe: flags & 8 != 0,
            };
            let p = payload(r)?;
            if info.ack_eliciting {
                s.ack_eliciting_in_flight += 1;
            }
            if info.in_flight {
                s.bytes_in_flight += u64::from(info.size);
            }
            if !info.ack_eliciting && !info.in_flight {
                s.ack_only_tracked += 1;
            }
            s.outstanding += 1;
            s.packets.push_back(Slot {
                pn,
                packet: Some((info, p)),
            });
        }
        r.check(
            s.packets.front().is_none_or(|f| f.packet.is_some())
                && s.packets.back().is_none_or(|b| b.packet.is_some()),
            "sent packets end in a tombstone",
        )?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests;
