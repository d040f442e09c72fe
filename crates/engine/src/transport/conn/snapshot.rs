//! Export and import of a [`Transport`] into the connection snapshot (docs/snapshot.md):
//! the STREAM, DGRAM, TRANSPORT, PATH and COUNTERS blocks.

use super::path::Path;
use super::*;
use crate::snapshot::{
    BlockReader, BlockWriter, SnapshotError, SnapshotReader, SnapshotWriter, StreamCover, block,
    path_section,
};

/// Event kinds as written in the TRANSPORT block (0 is an empty slot).
const EVENT_KINDS: [EventKind; 7] = [
    EventKind::Readable,
    EventKind::Writable,
    EventKind::Finished,
    EventKind::AllAcked,
    EventKind::DatagramReceived,
    EventKind::Closed,
    EventKind::IdleTimeout,
];

fn event_code(k: EventKind) -> u8 {
    EVENT_KINDS
        .iter()
        .position(|&x| x == k)
        .map_or(0, |i| i as u8 + 1)
}

/// Where a STREAM block's two byte fields are, as ranges of its body (each with its 4-byte
/// length prefix), and the offsets a whole block's fields start at: what a standby's replica
/// needs to splice stream bytes without decoding the buffers (`snapshot::delta`).
#[derive(Debug)]
pub(crate) struct StreamFields {
    /// The send buffer's bytes.
    pub(crate) send: core::ops::Range<usize>,
    /// The send buffer's base.
    pub(crate) send_base: u64,
    /// The receive buffer's bytes.
    pub(crate) recv: core::ops::Range<usize>,
    /// The receive buffer's read offset.
    pub(crate) recv_read: u64,
}

/// The STREAM block's fields between the two buffers: the highest offset sent, and whether a
/// MAX_DATA is pending.
fn stream_middle(b: &mut BlockReader<'_>) -> Result<(u64, bool), SnapshotError> {
    Ok((b.u64()?, b.bool()?))
}

impl Transport {
    /// Walks a STREAM block's body as [`export`](Self::export) writes it (a delta's two
    /// trailing offsets cut off first), checking only its framing (the buffers' decoders
    /// check the values when the block is imported). Anything after the receive bytes is
    /// left alone: fields a later version appends.
    pub(crate) fn stream_fields(body: &[u8]) -> Result<StreamFields, SnapshotError> {
        let mut r = BlockReader::new(block::STREAM, body, Instant::ZERO);
        let bytes = |r: &mut BlockReader<'_>| -> Result<core::ops::Range<usize>, SnapshotError> {
            let at = body.len() - r.remaining();
            Ok(at..at + 4 + r.bytes()?.len())
        };
        let send_base = SendBuffer::skip_head(&mut r)?;
        let send = bytes(&mut r)?;
        stream_middle(&mut r)?;
        let recv_read = RecvBuffer::skip_head(&mut r)?;
        let recv = bytes(&mut r)?;
        Ok(StreamFields {
            send,
            send_base,
            recv,
            recv_read,
        })
    }
}

/// A UTF-8 string prefixed by its `u32` length.
fn decode_string(r: &mut BlockReader<'_>) -> Result<String, SnapshotError> {
    let b = r.bytes()?;
    core::str::from_utf8(b)
        .map(str::to_owned)
        .map_err(|_| r.malformed("reason not UTF-8"))
}

/// A queue of datagrams: `count u32`, then each as `len u32 | bytes`.
fn encode_queue(w: &mut BlockWriter, q: &VecDeque<Vec<u8>>) {
    w.u32(u32::try_from(q.len()).unwrap_or(u32::MAX));
    for d in q {
        w.bytes(d);
    }
}

fn decode_queue(r: &mut BlockReader<'_>) -> Result<VecDeque<Vec<u8>>, SnapshotError> {
    let n = r.count(4)?;
    let mut q = VecDeque::new();
    for _ in 0..n {
        let d = r.bytes()?;
        r.check(d.len() <= usize::from(u16::MAX), "datagram too long")?;
        q.push_back(d.to_vec());
    }
    Ok(q)
}

