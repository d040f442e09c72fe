//! Registration messages: how an instance tells a service router "send connections for this
//! prefix to me", and how the router answers.
//!
//! A registration message is a SAL packet whose base header has protocol
//! [`Protocol::REGISTRATION`] and both flowIDs zero, followed by a payload of one of three
//! lengths: the 60-byte fixed part alone (the original form), the fixed part and a 16-byte
//! Cookie (76 bytes: [`REGISTRATION_COOKIE_PAYLOAD_LEN`]), or those and a 64-byte Ed25519
//! Signature (140 bytes: [`REGISTRATION_SIGNED_PAYLOAD_LEN`]). The fixed part:
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |     Type      |    Reason     |         Prefix Length         |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                          Request ID                           |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                                                               |
//! +                         Instance (64)                         +
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                            Weight                             |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                           Priority                            |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                         TTL (ms)                              |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                                                               |
//! +                 Service Prefix ID (256 bits)                  +
//! |                          (32 bytes)                           |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! The locator being registered is not in the message: it is the UDP source the router
//! observes, so registration works behind address translation. The router proves that the
//! instance receives there before storing anything: it answers a request without a valid
//! cookie with a COOKIE message (the request with its type and Cookie field changed), and the
//! instance sends the request again with that cookie. Under a prefix the router holds an
//! authorised key for, the request must also carry a Signature by that key over its first 76
//! payload bytes (`serval-keys` signs and verifies). An answer (ACK, REJECT or COOKIE) is the
//! request with its type (and reason, granted TTL or cookie) changed, so it is exactly as long
//! as the request: a router cannot be used as an amplifier. The full specification is
//! `docs/wire.md` §11.
//!
//! ```
//! use serval_wire::registration::{MessageType, RegistrationRepr, REGISTRATION_PACKET_LEN};
//! use serval_wire::{SalPacket, ServiceId, ServicePrefix};
//!
//! let id = ServiceId::from_name("web.example.com").unwrap();
//! let request = RegistrationRepr::register(7, 0xfeed, ServicePrefix::exact(id), 3, 0, 3000);
//! let bytes = request.to_packet();
//! assert_eq!(bytes.len(), REGISTRATION_PACKET_LEN);
//!
//! let parsed = RegistrationRepr::parse_packet(&SalPacket::new_checked(&bytes[..])?)?;
//! assert_eq!(parsed, request);
//! let ack = parsed.ack(2500);
//! assert_eq!(ack.ty, MessageType::Ack);
//! assert_eq!(ack.ttl_ms, 2500);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use core::fmt;

use crate::WireError;
use crate::header::{BASE_HEADER_LEN, Protocol, SalPacket, SalRepr};
use crate::id::{FlowId, SERVICE_ID_BITS, SERVICE_ID_LEN, ServiceId, ServicePrefix};

/// Length of the fixed registration payload after the SAL header (the original form, with no
/// cookie and no signature).
pub const REGISTRATION_PAYLOAD_LEN: usize = field::PREFIX_ID.end;
/// Length of a whole registration packet in the original form (base header, no extension,
/// 60-byte payload).
pub const REGISTRATION_PACKET_LEN: usize = BASE_HEADER_LEN + REGISTRATION_PAYLOAD_LEN;
/// Length of the payload with a Cookie field (76 bytes).
pub const REGISTRATION_COOKIE_PAYLOAD_LEN: usize = field::COOKIE.end;
/// Length of the payload with a Cookie and a Signature field (140 bytes).
pub const REGISTRATION_SIGNED_PAYLOAD_LEN: usize = field::SIGNATURE.end;
/// Length of a return-routability cookie.
pub const COOKIE_LEN: usize = 16;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// The payload bytes a signature covers (everything before the Signature field).
pub const SIGNED_LEN: usize = field::COOKIE.end;

/// Byte offsets in the registration payload.
pub mod field {
    /// A range of bytes.
    pub type Field = core::ops::Range<usize>;

