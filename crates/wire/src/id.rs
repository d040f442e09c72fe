//! Identifiers: [`ServiceId`], [`ServicePrefix`], [`FlowId`] and [`Nonce`].
//!
//! # Names
//!
//! Users type names (`web.example.com`); the wire carries 256-bit serviceIDs. The mapping
//! ([`ServiceId::from_name`], version 2) is deterministic, *prefix-preserving by domain*, and
//! spends every bit of the ID. Read the labels from the top-level domain down; the *path* `P(i)`
//! is the first `i` of them (for `web.example.com`: `P(1)` = com, `P(2)` = com.example, `P(3)` =
//! com.example.web), and its hash is
//!
//! ```text
//! H(P(i)) = SHA-256("serval-name-v2" || 0x00 || for each label of P(i): len u8 || lowercase(label))
//! ```
//!
//! A name of `k` labels takes the first [`NAME_LABEL_BITS`] (32) bits of `H(P(1))`, …,
//! `H(P(k-1))`, then the first `256 − 32·(k−1)` bits of `H(P(k))`: the last label takes all the
//! bits that are left. So `web.example.com` is `H(com)[..32] | H(com.example)[..32] |
//! H(com.example.web)[..192]`, and the prefix `example.com/*` is `H(com)[..32] |
//! H(com.example)[..32]` with length 64: a bit-prefix of the ID of every name under
//! `example.com`, and of `example.com` itself (whose last chunk `H(com.example)[..224]` starts
//! with the same 32 bits — the shorter chunk of a path is a prefix of its longer one).
//!
//! Each chunk hashes the whole path above it, so two names that differ anywhere differ in
//! every chunk from that label down: they share an ID only if `256 − 32·(j−1)` hash bits
//! collide, where `j` is the first label (from the top) at which they differ — at least 160
//! bits for names of up to four labels, and never fewer than 32 (two 8-label names that differ
//! only in their last label). Version 1 gave every label 32 bits and zero-filled the rest, so
//! 300 000 names `svc{i}.test` held 8 colliding pairs.
//!
//! Names are case-insensitive (as in DNS), may end with one `.`, and are made of labels of 1 to 63
//! characters from `a-z`, `0-9`, `-` and `_` (for service labels such as `_http`); a label may not
//! begin or end with `-`. At most [`NAME_LABELS_MAX`] labels fit in an ID.
//!
//! # Text forms
//!
//! * ID: 64 hex digits (`Display`, [`ServiceId::from_hex`]); [`ServiceId::parse`] accepts that or a
//!   name.
//! * Prefix: `HEX/LEN` where `HEX` has 1 to 64 hex digits (right-padded with zeros) and `LEN` is
//!   0..=256, no bits set past `LEN`; or `NAME/*` for the prefix covering a whole domain, or `*`
//!   for the default prefix `/0`; or a bare ID or name, meaning the exact `/256` prefix.
//!   `Display` writes 64 hex digits, `/`, and the length.

use core::fmt;
use core::str::FromStr;

use sha2::{Digest, Sha256};

/// Width of a [`ServiceId`] in bits.
pub const SERVICE_ID_BITS: u16 = 256;
/// Width of a [`ServiceId`] in bytes.
pub const SERVICE_ID_LEN: usize = 32;
/// Bits contributed to a name-derived [`ServiceId`] by each DNS label but the last (which takes
/// all the bits left), and so the width of one label in a domain prefix (`example.com/*` is 64).
pub const NAME_LABEL_BITS: u16 = 32;
/// Most labels a name may have (`SERVICE_ID_BITS / NAME_LABEL_BITS`).
pub const NAME_LABELS_MAX: usize = (SERVICE_ID_BITS / NAME_LABEL_BITS) as usize;
/// Longest label accepted in a name, as in DNS.
pub const NAME_LABEL_LEN_MAX: usize = 63;
/// Domain-separation tag hashed before the labels of a path.
const NAME_HASH_TAG: &[u8] = b"serval-name-v2\0";

