//! SAL header extensions: type codes, zero-copy views, the iterator that walks them, and the owned
//! representations of CONTROL and SERVICE.
//!
//! Every extension is `type u8 | len u8 | body`, where `len` counts the whole extension including
//! its first two bytes. Bit 7 of the type is *must understand* ([`ExtType::MUST_UNDERSTAND`]): a
//! receiver that does not know a type with that bit set rejects the packet; an unknown type without
//! it is skipped. See `docs/wire.md` for the diagrams; the packet-level rules (order, duplicates,
//! must-understand) are enforced by [`SalPacket::validate`](crate::header::SalPacket::validate).

use core::fmt;
use core::iter::FusedIterator;
use core::ops;

use crate::WireError;
use crate::header::field::EXTENSIONS;
use crate::id::{NONCE_LEN, SERVICE_ID_LEN, ServiceId};
use crate::locator::{Locator, parse_locator};

/// Byte offsets inside one extension, counted from its type byte.
pub mod field {
    /// A range of bytes.
    pub type Field = core::ops::Range<usize>;

    /// Type of the extension.
    pub const TYPE: usize = 0;
    /// Length of the whole extension in bytes, including the type and length bytes.
    pub const LEN: usize = 1;
    /// First byte of the body.
    pub const BODY: usize = 2;

    /// CONTROL: flags.
    pub const CONTROL_FLAGS: Field = 2..4;
    /// CONTROL: verification number.
    pub const CONTROL_VERNO: Field = 4..8;
    /// CONTROL: acknowledgement number.
    pub const CONTROL_ACKNO: Field = 8..12;

    /// SERVICE: hop limit.
    pub const SERVICE_HOP_LIMIT: usize = 2;
    /// SERVICE: reserved byte (sent 0, ignored on receipt).
    pub const SERVICE_RESERVED: usize = 3;
    /// SERVICE: the destination serviceID.
    pub const SERVICE_ID: Field = 4..36;

    /// NONCE: the sender's nonce.
    pub const NONCE: Field = 2..18;

    /// AUTH: the authentication tag.
    pub const AUTH_TAG: Field = 2..18;
    /// KEYSHARE: the key-exchange group.
    pub const KEYSHARE_GROUP: usize = 2;
    /// KEYSHARE: flags (bit 0: the sender asks for, or the server grants, plaintext).
    pub const KEYSHARE_FLAGS: usize = 3;
    /// KEYSHARE: the sender's ephemeral public key.
    pub const KEYSHARE_KEY: Field = 4..36;
    /// COOKIE: the opaque token a server hands out and the client echoes.
    pub const COOKIE: Field = 2..22;
    /// IDENTITY: the kind of proof.
    pub const IDENTITY_KIND: usize = 2;
    /// IDENTITY: reserved, sent 0.
    pub const IDENTITY_RESERVED: usize = 3;
    /// IDENTITY: the server's public key.
    pub const IDENTITY_KEY: Field = 4..36;
    /// IDENTITY: the signature over the handshake.
    pub const IDENTITY_SIGNATURE: Field = 36..100;
}

/// Length of a CONTROL extension.
pub const CONTROL_LEN: usize = field::CONTROL_ACKNO.end;
/// Length of a SERVICE extension.
pub const SERVICE_LEN: usize = field::SERVICE_ID.end;
/// Length of a NONCE extension.
pub const NONCE_EXT_LEN: usize = field::NONCE.end;
/// Length of an AUTH extension.
pub const AUTH_LEN: usize = field::AUTH_TAG.end;
/// Length of the authentication tag carried in AUTH.
pub const AUTH_TAG_LEN: usize = 16;
/// Length of a KEYSHARE extension.
pub const KEYSHARE_LEN: usize = field::KEYSHARE_KEY.end;
/// Length of the public key a KEYSHARE carries.
pub const KEYSHARE_KEY_LEN: usize = 32;
/// Length of an IDENTITY extension.
pub const IDENTITY_LEN: usize = field::IDENTITY_SIGNATURE.end;
/// Length of a COOKIE extension.
pub const COOKIE_LEN: usize = field::COOKIE.end;
/// Length of the token a COOKIE carries.
pub const COOKIE_TOKEN_LEN: usize = 20;
/// Most bytes of locators a SOURCE extension can hold (its length byte counts 2 more).
pub const SOURCE_MAX_LOCATOR_BYTES: usize = u8::MAX as usize - field::BODY;

