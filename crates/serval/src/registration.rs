//! Registration with a service router (an instance's side) and serving registrations (a
//! router's side).
//!
//! An instance calls [`Endpoint::set_router`]: from then on every [`ServiceListener`] and
//! [`DatagramSocket`] of the endpoint is registered with the router, leases are refreshed in
//! the background, dropping a listener unregisters it at once, and the router becomes the
//! endpoint's default route. [`Endpoint::registrar_events`] reports how registrations fare.
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
}

impl Hub {
    pub(crate) fn new() -> Hub {
        Hub {
            events: broadcast::channel(256).0,
            requests: None,
            dropped: Arc::new(AtomicU64::new(0)),
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
        let mut st = self.shared.lock();
        let old = st.engine.router();
        st.engine.set_router(Some(router), lease);
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

    /// The router this endpoint registers with.
    pub fn router(&self) -> Option<Locator> {
        self.shared.lock().engine.router()
    }

    /// How registrations with the router fare (registered, rejected, router unreachable), as
    /// they change. Each event is also logged with `tracing`.
    pub fn registrar_events(&self) -> broadcast::Receiver<RegistrarEvent> {
        self.shared.lock().hub.events.subscribe()
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
