//! The Serval SAL wire format.
//!
//! * [`id`]: serviceIDs (256 bits, with the name mapping), prefixes, flowIDs and nonces;
//! * [`locator`]: IP address + UDP port, as carried in SOURCE lists;
//!
//! Every packet format is a zero-copy view over `T: AsRef<[u8]>` whose `new_checked` validates
//! lengths once, after which no accessor panics, plus an owned `Repr` with symmetric
//! `parse` / `emit` / `buffer_len`. Malformed input gives a [`WireError`], never a panic. The
//! format is specified, with byte diagrams, in `docs/wire.md` at the repository root.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod id;
pub mod locator;

pub use id::{FlowId, IdError, Nonce, ServiceId, ServicePrefix};
pub use locator::Locator;

/// Why a packet could not be parsed (or a representation could not be emitted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The buffer ended before the structure it should hold.
    #[error("packet truncated")]
    Truncated,
    /// A locator's family byte was neither 4 nor 6.
    #[error("unknown locator family {0}")]
    BadFamily(u8),
}
