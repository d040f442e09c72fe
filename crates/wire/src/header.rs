//! The SAL header, version 1: a zero-copy view ([`SalPacket`]) and an owned representation
//! ([`SalRepr`]).
//!
//! A SAL packet is the payload of one UDP datagram: a 20-byte base header, extensions up to
//! `hdr_len`, then the payload (a transport segment, a datagram or a control-plane message, as
//! named by `protocol`). All integers are big-endian.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |Version|Reservd|   Protocol    |         Header Length         |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                                                               |
//! +                       Source FlowID (64)                      +
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                                                               |
//! +                    Destination FlowID (64)                    +
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                   Extensions (Header Length - 20 bytes)  ...  |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! Connected data carries only the base header; a packet's extensions are walked once, by
//! [`SalPacket::new_checked`], after which the base fields can be read without walking them again.
//! The extensions themselves are in [`crate::ext`]; the full specification is `docs/wire.md`.

use core::fmt;
use core::ops::Range;

use crate::WireError;
use crate::ext::{
    AUTH_LEN, AUTH_TAG_LEN, CONTROL_LEN, COOKIE_LEN, COOKIE_TOKEN_LEN, ControlExt, ControlRepr,
    ExtType, Extension, Extensions, IDENTITY_LEN, IdentityRepr, KEYSHARE_LEN, KeyShareRepr,
    NONCE_EXT_LEN, SERVICE_LEN, SOURCE_MAX_LOCATOR_BYTES, ServiceExt, ServiceRepr, SourceExt,
};
use crate::id::{FlowId, Nonce};
use crate::locator::{Locator, emit_locator, locator_len};

/// The SAL version this module reads and writes.
pub const VERSION: u8 = 1;
/// Length of the base header.
pub const BASE_HEADER_LEN: usize = field::DST_FLOW.end;
/// Longest packet accepted or emitted: the largest UDP payload over IPv4 (65 535 − 20 − 8).
pub const MAX_PACKET_LEN: usize = 65_507;
/// Longest header [`SalRepr`] emits: every known extension, with a full SOURCE.
pub const MAX_EMIT_HEADER_LEN: usize = BASE_HEADER_LEN
    + CONTROL_LEN
    + SERVICE_LEN
    + NONCE_EXT_LEN
    + KEYSHARE_LEN
    + COOKIE_LEN
    + IDENTITY_LEN
    + MAX_PAD
    + 255
    + AUTH_LEN;
/// The UDP port a SAL endpoint listens on by default (the original Serval's).
pub const DEFAULT_UDP_PORT: u16 = 54324;
/// Most bytes of PAD [`SalRepr::emit`] writes.
pub const MAX_PAD: usize = 510;
/// Bit of byte 0 (in the low, flag nibble) carrying the key phase of a protected packet
/// (docs/wire.md §12).
pub const KEY_PHASE: u8 = 0x01;

/// Byte offsets of the base header.
pub mod field {
    /// A range of bytes.
    pub type Field = core::ops::Range<usize>;

    /// Version (high nibble) and reserved flags (low nibble).
    pub const VER_FLAGS: usize = 0;
    /// What follows the header.
    pub const PROTOCOL: usize = 1;
    /// Header length in bytes, extensions included.
    pub const HDR_LEN: Field = 2..4;
    /// The sender's flowID.
    pub const SRC_FLOW: Field = 4..12;
    /// The receiver's flowID (0 in a SYN).
    pub const DST_FLOW: Field = 12..20;
    /// Extensions run from here to the header length.
    pub const EXTENSIONS: core::ops::RangeFrom<usize> = 20..;
}

/// What follows the SAL header (the `protocol` byte).
///
/// Every value is representable, so unknown protocols are carried through unchanged; the associated
/// constants name the known ones.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Protocol(pub u8);

impl Protocol {
    /// Nothing: the packet is pure SAL control (a handshake, an ACK, a migration).
    pub const NONE: Protocol = Protocol(0);
    /// A segment of the stream transport.
    pub const STREAM: Protocol = Protocol(1);
    /// A datagram.
    pub const DATAGRAM: Protocol = Protocol(2);
    /// A registration / control-plane message.
    pub const REGISTRATION: Protocol = Protocol(3);

