//! Byte-stream buffers: [`SendBuffer`] (what the application wrote, until the peer
//! acknowledges it) and [`RecvBuffer`] (what arrived, reassembled in order for the
//! application).
//!
//! Stream data is addressed by offset, as in QUIC (RFC 9000 §2.2): every byte has a fixed
//! offset in the stream, a STREAM frame carries a contiguous range of them, and the end of the
//! stream is marked by a FIN at the *final size* (RFC 9000 §4.5). Frames may be lost,
//! duplicated, reordered and re-cut differently when retransmitted; both buffers work on
//! offset ranges only, so none of that matters to them.
//!
//! # Call order (sender)
//!
//! 1. [`SendBuffer::write`] what the application offers; it takes what fits
//!    (backpressure) and [`finish`](SendBuffer::finish) ends the stream.
//! 2. When building a packet, [`poll_transmit`](SendBuffer::poll_transmit) with the room left
//!    for data; it returns the next [`StreamChunk`] (retransmissions first), whose bytes
//!    [`get`](SendBuffer::get) returns. Record the chunk in the packet's loss-detection
//!    payload.
//! 3. When that packet is acknowledged, [`on_acked`](SendBuffer::on_acked); when it is
//!    declared lost, [`on_lost`](SendBuffer::on_lost). Both take the chunk's range and FIN
//!    flag.
//! 4. On MAX_DATA from the peer, [`set_flow_limit`](SendBuffer::set_flow_limit).
//!
//! # Call order (receiver)
//!
//! 1. For each STREAM frame, [`RecvBuffer::write`]; an error other than
//!    [`RecvError::TooFragmented`] is a protocol violation by the peer.
//! 2. The application [`read`](RecvBuffer::read)s.
//! 3. After reads, [`poll_window_update`](RecvBuffer::poll_window_update) says when to
//!    advertise a larger limit (MAX_DATA).

use core::ops::Range;
use std::collections::VecDeque;

use super::OptU64;
use super::ranges::{DEFAULT_MAX_RANGES, RangeSet};
use crate::snapshot::{BlockReader, BlockWriter, SnapshotError};

/// Largest stream offset (RFC 9000 §4.5: "the largest value of a variable-length integer",
/// 2^62 − 1); no stream can extend beyond it.
pub const MAX_STREAM_OFFSET: u64 = (1 << 62) - 1;

/// A range of stream bytes to put in one STREAM frame, chosen by
/// [`SendBuffer::poll_transmit`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StreamChunk {
    /// The stream offsets carried; may be empty when the chunk only carries the FIN.
    pub range: Range<u64>,
    /// Whether the frame carries the FIN (`range.end` is then the final size).
    pub fin: bool,
}

/// Returned by [`SendBuffer::write`] after [`SendBuffer::finish`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("stream already finished")]
pub struct Finished;

/// FIN state of a send stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SendFin {
    /// The final size, once [`SendBuffer::finish`] was called.
    offset: OptU64,
    /// The FIN must be (re)sent.
    pending: bool,
    /// The peer acknowledged the FIN.
    acked: bool,
}

/// The sending half of a stream: the application's bytes from the first unacknowledged one
/// on, and which of them must be sent or resent. Plain data; see the
/// [module docs](self) for the call order.
///
/// # Memory
///
/// Holds at most `capacity` bytes; [`write`](Self::write) takes no more. Memory is freed as
/// soon as a *prefix* is acknowledged. The retransmission and acknowledgement sets are
/// [`RangeSet`]s capped at [`DEFAULT_MAX_RANGES`]; if one fills, the buffer degrades by
/// sending bytes more than once, never by losing any: a forgotten acknowledgement is
/// treated as a loss (the bytes are resent and acknowledged again), and overflowing
/// retransmissions are merged into one range covering them (resending some already
/// acknowledged bytes, which the receiver discards as duplicates).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendBuffer {
    /// Bytes at offsets `base .. base + data.len()`.
    data: VecDeque<u8>,
    /// Every byte below `base` was acknowledged and freed.
    base: u64,
    /// Most bytes `data` may hold.
    capacity: usize,
    /// Offset of the first byte never sent.
    unsent: u64,
    /// The peer's flow-control limit: no byte at or beyond it may be sent.
    flow_limit: u64,
    /// Sent ranges declared lost and not yet resent; within `base..unsent`.
    retransmit: RangeSet,
    /// Acknowledged ranges above `base`; within `base..unsent`.
    acked: RangeSet,
    fin: SendFin,
}

