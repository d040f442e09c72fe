//! The etcd backend: registrations are leased keys ([key layout](crate::codec)), and every
//! handle keeps a full local replica by listing the key prefix and then watching it from the
//! listed revision.
//!
//! # Replica states
//!
//! ```text
//!            list ok (Reset)               stream broke after running
//!  Listing ─────────────────▶ Watching ───────────────────────────────▶ Resuming
//!     ▲  │ list failed            │ ▲                resume ok (no Reset) │
//!     │  ▼                        │ └───────────────────────────────────┘
//!  Degraded ◀──── watch could not be opened ──────────────────────────────┘
//!     │  (backoff, then list again: Reset)
//!     └─ a watch cancelled because its revision was compacted, a different cluster
//!        answering, or a member behind the replica's revision, goes straight back to
//!        Listing (after a backoff if the watch ran for less than a second).
//! ```
//!
//! * **Listing**: paged reads of the prefix, all at the revision the first page returned, so
//!   the pages form one consistent picture however long the list takes (the next page is
//!   requested while the last is decoded); the replica is replaced at once and subscribers
//!   get a [`Change::Reset`]. Health becomes [`Health::Synced`]. Pages are large (100 000
//!   keys) because etcd 3.4 scans every key left in the range for each page.
//! * **Watching**: from the listed revision + 1, so no event between list and watch is lost.
//! * **Resuming**: a stream that broke after running (a member died, a connection reset) is
//!   reopened once, on the next member, from the revision after the last event applied —
//!   nothing lost, no Reset. If that fails the replica is **Degraded**: health says so with the
//!   error, a warning is logged, snapshots and subscriptions keep serving what the replica had,
//!   and the handle retries with exponential backoff (with jitter), listing again when etcd
//!   answers.
//!
//! # Writes
//!
//! Each registration has its own lease. [`put`](EtcdRegistry::put) of a registration the
//! replica already holds with the same weight, priority and TTL sends one LeaseKeepAlive for
//! the lease the replica saw on the key, so any router can refresh a registration whichever
//! router wrote it. Otherwise (new, changed, or its lease gone) it grants a new lease, puts the
//! key with it, and revokes the lease the key had before. [`delete`](EtcdRegistry::delete)
//! revokes the key's lease when the key is the lease's only one (which deletes the key in the
//! same step), and otherwise deletes the key alone. Every request is bounded by
//! [`EtcdConfig::request_timeout`] ([`EtcdConfig::list_timeout`] for list pages) and fails
//! over to the next member on error; writes wait (boundedly) for the replica to reflect them,
//! so a handle reads its own writes.

mod auth;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serval_etcd::pb::{self, Event as PbEvent, KeyValue as PbKeyValue};
use serval_etcd::{Client, Options, Watch, prefix_end};
use tokio::sync::{broadcast, oneshot, watch};
use tokio::time::{Instant, sleep, timeout};

use crate::codec::{KeySpace, Value, ttl_secs};
use crate::{
    Change, Health, Leased, Registration, RegistrationKey, Registry, RegistryError, RegistryStats,
    Subscription,
};

/// Changes buffered per subscriber before it must start over from a snapshot.
const CHANGE_BUFFER: usize = 4096;
/// The largest gRPC message accepted from etcd (a page of a list, a batch of watch events).
const MAX_MESSAGE: usize = 64 << 20;
/// Distinct malformed keys remembered so that each is logged only once.
const BAD_KEYS_LOGGED: usize = 1024;
/// A watch that ran at least this long is resumed at once when it breaks; one that broke
/// sooner waits a backoff first, so a flapping member cannot make the replica spin.
const WATCH_HEALTHY_AFTER: Duration = Duration::from_secs(1);
/// Default key prefix when the URL gives none.
const DEFAULT_PREFIX: &str = "/serval";

/// How to reach etcd, where registrations live in it, and how patient to be with it.
///
/// [`EtcdConfig::from_url`] gives the defaults listed on each field; change fields before
/// [`Registry::etcd`] to tune them.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EtcdConfig {
    /// Client addresses of the cluster's members, `HOST:PORT` (`[V6ADDR]:PORT` for IPv6).
    /// Requests go to the member that last answered and move on to the next when it fails.
    pub endpoints: Vec<String>,
    /// Key prefix: registrations live under `<prefix>/v1/reg/` (default `/serval`; empty for
    /// none).
    pub prefix: String,
    /// Longest one operation may take, retries on other members included (default 2 s).
    /// `put` and `delete` return [`RegistryError::Unavailable`] after at most this long.
    pub request_timeout: Duration,
    /// Longest reading one page of a list may take, retries included (default 30 s): etcd
    /// 3.4 takes seconds for a large page when the prefix holds a million keys.
    pub list_timeout: Duration,
    /// Longest opening a connection to one member may take (default 1 s).
    pub connect_timeout: Duration,
    /// HTTP/2 ping interval, and how long a ping may go unanswered before the connection is
    /// dropped (default 3 s): how soon a member that went silent without closing its
    /// connections is noticed.
    pub keepalive: Duration,
    /// First pause before trying an unreachable etcd again (default 100 ms); doubles after
    /// each failure up to [`retry_max`](EtcdConfig::retry_max).
    pub retry_min: Duration,
    /// Longest pause between tries (default 2 s).
    pub retry_max: Duration,
    /// Keys read per request when listing (default 100 000: etcd 3.4 scans every key left
    /// in the range for each page, so small pages make a long list quadratic).
    pub page_size: u32,
    /// When etcd cannot be reached at start: `true` (the default) opens the registry anyway,
    /// [`Health::Degraded`] and empty, and keeps trying in the background (the first list is
    /// then a [`Change::Reset`]); `false` fails [`Registry::etcd`] instead.
    pub start_degraded: bool,
    /// A local file the replica is saved to (after each list, then every
    /// [`cache_every`](EtcdConfig::cache_every) while it changes) and started from: a cold
    /// start loads it and watches etcd from the saved revision on instead of listing
    /// everything, and lists only if etcd no longer has that history. Default none.
    pub cache: Option<std::path::PathBuf>,
    /// How often a changed replica is saved to [`cache`](EtcdConfig::cache) (default 30 s).
    pub cache_every: Duration,
}

