//! Stateless SYN cookies of the [`Endpoint`]: under a SYN flood a server keeps no state for a
//! SYN until its sender proves it receives at the locator it claims.
//!
//! While [`EndpointConfig::syn_cookies`](super::EndpointConfig) says so (by default, once 256
//! handshakes are half open), a SYN for a local listener that does not carry a valid cookie is
//! answered with a *retry NACK* — `src=0 dst=Fc CONTROL{NACK, ackno=Vc+1} NONCE{Nc}
//! COOKIE{token}`, never larger than the SYN — and forgotten. The client sends its SYN again
//! at once with the token; the server checks it and only then creates the half-open flow. A
//! spoofed source never sees the token, so a flood from forged addresses costs the server one
//! MAC and one small answer per SYN, and no memory.
//!
//! ```text
//! token = slot (u32) || first 16 bytes of HMAC-SHA256(secret, "serval2 cookie" || slot ||
//!         client locator (16-byte IPv6 or IPv4-mapped address, port) || client flowID ||
//!         client nonce)
//! slot  = now / COOKIE_PERIOD
//! ```
//!
//! The secret is drawn from the endpoint's random source when it is created; a token is valid
//! in its slot and the next one (4 to 8 s), so a client behind a slow path still gets through.
//! The locator is the client's as the first hop saw it (SOURCE[0]), the same one the SYN-ACK
//! will go to.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serval_wire::ext::{COOKIE_TOKEN_LEN, ControlFlags, ControlRepr};
use serval_wire::{FlowId, Locator, Nonce, Protocol, SalRepr};
use sha2::Sha256;

use super::{Endpoint, Transmit};
use crate::Instant;

/// How long one cookie slot lasts; a token is accepted in its slot and the next.
pub const COOKIE_PERIOD: Duration = Duration::from_secs(4);

/// When a server asks SYNs for a cookie before it keeps state for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynCookies {
    /// Never: every SYN for a listener creates a half-open flow (up to the accept backlog).
    Never,
    /// Always: one extra round trip for every connection.
    Always,
    /// Once this many handshakes are half open on the endpoint (the default, 256).
    Above(usize),
}

impl Default for SynCookies {
    fn default() -> Self {
        SynCookies::Above(256)
    }
}

/// What a SYN's cookie says.
pub(super) enum CookieCheck {
    /// No cookie needed now, or a valid one: accept the SYN.
    Accept,
    /// A cookie is needed and this one is missing or stale: answer with a fresh one.
    Retry,
}

fn slot(now: Instant) -> u32 {
    let period = COOKIE_PERIOD.as_nanos() as u64;
    // Slots wrap after 2^32 × 4 s (544 years): truncation is the intent.
    (now.as_nanos() / period) as u32
}

fn mac(secret: &[u8; 32], slot: u32, client: Locator, flow: FlowId, nonce: &Nonce) -> [u8; 32] {
    let Ok(mut m) = Hmac::<Sha256>::new_from_slice(secret) else {
        unreachable!("HMAC accepts keys of any length");
    };
    let ip = match client.ip() {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    };
    m.update(b"serval2 cookie");
    m.update(&slot.to_be_bytes());
    m.update(&ip);
    m.update(&client.port().to_be_bytes());
    m.update(&flow.0.to_be_bytes());
    m.update(&nonce.0);
    m.finalize().into_bytes().into()
}

/// The token for a SYN from `client` at `now`.
pub(super) fn token(
    secret: &[u8; 32],
    now: Instant,
    client: Locator,
    flow: FlowId,
    nonce: &Nonce,
) -> [u8; COOKIE_TOKEN_LEN] {
    let s = slot(now);
    let m = mac(secret, s, client, flow, nonce);
    let mut t = [0u8; COOKIE_TOKEN_LEN];
    t[..4].copy_from_slice(&s.to_be_bytes());
    t[4..].copy_from_slice(&m[..COOKIE_TOKEN_LEN - 4]);
    t
}

/// Whether `t` is a token this endpoint issued for this SYN, in the current or previous slot.
pub(super) fn valid(
    secret: &[u8; 32],
    now: Instant,
    client: Locator,
    flow: FlowId,
    nonce: &Nonce,
    t: &[u8; COOKIE_TOKEN_LEN],
) -> bool {
    let mut s = [0u8; 4];
    s.copy_from_slice(&t[..4]);
    let s = u32::from_be_bytes(s);
    let current = slot(now);
    if s != current && s.wrapping_add(1) != current {
        return false;
    }
    let m = mac(secret, s, client, flow, nonce);
    // Constant time: a forger learns nothing from how long a refusal took.
    let diff = m[..COOKIE_TOKEN_LEN - 4]
        .iter()
        .zip(&t[4..])
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    diff == 0
}