impl SendBuffer {
    /// An empty stream buffering at most `capacity` bytes, with no flow-control limit until
    /// [`set_flow_limit`](Self::set_flow_limit) sets one.
    pub fn new(capacity: usize) -> SendBuffer {
        SendBuffer {
            data: VecDeque::new(),
            base: 0,
            capacity,
            unsent: 0,
            flow_limit: MAX_STREAM_OFFSET,
            retransmit: RangeSet::with_max_ranges(DEFAULT_MAX_RANGES),
            acked: RangeSet::with_max_ranges(DEFAULT_MAX_RANGES),
            fin: SendFin::default(),
        }
    }

    /// Appends as much of `bytes` as fits and returns how much that was (0 when full: wait for
    /// acknowledgements). Fails once [`finish`](Self::finish) was called.
    pub fn write(&mut self, bytes: &[u8]) -> Result<usize, Finished> {
        if self.fin.offset.get().is_some() {
            return Err(Finished);
        }
        let room = self.capacity.saturating_sub(self.data.len());
        // Offsets are bounded by 2^62 - 1 (`end()` never exceeds it).
        let offset_room = usize::try_from(MAX_STREAM_OFFSET - self.end()).unwrap_or(usize::MAX);
        let n = bytes.len().min(room).min(offset_room);
        self.data.extend(&bytes[..n]);
        Ok(n)
    }

    /// Ends the stream after the bytes written so far; the FIN will be sent with the last
    /// chunk (or alone, if everything was already sent). Idempotent.
    pub fn finish(&mut self) {
        if self.fin.offset.get().is_none() {
            self.fin = SendFin {
                offset: OptU64::new(Some(self.end())),
                pending: true,
                acked: false,
            };
        }
    }

    /// Raises the flow-control limit to `max_offset` (MAX_DATA). Lower values are ignored
    /// (RFC 9000 §4.1: frames "that do not increase flow control limits" are ignored); the
    /// limit is capped at [`MAX_STREAM_OFFSET`].
    pub fn set_flow_limit(&mut self, max_offset: u64) {
        self.flow_limit = self.flow_limit.max(max_offset.min(MAX_STREAM_OFFSET));
    }

    /// Resets the flow-control limit to exactly `max_offset` (for the initial limit from the
    /// handshake, which may be lower than the unlimited default).
    pub fn set_initial_flow_limit(&mut self, max_offset: u64) {
        self.flow_limit = max_offset.min(MAX_STREAM_OFFSET);
    }

    /// The current flow-control limit.
    pub fn flow_limit(&self) -> u64 {
        self.flow_limit
    }

    /// If new data is waiting but flow control forbids sending it, the limit it is blocked
    /// at (worth telling the peer, as QUIC's DATA_BLOCKED does).
    pub fn blocked(&self) -> Option<u64> {
        (self.unsent < self.end() && self.unsent >= self.flow_limit).then_some(self.flow_limit)
    }

    /// Offset of the next byte the application writes: the stream's length so far.
    pub fn end(&self) -> u64 {
        self.base + self.data.len() as u64
    }

    /// Offset of the first byte never sent.
    pub fn unsent_offset(&self) -> u64 {
        self.unsent
    }

    /// Offset below which every byte was acknowledged (and freed).
    pub fn acked_offset(&self) -> u64 {
        self.base
    }

    /// Bytes held: written and not yet acknowledged as part of the prefix.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether no byte is held.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Most bytes the buffer holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes [`write`](Self::write) would take now.
    pub fn free(&self) -> usize {
        self.capacity.saturating_sub(self.data.len())
    }

    /// The final size, once [`finish`](Self::finish) was called.
    pub fn fin_offset(&self) -> Option<u64> {
        self.fin.offset.get()
    }

    /// Gives back memory not in use: the byte buffer if empty, spare room in the range sets.
    /// For idle periods (the buffer regrows on the next write).
    pub fn shrink_to_fit(&mut self) {
        if self.data.is_empty() {
            self.data = VecDeque::new();
        }
        self.retransmit.shrink_to_fit();
        self.acked.shrink_to_fit();
    }

    /// Whether [`shrink_to_fit`](Self::shrink_to_fit) would give back any memory.
    pub fn has_spare_capacity(&self) -> bool {
        (self.data.is_empty() && self.data.capacity() > 0)
            || self.retransmit.has_spare_capacity()
            || self.acked.has_spare_capacity()
    }

    /// Whether the stream is finished and every byte and the FIN were acknowledged.
    pub fn is_fully_acked(&self) -> bool {
        self.fin.acked && self.fin.offset.get() == Some(self.base)
    }