impl EtcdConfig {
    /// The configuration an `etcd://` URL describes, with default timeouts.
    ///
    /// The form is `etcd://HOST:PORT[,HOST:PORT…][/PREFIX]`: one or more member client
    /// addresses (IPv6 in brackets), then optionally a key prefix. `etcd://h:2379/serval`
    /// and `etcd://h:2379` both keep registrations under `/serval/v1/reg/`;
    /// `etcd://h:2379/lab/a` under `/lab/a/v1/reg/`; `etcd://h:2379/` under `/v1/reg/`.
    /// Connections are plain HTTP/2 (no TLS, no authentication).
    pub fn from_url(url: &str) -> Result<EtcdConfig, RegistryError> {
        let bad = || RegistryError::BadUrl(url.to_owned());
        let rest = url.strip_prefix("etcd://").ok_or_else(bad)?;
        if rest
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b"?#@\\".contains(&b))
        {
            return Err(bad());
        }
        let (hosts, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, DEFAULT_PREFIX),
        };
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            if !valid_endpoint(host) {
                return Err(bad());
            }
            endpoints.push(host.to_owned());
        }
        Ok(EtcdConfig {
            endpoints,
            prefix: prefix.to_owned(),
            ..EtcdConfig::new(Vec::new())
        })
    }

    /// A configuration for these member addresses (`HOST:PORT`), with the default prefix
    /// and timeouts.
    pub fn new(endpoints: Vec<String>) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            prefix: DEFAULT_PREFIX.to_owned(),
            request_timeout: Duration::from_secs(2),
            list_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(1),
            keepalive: Duration::from_secs(3),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(2),
            page_size: 100_000,
            start_degraded: true,
            cache: None,
            cache_every: Duration::from_secs(30),
        }
    }
}

/// `HOST:PORT` with a non-empty host (bracketed if it has colons) and a non-zero port.
fn valid_endpoint(text: &str) -> bool {
    let Some((host, port)) = text.rsplit_once(':') else {
        return false;
    };
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty() && !host.contains(':') && !host.contains('[') && !host.contains(']')
    };
    port_ok && host_ok
}

/// A handle's connection to etcd and its replica. Dropping it stops the replica task.
pub(crate) struct EtcdRegistry {
    shared: Arc<Shared>,
    task: tokio::task::AbortHandle,
    /// Follows the authorisations (`auth` module), publishing them here; started by the
    /// first use of them, so a registry that never asks pays nothing.
    auths: tokio::sync::watch::Sender<Vec<crate::Authorization>>,
    auth_task: std::sync::OnceLock<tokio::task::AbortHandle>,
    /// Saves the replica to the cache file, if there is one.
    saver: Option<tokio::task::AbortHandle>,
}

impl fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdRegistry")
            .field("endpoints", &self.shared.config.endpoints)
            .field("prefix", &self.shared.config.prefix)
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdRegistry {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(t) = self.auth_task.get() {
            t.abort();
        }
        if let Some(saver) = &self.saver {
            saver.abort();
        }
    }
}

/// One member's clients.
#[derive(Clone)]
struct Member {
    addr: String,
    client: Client,
}

/// What the replica task and the handle share.
struct Shared {
    config: EtcdConfig,
    keys: KeySpace,
    members: Vec<Member>,
    /// The member tried first.
    preferred: AtomicUsize,
    replica: Mutex<Replica>,
    changes: broadcast::Sender<Change>,
    /// The store revision the replica reflects.
    applied: watch::Sender<i64>,
    bad: Mutex<BadKeys>,
    malformed: AtomicU64,
    relists: AtomicU64,
    resumes: AtomicU64,
    compactions: AtomicU64,
    lists: AtomicU64,
    /// Told after each list, so the cache is saved at once.
    listed: tokio::sync::Notify,
}

#[derive(Debug)]
struct Replica {
    regs: HashMap<RegistrationKey, Entry>,
    health: Health,
    /// The cluster the replica was listed from.
    cluster_id: u64,
    /// Whether it was listed at least once.
    listed: bool,
}

/// A registration as the replica holds it.
#[derive(Clone, Copy, Debug)]
struct Entry {
    value: Value,
    registration: Registration,
    lease: i64,
}

#[derive(Debug, Default)]
struct BadKeys {
    logged: HashSet<Vec<u8>>,
    full: bool,
}

/// Why a request failed.
#[derive(Debug)]
enum OpError {
    /// The revision asked for was compacted away.
    Compacted,
    /// The lease is gone (expired or revoked).
    LeaseNotFound,
    /// Anything else: unreachable, timed out, no leader…
    Other(String),
}

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpError::Compacted => f.write_str("required revision has been compacted"),
            OpError::LeaseNotFound => f.write_str("lease not found"),
            OpError::Other(s) => f.write_str(s),
        }
    }
}

impl From<OpError> for RegistryError {
    fn from(e: OpError) -> Self {
        RegistryError::Unavailable(e.to_string())
    }
}

impl OpError {
    fn classify(addr: &str, e: &serval_etcd::Error) -> OpError {
        if e.is_compacted() {
            OpError::Compacted
        } else if e.is_lease_not_found() {
            OpError::LeaseNotFound
        } else {
            OpError::Other(format!("etcd {addr}: {e}"))
        }
    }
}

/// How a watch ended.
enum WatchEnd {
    /// List again at once (compacted revision, or another cluster answered).
    Relist(String),
    /// The stream failed; `running` if it had been established first.
    Broken { error: String, running: bool },
}

