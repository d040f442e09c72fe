//! How registrations are written in etcd: one key per registration, a short text value.
//!
//! ```text
//! key:   <prefix>/v1/reg/<service prefix>/<locator>
//!        e.g. /serval/v1/reg/6d6f…0000/64/10.0.0.7:5000
//! value: v1 w=<weight> p=<priority> ttl=<seconds>
//!        e.g. v1 w=10 p=0 ttl=3
//! ```
//!
//! * `<service prefix>` is the prefix's canonical text: 64 lower-case hex digits, `/`, the
//!   length in bits (what [`ServicePrefix`]'s `Display` prints). `<locator>` is the socket
//!   address as Rust prints it (`10.0.0.7:5000`, `[2001:db8::1]:5000`). Only these canonical
//!   forms are accepted, so one registration has exactly one key.
//! * The `v1` in the key is the layout's version; a later layout would live beside it under
//!   `v2/` without disturbing readers of this one.
//! * The value starts with its own version, `v1`, then space-separated `name=value` fields in
//!   any order: `w` (weight, at least 1), `p` (priority) and `ttl` (the time to live the
//!   writer asked for, in whole seconds, at least 1). A `v1` reader ignores fields it does not
//!   know, so fields can be added without a new version; a duplicated or missing field, or any
//!   other version, is malformed.
//! * Each key is bound to its own etcd lease of `ttl` seconds. The lease is what expires it;
//!   the `ttl` field lets any router refresh it with the same time to live.

use std::fmt::Write as _;

use serval_wire::{Locator, ServicePrefix};

use crate::{Registration, RegistrationKey};

/// The longest lease etcd grants, in seconds (etcd's `MaxLeaseTTL`).
pub(crate) const MAX_TTL_SECS: u64 = 9_000_000_000;

/// Where registrations live under a key prefix.
#[derive(Clone, Debug)]
pub(crate) struct KeySpace {
    /// `<prefix>/v1/reg/`, the common start of every registration key.
    reg: String,
}

impl KeySpace {
    /// The key space under `prefix` (`""` for none, otherwise e.g. `/serval`).
    pub(crate) fn new(prefix: &str) -> KeySpace {
        KeySpace {
            reg: format!("{prefix}/v1/reg/"),
        }
    }

    /// The common start of every registration key.
    pub(crate) fn reg_prefix(&self) -> &str {
        &self.reg
    }

    /// The key of a registration.
    pub(crate) fn key(&self, key: &RegistrationKey) -> String {
        let mut s = String::with_capacity(self.reg.len() + 80);
        s.push_str(&self.reg);
        // Writing to a String cannot fail.
        let _ = write!(s, "{}/{}", key.prefix, key.locator);
        s
    }

    /// The registration key a stored key names, if it is one of ours in canonical form.
    pub(crate) fn parse_key(&self, key: &[u8]) -> Option<RegistrationKey> {
        let rest = std::str::from_utf8(key)
            .ok()?
            .strip_prefix(self.reg.as_str())?;
        let mut parts = rest.splitn(3, '/');
        let (hex, len, loc) = (parts.next()?, parts.next()?, parts.next()?);
        // The canonical prefix text is always 64 digits; check before parsing anything.
        if hex.len() != 64 || len.is_empty() || len.len() > 3 {
            return None;
        }
        // Only canonical spellings are accepted, so two stored keys can never name the same
        // registration: lower-case hex, a length without sign or leading zeros (the parse is
        // strict, so bits past the length must be zero), the locator as Rust prints it.
        // Checked without formatting the prefix: a cold start parses a million keys.
        let lower_hex = hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let plain_len =
            len.bytes().all(|b| b.is_ascii_digit()) && (len == "0" || !len.starts_with('0'));
        if !lower_hex || !plain_len {
            return None;
        }
        let prefix = ServicePrefix::parse(&rest[..hex.len() + 1 + len.len()]).ok()?;
        let locator: Locator = loc.parse().ok()?;
        let mut printed = String::with_capacity(loc.len());
        let _ = write!(printed, "{locator}");
        (printed == loc).then_some(RegistrationKey { prefix, locator })
    }
}

/// What a registration's value holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Value {
    /// Share of new flows (at least 1).
    pub(crate) weight: u32,
    /// Priority class.
    pub(crate) priority: u32,
    /// The time to live asked for, in whole seconds (at least 1).
    pub(crate) ttl_secs: u64,
}

impl Value {
    /// The stored text.
    pub(crate) fn encode(&self) -> String {
        format!(
            "v1 w={} p={} ttl={}",
            self.weight, self.priority, self.ttl_secs
        )
    }