/// The type byte of an extension.
///
/// Every value is representable; the associated constants name the known ones.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExtType(pub u8);

impl ExtType {
    /// Bit set in the type of every extension a receiver must understand.
    pub const MUST_UNDERSTAND: u8 = 0x80;
    /// Padding: any length of at least 2, contents ignored, may repeat.
    pub const PAD: ExtType = ExtType(0x00);
    /// Connection control: flags, verno, ackno. First if present.
    pub const CONTROL: ExtType = ExtType(0x81);
    /// Destination service and hop limit.
    pub const SERVICE: ExtType = ExtType(0x82);
    /// The sender's connection nonce.
    pub const NONCE: ExtType = ExtType(0x83);
    /// The locators the packet came from: the original sender, then each router.
    pub const SOURCE: ExtType = ExtType(0x84);
    /// Authentication tag over the whole packet. Last if present.
    pub const AUTH: ExtType = ExtType(0x85);
    /// The sender's ephemeral key-exchange share (SYN and SYN-ACK).
    pub const KEYSHARE: ExtType = ExtType(0x86);
    /// The server's proof of who it is: its public key and a signature over the handshake
    /// (SYN-ACK, when the SYN asked for it).
    pub const IDENTITY: ExtType = ExtType(0x87);
    /// A server's stateless cookie: in a NACK asking the client to retry, and echoed in its
    /// retried SYN.
    pub const COOKIE: ExtType = ExtType(0x88);

    /// Whether a receiver that does not know this type must reject the packet.
    pub const fn is_mandatory(self) -> bool {
        self.0 & Self::MUST_UNDERSTAND != 0
    }

    /// Whether this implementation knows the type.
    pub const fn is_known(self) -> bool {
        matches!(self.0, 0x00 | 0x81..=0x88)
    }

    /// The fixed length of extensions of this type, if they have one.
    pub const fn fixed_len(self) -> Option<usize> {
        match self {
            Self::CONTROL => Some(CONTROL_LEN),
            Self::SERVICE => Some(SERVICE_LEN),
            Self::NONCE => Some(NONCE_EXT_LEN),
            Self::AUTH => Some(AUTH_LEN),
            Self::KEYSHARE => Some(KEYSHARE_LEN),
            Self::COOKIE => Some(COOKIE_LEN),
            Self::IDENTITY => Some(IDENTITY_LEN),
            _ => None,
        }
    }

    const fn name(self) -> Option<&'static str> {
        match self {
            Self::PAD => Some("PAD"),
            Self::CONTROL => Some("CONTROL"),
            Self::SERVICE => Some("SERVICE"),
            Self::NONCE => Some("NONCE"),
            Self::SOURCE => Some("SOURCE"),
            Self::AUTH => Some("AUTH"),
            Self::KEYSHARE => Some("KEYSHARE"),
            Self::COOKIE => Some("COOKIE"),
            Self::IDENTITY => Some("IDENTITY"),
            _ => None,
        }
    }
}

impl fmt::Display for ExtType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "{:#04x}", self.0),
        }
    }
}

impl fmt::Debug for ExtType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ExtType({self})")
    }
}

impl From<u8> for ExtType {
    fn from(v: u8) -> Self {
        ExtType(v)
    }
}

impl From<ExtType> for u8 {
    fn from(t: ExtType) -> u8 {
        t.0
    }
}

