//! The connection snapshot container (docs/snapshot.md, docs/moving-flows.md §3): a
//! versioned, checksummed byte format holding everything a connection is, so that another
//! endpoint can continue it.
//!
//! ```text
//! magic "SVSN" | version u16 | flags u16 | total length u32 | export ID u128 | move epoch u32
//! | blocks: (type u16 | length u32 | body)* in increasing type order | CRC-32C u32
//! ```
//!
//! All integers are big-endian. [`SnapshotWriter`] collects blocks in any order and lays them
//! out sorted; [`SnapshotReader`] checks the whole container (magic, version, length, CRC,
//! block framing and order, the critical-bit rule) before anyone looks inside a block, and
//! hands out [`BlockReader`]s, bounds-checked cursors whose every read returns a typed
//! [`SnapshotError`] instead of panicking.
//!
//! # Time
//!
//! Snapshots never hold absolute instants: every instant is written as a signed offset in
//! nanoseconds from the exporter's `now` ([`encode_instant`]), "none" as `i64::MIN`, and read
//! back relative to the importer's `now` ([`decode_instant`]). A deadline 5 ms ahead at export
//! is 5 ms ahead after import, whatever the two hosts' clocks say. An instant that would fall
//! before the importer's origin (`Instant::ZERO`) is clamped to it: only instants in the past
//! (send times, last activity) can be that old, and clamping makes them look more recent.
//!
//! # Extensibility
//!
//! * A block type a reader does not know is skipped, unless its high bit ([`block::CRITICAL`])
//!   is set: then the snapshot is refused ([`SnapshotError::UnknownCritical`]).
//! * Within a block it knows, a reader reads the fields of its version and **ignores any bytes
//!   after them**: a later version only ever appends fields to a block. (A change that older
//!   readers must not miss takes a new, critical, block type instead.)
//! * Flags bits 8–15 are critical (a reader refuses a snapshot with one it does not know set),
//!   bits 0–7 advisory. Version 1 defines none.

use core::time::Duration;

use crate::Instant;

pub mod delta;

/// The four bytes every snapshot starts with.
pub const MAGIC: [u8; 4] = *b"SVSN";

/// The format version this code writes and reads.
pub const FORMAT_VERSION: u16 = 1;

/// Bytes of the fixed header: magic, version, flags, total length, export ID, move epoch.
pub const HEADER_LEN: usize = 4 + 2 + 2 + 4 + 16 + 4;

/// Bytes of a block header: type and length.
pub const BLOCK_HEADER_LEN: usize = 2 + 4;

/// Bytes of the CRC-32C trailer.
pub const TRAILER_LEN: usize = 4;

/// Flags bits a reader must understand (bits 8–15).
pub const CRITICAL_FLAGS: u16 = 0xff00;

/// The header flag of a *delta* checkpoint ([`delta`], docs/snapshot.md §5): its STREAM
/// block carries only the stream bytes its base did not, so it means something only applied
/// to that base. Critical: [`SnapshotReader::parse`] (and so every import) refuses it with
/// [`SnapshotError::Delta`].
pub const FLAG_DELTA: u16 = 0x0100;

/// The value written for an instant that is not set ("none").
pub const NO_INSTANT: i64 = i64::MIN;

