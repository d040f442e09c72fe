//! The stream transport's packet payload: a packet number, then frames.
//!
//! A SAL packet with protocol [`Protocol::STREAM`](serval_wire::header::Protocol::STREAM)
//! carries, after the SAL header:
//!
//! ```text
//! +-------------------------------+----------+----------+-----
//! | Packet Number (64, big-endian) | Frame 1  | Frame 2  | ...
//! +-------------------------------+----------+----------+-----
//! ```
//!
//! Packet numbers count up from 0 per direction and are never reused, retransmissions included
//! (RFC 9002 §2: this removes the retransmission ambiguity of TCP). Each frame starts with a
//! one-byte type; integers inside frames are QUIC variable-length integers (RFC 9000 §16):
//!
//! | type | frame | body |
//! | --- | --- | --- |
//! | 0x00 | PADDING | none (runs of zeros; used to size PMTU probes) |
//! | 0x01 | PING | none; elicits an ACK |
//! | 0x02 | ACK | largest, ack delay (µs), range count, first range, then (gap, range) pairs — as RFC 9000 §19.3 |
//! | 0x08 / 0x09 | STREAM / STREAM+FIN | offset, length, data |
//! | 0x10 | MAX_DATA | the highest stream offset the receiver accepts |
//! | 0x30 | DATAGRAM | length, data (unreliable, never retransmitted) |
//! | 0x1c | CLOSE | error code, reason length, reason (UTF-8) |
//! | 0x1a | PATH_CHALLENGE | 8 bytes of data, unpredictable (path validation, docs/protocol.md §4) |
//! | 0x1b | PATH_RESPONSE | the 8 bytes of the challenge it answers |
//! | 0x1d | MOVE_REQUEST | a locator (docs/wire.md §4.4): the client asks the server to move its end there (docs/protocol.md §4.5) |
//! | 0x1e | MOVE_REFUSED | the locator of the request it answers, a reason code ([`MoveRefusal`]) |
//!
//! Parsing never panics: every malformed frame is a [`FrameError`].

use serval_wire::Locator;
use serval_wire::locator::{emit_locator, locator_len, parse_locator};

/// Largest value a variable-length integer can hold (2^62 − 1).
pub const VARINT_MAX: u64 = (1 << 62) - 1;

/// Length of the packet number that starts every transport payload.
pub const PN_LEN: usize = 8;

/// Bytes of data in a PATH_CHALLENGE or PATH_RESPONSE frame.
pub const PATH_DATA_LEN: usize = 8;

/// Most ACK ranges a receiver reads from one ACK frame; more is treated as malformed, which
/// bounds the work a hostile ACK can cause.
pub const MAX_ACK_RANGES: usize = 256;

/// Why a transport payload could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The payload ended inside a field.
    #[error("transport payload truncated")]
    Truncated,
    /// A frame type this version does not know.
    #[error("unknown frame type {0:#04x}")]
    UnknownFrame(u8),
    /// An ACK frame whose ranges run below zero or exceed [`MAX_ACK_RANGES`].
    #[error("malformed ACK frame")]
    BadAck,
    /// A STREAM frame whose end is beyond 2^62.
    #[error("stream frame beyond the largest offset")]
    OffsetOverflow,
    /// A CLOSE reason that is not UTF-8.
    #[error("close reason is not UTF-8")]
    BadReason,
    /// A MOVE_REQUEST or MOVE_REFUSED whose locator is malformed.
    #[error("malformed locator in a MOVE_REQUEST or MOVE_REFUSED")]
    BadLocator,
    /// A MOVE_REFUSED with a reason code this version does not know.
    #[error("unknown MOVE_REFUSED reason {0}")]
    BadRefusal(u8),
}

/// Bytes [`write_varint`] takes for `v`.
pub const fn varint_len(v: u64) -> usize {
    if v < 1 << 6 {
        1
    } else if v < 1 << 14 {
        2
    } else if v < 1 << 30 {
        4
    } else {
        8
    }
}