    /// Whether [`poll_transmit`](Self::poll_transmit) has something to send (given room).
    pub fn has_pending(&self) -> bool {
        self.retransmit
            .iter()
            .any(|r| self.acked.gaps(r).next().is_some())
            || self.unsent < self.end().min(self.flow_limit)
            || (self.fin.pending && self.fin.offset.get() == Some(self.unsent))
    }

    /// The next chunk to send, at most `max_len` bytes long: the lowest range awaiting
    /// retransmission, else new data within the flow-control limit, else a lone FIN. The
    /// chunk is considered sent when returned.
    pub fn poll_transmit(&mut self, max_len: usize) -> Option<StreamChunk> {
        let max_len = max_len as u64;
        if max_len > 0 {
            while let Some(r) = self.retransmit.pop_min() {
                // Skip what was acknowledged since it was queued.
                let Some(gap) = self.acked.gaps(r.clone()).next() else {
                    continue;
                };
                let end = gap.end.min(gap.start.saturating_add(max_len));
                if end < r.end {
                    // Put back the rest (one range for the one popped: the cap holds).
                    self.retransmit.insert(end..r.end);
                }
                return Some(self.chunk(gap.start..end));
            }
            let limit = self.end().min(self.flow_limit);
            if self.unsent < limit {
                let start = self.unsent;
                let end = limit.min(start.saturating_add(max_len));
                self.unsent = end;
                return Some(self.chunk(start..end));
            }
        }
        if self.fin.pending && self.fin.offset.get() == Some(self.unsent) {
            return Some(self.chunk(self.unsent..self.unsent));
        }
        None
    }

    /// The bytes of `range`, as two slices (the buffer is a ring), or `None` if any of them
    /// is no longer (or not yet) held.
    pub fn get(&self, range: Range<u64>) -> Option<(&[u8], &[u8])> {
        if range.start < self.base || range.end > self.end() || range.start > range.end {
            return None;
        }
        let start = usize::try_from(range.start - self.base).ok()?;
        let end = usize::try_from(range.end - self.base).ok()?;
        let (a, b) = self.data.as_slices();
        let split = a.len();
        Some((
            &a[start.min(split)..end.min(split)],
            &b[start.saturating_sub(split)..end.saturating_sub(split)],
        ))
    }

    /// The parts of `range` sent and not acknowledged (for a copy of a packet on another
    /// path: what the peer may still lack).
    pub fn unacked(&self, range: Range<u64>) -> impl Iterator<Item = Range<u64>> + '_ {
        self.acked.gaps(self.clamp_sent(range))
    }

    /// Whether the peer acknowledged the FIN.
    pub fn fin_acked(&self) -> bool {
        self.fin.acked
    }

    /// The peer acknowledged a chunk: `range` and, if `fin`, the FIN. Parts already
    /// acknowledged, or never sent, are ignored.
    pub fn on_acked(&mut self, range: Range<u64>, fin: bool) {
        if fin && self.fin.offset.get().is_some() {
            self.fin.acked = true;
            self.fin.pending = false;
        }
        let r = self.clamp_sent(range);
        if r.start >= r.end {
            return;
        }
        if r.start <= self.base {
            self.advance_base(r.end);
            return;
        }
        if self.acked.try_insert(r.clone()).is_err() {
            // Forget the lowest acknowledgement instead, and resend those bytes so that
            // they are acknowledged again.
            if let Some(forgotten) = self.acked.pop_min() {
                self.queue_retransmit(forgotten);
            }
            self.acked.insert(r);
        }
    }

    /// The peer has every byte and the FIN (it said so out of band): acknowledges all of it,
    /// freeing the buffer. Only once the stream is finished and every byte was sent at least
    /// once; returns whether it did.
    pub fn on_all_delivered(&mut self) -> bool {
        let Some(end) = self.fin.offset.get() else {
            return false;
        };
        if self.unsent != end {
            return false;
        }
        self.fin.acked = true;
        self.fin.pending = false;
        self.acked.clear();
        self.retransmit.clear();
        self.advance_base(end);
        true
    }

    /// A chunk was lost: queue the parts of `range` not acknowledged since for
    /// retransmission and, if `fin` and the FIN is not acknowledged, the FIN.
    pub fn on_lost(&mut self, range: Range<u64>, fin: bool) {
        if fin && self.fin.offset.get().is_some() && !self.fin.acked {
            self.fin.pending = true;
        }
        let r = self.clamp_sent(range);
        let gaps: Vec<Range<u64>> = self.acked.gaps(r).collect();
        for gap in gaps {
            self.queue_retransmit(gap);
        }
    }

    /// A chunk for `range`, attaching the FIN if the range ends at the final size.
    fn chunk(&mut self, range: Range<u64>) -> StreamChunk {
        let fin = !self.fin.acked && self.fin.offset.get() == Some(range.end);
        if fin {
            self.fin.pending = false;
        }
        StreamChunk { range, fin }
    }

    /// `range` restricted to bytes that were sent and are still held.
    fn clamp_sent(&self, range: Range<u64>) -> Range<u64> {
        range.start.max(self.base)..range.end.min(self.unsent)
    }

    fn queue_retransmit(&mut self, r: Range<u64>) {
        if self.retransmit.try_insert(r.clone()).is_err() {
            // Merge everything into one covering range: resending a few acknowledged bytes
            // is harmless, forgetting a lost one is not.
            let lo = self.retransmit.min().map_or(r.start, |m| m.min(r.start));
            let hi = self.retransmit.max().map_or(r.end, |m| (m + 1).max(r.end));
            self.retransmit.clear();
            self.retransmit.insert(lo..hi);
        }
    }

    /// Everything below `to` is acknowledged: move `base` there (and over any acknowledged
    /// ranges it now touches), freeing the memory.
    fn advance_base(&mut self, to: u64) {
        let mut base = to.max(self.base);
        while let Some(first) = self.acked.first() {
            if first.start > base {
                break;
            }
            base = base.max(first.end);
            self.acked.pop_min();
        }
        // `base <= unsent <= end()`, so the difference fits in the buffer's length.
        let freed = usize::try_from(base - self.base).unwrap_or(usize::MAX);
        self.data.drain(..freed.min(self.data.len()));
        self.base = base;
        self.retransmit.remove_below(base);
    }
}