    /// Whether this implementation names the value.
    pub const fn is_known(self) -> bool {
        self.0 <= 3
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Protocol::NONE => f.write_str("none"),
            Protocol::STREAM => f.write_str("stream"),
            Protocol::DATAGRAM => f.write_str("datagram"),
            Protocol::REGISTRATION => f.write_str("registration"),
            Protocol(other) => write!(f, "protocol-{other}"),
        }
    }
}

impl fmt::Debug for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Protocol({self})")
    }
}

impl From<u8> for Protocol {
    fn from(v: u8) -> Self {
        Protocol(v)
    }
}

impl From<Protocol> for u8 {
    fn from(p: Protocol) -> u8 {
        p.0
    }
}

/// A zero-copy view of a SAL packet (header and payload) in a buffer.
///
/// The buffer is the whole packet: the UDP payload, no more and no less. Build the view with
/// [`SalPacket::new_checked`]; after that no accessor panics and every extension is well-formed.
/// With [`SalPacket::new_unchecked`] the base-header accessors panic on a buffer shorter than 20
/// bytes or a header length beyond it (the extension accessors never panic).
///
/// The base-header accessors are constant-time field reads. Each extension accessor
/// ([`control`](Self::control), [`service`](Self::service), …) walks the extensions to find its
/// own; to read several, use [`SalRepr::parse`] or [`extensions`](Self::extensions) once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SalPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> SalPacket<T> {
    /// Wraps a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> SalPacket<T> {
        SalPacket { buffer }
    }

    /// Wraps a buffer after [`validate`](Self::validate) accepted it.
    pub fn new_checked(buffer: T) -> Result<SalPacket<T>, WireError> {
        let packet = SalPacket::new_unchecked(buffer);
        packet.validate()?;
        Ok(packet)
    }

    /// Checks the lengths the base-header accessors rely on: at least 20 bytes, at most
    /// [`MAX_PACKET_LEN`], and a header length from 20 to the packet length.
    ///
    /// It checks neither the version nor the extensions; [`validate`](Self::validate) does.
    pub fn check_len(&self) -> Result<(), WireError> {
        let len = self.buffer.as_ref().len();
        if len < BASE_HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if len > MAX_PACKET_LEN {
            return Err(WireError::Oversize(len));
        }
        let hdr_len = self.header_len();
        if usize::from(hdr_len) < BASE_HEADER_LEN {
            return Err(WireError::HeaderLenTooShort(hdr_len));
        }
        if usize::from(hdr_len) > len {
            return Err(WireError::HeaderLenBeyondPacket {
                hdr_len,
                packet_len: len,
            });
        }
        Ok(())
    }

    /// Checks the whole header, walking the extensions once:
    ///
    /// * the version is [`VERSION`] (checked first: another version may lay out the rest
    ///   differently), then everything [`check_len`](Self::check_len) checks;
    /// * each extension is at least 2 bytes, ends within the header, and has its type's fixed
    ///   length; a SOURCE holds one or more well-formed locators, none twice;
    /// * no known extension appears twice (PAD may), CONTROL is first and AUTH last if present, and
    ///   no unknown extension has the must-understand bit.
    pub fn validate(&self) -> Result<(), WireError> {
        self.walk(|_| ())
    }

    /// Checks the base header alone: the version is [`VERSION`], then everything
    /// [`check_len`](Self::check_len) checks. What [`validate`](Self::validate) checks first;
    /// a receiver that will [`SalRepr::parse`] the packet anyway (which validates the extensions
    /// in the same walk that reads them) needs no more to decide where the packet goes.
    pub fn check_base(&self) -> Result<(), WireError> {
        let first = *self.buffer.as_ref().first().ok_or(WireError::Truncated)?;
        if first >> 4 != VERSION {
            return Err(WireError::BadVersion(first >> 4));
        }
        self.check_len()
    }

    /// [`validate`](Self::validate), handing each extension to `visit` in order.
    fn walk<'a>(&'a self, mut visit: impl FnMut(Extension<'a>)) -> Result<(), WireError> {
        self.check_base()?;
        // Bit `t & 0x0f` is set once known type `t` (0x81..=0x86, 0x88) has been seen.
        let mut seen = 0u16;
        let mut auth_seen = false;
        let mut exts = self.extensions();
        let mut index = 0usize;
        while let Some(ext) = exts.try_next()? {
            let ty = ext.ty();
            if !ty.is_known() && ty.is_mandatory() {
                return Err(WireError::UnknownMandatory(ty.0));
            }
            if ty.is_known() && ty != ExtType::PAD {
                let bit = 1u16 << (ty.0 & 0x0f);
                if seen & bit != 0 {
                    return Err(WireError::DuplicateExt(ty.0));
                }
                seen |= bit;
            }
            if ty == ExtType::CONTROL && index != 0 {
                return Err(WireError::ControlNotFirst);
            }
            if auth_seen {
                return Err(WireError::AuthNotLast);
            }
            auth_seen = ty == ExtType::AUTH;
            index += 1;
            visit(ext);
        }
        Ok(())
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The version (high nibble of byte 0).
    ///
    /// # Panics
    /// On an empty buffer (only possible with [`new_unchecked`](Self::new_unchecked)).
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_FLAGS] >> 4
    }

    /// The flag bits (low nibble of byte 0): [`KEY_PHASE`] and three reserved bits, sent as 0
    /// and ignored on receipt.
    pub fn reserved_flags(&self) -> u8 {
        self.buffer.as_ref()[field::VER_FLAGS] & 0x0f
    }

    /// The key phase of a protected packet ([`KEY_PHASE`] bit of byte 0). Protected by the
    /// packet's authentication tag, like the rest of the header.
    pub fn key_phase(&self) -> bool {
        self.buffer.as_ref()[field::VER_FLAGS] & KEY_PHASE != 0
    }

    /// What follows the header.
    pub fn protocol(&self) -> Protocol {
        Protocol(self.buffer.as_ref()[field::PROTOCOL])
    }

    /// The header length in bytes, extensions included.
    pub fn header_len(&self) -> u16 {
        let d = self.buffer.as_ref();
        u16::from_be_bytes([d[field::HDR_LEN.start], d[field::HDR_LEN.start + 1]])
    }

    /// The sender's flowID.
    pub fn src_flow(&self) -> FlowId {
        FlowId(read_u64(&self.buffer.as_ref()[field::SRC_FLOW]))
    }

    /// The receiver's flowID ([`FlowId::NONE`] in a SYN).
    pub fn dst_flow(&self) -> FlowId {
        FlowId(read_u64(&self.buffer.as_ref()[field::DST_FLOW]))
    }

    /// Whether the header carries any extension (connected data does not).
    pub fn has_extensions(&self) -> bool {
        !self.extension_area().is_empty()
    }

    /// Bytes 20 to the header length, clamped to the buffer (never panics).
    fn extension_area(&self) -> &[u8] {
        let d = self.buffer.as_ref();
        let hdr_len = match d.get(field::HDR_LEN) {
            Some(&[hi, lo]) => usize::from(u16::from_be_bytes([hi, lo])),
            _ => 0,
        };
        d.get(field::EXTENSIONS.start..hdr_len.min(d.len()))
            .unwrap_or_default()
    }

    /// A zero-copy iterator over the extensions, in order.
    pub fn extensions(&self) -> Extensions<'_> {
        Extensions::new(self.extension_area())
    }

    /// The CONTROL extension, if any.
    pub fn control(&self) -> Option<ControlExt<'_>> {
        self.extensions().find_map(|e| match e {
            Extension::Control(c) => Some(c),
            _ => None,
        })
    }

    /// The SERVICE extension, if any.
    pub fn service(&self) -> Option<ServiceExt<'_>> {
        self.extensions().find_map(|e| match e {
            Extension::Service(s) => Some(s),
            _ => None,
        })
    }

    /// The nonce of the NONCE extension, if any.
    pub fn nonce(&self) -> Option<Nonce> {
        self.extensions().find_map(|e| match e {
            Extension::Nonce(n) => Some(Nonce(*n)),
            _ => None,
        })
    }

    /// The SOURCE extension, if any.
    pub fn source(&self) -> Option<SourceExt<'_>> {
        self.extensions().find_map(|e| match e {
            Extension::Source(s) => Some(s),
            _ => None,
        })
    }

    /// The tag of the AUTH extension, if any.
    pub fn auth_tag(&self) -> Option<&[u8; AUTH_TAG_LEN]> {
        self.extensions().find_map(|e| match e {
            Extension::Auth(t) => Some(t),
            _ => None,
        })
    }

    /// Where the AUTH tag lies in the packet, if there is one.
    ///
    /// The tag authenticates the whole packet (header with all its extensions, and the payload)
    /// computed with these 16 bytes set to zero; [`auth_input`](Self::auth_input) yields exactly
    /// those bytes.
    pub fn auth_tag_range(&self) -> Option<Range<usize>> {
        let mut exts = self.extensions();
        loop {
            let offset = exts.offset();
            if let Extension::Auth(_) = exts.next()? {
                let start = offset + crate::ext::field::AUTH_TAG.start;
                return Some(start..start + AUTH_TAG_LEN);
            }
        }
    }

    /// The bytes the AUTH tag covers, if the packet has one, as three pieces to feed a MAC in order:
    /// the packet before the tag, 16 zero bytes in place of the tag, and the packet after it.
    ///
    /// A sender emits the packet with a zero tag, computes the MAC over the whole packet and writes
    /// it with [`auth_tag_mut`](Self::auth_tag_mut); a receiver computes it over these pieces and
    /// compares with [`auth_tag`](Self::auth_tag) in constant time.
    pub fn auth_input(&self) -> Option<[&[u8]; 3]> {
        const ZERO_TAG: [u8; AUTH_TAG_LEN] = [0; AUTH_TAG_LEN];
        let range = self.auth_tag_range()?;
        let d = self.buffer.as_ref();
        Some([d.get(..range.start)?, &ZERO_TAG, d.get(range.end..)?])
    }

    /// The header: base header and extensions.
    pub fn header(&self) -> &[u8] {
        &self.buffer.as_ref()[..usize::from(self.header_len())]
    }

    /// The payload: everything after the header.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[usize::from(self.header_len())..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> SalPacket<T> {
    /// Sets the version; the reserved flag bits are cleared.
    pub fn set_version(&mut self, version: u8) {
        self.buffer.as_mut()[field::VER_FLAGS] = version << 4;
    }

    /// Sets or clears the [`KEY_PHASE`] bit.
    pub fn set_key_phase(&mut self, phase: bool) {
        let b = &mut self.buffer.as_mut()[field::VER_FLAGS];
        *b = (*b & !KEY_PHASE) | if phase { KEY_PHASE } else { 0 };
    }

    /// Sets what follows the header.
    pub fn set_protocol(&mut self, protocol: Protocol) {
        self.buffer.as_mut()[field::PROTOCOL] = protocol.0;
    }

    /// Sets the header length.
    pub fn set_header_len(&mut self, len: u16) {
        self.buffer.as_mut()[field::HDR_LEN].copy_from_slice(&len.to_be_bytes());
    }

    /// Sets the sender's flowID.
    pub fn set_src_flow(&mut self, flow: FlowId) {
        self.buffer.as_mut()[field::SRC_FLOW].copy_from_slice(&flow.0.to_be_bytes());
    }

    /// Sets the receiver's flowID.
    pub fn set_dst_flow(&mut self, flow: FlowId) {
        self.buffer.as_mut()[field::DST_FLOW].copy_from_slice(&flow.0.to_be_bytes());
    }

    /// The payload, to write into.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let start = usize::from(self.header_len());
        &mut self.buffer.as_mut()[start..]
    }

    /// The AUTH tag, to write into, if the packet has one.
    pub fn auth_tag_mut(&mut self) -> Option<&mut [u8; AUTH_TAG_LEN]> {
        let range = self.auth_tag_range()?;
        self.buffer.as_mut().get_mut(range)?.try_into().ok()
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for SalPacket<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

fn read_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_be_bytes(a)
}