/// Why a name, an ID or a prefix in text form was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The name or text was empty.
    #[error("empty service name")]
    Empty,
    /// A label between two dots (or at either end) was empty.
    #[error("empty label in service name {0:?}")]
    EmptyLabel(String),
    /// A label was longer than 63 characters.
    #[error("label {0:?} is longer than 63 characters")]
    LabelTooLong(String),
    /// A character outside `a-z 0-9 - _` appeared in a label.
    #[error("invalid character {ch:?} in label {label:?} (allowed: letters, digits, '-', '_')")]
    BadChar {
        /// The offending character.
        ch: char,
        /// The label it appeared in.
        label: String,
    },
    /// A label began or ended with `-`.
    #[error("label {0:?} begins or ends with '-'")]
    HyphenEdge(String),
    /// The name had more labels than fit in an ID.
    #[error("service name has {0} labels; at most 8 fit in a 256-bit serviceID")]
    TooManyLabels(usize),
    /// Hex text had a bad digit or a bad number of digits.
    #[error("invalid hex serviceID {0:?} (expected 1 to 64 hex digits)")]
    BadHex(String),
    /// The length of a prefix was not a number in 0..=256.
    #[error("invalid prefix length {0:?} (expected 0 to 256)")]
    BadLength(String),
    /// A prefix had bits set past its length.
    #[error("prefix {0:?} has bits set past its length")]
    HostBits(String),
}

/// A 256-bit service identifier: names *who* a packet is for.
///
/// Bit 0 is the most significant bit of byte 0; prefixes count from there.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ServiceId(pub [u8; SERVICE_ID_LEN]);

impl ServiceId {
    /// The all-zero ID.
    pub const ZERO: ServiceId = ServiceId([0; SERVICE_ID_LEN]);

    /// The ID of a DNS-style name; see the [module docs](self) for the mapping.
    pub fn from_name(name: &str) -> Result<ServiceId, IdError> {
        let (id, _) = name_chunks(name)?;
        Ok(id)
    }

    /// Parses exactly 64 hex digits.
    pub fn from_hex(text: &str) -> Result<ServiceId, IdError> {
        if text.len() != 2 * SERVICE_ID_LEN {
            return Err(IdError::BadHex(text.to_owned()));
        }
        let (id, _) = parse_hex_prefix(text)?;
        Ok(id)
    }

    /// Parses an ID written as 64 hex digits, or else as a name.
    ///
    /// The two readings never overlap: 64 characters without a dot would be a single label longer
    /// than the 63 characters a label may have.
    pub fn parse(text: &str) -> Result<ServiceId, IdError> {
        if text.len() == 2 * SERVICE_ID_LEN && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            ServiceId::from_hex(text)
        } else {
            ServiceId::from_name(text)
        }
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; SERVICE_ID_LEN] {
        &self.0
    }

    /// Bit `i` (0 = most significant bit of byte 0). `i` must be below 256.
    #[inline]
    pub const fn bit(&self, i: u16) -> bool {
        (self.0[(i / 8) as usize] >> (7 - (i % 8))) & 1 == 1
    }

    /// The ID as four big-endian 64-bit words (word 0 holds bits 0..64).
    #[inline]
    pub fn words(&self) -> [u64; 4] {
        let mut w = [0u64; 4];
        for (i, chunk) in self.0.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            w[i] = u64::from_be_bytes(b);
        }
        w
    }

    /// The ID built from four big-endian 64-bit words.
    #[inline]
    pub fn from_words(w: [u64; 4]) -> ServiceId {
        let mut b = [0u8; SERVICE_ID_LEN];
        for (i, word) in w.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&word.to_be_bytes());
        }
        ServiceId(b)
    }

    /// This ID with every bit from `len` on cleared.
    pub fn masked(&self, len: u16) -> ServiceId {
        let len = len.min(SERVICE_ID_BITS);
        let mut out = self.0;
        let full = (len / 8) as usize;
        let rem = len % 8;
        if full < SERVICE_ID_LEN {
            out[full] &= if rem == 0 { 0 } else { 0xffu8 << (8 - rem) };
            for b in &mut out[full + 1..] {
                *b = 0;
            }
        }
        ServiceId(out)
    }

    /// Number of leading bits this ID shares with `other` (256 if equal).
    pub fn common_prefix_len(&self, other: &ServiceId) -> u16 {
        let (a, b) = (self.words(), other.words());
        for i in 0..4 {
            let x = a[i] ^ b[i];
            if x != 0 {
                return i as u16 * 64 + x.leading_zeros() as u16;
            }
        }
        SERVICE_ID_BITS
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceId({self})")
    }
}

impl FromStr for ServiceId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ServiceId::parse(s)
    }
}