    /// Parses a stored value; `None` if malformed.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Value> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut fields = text.split_ascii_whitespace();
        if fields.next()? != "v1" {
            return None;
        }
        let (mut weight, mut priority, mut ttl) = (None, None, None);
        for field in fields {
            let (name, value) = field.split_once('=')?;
            let slot = match name {
                "w" => &mut weight,
                "p" => &mut priority,
                "ttl" => &mut ttl,
                _ => continue,
            };
            if slot.is_some() {
                return None;
            }
            // Digits only: no sign, no spaces, no empty number.
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            *slot = Some(value.parse::<u64>().ok()?);
        }
        let weight = u32::try_from(weight?).ok().filter(|w| *w >= 1)?;
        let priority = u32::try_from(priority?).ok()?;
        let ttl_secs = ttl.filter(|t| (1..=MAX_TTL_SECS).contains(t))?;
        Some(Value {
            weight,
            priority,
            ttl_secs,
        })
    }

    /// The registration this value completes.
    pub(crate) fn registration(&self, key: RegistrationKey) -> Registration {
        Registration {
            prefix: key.prefix,
            locator: key.locator,
            weight: self.weight,
            priority: self.priority,
        }
    }
}

/// A time to live in whole etcd seconds: rounded up, at least 1, at most etcd's maximum.
pub(crate) fn ttl_secs(ttl: std::time::Duration) -> u64 {
    let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    ms.div_ceil(1000).clamp(1, MAX_TTL_SECS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::*;

    fn key(name: &str, loc: &str) -> RegistrationKey {
        RegistrationKey {
            prefix: name.parse().unwrap(),
            locator: loc.parse().unwrap(),
        }
    }

    #[test]
    fn keys_round_trip_in_canonical_form_only() {
        let ks = KeySpace::new("/serval");
        for k in [
            key("example.com/*", "10.0.0.7:5000"),
            key("web.example.com", "[2001:db8::1]:9"),
            key("*", "127.0.0.1:1"),
        ] {
            let text = ks.key(&k);
            assert!(text.starts_with("/serval/v1/reg/"), "{text}");
            assert_eq!(ks.parse_key(text.as_bytes()), Some(k), "{text}");
        }
        let k = key("example.com/*", "10.0.0.7:5000");
        let text = ks.key(&k);
        assert_eq!(
            text,
            format!("/serval/v1/reg/{}/64/10.0.0.7:5000", k.prefix.id())
        );
        // Another prefix, upper-case hex, a padded length, a bad locator, a truncated key,
        // bytes that are not UTF-8: none is ours.
        let other = KeySpace::new("/other");
        assert_eq!(other.parse_key(text.as_bytes()), None);
        let upper = text.replace("/v1/reg/", "/V1/reg/");
        assert_eq!(ks.parse_key(upper.as_bytes()), None);
        let hex = k.prefix.id().to_string();
        let bad = [
            text.replace(&hex, &hex.to_uppercase()),
            text.replace("/64/", "/064/"),
            text.replace("/64/", "/+64/"),
            text.replace("10.0.0.7:5000", "10.0.0.7"),
            text.replace("10.0.0.7:5000", "010.0.0.7:5000"),
            text.replace("/64/", "/300/"),
            text[..text.len() - 5].to_owned(),
            "/serval/v1/reg/".to_owned(),
            "/serval/v1/reg/zz/1/1.2.3.4:5".to_owned(),
        ];
        for b in &bad {
            assert_eq!(ks.parse_key(b.as_bytes()), None, "{b}");
        }
        assert_eq!(ks.parse_key(b"/serval/v1/reg/\xff\xfe"), None);
        // A prefix with bits set past its length is refused by the prefix parser itself.
        let host_bits = format!("/serval/v1/reg/{}/8/1.2.3.4:5", "f".repeat(64));
        assert_eq!(ks.parse_key(host_bits.as_bytes()), None);
    }

    #[test]
    fn values_round_trip_and_malformed_ones_are_refused() {
        let v = Value {
            weight: 10,
            priority: 2,
            ttl_secs: 3,
        };
        assert_eq!(v.encode(), "v1 w=10 p=2 ttl=3");
        assert_eq!(Value::decode(v.encode().as_bytes()), Some(v));
        // Field order is free and unknown fields are ignored.
        assert_eq!(Value::decode(b"v1  ttl=3 x=yz p=2 w=10 "), Some(v));
        for bad in [
            &b""[..],
            b"v2 w=10 p=2 ttl=3",
            b"w=10 p=2 ttl=3",
            b"v1 w=0 p=2 ttl=3",
            b"v1 w=10 p=2 ttl=0",
            b"v1 w=10 p=2",
            b"v1 w=10 w=11 p=2 ttl=3",
            b"v1 w=-1 p=2 ttl=3",
            b"v1 w=+1 p=2 ttl=3",
            b"v1 w= p=2 ttl=3",
            b"v1 w=4294967296 p=2 ttl=3",
            b"v1 w=1 p=2 ttl=9000000001",
            b"v1 w=1 p=2 ttl=99999999999999999999999",
            b"v1 w=1 p=2 ttl",
            b"v1 w=1 p=2 ttl=3\xff",
        ] {
            assert_eq!(Value::decode(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn ttls_round_up_to_whole_seconds() {
        assert_eq!(ttl_secs(Duration::ZERO), 1);
        assert_eq!(ttl_secs(Duration::from_millis(1)), 1);
        assert_eq!(ttl_secs(Duration::from_millis(1000)), 1);
        assert_eq!(ttl_secs(Duration::from_millis(1001)), 2);
        assert_eq!(ttl_secs(Duration::from_secs(3)), 3);
        assert_eq!(ttl_secs(Duration::MAX), MAX_TTL_SECS);
    }
}