/// Why [`RecvBuffer::write`] rejected a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecvError {
    /// Data beyond the advertised limit (RFC 9000 §4.1: FLOW_CONTROL_ERROR), or beyond the
    /// largest possible stream offset.
    #[error("stream data beyond the flow-control limit")]
    FlowControl,
    /// Data beyond the final size, a FIN at a different final size than before, or a FIN
    /// below data already received (RFC 9000 §4.5: FINAL_SIZE_ERROR).
    #[error("stream final size violated")]
    FinalSize,
    /// Not the peer's fault: accepting the segment would leave more separate gaps than the
    /// buffer tracks. The segment was dropped whole; the packet carrying it must not be
    /// acknowledged, so that the peer resends it.
    #[error("too many gaps in the received stream data")]
    TooFragmented,
}

impl RecvError {
    /// Whether the peer broke the protocol (the connection should be closed).
    pub fn is_protocol_violation(self) -> bool {
        !matches!(self, RecvError::TooFragmented)
    }
}

/// Most separate received ranges a [`RecvBuffer`] tracks (see
/// [`RecvError::TooFragmented`]): enough for every packet of a megabyte window to arrive
/// with a gap before it. The contiguous prefix (received, not yet read) counts as one range.
/// Only an out-of-order segment that would add a range beyond this bound is refused. One that
/// continues the contiguous prefix is always accepted, so the stream cannot stall on its next
/// bytes (it adds no out-of-order range; at most the prefix itself, one beyond the bound).
pub const MAX_RECV_RANGES: usize = 1024;

/// The receiving half of a stream: reassembles segments into the in-order byte stream.
/// Plain data; see the [module docs](self) for the call order.
///
/// # Fast path
///
/// The common case, a segment starting at or before the end of the contiguous data received
/// so far while nothing out of order is held, appends its new bytes to the buffer and moves
/// one offset: no range bookkeeping, no zero-filling. Out-of-order segments go through a
/// [`RangeSet`] of the ranges received beyond the contiguous prefix; the gaps between them
/// are zero-filled in the buffer until they arrive.
///
/// # Memory and trust
///
/// Bytes are accepted only below the advertised limit, so the buffer never holds more than
/// one window (the limit minus the read offset). Overlapping segments must carry identical
/// bytes (RFC 9000 §2.2); this is not trusted: the first copy of each byte wins and later
/// copies are ignored, so a peer cannot rewrite buffered data. Lengths and offsets are
/// checked, never trusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecvBuffer {
    /// Bytes at offsets `read .. read + buf.len()`: the contiguous prefix `read..contiguous`,
    /// then, if out-of-order ranges are held, everything up to the end of the highest one
    /// (zeros where nothing arrived yet). With no out-of-order range held,
    /// `buf.len() == contiguous - read`.
    buf: VecDeque<u8>,
    /// Offset of the next byte the application reads.
    read: u64,
    /// Every byte of `read..contiguous` was received (and none at `contiguous`).
    contiguous: u64,
    /// Received ranges beyond `contiguous`; none starts at or below it.
    out_of_order: RangeSet,
    /// The limit advertised to the peer.
    max_offset: u64,
    /// How far beyond the read offset the limit is set.
    window: u64,
    /// The final size, once a FIN arrived.
    fin: OptU64,
    /// Highest offset received (end of the furthest segment).
    highest: u64,
}