impl Endpoint {
    /// Whether SYNs need a cookie now.
    fn cookies_required(&self) -> bool {
        match self.config.syn_cookies {
            SynCookies::Never => false,
            SynCookies::Always => true,
            SynCookies::Above(n) => self.half_open.len() >= n,
        }
    }

    /// Checks the cookie of a SYN from `client` for a local listener.
    pub(super) fn check_cookie(
        &mut self,
        now: Instant,
        client: Locator,
        repr: &SalRepr,
        nonce: &Nonce,
    ) -> CookieCheck {
        if !self.cookies_required() {
            return CookieCheck::Accept;
        }
        match &repr.cookie {
            Some(t) if valid(&self.cookie_secret, now, client, repr.src_flow, nonce, t) => {
                self.stats.cookies_accepted += 1;
                CookieCheck::Accept
            }
            Some(_) => {
                self.stats.cookies_refused += 1;
                CookieCheck::Retry
            }
            None => CookieCheck::Retry,
        }
    }

    /// Answers a SYN (`repr`, `syn_len` bytes, with CONTROL and NONCE) with a retry NACK
    /// carrying a fresh cookie: to the client (SOURCE[0]), no larger than the SYN, and nothing
    /// kept.
    pub(super) fn send_cookie(
        &mut self,
        now: Instant,
        local: Locator,
        client: Locator,
        repr: &SalRepr,
        syn_len: usize,
    ) {
        let (Some(ctl), Some(nonce)) = (repr.control, repr.nonce) else {
            return;
        };
        let mut r = SalRepr::new(Protocol::NONE, FlowId::NONE, repr.src_flow);
        r.control = Some(ControlRepr {
            flags: ControlFlags::NACK,
            verno: 0,
            ackno: ctl.verno.wrapping_add(1),
        });
        r.nonce = Some(nonce);
        r.cookie = Some(token(
            &self.cookie_secret,
            now,
            client,
            repr.src_flow,
            &nonce,
        ));
        if let Ok(payload) = r.to_bytes(&[])
            && payload.len() <= syn_len
            && self.queue_transmit(Transmit {
                src: local,
                dst: client,
                payload,
            })
        {
            self.stats.cookies_sent += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_bind_locator_flow_nonce_and_time() {
        let secret = [7u8; 32];
        let client: Locator = "10.0.0.1:5000".parse().expect("locator");
        let (flow, nonce) = (FlowId(42), Nonce([3; 16]));
        let now = Instant::from_nanos(100 * COOKIE_PERIOD.as_nanos() as u64 + 5);
        let t = token(&secret, now, client, flow, &nonce);
        assert!(valid(&secret, now, client, flow, &nonce, &t));
        // Valid through the next slot, not the one after.
        let next = now + COOKIE_PERIOD;
        assert!(valid(&secret, next, client, flow, &nonce, &t));
        assert!(!valid(
            &secret,
            next + COOKIE_PERIOD,
            client,
            flow,
            &nonce,
            &t
        ));
        // Not before it was issued either (a slot from the future is forged).
        let before = Instant::from_nanos(99 * COOKIE_PERIOD.as_nanos() as u64);
        assert!(!valid(&secret, before, client, flow, &nonce, &t));
        let other: Locator = "10.0.0.2:5000".parse().expect("locator");
        let port: Locator = "10.0.0.1:5001".parse().expect("locator");
        assert!(!valid(&secret, now, other, flow, &nonce, &t));
        assert!(!valid(&secret, now, port, flow, &nonce, &t));
        assert!(!valid(&secret, now, client, FlowId(43), &nonce, &t));
        assert!(!valid(&secret, now, client, flow, &Nonce([4; 16]), &t));
        assert!(!valid(&[8u8; 32], now, client, flow, &nonce, &t));
        for i in 0..COOKIE_TOKEN_LEN * 8 {
            let mut f = t;
            f[i / 8] ^= 1 << (i % 8);
            assert!(!valid(&secret, now, client, flow, &nonce, &f), "bit {i}");
        }
    }
}