/// The owned form of a SAL header.
///
/// [`emit`](Self::emit) writes the extensions present in this order: CONTROL, SERVICE, NONCE,
/// SOURCE, AUTH. [`parse`](Self::parse) skips PAD and unknown optional extensions, so a parsed
/// packet re-emits without them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SalRepr {
    /// What follows the header.
    pub protocol: Protocol,
    /// The sender's flowID.
    pub src_flow: FlowId,
    /// The receiver's flowID ([`FlowId::NONE`] in a SYN).
    pub dst_flow: FlowId,
    /// The CONTROL extension.
    pub control: Option<ControlRepr>,
    /// The SERVICE extension.
    pub service: Option<ServiceRepr>,
    /// The NONCE extension.
    pub nonce: Option<Nonce>,
    /// The SOURCE extension: the original sender first, then each router crossed; empty means
    /// absent. Locators must be distinct; IPv6 flow labels and scope IDs are not carried.
    pub source: Vec<Locator>,
    /// The KEYSHARE extension (SYN and SYN-ACK).
    pub keyshare: Option<KeyShareRepr>,
    /// The COOKIE extension's token (a retry NACK, and the SYN that answers it).
    pub cookie: Option<[u8; COOKIE_TOKEN_LEN]>,
    /// The IDENTITY extension (a SYN-ACK whose SYN asked for it).
    pub identity: Option<IdentityRepr>,
    /// Bytes of PAD to emit (one or more PAD extensions after the others, before SOURCE): a
    /// SYN that asks for a larger answer pays for it. Parsing sets it to the total length of
    /// the packet's PAD extensions (at most [`MAX_PAD`]), so that a forwarded packet keeps its
    /// padding.
    pub pad: usize,
    /// The AUTH extension's tag. Emit zeros, then compute and write the tag over the packet
    /// (see [`SalPacket::auth_input`]).
    pub auth: Option<[u8; AUTH_TAG_LEN]>,
}

