//! SYNs held by DELAY rules, and the verdicts that release them (a router's controller hook).
//!
//! A service-table rule with [`Action::Delay`](crate::Action) makes the engine hold matching
//! SYNs (bounded: [`EndpointConfig::delay_queue`](crate::EndpointConfig), 1024 by default) and
//! report each one; [`Endpoint::release`] answers with a [`Verdict`]: `Resolve` looks the
//! serviceID up again now (add a rule, or let an instance register, first), `Drop` NACKs the
//! client so it fails fast. A SYN with no verdict within
//! [`EndpointConfig::delay_timeout`](crate::EndpointConfig) (5 s by default) is dropped and its
//! client NACKed. Counters are in [`Endpoint::stats`] (`delayed`, `delay_resolved`,
//! `delay_dropped`, `delay_timeouts`, `delay_overflows`).

use std::time::Duration;

use serval_engine::endpoint::HeldSyn;
pub use serval_engine::endpoint::{HeldSynId, ReleaseError, Verdict};
use serval_wire::{Locator, ServiceId};
use tokio::sync::broadcast;

use crate::endpoint::Endpoint;

/// A SYN held by a DELAY rule, as the runtime reports it (times relative to now).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DelayedSyn {
    /// What to pass to [`Endpoint::release`].
    pub id: HeldSynId,
    /// The serviceID the client asked for.
    pub service: ServiceId,
    /// The client (where a NACK or the instance's SYN-ACK goes).
    pub client: Locator,
    /// How long it has been held.
    pub held_for: Duration,
    /// How long until it is dropped if no verdict comes.
    pub expires_in: Duration,
}

impl DelayedSyn {
    pub(crate) fn new(h: &HeldSyn, now: serval_engine::Instant) -> DelayedSyn {
        DelayedSyn {
            id: h.id,
            service: h.service,
            client: h.client,
            held_for: now.saturating_duration_since(h.held_at),
            expires_in: h.deadline.saturating_duration_since(now),
        }
    }
}

/// Held SYNs announced to subscribers before the slowest is dropped (it then sees
/// `Lagged`; [`Endpoint::held_syns`] always has the full list).
pub(crate) const HELD_EVENTS: usize = 1024;

impl Endpoint {
    /// Every SYN held by a DELAY rule now, oldest first.
    pub fn held_syns(&self) -> Vec<DelayedSyn> {
        let st = self.shared.lock();
        let now = st.now();
        st.engine
            .held_syns()
            .map(|h| DelayedSyn::new(h, now))
            .collect()
    }

    /// Each SYN a DELAY rule holds from now on, as it is held (for a controller that answers
    /// as they come rather than polling [`Endpoint::held_syns`]).
    pub fn held_syn_events(&self) -> broadcast::Receiver<DelayedSyn> {
        self.shared.lock().held.subscribe()
    }

    /// Answers a held SYN with `verdict`; [`ReleaseError::Unknown`] if no SYN is held with
    /// that id (already answered, or timed out).
    pub fn release(&self, id: HeldSynId, verdict: Verdict) -> Result<(), ReleaseError> {
        let mut st = self.shared.lock();
        let now = st.now();
        let r = st.engine.release(now, id, verdict);
        st.dispatch();
        drop(st);
        if r.is_ok() {
            tracing::debug!(%id, ?verdict, "held SYN released");
            self.shared.wake.notify_one();
        }
        r
    }
}