impl From<[u8; SERVICE_ID_LEN]> for ServiceId {
    fn from(b: [u8; SERVICE_ID_LEN]) -> Self {
        ServiceId(b)
    }
}

/// A prefix of the serviceID space: the first `len` bits of `id`; all later bits are zero.
///
/// The `/0` prefix is the default rule; `/256` matches one ID exactly.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ServicePrefix {
    id: ServiceId,
    len: u16,
}

impl ServicePrefix {
    /// The default prefix `/0`, which covers every ID.
    pub const DEFAULT: ServicePrefix = ServicePrefix {
        id: ServiceId::ZERO,
        len: 0,
    };

    /// The prefix of the first `len` bits of `id` (bits past `len` are cleared; `len` is capped at
    /// 256).
    pub fn new(id: ServiceId, len: u16) -> ServicePrefix {
        let len = len.min(SERVICE_ID_BITS);
        ServicePrefix {
            id: id.masked(len),
            len,
        }
    }

    /// Like [`ServicePrefix::new`], but refuses bits set past `len` or a length above 256.
    pub fn new_strict(id: ServiceId, len: u16) -> Option<ServicePrefix> {
        (len <= SERVICE_ID_BITS && id.masked(len) == id).then_some(ServicePrefix { id, len })
    }

    /// The exact `/256` prefix of one ID.
    pub const fn exact(id: ServiceId) -> ServicePrefix {
        ServicePrefix {
            id,
            len: SERVICE_ID_BITS,
        }
    }

    /// The prefix covering a whole domain: `example.com` gives `example.com/*`, 32 bits a label.
    pub fn from_domain(domain: &str) -> Result<ServicePrefix, IdError> {
        let (id, labels) = name_chunks(domain)?;
        Ok(ServicePrefix::new(id, labels as u16 * NAME_LABEL_BITS))
    }

    /// Parses any of the prefix text forms listed in the [module docs](self).
    pub fn parse(text: &str) -> Result<ServicePrefix, IdError> {
        if text == "*" {
            return Ok(ServicePrefix::DEFAULT);
        }
        if let Some(domain) = text.strip_suffix("/*") {
            return ServicePrefix::from_domain(domain);
        }
        if let Some((hex, len)) = text.split_once('/') {
            let len: u16 = len
                .parse()
                .ok()
                .filter(|l| *l <= SERVICE_ID_BITS)
                .ok_or_else(|| IdError::BadLength(len.to_owned()))?;
            // Fewer digits than the length covers is a shortened form: missing digits are zero.
            let (id, _) = parse_hex_prefix(hex)?;
            return ServicePrefix::new_strict(id, len)
                .ok_or_else(|| IdError::HostBits(text.into()));
        }
        ServiceId::parse(text).map(ServicePrefix::exact)
    }

    /// The (masked) ID bits of the prefix.
    pub const fn id(&self) -> &ServiceId {
        &self.id
    }

    /// The length in bits, 0..=256.
    // A prefix's "emptiness" is `is_default`; an `is_empty` would mislead.
    #[allow(clippy::len_without_is_empty)]
    pub const fn len(&self) -> u16 {
        self.len
    }

    /// Whether this is the zero-length default prefix.
    pub const fn is_default(&self) -> bool {
        self.len == 0
    }

    /// Whether `id` falls under this prefix.
    pub fn contains(&self, id: &ServiceId) -> bool {
        id.common_prefix_len(&self.id) >= self.len
    }

    /// Whether `other` is this prefix or a longer one under it.
    pub fn covers(&self, other: &ServicePrefix) -> bool {
        other.len >= self.len && self.contains(&other.id)
    }
}

impl fmt::Display for ServicePrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.id, self.len)
    }
}

impl fmt::Debug for ServicePrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServicePrefix({self})")
    }
}

impl FromStr for ServicePrefix {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ServicePrefix::parse(s)
    }
}

/// Hex digits, 1 to 64 of them, right-padded with zeros; returns the ID and the digit count.
fn parse_hex_prefix(text: &str) -> Result<(ServiceId, usize), IdError> {
    let bad = || IdError::BadHex(text.to_owned());
    if text.is_empty() || text.len() > 2 * SERVICE_ID_LEN {
        return Err(bad());
    }
    let mut out = [0u8; SERVICE_ID_LEN];
    for (i, c) in text.bytes().enumerate() {
        let v = (c as char).to_digit(16).ok_or_else(bad)? as u8;
        out[i / 2] |= if i % 2 == 0 { v << 4 } else { v };
    }
    Ok((ServiceId(out), text.len()))
}