    /// Message type.
    pub const TYPE: usize = 0;
    /// Reject reason (0 in every other type).
    pub const REASON: usize = 1;
    /// Prefix length in bits, 0..=256.
    pub const PREFIX_LEN: Field = 2..4;
    /// Chosen by the requester, echoed in the answer.
    pub const REQUEST_ID: Field = 4..8;
    /// The requester's instance token.
    pub const INSTANCE: Field = 8..16;
    /// Weight among targets of the same priority.
    pub const WEIGHT: Field = 16..20;
    /// Priority.
    pub const PRIORITY: Field = 20..24;
    /// Requested (REGISTER) or granted (ACK) lease in milliseconds.
    pub const TTL: Field = 24..28;
    /// The prefix's 256 ID bits, zero past the prefix length.
    pub const PREFIX_ID: Field = 28..60;
    /// The return-routability cookie (76- and 140-byte forms only); zero: none yet.
    pub const COOKIE: Field = 60..76;
    /// The Ed25519 signature over bytes 0..76 (140-byte form only); zero in answers.
    pub const SIGNATURE: Field = 76..140;
}

/// A return-routability cookie: the router's proof, echoed by the instance, that the instance
/// receives at the locator it registers (`docs/wire.md` §11.2). All zeros means "none yet".
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Cookie(pub [u8; COOKIE_LEN]);

impl Cookie {
    /// No cookie yet: what an instance sends before the router gave it one.
    pub const EMPTY: Cookie = Cookie([0; COOKIE_LEN]);

    /// Whether this is [`Cookie::EMPTY`].
    pub fn is_empty(&self) -> bool {
        self.0 == [0; COOKIE_LEN]
    }
}

impl fmt::Debug for Cookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cookie(")?;
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        f.write_str(")")
    }
}

/// An Ed25519 signature over a registration request (`docs/wire.md` §11.1).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature(pub [u8; SIGNATURE_LEN]);

impl Signature {
    /// The all-zero field answers carry.
    pub const ZERO: Signature = Signature([0; SIGNATURE_LEN]);
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Signature(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…)")
    }
}

/// What a registration message asks or answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// Instance → router: forward new flows for the prefix to my (observed) locator.
    Register,
    /// Instance → router: stop at once.
    Unregister,
    /// Router → instance: done (with the granted TTL, for a REGISTER).
    Ack,
    /// Router → instance: refused, for the reason given.
    Reject(RejectReason),
    /// Router → instance: send the request again with the cookie this message carries (only
    /// in the 76- and 140-byte forms).
    Cookie,
}

impl MessageType {
    /// The type byte on the wire.
    pub const fn code(self) -> u8 {
        match self {
            MessageType::Register => 1,
            MessageType::Unregister => 2,
            MessageType::Ack => 3,
            MessageType::Reject(_) => 4,
            MessageType::Cookie => 5,
        }
    }

    /// The reason byte on the wire (0 except in a REJECT).
    pub const fn reason_code(self) -> u8 {
        match self {
            MessageType::Reject(r) => r.0,
            _ => 0,
        }
    }

    /// Whether a requester sends it (REGISTER, UNREGISTER) rather than a router.
    pub const fn is_request(self) -> bool {
        matches!(self, MessageType::Register | MessageType::Unregister)
    }

    /// Reads the type and reason bytes of the original 60-byte form, which has no COOKIE
    /// type (5 is unknown there); [`MessageType::from_codes_extended`] reads the longer forms.
    pub fn from_codes(ty: u8, reason: u8) -> Result<MessageType, RegError> {
        if ty == 5 {
            return Err(RegError::UnknownType(ty));
        }
        MessageType::from_codes_extended(ty, reason)
    }

    /// Reads the type and reason bytes of a 76- or 140-byte message (types 1 to 5).
    pub fn from_codes_extended(ty: u8, reason: u8) -> Result<MessageType, RegError> {
        let t = match ty {
            5 => MessageType::Cookie,
            1 => MessageType::Register,
            2 => MessageType::Unregister,
            3 => MessageType::Ack,
            4 if reason != 0 => return Ok(MessageType::Reject(RejectReason(reason))),
            4 => return Err(RegError::BadReason { ty, reason }),
            other => return Err(RegError::UnknownType(other)),
        };
        if reason != 0 {
            return Err(RegError::BadReason { ty, reason });
        }
        Ok(t)
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MessageType::Register => f.write_str("REGISTER"),
            MessageType::Unregister => f.write_str("UNREGISTER"),
            MessageType::Ack => f.write_str("ACK"),
            MessageType::Reject(r) => write!(f, "REJECT ({r})"),
            MessageType::Cookie => f.write_str("COOKIE"),
        }
    }
}