impl EtcdRegistry {
    /// Connects and lists the registrations. If the first list cannot be made, opens degraded
    /// and keeps trying ([`EtcdConfig::start_degraded`]), or fails.
    pub(crate) async fn connect(config: EtcdConfig) -> Result<EtcdRegistry, RegistryError> {
        if config.endpoints.is_empty() || config.page_size == 0 {
            return Err(RegistryError::BadUrl(format!(
                "etcd configuration with no endpoints or a page size of 0: {config:?}"
            )));
        }
        let options = Options::default()
            .with_connect_timeout(config.connect_timeout)
            .with_keepalive(config.keepalive)
            .with_require_leader(true)
            .with_max_message(MAX_MESSAGE);
        let mut members = Vec::new();
        for addr in &config.endpoints {
            // Connections are made lazily: this does not fail for a member that is down.
            let client = Client::connect_lazy(addr, &options)
                .map_err(|e| RegistryError::BadUrl(e.to_string()))?;
            members.push(Member {
                addr: addr.clone(),
                client,
            });
        }
        let shared = Arc::new(Shared {
            keys: KeySpace::new(&config.prefix),
            config,
            members,
            preferred: AtomicUsize::new(0),
            replica: Mutex::new(Replica {
                regs: HashMap::new(),
                health: Health::Degraded {
                    error: "not listed yet".into(),
                },
                cluster_id: 0,
                listed: false,
            }),
            changes: broadcast::channel(CHANGE_BUFFER).0,
            applied: watch::Sender::new(0),
            bad: Mutex::new(BadKeys::default()),
            malformed: AtomicU64::new(0),
            relists: AtomicU64::new(0),
            resumes: AtomicU64::new(0),
            compactions: AtomicU64::new(0),
            lists: AtomicU64::new(0),
            listed: tokio::sync::Notify::new(),
        });
        // From the cache, if there is a usable one: the watch then starts after its revision.
        let cached = shared.config.cache.as_deref().and_then(|path| {
            match crate::cache::load(path, &shared.config.prefix) {
                Ok(saved) => Some(shared.adopt_cache(saved)),
                Err(crate::cache::CacheError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                    None
                }
                Err(e) => {
                    tracing::warn!(cache = %path.display(), error = %e, "registry cache not used; listing etcd");
                    None
                }
            }
        });
        let (first_tx, first_rx) = oneshot::channel();
        let task = tokio::spawn(run(shared.clone(), first_tx, cached));
        let saver = shared
            .config
            .cache
            .clone()
            .map(|path| tokio::spawn(save_cache(shared.clone(), path)).abort_handle());
        match first_rx.await {
            Ok(Ok(())) => Ok(EtcdRegistry {
                shared,
                task: task.abort_handle(),
                auths: tokio::sync::watch::Sender::new(Vec::new()),
                auth_task: std::sync::OnceLock::new(),
                saver,
            }),
            Ok(Err(e)) => {
                task.abort();
                if let Some(saver) = saver {
                    saver.abort();
                }
                Err(RegistryError::Unavailable(format!(
                    "cannot list registrations: {e}"
                )))
            }
            Err(_) => Err(RegistryError::Unavailable("replica task ended".into())),
        }
    }

