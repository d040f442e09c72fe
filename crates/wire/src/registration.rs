//! Registration messages: how an instance tells a service router "send connections for this
//! prefix to me", and how the router answers.
//!
//! A registration message is a SAL packet whose base header has protocol
//! [`Protocol::REGISTRATION`] and both flowIDs zero, followed by a fixed 60-byte payload:
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
//! observes, so registration works behind address translation and an instance cannot register
//! someone else's address. An answer (ACK or REJECT) is the request with its type (and reason,
//! or granted TTL) changed, so it is exactly as long as the request: a router cannot be used as
//! an amplifier. The full specification is `docs/wire.md` §11.
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

/// Length of the registration payload after the SAL header.
pub const REGISTRATION_PAYLOAD_LEN: usize = field::PREFIX_ID.end;
/// Length of a whole registration packet as emitted (base header, no extension, payload).
pub const REGISTRATION_PACKET_LEN: usize = BASE_HEADER_LEN + REGISTRATION_PAYLOAD_LEN;

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
}

impl MessageType {
    /// The type byte on the wire.
    pub const fn code(self) -> u8 {
        match self {
            MessageType::Register => 1,
            MessageType::Unregister => 2,
            MessageType::Ack => 3,
            MessageType::Reject(_) => 4,
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

    /// Reads the type and reason bytes.
    pub fn from_codes(ty: u8, reason: u8) -> Result<MessageType, RegError> {
        let t = match ty {
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
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RejectReason::NOT_ACCEPTED => f.write_str("prefix not accepted by this router"),
            RejectReason::UNAVAILABLE => f.write_str("router's registry unavailable"),
            RejectReason::LIMIT => f.write_str("router's registration limit reached"),
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
    /// The payload is not exactly [`REGISTRATION_PAYLOAD_LEN`] bytes.
    #[error("registration payload of {0} bytes (expected {n})", n = REGISTRATION_PAYLOAD_LEN)]
    BadLength(usize),
    /// The type byte is not 1 to 4.
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

    /// Checks, in this order: the length is exactly [`REGISTRATION_PAYLOAD_LEN`]; the type is
    /// known and the reason fits it (non-zero in a REJECT, zero otherwise); the prefix length is
    /// at most 256 and no ID bit past it is set; the weight is at least 1.
    pub fn check(&self) -> Result<(), RegError> {
        let len = self.buffer.as_ref().len();
        if len != REGISTRATION_PAYLOAD_LEN {
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

    /// The type (with the reject reason).
    pub fn message_type(&self) -> Result<MessageType, RegError> {
        let d = self.buffer.as_ref();
        MessageType::from_codes(d[field::TYPE], d[field::REASON])
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
        }
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

    /// The ACK of this request, granting `ttl_ms` (pass 0 for an UNREGISTER).
    pub fn ack(&self, ttl_ms: u32) -> RegistrationRepr {
        RegistrationRepr {
            ty: MessageType::Ack,
            ttl_ms,
            ..*self
        }
    }

    /// The REJECT of this request.
    pub fn reject(&self, reason: RejectReason) -> RegistrationRepr {
        RegistrationRepr {
            ty: MessageType::Reject(reason),
            ttl_ms: 0,
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

    /// Bytes of payload [`emit`](Self::emit) writes.
    pub const fn buffer_len(&self) -> usize {
        REGISTRATION_PAYLOAD_LEN
    }

    /// Writes the payload at the start of `buf`. Fails, writing nothing, if the buffer is too
    /// short or the message would not pass [`RegistrationMessage::check`] (weight 0).
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), RegError> {
        if self.weight == 0 {
            return Err(RegError::ZeroWeight);
        }
        let Some(b) = buf.get_mut(..REGISTRATION_PAYLOAD_LEN) else {
            return Err(RegError::BufferTooSmall {
                needed: REGISTRATION_PAYLOAD_LEN,
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
        Ok(())
    }

    /// The whole SAL packet: base header (protocol 3, flowIDs zero, no extension) and payload.
    ///
    /// A weight of 0 (which no parsed message has) is written as 1.
    pub fn to_packet(&self) -> [u8; REGISTRATION_PACKET_LEN] {
        let mut out = [0u8; REGISTRATION_PACKET_LEN];
        let header = SalRepr::new(Protocol::REGISTRATION, FlowId::NONE, FlowId::NONE);
        let mut packet = SalPacket::new_unchecked(&mut out[..]);
        // A bare base header always fits in 80 bytes.
        let _ = header.emit(&mut packet);
        let repr = RegistrationRepr {
            weight: self.weight.max(1),
            ..*self
        };
        let _ = repr.emit(&mut out[BASE_HEADER_LEN..]);
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
        }
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
