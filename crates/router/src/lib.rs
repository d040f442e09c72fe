//! The Serval service router.
//!
//! A router resolves the first packet of each connection (the SYN) by service name and forwards
//! it to an instance, then steps off the data path: the instance answers the client directly
//! and data never crosses the router (DESIGN.md §4). It learns instances from their
//! registrations (`docs/wire.md` §11) and keeps them in a [`Registry`].
//!
//! ```text
//!  instance ──REGISTER/UNREGISTER──▶ Router ──put/delete──▶ Registry (memory or etcd)
//!           ◀──────ACK/REJECT───────   │                        │
//!                                      │◀────── Subscription ───┘ (Reset / Put / Delete)
//!                                      ▼
//!  client ──SYN by name──▶ service table (FORWARD targets) ──SYN + SOURCE──▶ instance
//! ```
//!
//! # Design
//!
//! The router is a [`serval::Endpoint`] with no listeners: the runtime gives it batched UDP
//! I/O and timers, and the engine already forwards SYNs (and datagrams by name) by its
//! service table — longest-prefix match, the table's consistent per-flow choice of instance,
//! SOURCE appended, loops and exhausted hop limits dropped, unknown names NACKed so the client
//! fails fast. That path runs entirely in the endpoint's receive task and never touches this
//! crate. What the router adds is the control plane, in two tasks:
//!
//! * **requests**: registration requests from the endpoint
//!   ([`serval::Endpoint::serve_registrations`]) are spread over a few workers by (prefix,
//!   instance token), so one instance's requests stay in order while a slow registry write
//!   does not hold up the others. Each is decided by the [`Policy`] (accepted prefixes, TTL
//!   clamped to `[min_ttl, max_ttl]`, a registration limit), written to the registry
//!   (`put` for the granted TTL, `delete`), and answered (ACK with the granted TTL, or REJECT).
//!   A REGISTER carrying the instance token of a registration of the same prefix at another
//!   locator replaces it: the instance moved.
//! * **table**: the registry [`Subscription`](serval_registry::Subscription) is applied to the
//!   endpoint's service table — a `Reset` rebuilds it in one batch, `Put`/`Delete` add or
//!   remove one FORWARD target with its weight and priority — so the table always equals the
//!   registry, whichever router wrote it (with etcd, any number of routers share it).
//!
//! Two checks come before the policy (`docs/security.md`):
//!
//! * **return routability**: a request is handled only if it echoes a cookie this router
//!   issued for its observed source, instance token and prefix ([`serval_keys::cookie`]);
//!   otherwise the dispatcher answers COOKIE at once (no larger than the request, no state
//!   kept), and a forged source address never sees the cookie. Every ACK carries a fresh one;
//! * **authorisation**: under a prefix the router holds an authorised key for
//!   ([`RouterConfig::authorize`], and with etcd every router's), a request must be signed by
//!   such a key, or it is refused with REJECT `UNAUTHORIZED` and counted.
//!
//! Floods cost counters, not memory: requests beyond the queues are dropped and counted, and
//! the engine bounds what it queues to send. Counters ([`Router::stats`]) and the registration
//! list with leases ([`Router::registrations`]) are public, for an admin or metrics layer.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod admin;
mod policy;
mod sync;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serval::{Endpoint, EndpointConfig, RegistrationRequest, RegistrationRequests};
use serval_keys::PublicKey;
use serval_keys::cookie::{COOKIE_SLOT, CookieJar, SECRET_LEN};
use serval_registry::{Authorization, Change, Health, Leased, RegistrationKey, Registry};
use serval_table::{Action, TableSnapshot, Target};
use serval_wire::{Locator, RejectReason, ServicePrefix};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use policy::{Decision, Policy};
/// Keys, key files and signed registrations (the `serval-keys` crate), for the router's users.
pub use serval_keys as keys;

use crate::sync::TableSync;

