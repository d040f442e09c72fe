//! Delta checkpoints (docs/snapshot.md §5): what a hot standby receives after the first
//! checkpoint of a stream.
//!
//! A checkpoint of a bulk stream is mostly its stream bytes: the send buffer (up to its
//! capacity, megabytes) and the received bytes the application has not read. Those bytes
//! never change once written or received in order, so a checkpoint taken *since* an earlier
//! one ([`SnapshotWriter::set_delta`](super::SnapshotWriter::set_delta) with that one's
//! [`StreamCover`](super::StreamCover)) leaves out the bytes the earlier one carried; every
//! other block is whole (they are small: sequence state, sent-packet records, timers). A
//! [`Replica`] applies a chain of them and rebuilds the whole snapshot when it is needed, at
//! a takeover. Applying costs what the delta holds, not what the stream buffers.

use std::collections::VecDeque;

use super::{BlockReader, FLAG_DELTA, SnapshotError, SnapshotReader, assemble, block};
use crate::Instant;
use crate::transport::conn::Transport;

/// Stream bytes at consecutive offsets from `start`.
#[derive(Clone, Debug, Default)]
struct Log {
    start: u64,
    bytes: VecDeque<u8>,
}

impl Log {
    fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }

    /// Whether it holds `[from, cut)` (trivially when that is empty).
    fn holds(&self, from: u64, cut: u64) -> bool {
        from >= cut || (self.start <= from && cut <= self.end())
    }

    /// Keeps `[from, cut)` of what it holds (it must: [`holds`](Self::holds)) and appends
    /// `tail`, the bytes from `cut` on.
    fn splice(&mut self, from: u64, cut: u64, tail: &[u8]) {
        if from < cut {
            self.bytes.truncate((cut - self.start) as usize);
            self.bytes.drain(..(from - self.start) as usize);
        } else {
            self.bytes.clear();
        }
        self.start = from;
        self.bytes.extend(tail);
    }

    /// Exactly `data`, from `start`.
    fn set(&mut self, start: u64, data: &[u8]) {
        self.start = start;
        self.bytes.clear();
        self.bytes.extend(data);
    }
}

/// Where a STREAM block's two byte fields are, and the offsets they start at.
struct StreamLayout {
    /// Where the block's fields end: before a delta's two offsets.
    fields_end: usize,
    /// The send data's `bytes` field (its length prefix included), as a range of the body.
    send: core::ops::Range<usize>,
    /// The first byte the send data is at: the buffer's base, or a delta's `send from`.
    send_from: u64,
    /// The send buffer's base.
    send_base: u64,
    /// The same for the receive data.
    recv: core::ops::Range<usize>,
    recv_from: u64,
    recv_read: u64,
}

impl StreamLayout {
    /// Finds the byte fields of a STREAM body (docs/snapshot.md §3.1; a delta's last 16
    /// bytes are `send from` and `recv from`) with the transport's own walk of the block.
    /// Only the framing is checked here: the transport's decoder checks the values of the
    /// rebuilt block.
    fn parse(body: &[u8], delta: bool) -> Result<StreamLayout, SnapshotError> {
        let malformed = |reason| SnapshotError::Malformed {
            block: block::STREAM,
            reason,
        };
        let (body, offsets) = if delta {
            let cut = body
                .len()
                .checked_sub(16)
                .ok_or(malformed("delta without its offsets"))?;
            body.split_at(cut)
        } else {
            (body, &[][..])
        };
        let f = Transport::stream_fields(body)?;
        let (send_from, recv_from) = if delta {
            let mut o = BlockReader::new(block::STREAM, offsets, Instant::ZERO);
            (o.u64()?, o.u64()?)
        } else {
            (f.send_base, f.recv_read)
        };
        let (send_len, recv_len) = ((f.send.len() - 4) as u64, (f.recv.len() - 4) as u64);
        if send_from < f.send_base || recv_from < f.recv_read {
            return Err(malformed("delta starts below the buffers"));
        }
        if send_from.checked_add(send_len).is_none() || recv_from.checked_add(recv_len).is_none() {
            return Err(malformed("stream offsets"));
        }
        Ok(StreamLayout {
            fields_end: body.len(),
            send: f.send,
            send_from,
            send_base: f.send_base,
            recv: f.recv,
            recv_from,
            recv_read: f.recv_read,
        })
    }
}

/// A standby's copy of one stream: its latest checkpoint, rebuilt from a whole one and the
/// deltas since, in the order they were taken.
#[derive(Clone, Debug)]
pub struct Replica {
    /// The latest checkpoint (whole, or a delta) without its stream bytes, which are in the
    /// logs: its STREAM block's two byte fields are empty (and the container re-sealed).
    head: Vec<u8>,
    send: Log,
    recv: Log,
}

