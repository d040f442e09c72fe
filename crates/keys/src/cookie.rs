//! Return-routability cookies: how a service router checks, keeping no state per request,
//! that an instance receives at the locator it registers (`docs/wire.md` §11.2).
//!
//! A cookie is 16 bytes: the time slot it was made in (4 bytes, big-endian) and the first 12
//! bytes of HMAC-SHA256 under the router's secret for that slot of
//!
//! ```text
//! "serval-cookie-v1" ‖ slot (4) ‖ locator (7 or 19 bytes, docs/wire.md §4.4)
//!                    ‖ instance (8) ‖ prefix length (2) ‖ prefix ID (32)
//! ```
//!
//! The router draws a new random secret for each slot ([`COOKIE_SLOT`], 30 s) and keeps the
//! previous one, so a cookie is accepted in the slot it was made and the next: for 30 to 60 s.
//! Only a host that receives at the locator can echo a cookie for it; a forged source address
//! never sees one.

use std::time::Duration;

use ring::hmac;
use serval_wire::locator::{LOCATOR_V6_LEN, emit_locator};
use serval_wire::registration::{COOKIE_LEN, Cookie};
use serval_wire::{Locator, ServicePrefix};

/// How long a cookie slot lasts: a cookie is valid in its slot and the next.
pub const COOKIE_SLOT: Duration = Duration::from_secs(30);
/// Length of a slot secret.
pub const SECRET_LEN: usize = 32;
/// What the MAC covers first.
pub const COOKIE_CONTEXT: &[u8] = b"serval-cookie-v1";

/// The MAC of `cookie`'s slot, locator, instance and prefix under `secret` (12 bytes).
fn mac(
    secret: &hmac::Key,
    slot: u32,
    from: &Locator,
    instance: u64,
    prefix: &ServicePrefix,
) -> [u8; 12] {
    let mut loc = [0u8; LOCATOR_V6_LEN];
    let n = emit_locator(from, &mut loc);
    let mut ctx = hmac::Context::with_key(secret);
    ctx.update(COOKIE_CONTEXT);
    ctx.update(&slot.to_be_bytes());
    ctx.update(loc.get(..n).unwrap_or(&loc));
    ctx.update(&instance.to_be_bytes());
    ctx.update(&prefix.len().to_be_bytes());
    ctx.update(prefix.id().as_bytes());
    let tag = ctx.sign();
    let mut out = [0u8; 12];
    out.copy_from_slice(&tag.as_ref()[..12]);
    out
}

/// Equal in time independent of where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The router's cookie secrets: the current slot's and the previous slot's. Sans-IO: the
/// caller says which slot it is and supplies fresh random secrets.
pub struct CookieJar {
    slot: u32,
    current: hmac::Key,
    previous: Option<hmac::Key>,
}

impl std::fmt::Debug for CookieJar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CookieJar")
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl CookieJar {
    /// A jar at `slot` with the secret `secret` (random, from the caller).
    pub fn new(slot: u32, secret: [u8; SECRET_LEN]) -> CookieJar {
        CookieJar {
            slot,
            current: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            previous: None,
        }
    }

    /// The current slot.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Moves to `slot` if it is later than the current one, with `fresh` as its secret; the
    /// current secret becomes the previous one if `slot` is the very next slot (otherwise
    /// cookies of the old slots are no longer accepted). Returns whether it moved.
    pub fn advance(&mut self, slot: u32, fresh: [u8; SECRET_LEN]) -> bool {
        if slot <= self.slot {
            return false;
        }
        let next = hmac::Key::new(hmac::HMAC_SHA256, &fresh);
        let old = std::mem::replace(&mut self.current, next);
        self.previous = (slot == self.slot.wrapping_add(1)).then_some(old);
        self.slot = slot;
        true
    }

    /// A cookie for `instance` registering `prefix` from `from`, in the current slot.
    pub fn issue(&self, from: &Locator, instance: u64, prefix: &ServicePrefix) -> Cookie {
        let mut c = [0u8; COOKIE_LEN];
        c[..4].copy_from_slice(&self.slot.to_be_bytes());
        c[4..].copy_from_slice(&mac(&self.current, self.slot, from, instance, prefix));
        Cookie(c)
    }

    /// Whether `cookie` was issued by this jar, in the current or the previous slot, for
    /// exactly this locator, instance and prefix.
    pub fn check(
        &self,
        cookie: &Cookie,
        from: &Locator,
        instance: u64,
        prefix: &ServicePrefix,
    ) -> bool {
        let slot = u32::from_be_bytes([cookie.0[0], cookie.0[1], cookie.0[2], cookie.0[3]]);
        let key = if slot == self.slot {
            &self.current
        } else if slot.wrapping_add(1) == self.slot {
            match &self.previous {
                Some(k) => k,
                None => return false,
            }
        } else {
            return false;
        };
        same(&cookie.0[4..], &mac(key, slot, from, instance, prefix))
    }

    /// Whether `cookie` is current enough to go on using: made in the current slot. (An ACK
    /// hands out a fresh one otherwise.)
    pub fn is_current(&self, cookie: &Cookie) -> bool {
        cookie.0[..4] == self.slot.to_be_bytes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serval_wire::ServiceId;

    fn p(name: &str) -> ServicePrefix {
        ServicePrefix::exact(ServiceId::from_name(name).unwrap())
    }

    #[test]
    fn cookies_bind_locator_instance_prefix_and_slot() {
        let a: Locator = "10.0.0.1:5000".parse().unwrap();
        let b: Locator = "10.0.0.2:5000".parse().unwrap();
        let mut jar = CookieJar::new(7, [1; 32]);
        let c = jar.issue(&a, 9, &p("web.test"));
        assert!(jar.check(&c, &a, 9, &p("web.test")));
        assert!(!jar.check(&c, &b, 9, &p("web.test")));
        assert!(!jar.check(&c, &"10.0.0.1:5001".parse().unwrap(), 9, &p("web.test")));
        assert!(!jar.check(&c, &a, 8, &p("web.test")));
        assert!(!jar.check(&c, &a, 9, &p("api.test")));
        assert!(!jar.check(&Cookie::EMPTY, &a, 9, &p("web.test")));
        for i in 0..COOKIE_LEN * 8 {
            let mut bad = c;
            bad.0[i / 8] ^= 1 << (i % 8);
            assert!(!jar.check(&bad, &a, 9, &p("web.test")), "bit {i}");
        }
        // Valid in the next slot, not the one after.
        assert!(jar.advance(8, [2; 32]));
        assert!(jar.check(&c, &a, 9, &p("web.test")));
        assert!(!jar.is_current(&c));
        assert!(jar.is_current(&jar.issue(&a, 9, &p("web.test"))));
        assert!(!jar.advance(8, [3; 32]));
        assert!(jar.advance(9, [3; 32]));
        assert!(!jar.check(&c, &a, 9, &p("web.test")));
        // A jump of several slots forgets the previous secret.
        let d = jar.issue(&a, 9, &p("web.test"));
        assert!(jar.advance(12, [4; 32]));
        assert!(!jar.check(&d, &a, 9, &p("web.test")));
        // Another router (another secret) does not accept it.
        let other = CookieJar::new(12, [5; 32]);
        assert!(!other.check(&jar.issue(&a, 9, &p("web.test")), &a, 9, &p("web.test")));
    }
}