/// Configuration of a [`Router`].
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// UDP addresses to listen on (port 0 picks one).
    pub listen: Vec<Locator>,
    /// Where registrations are kept.
    pub registry: Registry,
    /// What registrations are accepted, and for how long.
    pub policy: Policy,
    /// The endpoint's protocol settings.
    pub endpoint: EndpointConfig,
    /// Workers answering registration requests (each handles its share in order).
    pub workers: usize,
    /// Requests queued per worker before more are dropped and counted.
    pub worker_queue: usize,
    /// Parent routers to register [`RouterConfig::announce`] with (hierarchy): the first,
    /// then the next if it stops answering (parents that share one registry). The one in use
    /// is also this router's default route: SYNs for names no rule here covers climb to it.
    /// Empty: no parent.
    pub parents: Vec<Locator>,
    /// The prefixes this router answers for. With a parent, each is registered there (from
    /// this router's locator, leases refreshed like an instance's), so the parent forwards
    /// their SYNs here. With or without one, a SYN for a name under them that no instance
    /// serves is NACKed here rather than sent up (where it would come straight back).
    /// [`RouterConfig::with_parent`] fills it from the policy's accepted prefixes.
    pub announce: Vec<ServicePrefix>,
    /// Keys authorised for prefixes: a registration under one of these prefixes is accepted
    /// only when signed by a key authorised for a prefix covering it. Published to the
    /// registry (with etcd, every router on it enforces the union it sees). Empty: every
    /// prefix open.
    pub authorize: Vec<(ServicePrefix, PublicKey)>,
    /// Keep the service table's anchor index ([`serval_table::ServiceTable::set_anchor_index`]):
    /// lookups in tables of a million rules 2–3× faster, for up to about 65 bytes more per rule.
    pub anchor_index: bool,
}

impl RouterConfig {
    /// Listens on `listen` with an in-memory registry and the default policy.
    pub fn new(listen: Vec<Locator>) -> RouterConfig {
        RouterConfig {
            listen,
            registry: Registry::memory(),
            policy: Policy::default(),
            endpoint: EndpointConfig {
                // A router serves every client: one flooding address must not take it.
                syn_rate_limit: Some(serval::SynRateLimit::default()),
                ..EndpointConfig::default()
            },
            workers: 4,
            worker_queue: 1024,
            parents: Vec::new(),
            announce: Vec::new(),
            authorize: Vec::new(),
            anchor_index: false,
        }
    }

    /// Registers with `parent`, announcing `announce`, or if that is empty the prefixes the
    /// policy accepts (what this router's instances may register is what it routes for).
    /// Announcing every name (`/0`: a policy accepting everything and no `announce`) would
    /// make this router answer for the whole name space and never climb, so that is an error.
    pub fn with_parent(
        self,
        parent: Locator,
        announce: Vec<ServicePrefix>,
    ) -> Result<RouterConfig, RouterError> {
        self.with_parents(vec![parent], announce)
    }

    /// [`RouterConfig::with_parent`] with several parents that share one registry: announced
    /// through the first, and through the next if it stops answering.
    pub fn with_parents(
        mut self,
        parents: Vec<Locator>,
        announce: Vec<ServicePrefix>,
    ) -> Result<RouterConfig, RouterError> {
        let announce = if announce.is_empty() {
            self.policy.accept.clone()
        } else {
            announce
        };
        if announce.is_empty() || announce.iter().any(ServicePrefix::is_default) {
            return Err(RouterError::AnnounceEverything);
        }
        self.parents = parents;
        self.announce = announce;
        Ok(self)
    }
}

/// Why a router could not start.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// No address to listen on.
    #[error("a router needs at least one address to listen on")]
    NoListenAddress,
    /// A parent router was given but nothing to announce to it, or the whole name space.
    #[error(
        "a router with a parent must announce prefixes narrower than every name (--announce, or --accept)"
    )]
    AnnounceEverything,
    /// A socket could not be bound.
    #[error("cannot bind {addrs}: {source}")]
    Bind {
        /// The addresses asked for.
        addrs: String,
        /// Why.
        source: io::Error,
    },
}