/// Why a router refused a request (the reason byte of a REJECT, never 0).
///
/// Every non-zero value is representable so that an older requester can still report a reason
/// it does not know; the associated constants name the known ones.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RejectReason(pub u8);

impl RejectReason {
    /// The router is not configured to accept registrations for this prefix.
    pub const NOT_ACCEPTED: RejectReason = RejectReason(1);
    /// The router could not store the registration (its registry is unreachable); try again.
    pub const UNAVAILABLE: RejectReason = RejectReason(2);
    /// The router holds as many registrations as it is configured to.
    pub const LIMIT: RejectReason = RejectReason(3);
    /// The prefix falls under a prefix the router holds an authorised key for, and the
    /// request is not signed by such a key (or the prefix covers an authorised prefix that it
    /// would capture).
    pub const UNAUTHORIZED: RejectReason = RejectReason(4);
    /// A request in the original 60-byte form, which has no room for the cookie the router
    /// needs to see echoed: send it in the 76-byte form.
    pub const COOKIE_REQUIRED: RejectReason = RejectReason(5);
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RejectReason::NOT_ACCEPTED => f.write_str("prefix not accepted by this router"),
            RejectReason::UNAVAILABLE => f.write_str("router's registry unavailable"),
            RejectReason::LIMIT => f.write_str("router's registration limit reached"),
            RejectReason::UNAUTHORIZED => {
                f.write_str("not signed by the key authorized for the prefix")
            }
            RejectReason::COOKIE_REQUIRED => {
                f.write_str("the router requires a cookie (an older instance?)")
            }
            RejectReason(other) => write!(f, "reason {other}"),
        }
    }
}

impl fmt::Debug for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RejectReason({}: {self})", self.0)
    }
}

/// Why a registration message was refused. Receivers drop such a packet, count it, and never
/// answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegError {
    /// The SAL header itself is malformed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The SAL header's protocol is not [`Protocol::REGISTRATION`].
    #[error("not a registration message (protocol {0})")]
    NotRegistration(Protocol),
    /// A flowID in the SAL header is not zero.
    #[error("registration message with a non-zero flowID")]
    FlowNotZero,
    /// The payload is not 60, 76 or 140 bytes long.
    #[error("registration payload of {0} bytes (expected 60, 76 or 140)")]
    BadLength(usize),
    /// The type byte is not 1 to 4 (1 to 5 in the 76- and 140-byte forms).
    #[error("unknown registration message type {0}")]
    UnknownType(u8),
    /// A REJECT with reason 0, or another type with a non-zero reason.
    #[error("registration message type {ty} with reason {reason}")]
    BadReason {
        /// The type byte.
        ty: u8,
        /// The reason byte.
        reason: u8,
    },
    /// The prefix length is above 256.
    #[error("registration prefix length {0} (expected 0 to 256)")]
    BadPrefixLen(u16),
    /// The prefix ID has bits set past the prefix length.
    #[error("registration prefix has bits set past its length")]
    PrefixHostBits,
    /// The weight is zero.
    #[error("registration weight 0 (must be at least 1)")]
    ZeroWeight,
    /// On emit: a COOKIE message with no cookie to carry.
    #[error("a COOKIE message needs a cookie")]
    CookieMissing,
    /// On emit: the buffer is shorter than the message.
    #[error("buffer of {available} bytes cannot hold the {needed}-byte registration message")]
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
}

