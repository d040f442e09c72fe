//! The registrar: an instance's side of registration with a service router (sans-IO).
//!
//! An endpoint that has a router registers every prefix it serves there, so that the router
//! forwards SYNs for it (DESIGN.md §4, "active sockets"). The registrar keeps one entry per
//! prefix and, driven by the caller's clock:
//!
//! * sends a REGISTER and retransmits it with exponential backoff ([`LeaseConfig::initial_rto`]
//!   doubling up to [`LeaseConfig::max_rto`]) until the router answers;
//! * on an ACK, refreshes the lease every [`LeaseConfig::refresh`] (but at least three times per
//!   granted TTL, whatever the router granted), each refresh a new request retransmitted the
//!   same way;
//! * reports [`RegistrarEvent::Registered`], [`RegistrarEvent::Rejected`] (asking again after
//!   [`LeaseConfig::retry_after_reject`]) and [`RegistrarEvent::Unreachable`] (no answer before
//!   the lease, or the first request's TTL, ran out — it keeps trying at the backoff cap, and
//!   reports `Registered` again when the router answers);
//! * when the endpoint's locator changes, registers every prefix again from the new one (the
//!   router replaces the old registration because the instance token matches);
//! * with several routers ([`Registrar::set_routers`], routers that share one registry),
//!   registers through the first and, when a request has gone unanswered for a refresh period
//!   (a third of the lease), moves every registration to the next one
//!   ([`RegistrarEvent::FailedOver`]) — well inside the lease, so a router's death loses no
//!   registration. The router left behind gets no UNREGISTER: with a shared registry it would
//!   delete what the next router just refreshed;
//! * on [`Registrar::unregister`] (a listener closed) sends an UNREGISTER, retransmitted up to
//!   [`LeaseConfig::unregister_attempts`] times until acknowledged, then forgets it: best
//!   effort, since the lease expires anyway;
//! * follows the router's return-routability cookies: every request goes out in the 76-byte
//!   form with the cookie it holds for that router and prefix (empty at first); a COOKIE
//!   answer gives it one and the same request (same request ID) goes out again at once, with
//!   it; an ACK may carry a fresher one. Cookies are bound to the locator, so a new local
//!   locator drops them (`docs/wire.md` §11.2);
//! * with a key ([`Registrar::set_key`]), signs every request (the 140-byte form), so that a
//!   router holding that key's authorisation for the prefix accepts it. A refusal is
//!   [`RegistrarEvent::Rejected`] with [`RejectReason::UNAUTHORIZED`].
//!
//! It never reads a clock: [`Registrar::poll_transmit`], [`Registrar::handle_timeout`] and
//! [`Registrar::handle_answer`] take `now`, and [`Registrar::poll_timeout`] says when to call
//! again. Answers are accepted only from the router, and only when they echo an outstanding
//! request's ID, the instance token and the prefix (`docs/wire.md` §11.2).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

pub use serval_keys::PrivateKey;
use serval_wire::registration::{Cookie, MessageType, RegistrationRepr, RejectReason};
use serval_wire::{Locator, ServicePrefix};

use crate::Instant;

/// Lease and retransmission settings of a [`Registrar`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The lease asked for in each REGISTER (the router may clamp it). Default 3 s: a dead
    /// instance stops receiving new connections within about that long.
    pub ttl: Duration,
    /// How often a registration is refreshed. Default 1 s. The registrar refreshes at least
    /// three times per *granted* TTL, whatever this says.
    pub refresh: Duration,
    /// First retransmission timeout of a request; it doubles with each retransmission.
    /// Default 250 ms.
    pub initial_rto: Duration,
    /// Largest retransmission timeout (also the retry period while the router is
    /// unreachable). Default 500 ms: five tries fit in the two thirds of a lease left after a
    /// refresh starts, so even at 30% loss a lease rarely lapses.
    pub max_rto: Duration,
    /// Sends of an UNREGISTER before giving up on its acknowledgement. Default 3.
    pub unregister_attempts: u32,
    /// After a REJECT, how long before asking again. Default 10 s. A REJECT because the
    /// router's registry is unavailable (its etcd is away: transient) is retried at the
    /// [`refresh`](LeaseConfig::refresh) period instead, so a registration is back within a
    /// second of etcd's return.
    pub retry_after_reject: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            ttl: Duration::from_secs(3),
            refresh: Duration::from_secs(1),
            initial_rto: Duration::from_millis(250),
            max_rto: Duration::from_millis(500),
            unregister_attempts: 3,
            retry_after_reject: Duration::from_secs(10),
        }
    }
}

impl LeaseConfig {
    /// How often a registration of lease `ttl` is refreshed: [`refresh`](Self::refresh), but
    /// at least three times per lease and never more often than [`MIN_REFRESH`].
    fn refresh_period(&self, ttl: Duration) -> Duration {
        self.refresh.min(ttl / 3).max(MIN_REFRESH)
    }
}

/// Shortest refresh period, whatever the router grants (guards against a router granting a
/// TTL of a few milliseconds turning the instance into a packet generator).
pub const MIN_REFRESH: Duration = Duration::from_millis(50);

/// Where one prefix's registration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistrationState {
    /// Asked, not answered yet (or no router / no local address to ask from).
    Registering,
    /// The router holds it.
    Registered {
        /// The TTL granted.
        ttl: Duration,
        /// When the lease runs out unless refreshed (counted, conservatively, from the first
        /// send of the request the router acknowledged).
        lease_end: Instant,
    },
    /// The router refused it.
    Rejected(RejectReason),
    /// The router did not answer in time; the registrar keeps asking.
    Unreachable,
}

/// A change in a registration's state, for the application and its logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistrarEvent {
    /// The router acknowledged the registration (first time, or again after a rejection,
    /// an outage or a locator change).
    Registered {
        /// The prefix.
        prefix: ServicePrefix,
        /// The router.
        router: Locator,
        /// The TTL granted.
        ttl: Duration,
    },
    /// The router refused it.
    Rejected {
        /// The prefix.
        prefix: ServicePrefix,
        /// The router.
        router: Locator,
        /// Why.
        reason: RejectReason,
    },
    /// No answer before the lease (or the first request's TTL) ran out.
    Unreachable {
        /// The prefix.
        prefix: ServicePrefix,
        /// The router.
        router: Locator,
    },
    /// The router stopped answering and every registration moved to the next of the
    /// routers given to [`Registrar::set_routers`].
    FailedOver {
        /// The router that did not answer.
        from: Locator,
        /// The router registrations go to now.
        to: Locator,
    },
}