impl RecvBuffer {
    /// An empty stream accepting `window` bytes beyond what the application has read (the
    /// initial limit advertised to the peer is `window`).
    pub fn new(window: u64) -> RecvBuffer {
        let window = window.min(MAX_STREAM_OFFSET);
        RecvBuffer {
            buf: VecDeque::new(),
            read: 0,
            contiguous: 0,
            out_of_order: RangeSet::with_max_ranges(MAX_RECV_RANGES),
            max_offset: window,
            window,
            fin: OptU64::NONE,
            highest: 0,
        }
    }

    /// [`new`](Self::new) with another bound than [`MAX_RECV_RANGES`].
    #[cfg(test)]
    pub(crate) fn with_max_ranges(window: u64, max_ranges: usize) -> RecvBuffer {
        RecvBuffer {
            out_of_order: RangeSet::with_max_ranges(max_ranges),
            ..RecvBuffer::new(window)
        }
    }

    /// Accepts a segment: `data` at `offset`, with `fin` if it ends the stream. Returns how
    /// many bytes were new.
    ///
    /// Checks, in order (nothing changes on error): the segment must end within the
    /// advertised limit ([`RecvError::FlowControl`]); it must be consistent with any final
    /// size ([`RecvError::FinalSize`]); and, if it lies beyond the contiguous data, it must
    /// not fragment the buffer beyond [`MAX_RECV_RANGES`] ([`RecvError::TooFragmented`]).
    pub fn write(&mut self, offset: u64, data: &[u8], fin: bool) -> Result<usize, RecvError> {
        let end = u64::try_from(data.len())
            .ok()
            .and_then(|len| offset.checked_add(len))
            .ok_or(RecvError::FlowControl)?;
        if end > self.max_offset {
            return Err(RecvError::FlowControl);
        }
        match self.fin.get() {
            Some(size) if end > size || (fin && end != size) => return Err(RecvError::FinalSize),
            None if fin && end < self.highest => return Err(RecvError::FinalSize),
            _ => {}
        }
        // The buffer holds offsets from `read` on, so they must fit in usize (within the
        // window they always do where usize has 64 bits).
        if usize::try_from(end.saturating_sub(self.read)).is_err() {
            return Err(RecvError::FlowControl);
        }
        // Bytes below `contiguous` are duplicates.
        let start = offset.max(self.contiguous);
        let new = if start >= end {
            0
        } else if offset <= self.contiguous {
            // In order. Indices into `data` are below `data.len()`, so they fit in usize.
            let from = (start - offset) as usize;
            if self.out_of_order.is_empty() {
                // The fast path: the buffer ends at `contiguous`; append.
                self.buf.extend(&data[from..]);
                self.contiguous = end;
                data.len() - from
            } else {
                let new = self.fill(offset, data, start..end);
                self.contiguous = end;
                // Absorb the out-of-order ranges the segment reached.
                while let Some(r) = self.out_of_order.first() {
                    if r.start > self.contiguous {
                        break;
                    }
                    self.contiguous = self.contiguous.max(r.end);
                    self.out_of_order.pop_min();
                }
                new
            }
        } else {
            // Out of order: refused if it adds a range to track beyond the bound (the
            // contiguous prefix, if not empty, counts as one). Duplicates and segments that
            // merge with held ranges add none and are always accepted.
            let prefix = usize::from(self.contiguous > self.read);
            let after = self.out_of_order.len_after_insert(start..end);
            if after > self.out_of_order.len() && after + prefix > self.out_of_order.max_ranges() {
                return Err(RecvError::TooFragmented);
            }
            let new = self.fill(offset, data, start..end);
            // Cannot fail: the set's own bound was just checked (`prefix` only tightens it).
            let _ = self.out_of_order.try_insert(start..end);
            new
        };
        if fin {
            self.fin = OptU64::new(Some(end));
        }
        self.highest = self.highest.max(end);
        Ok(new)
    }