impl SalRepr {
    /// A header with no extension, as connected data carries.
    pub fn new(protocol: Protocol, src_flow: FlowId, dst_flow: FlowId) -> SalRepr {
        SalRepr {
            protocol,
            src_flow,
            dst_flow,
            control: None,
            service: None,
            nonce: None,
            keyshare: None,
            cookie: None,
            identity: None,
            pad: 0,
            source: Vec::new(),
            auth: None,
        }
    }

    /// Reads a packet's header, validating it fully (as [`SalPacket::validate`]) in one walk.
    pub fn parse<T: AsRef<[u8]>>(packet: &SalPacket<T>) -> Result<SalRepr, WireError> {
        let mut repr = SalRepr::new(Protocol::NONE, FlowId::NONE, FlowId::NONE);
        packet.walk(|ext| match ext {
            Extension::Control(c) => repr.control = Some(ControlRepr::parse(&c)),
            Extension::Service(s) => repr.service = Some(ServiceRepr::parse(&s)),
            Extension::Nonce(n) => repr.nonce = Some(Nonce(*n)),
            Extension::KeyShare(k) => repr.keyshare = Some(k),
            Extension::Cookie(c) => repr.cookie = Some(*c),
            Extension::Identity(i) => repr.identity = Some(i),
            Extension::Source(s) => repr.source = s.locators().collect(),
            Extension::Auth(t) => repr.auth = Some(*t),
            // Kept (as a total) so that a router forwarding a SYN keeps what its client paid
            // for: a SYN asking for IDENTITY is padded to pay for the larger SYN-ACK.
            Extension::Pad(body) => {
                repr.pad = (repr.pad + body.len() + 2).min(MAX_PAD);
            }
            Extension::Unknown { .. } => {}
        })?;
        repr.protocol = packet.protocol();
        repr.src_flow = packet.src_flow();
        repr.dst_flow = packet.dst_flow();
        Ok(repr)
    }

