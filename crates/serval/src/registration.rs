//! Registration with a service router (an instance's side) and serving registrations (a
//! router's side).
//!
//! An instance calls [`Endpoint::set_router`]: from then on every [`ServiceListener`] and
//! [`DatagramSocket`] of the endpoint is registered with the router, leases are refreshed in
//! the background, dropping a listener unregisters it at once, and the router becomes the
//! endpoint's default route. [`Endpoint::registrar_events`] reports how registrations fare.
//! With [`Endpoint::set_routers`] (several routers sharing one registry), registrations move
//! to the next router when the current one stops answering, and the default route with them.
//!
//! A router calls [`Endpoint::serve_registrations`] and answers each
//! [`RegistrationRequest`] with [`Endpoint::answer_registration`].
//!
//! [`ServiceListener`]: crate::ServiceListener
//! [`DatagramSocket`]: crate::DatagramSocket

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serval_engine::endpoint::{EndpointStats, RegistrationRequest};
use serval_engine::registrar::{LeaseConfig, RegistrarEvent, RegistrationState};
use serval_table::{Action, Target};
use serval_wire::{Locator, RegistrationRepr, ServicePrefix};
use tokio::sync::{broadcast, mpsc};

use crate::endpoint::{Endpoint, Shared};

/// Registration requests queued for the application before more are dropped (and counted in
/// [`RegistrationRequests::dropped`]).
pub const REQUEST_QUEUE: usize = 4096;

/// The runtime's side of registration, kept in the endpoint's state.
pub(crate) struct Hub {
    events: broadcast::Sender<RegistrarEvent>,
    requests: Option<mpsc::Sender<RegistrationRequest>>,
    dropped: Arc<AtomicU64>,
    /// Moves the default route when registrations fail over (with several routers).
    route_follower: Option<tokio::task::AbortHandle>,
}

impl Hub {
    pub(crate) fn new() -> Hub {
        Hub {
            events: broadcast::channel(256).0,
            requests: None,
            dropped: Arc::new(AtomicU64::new(0)),
            route_follower: None,
        }
    }

    /// A registrar event from the engine: logged, then broadcast.
    pub(crate) fn registrar_event(&self, e: RegistrarEvent) {
        match e {
            RegistrarEvent::Registered {
                prefix,
                router,
                ttl,
            } => tracing::info!(%prefix, %router, ttl_ms = ttl.as_millis() as u64, "registered"),
            RegistrarEvent::Rejected {
                prefix,
                router,
                reason,
            } => tracing::warn!(%prefix, %router, %reason, "registration rejected"),
            RegistrarEvent::Unreachable { prefix, router } => {
                tracing::warn!(%prefix, %router, "router unreachable; still trying")
            }
            RegistrarEvent::FailedOver { from, to } => {
                tracing::warn!(%from, %to, "router stopped answering; registering with the next")
            }
        }
        let _ = self.events.send(e);
    }

    /// A request from the engine: queued for the application, or dropped and counted if the
    /// queue is full (a flood) or nobody serves registrations any more.
    pub(crate) fn request(&self, r: RegistrationRequest) {
        let queued = self
            .requests
            .as_ref()
            .is_some_and(|tx| tx.try_send(r).is_ok());
        if !queued {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            // One line per power of two: a flood is visible without flooding the log.
            if n.is_power_of_two() {
                tracing::warn!(dropped = n, "registration requests dropped (queue full)");
            }
        }
    }
}

/// A prefix this endpoint registers with its router, and how that stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistrationStatus {
    /// The prefix.
    pub prefix: ServicePrefix,
    /// The weight registered (the sum of the endpoint's listeners on the prefix).
    pub weight: u32,
    /// The priority registered (the highest of those listeners').
    pub priority: u32,
    /// Where it stands.
    pub state: RegistrationState,
}

/// Registration requests reaching a router endpoint; see [`Endpoint::serve_registrations`].
/// Dropping it stops serving registrations (later requests are dropped and counted by the
/// engine).
pub struct RegistrationRequests {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<RegistrationRequest>,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for RegistrationRequests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistrationRequests")
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

impl RegistrationRequests {
    /// The next request; `None` never happens while the endpoint lives. Cancel-safe.
    pub async fn recv(&mut self) -> Option<RegistrationRequest> {
        self.rx.recv().await
    }