/// A zero-copy view of a registration payload (the bytes after the SAL header).
///
/// [`RegistrationMessage::new_checked`] validates every field once; after it no accessor
/// panics and every value is one [`RegistrationRepr`] can hold. With
/// [`RegistrationMessage::new_unchecked`] the accessors panic on a buffer shorter than
/// [`REGISTRATION_PAYLOAD_LEN`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationMessage<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> RegistrationMessage<T> {
    /// Wraps a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> RegistrationMessage<T> {
        RegistrationMessage { buffer }
    }

    /// Wraps a buffer after [`check`](Self::check) accepted it.
    pub fn new_checked(buffer: T) -> Result<RegistrationMessage<T>, RegError> {
        let m = RegistrationMessage::new_unchecked(buffer);
        m.check()?;
        Ok(m)
    }

    /// Checks, in this order: the length is 60, 76 or 140 bytes; the type is known (1 to 4,
    /// and 5 in the longer forms) and the reason fits it (non-zero in a REJECT, zero
    /// otherwise); the prefix length is at most 256 and no ID bit past it is set; the weight
    /// is at least 1. The Cookie and Signature fields are not checked here.
    pub fn check(&self) -> Result<(), RegError> {
        let len = self.buffer.as_ref().len();
        if !matches!(
            len,
            REGISTRATION_PAYLOAD_LEN
                | REGISTRATION_COOKIE_PAYLOAD_LEN
                | REGISTRATION_SIGNED_PAYLOAD_LEN
        ) {
            return Err(RegError::BadLength(len));
        }
        self.message_type()?;
        let plen = self.prefix_len();
        if plen > SERVICE_ID_BITS {
            return Err(RegError::BadPrefixLen(plen));
        }
        if ServicePrefix::new_strict(self.prefix_id(), plen).is_none() {
            return Err(RegError::PrefixHostBits);
        }
        if self.weight() == 0 {
            return Err(RegError::ZeroWeight);
        }
        Ok(())
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn u32_at(&self, f: field::Field) -> u32 {
        let d = &self.buffer.as_ref()[f];
        u32::from_be_bytes([d[0], d[1], d[2], d[3]])
    }

    /// The type (with the reject reason). Type 5 (COOKIE) exists only in the longer forms.
    pub fn message_type(&self) -> Result<MessageType, RegError> {
        let d = self.buffer.as_ref();
        if d.len() > REGISTRATION_PAYLOAD_LEN {
            MessageType::from_codes_extended(d[field::TYPE], d[field::REASON])
        } else {
            MessageType::from_codes(d[field::TYPE], d[field::REASON])
        }
    }

    /// The Cookie field, in the 76- and 140-byte forms.
    pub fn cookie(&self) -> Option<Cookie> {
        let mut c = [0u8; COOKIE_LEN];
        c.copy_from_slice(self.buffer.as_ref().get(field::COOKIE)?);
        Some(Cookie(c))
    }

    /// The Signature field, in the 140-byte form.
    pub fn signature(&self) -> Option<Signature> {
        let mut s = [0u8; SIGNATURE_LEN];
        s.copy_from_slice(self.buffer.as_ref().get(field::SIGNATURE)?);
        Some(Signature(s))
    }

    /// The prefix length field (not checked against 256 by this accessor).
    pub fn prefix_len(&self) -> u16 {
        let d = &self.buffer.as_ref()[field::PREFIX_LEN];
        u16::from_be_bytes([d[0], d[1]])
    }

    /// The request ID.
    pub fn request_id(&self) -> u32 {
        self.u32_at(field::REQUEST_ID)
    }

    /// The instance token.
    pub fn instance(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.buffer.as_ref()[field::INSTANCE]);
        u64::from_be_bytes(b)
    }

    /// The weight.
    pub fn weight(&self) -> u32 {
        self.u32_at(field::WEIGHT)
    }

    /// The priority.
    pub fn priority(&self) -> u32 {
        self.u32_at(field::PRIORITY)
    }

    /// The TTL in milliseconds.
    pub fn ttl_ms(&self) -> u32 {
        self.u32_at(field::TTL)
    }

    /// The prefix's ID bits.
    pub fn prefix_id(&self) -> ServiceId {
        let mut id = [0u8; SERVICE_ID_LEN];
        id.copy_from_slice(&self.buffer.as_ref()[field::PREFIX_ID]);
        ServiceId(id)
    }
}

