//! Registration glue of the [`Endpoint`]: the router side (requests surfaced as events,
//! answers sent by the application) and the instance side (the endpoint's [`Registrar`],
//! fed with its listeners and locators).

use rand_chacha::rand_core::Rng;
use serval_wire::registration::RegistrationRepr;
use serval_wire::{Locator, SalPacket, ServicePrefix};

use super::{Endpoint, Event, Transmit};
use crate::Instant;
use crate::registrar::{LeaseConfig, Registrar, RegistrarEvent};

/// A registration request that reached an endpoint serving registrations (a service router),
/// for the application to decide on and answer with [`Endpoint::answer_registration`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistrationRequest {
    /// The local locator it arrived on (the answer leaves from there).
    pub local: Locator,
    /// Its UDP source as observed: the locator being registered (or unregistered).
    pub from: Locator,
    /// The REGISTER or UNREGISTER.
    pub request: RegistrationRepr,
}

impl Endpoint {
    /// Registers this endpoint's listeners with `router` from now on (`None`: with no router),
    /// with the lease settings of `lease`. Every listener, present and future, stream or
    /// datagram, is registered; closing one unregisters it at once. What a previous router
    /// held is unregistered there. Registrar state changes come out as
    /// [`Event::Registrar`].
    ///
    /// This does not touch the service table: adding a default route to the router (so that
    /// connects by name go through it) is the caller's choice.
    pub fn set_router(&mut self, router: Option<Locator>, lease: LeaseConfig) {
        self.set_routers(router.into_iter().collect(), lease);
    }

    /// [`Endpoint::set_router`] with several routers that share one registry: registrations
    /// go through the first and move to the next when it stops answering (within a third of
    /// the lease: [`RegistrarEvent::FailedOver`]). Empty:
    /// no router.
    pub fn set_routers(&mut self, routers: Vec<Locator>, lease: LeaseConfig) {
        if self.registrar.is_none() {
            if routers.is_empty() {
                return;
            }
            // Drawn only now, so endpoints without a router keep their random sequence.
            let instance = self.rng.next_u64();
            let first_id = self.rng.next_u32();
            let mut r = Registrar::new(lease.clone(), instance, first_id);
            for (prefix, weight, priority) in self.listener_prefixes() {
                r.register(prefix, weight, priority);
            }
            self.registrar = Some(r);
        }
        if let Some(r) = self.registrar.as_mut() {
            r.set_config(lease);
            r.set_routers(routers);
        }
        // With no router, the old locator stays for the UNREGISTERs still to send.
        self.locals_changed();
    }

    /// Signs every registration request with `key` from now on (`None`: unsigned), so that a
    /// router holding that key's authorisation for the prefix accepts them
    /// (`docs/security.md`). Works before or after [`Endpoint::set_router`]; registrations
    /// under way start over, signed.
    pub fn set_registration_key(&mut self, key: Option<serval_keys::PrivateKey>) {
        if self.registrar.is_none() {
            if key.is_none() {
                return;
            }
            let instance = self.rng.next_u64();
            let first_id = self.rng.next_u32();
            let mut r = Registrar::new(LeaseConfig::default(), instance, first_id);
            for (prefix, weight, priority) in self.listener_prefixes() {
                r.register(prefix, weight, priority);
            }
            self.registrar = Some(r);
        }
        if let Some(r) = self.registrar.as_mut() {
            r.set_key(key);
        }
    }

    /// Registers `prefix` with the router (weight and priority as a listener's) although no
    /// listener serves it here: a child router announcing to its parent the prefixes it
    /// routes for, so that the parent forwards their SYNs to it. Merged with the listeners'
    /// registrations of the same prefix (weights summed); calling it again updates weight and
    /// priority. Takes effect with or without a router set (it is registered once one is).
    pub fn announce(&mut self, prefix: ServicePrefix, weight: u32, priority: u32) {
        self.announced.insert(prefix, (weight.max(1), priority));
        self.registration_changed(prefix);
    }

    /// Stops announcing `prefix` (unregistered at once unless a listener still serves it).
    pub fn withdraw(&mut self, prefix: &ServicePrefix) {
        if self.announced.remove(prefix).is_some() {
            self.registration_changed(*prefix);
        }
    }