/// Counters of a [`Router`]; see [`Router::stats`]. Monotonic except `registrations` and
/// `authorizations`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouterStats {
    /// Registrations held now (as this router's replica of the registry knows them).
    pub registrations: u64,
    /// REGISTERs acknowledged, refreshes included.
    pub registrations_accepted: u64,
    /// Of those, the ones that created a registration (not a refresh).
    pub registrations_created: u64,
    /// REGISTERs refused: prefix not accepted here.
    pub rejected_not_accepted: u64,
    /// REGISTERs refused: the registration limit was reached.
    pub rejected_limit: u64,
    /// REGISTERs refused: the registry could not be written.
    pub rejected_unavailable: u64,
    /// Requests refused: under an authorised prefix and not signed by its key.
    pub rejected_unauthorized: u64,
    /// Requests in the original 60-byte form, refused: no room for a cookie.
    pub rejected_cookie_required: u64,
    /// COOKIE answers sent: requests without a valid cookie (first contact, an old cookie,
    /// or a forged source address).
    pub cookies_sent: u64,
    /// Authorisations held now (own and, with etcd, every router's).
    pub authorizations: u64,
    /// Authorisations from the registry skipped because their key line does not parse.
    pub authorizations_malformed: u64,
    /// UNREGISTERs handled.
    pub unregistrations: u64,
    /// Registrations replaced by one of the same instance at a new locator.
    pub moved: u64,
    /// Registrations that disappeared without an UNREGISTER or move through this router
    /// (their lease ran out, or, with a shared registry, another router removed them).
    pub expired: u64,
    /// Registration requests dropped because the queues were full (a flood).
    pub requests_dropped: u64,
    /// Registration messages that did not parse.
    pub registrations_malformed: u64,
    /// Datagrams received.
    pub received: u64,
    /// Datagrams that did not parse (registration messages included).
    pub malformed: u64,
    /// SYNs (and datagrams by name) forwarded to an instance.
    pub syns_forwarded: u64,
    /// SYNs answered with a NACK: no registration serves the name.
    pub syns_nacked: u64,
    /// SYNs dropped: hop limit reached, a forwarding loop, or the send queue full.
    pub syns_dropped: u64,
    /// SYNs dropped because their client address exceeded its rate
    /// (`EndpointConfig::syn_rate_limit`).
    pub syns_rate_limited: u64,
    /// SYNs held by a DELAY rule now.
    pub syns_held_now: u64,
    /// SYNs a DELAY rule has held (retransmissions of a held SYN not counted).
    pub syns_held: u64,
    /// Held SYNs released with a `resolve` verdict.
    pub delay_resolved: u64,
    /// Held SYNs released with a `drop` verdict (client NACKed).
    pub delay_dropped: u64,
    /// Held SYNs that got no verdict in time (client NACKed).
    pub delay_timeouts: u64,
    /// SYNs a DELAY rule could not hold because the queue was full (dropped silently).
    pub delay_overflows: u64,
}

impl RouterStats {
    /// REGISTERs refused, for any reason.
    pub fn registrations_rejected(&self) -> u64 {
        self.rejected_not_accepted
            + self.rejected_limit
            + self.rejected_unavailable
            + self.rejected_unauthorized
            + self.rejected_cookie_required
    }
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    created: AtomicU64,
    rejected_not_accepted: AtomicU64,
    rejected_limit: AtomicU64,
    rejected_unavailable: AtomicU64,
    rejected_unauthorized: AtomicU64,
    rejected_cookie_required: AtomicU64,
    cookies_sent: AtomicU64,
    authorizations_malformed: AtomicU64,
    unregistrations: AtomicU64,
    moved: AtomicU64,
    expired: AtomicU64,
    dropped: AtomicU64,
}

fn bump(c: &AtomicU64) -> u64 {
    c.fetch_add(1, Ordering::Relaxed) + 1
}

/// State the tasks share.
struct Inner {
    endpoint: Endpoint,
    registry: Registry,
    policy: Policy,
    counters: Counters,
    sync: Mutex<TableSync>,
    /// (prefix, instance token) → where that instance registered the prefix, to recognise a
    /// moved instance.
    instances: Mutex<HashMap<(ServicePrefix, u64), Locator>>,
    /// Registrations this router deleted and whose removal it has not seen yet (so that it is
    /// not counted as an expiry).
    deleting: Mutex<std::collections::HashSet<RegistrationKey>>,
    /// Whether this router announces its prefixes to a parent (with the weight it holds).
    has_parents: bool,
    /// This router's cookie secrets.
    cookies: Mutex<CookieJar>,
    /// When the router started (cookie slots count from here).
    started: tokio::time::Instant,
    /// The authorisations enforced: the router's own and the registry's.
    auth: std::sync::RwLock<Arc<Vec<(ServicePrefix, PublicKey)>>>,
}