    /// Requests dropped because [`REQUEST_QUEUE`] were waiting unread.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for RegistrationRequests {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.engine.set_serve_registrations(false);
        st.hub.requests = None;
    }
}

impl Endpoint {
    /// Uses `router` with the default lease (3 s, refreshed every second): see
    /// [`Endpoint::set_router_with`].
    pub fn set_router(&self, router: Locator) {
        self.set_router_with(router, LeaseConfig::default());
    }

    /// Uses `router` as this endpoint's service router: every listener and datagram socket,
    /// present and future, is registered with it (soft state with the lease of `lease`,
    /// refreshed in the background), dropping one unregisters it at once, and the router
    /// becomes the default route for connects by name (a `/0` FORWARD rule, replacing the
    /// previous router's). What a previous router held is unregistered there.
    pub fn set_router_with(&self, router: Locator, lease: LeaseConfig) {
        self.set_routers_with(vec![router], lease);
    }

    /// Uses several routers that share one registry, with the default lease: see
    /// [`Endpoint::set_routers_with`].
    pub fn set_routers(&self, routers: Vec<Locator>) {
        self.set_routers_with(routers, LeaseConfig::default());
    }

    /// Like [`Endpoint::set_router_with`] with several service routers that share one
    /// registry (etcd): registrations go through the first and, when it stops answering for a
    /// third of the lease, move to the next ([`RegistrarEvent::FailedOver`]), so a router's
    /// death loses no registration. The default route follows the router registrations go to.
    /// An empty list is [`Endpoint::clear_router`]. Following failovers needs a tokio runtime;
    /// outside one, the default route stays on the first router.
    pub fn set_routers_with(&self, routers: Vec<Locator>, lease: LeaseConfig) {
        if routers.is_empty() {
            self.clear_router();
            return;
        }
        let mut st = self.shared.lock();
        let old = st.engine.router();
        // Subscribed before the engine can fail over, so no switch is missed.
        let events = st.hub.events.subscribe();
        if let Some(follower) = st.hub.route_follower.take() {
            follower.abort();
        }
        if routers.len() > 1
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let table = self.table().clone();
            let task = rt.spawn(follow_failovers(events, table));
            st.hub.route_follower = Some(task.abort_handle());
        }
        st.engine.set_routers(routers, lease);
        let Some(router) = st.engine.router() else {
            return;
        };
        let discovery = st.discovery;
        drop(st);
        // A router always wins over routerless mode's rule to the discovery group.
        if let Some((group, _)) = discovery {
            self.table()
                .remove_target(&ServicePrefix::DEFAULT, &Action::Forward(group));
        }
        if let Some(old) = old.filter(|o| *o != router) {
            self.table()
                .remove_target(&ServicePrefix::DEFAULT, &Action::Forward(old));
        }
        let _ = self.table().add_target(
            ServicePrefix::DEFAULT,
            Target::new(Action::Forward(router), 0, 1),
        );
        self.shared.wake.notify_one();
    }

    /// Stops using a router: everything registered is unregistered there, and its default
    /// route removed.
    pub fn clear_router(&self) {
        let mut st = self.shared.lock();
        if let Some(follower) = st.hub.route_follower.take() {
            follower.abort();
        }
        let old = st.engine.router();
        let lease = st
            .engine
            .registrar()
            .map(|r| r.config().clone())
            .unwrap_or_default();
        st.engine.set_router(None, lease);
        drop(st);
        if let Some(old) = old {
            self.table()
                .remove_target(&ServicePrefix::DEFAULT, &Action::Forward(old));
        }
        self.shared.wake.notify_one();
    }

    /// Signs every registration request with `key` from now on (`None`: unsigned), so that a
    /// router holding that key's authorisation for the prefix (`serval router --authorize`)
    /// accepts them. Call it before or after [`Endpoint::set_router`]; registrations under
    /// way start over, signed. A refusal comes out as [`RegistrarEvent::Rejected`] with
    /// `RejectReason::UNAUTHORIZED`.
    pub fn set_registration_key(&self, key: Option<serval_engine::registrar::PrivateKey>) {
        self.shared.lock().engine.set_registration_key(key);
        self.shared.wake.notify_one();
    }

    /// Registers `prefix` with the router although no listener serves it on this endpoint
    /// (a child router announcing to its parent what it routes for; see
    /// `serval_engine::endpoint::Endpoint::announce`). Leases are refreshed like a listener's.
    pub fn announce(&self, prefix: ServicePrefix, weight: u32, priority: u32) {
        self.shared.lock().engine.announce(prefix, weight, priority);
        self.shared.wake.notify_one();
    }

    /// Stops announcing `prefix`: it is unregistered at once unless a listener serves it.
    pub fn withdraw(&self, prefix: &ServicePrefix) {
        self.shared.lock().engine.withdraw(prefix);
        self.shared.wake.notify_one();
    }

    /// The router this endpoint registers with (with several, the one in use now).
    pub fn router(&self) -> Option<Locator> {
        self.shared.lock().engine.router()
    }

    /// Every router given to [`Endpoint::set_routers`] (or the one of
    /// [`Endpoint::set_router`]).
    pub fn routers(&self) -> Vec<Locator> {
        let st = self.shared.lock();
        st.engine
            .registrar()
            .map(|r| r.routers().to_vec())
            .unwrap_or_default()
    }

    /// How registrations with the router fare (registered, rejected, router unreachable), as
    /// they change. Each event is also logged with `tracing`.
    pub fn registrar_events(&self) -> broadcast::Receiver<RegistrarEvent> {
        self.shared.lock().hub.events.subscribe()
    }

    /// Waits (at most `limit`) until no UNREGISTER is under way: a process about to exit after
    /// closing its listeners calls it so that its withdrawal reaches the router (through a
    /// cookie round, or a retransmission) instead of dying with it. Returns whether they all
    /// finished.
    pub async fn unregistered_within(&self, limit: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let busy = self
                .shared
                .lock()
                .engine
                .registrar()
                .is_some_and(|r| r.unregistering());
            if !busy {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Every prefix registered (or being registered) with the router.
    pub fn registration_status(&self) -> Vec<RegistrationStatus> {
        let st = self.shared.lock();
        st.engine
            .registrar()
            .map(|r| {
                r.registrations()
                    .map(|(prefix, weight, priority, state)| RegistrationStatus {
                        prefix,
                        weight,
                        priority,
                        state,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Makes this endpoint a registrar's counterpart (a service router): registration
    /// requests that reach it are queued (up to [`REQUEST_QUEUE`]; beyond that dropped and
    /// counted) for the returned receiver, to be answered with
    /// [`Endpoint::answer_registration`]. Calling it again replaces the previous receiver.
    pub fn serve_registrations(&self) -> RegistrationRequests {
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        let mut st = self.shared.lock();
        st.engine.set_serve_registrations(true);
        st.hub.requests = Some(tx);
        let dropped = st.hub.dropped.clone();
        drop(st);
        RegistrationRequests {
            shared: self.shared.clone(),
            rx,
            dropped,
        }
    }

    /// Sends `answer` (an ACK or REJECT of `req.request`) to where `req` came from. Returns
    /// `false` if it does not answer `req` or the send queue is full.
    pub fn answer_registration(
        &self,
        req: &RegistrationRequest,
        answer: &RegistrationRepr,
    ) -> bool {
        let sent = self.shared.lock().engine.answer_registration(req, answer);
        if sent {
            self.shared.wake.notify_one();
        }
        sent
    }

    /// The engine's counters (packets received, malformed, SYNs forwarded and NACKed, …).
    pub fn stats(&self) -> EndpointStats {
        self.shared.lock().engine.stats()
    }
}

/// Moves the default route (a `/0` FORWARD rule) from a router that stopped answering to the
/// one registrations failed over to, until the endpoint's router set changes or it closes.
async fn follow_failovers(
    mut events: broadcast::Receiver<RegistrarEvent>,
    table: Arc<serval_table::ServiceTable>,
) {
    loop {
        match events.recv().await {
            Ok(RegistrarEvent::FailedOver { from, to }) => {
                table.remove_target(&ServicePrefix::DEFAULT, &Action::Forward(from));
                let _ = table.add_target(
                    ServicePrefix::DEFAULT,
                    Target::new(Action::Forward(to), 0, 1),
                );
            }
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