    /// Bytes of locators in the SOURCE extension.
    fn source_bytes(&self) -> usize {
        self.source.iter().map(locator_len).sum()
    }

    /// Bytes of PAD [`emit`](Self::emit) writes: [`pad`](Self::pad) raised to 2 (the
    /// smallest PAD) if it is 1, and capped at [`MAX_PAD`].
    fn pad_len(&self) -> usize {
        match self.pad {
            0 => 0,
            1 => 2,
            n => n.min(MAX_PAD),
        }
    }

    /// Length of the header [`emit`](Self::emit) writes; the payload goes after it.
    pub fn buffer_len(&self) -> usize {
        let source = if self.source.is_empty() {
            0
        } else {
            crate::ext::field::BODY + self.source_bytes()
        };
        BASE_HEADER_LEN
            + self.control.map_or(0, |_| CONTROL_LEN)
            + self.service.map_or(0, |_| SERVICE_LEN)
            + self.nonce.map_or(0, |_| NONCE_EXT_LEN)
            + self.keyshare.map_or(0, |_| KEYSHARE_LEN)
            + self.cookie.map_or(0, |_| COOKIE_LEN)
            + self.identity.map_or(0, |_| IDENTITY_LEN)
            + self.pad_len()
            + source
            + self.auth.map_or(0, |_| AUTH_LEN)
    }