/// Block types (docs/snapshot.md lists each block's layout).
pub mod block {
    /// High bit of a block type: an importer that does not know the type must refuse the
    /// snapshot instead of skipping the block.
    pub const CRITICAL: u16 = 0x8000;
    /// SAL state: role, service, flowIDs of path 0, control-channel numbers (written by the
    /// endpoint).
    pub const SAL: u16 = 0x0001;
    /// Key schedule: protection mode, traffic secrets, key phase, replay windows (written by
    /// the endpoint).
    pub const KEYS: u16 = 0x0002;
    /// The stream's send and receive buffers and flow control.
    pub const STREAM: u16 = 0x0003;
    /// Queued datagrams each way (absent: none queued and no queue allocated).
    pub const DGRAM: u16 = 0x0004;
    /// The transport's connection-level state: settings, open/closing/closed, frozen,
    /// pending application events.
    pub const TRANSPORT: u16 = 0x0005;
    /// One path (may repeat): path ID, then sections; section 1 is the transport's per-path
    /// state (packet numbers, sent packets, ACK state, RTT, congestion control, pacer, MTU).
    pub const PATH: u16 = 0x0010;
    /// flowIDs issued for future paths (written by the endpoint).
    pub const ISSUED: u16 = 0x0020;
    /// Counters (statistics only; absent reads as zeros).
    pub const COUNTERS: u16 = 0x0030;
    /// The application's blob (may repeat), opaque and critical.
    pub const APP: u16 = 0x8100;

    /// Whether a snapshot may hold more than one block of type `ty`.
    pub const fn repeatable(ty: u16) -> bool {
        matches!(ty, PATH | APP)
    }

    /// The block types this version of the reader knows (the others are skipped, or refused
    /// if critical).
    pub const fn known(ty: u16) -> bool {
        matches!(
            ty,
            SAL | KEYS | STREAM | DGRAM | TRANSPORT | PATH | ISSUED | COUNTERS | APP
        )
    }
}

/// Section kinds inside a [`block::PATH`] body (`kind u8 | length u32 | body`, increasing
/// kind order; unknown kinds are skipped).
pub mod path_section {
    /// The transport's per-path state.
    pub const TRANSPORT: u8 = 0x01;
    /// Reserved for the SAL's addressing of the path (flowIDs, locators, status).
    pub const ADDRESSING: u8 = 0x02;
}

/// Why a snapshot was refused. The container-level errors come from
/// [`SnapshotReader::parse`]; [`Malformed`](SnapshotError::Malformed) also from the decoding of
/// a block; the last three are the endpoint's refusals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// Not a snapshot: the magic is wrong.
    #[error("not a connection snapshot")]
    Foreign,
    /// A format version this code does not read.
    #[error("snapshot format version {0} is not supported")]
    Version(u16),
    /// The snapshot is shorter or longer than its header says (or too short for a header).
    #[error("snapshot length {actual} does not match {expected}")]
    Truncated {
        /// The length the header announces (0 when not even the header is there).
        expected: u64,
        /// The bytes given.
        actual: u64,
    },
    /// The CRC-32C trailer does not match the contents.
    #[error("snapshot checksum mismatch")]
    Corrupt,
    /// A critical flag this code does not know is set.
    #[error("snapshot has unknown critical flags {0:#06x}")]
    UnsupportedFlags(u16),
    /// A block whose type this code does not know has the critical bit set.
    #[error("snapshot has unknown critical block {block:#06x}")]
    UnknownCritical {
        /// The block type.
        block: u16,
    },
    /// A block is missing, repeated, out of order, or its contents do not decode to a valid
    /// state. `block` is its type (0 for the block framing itself).
    #[error("snapshot block {block:#06x} is malformed: {reason}")]
    Malformed {
        /// The block type.
        block: u16,
        /// What was wrong.
        reason: &'static str,
    },
    /// The snapshot (or a block) does not fit the format's 32-bit lengths. Writing only.
    #[error("snapshot too large")]
    TooLarge,
    /// A flowID of the snapshot is already live on the importing endpoint.
    #[error("a flowID of the snapshot is already in use")]
    FlowInUse,
    /// The importing endpoint does not serve the snapshot's service.
    #[error("the snapshot's service is not served here")]
    NotServed,
    /// The importing endpoint has already imported a snapshot with this export ID.
    #[error("the snapshot was already imported")]
    Replayed,
    /// A delta checkpoint: it must be applied to its base ([`delta::Replica`]), not
    /// imported alone.
    #[error("a delta checkpoint cannot be imported alone")]
    Delta,
}