/// Appends `v` (clamped to [`VARINT_MAX`]) as a variable-length integer.
pub fn write_varint(out: &mut Vec<u8>, v: u64) {
    let v = v.min(VARINT_MAX);
    match varint_len(v) {
        1 => out.push(v as u8),
        2 => out.extend_from_slice(&(v as u16 | 0x4000).to_be_bytes()),
        4 => out.extend_from_slice(&(v as u32 | 0x8000_0000).to_be_bytes()),
        _ => out.extend_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes()),
    }
}

/// A cursor over a received payload.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, FrameError> {
        let (&b, rest) = self.buf.split_first().ok_or(FrameError::Truncated)?;
        self.buf = rest;
        Ok(b)
    }

    /// A big-endian u64.
    pub fn u64(&mut self) -> Result<u64, FrameError> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.buf.len() < n {
            return Err(FrameError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// A variable-length integer.
    pub fn varint(&mut self) -> Result<u64, FrameError> {
        let first = self.u8()?;
        let len = 1usize << (first >> 6);
        let mut v = u64::from(first & 0x3f);
        for &b in self.bytes(len - 1)? {
            v = (v << 8) | u64::from(b);
        }
        Ok(v)
    }
}

/// One decoded frame, borrowing its data from the packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Padding bytes (a run of zeros counted as one frame).
    Padding(usize),
    /// Elicits an acknowledgement.
    Ping,
    /// Acknowledges packet numbers.
    Ack(AckFrame),
    /// Stream data.
    Stream {
        /// Offset of `data` in the stream.
        offset: u64,
        /// The bytes.
        data: &'a [u8],
        /// Whether the stream ends after `data`.
        fin: bool,
    },
    /// Raises the sender's flow-control limit.
    MaxData(u64),
    /// An unreliable datagram.
    Datagram(&'a [u8]),
    /// Asks the peer to echo `data` in a PATH_RESPONSE: proof that it receives at the address
    /// this packet was sent to (path validation).
    PathChallenge([u8; PATH_DATA_LEN]),
    /// Echoes a PATH_CHALLENGE's data.
    PathResponse([u8; PATH_DATA_LEN]),
    /// The client asks the server to move its end of the flow to the instance whose
    /// migration agent is at this locator.
    MoveRequest(Locator),
    /// The server answers a MOVE_REQUEST naming this locator: the flow stays, for this reason.
    MoveRefused(Locator, MoveRefusal),
    /// The connection is closed by the application or on error.
    Close {
        /// Application-defined code; 0 is a normal close.
        code: u64,
        /// Human-readable reason.
        reason: &'a str,
    },
}

/// A frame about where the flow runs, as the transport hands it to the SAL (which validates
/// paths and moves flows) and takes it from the SAL to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathFrame {
    /// A PATH_CHALLENGE with its data.
    Challenge([u8; PATH_DATA_LEN]),
    /// A PATH_RESPONSE with its data.
    Response([u8; PATH_DATA_LEN]),
    /// A MOVE_REQUEST naming the migration agent the server's end should move to.
    MoveRequest(Locator),
    /// A MOVE_REFUSED answering a MOVE_REQUEST.
    MoveRefused(Locator, MoveRefusal),
}

/// Why a server did not move its end of a flow where its client asked (a MOVE_REFUSED's
/// code; docs/wire.md §15).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MoveRefusal {
    /// No migration agent runs beside the server's endpoint.
    NoAgent,
    /// The application holding the stream did not hand it over (it does not support moves,
    /// or the stream is already moving).
    NotMovable,
    /// Nothing answered at the named agent, or what answered did not prove the service's key.
    Unreachable,
    /// The named instance refused the flow (it does not serve the service, or already holds
    /// the flow).
    RefusedThere,
    /// The transfer broke after the snapshot left; the flow may be lost.
    Failed,
}