/// The owned form of a registration message.
///
/// | type | weight, priority | `ttl_ms` |
/// | --- | --- | --- |
/// | REGISTER | what to register | the lease asked for; 0 lets the router choose |
/// | UNREGISTER | as registered | 0 |
/// | ACK | echoed | the lease granted (REGISTER), 0 (UNREGISTER) |
/// | REJECT | echoed | 0 |
/// | COOKIE | echoed | 0 |
///
/// `cookie` and `signature` choose the form: neither, the original 60 bytes; a cookie, 76
/// bytes; a signature, 140 bytes (with the cookie, or a zero Cookie field if `cookie` is
/// `None`: parsing gives `Some(Cookie::EMPTY)` back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegistrationRepr {
    /// What the message asks or answers.
    pub ty: MessageType,
    /// Chosen by the requester (a retransmission reuses it), echoed in the answer.
    pub request_id: u32,
    /// A random token the requester keeps for its lifetime: a registration from a new locator
    /// with the same token replaces the old one (the instance moved), and an answer must echo
    /// it.
    pub instance: u64,
    /// The service prefix.
    pub prefix: ServicePrefix,
    /// Share of new flows among targets of the same priority; at least 1.
    pub weight: u32,
    /// Only the targets of the highest priority present receive flows.
    pub priority: u32,
    /// Lease in milliseconds; see the table above.
    pub ttl_ms: u32,
    /// The Cookie field: in a request, the cookie the router gave (or [`Cookie::EMPTY`] for
    /// none yet); in a COOKIE or ACK, the cookie to use next; `None`: the 60-byte form.
    pub cookie: Option<Cookie>,
    /// The Signature field (140-byte form); see `serval-keys` for what it covers.
    pub signature: Option<Signature>,
}

impl RegistrationRepr {
    /// A REGISTER.
    pub fn register(
        request_id: u32,
        instance: u64,
        prefix: ServicePrefix,
        weight: u32,
        priority: u32,
        ttl_ms: u32,
    ) -> RegistrationRepr {
        RegistrationRepr {
            ty: MessageType::Register,
            request_id,
            instance,
            prefix,
            weight,
            priority,
            ttl_ms,
            cookie: None,
            signature: None,
        }
    }

    /// This request with the Cookie field set (the 76-byte form, or 140 if signed). The
    /// signature, if any, no longer covers it: sign again.
    pub fn with_cookie(&self, cookie: Cookie) -> RegistrationRepr {
        RegistrationRepr {
            cookie: Some(cookie),
            ..*self
        }
    }

    /// The COOKIE answer to this request, carrying `cookie`: as long as the request, which
    /// must have a Cookie field (a 60-byte request has no room; answer it with a REJECT of
    /// [`RejectReason::COOKIE_REQUIRED`]).
    pub fn cookie_answer(&self, cookie: Cookie) -> RegistrationRepr {
        RegistrationRepr {
            ty: MessageType::Cookie,
            ttl_ms: 0,
            cookie: self.cookie.map(|_| cookie),
            signature: self.signature.map(|_| Signature::ZERO),
            ..*self
        }
    }

    /// Bytes `0..76` of the payload, what a signature covers: the fixed part and the Cookie
    /// field (zero when `cookie` is `None`), whatever the form. A weight of 0 is written as 1.
    pub fn signed_bytes(&self) -> [u8; SIGNED_LEN] {
        let mut out = [0u8; SIGNED_LEN];
        let repr = RegistrationRepr {
            weight: self.weight.max(1),
            cookie: Some(self.cookie.unwrap_or(Cookie::EMPTY)),
            signature: None,
            ..*self
        };
        let _ = repr.emit(&mut out);
        out
    }

    /// The UNREGISTER of what this REGISTER registered, under a new request ID.
    pub fn unregister(&self, request_id: u32) -> RegistrationRepr {
        RegistrationRepr {
            ty: MessageType::Unregister,
            request_id,
            ttl_ms: 0,
            ..*self
        }
    }