    /// The prefixes announced with [`Endpoint::announce`].
    pub fn announced(&self) -> impl Iterator<Item = (ServicePrefix, u32, u32)> + '_ {
        self.announced.iter().map(|(p, (w, pr))| (*p, *w, *pr))
    }

    /// The router this endpoint registers with.
    pub fn router(&self) -> Option<Locator> {
        self.registrar.as_ref().and_then(Registrar::router)
    }

    /// The registrar, once [`Endpoint::set_router`] has been called.
    pub fn registrar(&self) -> Option<&Registrar> {
        self.registrar.as_ref()
    }

    /// Whether registration requests that reach this endpoint are handed to the application
    /// as [`Event::RegistrationRequest`] (a service router) or dropped and counted (any other
    /// endpoint; the default).
    pub fn set_serve_registrations(&mut self, serve: bool) {
        self.serve_registrations = serve;
    }

    /// Sends `answer` (an ACK, REJECT or COOKIE built from `req.request`) back to where `req`
    /// came from. Returns `false`, sending nothing, if `answer` does not answer `req.request`
    /// ([`RegistrationRepr::is_answered_by`]), would be longer than the request (never an
    /// amplifier), or the endpoint's send queue is full (counted in
    /// [`EndpointStats::transmit_queue_drops`](super::EndpointStats)).
    pub fn answer_registration(
        &mut self,
        req: &RegistrationRequest,
        answer: &RegistrationRepr,
    ) -> bool {
        if !req.request.is_answered_by(answer) || answer.packet_len() > req.request.packet_len() {
            return false;
        }
        let queued = self.queue_transmit(Transmit {
            src: req.local,
            dst: req.from,
            payload: answer.to_packet().to_vec(),
        });
        if queued {
            self.stats.registration_answers += 1;
        }
        queued
    }

    /// The next registration message to send, and only those (an endpoint going away flushes
    /// its last UNREGISTERs with this; [`Endpoint::poll_transmit`] sends them too, in turn with
    /// everything else).
    pub fn poll_registration_transmit(&mut self, now: Instant) -> Option<Transmit> {
        let mut payload = Vec::new();
        let (src, dst) = self.poll_registrar_transmit(now, &mut payload)?;
        Some(Transmit { src, dst, payload })
    }

    /// A packet with protocol REGISTRATION: a request for the application, or an answer for
    /// the registrar.
    pub(super) fn handle_registration(
        &mut self,
        now: Instant,
        local: Locator,
        remote: Locator,
        pkt: &SalPacket<&[u8]>,
    ) {
        let repr = match RegistrationRepr::parse_packet(pkt) {
            Ok(r) => r,
            Err(_) => {
                self.stats.malformed += 1;
                self.stats.registrations_malformed += 1;
                return;
            }
        };
        if repr.ty.is_request() {
            if self.serve_registrations {
                self.stats.registration_requests += 1;
                self.events
                    .push_back(Event::RegistrationRequest(RegistrationRequest {
                        local,
                        from: remote,
                        request: repr,
                    }));
            } else {
                self.stats.registrations_unexpected += 1;
            }
            return;
        }
        let accepted = self
            .registrar
            .as_mut()
            .is_some_and(|r| r.handle_answer(now, remote, &repr));
        if !accepted {
            self.stats.registrations_unexpected += 1;
        }
    }

    /// Every served prefix once, with the sum of its listeners' (and announcement's) weights
    /// and their highest priority (the endpoint is one locator to the router, whatever it does
    /// locally).
    fn listener_prefixes(&self) -> Vec<(ServicePrefix, u32, u32)> {
        let mut out: Vec<(ServicePrefix, u32, u32)> = Vec::new();
        let served = self
            .listeners
            .values()
            .map(|l| (l.prefix, l.weight, l.priority))
            .chain(self.announced());
        for (prefix, weight, priority) in served {
            match out.iter_mut().find(|(p, ..)| *p == prefix) {
                Some((_, w, p)) => {
                    *w = w.saturating_add(weight);
                    *p = (*p).max(priority);
                }
                None => out.push((prefix, weight, priority)),
            }
        }
        out
    }

    /// A listener of `prefix` came or went: registers the new aggregate, or unregisters.
    pub(super) fn registration_changed(&mut self, prefix: ServicePrefix) {
        if self.registrar.is_none() {
            return;
        }
        let agg = self
            .listener_prefixes()
            .into_iter()
            .find(|(p, ..)| *p == prefix);
        if let Some(r) = self.registrar.as_mut() {
            match agg {
                Some((p, w, pr)) => r.register(p, w, pr),
                None => r.unregister(&prefix),
            }
        }
    }

    /// The local locators changed: the registrar follows the one it sends from.
    pub(super) fn locals_changed(&mut self) {
        let Some(router) = self.router() else {
            return;
        };
        let local = self.local_for(&router);
        if let Some(r) = self.registrar.as_mut() {
            r.set_local(local);
        }
    }

    /// The registrar's next message, appended to `out` as a whole packet.
    pub(super) fn poll_registrar_transmit(
        &mut self,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Option<(Locator, Locator)> {
        let locals = &self.locals;
        let r = self.registrar.as_mut()?;
        while let Some((dst, msg)) = r.poll_transmit(now) {
            // From the locator the registrar registers; an UNREGISTER to a previous router of
            // another family leaves from any local of that family (none: it is dropped).
            let src = r
                .local()
                .filter(|l| l.is_ipv4() == dst.is_ipv4())
                .or_else(|| {
                    locals
                        .iter()
                        .find(|l| l.is_ipv4() == dst.is_ipv4())
                        .copied()
                });
            if let Some(src) = src {
                out.extend_from_slice(&msg.to_packet());
                return Some((src, dst));
            }
        }
        None
    }

    /// The registrar's next event.
    pub(super) fn poll_registrar_event(&mut self) -> Option<Event> {
        let e = self.registrar.as_mut()?.poll_event()?;
        if matches!(e, RegistrarEvent::FailedOver { .. }) {
            // The next router may be of the other family: register from a local of its own.
            self.locals_changed();
        }
        Some(Event::Registrar(e))
    }

    /// The registrar's deadline.
    pub(super) fn registrar_timeout(&self) -> Option<Instant> {
        self.registrar.as_ref().and_then(Registrar::poll_timeout)
    }

    /// Runs the registrar's timers.
    pub(super) fn registrar_handle_timeout(&mut self, now: Instant) {
        if let Some(r) = self.registrar.as_mut() {
            r.handle_timeout(now);
        }
    }
}