/// The CRC-32C (Castagnoli, as iSCSI and SCTP use) of `data`. A hot standby's checkpoints
/// carry every stream byte, checksummed once at each end: the `crc32c` crate uses the CPU's
/// CRC32 instruction where there is one (SSE 4.2, ARMv8), several times the speed of the
/// slice-by-16 tables that still took a fifth of the standby's CPU time, and tables elsewhere.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// `t` as a signed offset in nanoseconds from `base`, saturating at `i64::MAX` and
/// `i64::MIN + 1` (`i64::MIN` is [`NO_INSTANT`]).
pub fn encode_instant(t: Instant, base: Instant) -> i64 {
    if t >= base {
        i64::try_from(t.as_nanos() - base.as_nanos()).unwrap_or(i64::MAX)
    } else {
        let back = base.as_nanos() - t.as_nanos();
        i64::try_from(back).map_or(i64::MIN + 1, |b| -b)
    }
}

/// The instant `offset` nanoseconds from `base` (a negative offset is in the past),
/// saturating at the ends of [`Instant`]'s range. [`NO_INSTANT`] reads as `base` minus its
/// magnitude too; use [`decode_opt_instant`] where "none" is allowed.
pub fn decode_instant(offset: i64, base: Instant) -> Instant {
    let d = Duration::from_nanos(offset.unsigned_abs());
    if offset >= 0 { base + d } else { base - d }
}

/// An optional instant relative to `base`: [`NO_INSTANT`] for none.
pub fn encode_opt_instant(t: Option<Instant>, base: Instant) -> i64 {
    t.map_or(NO_INSTANT, |t| encode_instant(t, base))
}

/// The inverse of [`encode_opt_instant`].
pub fn decode_opt_instant(offset: i64, base: Instant) -> Option<Instant> {
    (offset != NO_INSTANT).then(|| decode_instant(offset, base))
}

/// Builds the body of one block: big-endian fields, instants relative to the export's
/// `now`.
#[derive(Clone, Debug)]
pub struct BlockWriter {
    buf: Vec<u8>,
    base: Instant,
}

impl BlockWriter {
    /// An empty body whose instants are written relative to `base` (the export's `now`).
    pub fn new(base: Instant) -> BlockWriter {
        BlockWriter {
            buf: Vec::new(),
            base,
        }
    }