    /// Copies the bytes of `data` (at `offset`) that fall in `range` and were not received
    /// yet into the buffer, growing it as needed; returns how many. `range` lies within
    /// `contiguous..max_offset` and within the segment.
    fn fill(&mut self, offset: u64, data: &[u8], range: Range<u64>) -> usize {
        let mut new = 0;
        // Offsets relative to `offset` are below `data.len()` and offsets relative to `read`
        // below `end - read`, checked by `write`: both fit in usize.
        for gap in self.out_of_order.gaps(range) {
            let buf_end = self.read + self.buf.len() as u64;
            if gap.start < buf_end {
                let to = gap.end.min(buf_end);
                let src = &data[(gap.start - offset) as usize..(to - offset) as usize];
                copy_into(&mut self.buf, (gap.start - self.read) as usize, src);
            }
            if gap.end > buf_end {
                // Beyond the buffer: zero-fill up to the gap (bytes not received yet), then
                // append.
                let from = gap.start.max(buf_end);
                self.buf.resize((from - self.read) as usize, 0);
                self.buf
                    .extend(&data[(from - offset) as usize..(gap.end - offset) as usize]);
            }
            new += (gap.end - gap.start) as usize;
        }
        new
    }

    /// Copies the next in-order bytes into `out`; returns how many (0 if none are ready).
    pub fn read(&mut self, out: &mut [u8]) -> usize {
        let n = out
            .len()
            .min(usize::try_from(self.readable()).unwrap_or(usize::MAX));
        if n == 0 {
            return 0;
        }
        let (a, b) = self.buf.as_slices();
        let from_a = n.min(a.len());
        out[..from_a].copy_from_slice(&a[..from_a]);
        out[from_a..n].copy_from_slice(&b[..n - from_a]);
        self.buf.drain(..n);
        self.read += n as u64;
        n
    }

    /// Gives back memory not in use: the byte buffer if empty, spare room in the range set.
    /// For idle periods (the buffer regrows when data arrives).
    pub fn shrink_to_fit(&mut self) {
        if self.buf.is_empty() {
            self.buf = VecDeque::new();
        }
        self.out_of_order.shrink_to_fit();
    }

    /// Whether [`shrink_to_fit`](Self::shrink_to_fit) would give back any memory.
    pub fn has_spare_capacity(&self) -> bool {
        (self.buf.is_empty() && self.buf.capacity() > 0) || self.out_of_order.has_spare_capacity()
    }

    /// Bytes held: received and not yet read, with the out-of-order ranges between.
    pub fn held(&self) -> usize {
        self.buf.len()
    }

    /// Bytes [`read`](Self::read) can return now.
    pub fn readable(&self) -> u64 {
        self.contiguous - self.read
    }

    /// Offset of the next byte to be read (bytes read so far).
    pub fn read_offset(&self) -> u64 {
        self.read
    }

    /// The final size, once the FIN arrived.
    pub fn fin_offset(&self) -> Option<u64> {
        self.fin.get()
    }

    /// Whether the whole stream, up to the FIN, has been read.
    pub fn is_finished(&self) -> bool {
        self.fin.get() == Some(self.read)
    }

    /// Whether the peer may still send data this end awaits: its FIN has not arrived, or
    /// bytes before it are missing; and the advertised limit leaves it room or it has holes
    /// to fill (a peer at the limit with nothing missing is blocked by us, not silent).
    pub fn expects_more(&self) -> bool {
        let open = self.fin.get().is_none_or(|f| self.contiguous < f);
        open && (self.highest < self.max_offset || self.contiguous < self.highest)
    }

    /// How far beyond the read offset the limit is set.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// The flow-control limit currently advertised.
    pub fn max_offset(&self) -> u64 {
        self.max_offset
    }

    /// If the application has read at least half a window since the limit was last raised,
    /// raises it to `read offset + window` and returns the new limit to advertise (MAX_DATA).
    ///
    /// Advertising on every read would cost a frame per read; waiting for half a window keeps
    /// the sender from stalling (it always has at least half a window of credit) at one
    /// update per half window. No update is needed once the final size is known (RFC 9000
    /// §3.2: in the "Size Known" state the receiver "no longer needs to send" them).
    pub fn poll_window_update(&mut self) -> Option<u64> {
        if self.fin.get().is_some() {
            return None;
        }
        let limit = (self.read + self.window).min(MAX_STREAM_OFFSET);
        if limit.saturating_sub(self.max_offset) >= self.window.div_ceil(2).max(1) {
            self.max_offset = limit;
            Some(limit)
        } else {
            None
        }
    }
}