/// The flags of a CONTROL extension.
///
/// Only the seven defined bits can be held: [`ControlFlags::from_bits_truncate`] drops the others, so
/// they are always sent as 0 and ignored on receipt.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ControlFlags(u16);

impl ControlFlags {
    /// No flag set.
    pub const EMPTY: ControlFlags = ControlFlags(0);
    /// Opens a connection (with ACK: accepts one).
    pub const SYN: ControlFlags = ControlFlags(0x0001);
    /// Acknowledges the control packet whose verno is in `ackno`.
    pub const ACK: ControlFlags = ControlFlags(0x0002);
    /// Re-synchronises a flow after a locator change (migration).
    pub const RSYN: ControlFlags = ControlFlags(0x0004);
    /// Negative acknowledgement.
    pub const NACK: ControlFlags = ControlFlags(0x0008);
    /// Resets the flow.
    pub const RST: ControlFlags = ControlFlags(0x0010);
    /// The sender has finished sending on the flow.
    pub const FIN: ControlFlags = ControlFlags(0x0020);
    /// Joins a new path to the flow (with ACK: accepts the join); `verno` is the path ID
    /// (multipath, docs/wire.md §16).
    pub const JOIN: ControlFlags = ControlFlags(0x0040);
    /// Every defined flag.
    pub const ALL: ControlFlags = ControlFlags(0x007f);

    const NAMES: [(ControlFlags, &'static str); 7] = [
        (Self::SYN, "SYN"),
        (Self::ACK, "ACK"),
        (Self::RSYN, "RSYN"),
        (Self::NACK, "NACK"),
        (Self::RST, "RST"),
        (Self::FIN, "FIN"),
        (Self::JOIN, "JOIN"),
    ];

    /// The flags in `bits`, ignoring undefined bits.
    pub const fn from_bits_truncate(bits: u16) -> ControlFlags {
        ControlFlags(bits & Self::ALL.0)
    }

    /// The flags in `bits`, or `None` if an undefined bit is set.
    pub const fn from_bits(bits: u16) -> Option<ControlFlags> {
        if bits & !Self::ALL.0 == 0 {
            Some(ControlFlags(bits))
        } else {
            None
        }
    }

    /// The bits as sent on the wire.
    pub const fn bits(self) -> u16 {
        self.0
    }

    /// Whether no flag is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether every flag of `other` is set in `self`.
    pub const fn contains(self, other: ControlFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether any flag of `other` is set in `self`.
    pub const fn intersects(self, other: ControlFlags) -> bool {
        self.0 & other.0 != 0
    }

    /// The flags set in either.
    pub const fn union(self, other: ControlFlags) -> ControlFlags {
        ControlFlags(self.0 | other.0)
    }

    /// Sets the flags of `other`.
    pub fn insert(&mut self, other: ControlFlags) {
        self.0 |= other.0;
    }

    /// Clears the flags of `other`.
    pub fn remove(&mut self, other: ControlFlags) {
        self.0 &= !other.0;
    }
}

impl ops::BitOr for ControlFlags {
    type Output = ControlFlags;
    fn bitor(self, rhs: ControlFlags) -> ControlFlags {
        self.union(rhs)
    }
}

impl ops::BitOrAssign for ControlFlags {
    fn bitor_assign(&mut self, rhs: ControlFlags) {
        self.insert(rhs);
    }
}

impl ops::BitAnd for ControlFlags {
    type Output = ControlFlags;
    fn bitand(self, rhs: ControlFlags) -> ControlFlags {
        ControlFlags(self.0 & rhs.0)
    }
}

impl fmt::Display for ControlFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("-");
        }
        let mut sep = "";
        for (flag, name) in Self::NAMES {
            if self.contains(flag) {
                write!(f, "{sep}{name}")?;
                sep = "|";
            }
        }
        Ok(())
    }
}

impl fmt::Debug for ControlFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ControlFlags({self})")
    }
}