    /// The instant instants are written relative to.
    pub fn base(&self) -> Instant {
        self.base
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The body.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// A byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    /// A boolean as one byte, 0 or 1.
    pub fn bool(&mut self, v: bool) {
        self.buf.push(u8::from(v));
    }

    /// A `u16`.
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    /// A `u32`.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    /// A `u64`.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    /// An `i64`.
    pub fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    /// An `f64`, as its IEEE 754 bits (exact).
    pub fn f64(&mut self, v: f64) {
        self.u64(v.to_bits());
    }

    /// Bytes as they are, without a length.
    pub fn raw(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }

    /// Bytes prefixed by their length as a `u32` (longer slices are cut at `u32::MAX`: no
    /// state of this crate holds one).
    pub fn bytes(&mut self, v: &[u8]) {
        let n = v.len().min(u32::MAX as usize);
        self.u32(n as u32);
        self.raw(&v[..n]);
    }

    /// An instant, relative to [`base`](Self::base) ([`encode_instant`]).
    pub fn instant(&mut self, t: Instant) {
        self.i64(encode_instant(t, self.base));
    }

    /// An optional instant ([`encode_opt_instant`]).
    pub fn opt_instant(&mut self, t: Option<Instant>) {
        self.i64(encode_opt_instant(t, self.base));
    }

    /// A duration in whole nanoseconds, saturating at `u64::MAX`.
    pub fn duration(&mut self, d: Duration) {
        self.u64(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// An optional `u64`: `u64::MAX` for none.
    pub fn opt_u64(&mut self, v: Option<u64>) {
        self.u64(v.unwrap_or(u64::MAX));
    }

    /// A section: `kind u8 | length u32 | body`, the body written by `f`.
    pub fn section(&mut self, kind: u8, f: impl FnOnce(&mut BlockWriter)) {
        self.u8(kind);
        let at = self.buf.len();
        self.u32(0);
        f(self);
        let len = self.buf.len() - at - 4;
        let len = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
        if let Some(slot) = self.buf.get_mut(at..at + 4) {
            slot.copy_from_slice(&len);
        }
    }
}

/// A bounds-checked cursor over one block's body. Every read that runs past the end, or
/// finds a value its type forbids, returns [`SnapshotError::Malformed`] naming the block.
#[derive(Clone, Debug)]
pub struct BlockReader<'a> {
    block: u16,
    data: &'a [u8],
    pos: usize,
    base: Instant,
}

impl<'a> BlockReader<'a> {
    /// A cursor over `data`, the body of a block of type `block`, reading instants relative
    /// to `base` (the importer's `now`).
    pub fn new(block: u16, data: &'a [u8], base: Instant) -> BlockReader<'a> {
        BlockReader {
            block,
            data,
            pos: 0,
            base,
        }
    }

    /// The block type.
    pub fn block(&self) -> u16 {
        self.block
    }

    /// The instant instants are read relative to.
    pub fn base(&self) -> Instant {
        self.base
    }

    /// Bytes not read yet (a reader ignores those after the fields it knows).
    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    /// The error for this block with `reason`.
    pub fn malformed(&self, reason: &'static str) -> SnapshotError {
        SnapshotError::Malformed {
            block: self.block,
            reason,
        }
    }

    /// Fails with `reason` unless `ok`.
    pub fn check(&self, ok: bool, reason: &'static str) -> Result<(), SnapshotError> {
        if ok {
            Ok(())
        } else {
            Err(self.malformed(reason))
        }
    }

    /// The next `n` bytes.
    pub fn raw(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or(self.malformed("truncated field"))?;
        let s = self
            .data
            .get(self.pos..end)
            .ok_or(self.malformed("truncated field"))?;
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        let s = self.raw(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    /// A byte.
    pub fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.array::<1>()?[0])
    }

    /// A boolean: 0 or 1, anything else is malformed.
    pub fn bool(&mut self) -> Result<bool, SnapshotError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.malformed("boolean not 0 or 1")),
        }
    }

    /// A `u16`.
    pub fn u16(&mut self) -> Result<u16, SnapshotError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    /// A `u32`.
    pub fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// A `u64`.
    pub fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// An `i64`.
    pub fn i64(&mut self) -> Result<i64, SnapshotError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    /// An `f64` from its bits; NaN and infinities are malformed (no state holds them).
    pub fn f64(&mut self) -> Result<f64, SnapshotError> {
        let v = f64::from_bits(self.u64()?);
        self.check(v.is_finite(), "non-finite number")?;
        Ok(v)
    }