/// Snapshot encoding of the send buffer (docs/snapshot.md, STREAM block).
impl SendBuffer {
    /// Writes the buffer: offsets, flow-control limit, capacity, FIN state, the
    /// retransmission and acknowledgement sets, then the bytes held from `from` on (clamped
    /// to them: `base` for all of them). Returns where the bytes written start.
    pub(crate) fn encode(&self, w: &mut BlockWriter, from: u64) -> u64 {
        w.u64(self.base);
        w.u64(self.unsent);
        w.u64(self.flow_limit);
        w.u64(self.capacity as u64);
        w.opt_u64(self.fin.offset.get());
        w.u8(u8::from(self.fin.pending) | u8::from(self.fin.acked) << 1);
        self.retransmit.encode(w);
        self.acked.encode(w);
        let from = from.clamp(self.base, self.end());
        encode_tail(w, &self.data, (from - self.base) as usize);
        from
    }

    /// Reads the fields [`encode`](Self::encode) writes before the bytes, and returns the
    /// buffer's base (where the bytes of a whole encoding start). The reader is left at the
    /// bytes: a standby's replica splices them without decoding the buffer
    /// ([`Transport::stream_fields`](crate::transport::conn::Transport::stream_fields)).
    pub(crate) fn skip_head(r: &mut BlockReader<'_>) -> Result<u64, SnapshotError> {
        Ok(SendHead::read(r)?.base)
    }

    /// Reads a buffer written by [`encode`](Self::encode), checking every invariant the
    /// buffer's methods rely on.
    pub(crate) fn decode(r: &mut BlockReader<'_>) -> Result<SendBuffer, SnapshotError> {
        let SendHead {
            base,
            unsent,
            flow_limit,
            capacity,
            fin_offset,
            fin_flags,
            retransmit,
            acked,
        } = SendHead::read(r)?;
        let data = r.bytes()?;
        let end = base.checked_add(data.len() as u64);
        r.check(
            end.is_some_and(|e| e <= MAX_STREAM_OFFSET) && base <= unsent,
            "send offsets",
        )?;
        let end = end.unwrap_or(0);
        r.check(unsent <= end, "send offsets")?;
        r.check(flow_limit <= MAX_STREAM_OFFSET, "send flow limit")?;
        let pending = fin_flags & 1 != 0;
        let fin_acked = fin_flags & 2 != 0;
        r.check(
            match fin_offset {
                Some(f) => f == end,
                None => !pending && !fin_acked,
            },
            "send FIN",
        )?;
        let within =
            |s: &RangeSet| s.min().is_none_or(|m| m >= base) && s.max().is_none_or(|m| m < unsent);
        r.check(
            within(&retransmit) && within(&acked),
            "send ranges outside sent data",
        )?;
        Ok(SendBuffer {
            data: VecDeque::from(data.to_vec()),
            base,
            capacity,
            unsent,
            flow_limit,
            retransmit,
            acked,
            fin: SendFin {
                offset: OptU64::new(fin_offset),
                pending,
                acked: fin_acked,
            },
        })
    }
}

/// A send buffer's encoded fields before its bytes, in [`SendBuffer::encode`]'s order.
struct SendHead {
    base: u64,
    unsent: u64,
    flow_limit: u64,
    capacity: usize,
    fin_offset: Option<u64>,
    fin_flags: u8,
    retransmit: RangeSet,
    acked: RangeSet,
}

impl SendHead {
    fn read(r: &mut BlockReader<'_>) -> Result<SendHead, SnapshotError> {
        // Fields are read in the order written (a struct literal evaluates in source order).
        Ok(SendHead {
            base: r.u64()?,
            unsent: r.u64()?,
            flow_limit: r.u64()?,
            capacity: usize::try_from(r.u64()?).map_err(|_| r.malformed("send capacity"))?,
            fin_offset: r.opt_u64()?,
            fin_flags: {
                let flags = r.u8()?;
                r.check(flags & !3 == 0, "send FIN flags")?;
                flags
            },
            retransmit: RangeSet::decode(r, DEFAULT_MAX_RANGES, MAX_STREAM_OFFSET)?,
            acked: RangeSet::decode(r, DEFAULT_MAX_RANGES, MAX_STREAM_OFFSET)?,
        })
    }
}

/// A receive buffer's encoded fields before its bytes, in [`RecvBuffer::encode`]'s order.
struct RecvHead {
    read: u64,
    contiguous: u64,
    highest: u64,
    max_offset: u64,
    window: u64,
    fin: Option<u64>,
    out_of_order: RangeSet,
}