    /// Writes the header at the start of the packet's buffer, which must hold at least
    /// [`buffer_len`](Self::buffer_len) bytes; the rest of the buffer is the payload, left as it
    /// is (fill it through [`SalPacket::payload_mut`]).
    ///
    /// Fails, writing nothing, if the SOURCE list is longer than 253 bytes or names a locator twice,
    /// if the buffer is too short, or if it is longer than [`MAX_PACKET_LEN`].
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        packet: &mut SalPacket<T>,
    ) -> Result<(), WireError> {
        let source_bytes = self.source_bytes();
        if source_bytes > SOURCE_MAX_LOCATOR_BYTES {
            return Err(WireError::SourceTooLong(source_bytes));
        }
        for (i, loc) in self.source.iter().enumerate() {
            if self.source[..i]
                .iter()
                .any(|l| l.ip() == loc.ip() && l.port() == loc.port())
            {
                return Err(WireError::SourceLoop(Locator::new(loc.ip(), loc.port())));
            }
        }
        let len = self.buffer_len();
        let buf = packet.buffer.as_mut();
        if buf.len() < len {
            return Err(WireError::BufferTooSmall {
                needed: len,
                available: buf.len(),
            });
        }
        if buf.len() > MAX_PACKET_LEN {
            return Err(WireError::Oversize(buf.len()));
        }
        // `len` is at most MAX_EMIT_HEADER_LEN (1027): the SOURCE bound above caps it.
        let hdr_len = u16::try_from(len).map_err(|_| WireError::Oversize(len))?;
        let hdr = &mut buf[..len];
        hdr[field::VER_FLAGS] = VERSION << 4;
        hdr[field::PROTOCOL] = self.protocol.0;
        hdr[field::HDR_LEN].copy_from_slice(&hdr_len.to_be_bytes());
        hdr[field::SRC_FLOW].copy_from_slice(&self.src_flow.0.to_be_bytes());
        hdr[field::DST_FLOW].copy_from_slice(&self.dst_flow.0.to_be_bytes());
        let mut pos = BASE_HEADER_LEN;
        if let Some(c) = &self.control {
            c.emit(&mut hdr[pos..pos + CONTROL_LEN]);
            pos += CONTROL_LEN;
        }
        if let Some(s) = &self.service {
            s.emit(&mut hdr[pos..pos + SERVICE_LEN]);
            pos += SERVICE_LEN;
        }
        if let Some(n) = &self.nonce {
            hdr[pos] = ExtType::NONCE.0;
            hdr[pos + 1] = NONCE_EXT_LEN as u8;
            hdr[pos + 2..pos + NONCE_EXT_LEN].copy_from_slice(&n.0);
            pos += NONCE_EXT_LEN;
        }
        if let Some(k) = &self.keyshare {
            k.emit(&mut hdr[pos..pos + KEYSHARE_LEN]);
            pos += KEYSHARE_LEN;
        }
        if let Some(c) = &self.cookie {
            hdr[pos] = ExtType::COOKIE.0;
            hdr[pos + 1] = COOKIE_LEN as u8;
            hdr[pos + 2..pos + COOKIE_LEN].copy_from_slice(c);
            pos += COOKIE_LEN;
        }
        if let Some(i) = &self.identity {
            i.emit(&mut hdr[pos..pos + IDENTITY_LEN]);
            pos += IDENTITY_LEN;
        }
        let mut pad = self.pad_len();
        while pad > 0 {
            // One PAD extension holds at most 255 bytes; never leave a remainder below 2.
            let n = if pad > 255 { (pad - 2).min(255) } else { pad };
            hdr[pos] = ExtType::PAD.0;
            hdr[pos + 1] = n as u8;
            hdr[pos + 2..pos + n].fill(0);
            pos += n;
            pad -= n;
        }
        if !self.source.is_empty() {
            let ext_len = crate::ext::field::BODY + source_bytes;
            hdr[pos] = ExtType::SOURCE.0;
            // At most 255: checked above.
            hdr[pos + 1] = ext_len as u8;
            let mut at = pos + crate::ext::field::BODY;
            for loc in &self.source {
                at += emit_locator(loc, &mut hdr[at..]);
            }
            pos += ext_len;
        }
        if let Some(tag) = &self.auth {
            hdr[pos] = ExtType::AUTH.0;
            hdr[pos + 1] = AUTH_LEN as u8;
            hdr[pos + 2..pos + AUTH_LEN].copy_from_slice(tag);
            pos += AUTH_LEN;
        }
        debug_assert_eq!(pos, len);
        Ok(())
    }

    /// The header followed by `payload`, in a new buffer.
    pub fn to_bytes(&self, payload: &[u8]) -> Result<Vec<u8>, WireError> {
        let len = self.buffer_len();
        let total = len + payload.len();
        if total > MAX_PACKET_LEN {
            return Err(WireError::Oversize(total));
        }
        let mut buf = vec![0u8; total];
        let mut packet = SalPacket::new_unchecked(&mut buf[..]);
        self.emit(&mut packet)?;
        packet.payload_mut().copy_from_slice(payload);
        Ok(buf)
    }
}