    /// Bytes prefixed by a `u32` length.
    pub fn bytes(&mut self) -> Result<&'a [u8], SnapshotError> {
        let n = self.u32()? as usize;
        self.raw(n)
    }

    /// An instant relative to [`base`](Self::base); "none" is malformed here.
    pub fn instant(&mut self) -> Result<Instant, SnapshotError> {
        let v = self.i64()?;
        self.check(v != NO_INSTANT, "instant required")?;
        Ok(decode_instant(v, self.base))
    }

    /// An optional instant ([`decode_opt_instant`]).
    pub fn opt_instant(&mut self) -> Result<Option<Instant>, SnapshotError> {
        Ok(decode_opt_instant(self.i64()?, self.base))
    }

    /// A duration in nanoseconds.
    pub fn duration(&mut self) -> Result<Duration, SnapshotError> {
        Ok(Duration::from_nanos(self.u64()?))
    }

    /// An optional `u64` (`u64::MAX` is none).
    pub fn opt_u64(&mut self) -> Result<Option<u64>, SnapshotError> {
        let v = self.u64()?;
        Ok((v != u64::MAX).then_some(v))
    }

    /// A count of items that take at least `min_item` bytes each: refused if the rest of the
    /// block could not hold that many (so no allocation is sized by an untrusted count).
    pub fn count(&mut self, min_item: usize) -> Result<usize, SnapshotError> {
        let n = self.u32()? as usize;
        self.check(
            n.saturating_mul(min_item.max(1)) <= self.remaining(),
            "count exceeds the block",
        )?;
        Ok(n)
    }

    /// The next section (`kind u8 | length u32 | body`), or `None` at the end of the block.
    pub fn section(&mut self) -> Result<Option<(u8, BlockReader<'a>)>, SnapshotError> {
        if self.remaining() == 0 {
            return Ok(None);
        }
        let kind = self.u8()?;
        let body = self.bytes()?;
        Ok(Some((kind, BlockReader::new(self.block, body, self.base))))
    }
}

/// Builds a snapshot: the header's fields, then blocks added in any order (each component
/// writes its own), laid out in increasing type order by [`finish`](Self::finish).
#[derive(Clone, Debug)]
pub struct SnapshotWriter {
    flags: u16,
    export_id: u128,
    move_epoch: u32,
    now: Instant,
    blocks: Vec<(u16, Vec<u8>)>,
    since: Option<StreamCover>,
}

/// How far a checkpoint carried its stream's bytes: every byte sent below `send_end` and
/// every byte received below `recv_end` (in order, with none missing), which never change
/// afterwards. A [delta] checkpoint taken *since* a cover leaves those bytes out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamCover {
    /// The end of the send buffer's bytes (acknowledged, in flight and never sent).
    pub send_end: u64,
    /// The end of the received bytes without a gap.
    pub recv_end: u64,
}

impl SnapshotWriter {
    /// A snapshot taken at `now` with this export ID (unique per export; the importer refuses
    /// one it has seen) and move epoch.
    pub fn new(export_id: u128, move_epoch: u32, now: Instant) -> SnapshotWriter {
        SnapshotWriter {
            flags: 0,
            export_id,
            move_epoch,
            now,
            blocks: Vec::new(),
            since: None,
        }
    }

    /// Makes this a delta checkpoint since `cover` (the cover of the checkpoint it will be
    /// applied to): sets [`FLAG_DELTA`], and the transport leaves out the stream bytes below
    /// the cover.
    pub fn set_delta(&mut self, cover: StreamCover) {
        self.flags |= FLAG_DELTA;
        self.since = Some(cover);
    }

    /// The cover this is a delta since, if it is one.
    pub fn delta_since(&self) -> Option<StreamCover> {
        self.since
    }

    /// The export instant: every instant is written relative to it.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Sets the header's flags ([`FLAG_DELTA`] is set by [`set_delta`](Self::set_delta)).
    pub fn set_flags(&mut self, flags: u16) {
        self.flags = flags;
    }

    /// A writer for a block body, relative to [`now`](Self::now).
    pub fn body(&self) -> BlockWriter {
        BlockWriter::new(self.now)
    }

    /// Adds a block of type `ty`. A second block of a type that may appear only once is
    /// refused ([`SnapshotError::Malformed`]), as is a body over `u32::MAX` bytes
    /// ([`SnapshotError::TooLarge`]). Blocks of a repeatable type keep the order they were
    /// added in.
    pub fn add(&mut self, ty: u16, body: BlockWriter) -> Result<(), SnapshotError> {
        self.add_bytes(ty, body.into_bytes())
    }

