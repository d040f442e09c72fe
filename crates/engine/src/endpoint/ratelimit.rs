//! Per-source SYN rate limiting of the [`Endpoint`]: a service router (or any endpoint so
//! configured) serves each client address a bounded rate of SYNs, so one flooding host cannot
//! take its forwarding capacity, its NACKs or its DELAY queue from everyone else.
//!
//! Each source address (the client's, SOURCE[0] as the first hop saw it; the port is ignored,
//! a host has many) has a token bucket: `rate` tokens a second up to `burst`. A SYN takes one
//! token or is dropped silently and counted (`syns_rate_limited`): answering it would make the
//! limit an amplifier. The table holds at most [`SynRateLimit::max_sources`] addresses; when it
//! is full, addresses whose bucket has refilled (idle ones) are forgotten — at most once per
//! refill time — and until then new addresses share one overflow bucket. Memory is bounded by
//! the table.
//!
//! **What it does not stop:** a flood from *forged random* addresses. Each forged address is
//! new and has a full bucket, and a once-seen address is idle again at the next sweep, so such
//! a flood passes at up to about `max_sources` SYNs per refill time (65 536 per 2 s by default)
//! plus the overflow bucket's rate. Per-address limits are for real hosts that flood; forged
//! SYNs are absorbed where they end up, by the instance's stateless cookies
//! ([`super::cookie`]), which keep no state and answer no larger than the SYN.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use crate::Instant;

/// The per-source SYN limit (`EndpointConfig::syn_rate_limit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynRateLimit {
    /// SYNs a second each source address may send, on average.
    pub rate: u32,
    /// SYNs a source may send at once after being idle.
    pub burst: u32,
    /// Most source addresses tracked at once.
    pub max_sources: usize,
}

impl Default for SynRateLimit {
    /// 1000 SYNs a second per address, bursts of 2000, 65 536 addresses tracked.
    fn default() -> Self {
        SynRateLimit {
            rate: 1000,
            burst: 2000,
            max_sources: 1 << 16,
        }
    }
}

/// A token bucket: tokens in millionths, and when it was last refilled.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    micro_tokens: u64,
    at: Instant,
}

/// The buckets of every source address seen lately.
#[derive(Debug, Default)]
pub(super) struct SynLimiter {
    buckets: HashMap<IpAddr, Bucket>,
    /// The bucket new addresses share while the table is full of busy ones.
    overflow: Option<Bucket>,
    /// When idle addresses were last forgotten: at most once per refill time, so a flood of
    /// new addresses does not make every SYN walk the table.
    swept: Option<Instant>,
}

const MICRO: u64 = 1_000_000;

impl Bucket {
    fn full(limit: &SynRateLimit, now: Instant) -> Bucket {
        Bucket {
            micro_tokens: u64::from(limit.burst) * MICRO,
            at: now,
        }
    }

    fn refill(&mut self, limit: &SynRateLimit, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at);
        let elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        // rate tokens/s = rate micro-tokens/µs.
        let add = elapsed_us.saturating_mul(u64::from(limit.rate));
        let cap = u64::from(limit.burst) * MICRO;
        self.micro_tokens = self.micro_tokens.saturating_add(add).min(cap);
        self.at = now;
    }

    fn take(&mut self, limit: &SynRateLimit, now: Instant) -> bool {
        self.refill(limit, now);
        if self.micro_tokens >= MICRO {
            self.micro_tokens -= MICRO;
            true
        } else {
            false
        }
    }

    fn is_full(&self, limit: &SynRateLimit, now: Instant) -> bool {
        let mut b = *self;
        b.refill(limit, now);
        b.micro_tokens >= u64::from(limit.burst) * MICRO
    }
}

impl SynLimiter {
    /// Whether a SYN from `source` may go on at `now` (and takes its token).
    pub(super) fn allow(&mut self, limit: &SynRateLimit, source: IpAddr, now: Instant) -> bool {
        if let Some(b) = self.buckets.get_mut(&source) {
            return b.take(limit, now);
        }
        let due = self
            .swept
            .is_none_or(|at| now.saturating_duration_since(at) >= refill_time(limit));
        if self.buckets.len() >= limit.max_sources.max(1) && due {
            // Forget the addresses that have been quiet long enough to be full again.
            self.buckets.retain(|_, b| !b.is_full(limit, now));
            self.swept = Some(now);
        }
        if self.buckets.len() >= limit.max_sources.max(1) {
            let b = self
                .overflow
                .get_or_insert_with(|| Bucket::full(limit, now));
            return b.take(limit, now);
        }
        let mut b = Bucket::full(limit, now);
        let ok = b.take(limit, now);
        self.buckets.insert(source, b);
        ok
    }

    /// Addresses tracked now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.len()
    }
}

/// How long a bucket takes to refill completely: after that an address is forgotten when room
/// is needed.
pub(super) fn refill_time(limit: &SynRateLimit) -> Duration {
    Duration::from_micros(u64::from(limit.burst) * MICRO / u64::from(limit.rate.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate_and_others_are_unaffected() {
        let limit = SynRateLimit {
            rate: 100,
            burst: 10,
            max_sources: 16,
        };
        let mut l = SynLimiter::default();
        let t0 = Instant::from_nanos(1_000_000_000);
        let flooder = ip("10.0.0.66");
        let allowed = (0..1000).filter(|_| l.allow(&limit, flooder, t0)).count();
        assert_eq!(allowed, 10, "the burst");
        // One second later: 100 more (the rate), not 1000.
        let t1 = t0 + Duration::from_secs(1);
        let allowed = (0..1000).filter(|_| l.allow(&limit, flooder, t1)).count();
        assert_eq!(allowed, 10, "refilled up to the burst only");
        let mut allowed = 0;
        for ms in 0..1000u64 {
            let t = t1 + Duration::from_millis(ms);
            allowed += (0..10).filter(|_| l.allow(&limit, flooder, t)).count();
        }
        assert!(
            (95..=105).contains(&allowed),
            "{allowed} in a second at 100/s"
        );
        // Meanwhile a legitimate client is served in full.
        assert!((0..10).all(|_| l.allow(&limit, ip("10.0.0.7"), t1)));
    }

    #[test]
    fn a_flood_of_forged_addresses_is_bounded_in_memory_and_rate() {
        let limit = SynRateLimit {
            rate: 10,
            burst: 2,
            max_sources: 100,
        };
        let mut l = SynLimiter::default();
        let t = Instant::from_nanos(5_000_000_000);
        let mut allowed = 0;
        for i in 0..100_000u32 {
            let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            allowed += usize::from(l.allow(&limit, a, t));
        }
        assert!(l.len() <= 100);
        // 100 tracked addresses × their burst of 2, plus the overflow bucket's 2 — nothing else
        // at the same instant.
        // Each tracked address took one of its two tokens; the rest shared the overflow
        // bucket's two.
        assert_eq!(allowed, 100 + 2);
        // Once the tracked ones have refilled (idle), new addresses take their places.
        let later = t + refill_time(&limit);
        assert!(l.allow(&limit, ip("192.0.2.1"), later));
    }
}