/// Counters of a [`Registrar`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistrarStats {
    /// REGISTER and UNREGISTER messages sent, retransmissions included.
    pub sent: u64,
    /// Of those, retransmissions.
    pub retransmitted: u64,
    /// Answers that matched an outstanding request.
    pub answers: u64,
    /// Answers ignored: from another host, or matching no outstanding request.
    pub ignored: u64,
    /// UNREGISTERs given up on without an acknowledgement.
    pub unregisters_abandoned: u64,
    /// Moves to the next router after the current one stopped answering.
    pub failovers: u64,
    /// COOKIE answers followed (each sends its request again at once, with the cookie).
    pub cookies: u64,
    /// COOKIE answers ignored because their request had already been sent again with
    /// [`MAX_COOKIE_ROUNDS`] cookies.
    pub cookie_rounds_exceeded: u64,
}

/// COOKIE answers one request follows before it ignores more (a router that keeps answering
/// COOKIE to its own cookies is broken; the request then retransmits on its timer as usual).
pub const MAX_COOKIE_ROUNDS: u32 = 3;

/// A request in flight.
#[derive(Debug, Clone)]
struct Pending {
    request: RegistrationRepr,
    /// When it was first sent (`None`: not yet).
    first_sent: Option<Instant>,
    /// When to send it (again).
    send_at: Instant,
    rto: Duration,
    /// COOKIE answers followed for this request.
    cookie_rounds: u32,
}

#[derive(Debug, Clone)]
struct Entry {
    weight: u32,
    priority: u32,
    state: RegistrationState,
    pending: Option<Pending>,
    /// When to start the next request while none is pending (refresh, retry after reject).
    next_request: Option<Instant>,
    /// Whether this entry ever sent a REGISTER to the current router (so an UNREGISTER is
    /// worth sending).
    sent_any: bool,
}

/// An UNREGISTER in flight (the prefix is gone from the entries).
#[derive(Debug, Clone)]
struct Leaving {
    dst: Locator,
    request: RegistrationRepr,
    send_at: Instant,
    rto: Duration,
    sends_left: u32,
    cookie_rounds: u32,
}

/// The instance side of registration; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Registrar {
    config: LeaseConfig,
    instance: u64,
    next_id: u32,
    router: Option<Locator>,
    /// Every router registrations may go to, in order of preference (empty or one: no
    /// failover).
    routers: Vec<Locator>,
    local: Option<Locator>,
    entries: BTreeMap<ServicePrefix, Entry>,
    leaving: Vec<Leaving>,
    out: VecDeque<(Locator, RegistrationRepr)>,
    events: VecDeque<RegistrarEvent>,
    /// The earliest deadline of anything above (`Instant::ZERO`: work to do at once).
    wake_at: Option<Instant>,
    stats: RegistrarStats,
    /// The cookie each router gave for each prefix (a cookie names the locator, the
    /// instance and the prefix), for the current local locator.
    cookies: BTreeMap<(Locator, ServicePrefix), Cookie>,
    /// Signs every request, if set.
    key: Option<PrivateKey>,
}

impl Registrar {
    /// A registrar with no router yet. `instance` is the token that identifies this instance
    /// across locator changes and `first_request_id` the first request ID; both should come
    /// from the caller's random source.
    pub fn new(config: LeaseConfig, instance: u64, first_request_id: u32) -> Registrar {
        Registrar {
            config,
            instance,
            next_id: first_request_id,
            router: None,
            routers: Vec::new(),
            local: None,
            entries: BTreeMap::new(),
            leaving: Vec::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            wake_at: None,
            stats: RegistrarStats::default(),
            cookies: BTreeMap::new(),
            key: None,
        }
    }

    /// Signs every request with `key` from now on (`None`: unsigned). Registrations under
    /// way start over, so the router sees signed requests at once.
    pub fn set_key(&mut self, key: Option<PrivateKey>) {
        if key == self.key {
            return;
        }
        self.key = key;
        self.restart_all();
    }

    /// The key requests are signed with.
    pub fn key(&self) -> Option<&PrivateKey> {
        self.key.as_ref()
    }

    /// The lease settings.
    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    /// Changes the lease settings; they apply from the next request.
    pub fn set_config(&mut self, config: LeaseConfig) {
        self.config = config;
    }

    /// The instance token.
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// The router registrations go to.
    pub fn router(&self) -> Option<Locator> {
        self.router
    }

    /// Every router registrations may go to, in order (see [`Registrar::set_routers`]).
    pub fn routers(&self) -> &[Locator] {
        &self.routers
    }

    /// The local locator registrations are sent from (what the router will register).
    pub fn local(&self) -> Option<Locator> {
        self.local
    }

    /// Counters.
    pub fn stats(&self) -> &RegistrarStats {
        &self.stats
    }

    /// Where the registration of `prefix` stands, if it is registered here.
    pub fn state(&self, prefix: &ServicePrefix) -> Option<RegistrationState> {
        self.entries.get(prefix).map(|e| e.state)
    }

    /// Every prefix with its weight, priority and state.
    pub fn registrations(
        &self,
    ) -> impl Iterator<Item = (ServicePrefix, u32, u32, RegistrationState)> {
        self.entries
            .iter()
            .map(|(p, e)| (*p, e.weight, e.priority, e.state))
    }

    fn request_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    fn new_pending(&mut self, prefix: ServicePrefix, weight: u32, priority: u32) -> Pending {
        let ttl_ms = u32::try_from(self.config.ttl.as_millis()).unwrap_or(u32::MAX);
        let id = self.request_id();
        Pending {
            request: RegistrationRepr::register(
                id,
                self.instance,
                prefix,
                weight.max(1),
                priority,
                ttl_ms,
            ),
            first_sent: None,
            send_at: Instant::ZERO,
            rto: self.config.initial_rto,
            cookie_rounds: 0,
        }
    }

    /// Whether an UNREGISTER is still under way (sent, not yet answered nor given up).
    pub fn unregistering(&self) -> bool {
        !self.leaving.is_empty()
    }

    /// Starts an UNREGISTER of `prefix` at `dst` (replacing one already under way there).
    fn leave(&mut self, dst: Locator, prefix: ServicePrefix, weight: u32, priority: u32) {
        self.leaving
            .retain(|l| !(l.dst == dst && l.request.prefix == prefix));
        let id = self.request_id();
        let request =
            RegistrationRepr::register(0, self.instance, prefix, weight.max(1), priority, 0)
                .unregister(id);
        self.leaving.push(Leaving {
            dst,
            request,
            send_at: Instant::ZERO,
            rto: self.config.initial_rto,
            sends_left: self.config.unregister_attempts.max(1),
            cookie_rounds: 0,
        });
        self.wake_at = Some(Instant::ZERO);
    }