    /// [`add`](Self::add) with a body already built.
    pub fn add_bytes(&mut self, ty: u16, body: Vec<u8>) -> Result<(), SnapshotError> {
        if u32::try_from(body.len()).is_err() {
            return Err(SnapshotError::TooLarge);
        }
        if !block::repeatable(ty) && self.blocks.iter().any(|(t, _)| *t == ty) {
            return Err(SnapshotError::Malformed {
                block: ty,
                reason: "block added twice",
            });
        }
        self.blocks.push((ty, body));
        Ok(())
    }

    /// Appends to the body of the `index`-th block of type `ty` already added (in the order
    /// added): for a layer that adds its own section to a block another layer wrote, such as
    /// the SAL's [`path_section::ADDRESSING`] after the transport's section of a PATH block.
    /// Fails with [`SnapshotError::Malformed`] if there is no such block, or
    /// [`SnapshotError::TooLarge`] if the body would exceed `u32::MAX` bytes.
    pub fn append(
        &mut self,
        ty: u16,
        index: usize,
        f: impl FnOnce(&mut BlockWriter),
    ) -> Result<(), SnapshotError> {
        let now = self.now;
        let Some((_, body)) = self.blocks.iter_mut().filter(|(t, _)| *t == ty).nth(index) else {
            return Err(SnapshotError::Malformed {
                block: ty,
                reason: "no such block to append to",
            });
        };
        let mut w = BlockWriter {
            buf: core::mem::take(body),
            base: now,
        };
        f(&mut w);
        *body = w.buf;
        if u32::try_from(body.len()).is_err() {
            return Err(SnapshotError::TooLarge);
        }
        Ok(())
    }

    /// The snapshot's bytes.
    pub fn finish(mut self) -> Result<Vec<u8>, SnapshotError> {
        // Stable: repeated blocks keep their order.
        self.blocks.sort_by_key(|(t, _)| *t);
        let blocks: Vec<(u16, [&[u8]; 1])> =
            self.blocks.iter().map(|(t, b)| (*t, [&b[..]])).collect();
        assemble(self.flags, self.export_id, self.move_epoch, &blocks)
    }
}

/// Lays out a snapshot: the header, then each block (its type, and a body made of the given
/// parts, in order; the blocks already in type order), then the CRC. A body given in parts
/// is copied once, into the snapshot: a [`Replica`](delta::Replica) rebuilds megabytes of
/// stream bytes this way at a takeover.
pub(crate) fn assemble<'a, B: AsRef<[&'a [u8]]>>(
    flags: u16,
    export_id: u128,
    move_epoch: u32,
    blocks: &[(u16, B)],
) -> Result<Vec<u8>, SnapshotError> {
    let len = |parts: &[&[u8]]| parts.iter().map(|p| p.len()).sum::<usize>();
    let mut total = HEADER_LEN + TRAILER_LEN;
    for (_, parts) in blocks {
        let n = len(parts.as_ref());
        if u32::try_from(n).is_err() {
            return Err(SnapshotError::TooLarge);
        }
        total += BLOCK_HEADER_LEN + n;
    }
    let total32 = u32::try_from(total).map_err(|_| SnapshotError::TooLarge)?;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&total32.to_be_bytes());
    out.extend_from_slice(&export_id.to_be_bytes());
    out.extend_from_slice(&move_epoch.to_be_bytes());
    for (ty, parts) in blocks {
        let parts = parts.as_ref();
        out.extend_from_slice(&ty.to_be_bytes());
        // Checked above.
        out.extend_from_slice(&(len(parts) as u32).to_be_bytes());
        for p in parts {
            out.extend_from_slice(p);
        }
    }
    let crc = crc32c(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    Ok(out)
}

/// A snapshot whose container was checked: magic, version, flags, length, CRC, block framing
/// and order, and the critical-bit rule. Its blocks are read with
/// [`block`](Self::block) / [`blocks`](Self::blocks).
#[derive(Clone, Debug)]
pub struct SnapshotReader<'a> {
    flags: u16,
    export_id: u128,
    move_epoch: u32,
    blocks: Vec<(u16, &'a [u8])>,
}