    /// The ACK of this request, granting `ttl_ms` (pass 0 for an UNREGISTER). Same form as
    /// the request, with a zero Signature field.
    pub fn ack(&self, ttl_ms: u32) -> RegistrationRepr {
        RegistrationRepr {
            ty: MessageType::Ack,
            ttl_ms,
            signature: self.signature.map(|_| Signature::ZERO),
            ..*self
        }
    }

    /// The REJECT of this request. Same form as the request, with a zero Signature field.
    pub fn reject(&self, reason: RejectReason) -> RegistrationRepr {
        RegistrationRepr {
            ty: MessageType::Reject(reason),
            ttl_ms: 0,
            signature: self.signature.map(|_| Signature::ZERO),
            ..*self
        }
    }

    /// Whether `answer` answers this request: same request ID, instance and prefix, and an
    /// answering type.
    pub fn is_answered_by(&self, answer: &RegistrationRepr) -> bool {
        !answer.ty.is_request()
            && answer.request_id == self.request_id
            && answer.instance == self.instance
            && answer.prefix == self.prefix
    }

    /// Reads a checked payload.
    pub fn parse<T: AsRef<[u8]>>(
        msg: &RegistrationMessage<T>,
    ) -> Result<RegistrationRepr, RegError> {
        msg.check()?;
        Ok(RegistrationRepr {
            cookie: msg.cookie(),
            signature: msg.signature(),
            ty: msg.message_type()?,
            request_id: msg.request_id(),
            instance: msg.instance(),
            prefix: ServicePrefix::new_strict(msg.prefix_id(), msg.prefix_len())
                .ok_or(RegError::PrefixHostBits)?,
            weight: msg.weight(),
            priority: msg.priority(),
            ttl_ms: msg.ttl_ms(),
        })
    }

    /// Reads a whole SAL packet: protocol [`Protocol::REGISTRATION`], both flowIDs zero, and
    /// a registration payload after the header. Extensions are allowed (the packet was
    /// validated by [`SalPacket::new_checked`]) and ignored.
    pub fn parse_packet<T: AsRef<[u8]>>(
        packet: &SalPacket<T>,
    ) -> Result<RegistrationRepr, RegError> {
        packet.check_len()?;
        if packet.protocol() != Protocol::REGISTRATION {
            return Err(RegError::NotRegistration(packet.protocol()));
        }
        if !packet.src_flow().is_none() || !packet.dst_flow().is_none() {
            return Err(RegError::FlowNotZero);
        }
        RegistrationRepr::parse(&RegistrationMessage::new_unchecked(packet.payload()))
    }

    /// Bytes of payload [`emit`](Self::emit) writes: 60, 76 or 140 (see the type's docs).
    pub const fn buffer_len(&self) -> usize {
        match (self.cookie, self.signature) {
            (_, Some(_)) => REGISTRATION_SIGNED_PAYLOAD_LEN,
            (Some(_), None) => REGISTRATION_COOKIE_PAYLOAD_LEN,
            (None, None) => REGISTRATION_PAYLOAD_LEN,
        }
    }

    /// Bytes of the whole packet [`to_packet`](Self::to_packet) writes.
    pub const fn packet_len(&self) -> usize {
        BASE_HEADER_LEN + self.buffer_len()
    }