/// A fresh cookie secret; `None` if the system's random source fails (then the old secret
/// stays in use a while longer).
fn secret() -> Option<[u8; SECRET_LEN]> {
    use ring::rand::SecureRandom as _;
    let mut s = [0u8; SECRET_LEN];
    ring::rand::SystemRandom::new().fill(&mut s).ok()?;
    Some(s)
}

impl Inner {
    /// The cookie jar, moved on to the current slot.
    fn jar(&self) -> MutexGuard<'_, CookieJar> {
        let mut jar = lock(&self.cookies);
        let slot = (self.started.elapsed().as_secs() / COOKIE_SLOT.as_secs()) as u32;
        if slot > jar.slot()
            && let Some(s) = secret()
        {
            jar.advance(slot, s);
        }
        jar
    }

    fn authorizations(&self) -> Arc<Vec<(ServicePrefix, PublicKey)>> {
        self.auth
            .read()
            .map(|a| a.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Why `req` is not authorised: `Some(the authorised prefix it falls under, or covers)`,
    /// or `None` if it may go on.
    fn unauthorized(&self, r: &serval::RegistrationRepr) -> Option<ServicePrefix> {
        let auths = self.authorizations();
        // The most specific authorised prefix covering it names the refusal.
        let mut covering: Vec<&(ServicePrefix, PublicKey)> =
            auths.iter().filter(|(p, _)| p.covers(&r.prefix)).collect();
        if covering.is_empty() {
            // A prefix that would capture an authorised one (`*` over `web.test`) is refused.
            return auths
                .iter()
                .find(|(p, _)| r.prefix.covers(p))
                .map(|(p, _)| *p);
        }
        covering.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        let signed = covering
            .iter()
            .any(|(_, k)| serval_keys::verify_registration(k, r).is_ok());
        if signed {
            None
        } else {
            covering.first().map(|(p, _)| *p)
        }
    }
}

/// Applies `change` to the table, then tells the parent (if any) the new aggregate weight and
/// best priority of each announced prefix the change touched. Returns the removed keys.
fn apply(inner: &Inner, change: Change) -> Vec<RegistrationKey> {
    let (removed, announce) = {
        let mut sync = lock(&inner.sync);
        let removed = sync.apply(change);
        (removed, sync.take_announcements())
    };
    if inner.has_parents {
        for (prefix, weight, priority) in announce {
            inner.endpoint.announce(prefix, weight, priority);
        }
    }
    removed
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; keep the data if something ever did.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running service router; see the [crate docs](crate). Dropping it stops it.
pub struct Router {
    inner: Arc<Inner>,
    locators: Vec<Locator>,
    /// Requests the runtime dropped before the dispatcher saw them (mirrored by it).
    runtime_dropped: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("locators", &self.locators)
            .finish_non_exhaustive()
    }
}

impl Router {
    /// Binds the router's sockets and starts serving. Must run inside a tokio runtime.
    pub async fn bind(config: RouterConfig) -> Result<Router, RouterError> {
        if config.listen.is_empty() {
            return Err(RouterError::NoListenAddress);
        }
        let endpoint = Endpoint::bind_with(&config.listen, config.endpoint.clone())
            .await
            .map_err(|source| RouterError::Bind {
                addrs: config
                    .listen
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                source,
            })?;
        let locators = endpoint.local_locators();
        let requests = endpoint.serve_registrations();
        if config.anchor_index {
            endpoint.table().set_anchor_index(true);
        }
        let mut table_sync = TableSync::new(endpoint.table().clone());
        for p in &config.announce {
            table_sync.add_authoritative(*p);
        }
        if !config.parents.is_empty() {
            for p in &config.announce {
                endpoint.announce(*p, 1, 0);
            }
            // Registers the announced prefixes there and makes it the default route.
            endpoint.set_routers(config.parents.clone());
            tracing::info!(
                parent = %config.parents.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                announce = %config.announce.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                "registering with parent router"
            );
        }
        let inner = Arc::new(Inner {
            sync: Mutex::new(table_sync),
            endpoint,
            registry: config.registry.clone(),
            policy: config.policy.clone(),
            counters: Counters::default(),
            instances: Mutex::new(HashMap::new()),
            deleting: Mutex::new(std::collections::HashSet::new()),
            has_parents: !config.parents.is_empty(),
            cookies: Mutex::new(CookieJar::new(0, secret().unwrap_or([0x5a; SECRET_LEN]))),
            started: tokio::time::Instant::now(),
            auth: std::sync::RwLock::new(Arc::new(config.authorize.clone())),
        });
        // Publish our authorisations, then enforce the union of ours and the registry's.
        let mut tasks = Vec::new();
        for (prefix, key) in &config.authorize {
            let a = Authorization {
                prefix: *prefix,
                key: key.to_line(),
            };
            if let Err(e) = inner.registry.authorize(a.clone()).await {
                // A registry not reachable yet (a router starting before etcd answers tries
                // once per member): enforce it here, and keep publishing it for the others.
                tracing::warn!(%prefix, error = %e, "cannot publish an authorisation to the registry yet; enforcing it here, retrying");
                tasks.push(tokio::spawn(publish_authorization(inner.clone(), a)));
            }
            tracing::info!(%prefix, key = %key, "registrations under this prefix must be signed by this key");
        }
        tasks.push(tokio::spawn(follow_authorizations(
            inner.clone(),
            config.authorize.clone(),
        )));
        // The table follows the registry from its first Reset on.
        let subscription = inner.registry.subscribe();
        tasks.push(tokio::spawn(follow_registry(inner.clone(), subscription)));
        let workers = config.workers.max(1);
        let mut queues = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (tx, rx) = mpsc::channel(config.worker_queue.max(1));
            queues.push(tx);
            tasks.push(tokio::spawn(worker(inner.clone(), rx)));
        }
        let runtime_dropped = Arc::new(AtomicU64::new(0));
        tasks.push(tokio::spawn(dispatch(
            inner.clone(),
            requests,
            queues,
            runtime_dropped.clone(),
        )));
        tracing::info!(
            locators = %locators.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            "router listening"
        );
        Ok(Router {
            inner,
            locators,
            runtime_dropped,
            tasks,
        })
    }

    /// The locators the router listens on (what instances and clients use as their router).
    pub fn locators(&self) -> &[Locator] {
        &self.locators
    }

    /// The router's endpoint (its service table, its engine counters).
    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    /// The registry it writes and follows.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The registration policy.
    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// The service table as it is now.
    pub fn table(&self) -> TableSnapshot {
        self.inner.endpoint.table().snapshot()
    }

    /// Every live registration with the time left on its lease (from the registry; see
    /// [`Leased::expires_in`] for what an etcd registry can tell).
    pub fn registrations(&self) -> Vec<Leased> {
        self.inner.registry.snapshot()
    }

    /// How this router's announcements fare at its parent router (empty without one).
    pub fn parent_registrations(&self) -> Vec<serval::RegistrationStatus> {
        self.inner.endpoint.registration_status()
    }

    /// Whether the registry is serving fresh data.
    pub fn registry_health(&self) -> Health {
        self.inner.registry.health()
    }

    /// Counters, for logs and metrics.
    pub fn stats(&self) -> RouterStats {
        let c = &self.inner.counters;
        let e = self.inner.endpoint.stats();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RouterStats {
            registrations: lock(&self.inner.sync).len() as u64,
            registrations_accepted: get(&c.accepted),
            registrations_created: get(&c.created),
            rejected_not_accepted: get(&c.rejected_not_accepted),
            rejected_limit: get(&c.rejected_limit),
            rejected_unavailable: get(&c.rejected_unavailable),
            rejected_unauthorized: get(&c.rejected_unauthorized),
            rejected_cookie_required: get(&c.rejected_cookie_required),
            cookies_sent: get(&c.cookies_sent),
            authorizations: self.inner.authorizations().len() as u64,
            authorizations_malformed: get(&c.authorizations_malformed),
            unregistrations: get(&c.unregistrations),
            moved: get(&c.moved),
            expired: get(&c.expired),
            requests_dropped: get(&c.dropped) + get(&self.runtime_dropped),
            registrations_malformed: e.registrations_malformed,
            received: e.received,
            malformed: e.malformed,
            syns_forwarded: e.forwarded,
            syns_nacked: e.nacks_sent,
            syns_dropped: e.hop_limit_drops + e.transmit_queue_drops,
            syns_rate_limited: e.syns_rate_limited,
            syns_held_now: e
                .delayed
                .saturating_sub(e.delay_resolved + e.delay_dropped + e.delay_timeouts),
            syns_held: e.delayed,
            delay_resolved: e.delay_resolved,
            delay_dropped: e.delay_dropped,
            delay_timeouts: e.delay_timeouts,
            delay_overflows: e.delay_overflows,
        }
    }

    /// SYNs held by DELAY rules now, oldest first (see [`serval::Endpoint::held_syns`]).
    pub fn held_syns(&self) -> Vec<serval::DelayedSyn> {
        self.inner.endpoint.held_syns()
    }

    /// Answers a held SYN: `Resolve` looks its name up again now (after a rule was added or
    /// an instance registered), `Drop` NACKs the client.
    pub fn release(
        &self,
        id: serval::HeldSynId,
        verdict: serval::Verdict,
    ) -> Result<(), serval::ReleaseError> {
        let r = self.inner.endpoint.release(id, verdict);
        if r.is_ok() {
            tracing::info!(%id, ?verdict, "held SYN released");
        }
        r
    }

    /// Adds a static rule beside the registrations (kept when the registry resets).
    pub fn add_rule(&self, prefix: ServicePrefix, target: Target) -> Result<(), String> {
        lock(&self.inner.sync)
            .add_static(prefix, target)
            .map_err(|e| e.to_string())
    }

    /// Removes a static rule; `false` if there was none.
    pub fn remove_rule(&self, prefix: ServicePrefix, action: Action) -> bool {
        lock(&self.inner.sync).remove_static(prefix, action)
    }

    /// Stops the router: its tasks end and its sockets close. Established connections between
    /// clients and instances are not affected (they never crossed the router).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Spreads requests over the workers by (prefix, instance), so each instance's requests for a
/// prefix are handled in order.
async fn dispatch(
    inner: Arc<Inner>,
    mut requests: RegistrationRequests,
    queues: Vec<mpsc::Sender<RegistrationRequest>>,
    runtime_dropped: Arc<AtomicU64>,
) {
    loop {
        let next = tokio::select! {
            r = requests.recv() => r,
            // Mirror the runtime's drop count now and then even when idle.
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                runtime_dropped.store(requests.dropped(), Ordering::Relaxed);
                continue;
            }
        };
        runtime_dropped.store(requests.dropped(), Ordering::Relaxed);
        let Some(req) = next else { return };
        if !returns_routable(&inner, &req) {
            continue;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (req.request.prefix, req.request.instance).hash(&mut h);
        let i = (h.finish() % queues.len() as u64) as usize;
        if queues[i].try_send(req).is_err() {
            let n = bump(&inner.counters.dropped);
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped = n,
                    "registration requests dropped: the router cannot keep up (flood?)"
                );
            }
        }
    }
}