    /// Creates, changes or refreshes `reg` for `ttl` (rounded up to whole seconds).
    pub(crate) async fn put(&self, reg: Registration, ttl: Duration) -> Result<(), RegistryError> {
        let s = &self.shared;
        let value = Value {
            weight: reg.weight,
            priority: reg.priority,
            ttl_secs: ttl_secs(ttl),
        };
        let key = reg.key();
        let known = s.lock().regs.get(&key).copied();
        if let Some(e) = known
            && e.value == value
            && e.lease != 0
        {
            let lease = e.lease;
            let refreshed = s
                .call(|m| async move { m.client.lease_keep_alive(lease).await.map(drop) })
                .await;
            match refreshed {
                Ok(()) => return Ok(()),
                // Expired or replaced meanwhile: write it anew.
                Err(OpError::LeaseNotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let secs = i64::try_from(value.ttl_secs).unwrap_or(i64::MAX);
        let lease = s
            .call(|m| async move { m.client.lease_grant(secs).await })
            .await?
            .id;
        let (k, v) = (s.keys.key(&key), value.encode());
        let resp = s
            .call(|m| {
                let (k, v) = (k.clone(), v.clone());
                async move {
                    let req = pb::PutRequest {
                        key: k.into_bytes(),
                        value: v.into_bytes(),
                        lease,
                        prev_kv: true,
                    };
                    m.client.put(req).await
                }
            })
            .await?;
        if let Some(prev) = &resp.prev_kv
            && prev.lease != 0
            && prev.lease != lease
        {
            // The key's old lease carried only it: revoke it, so that a replica still
            // holding the old lease ID cannot "refresh" a lease that no longer keeps
            // anything alive.
            let old = prev.lease;
            if let Err(e) = s
                .call(|m| async move { m.client.lease_revoke(old).await })
                .await
            {
                tracing::debug!(lease = old, error = %e, "could not revoke a replaced lease");
            }
        }
        if let Some(h) = resp.header {
            s.wait_applied(h.revision).await;
        }
        Ok(())
    }

    /// Removes a registration (no-op if absent).
    pub(crate) async fn delete(&self, key: &RegistrationKey) -> Result<(), RegistryError> {
        let s = &self.shared;
        let k = s.keys.key(key);
        let got = s
            .call(|m| {
                let k = k.clone();
                async move { m.client.get(k).await }
            })
            .await?;
        let Some(kv) = got.kvs.first() else {
            return Ok(());
        };
        let (lease, mod_revision) = (kv.lease, kv.mod_revision);
        let mut sole_key = false;
        if lease != 0 {
            let ttl = s
                .call(|m| async move { m.client.lease_time_to_live(lease, true).await })
                .await?;
            if ttl.ttl < 0 {
                // The lease expired meanwhile, taking the key with it.
                return Ok(());
            }
            sole_key = ttl.keys.len() == 1 && ttl.keys[0] == k.as_bytes();
        }
        let revision = if sole_key {
            // Revoking deletes the key in the same step, so no replica can refresh the
            // lease after the key is gone.
            match s
                .call(|m| async move { m.client.lease_revoke(lease).await })
                .await
            {
                Ok(r) => r.header.map(|h| h.revision),
                Err(OpError::LeaseNotFound) => None,
                Err(e) => return Err(e.into()),
            }
        } else {
            // Not leased, or the lease is shared with keys that are not ours: delete the
            // key alone, unless it was written again meanwhile (that write wins).
            let txn = pb::TxnRequest {
                compare: vec![pb::Compare::mod_revision_is(k.clone(), mod_revision)],
                success: vec![pb::RequestOp::delete(k.clone())],
                failure: Vec::new(),
            };
            let r = s
                .call(|m| {
                    let txn = txn.clone();
                    async move { m.client.txn(txn).await }
                })
                .await?;
            r.header.map(|h| h.revision)
        };
        if let Some(rev) = revision {
            s.wait_applied(rev).await;
        }
        Ok(())
    }

    pub(crate) fn snapshot(&self) -> Vec<Leased> {
        let mut v: Vec<Leased> = self
            .shared
            .lock()
            .regs
            .values()
            .map(|e| Leased {
                registration: e.registration,
                expires_in: Duration::from_secs(e.value.ttl_secs),
            })
            .collect();
        v.sort_by_key(|l| l.registration.key());
        v
    }

    pub(crate) fn subscribe(&self, registry: Registry) -> Subscription {
        // Subscribe and read the set under one lock, so no change falls between them.
        let st = self.shared.lock();
        let rx = self.shared.changes.subscribe();
        let mut all: Vec<Registration> = st.regs.values().map(|e| e.registration).collect();
        drop(st);
        all.sort_unstable_by_key(Registration::key);
        Subscription {
            registry,
            first: Some(all),
            rx,
        }
    }

    pub(crate) fn health(&self) -> Health {
        self.shared.lock().health.clone()
    }

    /// Writes an authorisation (see the `auth` module).
    pub(crate) async fn authorize(&self, a: crate::Authorization) -> Result<(), RegistryError> {
        self.follow_authorizations();
        auth::put(&self.shared, a).await
    }

    /// The authorisations etcd holds, as the follower sees them.
    pub(crate) fn authorizations(&self) -> tokio::sync::watch::Receiver<Vec<crate::Authorization>> {
        self.follow_authorizations();
        self.auths.subscribe()
    }

    /// Starts the authorisation follower, once (it needs a tokio runtime; outside one it
    /// starts at the next call from inside one).
    fn follow_authorizations(&self) {
        if self.auth_task.get().is_some() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let _ = self.auth_task.get_or_init(|| {
                rt.spawn(auth::follow(self.shared.clone(), self.auths.clone()))
                    .abort_handle()
            });
        }
    }

    pub(crate) fn stats(&self) -> RegistryStats {
        let s = &self.shared;
        RegistryStats {
            malformed: s.malformed.load(Ordering::Relaxed),
            relists: s.relists.load(Ordering::Relaxed),
            watch_resumes: s.resumes.load(Ordering::Relaxed),
            compactions: s.compactions.load(Ordering::Relaxed),
            lists: s.lists.load(Ordering::Relaxed),
        }
    }
}

impl Shared {
    /// Fills the replica from a saved one; returns the revision to watch from. Health stays
    /// degraded ("from cache") until the watch from there opens.
    fn adopt_cache(&self, saved: crate::cache::Saved) -> i64 {
        let mut regs = HashMap::with_capacity(saved.kvs.len());
        for (key, value, lease) in saved.kvs {
            let kv = PbKeyValue {
                key,
                value,
                lease,
                ..Default::default()
            };
            if let Ok(Some((key, entry))) = self.decode(&kv) {
                regs.insert(key, entry);
            }
        }
        tracing::info!(
            registrations = regs.len(),
            revision = saved.revision,
            "registry replica loaded from its cache; catching up with etcd from there"
        );
        let mut st = self.lock();
        st.regs = regs;
        st.cluster_id = saved.cluster_id;
        st.health = Health::Degraded {
            error: format!(
                "loaded from cache at revision {}, not yet confirmed by etcd",
                saved.revision
            ),
        };
        drop(st);
        self.applied.send_replace(saved.revision);
        saved.revision + 1
    }

    fn lock(&self) -> MutexGuard<'_, Replica> {
        // Nothing panics while holding the lock; recover the data if something ever did.
        self.replica
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn is_degraded(&self) -> bool {
        matches!(self.lock().health, Health::Degraded { .. })
    }

    /// Runs `op` on the preferred member, then on the next ones while it fails, until it
    /// succeeds or [`EtcdConfig::request_timeout`] has passed; when etcd is already known to
    /// be unreachable, gives up after one try per member instead. Errors that another member
    /// would repeat (compacted revision, lease not found) are returned at once.
    async fn call<T, F, Fut>(&self, op: F) -> Result<T, OpError>
    where
        F: FnMut(Member) -> Fut,
        Fut: Future<Output = Result<T, serval_etcd::Error>>,
    {
        self.call_with(self.is_degraded(), self.config.request_timeout, op)
            .await
    }

    /// [`call`](Shared::call) within `budget`, giving up after one try per member if
    /// `one_round`.
    async fn call_with<T, F, Fut>(
        &self,
        one_round: bool,
        budget: Duration,
        mut op: F,
    ) -> Result<T, OpError>
    where
        F: FnMut(Member) -> Fut,
        Fut: Future<Output = Result<T, serval_etcd::Error>>,
    {
        let n = self.members.len();
        let deadline = Instant::now() + budget;
        // With several members, one silent member must not use the whole budget.
        let per_try = if n > 1 { budget / 2 } else { budget };
        let mut idx = self.preferred.load(Ordering::Relaxed) % n;
        let mut tries = 0;
        loop {
            let member = &self.members[idx];
            let left = deadline.saturating_duration_since(Instant::now());
            let err = match timeout(left.min(per_try), op(member.clone())).await {
                Ok(Ok(v)) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok(v);
                }
                Ok(Err(e)) => match OpError::classify(&member.addr, &e) {
                    OpError::Other(s) => s,
                    definite => return Err(definite),
                },
                Err(_) => format!(
                    "etcd {}: no answer within {:?}",
                    member.addr,
                    left.min(per_try)
                ),
            };
            tries += 1;
            idx = (idx + 1) % n;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || (one_round && tries >= n) {
                return Err(OpError::Other(err));
            }
            if tries % n == 0 {
                // Every member failed once (no leader yet, say): pause before the next round.
                sleep(left.min(Duration::from_millis(100))).await;
            }
        }
    }

    /// Waits (boundedly) until the replica reflects revision `rev`; not at all while the
    /// replica is degraded, since it will not catch up before it lists again.
    async fn wait_applied(&self, rev: i64) {
        if self.is_degraded() {
            return;
        }
        let mut rx = self.applied.subscribe();
        let _ = timeout(self.config.request_timeout, rx.wait_for(|r| *r >= rev)).await;
    }

    fn degrade(&self, error: &str) {
        let mut st = self.lock();
        if st.health == Health::Synced {
            tracing::warn!(
                %error,
                registrations = st.regs.len(),
                "etcd unreachable: serving the last known registrations until it returns"
            );
        } else {
            tracing::debug!(%error, "etcd still unreachable");
        }
        st.health = Health::Degraded {
            error: error.to_owned(),
        };
    }

    /// Counts a malformed record and logs its key the first time it is seen.
    fn malformed(&self, key: &[u8], why: &str) {
        self.malformed.fetch_add(1, Ordering::Relaxed);
        let mut bad = self
            .bad
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if bad.logged.len() < BAD_KEYS_LOGGED {
            if bad.logged.insert(key.to_vec()) {
                tracing::warn!(
                    key = %String::from_utf8_lossy(key),
                    why,
                    "skipping a malformed registration found in etcd"
                );
            }
        } else if !bad.full {
            bad.full = true;
            tracing::warn!(
                "more than {BAD_KEYS_LOGGED} malformed registration keys in etcd: \
                 further ones are skipped and counted but not logged"
            );
        }
    }

    /// The registration a stored key-value holds; `Err` with the key if the key is ours
    /// but its value is malformed; `Ok(None)` if the key itself is malformed.
    fn decode(&self, kv: &PbKeyValue) -> Result<Option<(RegistrationKey, Entry)>, RegistrationKey> {
        let Some(key) = self.keys.parse_key(&kv.key) else {
            self.malformed(
                &kv.key,
                "key is not <prefix>/v1/reg/<service prefix>/<locator>",
            );
            return Ok(None);
        };
        let Some(value) = Value::decode(&kv.value) else {
            self.malformed(
                &kv.key,
                "value is not `v1 w=<weight> p=<priority> ttl=<secs>`",
            );
            return Err(key);
        };
        Ok(Some((
            key,
            Entry {
                value,
                registration: value.registration(key),
                lease: kv.lease,
            },
        )))
    }

    /// Lists every registration at one revision; returns it and the cluster's ID.
    ///
    /// The first page reads the whole key space. If more is left, the rest is not read page
    /// after page: etcd 3.4 walks every key left in the range for each page, which makes a
    /// long list quadratic. It is split instead ([`split_rest`]) into ranges cut where the
    /// keys read so far start to differ, read at the same revision [`LIST_CONCURRENCY`] at a
    /// time; a range that still has more is split again the same way. Each page read keeps
    /// all its keys, so every request brings a page of new keys or ends a range.
    async fn list_once(&self) -> Result<(HashMap<RegistrationKey, Entry>, i64, u64), OpError> {
        use futures_util::stream::{FuturesUnordered, StreamExt};

        let prefix = self.keys.reg_prefix().as_bytes().to_vec();
        let end = prefix_end(&prefix);
        let mut first = self.page(prefix, &end, 0).await?;
        let h = first.header.take().unwrap_or_default();
        // Every later page reads at the first page's revision.
        let (revision, cluster_id) = (h.revision, h.cluster_id);
        let mut regs =
            HashMap::with_capacity(usize::try_from(first.count).unwrap_or(0).min(1 << 24));
        let mut todo = Vec::new();
        let mut reading = FuturesUnordered::new();
        let mut done = Some((first, end));
        loop {
            if let Some((page, end)) = done.take() {
                if page.more
                    && let (Some(lo), Some(hi)) = (page.kvs.first(), page.kvs.last())
                {
                    todo.extend(split_rest(&lo.key, &hi.key, &end));
                }
                for kv in &page.kvs {
                    if let Ok(Some((key, entry))) = self.decode(kv) {
                        regs.insert(key, entry);
                    }
                }
            }
            while reading.len() < LIST_CONCURRENCY
                && let Some((start, end)) = todo.pop()
            {
                reading.push(async move {
                    let page = self.page(start, &end, revision).await;
                    page.map(|p| (p, end))
                });
            }
            match reading.next().await {
                Some(page) => done = Some(page?),
                None => break,
            }
        }
        Ok((regs, revision, cluster_id))
    }

    /// One page of the registration keys from `start`, at `revision` (0: the newest).
    async fn page(
        &self,
        start: Vec<u8>,
        end: &[u8],
        revision: i64,
    ) -> Result<pb::RangeResponse, OpError> {
        let req = pb::RangeRequest {
            key: start,
            range_end: end.to_vec(),
            limit: i64::from(self.config.page_size),
            revision,
            ..Default::default()
        };
        self.call_with(self.is_degraded(), self.config.list_timeout, |m| {
            let req = req.clone();
            async move { m.client.range(req).await }
        })
        .await
    }

    /// Lists and replaces the replica (a Reset for subscribers); returns the revision.
    async fn list(&self) -> Result<i64, String> {
        if self.is_degraded() {
            // A member that is still starting can accept a read and hold it until it is
            // ready; a list page may take up to `list_timeout` (30 s), so first ask something
            // small within `request_timeout`, and back off and retry if it does not answer.
            let prefix = self.keys.reg_prefix().as_bytes().to_vec();
            let probe = pb::RangeRequest {
                range_end: prefix_end(&prefix),
                key: prefix,
                count_only: true,
                ..Default::default()
            };
            self.call(|m| {
                let probe = probe.clone();
                async move { m.client.range(probe).await }
            })
            .await
            .map_err(|e| e.to_string())?;
        }
        let mut tries = 0;
        let (regs, revision, cluster_id) = loop {
            match self.list_once().await {
                Ok(listed) => break listed,
                // Compacted between pages: start over at the newest revision.
                Err(OpError::Compacted) if tries < 3 => tries += 1,
                Err(e) => return Err(e.to_string()),
            }
        };
        let mut st = self.lock();
        // Only subscribers need the set as a Reset, and none can appear while the lock is
        // held; at a cold start there are none yet, and a sorted copy of a million
        // registrations that nobody reads cost a fifth of a second.
        let reset = (self.changes.receiver_count() > 0).then(|| {
            let mut all: Vec<Registration> = regs.values().map(|e| e.registration).collect();
            all.sort_unstable_by_key(Registration::key);
            all
        });
        self.lists.fetch_add(1, Ordering::Relaxed);
        if st.listed {
            // Counted before subscribers hear of it.
            self.relists.fetch_add(1, Ordering::Relaxed);
            if st.health != Health::Synced {
                tracing::info!(
                    registrations = regs.len(),
                    revision,
                    "etcd reachable again: registrations listed afresh"
                );
            }
        } else {
            tracing::info!(
                registrations = regs.len(),
                revision,
                "registrations listed from etcd"
            );
        }
        st.listed = true;
        st.regs = regs;
        st.cluster_id = cluster_id;
        st.health = Health::Synced;
        if let Some(all) = reset {
            let _ = self.changes.send(Change::Reset(all));
        }
        self.applied.send_replace(revision);
        self.listed.notify_one();
        Ok(revision)
    }

    /// Applies watched events in order; returns the revision of the last one.
    fn apply(&self, events: Vec<PbEvent>) -> Option<i64> {
        let mut last = None;
        let mut st = self.lock();
        for ev in events {
            let Some(kv) = ev.kv else { continue };
            last = Some(kv.mod_revision);
            let gone = match ev.r#type {
                // Put
                0 => match self.decode(&kv) {
                    Ok(Some((key, entry))) => {
                        let old = st.regs.insert(key, entry);
                        // A new lease or TTL for the same registration is not a change.
                        if old.map(|o| o.registration) != Some(entry.registration) {
                            let _ = self.changes.send(Change::Put(entry.registration));
                        }
                        None
                    }
                    // Overwritten with garbage: the registration it held is gone.
                    Err(key) => Some(key),
                    Ok(None) => None,
                },
                // Delete (a malformed key's deletion is of nothing we hold).
                1 => self.keys.parse_key(&kv.key),
                other => {
                    self.malformed(&kv.key, &format!("unknown watch event type {other}"));
                    None
                }
            };
            if let Some(key) = gone
                && st.regs.remove(&key).is_some()
            {
                let _ = self.changes.send(Change::Delete(key));
            }
        }
        drop(st);
        if let Some(rev) = last {
            self.applied.send_replace(rev);
        }
        last
    }