/// One extension, as yielded by [`Extensions`]. Every variant borrows from the packet.
///
/// A value of this type has already passed the per-extension checks: its length is within the
/// header, fixed-length types have their exact length, and a SOURCE holds a non-empty, loop-free list
/// of well-formed locators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extension<'a> {
    /// PAD: the body, whose contents mean nothing.
    Pad(&'a [u8]),
    /// CONTROL.
    Control(ControlExt<'a>),
    /// SERVICE.
    Service(ServiceExt<'a>),
    /// NONCE: the nonce bytes.
    Nonce(&'a [u8; NONCE_LEN]),
    /// SOURCE.
    Source(SourceExt<'a>),
    /// AUTH: the tag bytes.
    Auth(&'a [u8; AUTH_TAG_LEN]),
    /// KEYSHARE.
    KeyShare(KeyShareRepr),
    /// COOKIE: the token.
    Cookie(&'a [u8; COOKIE_TOKEN_LEN]),
    /// IDENTITY.
    Identity(IdentityRepr),
    /// A type this implementation does not know (mandatory or not), with its body.
    Unknown {
        /// The type byte.
        ty: ExtType,
        /// The body (after the type and length bytes).
        body: &'a [u8],
    },
}

impl Extension<'_> {
    /// The type of this extension.
    pub fn ty(&self) -> ExtType {
        match self {
            Extension::Pad(_) => ExtType::PAD,
            Extension::Control(_) => ExtType::CONTROL,
            Extension::Service(_) => ExtType::SERVICE,
            Extension::Nonce(_) => ExtType::NONCE,
            Extension::Source(_) => ExtType::SOURCE,
            Extension::Auth(_) => ExtType::AUTH,
            Extension::KeyShare(_) => ExtType::KEYSHARE,
            Extension::Cookie(_) => ExtType::COOKIE,
            Extension::Identity(_) => ExtType::IDENTITY,
            Extension::Unknown { ty, .. } => *ty,
        }
    }
}

/// A zero-copy view of a CONTROL extension (exactly [`CONTROL_LEN`] bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlExt<'a>(&'a [u8; CONTROL_LEN]);

impl ControlExt<'_> {
    /// The flags; undefined bits are dropped.
    pub fn flags(&self) -> ControlFlags {
        ControlFlags::from_bits_truncate(u16::from_be_bytes([self.0[2], self.0[3]]))
    }

    /// The verification number: the sequence number of this control packet.
    pub fn verno(&self) -> u32 {
        u32::from_be_bytes([self.0[4], self.0[5], self.0[6], self.0[7]])
    }

    /// The acknowledgement number: the verno being acknowledged (meaningful with ACK).
    pub fn ackno(&self) -> u32 {
        u32::from_be_bytes([self.0[8], self.0[9], self.0[10], self.0[11]])
    }
}

/// A KEYSHARE extension: one end's ephemeral Diffie–Hellman public key, in the SYN and the
/// SYN-ACK (docs/wire.md §4.6).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyShareRepr {
    /// The key-exchange group: [`KeyShareRepr::X25519`] is the only one defined. A receiver
    /// refuses a handshake in a group it does not know.
    pub group: u8,
    /// Flags: [`KeyShareRepr::PLAINTEXT`] asks for (SYN) or grants (SYN-ACK) unencrypted but
    /// authenticated packets. Other bits are sent 0 and ignored.
    pub flags: u8,
    /// The public key.
    pub key: [u8; KEYSHARE_KEY_LEN],
}

impl KeyShareRepr {
    /// Group 1: X25519 (RFC 7748).
    pub const X25519: u8 = 1;
    /// Flag bit 0: plaintext (authenticated, not encrypted) packets.
    pub const PLAINTEXT: u8 = 0x01;
    /// Flag bit 1, in a SYN: the client asks the server to prove its identity (IDENTITY in the
    /// SYN-ACK); the SYN is padded so that the answer is no larger.
    pub const IDENTITY: u8 = 0x02;
    /// Flag bit 2, in a SYN with IDENTITY: the client also asks for the server's certificate
    /// chain (the SYN-ACK's sealed payload); the SYN is padded to 1200 bytes to pay for it.
    pub const CERTIFICATE: u8 = 0x04;

    fn parse(ext: &[u8; KEYSHARE_LEN]) -> KeyShareRepr {
        let mut key = [0u8; KEYSHARE_KEY_LEN];
        key.copy_from_slice(&ext[field::KEYSHARE_KEY]);
        KeyShareRepr {
            group: ext[field::KEYSHARE_GROUP],
            flags: ext[field::KEYSHARE_FLAGS],
            key,
        }
    }

    /// Writes the whole extension (type and length included) into `buf`, exactly
    /// [`KEYSHARE_LEN`] bytes.
    pub(crate) fn emit(&self, buf: &mut [u8]) {
        buf[field::TYPE] = ExtType::KEYSHARE.0;
        buf[field::LEN] = KEYSHARE_LEN as u8;
        buf[field::KEYSHARE_GROUP] = self.group;
        buf[field::KEYSHARE_FLAGS] = self.flags;
        buf[field::KEYSHARE_KEY].copy_from_slice(&self.key);
    }

    /// Whether the plaintext flag is set.
    pub fn plaintext(&self) -> bool {
        self.flags & Self::PLAINTEXT != 0
    }
}

impl fmt::Debug for KeyShareRepr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "KeyShare(group {}, flags {:#04x})",
            self.group, self.flags
        )
    }
}