impl MoveRefusal {
    /// The code on the wire.
    pub const fn code(self) -> u8 {
        match self {
            MoveRefusal::NoAgent => 1,
            MoveRefusal::NotMovable => 2,
            MoveRefusal::Unreachable => 3,
            MoveRefusal::RefusedThere => 4,
            MoveRefusal::Failed => 5,
        }
    }

    /// The refusal with this code, if it is one.
    pub const fn from_code(code: u8) -> Option<MoveRefusal> {
        Some(match code {
            1 => MoveRefusal::NoAgent,
            2 => MoveRefusal::NotMovable,
            3 => MoveRefusal::Unreachable,
            4 => MoveRefusal::RefusedThere,
            5 => MoveRefusal::Failed,
            _ => return None,
        })
    }
}

impl core::fmt::Display for MoveRefusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            MoveRefusal::NoAgent => "the server runs no migration agent",
            MoveRefusal::NotMovable => "the server's application did not hand the stream over",
            MoveRefusal::Unreachable => {
                "no instance of the service answered at that agent (nothing there, or another key)"
            }
            MoveRefusal::RefusedThere => "the instance there refused the stream",
            MoveRefusal::Failed => "the transfer broke",
        })
    }
}

impl PathFrame {
    /// Appends the frame.
    pub fn write(&self, out: &mut Vec<u8>) {
        match self {
            PathFrame::Challenge(d) => write_path_challenge(out, d),
            PathFrame::Response(d) => write_path_response(out, d),
            PathFrame::MoveRequest(to) => write_move_request(out, to),
            PathFrame::MoveRefused(to, why) => write_move_refused(out, to, *why),
        }
    }
}

/// An ACK frame: acknowledged packet numbers as descending ranges.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AckFrame {
    /// Acknowledged packet-number ranges, inclusive, in descending order, disjoint and
    /// non-adjacent.
    pub ranges: Vec<(u64, u64)>,
    /// How long the receiver held the ACK back, in microseconds.
    pub delay_micros: u64,
}

impl AckFrame {
    /// The largest acknowledged packet number.
    pub fn largest(&self) -> Option<u64> {
        self.ranges.first().map(|r| r.1)
    }

    fn parse(r: &mut Reader<'_>) -> Result<AckFrame, FrameError> {
        let largest = r.varint()?;
        let delay_micros = r.varint()?;
        let count = r.varint()?;
        if count >= MAX_ACK_RANGES as u64 {
            return Err(FrameError::BadAck);
        }
        let first = r.varint()?;
        let mut hi = largest;
        let mut lo = hi.checked_sub(first).ok_or(FrameError::BadAck)?;
        let mut ranges = Vec::with_capacity(count as usize + 1);
        ranges.push((lo, hi));
        for _ in 0..count {
            let gap = r.varint()?;
            let len = r.varint()?;
            // RFC 9000 §19.3.1: next largest = previous smallest − gap − 2.
            hi = lo
                .checked_sub(gap)
                .and_then(|v| v.checked_sub(2))
                .ok_or(FrameError::BadAck)?;
            lo = hi.checked_sub(len).ok_or(FrameError::BadAck)?;
            ranges.push((lo, hi));
        }
        Ok(AckFrame {
            ranges,
            delay_micros,
        })
    }