    /// Writes the payload at the start of `buf`. Fails, writing nothing, if the buffer is too
    /// short or the message would not pass [`RegistrationMessage::check`] (weight 0, or a
    /// COOKIE with no cookie).
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), RegError> {
        if self.weight == 0 {
            return Err(RegError::ZeroWeight);
        }
        if self.ty == MessageType::Cookie && self.cookie.is_none() {
            return Err(RegError::CookieMissing);
        }
        let needed = self.buffer_len();
        let Some(b) = buf.get_mut(..needed) else {
            return Err(RegError::BufferTooSmall {
                needed,
                available: buf.len(),
            });
        };
        b[field::TYPE] = self.ty.code();
        b[field::REASON] = self.ty.reason_code();
        b[field::PREFIX_LEN].copy_from_slice(&self.prefix.len().to_be_bytes());
        b[field::REQUEST_ID].copy_from_slice(&self.request_id.to_be_bytes());
        b[field::INSTANCE].copy_from_slice(&self.instance.to_be_bytes());
        b[field::WEIGHT].copy_from_slice(&self.weight.to_be_bytes());
        b[field::PRIORITY].copy_from_slice(&self.priority.to_be_bytes());
        b[field::TTL].copy_from_slice(&self.ttl_ms.to_be_bytes());
        b[field::PREFIX_ID].copy_from_slice(self.prefix.id().as_bytes());
        if let Some(c) = b.get_mut(field::COOKIE) {
            c.copy_from_slice(&self.cookie.unwrap_or(Cookie::EMPTY).0);
        }
        if let (Some(s), Some(sig)) = (b.get_mut(field::SIGNATURE), self.signature) {
            s.copy_from_slice(&sig.0);
        }
        Ok(())
    }

    /// The whole SAL packet: base header (protocol 3, flowIDs zero, no extension) and payload
    /// ([`packet_len`](Self::packet_len) bytes: 80, 96 or 160).
    ///
    /// A weight of 0 (which no parsed message has) is written as 1; a COOKIE without a cookie
    /// (which no parsed message is) carries an empty one.
    pub fn to_packet(&self) -> Vec<u8> {
        let mut out = vec![0u8; BASE_HEADER_LEN + REGISTRATION_SIGNED_PAYLOAD_LEN];
        let header = SalRepr::new(Protocol::REGISTRATION, FlowId::NONE, FlowId::NONE);
        let mut packet = SalPacket::new_unchecked(&mut out[..]);
        // A bare base header always fits in 80 bytes.
        let _ = header.emit(&mut packet);
        let repr = RegistrationRepr {
            weight: self.weight.max(1),
            cookie: match self.ty {
                MessageType::Cookie => Some(self.cookie.unwrap_or(Cookie::EMPTY)),
                _ => self.cookie,
            },
            ..*self
        };
        let _ = repr.emit(&mut out[BASE_HEADER_LEN..]);
        out.truncate(repr.packet_len());
        out
    }
}

impl fmt::Display for RegistrationRepr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} #{} {} weight={} priority={} ttl={}ms instance={:016x}",
            self.ty,
            self.request_id,
            self.prefix,
            self.weight,
            self.priority,
            self.ttl_ms,
            self.instance
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(REGISTRATION_PAYLOAD_LEN, 60);
        assert_eq!(REGISTRATION_PACKET_LEN, 80);
        assert_eq!(REGISTRATION_COOKIE_PAYLOAD_LEN, 76);
        assert_eq!(REGISTRATION_SIGNED_PAYLOAD_LEN, 140);
    }

    #[test]
    fn type_codes_round_trip() {
        for t in [
            MessageType::Register,
            MessageType::Unregister,
            MessageType::Ack,
            MessageType::Reject(RejectReason::NOT_ACCEPTED),
            MessageType::Reject(RejectReason(200)),
        ] {
            assert_eq!(MessageType::from_codes(t.code(), t.reason_code()), Ok(t));
            assert_eq!(
                MessageType::from_codes_extended(t.code(), t.reason_code()),
                Ok(t)
            );
        }
        // COOKIE exists only in the longer forms.
        assert_eq!(MessageType::from_codes(5, 0), Err(RegError::UnknownType(5)));
        assert_eq!(
            MessageType::from_codes_extended(5, 0),
            Ok(MessageType::Cookie)
        );
        assert_eq!(
            MessageType::from_codes_extended(6, 0),
            Err(RegError::UnknownType(6))
        );
        assert_eq!(
            MessageType::from_codes(4, 0),
            Err(RegError::BadReason { ty: 4, reason: 0 })
        );
        assert_eq!(
            MessageType::from_codes(1, 1),
            Err(RegError::BadReason { ty: 1, reason: 1 })
        );
        assert_eq!(MessageType::from_codes(0, 0), Err(RegError::UnknownType(0)));
        assert_eq!(MessageType::from_codes(5, 0), Err(RegError::UnknownType(5)));
    }
}