/// An IDENTITY extension: a server's public key and its signature over the handshake
/// (docs/wire.md §4.8).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdentityRepr {
    /// The kind of proof: [`IdentityRepr::ED25519`] is the only one defined.
    pub kind: u8,
    /// The server's public key.
    pub key: [u8; 32],
    /// Its signature over `"serval2 server identity" || transcript hash`.
    pub signature: [u8; 64],
}

impl IdentityRepr {
    /// Kind 1: an Ed25519 public key and signature.
    pub const ED25519: u8 = 1;

    fn parse(ext: &[u8; IDENTITY_LEN]) -> IdentityRepr {
        let mut key = [0u8; 32];
        key.copy_from_slice(&ext[field::IDENTITY_KEY]);
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&ext[field::IDENTITY_SIGNATURE]);
        IdentityRepr {
            kind: ext[field::IDENTITY_KIND],
            key,
            signature,
        }
    }

    /// Writes the whole extension into `buf`, exactly [`IDENTITY_LEN`] bytes.
    pub(crate) fn emit(&self, buf: &mut [u8]) {
        buf[field::TYPE] = ExtType::IDENTITY.0;
        buf[field::LEN] = IDENTITY_LEN as u8;
        buf[field::IDENTITY_KIND] = self.kind;
        buf[field::IDENTITY_RESERVED] = 0;
        buf[field::IDENTITY_KEY].copy_from_slice(&self.key);
        buf[field::IDENTITY_SIGNATURE].copy_from_slice(&self.signature);
    }
}

impl fmt::Debug for IdentityRepr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity(kind {})", self.kind)
    }
}

/// A zero-copy view of a SERVICE extension (exactly [`SERVICE_LEN`] bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceExt<'a>(&'a [u8; SERVICE_LEN]);

impl ServiceExt<'_> {
    /// Service routers the packet may still cross.
    pub fn hop_limit(&self) -> u8 {
        self.0[field::SERVICE_HOP_LIMIT]
    }

    /// The destination serviceID.
    pub fn service_id(&self) -> ServiceId {
        let mut id = [0u8; SERVICE_ID_LEN];
        id.copy_from_slice(&self.0[field::SERVICE_ID]);
        ServiceId(id)
    }
}

/// A zero-copy view of a SOURCE extension: one or more distinct locators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceExt<'a> {
    /// The locator bytes (the body), known to parse as a whole number of locators.
    body: &'a [u8],
    origin: Locator,
}