impl fmt::Display for SalRepr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SAL {} {}->{}",
            self.protocol, self.src_flow, self.dst_flow
        )?;
        if let Some(c) = &self.control {
            write!(f, " [{} verno={} ackno={}]", c.flags, c.verno, c.ackno)?;
        }
        if let Some(s) = &self.service {
            write!(f, " [service {} hops={}]", s.id, s.hop_limit)?;
        }
        if self.nonce.is_some() {
            f.write_str(" [nonce]")?;
        }
        if let Some(k) = &self.keyshare {
            write!(f, " [keyshare group={}]", k.group)?;
        }
        if self.cookie.is_some() {
            f.write_str(" [cookie]")?;
        }
        if self.identity.is_some() {
            f.write_str(" [identity]")?;
        }
        if !self.source.is_empty() {
            f.write_str(" [source")?;
            for loc in &self.source {
                write!(f, " {loc}")?;
            }
            f.write_str("]")?;
        }
        if self.auth.is_some() {
            f.write_str(" [auth]")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants() {
        assert_eq!(BASE_HEADER_LEN, 20);
        assert_eq!(MAX_EMIT_HEADER_LEN, 1027);
        assert_eq!(SOURCE_MAX_LOCATOR_BYTES, 253);
        assert_eq!(field::EXTENSIONS.start, BASE_HEADER_LEN);
    }

    #[test]
    fn protocol_names() {
        assert_eq!(Protocol::REGISTRATION.to_string(), "registration");
        assert_eq!(format!("{:?}", Protocol(9)), "Protocol(protocol-9)");
        assert!(Protocol::DATAGRAM.is_known() && !Protocol(4).is_known());
        assert_eq!(u8::from(Protocol::from(7)), 7);
    }

    #[test]
    fn repr_display() {
        let mut r = SalRepr::new(Protocol::STREAM, FlowId(1), FlowId(2));
        r.control = Some(ControlRepr {
            flags: crate::ControlFlags::SYN,
            verno: 5,
            ackno: 0,
        });
        r.source = vec![Locator::from(([10, 0, 0, 1], 7))];
        assert_eq!(
            r.to_string(),
            "SAL stream 0000000000000001->0000000000000002 [SYN verno=5 ackno=0] [source 10.0.0.1:7]"
        );
    }

    #[test]
    fn largest_header_emits() {
        let r = SalRepr {
            protocol: Protocol::NONE,
            src_flow: FlowId(1),
            dst_flow: FlowId(2),
            control: Some(ControlRepr::default()),
            service: Some(ServiceRepr {
                hop_limit: 1,
                id: crate::ServiceId::ZERO,
            }),
            nonce: Some(Nonce::default()),
            keyshare: Some(KeyShareRepr {
                group: KeyShareRepr::X25519,
                flags: 0,
                key: [7; 32],
            }),
            cookie: Some([8; 20]),
            identity: Some(IdentityRepr {
                kind: IdentityRepr::ED25519,
                key: [5; 32],
                signature: [6; 64],
            }),
            pad: MAX_PAD,
            // 11 IPv6 (209 bytes) + 6 IPv4 (42 bytes) = 251 bytes.
            source: (0..17u16)
                .map(|i| {
                    if i < 11 {
                        Locator::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, i], 1))
                    } else {
                        Locator::from(([10, 0, 0, i as u8], 1))
                    }
                })
                .collect(),
            auth: Some([0; AUTH_TAG_LEN]),
        };
        let bytes = r.to_bytes(&[]).expect("fits");
        assert_eq!(bytes.len(), MAX_EMIT_HEADER_LEN - 2);
        let p = SalPacket::new_checked(&bytes[..]).expect("valid");
        assert_eq!(SalRepr::parse(&p), Ok(r));
    }
}
