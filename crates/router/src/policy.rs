//! What the router does with one registration request: pure decisions, no I/O.

use std::time::Duration;

use serval_registry::{Registration, RegistrationKey};
use serval_wire::{Locator, MessageType, RegistrationRepr, RejectReason, ServicePrefix};

/// The router's registration policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Prefixes registrations may be for (a registration must fall under one of them); empty
    /// accepts every prefix.
    pub accept: Vec<ServicePrefix>,
    /// Shortest lease granted.
    pub min_ttl: Duration,
    /// Longest lease granted.
    pub max_ttl: Duration,
    /// Lease granted to a REGISTER that asks for none (TTL 0), before clamping.
    pub default_ttl: Duration,
    /// Most registrations held; a new one beyond it is refused with
    /// [`RejectReason::LIMIT`] (refreshes of existing ones are not).
    pub max_registrations: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            accept: Vec::new(),
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(300),
            default_ttl: Duration::from_secs(3),
            max_registrations: 1_000_000,
        }
    }
}

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Store `registration` for `ttl`, and ACK with `ttl`.
    Put {
        /// What to store.
        registration: Registration,
        /// The lease granted.
        ttl: Duration,
    },
    /// Remove `key`, and ACK.
    Delete(RegistrationKey),
    /// Answer with a REJECT.
    Reject(RejectReason),
}

impl Policy {
    /// Whether registrations for `prefix` are accepted.
    pub fn accepts(&self, prefix: &ServicePrefix) -> bool {
        self.accept.is_empty() || self.accept.iter().any(|a| a.covers(prefix))
    }

    /// The lease granted for a request asking for `requested_ms` (0: the default).
    pub fn grant(&self, requested_ms: u32) -> Duration {
        let asked = if requested_ms == 0 {
            self.default_ttl
        } else {
            Duration::from_millis(u64::from(requested_ms))
        };
        asked.clamp(self.min_ttl, self.max_ttl.max(self.min_ttl))
    }

    /// Decides on `request`, received from `from` (the observed source, which is what gets
    /// registered). `exists`: whether the router already holds (prefix, `from`); `held`: how
    /// many registrations it holds.
    pub fn decide(
        &self,
        from: Locator,
        request: &RegistrationRepr,
        exists: bool,
        held: usize,
    ) -> Decision {
        let key = RegistrationKey {
            prefix: request.prefix,
            locator: from,
        };
        match request.ty {
            // Removing is always allowed: it can only remove what `from` registered itself.
            MessageType::Unregister => Decision::Delete(key),
            MessageType::Register if !self.accepts(&request.prefix) => {
                Decision::Reject(RejectReason::NOT_ACCEPTED)
            }
            MessageType::Register if !exists && held >= self.max_registrations => {
                Decision::Reject(RejectReason::LIMIT)
            }
            MessageType::Register => Decision::Put {
                registration: Registration {
                    prefix: request.prefix,
                    locator: from,
                    weight: request.weight.max(1),
                    priority: request.priority,
                },
                ttl: self.grant(request.ttl_ms),
            },
            // Answers are not requests; the engine never hands them over.
            MessageType::Ack | MessageType::Reject(_) | MessageType::Cookie => {
                Decision::Reject(RejectReason::NOT_ACCEPTED)
            }
        }
    }
}

/// The TTL of an ACK, in milliseconds (saturating).
pub fn ttl_ms(ttl: Duration) -> u32 {
    u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serval_wire::ServiceId;

    fn req(name: &str, ttl_ms: u32) -> RegistrationRepr {
        let id = ServiceId::from_name(name).unwrap();
        RegistrationRepr::register(1, 2, ServicePrefix::exact(id), 3, 4, ttl_ms)
    }

    fn from() -> Locator {
        "192.0.2.1:5000".parse().unwrap()
    }

    #[test]
    fn ttls_are_clamped_and_zero_means_the_default() {
        let p = Policy {
            min_ttl: Duration::from_millis(500),
            max_ttl: Duration::from_secs(10),
            default_ttl: Duration::from_secs(3),
            ..Policy::default()
        };
        assert_eq!(p.grant(0), Duration::from_secs(3));
        assert_eq!(p.grant(100), Duration::from_millis(500));
        assert_eq!(p.grant(2000), Duration::from_secs(2));
        assert_eq!(p.grant(u32::MAX), Duration::from_secs(10));
        // A misconfigured range (min above max) grants min.
        let odd = Policy {
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(1),
            ..Policy::default()
        };
        assert_eq!(odd.grant(3000), Duration::from_secs(5));
    }

    #[test]
    fn the_observed_source_is_registered() {
        let d = Policy::default().decide(from(), &req("web.test", 2000), false, 0);
        assert_eq!(
            d,
            Decision::Put {
                registration: Registration {
                    prefix: req("web.test", 0).prefix,
                    locator: from(),
                    weight: 3,
                    priority: 4,
                },
                ttl: Duration::from_secs(2),
            }
        );
    }

    #[test]
    fn accept_list_covers_by_prefix() {
        let p = Policy {
            accept: vec![ServicePrefix::from_domain("example.com").unwrap()],
            ..Policy::default()
        };
        assert!(matches!(
            p.decide(from(), &req("web.example.com", 0), false, 0),
            Decision::Put { .. }
        ));
        assert_eq!(
            p.decide(from(), &req("web.example.org", 0), false, 0),
            Decision::Reject(RejectReason::NOT_ACCEPTED)
        );
        // Unregistering is never refused.
        assert!(matches!(
            p.decide(from(), &req("web.example.org", 0).unregister(9), false, 0),
            Decision::Delete(_)
        ));
    }

    #[test]
    fn the_limit_refuses_new_registrations_only() {
        let p = Policy {
            max_registrations: 2,
            ..Policy::default()
        };
        assert_eq!(
            p.decide(from(), &req("a.test", 0), false, 2),
            Decision::Reject(RejectReason::LIMIT)
        );
        assert!(matches!(
            p.decide(from(), &req("a.test", 0), true, 2),
            Decision::Put { .. }
        ));
    }
}