impl<'a> SourceExt<'a> {
    /// Checks a SOURCE body (of an extension of length `len`): non-empty, a whole number of valid
    /// locators, none twice.
    fn new(body: &'a [u8], len: u8) -> Result<SourceExt<'a>, WireError> {
        let mut origin = None;
        let mut pos = 0;
        while let Some(rest) = body.get(pos..).filter(|r| !r.is_empty()) {
            let (loc, n) = parse_locator(rest).map_err(|e| match e {
                WireError::Truncated => WireError::SourceTruncated(len),
                other => other,
            })?;
            // Quadratic, but a SOURCE holds at most 36 locators. Parsed locators carry no IPv6
            // flow label or scope, so `==` compares exactly what is on the wire.
            let mut earlier = Locators {
                rest: body.get(..pos).unwrap_or_default(),
            };
            if earlier.any(|l| l == loc) {
                return Err(WireError::SourceLoop(loc));
            }
            origin.get_or_insert(loc);
            pos += n;
        }
        match origin {
            Some(origin) => Ok(SourceExt { body, origin }),
            None => Err(WireError::SourceEmpty),
        }
    }

    /// The first locator: the host that originally sent the packet.
    pub fn origin(&self) -> Locator {
        self.origin
    }

    /// The locators, the original sender first, then each router in the order crossed.
    pub fn locators(&self) -> Locators<'a> {
        Locators { rest: self.body }
    }

    /// The locator bytes as carried on the wire.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.body
    }
}

/// Iterator over the locators of a [`SourceExt`].
#[derive(Debug, Clone)]
pub struct Locators<'a> {
    rest: &'a [u8],
}

impl Iterator for Locators<'_> {
    type Item = Locator;

    fn next(&mut self) -> Option<Locator> {
        // The body was validated when the `SourceExt` was built; an error cannot happen, but if it
        // did the iteration would simply end.
        match parse_locator(self.rest) {
            Ok((loc, n)) => {
                self.rest = self.rest.get(n..).unwrap_or_default();
                Some(loc)
            }
            Err(_) => {
                self.rest = &[];
                None
            }
        }
    }
}

impl FusedIterator for Locators<'_> {}

/// A zero-copy iterator over the extensions of a SAL header.
///
/// It checks each extension on its own (length within the header, fixed lengths, SOURCE contents)
/// but not the rules between extensions (order, duplicates, must-understand); those are checked by
/// [`SalPacket::validate`](crate::header::SalPacket::validate). On a packet built with
/// [`SalPacket::new_checked`](crate::header::SalPacket::new_checked) every extension is
/// well-formed, so iteration yields them all. On an unchecked packet, iteration stops at the first
/// malformed extension; [`Extensions::try_next`] reports why.
#[derive(Debug, Clone)]
pub struct Extensions<'a> {
    /// The extension area: bytes 20 to `hdr_len` of the packet.
    area: &'a [u8],
    pos: usize,
}

impl<'a> Extensions<'a> {
    /// An iterator over the extensions in `area`, the bytes between the base header and
    /// `hdr_len`.
    pub(crate) fn new(area: &'a [u8]) -> Extensions<'a> {
        Extensions { area, pos: 0 }
    }

    /// Offset in the packet of the next extension to be read.
    pub fn offset(&self) -> usize {
        EXTENSIONS.start + self.pos
    }

    /// The next extension, `Ok(None)` at the end, or why the next extension is malformed (after
    /// which the iterator is finished).
    pub fn try_next(&mut self) -> Result<Option<Extension<'a>>, WireError> {
        let r = self.read();
        if r.is_err() {
            self.pos = self.area.len();
        }
        r
    }