    /// Appends the frame. `ranges` should be descending, disjoint and non-adjacent (as a
    /// [`RangeSet`](crate::transport::ranges::RangeSet) iterated from the top yields them); a range
    /// that is not is skipped. At most [`MAX_ACK_RANGES`] are written, the lowest dropped.
    pub fn write(&self, out: &mut Vec<u8>) {
        let Some(&(lo0, hi0)) = self.ranges.first() else {
            return;
        };
        if lo0 > hi0 {
            return;
        }
        // Ranges that break the contract (inverted, overlapping or adjacent to the previous one)
        // cannot be encoded; they are left out rather than written wrongly.
        let mut rest = Vec::with_capacity(self.ranges.len().min(MAX_ACK_RANGES));
        let mut prev_lo = lo0;
        for &(lo, hi) in &self.ranges[1..] {
            if rest.len() + 1 == MAX_ACK_RANGES {
                break;
            }
            if lo <= hi && hi.checked_add(2).is_some_and(|h| h <= prev_lo) {
                rest.push((prev_lo - hi - 2, hi - lo));
                prev_lo = lo;
            }
        }
        out.push(TYPE_ACK);
        write_varint(out, hi0);
        write_varint(out, self.delay_micros);
        write_varint(out, rest.len() as u64);
        write_varint(out, hi0 - lo0);
        for (gap, len) in rest {
            write_varint(out, gap);
            write_varint(out, len);
        }
    }
}

const TYPE_PADDING: u8 = 0x00;
const TYPE_PING: u8 = 0x01;
const TYPE_ACK: u8 = 0x02;
const TYPE_STREAM: u8 = 0x08;
const TYPE_STREAM_FIN: u8 = 0x09;
const TYPE_MAX_DATA: u8 = 0x10;
const TYPE_PATH_CHALLENGE: u8 = 0x1a;
const TYPE_PATH_RESPONSE: u8 = 0x1b;
const TYPE_CLOSE: u8 = 0x1c;
const TYPE_MOVE_REQUEST: u8 = 0x1d;
const TYPE_MOVE_REFUSED: u8 = 0x1e;
const TYPE_DATAGRAM: u8 = 0x30;

/// Bytes of framing a STREAM frame adds to `len` bytes of data at `offset`.
pub const fn stream_overhead(offset: u64, len: u64) -> usize {
    1 + varint_len(offset) + varint_len(len)
}

