//! A path that went silent (issue 11): the link is up, the address still there, but nothing
//! comes back — a firewall dropping everything, a broken middlebox, a radio that stopped
//! forwarding. The runtime's host watcher cannot see it; the transport can: its probe timeout
//! fires again and again with nothing acknowledged. When it has fired [`STALE_PTOS`] times in
//! a row, an endpoint with another local locator of the same family moves the connection
//! there (RSYN, make-before-break: the old path keeps being tried until the new one answers).
//! An end that only receives has no probe timeout of its own (nothing of its own in flight):
//! its transport's silence probe (`transport/conn/liveness.rs`) PINGs when the peer's data
//! stops, and reports the path silent when that PING goes unanswered through the same
//! number of (shorter) probe timeouts; the move is then the same.
//! If that move fails too, the next silence tries the next locator, round robin.
//!
//! Off unless [`EndpointConfig::path_failover`](super::EndpointConfig::path_failover) is set,
//! and not while another path of the flow works (multipath: the flow goes on there).

use super::{ConnectionHandle, Endpoint};
use crate::connection::State;

/// Probe timeouts in a row, with nothing acknowledged, after which a path counts as dead.
/// Two: a single PTO is routine (a tail loss); two in a row on a live path mean the probes
/// themselves were lost too, which RFC 9002 §6.2 treats as the sign to back off, and this as
/// the sign to try elsewhere.
pub const STALE_PTOS: u32 = 2;

impl Endpoint {
    /// Starts moving connection `h` off its local locator if its path is silent (see the
    /// module's documentation). Returns whether a move started.
    pub(super) fn fail_over_if_silent(&mut self, h: ConnectionHandle) -> bool {
        if !self.config.path_failover {
            return false;
        }
        let Some(c) = self.conn_ref(h) else {
            return false;
        };
        // With another path working (multipath), the flow goes on there: its first path is
        // failing, not the flow, and it comes back by itself if it answers again.
        if c.state != State::Established
            || c.is_exported()
            || c.is_moving()
            || c.transport.is_frozen()
            || c.has_working_subpath()
            || (c.transport.pto_count() < STALE_PTOS && !c.transport.is_path_silent())
        {
            return false;
        }
        let Some(next) = next_local(&self.locals, c.local) else {
            return false;
        };
        let started = self.migrate(h, next);
        if started {
            self.stats.path_failovers = self.stats.path_failovers.saturating_add(1);
        }
        started
    }
}

/// The locator after `current` in `locals`, cyclically, of the same family, neither `current`
/// nor a wildcard address.
fn next_local(
    locals: &[serval_wire::Locator],
    current: serval_wire::Locator,
) -> Option<serval_wire::Locator> {
    let at = locals.iter().position(|l| *l == current).unwrap_or(0);
    locals
        .iter()
        .cycle()
        .skip(at + 1)
        .take(locals.len())
        .copied()
        .find(|l| *l != current && l.is_ipv4() == current.is_ipv4() && !l.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn loc(s: &str) -> serval_wire::Locator {
        s.parse().unwrap()
    }

    #[test]
    fn the_next_local_is_the_following_one_of_the_family_never_a_wildcard() {
        let locals = [
            loc("0.0.0.0:1"),
            loc("10.0.1.1:1"),
            loc("[fd00::1]:1"),
            loc("10.0.2.1:1"),
        ];
        assert_eq!(
            next_local(&locals, loc("10.0.1.1:1")),
            Some(loc("10.0.2.1:1"))
        );
        assert_eq!(
            next_local(&locals, loc("10.0.2.1:1")),
            Some(loc("10.0.1.1:1"))
        );
        assert_eq!(next_local(&locals, loc("[fd00::1]:1")), None);
        // A flow on the wildcard locator (or on one no longer listed) takes the first.
        assert_eq!(
            next_local(&locals, loc("0.0.0.0:1")),
            Some(loc("10.0.1.1:1"))
        );
        assert_eq!(
            next_local(&locals, loc("10.0.9.9:1")),
            Some(loc("10.0.1.1:1"))
        );
        assert_eq!(next_local(&[loc("10.0.1.1:1")], loc("10.0.1.1:1")), None);
    }
}