impl Replica {
    /// Starts from a whole checkpoint (a snapshot [`SnapshotReader::parse`] accepts).
    pub fn new(snapshot: &[u8]) -> Result<Replica, SnapshotError> {
        let mut r = Replica {
            head: Vec::new(),
            send: Log::default(),
            recv: Log::default(),
        };
        // An empty copy holds nothing: a delta is refused.
        r.apply(snapshot)?;
        Ok(r)
    }

    /// Applies the next checkpoint: a whole one replaces everything, a delta (the one taken
    /// since the last applied) brings it up to date. Refused with a typed error — and
    /// nothing changes — if it is corrupt, or is a delta whose base is not what this holds.
    pub fn apply(&mut self, checkpoint: &[u8]) -> Result<(), SnapshotError> {
        let reader = SnapshotReader::parse_allowing(checkpoint, FLAG_DELTA)?;
        let delta = reader.flags() & FLAG_DELTA != 0;
        let stream = reader
            .raw_blocks()
            .iter()
            .find(|(t, _)| *t == block::STREAM)
            .map(|(_, b)| *b)
            .ok_or(SnapshotError::Malformed {
                block: block::STREAM,
                reason: "required block missing",
            })?;
        let l = StreamLayout::parse(stream, delta)?;
        let data = |range: &core::ops::Range<usize>| &stream[range.start + 4..range.end];
        if delta
            && !(self.send.holds(l.send_base, l.send_from)
                && self.recv.holds(l.recv_read, l.recv_from))
        {
            return Err(SnapshotError::Malformed {
                block: block::STREAM,
                reason: "delta does not apply to the checkpoint held",
            });
        }
        // Copying the whole checkpoint would copy its stream bytes a second time (they are
        // most of a delta); the head keeps the rest, a few kilobytes.
        let empty = 0u32.to_be_bytes();
        let blocks: Vec<(u16, Vec<&[u8]>)> = reader
            .raw_blocks()
            .iter()
            .map(|&(ty, body)| match ty {
                block::STREAM => (
                    ty,
                    vec![
                        &body[..l.send.start],
                        &empty,
                        &body[l.send.end..l.recv.start],
                        &empty,
                        &body[l.recv.end..],
                    ],
                ),
                _ => (ty, vec![body]),
            })
            .collect();
        let head = assemble(
            reader.flags(),
            reader.export_id(),
            reader.move_epoch(),
            &blocks,
        )?;
        if delta {
            self.send.splice(l.send_base, l.send_from, data(&l.send));
            self.recv.splice(l.recv_read, l.recv_from, data(&l.recv));
        } else {
            self.send.set(l.send_from, data(&l.send));
            self.recv.set(l.recv_from, data(&l.recv));
        }
        self.head = head;
        Ok(())
    }

    /// The whole snapshot of the latest checkpoint, for
    /// [`Endpoint::import`](crate::endpoint::Endpoint::import).
    pub fn snapshot(&self) -> Result<Vec<u8>, SnapshotError> {
        let reader = SnapshotReader::parse_allowing(&self.head, FLAG_DELTA)?;
        let delta = reader.flags() & FLAG_DELTA != 0;
        // The stream bytes go from the logs straight into the snapshot, in parts: a takeover
        // rebuilds megabytes, and every copy of them is on the client's recovery time.
        let (send_len, recv_len) = (len32(&self.send.bytes)?, len32(&self.recv.bytes)?);
        let (send0, send1) = self.send.bytes.as_slices();
        let (recv0, recv1) = self.recv.bytes.as_slices();
        let mut blocks: Vec<(u16, Vec<&[u8]>)> = Vec::new();
        for &(ty, body) in reader.raw_blocks() {
            if ty != block::STREAM {
                blocks.push((ty, vec![body]));
                continue;
            }
            let l = StreamLayout::parse(body, delta)?;
            // A delta's two offsets after the fields are not part of a whole block; fields a
            // later version appends are.
            blocks.push((
                ty,
                vec![
                    &body[..l.send.start],
                    &send_len,
                    send0,
                    send1,
                    &body[l.send.end..l.recv.start],
                    &recv_len,
                    recv0,
                    recv1,
                    &body[l.recv.end..l.fields_end],
                ],
            ));
        }
        assemble(
            reader.flags() & !FLAG_DELTA,
            reader.export_id(),
            reader.move_epoch(),
            &blocks,
        )
    }

    /// The stream bytes held (send and receive).
    pub fn stream_bytes(&self) -> usize {
        self.send.bytes.len() + self.recv.bytes.len()
    }
}

/// The length prefix of a `bytes` field holding `data`.
fn len32(data: &VecDeque<u8>) -> Result<[u8; 4], SnapshotError> {
    u32::try_from(data.len())
        .map(u32::to_be_bytes)
        .map_err(|_| SnapshotError::TooLarge)
}