    /// Registers `prefix` with `weight` (at least 1) and `priority`, or changes them. Sent at
    /// the next [`poll_transmit`](Self::poll_transmit), if there is a router.
    pub fn register(&mut self, prefix: ServicePrefix, weight: u32, priority: u32) {
        let weight = weight.max(1);
        // Registering again supersedes an UNREGISTER still under way at this router.
        let router = self.router;
        self.leaving
            .retain(|l| !(Some(l.dst) == router && l.request.prefix == prefix));
        if let Some(e) = self.entries.get(&prefix)
            && e.weight == weight
            && e.priority == priority
        {
            return;
        }
        let pending = self
            .router
            .is_some()
            .then(|| self.new_pending(prefix, weight, priority));
        let e = self.entries.entry(prefix).or_insert(Entry {
            weight,
            priority,
            state: RegistrationState::Registering,
            pending: None,
            next_request: None,
            sent_any: false,
        });
        e.weight = weight;
        e.priority = priority;
        e.pending = pending;
        e.next_request = None;
        self.wake_at = Some(Instant::ZERO);
    }

    /// Stops registering `prefix` and, if the router may hold it, unregisters it (best
    /// effort).
    pub fn unregister(&mut self, prefix: &ServicePrefix) {
        let Some(e) = self.entries.remove(prefix) else {
            return;
        };
        if let Some(router) = self.router
            && e.sent_any
        {
            self.leave(router, *prefix, e.weight, e.priority);
        }
    }

    /// Unregisters everything.
    pub fn close(&mut self) {
        let prefixes: Vec<ServicePrefix> = self.entries.keys().copied().collect();
        for p in prefixes {
            self.unregister(&p);
        }
    }

    /// Registers with `router` from now on (`None`: with no router). What the previous router
    /// held is unregistered there; every prefix is registered with the new one.
    pub fn set_router(&mut self, router: Option<Locator>) {
        self.set_routers(router.into_iter().collect());
    }

    /// Registers through the first of `routers` (which should share one registry), moving to
    /// the next when the current one stops answering (see the [module docs](self)). If the
    /// current router is still in the list, registrations stay with it; otherwise what it held
    /// is unregistered there and everything is registered with the first. Empty: no router.
    pub fn set_routers(&mut self, routers: Vec<Locator>) {
        let keep = self.router.filter(|r| routers.contains(r));
        let router = keep.or_else(|| routers.first().copied());
        // Cookies of routers no longer used are of no more use (those the UNREGISTERs below
        // need stay until the lists change again).
        let old = self.router;
        self.cookies
            .retain(|(l, _), _| routers.contains(l) || Some(*l) == old);
        self.routers = routers;
        if router == self.router {
            return;
        }
        if let Some(old) = self.router {
            let held: Vec<(ServicePrefix, u32, u32)> = self
                .entries
                .iter()
                .filter(|(_, e)| e.sent_any)
                .map(|(p, e)| (*p, e.weight, e.priority))
                .collect();
            for (p, w, pr) in held {
                self.leave(old, p, w, pr);
            }
        }
        self.router = router;
        self.restart_all();
    }

    /// The endpoint now sends to the router from `local` (`None`: it has no address of the
    /// router's family). A change registers every prefix again from there.
    pub fn set_local(&mut self, local: Option<Locator>) {
        if local == self.local {
            return;
        }
        self.local = local;
        // Cookies name the locator they were given to.
        self.cookies.clear();
        self.restart_all();
    }

    /// Every entry starts over with a fresh REGISTER (new router or new locator).
    fn restart_all(&mut self) {
        let prefixes: Vec<(ServicePrefix, u32, u32)> = self
            .entries
            .iter()
            .map(|(p, e)| (*p, e.weight, e.priority))
            .collect();
        for (p, w, pr) in prefixes {
            let pending = self.router.is_some().then(|| self.new_pending(p, w, pr));
            if let Some(e) = self.entries.get_mut(&p) {
                e.state = RegistrationState::Registering;
                e.pending = pending;
                e.next_request = None;
                e.sent_any = false;
            }
        }
        self.wake_at = Some(Instant::ZERO);
    }

    /// Handles an ACK or REJECT from `from`. Returns whether it answered an outstanding
    /// request (anything else is ignored and counted).
    pub fn handle_answer(
        &mut self,
        now: Instant,
        from: Locator,
        answer: &RegistrationRepr,
    ) -> bool {
        let accepted = self.answer(now, from, answer);
        if accepted {
            self.stats.answers += 1;
            self.recompute_wake();
        } else {
            self.stats.ignored += 1;
        }
        accepted
    }

    fn answer(&mut self, now: Instant, from: Locator, answer: &RegistrationRepr) -> bool {
        if answer.ty.is_request() {
            return false;
        }
        if let Some(i) = self
            .leaving
            .iter()
            .position(|l| l.dst == from && l.request.is_answered_by(answer))
        {
            if answer.ty == MessageType::Cookie {
                let l = &mut self.leaving[i];
                if l.cookie_rounds >= MAX_COOKIE_ROUNDS {
                    self.stats.cookie_rounds_exceeded += 1;
                    return true;
                }
                l.cookie_rounds += 1;
                l.send_at = now;
                l.sends_left = l.sends_left.max(1);
                self.stats.cookies += 1;
                if let Some(c) = answer.cookie.filter(|c| !c.is_empty()) {
                    self.cookies.insert((from, answer.prefix), c);
                }
                return true;
            }
            let done = self.leaving.swap_remove(i);
            self.forget_cookie(done.dst, done.request.prefix);
            return true;
        }
        let Some(router) = self.router.filter(|r| *r == from) else {
            return false;
        };
        let Some(e) = self.entries.get_mut(&answer.prefix) else {
            return false;
        };
        let Some(p) = e
            .pending
            .as_mut()
            .filter(|p| p.request.is_answered_by(answer))
        else {
            return false;
        };
        if answer.ty == MessageType::Cookie {
            // The router wants proof that we receive here: the same request again, at once,
            // with its cookie.
            if p.cookie_rounds >= MAX_COOKIE_ROUNDS {
                self.stats.cookie_rounds_exceeded += 1;
                return true;
            }
            p.cookie_rounds += 1;
            p.send_at = now;
            self.stats.cookies += 1;
            if let Some(c) = answer.cookie.filter(|c| !c.is_empty()) {
                self.cookies.insert((router, answer.prefix), c);
            }
            return true;
        }
        // An ACK may hand out a fresher cookie.
        if answer.ty == MessageType::Ack
            && let Some(c) = answer.cookie.filter(|c| !c.is_empty())
        {
            self.cookies.insert((router, answer.prefix), c);
        }
        let first_sent = p.first_sent.unwrap_or(now);
        e.pending = None;
        let prefix = answer.prefix;
        match answer.ty {
            MessageType::Ack => {
                let ttl = Duration::from_millis(u64::from(answer.ttl_ms));
                let lease_end = first_sent.checked_add(ttl).unwrap_or(first_sent);
                let period = self.config.refresh_period(ttl);
                e.next_request = now.checked_add(period);
                let was_registered = matches!(e.state, RegistrationState::Registered { .. });
                e.state = RegistrationState::Registered { ttl, lease_end };
                if !was_registered {
                    self.events.push_back(RegistrarEvent::Registered {
                        prefix,
                        router,
                        ttl,
                    });
                }
            }
            MessageType::Reject(reason) => {
                e.state = RegistrationState::Rejected(reason);
                let wait = if reason == RejectReason::UNAVAILABLE {
                    self.config.refresh_period(self.config.ttl)
                } else {
                    self.config.retry_after_reject
                };
                e.next_request = now.checked_add(wait);
                self.events.push_back(RegistrarEvent::Rejected {
                    prefix,
                    router,
                    reason,
                });
            }
            MessageType::Register | MessageType::Unregister | MessageType::Cookie => {}
        }
        true
    }