impl SentPayload {
    /// `n_chunks u8 | fins u8 | flags u8 (bit 0 MAX_DATA, bit 1 ACK) | [ack_largest u64] |
    /// (start u64 | len u16) × n_chunks`.
    fn encode(&self, w: &mut BlockWriter) {
        w.u8(self.n_chunks);
        w.u8(self.fins);
        w.u8(u8::from(self.max_data) | u8::from(self.has_ack) << 1);
        if self.has_ack {
            w.u64(self.ack_largest);
        }
        for i in 0..usize::from(self.n_chunks).min(MAX_STREAM_FRAMES) {
            w.u64(self.starts[i]);
            w.u16(self.lens[i]);
        }
    }

    fn decode(r: &mut BlockReader<'_>) -> Result<SentPayload, SnapshotError> {
        let mut p = SentPayload {
            n_chunks: r.u8()?,
            fins: r.u8()?,
            ..SentPayload::default()
        };
        let flags = r.u8()?;
        r.check(
            usize::from(p.n_chunks) <= MAX_STREAM_FRAMES
                && u32::from(p.fins) >> p.n_chunks == 0
                && flags & !3 == 0,
            "sent packet payload",
        )?;
        p.max_data = flags & 1 != 0;
        p.has_ack = flags & 2 != 0;
        if p.has_ack {
            p.ack_largest = r.u64()?;
        }
        for i in 0..usize::from(p.n_chunks) {
            let (start, len) = (r.u64()?, r.u16()?);
            r.check(
                start
                    .checked_add(u64::from(len))
                    .is_some_and(|e| e <= MAX_STREAM_OFFSET),
                "sent chunk beyond the stream",
            )?;
            if let (Some(s), Some(l)) = (p.starts.get_mut(i), p.lens.get_mut(i)) {
                *s = start;
                *l = len;
            }
        }
        Ok(p)
    }
}

impl Transport {
    /// How far a checkpoint taken now carries the stream's bytes.
    pub fn stream_cover(&self) -> StreamCover {
        StreamCover {
            send_end: self.send.end(),
            recv_end: self.recv.contiguous_end(),
        }
    }

    /// Writes the transport's state into `w` as the blocks STREAM, DGRAM (when a datagram
    /// queue exists), TRANSPORT, PATH (path 0) and COUNTERS, every instant relative to
    /// [`w.now()`](SnapshotWriter::now). Meant for a [frozen](Self::set_frozen) transport
    /// (docs/moving-flows.md §3.2), but any state can be exported; exporting changes
    /// nothing. Fails only if a block would exceed the format's 32-bit lengths, or if `w`
    /// already holds one of these blocks.
    pub fn export(&self, w: &mut SnapshotWriter) -> Result<(), SnapshotError> {
        let since = w.delta_since();
        let mut b = w.body();
        let send_from = self.send.encode(&mut b, since.map_or(0, |c| c.send_end));
        b.u64(self.sent_high);
        b.bool(self.max_data_pending);
        let recv_from = self.recv.encode(&mut b, since.map_or(0, |c| c.recv_end));
        if since.is_some() {
            // A delta's STREAM block ends with where its two byte fields start
            // (docs/snapshot.md §5).
            b.u64(send_from);
            b.u64(recv_from);
        }
        w.add(block::STREAM, b)?;

        if let Some(d) = &self.dgrams {
            let mut b = w.body();
            encode_queue(&mut b, &d.out);
            encode_queue(&mut b, &d.inbound);
            w.add(block::DGRAM, b)?;
        }

        let mut b = w.body();
        self.encode_connection(&mut b);
        w.add(block::TRANSPORT, b)?;

        let mut b = w.body();
        b.u32(0); // path ID
        b.section(path_section::TRANSPORT, |b| self.primary().encode(b));
        w.add(block::PATH, b)?;

        let mut b = w.body();
        self.encode_counters(&mut b);
        w.add(block::COUNTERS, b)
    }