    /// Opens a watch from `start` on the preferred member (moving on while members fail).
    /// With `resuming`, one try per member: a resume that fails means etcd is unreachable,
    /// and the replica should say so rather than retry for the whole request timeout.
    async fn open_watch(&self, start: i64, resuming: bool) -> Result<Watch, WatchEnd> {
        let prefix = self.keys.reg_prefix().as_bytes().to_vec();
        let req = pb::WatchCreateRequest {
            range_end: prefix_end(&prefix),
            key: prefix,
            start_revision: start,
            ..Default::default()
        };
        let cluster_id = self.lock().cluster_id;
        let opened = self
            .call_with(
                resuming || self.is_degraded(),
                self.config.request_timeout,
                |m| {
                    let req = req.clone();
                    async move {
                        let mut stream = m.client.watch(req).await?;
                        // Wait for etcd to confirm the watch.
                        let first = stream.message().await?.ok_or(serval_etcd::Error::Closed)?;
                        Ok((stream, first))
                    }
                },
            )
            .await;
        let (stream, first) = match opened {
            Ok(o) => o,
            Err(e) => {
                return Err(WatchEnd::Broken {
                    error: e.to_string(),
                    running: false,
                });
            }
        };
        if first.canceled {
            return Err(self.cancelled(first.compact_revision, &first.cancel_reason, false));
        }
        let h = first.header.unwrap_or_default();
        if h.cluster_id != 0 && h.cluster_id != cluster_id {
            return Err(WatchEnd::Relist(format!(
                "cluster ID changed from {cluster_id:x} to {:x}",
                h.cluster_id
            )));
        }
        if h.revision < start - 1 {
            return Err(WatchEnd::Relist(format!(
                "etcd's revision {} is behind the replica's {}",
                h.revision,
                start - 1
            )));
        }
        // A watch from the replica's revision confirms it (this is how a replica loaded from
        // the cache becomes Synced without a list).
        {
            let mut st = self.lock();
            if st.health != Health::Synced {
                st.health = Health::Synced;
                tracing::info!(
                    revision = start - 1,
                    "registry replica confirmed by etcd's watch"
                );
            }
        }
        // Creation responses carry no events; apply any all the same.
        self.apply(first.events);
        Ok(stream)
    }

