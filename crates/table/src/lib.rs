//! The Serval service table and flow table.
//!
//! * [`PrefixMap`]: a persistent longest-prefix-match map over 256-bit serviceID prefixes;
//! * [`oracle`]: the naive binary trie it is tested against.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod oracle;
pub mod prefix_map;

pub use prefix_map::PrefixMap;