/// Big-endian field at `at` of a slice known to be long enough; zeros otherwise (never
/// reached after the length checks).
fn be<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    if let Some(s) = bytes.get(at..at + N) {
        a.copy_from_slice(s);
    }
    a
}

impl<'a> SnapshotReader<'a> {
    /// Checks the container. In this order: the magic ([`SnapshotError::Foreign`]; a
    /// shorter input that could be the start of one is [`SnapshotError::Truncated`]), the
    /// version ([`SnapshotError::Version`]), the length
    /// ([`SnapshotError::Truncated`]), the CRC ([`SnapshotError::Corrupt`]), the flags
    /// ([`SnapshotError::UnsupportedFlags`]), then each block's framing and order
    /// ([`SnapshotError::Malformed`] with block 0 for framing, or the block's type) and type
    /// ([`SnapshotError::UnknownCritical`]).
    pub fn parse(bytes: &'a [u8]) -> Result<SnapshotReader<'a>, SnapshotError> {
        Self::parse_allowing(bytes, 0)
    }

    /// [`parse`](Self::parse), accepting the critical flags of `allowed` too
    /// ([`FLAG_DELTA`] for a [`delta::Replica`]).
    pub(crate) fn parse_allowing(
        bytes: &'a [u8],
        allowed: u16,
    ) -> Result<SnapshotReader<'a>, SnapshotError> {
        let actual = bytes.len() as u64;
        let magic_seen = bytes.len().min(MAGIC.len());
        if bytes.get(..magic_seen) != MAGIC.get(..magic_seen) {
            return Err(SnapshotError::Foreign);
        }
        if bytes.len() < 6 {
            return Err(SnapshotError::Truncated {
                expected: 0,
                actual,
            });
        }
        let version = u16::from_be_bytes(be(bytes, 4));
        if version != FORMAT_VERSION {
            return Err(SnapshotError::Version(version));
        }
        if bytes.len() < HEADER_LEN + TRAILER_LEN {
            let expected = if bytes.len() >= 12 {
                u64::from(u32::from_be_bytes(be(bytes, 8)))
            } else {
                0
            };
            return Err(SnapshotError::Truncated { expected, actual });
        }
        let total = u32::from_be_bytes(be(bytes, 8));
        if u64::from(total) != actual {
            return Err(SnapshotError::Truncated {
                expected: u64::from(total),
                actual,
            });
        }
        let (covered, trailer) = bytes.split_at(bytes.len() - TRAILER_LEN);
        if crc32c(covered) != u32::from_be_bytes(be(trailer, 0)) {
            return Err(SnapshotError::Corrupt);
        }
        let flags = u16::from_be_bytes(be(bytes, 6));
        if flags & CRITICAL_FLAGS & !allowed != 0 {
            return Err(if flags & CRITICAL_FLAGS == FLAG_DELTA {
                SnapshotError::Delta
            } else {
                SnapshotError::UnsupportedFlags(flags)
            });
        }
        let export_id = u128::from_be_bytes(be(bytes, 12));
        let move_epoch = u32::from_be_bytes(be(bytes, 28));

        let framing = |reason| SnapshotError::Malformed { block: 0, reason };
        let mut rest = covered.get(HEADER_LEN..).ok_or(framing("no header"))?;
        let mut blocks: Vec<(u16, &'a [u8])> = Vec::new();
        let mut last: Option<u16> = None;
        while !rest.is_empty() {
            let Some((head, tail)) = rest.split_first_chunk::<BLOCK_HEADER_LEN>() else {
                return Err(framing("truncated block header"));
            };
            let ty = u16::from_be_bytes(be(head, 0));
            let len = u32::from_be_bytes(be(head, 2)) as usize;
            if len > tail.len() {
                return Err(framing("block longer than the snapshot"));
            }
            let (body, tail) = tail.split_at(len);
            match last {
                Some(l) if ty < l || (ty == l && !block::repeatable(ty)) => {
                    return Err(SnapshotError::Malformed {
                        block: ty,
                        reason: "block out of order or repeated",
                    });
                }
                _ => {}
            }
            last = Some(ty);
            if block::known(ty) {
                blocks.push((ty, body));
            } else if ty & block::CRITICAL != 0 {
                return Err(SnapshotError::UnknownCritical { block: ty });
            }
            rest = tail;
        }
        Ok(SnapshotReader {
            flags,
            export_id,
            move_epoch,
            blocks,
        })
    }

    /// The header's flags.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// The export ID.
    pub fn export_id(&self) -> u128 {
        self.export_id
    }

    /// The move epoch.
    pub fn move_epoch(&self) -> u32 {
        self.move_epoch
    }

    /// The known blocks' types and bodies, in order.
    pub(crate) fn raw_blocks(&self) -> &[(u16, &'a [u8])] {
        &self.blocks
    }

    /// The types of the known blocks present, in order (repeated ones repeated).
    pub fn block_types(&self) -> impl Iterator<Item = u16> + '_ {
        self.blocks.iter().map(|(t, _)| *t)
    }

    /// The first block of type `ty`, read relative to `now` (the importer's clock).
    pub fn block(&self, ty: u16, now: Instant) -> Option<BlockReader<'a>> {
        self.blocks(ty, now).next()
    }