    /// The next message to send and where to (the router, or a previous router for an
    /// UNREGISTER). Call until `None` after every input.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(Locator, RegistrationRepr)> {
        if self.out.is_empty() && self.wake_at.is_some_and(|t| t <= now) {
            self.process(now);
        }
        self.out.pop_front()
    }

    /// The earliest time [`handle_timeout`](Self::handle_timeout) (or
    /// [`poll_transmit`](Self::poll_transmit)) has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.wake_at
    }

    /// Runs what is due at `now`: retransmissions, refreshes, unreachable-router detection.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.wake_at.is_some_and(|t| t <= now) {
            self.process(now);
        }
    }

    /// The next state change.
    pub fn poll_event(&mut self) -> Option<RegistrarEvent> {
        self.events.pop_front()
    }

    /// Whether a request has gone unanswered for a refresh period (a third of the lease), so
    /// that the next router should have it (only with more than one router).
    fn current_router_is_silent(&self, now: Instant) -> bool {
        self.local.is_some()
            && self
                .entries
                .values()
                .any(|e| self.failover_due(e).is_some_and(|t| t <= now))
    }

    /// When `e`'s request will have gone unanswered for a refresh period; `None` with fewer
    /// than two routers or nothing in flight.
    fn failover_due(&self, e: &Entry) -> Option<Instant> {
        if self.routers.len() < 2 {
            return None;
        }
        let granted = match e.state {
            RegistrationState::Registered { ttl, .. } => ttl,
            _ => self.config.ttl,
        };
        e.pending
            .as_ref()?
            .first_sent?
            .checked_add(self.config.refresh_period(granted))
    }

    /// Moves every registration to the router after the current one: a fresh REGISTER each,
    /// sent at once. Entries keep their state (a registration the last router held stays
    /// Registered until its lease runs out unanswered). No UNREGISTER goes to the silent one.
    fn fail_over(&mut self) {
        let Some(from) = self.router else { return };
        let next = self
            .routers
            .iter()
            .position(|r| *r == from)
            .map_or(0, |i| (i + 1) % self.routers.len());
        let to = self.routers[next];
        self.router = Some(to);
        self.stats.failovers += 1;
        self.events
            .push_back(RegistrarEvent::FailedOver { from, to });
        let prefixes: Vec<(ServicePrefix, u32, u32)> = self
            .entries
            .iter()
            .map(|(p, e)| (*p, e.weight, e.priority))
            .collect();
        for (p, w, pr) in prefixes {
            let pending = self.new_pending(p, w, pr);
            if let Some(e) = self.entries.get_mut(&p) {
                e.pending = Some(pending);
                e.next_request = None;
                e.sent_any = false;
            }
        }
    }

    fn process(&mut self, now: Instant) {
        if self.current_router_is_silent(now) {
            self.fail_over();
        }
        let (ttl, max_rto) = (self.config.ttl, self.config.max_rto);
        let can_send = self.local.is_some();
        if let Some(router) = self.router {
            let prefixes: Vec<ServicePrefix> = self.entries.keys().copied().collect();
            for prefix in prefixes {
                // Start a refresh, or a retry after a rejection.
                let start = self.entries.get(&prefix).is_some_and(|e| {
                    e.pending.is_none() && e.next_request.is_some_and(|t| t <= now)
                });
                if start {
                    let (w, p) = self
                        .entries
                        .get(&prefix)
                        .map_or((1, 0), |e| (e.weight, e.priority));
                    let pending = self.new_pending(prefix, w, p);
                    if let Some(e) = self.entries.get_mut(&prefix) {
                        e.pending = Some(pending);
                        e.next_request = None;
                    }
                }
                let Some(e) = self.entries.get_mut(&prefix) else {
                    continue;
                };
                if let Some(p) = e.pending.as_mut() {
                    if p.send_at <= now {
                        if can_send {
                            let cookie = self.cookies.get(&(router, prefix)).copied();
                            let msg = finish_with(self.key.as_ref(), cookie, &p.request);
                            self.out.push_back((router, msg));
                            self.stats.sent += 1;
                            if p.first_sent.is_some() {
                                self.stats.retransmitted += 1;
                            }
                            e.sent_any = true;
                        }
                        p.first_sent.get_or_insert(now);
                        p.send_at = now.checked_add(p.rto).unwrap_or(now);
                        p.rto = p.rto.saturating_mul(2).min(max_rto);
                    }
                    // No answer before the lease (or the request's own TTL) ran out.
                    let deadline = match e.state {
                        RegistrationState::Registered { lease_end, .. } => Some(lease_end),
                        RegistrationState::Registering => {
                            p.first_sent.and_then(|t| t.checked_add(ttl))
                        }
                        RegistrationState::Rejected(_) | RegistrationState::Unreachable => None,
                    };
                    if deadline.is_some_and(|d| d <= now) {
                        e.state = RegistrationState::Unreachable;
                        self.events
                            .push_back(RegistrarEvent::Unreachable { prefix, router });
                    }
                }
            }
        }
        let mut i = 0;
        while i < self.leaving.len() {
            let l = &mut self.leaving[i];
            if l.send_at <= now {
                if l.sends_left == 0 {
                    self.stats.unregisters_abandoned += 1;
                    let done = self.leaving.swap_remove(i);
                    self.forget_cookie(done.dst, done.request.prefix);
                    continue;
                }
                // The caller picks a source of the right family (or drops it if it has none).
                let cookie = self.cookies.get(&(l.dst, l.request.prefix)).copied();
                let msg = finish_with(self.key.as_ref(), cookie, &l.request);
                self.out.push_back((l.dst, msg));
                self.stats.sent += 1;
                l.sends_left -= 1;
                l.send_at = now.checked_add(l.rto).unwrap_or(now);
                l.rto = l.rto.saturating_mul(2).min(max_rto);
            }
            i += 1;
        }
        self.recompute_wake();
    }

    /// Drops the cookie of `prefix` at `router` once nothing needs it any more (no entry for
    /// the prefix, no UNREGISTER of it under way there), so the map stays the size of what
    /// is registered.
    fn forget_cookie(&mut self, router: Locator, prefix: ServicePrefix) {
        let needed = self.entries.contains_key(&prefix)
            || self
                .leaving
                .iter()
                .any(|l| l.dst == router && l.request.prefix == prefix);
        if !needed {
            self.cookies.remove(&(router, prefix));
        }
    }

    fn recompute_wake(&mut self) {
        let mut wake: Option<Instant> = None;
        let mut at = |t: Instant| wake = Some(wake.map_or(t, |w| w.min(t)));
        if self.router.is_some() {
            for e in self.entries.values() {
                match &e.pending {
                    Some(p) => {
                        at(p.send_at);
                        if let Some(t) = self.failover_due(e) {
                            at(t);
                        }
                        if let RegistrationState::Registered { lease_end, .. } = e.state {
                            at(lease_end);
                        } else if let (RegistrationState::Registering, Some(t)) =
                            (e.state, p.first_sent)
                            && let Some(d) = t.checked_add(self.config.ttl)
                        {
                            at(d);
                        }
                    }
                    None => {
                        if let Some(t) = e.next_request {
                            at(t);
                        }
                    }
                }
            }
        }
        for l in &self.leaving {
            at(l.send_at);
        }
        self.wake_at = wake;
    }
}

