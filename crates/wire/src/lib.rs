//! The Serval SAL wire format.
//!
//! * [`id`]: serviceIDs (256 bits, with the name mapping), prefixes, flowIDs and nonces;
//! * [`locator`]: IP address + UDP port, as carried in SOURCE lists;
//! * [`header`]: the SAL header, version 1 ([`SalPacket`], [`SalRepr`]);
//! * [`ext`]: its extensions (CONTROL, SERVICE, NONCE, SOURCE, AUTH, PAD);
//! * [`registration`]: the registration messages (protocol 3) between instances and service
//!   routers.
//!
//! Every packet format is a zero-copy view over `T: AsRef<[u8]>` whose `new_checked` validates
//! lengths once, after which no accessor panics, plus an owned `Repr` with symmetric
//! `parse` / `emit` / `buffer_len`. Malformed input gives a [`WireError`], never a panic. The
//! format is specified, with byte diagrams, in `docs/wire.md` at the repository root.
//!
//! ```
//! use serval_wire::{FlowId, Protocol, SalPacket, SalRepr};
//!
//! let repr = SalRepr::new(Protocol::STREAM, FlowId(7), FlowId(9));
//! let bytes = repr.to_bytes(b"hello")?;
//! let packet = SalPacket::new_checked(&bytes[..])?;
//! assert_eq!(packet.dst_flow(), FlowId(9));
//! assert_eq!(packet.payload(), b"hello");
//! assert_eq!(SalRepr::parse(&packet)?, repr);
//! # Ok::<(), serval_wire::WireError>(())
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod ext;
pub mod header;
pub mod id;
pub mod locator;
pub mod registration;

pub use ext::{
    ControlFlags, ControlRepr, ExtType, Extension, IdentityRepr, KeyShareRepr, ServiceRepr,
};
pub use header::{MAX_PACKET_LEN, Protocol, SalPacket, SalRepr};
pub use id::{FlowId, IdError, Nonce, ServiceId, ServicePrefix};
pub use locator::Locator;
pub use registration::{Cookie, MessageType, RegError, RegistrationRepr, RejectReason, Signature};

/// Why a packet could not be parsed (or a representation could not be emitted).
///
/// Receivers drop a packet that yields any of these and count it; they never answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The buffer ended before the structure it should hold.
    #[error("packet truncated")]
    Truncated,
    /// A locator's family byte was neither 4 nor 6.
    #[error("unknown locator family {0}")]
    BadFamily(u8),
    /// The packet is longer than [`MAX_PACKET_LEN`].
    #[error("packet of {0} bytes exceeds the {max}-byte maximum", max = MAX_PACKET_LEN)]
    Oversize(usize),
    /// The version nibble is not [`header::VERSION`].
    #[error("unsupported SAL version {0} (expected {v})", v = header::VERSION)]
    BadVersion(u8),
    /// The header length is below the 20-byte base header.
    #[error("header length {0} is shorter than the 20-byte base header")]
    HeaderLenTooShort(u16),
    /// The header length runs past the end of the packet.
    #[error("header length {hdr_len} runs past the end of the {packet_len}-byte packet")]
    HeaderLenBeyondPacket {
        /// The header length field.
        hdr_len: u16,
        /// The packet's length.
        packet_len: usize,
    },
    /// An extension's length is below 2 (its own type and length bytes).
    #[error("extension {ty:#04x} has length {len}, below the 2-byte minimum")]
    ExtTooShort {
        /// The extension's type.
        ty: u8,
        /// Its length field.
        len: u8,
    },
    /// An extension runs past the header length (or its length byte is missing).
    #[error("extension {ty:#04x} at offset {offset} runs past the header length")]
    ExtOverrun {
        /// The extension's type.
        ty: u8,
        /// Offset of the extension in the packet.
        offset: usize,
    },
    /// A fixed-length extension has another length.
    #[error("extension {ty:#04x} has length {len}, expected {expected}")]
    ExtBadLen {
        /// The extension's type.
        ty: u8,
        /// Its length field.
        len: u8,
        /// The length its type requires.
        expected: u8,
    },
    /// A known extension (other than PAD) appears twice.
    #[error("extension {0:#04x} appears more than once")]
    DuplicateExt(u8),
    /// CONTROL is present but not the first extension.
    #[error("CONTROL extension is not the first extension")]
    ControlNotFirst,
    /// AUTH is present but not the last extension.
    #[error("AUTH extension is not the last extension")]
    AuthNotLast,
    /// An extension of unknown type has the must-understand bit (0x80) set.
    #[error("unknown extension {0:#04x} has the must-understand bit set")]
    UnknownMandatory(u8),
    /// A SOURCE extension holds no locator.
    #[error("SOURCE extension holds no locator")]
    SourceEmpty,
    /// A SOURCE extension (of the given length) ends inside a locator.
    #[error("SOURCE extension of length {0} ends inside a locator")]
    SourceTruncated(u8),
    /// A locator appears twice in SOURCE: the packet has looped through a router.
    #[error("locator {0} appears twice in SOURCE (routing loop)")]
    SourceLoop(Locator),
    /// On emit: the SOURCE locators take more bytes than its 1-byte length can count.
    #[error("SOURCE list of {0} bytes does not fit in one extension (at most 253)")]
    SourceTooLong(usize),
    /// On emit: the buffer is shorter than the header.
    #[error("buffer of {available} bytes cannot hold the {needed}-byte header")]
    BufferTooSmall {
        /// Bytes the header needs.
        needed: usize,
        /// Bytes the buffer has.
        available: usize,
    },
}