    /// [`block`](Self::block), or [`SnapshotError::Malformed`] if it is missing.
    pub fn require(&self, ty: u16, now: Instant) -> Result<BlockReader<'a>, SnapshotError> {
        self.block(ty, now).ok_or(SnapshotError::Malformed {
            block: ty,
            reason: "required block missing",
        })
    }

    /// Every block of type `ty` in order, read relative to `now`.
    pub fn blocks(&self, ty: u16, now: Instant) -> impl Iterator<Item = BlockReader<'a>> + '_ {
        self.blocks
            .iter()
            .filter(move |(t, _)| *t == ty)
            .map(move |(t, b)| BlockReader::new(*t, b, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The catalogue's check value for CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn instants_are_relative_and_saturate() {
        let base = Instant::from_nanos(1_000);
        assert_eq!(encode_instant(Instant::from_nanos(1_500), base), 500);
        assert_eq!(encode_instant(Instant::from_nanos(400), base), -600);
        assert_eq!(
            decode_instant(-600, Instant::from_nanos(10_000)).as_nanos(),
            9_400
        );
        assert_eq!(
            decode_instant(-600, Instant::from_nanos(100)),
            Instant::ZERO
        );
        assert_eq!(
            encode_instant(Instant::from_nanos(u64::MAX), Instant::ZERO),
            i64::MAX
        );
        assert_eq!(
            encode_instant(Instant::ZERO, Instant::from_nanos(u64::MAX)),
            i64::MIN + 1
        );
        assert_eq!(encode_opt_instant(None, base), NO_INSTANT);
        assert_eq!(decode_opt_instant(NO_INSTANT, base), None);
        assert_eq!(
            decode_opt_instant(5, base),
            Some(Instant::from_nanos(1_005))
        );
    }

    #[test]
    fn sections_round_trip_and_unknown_ones_are_skippable() {
        let mut w = BlockWriter::new(Instant::ZERO);
        w.u32(7);
        w.section(1, |w| w.u64(42));
        w.section(9, |w| w.raw(b"future"));
        let bytes = w.into_bytes();
        let mut r = BlockReader::new(block::PATH, &bytes, Instant::ZERO);
        assert_eq!(r.u32().unwrap(), 7);
        let (k, mut s) = r.section().unwrap().unwrap();
        assert_eq!((k, s.u64().unwrap()), (1, 42));
        let (k, s) = r.section().unwrap().unwrap();
        assert_eq!((k, s.remaining()), (9, 6));
        assert!(r.section().unwrap().is_none());
    }
}