    /// Recreates a transport from the blocks [`export`](Self::export) wrote, with every
    /// instant rebased on `now` (the importer's clock): a deadline that was 5 ms ahead at
    /// export is 5 ms ahead of `now`.
    ///
    /// The connection's state, and every setting the peer relies on (windows, ACK delay,
    /// congestion algorithm, MTU bounds, SAL overhead), come from the snapshot. Five
    /// settings are this host's policy and come from `config` instead: `keepalive`,
    /// `idle_timeout`, `datagram_queue`, `silence_probe` and `scheduler` (so importing with the
    /// exporter's [`config`](Self::config) restores the transport exactly, but for the
    /// silence probe's state, which starts unarmed).
    ///
    /// Refused with [`SnapshotError::Malformed`] when a required block (STREAM, TRANSPORT,
    /// exactly one PATH, with path ID 0 and a transport section) is missing or does not
    /// decode to a consistent state; nothing a snapshot holds can make the transport panic
    /// later. A transport exported while frozen comes back frozen.
    pub fn import(
        r: &SnapshotReader<'_>,
        now: Instant,
        config: &TransportConfig,
    ) -> Result<Transport, SnapshotError> {
        let mut b = r.require(block::STREAM, now)?;
        let send = SendBuffer::decode(&mut b)?;
        let (sent_high, max_data_pending) = stream_middle(&mut b)?;
        let recv = RecvBuffer::decode(&mut b)?;

        let dgrams = match r.block(block::DGRAM, now) {
            None => None,
            Some(mut b) => {
                let out = decode_queue(&mut b)?;
                let inbound = decode_queue(&mut b)?;
                Some(Box::new(Datagrams { out, inbound }))
            }
        };

        let mut b = r.require(block::TRANSPORT, now)?;
        let conn = Connection::decode(&mut b)?;

        let mut paths = r.blocks(block::PATH, now);
        let mut b = paths.next().ok_or(SnapshotError::Malformed {
            block: block::PATH,
            reason: "required block missing",
        })?;
        b.check(paths.next().is_none(), "more than one path")?;
        let path_id = b.u32()?;
        b.check(path_id == 0, "path ID other than 0")?;
        let mut section = None;
        while let Some((kind, s)) = b.section()? {
            if kind == path_section::TRANSPORT {
                section = Some(s);
            }
        }
        let mut s = section.ok_or(b.malformed("no transport section"))?;
        let path = Path::decode(&mut s)?;

        let stats = match r.block(block::COUNTERS, now) {
            None => Counters::default(),
            Some(mut b) => decode_counters(&mut b)?,
        };

        let sal = conn.settings.sal_overhead;
        let mtu_config = *path.mtu.config();
        b.check(
            mtu_config.base >= sal.saturating_add(MIN_TRANSPORT_PAYLOAD),
            "base MTU leaves no room for a transport payload",
        )?;

        // Host policy from `config`, normalized as `Transport::new` would.
        let local = TransportConfig {
            keepalive: config.keepalive,
            idle_timeout: config.idle_timeout,
            datagram_queue: config.datagram_queue,
            silence_probe: config.silence_probe,
            scheduler: config.scheduler,
            ..TransportConfig::default()
        }
        .normalized();
        let local = Settings::new(&local);
        let settings = Settings {
            idle_timeout: local.idle_timeout,
            keepalive: local.keepalive,
            datagram_queue: local.datagram_queue,
            silence_probe: local.silence_probe,
            scheduler: local.scheduler,
            ..conn.settings
        };
        let mut path = path;
        path.sent.set_max_pto_interval(settings.idle_timeout() / 8);

        Ok(Transport {
            config: settings,
            state: conn.state,
            frozen: conn.frozen,
            path,
            others: super::path::OtherPaths::default(),
            send,
            max_data_pending,
            window_unannounced: true,
            sent_high,
            dgrams,
            recv,
            liveness: Default::default(),
            events: conn.events,
            readable_armed: conn.flags & 1 != 0,
            dgram_armed: conn.flags & 2 != 0,
            write_blocked: conn.flags & 4 != 0,
            finished_reported: conn.flags & 8 != 0,
            all_acked_reported: conn.flags & 16 != 0,
            memory_released: conn.flags & 32 != 0,
            path_frames: Vec::new(),
            stats,
        })
    }