    fn cancelled(&self, compact_revision: i64, reason: &str, running: bool) -> WatchEnd {
        if compact_revision > 0 {
            self.compactions.fetch_add(1, Ordering::Relaxed);
            WatchEnd::Relist(format!(
                "watch revision compacted (etcd keeps history from revision {compact_revision})"
            ))
        } else {
            WatchEnd::Broken {
                error: format!("watch cancelled by etcd: {reason}"),
                running,
            }
        }
    }

    /// Watches from `start` until the watch ends; returns why.
    async fn watch_from(&self, start: i64, resuming: bool) -> WatchEnd {
        let mut stream = match self.open_watch(start, resuming).await {
            Ok(s) => s,
            Err(end) => return end,
        };
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    return WatchEnd::Broken {
                        error: "watch stream closed by etcd".into(),
                        running: true,
                    };
                }
                Err(e) => {
                    return WatchEnd::Broken {
                        error: e.to_string(),
                        running: true,
                    };
                }
            };
            if resp.canceled {
                return self.cancelled(resp.compact_revision, &resp.cancel_reason, true);
            }
            self.apply(resp.events);
        }
    }

    /// Moves the preferred member on to the next one.
    fn rotate(&self) {
        let n = self.members.len();
        let _ = self
            .preferred
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |i| Some((i + 1) % n));
    }
}