/// Validates a name and returns its ID and label count.
fn name_chunks(name: &str) -> Result<(ServiceId, usize), IdError> {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.is_empty() {
        return Err(IdError::Empty);
    }
    let labels: Vec<&str> = trimmed.split('.').collect();
    if labels.len() > NAME_LABELS_MAX {
        return Err(IdError::TooManyLabels(labels.len()));
    }
    let chunk = usize::from(NAME_LABEL_BITS / 8);
    let mut out = [0u8; SERVICE_ID_LEN];
    // One running hash over the path from the top-level domain down: H(P(i)) is a snapshot of
    // it after the i-th label.
    let mut path = Sha256::new();
    path.update(NAME_HASH_TAG);
    for (i, label) in labels.iter().rev().enumerate() {
        check_label(label, name)?;
        let lower = label.to_ascii_lowercase();
        // A label is at most 63 bytes (checked above), so its length fits the byte.
        path.update([lower.len() as u8]);
        path.update(lower.as_bytes());
        let h = path.clone().finalize();
        let last = i + 1 == labels.len();
        let end = if last {
            SERVICE_ID_LEN
        } else {
            (i + 1) * chunk
        };
        out[i * chunk..end].copy_from_slice(&h[..end - i * chunk]);
    }
    Ok((ServiceId(out), labels.len()))
}

/// Checks one label of `name` against the rules in the [module docs](self).
fn check_label(label: &str, name: &str) -> Result<(), IdError> {
    if label.is_empty() {
        return Err(IdError::EmptyLabel(name.to_owned()));
    }
    if label.len() > NAME_LABEL_LEN_MAX {
        return Err(IdError::LabelTooLong(label.to_owned()));
    }
    if let Some(ch) = label
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(IdError::BadChar {
            ch,
            label: label.to_owned(),
        });
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(IdError::HyphenEdge(label.to_owned()));
    }
    Ok(())
}

/// A flow identifier: chosen by each end for its own side of a flow, carried in every packet.
///
/// 64 bits wide (the original used 32); zero is reserved for "not yet known" (the destination
/// flowID of a SYN).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct FlowId(pub u64);

impl FlowId {
    /// The reserved "unknown" flowID, sent as the destination of a SYN.
    pub const NONE: FlowId = FlowId(0);

    /// Whether this is the reserved zero value.
    pub const fn is_none(&self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for FlowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for FlowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FlowId({self})")
    }
}

/// Length of a [`Nonce`] in bytes.
pub const NONCE_LEN: usize = 16;