    fn read(&mut self) -> Result<Option<Extension<'a>>, WireError> {
        let Some(rest) = self.area.get(self.pos..).filter(|r| !r.is_empty()) else {
            return Ok(None);
        };
        let offset = self.offset();
        let ty = ExtType(rest[field::TYPE]);
        let Some(&len) = rest.get(field::LEN) else {
            return Err(WireError::ExtOverrun { ty: ty.0, offset });
        };
        if usize::from(len) < field::BODY {
            return Err(WireError::ExtTooShort { ty: ty.0, len });
        }
        let Some(ext) = rest.get(..usize::from(len)) else {
            return Err(WireError::ExtOverrun { ty: ty.0, offset });
        };
        let body = ext.get(field::BODY..).unwrap_or_default();
        // Fixed-length types: `array` gives the exact-size view or the length error.
        let bad_len = |expected: usize| WireError::ExtBadLen {
            ty: ty.0,
            len,
            expected: expected as u8,
        };
        let item = match ty {
            ExtType::PAD => Extension::Pad(body),
            ExtType::CONTROL => Extension::Control(ControlExt(
                ext.try_into().map_err(|_| bad_len(CONTROL_LEN))?,
            )),
            ExtType::SERVICE => Extension::Service(ServiceExt(
                ext.try_into().map_err(|_| bad_len(SERVICE_LEN))?,
            )),
            ExtType::NONCE => {
                Extension::Nonce(body.try_into().map_err(|_| bad_len(NONCE_EXT_LEN))?)
            }
            ExtType::AUTH => Extension::Auth(body.try_into().map_err(|_| bad_len(AUTH_LEN))?),
            ExtType::IDENTITY => Extension::Identity(IdentityRepr::parse(
                ext.try_into().map_err(|_| bad_len(IDENTITY_LEN))?,
            )),
            ExtType::COOKIE => Extension::Cookie(body.try_into().map_err(|_| bad_len(COOKIE_LEN))?),
            ExtType::KEYSHARE => Extension::KeyShare(KeyShareRepr::parse(
                ext.try_into().map_err(|_| bad_len(KEYSHARE_LEN))?,
            )),
            ExtType::SOURCE => Extension::Source(SourceExt::new(body, len)?),
            ty => Extension::Unknown { ty, body },
        };
        self.pos += ext.len();
        Ok(Some(item))
    }
}

impl<'a> Iterator for Extensions<'a> {
    type Item = Extension<'a>;

    fn next(&mut self) -> Option<Extension<'a>> {
        self.try_next().ok().flatten()
    }
}

impl FusedIterator for Extensions<'_> {}

/// The owned form of a CONTROL extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ControlRepr {
    /// The flags.
    pub flags: ControlFlags,
    /// Verification number: the sequence number of this control packet.
    pub verno: u32,
    /// Acknowledgement number: the verno acknowledged (meaningful with ACK).
    pub ackno: u32,
}

impl ControlRepr {
    /// Reads a CONTROL view.
    pub fn parse(ext: &ControlExt<'_>) -> ControlRepr {
        ControlRepr {
            flags: ext.flags(),
            verno: ext.verno(),
            ackno: ext.ackno(),
        }
    }

    /// Writes the whole extension (type and length included) into the first [`CONTROL_LEN`]
    /// bytes of `buf`, which the caller has sized.
    pub(crate) fn emit(&self, buf: &mut [u8]) {
        buf[field::TYPE] = ExtType::CONTROL.0;
        buf[field::LEN] = CONTROL_LEN as u8;
        buf[field::CONTROL_FLAGS].copy_from_slice(&self.flags.bits().to_be_bytes());
        buf[field::CONTROL_VERNO].copy_from_slice(&self.verno.to_be_bytes());
        buf[field::CONTROL_ACKNO].copy_from_slice(&self.ackno.to_be_bytes());
    }
}

/// The owned form of a SERVICE extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServiceRepr {
    /// Service routers the packet may still cross.
    pub hop_limit: u8,
    /// The destination serviceID.
    pub id: ServiceId,
}