    /// The TRANSPORT block's body.
    fn encode_connection(&self, b: &mut BlockWriter) {
        let c = &self.config;
        b.u64(c.idle_timeout);
        b.u64(c.keepalive);
        b.u64(c.max_ack_delay);
        b.u32(c.datagram_queue);
        b.u32(c.ack_eliciting_threshold);
        b.u16(c.sal_overhead);
        b.bool(self.frozen);
        match &self.state {
            State::Open => b.u8(0),
            State::Closing(c) => {
                b.u8(1);
                b.u64(c.code);
                b.instant(c.deadline);
                b.bytes(c.reason.as_bytes());
            }
            State::Closed(Ended::Local) => b.u8(2),
            State::Closed(Ended::Peer(code)) => {
                b.u8(3);
                b.u64(*code);
            }
            State::Closed(Ended::Idle) => b.u8(4),
        }
        b.u8(u8::from(self.readable_armed)
            | u8::from(self.dgram_armed) << 1
            | u8::from(self.write_blocked) << 2
            | u8::from(self.finished_reported) << 3
            | u8::from(self.all_acked_reported) << 4
            | u8::from(self.memory_released) << 5);
        for k in &self.events.kinds {
            b.u8(k.map_or(0, event_code));
        }
        match &self.events.closed {
            None => b.u8(0),
            Some(c) => {
                b.u8(1);
                b.bool(c.by_peer);
                b.u64(c.code);
                b.bytes(c.reason.as_bytes());
            }
        }
    }

    /// The COUNTERS block's body: the 64-bit counters, then the 32-bit ones, in the order
    /// of docs/snapshot.md.
    fn encode_counters(&self, b: &mut BlockWriter) {
        let c = &self.stats;
        for v in [
            c.packets_sent,
            c.bytes_sent,
            c.packets_received,
            c.bytes_received,
            c.packets_lost,
            c.bytes_lost,
            c.stream_bytes_sent,
            c.retransmitted_bytes,
            c.stream_bytes_received,
            c.duplicate_packets,
            c.duplicate_stream_bytes,
            c.spurious_losses,
            c.datagrams_sent,
            c.datagrams_received,
            c.datagrams_dropped,
            c.malformed_packets,
            c.fragmented_drops,
        ] {
            b.u64(v);
        }
        for v in [
            c.congestion_events,
            c.persistent_congestion,
            c.probe_timeouts,
            c.mtu_probes_sent,
            c.mtu_probes_lost,
            c.black_holes,
            c.protocol_violations,
        ] {
            b.u32(v);
        }
    }
}

fn decode_counters(b: &mut BlockReader<'_>) -> Result<Counters, SnapshotError> {
    let mut c = Counters::default();
    for v in [
        &mut c.packets_sent,
        &mut c.bytes_sent,
        &mut c.packets_received,
        &mut c.bytes_received,
        &mut c.packets_lost,
        &mut c.bytes_lost,
        &mut c.stream_bytes_sent,
        &mut c.retransmitted_bytes,
        &mut c.stream_bytes_received,
        &mut c.duplicate_packets,
        &mut c.duplicate_stream_bytes,
        &mut c.spurious_losses,
        &mut c.datagrams_sent,
        &mut c.datagrams_received,
        &mut c.datagrams_dropped,
        &mut c.malformed_packets,
        &mut c.fragmented_drops,
    ] {
        *v = b.u64()?;
        // No connection counts 2^62 packets or bytes; the transport adds to these without
        // saturating.
        b.check(*v <= VARINT_MAX, "counter out of range")?;
    }
    for v in [
        &mut c.congestion_events,
        &mut c.persistent_congestion,
        &mut c.probe_timeouts,
        &mut c.mtu_probes_sent,
        &mut c.mtu_probes_lost,
        &mut c.black_holes,
        &mut c.protocol_violations,
    ] {
        *v = b.u32()?;
    }
    Ok(c)
}