/// Appends a STREAM frame.
pub fn write_stream(out: &mut Vec<u8>, offset: u64, data: &[u8], fin: bool) {
    out.push(if fin { TYPE_STREAM_FIN } else { TYPE_STREAM });
    write_varint(out, offset);
    write_varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// Appends a STREAM frame whose data is `a` then `b` (a range that wraps around a ring
/// buffer), without joining them first.
pub fn write_stream_parts(out: &mut Vec<u8>, offset: u64, a: &[u8], b: &[u8], fin: bool) {
    out.push(if fin { TYPE_STREAM_FIN } else { TYPE_STREAM });
    write_varint(out, offset);
    write_varint(out, (a.len() + b.len()) as u64);
    out.extend_from_slice(a);
    out.extend_from_slice(b);
}

/// Appends a PING frame.
pub fn write_ping(out: &mut Vec<u8>) {
    out.push(TYPE_PING);
}

/// Appends `n` bytes of padding.
pub fn write_padding(out: &mut Vec<u8>, n: usize) {
    out.resize(out.len() + n, TYPE_PADDING);
}

/// Appends a MAX_DATA frame.
pub fn write_max_data(out: &mut Vec<u8>, max: u64) {
    out.push(TYPE_MAX_DATA);
    write_varint(out, max);
}

/// Appends a DATAGRAM frame.
pub fn write_datagram(out: &mut Vec<u8>, data: &[u8]) {
    out.push(TYPE_DATAGRAM);
    write_varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// Bytes of a PATH_CHALLENGE or PATH_RESPONSE frame.
pub const PATH_FRAME_LEN: usize = 1 + PATH_DATA_LEN;

/// Appends a PATH_CHALLENGE frame.
pub fn write_path_challenge(out: &mut Vec<u8>, data: &[u8; PATH_DATA_LEN]) {
    out.push(TYPE_PATH_CHALLENGE);
    out.extend_from_slice(data);
}

/// Appends a PATH_RESPONSE frame.
pub fn write_path_response(out: &mut Vec<u8>, data: &[u8; PATH_DATA_LEN]) {
    out.push(TYPE_PATH_RESPONSE);
    out.extend_from_slice(data);
}

/// Appends a MOVE_REQUEST frame.
pub fn write_move_request(out: &mut Vec<u8>, to: &Locator) {
    write_type_and_locator(out, TYPE_MOVE_REQUEST, to);
}

/// Appends a MOVE_REFUSED frame.
pub fn write_move_refused(out: &mut Vec<u8>, to: &Locator, why: MoveRefusal) {
    write_type_and_locator(out, TYPE_MOVE_REFUSED, to);
    out.push(why.code());
}

/// Appends a frame type and a locator (docs/wire.md §4.4's encoding).
fn write_type_and_locator(out: &mut Vec<u8>, ty: u8, to: &Locator) {
    out.push(ty);
    let at = out.len();
    out.resize(at + locator_len(to), 0);
    emit_locator(to, &mut out[at..]);
}

/// Appends a CLOSE frame.
pub fn write_close(out: &mut Vec<u8>, code: u64, reason: &str) {
    out.push(TYPE_CLOSE);
    write_varint(out, code);
    write_varint(out, reason.len() as u64);
    out.extend_from_slice(reason.as_bytes());
}

/// Iterates over the frames of a payload (after the packet number).
#[derive(Debug, Clone)]
pub struct Frames<'a> {
    r: Reader<'a>,
    failed: bool,
}

impl<'a> Frames<'a> {
    /// Frames in `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Frames {
            r: Reader::new(buf),
            failed: false,
        }
    }

    fn next_frame(&mut self) -> Result<Frame<'a>, FrameError> {
        let ty = self.r.u8()?;
        Ok(match ty {
            TYPE_PADDING => {
                let mut n = 1;
                while self.r.buf.first() == Some(&TYPE_PADDING) {
                    self.r.buf = &self.r.buf[1..];
                    n += 1;
                }
                Frame::Padding(n)
            }
            TYPE_PING => Frame::Ping,
            TYPE_ACK => Frame::Ack(AckFrame::parse(&mut self.r)?),
            TYPE_STREAM | TYPE_STREAM_FIN => {
                let offset = self.r.varint()?;
                let len = self.r.varint()?;
                if offset.checked_add(len).is_none_or(|end| end > VARINT_MAX) {
                    return Err(FrameError::OffsetOverflow);
                }
                let len = usize::try_from(len).map_err(|_| FrameError::Truncated)?;
                Frame::Stream {
                    offset,
                    data: self.r.bytes(len)?,
                    fin: ty == TYPE_STREAM_FIN,
                }
            }
            TYPE_MAX_DATA => Frame::MaxData(self.r.varint()?),
            TYPE_DATAGRAM => {
                let len = usize::try_from(self.r.varint()?).map_err(|_| FrameError::Truncated)?;
                Frame::Datagram(self.r.bytes(len)?)
            }
            TYPE_PATH_CHALLENGE | TYPE_PATH_RESPONSE => {
                let mut data = [0u8; PATH_DATA_LEN];
                data.copy_from_slice(self.r.bytes(PATH_DATA_LEN)?);
                if ty == TYPE_PATH_CHALLENGE {
                    Frame::PathChallenge(data)
                } else {
                    Frame::PathResponse(data)
                }
            }
            TYPE_MOVE_REQUEST => {
                let (to, len) = parse_locator(self.r.buf).map_err(|_| FrameError::BadLocator)?;
                self.r.bytes(len)?;
                Frame::MoveRequest(to)
            }
            TYPE_MOVE_REFUSED => {
                let (to, len) = parse_locator(self.r.buf).map_err(|_| FrameError::BadLocator)?;
                self.r.bytes(len)?;
                let code = self.r.u8()?;
                let why = MoveRefusal::from_code(code).ok_or(FrameError::BadRefusal(code))?;
                Frame::MoveRefused(to, why)
            }
            TYPE_CLOSE => {
                let code = self.r.varint()?;
                let len = usize::try_from(self.r.varint()?).map_err(|_| FrameError::Truncated)?;
                let reason =
                    core::str::from_utf8(self.r.bytes(len)?).map_err(|_| FrameError::BadReason)?;
                Frame::Close { code, reason }
            }
            other => return Err(FrameError::UnknownFrame(other)),
        })
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<Frame<'a>, FrameError>;

    /// Yields frames until the payload ends; after an error, yields it once and then stops.
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.r.is_empty() {
            return None;
        }
        let f = self.next_frame();
        self.failed = f.is_err();
        Some(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn varint_fixtures_from_rfc9000() {
        // RFC 9000 §A.1 examples.
        for (v, bytes) in [
            (
                151_288_809_941_952_652u64,
                &[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c][..],
            ),
            (494_878_333, &[0x9d, 0x7f, 0x3e, 0x7d]),
            (15_293, &[0x7b, 0xbd]),
            (37, &[0x25]),
        ] {
            let mut out = Vec::new();
            write_varint(&mut out, v);
            assert_eq!(out, bytes);
            assert_eq!(Reader::new(bytes).varint().unwrap(), v);
            assert_eq!(varint_len(v), bytes.len());
        }
    }

    #[test]
    fn frames_round_trip() {
        let mut out = Vec::new();
        write_ping(&mut out);
        AckFrame {
            ranges: vec![(10, 12), (5, 7), (0, 0)],
            delay_micros: 250,
        }
        .write(&mut out);
        write_stream(&mut out, 1 << 20, b"hello", true);
        write_max_data(&mut out, 99);
        write_datagram(&mut out, b"dg");
        write_close(&mut out, 7, "bye");
        write_path_challenge(&mut out, b"abcdefgh");
        write_path_response(&mut out, b"ijklmnop");
        let v4: Locator = "10.1.2.3:4567".parse().unwrap();
        let v6: Locator = "[2001:db8::7]:9".parse().unwrap();
        write_move_request(&mut out, &v4);
        PathFrame::MoveRequest(v6).write(&mut out);
        write_move_refused(&mut out, &v4, MoveRefusal::RefusedThere);
        write_padding(&mut out, 3);
        let frames: Vec<_> = Frames::new(&out).collect::<Result<_, _>>().unwrap();
        assert_eq!(
            frames,
            vec![
                Frame::Ping,
                Frame::Ack(AckFrame {
                    ranges: vec![(10, 12), (5, 7), (0, 0)],
                    delay_micros: 250
                }),
                Frame::Stream {
                    offset: 1 << 20,
                    data: b"hello",
                    fin: true
                },
                Frame::MaxData(99),
                Frame::Datagram(b"dg"),
                Frame::Close {
                    code: 7,
                    reason: "bye"
                },
                Frame::PathChallenge(*b"abcdefgh"),
                Frame::PathResponse(*b"ijklmnop"),
                Frame::MoveRequest(v4),
                Frame::MoveRequest(v6),
                Frame::MoveRefused(v4, MoveRefusal::RefusedThere),
                Frame::Padding(3),
            ]
        );
    }

    /// The bytes of docs/wire.md §15's example.
    #[test]
    fn a_move_request_is_laid_out_as_the_wire_spec_says() {
        let mut out = Vec::new();
        write_move_request(&mut out, &"10.0.0.5:41899".parse().unwrap());
        assert_eq!(out, [0x1d, 0x04, 0xa3, 0xab, 0x0a, 0x00, 0x00, 0x05]);
        let mut out = Vec::new();
        write_move_request(&mut out, &"[2001:db8::7]:9".parse().unwrap());
        assert_eq!(out.len(), 20);
    }

    #[test]
    fn malformed_frames_are_errors() {
        assert_eq!(
            Frames::new(&[0x7f]).next(),
            Some(Err(FrameError::UnknownFrame(0x7f)))
        );
        // ACK whose first range runs below zero.
        assert_eq!(
            Frames::new(&[TYPE_ACK, 1, 0, 0, 5]).next(),
            Some(Err(FrameError::BadAck))
        );
        // STREAM claiming more data than present.
        assert_eq!(
            Frames::new(&[TYPE_STREAM, 0, 10, 1, 2]).next(),
            Some(Err(FrameError::Truncated))
        );
        assert_eq!(
            Frames::new(&[TYPE_CLOSE, 0, 1, 0xff]).next(),
            Some(Err(FrameError::BadReason))
        );
        // A PATH_CHALLENGE or PATH_RESPONSE shorter than its 8 bytes.
        for ty in [TYPE_PATH_CHALLENGE, TYPE_PATH_RESPONSE] {
            assert_eq!(
                Frames::new(&[ty, 1, 2, 3, 4, 5, 6, 7]).next(),
                Some(Err(FrameError::Truncated))
            );
        }
        // A MOVE_REQUEST with an unknown family, or cut inside its locator.
        assert_eq!(
            Frames::new(&[TYPE_MOVE_REQUEST, 5, 0, 80, 1, 2, 3, 4]).next(),
            Some(Err(FrameError::BadLocator))
        );
        assert_eq!(
            Frames::new(&[TYPE_MOVE_REQUEST, 4, 0, 80, 1, 2, 3]).next(),
            Some(Err(FrameError::BadLocator))
        );
        // A MOVE_REFUSED with an unknown reason, or without one.
        assert_eq!(
            Frames::new(&[TYPE_MOVE_REFUSED, 4, 0, 80, 1, 2, 3, 4, 9]).next(),
            Some(Err(FrameError::BadRefusal(9)))
        );
        assert_eq!(
            Frames::new(&[TYPE_MOVE_REFUSED, 4, 0, 80, 1, 2, 3, 4]).next(),
            Some(Err(FrameError::Truncated))
        );
        for code in 1..=5 {
            assert_eq!(
                MoveRefusal::from_code(code).map(MoveRefusal::code),
                Some(code)
            );
        }
        let mut it = Frames::new(&[0x7f, TYPE_PING]);
        assert!(it.next().unwrap().is_err());
        assert_eq!(it.next(), None);
    }

    #[test]
    fn ack_write_skips_ranges_it_cannot_encode() {
        let mut out = Vec::new();
        AckFrame {
            ranges: vec![(10, 12), (9, 9), (3, 8), (5, 4), (0, 1)],
            delay_micros: 0,
        }
        .write(&mut out);
        let frames: Vec<_> = Frames::new(&out).collect::<Result<_, _>>().unwrap();
        assert_eq!(
            frames,
            vec![Frame::Ack(AckFrame {
                ranges: vec![(10, 12), (3, 8), (0, 1)],
                delay_micros: 0
            })]
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            for f in Frames::new(&bytes) {
                let _ = f;
            }
        }

        #[test]
        fn varint_round_trip(v in 0..=VARINT_MAX) {
            let mut out = Vec::new();
            write_varint(&mut out, v);
            let mut r = Reader::new(&out);
            prop_assert_eq!(r.varint().unwrap(), v);
            prop_assert!(r.is_empty());
        }

        #[test]
        fn ack_ranges_round_trip(mut points in proptest::collection::btree_set(0u64..10_000, 1..100)) {
            // Build descending, non-adjacent inclusive ranges from a set of points.
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            while let Some(p) = points.pop_last() {
                match ranges.last_mut() {
                    Some(r) if r.0 == p + 1 => r.0 = p,
                    _ => ranges.push((p, p)),
                }
            }
            ranges.truncate(MAX_ACK_RANGES);
            let ack = AckFrame { ranges, delay_micros: 3 };
            let mut out = Vec::new();
            ack.write(&mut out);
            let parsed: Vec<_> = Frames::new(&out).collect::<Result<_, _>>().unwrap();
            prop_assert_eq!(parsed, vec![Frame::Ack(ack)]);
        }
    }
}