impl RecvHead {
    fn read(r: &mut BlockReader<'_>) -> Result<RecvHead, SnapshotError> {
        Ok(RecvHead {
            read: r.u64()?,
            contiguous: r.u64()?,
            highest: r.u64()?,
            max_offset: r.u64()?,
            window: r.u64()?,
            fin: r.opt_u64()?,
            out_of_order: RangeSet::decode(r, MAX_RECV_RANGES, MAX_STREAM_OFFSET)?,
        })
    }
}

/// Snapshot encoding of the receive buffer (docs/snapshot.md, STREAM block).
impl RecvBuffer {
    /// Writes the buffer: offsets, limit and window, final size, out-of-order ranges, then
    /// the bytes held from `from` on (clamped to them: `read` for all of them), zeros in the
    /// gaps not received yet. Returns where the bytes written start.
    pub(crate) fn encode(&self, w: &mut BlockWriter, from: u64) -> u64 {
        w.u64(self.read);
        w.u64(self.contiguous);
        w.u64(self.highest);
        w.u64(self.max_offset);
        w.u64(self.window);
        w.opt_u64(self.fin.get());
        self.out_of_order.encode(w);
        let from = from.clamp(self.read, self.read + self.buf.len() as u64);
        encode_tail(w, &self.buf, (from - self.read) as usize);
        from
    }

    /// The end of the bytes received without a gap.
    pub(crate) fn contiguous_end(&self) -> u64 {
        self.contiguous
    }

    /// Reads the fields [`encode`](Self::encode) writes before the bytes, and returns the
    /// read offset (where the bytes of a whole encoding start); the reader is left at the
    /// bytes (see [`SendBuffer::skip_head`]).
    pub(crate) fn skip_head(r: &mut BlockReader<'_>) -> Result<u64, SnapshotError> {
        Ok(RecvHead::read(r)?.read)
    }

    /// Reads a buffer written by [`encode`](Self::encode), checking every invariant the
    /// buffer's methods rely on.
    pub(crate) fn decode(r: &mut BlockReader<'_>) -> Result<RecvBuffer, SnapshotError> {
        let RecvHead {
            read,
            contiguous,
            highest,
            max_offset,
            window,
            fin,
            out_of_order,
        } = RecvHead::read(r)?;
        let buf = r.bytes()?;
        r.check(
            read <= contiguous
                && contiguous <= highest
                && highest <= max_offset
                && max_offset <= MAX_STREAM_OFFSET
                && window <= MAX_STREAM_OFFSET,
            "receive offsets",
        )?;
        r.check(
            out_of_order.min().is_none_or(|m| m > contiguous),
            "out-of-order range at or below the contiguous data",
        )?;
        let buf_end = out_of_order.max().map_or(contiguous, |m| m + 1);
        r.check(
            buf_end <= highest && read.checked_add(buf.len() as u64) == Some(buf_end),
            "receive buffer length",
        )?;
        r.check(
            fin.is_none_or(|f| highest <= f && f <= max_offset),
            "receive final size",
        )?;
        Ok(RecvBuffer {
            buf: VecDeque::from(buf.to_vec()),
            read,
            contiguous,
            out_of_order,
            max_offset,
            window,
            fin: OptU64::new(fin),
            highest,
        })
    }
}

/// Writes `data[skip..]` as a `bytes` field.
fn encode_tail(w: &mut BlockWriter, data: &VecDeque<u8>, skip: usize) {
    let (a, b) = data.as_slices();
    let (a, b) = if skip <= a.len() {
        (&a[skip..], b)
    } else {
        (&[][..], &b[skip - a.len()..])
    };
    w.u32(u32::try_from(a.len() + b.len()).unwrap_or(u32::MAX));
    w.raw(a);
    w.raw(b);
}

/// Copies `src` into `buf` starting at index `at`; the caller guarantees
/// `at + src.len() <= buf.len()`.
fn copy_into(buf: &mut VecDeque<u8>, at: usize, src: &[u8]) {
    let (a, b) = buf.as_mut_slices();
    if at < a.len() {
        let in_a = (a.len() - at).min(src.len());
        a[at..at + in_a].copy_from_slice(&src[..in_a]);
        b[..src.len() - in_a].copy_from_slice(&src[in_a..]);
    } else {
        let at = at - a.len();
        b[at..at + src.len()].copy_from_slice(src);
    }
}

#[cfg(test)]
mod tests;