/// `request` with `cookie` (or an empty one) and, with `key`, signed.
fn finish_with(
    key: Option<&PrivateKey>,
    cookie: Option<Cookie>,
    request: &RegistrationRepr,
) -> RegistrationRepr {
    let r = request.with_cookie(cookie.unwrap_or(Cookie::EMPTY));
    match key {
        Some(k) => serval_keys::sign_registration(k, &r),
        None => r,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serval_wire::ServiceId;

    const MS: Duration = Duration::from_millis(1);

    fn loc(s: &str) -> Locator {
        s.parse().unwrap()
    }

    fn prefix(name: &str) -> ServicePrefix {
        ServicePrefix::exact(ServiceId::from_name(name).unwrap())
    }

    fn at(ms: u64) -> Instant {
        Instant::from_nanos(ms * 1_000_000)
    }

    fn registrar() -> Registrar {
        registrar_with(vec![loc("10.0.0.9:54324")])
    }

    /// A registrar with these routers, sending from 10.0.0.1:54324.
    fn registrar_with(routers: Vec<Locator>) -> Registrar {
        let mut r = Registrar::new(LeaseConfig::default(), 0xabcd, 100);
        r.set_routers(routers);
        r.set_local(Some(loc("10.0.0.1:54324")));
        r
    }

    fn sent(r: &mut Registrar, now: Instant) -> Vec<(Locator, RegistrationRepr)> {
        std::iter::from_fn(|| r.poll_transmit(now)).collect()
    }

    fn events(r: &mut Registrar) -> Vec<RegistrarEvent> {
        std::iter::from_fn(|| r.poll_event()).collect()
    }

    /// Advances to each deadline up to `until`, collecting what is sent.
    fn run(r: &mut Registrar, from: Instant, until: Instant) -> Vec<(Instant, RegistrationRepr)> {
        run_to(r, from, until)
            .into_iter()
            .map(|(t, _, m)| (t, m))
            .collect()
    }

    #[test]
    fn registers_at_once_and_backs_off_until_answered() {
        let mut r = registrar();
        let p = prefix("web.test");
        r.register(p, 3, 1);
        assert_eq!(r.poll_timeout(), Some(Instant::ZERO));
        let sends = run(&mut r, at(0), at(2999));
        let times: Vec<u64> = sends
            .iter()
            .map(|(t, _)| t.as_nanos() / 1_000_000)
            .collect();
        // 250, then capped at 500 ms.
        assert_eq!(times, [0, 250, 750, 1250, 1750, 2250, 2750]);
        let req = sends[0].1;
        assert!(sends.iter().all(|(_, m)| *m == req), "same request ID");
        assert_eq!(req.ty, MessageType::Register);
        assert_eq!((req.weight, req.priority, req.ttl_ms), (3, 1, 3000));
        assert_eq!(req.instance, 0xabcd);
        assert!(events(&mut r).is_empty());
        // The first request's TTL has passed without an answer: the router is unreachable.
        run(&mut r, at(2999), at(3000));
        assert_eq!(
            events(&mut r),
            [RegistrarEvent::Unreachable {
                prefix: p,
                router: loc("10.0.0.9:54324")
            }]
        );
        assert_eq!(r.state(&p), Some(RegistrationState::Unreachable));
        // It keeps asking at the cap, and an answer brings it back.
        let later = run(&mut r, at(3000), at(5000));
        assert_eq!(later.len(), 4);
        assert!(r.handle_answer(at(5000), loc("10.0.0.9:54324"), &req.ack(3000)));
        assert!(matches!(
            events(&mut r)[..],
            [RegistrarEvent::Registered { ttl, .. }] if ttl == 3000 * MS
        ));
    }

    #[test]
    fn refreshes_at_the_period_with_a_new_request_each_time() {
        let mut r = registrar();
        let p = prefix("web.test");
        r.register(p, 1, 0);
        let req = sent(&mut r, at(0))[0].1;
        assert!(r.handle_answer(at(10), loc("10.0.0.9:54324"), &req.ack(3000)));
        assert_eq!(
            r.state(&p),
            Some(RegistrationState::Registered {
                ttl: 3000 * MS,
                lease_end: at(3000)
            })
        );
        assert_eq!(r.poll_timeout(), Some(at(1010)));
        let s = run(&mut r, at(10), at(1010));
        assert_eq!(s.len(), 1);
        assert_ne!(s[0].1.request_id, req.request_id);
        // A late ACK of the old request is ignored.
        assert!(!r.handle_answer(at(1011), loc("10.0.0.9:54324"), &req.ack(3000)));
        assert!(r.handle_answer(at(1020), loc("10.0.0.9:54324"), &s[0].1.ack(3000)));
        // No second Registered event for a refresh.
        assert_eq!(events(&mut r).len(), 1);
        assert_eq!(r.stats().ignored, 1);
    }

    #[test]
    fn refresh_is_at_least_three_per_granted_ttl() {
        let mut r = registrar();
        let p = prefix("web.test");
        r.register(p, 1, 0);
        let req = sent(&mut r, at(0))[0].1;
        // The router clamped the lease to 600 ms: refresh every 200 ms, not every second.
        r.handle_answer(at(0), loc("10.0.0.9:54324"), &req.ack(600));
        assert_eq!(r.poll_timeout(), Some(at(200)));
        // A silly grant of 0 ms still refreshes no faster than MIN_REFRESH.
        let s = run(&mut r, at(0), at(200));
        r.handle_answer(at(200), loc("10.0.0.9:54324"), &s[0].1.ack(0));
        assert_eq!(r.poll_timeout(), Some(at(200) + MIN_REFRESH));
    }

    #[test]
    fn lost_refreshes_end_in_unreachable_when_the_lease_runs_out() {
        let mut r = registrar();
        let p = prefix("web.test");
        r.register(p, 1, 0);
        let req = sent(&mut r, at(0))[0].1;
        r.handle_answer(at(5), loc("10.0.0.9:54324"), &req.ack(3000));
        events(&mut r);
        // Refreshes from 1005 ms on are never answered; the lease ends at 3000.
        let s = run(&mut r, at(5), at(2999));
        assert_eq!(s.len(), 5, "{s:?}");
        assert!(events(&mut r).is_empty());
        run(&mut r, at(2999), at(3000));
        assert!(matches!(
            events(&mut r)[..],
            [RegistrarEvent::Unreachable { .. }]
        ));
    }

    #[test]
    fn reject_is_reported_and_retried_later() {
        let mut r = registrar();
        let p = prefix("web.test");
        r.register(p, 1, 0);
        let req = sent(&mut r, at(0))[0].1;
        r.handle_answer(
            at(1),
            loc("10.0.0.9:54324"),
            &req.reject(RejectReason::NOT_ACCEPTED),
        );
        assert_eq!(
            events(&mut r),
            [RegistrarEvent::Rejected {
                prefix: p,
                router: loc("10.0.0.9:54324"),
                reason: RejectReason::NOT_ACCEPTED
            }]
        );
        assert_eq!(r.poll_timeout(), Some(at(10_001)));
        // No unreachable report while rejected, and the retry is a new REGISTER.
        let s = run(&mut r, at(1), at(10_001));
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].1.ty, MessageType::Register);
        assert!(events(&mut r).is_empty());
    }

    #[test]
    fn a_registry_unavailable_reject_is_retried_at_the_refresh_period() {
        let mut r = registrar();
        let p = prefix("web.test");
        r.register(p, 1, 0);
        let req = sent(&mut r, at(0))[0].1;
        r.handle_answer(
            at(1),
            loc("10.0.0.9:54324"),
            &req.reject(RejectReason::UNAVAILABLE),
        );
        assert!(matches!(
            events(&mut r)[..],
            [RegistrarEvent::Rejected {
                reason: RejectReason::UNAVAILABLE,
                ..
            }]
        ));
        // Transient: asked again after the refresh period (1 s), not retry_after_reject.
        assert_eq!(r.poll_timeout(), Some(at(1_001)));
        let s = run(&mut r, at(1), at(1_001));
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].1.ty, MessageType::Register);
    }

    #[test]
    fn answers_must_come_from_the_router_and_echo_the_request() {
        let mut r = registrar();
        let p = prefix("web.test");
        r.register(p, 1, 0);
        let req = sent(&mut r, at(0))[0].1;
        let router = loc("10.0.0.9:54324");
        assert!(!r.handle_answer(at(1), loc("10.6.6.6:54324"), &req.ack(3000)));
        let forged = [
            RegistrationRepr {
                request_id: req.request_id ^ 1,
                ..req.ack(3000)
            },
            RegistrationRepr {
                instance: 1,
                ..req.ack(3000)
            },
            RegistrationRepr {
                prefix: prefix("other.test"),
                ..req.ack(3000)
            },
            req,
        ];
        for f in forged {
            assert!(!r.handle_answer(at(1), router, &f), "{f}");
        }
        assert_eq!(r.stats().ignored, 5);
        assert_eq!(r.state(&p), Some(RegistrationState::Registering));
    }

    #[test]
    fn unregister_is_sent_at_once_and_retransmitted_a_few_times() {
        let mut r = registrar();
        let p = prefix("web.test");
        r.register(p, 2, 0);
        let req = sent(&mut r, at(0))[0].1;
        r.handle_answer(at(1), loc("10.0.0.9:54324"), &req.ack(3000));
        r.unregister(&p);
        assert_eq!(r.state(&p), None);
        let s = run(&mut r, at(2), at(60_000));
        assert_eq!(s.len(), 3, "{s:?}");
        let times: Vec<u64> = s.iter().map(|(t, _)| t.as_nanos() / 1_000_000).collect();
        assert_eq!(times, [2, 252, 752]);
        assert!(
            s.iter()
                .all(|(_, m)| m.ty == MessageType::Unregister && m.prefix == p && m.weight == 2)
        );
        assert_eq!(r.poll_timeout(), None);
        assert_eq!(r.stats().unregisters_abandoned, 1);

        // Acknowledged at once: no retransmission.
        let mut r = registrar();
        r.register(p, 2, 0);
        let req = sent(&mut r, at(0))[0].1;
        r.handle_answer(at(1), loc("10.0.0.9:54324"), &req.ack(3000));
        r.unregister(&p);
        let unreg = sent(&mut r, at(2))[0].1;
        assert!(r.handle_answer(at(3), loc("10.0.0.9:54324"), &unreg.ack(0)));
        assert_eq!(r.poll_timeout(), None);
    }

    #[test]
    fn nothing_is_unregistered_that_was_never_sent() {
        let mut r = Registrar::new(LeaseConfig::default(), 1, 1);
        let p = prefix("web.test");
        r.register(p, 1, 0);
        r.unregister(&p);
        assert!(sent(&mut r, at(0)).is_empty());
        assert_eq!(r.poll_timeout(), None);
    }

    #[test]
    fn a_new_locator_registers_again() {
        let mut r = registrar();
        let p = prefix("web.test");
        r.register(p, 1, 0);
        let req = sent(&mut r, at(0))[0].1;
        r.handle_answer(at(1), loc("10.0.0.9:54324"), &req.ack(3000));
        events(&mut r);
        r.set_local(Some(loc("10.0.7.1:54324")));
        assert_eq!(r.state(&p), Some(RegistrationState::Registering));
        let s = sent(&mut r, at(500));
        assert_eq!(s.len(), 1);
        // Same instance token (so the router replaces the old locator), new request.
        assert_eq!(s[0].1.instance, req.instance);
        assert_ne!(s[0].1.request_id, req.request_id);
        r.handle_answer(at(510), loc("10.0.0.9:54324"), &s[0].1.ack(3000));
        assert_eq!(events(&mut r).len(), 1);
    }

    #[test]
    fn a_new_router_gets_everything_and_the_old_one_unregisters() {
        let mut r = registrar();
        let (a, b) = (prefix("a.test"), prefix("b.test"));
        r.register(a, 1, 0);
        r.register(b, 1, 0);
        let reqs = sent(&mut r, at(0));
        assert_eq!(reqs.len(), 2);
        r.set_router(Some(loc("10.0.0.8:54324")));
        let s = sent(&mut r, at(1));
        let to_old: Vec<_> = s
            .iter()
            .filter(|(d, _)| *d == loc("10.0.0.9:54324"))
            .map(|(_, m)| m.ty)
            .collect();
        let to_new: Vec<_> = s
            .iter()
            .filter(|(d, _)| *d == loc("10.0.0.8:54324"))
            .map(|(_, m)| m.ty)
            .collect();
        assert_eq!(to_old, [MessageType::Unregister; 2]);
        assert_eq!(to_new, [MessageType::Register; 2]);
        // Without a router nothing is sent, and the entries wait.
        r.set_router(None);
        let s = sent(&mut r, at(2));
        assert!(
            s.iter()
                .all(|(d, m)| *d == loc("10.0.0.8:54324") && m.ty == MessageType::Unregister)
        );
        assert_eq!(r.state(&a), Some(RegistrationState::Registering));
    }

    /// [`run`] with each message's destination.
    fn run_to(
        r: &mut Registrar,
        from: Instant,
        until: Instant,
    ) -> Vec<(Instant, Locator, RegistrationRepr)> {
        let mut out = Vec::new();
        let mut now = from;
        loop {
            r.handle_timeout(now);
            out.extend(sent(r, now).into_iter().map(|(d, m)| (now, d, m)));
            match r.poll_timeout() {
                Some(t) if t <= until => now = t.max(now),
                _ => return out,
            }
        }
    }

    #[test]
    fn a_silent_router_hands_every_registration_to_the_next_within_the_lease() {
        let (a, b) = (loc("10.0.0.9:54324"), loc("10.0.0.8:54324"));
        let mut r = registrar_with(vec![a, b]);
        let p = prefix("web.test");
        r.register(p, 2, 0);
        let req = sent(&mut r, at(0))[0];
        assert_eq!(req.0, a);
        r.handle_answer(at(1), a, &req.1.ack(3000));
        events(&mut r);
        // A dies: the refresh at 1001 ms goes unanswered (retransmitted to A), and one
        // refresh period later everything is asked of B, long before the lease ends at 3000.
        let s = run_to(&mut r, at(1), at(2500));
        let first_to_b = s.iter().find(|(_, d, _)| *d == b).unwrap();
        assert_eq!(first_to_b.0, at(2001));
        assert_eq!(first_to_b.2.ty, MessageType::Register);
        assert_eq!(first_to_b.2.weight, 2);
        assert!(
            s.iter()
                .all(|(t, d, m)| m.ty == MessageType::Register && (*d == a) == (*t < at(2001)))
        );
        assert_eq!(
            events(&mut r),
            [RegistrarEvent::FailedOver { from: a, to: b }]
        );
        assert_eq!(r.router(), Some(b));
        assert_eq!(r.stats().failovers, 1);
        // Still registered (A's lease runs until 3000) while B answers; a late answer from A
        // is ignored.
        assert!(!r.handle_answer(at(2002), a, &first_to_b.2.ack(3000)));
        assert!(r.handle_answer(at(2003), b, &first_to_b.2.ack(3000)));
        assert!(matches!(
            r.state(&p),
            Some(RegistrationState::Registered { .. })
        ));
        assert!(events(&mut r).is_empty(), "no flap of the state");
        // Refreshes go on at B; nothing goes back to A, and A never gets an UNREGISTER.
        let s = run_to(&mut r, at(2003), at(3100));
        assert!(!s.is_empty() && s.iter().all(|(_, d, _)| *d == b));
    }

    #[test]
    fn with_every_router_silent_the_registrar_cycles_and_the_lease_runs_out() {
        let (a, b) = (loc("10.0.0.9:54324"), loc("10.0.0.8:54324"));
        let mut r = registrar_with(vec![a, b]);
        let p = prefix("web.test");
        r.register(p, 1, 0);
        // Nobody answers from the start: A, then B after 1 s, then A again.
        let s = run_to(&mut r, at(0), at(2500));
        let dests: Vec<Locator> = s.iter().map(|(_, d, _)| *d).collect();
        assert_eq!(dests.first(), Some(&a));
        let switch: Vec<(Instant, Locator)> = s
            .windows(2)
            .filter(|w| w[0].1 != w[1].1)
            .map(|w| (w[1].0, w[1].1))
            .collect();
        assert_eq!(switch, [(at(1000), b), (at(2000), a)]);
        assert_eq!(r.stats().failovers, 2);
        // The current router is kept when the list changes but still holds it.
        r.set_routers(vec![b, a]);
        assert_eq!(r.router(), Some(a));
        assert!(sent(&mut r, at(2500)).iter().all(|(d, _)| *d == a));
    }

    #[test]
    fn a_weight_change_sends_a_new_request_and_the_same_one_does_not() {
        let mut r = registrar();
        let p = prefix("web.test");
        r.register(p, 1, 0);
        let req = sent(&mut r, at(0))[0].1;
        r.handle_answer(at(1), loc("10.0.0.9:54324"), &req.ack(3000));
        r.register(p, 1, 0);
        assert!(sent(&mut r, at(2)).is_empty());
        r.register(p, 5, 0);
        let s = sent(&mut r, at(3));
        assert_eq!(s[0].1.weight, 5);
        // Still registered (the old lease holds) while the change is acknowledged.
        assert!(matches!(
            r.state(&p),
            Some(RegistrationState::Registered { .. })
        ));
    }

    #[test]
    fn without_a_local_address_nothing_goes_out_but_timers_run() {
        let mut r = Registrar::new(LeaseConfig::default(), 1, 1);
        r.set_router(Some(loc("10.0.0.9:54324")));
        let p = prefix("web.test");
        r.register(p, 1, 0);
        assert!(run(&mut r, at(0), at(5000)).is_empty());
        assert_eq!(r.state(&p), Some(RegistrationState::Unreachable));
        r.set_local(Some(loc("10.0.0.1:1")));
        assert_eq!(sent(&mut r, at(5001)).len(), 1);
    }
}