/// What the TRANSPORT block decodes to.
struct Connection {
    settings: Settings,
    frozen: bool,
    state: State,
    flags: u8,
    events: EventQueue,
}

impl Connection {
    fn decode(b: &mut BlockReader<'_>) -> Result<Connection, SnapshotError> {
        let settings = Settings {
            idle_timeout: b.u64()?,
            keepalive: b.u64()?,
            max_ack_delay: b.u64()?,
            datagram_queue: b.u32()?,
            ack_eliciting_threshold: b.u32()?,
            sal_overhead: b.u16()?,
            // Host policy: the importer's configuration sets them.
            silence_probe: false,
            scheduler: super::Scheduler::LowestRtt,
        };
        b.check(
            settings.max_ack_delay() <= MAX_MAX_ACK_DELAY && settings.ack_eliciting_threshold >= 1,
            "transport settings",
        )?;
        let frozen = b.bool()?;
        let state = match b.u8()? {
            0 => State::Open,
            1 => {
                let code = b.u64()?;
                let deadline = b.instant()?;
                let reason = decode_string(b)?;
                State::Closing(Box::new(Closing {
                    code,
                    reason,
                    deadline,
                }))
            }
            2 => State::Closed(Ended::Local),
            3 => State::Closed(Ended::Peer(b.u64()?)),
            4 => State::Closed(Ended::Idle),
            _ => return Err(b.malformed("transport state")),
        };
        let flags = b.u8()?;
        b.check(flags & !0x3f == 0, "transport flags")?;
        let mut events = EventQueue::default();
        let mut ended = false;
        for i in 0..events.kinds.len() {
            let kind = match b.u8()? {
                0 => None,
                c => Some(
                    *EVENT_KINDS
                        .get(usize::from(c) - 1)
                        .ok_or(b.malformed("event kind"))?,
                ),
            };
            b.check(
                !(ended && kind.is_some()) && (kind.is_none() || !events.kinds.contains(&kind)),
                "event queue",
            )?;
            ended |= kind.is_none();
            if let Some(slot) = events.kinds.get_mut(i) {
                *slot = kind;
            }
        }
        events.closed = match b.u8()? {
            0 => None,
            1 => {
                let by_peer = b.bool()?;
                let code = b.u64()?;
                let reason = decode_string(b)?;
                Some(Box::new(ClosedEvent {
                    by_peer,
                    code,
                    reason,
                }))
            }
            _ => return Err(b.malformed("closed event flag")),
        };
        b.check(
            events.closed.is_some() == events.kinds.contains(&Some(EventKind::Closed)),
            "closed event",
        )?;
        Ok(Connection {
            settings,
            frozen,
            state,
            flags,
            events,
        })
    }
}

impl Path {
    /// The transport section of the PATH block.
    fn encode(&self, b: &mut BlockWriter) {
        self.sent.encode(b, SentPayload::encode);
        self.rtt.encode(b);
        self.cc.encode(b);
        self.pacer.encode(b);
        self.mtu.encode(b);
        b.opt_instant(self.pacing_until.get());
        b.u8(self.pto_probes);
        b.bool(self.ping_pending);
        b.bool(self.bulk);
        self.lost_pns.encode(b);
        let a = &self.ack;
        a.received.encode(b);
        b.u64(a.dedup_floor);
        b.u64(a.ack_floor);
        b.instant(a.largest_at);
        b.bool(a.pending);
        b.u32(a.eliciting_since);
        b.bool(a.immediate);
        b.opt_instant(a.deadline.get());
        b.instant(self.last_sent);
        b.instant(self.last_received);
    }