impl ServiceRepr {
    /// Reads a SERVICE view.
    pub fn parse(ext: &ServiceExt<'_>) -> ServiceRepr {
        ServiceRepr {
            hop_limit: ext.hop_limit(),
            id: ext.service_id(),
        }
    }

    /// Writes the whole extension (type and length included) into the first [`SERVICE_LEN`]
    /// bytes of `buf`, which the caller has sized.
    pub(crate) fn emit(&self, buf: &mut [u8]) {
        buf[field::TYPE] = ExtType::SERVICE.0;
        buf[field::LEN] = SERVICE_LEN as u8;
        buf[field::SERVICE_HOP_LIMIT] = self.hop_limit;
        buf[field::SERVICE_RESERVED] = 0;
        buf[field::SERVICE_ID].copy_from_slice(self.id.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_flags() {
        let f = ControlFlags::SYN | ControlFlags::ACK;
        assert_eq!(f.bits(), 0x0003);
        assert!(
            f.contains(ControlFlags::SYN) && !f.contains(ControlFlags::SYN | ControlFlags::FIN)
        );
        assert!(f.intersects(ControlFlags::ACK | ControlFlags::RST));
        assert_eq!(f.to_string(), "SYN|ACK");
        assert_eq!(format!("{:?}", ControlFlags::EMPTY), "ControlFlags(-)");
        assert_eq!(ControlFlags::from_bits_truncate(0xffff), ControlFlags::ALL);
        assert_eq!(ControlFlags::from_bits(0x0080), None);
        assert_eq!(ControlFlags::from_bits(0x0040), Some(ControlFlags::JOIN));
        assert_eq!(
            (ControlFlags::JOIN | ControlFlags::ACK).to_string(),
            "ACK|JOIN"
        );
        assert_eq!(ControlFlags::from_bits(0x0020), Some(ControlFlags::FIN));
        let mut g = f;
        g.remove(ControlFlags::SYN);
        g |= ControlFlags::FIN;
        assert_eq!(g, ControlFlags::ACK | ControlFlags::FIN);
        assert_eq!(g & ControlFlags::FIN, ControlFlags::FIN);
    }

    #[test]
    fn ext_types() {
        for t in [
            ExtType::CONTROL,
            ExtType::SERVICE,
            ExtType::NONCE,
            ExtType::SOURCE,
            ExtType::AUTH,
            ExtType::KEYSHARE,
        ] {
            assert!(t.is_known() && t.is_mandatory(), "{t}");
        }
        assert!(ExtType::PAD.is_known() && !ExtType::PAD.is_mandatory());
        assert!(!ExtType(0x89).is_known() && ExtType(0x89).is_mandatory());
        assert!(ExtType::COOKIE.is_known() && ExtType::COOKIE.is_mandatory());
        assert!(ExtType::IDENTITY.is_known() && ExtType::IDENTITY.is_mandatory());
        assert!(!ExtType(0x7f).is_known() && !ExtType(0x7f).is_mandatory());
        assert_eq!(ExtType(0x89).to_string(), "0x89");
        assert_eq!(format!("{:?}", ExtType::AUTH), "ExtType(AUTH)");
        assert_eq!(ExtType::SOURCE.fixed_len(), None);
        assert_eq!(ExtType::SERVICE.fixed_len(), Some(36));
    }

    #[test]
    fn iterator_reports_and_then_stops() {
        // A PAD, then an extension running past the area.
        let area = [0x00, 3, 0xff, 0x83, 18, 0];
        let mut it = Extensions::new(&area);
        assert_eq!(it.try_next(), Ok(Some(Extension::Pad(&[0xff]))));
        assert_eq!(it.offset(), 23);
        assert_eq!(
            it.try_next(),
            Err(WireError::ExtOverrun {
                ty: 0x83,
                offset: 23
            })
        );
        assert_eq!(it.try_next(), Ok(None));
        assert_eq!(Extensions::new(&area).count(), 1);
    }
}
