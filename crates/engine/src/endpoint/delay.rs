//! DELAY rules of the [`Endpoint`]: SYNs held for a controller's verdict (DESIGN.md §4).
//!
//! A SYN whose lookup ends on a DELAY target is not answered: it is copied into a bounded queue
//! ([`EndpointConfig::delay_queue`](super::EndpointConfig)), announced as [`Event::SynHeld`],
//! and waits for [`Endpoint::release`]:
//!
//! * [`Verdict::Resolve`] runs the table lookup again now, so a controller can first add a
//!   rule, or wait for an instance to register, and then let the SYN through. If the lookup
//!   ends on DELAY again the client is NACKed (a resolve never holds a SYN twice, so a
//!   controller that answers everything with `Resolve` cannot keep a SYN circling).
//! * [`Verdict::Drop`] NACKs the client, which fails fast with "no route to service".
//!
//! A SYN with no verdict within [`EndpointConfig::delay_timeout`](super::EndpointConfig) is
//! dropped, NACKing the client too, and counted. A full queue drops (and counts) new SYNs
//! silently: under a flood, nothing is sent. Retransmissions of a held SYN (the client's
//! control channel resends it) are recognised by (client flowID, nonce) and ignored, so one
//! connection attempt is held once.
//!
//! Deadlines are a FIFO (every hold gets the same timeout, so they expire in arrival order)
//! with lazy deletion of released entries: O(1) per SYN, no scan.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use serval_wire::{FlowId, Locator, Nonce, SalPacket, SalRepr, ServiceId};

use super::{Endpoint, Event};
use crate::Instant;

/// Identifies a held SYN until it is released or times out. Never reused by an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HeldSynId(pub u64);

impl std::fmt::Display for HeldSynId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A SYN held by a DELAY rule, as reported to the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldSyn {
    /// Its identifier, for [`Endpoint::release`].
    pub id: HeldSynId,
    /// The serviceID it asks for.
    pub service: ServiceId,
    /// The client (the first SOURCE entry, as the first hop observed it).
    pub client: Locator,
    /// When it arrived.
    pub held_at: Instant,
    /// When it is dropped if no verdict comes.
    pub deadline: Instant,
}

/// A controller's answer to a held SYN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Look the serviceID up again now and act on the result.
    Resolve,
    /// NACK the client.
    Drop,
}

/// Why [`Endpoint::release`] did nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    /// No SYN is held with that id (never was, already released, or timed out).
    #[error("no held SYN with that id")]
    Unknown,
}

/// One held SYN and what is needed to act on it later.
#[derive(Debug)]
pub(super) struct Held {
    info: HeldSyn,
    local: Locator,
    remote: Locator,
    key: (FlowId, Nonce),
    data: Vec<u8>,
}

/// The held SYNs of an endpoint.
#[derive(Debug, Default)]
pub(super) struct DelayQueue {
    held: BTreeMap<HeldSynId, Held>,
    by_flow: HashMap<(FlowId, Nonce), HeldSynId>,
    deadlines: VecDeque<(Instant, HeldSynId)>,
    next_id: u64,
}

impl DelayQueue {
    fn len(&self) -> usize {
        self.held.len()
    }

    fn remove(&mut self, id: HeldSynId) -> Option<Held> {
        let h = self.held.remove(&id)?;
        self.by_flow.remove(&h.key);
        Some(h)
    }

    /// The earliest deadline of a SYN still held.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        // Released entries are skipped lazily in `expire`; an early wake-up is harmless.
        self.deadlines.front().map(|(t, _)| *t)
    }
}

impl Endpoint {
    /// Whether the SYN of (client flowID, nonce) is held: a retransmission of it is ignored
    /// (counted), whatever the table says now, so one attempt gets one outcome.
    pub(super) fn syn_is_held(&mut self, key: &(FlowId, Nonce)) -> bool {
        let held = self.delay.by_flow.contains_key(key);
        if held {
            self.stats.delay_retransmits += 1;
        }
        held
    }