/// Keeps the replica: list, watch, resume, and back off while etcd is unreachable. Reports
/// the outcome of the first list on `first` (and ends if it failed).
async fn run(
    shared: Arc<Shared>,
    first: oneshot::Sender<Result<(), String>>,
    from_cache: Option<i64>,
) {
    let mut first = Some(first);
    let mut backoff = shared.config.retry_min;
    // Where to resume watching without listing: after a running watch broke, or after the
    // revision of a replica loaded from the cache (which is served from at once).
    let mut resume: Option<i64> = from_cache;
    if from_cache.is_some()
        && let Some(tx) = first.take()
    {
        let _ = tx.send(Ok(()));
    }
    loop {
        let resuming = resume.is_some();
        let start = match resume.take() {
            Some(rev) => {
                shared.resumes.fetch_add(1, Ordering::Relaxed);
                rev
            }
            None => {
                let listed = shared.list().await;
                match (listed, first.take()) {
                    (Ok(rev), first) => {
                        if let Some(tx) = first {
                            let _ = tx.send(Ok(()));
                        }
                        rev + 1
                    }
                    (Err(e), Some(tx)) if !shared.config.start_degraded => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    (Err(e), first) => {
                        if let Some(tx) = first {
                            tracing::warn!(
                                error = %e,
                                "etcd unreachable at start: serving without its registrations \
                                 until it answers"
                            );
                            shared.degrade(&e);
                            let _ = tx.send(Ok(()));
                        } else {
                            shared.degrade(&e);
                        }
                        sleep(jitter(backoff)).await;
                        backoff = (backoff * 2).min(shared.config.retry_max);
                        continue;
                    }
                }
            }
        };
        let began = Instant::now();
        let ran = match shared.watch_from(start, resuming).await {
            WatchEnd::Relist(why) => {
                tracing::info!(%why, "listing registrations again");
                true
            }
            WatchEnd::Broken {
                error,
                running: true,
            } => {
                tracing::info!(%error, "registry watch broke; resuming it on the next member");
                resume = Some(*shared.applied.borrow() + 1);
                shared.rotate();
                true
            }
            WatchEnd::Broken {
                error,
                running: false,
            } => {
                shared.degrade(&error);
                shared.rotate();
                false
            }
        };
        // A watch that ran a while resets the backoff; one that could not open, or ended
        // quickly (a flapping member, anything that keeps forcing a list), waits before the
        // next try, longer each time, so the replica never spins.
        if ran && began.elapsed() >= WATCH_HEALTHY_AFTER {
            backoff = shared.config.retry_min;
        } else {
            sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(shared.config.retry_max);
        }
    }
}

/// `d` scaled by a random factor in [0.5, 1.5), so that routers do not retry in step.
fn jitter(d: Duration) -> Duration {
    let r = RandomState::new().hash_one(Instant::now());
    d.mul_f64(0.5 + (r % 1024) as f64 / 1024.0)
}

/// Requests in flight at once while listing: enough to keep etcd's and our cores busy.
const LIST_CONCURRENCY: usize = 4;

/// The characters registration keys branch on right after the registration prefix and
/// within the service prefix's hex digits, in byte order.
const HEX: &[u8; 16] = b"0123456789abcdef";

/// Splits the keys after `last` and before `end` (`"\0"`: no end) into ranges that divide
/// them where the keys `first ..= last` of one page start to differ: the page's keys share a
/// prefix `q`, so the range is cut at `q` followed by each hex digit, and at the end of
/// everything under `q`. The ranges are contiguous, cover exactly `(last, end)`, and come
/// back in reverse key order (to be popped from the end of a list in key order).
fn split_rest(first: &[u8], last: &[u8], end: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let start = [last, &[0]].concat();
    let shared = first.iter().zip(last).take_while(|(a, b)| a == b).count();
    let q = &last[..shared];
    let below_end = |k: &[u8]| end == [0] || k < end;
    let mut cuts: Vec<Vec<u8>> = HEX
        .iter()
        .map(|&c| [q, &[c]].concat())
        .chain([prefix_end(q)])
        .filter(|k| k.as_slice() > start.as_slice() && below_end(k) && k != &[0])
        .collect();
    cuts.sort();
    cuts.dedup();
    let mut bounds = Vec::with_capacity(cuts.len() + 2);
    bounds.push(start);
    bounds.extend(cuts);
    bounds.push(end.to_vec());
    let mut ranges: Vec<_> = bounds
        .windows(2)
        .map(|w| (w[0].clone(), w[1].clone()))
        .collect();
    ranges.reverse();
    ranges
}