/// Whether `req` echoes a cookie this router issued for its source, instance and prefix. If
/// not, answers it (COOKIE with a fresh one, or REJECT `COOKIE_REQUIRED` for a 60-byte request
/// that has no room for one) and counts it: no state is kept for it.
fn returns_routable(inner: &Inner, req: &RegistrationRequest) -> bool {
    let r = &req.request;
    let Some(cookie) = r.cookie else {
        let n = bump(&inner.counters.rejected_cookie_required);
        if n <= 16 || n.is_power_of_two() {
            tracing::warn!(prefix = %r.prefix, from = %req.from, rejected = n, "registration refused: 60-byte request with no room for a cookie (an older instance?)");
        }
        inner
            .endpoint
            .answer_registration(req, &r.reject(RejectReason::COOKIE_REQUIRED));
        return false;
    };
    let jar = inner.jar();
    if jar.check(&cookie, &req.from, r.instance, &r.prefix) {
        return true;
    }
    let fresh = jar.issue(&req.from, r.instance, &r.prefix);
    drop(jar);
    bump(&inner.counters.cookies_sent);
    inner
        .endpoint
        .answer_registration(req, &r.cookie_answer(fresh));
    false
}

/// Publishes `a` to the registry until it is stored (every 100 ms at first, backing off to
/// every 5 s).
async fn publish_authorization(inner: Arc<Inner>, a: Authorization) {
    let mut wait = Duration::from_millis(100);
    loop {
        tokio::time::sleep(wait).await;
        match inner.registry.authorize(a.clone()).await {
            Ok(()) => {
                tracing::info!(prefix = %a.prefix, "authorisation published to the registry");
                return;
            }
            Err(e) => {
                tracing::debug!(prefix = %a.prefix, error = %e, "publishing an authorisation")
            }
        }
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

/// Keeps [`Inner::auth`] the union of `own` and the registry's authorisations.
async fn follow_authorizations(inner: Arc<Inner>, own: Vec<(ServicePrefix, PublicKey)>) {
    let mut rx = inner.registry.authorizations();
    loop {
        let shared: Vec<Authorization> = rx.borrow_and_update().clone();
        let mut all = own.clone();
        for a in shared {
            match PublicKey::parse_line(&a.key) {
                Ok(k) => all.push((a.prefix, k)),
                Err(e) => {
                    bump(&inner.counters.authorizations_malformed);
                    tracing::warn!(prefix = %a.prefix, error = %e, "skipping a malformed authorisation from the registry");
                }
            }
        }
        all.sort();
        all.dedup();
        let changed = {
            let mut cur = inner.auth.write().unwrap_or_else(|e| e.into_inner());
            let changed = **cur != all;
            *cur = Arc::new(all.clone());
            changed
        };
        if changed {
            tracing::info!(
                authorizations = all.len(),
                "authorisations updated from the registry"
            );
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Handles one share of the requests, in order.
async fn worker(inner: Arc<Inner>, mut rx: mpsc::Receiver<RegistrationRequest>) {
    while let Some(req) = rx.recv().await {
        handle(&inner, req).await;
    }
}

async fn handle(inner: &Inner, req: RegistrationRequest) {
    let r = req.request;
    let key = RegistrationKey {
        prefix: r.prefix,
        locator: req.from,
    };
    if let Some(authorized) = inner.unauthorized(&r) {
        let n = bump(&inner.counters.rejected_unauthorized);
        if n <= 16 || n.is_power_of_two() {
            let what = if authorized.covers(&r.prefix) {
                format!("not signed by the key authorized for {authorized}")
            } else {
                format!("the prefix covers {authorized}, which needs its key")
            };
            tracing::warn!(prefix = %r.prefix, from = %req.from, rejected = n, "registration refused: {what}");
        }
        inner
            .endpoint
            .answer_registration(&req, &r.reject(RejectReason::UNAUTHORIZED));
        return;
    }
    let (exists, held) = {
        let s = lock(&inner.sync);
        (s.contains(&key), s.len())
    };
    let answer = match inner.policy.decide(req.from, &r, exists, held) {
        Decision::Reject(reason) => {
            let (counter, what) = match reason {
                RejectReason::LIMIT => {
                    (&inner.counters.rejected_limit, "registration limit reached")
                }
                _ => (
                    &inner.counters.rejected_not_accepted,
                    "prefix not accepted by this router",
                ),
            };
            let n = bump(counter);
            // Every rejection is counted; the log shows the first ones and then one per power
            // of two, so a flood cannot flood the log.
            if n <= 16 || n.is_power_of_two() {
                tracing::warn!(prefix = %r.prefix, from = %req.from, rejected = n, "registration rejected: {what}");
            }
            r.reject(reason)
        }
        Decision::Put { registration, ttl } => {
            // The same instance registered this prefix elsewhere: it moved.
            let old = lock(&inner.instances)
                .get(&(r.prefix, r.instance))
                .copied()
                .filter(|l| *l != req.from);
            if let Some(old) = old {
                let old_key = RegistrationKey {
                    prefix: r.prefix,
                    locator: old,
                };
                match delete(inner, old_key).await {
                    Ok(()) => {
                        bump(&inner.counters.moved);
                        tracing::info!(prefix = %r.prefix, from = %old, to = %req.from, "instance moved");
                    }
                    Err(e) => {
                        tracing::warn!(registration = %old_key, error = %e, "cannot remove moved instance's old registration");
                    }
                }
            }
            match inner.registry.put(registration, ttl).await {
                Ok(()) => {
                    // Into the table now, not when the subscription gets there: the next SYN
                    // (and the next limit check) sees it. The subscription's copy is a no-op.
                    apply(inner, Change::Put(registration));
                    lock(&inner.instances).insert((r.prefix, r.instance), req.from);
                    bump(&inner.counters.accepted);
                    if exists {
                        tracing::debug!(registration = %key, "registration refreshed");
                    } else {
                        bump(&inner.counters.created);
                        tracing::info!(
                            registration = %key,
                            weight = registration.weight,
                            priority = registration.priority,
                            ttl_ms = ttl.as_millis() as u64,
                            "registered"
                        );
                    }
                    r.ack(policy::ttl_ms(ttl))
                }
                Err(e) => {
                    let n = bump(&inner.counters.rejected_unavailable);
                    if n <= 16 || n.is_power_of_two() {
                        tracing::warn!(registration = %key, error = %e, rejected = n, "registration rejected: registry unavailable");
                    }
                    r.reject(RejectReason::UNAVAILABLE)
                }
            }
        }
        Decision::Delete(key) => {
            lock(&inner.instances).retain(|(p, _), l| !(*p == key.prefix && *l == key.locator));
            if let Err(e) = delete(inner, key).await {
                // The lease expires anyway; the instance has nothing better to do than stop
                // asking, so it is acknowledged regardless.
                tracing::warn!(registration = %key, error = %e, "cannot delete registration; it will expire");
            }
            bump(&inner.counters.unregistrations);
            if exists {
                tracing::info!(registration = %key, "unregistered");
            }
            r.ack(0)
        }
    };
    // Every ACK carries a fresh cookie, so a registered instance never needs a COOKIE round.
    let answer = match (answer.ty, r.cookie) {
        (serval::MessageType::Ack, Some(_)) => serval::RegistrationRepr {
            cookie: Some(inner.jar().issue(&req.from, r.instance, &r.prefix)),
            ..answer
        },
        _ => answer,
    };
    inner.endpoint.answer_registration(&req, &answer);
}

/// Deletes `key` from the registry and the table, so that its removal is not mistaken for an
/// expiry when the subscription reports it (whichever gets there first).
async fn delete(inner: &Inner, key: RegistrationKey) -> Result<(), serval_registry::RegistryError> {
    lock(&inner.deleting).insert(key);
    let r = inner.registry.delete(&key).await;
    // Under the `deleting` lock, as in `follow_registry`: whichever of the two removes the
    // key from the table also sees it marked as ours.
    let mut deleting = lock(&inner.deleting);
    if r.is_ok() {
        apply(inner, Change::Delete(key));
    }
    deleting.remove(&key);
    r
}

/// Applies the registry's changes to the service table, for as long as the registry lives.
async fn follow_registry(inner: Arc<Inner>, mut sub: serval_registry::Subscription) {
    while let Some(change) = sub.next().await {
        let reset = matches!(change, Change::Reset(_));
        // The table change and the look at `deleting` are one step (see `delete`): apart,
        // a delete finishing between them would be logged as an expiry.
        let mut deleting = lock(&inner.deleting);
        let removed = apply(&inner, change);
        for key in removed {
            let ours = deleting.remove(&key);
            lock(&inner.instances).retain(|(p, _), l| !(*p == key.prefix && *l == key.locator));
            if !ours && !reset {
                bump(&inner.counters.expired);
                tracing::info!(registration = %key, "registration expired");
            }
        }
        if reset {
            tracing::info!(
                registrations = lock(&inner.sync).len(),
                "service table rebuilt from the registry"
            );
        }
    }
    tracing::error!("registry subscription ended: the service table no longer follows it");
}