    /// Holds a SYN that hit a DELAY rule, or drops it (counted) if the queue is full.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn hold_syn(
        &mut self,
        now: Instant,
        local: Locator,
        remote: Locator,
        data: &[u8],
        service: ServiceId,
        client: Locator,
        key: (FlowId, Nonce),
    ) {
        if self.delay.len() >= self.config.delay_queue {
            self.stats.delay_overflows += 1;
            return;
        }
        let id = HeldSynId(self.delay.next_id);
        self.delay.next_id += 1;
        let deadline = now + self.config.delay_timeout;
        let info = HeldSyn {
            id,
            service,
            client,
            held_at: now,
            deadline,
        };
        self.delay.held.insert(
            id,
            Held {
                info,
                local,
                remote,
                key,
                data: data.to_vec(),
            },
        );
        self.delay.by_flow.insert(key, id);
        self.delay.deadlines.push_back((deadline, id));
        self.stats.delayed += 1;
        self.events.push_back(Event::SynHeld(info));
    }

    /// Every SYN held by a DELAY rule, oldest first.
    pub fn held_syns(&self) -> impl Iterator<Item = &HeldSyn> + '_ {
        self.delay.held.values().map(|h| &h.info)
    }

    /// SYNs held now.
    pub fn held_count(&self) -> usize {
        self.delay.len()
    }

    /// Answers a held SYN: see [`Verdict`]. Whatever follows (a forwarded SYN, a SYN-ACK, a
    /// NACK) comes out of [`Endpoint::poll_transmit`].
    pub fn release(
        &mut self,
        now: Instant,
        id: HeldSynId,
        verdict: Verdict,
    ) -> Result<(), ReleaseError> {
        let h = self.delay.remove(id).ok_or(ReleaseError::Unknown)?;
        match verdict {
            Verdict::Resolve => {
                self.stats.delay_resolved += 1;
                self.resolve_held(now, &h);
            }
            Verdict::Drop => {
                self.stats.delay_dropped += 1;
                self.nack_held(&h);
            }
        }
        Ok(())
    }

    /// Drops (NACKing the client) every held SYN whose deadline has passed.
    pub(super) fn expire_held(&mut self, now: Instant) {
        while let Some(&(deadline, id)) = self.delay.deadlines.front() {
            if deadline > now {
                break;
            }
            self.delay.deadlines.pop_front();
            if let Some(h) = self.delay.remove(id) {
                self.stats.delay_timeouts += 1;
                self.nack_held(&h);
            }
        }
        // Released entries leave their deadline behind; keep the FIFO from growing without
        // bound when verdicts come much faster than the timeout.
        if self.delay.deadlines.len() > 2 * self.config.delay_queue.max(1) {
            let held = &self.delay.held;
            self.delay.deadlines.retain(|(_, id)| held.contains_key(id));
        }
    }

    fn parse_held(h: &Held) -> Option<SalRepr> {
        let pkt = SalPacket::new_checked(&h.data[..]).ok()?;
        SalRepr::parse(&pkt).ok()
    }

    fn resolve_held(&mut self, now: Instant, h: &Held) {
        // It parsed when it arrived; it is the same bytes.
        let Some(repr) = Self::parse_held(h) else {
            return;
        };
        self.resolving_held = true;
        self.handle_syn(now, h.local, h.remote, &h.data, repr, false);
        self.resolving_held = false;
    }

    fn nack_held(&mut self, h: &Held) {
        let Some(mut repr) = Self::parse_held(h) else {
            return;
        };
        let (Some(ctl), Some(nonce)) = (repr.control, repr.nonce) else {
            return;
        };
        if let Some(first) = repr.source.first_mut() {
            *first = h.info.client;
        }
        self.nack(h.local, h.info.client, &repr, ctl, nonce, h.data.len());
    }
}

/// The default of [`EndpointConfig::delay_timeout`](super::EndpointConfig).
pub const DEFAULT_DELAY_TIMEOUT: Duration = Duration::from_secs(5);