/// Saves the replica to `path` after each list and then every `cache_every` while its
/// revision moves, and only while it is synced (a degraded replica may be missing changes).
async fn save_cache(shared: Arc<Shared>, path: std::path::PathBuf) {
    let mut saved_rev = None;
    loop {
        tokio::select! {
            () = shared.listed.notified() => {}
            () = sleep(shared.config.cache_every) => {}
        }
        let saved = {
            let st = shared.lock();
            let revision = *shared.applied.borrow();
            if saved_rev == Some(revision) || st.health != Health::Synced {
                continue;
            }
            crate::cache::Saved {
                cluster_id: st.cluster_id,
                revision,
                kvs: st
                    .regs
                    .iter()
                    .map(|(k, e)| {
                        let (key, value) = (shared.keys.key(k), e.value.encode());
                        (key.into_bytes(), value.into_bytes(), e.lease)
                    })
                    .collect(),
            }
        };
        let revision = saved.revision;
        let (path2, prefix) = (path.clone(), shared.config.prefix.clone());
        match tokio::task::spawn_blocking(move || crate::cache::save(&path2, &prefix, &saved)).await
        {
            Ok(Ok(())) => saved_rev = Some(revision),
            Ok(Err(e)) => {
                tracing::warn!(cache = %path.display(), error = %e, "cannot save the registry cache")
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_members_and_a_prefix() {
        let c = EtcdConfig::from_url("etcd://127.0.0.1:2379").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.endpoints, ["127.0.0.1:2379"]);
        assert_eq!(c.prefix, "/serval");
        let c = EtcdConfig::from_url("etcd://a:1,[::1]:2,b.example:3/lab/x/")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.endpoints, ["a:1", "[::1]:2", "b.example:3"]);
        assert_eq!(c.prefix, "/lab/x");
        let c = EtcdConfig::from_url("etcd://a:1/").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.prefix, "");
        for bad in [
            "etcd://",
            "etcd://a",
            "etcd://a:",
            "etcd://a:0",
            "etcd://a:99999",
            "etcd://:1",
            "etcd://a:1,",
            "etcd://::1:2",
            "etcd://[zz]:2",
            "etcd://a:1/x y",
            "etcd://u@a:1",
            "etcd://a:1?x=1",
            "http://a:1",
        ] {
            assert!(
                matches!(EtcdConfig::from_url(bad), Err(RegistryError::BadUrl(_))),
                "{bad}"
            );
        }
    }

    /// Whether `k` falls in `[lo, hi)`, with `"\0"` as no upper bound.
    fn within(k: &[u8], lo: &[u8], hi: &[u8]) -> bool {
        k >= lo && (hi == [0] || k < hi)
    }

    #[test]
    fn the_rest_of_a_list_is_split_into_contiguous_ranges_covering_it() {
        let cases: &[(&[u8], &[u8], &[u8])] = &[
            // Spread keys: cut at the first digit after the registration prefix.
            (b"/s/v1/reg/0a", b"/s/v1/reg/1f", b"/s/v1/reg0"),
            // Clustered keys (one domain): cut where they start to differ.
            (
                b"/s/v1/reg/a0252ffe10",
                b"/s/v1/reg/a0252ffe3c",
                b"/s/v1/reg0",
            ),
            // A page of one key, and a range with no end.
            (b"/r/77", b"/r/77", b"\0"),
            // Keys past the hex digits (locators), and the last digit.
            (b"/r/ff/64/10.0.0.1:1", b"/r/ff/64/10.0.0.9:1", b"/r/ff0"),
        ];
        for &(first, last, end) in cases {
            let ranges = split_rest(first, last, end);
            assert!(!ranges.is_empty());
            // In reverse key order, contiguous, from just after `last` to `end`.
            let fwd: Vec<_> = ranges.iter().rev().collect();
            assert_eq!(fwd[0].0, [last, &[0]].concat());
            assert_eq!(fwd[fwd.len() - 1].1, end);
            for w in fwd.windows(2) {
                assert_eq!(w[0].1, w[1].0, "contiguous");
            }
            for (lo, hi) in &fwd {
                assert!(hi.as_slice() == [0] || lo < hi, "{lo:?}..{hi:?} is empty");
            }
            // Keys after `last` each land in exactly one range; `last` in none.
            let mut probes: Vec<Vec<u8>> = vec![last.to_vec()];
            for c in HEX.iter().chain(b"/:.\xff") {
                for base in [first, last] {
                    for cut in 0..=base.len() {
                        probes.push([&base[..cut], &[*c]].concat());
                        probes.push([&base[..cut], &[*c, b'5']].concat());
                    }
                }
            }
            for k in probes {
                let after = k.as_slice() > last && (end == [0] || k.as_slice() < end);
                let hits = fwd.iter().filter(|(lo, hi)| within(&k, lo, hi)).count();
                assert_eq!(
                    hits,
                    usize::from(after),
                    "{:?}",
                    String::from_utf8_lossy(&k)
                );
            }
        }
    }

    #[test]
    fn clustered_keys_are_cut_where_they_differ() {
        let ranges = split_rest(b"/r/a0252ffe10", b"/r/a0252ffe3c", b"/r0");
        let cuts: Vec<_> = ranges.iter().rev().skip(1).map(|r| r.0.clone()).collect();
        assert_eq!(cuts[0], b"/r/a0252ffe4");
        assert_eq!(cuts.last().unwrap(), b"/r/a0252fff");
    }

    #[test]
    fn jitter_stays_within_half_to_one_and_a_half() {
        for _ in 0..100 {
            let j = jitter(Duration::from_millis(100));
            assert!(j >= Duration::from_millis(50) && j < Duration::from_millis(150));
        }
    }
}