/// A random per-connection value exchanged in the handshake; both nonces feed the per-flow key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Nonce(pub [u8; NONCE_LEN]);

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nonce(")?;
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_is_deterministic_and_case_insensitive() {
        let a = ServiceId::from_name("Web.Example.COM").unwrap();
        let b = ServiceId::from_name("web.example.com.").unwrap();
        assert_eq!(a, b);
        // Fixture: pins the mapping so that a change to it cannot go unnoticed. Each part is
        // SHA-256 of the tag and the length-prefixed labels of the path (as `printf
        // 'serval-name-v2\0\3com\7example' | sha256sum` gives for the second).
        let h = |path: &[u8]| {
            let mut d = Sha256::new();
            d.update(b"serval-name-v2\0");
            d.update(path);
            d.finalize()
        };
        let mut want = Vec::new();
        want.extend_from_slice(&h(b"\x03com")[..4]);
        want.extend_from_slice(&h(b"\x03com\x07example")[..4]);
        want.extend_from_slice(&h(b"\x03com\x07example\x03web")[..24]);
        assert_eq!(a.0.as_slice(), want.as_slice());
        assert_eq!(
            a.to_string(),
            "cf47db499cdbb2c24ecc10b325e6b79560947481c304c4b6af8f49c044938573",
            "the published fixture in docs/wire.md §6"
        );
    }

    #[test]
    fn every_bit_is_used_and_depth_does_not_collide() {
        // Version 1 left 160 zero bits after a 3-label name and gave a second-level label 32
        // bits; now the last label fills the ID.
        let a = ServiceId::from_name("web.example.com").unwrap();
        assert!(a.0[12..].iter().any(|&b| b != 0));
        let distinct: std::collections::HashSet<ServiceId> = [
            "example.com",
            "x.example.com",
            "example.com.x",
            "com",
            "x.com",
            "a.svc1.test",
            "a.svc2.test",
        ]
        .iter()
        .map(|n| ServiceId::from_name(n).unwrap())
        .collect();
        assert_eq!(distinct.len(), 7);
        // Labels are length-prefixed, so moving a character across a dot changes the path.
        assert_ne!(
            ServiceId::from_name("ab.c").unwrap(),
            ServiceId::from_name("a.bc").unwrap()
        );
    }

    #[test]
    fn domain_prefix_covers_names_under_it() {
        let p = ServicePrefix::parse("example.com/*").unwrap();
        assert_eq!(p.len(), 64);
        for n in ["example.com", "a.example.com", "x.y.z.example.com"] {
            assert!(p.contains(&ServiceId::from_name(n).unwrap()), "{n}");
        }
        for n in ["example.org", "com", "example.co", "notexample.com"] {
            assert!(!p.contains(&ServiceId::from_name(n).unwrap()), "{n}");
        }
        assert_ne!(
            ServiceId::from_name("example.com").unwrap(),
            ServiceId::from_name("x.example.com").unwrap()
        );
    }

    #[test]
    fn bad_names_are_rejected() {
        assert_eq!(ServiceId::from_name(""), Err(IdError::Empty));
        assert_eq!(ServiceId::from_name("."), Err(IdError::Empty));
        assert!(matches!(
            ServiceId::from_name("a..b"),
            Err(IdError::EmptyLabel(_))
        ));
        assert!(matches!(
            ServiceId::from_name("a b.com"),
            Err(IdError::BadChar { ch: ' ', .. })
        ));
        assert!(matches!(
            ServiceId::from_name("-a.com"),
            Err(IdError::HyphenEdge(_))
        ));
        assert!(matches!(
            ServiceId::from_name(&"a".repeat(64)),
            Err(IdError::LabelTooLong(_))
        ));
        assert_eq!(
            ServiceId::from_name("a.b.c.d.e.f.g.h.i"),
            Err(IdError::TooManyLabels(9))
        );
        assert!(ServiceId::from_name("a.b.c.d.e.f.g.h").is_ok());
        assert!(ServiceId::from_name("_http._tcp.example.com").is_ok());
        assert!(matches!(
            ServiceId::from_name("ünï.com"),
            Err(IdError::BadChar { .. })
        ));
    }

    #[test]
    fn hex_round_trip_and_prefix_forms() {
        let id = ServiceId::from_name("web.example.com").unwrap();
        assert_eq!(ServiceId::parse(&id.to_string()).unwrap(), id);
        let p = ServicePrefix::new(id, 40);
        assert_eq!(ServicePrefix::parse(&p.to_string()).unwrap(), p);
        assert_eq!(
            ServicePrefix::parse("ab/8").unwrap(),
            ServicePrefix::new(ServiceId::from_words([0xab << 56, 0, 0, 0]), 8)
        );
        assert_eq!(ServicePrefix::parse("*").unwrap(), ServicePrefix::DEFAULT);
        assert_eq!(ServicePrefix::parse("0/0").unwrap(), ServicePrefix::DEFAULT);
        assert!(matches!(
            ServicePrefix::parse("ff/4"),
            Err(IdError::HostBits(_))
        ));
        assert!(matches!(
            ServicePrefix::parse("ff/257"),
            Err(IdError::BadLength(_))
        ));
        assert!(matches!(
            ServicePrefix::parse("xyz/8"),
            Err(IdError::BadHex(_))
        ));
        assert_eq!(
            ServicePrefix::parse("web.example.com").unwrap(),
            ServicePrefix::exact(id)
        );
        assert!(matches!(
            ServiceId::from_hex("abc"),
            Err(IdError::BadHex(_))
        ));
    }

    #[test]
    fn masking_and_common_prefix() {
        let id = ServiceId([0xff; 32]);
        for len in 0..=256u16 {
            let m = id.masked(len);
            assert_eq!(m.common_prefix_len(&id), len);
            assert_eq!(ServiceId::from_words(m.words()), m);
        }
        assert!(id.bit(0) && id.bit(255));
        assert!(!ServiceId::ZERO.bit(17));
    }
}