#[cfg(test)]
mod cookie_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serval_wire::ServiceId;

    fn loc(s: &str) -> Locator {
        s.parse().unwrap()
    }

    fn at(ms: u64) -> Instant {
        Instant::from_nanos(ms * 1_000_000)
    }

    fn sent(r: &mut Registrar, now: Instant) -> Vec<(Locator, RegistrationRepr)> {
        std::iter::from_fn(|| r.poll_transmit(now)).collect()
    }

    fn key() -> PrivateKey {
        // A fixed PKCS#8 v2 document (seed 7…7 and its public key), as ring writes them.
        let pair = ring_pair();
        PrivateKey::from_pkcs8(&pair).unwrap()
    }

    fn ring_pair() -> Vec<u8> {
        use ring::signature::KeyPair as _;
        let seed = [7u8; 32];
        let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
        let mut der = vec![
            0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend_from_slice(&seed);
        der.extend_from_slice(&[0x81, 0x21, 0x00]);
        der.extend_from_slice(pair.public_key().as_ref());
        der
    }

    #[test]
    fn a_cookie_answer_sends_the_same_request_again_with_it_and_signed() {
        let router = loc("10.0.0.9:54324");
        let mut r = Registrar::new(LeaseConfig::default(), 0xabcd, 100);
        r.set_routers(vec![router]);
        r.set_local(Some(loc("10.0.0.1:54324")));
        r.set_key(Some(key()));
        let p = ServicePrefix::exact(ServiceId::from_name("web.test").unwrap());
        r.register(p, 1, 0);
        let first = sent(&mut r, at(0))[0].1;
        // The 140-byte form, an empty cookie, a valid signature.
        assert_eq!(first.packet_len(), 160);
        assert_eq!(first.cookie, Some(Cookie::EMPTY));
        assert!(serval_keys::verify_registration(&key().public_key(), &first).is_ok());
        // COOKIE: at once, the same request ID with the cookie, signed again.
        let c = Cookie([5; 16]);
        assert!(r.handle_answer(at(10), router, &first.cookie_answer(c)));
        assert_eq!(r.poll_timeout(), Some(at(10)));
        let again = sent(&mut r, at(10));
        assert_eq!(again.len(), 1);
        let again = again[0].1;
        assert_eq!(again.request_id, first.request_id);
        assert_eq!(again.cookie, Some(c));
        assert!(serval_keys::verify_registration(&key().public_key(), &again).is_ok());
        assert_eq!(r.stats().cookies, 1);
        // The ACK hands out a fresher cookie, which the refresh uses.
        let fresh = Cookie([6; 16]);
        let ack = RegistrationRepr {
            cookie: Some(fresh),
            ..again.ack(3000)
        };
        assert!(r.handle_answer(at(20), router, &ack));
        let refresh = sent(&mut r, at(1020));
        assert_eq!(refresh[0].1.cookie, Some(fresh));
        // A router answering COOKIE forever is followed only MAX_COOKIE_ROUNDS times.
        for i in 0..MAX_COOKIE_ROUNDS + 2 {
            r.handle_answer(
                at(1021),
                router,
                &refresh[0].1.cookie_answer(Cookie([i as u8 + 9; 16])),
            );
        }
        assert_eq!(r.stats().cookie_rounds_exceeded, 2);
        // A new local locator drops the cookies.
        r.set_local(Some(loc("10.0.0.2:54324")));
        assert_eq!(sent(&mut r, at(1022))[0].1.cookie, Some(Cookie::EMPTY));
    }

    #[test]
    fn each_prefix_keeps_its_own_cookie() {
        let router = loc("10.0.0.9:54324");
        let mut r = Registrar::new(LeaseConfig::default(), 1, 1);
        r.set_routers(vec![router]);
        r.set_local(Some(loc("10.0.0.1:54324")));
        let (a, b) = (
            ServicePrefix::exact(ServiceId::from_name("a.test").unwrap()),
            ServicePrefix::exact(ServiceId::from_name("b.test").unwrap()),
        );
        r.register(a, 1, 0);
        r.register(b, 1, 0);
        let first = sent(&mut r, at(0));
        assert_eq!(first.len(), 2);
        for (_, m) in &first {
            let c = Cookie([if m.prefix == a { 0xa } else { 0xb }; 16]);
            r.handle_answer(at(1), router, &m.cookie_answer(c));
        }
        let again = sent(&mut r, at(1));
        assert_eq!(again.len(), 2);
        for (_, m) in &again {
            let want = Cookie([if m.prefix == a { 0xa } else { 0xb }; 16]);
            assert_eq!(m.cookie, Some(want), "{m}");
            r.handle_answer(at(2), router, &m.ack(3000));
        }
        // Refreshes need no second round: each carries its own prefix's cookie.
        let refresh = sent(&mut r, at(1002));
        assert_eq!(refresh.len(), 2);
        for (_, m) in &refresh {
            let want = Cookie([if m.prefix == a { 0xa } else { 0xb }; 16]);
            assert_eq!(m.cookie, Some(want), "{m}");
        }
        assert_eq!(r.stats().cookies, 2);
        // Once b is unregistered (and that acknowledged), its cookie is forgotten.
        for (_, m) in &refresh {
            r.handle_answer(at(1003), router, &m.ack(3000));
        }
        r.unregister(&b);
        let unreg = sent(&mut r, at(1004));
        assert_eq!(unreg[0].1.cookie, Some(Cookie([0xb; 16])));
        r.handle_answer(at(1005), router, &unreg[0].1.ack(0));
        assert_eq!(r.cookies.len(), 1);
    }

    #[test]
    fn an_unregister_follows_a_cookie_answer() {
        let router = loc("10.0.0.9:54324");
        let mut r = Registrar::new(LeaseConfig::default(), 1, 1);
        r.set_routers(vec![router]);
        r.set_local(Some(loc("10.0.0.1:54324")));
        let p = ServicePrefix::exact(ServiceId::from_name("web.test").unwrap());
        r.register(p, 1, 0);
        let req = sent(&mut r, at(0))[0].1;
        assert_eq!(req.packet_len(), 96);
        r.handle_answer(at(1), router, &req.ack(3000));
        r.unregister(&p);
        let unreg = sent(&mut r, at(2))[0].1;
        let c = Cookie([3; 16]);
        assert!(r.handle_answer(at(3), router, &unreg.cookie_answer(c)));
        let again = sent(&mut r, at(3));
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].1.ty, MessageType::Unregister);
        assert_eq!(again[0].1.cookie, Some(c));
        assert!(r.handle_answer(at(4), router, &again[0].1.ack(0)));
        assert_eq!(r.poll_timeout(), None);
    }
}