    /// Decodes the PATH block's transport section.
    fn decode(b: &mut BlockReader<'_>) -> Result<Path, SnapshotError> {
        let sent = SentPackets::decode(b, SentPayload::decode)?;
        let rtt = RttEstimator::decode(b)?;
        let cc = CongestionController::decode(b)?;
        let pacer = Pacer::decode(b)?;
        let mtu = PathMtu::decode(b)?;
        let pacing_until = b.opt_instant()?.into();
        let pto_probes = b.u8()?;
        b.check(pto_probes <= PTO_PROBE_PACKETS, "PTO probes")?;
        let ping_pending = b.bool()?;
        let bulk = b.bool()?;
        let lost_pns = RangeSet::decode(b, 64, VARINT_MAX + 1)?;
        let received = RangeSet::decode(b, MAX_RECEIVED_RANGES + 1, VARINT_MAX + 1)?;
        b.check(
            received.len() <= MAX_RECEIVED_RANGES,
            "too many received ranges",
        )?;
        let ack = AckState {
            received,
            dedup_floor: b.u64()?,
            ack_floor: b.u64()?,
            largest_at: b.instant()?,
            pending: b.bool()?,
            eliciting_since: b.u32()?,
            immediate: b.bool()?,
            deadline: b.opt_instant()?.into(),
            ranges: Vec::new(),
        };
        Ok(Path {
            id: 0,
            usable: true,
            backup: false,
            failed: false,
            sent,
            rtt,
            cc,
            pacer,
            mtu,
            pacing_until,
            pto_probes,
            ping_pending,
            bulk,
            lost_pns,
            ack,
            last_sent: b.instant()?,
            last_received: b.instant()?,
            bytes_sent: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_cc(f: impl FnOnce(&mut BlockWriter)) -> Result<CongestionController, SnapshotError> {
        let mut w = BlockWriter::new(Instant::ZERO);
        f(&mut w);
        let bytes = w.into_bytes();
        CongestionController::decode(&mut BlockReader::new(block::PATH, &bytes, Instant::ZERO))
    }

    #[test]
    fn controllers_round_trip_and_refuse_impossible_windows() {
        for algorithm in [CongestionAlgorithm::NewReno, CongestionAlgorithm::Cubic] {
            let mut cc = CongestionController::new(algorithm, 1200);
            cc.on_congestion_event(Instant::from_nanos(5), Instant::ZERO, false);
            let decoded = decode_cc(|w| cc.encode(w)).expect("round trip");
            assert_eq!(decoded, cc);
        }
        // A NewReno window of 0 would divide by zero in congestion avoidance.
        let zero_window = decode_cc(|w| {
            w.u8(1);
            w.u16(1200);
            w.u64(0);
            w.u64(0);
            w.opt_instant(None);
            w.u64(0);
        });
        assert!(matches!(zero_window, Err(SnapshotError::Malformed { .. })));
        let nan = decode_cc(|w| {
            w.u8(2);
            w.u16(1200);
            w.f64(f64::NAN);
        });
        assert!(matches!(nan, Err(SnapshotError::Malformed { .. })));
        assert!(decode_cc(|w| w.u8(3)).is_err(), "unknown algorithm");
    }

    #[test]
    fn sent_payloads_round_trip_and_refuse_chunks_beyond_the_stream() {
        let mut p = SentPayload::default();
        p.push_chunk(10..1200, false);
        p.push_chunk(5000..5010, true);
        p.max_data = true;
        p.set_ack(Some(77));
        let mut w = BlockWriter::new(Instant::ZERO);
        p.encode(&mut w);
        let bytes = w.into_bytes();
        let mut r = BlockReader::new(block::PATH, &bytes, Instant::ZERO);
        assert_eq!(SentPayload::decode(&mut r), Ok(p));
        assert_eq!(r.remaining(), 0);

        let mut w = BlockWriter::new(Instant::ZERO);
        w.u8(1);
        w.u8(0);
        w.u8(0);
        w.u64(MAX_STREAM_OFFSET);
        w.u16(1);
        let bytes = w.into_bytes();
        let mut r = BlockReader::new(block::PATH, &bytes, Instant::ZERO);
        assert!(SentPayload::decode(&mut r).is_err());
    }
}
